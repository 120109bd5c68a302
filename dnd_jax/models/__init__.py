"""Flax NNX models, math only: the frozen prompt extractors (encoder: BERT, decoder_lm: Llama/Qwen2, static: word
vectors; dnd_jax/extractors.py loads them) and the hyper-convolutional generator."""
