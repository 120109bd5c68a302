"""The whole Llama/Qwen2 causal LM with a per-row LoRA argument: the frozen LM that SFT mode trains through.

Legend: B rows, L length, D hidden, V vocabulary, I/O a projection's input/output width, R LoRA rank.

`CausalLM(ids, mask, lora, scale)` computes `transformers.LlamaForCausalLM` (or Qwen2's) logits: the
embedding, every decoder layer of models/decoder_lm.py, the final RMSNorm and the LM head (the embedding
transposed when the config ties them). A LoRA is not a parameter but an argument, in the converters' layout
(converters/spec.py) with a leading row axis on every leaf:

  lora["layers"]["3"]["self_attn"]["q_proj"] = {"lora_a": [B, I, R], "lora_b": [B, R, O]}

for any subset of q/k/v/o_proj (under "self_attn") and gate/up/down_proj (under "mlp"). Row b's projection
is y = x W (+ bias) + scale * (x A_b) B_b, so each row of a batch can carry another task's adapter and
`jax.grad` reaches the generator that made it. Rows are right-padded (positions 0..L-1, as the extractor).
`response_nll` is HF's causal-LM loss: the mean NLL of the label tokens (-100 ignored), shifted by one.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.pytree import flatten
from dnd_jax.errors import DndError
from dnd_jax.models.decoder_lm import DecoderConfig, DecoderLayer, DecoderLM, RMSNorm, rotary

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
_LEAF = re.compile(r"layers/(\d+)/(self_attn|mlp)/(\w+)/(lora_a|lora_b)")
IGNORE = -100  # label of a position without loss (prompt, padding), as HF


class CausalLM(nnx.Module):
    """Llama/Qwen2 LM with its head; frozen in SFT mode (the LoRA, an argument, carries the gradient).

    Args:
      cfg: hyper-parameters with `num_layers` == `depth` (every layer runs).
      tie_embeddings: the LM head is the embedding (HF `tie_word_embeddings`); else an own `lm_head`.
      dtype: compute dtype (parameters and logits are float32; norms and softmax compute in float32).
      rngs: initialisation of new parameters (`load_causal_lm` builds it abstract and fills it from a checkpoint).
    """

    def __init__(self, cfg: DecoderConfig, tie_embeddings: bool, dtype=jnp.float32, rngs=None):
        if cfg.num_layers != cfg.depth:
            raise DndError(f"CausalLM runs every layer: num_layers {cfg.num_layers} != depth {cfg.depth}")
        rngs = rngs or nnx.Rngs(0)
        self.cfg, self.tie_embeddings = cfg, tie_embeddings
        self.decoder = DecoderLM(cfg, dtype, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.lm_head = None if tie_embeddings else nnx.Linear(cfg.hidden_size, cfg.vocab_size, **kw)

    def __call__(self, input_ids, attention_mask, lora=None, scale=None):
        """Logits of every position.

        Args:
          input_ids: int [B, L], right-padded.
          attention_mask: int/bool [B, L].
          lora: None, or the converters' LoRA pytree with a leading B axis on every leaf (module docstring).
          scale: PEFT's alpha/r (or alpha/sqrt(r)): a number, a [B] array, or {tree path
            "layers/0/self_attn/q_proj": number or [B]} (`spec_scales`); required with a LoRA.

        Returns:
          float32 [B, L, V] logits.
        """
        return self.logits(self.hidden(input_ids, attention_mask, lora, scale))

    def hidden(self, input_ids, attention_mask, lora=None, scale=None):
        """The final normed hidden states [B, L, D] (compute dtype): `__call__` less the head."""
        cfg, dec = self.cfg, self.decoder
        length = input_ids.shape[-1]
        cos, sin = rotary(length, cfg.head_dim, cfg.rope_theta)
        allowed = np.tril(np.ones((length, length), bool))[None] & (attention_mask[:, None, :] > 0)
        bias_b1ll = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]
        adapters = layer_adapters(lora, cfg.depth, input_ids.shape[0])
        x_bld = dec.embed(input_ids)
        for i, layer in enumerate(dec.layers):
            x_bld = _adapted(layer, adapters[i], scale, i)(x_bld, bias_b1ll, cos, sin)
        return self.norm(x_bld)

    def logits(self, x_bld):
        """The LM head on hidden states [..., D]: float32 [..., V]."""
        dec = self.decoder
        head_vd = dec.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...].T
        return jnp.einsum("...d,vd->...v", x_bld, head_vd.astype(x_bld.dtype), preferred_element_type=jnp.float32)


def _adapted(layer: DecoderLayer, adapters: dict, scale, index: int) -> Callable:
    """The layer's forward with each adapted projection replaced by projection + LoRA.

    It runs decoder_lm's own `DecoderLayer.__call__` (the math tested against transformers) on a view of
    the layer whose projections are the adapted functions, so the two models cannot drift apart.
    """
    if not adapters:
        return layer
    view = types.SimpleNamespace(**{name: getattr(layer, name) for name in vars(layer) if not name.startswith("_")})
    for name, (a_bir, b_bro) in adapters.items():
        s = _scale_of(scale, f"layers/{index}/{PROJECTIONS[name]}/{name}")
        setattr(view, name, _lora_linear(getattr(layer, name), a_bir, b_bro, s))
    return lambda *args: DecoderLayer.__call__(view, *args)


def _lora_linear(linear: nnx.Linear, a_bir, b_bro, scale_b) -> Callable:
    def apply(x_bli):
        xa_blr = jnp.einsum("bli,bir->blr", x_bli, a_bir.astype(x_bli.dtype))
        delta_blo = jnp.einsum("blr,bro->blo", xa_blr, b_bro.astype(x_bli.dtype))
        return linear(x_bli) + (scale_b * delta_blo).astype(x_bli.dtype)

    return apply


def _scale_of(scale, path: str):
    if scale is None:
        raise DndError("a LoRA needs its scale (PEFT's alpha/r: `spec_scales(spec)` or one number)")
    if isinstance(scale, Mapping):
        if path not in scale:
            raise DndError(f"scale mapping has no entry for LoRA module {path!r}")
        scale = scale[path]
    scale = jnp.asarray(scale, jnp.float32)
    return scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale  # [B] -> per row


def layer_adapters(lora: Mapping | None, depth: int, rows: int) -> list[dict[str, tuple]]:
    """Per layer {projection name: (lora_a [B, I, R], lora_b [B, R, O])} from the converters' pytree.

    Args:
      lora: None or {"layers": {"<i>": {"self_attn"|"mlp": {"<name>_proj": {"lora_a", "lora_b"}}}}}.
      depth: the model's number of layers.
      rows: B, the batch size every leaf must lead with.

    Returns:
      `depth` dicts (empty for a layer without an adapter).
    """
    out: list[dict[str, dict]] = [{} for _ in range(depth)]
    for path, leaf in flatten(lora or {}).items():
        m = _LEAF.fullmatch(path)
        if m is None or PROJECTIONS.get(m[3]) != m[2] or int(m[1]) >= depth:
            raise DndError(f"LoRA leaf {path!r} is not layers/<0..{depth - 1}>/self_attn|mlp/<projection>/lora_a|b "
                           f"of this model (projections: {', '.join(PROJECTIONS)})")  # fmt: skip
        if leaf.ndim != 3 or leaf.shape[0] != rows:
            raise DndError(f"LoRA leaf {path!r} has shape {list(leaf.shape)}: expected [{rows}, in, r] / "
                           f"[{rows}, r, out] (a leading axis of one adapter per row)")  # fmt: skip
        out[int(m[1])].setdefault(m[3], {})[m[4]] = leaf
    for i, layer in enumerate(out):
        for name, ab in layer.items():
            if set(ab) != {"lora_a", "lora_b"}:
                raise DndError(f"LoRA module layers/{i}/{PROJECTIONS[name]}/{name} lacks lora_a or lora_b")
    return [{n: (ab["lora_a"], ab["lora_b"]) for n, ab in layer.items()} for layer in out]


def spec_scales(spec) -> dict[str, float]:
    """{tree path: PEFT scale} of a `converters.spec.LoraSpec`, the `scale` argument of `CausalLM`."""
    return {"/".join(spec.tree_path(m)): float(m.scale) for m in spec.modules}


def label_positions(labels: np.ndarray, multiple: int = 8) -> np.ndarray:
    """The positions whose logits `response_nll` needs (t where labels[..., t + 1] is a label), per row, padded with
    -1 to the batch's most, rounded up to a power of two >= `multiple` (few compiled shapes): int32 [..., P]."""
    valid = labels[..., 1:] != IGNORE
    most = max(int(valid.sum(-1).max(initial=0)), 1)
    width = max(multiple, 1 << (most - 1).bit_length())
    flat = valid.reshape(-1, valid.shape[-1])
    out = np.full((flat.shape[0], width), -1, np.int32)
    for i, row in enumerate(flat):
        t = np.flatnonzero(row)
        out[i, : len(t)] = t
    return out.reshape(*labels.shape[:-1], width)


