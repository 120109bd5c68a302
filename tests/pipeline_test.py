"""The whole pipeline (configs/demo.py:smoke) on the real SmolLM2 and MiniLM, tiny data, in a few minutes."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dnd_jax.data import bigbench
from tests import warm
from tests.evaluate_test import write_fixed_answer_dataset
from tests.train_fixtures import user_env

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


def demo_smoke_cmd(work: Path, data: Path) -> list[str]:
    """configs/demo.py:smoke on the suite of `write_suite`, shrunk further."""
    return [sys.executable, "-m", "dnd_jax.pipeline", "--config", str(REPO / "configs/demo.py:smoke"),
            f"--workdir={work}", f"--config.data.prompts_dir={data}", "--config.data.train_datasets=('t1','t2')",
            "--config.data.heldout_dataset=held", "--config.data.num_texts=4", "--config.data.max_text_length=16",
            "--config.model.features=((4,16,384),(8,8,96),(16,10,66),(4770,10,66))",
            "--config.train.progress=False", "--config.eval.limit=2"]  # fmt: skip


@pytest.mark.needs_models
def test_demo_smoke_pipeline_end_to_end_and_resume(tmp_path):
    data = write_suite(tmp_path / "data")
    work = tmp_path / "run"
    cmd = demo_smoke_cmd(work, data)
    env = user_env()  # one CPU device, as a user's machine
    # (the run's persistent compilation cache, tests/conftest.py, serves the re-runs of the kill trials)
    r = warm.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (work / "report.md").read_text()
    assert "## Headline: gold-response NLL per token" in report and "generated vs this row" in report
    assert "| base |" in report and report in r.stdout
    res = json.loads((work / "eval" / "results.json").read_text())
    kinds = [row["kind"] for row in res["rows"]]
    assert kinds == ["base", "heldout", "control", "retrieval", "training", "training", "generated", "generated"]
    assert "prompt-blind control" in report and (work / "baselines" / "control" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (work / "generated").glob("adapter-*")) == ["adapter-0", "adapter-1"]
    times = json.loads((work / "stages.json").read_text())
    assert {"collect", "train", "generate", "evaluate"} <= set(times)
    # A second run resumes: every stage is up to date, the report is rewritten from the same outputs.
    again = warm.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("up to date") >= 4
    assert json.loads((work / "eval" / "results.json").read_text()) == res
    _kill_trials(cmd, env, work, tmp_path)


def _stable(report: str, workdir: Path) -> str:
    """The report less what legitimately differs between two runs: wall times and the workdir's name."""
    report = report.split("## Wall time per stage")[0].replace(f"runs/{workdir.name}`", "runs/WORKDIR`")
    return re.sub(r"[0-9.]+ s per adapter", "T s per adapter", report)


def _kill_trials(cmd: list[str], env: dict, reference: Path, tmp_path: Path) -> None:
    """SIGKILL the same pipeline at 7 seeded random moments, spread over its stages (tests/kill_trials_test.py
    has the same for `train` and `collect` alone, so kills in and after a collection step are theirs); each
    re-run resumes or skips each stage, and the last one ends with the reference run's results and report.
    The training sets' collections are the reference run's (complete): the chain collects the held-out set only,
    so the collect stage starts half done, as after a kill between two datasets."""
    from tests.kill_trials_test import SEED, Moment, _adapters, kill_chain

    work = tmp_path / "killed"
    for name in ("t1", "t2"):
        shutil.copytree(reference / "collect" / name, work / "collect" / name)
    cmd = [a.replace(f"--workdir={reference}", f"--workdir={work}") for a in cmd]
    rng = np.random.default_rng(SEED + 2)

    stages = ("collect", "train", "generate", "evaluate")

    def after(stage):  # log lines that mean `stage` is over: kill at once instead of waiting
        later = stages[stages.index(stage) + 1 :]
        return (f"[{stage}] up to date", *(f"[{s}] running" for s in later), "[pipeline] this run took")

    u = lambda hi: float(rng.uniform(0, hi))  # noqa: E731
    moments = [Moment(float(rng.uniform(0.1, 1.5))),  # start-up (warm: tests/warm.py)
               Moment(0, "collect/held/.resume.pt.tmp-*", during=True, sooner=after("collect")),
               Moment(u(1.0), "tokens/t1", sooner=after("train")),
               Moment(0, "train/checkpoints/2.orbax-checkpoint-tmp*", during=True, sooner=after("train")),
               Moment(0, ".generated.tmp-*", during=True, sooner=after("generate")),
               Moment(0, "baselines/.control.tmp-*", during=True, sooner=after("evaluate")),
               # once the base row is scored (the adapters' bar appears): the re-run reuses what was scored
               Moment(u(1.5), "log:adapters:", sooner=after("evaluate"))]  # fmt: skip

    def check():
        for p in [*work.glob("stages.json"), *work.glob("*/results.json"), *work.glob("*/generation.json"),
                  *work.glob("collect/*/manifest.json")]:  # fmt: skip
            json.loads(p.read_text())  # a committed JSON file is whole
        for ds in work.glob("collect/*"):
            _adapters(ds) if list(ds.glob("step-*")) else None

    outcomes = kill_chain(cmd, env, work, moments, check, tmp_path)
    print("\n".join(outcomes))
    assert sum("killed" in o for o in outcomes) >= 7, outcomes
    assert "row(s) scored before a stop are reused" in (tmp_path / "final.log").read_text()  # evaluate's journal
    timing = ("seconds_per_call", "compile_s", "seconds_per_adapter", "load_s")
    for name in ("eval/results.json", "generated/generation.json"):
        got = json.loads((work / name).read_text().replace(str(work), str(reference)))  # paths in the rows
        want = json.loads((reference / name).read_text())
        assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}
    for a in sorted((reference / "generated").glob("adapter-*/*.safetensors")):  # the same bytes
        assert (work / a.relative_to(reference)).read_bytes() == a.read_bytes()
    assert _stable((work / "report.md").read_text(), work) == _stable((reference / "report.md").read_text(), reference)


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
