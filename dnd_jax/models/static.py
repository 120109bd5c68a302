"""Static (context-free) word vectors as a prompt extractor: one table lookup per token.

Legend: L text length, D vector width, V vocabulary.

The DnD ablation "GloVe" (spec §3.7) conditions the generator on GloVe 42B 300-d word vectors of the
prompt's words: no context, out-of-vocabulary words as an all-ones vector, zero vectors at padded
positions. No PyPI package ships GloVe or fastText vectors that load offline with this project's
dependencies (see docs/experiments.md, "Ablations: extractor types"), so dnd_jax/extractors.py fills the table with
the Sentence-BERT's own input token embeddings (all-MiniLM-L6-v2, 384-d), looked up by its tokenizer's
word pieces without [CLS]/[SEP]: the BERT path's vocabulary without its context. The rules of the
GloVe arm are kept: the unknown token ([UNK]) maps to all ones and padded positions to zeros. Math only.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StaticConfig:
    """Table size (static under jit); `oov_id` is the token id that maps to all ones (-1: none)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    oov_id: int = 100


class StaticEmbedding(nnx.Module):
    """Word vectors by token id; frozen in DnD (no gradients, not in the optimizer)."""

    def __init__(self, cfg: StaticConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.table = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                               rngs=rngs or nnx.Rngs(0))  # fmt: skip

    def __call__(
        self,
        input_ids,
        attention_mask,
        key=None,
        mask_padding: bool = False,
        chunk: int | None = None,
        key_length: int | None = None,
    ):
        """Looks the tokens up.

        Args:
          input_ids: int [..., L].
          attention_mask: int/bool [..., L]; padded positions give zero vectors (the GloVe arm's padding),
            whatever `mask_padding` says.
          key, mask_padding, chunk, key_length: ignored; accepted so every extractor has the same call.

        Returns:
          [..., L, D] (compute dtype).
        """
        del key, mask_padding, chunk, key_length
        x = self.table(input_ids)
        if self.cfg.oov_id >= 0:
            x = jnp.where((input_ids == self.cfg.oov_id)[..., None], jnp.ones((), x.dtype), x)
        return x * (attention_mask[..., None] > 0).astype(x.dtype)
