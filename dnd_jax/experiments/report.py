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

from dnd_jax.experiments.decisive import headline
from dnd_jax.experiments.folds import family_map
from dnd_jax.experiments.sft_report import sft_section
from dnd_jax.experiments.stats import paired, verdict, within_noise
from dnd_jax.experiments.tables import (
    ANSWER,
    NLL,
    ROWS,
    TIE,
    _fmt_ci,
    _label,
    _rel,
    collect_scores,
    comparison_table,
    seed_lists,
    swapped_table,
    table,
    task_mean,
)


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
        g = task_mean(vals[f"generated:{v}"])
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


def _variant_desc(cv: Path, v: str, per: dict) -> str:
    """How a variant's generators were trained (its first training config, or whose it reuses) and the settings
    its scores were made under (stored in its score files)."""
    st = next(iter(per.values())).get("settings", {})
    seeds = st.get("seeds", [])
    if v.startswith("fewshot-"):
        return f"{v} (not generated: LoRAs collected on {v.split('-', 1)[1]} labelled examples of each held-out task)"
    if (cv / v / "soft_retrieval.json").is_file():
        taus = sorted({x["tau"] for x in json.loads((cv / v / "soft_retrieval.json").read_text()).values()})
        return (f"{v} (not generated: the softmax(cos / tau)-weighted mean of the training tasks' tokens, tau "
                f"{', '.join(f'{t:g}' for t in taus)} chosen per fold inside its training tasks)")  # fmt: skip
    own = sorted((cv / v).glob("fold-0/seed-*/train/config.json"))
    scored = f"{st.get('num_adapters', '?')} adapter(s) per task and seed, condition {st.get('condition', '?')}"
    if not own:
        return (
            f"{v} (reuses another variant's generators, {st.get('steps', '?')} steps, seeds "
            f"{', '.join(seeds)}; A tokens from the fold mean; {scored})"
        )
    tc = json.loads(own[0].read_text())
    d = tc["data"]
    target = "residual from the fold mean" if d.get("target_offset") else "absolute tokens"
    loss = "B^T tokens only" if d.get("loss_tokens") == "b" else "all tokens"
    obj = tc["train"].get("objective", "recon")
    if obj != "recon":
        s = tc.get("sft", {})
        loss = (f"the tasks' response NLL through the LM ({obj}; {s.get('examples')} examples x "
                f"{tc['train']['batch_size']} tasks per step, L2 {s.get('l2')})")  # fmt: skip
    return f"{v} ({tc['train']['steps']} steps, {target}, loss on {loss}; seeds {', '.join(seeds)}; {scored})"


