"""Extractor ablation (spec §3.7, paper Table 4b): ARC-c held out, the condition from another extractor.

The argument is `<type>` or `<type>,smoke` with type one of sentence_bert, decoder_lm, static
(dnd_jax/extractors.py); the rest is configs/arc_c.py (with `smoke`, its CPU setting). Each type sets
the generator's first layer to its extractor's output (model.features[0] = (num_texts, L, width)).

  decoder_lm   paper: Qwen2.5-7B-Instruct, hidden states after 15 of 28 layers, 3584-d, 20 prompts per
               sample. smoke: SmolLM2-135M-Instruct (built in), 16 of 30 layers (the same fraction), 576-d.
  static       paper: GloVe 42B 300-d over 200 words. Here (no GloVe offline): all-MiniLM's 384-d
               word-piece embeddings without context, [UNK] -> ones, zero padding.
  sentence_bert  the default (configs/arc_c.py), for the same-run comparison.

decoder_lm and static have no dropout (encoder.train_dropout changes nothing). All three of the paper's
arms ran 3000 steps. The paper's decoder_lm needs a local Qwen2.5-7B-Instruct
folder (--config.encoder.path=DIR); none can be had offline here.

  python -m dnd_jax.train --config configs/ablations/extractors.py:decoder_lm,smoke --workdir runs/train/ext_decoder_lm
  python -m dnd_jax.train --config configs/ablations/extractors.py:static,smoke --workdir runs/train/ext_static
"""

import ml_collections

from configs import base

TYPES = ("sentence_bert", "decoder_lm", "static")


def get_config(arg=None) -> ml_collections.ConfigDict:
    kind, *rest = (arg or "").split(",")
    if kind not in TYPES or rest not in ([], ["smoke"]):
        raise ValueError(
            f"unknown config argument {arg!r} (expected <type> or <type>,smoke; types: {', '.join(TYPES)})"
        )
    smoke = rest == ["smoke"]
    c = base.get_config("ARC-c", ["ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "HellaSwag"], steps=3000,
                        arg="smoke" if smoke else None)  # fmt: skip
    c.encoder.type = kind
    n, length, width = c.model.features[0]
    if kind == "decoder_lm":
        # The LM's hidden size; the paper fits only 20 prompts per sample next to the 7B LM.
        c.encoder.path = "smollm2-135m-instruct" if smoke else "models/Qwen2.5-7B-Instruct"
        # Layers run: 0 = round(15/28 of the layers): 16 of SmolLM2's 30, 15 of Qwen2.5-7B's 28.
        c.encoder.num_layers = 0
        width = 576 if smoke else 3584
        n = n if smoke else 20
    # static: the Sentence-BERT's word-piece table, so the BERT path's width, tokens and path.
    c.data.num_texts = n
    c.model.features = ((n, length, width), *c.model.features[1:])
    return c
