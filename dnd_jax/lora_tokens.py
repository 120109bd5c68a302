"""LoRA pytree <-> parameter tokens (the original DnD "weightchunkin" layout, HEAD version).

Legend: T tokens, R = r + 2 token rows, K = C + 2 token columns, C the chunk width.

Every LoRA module contributes A (r x in, = lora_a.T) and B^T (r x out, = lora_b) cut along the
feature axis into chunks of r x C. Each chunk w is z-normalised on its own (mean mu, unbiased
std sigma; sigma = 1 for a 1-element chunk, 0 for a constant chunk) and placed at [0:r, 0:C] of an
R x K token whose 2-row / 2-column border carries the encoded scales
  mu' = 8 mu,  sigma' = ln(0.9 sigma + 0.1) + 1.6
as the original's `with_scales_wrapper` writes them: the bottom two rows repeat
[mu', sigma', mu', sigma', ...] across the width, then the right two columns hold [mu', sigma'] in
every row. Decoding averages both border estimates per border row, decodes each row's
(mu', sigma') and averages the two decoded rows, as the original's `with_scales_wrapper.detokenize`.

Token order: layers numerically, then modules in `module_order` (q, k, v, o, up, gate, down as the
original: up before gate), other module names after in name order; per module the A chunks, then
the B^T chunks, each in increasing feature order. Nothing is hard-coded per model: the layout is
derived from the adapter spec (module sizes and rank) and C. Encoding and decoding run in float32;
both work on NumPy or JAX arrays (`xp=jnp`) and on any leading batch axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from converters.pytree import get_module
from converters.spec import LoraSpec, natural_key
from dnd_jax.errors import DndError

MEAN_SCALE = 8.0
STD_BIAS = 1.6
DEFAULT_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of tokens from one matrix: A (side "a", features = in) or B^T (side "b", features = out)."""

    module: str  # full dotted module path
    side: str  # "a" or "b"
    features: int  # true size of the cut axis
    start: int  # first token index
    count: int  # number of tokens (ceil(features / C) when padding)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where every token comes from. Build with `make_layout`."""

    spec: LoraSpec
    chunk: int
    rank: int
    segments: tuple[Segment, ...]

    @property
    def num_tokens(self) -> int:
        return self.segments[-1].start + self.segments[-1].count

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.rank + 2, self.chunk + 2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_tokens, *self.token_shape)

    def module_token_ranges(self) -> dict[str, tuple[int, int]]:
        """{module path: (first token, end token)}, both sides together."""
        out: dict[str, list[int]] = {}
        for s in self.segments:
            r = out.setdefault(s.module, [s.start, s.start + s.count])
            r[1] = s.start + s.count
        return {k: (v[0], v[1]) for k, v in out.items()}


def _module_sort_key(path: str, order: tuple[str, ...]) -> tuple:
    parts = path.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    name = parts[-1]
    rank = order.index(name) if name in order else len(order)
    return (layer, rank, natural_key(path))


def make_layout(
    spec: LoraSpec, chunk: int, pad: bool = False, module_order: tuple[str, ...] = DEFAULT_MODULE_ORDER
) -> TokenLayout:
    """Derives the token layout of an adapter from its spec.

    Args:
      spec: adapter spec (module sizes and ranks).
      chunk: C, the number of feature columns per token.
      pad: zero-pad a feature axis that C does not divide (otherwise that is an error).
      module_order: module names in their order within a layer.

    Returns:
      The layout; `layout.shape` is (T, r + 2, C + 2).
    """
    ranks = {m.rank for m in spec.modules}
    if len(ranks) != 1:
        raise DndError(f"parameter tokens need one rank for all modules, the adapter has ranks {sorted(ranks)}")
    if chunk <= 0:
        raise DndError(f"token chunk size must be positive, got {chunk}")
    segments, start = [], 0
    for m in sorted(spec.modules, key=lambda m: _module_sort_key(m.path, module_order)):
        for side, n in (("a", m.in_features), ("b", m.out_features)):
            if n % chunk and not pad:
                raise DndError(
                    f"module {m.path!r}: {'in' if side == 'a' else 'out'}_features {n} is not "
                    f"divisible by the token chunk size {chunk} (set pad=True to zero-pad)"
                )
            count = math.ceil(n / chunk)
            segments.append(Segment(m.path, side, n, start, count))
            start += count
    return TokenLayout(spec, chunk, ranks.pop(), tuple(segments))


def _encode_chunks(w, xp):
    """w [..., n, r, C] float32 -> tokens [..., n, r + 2, C + 2]."""
    size = w.shape[-1] * w.shape[-2]
    mu = w.mean(axis=(-2, -1), keepdims=True)
    if size > 1:
        sigma = xp.sqrt(((w - mu) ** 2).sum(axis=(-2, -1), keepdims=True) / (size - 1))
    else:
        sigma = xp.ones_like(mu)
    z = xp.where(sigma > 0, (w - mu) / xp.where(sigma > 0, sigma, 1.0), 0.0)
    mu_c = mu * MEAN_SCALE
    sigma_c = xp.log(0.9 * sigma + 0.1) + STD_BIAS
    r, c = w.shape[-2], w.shape[-1]
    pair = xp.concatenate([mu_c, sigma_c], axis=-1)  # [..., n, 1, 2]
    reps = (c + 3) // 2
    row = xp.concatenate([pair] * reps, axis=-1)[..., : c + 2]  # [mu', sigma', ...] across the width
    bottom = xp.concatenate([row, row], axis=-2)  # [..., n, 2, C + 2]
    right = xp.concatenate([pair] * r, axis=-2)  # [..., n, r, 2]
    top = xp.concatenate([z, right], axis=-1)
    bottom = xp.concatenate([bottom[..., :c], xp.concatenate([pair, pair], axis=-2)], axis=-1)
    return xp.concatenate([top, bottom], axis=-2)


