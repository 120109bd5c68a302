"""The generator's convolutions: one k x k 'same' conv, and the CPU paths that make it fast there.

`conv` is what the generator calls. On accelerators it is one `lax.conv_general_dilated` ("direct"). On
CPU, where XLA's convs run far below its GEMMs, `conv_impl` picks other exact paths: FFT convs along one
axis ("fft", per-CPU-kind thresholds; inside `shard_map` on a multi-device mesh), one bf16 GEMM per conv
("gemm", AMX / AVX-512-BF16), and for small direct convs a backward pass as two GEMMs (custom VJPs).
"""

from __future__ import annotations

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

# Conv dimension numbers on x_bnhw [B, N, H, W], kernels stored [k, k, in, out].
_KERNEL_SPEC = (3, 2, 0, 1)
_CONV_W = (0, 3, 2, 1)  # batch, channel W, spatial (H, N)
_CONV_H = (0, 2, 1, 3)  # batch, channel H, spatial (N, W)
_CONV_L = (0, 1, 2, 3)  # batch, channel N, spatial (H, W)


# Which conv path each traced conv took ("direct", "fft", "fft_sharded", "gemm"; "gemm_backward" counts the
# direct ones whose backward runs as GEMMs), counted at trace time, so
# tests can assert the path they meant to test ran.
PATHS: collections.Counter = collections.Counter()


def conv(x, kernel, spec, dtype, impl: str = "direct", mesh=None):
    """k x k 'same' conv of x along the axes named by spec (batch, channel, spatial0, spatial1).

    With `mesh` (a multi-device mesh whose size divides the batch) an FFT conv runs per batch shard
    inside `shard_map`, the kernel gathered whole onto every device (see `fft_conv` for why).
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if impl == "fft" and x.dtype == jnp.float32:
        plan = fft_plan(x.shape, kernel.shape, spec)
        if plan is not None:
            if mesh is None:
                PATHS["fft"] += 1
                return fft_conv(x, kernel, spec, plan)
            PATHS["fft_sharded"] += 1
            batch = [None] * 4
            batch[spec[0]] = tuple(mesh.axis_names)
            local = functools.partial(fft_conv, spec=spec, axis=plan)
            return jax.shard_map(local, mesh=mesh, in_specs=(P(*batch), P()), out_specs=P(*batch))(x, kernel)
    if impl == "gemm" and x.dtype != jnp.float32:
        PATHS["gemm"] += 1
        return gemm_conv(x, kernel, spec, dtype)
    PATHS["direct"] += 1
    if (
        impl == "fft"
        and mesh is None
        and x.dtype == jnp.float32
        and kernel.shape[0] > 1
        and (_im2col_bytes(x, kernel) <= GEMM_BACKWARD_BYTES)
    ):
        PATHS["gemm_backward"] += 1  # a direct conv whose backward runs as GEMMs (`direct_conv_gemm_backward`)
        return direct_conv_gemm_backward(x, kernel, spec)
    return _direct_conv(x, kernel, spec)


def _direct_conv(x, kernel, spec):
    dn = lax.ConvDimensionNumbers(lhs_spec=spec, rhs_spec=_KERNEL_SPEC, out_spec=spec)
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn)


# XLA's CPU conv backward (both the input and the kernel gradient) runs at a third to a fifth of its
# forward's FLOP rate; `direct_conv_gemm_backward` does it as two GEMMs over the k^2-tap im2col of the
# input, which costs k^2 times the input's bytes: used up to this size (the smoke config's 64 -> 4770
# token conv, a 12 MB im2col: forward + backward 0.67 s -> 0.37 s on 2 AMX Xeon cores). Larger im2cols
# no longer pay: its first ConvW and ConvH (28 MB each, 96 and 16 output channels) took 45 and 35 ms with
# it against 21 and 10 ms without (64 MiB before; smoke step 0.65 -> 0.60 s).
GEMM_BACKWARD_BYTES = 16 << 20


def _im2col_bytes(x, kernel) -> int:
    return kernel.shape[0] * kernel.shape[1] * math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def direct_conv_gemm_backward(x, kernel, spec):
    """`lax.conv` forward (XLA lowers it to a GEMM itself); the backward as GEMMs (see `_conv_gemm_bwd`)."""
    return _direct_conv(x, kernel, spec)


def _conv_gemm_fwd(x, kernel, spec):
    return _direct_conv(x, kernel, spec), (x, kernel)


def _conv_gemm_bwd(spec, res, g):
    """With xt = x as [B, S0, S1, C] and cols its k^2-tap im2col [B S0 S1, k^2 C]: the kernel gradient is
    cols^T @ g, with cols^T built transposed from the start (XLA's CPU GEMMs contract over the rows of
    both operands 4x slower); the input gradient is g @ W^T [B S0 S1, k^2 C], summed back over the taps."""
    x, kernel = res
    k = kernel.shape[0]
    p = k // 2
    bd, cd, s0, s1 = spec
    order = (bd, s0, s1, cd)
    xt, gt = jnp.transpose(x, order), jnp.transpose(g, order)  # [B, S0, S1, C], [B, S0, S1, O]
    b, n0, n1, c = xt.shape
    w2 = kernel.reshape(k * k * c, -1)  # [(tap0, tap1, C), O]
    g2 = gt.reshape(-1, w2.shape[1])
    xc = jnp.pad(jnp.transpose(xt, (3, 0, 1, 2)), ((0, 0), (0, 0), (p, p), (p, p)))  # [C, B, S0 + 2p, S1 + 2p]
    cols_t = jnp.stack([xc[:, :, i : i + n0, j : j + n1] for i in range(k) for j in range(k)]).reshape(k * k * c, -1)
    d_kernel = jnp.dot(cols_t, g2).reshape(kernel.shape)
    d_cols = lax.dot_general(g2, w2, (((1,), (1,)), ((), ()))).reshape(b, n0, n1, k * k, c)
    d_xp = sum(jnp.pad(d_cols[:, :, :, i * k + j], ((0, 0), (i, 2 * p - i), (j, 2 * p - j), (0, 0)))
               for i in range(k) for j in range(k))  # fmt: skip
    d_x = jnp.transpose(d_xp[:, p : p + n0, p : p + n1], np.argsort(order))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


direct_conv_gemm_backward.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def _fft_size(n: int) -> int:
    """The smallest m >= n with no prime factor above 5 (fast FFT lengths)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


