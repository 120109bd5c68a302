"""dnd_jax.fast_random against jax.random itself (the oracle): the same values, bit for bit, called eagerly
and inside jit, under vmap and under a sharded output, and jax.random's own wherever it does not apply."""

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


def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, nested jaxprs (jit, scan, ...) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def _uses_jax_random_bits(fn, *args) -> bool:
    """Whether fn draws through jax.random's `random_bits` primitive (threefry2x32's rolled loop on CPU)."""
    return "random_bits" in _primitives(jax.make_jaxpr(fn)(*args).jaxpr)


def _pairs(shape):
    return [
        (lambda k: fast_random.uniform(k, shape), lambda k: jax.random.uniform(k, shape)),
        (lambda k: fast_random.uniform(k, shape, minval=-2.0, maxval=3.0),
         lambda k: jax.random.uniform(k, shape, minval=-2.0, maxval=3.0)),
        (lambda k: fast_random.normal(k, shape), lambda k: jax.random.normal(k, shape)),
        (lambda k: fast_random.bernoulli(k, 0.9, shape), lambda k: jax.random.bernoulli(k, 0.9, shape)),
        (lambda k: fast_random.bernoulli(k, jnp.float32(0.3), shape), lambda k: jax.random.bernoulli(k, 0.3, shape)),
    ]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_same_values_as_jax_random(shape):
    key = _key()
    for ours, theirs in _pairs(shape):
        want = np.asarray(theirs(key))
        for got in (ours(key), jax.jit(ours)(key)):  # eagerly and inside a jit
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got), want)
        # the fast path ran: jax.random's bits primitive is not in its program
        assert not _uses_jax_random_bits(ours, key) and _uses_jax_random_bits(theirs, key)
    np.testing.assert_array_equal(jax.jit(lambda k: fast_random._bits(k, shape))(key), jax.random.bits(key, shape))
    if np.prod(shape) > 8:  # a different key gives different values
        assert not np.array_equal(fast_random.normal(key, shape), fast_random.normal(jax.random.key(4), shape))


def test_under_vmap_over_keys():
    keys = jax.random.split(_key(), 5)
    for ours, theirs in _pairs((3, 4)):
        np.testing.assert_array_equal(jax.vmap(ours)(keys), jax.vmap(theirs)(keys))


def test_statistics():
    key = _key()
    x = np.asarray(fast_random.normal(key, (1000, 1000)), np.float64)
    assert abs(x.mean()) < 5e-3 and abs(x.std() - 1) < 5e-3
    assert abs((np.abs(x) > 1.96).mean() - 0.05) < 2e-3  # two-sided 5 % tail
    assert abs(np.asarray(fast_random.bernoulli(key, 0.9, (1000, 1000))).mean() - 0.9) < 2e-3


def test_sharded_output_matches_one_device():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    key = _key()
    shape = (8, 6, 10)
    out = NamedSharding(mesh, P("data", "model"))
    got = jax.jit(lambda k: fast_random.normal(k, shape), out_shardings=out)(key)
    assert got.sharding == out
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.normal(key, shape)))


def test_falls_back_to_jax_random():
    """Other PRNG implementations, dtypes, non-float32 p, array bounds, scalar shapes and legacy uint32 keys are
    jax.random's own."""
    shape = (4, 5)
    key = _key()
    rbg = jax.random.key(0, impl="rbg")
    legacy = jax.random.PRNGKey(0)
    cases = [
        (lambda: fast_random.normal(rbg, shape), lambda: jax.random.normal(rbg, shape)),
        (lambda: fast_random.bernoulli(rbg, 0.5, shape), lambda: jax.random.bernoulli(rbg, 0.5, shape)),
        (lambda: fast_random.normal(key, shape, jnp.bfloat16), lambda: jax.random.normal(key, shape, jnp.bfloat16)),
        (lambda: fast_random.bernoulli(key, jnp.bfloat16(0.9), (64,)),
         lambda: jax.random.bernoulli(key, jnp.bfloat16(0.9), (64,))),
        (lambda: fast_random.uniform(key, shape, minval=jnp.zeros(shape)),
         lambda: jax.random.uniform(key, shape, minval=jnp.zeros(shape))),
        (lambda: fast_random.uniform(key, ()), lambda: jax.random.uniform(key, ())),
        (lambda: fast_random.normal(legacy, shape), lambda: jax.random.normal(legacy, shape)),
    ]  # fmt: skip
    for ours, theirs in cases:
        got, want = ours(), theirs()
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    fast_random.ENABLED = False
    try:
        assert _uses_jax_random_bits(lambda k: fast_random.normal(k, shape), key)
    finally:
        fast_random.ENABLED = True
