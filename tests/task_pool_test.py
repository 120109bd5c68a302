"""The mixed-format task pool (configs/mixed_task_smollm2.py) and BIG-bench's conversion of generative tasks.

The config and conversion tests run everywhere (toy task.json files, a toy sdist in a temporary cache). The
tests on the real pool read a local BIG-bench once (one pass, about 5 s) and skip without one ($DND_JAX_BIGBENCH,
a copy of the sdist or a checkout; or the sdist cached at $DND_JAX_CACHE/bigbench-1.0.0.tar.gz: the registry no
longer serves it): every task of the config must be in it, and the 10 smallest tasks of each format are built
and checked.
"""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from configs import mixed_task_smollm2 as pool
from dnd_jax.assets import cache_dir
from dnd_jax.data import bigbench
from dnd_jax.errors import DndError
from dnd_jax.experiments import folds, leaks

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
GENERATIVE = {t for t, _ in (*pool.NATURAL_INSTRUCTIONS_TASKS, *pool.GENERATIVE_TASKS)}
SDIST = cache_dir() / bigbench.SDIST
REAL = Path(os.environ.get(bigbench.SOURCE_ENV) or SDIST)  # a local BIG-bench, as `bigbench.source` finds it
needs_sdist = pytest.mark.skipif(not REAL.exists(), reason=f"no local BIG-bench (set {bigbench.SOURCE_ENV}, or "
                                 f"cache the sdist at {SDIST})")  # fmt: skip


@pytest.fixture(autouse=True)
def _toy_sources_only(monkeypatch):
    """The toy sdists below are read through $DND_JAX_CACHE: a user's $DND_JAX_BIGBENCH must not shadow them."""
    monkeypatch.delenv(bigbench.SOURCE_ENV, raising=False)


def real_members() -> dict[str, tuple[int, object]]:
    """{member path as in the sdist: (size, () -> its bytes)} of every task.json of the local BIG-bench."""
    if REAL.is_dir():
        root = bigbench._tasks_root(REAL)
        return {f"{ROOT}/{f.parent.relative_to(root)}/task.json": (f.stat().st_size, f.read_bytes)
                for f in root.rglob("task.json")}  # fmt: skip
    out = {}
    with tarfile.open(REAL, "r:gz") as tar:
        for m in tar:
            if (key := bigbench.member_key(m.name)).endswith("/task.json"):
                data = tar.extractfile(m).read() if m.size < 400_000 else b""
                out[f"{ROOT}/{key}"] = (m.size, lambda d=data: d)
    return out