def decode_scales(tokens, xp=np):
    """tokens [..., R, K] -> (mu, sigma), each [...], float32, averaging both border estimates."""
    tokens = tokens.astype(xp.float32)
    rows_k = tokens.shape[-1]
    bottom = tokens[..., -2:, : rows_k - rows_k % 2]
    est_rows = bottom.reshape(*bottom.shape[:-1], -1, 2).mean(axis=-2)  # [..., 2 rows, (mu', sigma')]
    nrows = tokens.shape[-2] - tokens.shape[-2] % 2
    right = tokens[..., :nrows, -2:]
    est_cols = right.reshape(*right.shape[:-2], -1, 2, 2).mean(axis=-3)  # [..., 2 rows, (mu', sigma')]
    code = (est_rows + est_cols) / 2  # [..., 2 rows, (mu', sigma')]
    # Decoded per border row, then averaged (the original's order): exp is not linear, so on generated
    # tokens, whose two rows differ, averaging the codes first would give another sigma.
    mu = (code[..., 0] / MEAN_SCALE).mean(axis=-1)
    sigma = ((xp.exp(code[..., 1] - STD_BIAS) - 0.1) / 0.9).mean(axis=-1)
    return mu, sigma


def _chunks(mat, n: int, chunk: int, xp):
    """[..., r, features] -> [..., n, r, C], zero-padding the feature axis to n * C."""
    pad = n * chunk - mat.shape[-1]
    if pad:
        mat = xp.concatenate([mat, xp.zeros((*mat.shape[:-1], pad), mat.dtype)], axis=-1)
    r = mat.shape[-2]
    return xp.swapaxes(mat.reshape(*mat.shape[:-2], r, n, chunk), -3, -2)


def tokenize(params: Any, layout: TokenLayout, xp=np):
    """LoRA pytree -> tokens.

    Args:
      params: {tree path: {"lora_a": [..., in, r], "lora_b": [..., r, out]}}; leading axes (a
        stacked batch of checkpoints) are kept.
      layout: from `make_layout`.
      xp: numpy or jax.numpy.

    Returns:
      float32 [..., T, r + 2, C + 2].
    """
    parts = []
    for s in layout.segments:
        node = get_module(params, layout.spec, s.module)
        if s.side == "a":
            mat = xp.swapaxes(xp.asarray(node["lora_a"]).astype(xp.float32), -1, -2)  # A [..., r, in]
        else:
            mat = xp.asarray(node["lora_b"]).astype(xp.float32)  # B^T [..., r, out]
        if mat.shape[-2:] != (layout.rank, s.features):
            raise DndError(
                f"module {s.module!r}: {s.side} matrix has shape {list(mat.shape[-2:])}, "
                f"layout expects {[layout.rank, s.features]}"
            )
        parts.append(_encode_chunks(_chunks(mat, s.count, layout.chunk, xp), xp))
    return xp.concatenate(parts, axis=-3)


def detokenize(tokens, layout: TokenLayout, xp=np, sigma_floor: float | None = None) -> dict:
    """Tokens -> LoRA pytree (float32), the inverse of `tokenize`.

    Args:
      tokens: [..., T, r + 2, C + 2].
      layout: from `make_layout`.
      xp: numpy or jax.numpy.
      sigma_floor: if set, decoded per-chunk sigmas below it are raised to it (generated tokens can decode
        to sigma < 0, flipping a chunk's sign); None = the original's decoding, unfloored.

    Returns:
      {tree path: {"lora_a": [..., in, r], "lora_b": [..., r, out]}}.
    """
    if tuple(tokens.shape[-3:]) != layout.shape:
        raise DndError(f"token tensor has shape {list(tokens.shape[-3:])}, the layout needs {list(layout.shape)}")
    tokens = tokens.astype(xp.float32)
    mu, sigma = decode_scales(tokens, xp)
    if sigma_floor is not None:
        sigma = xp.maximum(sigma, sigma_floor)
    r, c = layout.rank, layout.chunk
    w = tokens[..., :r, :c] * sigma[..., None, None] + mu[..., None, None]  # [..., T, r, C]
    out: dict = {}
    for s in layout.segments:
        chunk = w[..., s.start : s.start + s.count, :, :]
        mat = xp.swapaxes(chunk, -3, -2).reshape(*chunk.shape[:-3], r, s.count * c)[..., : s.features]
        node = out
        for p in layout.spec.tree_path(s.module):
            node = node.setdefault(p, {})
        node["lora_a" if s.side == "a" else "lora_b"] = xp.swapaxes(mat, -1, -2) if s.side == "a" else mat
    return out