# FFT convs run at roughly half the FLOP rate of direct ones on CPU (complex GEMMs with a small
# inner size, transforms, im2col copies); they are used only where they save more than that, and
# not for thin convs, where the transforms dominate. (cost ratio, min channels) per CPU kind, each
# from a sweep of `benchmarks/train_step.py --configs mid --fft-ratios ...` on 2 cores of that kind
# (benchmarks/README.md); kinds not measured (avx512 without AMX) use the AVX2 values. On AMX, ratio
# 0.7 gave 5.88 s/step vs 6.32 at 0.45 on mid (1.0: 5.84, but it slows the k = 3 smoke config 1.5x).
FFT_THRESHOLDS = {"avx2": (0.45, 24), "avx512": (0.45, 24), "amx": (0.7, 24)}
FFT_THRESHOLDS_OVERRIDE: tuple[float, int] | None = None  # benchmarks set this to sweep


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


@functools.cache
def cpu_kind() -> str:
    """'amx', 'avx512' or 'avx2' (also for anything else): the class of CPU the FFT thresholds follow."""
    flags = cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags else "avx2"


def auto_conv_impl(dtype) -> str:
    """conv_impl "auto" for a layer computing in `dtype` on the default backend."""
    if jax.default_backend() != "cpu":
        return "direct"
    if jnp.dtype(dtype) == jnp.float32:
        return "fft"
    return "gemm" if jnp.dtype(dtype) == jnp.bfloat16 and cpu_flags() & {"amx_bf16", "avx512_bf16"} else "direct"


def fft_thresholds() -> tuple[float, int]:
    """(max FFT/direct cost ratio, min channels) for this CPU."""
    return FFT_THRESHOLDS_OVERRIDE or FFT_THRESHOLDS[cpu_kind()]


