"""Flax generator against the PyTorch transcription of the original, and its parameter count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.torch_hyperconv import TorchHyperConvDecoder
from dnd_jax.models import conv_paths
from dnd_jax.models.hyperconv import GeneratorConfig, HyperConvDecoder, count_params

PAPER_FEATURES = ((128, 384, 384), (128, 200, 300), (128, 100, 256), (256, 50, 200), (512, 50, 200),
                  (1024, 25, 200), (1024, 10, 200), (2048, 10, 200), (4296, 10, 130))  # fmt: skip


def test_paper_config_has_1113203220_params():
    assert count_params(GeneratorConfig(PAPER_FEATURES, 9)) == 1_113_203_220


def _state_dict(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("features,k,fft_convs", [
    (((6, 12, 16), (8, 10, 12), (8, 10, 12), (20, 6, 10)), 3, 0),  # includes a residual layer
    (((4, 9, 14), (5, 7, 8)), 5, 0),
    (((16, 32, 64), (8, 24, 48)), 9, 4),  # on CPU all but ConvL (16 -> 8 channels: too thin) take the FFT path
])  # fmt: skip
def test_forward_matches_pytorch_original(features, k, fft_convs):
    cfg = GeneratorConfig(features, k)
    model = HyperConvDecoder(cfg, nnx.Rngs(0))
    ref = TorchHyperConvDecoder(features, k).double()
    ref.load_from_flax(_state_dict(model))
    x = np.random.default_rng(0).standard_normal((2, *features[0])).astype(np.float32)
    conv_paths.PATHS.clear()
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
    assert (conv_paths.PATHS["fft"], conv_paths.PATHS["direct"]) == (fft_convs, 5 * (len(features) - 1) - fft_convs)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).double()).numpy()
    assert got.shape == (2, *features[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_init_bounds_follow_pytorch_defaults():
    cfg = GeneratorConfig(((4, 8, 16), (6, 5, 10)), 3)
    p = _state_dict(HyperConvDecoder(cfg, nnx.Rngs(1)))["layers"][0]
    assert np.abs(p["conv_w1"]).max() <= 1 / np.sqrt(16 * 9) and np.abs(p["conv_w1"]).max() > 0.8 / np.sqrt(16 * 9)
    assert np.abs(p["conv_l"]).max() <= 1 / np.sqrt(4 * 9)
    assert np.abs(p["fuse_bias"]).max() <= 1 / 50 and np.all(p["norm_scale"] == 1)


def test_bf16_compute_keeps_fp32_params_and_output():
    cfg = GeneratorConfig(((4, 8, 16), (6, 5, 10), (7, 4, 6)), 3, compute_dtype="bfloat16")
    model = HyperConvDecoder(cfg, nnx.Rngs(0))
    out = model(jnp.ones((1, 4, 8, 16)))
    assert out.dtype == jnp.float32  # last layer in float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model.layers[0](jnp.ones((1, 4, 8, 16))).dtype == jnp.bfloat16


@pytest.mark.parametrize("spec", [conv_paths._CONV_W, conv_paths._CONV_H, conv_paths._CONV_L])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape,k", [((2, 5, 7, 6), 5), ((1, 3, 12, 4), 9)])  # a spatial axis shorter than k
def test_fft_conv_equals_direct_conv_and_its_gradients(spec, axis, shape, k):
    """Both ways of the FFT conv, for every dimension order the layer uses, against lax.conv (each side compiled
    whole, as in the model: op by op, this grid cost ~50 s in compiles of single ops)."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (k, k, shape[spec[1]], 3))
    direct = lambda x, w: conv_paths.conv(x, w, spec, jnp.float32, "direct")  # noqa: E731
    fft = lambda x, w: conv_paths.fft_conv(x, w, spec, axis)  # noqa: E731
    want, got = jax.jit(direct)(x, w), jax.jit(fft)(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))
    probe = jax.random.normal(jax.random.key(2), want.shape)
    gw = jax.jit(jax.grad(lambda x, w: (direct(x, w) * probe).sum(), argnums=(0, 1)))(x, w)
    gf = jax.jit(jax.grad(lambda x, w: (fft(x, w) * probe).sum(), argnums=(0, 1)))(x, w)
    for a, b in zip(gf, gw, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.abs(b).max()))


