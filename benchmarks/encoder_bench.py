"""Prompt-encoder throughput on this machine: PyTorch BertModel vs the Flax encoder, same run.

  PYTHONPATH=. python benchmarks/encoder_bench.py [--sizes 128x384,32x32,64x48] [--repeats 3]

Sizes are prompts x tokens: 128 x 384 is one paper-sized DnD condition; 32 x 32 is one demo
training step (batch 4 x 8 prompts x 32 tokens), 64 x 48 one many-task step (8 x 8 x 48). For each:
PyTorch transformers.BertModel (fp32, torch.inference_mode) as the baseline, then the Flax encoder
(jit, fp32) as training runs it (texts encoded in chunks, `encoder.auto_chunk`; keys past the
longest text left out, `encoder.keys_needed`), the same with every key, all texts at once (chunk 0)
with every key (`--all-at-once`: slow at 384 tokens), and bf16 (the original's autocast: bf16 x
bf16 -> f32 matmuls), raced against PyTorch under `torch.autocast("cpu", torch.bfloat16)`; max abs
difference to PyTorch's fp32 output.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.cpuinfo import describe
from benchmarks.timing import random_prompts, time_it
from dnd_jax.assets import minilm_path
from dnd_jax.extractors import load_bert, load_tokenizer
from dnd_jax.models.conv_paths import cpu_kind
from dnd_jax.models.encoder import BertConfig, auto_chunk, even_chunk, keys_needed, tokenize_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="128x384,32x32,64x48", help="prompts x tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all-at-once", action="store_true", help="also time all texts at once, every key")
    args = ap.parse_args()
    path = minilm_path()
    tok = load_tokenizer(path)
    ref = transformers.BertModel.from_pretrained(path).eval()
    print(f"{describe()}; JAX {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); all-MiniLM-L6-v2")  # fmt: skip
    dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
    encoders = {name: nnx.split(load_bert(path, dtype=dt)) for name, dt in dtypes.items()}
    for size in args.sizes.split(","):
        n, length = (int(v) for v in size.split("x"))
        rng = np.random.default_rng(0)
        prompts = random_prompts(rng, n, 20, 120)
        ids, mask = tokenize_prompts(tok, prompts, length)
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

        def run_torch(t_ids=t_ids, t_mask=t_mask, autocast=False):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return ref(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

        t_torch = time_it(run_torch, args.repeats)
        t_auto = time_it(lambda: run_torch(autocast=True), args.repeats)
        want = run_torch().numpy()
        chunks = {dt: even_chunk(n, auto_chunk(BertConfig(), length, d)) for dt, d in dtypes.items()}
        keys = keys_needed(mask)
        print(f"{n} prompts x {length} tokens (CPU kind {cpu_kind()}):")
        print(f"  PyTorch BertModel fp32                : {t_torch:8.4f} s  ({n / t_torch:7.1f} prompts/s)  baseline")
        print(f"  PyTorch BertModel bf16 autocast       : {t_auto:8.4f} s  ({n / t_auto:7.1f} prompts/s)  "
              f"{t_torch / t_auto:.2f}x PyTorch fp32 (the baseline of the bf16 rows)")  # fmt: skip
        x, m = jnp.asarray(ids), jnp.asarray(mask)
        runs = [
            (f"fp32, chunks of {chunks['fp32']}, {keys} keys", "fp32", None, keys),
            (f"fp32, chunks of {chunks['fp32']}, all {length} keys", "fp32", None, None),
            (f"bf16, chunks of {chunks['bf16']}, {keys} keys", "bf16", None, keys),
        ]
        if args.all_at_once:
            runs.insert(2, (f"fp32, all at once, {length} keys", "fp32", 0, None))
        for name, dt, ch, kl in runs:
            graphdef, state = encoders[dt]
            f = jax.jit(lambda s, a, b, g=graphdef, ch=ch, kl=kl: nnx.merge(g, s)(a, b, chunk=ch, key_length=kl))
            got = np.asarray(f(state, x, m).astype(jnp.float32))
            t = time_it(lambda f=f, s=state, x=x, m=m: f(s, x, m).block_until_ready(), args.repeats)
            base, tag = (t_auto, "PyTorch bf16 autocast") if dt == "bf16" else (t_torch, "PyTorch")
            print(f"  Flax {name:33s}: {t:8.4f} s  ({n / t:7.1f} prompts/s)  {base / t:.2f}x {tag}; "
                  f"max |diff| to fp32 PyTorch {np.abs(got - want).max():.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
