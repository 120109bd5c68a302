"""The many-task experiment end to end (the mixed pool's :smoke, a superset of the 48-task one), resumed, and its
statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dnd_jax.errors import DndError
from dnd_jax.experiments import folds as folds_mod
from dnd_jax.experiments import leaks, scoring, stats
from tests import warm
from tests.bigbench_fixture import write_bigbench
from tests.pipeline_test import write_suite
from tests.train_fixtures import user_env

REPO = Path(__file__).resolve().parents[1]


def plant_leak(data: Path, src: str, dst: str, item: int = 0) -> dict:
    """Copies test item `item` of task `src` into the train split of task `dst` (an exact, re-cased and
    re-spaced copy: the normalised prompts match); returns the planted record."""
    test = json.loads((data / f"{src}_test.json").read_text())
    train = json.loads((data / f"{dst}_train.json").read_text())
    rec = dict(test[item], prompt="  " + test[item]["prompt"].upper().replace("\n", " \n\t "))
    (data / f"{dst}_train.json").write_text(json.dumps([*train, rec]))
    return test[item]


@pytest.mark.needs_models
def test_experiment_smoke_end_to_end_resume_leaks_prompt_swap_and_soft_retrieval(tmp_path):
    """The mixed pool's `:smoke` (configs/mixed_task_smollm2.py, which is configs/many_task_smollm2.py's smoke on a
    pool with generative tasks): a stop after training and a resume, a planted leak, family folds, two generator
    seeds, every generator scored with swapped prompts, exact match as the secondary metric, the decisive headline,
    the soft-retrieval arm, a run with nothing left to do, and an evaluation-only change."""
    data = write_suite(tmp_path / "suite")  # t1, t2, t3, held: four tiny two-option tasks (t3 is not used here)
    planted = plant_leak(data, "held", "t2")  # a scored item of `held` in t2's train split
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "dnd_jax.experiment", "--config", str(REPO / "configs/mixed_task_smollm2.py:smoke"),
           f"--workdir={work}", f"--config.experiment.commonsense_dir={data}",
           "--config.experiment.commonsense_tasks=('t1','t2','held')",
           # one BIG-bench task of each format (the smoke's object_counting is a second generative one: left out)
           "--config.experiment.bigbench_tasks=('navigate','tense')",
           "--config.experiment.families=('navigate=navigate','tense=tense','t1=a','t2=a','held=b')",
           # 2 scored items per task (the first is the planted one), exact match on 1: scoring is most of the run
           "--config.experiment.limit=2", "--config.experiment.secondary_limit=1",
           "--config.experiment.training_sample=1",  # one sampled training LoRA row per task (the smoke's is 2)
           ]  # fmt: skip
    env = user_env()  # one CPU device, as a user's machine
    env["DND_JAX_BIGBENCH"] = str(write_bigbench(tmp_path / "bigbench"))  # a local BIG-bench (synthetic tasks)
    first = warm.run([*cmd, "--until=train"], env=env, capture_output=True, text=True)  # a stop mid-way
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (work / "report.md").exists()
    r = warm.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("up to date") == 5  # data, collect, tokens, folds, train: resumed, not redone
    cv = work / "cv-family-k2-s0"
    made = json.loads((cv / "folds.json").read_text())
    folds = made["folds"]
    fold_of = {t: f["fold"] for f in folds for t in f["heldout"]}
    assert sorted(fold_of) == ["held", "navigate", "t1", "t2", "tense"]
    family = {"t1": "a", "t2": "a", "held": "b"}  # the BIG-bench tasks are each a family of their own
    assert all(fold_of[t] == fold_of[u] for t in fold_of for u in fold_of if family.get(t, t) == family.get(u, u))
    # The planted leak: held and t2 share a fold (so t2 never trains held's generator), the item stays scored.
    assert fold_of["held"] == fold_of["t2"] and ["t2", "held"] in made["leaks"]["linked"]
    assert 0 not in folds[fold_of["held"]]["plans"]["held"]["exclude"]
    # No scored item of any held-out task is in the train split of a task its fold trains on, or its own.
    common = ["held", "t1", "t2"]
    train_p = leaks.split_prompts(work / "data", sorted(fold_of), "train")
    for f in folds:
        for t in f["heldout"]:
            recs = json.loads(((data if t in common else work / "data") / f"{t}_test.json").read_text())
            keep = leaks.scored_indices(len(recs), f["plans"][t]["exclude"], 2)
            scored = {leaks.normalize(recs[i]["prompt"]) for i in keep}
            assert leaks.normalize(planted["prompt"]) in scored or t != "held"
            assert not scored & {p for u in [*f["train"], t] for p in train_p[u]}
            for seed in (999, 1000):
                assert (cv / "dnd" / f"fold-{f['fold']}" / f"seed-{seed}" / "generated" / t / "adapter-0"
                        / "adapter_config.json").is_file()  # fmt: skip
    scores = json.loads((cv / "scores" / "held.json").read_text())
    assert {"base", "own", "control", "retrieval", "training"} <= set(scores)
    assert scores["items"] == 2 and scores["settings"]["limit"] == 2
    assert scores["own"]["nll"]["nll"] < scores["base"]["nll"]["nll"]  # the task's own LoRA learned its answers
    assert "em" not in scores["base"]  # exact match reads free-text answers: not scored on a multiple-choice task
    gen = json.loads((cv / "dnd" / "scores" / "held.json").read_text())
    assert sorted(gen["generated"]) == ["1000", "999"] and gen["settings"]["seeds"] == ["999", "1000"]
    # The generative task keeps its own target as the response, under no shared system prompt.
    rec = json.loads((work / "data" / "tense_test.json").read_text())[0]
    assert rec["format"] == "generative" and rec["system"] == "" and rec["response"] in rec["answers"]
    assert not rec["response"].startswith("[")
    # Own and swapped adapters of the generative task, scored on its own items, with exact match.
    got = json.loads((cv / "dnd" / "scores" / "tense.json").read_text())
    assert sorted(got["generated"]) == sorted(got["swapped"]) == ["1000", "999"]
    assert got["settings"]["secondary"] == ["em"] and got["generated"]["999"][0]["em"]["n"] == 1
    made = json.loads((cv / "dnd" / f"fold-{fold_of['tense']}" / "seed-999" / "generated" / "tense"
                       / "generation.json").read_text())  # fmt: skip
    mates = [t for t, f in fold_of.items() if f == fold_of["tense"] and t != "tense"]
    assert made["swapped_from"] in mates
    report = (work / "report.md").read_text()
    for row in ("prompt-blind control", "retrieval", "training LoRAs", "own LoRA", "generated (dnd)",
                "Time to an adapter", "per seed vs control", "answer-only NLL", "Leak check", "held in t2: 1",
                "| row | em/em |"):  # fmt: skip
        assert row in report, row
    assert "Tasks by answer format: em on 1 of 5 (the rest have the other format)." in report
    assert "Prompt swap:" in report and "- **dnd**: " in report.split("Prompt swap:")[1]
    fam = report.split("## What transfers, per family")[1].split("\n## ")[0]  # per family, control - generated
    assert "| family | tasks | dnd |" in fam and "| tense | 1 | " in fam and "| a | 2 | " in fam
    assert (work / "many_task.png").stat().st_size > 5000
    # The soft-retrieval arm on the same items: tau chosen inside each fold's training tasks.
    arm = ["--config.experiment.variant=soft_retrieval", "--config.experiment.baseline=soft_retrieval"]
    soft = warm.run([*cmd, *arm], env=env, capture_output=True, text=True)
    assert soft.returncode == 0, soft.stderr[-3000:]
    assert soft.stderr.count("[train/dnd]") == 0 and "[evaluate/soft_retrieval] running" in soft.stderr
    picked = json.loads((cv / "soft_retrieval" / "soft_retrieval.json").read_text())
    assert sorted(picked) == sorted(fold_of)
    assert json.loads((cv / "soft_retrieval" / "scores" / "tense.json").read_text())["generated"]["soft"]
    report = (work / "report.md").read_text()
    assert "soft_retrieval (not generated: the softmax(cos / tau)-weighted mean" in report
    # The headline is fixed before the run and says which rows it still waits for (here the SFT issue's mt_lora).
    answer = report.split("## The answer")[1].split("\n## ")[0]
    assert "Not answered yet: no scores of mt_lora in this run." in answer
    # Nothing left to do: every stage is up to date and the report reads the same.
    again = warm.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "running" not in again.stderr.replace("[report] running", ""), again.stderr[-2000:]
    assert (work / "report.md").read_text().split("## Time to")[0] == report.split("## Time to")[0]
    # An evaluation-only change re-scores (stored settings differ) without retraining or regenerating (the
    # secondary metric off as well, and only held's fold run, to re-score quickly).
    more = warm.run([*cmd, "--config.experiment.limit=1", "--config.experiment.secondary=()",
                     f"--config.experiment.run_folds=({fold_of['held']},)"], env=env, capture_output=True,
                    text=True)  # fmt: skip
    assert more.returncode == 0, more.stderr[-2000:]
    assert "[train/dnd] up to date" in more.stderr and "[adapters/dnd] up to date" in more.stderr
    assert "[evaluate/dnd] running" in more.stderr
    assert json.loads((cv / "scores" / "held.json").read_text())["settings"]["limit"] == 1


def test_secondary_protocols_score_only_the_answer_format_they_read():
    """ll and gen read lettered options, em a generative task's free-text targets: a mixed pool's configured
    protocols each score the tasks of their format (the order kept), a task of neither format none."""
    mc = [{"prompt": "Q\nA: x\nB: y", "response": "[B]", "system": "s", "choices": ["x", "y"], "answer": "B"}]
    free = [{"prompt": "Sort: b a", "response": "a b", "system": "", "answers": ["a b"], "format": "generative"}]
    assert scoring.secondary_protocols(("em", "gen", "ll"), mc) == ("gen", "ll")
    assert scoring.secondary_protocols(("em", "gen", "ll"), free) == ("em",)
    assert scoring.secondary_protocols(("em",), mc) == () and scoring.secondary_protocols(("ll",), []) == ()


def test_folds_cover_every_task_once_and_family_split_keeps_families_together():
    names = [f"t{i}" for i in range(23)]
    folds = folds_mod.assign_folds(names, 5, seed=0)
    assert sorted(t for f in folds for t in f) == sorted(names)
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    assert folds_mod.assign_folds(names, 5, seed=0) == folds and folds_mod.assign_folds(names, 5, seed=1) != folds
    fam = {n: f"f{i % 7}" for i, n in enumerate(names)}
    ffolds = folds_mod.assign_folds(names, 5, 0, "family", fam)
    assert sorted(t for f in ffolds for t in f) == sorted(names)
    for f in ffolds:
        for t in f:
            assert all(fam[u] != fam[t] for g in ffolds if g is not f for u in g)
    with pytest.raises(DndError, match=r"experiment\.split"):
        folds_mod.assign_folds(names, 5, 0, "bogus")


def test_paired_statistics_against_a_plain_numpy_oracle():
    rng = np.random.default_rng(0)
    control = rng.uniform(0.5, 1.5, 40)
    generated = control - 0.1 + rng.normal(0, 0.05, 40)  # better (lower NLL) by 0.1 on average
    own = control - 0.4
    st = stats.paired(generated, control, 4000, 0, tie=0.01)
    d = control - generated
    assert st["mean"] == pytest.approx(d.mean())
    assert st["wins"] + st["ties"] + st["losses"] == 40 and st["wins"] == int((d > 0.01).sum())
    # The percentile bootstrap CI brackets the mean and has about the normal-theory width.
    se = d.std(ddof=1) / np.sqrt(40)
    assert st["ci"][0] < d.mean() < st["ci"][1]
    assert (st["ci"][1] - st["ci"][0]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    gap = stats.gap_closed(control, generated, own, 2000, 0)
    assert gap["fraction"] == pytest.approx(d.mean() / 0.4) and gap["ci"][0] < gap["fraction"] < gap["ci"][1]
    null = stats.paired(control, control, 1000, 0, tie=0.0)
    assert null["mean"] == 0 and null["ties"] == 40 and null["ci"] == [0.0, 0.0]


def test_leak_check_links_tasks_drops_items_and_the_folds_keep_them_together():
    norm = leaks.normalize
    assert norm("  Which IS it?\nA: x ") == norm("which is it? a: x") == "which is it? a: x"
    assert norm("{ ( ) }\nA: valid") != norm("( { } )\nA: valid")  # punctuation can be the content
    train = {t: [norm(f"{t} item {i}") for i in range(6)] for t in ("a", "b", "c", "d", "e", "f")}
    test = {t: [norm(f"{t} test {i}") for i in range(5)] for t in train}
    test["a"][1] = train["a"][3]  # within a task
    test["a"][4] = test["a"][0]  # a repeated test item
    test["c"][2] = train["e"][0]  # c's scored item is in e's train split
    found = leaks.check(train, test)
    assert found["within"] == {"a": [1]} and found["repeated"] == {"a": [4]}
    assert found["cross"] == [{"test_task": "c", "train_task": "e", "items": [2]}]
    assert found["exclude"] == {"a": [1, 4]} and found["linked"] == [["c", "e"]]  # c's item: its fold keeps e
    assert leaks.scored_indices(5, found["exclude"]["a"], 3) == [0, 2, 3]
    names = list(train)
    for seed in range(20):  # c and e (found) and a, b (declared) always share a fold, under either split
        for split in ("random", "family"):
            fam = {n: n for n in names}
            fs = folds_mod.assign_folds(names, 3, seed, split, fam, found["linked"] + [["a", "b"]])
            where = {t: i for i, f in enumerate(fs) for t in f}
            assert sorted(where) == sorted(names) and where["c"] == where["e"] and where["a"] == where["b"]
            folds = [{"heldout": f, "train": [n for n in names if n not in f]} for f in fs]
            scored = {t: [test[t][i] for i in leaks.scored_indices(5, found["exclude"].get(t, []), 5)] for t in names}
            leaks.audit(folds, train, scored)  # passes: nothing scored reaches training
    bad = [{"heldout": ["c"], "train": ["e"]}]
    with pytest.raises(DndError, match=r"leak check: 1 scored item\(s\) of held-out task 'c'"):
        leaks.audit(bad, train, {"c": test["c"]})  # without the fix the planted item would be trained on
    # Without links, the random split is the plain seeded round robin of before (sizes differ by <= 1).
    plain = folds_mod.assign_folds(names, 3, 0)
    perm = np.random.default_rng([0, 17]).permutation(6)
    assert plain == [[n for j, n in enumerate(names) if list(perm).index(j) % 3 == f] for f in range(3)]


def test_seed_aware_bootstrap_and_undefined_statistics():
    rng = np.random.default_rng(1)
    n, groups = 30, np.repeat(np.arange(5), 6)
    control = rng.uniform(0.5, 1.5, n)
    # Two generator seeds per fold: a fold-level seed effect of +-0.05, no task-level difference from control.
    effect = rng.choice([-0.05, 0.05], size=(5, 2))
    generated = control[:, None] + effect[groups] + rng.normal(0, 1e-3, (n, 2))
    with_seeds = stats.paired(generated, control, 4000, 0, tie=0.0, groups=groups)
    one_seed = stats.paired(generated[:, :1], control, 4000, 0, tie=0.0, groups=groups)
    naive = stats.paired(generated.mean(1), control, 4000, 0, tie=0.0)
    assert with_seeds["seeds"] == 2 and len(with_seeds["per_seed"]) == 2
    np.testing.assert_allclose(with_seeds["per_seed"], (control[:, None] - generated).mean(0))
    # Resampling each fold's seeds widens the interval over the task-only bootstrap of seed means.
    width = with_seeds["ci"][1] - with_seeds["ci"][0]
    assert width > 1.5 * (naive["ci"][1] - naive["ci"][0])
    assert one_seed["seeds"] == 1 and with_seeds["mean"] == pytest.approx(naive["mean"])
    # gap closed: a resample without a gap is undefined; the interval skips it and says how often.
    own = control.copy()
    own[:3] -= 5.0  # the gap rests on 3 tasks: some resamples miss all three
    gap = stats.gap_closed(control, control - 0.01, own, 2000, 0)
    assert 0 < gap["undefined"] < 0.2 and np.isfinite(gap["ci"]).all()
    flat = stats.gap_closed(control, control, control, 200, 0)
    assert flat["undefined"] == 1.0 and np.isnan(flat["fraction"]) and np.isnan(flat["ci"]).all()


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


@pytest.mark.needs_models
def test_retrieval_picks_a_planted_near_duplicate(tmp_path):
    """Real MiniLM embeddings: the held-out task's prompts are paraphrases of one training task's; retrieval
    must pick that task, whichever it is, and the similarity must favour it clearly."""
    import ml_collections

    from configs import many_task_smollm2
    from dnd_jax.experiments import baselines

    topics = {"stars": "Which star in the night sky shines brightest in {m}?",
              "soup": "Which soup recipe tastes best when cooked in {m}?",
              "trains": "Which railway line runs the fastest trains in {m}?"}  # fmt: skip
    months = ["January", "March", "May", "July", "September", "November"]
    for near in ("stars", "trains"):
        data = tmp_path / near
        data.mkdir()
        info = {}
        for t, q in topics.items():
            for split in ("train", "test"):
                recs = [{"prompt": q.format(m=m), "response": "[A]"} for m in months]
                (data / f"{t}_{split}.json").write_text(json.dumps(recs))
                info[f"{t}_{split}"] = {"file_name": f"{t}_{split}.json"}
        para = topics[near].replace("Which", "Tell me which").replace("?", ", please.")
        recs = [{"prompt": para.format(m=m), "response": "[A]"} for m in months]
        for split in ("train", "test"):
            (data / f"held_{split}.json").write_text(json.dumps(recs))
            info[f"held_{split}"] = {"file_name": f"held_{split}.json"}
        (data / "dataset_info.json").write_text(json.dumps(info))
        c = ml_collections.ConfigDict({"encoder": many_task_smollm2.get_config("smoke").encoder.to_dict(),
                                       "data": {"prompts_dir": str(data), "max_text_length": 32}})  # fmt: skip
        emb = baselines.prompt_embeddings(c, [*topics, "held"], n=6)
        best, sim = baselines.retrieve(emb, "held", list(topics))
        others = [float(emb["held"]["test"] @ emb[t]["train"]) for t in topics if t != near]
        assert best == near and sim > max(others) + 0.05, (near, sim, others)


def test_answer_reading_conditions_never_read_scored_items(tmp_path):
    """Conditions that read answers come from the held-out task's train split, which (after the leak check)
    holds none of its scored items; unlabeled-prompt conditions read its test prompts, never answers."""
    import ml_collections

    from dnd_jax.experiments.generation import condition_records
    from tests.pipeline_test import write_suite

    data = write_suite(tmp_path / "suite")
    planted = plant_leak(data, "held", "held")  # a test item also in the task's own train split
    c = ml_collections.ConfigDict({"data": {"prompts_dir": str(data)}, "generate": {"split": "test"},
                                   "eval": {"split": "test"}, "experiment": {"limit": 4}})  # fmt: skip
    train = leaks.split_prompts(data, ["held"], "train")
    test = leaks.split_prompts(data, ["held"], "test")
    found = leaks.check(train, test)
    assert 0 in found["exclude"]["held"]
    plan = {"exclude": found["exclude"]["held"]}
    scored = {leaks.normalize(r["prompt"]) for r in folds_mod.scored_records(c, "held", plan)}
    assert leaks.normalize(planted["prompt"]) not in scored and len(scored) == 4
    for form in ("answers", "prompts_answers", "mix"):
        recs = condition_records(c, "held", form)
        assert recs == json.loads((data / "held_train.json").read_text())
        assert not scored & {leaks.normalize(r["prompt"]) for r in recs}
    prompts_only = condition_records(c, "held", "prompts")
    assert [r["prompt"] for r in prompts_only] == [
        r["prompt"] for r in json.loads((data / "held_test.json").read_text())
    ]


def test_family_table_puts_bigbench_subtasks_in_their_configured_family():
    """BIG-bench subtasks are configured as "group/subtask=family" and named "group-subtask" in the data: the report's
    per-family table puts them in that family, as the fold builder does, not each in a family of its own."""
    from dnd_jax.experiments.report import _family_section

    e = {"families": ("logical_deduction/three_objects=logic", "epistemic_reasoning=logic", "ARC-c=science")}
    names = ["logical_deduction-three_objects", "epistemic_reasoning", "ARC-c"]
    nll = {"control": np.array([1.0, 2.0, 3.0]), "generated:v": np.array([[0.5, 0.7], [1.9, 2.1], [3.5, 3.5]])}
    table = "\n".join(_family_section(e, names, nll, ["v"]))
    assert "| logic | 2 | +0.2000 |" in table and "| science | 1 | -0.5000 |" in table, table
    assert "logical_deduction" not in table
