"""Flax generator against the PyTorch transcription of the original, and its parameter count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from benchmarks.torch_hyperconv import TorchHyperConvDecoder
from dnd_jax.models.hyperconv import GeneratorConfig, HyperConvDecoder, count_params

PAPER_FEATURES = ((128, 384, 384), (128, 200, 300), (128, 100, 256), (256, 50, 200), (512, 50, 200),
                  (1024, 25, 200), (1024, 10, 200), (2048, 10, 200), (4296, 10, 130))  # fmt: skip


def test_paper_config_has_1113203220_params():
    assert count_params(GeneratorConfig(PAPER_FEATURES, 9)) == 1_113_203_220


def _state_dict(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("features,k", [
    (((6, 12, 16), (8, 10, 12), (8, 10, 12), (20, 6, 10)), 3),  # includes a residual layer
    (((4, 9, 14), (5, 7, 8)), 5),
])  # fmt: skip
def test_forward_matches_pytorch_original(features, k):
    cfg = GeneratorConfig(features, k)
    model = HyperConvDecoder(cfg, nnx.Rngs(0))
    ref = TorchHyperConvDecoder(features, k).double()
    ref.load_from_flax(_state_dict(model))
    x = np.random.default_rng(0).standard_normal((2, *features[0])).astype(np.float32)
    got = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
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
