"""jax.random's threefry normals, uniforms and Bernoulli masks, bit for bit, in one fused loop.

On the CPU backend jax lowers threefry2x32 as a rolled loop: five iterations of four rounds, each
reading and writing whole uint32 arrays, so it is memory-bound. The training step draws noise of its
targets' size (at batch 8: 8 x 4770 x 10 x 66 = 25 M floats) and the encoder's dropout masks every
step. On 2 AMX Xeon cores `jax.random.normal` takes 333 ms for those 25 M floats, its bits alone 306 ms
(the generator's whole forward + backward: 650 ms; `torch.randn`: 149 ms). Here the same threefry2x32
rounds are written out unrolled on the same counters (the flat index, laid out as
`jax_threefry_partitionable` lays it out), so XLA fuses them and the bits-to-float map into one
elementwise loop: the bits take 46 ms (6.7x faster), the normals 77 ms (4.3x). Each function is jitted
on its own, as jax.random's are, so its values are exactly jax.random's whether called eagerly or inside
a jit (tests/fast_random_test.py checks both, under vmap and under a sharded output). Being elementwise
over iotas, it partitions under any sharding like jax.random does.

Anything else (another PRNG implementation, batched or legacy uint32 keys, the non-partitionable layout,
jax_enable_x64, dtypes other than float32, a Bernoulli p that is not float32, scalar or empty shapes,
more than 2^32 values) is handed to jax.random unchanged.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
ENABLED = True  # False: every function is jax.random's (benchmarks/trainer_step.py races the two); read at trace time


def _threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as jax.random computes it, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _supported(key, shape, dtype) -> bool:
    return (
        ENABLED
        and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and key.shape == ()
        and jax.config.jax_threefry_partitionable
        and not jax.config.jax_enable_x64
        and jnp.dtype(dtype) == jnp.float32
        and len(shape) > 0
        and 0 < math.prod(shape) < 2**32
    )


def _bits(key, shape):
    """uint32 bits of jax.random.bits(key, shape) for a supported key and shape."""
    k1, k2 = jax.random.key_data(key)
    strides = np.cumprod((*shape[1:], 1)[::-1])[::-1]
    flat = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides))
    b1, b2 = _threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), flat)  # counters: (high, low) word of the index
    return b1 ^ b2


@functools.partial(jax.jit, static_argnums=(1,))
def _uniform(key, shape, minval, maxval):
    mant = _bits(key, shape) >> np.uint32(32 - 23) | np.uint32(0x3F800000)  # 23 mantissa bits, exponent of 1.0
    floats = lax.bitcast_convert_type(mant, jnp.float32) - 1.0
    minval, maxval = lax.convert_element_type(minval, jnp.float32), lax.convert_element_type(maxval, jnp.float32)
    return jnp.maximum(minval, floats * (maxval - minval) + minval)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """jax.random.uniform(key, shape, dtype, minval, maxval)."""
    shape = tuple(int(d) for d in shape)
    if not _supported(key, shape, dtype) or np.ndim(minval) or np.ndim(maxval):
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    return _uniform(key, shape, minval, maxval)


@functools.partial(jax.jit, static_argnums=(1,))
def _normal(key, shape):
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2)) * lax.erf_inv(_uniform(key, shape, lo, np.float32(1.0)))


def normal(key, shape, dtype=jnp.float32):
    """jax.random.normal(key, shape, dtype): sqrt(2) erfinv(u), u uniform on (-1, 1)."""
    shape = tuple(int(d) for d in shape)
    if not _supported(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)
    return _normal(key, shape)


def bernoulli(key, p, shape):
    """jax.random.bernoulli(key, p, shape): True with probability p (a Python float or float32 scalar)."""
    shape = None if shape is None else tuple(int(d) for d in shape)
    if shape is None or np.ndim(p) or jnp.result_type(p) != jnp.float32 or not _supported(key, shape, jnp.float32):
        return jax.random.bernoulli(key, p, shape)
    return _uniform(key, shape, 0.0, 1.0) < p
