"""Flax NNX models: the frozen prompt encoder and the hyper-convolutional generator."""