def write_sdist(path, tasks: dict[str, bytes | dict]) -> None:
    """A tar.gz laid out as the BIG-bench sdist, with these task.json members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            data = task if isinstance(task, bytes) else json.dumps(task).encode()
            info = tarfile.TarInfo(f"{ROOT}/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def gen_task(n: int, target=lambda i: f"out {i}", text=lambda i: f"in {i}", **fields) -> dict:
    return {"examples": [{"input": text(i), "target": target(i)} for i in range(n)], **fields}


# --- the config -------------------------------------------------------------------------------------------


def test_pool_size_formats_and_families():
    c = pool.get_config()
    e = c.experiment
    names = [*e.bigbench_tasks, *e.commonsense_tasks]
    assert len(names) >= 120 and len(set(names)) == len(names)
    assert len(set(e.bigbench_tasks) & GENERATIVE) >= 60
    assert {t for t, _ in pool.MULTIPLE_CHOICE_TASKS} <= set(e.bigbench_tasks)  # today's 48 tasks are all in
    assert len(pool.NATURAL_INSTRUCTIONS_TASKS) == 60 and not any("subtask053" in t for t in e.bigbench_tasks)
    assert not any("/de_" in t or "german" in t for t in e.bigbench_tasks)  # English only
    fam = folds.families(c)
    assert set(fam) == {bigbench.task_name(t) for t in names}  # every task has its family
    # Source datasets: a common-sense set with its BIG-bench / Natural Instructions relatives.
    assert fam["ARC-c"] == fam["ARC-e"] == fam["natural_instructions-subtask047_misc_answering_science_questions"]
    assert fam["SIQA"] == fam["social_iqa"] and fam["WinoGrande"] == fam[
        "natural_instructions-subtask033_winogrande_answer_generation"]  # fmt: skip
    assert fam["unit_conversion-unit_identification"] == fam["unit_conversion-unit_addition_general"]
    assert e.split == "family" and e.secondary == ("em",)
    assert pool.get_config("random").experiment.split == "random"
    with pytest.raises(ValueError, match="unknown config argument"):
        pool.get_config("famliy")


@pytest.mark.parametrize("split", ["family", "random"])
def test_folds_keep_families_and_linked_tasks_together(split):
    c = pool.get_config("" if split == "family" else "random")
    e = c.experiment
    names = [*(bigbench.task_name(t) for t in e.bigbench_tasks), *e.commonsense_tasks]
    fam, linked = folds.families(c), folds.declared_links(c)
    got = folds.assign_folds(names, e.folds, e.fold_seed, e.split, fam, linked)
    fold_of = {t: f for f, held in enumerate(got) for t in held}
    assert sorted(fold_of) == sorted(names) and all(len(held) >= 2 for held in got)
    for group in linked:
        assert len({fold_of[t] for t in group}) == 1, group
    if split == "family":
        for family in set(fam.values()):
            assert len({fold_of[t] for t, f in fam.items() if f == family}) == 1, family


def test_smoke_has_both_formats():
    e = pool.get_config("smoke").experiment
    assert set(e.bigbench_tasks) & GENERATIVE and set(e.bigbench_tasks) - GENERATIVE
    assert e.split == "family" and pool.get_config("smoke,random").experiment.split == "random"
    fam = {f.split("=")[0] for f in e.families}
    assert fam == {bigbench.task_name(t) for t in (*e.bigbench_tasks, *e.commonsense_tasks)}


# --- conversion -------------------------------------------------------------------------------------------


def test_generative_records_use_the_tasks_own_format():
    task = {"task_prefix": "Sort the words.", "example_input_prefix": "\nList: ", "example_output_prefix": "\nSorted: ",
            "examples": [{"input": "b a", "target": " a b "},
                         {"input": "d c", "target": ["c d", "c  d", ""]},
                         {"input": "b a", "target": "a b!"},   # exact repeat: one item, answers merged
                         {"input": "B  a", "target": "x"},     # near repeat (case, spaces): left out
                         {"input": "f e", "target": 3},        # non-text target: left out
                         {"input": "", "target": "x"}]}  # fmt: skip
    assert bigbench.task_format(task) == "generative"
    recs = bigbench.to_records(task, "toy")
    assert recs == [
        {"prompt": "Sort the words.\nList: b a\nSorted:", "response": "a b", "system": "", "answers": ["a b", "a b!"],
         "format": "generative"},
        {"prompt": "Sort the words.\nList: d c\nSorted:", "response": "c d", "system": "", "answers": ["c d", "c  d"],
         "format": "generative"},
    ]  # fmt: skip
    # BIG-bench's default prefixes where a task sets none.
    assert bigbench.to_records({"examples": [{"input": " 2+2 ", "target": "4"}]}, "toy")[0]["prompt"] == "Q:  2+2 \nA:"
    assert [bigbench.record_format(r) for r in recs] == ["generative"] * 2


def test_multiple_choice_records_are_unchanged():
    task = {"examples": [{"input": "Pick", "target": "z", "target_scores": {"x": 0, "y": 0, "z": 1}}]}
    assert bigbench.task_format(task) == "multiple_choice"  # target_scores decide, even beside a target
    (rec,) = bigbench.to_records(task, "toy")
    assert rec == {"prompt": "Pick\nA: x\nB: y\nC: z", "response": "[C]", "system": bigbench.SYSTEM,
                   "choices": ["x", "y", "z"], "answer": 2}  # fmt: skip
    assert bigbench.record_format(rec) == "multiple_choice"


def test_prompt_key_is_the_leak_checks_comparison():
    for p in ["Context Word: Stones.", "op -58 =", "{ } ( [ ] )\nA: Valid", "Ünïcode  _x_ ", ""]:
        assert bigbench.prompt_key(p) == leaks.normalize(p)


def test_unusable_tasks_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DND_JAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    sdist = tmp_path / "cache" / bigbench.SDIST
    write_sdist(sdist, {
        "good": gen_task(150, task_prefix="Echo."),
        "parent": {"name": "parent", "subtasks": []},
        "few": gen_task(20),
        "empty": gen_task(150, target=lambda i: ["", "  "]),
        "cyrillic": gen_task(150, text=lambda i: f"Переведите слово {i}", target=lambda i: f"слово {i}"),
        "mc/few": {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}] * 30},
    })  # fmt: skip
    tasks = ["good", "parent", "few", "empty", "cyrillic", "mc/few"]
    out = bigbench.build(tmp_path / "data", tasks, test_size=20, seed=0)
    lines = capsys.readouterr().out.splitlines()
    skipped = bigbench.skipped(out)
    assert sorted(skipped) == sorted(tasks[1:])
    assert [ln for ln in lines if "skipped" in ln] == [f"BIG-bench task {t}: skipped ({skipped[t]})" for t in tasks[1:]]
    assert "no examples" in skipped["parent"] and "20 usable examples, fewer than 100" in skipped["few"]
    assert "non-empty text target" in skipped["empty"] and "not English" in skipped["cyrillic"]
    assert "30 usable examples" in skipped["mc/few"]
    reg = json.loads((out / "dataset_info.json").read_text())
    assert sorted(reg) == ["good_test", "good_train"]
    train, test = (json.loads((out / f"good_{s}.json").read_text()) for s in ("train", "test"))
    assert len(test) == 20 and len(train) == 130 and train[0]["prompt"].startswith("Echo.\nQ: in ")
    sdist.unlink()  # built: a second call reads nothing, skipped tasks included
    assert bigbench.build(tmp_path / "data", tasks, test_size=20, seed=0) == out
    with pytest.raises(DndError, match="no BIG-bench task nosuch"):  # a name the sdist lacks is an error
        write_sdist(sdist, {"good": gen_task(150)})
        bigbench.build(tmp_path / "data2", ["good", "nosuch"], test_size=20)


@pytest.mark.needs_models
def test_whole_examples_drops_what_the_cutoff_would_cut(tmp_path, monkeypatch, capsys):
    """The pool's recipe keeps only examples that fit collect.cutoff_len whole (SmolLM2's tokenizer, chat format);
    a task left with too few is skipped saying how many fit."""
    from dnd_jax.assets import smollm2_path
    from dnd_jax.lm import encode_sft_example

    c = pool.get_config()
    assert c.experiment.whole_examples and c.collect.cutoff_len == 512
    assert not pool.get_config("smoke").experiment.whole_examples
    (tmp_path / "cache").mkdir()
    model = smollm2_path()  # the toy sdist gets a cache of its own; the dequantized model is linked, not redone
    (tmp_path / "cache" / model.name).symlink_to(model, target_is_directory=True)
    monkeypatch.setenv("DND_JAX_CACHE", str(tmp_path / "cache"))
    long = " ".join(["word"] * 600)  # ~600 tokens: over the cut-off
    write_sdist(tmp_path / "cache" / bigbench.SDIST, {
        "mixed": gen_task(160, text=lambda i: f"{long} question {i}?" if i % 4 == 0 else f"question {i}?"),
        "mostly_long": gen_task(150, text=lambda i: f"{long} {i}" if i % 2 else f"short {i}"),
    })  # fmt: skip
    fits = bigbench.whole_examples(c.collect.model, c.collect.cutoff_len)
    out = bigbench.build(tmp_path / "data", ["mixed", "mostly_long"], test_size=20, seed=0, fits=fits)
    assert "75 of its 150 usable examples fit the cut-off whole, fewer than 100" in bigbench.skipped(out)["mostly_long"]
    recs = [r for s in ("train", "test") for r in json.loads((out / f"mixed_{s}.json").read_text())]
    assert len(recs) == 120 and not any("word word" in r["prompt"] for r in recs)
    from transformers import AutoTokenizer

    from dnd_jax.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(c.collect.model))
    assert max(len(encode_sft_example(tok, r, 1 << 30)[0]) for r in recs) <= 512


# --- the real pool, from the cached sdist -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(task.json members of the real sdist, a data directory of the 10 smallest pool tasks of each format)."""
    tasks = [t for t, _ in pool.BIGBENCH_TASKS]
    paths = {f"{ROOT}/{t}/task.json": t for t in tasks}
    found = real_members()
    members = set(found)
    small = {paths[m]: (size, read()) for m, (size, read) in found.items() if m in paths and size < 400_000}
    picked = {}
    for generative in (False, True):
        fmt = sorted((size, t) for t, (size, _) in small.items() if (t in GENERATIVE) == generative)
        picked.update({t: small[t][1] for _, t in fmt[:10]})
    tmp = tmp_path_factory.mktemp("pool")
    (tmp / "cache").mkdir()
    write_sdist(tmp / "cache" / bigbench.SDIST, picked)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DND_JAX_CACHE", str(tmp / "cache"))
        mp.delenv(bigbench.SOURCE_ENV, raising=False)  # the sample sdist, not the local copy it was taken from
        c = pool.get_config()
        e = c.experiment
        bigbench.build(tmp / "data", sorted(picked), e.test_size, c.seed, e.max_train, e.max_choices)
    return members, tmp / "data", sorted(picked)


