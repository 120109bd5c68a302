"""The whole training step as the trainer runs it, raced against the original's whole step in PyTorch.

  PYTHONPATH=. python benchmarks/trainer_step.py [--configs demo,many_task_smollm2] [--repeats 5] [--dtype bfloat16]

JAX: `trainer.make_steps`' train step, jitted with the state donated: the frozen all-MiniLM-L6-v2 encoder
with dropout on (as the original), noise on the condition (1e-4) and on the targets (1e-5), the generator's
forward and backward, the weighted MSE and clipped AdamW. It runs twice, once with `dnd_jax.fast_random`
(the trainer's default) and once with `jax.random`, to show what the noise and the dropout masks cost.
PyTorch: the same step as the original runs it: BertModel in train mode (dropout 0.1) without gradients,
torch.randn noise, the generator (benchmarks/torch_hyperconv.py), the same loss, backward,
clip_grad_norm_ and AdamW. A batch is batch_size x num_texts prompts of random words, max_text_length
tokens each, with random targets; the shapes and the generator come from the config. `--dtype bfloat16`
sets the encoder's and the generator's compute dtype (the original's autocast; the generator's last layer
stays float32 as configured) and runs the PyTorch step under `torch.autocast("cpu", torch.bfloat16)`, as the
original trains.
"""

from __future__ import annotations

import argparse
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.cpuinfo import describe
from benchmarks.timing import random_prompts, time_it
from benchmarks.torch_hyperconv import TorchHyperConvDecoder, original_train_step
from dnd_jax import fast_random, trainer
from dnd_jax.assets import resolve_model
from dnd_jax.extractors import load_extractor
from dnd_jax.models.conv_paths import cpu_kind
from dnd_jax.models.encoder import keys_needed, tokenize_prompts
from dnd_jax.models.hyperconv import HyperConvDecoder


def make_batch(config, tok, seed=0):
    d, t = config.data, config.train
    rng = np.random.default_rng(seed)
    prompts = random_prompts(rng, t.batch_size * d.num_texts, 10, 60)
    ids, mask = tokenize_prompts(tok, prompts, d.max_text_length)
    shape = (t.batch_size, d.num_texts, d.max_text_length)
    tokens = rng.standard_normal((t.batch_size, *config.model.features[-1])).astype(np.float32)
    return ids.reshape(shape), mask.reshape(shape), tokens


def jax_step_time(config, encoder, ids, mask, tokens, repeats: int) -> float:
    gen = trainer.generator_config(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0))), nnx.Param)
    enc_graphdef, enc_state = nnx.split(encoder)
    tx, schedule = trainer.make_optimizer(config)
    train_step, _ = trainer.make_steps(config, graphdef, enc_graphdef, tx, schedule, keys_needed(mask))
    step = jax.jit(train_step, donate_argnums=(0,))
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "tokens": jnp.asarray(tokens)}
    weight = jnp.ones((tokens.shape[1],), jnp.float32)
    box = {"state": jax.jit(trainer.make_init_state(config))()}

    def run():
        box["state"], metrics = step(box["state"], enc_state, batch, weight)
        metrics["loss"].block_until_ready()

    return time_it(run, repeats, np.median)


def torch_step_time(config, bert, ids, mask, tokens, repeats: int, autocast: bool = False) -> float:
    t, m = config.train, config.model
    model = TorchHyperConvDecoder(m.features, m.kernel_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    b, n, length = ids.shape
    t_ids, t_mask = torch.tensor(ids.reshape(b * n, length), dtype=torch.long), torch.tensor(mask.reshape(b * n, -1))
    y = torch.from_numpy(tokens)
    w = torch.ones(y.shape[1])[None, :, None, None]

    def run():
        original_train_step(model, opt, bert, t_ids, t_mask, y, w, t, (b, n, length), "cpu", autocast)

    return time_it(run, repeats, np.median)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="demo,many_task_smollm2", help="modules under configs/, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", help="encoder and generator compute dtype (bfloat16: autocast)")
    a = ap.parse_args()
    print(f"{describe()}; JAX {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    kind = cpu_kind()
    for name in a.configs.split(","):
        config = importlib.import_module(f"configs.{name}").get_config()
        config.encoder.dtype = config.model.compute_dtype = a.dtype
        encoder, tok = load_extractor(config.encoder)
        ids, mask, tokens = make_batch(config, tok)
        bert = transformers.BertModel.from_pretrained(resolve_model(config.encoder.path)).train()
        tt = torch_step_time(config, bert, ids, mask, tokens, a.repeats, autocast=a.dtype != "float32")
        b, n, length = ids.shape
        out, k = tuple(config.model.features[-1]), config.model.kernel_size
        ref = "the original's step" + (", bf16 autocast" if a.dtype != "float32" else "")
        print(f"[{kind}] {name}: batch {b} x {n} prompts x {length} tokens -> {out} tokens, k {k}; "
              f"{a.dtype}; PyTorch ({ref}): {tt:.3f} s", flush=True)  # fmt: skip
        for fast in (True, False):
            fast_random.ENABLED = fast
            jt = jax_step_time(config, encoder, ids, mask, tokens, a.repeats)
            tag = "dnd_jax.fast_random (default)" if fast else "jax.random"
            print(f"[{kind}] {name}: JAX step, noise and dropout from {tag:29s}: {jt:.3f} s, {tt / jt:.2f}x PyTorch",
                  flush=True)  # fmt: skip
        fast_random.ENABLED = True


if __name__ == "__main__":
    main()
