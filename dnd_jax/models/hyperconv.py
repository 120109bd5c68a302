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
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dnd_jax import fast_random
from dnd_jax.models.conv_paths import _CONV_H, _CONV_L, _CONV_W, auto_conv_impl, conv

Shape3 = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Static generator hyper-parameters.

    Attributes:
      features: activation shapes (N, H, W) from the condition to the token tensor; len - 1 layers.
      kernel_size: k of every k x k conv.
      compute_dtype: "bfloat16" on accelerators, "float32" for exact CPU tests.
      fp32_last_layer: run the last layer in float32 (the scale code is decoded from its output).
      conv_impl: "direct" (lax.conv), "fft" (FFT along one spatial axis wherever it is float32 and
        cheaper, see `fft_plan`), "gemm" (bf16 layers: one bf16 x bf16 -> f32 GEMM per conv, see
        `gemm_conv`) or "auto": on the CPU backend fft for float32 layers and, where the CPU has
        bf16 matmul units (AMX or AVX-512-BF16), gemm for bf16 ones; direct on GPU/TPU, whose conv
        libraries pick their own algorithms. Under a multi-device mesh FFT convs run per batch shard.
      zero_init_output: start the last layer's output conv (kernel and bias) at zero, so that the
        untrained generator outputs exactly 0: with residual targets (tokens minus an offset) it then
        starts at the offset, e.g. the prompt-blind mean of the training checkpoints.
    """

    features: tuple[Shape3, ...]
    kernel_size: int = 9
    compute_dtype: str = "float32"
    fp32_last_layer: bool = True
    conv_impl: str = "auto"
    zero_init_output: bool = False

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(tuple(int(v) for v in f) for f in self.features))
        if len(self.features) < 2 or any(len(f) != 3 for f in self.features):
            raise ValueError("features must list at least two (N, H, W) triples")
        if self.conv_impl not in ("auto", "direct", "fft", "gemm"):
            raise ValueError(f"conv_impl must be 'auto', 'direct', 'fft' or 'gemm', got {self.conv_impl!r}")
        if self.conv_impl in ("fft", "gemm") and jax.default_backend() != "cpu":
            raise ValueError(f"conv_impl {self.conv_impl!r} is a CPU path (models/conv_paths.py); on "
                             f"{jax.default_backend()} use 'auto' or 'direct' (model.conv_impl)")  # fmt: skip
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {self.kernel_size}")


def _uniform(key, shape, bound):
    return fast_random.uniform(key, shape, jnp.float32, -bound, bound)  # = jax.random.uniform, faster on CPU


class HyperConvLayer(nnx.Module):
    """(B, N, H, W) -> (B, N', H', W')."""

    def __init__(self, fin: Shape3, fout: Shape3, kernel_size: int, dtype, rngs: nnx.Rngs, conv_impl: str = "direct"):
        (n, h, w), (n2, h2, w2), k = fin, fout, kernel_size
        self.dtype = dtype
        self.conv_impl = conv_impl

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
        impl = self.conv_impl
        if impl == "auto":
            impl = auto_conv_impl(dt)
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty or mesh.size == 1 else mesh
        if mesh is not None and x_bnhw.shape[0] % mesh.size:
            impl = "direct"  # FFT convs run per batch shard (see conv): the batch must split evenly
        x32 = x_bnhw.astype(jnp.float32)
        mean = x32.mean(axis=(2, 3), keepdims=True)
        var = ((x32 - mean) ** 2).mean(axis=(2, 3), keepdims=True)
        xn = (x32 - mean) * lax.rsqrt(var + 1e-5) * self.norm_scale[...] + self.norm_bias[...]
        c = functools.partial(conv, dtype=dt, impl=impl, mesh=mesh)
        p1 = c(c(xn, self.conv_w1[...], _CONV_W), self.conv_h1[...], _CONV_H)
        p2 = jnp.tanh(c(c(xn, self.conv_h2[...], _CONV_H), self.conv_w2[...], _CONV_W))
        y = (p1 + p2 + self.fuse_bias[...].astype(dt)) / 3
        y = c(y, self.conv_l[...], _CONV_L) + self.conv_l_bias[...].astype(dt)[None, :, None, None]
        return x_bnhw.astype(dt) + y if self.residual else y


class HyperConvDecoder(nnx.Module):
    """Condition [B, N, L, D] -> parameter tokens [B, T, R, K] (float32 when fp32_last_layer)."""

    def __init__(self, cfg: GeneratorConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.compute_dtype)
        last = len(cfg.features) - 2
        self.layers = nnx.List([
            HyperConvLayer(fin, fout, cfg.kernel_size, jnp.float32 if (i == last and cfg.fp32_last_layer) else dt, rngs,
                           cfg.conv_impl)
            for i, (fin, fout) in enumerate(zip(cfg.features[:-1], cfg.features[1:], strict=True))
        ])  # fmt: skip
        if cfg.zero_init_output:
            out = self.layers[-1]
            out.conv_l[...] = jnp.zeros_like(out.conv_l[...])
            out.conv_l_bias[...] = jnp.zeros_like(out.conv_l_bias[...])

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


def generator_config(config) -> GeneratorConfig:
    """The generator of an ml_collections config (its `model` fields; a field it lacks takes the default)."""
    m = config.model
    return GeneratorConfig(features=tuple(tuple(f) for f in m.features), kernel_size=m.kernel_size,
                           compute_dtype=m.compute_dtype, fp32_last_layer=m.fp32_last_layer,
                           conv_impl=m.get("conv_impl", GeneratorConfig.conv_impl),
                           zero_init_output=m.get("zero_init_output", False))  # fmt: skip
