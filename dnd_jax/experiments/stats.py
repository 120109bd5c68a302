"""Paired statistics over held-out tasks, with the generator's own training noise in the bootstrap.

Rows of a comparison are per-task values of a lower-is-better metric. A baseline row is one value per task
([n]); a generated row is one value per task and generator seed ([n, S]). Every task of a fold shares that
fold's generator, so a seed's training noise moves all of a fold's tasks together. The bootstrap therefore
resamples two levels: tasks (with replacement), and, per fold, the S generator seeds (with replacement,
shared by the fold's tasks); a generated value is the mean over the drawn seeds. With one seed per fold
it is the plain task bootstrap. Percentiles ignore resamples where a statistic is undefined (NaN) and the
fraction of those resamples is returned with every interval.
"""

from __future__ import annotations

import numpy as np


def _as_2d(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


def _draws(n: int, groups: np.ndarray | None, seeds: int, n_boot: int, seed: int):
    """Task indices [n_boot, n] and, per resample and task, seed columns [n_boot, n, seeds]."""
    rng = np.random.default_rng([seed, 31])
    idx = rng.integers(0, n, size=(n_boot, n))
    groups = np.zeros(n, np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if seeds == 1:
        return idx, np.zeros((n_boot, n, 1), np.int64)
    cols = rng.integers(0, seeds, size=(n_boot, int(groups.max()) + 1, seeds))
    return idx, cols[np.arange(n_boot)[:, None], groups[idx]]


def resample(values: list, n_boot: int, seed: int, groups=None) -> list[np.ndarray]:
    """Bootstrap resamples of aligned per-task rows: each row [n] or [n, S] -> [n_boot, n] (seed-averaged).

    All rows share the task draws (a paired resample); rows with S seeds share the seed draws."""
    vals = [_as_2d(v) for v in values]
    n, s = vals[0].shape[0], max(v.shape[1] for v in vals)
    if any(v.shape[1] not in (1, s) for v in vals):
        raise ValueError(f"rows with {sorted({v.shape[1] for v in vals})} seeds cannot be paired")
    idx, cols = _draws(n, groups, s, n_boot, seed)
    out = []
    for v in vals:
        if v.shape[1] == 1:
            out.append(v[idx, 0])
        else:
            out.append(v[idx[..., None], cols].mean(-1))
    return out


def interval(boots: np.ndarray) -> tuple[list[float], float]:
    """95 % percentile interval of bootstrap values, NaNs ignored, and the fraction that were NaN."""
    boots = np.asarray(boots, np.float64)
    bad = float(np.isnan(boots).mean())
    if bad == 1.0:
        return [float("nan"), float("nan")], bad
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return [float(lo), float(hi)], bad


def paired(better, worse, n_boot: int, seed: int, tie: float, groups=None) -> dict:
    """Per-task paired difference worse - better of a lower-is-better metric: > 0 means `better` wins.

    Args:
      better, worse: [n] or [n, S] (generator seeds) per-task values.
      n_boot, seed: bootstrap resamples and seed.
      tie: |difference| <= tie counts as a tie in wins / ties / losses (of the seed-averaged difference).
      groups: [n] fold of each task (seeds are resampled per fold); None = one group.

    Returns:
      {"mean", "ci", "undefined" (fraction of NaN resamples), "wins", "ties", "losses", "n", "seeds": S,
       "per_seed": mean difference under each seed alone (the seed-to-seed spread)}.
    """
    b, w = _as_2d(better), _as_2d(worse)
    d = w - b  # [n, S]
    per_task = d.mean(1)
    bb, bw = resample([b, w], n_boot, seed, groups)
    ci, bad = interval((bw - bb).mean(1))
    return {"mean": float(per_task.mean()), "ci": ci, "undefined": bad, "wins": int((per_task > tie).sum()),
            "ties": int((abs(per_task) <= tie).sum()), "losses": int((per_task < -tie).sum()), "n": len(d),
            "seeds": d.shape[1], "per_seed": [float(x) for x in d.mean(0)]}  # fmt: skip


def gap_closed(control, generated, own, n_boot: int, seed: int, groups=None) -> dict:
    """Fraction of the control -> own-LoRA gap that the generated adapters close (ratio of means over tasks;
    0 = no better than the control, 1 = as good as the task's own LoRA), with a bootstrap CI.

    Undefined (NaN) where mean(control) <= mean(own) (no gap to close), in the estimate or in a resample;
    `undefined` is the fraction of such resamples, which the interval leaves out.
    """
    c, g, o = resample([control, generated, own], n_boot, seed, groups)
    frac = _ratio(_as_2d(control).mean(1).mean(), _as_2d(generated).mean(1).mean(), _as_2d(own).mean(1).mean())
    ci, bad = interval(_ratio(c.mean(1), g.mean(1), o.mean(1)))
    return {"fraction": float(frac), "ci": ci, "undefined": bad}


def _ratio(c, g, o):
    c, g, o = (np.asarray(x, np.float64) for x in (c, g, o))
    gap = c - o
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (c - g) / np.where(gap > 0, gap, 1.0), np.nan)


def within_noise(d: dict) -> bool:
    """Whether a `paired` result's CI includes zero (no difference measured)."""
    return d["ci"][0] <= 0 <= d["ci"][1]


def verdict(d: dict, better: str, worse: str, within: str) -> str:
    """`better` when a `paired` result's CI is above zero, `worse` when below, `within` when it includes zero."""
    lo, hi = d["ci"]
    return better if lo > 0 else worse if hi < 0 else within
