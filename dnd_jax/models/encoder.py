"""Frozen prompt encoder: a BERT (Sentence-BERT backbone) in Flax NNX; math only (dnd_jax/extractors.py loads it).

Legend: B batch, N prompts per sample, L text length (max_text_length), D hidden (384 for MiniLM).

transformers 5 ships no Flax models, so this is ours. It computes exactly what
`transformers.BertModel(...).last_hidden_state` computes (absolute positions, token type 0,
exact-erf GELU, post-LayerNorm), with the attention mask applied inside attention only. As in the
original DnD, the condition is the token-level last hidden state with no pooling, padded
positions included unless `mask_padding` is set; texts longer than the position table are cut
into independent 512-token segments (spec §3.4). Dropout is explicit: pass a PRNG key to get the
original's "dropout on during training" behaviour, None for deterministic.

Every extractor (this one, models/decoder_lm.py, models/static.py) has the same call,
`module(input_ids [..., L], attention_mask [..., L], key=None, mask_padding=False) -> [..., L, D]`,
and `module.cfg.hidden_size` = D; `encode_in_chunks` and `tokenize_prompts` are shared by all of them.

Key trimming (`key_length`, from `keys_needed(masks)` on the host): texts are right-padded, so when no
text of the data has a real token past position K, the keys and values of positions K..L-1 are padding
for every text, get exactly zero attention weight, and are left out of attention. Every position is
still a query (padded positions' outputs are part of the condition), so the output is the same; the
attention's cost drops by L / K (128 x 384-token prompts of ~120 tokens: 6.5 s -> 4.4 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnd_jax import fast_random
from dnd_jax.errors import DndError


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters (static under jit)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    @classmethod
    def from_hf(cls, config: dict, where: str) -> BertConfig:
        if config.get("model_type") != "bert":
            raise DndError(f"{where}: model_type {config.get('model_type')!r} is not BERT; the encoder loads "
                           "BERT-family checkpoints (e.g. all-MiniLM-L6-v2)")  # fmt: skip
        if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
            raise DndError(f"{where}: only absolute positions and exact GELU are supported")
        return cls(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"], config["max_position_embeddings"],
                   config["type_vocab_size"], config["layer_norm_eps"], config["hidden_dropout_prob"],
                   config["attention_probs_dropout_prob"])  # fmt: skip


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = fast_random.bernoulli(key, 1.0 - rate, x.shape)  # = jax.random.bernoulli, faster on CPU
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class BertLayer(nnx.Module):
    """Self-attention + feed-forward, each followed by residual add and LayerNorm (post-LN)."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, dtype=jnp.float32):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.dtype = dtype  # matmul input dtype; accumulation and everything else float32 (autocast)
        kw = dict(dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        self.query, self.key, self.value = (nnx.Linear(d, d, **kw) for _ in range(3))
        self.attn_out = nnx.Linear(d, d, **kw)
        self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.ffn_in = nnx.Linear(d, f, **kw)
        self.ffn_out = nnx.Linear(f, d, **kw)
        self.ffn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x_sld, bias_s11k, key=None):
        """bias_s11k: additive attention mask over the first K <= L positions (keys past K are all padding)."""
        cfg = self.cfg
        s, length, d = x_sld.shape
        h, kl = cfg.num_heads, bias_s11k.shape[-1]
        keys = jax.random.split(key, 3) if key is not None else (None,) * 3

        def heads(t):
            return t.reshape(s, t.shape[1], h, d // h).astype(self.dtype)

        x_skd = x_sld[:, :kl]
        q, k, v = heads(self.query(x_sld)), heads(self.key(x_skd)), heads(self.value(x_skd))
        f32 = jnp.float32
        scores = jnp.einsum("sqhd,skhd->shqk", q, k, preferred_element_type=f32) / np.sqrt(d // h) + bias_s11k
        probs = _dropout(jax.nn.softmax(scores, axis=-1), cfg.attention_dropout, keys[0]).astype(self.dtype)
        ctx = jnp.einsum("shqk,skhd->sqhd", probs, v, preferred_element_type=f32).reshape(s, length, d)
        x_sld = self.attn_norm(x_sld + _dropout(self.attn_out(ctx), cfg.hidden_dropout, keys[1]))
        ffn = self.ffn_out(jax.nn.gelu(self.ffn_in(x_sld), approximate=False))
        return self.ffn_norm(x_sld + _dropout(ffn, cfg.hidden_dropout, keys[2]))


class BertEncoder(nnx.Module):
    """BERT returning last hidden states; frozen in DnD (no gradients, not in the optimizer)."""

    def __init__(self, cfg: BertConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        """dtype: the matmuls' input dtype. bfloat16 is the original's bf16 autocast: weights and activations
        enter every matmul (linear layers, attention) in bf16 with float32 accumulation and output, while
        embeddings, LayerNorm, softmax, GELU and the residual stream stay float32. On CPUs with AMX or
        AVX-512-BF16 these bf16 x bf16 -> f32 dots are XLA's fast path (2-3x the fp32 encoder)."""
        rngs = rngs or nnx.Rngs(0)
        d = cfg.hidden_size
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position, d, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.emb_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs, dtype) for _ in range(cfg.num_layers)])

    def __call__(
        self,
        input_ids,
        attention_mask,
        key=None,
        mask_padding: bool = False,
        chunk: int | None = None,
        key_length: int | None = None,
    ):
        """Encodes token ids.

        Args:
          input_ids: int [..., L]; L > max_position is cut into independent max_position segments.
          attention_mask: int/bool [..., L].
          key: PRNG key for dropout (training as the original); None = deterministic.
          mask_padding: zero the hidden states of padded positions (the original does not).
          chunk: encode this many texts at a time (lax.map over chunks; 0 = all at once; None = `auto_chunk`).
            Same outputs; the intermediates (attention scores above all) then stay small enough for
            the CPU's caches. With dropout each chunk draws from its own key.

        Returns:
          [..., L, D] last hidden states, float32.
        """
        lead, length = input_ids.shape[:-1], input_ids.shape[-1]
        seg = min(length, self.cfg.max_position)
        if length % seg:
            raise DndError(f"text length {length} must be at most {self.cfg.max_position} or a multiple of it")
        ids = input_ids.reshape(-1, seg)
        mask = attention_mask.reshape(-1, seg)
        kl = seg if key_length is None or seg < length else min(int(key_length), seg)
        chunk = auto_chunk(self.cfg, seg, self.layers[0].dtype) if chunk is None else chunk
        x = encode_in_chunks(functools.partial(self._encode, key_length=kl), ids, mask, key, chunk)
        if mask_padding:
            x = x * mask[..., None].astype(x.dtype)
        return x.reshape(*lead, length, self.cfg.hidden_size)

    def _encode(self, ids, mask, key, key_length: int):
        """[S, seg] ids and mask -> [S, seg, D] hidden states; keys past `key_length` left out."""
        pos = jnp.arange(ids.shape[-1])[None, :]
        x = self.word(ids) + self.position(pos) + self.token_type(jnp.zeros_like(ids))
        keys = (
            list(jax.random.split(key, self.cfg.num_layers + 1))
            if key is not None
            else [None] * (self.cfg.num_layers + 1)
        )
        x = _dropout(self.emb_norm(x), self.cfg.hidden_dropout, keys[0])
        bias = jnp.where(mask[:, None, None, :key_length] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer, k in zip(self.layers, keys[1:], strict=True):
            x = layer(x, bias, k)
        return x


# Attention scores of one chunk (texts x heads x L x L float32) kept under this many bytes on CPU.
# 128 x 384-token prompts, MiniLM-L6, 2 cores: all at once 16.4 s, 1 per chunk 5.9 s (PyTorch 6.6 s);
# 64 x 48 tokens: 0.30 s at once, 8 per chunk 0.27 s (benchmarks/encoder_bench.py). bf16 x bf16 -> f32
# dots reach the AMX units' rates only on larger GEMMs, so bf16 encoders take 8x larger chunks (2 AMX
# Xeon cores, bf16: 32 x 32 tokens 0.049 -> 0.047 s, 64 x 48 0.160 -> 0.140 s; 128 x 384 still 1 per chunk).
_CHUNK_SCORE_BYTES = 1 << 20
_CHUNK_SCORE_BYTES_BF16 = 8 << 20
_CHUNK_SCORE_BYTES_ACCEL = 1 << 30


def auto_chunk(cfg, length: int, dtype=jnp.float32) -> int:
    """Texts per chunk: on CPU as many as keep one chunk's attention scores under 1 MiB (8 MiB for matmuls
    in a 16-bit `dtype`; at least 1), for the caches; on GPU/TPU as many as keep them under 1 GiB, for the
    memory: XLA's attention materialises the float32 scores [texts, heads, L, L] (at the paper's 128 x 384-token
    prompts and a batch of 16 on one device, 14.5 GB per layer at once; chunked, 151 texts of 384 tokens per
    chunk, still ~58k tokens per kernel)."""
    if jax.default_backend() != "cpu":
        return max(1, _CHUNK_SCORE_BYTES_ACCEL // (cfg.num_heads * length * length * 4))
    budget = _CHUNK_SCORE_BYTES if jnp.dtype(dtype).itemsize >= 4 else _CHUNK_SCORE_BYTES_BF16
    return max(1, budget // (cfg.num_heads * length * length * 4))


def keys_needed(*masks, multiple: int = 8) -> int:
    """The K of `BertEncoder(..., key_length=K)` for texts with these attention masks ([..., L] arrays, host
    side): one past the last position where any text has a real token, rounded up to `multiple` (fewer
    compiled shapes), at most L."""
    length = masks[0].shape[-1]
    last = max((int(np.flatnonzero(np.asarray(m).reshape(-1, length).any(0)).max(initial=-1)) for m in masks),
               default=-1)  # fmt: skip
    return min(length, max(multiple, -(-(last + 1) // multiple) * multiple))


def even_chunk(n: int, chunk: int) -> int:
    """The chunk size actually used for n texts: 0 (all at once) when one chunk holds them all, else the
    same number of chunks as `chunk` gives, made as even as possible (least padding)."""
    if not chunk or n <= chunk:
        return 0
    return -(-n // -(-n // chunk))


def encode_in_chunks(encode, ids_sl, mask_sl, key, chunk: int):
    """`encode(ids [C, L], mask [C, L], key) -> [C, L, D]` over S texts, `chunk` texts at a time (lax.map).

    The chunk size is made even (`even_chunk`); 0, or a chunk holding all texts, encodes them at once.
    Texts padding the last chunk (mask all ones) are encoded and dropped; with a key each chunk draws
    from its own key.

    Returns:
      [S, L, D].
    """
    n, length = ids_sl.shape
    chunk = even_chunk(n, chunk)
    if not chunk:
        return encode(ids_sl, mask_sl, key)
    pad = -n % chunk
    ids_c = jnp.pad(ids_sl, ((0, pad), (0, 0))).reshape(-1, chunk, length)
    mask_c = jnp.pad(mask_sl, ((0, pad), (0, 0)), constant_values=1).reshape(-1, chunk, length)
    if key is None:
        x = jax.lax.map(lambda a: encode(a[0], a[1], None), (ids_c, mask_c))
    else:
        keys = jax.random.split(key, ids_c.shape[0])
        x = jax.lax.map(lambda a: encode(*a), (ids_c, mask_c, keys))
    return x.reshape(-1, *x.shape[2:])[:n]


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads/truncates prompts to max_length as the original: (input_ids, attention_mask), int32 [P, L]."""
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")  # fmt: skip
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def mean_pool(hidden, mask, normalize: bool = True):
    """Sentence-transformers mean pooling (+ L2 normalisation as all-MiniLM's Normalize module)."""
    m = mask[..., None].astype(jnp.float32)
    pooled = (hidden.astype(jnp.float32) * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled
