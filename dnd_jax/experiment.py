"""Entry point: the many-task, task-level cross-validated DnD experiment, resumable stage by stage.

  python -m dnd_jax.experiment --config configs/many_task_smollm2.py --workdir runs/many_task_smollm2

Does a generated adapter beat what a prompt-blind method gets from the same training LoRAs? Stages
(each skips finished work, so a re-run after a kill resumes):
  data      BIG-bench tasks from the PyPI sdist + the common-sense sets linked in place
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
                                                              -> results dir given by --report-dir
The base model, own-LoRA, training-LoRA scores do not depend on the generator; they are computed
once per task and shared by every variant (WORKDIR/scores/<task>.json).
Config strings may contain "{workdir}", replaced by --workdir.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from dnd_jax.config_cli import parse_or_exit
from dnd_jax.errors import DndError, run_cli

STAGES = ("data", "collect", "tokens", "folds", "train", "adapters", "evaluate", "report")


# ----------------------------------------------------------------------------------------------- data
def link_datasets(data_dir: Path, src_dir: Path, names: list[str]) -> None:
    """Registers `<name>_train` / `<name>_test` of `src_dir` in `data_dir`'s registry by absolute path (no copy)."""
    from dnd_jax.data.prompts import read_registry
    from dnd_jax.fileio import atomic_file

    src = read_registry(src_dir)
    reg_path = data_dir / "dataset_info.json"
    reg = read_registry(data_dir) if reg_path.is_file() else {}
    for name in names:
        for split in ("train", "test"):
            key = f"{name}_{split}"
            if key not in src:
                raise DndError(f"{src_dir / 'dataset_info.json'}: no dataset {key!r}")
            entry = dict(src[key])
            entry["file_name"] = str((src_dir / entry["file_name"]).absolute())
            reg[key] = entry
    data_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(reg_path, "w") as f:
        json.dump(reg, f, indent=1)


def task_names(c) -> list[str]:
    """The experiment's tasks (registry names) in config order; common-sense ones only if their dir exists."""
    from dnd_jax.data.bigbench import task_name

    e = c.experiment
    names = [task_name(t) for t in e.bigbench_tasks]
    if e.commonsense_tasks and Path(e.commonsense_dir).is_dir():
        names += list(e.commonsense_tasks)
    if len(names) < 2 * e.folds:
        raise DndError(f"config experiment: {len(names)} tasks, too few for {e.folds} folds (need >= 2 per fold)")
    return names


def build_data(c) -> None:
    from dnd_jax.data import bigbench

    e, out = c.experiment, Path(c.data.prompts_dir)
    if e.bigbench_tasks:
        bigbench.build(out, list(e.bigbench_tasks), e.test_size, c.seed, e.max_train, e.max_choices)
    if e.commonsense_tasks and Path(e.commonsense_dir).is_dir():
        link_datasets(out, Path(e.commonsense_dir), list(e.commonsense_tasks))


def data_ready(c, names: list[str]) -> bool:
    reg = Path(c.data.prompts_dir) / "dataset_info.json"
    return reg.is_file() and all(f"{n}_test" in json.loads(reg.read_text()) for n in names)


# ------------------------------------------------------------------------------------------ folds
def families(c) -> dict[str, str]:
    """{task: family} from config experiment.families ("task=family" strings; BIG-bench names as in data)."""
    from dnd_jax.data.bigbench import task_name

    out = {}
    for item in c.experiment.families:
        task, sep, fam = item.partition("=")
        if not sep:
            raise DndError(f"config field experiment.families: {item!r} is not 'task=family'")
        out[task_name(task)] = fam
    return out