@needs_sdist
def test_every_pool_task_is_in_the_sdist(sample):
    members, _, _ = sample
    missing = [t for t, _ in pool.BIGBENCH_TASKS if f"{ROOT}/{t}/task.json" not in members]
    assert not missing


@needs_sdist
def test_sample_builds_in_its_format_without_leaks(sample):
    _, data, tasks = sample
    assert len(tasks) == 20 and len(set(tasks) & GENERATIVE) == 10 and not bigbench.skipped(data)
    from dnd_jax.data.prompts import load_split

    names = [bigbench.task_name(t) for t in tasks]
    for t, n in zip(tasks, names, strict=True):
        for split in ("train", "test"):
            recs = load_split(data, f"{n}_{split}")
            assert len(recs) >= 30 and all(r["response"].strip() and r["prompt"].strip() for r in recs)
            assert {bigbench.record_format(r) for r in recs} == {"generative" if t in GENERATIVE else "multiple_choice"}
            if t in GENERATIVE:
                assert all(r["system"] == "" and r["answers"][0] == r["response"] for r in recs)
            else:
                assert all(set(r) == {"prompt", "response", "system", "choices", "answer"} for r in recs)
    train, test = leaks.split_prompts(data, names, "train"), leaks.split_prompts(data, names, "test")
    found = leaks.check(train, test)
    gen_names = {bigbench.task_name(t) for t in tasks if t in GENERATIVE}
    assert not (set(found["within"]) | set(found["repeated"])) & gen_names  # one item per prompt
    for n in names:  # multiple choice keeps its repeats as built before: the leak check drops them from scoring
        scored = leaks.scored_indices(len(test[n]), found["exclude"].get(n, []), 10**6)
        assert not {test[n][i] for i in scored} & set(train[n])
