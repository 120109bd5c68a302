"""The many-task experiment's SFT-mode parts without training: mt_lora's one adapter as every held-out task's row,
and the report section (fits per fold, fold 0's held-out curve, the paired comparison with mt_lora)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from dnd_jax.errors import DndError
from dnd_jax.experiments.generation import copy_mt_lora, generated_ok
from dnd_jax.experiments.sft_report import sft_section


def _config(k: int = 2):
    c = ml_collections.ConfigDict()
    c.experiment = ml_collections.ConfigDict({"num_adapters": k})
    c.train = ml_collections.ConfigDict({"objective": "mt_lora"})
    return c


def test_mt_lora_adapter_is_copied_for_every_heldout_task(tmp_path):
    src = tmp_path / "train" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    info = {"num_adapters": 2, "step": 60}
    got = copy_mt_lora(tmp_path / "train", ["a", "b"], _config(), tmp_path / "gen", info)
    assert got["adapters"] == 4
    for t in ("a", "b"):
        assert generated_ok(tmp_path / "gen" / t, info)
        for i in range(2):
            assert (tmp_path / "gen" / t / f"adapter-{i}" / "adapter_model.safetensors").read_bytes() == b"weights"
    with pytest.raises(DndError, match="no mt_lora adapter"):
        copy_mt_lora(tmp_path / "none", ["a"], _config(), tmp_path / "gen2", info)
    assert not (tmp_path / "gen2").exists()


def _run(cv: Path, variant: str, fold: int, objective: str, rows: list[dict]) -> None:
    d = cv / variant / f"fold-{fold}" / "seed-999" / "train"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"objective": objective}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_section_shows_fits_the_heldout_curve_and_sft_vs_mt_lora(tmp_path):
    cv = tmp_path / "cv"
    for v, obj, end in (("sft", "sft", 0.5), ("mt_lora", "mt_lora", 0.7)):
        for f in (0, 1):
            _run(cv, v, f, obj, [{"step": 0, "heldout/nll": 1.0, "trainfit/nll": 1.2},
                                 {"step": 10, "heldout/nll": end + f, "trainfit/nll": end - 0.1}])  # fmt: skip
    _run(cv, "dnd", 0, "recon", [{"step": 0, "heldout/wmse": 1.0}])
    n = 6
    rng = np.random.default_rng(0)
    mt = rng.uniform(1, 2, (n, 1))
    nll = {"generated:sft": mt - 0.1, "generated:mt_lora": mt, "generated:dnd": mt}
    lines = "\n".join(sft_section(cv, ["dnd", "sft", "mt_lora"], nll, np.array([0, 0, 0, 1, 1, 1]), 200, 0, 0.01))
    assert "sft (sft), mt_lora (mt_lora)" in lines and "dnd (" not in lines
    want = "**sft vs mt_lora** (NLL per response token, positive = sft better): +0.1000 [+0.1000, +0.1000] (6/0/0)"
    assert want in lines
    assert "| sft | 0.400 / 0.500 | 0.400 / 1.500 |" in lines and "| mt_lora | 0.600 / 0.700 | 0.600 / 1.700 |" in lines
    assert "| 10 | 0.5000 | 0.7000 |" in lines
    assert sft_section(cv, ["dnd"], nll, None, 10, 0, 0.01) == []


def test_soft_retrieval_tau_is_chosen_inside_the_training_tasks():
    """Two clusters of tasks whose prompts and tokens agree: a small tau (near-hard retrieval) predicts each task
    from its cluster; with prompts unrelated to the tokens, a large tau (the mean control) wins."""
    from dnd_jax.experiments.baselines import choose_tau, soft_weights

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 16))
    names = [f"t{i}" for i in range(8)]
    emb, means = {}, {}
    for i, n in enumerate(names):
        e = centres[i % 2] + 0.05 * rng.standard_normal(16)
        e /= np.linalg.norm(e)
        emb[n] = {"train": e, "test": e}
        means[n] = np.full((3, 2, 2), float(i % 2)) + 0.01 * rng.standard_normal((3, 2, 2))
    taus = (0.01, 0.1, 1.0, 10.0)
    tau, err = choose_tau(emb, names, means, taus)
    assert tau <= 0.1 and err[tau] < err[10.0] / 100  # (0.1 averages its cluster: less noise than 0.01)
    w = soft_weights(emb, "t0", names[1:], 0.01)
    assert abs(w.sum() - 1) < 1e-12 and w[[1, 3, 5]].sum() > 0.999  # t2, t4, t6: t0's cluster
    unrelated = {n: rng.standard_normal((3, 2, 2)) for n in names}  # tokens that owe nothing to the prompts
    assert choose_tau(emb, names, unrelated, taus)[0] == 10.0


def test_prompt_swap_partners_are_a_seeded_derangement():
    from dnd_jax.experiments.generation import swap_partners

    for n in range(2, 9):
        tasks = [f"t{i}" for i in range(n)]
        p = swap_partners(tasks, 999)
        assert sorted(p) == tasks and sorted(p.values()) == tasks and all(p[t] != t for t in tasks)
        assert p == swap_partners(list(reversed(tasks)), 999)  # the fold's order does not matter
    assert swap_partners([f"t{i}" for i in range(6)], 999) != swap_partners([f"t{i}" for i in range(6)], 1000)
    with pytest.raises(DndError, match="at least 2 held-out tasks"):
        swap_partners(["t0"], 999)


def test_decisive_headline_compares_with_the_best_prompt_blind_row_per_task():
    import ml_collections

    from dnd_jax.experiments.decisive import headline

    e = ml_collections.ConfigDict({"blind_variant": "mt_lora", "soft_variant": "soft_retrieval"})
    n = 8
    control = np.linspace(1.0, 2.0, n)
    mt = control[::-1].copy()  # mt_lora better on half the tasks
    best = np.minimum(control, mt)
    nll = {"control": control, "generated:mt_lora": mt[:, None], "generated:soft_retrieval": (best + 0.5)[:, None],
           "generated:sft": np.stack([best - 0.1, best - 0.1], 1)}  # fmt: skip
    swaps = {"sft": np.stack([best + 0.3, best + 0.3], 1)}
    groups = np.arange(n) % 2
    lines = "\n".join(headline(e, ["mt_lora", "soft_retrieval", "sft"], nll, swaps, groups, 200, 0, 0.01))
    assert "the control on 4 of 8 tasks" in lines
    assert "**sft** beats the best prompt-blind baseline (+0.1000 [+0.1000, +0.1000], 8/0/0)" in lines
    assert "beats soft retrieval (+0.6000" in lines and "swapping its prompts makes it worse (+0.4000" in lines
    worse = {**nll, "generated:sft": np.stack([best + 0.2, best + 0.2], 1)}
    assert "**sft** loses to the best prompt-blind baseline" in "\n".join(
        headline(e, ["mt_lora", "soft_retrieval", "sft"], worse, {}, groups, 200, 0, 0.01)
    )
    assert "Not answered yet: no scores of soft_retrieval" in "\n".join(
        headline(e, ["mt_lora", "sft"], nll, swaps, groups, 200, 0, 0.01)
    )
