"""dnd_jax.fast_random against jax.random itself (the oracle): the same values, bit for bit, under jit,
on one device and under a sharded output, and jax.random wherever it does not apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dnd_jax import fast_random

SHAPES = [(7,), (3, 5), (2, 3, 4, 5), (1, 1), (257, 1031)]


def _key():
    return jax.random.fold_in(jax.random.key(3), 11)


@pytest.mark.parametrize("shape", SHAPES)
def test_same_values_as_jax_random(shape):
    key = _key()
    pairs = [
        (lambda k: fast_random.uniform(k, shape), lambda k: jax.random.uniform(k, shape)),
        (lambda k: fast_random.uniform(k, shape, minval=-2.0, maxval=3.0),
         lambda k: jax.random.uniform(k, shape, minval=-2.0, maxval=3.0)),
        (lambda k: fast_random.normal(k, shape), lambda k: jax.random.normal(k, shape)),
        (lambda k: fast_random.bernoulli(k, 0.9, shape), lambda k: jax.random.bernoulli(k, 0.9, shape)),
    ]  # fmt: skip
    for ours, theirs in pairs:
        got, want = jax.jit(ours)(key), jax.jit(theirs)(key)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the bits themselves, and a different key gives different values
    np.testing.assert_array_equal(jax.jit(lambda k: fast_random._bits(k, shape))(key), jax.random.bits(key, shape))
    if np.prod(shape) > 8:
        assert not np.array_equal(fast_random.normal(key, shape), fast_random.normal(jax.random.key(4), shape))


def test_unrolled_path_is_taken_and_statistics_hold():
    """The fast path really runs (not a silent fallback), and its normals look normal."""
    key = _key()
    assert fast_random._supported(key, (1000, 1000), jnp.float32)
    x = np.asarray(jax.jit(lambda k: fast_random.normal(k, (1000, 1000)))(key), np.float64)
    assert abs(x.mean()) < 5e-3 and abs(x.std() - 1) < 5e-3
    assert abs((np.abs(x) > 1.96).mean() - 0.05) < 2e-3  # two-sided 5 % tail
    keep = np.asarray(jax.jit(lambda k: fast_random.bernoulli(k, 0.9, (1000, 1000)))(key))
    assert abs(keep.mean() - 0.9) < 2e-3


def test_sharded_output_matches_one_device():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    key = _key()
    shape = (8, 6, 10)
    out = NamedSharding(mesh, P("data", "model"))
    got = jax.jit(lambda k: fast_random.normal(k, shape), out_shardings=out)(key)
    assert got.sharding == out
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.normal(key, shape)))


def test_falls_back_to_jax_random():
    """Other PRNG implementations, dtypes, scalar shapes and legacy uint32 keys are jax.random's own."""
    rbg = jax.random.key(0, impl="rbg")
    shape = (4, 5)
    assert not fast_random._supported(rbg, shape, jnp.float32)
    np.testing.assert_array_equal(fast_random.normal(rbg, shape), jax.random.normal(rbg, shape))
    np.testing.assert_array_equal(fast_random.bernoulli(rbg, 0.5, shape), jax.random.bernoulli(rbg, 0.5, shape))
    key = _key()
    got = fast_random.normal(key, shape, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, jax.random.normal(key, shape, jnp.bfloat16))
    np.testing.assert_array_equal(fast_random.uniform(key, ()), jax.random.uniform(key, ()))
    legacy = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(fast_random.normal(legacy, shape), jax.random.normal(legacy, shape))
    fast_random.ENABLED = False
    try:
        assert not fast_random._supported(key, shape, jnp.float32)
    finally:
        fast_random.ENABLED = True
