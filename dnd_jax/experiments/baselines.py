"""Baselines that need no generator: the prompt-blind control and retrieval (and the checkpoint lookups)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError


def mean_tokens(token_dir: Path, tasks: list[str], real_length: int) -> np.ndarray:
    """The prompt-blind control's tokens: the pooled mean over every checkpoint of `tasks` (`prepare.pooled_mean`)."""
    from dnd_jax.data.prepare import open_token_set, pooled_mean

    return pooled_mean([open_token_set(token_dir / t, real_length) for t in tasks])


def save_tokens_adapter(tokens_trk: np.ndarray, layout, out: Path) -> None:
    """Detokenizes one token tensor into a PEFT adapter directory (written atomically)."""
    from converters.jax_to_peft import save_peft_adapter
    from dnd_jax import lora_tokens

    save_peft_adapter(lora_tokens.detokenize(tokens_trk, layout), layout.spec, out, dtype=layout.spec.dtype,
                      overwrite=True)  # fmt: skip


def prompt_embeddings(c, names: list[str], n: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"train": e, "test": e}}: the mean of the encoder's normalised mean-pooled embeddings of the
    first `n` prompts of each split (the space the generator's conditions come from).

    One compiled program for every split: the prompts are padded to `n` rows (masked out, dropped after pooling);
    op by op, a split cost ~0.6 s on 2 cores, most of it dispatch."""
    import jax
    import jax.numpy as jnp

    from dnd_jax.data.prompts import load_split
    from dnd_jax.extractors import load_extractor
    from dnd_jax.models.encoder import mean_pool, tokenize_prompts

    enc, tok = load_extractor(c.encoder, dtype=jnp.float32)
    pooled = jax.jit(lambda m, ids, mask: mean_pool(m(ids[None], mask[None])[0], mask))
    out = {}
    for name in names:
        out[name] = {}
        for split in ("train", "test"):
            prompts = [r["prompt"] for r in load_split(c.data.prompts_dir, f"{name}_{split}", False)[:n]]
            ids, mask = tokenize_prompts(tok, prompts, c.data.max_text_length)
            rows = len(prompts)
            ids, mask = (np.pad(a, ((0, n - rows), (0, 0))) for a in (ids, mask))
            e = np.asarray(pooled(enc, ids, mask), np.float64)[:rows].mean(0)
            out[name][split] = e / np.linalg.norm(e)
    return out


def retrieve(emb: dict, heldout: str, train_tasks: list[str]) -> tuple[str, float]:
    """The training task whose train prompts are nearest (cosine) to the held-out task's test prompts."""
    sims = {t: float(emb[heldout]["test"] @ emb[t]["train"]) for t in train_tasks}
    best = max(sims, key=sims.get)
    return best, sims[best]


def last_checkpoint_in(root: Path, task: str) -> Path:
    """A collected task's last checkpoint directory (root/<task>/step-*)."""
    steps = sorted((Path(root) / task).glob("step-*"))
    if not steps:
        raise DndError(f"{Path(root) / task}: no checkpoints")
    return steps[-1]


def load_embeddings(path: Path, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The `prompt_embeddings` of `names` as stored in the experiment's embeddings.npz ("<task>|<split>" keys)."""
    raw = np.load(path)
    return {n: {sp: raw[f"{n}|{sp}"] for sp in ("train", "test")} for n in names}


def soft_weights(emb: dict, query: str, pool: list[str], tau: float) -> np.ndarray:
    """softmax(cos / tau) of `query`'s test prompts against each pool task's train prompts (embedding means)."""
    sims = np.array([float(emb[query]["test"] @ emb[t]["train"]) for t in pool])
    z = sims / tau
    w = np.exp(z - z.max())
    return w / w.sum()


def choose_tau(emb: dict, train: list[str], means: dict[str, np.ndarray], taus) -> tuple[float, dict]:
    """Soft retrieval's temperature by leave-one-task-out inside the training tasks only: each training task's mean
    tokens predicted from the others' (weights from its test prompts, as a held-out task's are), the tau of the
    lowest mean squared token error (ties: the larger). Large tau is the mean control; small tau is hard retrieval."""
    err = {}
    for tau in taus:
        losses = []
        for u in train:
            rest = [t for t in train if t != u]
            w = soft_weights(emb, u, rest, tau)
            pred = sum(wi * means[t] for wi, t in zip(w, rest, strict=True))
            losses.append(float(np.mean((pred - means[u]) ** 2)))
        err[float(tau)] = float(np.mean(losses))
    return min(err, key=lambda t: (err[t], -t)), err  # a tie goes to the larger tau: nearer the control
