"""A synthetic task family for SFT-mode tests: every task's gold response is one colour word, which every prompt of
the task states by a hint ("sky" -> "blue"): six filler words of the task's style (drawn anew for each item from the
style's word list), then "answer <hint> <item>". Held-out tasks pair a hint with a style no training task pairs it
with, so only the hint tells their colour.

The hint sits past the LM's cut-off (sft.cutoff_len 64 bytes: the prompt is cut from the right, as the collection
cuts it, leaving 59 bytes of filler) but within the extractor's 16 tokens, at the same token position in every
prompt. So the LM itself never sees it: a prompt-blind LoRA can at best spread its bet over the four colours, and
only a generator that reads the prompts can name the colour. That is the capability this family isolates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import transformers

from converters.synthetic import write_synthetic_adapter
from tests.lora_fixtures import QWEN2
from tests.sft_fixtures import write_tiny_lm

# Colours of one length: the cut-off keeps cutoff - len(response) prompt bytes, so unequal lengths would let the LM
# read the answer's length off where its prompt ends.
HINTS = {"sky": "blue", "sun": "gold", "rose": "pink", "ash": "grey"}
STYLES = (  # single MiniLM word pieces of 10-13 letters: six of them fill more than the 59 bytes the LM sees
    ("laboratories", "censorship", "pertaining", "professional", "questioning", "transformed", "principals",
     "battalions", "wonderland", "ambassadors", "installations", "protestants"),
    ("collaborated", "filmmakers", "possibility", "culminating", "particular", "ostensibly", "preservation",
     "reconciled", "glistening", "personalities", "statistics", "amplifiers"),
    ("biographical", "emotionally", "systematic", "engagements", "distributed", "revolutionary", "encourages",
     "manufactures", "accidentally", "casualties", "evacuation", "proportions"),
)  # fmt: skip
HELDOUT = (("sky", 2), ("sun", 1), ("rose", 0), ("ash", 2))


def prompt(hint: str, style: int, item: int, rng: np.random.Generator) -> str:
    words = rng.choice(STYLES[style], size=6, replace=False)
    return f"{' '.join(words)}, answer {hint} {item}"


def task_name(hint: str, phrasing: int) -> str:
    return f"{hint}{phrasing}"


def all_tasks() -> tuple[list[str], list[str]]:
    """(training tasks, held-out tasks)."""
    held = [task_name(h, p) for h, p in HELDOUT]
    train = [task_name(h, p) for h in HINTS for p in range(len(STYLES)) if task_name(h, p) not in held]
    return train, held


def write_tasks(root: Path, n: int = 24) -> Path:
    """Every task's train and test splits (LLaMA-Factory layout)."""
    root.mkdir(parents=True, exist_ok=True)
    info, cols = {}, {"prompt": "prompt", "response": "response", "system": "system"}
    for hint, colour in HINTS.items():
        for p in range(len(STYLES)):
            name = task_name(hint, p)
            for split, base in (("train", 0), ("test", 1000)):
                rng = np.random.default_rng([base, p, len(hint)])
                recs = [{"prompt": prompt(hint, p, base + i, rng), "response": colour, "system": ""}
                        for i in range(n)]  # fmt: skip
                (root / f"{name}_{split}.json").write_text(json.dumps(recs))
                info[f"{name}_{split}"] = {"file_name": f"{name}_{split}.json", "columns": cols}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def write_family(tmp: Path) -> dict:
    """Prompts, a collection (2 random tiny-Qwen2 adapters per task, one shared init as collections have) and the
    tiny LM; returns config overrides for configs/arc_c.py:smoke."""
    write_tasks(tmp / "prompts")
    lm = write_tiny_lm(tmp / "lm")
    config = transformers.Qwen2Config(**QWEN2)
    train, held = all_tasks()
    for d, name in enumerate([*train, *held]):
        for s in range(2):
            write_synthetic_adapter(tmp / "collect" / name / f"step-{s + 1:06d}", config, r=8, alpha=16,
                                    dtype="float32", seed=1000 * d + s, base_name=str(lm))  # fmt: skip
    return {"data.train_datasets": tuple(train), "data.heldout_dataset": held[0],
            "data.collection_dir": str(tmp / "collect"), "data.token_dir": str(tmp / "tokens"),
            "data.prompts_dir": str(tmp / "prompts"), "data.real_length": 2, "data.chunk": 32,
            "data.num_texts": 4, "data.max_text_length": 16, "data.allow_mixed_init": True,
            "model.features": ((4, 16, 384), (32, 16, 64), (87, 10, 34)), "sft.cutoff_len": 64, "sft.examples": 4,
            "sft.bucket": 64,  # = the cut-off: one compiled length, and the head at the label positions only
            "train.batch_size": 8, "train.log_every": 10, "train.eval_every": 0, "train.checkpoint_every": 50,
            "train.progress": False, "encoder.train_dropout": False}  # fmt: skip
