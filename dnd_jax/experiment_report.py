"""The many-task experiment's report: per-task scores -> paired statistics over tasks, a figure, report.md.

Every number is read from the run's own files (WORKDIR/cv-*/scores, <variant>/scores, folds.json,
generation.json, the collection manifests); nothing is typed in. The primary metric is the mean NLL per
gold-response token (lower is better); a comparison "generated vs X" is the per-task difference
X - generated, so a positive mean favours the generated adapters.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from dnd_jax.experiment import gap_closed, paired

TIE = 0.01  # |difference| <= 0.01 nats per token counts as a tie in wins / ties / losses
ROWS = ("base", "control", "retrieval", "training", "own")
LABELS = {"base": "base model", "control": "prompt-blind control (mean training tokens)",
          "retrieval": "retrieval (LoRA of the nearest training task)", "training": "training LoRAs (sample mean)",
          "own": "the task's own LoRA (upper reference)"}  # fmt: skip


def _metric(entry: dict, proto: str, name: str) -> float:
    return float(entry[proto][name])


def collect_scores(cv: Path, names: list[str]) -> tuple[dict, dict]:
    """({row: {task: scores dict}}, {variant: {task: [generated scores]}}) for tasks with all files."""
    shared = {t: json.loads((cv / "scores" / f"{t}.json").read_text()) for t in names}
    variants = {}
    for vd in sorted(p for p in cv.iterdir() if (p / "scores").is_dir()):
        got = {t: json.loads((vd / "scores" / f"{t}.json").read_text())["generated"]
               for t in names if (vd / "scores" / f"{t}.json").is_file()}  # fmt: skip
        if len(got) == len(names):
            variants[vd.name] = got
    return shared, variants


def table(shared: dict, variants: dict, names: list[str], proto: str, name: str, skip=()) -> dict[str, np.ndarray]:
    """{row: [per-task value]} of one metric; training and generated rows are means over their adapters."""
    rows = {r: [] for r in ROWS if r not in skip}
    for t in names:
        s = shared[t]
        for r in rows:
            if r == "training":
                rows[r].append(np.mean([_metric(x, proto, name) for x in s["training"]]))
            else:
                rows[r].append(_metric(s[r], proto, name))
    out = {r: np.asarray(v) for r, v in rows.items()}
    for v, per in variants.items():
        out[f"generated:{v}"] = np.asarray([np.mean([_metric(x, proto, name) for x in per[t]]) for t in names])
    return out


def collection_seconds(collection_dir: Path, names: list[str]) -> tuple[list[float], str]:
    """Wall time of each task's collection and how it was measured: the manifests' own figure (training
    time, model load excluded) when recorded, else the gaps between consecutive completions of a
    sequential collection (model load included; the first task has no gap)."""
    mans = {n: collection_dir / n / "manifest.json" for n in names}
    mans = {n: m for n, m in mans.items() if m.is_file()}
    secs = [json.loads(m.read_text()).get("seconds") for m in mans.values()]
    if secs and all(secs):
        return [float(x) for x in secs], "training time recorded in each manifest, model load excluded"
    ends = sorted(m.stat().st_mtime for m in mans.values())
    return list(np.diff(ends)), "gaps between consecutive task completions, model load included"


def plot(vals: dict, variants: list[str], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(len(variants), 2, figsize=(9, 4.2 * len(variants)), squeeze=False)
    for row, v in enumerate(variants):
        g = vals[f"generated:{v}"]
        for ax, ref in zip(axes[row], ("control", "retrieval"), strict=True):
            x = vals[ref]
            ax.scatter(x, g, s=14, c=["tab:green" if gi < xi else "tab:red" for gi, xi in zip(g, x, strict=True)])
            lo, hi = min(x.min(), g.min()) * 0.9, max(x.max(), g.max()) * 1.1
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # major ticks only: minor log labels overlap
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{ref} NLL per response token")
            ax.set_ylabel(f"generated ({v}) NLL")
            wins = int((g < x).sum())
            ax.set_title(f"{v} vs {ref}: below the line = generated better ({wins}/{len(names)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _variant_desc(cv: Path, v: str) -> str:
    """How a variant's generators were trained, from its fold-0 training config (or whose it reuses)."""
    own = cv / v / "fold-0" / "train" / "config.json"
    if v.startswith("fewshot-"):
        return f"{v} (not generated: LoRAs collected on {v.split('-', 1)[1]} labelled examples of each held-out task)"
    if not own.is_file():
        return f"{v} (reuses another variant's generators; A tokens from the fold mean)"
    tc = json.loads(own.read_text())
    d = tc["data"]
    target = "residual from the fold mean" if d.get("target_offset") else "absolute tokens"
    loss = "B^T tokens only" if d.get("loss_tokens") == "b" else "all tokens"
    return f"{v} ({tc['train']['steps']} steps, {target}, loss on {loss})"


