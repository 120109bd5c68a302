"""Decoder-only LM as a prompt extractor: a Flax NNX port of the Llama architecture (and its Qwen2 variant).

Legend: S texts, L text length, D hidden, H query heads, G key/value heads (GQA), K head dim, F MLP width.

The DnD ablation "Qwen2.5-7B-Instruct" (spec §3.7) conditions the generator on the hidden states
after layer index 14 of a decoder-only LM: the output of its first 15 decoder layers, without the
final RMSNorm, at every token position (no pooling, padded positions included as the BERT path).
This module computes exactly `transformers.LlamaModel(...)(output_hidden_states=True).hidden_states[n]`
(or `Qwen2Model`'s) for n = `cfg.num_layers` < the model's depth: token embedding, then n layers of
pre-RMSNorm causal self-attention (rotary positions 0..L-1 with the config's rope_theta, grouped-query
attention, q/k/v biases for Qwen2) and pre-RMSNorm SiLU-gated MLP, each with a residual add.
Texts are right-padded; the attention mask is the causal mask plus the padding mask on the keys, so a
padded position sees every real token of its text (as the PyTorch model computes it). There is no
dropout (Llama/Qwen2 have none), so the `key` argument is ignored. Math only: dnd_jax/extractors.py
reads the config and the weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnd_jax.errors import DndError
from dnd_jax.models.encoder import auto_chunk, encode_in_chunks

# The paper's choice: hidden states after 15 of Qwen2.5-7B's 28 decoder layers.
PAPER_LAYERS, PAPER_DEPTH = 15, 28


def default_num_layers(depth: int) -> int:
    """The paper's fraction of the layers (15 of 28) for a model of `depth` layers: 16 of SmolLM2's 30."""
    return max(1, round(depth * PAPER_LAYERS / PAPER_DEPTH))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Llama/Qwen2 hyper-parameters (static under jit); `num_layers` = layers run, not the model's depth."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 16
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases
    depth: int = 30  # the model's own number of layers

    @classmethod
    def from_hf(cls, config: dict, where: str, num_layers: int = 0) -> DecoderConfig:
        """From a transformers config.json dict (llama or qwen2); num_layers 0 = `default_num_layers`."""
        kind = config.get("model_type")
        if kind not in ("llama", "qwen2"):
            raise DndError(f"{where}: model_type {kind!r} is not a decoder-only LM this extractor ports "
                           "(expected 'llama' or 'qwen2', e.g. SmolLM2 or Qwen2.5)")  # fmt: skip
        if config.get("hidden_act", "silu") != "silu":
            raise DndError(f"{where}: hidden_act {config.get('hidden_act')!r}; only SiLU-gated MLPs are supported")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise DndError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r}; only default RoPE")
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        depth, heads = config["num_hidden_layers"], config["num_attention_heads"]
        n = num_layers or default_num_layers(depth)
        if not 1 <= n <= depth:
            raise DndError(f"config field encoder.num_layers: {n} is not in 1..{depth} ({where})")
        if kind == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
            raise DndError(f"{where}: attention_bias/mlp_bias Llama variants are not supported")
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=n,
                   num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate_size=config["intermediate_size"], rope_theta=float(theta),
                   rms_norm_eps=config["rms_norm_eps"], qkv_bias=kind == "qwen2", depth=depth)  # fmt: skip


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 (as LlamaRMSNorm), returned in the compute dtype."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x32.astype(self.dtype)).astype(self.dtype)


def rotary(length: int, head_dim: int, theta: float):
    """cos, sin [L, K] of the default (non-interleaved, "rotate half") rotary embedding at positions 0..L-1."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


def apply_rotary(x_slhk, cos_lk, sin_lk):
    half = x_slhk.shape[-1] // 2
    rotated = jnp.concatenate([-x_slhk[..., half:], x_slhk[..., :half]], axis=-1)
    cos, sin = cos_lk[None, :, None, :], sin_lk[None, :, None, :]
    return (x_slhk.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_slhk.dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm causal GQA self-attention and SiLU-gated MLP, each with a residual add."""

    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        d, h, g, k, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.q_proj = nnx.Linear(d, h * k, use_bias=cfg.qkv_bias, **kw)
        self.k_proj = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, **kw)
        self.v_proj = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = nnx.Linear(h * k, d, use_bias=False, **kw)
        self.gate_proj = nnx.Linear(d, f, use_bias=False, **kw)
        self.up_proj = nnx.Linear(d, f, use_bias=False, **kw)
        self.down_proj = nnx.Linear(f, d, use_bias=False, **kw)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)

    def __call__(self, x_sld, bias_s1ll, cos_lk, sin_lk):
        cfg = self.cfg
        s, length, _ = x_sld.shape
        h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        y = self.input_norm(x_sld)
        q = apply_rotary(self.q_proj(y).reshape(s, length, h, k), cos_lk, sin_lk)
        kk = apply_rotary(self.k_proj(y).reshape(s, length, g, k), cos_lk, sin_lk)
        v = self.v_proj(y).reshape(s, length, g, k)
        q = q.reshape(s, length, g, h // g, k)  # query heads grouped by the key/value head they share
        scores = jnp.einsum("sqgrk,spgk->sgrqp", q, kk).astype(jnp.float32) / np.sqrt(k)
        probs = jax.nn.softmax(scores + bias_s1ll[:, :, None], axis=-1).astype(x_sld.dtype)
        ctx = jnp.einsum("sgrqp,spgk->sqgrk", probs, v).reshape(s, length, h * k)
        x_sld = x_sld + self.o_proj(ctx)
        y = self.post_attention_norm(x_sld)
        return x_sld + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))


class DecoderLM(nnx.Module):
    """The first `cfg.num_layers` layers of a Llama/Qwen2 LM; frozen in DnD (no gradients, not in the optimizer)."""

    def __init__(self, cfg: DecoderConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])

    def __call__(
        self,
        input_ids,
        attention_mask,
        key=None,
        mask_padding: bool = False,
        chunk: int | None = None,
        key_length: int | None = None,
    ):
        """Hidden states after `cfg.num_layers` layers (no final norm).

        Args:
          input_ids: int [..., L], right-padded.
          attention_mask: int/bool [..., L].
          key: ignored (no dropout); accepted so every extractor has the same call.
          mask_padding: zero the hidden states of padded positions (the original does not).
          chunk: texts per lax.map chunk (0 = all at once; None = `encoder.auto_chunk`), same outputs.
          key_length: ignored (the BERT encoder's key trimming); accepted so every extractor has the same call.

        Returns:
          [..., L, D] hidden states (compute dtype).
        """
        del key, key_length
        lead, length = input_ids.shape[:-1], input_ids.shape[-1]
        ids, mask = input_ids.reshape(-1, length), attention_mask.reshape(-1, length)
        chunk = auto_chunk(self.cfg, length) if chunk is None else chunk
        x = encode_in_chunks(lambda i, m, _: self._encode(i, m), ids, mask, None, chunk)
        if mask_padding:
            x = x * mask[..., None].astype(x.dtype)
        return x.reshape(*lead, length, self.cfg.hidden_size)

    def _encode(self, ids_sl, mask_sl):
        length = ids_sl.shape[-1]
        cos, sin = rotary(length, self.cfg.head_dim, self.cfg.rope_theta)
        causal = np.tril(np.ones((length, length), bool))
        allowed = causal[None] & (mask_sl[:, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [S, 1, L, L]
        x = self.embed(ids_sl)
        for layer in self.layers:
            x = layer(x, bias, cos, sin)
        return x