def assign_folds(names: list[str], k: int, seed: int, split: str = "random",
                 family: dict[str, str] | None = None) -> list[list[str]]:  # fmt: skip
    """K folds over tasks: every task in exactly one fold, fold sizes differ by at most one (random) or
    whole families per fold, largest family first into the smallest fold (family).

    Args:
      names: the tasks.
      k: number of folds.
      seed: seed of the assignment.
      split: "random" or "family".
      family: {task: family} for split "family" (a task without one is its own family).

    Returns:
      k lists of tasks, each in the order of `names`.
    """
    if not 2 <= k <= len(names):
        raise DndError(f"config field experiment.folds: {k} folds need 2..{len(names)} tasks per fold count")
    rng = np.random.default_rng([seed, 17])
    if split == "random":
        perm = rng.permutation(len(names))
        fold_of = {names[j]: pos % k for pos, j in enumerate(perm)}
    elif split == "family":
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault((family or {}).get(n, n), []).append(n)
        keys = sorted(groups, key=lambda g: (-len(groups[g]), rng.random()))
        sizes, fold_of = [0] * k, {}
        for g in keys:
            f = int(np.argmin(sizes))
            sizes[f] += len(groups[g])
            fold_of.update({n: f for n in groups[g]})
    else:
        raise DndError(f"config field experiment.split: {split!r} (expected 'random' or 'family')")
    return [[n for n in names if fold_of[n] == f] for f in range(k)]


def fold_config(c, train_tasks: list[str], heldout: list[str], offset: Path | None):
    """The trainer's config for one fold: trains on `train_tasks`, monitors the first held-out task."""
    fc = copy.deepcopy(c)
    fc.data.train_datasets = tuple(train_tasks)
    fc.data.heldout_dataset = heldout[0]
    fc.data.target_offset = str(offset) if offset is not None else ""
    fc.data.loss_tokens = "b" if c.experiment.predict == "b_only" else "all"
    # Residual targets start at the offset (the control) rather than at a random output.
    fc.model.zero_init_output = offset is not None
    return fc


# ------------------------------------------------------------------------------------- baselines
def mean_tokens(token_dir: Path, tasks: list[str], real_length: int) -> np.ndarray:
    """Mean token tensor over every checkpoint of `tasks` (each task weighs by its checkpoint count)."""
    from dnd_jax.data.prepare import open_token_set

    total, n = None, 0
    for t in tasks:
        s = open_token_set(token_dir / t, real_length)
        part = np.asarray(s.tokens, np.float64).sum(0)
        total = part if total is None else total + part
        n += s.tokens.shape[0]
    return (total / n).astype(np.float32)


def save_tokens_adapter(tokens_trk: np.ndarray, layout, out: Path) -> None:
    """Detokenizes one token tensor into a PEFT adapter directory (written atomically)."""
    from converters.jax_to_peft import save_peft_adapter
    from dnd_jax import lora_tokens

    save_peft_adapter(lora_tokens.detokenize(tokens_trk, layout), layout.spec, out, dtype=layout.spec.dtype,
                      overwrite=True)  # fmt: skip


def prompt_embeddings(c, names: list[str], n: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"train": e, "test": e}}: the mean of the encoder's normalised mean-pooled embeddings of the
    first `n` prompts of each split (the space the generator's conditions come from)."""
    import jax.numpy as jnp

    from dnd_jax.data.prompts import load_split
    from dnd_jax.extractors import load_extractor
    from dnd_jax.models.encoder import mean_pool, tokenize_prompts

    enc, tok = load_extractor(c.encoder, dtype=jnp.float32)
    out = {}
    for name in names:
        out[name] = {}
        for split in ("train", "test"):
            prompts = [r["prompt"] for r in load_split(c.data.prompts_dir, f"{name}_{split}", False)[:n]]
            ids, mask = tokenize_prompts(tok, prompts, c.data.max_text_length)
            hidden = enc(jnp.asarray(ids)[None], jnp.asarray(mask)[None])[0]
            e = np.asarray(mean_pool(hidden, jnp.asarray(mask)), np.float64).mean(0)
            out[name][split] = e / np.linalg.norm(e)
    return out


def retrieve(emb: dict, heldout: str, train_tasks: list[str]) -> tuple[str, float]:
    """The training task whose train prompts are nearest (cosine) to the held-out task's test prompts."""
    sims = {t: float(emb[heldout]["test"] @ emb[t]["train"]) for t in train_tasks}
    best = max(sims, key=sims.get)
    return best, sims[best]


def last_checkpoint(c, task: str) -> Path:
    return last_checkpoint_in(Path(c.data.collection_dir), task)


def last_checkpoint_in(root: Path, task: str) -> Path:
    steps = sorted((root / task).glob("step-*"))
    if not steps:
        raise DndError(f"{root / task}: no checkpoints")
    return steps[-1]


def training_sample(c, heldout: str, train_tasks: list[str]) -> list[str]:
    """A seeded sample of the fold's training tasks, fixed per held-out task."""
    k = min(c.experiment.training_sample, len(train_tasks))
    rng = np.random.default_rng([c.seed, 23, sum(heldout.encode())])
    return [train_tasks[i] for i in sorted(rng.choice(len(train_tasks), size=k, replace=False))]


# ------------------------------------------------------------------------------------ generation
def generate_fold(train_dir: Path, heldout: list[str], c, out_root: Path, offset_path: Path | None,
                  a_from_offset: bool = False) -> dict:  # fmt: skip
    """Adapters for every held-out task of a fold from its test prompts: one load and one compile.

    With `a_from_offset` the A tokens are the offset's (the fold mean: the shared init, which A barely
    leaves) whatever the generator outputs for them, also for a generator trained on every token.

    Returns:
      {"seconds_per_adapter": ..., "compile_s": ...} (compile excluded from the former).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from converters.jax_to_peft import save_peft_adapter, select_row
    from dnd_jax.data import pairs
    from dnd_jax.data.prepare import open_token_set
    from dnd_jax.data.prompts import condition_texts, load_split, needs_answers
    from dnd_jax.extractors import load_extractor
    from dnd_jax.fileio import atomic_dir
    from dnd_jax.generate import load_run, make_generate_fn

    config, graphdef, params, step = load_run(train_dir)
    if a_from_offset:
        config.data.loss_tokens = "b"
    template = open_token_set(Path(c.data.token_dir) / config.data.train_datasets[0])
    encoder, tok = load_extractor(config.encoder)
    enc_graphdef, enc_state = nnx.split(encoder)
    residual = bool(config.data.get("target_offset", ""))  # how the generator was trained
    if a_from_offset and offset_path is None:
        raise DndError("A tokens from the fold mean need its mean tokens (folds.json mean_tokens)")
    fn = make_generate_fn(config, graphdef, enc_graphdef, template.layout, residual=residual)
    offset = None if offset_path is None else jnp.asarray(np.load(offset_path))
    k, times, compile_s = c.experiment.num_adapters, [], None
    for task in heldout:
        dest = out_root / task
        if (dest / "generation.json").is_file():
            continue
        form = config.data.get("condition", "prompts")
        recs = load_split(c.data.prompts_dir, f"{task}_{c.generate.split}", needs_answers(form))
        texts = condition_texts(recs, form, c.seed, task)
        pool = pairs.tokenize_pool(tok, task, texts, config.data.max_text_length)
        rng = np.random.default_rng([c.seed, 7])
        ids, masks = zip(*[pairs.prompt_batch(pool, config.data.num_texts, rng) for _ in range(k)], strict=True)
        args = (params, enc_state, jnp.asarray(np.stack(ids)), jnp.asarray(np.stack(masks)), offset)
        t0 = time.perf_counter()
        lora = jax.block_until_ready(fn(*args))
        if compile_s is None:
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            lora = jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) / k)
        lora = jax.device_get(lora)
        spec = template.layout.spec
        with atomic_dir(dest, overwrite=True) as tmp:
            for i in range(k):
                save_peft_adapter(select_row(lora, i), spec, tmp / f"adapter-{i}", dtype=spec.dtype)
            (tmp / "generation.json").write_text(json.dumps({"step": step, "seconds_per_adapter": times[-1]}) + "\n")
    return {"seconds_per_adapter": float(np.median(times)) if times else None, "compile_s": compile_s}


# ------------------------------------------------------------------------------------------ scoring
def score_adapter(scorer, path: Path | None, records: list[dict], c, secondary: bool = True) -> dict:
    """Primary (nll) on the first experiment.limit items, secondary protocols on the first secondary_limit
    (every row but the sampled training LoRAs, whose row is the primary metric's only: CPU time)."""
    e = c.experiment
    out = scorer.score(path, records[: e.limit], ("nll",))
    if e.secondary and secondary:
        out.update(scorer.score(path, records[: e.secondary_limit], tuple(e.secondary)))
    return out


def write_json(path: Path, obj) -> None:
    from dnd_jax.fileio import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1)


def score_shared(scorer, c, task: str, plan: dict, dest: Path) -> None:
    """Base, own LoRA, control, retrieval and sampled training LoRAs of one held-out task -> dest (atomic)."""
    from dnd_jax.data.prompts import load_split

    recs = load_split(c.data.prompts_dir, f"{task}_{c.eval.split}")
    res = {"task": task, "fold": plan["fold"], "items": min(c.experiment.limit, len(recs)),
           "base": score_adapter(scorer, None, recs, c),
           "own": score_adapter(scorer, last_checkpoint(c, task), recs, c),
           "control": score_adapter(scorer, Path(plan["control"]), recs, c),
           "retrieval": {"task": plan["retrieval"], "similarity": plan["similarity"],
                         **score_adapter(scorer, last_checkpoint(c, plan["retrieval"]), recs, c)},
           "training": [{"task": t, **score_adapter(scorer, last_checkpoint(c, t), recs, c, secondary=False)}
                        for t in plan["training"]]}  # fmt: skip
    write_json(dest, res)


def score_generated(scorer, c, task: str, gen_dir: Path, dest: Path, adapters: list[Path] | None = None,
                    extra: dict | None = None) -> None:  # fmt: skip
    """Scores a variant's adapters of one task (default: gen_dir/adapter-*) and `extra` {row: adapter dir}."""
    from dnd_jax.data.prompts import load_split

    recs = load_split(c.data.prompts_dir, f"{task}_{c.eval.split}")
    adapters = sorted(gen_dir.glob("adapter-*")) if adapters is None else adapters
    if not adapters:
        raise DndError(f"{gen_dir}: no generated adapters")
    res = {"task": task, "generated": [score_adapter(scorer, a, recs, c) for a in adapters]}
    res.update({row: score_adapter(scorer, a, recs, c) for row, a in (extra or {}).items()})
    write_json(dest, res)


# --------------------------------------------------------------------------------------- statistics
def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int, stat=np.mean) -> tuple[float, float]:
    """95 % percentile bootstrap CI of `stat` over the first axis (tasks)."""
    rng = np.random.default_rng([seed, 31])
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    boots = np.array([stat(values[i]) for i in idx])
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def paired(better: np.ndarray, worse: np.ndarray, n_boot: int, seed: int, tie: float) -> dict:
    """Per-task paired difference worse - better of a lower-is-better metric: > 0 means `better` wins.

    Returns:
      mean difference, its 95 % bootstrap CI over tasks, wins / ties / losses (|d| <= tie is a tie), n.
    """
    d = np.asarray(worse, np.float64) - np.asarray(better, np.float64)
    lo, hi = bootstrap_ci(d, n_boot, seed)
    return {"mean": float(d.mean()), "ci": [lo, hi], "wins": int((d > tie).sum()), "ties": int((abs(d) <= tie).sum()),
            "losses": int((d < -tie).sum()), "n": len(d)}  # fmt: skip


