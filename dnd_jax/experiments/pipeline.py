"""Entry point: the whole DnD experiment, resumable, stage by stage.

  python -m dnd_jax.pipeline --config configs/demo.py --workdir runs/demo
  python -m dnd_jax.pipeline --config configs/commonsense_smollm2.py --workdir runs/commonsense_smollm2

Stages (each skips work whose outputs exist, so a re-run resumes):
  data      BIG-bench tasks ($DND_JAX_BIGBENCH; configs with pipeline.source "bigbench"), or the
            configured prompt data directory as it is
  collect   LoRA checkpoints (PyTorch + PEFT) for each training dataset and, as a baseline only,
            for the held-out one                                   -> <collection_dir>/<dataset>/
  train     token store, criterion weights, the generator          -> WORKDIR/train/
  generate  K adapters from the held-out test prompts, with the generator's final step
                                                                   -> WORKDIR/generated/adapter-<k>/
  evaluate  base, each training LoRA, the held-out LoRA, each generated adapter -> WORKDIR/eval/
  report    WORKDIR/report.md (settings, table, figure, wall time per stage), printed at the end
Config strings may contain "{workdir}", replaced by --workdir.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from dnd_jax.config_cli import parse_or_exit
from dnd_jax.errors import DndError, run_cli
from dnd_jax.experiments.baselines import last_checkpoint_in
from dnd_jax.experiments.stages import Stages, is_trained, resolve
from dnd_jax.fileio import atomic_file

STAGES = ("data", "collect", "train", "generate", "evaluate", "report")


def heldout_test_file(prompts_dir: str, dataset: str, split: str) -> Path:
    from dnd_jax.data.prompts import read_registry

    reg = read_registry(prompts_dir)
    name = f"{dataset}_{split}"
    if name not in reg:
        raise DndError(f"{Path(prompts_dir) / 'dataset_info.json'}: no {name!r} (the held-out prompts)")
    return Path(prompts_dir) / reg[name]["file_name"]


def run_pipeline(config, workdir: str | Path) -> Path:
    """Runs or resumes every stage; returns the report path."""

    workdir = Path(workdir).absolute()
    c = resolve(config, workdir)
    d = c.data
    if c.pipeline.source != "bigbench" and not (Path(d.prompts_dir) / "dataset_info.json").is_file():
        raise DndError(f"{d.prompts_dir}: no dataset_info.json (data.prompts_dir, the prompt datasets; configs/demo.py "
                       "reads the paper's common-sense suite at ../shared/data/commonsense)")  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir)
    t_all = time.perf_counter()

    def data():
        from dnd_jax.data import bigbench

        bigbench.build(d.prompts_dir, list(c.pipeline.bigbench_tasks), c.pipeline.test_size, c.seed,
                       c.pipeline.max_train)  # fmt: skip

    bb = c.pipeline.source == "bigbench"
    stages.run("data", data, done=not bb or (Path(d.prompts_dir) / "dataset_info.json").is_file())

    names = [*d.train_datasets, d.heldout_dataset]

    def collect_all():
        from dnd_jax.collect import collect

        for name in names:
            cc = copy.deepcopy(c.collect)
            cc.dataset, cc.data_dir = name, d.prompts_dir
            collect(cc, d.collection_dir)

    from dnd_jax.collect import is_complete

    stages.run("collect", collect_all, done=all(is_complete(d.collection_dir, n) for n in names))

    train_dir = workdir / "train"
    trained = is_trained(train_dir, c.train.steps)
    train_cfg = copy.deepcopy(c)

    if c.pipeline.get("target", "tokens") == "residual":
        # The generator predicts the residual from the control's tokens, loss on B^T tokens only (A = the
        # mean's): the configuration the many-task experiment found best; it starts at the control.
        train_cfg.data.target_offset = str(workdir / "baselines" / "mean_tokens.npy")
        train_cfg.data.loss_tokens = "b"
        train_cfg.model.zero_init_output = True

    def train():
        from dnd_jax.trainer import exit_if_stopped, train_and_evaluate

        if train_cfg.data.get("target_offset", ""):
            control_tokens(c, Path(train_cfg.data.target_offset))
        exit_if_stopped(train_and_evaluate(train_cfg, train_dir), train_dir)

    stages.run("train", train, done=trained)

    gen_dir = workdir / "generated"
    test_file = heldout_test_file(d.prompts_dir, d.heldout_dataset, c.generate.split)

    def gen():
        from dnd_jax.generate import generate

        r = generate(train_dir, test_file, gen_dir, c.generate.num_adapters, step=c.train.steps, seed=c.seed)
        print(f"generation: {r['seconds_per_adapter']:.4f} s per adapter (compile excluded)", file=sys.stderr)

    stages.run("generate", gen, done=(gen_dir / "generation.json").is_file())

    eval_dir = workdir / "eval"

    def last_ckpt(name):
        return last_checkpoint_in(Path(d.collection_dir), name)

    def evaluate():
        from dnd_jax.evaluate import evaluate as run_eval

        control, (nearest, sim) = prompt_blind_baselines(c, workdir / "baselines")
        adapters = [("heldout", d.heldout_dataset, last_ckpt(d.heldout_dataset)),
                    ("control", "mean training tokens", control),
                    ("retrieval", f"{nearest} (cosine {sim:.3f})", last_ckpt(nearest))]  # fmt: skip
        adapters += [("training", n, last_ckpt(n)) for n in d.train_datasets]
        adapters += [("generated", p.name, p) for p in sorted(gen_dir.glob("adapter-*"))]
        run_eval(c.collect.model, d.prompts_dir, d.heldout_dataset, adapters, eval_dir, c.eval.split, c.eval.limit,
                 tuple(c.eval.protocols), c.eval.batch_size, overwrite=True)  # fmt: skip

    stages.run("evaluate", evaluate, done=(eval_dir / "results.json").is_file())
    stages.times.pop("total", None)
    stages.times["total"] = round(sum(stages.times.values()), 1)
    print(f"[pipeline] this run took {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    from dnd_jax.experiments.pipeline_report import write_report

    report = write_report(c, workdir, stages.times)
    return report


def control_tokens(c, path: Path) -> None:
    """The control's tokens (the pooled mean of every training checkpoint) -> `path` (.npy, atomic); the
    training datasets' token stores are prepared first if needed (as the trainer would)."""
    import numpy as np

    from dnd_jax.data.prepare import prepare_dataset
    from dnd_jax.experiments.baselines import mean_tokens

    d = c.data
    for n in d.train_datasets:
        prepare_dataset(Path(d.collection_dir) / n, Path(d.token_dir) / n, d.chunk, d.real_length, d.pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.save(f, mean_tokens(Path(d.token_dir), list(d.train_datasets), d.real_length))


def prompt_blind_baselines(c, out: Path) -> tuple[Path, tuple[str, float]]:
    """The two baselines every generated adapter is read against (dnd_jax/experiments/baselines.py):
    the prompt-blind control (the mean token tensor of all training checkpoints, detokenized, written to
    out/control) and retrieval (the training dataset whose train prompts are nearest to the held-out test
    prompts in the encoder's space).

    Returns:
      (control adapter dir, (nearest training dataset, cosine similarity)).
    """
    from dnd_jax.data.prepare import open_token_set
    from dnd_jax.experiments.baselines import mean_tokens, prompt_embeddings, retrieve, save_tokens_adapter

    d = c.data
    layout = open_token_set(Path(d.token_dir) / d.train_datasets[0]).layout
    save_tokens_adapter(mean_tokens(Path(d.token_dir), list(d.train_datasets), d.real_length), layout, out / "control")
    emb = prompt_embeddings(c, [*d.train_datasets, d.heldout_dataset])
    return out / "control", retrieve(emb, d.heldout_dataset, list(d.train_datasets))


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/demo.py, ...)", lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory; re-running resumes")
    parse_or_exit(argv if argv is not None else sys.argv)
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise DndError("both --config and --workdir are required")
    report = run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
