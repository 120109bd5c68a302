"""The report tables shared by the many-task and ablation reports: per-task score rows, paired comparisons.

Every number is read from the run's score files. The primary metric is the mean NLL per gold-response token
(lower is better); a comparison "generated vs X" is the per-task difference X - generated, so a positive
mean favours the generated adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dnd_jax.experiments.stats import gap_closed, paired

TIE = 0.01  # |difference| <= 0.01 nats per token counts as a tie in wins / ties / losses
ROWS = ("base", "control", "retrieval", "training", "own")
LABELS = {"base": "base model", "control": "prompt-blind control (mean training tokens)",
          "retrieval": "retrieval (LoRA of the nearest training task)", "training": "training LoRAs (sample mean)",
          "own": "the task's own LoRA (upper reference)"}  # fmt: skip
# Metrics of the nll protocol: the primary one, and the answer-only NLL of multiple-choice items.
NLL = ("nll", "nll")
ANSWER = ("nll", "nll_answer")


def _metric(entry: dict, proto: str, name: str) -> float:
    v = entry.get(proto, {}).get(name)
    return float("nan") if v is None else float(v)


def collect_scores(cv: Path, names: list[str]) -> tuple[dict, dict]:
    """({task: shared scores}, {variant: {task: variant scores}}) for variants with every task scored."""
    shared = {t: json.loads((cv / "scores" / f"{t}.json").read_text()) for t in names}
    variants = {}
    for vd in sorted(p for p in cv.iterdir() if (p / "scores").is_dir()):
        got = {t: json.loads((vd / "scores" / f"{t}.json").read_text())
               for t in names if (vd / "scores" / f"{t}.json").is_file()}  # fmt: skip
        if len(got) == len(names):
            variants[vd.name] = got
    return shared, variants


def seed_lists(score: dict) -> dict[str, list[dict]]:
    """A variant's scores of one task: {seed: [adapter scores]}."""
    gen = score["generated"]
    return {"-": gen} if isinstance(gen, list) else gen  # a list: one unnamed seed (score files of older runs)


def _per_seed(by_seed: dict[str, list[dict]], proto: str, name: str) -> list[float]:
    """{seed: [adapter scores]} -> one metric per seed, each the mean over that seed's adapters."""
    return [float(np.mean([_metric(x, proto, name) for x in adapters])) for adapters in by_seed.values()]


def seed_values(score: dict, proto: str, name: str) -> list[float]:
    """A variant's per-seed value of one metric on one task (each the mean over that seed's adapters)."""
    return _per_seed(seed_lists(score), proto, name)


def table(shared: dict, variants: dict, names: list[str], proto: str, name: str, skip=()) -> dict[str, np.ndarray]:
    """{row: values}: baseline rows [tasks] (training: the mean over its sampled LoRAs); generated rows
    [tasks, seeds]."""
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
        out[f"generated:{v}"] = np.asarray([seed_values(per[t], proto, name) for t in names])
    return out


def swapped_table(variants: dict, names: list[str], proto: str, name: str) -> dict[str, np.ndarray]:
    """{variant: [tasks, seeds]} of the prompt-swap adapters' metric, for variants whose every task has them."""
    out = {}
    for v, per in variants.items():
        if all("swapped" in per[t] for t in names):
            out[v] = np.asarray([_per_seed(per[t]["swapped"], proto, name) for t in names])
    return out


def task_mean(x: np.ndarray) -> np.ndarray:
    """Per-task values: a [tasks, seeds] row averaged over its seeds."""
    return x.mean(1) if x.ndim == 2 else x


def _label(row: str) -> str:
    return LABELS.get(row) or f"generated ({row.split(':', 1)[1]})"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt_ci(d: dict, digits: int = 3) -> str:
    out = f"{d['mean']:+.{digits}f} [{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]"
    return out + (f" ({d['undefined']:.0%} of resamples undefined)" if d.get("undefined") else "")


def _fmt_gap(g: dict) -> str:
    out = f"{g['fraction']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]"
    return out + (f" ({g['undefined']:.1%} undefined)" if g["undefined"] else "")


def _seed_cell(d: dict) -> str:
    return " / ".join(f"{x:+.3f}" for x in d["per_seed"]) if d["seeds"] > 1 else "(1 seed)"


def comparison_table(vals: dict, vnames: list[str], groups: np.ndarray, nb: int, seed: int, what: str) -> list[str]:
    """The primary-comparison table of one metric: every variant vs each baseline, its seed spread, gap closed."""
    L = [f"| variant | generated vs control | vs retrieval | vs training LoRAs | vs base | per seed vs control | "
         f"gap closed ({what}) |\n|---|---|---|---|---|---|---|"]  # fmt: skip
    stats = {}
    for v in vnames:
        g = vals[f"generated:{v}"]
        ok = ~np.isnan(task_mean(g))
        st = {r: paired(g[ok], vals[r][ok], nb, seed, TIE, groups[ok]) for r in ("control", "retrieval", "training",
                                                                                  "base")}  # fmt: skip
        st["gap"] = gap_closed(vals["control"][ok], g[ok], vals["own"][ok], nb, seed, groups[ok])
        stats[v] = st
        cells = [f"{_fmt_ci(st[r])} ({st[r]['wins']}/{st[r]['ties']}/{st[r]['losses']})"
                 for r in ("control", "retrieval", "training", "base")]  # fmt: skip
        n = f" (n = {int(ok.sum())})" if not ok.all() else ""
        L.append(f"| {v}{n} | " + " | ".join(cells) + f" | {_seed_cell(st['control'])} | {_fmt_gap(st['gap'])} |")
    return L, stats
