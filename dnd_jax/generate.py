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


def read_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """A trained workdir's config.json (no checkpoint read)."""
    cfg_path = Path(workdir) / "config.json"
    if not cfg_path.is_file():
        raise DndError(f"{workdir}: not a training workdir (config.json missing)")
    return ml_collections.ConfigDict(json.loads(cfg_path.read_text()))


def condition_form(config) -> str:
    """The condition form a generator was trained on (data.condition; runs from before the field: "prompts")."""
    return config.data.get("condition", "prompts")


def load_run(workdir: str | Path, step: int | None = None):
    """Reads a trained workdir: its config, the generator parameters at `step` (default latest).

    Returns:
      (config, graphdef, params, step).
    """
    from dnd_jax.checkpointing import Checkpointer
    from dnd_jax.models.hyperconv import HyperConvDecoder
    from dnd_jax.trainer import generator_config, make_init_state

    workdir = Path(workdir)
    config = read_run_config(workdir)
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


def make_generate_fn(config, graphdef, enc_graphdef, layout, detokenize: bool = True, residual: bool = True,
                     with_sigma: bool = False):  # fmt: skip
    """The compiled prompts -> LoRA pytree call: ids [K, N, L], mask -> {path: {lora_a, lora_b}} [K, ...].

    With `data.target_offset` the generator's output is added to the offset tokens; with
    `data.loss_tokens == "b"` the A tokens are the offset's (the generator was never trained on them).
    The call takes the offset as its last argument (None without one). `detokenize=False` returns tokens.
    `residual=False` (with loss_tokens "b"): the generator's B^T tokens are absolute and only the A tokens
    come from the offset. `with_sigma`: also return the tokens' decoded per-chunk sigmas [K, T], unfloored.
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
        floor = config.generate.get("sigma_floor", None) if "generate" in config else None
        out = lora_tokens.detokenize(tokens, layout, xp=jnp, sigma_floor=floor) if detokenize else tokens
        return (out, lora_tokens.decode_scales(tokens, jnp)[1]) if with_sigma else out

    return jax.jit(fn)


class AdapterGenerator:
    """Prompts -> LoRA adapters with one trained generator: the CLI's and the experiment's one path.

    Loads the run, the extractor and the compiled call once (`load_s`); each call draws `k` prompt batches of
    `num_texts` texts (seeded; the original's random.sample order), runs them through one compiled call, and
    times it as the original does (a warm-up call that compiles on first use, then the mean of `repeats`).

    Args:
      workdir: training workdir.
      step: generator checkpoint step (default latest).
      a_from: mean token tensor [T, R, K] (a .npy path) whose A tokens replace the generator's (the generator
        then predicts B^T tokens only: experiment.predict "b_only"); default: the run's own training offset
        (data.target_offset) if it was trained on residual targets, else none.
      sigma_floor: floor on decoded sigmas (generate.sigma_floor); default the run's own setting.
    """

    def __init__(self, workdir, step: int | None = None, a_from: str | Path | None = None,
                 sigma_floor: float | None = None):  # fmt: skip
        from dnd_jax.data.prepare import open_token_set
        from dnd_jax.extractors import load_extractor
        from dnd_jax.trainer import check_width, load_target_offset

        t0 = time.perf_counter()
        self.workdir = Path(workdir)
        self.config, graphdef, self.params, self.step = load_run(workdir, step)
        config = self.config
        if sigma_floor is not None:
            config.generate.sigma_floor = sigma_floor
        self.layout = open_token_set(Path(config.data.token_dir) / config.data.train_datasets[0]).layout
        self.encoder, self.tok = load_extractor(config.encoder)
        check_width(config, self.encoder)
        enc_graphdef, self.enc_state = nnx.split(self.encoder)
        residual = bool(config.data.get("target_offset", ""))  # what the generator was trained on
        if a_from is not None:
            config.data.loss_tokens = "b"
            offset = np.load(a_from)
        else:
            offset = load_target_offset(config, self.layout.shape)
        self.graphdef, self.enc_graphdef, self.residual = graphdef, enc_graphdef, residual
        self.fn = make_generate_fn(config, graphdef, enc_graphdef, self.layout, residual=residual, with_sigma=True)
        self.offset = None if offset is None else jnp.asarray(offset)
        self.form = condition_form(config)
        self.compile_s: float | None = None
        self.load_s = time.perf_counter() - t0

    def texts(self, records: list[dict], form: str | None = None, seed: int | None = None) -> list[str]:
        """The condition texts of `records` in the generator's form (or `form`), mix draws seeded by `seed`."""
        from dnd_jax.data.prompts import condition_texts

        seed = self.config.seed if seed is None else seed
        return condition_texts(records, form or self.form, seed, str(self.workdir))

    def __call__(self, texts: list[str], k: int, seed: int | None = None, repeats: int = 3):
        """`k` adapters from `texts`: ({path: {lora_a, lora_b}} with a leading [k] axis on host, seconds per call,
        {"negative", "chunks"}: how many of the tokens' decoded per-chunk sigmas are negative, of how many).

        Adapter i is made from the i-th of k prompt batches drawn from default_rng([seed, 7]) (seed: the
        run's by default), so the same texts and seed give the same adapters from the CLI and the experiment.
        The decoding sigma = (exp(sigma' - 1.6) - 0.1) / 0.9 flips a chunk's sign for sigma' below about -0.70.
        """
        args = self._args(texts, k, seed)
        t0 = time.perf_counter()
        lora, sigma = jax.block_until_ready(self.fn(*args))  # compile (first call of a shape) + warm-up
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(self.fn(*args))
        per_call = (time.perf_counter() - t0) / max(repeats, 1)
        sigma = np.asarray(sigma)
        return jax.device_get(lora), per_call, {"negative": int((sigma < 0).sum()), "chunks": int(sigma.size)}

    def save(self, lora: dict, out: Path, info: dict, overwrite: bool = False) -> list[Path]:
        """Writes adapter-<i>/ for each row of `lora` and generation.json (`info`) into `out`, atomically as a
        whole."""
        from converters.jax_to_peft import save_peft_adapter, select_row
        from dnd_jax.fileio import atomic_dir

        k = jax.tree.leaves(lora)[0].shape[0]
        spec = self.layout.spec
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for i in range(k):
                save_peft_adapter(select_row(lora, i), spec, tmp / f"adapter-{i}", dtype=spec.dtype)
            (tmp / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
        return [out / f"adapter-{i}" for i in range(k)]

    def _args(self, texts: list[str], k: int, seed: int | None):
        from dnd_jax.data import pairs

        config = self.config
        seed = config.seed if seed is None else seed
        if len(texts) < config.data.num_texts:
            raise DndError(f"{len(texts)} prompts, fewer than num_texts={config.data.num_texts}")
        pool = pairs.tokenize_pool(self.tok, "prompts", texts, config.data.max_text_length)
        rng = np.random.default_rng([seed, 7])
        ids, masks = zip(*[pairs.prompt_batch(pool, config.data.num_texts, rng) for _ in range(k)], strict=True)
        return self.params, self.enc_state, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(masks)), self.offset