def gap_closed(control: np.ndarray, generated: np.ndarray, own: np.ndarray, n_boot: int, seed: int) -> dict:
    """Fraction of the control -> own-LoRA gap that the generated adapters close (ratio of means over
    tasks; 0 = no better than the control, 1 = as good as the task's own LoRA), with a bootstrap CI."""
    v = np.stack([control, generated, own], 1).astype(np.float64)

    def ratio(x):
        gap = x[:, 0].mean() - x[:, 2].mean()
        return (x[:, 0].mean() - x[:, 1].mean()) / gap if gap > 0 else np.nan

    lo, hi = bootstrap_ci(v, n_boot, seed, ratio)
    return {"fraction": float(ratio(v)), "ci": [lo, hi]}


# ------------------------------------------------------------------------------------------ driver
def cv_dir(c, workdir: Path) -> Path:
    e = c.experiment
    return workdir / f"cv-{e.split}-k{e.folds}-s{e.fold_seed}"


def prepare_folds(c, workdir: Path, names: list[str]) -> list[dict]:
    """Folds, per fold the control adapter and mean tokens, per held-out task the retrieval choice and the
    training-LoRA sample: WORKDIR/cv-*/folds.json (made once; later runs read it)."""
    from dnd_jax.data.prepare import open_token_set

    cv = cv_dir(c, workdir)
    path = cv / "folds.json"
    if path.is_file():
        return json.loads(path.read_text())["folds"]
    e = c.experiment
    folds = assign_folds(names, e.folds, e.fold_seed, e.split, families(c))
    emb_path = workdir / "embeddings.npz"
    if not emb_path.is_file():
        emb = prompt_embeddings(c, names)
        with open(emb_path.with_suffix(".tmp.npz"), "wb") as f:
            np.savez(f, **{f"{n}|{sp}": v for n, d in emb.items() for sp, v in d.items()})
        emb_path.with_suffix(".tmp.npz").rename(emb_path)
    raw = np.load(emb_path)
    emb = {n: {sp: raw[f"{n}|{sp}"] for sp in ("train", "test")} for n in names}
    layout = open_token_set(Path(c.data.token_dir) / names[0]).layout
    out = []
    for f, held in enumerate(folds):
        train = [n for n in names if n not in held]
        fdir = cv / f"fold-{f}"
        fdir.mkdir(parents=True, exist_ok=True)
        mean = mean_tokens(Path(c.data.token_dir), train, c.data.real_length)
        np.save(fdir / "mean_tokens.npy", mean)
        save_tokens_adapter(mean, layout, fdir / "control")
        plans = {}
        for t in held:
            best, sim = retrieve(emb, t, train)
            plans[t] = {"fold": f, "control": str(fdir / "control"), "retrieval": best, "similarity": sim,
                        "training": training_sample(c, t, train)}  # fmt: skip
        out.append({"fold": f, "heldout": held, "train": train, "mean_tokens": str(fdir / "mean_tokens.npy"),
                    "plans": plans})  # fmt: skip
    write_json(path, {"split": e.split, "k": e.folds, "seed": e.fold_seed, "folds": out})
    return out


