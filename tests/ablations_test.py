"""The ablations: condition forms against the data rows, the prompt pool, dataset arrangements against
a NumPy mean of the token files, arm configs, and the whole suite's :smoke run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dnd_jax.data import prompts
from dnd_jax.errors import DndError
from tests import warm
from tests.pipeline_test import write_suite
from tests.train_fixtures import user_env

REPO = Path(__file__).resolve().parents[1]


def _records(n: int = 400) -> list[dict]:
    return [{"prompt": f"Question {i}?\nA: yes\nB: no", "response": f"[{'AB'[i % 2]}]"} for i in range(n)]


def test_condition_forms_are_the_data_rows():
    recs = _records()
    assert prompts.condition_texts(recs, "prompts", 0, "d") == [r["prompt"] for r in recs]
    assert prompts.condition_texts(recs, "answers", 0, "d") == [r["response"] for r in recs]
    qa = prompts.condition_texts(recs, "prompts_answers", 0, "d")
    assert qa[3] == "Question 3?\nA: yes\nB: noanswer: [B]"  # the original's concatenation, no separator
    mix = prompts.condition_texts(recs, "mix", 0, "d")
    carried = [m == q for m, q in zip(mix, qa, strict=True)]
    assert all(c or m == r["prompt"] for c, m, r in zip(carried, mix, recs, strict=True))
    assert 0.14 < np.mean(carried) < 0.26  # p = 0.2 over 400 texts (binomial sd 0.02)
    assert prompts.condition_texts(recs, "mix", 0, "d") == mix  # fixed per text: seeded by (seed, text)
    assert prompts.condition_texts(recs[::-1], "mix", 0, "other") == mix[::-1]  # not by position or file
    assert prompts.condition_texts(recs, "mix", 1, "d") != mix
    with pytest.raises(DndError, match=r"record 1 has no response.*labeled"):
        prompts.condition_texts([recs[0], {"prompt": "p", "response": ""}], "answers", 0, "d")
    with pytest.raises(DndError, match=r"data.condition: 'answer'"):
        prompts.condition_texts(recs, "answer", 0, "d")


def test_prompts_file_forms(tmp_path):
    recs = _records(4)
    (tmp_path / "p.json").write_text(json.dumps(recs))
    (tmp_path / "p.txt").write_text("\n".join(r["prompt"].splitlines()[0] for r in recs))
    assert prompts.load_prompts_file(tmp_path / "p.json", "answers") == ["[A]", "[B]", "[A]", "[B]"]
    assert prompts.load_prompts_file(tmp_path / "p.txt") == [f"Question {i}?" for i in range(4)]
    with pytest.raises(DndError, match=r"p.txt: a text file holds prompts only; condition form 'mix'"):
        prompts.load_prompts_file(tmp_path / "p.txt", "mix")


def test_trainer_pools_hold_the_configured_texts(tmp_path):
    from dnd_jax.trainer import training_texts
    from tests.train_fixtures import make_experiment, tiny_config

    make_experiment(tmp_path / "exp")
    raw = json.loads((tmp_path / "exp" / "prompts" / "alpha_train.json").read_text())  # the file, read directly
    c = tiny_config(tmp_path / "exp", **{"data.condition": "prompts_answers", "data.max_prompts": 5})
    assert training_texts(c, "alpha") == [r["prompt"] + "answer: " + r["response"] for r in raw[:5]]
    c = tiny_config(tmp_path / "exp", **{"data.condition": "answers"})
    assert training_texts(c, "alpha") == [r["response"] for r in raw]


def test_arrangement_subsets_are_nested_and_their_control_is_their_mean(tmp_path):
    from dnd_jax.data.prepare import open_token_set, prepare_dataset
    from dnd_jax.experiments.many_task import arm_fold
    from tests.train_fixtures import make_experiment, tiny_config

    exp = make_experiment(tmp_path / "exp")
    c = tiny_config(exp, **{"data.real_length": 2})
    names = ("alpha", "beta", "gamma")
    for n in names:
        prepare_dataset(exp / "collect" / n, tmp_path / "tok" / n, c.data.chunk, 2, False, verbose=False)
    c.data.token_dir = str(tmp_path / "tok")
    c.experiment = {"fold_seed": 0, "train_tasks": 1}
    fold = {"fold": 0, "train": list(names), "heldout": ["x"], "mean_tokens": "full.npy"}
    one = arm_fold(c, fold, tmp_path / "v1")
    c.experiment.train_tasks = 2
    two = arm_fold(c, fold, tmp_path / "v2")
    assert len(one["train"]) == 1 and len(two["train"]) == 2 and set(one["train"]) <= set(two["train"])
    oracle = np.mean([np.asarray(open_token_set(tmp_path / "tok" / n, 2).tokens, np.float64)[k]
                      for n in two["train"] for k in range(2)], axis=0)  # fmt: skip
    np.testing.assert_allclose(np.load(two["mean_tokens"]), oracle, rtol=1e-6, atol=1e-7)
    assert (Path(two["control"]) / "adapter_model.safetensors").is_file()
    c.experiment.train_tasks = 4
    with pytest.raises(DndError, match=r"experiment.train_tasks: 4"):
        arm_fold(c, fold, tmp_path / "v4")


def test_arm_configs_change_one_thing_and_keep_suite_overrides():
    from configs.ablations import suite
    from dnd_jax.experiments import ablations

    s = suite.get_config("smoke")
    s.experiment.limit = 2  # a suite-level override reaches every arm
    variants = set()
    for group, arg in ablations.arms(s):
        c = ablations.arm_config(s, group, arg, True)
        assert c.experiment.limit == 2 and "ablations" not in c
        variants.add(c.experiment.variant)
    c = ablations.arm_config(s, "num_conditions", "2", True)
    assert c.data.num_texts == 2 and c.model.features[0][0] == 2
    c = ablations.arm_config(s, "extractors_cv", "decoder_lm", True)
    assert c.encoder.type == "decoder_lm" and c.model.features[0][2] == 576
    assert "reference" in variants and "fewshot-1" in variants
    with pytest.raises(DndError, match=r"ablations.conditions.*'answer,smoke'.*values: prompts, answers"):
        ablations.arm_config(s, "conditions", "answer", True)


@pytest.mark.needs_models
def test_ablation_suite_smoke_end_to_end(tmp_path):
    data = write_suite(tmp_path / "suite")
    work, out = tmp_path / "run", tmp_path / "report"
    cmd = [sys.executable, "-m", "dnd_jax.ablations", "--config", str(REPO / "configs/ablations/suite.py:smoke"),
           f"--workdir={work}", f"--report_dir={out}", f"--config.experiment.commonsense_dir={data}",
           "--config.experiment.commonsense_tasks=('t1','t2','t3','held')",
           "--config.experiment.families=('t1=a','t2=a','t3=b','held=b')",
           "--config.experiment.secondary=()", "--config.experiment.limit=2",  # 2 scored items per task
           # one arm per group (the arms' configs are checked above): each group runs and is reported
           "--config.ablations.groups.conditions=('answers',)", "--config.ablations.groups.num_conditions=('2',)",
           "--config.ablations.groups.arrangements=('1',)", "--config.ablations.groups.fewshot=('1',)"]  # fmt: skip
    env = user_env()  # one CPU device, as a user's machine
    r = warm.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    cv = work / "cv-random-k2-s0"
    held = json.loads((cv / "folds.json").read_text())["folds"][0]["heldout"]
    for v in ("reference", "condition-answers", "texts-2", "train-1", "extractor-static", "fewshot-1"):
        assert all((cv / v / "scores" / f"{t}.json").is_file() for t in held), v
        assert f"| {v} | " in report.replace("| prompts | reference", "| x | reference"), v
    for title in ("Condition forms", "Number of conditions", "Dataset arrangements", "Extractor types", "Few-shot"):
        assert title in report
    assert "not run" not in report
    assert "condition-mix" not in report and "## Reference arm" in report  # the arms chosen; the reference added
    # the few-shot LoRA was trained on exactly 1 example of the held-out task, with its time
    m = json.loads((work / "fewshot" / "n1" / held[0] / "manifest.json").read_text())
    assert m["complete"] and m["config"]["max_samples"] == 1 and m["seconds"] > 0
    # the answers arm's generator conditions were the responses (its saved config)
    tc = json.loads((cv / "condition-answers" / "fold-0" / "seed-999" / "train" / "config.json").read_text())
    assert tc["data"]["condition"] == "answers"
    # ... and the held-out task's conditions came from its train split, never from its scored test items
    gen = json.loads((cv / "condition-answers" / "fold-0" / "seed-999" / "generated" / held[0]
                      / "generation.json").read_text())  # fmt: skip
    assert gen["condition"] == "answers" and gen["split"] == "train"
    again = warm.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "running" not in again.stderr.replace("[report]", ""), again.stderr[-2000:]