def response_nll(model_or_fn: Callable, input_ids, attention_mask, labels, lora=None, scale=None, positions=None):
    """HF's causal-LM loss: mean NLL of every label token of the batch, float32 (differentiable in `lora`).

    Args:
      model_or_fn: a `CausalLM`, or any function (input_ids, attention_mask, lora, scale) -> logits [B, L, V].
      input_ids: int [B, L].
      attention_mask: int/bool [B, L].
      labels: int [B, L], -100 where there is no loss (prompt and padding: `lm.encode_sft_example`);
        position t's logits predict labels[t + 1].
      lora: the per-row LoRA pytree (see `CausalLM.__call__`) or None.
      scale: its scale (see `CausalLM.__call__`).
      positions: None, or `label_positions(labels)` [B, P] with a `CausalLM`: the head runs at those positions
        only (the labels' own, a few per row in SFT batches) instead of all L, the same loss for a fraction of
        the head's work and none of the [B, L, V] logits.

    Returns:
      scalar float32; 0 when there is no label token.
    """
    if positions is not None:
        x_bld = model_or_fn.hidden(input_ids, attention_mask, lora, scale)
        at_bp = jnp.maximum(positions, 0)
        x_bpd = jnp.take_along_axis(x_bld, at_bp[..., None], axis=1)
        logits_blv = model_or_fn.logits(x_bpd).astype(jnp.float32)
        target_bl = jnp.where(positions >= 0, jnp.take_along_axis(labels, at_bp + 1, axis=1), IGNORE)
    else:
        logits_blv = model_or_fn(input_ids, attention_mask, lora, scale)[:, :-1].astype(jnp.float32)
        target_bl = labels[:, 1:]
    valid_bl = target_bl != IGNORE
    picked_bl = jnp.take_along_axis(logits_blv, jnp.where(valid_bl, target_bl, 0)[..., None], axis=-1)[..., 0]
    # log-sum-exp - picked, both relative to the max logit: `lse - picked` in float32 would round at
    # ulp(lse) (~4e-6 at SmolLM2's logits of ~35), more than a confident token's whole NLL.
    top_bl = jax.lax.stop_gradient(jnp.max(logits_blv, axis=-1))
    nll_bl = jnp.log(jnp.sum(jnp.exp(logits_blv - top_bl[..., None]), axis=-1)) - (picked_bl - top_bl)
    return jnp.sum(jnp.where(valid_bl, nll_bl, 0.0)) / jnp.maximum(jnp.sum(valid_bl), 1)