def is_trained(tdir: Path, steps: int) -> bool:
    """Whether a generator workdir holds its final checkpoint."""
    from dnd_jax.checkpointing import Checkpointer

    return (tdir / "checkpoints").is_dir() and Checkpointer(tdir / "checkpoints").latest_step() == steps


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


def train_fold(c, fold: dict, vdir: Path) -> Path:
    from dnd_jax.trainer import exit_if_stopped, train_and_evaluate

    e = c.experiment
    if e.target not in ("tokens", "residual") or e.predict not in ("full", "b_only"):
        raise DndError(f"config experiment.target {e.target!r} / predict {e.predict!r}: expected tokens|residual, "
                       "full|b_only")  # fmt: skip
    tdir = vdir / f"fold-{fold['fold']}" / "train"
    if is_trained(tdir, c.train.steps):
        return tdir
    fc = fold_config(c, fold["train"], fold["heldout"], Path(fold["mean_tokens"]) if uses_offset(e) else None)
    exit_if_stopped(train_and_evaluate(fc, tdir), tdir)
    return tdir


def run_experiment(config, workdir: str | Path, until: str = "report", report_dir: str | Path | None = None):
    """Runs or resumes every stage up to `until`; returns the report path (or None before "report")."""
    from tqdm import tqdm

    from dnd_jax.collect import collect_tasks, is_complete
    from dnd_jax.data.prepare import check_same_init, open_token_set, prepare_dataset
    from dnd_jax.pipeline import Stages, _resolve

    if until not in STAGES:
        raise DndError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    c = _resolve(config, workdir)
    e = c.experiment
    stages = Stages(workdir)
    names = task_names(c)
    stages.run("data", lambda: build_data(c), done=data_ready(c, names))
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
    if e.get("train_tasks", 0):
        folds = [arm_fold(c, f, vdir) for f in folds]
    tdirs = [cv / (e.train_variant or e.variant) / f"fold-{f['fold']}" / "train" for f in folds]

    def trained(tdir):
        return is_trained(tdir, c.train.steps)

    if e.train_variant and not all(trained(t) for t in tdirs):
        raise DndError(f"config experiment.train_variant {e.train_variant!r}: its generators are not trained yet")
    stages.run(f"train/{e.variant}", lambda: [train_fold(c, f, vdir) for f in folds],
               done=all(trained(t) for t in tdirs))  # fmt: skip
    if until == "train":
        return None

    def adapters():
        info = {}
        for f, tdir in zip(folds, tdirs, strict=True):
            off = Path(f["mean_tokens"]) if uses_offset(e) else None
            # A generator trained on absolute tokens takes no offset, except for its A tokens (b_only).
            info[f["fold"]] = generate_fold(tdir, f["heldout"], c, vdir / f"fold-{f['fold']}" / "generated", off,
                                            a_from_offset=e.predict == "b_only")  # fmt: skip
        prev = json.loads((vdir / "generation.json").read_text()) if (vdir / "generation.json").is_file() else {}
        write_json(vdir / "generation.json", {**prev, **{str(k): v for k, v in info.items() if v["compile_s"]}})

    gen_done = all((vdir / f"fold-{f['fold']}" / "generated" / t / "generation.json").is_file()
                   for f in folds for t in f["heldout"])  # fmt: skip
    stages.run(f"adapters/{e.variant}", adapters, done=gen_done)
    if until == "adapters":
        return None

    def evaluate():
        extra = {f["fold"]: {"control": Path(f["control"])} for f in folds if "control" in f}  # arrangements

        def generated(t, f):
            gdir = vdir / f"fold-{f['fold']}" / "generated" / t
            return dict(gen_dir=gdir, extra=extra.get(f["fold"]))

        evaluate_stage(c, cv, vdir, folds, held, generated)

    stages.run(f"evaluate/{e.variant}", evaluate, done=evaluated(cv, vdir, held))
    if until == "evaluate":
        return None
    return _report(c, workdir, cv, held, stages, report_dir)


