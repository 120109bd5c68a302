"""Minimal reproduction: XLA's SPMD partitioner gets the FFT conv wrong in one sharding chain.

  python scripts/fft_sharding_repro.py

8 fake CPU devices, mesh data 4 x fsdp 2 (Auto axes). The chain ConvH (direct conv, kernel split
over its output channels) -> FFT conv transforming along H -> ConvL (direct conv, kernel split
over its input channels) differs from the same chain on one device by O(1) (jax 0.10.2: 6.1);
with any kernel of the chain replicated it agrees to 1e-6. dnd_jax therefore runs FFT convs per
batch shard inside shard_map under a mesh (dnd_jax/models/hyperconv.py: conv), printed last.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dnd_jax.models import conv_paths as hc


def main() -> None:
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 34)).astype(np.float32)  # [B, N, H, W]
    kh = (rng.standard_normal((9, 9, 8, 10)) / 20).astype(np.float32)  # ConvH: H 8 -> 10
    kw = (rng.standard_normal((9, 9, 34, 34)) / 50).astype(np.float32)  # ConvW: W 34 -> 34, FFT along H
    kl = (rng.standard_normal((9, 9, 8, 87)) / 50).astype(np.float32)  # ConvL: N 8 -> 87

    def chain(x, kh, kw, kl, mesh=None):
        y = hc.conv(x, kh, hc._CONV_H, jnp.float32)
        if mesh is None:
            y = hc.fft_conv(y, kw, hc._CONV_W, 0)
        else:
            y = hc.conv(y, kw, hc._CONV_W, jnp.float32, "fft", mesh=mesh)
        return hc.conv(y, kl, hc._CONV_L, jnp.float32)

    ref = np.asarray(jax.jit(chain)(x, kh, kw, kl))
    sh = {n: NamedSharding(mesh, s) for n, s in
          {"batch": P(("data", "fsdp")), "rep": P(), "out": P(None, None, None, "fsdp"),
           "in": P(None, None, "fsdp", None)}.items()}  # fmt: skip
    with jax.set_mesh(mesh):
        for name, (a, b, c, d) in {"kh split on out, kl split on in": ("batch", "out", "out", "in"),
                                   "same, kl replicated": ("batch", "out", "out", "rep"),
                                   "same, kh and kw replicated": ("batch", "rep", "rep", "in")}.items():  # fmt: skip
            f = jax.jit(chain, in_shardings=(sh[a], sh[b], sh[c], sh[d]))
            print(f"partitioned by XLA, {name}: max abs error {np.abs(np.asarray(f(x, kh, kw, kl)) - ref).max():.3g}")
        f = jax.jit(lambda *a: chain(*a, mesh=mesh), in_shardings=(sh["batch"], sh["out"], sh["out"], sh["in"]))
        print(f"FFT conv in shard_map (dnd_jax), kh split on out, kl split on in: max abs error "
              f"{np.abs(np.asarray(f(x, kh, kw, kl)) - ref).max():.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
