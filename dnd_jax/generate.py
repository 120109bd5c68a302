"""Entry point: prompts of an unseen dataset -> PEFT LoRA adapters, with a trained generator.

  python -m dnd_jax.generate --workdir runs/train/arc_c_smoke \
      --prompts ../shared/data/commonsense/ARC-c_test.json --num-adapters 5 --out runs/generated/arc_c

The prompts file is a dataset JSON list (records with "prompt") or a text file with one prompt per
line. A generator trained on another condition form (data.condition: answers, prompts_answers, mix) reads
the records' "response" too; `--condition prompts` gives it plain prompts instead. Each adapter k
is generated from its own random batch of `num_texts` prompts (seeded), and written to
OUT/adapter-<k>/ as a PEFT LoRA directory (adapter_config.json from the training checkpoints: rank,
alpha, targets, base model). After loading, prompts -> encoder -> generator ->
float32 scale decoding -> detokenization is one compiled call; its time is measured as the
original does (a warm-up call, then the mean of repeats, compile excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dnd_jax import distributed, lora_tokens
from dnd_jax.data.prompts import CONDITIONS
from dnd_jax.errors import DndError, run_cli


def load_run(workdir: str | Path, step: int | None = None):
    """Reads a trained workdir: its config, the generator parameters at `step` (default latest).

    Returns:
      (config, graphdef, params, step).
    """
    from dnd_jax.checkpointing import Checkpointer
    from dnd_jax.models.hyperconv import HyperConvDecoder
    from dnd_jax.trainer import generator_config, make_init_state

    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise DndError(f"{workdir}: not a training workdir (config.json missing)")
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise DndError(f"{workdir}: no generator checkpoint (train first: python -m dnd_jax.train)")
    ck = Checkpointer(ckpt_dir)
    try:
        steps = ck.all_steps()
        if not steps:
            raise DndError(f"{workdir}: no generator checkpoint (train first: python -m dnd_jax.train)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise DndError(f"{workdir}: no checkpoint at step {step} (have {sorted(steps)})")
        abstract = jax.eval_shape(make_init_state(config))
        state = ck.restore_local(step, abstract)
    finally:
        ck.close()
    gen = generator_config(config)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0))))
    return config, graphdef, state["params"], step


def make_generate_fn(config, graphdef, enc_graphdef, layout, detokenize: bool = True, residual: bool = True):
    """The compiled prompts -> LoRA pytree call: ids [K, N, L], mask -> {path: {lora_a, lora_b}} [K, ...].

    With `data.target_offset` the generator's output is added to the offset tokens; with
    `data.loss_tokens == "b"` the A tokens are the offset's (the generator was never trained on them).
    The call takes the offset as its last argument (None without one). `detokenize=False` returns tokens.
    `residual=False` (with loss_tokens "b"): the generator's B^T tokens are absolute and only the A tokens
    come from the offset.
    """
    from dnd_jax.trainer import b_token_mask

    b_only = config.data.get("loss_tokens", "all") == "b"
    keep_b = jnp.asarray(b_token_mask(layout))[:, None, None]

    def fn(params, enc_state, ids_knl, mask_knl, offset_trk):
        encoder = nnx.merge(enc_graphdef, enc_state)
        cond = encoder(ids_knl, mask_knl, key=None, mask_padding=config.encoder.mask_padding)
        tokens = nnx.merge(graphdef, params)(cond.astype(jnp.dtype(config.model.compute_dtype))).astype(jnp.float32)
        if offset_trk is not None:
            if b_only:
                tokens = tokens * keep_b + offset_trk * (1.0 - keep_b if not residual else 1.0)
            else:
                tokens = tokens + offset_trk
        return lora_tokens.detokenize(tokens, layout, xp=jnp) if detokenize else tokens

    return jax.jit(fn)


def generate(workdir, prompts_file, out, num_adapters: int | None = None, step: int | None = None,
             seed: int | None = None, overwrite: bool = False, repeats: int = 5,
             condition: str | None = None) -> dict:  # fmt: skip
    """Generates `num_adapters` PEFT adapters into `out` (written atomically as a whole).

    The condition texts take the generator's training form (data.condition) unless `condition` names another:
    a generator trained on "mix" conditions, say, can be given plain unlabeled prompts ("prompts").

    Returns:
      {"adapters": [paths], "step", "seconds_per_call", "seconds_per_adapter", "compile_s"}.
    """
    from converters.jax_to_peft import save_peft_adapter, select_row
    from dnd_jax.data import pairs
    from dnd_jax.data.prepare import open_token_set
    from dnd_jax.data.prompts import load_prompts_file
    from dnd_jax.extractors import load_extractor
    from dnd_jax.fileio import atomic_dir
    from dnd_jax.trainer import check_width, load_target_offset

    out = Path(out)
    if out.exists() and not overwrite:
        raise DndError(f"{out}: output already exists (pass --overwrite to replace it)")
    config, graphdef, params, step = load_run(workdir, step)
    k = num_adapters or config.generate.num_adapters
    seed = config.seed if seed is None else seed
    form = condition or config.data.get("condition", "prompts")
    prompts = load_prompts_file(prompts_file, form, seed)
    if len(prompts) < config.data.num_texts:
        raise DndError(f"{prompts_file}: {len(prompts)} prompts, fewer than num_texts={config.data.num_texts}")
    template = open_token_set(Path(config.data.token_dir) / config.data.train_datasets[0])
    encoder, tok = load_extractor(config.encoder)
    check_width(config, encoder)
    pool = pairs.tokenize_pool(tok, str(prompts_file), prompts, config.data.max_text_length)
    rng = np.random.default_rng([seed, 7])
    ids, masks = zip(*[pairs.prompt_batch(pool, config.data.num_texts, rng) for _ in range(k)], strict=True)
    enc_graphdef, enc_state = nnx.split(encoder)
    fn = make_generate_fn(config, graphdef, enc_graphdef, template.layout)
    offset = load_target_offset(config, template.layout.shape)
    args = (params, enc_state, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(masks)),
            None if offset is None else jnp.asarray(offset))  # fmt: skip
    t0 = time.perf_counter()
    lora = jax.block_until_ready(fn(*args))  # compile + warm-up
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    per_call = (time.perf_counter() - t0) / max(repeats, 1)
    lora = jax.device_get(lora)
    spec = template.layout.spec
    with atomic_dir(out, overwrite=overwrite) as tmp:
        paths = []
        for i in range(k):
            save_peft_adapter(select_row(lora, i), spec, tmp / f"adapter-{i}", dtype=spec.dtype)
            paths.append(out / f"adapter-{i}")
        info = {"workdir": str(Path(workdir).absolute()), "step": step, "seed": seed, "prompts": str(prompts_file),
                "num_texts": config.data.num_texts, "num_adapters": k, "seconds_per_call": per_call,
                "seconds_per_adapter": per_call / k, "compile_s": compile_s}  # fmt: skip
        (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    return {"adapters": paths, **info}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnd_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--workdir", required=True, help="training workdir (python -m dnd_jax.train)")
    ap.add_argument(
        "--prompts",
        required=True,
        help="dataset JSON (records with 'prompt', and 'response' for "
        "conditions with answers) or text, one prompt per line",
    )
    ap.add_argument("--out", required=True, help="output directory; adapters go to OUT/adapter-<k>/")
    ap.add_argument("--num-adapters", type=int, default=None, help="adapters to generate (default: the config's)")
    ap.add_argument("--step", type=int, default=None, help="generator checkpoint step (default: latest)")
    ap.add_argument("--seed", type=int, default=None, help="prompt sampling seed (default: the config's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up call")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument(
        "--condition",
        default=None,
        choices=CONDITIONS,
        help="condition form of the texts (default: the generator's data.condition)",
    )
    distributed.add_arguments(ap)
    args = ap.parse_args(argv)
    if distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout):
        if jax.process_index() != 0:  # generation is small: process 0 does it; the others only joined
            return 0
    t0 = time.perf_counter()
    r = generate(args.workdir, args.prompts, args.out, args.num_adapters, args.step, args.seed, args.overwrite,
                 args.repeats, args.condition)  # fmt: skip
    print(f"generated {r['num_adapters']} adapters from step {r['step']} into {args.out}", file=sys.stderr)
    print(f"generation: {r['seconds_per_call']:.4f} s per call ({r['seconds_per_adapter']:.4f} s per adapter; "
          f"compile {r['compile_s']:.1f} s); whole command {time.perf_counter() - t0:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_cli(main)