def _secondary_section(e, shared: dict, variants: dict, names: list[str], groups, nb: int, seed: int) -> list[str]:
    """Accuracies of the secondary protocols, each over the tasks scored with it (a protocol scores only the tasks
    whose answer format it reads: dnd_jax/experiments/scoring.py), with generated - control per variant."""
    metrics = {"ll": ("acc", "acc_norm"), "gen": ("acc",), "em": ("em",)}
    on = {p: [i for i, t in enumerate(names) if p in shared[t]["base"]] for p in metrics if p in e.secondary}
    on = {p: idx for p, idx in on.items() if idx}  # protocol -> the tasks scored with it
    if not on:
        return []
    L = [f"\n## Secondary: accuracy on the first {e.secondary_limit} scored items of each task (%)\n",
         "`ll`: log-likelihood with lm-eval's generic template (`Question: ...\\nAnswer:` + ` choice`; "
         "acc_norm divides by len(choice) as lm-eval); `gen`: the DnD generation protocol (greedy, answer "
         "parsed from the first 20 characters, format failures count as wrong); `em`: exact match of the "
         "greedy answer's first line with any acceptable target, normalised (generative tasks). The sampled "
         "training LoRAs are scored on the primary metric only.\n"]  # fmt: skip
    part = [f"{p} on {len(idx)} of {len(names)}" for p, idx in on.items() if len(idx) < len(names)]
    if part:  # a mixed pool: each protocol scores the tasks whose answer format it reads
        L[-1] = L[-1][:-1] + " Tasks by answer format: " + ", ".join(part) + " (the rest have the other format).\n"
    tasks = {p: [names[i] for i in idx] for p, idx in on.items()}
    have = {p: {v: per for v, per in variants.items()
                if all(p in x for t in tasks[p] for xs in seed_lists(per[t]).values() for x in xs)}
            for p in on}  # fmt: skip
    acc = {f"{p}/{m}": (p, table(shared, have[p], tasks[p], p, m, skip=("training",))) for p in on for m in metrics[p]}
    vsec = [v for v in variants if all(v in h for h in have.values())]
    L.append("| row | " + " | ".join(acc) + " |\n|---|" + "---|" * len(acc))
    for r in [x for x in (*ROWS, *[f"generated:{v}" for v in vsec]) if x != "training"]:
        L.append(f"| {_label(r)} | " + " | ".join(f"{100 * task_mean(a[r]).mean():.1f}" for _, a in acc.values())
                 + " |")  # fmt: skip
    for v in vsec:
        for k, (p, a) in acc.items():
            d = paired(-a[f"generated:{v}"], -a["control"], nb, seed, 0.0, groups[on[p]])
            L.append(f"- {k}, generated ({v}) - control: {100 * d['mean']:+.2f} points [{100 * d['ci'][0]:+.2f}, "
                     f"{100 * d['ci'][1]:+.2f}] ({d['wins']}/{d['ties']}/{d['losses']})")  # fmt: skip
    return L