def fft_plan(x_shape, k_shape, spec) -> int | None:
    """Which spatial axis (0 or 1 of the spec) to transform, or None when the direct conv is cheaper.

    Along the transformed axis of length S, taps become one complex multiply per frequency bin
    (N = fast size >= S + k - 1, N // 2 + 1 bins); the other axis stays a k-tap correlation done
    as one complex GEMM over (k taps x channels). Cost in real FLOPs: 8 * bins * B * S_other * k *
    C * O against 2 * B * S0 * S1 * k^2 * C * O for the direct conv.
    """
    k, _, cin, cout = k_shape
    max_ratio, min_channels = fft_thresholds()
    if k == 1 or min(cin, cout) < min_channels:
        return None
    b, s = x_shape[spec[0]], (x_shape[spec[2]], x_shape[spec[3]])
    direct = 2 * b * s[0] * s[1] * k * k * cin * cout
    costs = [8 * (_fft_size(s[a] + k - 1) // 2 + 1) * b * s[1 - a] * k * cin * cout for a in (0, 1)]
    best = int(costs[1] < costs[0])
    return best if costs[best] <= max_ratio * direct else None


def fft_conv(x, kernel, spec, axis: int):
    """The same 'same'-padded k x k cross-correlation as `conv`, FFT along spatial `axis` of spec.

    x is brought to [B, Sd, Sf, C] (Sd direct axis, Sf transformed axis); rfft along Sf (zero-padded
    to N >= Sf + k - 1, so the circular product is the linear one); the kernel's k taps along Sf
    are transformed by a (k, bins) DFT matrix, flipped, since correlation = convolution with the
    reversed kernel; per bin, Sd is correlated with its k taps as a single complex GEMM over
    (taps, channels); irfft; the 'same' window is sliced out. float32 / complex64 throughout.

    Under a multi-device mesh it must not be left to XLA's SPMD partitioner: on jax 0.10.2 (CPU,
    4 x 2 mesh with Auto axes) the chain ConvH (direct, kernel split over its output channels, so
    its output is split along H) -> this FFT conv transforming along H -> ConvL (direct, kernel
    split over its input channels) gives O(1) errors (6.1 max abs on unit-scale data), while each
    conv alone, any two of them, and the same chain with either kernel replicated are exact (1e-6).
    Reproduction: scripts/fft_sharding_repro.py. `conv` therefore runs it per batch shard inside
    shard_map, where no FFT op is partitioned.
    """
    k = kernel.shape[0]
    p = k // 2
    bd, cd, s0, s1 = spec
    order = (bd, s0, s1, cd) if axis == 1 else (bd, s1, s0, cd)
    xt = jnp.transpose(x, order).astype(jnp.float32)
    w = kernel if axis == 1 else jnp.transpose(kernel, (1, 0, 2, 3))  # [direct tap, fft tap, C, O]
    b, sd, sf, c = xt.shape
    n = _fft_size(sf + k - 1)
    f = n // 2 + 1
    ang = -2 * np.pi * np.outer(np.arange(k)[::-1], np.arange(f)) / n  # tap j sits at k-1-j when flipped
    dft = jnp.asarray(np.cos(ang) + 1j * np.sin(ang), jnp.complex64)  # (k, bins)
    wf = jnp.einsum("ijco,jy->yico", w.astype(jnp.float32), dft)  # [bins, direct tap, C, O]
    xf = jnp.fft.rfft(xt, n=n, axis=2)  # [B, Sd, bins, C]
    xf = jnp.pad(xf, ((0, 0), (p, p), (0, 0), (0, 0))).transpose(2, 1, 0, 3)  # [bins, Sd + 2p, B, C]
    cols = jnp.stack([xf[:, i : i + sd] for i in range(k)], axis=3)  # [bins, Sd, B, k, C]
    yf = jnp.einsum("ymk,yko->ymo", cols.reshape(f, sd * b, k * c), wf.reshape(f, k * c, -1))
    yf = yf.reshape(f, sd, b, -1).transpose(2, 1, 0, 3)  # [B, Sd, bins, O]
    y = jnp.fft.irfft(yf, n=n, axis=2)[:, :, k - 1 - p : k - 1 - p + sf]  # [B, Sd, Sf, O]
    return jnp.transpose(y, np.argsort(order))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap_gemm(cols_mc, w_nc, shape):
    """y [B, Sr, Sc, O] float32 = sum over row taps i of (cols @ w^T)[b, r + i, c, i, o], one low-precision
    GEMM with float32 accumulation; `shape` = (B, Sr, Sc, k, O). See `gemm_conv`."""
    b, sr, sc, k, o = shape
    out = lax.dot_general(cols_mc, w_nc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    out = out.reshape(b, sr + k - 1, sc, k, o)
    return sum(out[:, i : i + sr, :, i] for i in range(k))


def _tap_gemm_fwd(cols_mc, w_nc, shape):
    return _tap_gemm(cols_mc, w_nc, shape), (cols_mc, w_nc)


def _tap_gemm_bwd(shape, res, g_bsro):
    """Both products in the low precision with float32 accumulation, as autocast's backward. The weight
    gradient is formed as g^T [k O, M] @ cols [M, k C], g^T built transposed from the start: XLA's CPU
    GEMMs run a contraction over the rows of both operands (cols^T @ g) at a quarter of the speed, and
    do not run it at all in bf16 -> f32 (jax 0.10: "Unsupported element type for DotThunk")."""
    cols_mc, w_nc = res
    k, o = shape[3:]
    p = k - 1
    g = g_bsro.astype(cols_mc.dtype)
    # d(out)[b, r', c, i, :] = g[b, r' - i, c, :]: tap i's block is g shifted down by i rows
    g_out = jnp.stack([jnp.pad(g, ((0, 0), (i, p - i), (0, 0), (0, 0))) for i in range(k)], axis=3)
    d_cols = jnp.dot(g_out.reshape(-1, k * o), w_nc, preferred_element_type=jnp.float32)
    gt = jnp.transpose(g, (3, 0, 1, 2))  # [O, B, Sr, Sc]
    gt_out = jnp.stack([jnp.pad(gt, ((0, 0), (0, 0), (i, p - i), (0, 0))) for i in range(k)], axis=0)
    d_w = jnp.dot(gt_out.reshape(k * o, -1), cols_mc, preferred_element_type=jnp.float32)  # [k O, k C]
    return d_cols.astype(cols_mc.dtype), d_w.astype(w_nc.dtype)


_tap_gemm.defvjp(_tap_gemm_fwd, _tap_gemm_bwd)


def gemm_conv(x, kernel, spec, dtype):
    """The same 'same'-padded k x k cross-correlation as `conv`, as one low-precision GEMM (autocast).

    x is brought to [B, Sr, Sc, C]; Sc is unrolled into its k taps (im2col along one axis only: k times
    x in `dtype`), and one GEMM [B (Sr + k - 1) Sc, k C] x [k C, k O] gives every tap of the other axis at
    once; summing its k row-shifted blocks is the conv. With dtype bfloat16 the GEMM is a bf16 x bf16 ->
    float32 dot, which XLA runs on AMX / AVX-512-BF16 units; its own convs do not use them (mid config's
    first ConvW, forward + backward on 2 AMX cores: 0.46 s, bf16 lax.conv 1.23 s, fp32 FFT 0.98 s).
    Sr is the longer spatial axis (the shift sum wastes (k - 1) / Sr of the GEMM's rows).
    """
    k = kernel.shape[0]
    p = k // 2
    bd, cd, s0, s1 = spec
    rows_first = x.shape[s0] >= x.shape[s1]
    order = (bd, s0, s1, cd) if rows_first else (bd, s1, s0, cd)
    w = kernel if rows_first else jnp.transpose(kernel, (1, 0, 2, 3))  # [row tap, col tap, C, O]
    xt = jnp.transpose(x.astype(dtype), order)
    b, sr, sc, c = xt.shape
    o = w.shape[-1]
    xp = jnp.pad(xt, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = jnp.concatenate([xp[:, :, j : j + sc] for j in range(k)], axis=-1)  # [B, Sr + 2p, Sc, k C]
    w2 = jnp.transpose(w, (0, 3, 1, 2)).reshape(k * o, k * c).astype(dtype)  # [(row tap, O), (col tap, C)]
    y = _tap_gemm(cols.reshape(-1, k * c), w2, (b, sr, sc, k, o))  # [B, Sr, Sc, O] float32
    return jnp.transpose(y.astype(dtype), np.argsort(order))
