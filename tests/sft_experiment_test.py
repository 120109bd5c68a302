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
