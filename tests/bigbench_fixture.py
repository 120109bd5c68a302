"""A small BIG-bench checkout for the tests: synthetic tasks in BIG-bench's own `task.json` format.

The registry no longer serves the bigbench 1.0.0 sdist (its page lists only 0.0.1, which holds no tasks), so the
tests that run BIG-bench configs read this tree through $DND_JAX_BIGBENCH (`dnd_jax.data.bigbench.source`), the
way a user points the project at a local copy. The tasks are made here, seeded, with answers computed from their
inputs (so a LoRA can learn them): `navigate` (multiple choice: do these steps return to the start?), `tense`
(generative: the sentence in the past tense) and `object_counting` (generative: how many things are listed).
They carry the names of BIG-bench tasks of the same kind so that the configs' smoke task lists run unchanged;
their content is not BIG-bench's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VERBS = ("walk", "jump", "cook", "paint", "clean", "play", "watch", "call", "visit", "open", "climb", "wash")
SUBJECTS = ("I", "You", "We", "They", "My sister", "The teacher", "Our neighbour", "The children")
PLACES = ("at home", "in the park", "after school", "every morning", "on Sunday", "with friends", "at night")
THINGS = ("apple", "chair", "dog", "car", "book", "banana", "cat", "lamp", "drum", "plum")
NUMBERS = ("one", "two", "three", "four")


def _navigate(rng: np.random.Generator, n: int) -> dict:
    examples, seen = [], set()
    while len(examples) < n:
        moves = [int(k) * (1 if rng.random() < 0.5 else -1) for k in rng.integers(1, 6, size=int(rng.integers(2, 5)))]
        if len(examples) % 2 == 0 and sum(moves):  # half of them return: a last step cancels the others
            moves.append(-sum(moves))
        words = [f"Take {abs(m)} step{'s' * (abs(m) > 1)} {'forward' if m > 0 else 'backward'}." for m in moves]
        text = ("If you follow these instructions, do you return to the starting point? Always face forward. "
                + " ".join(words))  # fmt: skip
        if text in seen:
            continue
        seen.add(text)
        back = sum(moves) == 0
        examples.append({"input": text, "target_scores": {"True": int(back), "False": int(not back)}})
    return {"name": "navigate", "description": "synthetic: do the steps return to the start?",
            "keywords": ["arithmetic"], "metrics": ["multiple_choice_grade"], "examples": examples}  # fmt: skip


def _tense(rng: np.random.Generator, n: int) -> dict:
    examples, seen = [], set()
    while len(examples) < n:
        subj, verb, place = (str(rng.choice(x)) for x in (SUBJECTS, VERBS, PLACES))
        present = f"{subj} {verb}{'s' if subj not in ('I', 'You', 'We', 'They') else ''} {place}."
        if present in seen:
            continue
        seen.add(present)
        past = f"{subj} {verb}{'d' if verb.endswith('e') else 'ed'} {place}."
        examples.append({"input": f"Change the tense to past: {present}", "target": past})
    return {"name": "tense", "description": "synthetic: the sentence in the past tense", "keywords": ["syntax"],
            "metrics": ["exact_str_match"], "example_output_prefix": "\nA: ", "examples": examples}  # fmt: skip


def _object_counting(rng: np.random.Generator, n: int) -> dict:
    examples, seen = [], set()
    while len(examples) < n:
        picks = rng.choice(len(THINGS), size=int(rng.integers(2, 5)), replace=False)
        counts = rng.integers(1, 5, size=len(picks))
        parts = [f"{NUMBERS[c - 1]} {THINGS[i]}{'s' * int(c > 1)}" for i, c in zip(picks, counts, strict=True)]
        text = f"I have {', '.join(parts[:-1])} and {parts[-1]}. How many things do I have?"
        if text in seen:
            continue
        seen.add(text)
        examples.append({"input": text, "target": str(int(counts.sum()))})
    return {"name": "object_counting", "description": "synthetic: count the things listed", "keywords": ["counting"],
            "metrics": ["exact_str_match"], "examples": examples}  # fmt: skip


def write_bigbench(root: Path, n: int = 150, seed: int = 0) -> Path:
    """A checkout-shaped tree `root/bigbench/benchmark_tasks/<task>/task.json` of three synthetic tasks of `n`
    distinct examples each; returns `root` (the value for $DND_JAX_BIGBENCH)."""
    rng = np.random.default_rng(seed)
    for task in (_navigate(rng, n), _tense(rng, n), _object_counting(rng, n)):
        d = Path(root) / "bigbench" / "benchmark_tasks" / task["name"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "task.json").write_text(json.dumps(task, indent=1))
    return Path(root)
