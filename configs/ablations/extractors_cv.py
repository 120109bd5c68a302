"""Ablation: extractor types (spec §3.7, paper Table 4b), cross-validated (configs/ablations/common.py).

The argument is `<type>` or `<type>,smoke`: sentence_bert (the reference arm), decoder_lm (SmolLM2-135M's
hidden states after 16 of its 30 layers, 576-d; the paper's Qwen2.5-7B cannot be had offline) or static
(all-MiniLM's word-piece table without context, 384-d; no GloVe offline). The generator's first layer takes
the extractor's width. The paper fits 20 prompts per condition next to its 7B LM; here every arm keeps
the reference's number of prompts, so only the extractor differs. configs/ablations/extractors.py is the
same choice on the leave-one-out ARC-c run.

  python -m dnd_jax.experiment --config configs/ablations/extractors_cv.py:static --workdir runs/ablations
"""

from configs.ablations import common
from configs.ablations.extractors import TYPES

WIDTH = {"sentence_bert": 384, "static": 384, "decoder_lm": 576}


def get_config(arg=None):
    kind, smoke = common.parse(arg, TYPES)
    c = common.get_config(smoke, "reference" if kind == "sentence_bert" else f"extractor-{kind}")
    c.encoder.type = kind
    if kind == "decoder_lm":
        c.encoder.path = "smollm2-135m-instruct"
        # 0: round(15/28 of the layers), the paper's fraction: 16 of SmolLM2's 30.
        c.encoder.num_layers = 0
    n, length, _ = c.model.features[0]
    c.model.features = ((n, length, WIDTH[kind]), *c.model.features[1:])
    return c
