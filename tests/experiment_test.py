"""The many-task experiment (configs/many_task_smollm2.py:smoke) end to end, resumed, and its statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dnd_jax import experiment
from dnd_jax.errors import DndError
from tests.pipeline_test import write_suite

REPO = Path(__file__).resolve().parents[1]


def test_many_task_smoke_end_to_end_and_resume(tmp_path):
    data = write_suite(tmp_path / "suite")  # t1, t2, t3, held: four tiny two-option tasks
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "dnd_jax.experiment", "--config", str(REPO / "configs/many_task_smollm2.py:smoke"),
           f"--workdir={work}", f"--config.experiment.commonsense_dir={data}",
           "--config.experiment.commonsense_tasks=('t1','t2','t3','held')",
           "--config.experiment.families=('t1=a','t2=a','t3=b','held=b')"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    first = subprocess.run([*cmd, "--until=train"], env=env, capture_output=True, text=True)  # a stop mid-way
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (work / "report.md").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("up to date") == 5  # data, collect, tokens, folds, train: resumed, not redone
    cv = work / "cv-random-k2-s0"
    folds = json.loads((cv / "folds.json").read_text())["folds"]
    held = sorted(t for f in folds for t in f["heldout"])
    assert held == ["held", "t1", "t2", "t3"] and all(len(f["heldout"]) == 2 for f in folds)
    for f in folds:  # every held-out task: its fold's control, a retrieval choice among the training tasks
        for t in f["heldout"]:
            plan = f["plans"][t]
            assert plan["retrieval"] in f["train"] and set(plan["training"]) <= set(f["train"])
            assert (cv / "dnd" / f"fold-{f['fold']}" / "generated" / t / "adapter-0" / "adapter_config.json").is_file()
    scores = json.loads((cv / "scores" / "t1.json").read_text())
    assert {"base", "own", "control", "retrieval", "training"} <= set(scores)
    assert scores["own"]["nll"]["nll"] < scores["base"]["nll"]["nll"]  # the task's own LoRA learned its answers
    report = (work / "report.md").read_text()
    for row in (
        "prompt-blind control",
        "retrieval",
        "training LoRAs",
        "own LoRA",
        "generated (dnd)",
        "Time to an adapter",
    ):
        assert row in report, row
    assert (work / "many_task.png").stat().st_size > 5000
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("up to date") == 7, again.stderr[-2000:]
    assert (work / "report.md").read_text().split("## Stage wall")[0] == report.split("## Stage wall")[0]


def test_folds_cover_every_task_once_and_family_split_keeps_families_together():
    names = [f"t{i}" for i in range(23)]
    folds = experiment.assign_folds(names, 5, seed=0)
    assert sorted(t for f in folds for t in f) == sorted(names)
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    assert experiment.assign_folds(names, 5, seed=0) == folds and experiment.assign_folds(names, 5, seed=1) != folds
    fam = {n: f"f{i % 7}" for i, n in enumerate(names)}
    ffolds = experiment.assign_folds(names, 5, 0, "family", fam)
    assert sorted(t for f in ffolds for t in f) == sorted(names)
    for f in ffolds:
        for t in f:
            assert all(fam[u] != fam[t] for g in ffolds if g is not f for u in g)
    with pytest.raises(DndError, match=r"experiment\.split"):
        experiment.assign_folds(names, 5, 0, "bogus")


def test_paired_statistics_against_a_plain_numpy_oracle():
    rng = np.random.default_rng(0)
    control = rng.uniform(0.5, 1.5, 40)
    generated = control - 0.1 + rng.normal(0, 0.05, 40)  # better (lower NLL) by 0.1 on average
    own = control - 0.4
    st = experiment.paired(generated, control, 4000, 0, tie=0.01)
    d = control - generated
    assert st["mean"] == pytest.approx(d.mean())
    assert st["wins"] + st["ties"] + st["losses"] == 40 and st["wins"] == int((d > 0.01).sum())
    # The percentile bootstrap CI brackets the mean and has about the normal-theory width.
    se = d.std(ddof=1) / np.sqrt(40)
    assert st["ci"][0] < d.mean() < st["ci"][1]
    assert (st["ci"][1] - st["ci"][0]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    gap = experiment.gap_closed(control, generated, own, 2000, 0)
    assert gap["fraction"] == pytest.approx(d.mean() / 0.4) and gap["ci"][0] < gap["fraction"] < gap["ci"][1]
    null = experiment.paired(control, control, 1000, 0, tie=0.0)
    assert null["mean"] == 0 and null["ties"] == 40 and null["ci"] == [0.0, 0.0]


def test_b_token_mask_marks_exactly_the_b_tokens():
    """Against a count from the module sizes alone: every module has ceil(in / C) A and ceil(out / C) B^T tokens."""
    from converters.synthetic import qwen2_config, spec_from_config
    from dnd_jax import lora_tokens
    from dnd_jax.trainer import b_token_mask

    spec = spec_from_config(qwen2_config("0.5B"), r=8, alpha=16)
    layout = lora_tokens.make_layout(spec, 128)
    mask = b_token_mask(layout)
    want = sum(-(-m.out_features // 128) for m in spec.modules)
    assert mask.sum() == want and mask.shape == (layout.num_tokens,)
    assert layout.num_tokens == 4296 and want == 24 * (7 + 1 + 1 + 7 + 38 + 38 + 7)  # spec §2.2
    assert mask[:7].sum() == 0 and mask[7:14].sum() == 7  # layer 0: q A tokens, then q B^T tokens