def test_fft_plan_picks_fft_only_where_cheaper():
    # mid-config layer 0 ConvW1: channels 384 -> 200 over (H 64, N 32): transform H (72-point FFT, 37
    # bins x 32 rows) rather than N (40-point, 21 bins x 64 rows)
    assert conv_paths.fft_plan((4, 32, 64, 384), (9, 9, 384, 200), conv_paths._CONV_W) == 0
    assert conv_paths.fft_plan((4, 32, 64, 384), (3, 3, 384, 200), conv_paths._CONV_W) is None  # k = 3: direct
    assert conv_paths.fft_plan((4, 16, 50, 200), (9, 9, 16, 16), conv_paths._CONV_L) is None  # thin: direct
    with pytest.raises(ValueError, match="conv_impl"):
        GeneratorConfig(((4, 8, 16), (6, 5, 10)), 3, conv_impl="winograd")


def test_cpu_conv_paths_are_refused_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for impl in ("fft", "gemm"):
        with pytest.raises(ValueError, match=f"conv_impl '{impl}' is a CPU path .* on gpu use 'auto' or 'direct'"):
            GeneratorConfig(((4, 8, 16), (6, 5, 10)), 3, conv_impl=impl)
    GeneratorConfig(((4, 8, 16), (6, 5, 10)), 3, conv_impl="direct")
    assert conv_paths.auto_conv_impl(jnp.float32) == conv_paths.auto_conv_impl(jnp.bfloat16) == "direct"


def test_fft_thresholds_follow_the_cpu_kind(monkeypatch):
    conv_paths.FFT_THRESHOLDS_OVERRIDE = None
    for flags, want in (({"avx2"}, "avx2"), ({"avx2", "avx512f"}, "avx512"), ({"avx512f", "amx_bf16"}, "amx"),
                        (set(), "avx2")):  # fmt: skip
        monkeypatch.setattr(conv_paths, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert conv_paths.cpu_kind.__wrapped__() == want, flags
    monkeypatch.undo()
    own = open("/proc/cpuinfo").read().split("\nflags", 1)[1].split("\n", 1)[0].split(":", 1)[1].split()
    want = "amx" if "amx_bf16" in own else "avx512" if "avx512f" in own else "avx2"  # this machine, read apart
    assert conv_paths.cpu_kind() == want
    plans = {}
    for kind in ("avx2", "avx512", "amx"):
        monkeypatch.setattr(conv_paths, "cpu_kind", lambda kind=kind: kind)
        assert conv_paths.fft_thresholds() == conv_paths.FFT_THRESHOLDS[kind]
        # a conv whose FFT costs 50 % of the direct one: FFT on AMX (ratio <= 0.7) only
        plans[kind] = conv_paths.fft_plan((4, 8, 8, 34), (9, 9, 34, 34), conv_paths._CONV_W)
    assert plans == {"avx2": None, "avx512": None, "amx": 0}


def test_fft_and_direct_generators_train_alike():
    """Loss and gradients of the whole generator agree between conv_impl='fft' and 'direct'."""
    features, k = ((16, 32, 64), (8, 24, 48), (6, 10, 48)), 9
    x = jax.random.normal(jax.random.key(0), (2, *features[0]))
    grads, paths = {}, {}
    for impl in ("fft", "direct"):
        model = HyperConvDecoder(GeneratorConfig(features, k, conv_impl=impl), nnx.Rngs(0))
        gd, params = nnx.split(model, nnx.Param)
        loss = lambda p, gd=gd: (nnx.merge(gd, p)(x) ** 2).mean()  # noqa: E731
        conv_paths.PATHS.clear()
        grads[impl] = jax.jit(jax.value_and_grad(loss))(params)
        paths[impl] = dict(conv_paths.PATHS)
    # the comparison means something only if the FFT side did take FFT convs (6 of the 10 here)
    # ... and its 4 direct ones run their backward as GEMMs (small enough for the k^2 im2col)
    assert paths == {"fft": {"fft": 6, "direct": 4, "gemm_backward": 4}, "direct": {"direct": 10}}
    (lf, gf), (ld, gdir) = grads["fft"], grads["direct"]
    np.testing.assert_allclose(lf, ld, rtol=1e-5)
    scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(gdir))  # some biases have ~0 gradients
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gdir), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _numpy_same_correlation(x_bsrc, w_kkco):
    """Oracle: 'same'-padded k x k cross-correlation of channels-last x, float64 NumPy, tap by tap."""
    k = w_kkco.shape[0]
    p = k // 2
    _, s0, s1, _ = x_bsrc.shape
    xp = np.pad(x_bsrc.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    return sum(np.einsum("bijc,co->bijo", xp[:, i : i + s0, j : j + s1], w_kkco[i, j].astype(np.float64))
               for i in range(k) for j in range(k))  # fmt: skip


@pytest.mark.parametrize("spec,shape", [
    (conv_paths._CONV_W, (2, 6, 11, 20)),  # channels W; spatial (H, N): H longer
    (conv_paths._CONV_H, (2, 13, 7, 5)),  # channels H; spatial (N, W): N longer
    (conv_paths._CONV_L, (2, 9, 4, 12)),  # channels N; spatial (H, W): W longer
])  # fmt: skip
def test_gemm_conv_matches_numpy_correlation_and_its_gradient(spec, shape):
    """The bf16 GEMM conv against float64 NumPy on the same bf16-rounded inputs; its gradient against
    the float32 direct conv's, within bf16 rounding."""
    rng = np.random.default_rng(0)
    k, cin, cout = 5, shape[spec[1]], 7
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / k, jnp.bfloat16).astype(jnp.float32)
    conv_paths.PATHS.clear()
    got = jax.jit(lambda x, w: conv_paths.conv(x, w, spec, jnp.bfloat16, "gemm"))(x, w)
    assert dict(conv_paths.PATHS) == {"gemm": 1} and got.dtype == jnp.bfloat16
    order = (spec[0], spec[2], spec[3], spec[1])
    want = _numpy_same_correlation(np.transpose(np.asarray(x), order), np.asarray(w))
    want = np.transpose(want.astype(np.float32), np.argsort(order))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())

    def loss(impl, dtype):
        return lambda x, w: (conv_paths.conv(x, w, spec, dtype, impl).astype(jnp.float32) ** 2).sum()

    g_gemm = jax.jit(jax.grad(loss("gemm", jnp.bfloat16), argnums=(0, 1)))(x, w)
    g_ref = jax.jit(jax.grad(loss("direct", jnp.float32), argnums=(0, 1)))(x, w)
    for a, b in zip(g_gemm, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-2, atol=3e-2 * np.abs(b).max())


