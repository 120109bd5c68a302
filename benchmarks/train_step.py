"""Generator training-step speed: step time, samples/s and achieved FLOP/s, against PyTorch.

  PYTHONPATH=. python benchmarks/train_step.py [--configs smoke,mid[,full]] [--repeats 3] [--dtype float32]
      [--conv-impl direct,auto]   (--dtype bfloat16: also PyTorch under bf16 autocast, as the original trains)

For each generator config: the jitted JAX step (weighted MSE, AdamW + clip, donated state, the
encoder excluded: conditions are random), once per conv_impl, and the original's PyTorch math (benchmarks/
torch_hyperconv.py, torch.optim.AdamW, same shapes) timed in the same run. FLOPs are counted
from the layer shapes (3 x forward for forward + backward). `full` (1.1 B parameters, 8.26 TFLOP
per sample forward) needs an accelerator.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
import torch
from flax import nnx

from benchmarks.cpuinfo import describe
from benchmarks.timing import time_it
from benchmarks.torch_hyperconv import TorchHyperConvDecoder
from configs.base import PAPER_FEATURES, SMOLLM2_TOKENS
from dnd_jax.models import conv_paths
from dnd_jax.models.hyperconv import GeneratorConfig, HyperConvDecoder, count_params, layer_flops
from dnd_jax.trainer import weighted_mse

CONFIGS = {
    "smoke": (((8, 32, 384), (16, 16, 96), (64, 10, 66), SMOLLM2_TOKENS), 3, 8),
    "mid": (((32, 64, 384), (32, 50, 200), (64, 25, 200), (128, 10, 200), (256, 10, 130)), 9, 4),
    "full": (PAPER_FEATURES, 9, 4),
}


def jax_step_time(features, k, batch, dtype, repeats, conv_impl="auto"):
    cfg = GeneratorConfig(features, k, compute_dtype=dtype, conv_impl=conv_impl)
    model = HyperConvDecoder(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-5, weight_decay=0.1))
    state = {"params": params, "opt": tx.init(params)}
    x = jax.random.normal(jax.random.key(1), (batch, *features[0]))
    y = jax.random.normal(jax.random.key(2), (batch, *features[-1]))
    w = jnp.ones((features[-1][0],))

    @jax.jit
    def step(state, x, y):
        def loss_fn(p):
            return weighted_mse(nnx.merge(graphdef, p)(x), y, w)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        upd, opt = tx.update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], upd), "opt": opt}, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0,))
    box = {"s": state}

    def run():
        box["s"], loss = step(box["s"], x, y)
        loss.block_until_ready()

    train = time_it(run, repeats)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    forward = time_it(lambda: fwd(box["s"]["params"], x).block_until_ready(), repeats)
    return train, forward, count_params(cfg), layer_flops(cfg)


def torch_step_time(features, k, batch, repeats, autocast=False):
    """The original's step; `autocast`: under torch.autocast("cpu", bfloat16), as the original trains."""
    model = TorchHyperConvDecoder(features, k)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.1)
    x = torch.randn(batch, *features[0])
    y = torch.randn(batch, *features[-1])

    def run():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ((model(x).float() - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    train = time_it(run, repeats)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        forward = time_it(lambda: model(x), repeats)
    return train, forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="smoke,mid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="JAX compute dtype (bfloat16 on accelerators)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--conv-impl", default="direct,auto",
                    help="generator conv_impl values to time (auto = FFT convs where cheaper on CPU)")  # fmt: skip
    ap.add_argument("--fft-ratios", default="",
                    help="also time conv_impl=auto with these FFT cost-ratio thresholds (conv_paths.fft_plan), "
                         "e.g. 0.45,0.7,1.0: the sweep that sets the per-CPU-kind thresholds")  # fmt: skip
    a = ap.parse_args()
    dev = jax.devices()[0]
    ratio, min_ch = conv_paths.fft_thresholds()
    kind = conv_paths.cpu_kind()  # tags every figure line; the full CPU line comes first
    print(f"{describe()}; devices: {jax.device_count()} x {dev.device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); FFT thresholds for this CPU kind: cost ratio <= {ratio}, "
          f">= {min_ch} channels")  # fmt: skip
    for name in a.configs.split(","):
        features, k, batch = CONFIGS[name]
        if not a.no_torch and dev.platform == "cpu":
            tt, tf = torch_step_time(features, k, batch, a.repeats)
            print(f"[{kind}] {name}: PyTorch fp32 (the original's math): step {tt:.3f} s, forward {tf:.3f} s",
                  flush=True)  # fmt: skip
            if a.dtype != "float32":
                at, af = torch_step_time(features, k, batch, a.repeats, autocast=True)
                print(f"[{kind}] {name}: PyTorch bf16 autocast (as the original trains): step {at:.3f} s, "
                      f"forward {af:.3f} s", flush=True)  # fmt: skip
        runs = [(impl, None) for impl in a.conv_impl.split(",")]
        runs += [("auto", float(r)) for r in a.fft_ratios.split(",") if r]
        for impl, r in runs:
            conv_paths.FFT_THRESHOLDS_OVERRIDE = None if r is None else (r, min_ch)
            jt, jf, n, flops = jax_step_time(features, k, batch, a.dtype, a.repeats, impl)
            conv_paths.FFT_THRESHOLDS_OVERRIDE = None
            tag = impl if r is None else f"auto, FFT ratio <= {r}"
            line = (f"[{kind}] {name}: {n / 1e6:.2f} M params, batch {batch}, {flops / 1e9:.1f} GFLOP/sample fwd | JAX "
                    f"{a.dtype} conv_impl={tag}: step {jt:.3f} s ({batch / jt:.2f} samples/s, "
                    f"{3 * flops * batch / jt / 1e12:.3f} TFLOP/s direct-equivalent), forward {jf:.3f} s")  # fmt: skip
            if not a.no_torch and dev.platform == "cpu":
                line += f" | vs PyTorch: step {tt / jt:.2f}x, forward {tf / jf:.2f}x"
                if a.dtype != "float32":
                    line += f" | vs PyTorch autocast: step {at / jt:.2f}x, forward {af / jf:.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
