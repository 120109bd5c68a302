"""Entry point: the paper's ablations on one set of cross-validated folds, then one report.

  python -m dnd_jax.ablations --config configs/ablations/suite.py --workdir runs/ablations \
      --report_dir results/ablations

The suite config (configs/ablations/suite.py) lists groups of arms: group `g` with argument `a` is the
config `configs/ablations/g.py:a`. An arm runs as that config's difference from the common ablation
config (configs/ablations/common.py) laid over the suite's own config, so an override given to the
suite (`--config.experiment.limit=16`) reaches every arm. All arms share one workdir, hence one
collection, one fold assignment and one set of baseline scores (dnd_jax/experiments/many_task.py); each arm is a
variant with its own generators, adapters and scores. Arms already finished are skipped, so re-running
resumes. The report (dnd_jax/experiments/ablation_report.py) is written once every arm is scored.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import ml_collections

from dnd_jax.assets import enable_compilation_cache
from dnd_jax.config_cli import parse_or_exit
from dnd_jax.errors import DndError, run_cli

_MISSING = object()


def flatten(node, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of a ConfigDict (tuples and lists are leaves)."""
    out = {}
    for k in node.keys():
        v = node[k]
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _set(c, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    node = c
    for h in head:
        if h not in node:
            node[h] = ml_collections.ConfigDict()
        node = node[h]
    node[last] = value


def suite_settings(suite):
    """A copy of the suite config without its `ablations` field: the reference arm, and every arm's base."""
    return ml_collections.ConfigDict({k: copy.deepcopy(suite[k]) for k in suite.keys() if k != "ablations"})


def arm_config(suite, group: str, arg: str, smoke: bool):
    """The config of arm `configs/ablations/<group>.py:<arg>`: its changes to the common ablation config,
    applied to a copy of the suite config (without the suite's `ablations` field)."""
    from configs.ablations import common

    try:
        mod = importlib.import_module(f"configs.ablations.{group}")
    except ModuleNotFoundError:
        raise DndError(f"config field ablations.{group}: no configs/ablations/{group}.py") from None
    full_arg = f"{arg},smoke" if smoke else arg
    try:
        arm = mod.get_config(full_arg)
    except ValueError as e:
        raise DndError(f"config field ablations.{group}: configs/ablations/{group}.py:{full_arg}: {e}") from None
    base = flatten(common.get_config(smoke))
    c = suite_settings(suite)
    for k, v in flatten(arm).items():
        if base.get(k, _MISSING) != v:
            _set(c, k, v)
    return c


def arms(suite) -> list[tuple[str, str]]:
    """[(group, arm argument)] in the suite's order."""
    groups = suite.ablations.groups
    order = list(suite.ablations.get("order", ()))
    unknown = [g for g in order if g not in groups]
    if unknown:
        raise DndError(f"config field ablations.order: {unknown[0]!r} is not a group of ablations.groups")
    names = order + sorted(g for g in groups.keys() if g not in order)
    return [(g, str(a)) for g in names for a in groups[g]]


def run_ablations(suite, workdir: str | Path, report_dir: str | Path | None = None, report_only: bool = False) -> Path:
    """Runs (or resumes) every arm, then writes the report; returns its path.

    With `report_only`, nothing runs: the report shows the arms scored so far (the others as "not run")."""
    from dnd_jax.experiments.ablation_report import write_ablation_report
    from dnd_jax.experiments.many_task import run_experiment

    if "ablations" not in suite:
        raise DndError("config: no `ablations` field (use configs/ablations/suite.py)")
    smoke = bool(suite.ablations.smoke)
    configs, seen = [], {}
    for group, arg in arms(suite):
        c = arm_config(suite, group, arg, smoke)
        v = c.experiment.variant
        key = json_key(c)
        if v in seen and seen[v] != key:
            raise DndError(f"config ablations.{group}: arm {arg!r} reuses variant name {v!r} with another config")
        seen[v] = key
        configs.append((group, arg, c))
    if not any(c.experiment.variant == "reference" for _, _, c in configs):
        # every table compares with the reference arm (and it writes the shared baselines): run it even when
        # no group lists it, as the suite's own settings
        configs.insert(0, ("reference", "prompts", suite_settings(suite)))
    if report_only:
        if not (Path(workdir) / "stages.json").is_file():
            raise DndError(f"{workdir}: no ablation run here yet (run without --report_only first)")
        return write_ablation_report(suite, configs, Path(workdir).absolute(), Path(report_dir or workdir))
    done, failed = set(), []  # the reference arm first: the shared stages (folds, retrieval) use its encoder
    for group, arg, c in sorted(configs, key=lambda x: x[2].experiment.variant != "reference"):
        v = c.experiment.variant
        if v in done:
            continue
        print(f"== ablation {group}:{arg} (variant {v})", file=sys.stderr)
        try:
            run_experiment(c, workdir, until="evaluate")
        except DndError as e:  # a bad arm (its input or config) does not stop the others; the reference does
            if v == "reference":
                raise
            print(f"error: ablation {group}:{arg}: {e}", file=sys.stderr)
            failed.append(f"{group}:{arg} ({e})")
        done.add(v)
    report = write_ablation_report(suite, configs, Path(workdir).absolute(), Path(report_dir or workdir))
    if failed:
        raise DndError(f"{len(failed)} ablation arm(s) failed, the report shows them as not run: {'; '.join(failed)}")
    return report


def json_key(c) -> str:
    from dnd_jax.config_cli import config_dict

    return json.dumps(config_dict(c), sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ablation suite config (configs/ablations/suite.py)",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory, shared by every arm; re-running resumes")
    flags.DEFINE_string("report_dir", None, "where report.md goes (default: WORKDIR)")
    flags.DEFINE_bool("report_only", False, "write the report from the arms finished so far; run nothing")
    parse_or_exit(argv if argv is not None else sys.argv)
    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        raise DndError("both --config and --workdir are required")
    enable_compilation_cache()  # the arms compile the same programs
    report = run_ablations(f.config, f.workdir, f.report_dir, f.report_only)
    print(Path(report).read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    run_cli(main)