def test_auto_conv_impl_follows_dtype_backend_and_cpu(monkeypatch):
    for flags, want in (({"avx2"}, "direct"), ({"avx512f", "avx512_bf16"}, "gemm"), ({"amx_bf16"}, "gemm")):
        monkeypatch.setattr(conv_paths, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert conv_paths.auto_conv_impl(jnp.bfloat16) == want and conv_paths.auto_conv_impl(jnp.float32) == "fft"
    # a bf16 generator, conv_impl auto, on a bf16-capable CPU: every bf16 conv is a GEMM, the fp32 last layer's not
    cfg = GeneratorConfig(((4, 8, 16), (6, 5, 10), (7, 4, 6)), 3, compute_dtype="bfloat16")
    conv_paths.PATHS.clear()
    out = jax.jit(lambda m, x: m(x))(HyperConvDecoder(cfg, nnx.Rngs(0)), jnp.ones((1, 4, 8, 16)))
    assert conv_paths.PATHS["gemm"] == 5 and conv_paths.PATHS["gemm"] + conv_paths.PATHS["direct"] == 10
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("spec", [conv_paths._CONV_W, conv_paths._CONV_H, conv_paths._CONV_L])
def test_gemm_backward_matches_lax_conv_gradients(spec):
    """The GEMM backward of a direct conv (custom VJP) against JAX's autodiff of lax.conv itself."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 9)), jnp.float32)
    k, cin = 3, x.shape[spec[1]]
    w = jnp.asarray(rng.standard_normal((k, k, cin, 6)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda: conv_paths._direct_conv(x, w, spec)).shape), jnp.float32)

    def loss(f):
        return lambda x, w: (f(x, w, spec) * t).sum() + (f(x, w, spec) ** 2).sum()

    np.testing.assert_array_equal(conv_paths.direct_conv_gemm_backward(x, w, spec), conv_paths._direct_conv(x, w, spec))
    got = jax.jit(jax.grad(loss(conv_paths.direct_conv_gemm_backward), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(conv_paths._direct_conv), argnums=(0, 1)))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
