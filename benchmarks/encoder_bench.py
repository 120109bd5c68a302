"""Prompt-encoder throughput: 128 prompts x 384 tokens (one DnD condition) on this machine.

  python benchmarks/encoder_bench.py [--prompts 128] [--length 384] [--repeats 3]

Prints the Flax encoder's time (jit, fp32 and bf16) against PyTorch transformers.BertModel
(fp32, torch.inference_mode) measured in the same run on the same inputs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from dnd_jax.assets import minilm_path
from dnd_jax.models.encoder import load_encoder, load_tokenizer, tokenize_prompts


def bench(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.mean(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = minilm_path()
    tok = load_tokenizer(path)
    rng = np.random.default_rng(0)
    words = ["what", "is", "the", "answer", "to", "this", "question", "about", "science", "and", "plants"]
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(20, 120)))) for _ in range(args.prompts)]
    ids, mask = tokenize_prompts(tok, prompts, args.length)
    print(f"{jax.devices()[0].platform}: {args.prompts} prompts x {args.length} tokens, all-MiniLM-L6-v2")
    ref = transformers.BertModel.from_pretrained(path).eval()
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    def run_torch():
        with torch.inference_mode():
            ref(input_ids=t_ids, attention_mask=t_mask)

    t_torch = bench(run_torch, args.repeats)
    print(f"  PyTorch BertModel fp32 : {t_torch:7.3f} s  ({args.prompts / t_torch:7.1f} prompts/s)  baseline")
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        graphdef, state = nnx.split(load_encoder(path, dtype=dtype))
        f = jax.jit(lambda s, a, b, g=graphdef: nnx.merge(g, s)(a, b))  # weights are arguments, not constants
        x, m = jnp.asarray(ids), jnp.asarray(mask)
        t0 = time.perf_counter()
        f(state, x, m).block_until_ready()
        compile_s = time.perf_counter() - t0
        t = bench(lambda f=f, x=x, m=m, s=state: f(s, x, m).block_until_ready(), args.repeats)
        print(f"  Flax encoder {name}      : {t:7.3f} s  ({args.prompts / t:7.1f} prompts/s)  "
              f"{t_torch / t:.2f}x PyTorch; first call (compile) {compile_s:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