def write_report(c, workdir: Path, cv: Path, names: list[str], out_dir: Path, times: dict) -> Path:
    """Writes out_dir/report.md, out_dir/many_task.png and out_dir/scores.csv; returns the report path."""
    from dnd_jax.config_cli import versions
    from dnd_jax.fileio import atomic_file
    from dnd_jax.models.hyperconv import count_params
    from dnd_jax.trainer import generator_config

    e = c.experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    made = json.loads((cv / "folds.json").read_text())
    folds = made["folds"]
    shared, variants = collect_scores(cv, names)
    vnames = list(variants)
    nll = table(shared, variants, names, *NLL)
    ans = table(shared, variants, names, *ANSWER)
    fold_of = {t: f["fold"] for f in folds for t in f["heldout"]}
    groups = np.asarray([fold_of[t] for t in names])
    nb, seed = e.bootstrap, c.seed
    items = [shared[t]["items"] for t in names]
    seeds = sorted({len(st) for v in vnames for st in [variants[v][names[0]]["settings"].get("seeds", ["-"])]})
    L = [f"# Many-task DnD, task-level {e.folds}-fold cross-validation ({len(names)} tasks)\n",
         f"Produced by `python -m dnd_jax.experiment --config {c.pipeline.config_name} --workdir "
         f"{_rel(workdir)}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores); "
         f"{versions()}. Every number below is read from that run's files.\n",
         "Primary metric (fixed in the config before any run): mean NLL per gold-response token on each task's "
         f"scored test items (the first {e.limit} that survive the leak check: {min(items)}-{max(items)} per task), "
         "in the chat format the LoRAs were trained on; lower is better. A comparison *generated vs X* is the "
         "per-task difference X - generated (positive = generated better), averaged over the "
         f"{len(names)} held-out tasks, with a 95 % percentile bootstrap CI ({nb} resamples) and wins / ties / "
         f"losses (tie: |difference| <= {TIE} nats). **The CI covers two sources of noise**: held-out tasks "
         "(resampled) and the generator's own training (each fold's generator is trained with "
         f"{'/'.join(str(x) for x in seeds)} seed(s); per resample, each fold's seeds are redrawn with replacement "
         "and shared by the fold's tasks). *per seed vs control* is the mean difference with each seed's "
         "generators alone: the seed-to-seed spread.\n"]  # fmt: skip
    swaps = swapped_table(variants, names, *NLL)
    if e.get("decisive", False):
        L += headline(e, vnames, nll, swaps, groups, nb, seed, TIE)
    L.append("## Primary comparison (NLL per response token)\n")
    rows, stats = comparison_table(nll, vnames, groups, nb, seed, "control -> own LoRA")
    L += rows
    L.append("\nCells: mean difference [95 % CI] (wins/ties/losses of the generated adapters).\n")
    for v in vnames:
        st = stats[v]
        said, said_r = (verdict(st[r], "beat", "lose to", "are within noise of") for r in ("control", "retrieval"))
        L.append(f"- **{v}**: its adapters {said} the prompt-blind control and {said_r} retrieval "
                 "(95 % CIs above).")  # fmt: skip
    if swaps:
        L.append("\nPrompt swap: each held-out task's adapter also made from another held-out task's prompts (a "
                 "seeded derangement within the fold; the same generator and seed) and scored on the task's own "
                 "items. Swapped minus own NLL per token (positive: its own prompts help):\n")  # fmt: skip
        for v, sw in swaps.items():
            d = paired(nll[f"generated:{v}"], sw, nb, seed, TIE, groups)
            noise = " (within noise)" if within_noise(d) else ""
            L.append(f"- **{v}**: {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
                     f"({d['wins']}/{d['ties']}/{d['losses']}){noise}")  # fmt: skip
    L += _family_section(e, names, nll, vnames)
    have_ans = [t for t in names if not np.isnan(ans["base"][names.index(t)])]
    if have_ans and vnames:
        L.append(f"\n## Secondary: answer-only NLL ({len(have_ans)} tasks)\n")
        L.append("The NLL of the answer's own token(s) alone (e.g. `C` of `[C]`; a generative task's whole answer "
                 "text, without the end of turn), summed per item and averaged over items: the per-token metric "
                 "divides an answer-level difference by the ~5 tokens of a `[C]` response and its end of turn, most "
                 "of which only carry the format. Tasks whose responses have no located answer span are left "
                 "out.\n")  # fmt: skip
        rows, _ = comparison_table(ans, vnames, groups, nb, seed, "answer-only, control -> own LoRA")
        L += rows
    L.append("\n## Mean over tasks, every row\n")
    L.append("| row | NLL per token: mean | median | answer-only NLL: mean |\n|---|---|---|---|")
    for r in (*ROWS, *[f"generated:{v}" for v in vnames]):
        x, a = task_mean(nll[r]), task_mean(ans[r])
        am = f"{np.nanmean(a):.4f}" if np.isfinite(a).any() else "-"
        L.append(f"| {_label(r)} | {x.mean():.4f} | {np.median(x):.4f} | {am} |")
    ctx = {"control vs base": paired(nll["control"], nll["base"], nb, seed, TIE),
           "retrieval vs control": paired(nll["retrieval"], nll["control"], nb, seed, TIE),
           "own LoRA vs control": paired(nll["own"], nll["control"], nb, seed, TIE)}  # fmt: skip
    L.append("\nFor context, the same paired statistic between baselines (tasks resampled):\n")
    L += [f"- {k}: {_fmt_ci(d)} ({d['wins']}/{d['ties']}/{d['losses']})" for k, d in ctx.items()]
    L += _secondary_section(e, shared, variants, names, groups, nb, seed)
    L += sft_section(cv, vnames, nll, groups, nb, seed, TIE)
    if vnames:
        plot(nll, vnames, names, out_dir / "many_task.png")
        L.append("\n![per-task scatter](many_task.png)\n")
    L += _time_section(c, cv, vnames, names)
    L += _leak_section(made)
    L.append("\n## Settings\n")
    gen = generator_config(c)
    L += [f"- **tasks** ({len(names)}): " + ", ".join(names),
          f"- **folds**: {e.split} split, K = {e.folds}, seed {e.fold_seed}, linked tasks in one fold: "
          + "; ".join(f"fold {f['fold']}: {', '.join(f['heldout'])}" for f in folds),
          f"- **scored items**: the first {shared[names[0]]['settings']['limit']} test items of each task that "
          f"survive the leak check ({min(items)}-{max(items)} per task; stored with each task's scores)",
          f"- **base model**: {c.collect.model} (SmolLM2-135M-Instruct from PyPI, a 4-bit GGUF round trip, fp32)",
          f"- **LoRA collection** (one recipe, seed {c.collect.seed}, one shared init): rank {c.collect.lora.r}, alpha "
          f"{c.collect.lora.alpha}, 7 projections; {c.collect.phase1.steps} steps at lr {c.collect.phase1.lr} (batch "
          f"{c.collect.phase1.batch_size}), then {c.collect.phase2.steps} checkpoints at lr {c.collect.phase2.lr}; "
          f"cut-off {c.collect.cutoff_len} tokens; own / retrieval / training LoRAs = each task's last checkpoint",
          f"- **generator**: features {[list(f) for f in gen.features]}, kernel {gen.kernel_size}, "
          f"{count_params(gen):,} parameters; batch {c.train.batch_size}, lr {c.train.learning_rate}, "
          f"{c.data.num_texts} prompts x {c.data.max_text_length} tokens per condition, {c.data.real_length} "
          "checkpoints per task; steps and seeds per variant below",
          "- **variants** (as each variant's files record them): "
          + "; ".join(_variant_desc(cv, v, variants[v]) for v in vnames),
          "- **generation**: adapters per held-out task from its unlabeled test prompts (conditions that read "
          "answers: its train split) in seeded batches, the final generator step (no selection on test data)",
          "- **control**: the mean token tensor of the fold's training checkpoints (pooled over checkpoints), "
          "detokenized (spec §2.6 decoding)",
          "- **retrieval**: the training task whose first 64 train prompts have the highest cosine similarity of "
          "mean normalised MiniLM embeddings to the held-out task's first 64 test prompts",
          f"- **training LoRAs**: {len(shared[names[0]]['training'])} training tasks sampled per held-out task "
          "(seeded), mean score"]  # fmt: skip
    L.append("\n## Deviations from the paper\n")
    L += [f"- {x}" for x in c.pipeline.deviations]
    L.append("\n## Stage wall times (seconds; a stage skipped on resume keeps its earlier time)\n")
    L.append("| " + " | ".join(times) + " |\n|" + "---|" * len(times) + "\n| "
             + " | ".join(str(v) for v in times.values()) + " |")  # fmt: skip
    L.append("\n## Per task (NLL per response token; generated: mean over seeds)\n")
    cols = [*ROWS, *[f"generated:{v}" for v in vnames]]
    L.append("| task | fold | items | retrieved | " + " | ".join(cols) + " |\n|---|---|---|---|" + "---|" * len(cols))
    for i, t in enumerate(names):
        L.append(f"| {t} | {fold_of[t]} | {items[i]} | {shared[t]['retrieval']['task']} | "
                 + " | ".join(f"{task_mean(nll[r])[i]:.3f}" for r in cols) + " |")  # fmt: skip
    path = out_dir / "report.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(L) + "\n")
    seed_cols = [(v, j) for v in vnames for j in range(nll[f"generated:{v}"].shape[1])]
    with atomic_file(out_dir / "scores.csv", "w") as f:
        f.write("task,fold,items," + ",".join(ROWS) + "," + ",".join(f"generated:{v}:seed{j}" for v, j in seed_cols)
                + "," + ",".join(f"answer:{r}" for r in ROWS) + "\n")  # fmt: skip
        for i, t in enumerate(names):
            vals = [nll[r][i] for r in ROWS] + [nll[f"generated:{v}"][i, j] for v, j in seed_cols]
            vals += [ans[r][i] for r in ROWS]
            f.write(f"{t},{fold_of[t]},{items[i]}," + ",".join(f"{x:.5f}" for x in vals) + "\n")
    return path


