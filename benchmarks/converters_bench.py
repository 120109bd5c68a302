"""Converter speed on a Qwen2.5-7B-sized adapter and on a batch of 0.5B checkpoints.

  python benchmarks/converters_bench.py [--batch-size 50]

Prints the time of each direction and, as the baseline measured in the same run, the time of a
plain `safetensors.torch` load + save of the same file (the I/O floor any converter pays).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

import converters
from converters.synthetic import qwen2_config, write_synthetic_adapter


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_synthetic_adapter(tmp / "7b", qwen2_config("7B"), r=16, alpha=32)
        size_mb = (src / "adapter_model.safetensors").stat().st_size / 2**20

        def torch_io():
            sd = load_file(src / "adapter_model.safetensors")
            save_file(sd, tmp / "copy.safetensors", metadata={"format": "pt"})

        def to_jax():
            params, spec = converters.load_peft_adapter(src)
            converters.save_pytree(tmp / "7b.safetensors", params, spec)
            return spec

        def to_peft():
            params, spec, _ = converters.load_pytree(tmp / "7b.safetensors")
            converters.save_peft_adapter(params, spec, tmp / "back", overwrite=True)

        t_base, _ = timed(torch_io)
        t_in, spec = timed(to_jax)
        t_out, _ = timed(to_peft)
        n = sum(m.rank * (m.in_features + m.out_features) for m in spec.modules)
        print(f"Qwen2.5-7B r16, 28 layers x 7 projections: {n / 1e6:.2f} M params, bf16, {size_mb:.0f} MiB")
        print(f"  baseline safetensors.torch load+save : {t_base:6.3f} s")
        print(f"  peft_to_jax (load + write pytree)    : {t_in:6.3f} s  ({t_in / t_base:.2f}x baseline)")
        print(f"  jax_to_peft (load pytree + write dir): {t_out:6.3f} s  ({t_out / t_base:.2f}x baseline)")
        t = time.perf_counter()
        converters.load_peft_adapter(src, base_config=qwen2_config("7B"))
        print(f"  peft_to_jax with base-config check   : {time.perf_counter() - t:6.3f} s")

        cfg05 = qwen2_config("0.5B")
        coll = tmp / "collection"
        for i in range(args.batch_size):
            write_synthetic_adapter(coll / f"step-{i:06d}", cfg05, r=8, alpha=16, seed=i)
        t_batch, out = timed(lambda: converters.load_peft_batch(coll), repeats=1)
        params, spec, steps, _ = out
        t_save, _ = timed(lambda: converters.save_pytree(tmp / "batch.safetensors", params, spec, steps), repeats=1)
        print(
            f"Batch: {len(steps)} Qwen2.5-0.5B r8 checkpoints (bf16) stacked in {t_batch:.2f} s "
            f"({t_batch / len(steps) * 1e3:.1f} ms each), written in {t_save:.2f} s"
        )


if __name__ == "__main__":
    main()