def load_causal_lm(name_or_dir: str | Path, dtype=jnp.float32):
    """Loads a Llama/Qwen2 causal-LM checkpoint (a built-in name of dnd_jax/assets.py or a directory).

    Args:
      name_or_dir: e.g. "smollm2-135m-instruct", or a directory with config.json, safetensors and a tokenizer.
      dtype: compute dtype (parameters stay float32).

    Returns:
      (CausalLM, its right-padding tokenizer, DecoderConfig).
    """
    from dnd_jax.assets import resolve_model  # the loaders live a floor up (they import models/)
    from dnd_jax.extractors import (
        _fill,
        abstract_module,
        check_filled,
        decoder_state_dict,
        fill_decoder_lm,
        load_tokenizer,
    )

    path = Path(resolve_model(str(name_or_dir)))
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise DndError(f"{path}: no config.json; not a model directory")
    hf = json.loads(cfg_path.read_text())
    cfg = DecoderConfig.from_hf(hf, str(cfg_path), num_layers=hf.get("num_hidden_layers", 0))
    tie = bool(hf.get("tie_word_embeddings", False))  # LlamaConfig's and Qwen2Config's default
    model = abstract_module(lambda: CausalLM(cfg, tie, dtype, nnx.Rngs(0)))  # shapes only: filled below
    sd = decoder_state_dict(path)  # CausalLM or bare model
    fill_decoder_lm(model.decoder, sd, path)

    def take(key: str, shape) -> np.ndarray:
        if key not in sd or tuple(sd[key].shape) != tuple(shape):
            found = list(sd[key].shape) if key in sd else "missing"
            raise DndError(f"{path}: weight {key!r} {found}, expected {list(shape)} (tie_word_embeddings {tie})")
        return np.asarray(sd[key], np.float32)

    _fill(model.norm, "norm", take)
    if not tie:
        _fill(model.lm_head, "lm_head", take)
    check_filled(model, path)
    return model, load_tokenizer(path, right_pad=True), cfg