def _family_section(e, names: list[str], nll: dict, vnames: list[str]) -> list[str]:
    """What transfers: per family (experiment.families; a task without one is its own), the mean over its held-out
    tasks of control - generated NLL per token (positive: the generator helps there), for each generator variant."""
    fam = family_map(e.get("families", ()))
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(names):
        groups.setdefault(fam.get(t, t), []).append(i)
    if not vnames or len(groups) < 2:
        return []
    diff = {v: nll["control"] - task_mean(nll[f"generated:{v}"]) for v in vnames}
    L = ["\n## What transfers, per family\n",
         "Mean over each family's held-out tasks of control - generated NLL per token (positive: the generated "
         "adapters beat the prompt-blind control there; no CI: most families hold one to three tasks). Families "
         "by size, then name.\n",
         "| family | tasks | " + " | ".join(vnames) + " |", "|---|---|" + "---|" * len(vnames)]  # fmt: skip
    for f, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        L.append(f"| {f} | {len(idx)} | " + " | ".join(f"{diff[v][idx].mean():+.4f}" for v in vnames) + " |")
    return L


def _time_section(c, cv: Path, vnames: list[str], names: list[str]) -> list[str]:
    """Time to an adapter, cold (model and encoder load + compile, amortised over a generator's adapters) and
    warm (one compiled call per batch of adapters), next to collecting one LoRA."""
    L = ["## Time to an adapter\n"]
    coll, how = collection_seconds(Path(c.data.collection_dir), names)
    for v in vnames:
        path = cv / v / "generation.json"
        gi = list(json.loads(path.read_text()).values()) if path.is_file() else []
        gi = [x for x in gi if x.get("seconds_per_adapter") and "load_s" in x]
        if not (gi and coll):
            continue
        warm = float(np.median([x["seconds_per_adapter"] for x in gi]))
        cold = float(np.median([(x["load_s"] + x["compile_s"]) / x["adapters"] + x["seconds_per_adapter"]
                                for x in gi]))  # fmt: skip
        per = int(np.median([x["adapters"] for x in gi]))
        load, comp = np.median([x["load_s"] for x in gi]), np.median([x["compile_s"] for x in gi])
        L.append(f"- {v}: **cold** {cold:.2f} s per adapter (generator, model and encoder load {load:.1f} s "
                 f"+ compile {comp:.1f} s, amortised over the {per} adapters one "
                 f"generator makes, plus generation); **warm** {warm:.4f} s per adapter (compiled, loaded). "
                 f"Collecting one LoRA: {np.median(coll):.1f} s (median over {len(coll)} tasks; {how}): "
                 f"{np.median(coll) / cold:,.0f}x less time cold, {np.median(coll) / warm:,.0f}x warm, on this "
                 "machine.")  # fmt: skip
        neg = sum(x.get("negative_scales", 0) for x in gi)
        chunks = sum(x.get("chunks", 0) for x in gi)
        if chunks:
            L.append(
                f"  Decoded scales of its generated tokens: {neg} of {chunks} per-chunk sigmas are negative "
                "(the decoding (exp(sigma' - 1.6) - 0.1) / 0.9 flips a chunk's sign below sigma' of about -0.70)."
            )
    return L


def _leak_section(made: dict) -> list[str]:
    """What the leak check found and what the folds did about it (folds.json)."""
    lk = made.get("leaks")
    if lk is None:
        return []
    L = ["\n## Leak check (exact overlap of normalised prompts)\n"]
    within = {t: n for t, n in lk["within"].items() if n}
    rep = {t: n for t, n in lk["repeated"].items() if n}
    L.append("- test items also in the task's own train split (dropped from scoring): "
             + (", ".join(f"{t} {n}" for t, n in within.items()) or "none"))  # fmt: skip
    L.append("- repeated test items (dropped): " + (", ".join(f"{t} {n}" for t, n in rep.items()) or "none"))
    cross = ", ".join(f"{x['test_task']} in {x['train_task']}: {x['items']}" for x in lk["cross"]) or "none"
    L.append("- test items of one task in another task's train split (the two tasks are kept in one fold, so "
             f"neither is ever the other's training data; the items stay scored): {cross}")  # fmt: skip
    L.append("- tasks kept in one fold: " + ("; ".join(", ".join(g) for g in lk["linked"]) or "none")
             + (" (declared near-copies: " + "; ".join(", ".join(g) for g in lk["declared"]) + ")"
                if lk["declared"] else ""))  # fmt: skip
    return L
