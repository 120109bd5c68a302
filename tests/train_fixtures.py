"""A tiny DnD experiment on disk for trainer/generate tests: prompt datasets, PEFT checkpoints, a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import transformers

from converters.synthetic import write_synthetic_adapter
from tests.lora_fixtures import QWEN2

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra) -> dict:
    """The environment of a command a test starts: this repository importable, 8 CPU devices (as the tests'), the
    tests' XLA flags (tests/conftest.py)."""
    flags = f"--xla_force_host_platform_device_count=8 {os.environ.get('DND_JAX_TEST_XLA_FLAGS', '')}".strip()
    return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=flags, **extra)


def user_env(**extra) -> dict:
    """The environment of a command run as on a user's machine: one CPU device (no device-count flag), this
    repository importable, the tests' XLA compile flags (tests/conftest.py)."""
    return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=os.environ.get("DND_JAX_TEST_XLA_FLAGS", ""), **extra)


NAMES = ("alpha", "beta", "gamma")  # two training datasets and a held-out one
TOKENS = (87, 10, 34)  # tiny Qwen2, r 8, chunk 32
FEATURES = ((4, 16, 384), (8, 8, 34), TOKENS)
TOPICS = {"alpha": "arithmetic", "beta": "geography", "gamma": "history"}


def write_prompts(root: Path, names=NAMES, n: int = 12) -> Path:
    """LLaMA-Factory prompt datasets, one topic each, train and test splits."""
    root.mkdir(parents=True, exist_ok=True)
    info, cols = {}, {"prompt": "prompt", "response": "response", "system": "system"}
    for name in names:
        for split in ("train", "test"):
            recs = [{"prompt": f"A {TOPICS.get(name, name)} question number {i} of the {split} split?\nA: yes\nB: no",
                     "response": "[A]" if i % 2 else "[B]", "system": "Answer by [A] or [B].",
                     "choices": ["yes", "no"], "answer": 0 if i % 2 else 1} for i in range(n)]  # fmt: skip
            (root / f"{name}_{split}.json").write_text(json.dumps(recs))
            info[f"{name}_{split}"] = {"file_name": f"{name}_{split}.json", "columns": cols}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def write_collection(root: Path, names=NAMES, steps: int = 4) -> Path:
    """PEFT checkpoints `<root>/<name>/step-*/`: per dataset a random adapter plus small per-step drift."""
    config = transformers.Qwen2Config(**QWEN2)
    for d, name in enumerate(names):
        for s in range(steps):
            write_synthetic_adapter(root / name / f"step-{s + 1:06d}", config, r=8, alpha=16, dtype="float32",
                                    seed=1000 * d + s, base_name="tiny-qwen2")  # fmt: skip
    return root


def tiny_overrides(tmp: Path, steps: int = 3, batch: int = 8) -> dict:
    """Config overrides (field -> value) that point configs/arc_c.py:smoke at the tiny experiment."""
    return {
        "data.train_datasets": tuple(NAMES[:2]),
        "data.heldout_dataset": NAMES[2],
        "data.collection_dir": str(tmp / "collect"),
        "data.token_dir": str(tmp / "tokens"),
        "data.prompts_dir": str(tmp / "prompts"),
        "data.real_length": 4,
        "data.chunk": 32,
        "data.num_texts": 4,
        "data.max_text_length": 16,
        "model.features": FEATURES,
        "train.batch_size": batch,
        "train.steps": steps,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.checkpoint_every": 2,
        "train.progress": False,
        "generate.num_adapters": 2,
    }


def tiny_config(tmp: Path, **extra):
    from configs import arc_c

    c = arc_c.get_config("smoke")
    for k, v in {**tiny_overrides(tmp), **extra}.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def cli_overrides(tmp: Path, **extra) -> list[str]:
    out = []
    for k, v in {**tiny_overrides(tmp), **extra}.items():
        out.append(f"--config.{k}={v}")
    return out


def make_experiment(tmp: Path) -> Path:
    write_prompts(tmp / "prompts")
    write_collection(tmp / "collect")
    return tmp


def params_close(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip
