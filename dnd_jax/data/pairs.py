"""Prompt-checkpoint pairs: what the generator trains on (spec §5.1).

Each training sample is a uniformly random (dataset, checkpoint) among the training datasets'
prepared checkpoints, paired with `num_texts` prompts drawn without replacement from the same
dataset's train split. Sampling depends only on (seed, step), so a resumed run sees exactly the
batches an uninterrupted run would. Prompts are tokenized once per dataset (the encoder itself
runs inside the jitted step, or once per prompt with encoder.cache: `HiddenCache`); tokens come
from the memory-mapped token store.

Legend: B batch, N prompts per sample, L text length, T tokens, R/K token rows/columns.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator

import numpy as np

from dnd_jax.data.prepare import TokenSet
from dnd_jax.data.prompts import sample_prompt_batch
from dnd_jax.errors import DndError


@dataclasses.dataclass
class PromptPool:
    """One dataset's prompts, tokenized once; optionally with a cache of their encoder outputs."""

    name: str
    input_ids: np.ndarray  # [P, L] int32
    attention_mask: np.ndarray  # [P, L] int32
    cache: HiddenCache | None = None

    def hidden(self, sel: np.ndarray) -> np.ndarray:
        """[len(sel), L, D] encoder outputs of prompts `sel` (encoded on first use, then reused)."""
        return self.cache.get(self, sel)


class HiddenCache:
    """Encoder outputs per prompt, computed the first time a prompt is drawn and kept (encoder.cache). An encoder
    call takes `chunk` prompts: rows the drawn prompts leave free encode the pool's next undrawn ones (a small pool is
    whole after a few calls, instead of one padded call per step while new prompts keep being drawn).

    The frozen encoder is deterministic without dropout, so a prompt's condition never changes:
    encoding it once instead of at every draw saves the encoder's share of each training step.
    Storage is a lazily touched float32 array per pool (np.zeros pages cost memory only once written).

    Args:
      encode: jitted (ids [C, L], mask [C, L]) -> [C, L, D] float32; called with C = `chunk` rows.
      dim: D.
      chunk: prompts per encoder call (one compiled shape).
    """

    def __init__(self, encode, dim: int, chunk: int = 32):
        self.encode, self.dim, self.chunk = encode, dim, chunk
        self.store: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # pool -> (hidden [P, L, D], encoded [P])
        self.lock = threading.Lock()

    def get(self, pool: PromptPool, sel: np.ndarray) -> np.ndarray:
        with self.lock:
            if pool.name not in self.store:
                p, length = pool.input_ids.shape
                self.store[pool.name] = (np.zeros((p, length, self.dim), np.float32), np.zeros(p, bool))
            hidden, have = self.store[pool.name]
            todo = np.unique(sel[~have[sel]])
            if len(todo) % self.chunk:  # the last call's free rows encode prompts not drawn yet, not padding
                rest = np.setdiff1d(np.flatnonzero(~have), todo)[: self.chunk - len(todo) % self.chunk]
                todo = np.concatenate([todo, rest])
            for i in range(0, len(todo), self.chunk):
                part = todo[i : i + self.chunk]
                idx = np.pad(part, (0, self.chunk - len(part)), mode="edge")  # one compiled shape
                out = np.asarray(self.encode(pool.input_ids[idx], pool.attention_mask[idx]))
                hidden[part] = out[: len(part)]
                have[part] = True
            return hidden[sel]


@dataclasses.dataclass
class Batch:
    input_ids_bnl: np.ndarray
    attention_mask_bnl: np.ndarray
    tokens_btrk: np.ndarray
    cond_bnld: np.ndarray | None = None  # cached encoder outputs (encoder.cache), used instead of the ids

    def slice(self, lo: int, hi: int) -> Batch:
        cond = None if self.cond_bnld is None else self.cond_bnld[lo:hi]
        return Batch(self.input_ids_bnl[lo:hi], self.attention_mask_bnl[lo:hi], self.tokens_btrk[lo:hi], cond)


def tokenize_pool(tokenizer, name: str, prompts: list[str], max_length: int) -> PromptPool:
    """Tokenizes a dataset's prompts (padding to max_length, truncating, as the original)."""
    from dnd_jax.models.encoder import tokenize_prompts

    ids, mask = tokenize_prompts(tokenizer, prompts, max_length)
    return PromptPool(name, ids.astype(np.int32), mask.astype(np.int32))


class PairSampler:
    """Deterministic batches of (prompt batch, checkpoint tokens) pairs.

    Args:
      token_sets: training datasets' prepared tokens.
      pools: prompt pools with the same names as token_sets.
      num_texts: prompts per sample.
      batch_size: global batch size.
      seed: base seed; batch `step` depends only on (seed, step).
      offset: [T, R, K] subtracted from every target (residual targets), or None.
    """

    def __init__(self, token_sets: list[TokenSet], pools: dict[str, PromptPool], num_texts: int,
                 batch_size: int, seed: int, offset: np.ndarray | None = None):  # fmt: skip
        self.sets, self.pools, self.offset = token_sets, pools, offset
        self.num_texts, self.batch_size, self.seed = num_texts, batch_size, seed
        for s in token_sets:
            if s.name not in pools:
                raise DndError(f"no prompts for training dataset {s.name!r}")
            if pools[s.name].input_ids.shape[0] < num_texts:
                raise DndError(
                    f"{s.name}: {pools[s.name].input_ids.shape[0]} prompts, fewer than num_texts={num_texts}"
                )
        # Flat index over all checkpoints: item i -> (dataset, checkpoint), as the original's i % 300.
        self.index = [(d, c) for d, s in enumerate(token_sets) for c in range(s.tokens.shape[0])]

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> Batch:
        """Samples [lo, hi) of the global batch of `step` (a process loads only its rows)."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, len(self.index), size=self.batch_size)
        prompt_rngs = rng.spawn(self.batch_size)
        hi = self.batch_size if hi is None else hi
        ids, masks, toks, conds = [], [], [], []
        for b in range(lo, hi):
            d, c = self.index[picks[b]]
            s = self.sets[d]
            pool = self.pools[s.name]
            sel = prompt_indices(pool, self.num_texts, prompt_rngs[b])
            ids.append(pool.input_ids[sel])
            masks.append(pool.attention_mask[sel])
            if pool.cache is not None:
                conds.append(pool.hidden(sel))
            toks.append(np.asarray(s.tokens[c], dtype=np.float32))
            if self.offset is not None:
                toks[-1] = toks[-1] - self.offset
        return Batch(np.stack(ids), np.stack(masks), np.stack(toks), np.stack(conds) if conds else None)


def prompt_batch(pool: PromptPool, num_texts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One [N, L] prompt batch from a pool (generation and held-out evaluation)."""
    sel = prompt_indices(pool, num_texts, rng)
    return pool.input_ids[sel], pool.attention_mask[sel]


def prompt_indices(pool: PromptPool, num_texts: int, rng: np.random.Generator) -> np.ndarray:
    """The prompt indices `prompt_batch` draws with the same rng state, in the order drawn (the original's
    random.sample order: the generator is not invariant to the order of its prompt slots, so the order is
    part of the augmentation)."""
    return sample_prompt_batch(pool.input_ids.shape[0], num_texts, rng, pool.name)


def prefetch(make, steps: range, depth: int = 2) -> Iterator:
    """Runs `make(step)` in a background thread, `depth` steps ahead, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for s in steps:
                if stop.is_set():
                    return
                q.put((s, make(s), None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
            q.put((None, None, e))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        for _ in steps:
            s, item, err = q.get()
            if err is not None:
                raise err
            yield s, item
    finally:
        stop.set()