def generate(workdir, prompts_file, out, num_adapters: int | None = None, step: int | None = None,
             seed: int | None = None, overwrite: bool = False, repeats: int = 5,
             condition: str | None = None) -> dict:  # fmt: skip
    """Generates `num_adapters` PEFT adapters into `out` (written atomically as a whole).

    The condition texts take the generator's training form (data.condition) unless `condition` names another:
    a generator trained on "mix" conditions, say, can be given plain unlabeled prompts ("prompts").

    Returns:
      {"adapters": [paths], "step", "seconds_per_call", "seconds_per_adapter", "compile_s", "load_s"}.
    """
    from dnd_jax.data.prompts import load_prompts_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise DndError(f"{out}: output already exists (pass --overwrite to replace it)")
    # The prompts are checked before the generator and its extractor load (a bad file fails in a fraction of a second).
    config = read_run_config(workdir)
    seed = config.seed if seed is None else seed
    form = condition or condition_form(config)
    texts = load_prompts_file(prompts_file, form, seed)
    if len(texts) < config.data.num_texts:
        raise DndError(f"{prompts_file}: {len(texts)} prompts, fewer than num_texts={config.data.num_texts}")
    gen = AdapterGenerator(workdir, step)
    config = gen.config
    k = num_adapters or config.generate.num_adapters
    lora, per_call, _ = gen(texts, k, seed, repeats)
    info = {"workdir": str(Path(workdir).absolute()), "step": gen.step, "seed": seed, "prompts": str(prompts_file),
            "condition": form, "num_texts": config.data.num_texts, "num_adapters": k, "seconds_per_call": per_call,
            "seconds_per_adapter": per_call / k, "compile_s": gen.compile_s, "load_s": gen.load_s}  # fmt: skip
    paths = gen.save(lora, out, info, overwrite)
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
