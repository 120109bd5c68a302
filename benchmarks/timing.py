"""What the benchmarks share: timing a call, and prompts of random words."""

from __future__ import annotations

import time

import numpy as np

WORDS = ["what", "is", "the", "answer", "to", "this", "question", "about", "science", "and", "plants"]


def time_it(fn, repeats: int, stat=np.mean) -> float:
    """`stat` (mean or median) of `repeats` timed calls of fn, in seconds, after one untimed call (compile)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(stat(times))


def random_prompts(rng: np.random.Generator, n: int, min_words: int, max_words: int) -> list[str]:
    """n prompts of min_words to max_words - 1 words drawn from WORDS."""
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(min_words, max_words)))) for _ in range(n)]
