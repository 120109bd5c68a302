"""What the training loop reads: token stores, prompt pools, the frozen extractor, checked before compiling.

Legend: B batch, N prompts per sample, L text length, D encoder hidden, T parameter tokens,
R/K token rows/columns.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dnd_jax.data import pairs
from dnd_jax.errors import DndError
from dnd_jax.models.hyperconv import generator_config
from dnd_jax.objectives.recon import b_token_mask
from dnd_jax.objectives.sft import ensure_control, uses_lm


@dataclasses.dataclass
class Data:
    """Everything the loop reads, loaded and checked before compilation."""

    train_sets: list
    heldout: object  # TokenSet of the held-out dataset (monitoring only)
    weight: np.ndarray  # [T] mean criterion weight of the training datasets
    sampler: pairs.PairSampler
    heldout_pool: pairs.PromptPool
    encoder: object
    layout: object
    offset: np.ndarray | None = None  # [T, R, K] targets are tokens - offset (data.target_offset)
    cache: pairs.HiddenCache | None = None  # encoder outputs per prompt (encoder.cache)
    key_length: int | None = None  # no prompt has a real token past this position (encoder key trimming)
    sft: tuple | None = None  # (objectives.sft.SftParts, SftSampler) of the SFT objectives


def load_data(config) -> Data:
    """Prepares (or reuses) the token store, loads prompts and the encoder, checks every shape."""
    from dnd_jax.data.prepare import check_same_init, mean_criterion_weight, open_token_set, prepare_dataset
    from dnd_jax.extractors import load_extractor
    from dnd_jax.models.encoder import keys_needed

    d, gen = config.data, generator_config(config)
    names = list(d.train_datasets)
    if d.heldout_dataset in names:
        raise DndError(f"config field data.heldout_dataset: {d.heldout_dataset!r} is also a training dataset")
    sets = {}
    missing = [n for n in [*names, d.heldout_dataset] if not (Path(d.collection_dir) / n).is_dir()]
    if missing:
        raise DndError(
            f"{Path(d.collection_dir) / missing[0]}: no checkpoints of dataset {missing[0]!r} (config field "
            f"data.collection_dir; {len(missing)} of {len(names) + 1} datasets missing). Make them with: python -m "
            f"dnd_jax.collect --config configs/collect/commonsense_smollm2.py --datasets {','.join(missing)} --out "
            f"{d.collection_dir} (the SmolLM2 recipe of the :smoke configs), or point data.collection_dir at "
            "existing PEFT checkpoints"
        )
    multi = jax.process_count() > 1
    if multi and jax.process_index() != 0:  # process 0 prepares first; on a shared filesystem the rest reuse it
        _barrier("dnd_jax.tokens")
    for name in [*names, d.heldout_dataset]:
        src = Path(d.collection_dir) / name
        out = prepare_dataset(src, Path(d.token_dir) / name, d.chunk, d.real_length, d.pad)
        sets[name] = open_token_set(out, d.real_length)
        got = tuple(sets[name].tokens.shape[1:])
        if got != tuple(gen.features[-1]):
            raise DndError(f"{out}: token shape {list(got)} differs from config model.features[-1] "
                           f"{list(gen.features[-1])} (set it to the data's shape, or data.chunk)")  # fmt: skip
    if multi and jax.process_index() == 0:
        _barrier("dnd_jax.tokens")
    n, length = gen.features[0][:2]
    if d.num_texts != n or d.max_text_length != length:
        raise DndError(f"config: data.num_texts/max_text_length ({d.num_texts}, {d.max_text_length}) differ from "
                       f"model.features[0][:2] {[n, length]}")  # fmt: skip
    encoder, tok = load_extractor(config.encoder)
    check_width(config, encoder)
    pools = {name: pairs.tokenize_pool(tok, name, training_texts(config, name), d.max_text_length)
             for name in [*names, d.heldout_dataset]}  # fmt: skip
    train_sets = [sets[nm] for nm in names]
    check_same_init([*train_sets, sets[d.heldout_dataset]], d.get("allow_mixed_init", False))
    if uses_lm(config):
        ensure_control(config, train_sets)
    offset = load_target_offset(config, tuple(gen.features[-1]))
    sampler = pairs.PairSampler(train_sets, pools, d.num_texts, config.train.batch_size, config.seed, offset)
    if pools[d.heldout_dataset].input_ids.shape[0] < d.num_texts:
        raise DndError(f"{d.heldout_dataset}: fewer prompts than num_texts={d.num_texts}")
    key_length = keys_needed(*(p.attention_mask for p in pools.values()))  # exact key trimming, see encoder.py
    cache = attach_cache(config, encoder, pools.values(), key_length) if config.encoder.get("cache", False) else None
    weight = mean_criterion_weight(train_sets)
    if d.get("loss_tokens", "all") == "b":
        weight = weight * b_token_mask(train_sets[0].layout)
    return Data(train_sets, sets[d.heldout_dataset], weight, sampler, pools[d.heldout_dataset], encoder,
                train_sets[0].layout, offset, cache, key_length)  # fmt: skip


def training_texts(config, name: str) -> list[str]:
    """The condition texts of dataset `name`'s train split: data.condition's form of its records, the
    first data.max_prompts of them (0: all; the original's number-of-conditions pool, spec §7.9)."""
    from dnd_jax.data.prompts import condition_texts, load_split, needs_answers

    d = config.data
    form = d.get("condition", "prompts")
    records = load_split(d.prompts_dir, f"{name}_train", needs_answers(form))
    limit = d.get("max_prompts", 0)
    return condition_texts(records[:limit] if limit else records, form, config.seed, name)


def check_width(config, encoder) -> None:
    """The generator's first layer takes the extractor's width: model.features[0][2] == its hidden size."""
    e, dim = config.encoder, config.model.features[0][2]
    if encoder.cfg.hidden_size != dim:
        raise DndError(f"{e.path} (encoder.type {e.get('type', 'sentence_bert')}): encoder hidden size "
                       f"{encoder.cfg.hidden_size} != model.features[0][2] {dim}; set the generator's first-layer "
                       "width to the extractor's")  # fmt: skip


def attach_cache(config, encoder, pools, key_length: int | None = None) -> pairs.HiddenCache:
    """encoder.cache: one HiddenCache shared by `pools` (each prompt encoded once, deterministically)."""
    e = config.encoder
    if e.train_dropout:
        raise DndError("config field encoder.cache=True needs encoder.train_dropout=False (a cached encoder output "
                       "is computed once, without dropout)")  # fmt: skip
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def encode_with(state, ids, mask):  # the weights are an argument: never baked into the program as constants
        out = nnx.merge(graphdef, state)(ids, mask, key=None, mask_padding=e.mask_padding, key_length=key_length)
        return out.astype(jnp.float32)

    cache = pairs.HiddenCache(functools.partial(encode_with, state), encoder.cfg.hidden_size)
    for pool in pools:
        pool.cache = cache
    return cache


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def load_target_offset(config, shape: tuple) -> np.ndarray | None:
    """config data.target_offset: an .npy token tensor the generator's targets are taken relative to
    (targets = tokens - offset; generation adds it back), or "" for none (the original)."""
    d = config.data
    path, mode = d.get("target_offset", ""), d.get("loss_tokens", "all")
    if mode not in ("all", "b"):
        raise DndError(f"config field data.loss_tokens: {mode!r} (expected 'all' or 'b')")
    if mode == "b" and not path:
        raise DndError(
            "config field data.loss_tokens='b' needs data.target_offset (its A tokens replace the untrained ones)"
        )
    if not path:
        return None
    if not Path(path).is_file():
        raise DndError(f"{path}: no such file (config field data.target_offset)")
    offset = np.load(path).astype(np.float32)
    if tuple(offset.shape) != shape:
        raise DndError(f"{path}: target offset shape {list(offset.shape)} differs from the tokens' {list(shape)}")
    return offset


def heldout_batches(data: Data, config) -> list[pairs.Batch]:
    """Fixed held-out monitoring batches: held-out train prompts, held-out checkpoints (spec §5.1)."""
    rng = np.random.default_rng([config.seed, 1_000_003])
    n, out, pool = data.heldout.tokens.shape[0], [], data.heldout_pool
    for _ in range(config.train.eval_batches):
        idx = rng.integers(0, n, size=config.train.batch_size)
        sels = [pairs.prompt_indices(pool, config.data.num_texts, rng) for _ in idx]
        toks = np.stack([np.asarray(data.heldout.tokens[i], np.float32) for i in idx])
        if data.offset is not None:
            toks = toks - data.offset
        sel = np.stack(sels)  # [B, N]
        cond = None if pool.cache is None else pool.hidden(sel.ravel()).reshape(*sel.shape, -1, pool.cache.dim)
        out.append(pairs.Batch(pool.input_ids[sel], pool.attention_mask[sel], toks, cond))
    return out


def _global_batch(b, batch_sh, global_b: int) -> dict:
    """A process's rows (a `pairs.Batch` or a dict of arrays leading with the rows) as global arrays."""

    def put(x):
        return jax.make_array_from_process_local_data(batch_sh, x, (global_b, *x.shape[1:]))

    if isinstance(b, dict):
        return {k: put(v) for k, v in b.items()}
    if b.cond_bnld is not None:
        return {"cond": put(b.cond_bnld), "tokens": put(b.tokens_btrk)}
    return {
        "input_ids": put(b.input_ids_bnl),
        "attention_mask": put(b.attention_mask_bnl),
        "tokens": put(b.tokens_btrk),
    }
