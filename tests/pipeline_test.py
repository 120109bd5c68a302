"""The whole pipeline (configs/demo.py:smoke) on the real SmolLM2 and MiniLM, tiny data, in a few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dnd_jax.data import bigbench
from tests.evaluate_test import write_fixed_answer_dataset

REPO = Path(__file__).resolve().parents[1]


def write_suite(root: Path) -> Path:
    """Four small two-option datasets (three for training, one held out) in one registry."""
    info = {}
    for i, name in enumerate(("t1", "t2", "t3", "held")):
        sub = write_fixed_answer_dataset(root / name)
        for split in ("train", "test"):
            recs = json.loads((sub / f"fixed_{split}.json").read_text())
            for r in recs:
                r["prompt"] = f"[{name}] " + r["prompt"] if i % 2 else r["prompt"]
            (root / f"{name}_{split}.json").write_text(json.dumps(recs))
            info[f"{name}_{split}"] = {"file_name": f"{name}_{split}.json"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def test_demo_smoke_pipeline_end_to_end_and_resume(tmp_path):
    data = write_suite(tmp_path / "data")
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "dnd_jax.pipeline", "--config", str(REPO / "configs/demo.py:smoke"),
           f"--workdir={work}", f"--config.data.prompts_dir={data}", "--config.data.train_datasets=('t1','t2')",
           "--config.data.heldout_dataset=held", "--config.data.num_texts=4", "--config.data.max_text_length=16",
           "--config.model.features=((4,16,384),(8,8,96),(16,10,66),(4770,10,66))",
           "--config.train.progress=False"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's machine
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (work / "report.md").read_text()
    assert "## Headline (measured)" in report and "| base |" in report and report in r.stdout
    res = json.loads((work / "eval" / "results.json").read_text())
    kinds = [row["kind"] for row in res["rows"]]
    assert kinds == ["base", "heldout", "control", "retrieval", "training", "training", "generated", "generated"]
    assert res["rows"][3]["name"].split(" ")[0] in ("t1", "t2")  # retrieval picks a training task
    assert "prompt-blind control" in report and (work / "baselines" / "control" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (work / "generated").glob("adapter-*")) == ["adapter-0", "adapter-1"]
    times = json.loads((work / "stages.json").read_text())
    assert {"collect", "train", "generate", "evaluate"} <= set(times)
    # A second run resumes: every stage is up to date, the report is rewritten from the same outputs.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date") >= 4
    assert json.loads((work / "eval" / "results.json").read_text()) == res


def test_bigbench_records_from_task_json():
    task = {"examples": [
        {"input": "Is it sunny?", "target_scores": {"Yes": 1, "No": 0}},
        {"input": "Two right answers", "target_scores": {"a": 1, "b": 1}},  # dropped: not single-answer
        {"input": "Pick", "target_scores": {"x": 0, "y": 0, "z": 1}},
    ]}  # fmt: skip
    recs = bigbench.to_records(task, "toy")
    assert [r["response"] for r in recs] == ["[A]", "[C]"]
    assert recs[1]["prompt"] == "Pick\nA: x\nB: y\nC: z" and recs[1]["answer"] == 2
    assert np.array_equal([len(r["choices"]) for r in recs], [2, 3])
