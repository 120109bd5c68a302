"""The many-task, task-level cross-validated DnD experiment, resumable stage by stage.

  python -m dnd_jax.experiment --config configs/many_task_smollm2.py --workdir runs/many_task_smollm2

Does a generated adapter beat what a prompt-blind method gets from the same training LoRAs? Stages
(each skips finished work, so a re-run after a kill resumes):
  data      BIG-bench tasks ($DND_JAX_BIGBENCH) + the common-sense sets linked in place
                                                              -> WORKDIR/data/dataset_info.json
  collect   one LoRA recipe, every task, one shared init     -> WORKDIR/collect/<task>/step-*/
  tokens    every task's checkpoints tokenized once           -> WORKDIR/tokens/<task>/
  folds     K folds over tasks (seeded; "family" keeps a family in one fold) -> WORKDIR/folds.json
  train     per fold, a generator on the other folds' tasks   -> WORKDIR/<variant>/fold-<i>/train/
  adapters  per fold and held-out task: generated adapters (one compile per fold), the prompt-blind
            control (mean training token tensor, detokenized) and the retrieval choice
                                                              -> WORKDIR/<variant>/fold-<i>/<task>/
  evaluate  per held-out task, the same items and protocol for base, own LoRA, control, retrieval,
            sampled training LoRAs and generated adapters     -> WORKDIR/<variant>/scores/<task>.json
  report    paired differences over tasks with bootstrap CIs, W/T/L, gap closed, figure
                                                              -> results dir given by --report_dir
The base model, own-LoRA, training-LoRA scores do not depend on the generator; they are computed
once per task and shared by every variant (WORKDIR/scores/<task>.json).
Config strings may contain "{workdir}", replaced by --workdir.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np

from dnd_jax.assets import enable_compilation_cache
from dnd_jax.config_cli import parse_or_exit
from dnd_jax.errors import DndError, run_cli
from dnd_jax.experiments.baselines import last_checkpoint_in, mean_tokens, save_tokens_adapter
from dnd_jax.experiments.data import build_data, data_ready, task_names
from dnd_jax.experiments.folds import cv_dir, prepare_folds
from dnd_jax.experiments.generation import generate_fold, generated_ok, generation_info
from dnd_jax.experiments.stages import Stages, is_trained, resolve
from dnd_jax.fileio import write_json

STAGES = ("data", "collect", "tokens", "folds", "train", "adapters", "evaluate", "report")


def fold_config(c, train_tasks: list[str], heldout: list[str], offset: Path | None, seed: int):
    """The trainer's config for one fold and generator seed: trains on `train_tasks`, monitors the first
    held-out task."""
    fc = copy.deepcopy(c)
    fc.seed = int(seed)
    fc.data.train_datasets = tuple(train_tasks)
    fc.data.heldout_dataset = heldout[0]
    fc.data.target_offset = str(offset) if offset is not None else ""
    fc.data.loss_tokens = "b" if c.experiment.predict == "b_only" else "all"
    # Residual targets start at the offset (the control) rather than at a random output.
    fc.model.zero_init_output = offset is not None
    # SFT objectives train through the collection's base model, in its chat format and cut-off.
    fc.sft.model, fc.sft.cutoff_len = c.collect.model, c.collect.cutoff_len
    return fc


def seeds_of(c) -> list[int]:
    """The generator seeds every fold is trained with (experiment.seeds; default the config's seed)."""
    seeds = [int(s) for s in c.experiment.get("seeds", ())] or [int(c.seed)]
    if len(set(seeds)) != len(seeds):
        raise DndError(f"config field experiment.seeds: {seeds} repeats a seed")
    return seeds


def seed_dir(root: Path, fold: int, seed: int) -> Path:
    return root / f"fold-{fold}" / f"seed-{seed}"


def uses_offset(e) -> bool:
    """Whether a variant reads the fold mean tokens: residual targets, or A tokens taken from the mean."""
    return e.target == "residual" or e.predict == "b_only"


def arm_fold(c, fold: dict, vdir: Path) -> dict:
    """The fold as this variant sees it: with experiment.train_tasks = k > 0 (dataset arrangements), a seeded
    subset of k of the fold's training tasks (nested: the subset for k contains the one for any smaller k),
    with its own mean tokens and prompt-blind control in vdir/fold-<i>/; otherwise the fold itself."""
    from dnd_jax.data.prepare import open_token_set

    k = c.experiment.get("train_tasks", 0)
    if not k:
        return fold
    train = fold["train"]
    if not 1 <= k <= len(train):
        raise DndError(
            f"config field experiment.train_tasks: {k} (fold {fold['fold']} has {len(train)} training tasks)"
        )
    perm = np.random.default_rng([c.experiment.fold_seed, 37, fold["fold"]]).permutation(len(train))
    sub = [train[i] for i in sorted(perm[:k])]
    fdir = vdir / f"fold-{fold['fold']}"
    if not (fdir / "control" / "adapter_config.json").is_file():
        fdir.mkdir(parents=True, exist_ok=True)
        mean = mean_tokens(Path(c.data.token_dir), sub, c.data.real_length)
        np.save(fdir / "mean_tokens.npy", mean)
        save_tokens_adapter(mean, open_token_set(Path(c.data.token_dir) / sub[0]).layout, fdir / "control")
    return {**fold, "train": sub, "mean_tokens": str(fdir / "mean_tokens.npy"), "control": str(fdir / "control")}


def fewshot_dir(c, workdir: Path) -> Path:
    return workdir / "fewshot" / f"n{c.experiment.shots}"


def collect_fewshot(c, workdir: Path, tasks: list[str]) -> None:
    """The few-shot LoRA baseline (experiment.shots = N > 0): each held-out task's LoRA collected with the
    experiment's own recipe on the first N labelled examples of its train split -> WORKDIR/fewshot/n<N>/."""
    from dnd_jax.collect import collect_tasks

    cc = copy.deepcopy(c.collect)
    cc.max_samples = c.experiment.shots
    collect_tasks(cc, tasks, fewshot_dir(c, workdir), data_dir=c.data.prompts_dir)


def check_variant(e) -> None:
    if e.target not in ("tokens", "residual") or e.predict not in ("full", "b_only"):
        raise DndError(f"config experiment.target {e.target!r} / predict {e.predict!r}: expected tokens|residual, "
                       "full|b_only")  # fmt: skip


def train_fold(c, fold: dict, tdir: Path, seed: int) -> Path:
    from dnd_jax.trainer import exit_if_stopped, train_and_evaluate

    if is_trained(tdir, c.train.steps):
        return tdir
    off = Path(fold["mean_tokens"]) if uses_offset(c.experiment) else None
    fc = fold_config(c, fold["train"], fold["heldout"], off, seed)
    exit_if_stopped(train_and_evaluate(fc, tdir), tdir)
    return tdir


def run_experiment(config, workdir: str | Path, until: str = "report", report_dir: str | Path | None = None):
    """Runs or resumes every stage up to `until`; returns the report path (or None before "report")."""
    from tqdm import tqdm

    from dnd_jax.collect import collect_tasks, is_complete
    from dnd_jax.data.prepare import check_same_init, open_token_set, prepare_dataset

    if until not in STAGES:
        raise DndError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    c = resolve(config, workdir)
    e = c.experiment
    check_variant(e)
    seeds = seeds_of(c)
    stages = Stages(workdir)
    names = task_names(c)
    stages.run("data", lambda: build_data(c), done=data_ready(c, names))
    names = task_names(c)  # without the tasks the data stage skipped (it says why)
    if until == "data":
        return None
    stages.run("collect", lambda: collect_tasks(c.collect, names, c.data.collection_dir, data_dir=c.data.prompts_dir),
               done=all(is_complete(c.data.collection_dir, n) for n in names))  # fmt: skip
    if until == "collect":
        return None

    def tokens():
        d = c.data
        outs = [prepare_dataset(Path(d.collection_dir) / n, Path(d.token_dir) / n, d.chunk, d.real_length, d.pad,
                                verbose=False) for n in tqdm(names, desc="tokens")]  # fmt: skip
        check_same_init([open_token_set(o) for o in outs], c.data.allow_mixed_init)

    stages.run("tokens", tokens, done=all((Path(c.data.token_dir) / n / "manifest.json").is_file() for n in names))
    if until == "tokens":
        return None
    cv = cv_dir(c, workdir)
    stages.run("folds", lambda: prepare_folds(c, workdir, names), done=(cv / "folds.json").is_file())
    folds = prepare_folds(c, workdir, names)
    if until == "folds":
        return None
    if e.get("run_folds", ()):  # a subset of the folds (CPU-scale ablations); the others are not run
        folds = [f for f in folds if f["fold"] in e.run_folds]
    held = [t for f in folds for t in f["heldout"]]
    vdir = cv / e.variant
    if e.get("shots", 0):
        return _run_fewshot(c, workdir, cv, vdir, folds, held, stages, until, report_dir)
    if e.get("baseline", "") == "soft_retrieval":
        return _run_soft_retrieval(c, workdir, cv, vdir, folds, held, stages, until, report_dir)
    if e.get("train_tasks", 0):
        folds = [arm_fold(c, f, vdir) for f in folds]
    troot = cv / (e.train_variant or e.variant)
    tdirs = {(f["fold"], s): seed_dir(troot, f["fold"], s) / "train" for f in folds for s in seeds}

    def trained():
        return all(is_trained(t, c.train.steps) for t in tdirs.values())

    if e.train_variant and not trained():
        raise DndError(f"config experiment.train_variant {e.train_variant!r}: its generators are not trained yet")
    stages.run(f"train/{e.variant}", lambda: [train_fold(c, f, tdirs[f["fold"], s], s) for f in folds for s in seeds],
               done=trained())  # fmt: skip
    if until == "train":
        return None

    def gen_root(f, s):
        return seed_dir(vdir, f["fold"], s) / "generated"

    def adapters():
        path = vdir / "generation.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        for f in folds:
            for s in seeds:
                # A generator trained on absolute tokens takes no offset, except for its A tokens (b_only).
                a_from = Path(f["mean_tokens"]) if e.predict == "b_only" else None
                got = generate_fold(tdirs[f["fold"], s], f["heldout"], c, gen_root(f, s), a_from)
                if got is not None:
                    info[f"{f['fold']}/{s}"] = got
                    write_json(path, info)

    want = generation_info(c)
    gen_done = all(generated_ok(gen_root(f, s) / t, want) for f in folds for s in seeds for t in f["heldout"])
    stages.run(f"adapters/{e.variant}", adapters, done=gen_done)
    if until == "adapters":
        return None

    def evaluate():
        extra = {f["fold"]: {"control": Path(f["control"])} for f in folds if "control" in f}  # arrangements

        def generated(t, f):
            made = {str(s): sorted((gen_root(f, s) / t).glob("adapter-*")) for s in seeds}
            swapped = {str(s): sorted((gen_root(f, s) / t / "swapped").glob("adapter-*")) for s in seeds}
            return dict(adapters=made, extra=extra.get(f["fold"]),
                        swapped=swapped if e.get("prompt_swap", False) else None)  # fmt: skip

        evaluate_stage(c, cv, vdir, folds, held, generated, seeds)

    stages.run(f"evaluate/{e.variant}", evaluate, done=evaluated(c, cv, vdir, folds, held, seeds))
    if until == "evaluate":
        return None
    return _report(c, workdir, cv, held, stages, report_dir)


def evaluated(c, cv: Path, vdir: Path, folds: list[dict], held: list[str], seeds: list) -> bool:
    from dnd_jax.experiments.scoring import shared_settings, up_to_date, variant_settings

    plans = {t: f["plans"][t] for f in folds for t in f["heldout"]}
    vs = variant_settings(c, seeds)
    return all(up_to_date(cv / "scores" / f"{t}.json", shared_settings(c, plans[t]))
               and up_to_date(vdir / "scores" / f"{t}.json", vs) for t in held)  # fmt: skip


def evaluate_stage(c, cv: Path, vdir: Path, folds: list[dict], held: list[str], generated, seeds: list) -> None:
    """Scores the shared rows (once per task, for every variant) and this variant's adapters of each held-out
    task; `generated(task, fold)` gives score_generated's adapters / extra keywords. Score files made under
    other settings (items, protocols, seeds, steps, ...) are scored again."""
    from tqdm import tqdm

    from dnd_jax.evaluate import Scorer
    from dnd_jax.experiments.scoring import score_generated, score_shared, shared_settings, up_to_date, variant_settings

    vs = variant_settings(c, seeds)
    fold_of = {t: f for f in folds for t in f["heldout"]}
    todo = [t for t in held if not evaluated(c, cv, vdir, [fold_of[t]], [t], seeds)]
    if not todo:
        return
    scorer = Scorer(c.collect.model, batch_size=c.eval.batch_size, cutoff_len=c.collect.cutoff_len)
    for t in tqdm(todo, desc="evaluate tasks", unit="task", dynamic_ncols=True):
        f = fold_of[t]
        plan = f["plans"][t]
        if not up_to_date(cv / "scores" / f"{t}.json", shared_settings(c, plan)):
            score_shared(scorer, c, t, plan, cv / "scores" / f"{t}.json")
        if not up_to_date(vdir / "scores" / f"{t}.json", vs):
            score_generated(scorer, c, t, plan, dest=vdir / "scores" / f"{t}.json", settings=vs, **generated(t, f))


def _run_fewshot(c, workdir, cv, vdir, folds, held, stages, until, report_dir):
    """The few-shot LoRA baseline arm: collect on N labelled examples per held-out task, score like an adapter."""
    from dnd_jax.collect import is_complete

    root = fewshot_dir(c, workdir)
    stages.run(f"train/{c.experiment.variant}", lambda: collect_fewshot(c, workdir, held),
               done=all(is_complete(root, t) for t in held))  # fmt: skip
    if until in ("train", "adapters"):
        return None
    seeds = ["collected"]

    def generated(t, f):
        return dict(adapters={"collected": [last_checkpoint_in(root, t)]})

    stages.run(f"evaluate/{c.experiment.variant}",
               lambda: evaluate_stage(c, cv, vdir, folds, held, generated, seeds),
               done=evaluated(c, cv, vdir, folds, held, seeds))  # fmt: skip
    if until == "evaluate":
        return None
    return _report(c, workdir, cv, held, stages, report_dir)


def _run_soft_retrieval(c, workdir, cv, vdir, folds, held, stages, until, report_dir):
    """The soft-retrieval baseline arm: per fold, tau by cross-validation inside the training tasks; per held-out
    task, the softmax(cos / tau)-weighted mean of the training tasks' mean tokens, detokenized; scored as an adapter."""
    from dnd_jax.data.prepare import open_token_set
    from dnd_jax.experiments.baselines import choose_tau, load_embeddings, soft_weights

    e, info_path = c.experiment, vdir / "soft_retrieval.json"

    def build():
        names = sorted({t for f in folds for t in (*f["train"], *f["heldout"])})
        emb = load_embeddings(workdir / "embeddings.npz", names)
        token_dir = Path(c.data.token_dir)
        layout = open_token_set(token_dir / names[0], c.data.real_length).layout
        means = {t: mean_tokens(token_dir, [t], c.data.real_length) for t in names}
        info = {}
        for f in folds:
            tau, err = choose_tau(emb, f["train"], means, e.soft_taus)
            for t in f["heldout"]:
                w = soft_weights(emb, t, f["train"], tau)
                tokens = sum(wi * means[u] for wi, u in zip(w, f["train"], strict=True)).astype(np.float32)
                save_tokens_adapter(tokens, layout, seed_dir(vdir, f["fold"], 0) / "generated" / t / "adapter-0")
                top = sorted(zip(w.tolist(), f["train"], strict=True), reverse=True)[:3]
                info[t] = {"fold": f["fold"], "tau": tau, "cv_error": err, "top": [[u, wi] for wi, u in top]}
        write_json(info_path, info)

    stages.run(f"adapters/{e.variant}", build, done=info_path.is_file())
    if until in ("train", "adapters"):
        return None
    seeds = ["soft"]

    def generated(t, f):
        return dict(adapters={"soft": [seed_dir(vdir, f["fold"], 0) / "generated" / t / "adapter-0"]})

    stages.run(f"evaluate/{e.variant}", lambda: evaluate_stage(c, cv, vdir, folds, held, generated, seeds),
               done=evaluated(c, cv, vdir, folds, held, seeds))  # fmt: skip
    if until == "evaluate":
        return None
    return _report(c, workdir, cv, held, stages, report_dir)


def _report(c, workdir, cv, held, stages, report_dir):
    from dnd_jax.experiments.report import write_report

    return write_report(c, workdir, cv, held, Path(report_dir) if report_dir else workdir, stages.times)


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/many_task_smollm2.py)",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory; re-running resumes")
    flags.DEFINE_enum("until", "report", list(STAGES), "stop after this stage")
    flags.DEFINE_string("report_dir", None, "where report.md and the figure go (default: WORKDIR)")
    parse_or_exit(argv if argv is not None else sys.argv)
    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        raise DndError("both --config and --workdir are required")
    enable_compilation_cache()  # every fold and seed trains the same programs
    report = run_experiment(f.config, f.workdir, f.until, f.report_dir)
    if report is not None:
        print(Path(report).read_text())
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