def evaluated(cv: Path, vdir: Path, held: list[str]) -> bool:
    return all((cv / "scores" / f"{t}.json").is_file() and (vdir / "scores" / f"{t}.json").is_file() for t in held)


def evaluate_stage(c, cv: Path, vdir: Path, folds: list[dict], held: list[str], generated) -> None:
    """Scores the shared rows (once per task, for every variant) and this variant's adapters of each held-out
    task; `generated(task, fold)` gives score_generated's gen_dir / adapters / extra keywords."""
    from tqdm import tqdm

    from dnd_jax.evaluate import Scorer

    todo = [t for t in held if not evaluated(cv, vdir, [t])]
    if not todo:
        return
    fold_of = {t: f for f in folds for t in f["heldout"]}
    scorer = Scorer(c.collect.model, batch_size=c.eval.batch_size, cutoff_len=c.collect.cutoff_len)
    for t in tqdm(todo, desc="evaluate tasks", unit="task", dynamic_ncols=True):
        f = fold_of[t]
        if not (cv / "scores" / f"{t}.json").is_file():
            score_shared(scorer, c, t, f["plans"][t], cv / "scores" / f"{t}.json")
        if not (vdir / "scores" / f"{t}.json").is_file():
            score_generated(scorer, c, t, dest=vdir / "scores" / f"{t}.json", **generated(t, f))


def _run_fewshot(c, workdir, cv, vdir, folds, held, stages, until, report_dir):
    """The few-shot LoRA baseline arm: collect on N labelled examples per held-out task, score like an adapter."""
    from dnd_jax.collect import is_complete

    root = fewshot_dir(c, workdir)
    stages.run(f"train/{c.experiment.variant}", lambda: collect_fewshot(c, workdir, held),
               done=all(is_complete(root, t) for t in held))  # fmt: skip
    if until in ("train", "adapters"):
        return None

    def generated(t, f):
        return dict(gen_dir=root / t, adapters=[last_checkpoint_in(root, t)])

    stages.run(f"evaluate/{c.experiment.variant}", lambda: evaluate_stage(c, cv, vdir, folds, held, generated),
               done=evaluated(cv, vdir, held))  # fmt: skip
    if until == "evaluate":
        return None
    return _report(c, workdir, cv, held, stages, report_dir)


def _report(c, workdir, cv, held, stages, report_dir):
    from dnd_jax.experiment_report import write_report

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
    report = run_experiment(f.config, f.workdir, f.until, f.report_dir)
    if report is not None:
        print(Path(report).read_text())
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
