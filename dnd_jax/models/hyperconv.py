"""The cascaded hyper-convolutional decoder (the DnD generator) in Flax NNX.

Legend: B batch; per layer an activation (N, H, W) becomes (N', H', W'). At the input N = prompts,
H = text length L, W = hidden D; at the output N = parameter tokens T, H, W = token rows, columns.

One layer (spec §4.2), on x_bnhw:
  x = LayerNorm over (H, W) with (H, W) affine
  p1 = ConvH1(ConvW1(x))             ConvW: channels W -> W', spatial (H, N)
  p2 = tanh(ConvW2(ConvH2(x)))       ConvH: channels H -> H', spatial (N, W)
  y  = ConvL((p1 + p2 + b) / 3)      ConvL: channels N -> N', spatial (H', W'), with bias
  y  = x_in + y  when shapes match (never in the paper's configs)
All convs are k x k, stride 1, zero "same" padding. No transposes are written: each conv names
its channel and spatial axes through `dimension_numbers`, and XLA picks the layouts.
Initialisation is PyTorch's default (kaiming-uniform a=sqrt(5): U(+-1/sqrt(fan_in)); the fuse
bias U(+-1/(H' W'))). Parameters are float32; convs run in `compute_dtype`; LayerNorm statistics,
and the whole last layer when `fp32_last_layer`, run in float32. Every parameter carries logical
axis names (`logical_axes` metadata) that dnd_jax.sharding resolves to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Shape3 = tuple[int, int, int]

# Conv dimension numbers on x_bnhw [B, N, H, W], kernels stored [k, k, in, out].
_KERNEL_SPEC = (3, 2, 0, 1)
_CONV_W = (0, 3, 2, 1)  # batch, channel W, spatial (H, N)
_CONV_H = (0, 2, 1, 3)  # batch, channel H, spatial (N, W)
_CONV_L = (0, 1, 2, 3)  # batch, channel N, spatial (H, W)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Static generator hyper-parameters.

    Attributes:
      features: activation shapes (N, H, W) from the condition to the token tensor; len - 1 layers.
      kernel_size: k of every k x k conv.
      compute_dtype: "bfloat16" on accelerators, "float32" for exact CPU tests.
      fp32_last_layer: run the last layer in float32 (the scale code is decoded from its output).
    """

    features: tuple[Shape3, ...]
    kernel_size: int = 9
    compute_dtype: str = "float32"
    fp32_last_layer: bool = True

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(tuple(int(v) for v in f) for f in self.features))
        if len(self.features) < 2 or any(len(f) != 3 for f in self.features):
            raise ValueError("features must list at least two (N, H, W) triples")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {self.kernel_size}")


def conv(x, kernel, spec, dtype):
    """k x k 'same' conv of x along the axes named by spec (batch, channel, spatial0, spatial1)."""
    dn = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=_KERNEL_SPEC, out_spec=spec)
    return lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "SAME", dimension_numbers=dn)


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class HyperConvLayer(nnx.Module):
    """(B, N, H, W) -> (B, N', H', W')."""

    def __init__(self, fin: Shape3, fout: Shape3, kernel_size: int, dtype, rngs: nnx.Rngs):
        (n, h, w), (n2, h2, w2), k = fin, fout, kernel_size
        self.dtype = dtype

        def kernel(cin, cout, axes):
            return nnx.Param(_uniform(rngs.params(), (k, k, cin, cout), 1 / math.sqrt(cin * k * k)),
                             logical_axes=("kernel", "kernel", *axes))  # fmt: skip

        self.norm_scale = nnx.Param(jnp.ones((h, w)), logical_axes=("height", "width"))
        self.norm_bias = nnx.Param(jnp.zeros((h, w)), logical_axes=("height", "width"))
        self.conv_w1 = kernel(w, w2, ("width_in", "width_out"))
        self.conv_h1 = kernel(h, h2, ("height_in", "height_out"))
        self.conv_h2 = kernel(h, h2, ("height_in", "height_out"))
        self.conv_w2 = kernel(w, w2, ("width_in", "width_out"))
        self.fuse_bias = nnx.Param(_uniform(rngs.params(), (h2, w2), 1 / (h2 * w2)), logical_axes=("height", "width"))
        self.conv_l = kernel(n, n2, ("tokens_in", "tokens_out"))
        self.conv_l_bias = nnx.Param(_uniform(rngs.params(), (n2,), 1 / math.sqrt(n * k * k)),
                                     logical_axes=("tokens_out",))  # fmt: skip
        self.residual = tuple(fin) == tuple(fout)

    def __call__(self, x_bnhw):
        dt = self.dtype
        x32 = x_bnhw.astype(jnp.float32)
        mean = x32.mean(axis=(2, 3), keepdims=True)
        var = ((x32 - mean) ** 2).mean(axis=(2, 3), keepdims=True)
        xn = (x32 - mean) * lax.rsqrt(var + 1e-5) * self.norm_scale[...] + self.norm_bias[...]
        p1 = conv(conv(xn, self.conv_w1[...], _CONV_W, dt), self.conv_h1[...], _CONV_H, dt)
        p2 = jnp.tanh(conv(conv(xn, self.conv_h2[...], _CONV_H, dt), self.conv_w2[...], _CONV_W, dt))
        y = (p1 + p2 + self.fuse_bias[...].astype(dt)) / 3
        y = conv(y, self.conv_l[...], _CONV_L, dt) + self.conv_l_bias[...].astype(dt)[None, :, None, None]
        return x_bnhw.astype(dt) + y if self.residual else y


class HyperConvDecoder(nnx.Module):
    """Condition [B, N, L, D] -> parameter tokens [B, T, R, K] (float32 when fp32_last_layer)."""

    def __init__(self, cfg: GeneratorConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.compute_dtype)
        last = len(cfg.features) - 2
        self.layers = nnx.List([
            HyperConvLayer(fin, fout, cfg.kernel_size, jnp.float32 if (i == last and cfg.fp32_last_layer) else dt, rngs)
            for i, (fin, fout) in enumerate(zip(cfg.features[:-1], cfg.features[1:], strict=True))
        ])  # fmt: skip

    def __call__(self, cond_bnld):
        x = cond_bnld
        for layer in self.layers:
            x = layer(x)
        return x


def count_params(cfg: GeneratorConfig) -> int:
    """Trainable parameters, from shapes only (jax.eval_shape: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: HyperConvDecoder(cfg, nnx.Rngs(0)))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def layer_flops(cfg: GeneratorConfig) -> int:
    """Forward FLOPs per sample (2 per multiply-add) of the convs, counted from the layer shapes."""
    k2, total = cfg.kernel_size**2, 0
    for (n, h, w), (n2, h2, w2) in zip(cfg.features[:-1], cfg.features[1:], strict=True):
        total += 2 * k2 * (h * n * w * w2 + n * w2 * h * h2)  # ConvW1 then ConvH1
        total += 2 * k2 * (n * w * h * h2 + h2 * n * w * w2)  # ConvH2 then ConvW2
        total += 2 * k2 * h2 * w2 * n * n2  # ConvL
    return total