def _label(row: str) -> str:
    return LABELS.get(row) or f"generated ({row.split(':', 1)[1]})"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt_ci(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} [{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]"


def write_report(c, workdir: Path, cv: Path, names: list[str], out_dir: Path, times: dict) -> Path:
    """Writes out_dir/report.md, out_dir/many_task.png and out_dir/scores.csv; returns the report path."""
    from dnd_jax.config_cli import versions
    from dnd_jax.fileio import atomic_file
    from dnd_jax.models.hyperconv import count_params
    from dnd_jax.trainer import generator_config

    e = c.experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = json.loads((cv / "folds.json").read_text())["folds"]
    shared, variants = collect_scores(cv, names)
    vnames = list(variants)
    nll = table(shared, variants, names, "nll", "nll")
    nb, seed = e.bootstrap, c.seed
    L = [f"# Many-task DnD, task-level {e.folds}-fold cross-validation ({len(names)} tasks)\n",
         f"Produced by `python -m dnd_jax.experiment --config {c.pipeline.config_name} --workdir "
         f"{_rel(workdir)}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores); "
         f"{versions()}. Every number below is read from that run's files.\n",
         "Primary metric (fixed in the config before any run): mean NLL per gold-response token on the first "
         f"{e.limit} test items of each task, in the chat format the LoRAs were trained on; lower is better. "
         "A comparison *generated vs X* is the per-task difference X - generated (positive = generated better), "
         f"averaged over the {len(names)} held-out tasks, with a 95 % percentile bootstrap CI over tasks "
         f"({nb} resamples) and wins / ties / losses (tie: |difference| <= {TIE} nats).\n"]  # fmt: skip
    L.append("## Primary comparison\n")
    L.append("| variant | generated vs control | vs retrieval | vs training LoRAs | vs base | gap closed "
             "(control -> own LoRA) |\n|---|---|---|---|---|---|")  # fmt: skip
    stats = {}
    for v in vnames:
        g = nll[f"generated:{v}"]
        st = {r: paired(g, nll[r], nb, seed, TIE) for r in ("control", "retrieval", "training", "base")}
        st["gap"] = gap_closed(nll["control"], g, nll["own"], nb, seed)
        stats[v] = st
        cells = [f"{_fmt_ci(st[r])} ({st[r]['wins']}/{st[r]['ties']}/{st[r]['losses']})"
                 for r in ("control", "retrieval", "training", "base")]  # fmt: skip
        gap = st["gap"]
        L.append(
            f"| {v} | " + " | ".join(cells) + f" | {gap['fraction']:.3f} [{gap['ci'][0]:.3f}, {gap['ci'][1]:.3f}] |"
        )
    L.append("\nCells: mean difference [95 % CI] (wins/ties/losses of the generated adapters).\n")
    for v in vnames:
        st = stats[v]
        verdict = "beat" if st["control"]["ci"][0] > 0 else "do not beat"
        verdict_r = "beat" if st["retrieval"]["ci"][0] > 0 else "do not beat"
        L.append(f"- **{v}**: the generated adapters {verdict} the prompt-blind control with a CI that excludes "
                 f"zero, and {verdict_r} retrieval (CIs above).")  # fmt: skip
    L.append("\n## Mean over tasks, every row (NLL per response token)\n")
    L.append("| row | mean NLL | median |\n|---|---|---|")
    for r in ROWS:
        L.append(f"| {LABELS[r]} | {nll[r].mean():.4f} | {np.median(nll[r]):.4f} |")
    for v in vnames:
        g = nll[f"generated:{v}"]
        L.append(f"| generated ({v}) | {g.mean():.4f} | {np.median(g):.4f} |")
    ctx = {"control vs base": paired(nll["control"], nll["base"], nb, seed, TIE),
           "retrieval vs control": paired(nll["retrieval"], nll["control"], nb, seed, TIE),
           "own LoRA vs control": paired(nll["own"], nll["control"], nb, seed, TIE)}  # fmt: skip
    L.append("\nFor context, the same paired statistic between baselines:\n")
    L += [f"- {k}: {_fmt_ci(d)} ({d['wins']}/{d['ties']}/{d['losses']})" for k, d in ctx.items()]
    sec = [(p, m) for p in ("ll", "gen") if p in e.secondary for m in (("acc", "acc_norm") if p == "ll" else ("acc",))]
    if sec:
        L.append(f"\n## Secondary: accuracy on the first {e.secondary_limit} test items of each task (%)\n")
        L.append("`ll`: log-likelihood with lm-eval's generic template (`Question: ...\\nAnswer:` + ` choice`; "
                 "acc_norm divides by len(choice) as lm-eval); `gen`: the DnD generation protocol (greedy, answer "
                 "parsed from the first 20 characters, format failures count as wrong). The sampled training LoRAs "
                 "are scored on the primary metric only.\n")  # fmt: skip
        have = {v: per for v, per in variants.items() if all(p in per[t][0] for t in names for p, _ in sec)}
        vsec = list(have)
        acc = {f"{p}/{m}": table(shared, have, names, p, m, skip=("training",)) for p, m in sec}
        L.append("| row | " + " | ".join(acc) + " |\n|---|" + "---|" * len(acc))
        for r in [x for x in (*ROWS, *[f"generated:{v}" for v in vsec]) if x != "training"]:
            L.append(f"| {_label(r)} | " + " | ".join(f"{100 * a[r].mean():.1f}" for a in acc.values()) + " |")
        for v in vsec:
            for k, a in acc.items():
                d = paired(-a[f"generated:{v}"], -a["control"], nb, seed, 0.0)
                L.append(f"- {k}, generated ({v}) - control: {100 * d['mean']:+.2f} points [{100 * d['ci'][0]:+.2f}, "
                         f"{100 * d['ci'][1]:+.2f}] ({d['wins']}/{d['ties']}/{d['losses']})")  # fmt: skip
    if vnames:
        plot(nll, vnames, names, out_dir / "many_task.png")
        L.append("\n![per-task scatter](many_task.png)\n")
    L.append("## Time to an adapter\n")
    coll, how = collection_seconds(Path(c.data.collection_dir), names)
    for v in vnames:
        gi = json.loads((cv / v / "generation.json").read_text()) if (cv / v / "generation.json").is_file() else {}
        per = [x["seconds_per_adapter"] for x in gi.values() if x.get("seconds_per_adapter")]
        if per and coll:
            L.append(f"- {v}: generation {np.median(per):.4f} s per adapter (median over folds, compile excluded; "
                     f"compile {np.median([x['compile_s'] for x in gi.values()]):.1f} s once per fold) vs collecting "
                     f"one LoRA {np.median(coll):.1f} s (median over {len(coll)} tasks; {how}): "
                     f"{np.median(coll) / np.median(per):,.0f}x less time on this machine.")  # fmt: skip
    L.append("\n## Settings\n")
    gen = generator_config(c)
    L += [f"- **tasks** ({len(names)}): " + ", ".join(names),
          f"- **folds**: {e.split} split, K = {e.folds}, seed {e.fold_seed}: "
          + "; ".join(f"fold {f['fold']}: {', '.join(f['heldout'])}" for f in folds),
          f"- **base model**: {c.collect.model} (SmolLM2-135M-Instruct from PyPI, a 4-bit GGUF round trip, fp32)",
          f"- **LoRA collection** (one recipe, seed {c.collect.seed}, one shared init): rank {c.collect.lora.r}, alpha "
          f"{c.collect.lora.alpha}, 7 projections; {c.collect.phase1.steps} steps at lr {c.collect.phase1.lr} (batch "
          f"{c.collect.phase1.batch_size}), then {c.collect.phase2.steps} checkpoints at lr {c.collect.phase2.lr}; "
          f"cut-off {c.collect.cutoff_len} tokens; own / retrieval / training LoRAs = each task's last checkpoint",
          f"- **generator**: features {[list(f) for f in gen.features]}, kernel {gen.kernel_size}, "
          f"{count_params(gen):,} parameters; {c.train.steps} steps, batch {c.train.batch_size}, lr "
          f"{c.train.learning_rate}, {c.data.num_texts} prompts x {c.data.max_text_length} tokens per condition, "
          f"{c.data.real_length} checkpoints per task, seed {c.seed}",
          "- **variants**: " + "; ".join(_variant_desc(cv, v) for v in vnames),
          f"- **generation**: {e.num_adapters} adapter(s) per held-out task from its unlabeled test prompts (seeded "
          "batches), the final generator step (no selection on test data)",
          "- **control**: the mean token tensor of the fold's training checkpoints, detokenized (spec §2.6 decoding)",
          "- **retrieval**: the training task whose first 64 train prompts have the highest cosine similarity of "
          "mean normalised MiniLM embeddings to the held-out task's first 64 test prompts",
          f"- **training LoRAs**: {e.training_sample} training tasks sampled per held-out task (seeded), mean "
          "score"]  # fmt: skip
    L.append("\n## Deviations from the paper\n")
    L += [f"- {x}" for x in c.pipeline.deviations]
    L.append("\n## Stage wall times (seconds; a stage skipped on resume keeps its earlier time)\n")
    L.append(
        "| "
        + " | ".join(times)
        + " |\n|"
        + "---|" * len(times)
        + "\n| "
        + " | ".join(str(v) for v in times.values())
        + " |"
    )
    L.append("\n## Per task (NLL per response token)\n")
    cols = [*ROWS, *[f"generated:{v}" for v in vnames]]
    L.append("| task | fold | retrieved | " + " | ".join(cols) + " |\n|---|---|---|" + "---|" * len(cols))
    fold_of = {t: f["fold"] for f in folds for t in f["heldout"]}
    for i, t in enumerate(names):
        L.append(f"| {t} | {fold_of[t]} | {shared[t]['retrieval']['task']} | "
                 + " | ".join(f"{nll[r][i]:.3f}" for r in cols) + " |")  # fmt: skip
    path = out_dir / "report.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(L) + "\n")
    with atomic_file(out_dir / "scores.csv", "w") as f:
        f.write("task,fold," + ",".join(cols) + "\n")
        for i, t in enumerate(names):
            f.write(f"{t},{fold_of[t]}," + ",".join(f"{nll[r][i]:.5f}" for r in cols) + "\n")
    return path
