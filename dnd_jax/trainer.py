"""The training loop: data checks, mesh, sharded jitted step, held-out eval, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is what `python -m dnd_jax.train` calls. Everything a user
can get wrong (paths, token shapes against the generator config, batch against the mesh) is
checked before anything is compiled.

Legend: B batch, N prompts per sample, L text length, D encoder hidden, T parameter tokens,
R/K token rows/columns. The step: prompts [B, N, L] -> frozen extractor (encoder.type: BERT by
default, with dropout as the original, keyed by the step; dnd_jax/extractors.py) -> condition
[B, N, L, D] + 1e-4 noise -> generator -> tokens [B, T, R, K];
loss = mean over valid entries of w_t (pred - (target + 1e-5 noise))^2 (spec §5.2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dnd_jax import fast_random, sharding
from dnd_jax.checkpointing import Checkpointer
from dnd_jax.config_cli import check_same_config, config_dict, save_config
from dnd_jax.data import pairs
from dnd_jax.distributed import StopOnSigterm
from dnd_jax.errors import DndError
from dnd_jax.fileio import atomic_file, workdir_lock
from dnd_jax.models.hyperconv import GeneratorConfig, HyperConvDecoder, layer_flops


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


def generator_config(config) -> GeneratorConfig:
    m = config.model
    return GeneratorConfig(features=tuple(tuple(f) for f in m.features), kernel_size=m.kernel_size,
                           compute_dtype=m.compute_dtype, fp32_last_layer=m.fp32_last_layer,
                           conv_impl=m.get("conv_impl", "direct"),
                           zero_init_output=m.get("zero_init_output", False))  # fmt: skip


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
    def encode(ids, mask):
        out = nnx.merge(graphdef, state)(ids, mask, key=None, mask_padding=e.mask_padding, key_length=key_length)
        return out.astype(jnp.float32)

    cache = pairs.HiddenCache(encode, encoder.cfg.hidden_size)
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


def b_token_mask(layout) -> np.ndarray:
    """[T] float32: 1 on B^T tokens, 0 on A tokens."""
    mask = np.zeros(layout.num_tokens, np.float32)
    for s in layout.segments:
        if s.side == "b":
            mask[s.start : s.start + s.count] = 1.0
    return mask


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on all parameters), cosine decay to 0 over the run, global-norm clip (spec §5.3)."""
    t = config.train
    schedule = optax.cosine_decay_schedule(t.learning_rate, max(t.steps, 1))
    tx = optax.chain(
        optax.clip_by_global_norm(t.max_grad_norm),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay),
    )
    return tx, schedule


def make_init_state(config):
    """The function that builds the training state {params, opt_state, step} (eval_shape it for shapes)."""
    gen = generator_config(config)
    tx, _ = make_optimizer(config)

    def init_state():
        params = nnx.to_pure_dict(nnx.state(HyperConvDecoder(gen, nnx.Rngs(params=config.seed)), nnx.Param))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init_state


def _encode(enc_graphdef, enc_state, ids_bnl, mask_bnl, key, mask_padding, key_length=None):
    encoder = nnx.merge(enc_graphdef, enc_state)
    cond = encoder(ids_bnl, mask_bnl, key=key, mask_padding=mask_padding, key_length=key_length)
    return jax.lax.stop_gradient(cond).astype(jnp.float32)  # frozen: no gradient reaches the extractor


def weighted_mse(pred_btrk, target_btrk, weight_t):
    """Mean over valid (non-NaN) entries of w_t * (pred - target)^2, in float32."""
    valid = ~jnp.isnan(target_btrk)
    err = (pred_btrk.astype(jnp.float32) - jnp.where(valid, target_btrk, 0.0)) ** 2
    return jnp.sum(jnp.where(valid, weight_t[None, :, None, None] * err, 0.0)) / jnp.maximum(valid.sum(), 1)


def make_steps(config, graphdef, enc_graphdef, tx, schedule, key_length: int | None = None):
    """Returns the (unjitted) train and eval step functions (`key_length`: see `encoder.keys_needed`)."""
    t, e = config.train, config.encoder
    compute = jnp.dtype(config.model.compute_dtype)

    def condition(enc_state, batch, key):
        if "cond" in batch:  # encoder.cache: encoded once per prompt, on the host side
            return batch["cond"]
        return _encode(
            enc_graphdef, enc_state, batch["input_ids"], batch["attention_mask"], key, e.mask_padding, key_length
        )

    def loss_fn(params, enc_state, batch, weight, key):
        k_drop, k_cond, k_tgt = jax.random.split(key, 3)
        cond = condition(enc_state, batch, k_drop if e.train_dropout else None)
        cond = cond + t.noise_condition * fast_random.normal(k_cond, cond.shape)
        pred = nnx.merge(graphdef, params)(cond.astype(compute))
        target = batch["tokens"] + t.noise_target * fast_random.normal(k_tgt, batch["tokens"].shape)
        loss = weighted_mse(pred, target, weight)
        return loss, (jnp.mean(jnp.square(pred.astype(jnp.float32))), jnp.mean(jnp.square(batch["tokens"])))

    def train_step(state, enc_state, batch, weight):
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        (loss, (gen_ms, tgt_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], enc_state, batch, weight, key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]),
                   "generated_mean_square": gen_ms, "target_mean_square": tgt_ms}  # fmt: skip
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def eval_step(params, enc_state, batch, weight):
        cond = condition(enc_state, batch, None)
        pred = nnx.merge(graphdef, params)(cond.astype(compute))
        return weighted_mse(pred, batch["tokens"], weight), jnp.mean(jnp.square(pred.astype(jnp.float32)))

    return train_step, eval_step


def _tree_shardings(tree, param_sh, rep):
    """Shardings of an optimizer state: subtrees shaped like the params follow them, the rest replicate."""
    pstruct = jax.tree.structure(param_sh)

    def is_params(x):
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == pstruct

    return jax.tree.map(lambda x: param_sh if is_params(x) else rep, tree, is_leaf=is_params)


def _logged_step(line: str, start: int) -> int | None:
    """The step of a metrics.jsonl row to keep on resuming from `start` (rows up to it; none when starting
    over), None for a row to drop (later, or a partial line left by a kill)."""
    try:
        step = int(json.loads(line)["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None
    return step if step is not None and 0 < start and step <= start else None


class Writer:
    """TensorBoard event files plus metrics.jsonl in the workdir, written by process 0 only.

    Events are written with tensorboardX (no PyTorch or TensorFlow in the training process); the
    files are ordinary TensorBoard event files (`tensorboard --logdir <workdir>/tensorboard`).
    """

    def __init__(self, workdir: Path, start: int = 0):
        """`start`: the step training resumes from; rows logged after it by a killed run are dropped (from
        metrics.jsonl, and hidden in TensorBoard by a purge marker), so the logs read as one run."""
        self.active = jax.process_index() == 0
        self.tb = None
        if not self.active:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:
            print("warning: tensorboardX is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        path = workdir / "metrics.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines(keepends=True) if _logged_step(ln, start) is not None]
            with atomic_file(path, "w") as f:
                f.writelines(keep)
        self.jsonl = path.open("a")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            if self.tb is not None:
                self.tb.close()
            self.jsonl.close()


def to_host(tree):
    """Fetches a tree of replicated arrays; in a multi-process run each process reads its own copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def exit_if_stopped(result: dict, workdir) -> None:
    """After a SIGTERM stop, says where to resume and exits 0 (train; and pipeline / experiment, which
    would otherwise go on with an unfinished generator)."""
    if result.get("stopped_at") is not None:
        print(f"stopped by SIGTERM after step {result['stopped_at']}; its checkpoint is in {workdir}/checkpoints; "
              "re-run the same command to resume", file=sys.stderr)  # fmt: skip
        raise SystemExit(0)


def _global_batch(b: pairs.Batch, batch_sh, global_b: int) -> dict:
    def put(x):
        return jax.make_array_from_process_local_data(batch_sh, x, (global_b, *x.shape[1:]))

    if b.cond_bnld is not None:
        return {"cond": put(b.cond_bnld), "tokens": put(b.tokens_btrk)}
    return {
        "input_ids": put(b.input_ids_bnl),
        "attention_mask": put(b.attention_mask_bnl),
        "tokens": put(b.tokens_btrk),
    }


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


_POSITIVE = ("train.steps", "train.batch_size", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.eval_batches", "data.num_texts", "data.max_text_length", "data.real_length", "data.chunk",
             "model.kernel_size")  # fmt: skip
_NON_NEGATIVE = ("data.max_prompts", "train.eval_every", "train.learning_rate", "train.weight_decay",
                 "train.max_grad_norm", "train.noise_condition", "train.noise_target", "train.eps")  # fmt: skip


def validate_config(config) -> None:
    """Impossible values and pipeline-only placeholders, each a one-line error naming the field, before any
    output is written."""

    def get(name):
        node = config
        for part in name.split("."):
            node = node[part]
        return node

    for name in (*_POSITIVE, *_NON_NEGATIVE):
        try:
            v = get(name)
        except KeyError:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DndError(f"config field {name}: {v!r} is not a number")
        if v < 0 or (v == 0 and name in _POSITIVE):
            raise DndError(f"config field {name}: {v!r} must be {'positive' if name in _POSITIVE else '>= 0'}")
    from dnd_jax.data.prompts import check_condition

    check_condition(config.data.get("condition", "prompts"))
    if get("model.kernel_size") % 2 == 0:
        raise DndError(f"config field model.kernel_size: {get('model.kernel_size')} must be odd (same-size padding)")
    for i, f in enumerate(get("model.features")):
        if len(f) != 3 or any(not isinstance(x, int) or x <= 0 for x in f):
            raise DndError(f"config field model.features[{i}]: {tuple(f)} must be three positive integers")
    if any(not isinstance(x, int) or (x <= 0 and x != -1) for x in get("mesh.shape")):
        raise DndError(f"config field mesh.shape: {tuple(get('mesh.shape'))} must be positive sizes (or -1: the rest)")

    def walk(node, prefix):
        for k in node.keys():
            v = node[k]
            if hasattr(v, "keys"):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and "{workdir}" in v:
                raise DndError(f"config field {prefix}{k}: {v!r} has the {{workdir}} placeholder, which only "
                               "python -m dnd_jax.pipeline fills in; run the pipeline or give a path")  # fmt: skip

    walk(config, "")


def train_and_evaluate(config, workdir: str | Path, devices=None) -> dict:
    """Trains the generator; resumes from the latest checkpoint in `workdir`.

    Args:
      config: the resolved ConfigDict (configs/*.py).
      workdir: output directory (checkpoints/, tensorboard/, metrics.jsonl, config.json).
      devices: devices of the mesh (default: all).

    Returns:
      Final metrics: the last training metrics and the held-out weighted MSE at the start and end.
    """
    validate_config(config)
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # one writer per workdir (in a multi-process run, process 0 holds it for all)
        with workdir_lock(workdir, "train") if jax.process_index() == 0 else contextlib.nullcontext():
            return _setup_and_run(config, workdir, devices)
    except DndError:
        if created and jax.process_index() == 0 and {p.name for p in workdir.iterdir()} <= {".lock"}:
            shutil.rmtree(workdir, ignore_errors=True)  # a run that failed in its set-up leaves nothing behind
        raise


def _setup_and_run(config, workdir: Path, devices) -> dict:
    cfg_path = workdir / "config.json"
    if cfg_path.is_file():
        check_same_config(json.loads(cfg_path.read_text()), config_dict(config), str(workdir))
    t = config.train
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    if t.batch_size % mesh.size:
        raise DndError(f"config field train.batch_size {t.batch_size} is not divisible by the {mesh.size} devices")
    data = load_data(config)
    gen = generator_config(config)
    if jax.process_index() == 0:
        save_config(config, cfg_path)
    rules = [tuple(r) for r in config.mesh.rules]
    with jax.set_mesh(mesh):
        return _run(config, workdir, data, gen, mesh, rules)


def _run(config, workdir, data: Data, gen, mesh, rules) -> dict:
    t = config.train
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    abstract = nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    specs = nnx.to_pure_dict(sharding.param_specs(abstract_params, mesh, rules))
    param_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    tx, schedule = make_optimizer(config)
    init_state = make_init_state(config)
    abstract_state = jax.eval_shape(init_state)
    state_sh = {"params": param_sh, "opt_state": _tree_shardings(abstract_state["opt_state"], param_sh, rep),
                "step": rep}  # fmt: skip
    enc_graphdef, enc_state = nnx.split(data.encoder)
    enc_state = jax.device_put(enc_state, rep)
    weight = jax.device_put(jnp.asarray(data.weight), rep)

    train_step, eval_step = make_steps(config, graphdef, enc_graphdef, tx, schedule, data.key_length)
    traces = {"train": 0}

    def counted(*a):
        traces["train"] += 1  # runs at trace time only: counts compilations
        return train_step(*a)

    train_jit = jax.jit(counted, in_shardings=(state_sh, rep, batch_sh, rep), out_shardings=(state_sh, rep),
                        donate_argnums=(0,))  # fmt: skip
    eval_jit = jax.jit(eval_step, in_shardings=(param_sh, rep, batch_sh, rep), out_shardings=rep)

    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state, start = jax.jit(init_state, out_shardings=state_sh)(), 0
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
        state = ckpt.restore(start, target)
        if jax.process_index() == 0:
            print(f"resumed from step {start} in {workdir / 'checkpoints'}", file=sys.stderr)

    n_proc, pid = jax.process_count(), jax.process_index()
    lo, hi = pid * t.batch_size // n_proc, (pid + 1) * t.batch_size // n_proc
    eval_batches = heldout_batches(data, config)
    writer = Writer(workdir, start)
    flops = 3 * layer_flops(gen) * t.batch_size  # forward + backward ~ 3x forward

    def evaluate(step: int, params) -> dict:
        vals = [eval_jit(params, enc_state, _global_batch(b.slice(lo, hi), batch_sh, t.batch_size), weight)
                for b in eval_batches]  # fmt: skip
        vals = to_host(vals)
        m = {"heldout/wmse": np.mean([float(v[0]) for v in vals]),
             "heldout/generated_mean_square": np.mean([float(v[1]) for v in vals])}  # fmt: skip
        writer.write(step, m)
        return m

    result = {"start_step": start}
    if start == 0:
        result["heldout_wmse_start"] = evaluate(0, state["params"])["heldout/wmse"]
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, desc="train", disable=pid != 0 or not t.progress, file=sys.stderr)
    metrics, t_last, last_logged = None, time.perf_counter(), start
    stop = StopOnSigterm(multi_process=jax.process_count() > 1)
    final = None
    try:
        for step, b in pairs.prefetch(lambda s: data.sampler.rows(s, lo, hi), range(start, t.steps)):
            state, metrics = train_jit(state, enc_state, _global_batch(b, batch_sh, t.batch_size), weight)
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                m = to_host(metrics)  # the only host sync, every log_every steps
                if not math.isfinite(float(m["loss"])):
                    raise DndError(
                        f"{workdir}: non-finite loss {float(m['loss'])} at step {done} (training diverged; "
                        f"lower train.learning_rate, or resume from a checkpoint before step {done})"
                    )
                dt = (time.perf_counter() - t_last) / (done - last_logged)
                t_last, last_logged = time.perf_counter(), done
                m = {**m, "step_time_s": dt, "samples_per_s": t.batch_size / dt, "flop_per_s": flops / dt}
                writer.write(done, m)
                bar.set_postfix(loss=f"{float(m['loss']):.4g}", gms=f"{float(m['generated_mean_square']):.3f}")
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                evaluate(done, state["params"])
            saved = done % t.checkpoint_every == 0 or done == t.steps
            if saved:
                ckpt.save(done, state)
            bar.update(1)
            if done != t.steps and stop.requested(done):  # SIGTERM (preemption): save here and leave
                if not saved:
                    ckpt.save(done, state, force=True)
                result["stopped_at"] = done
                break
        else:
            final = evaluate(t.steps, state["params"])
    finally:
        stop.restore()
        bar.close()
        ckpt.close()  # waits for the last (async) save
        writer.close()
    cache = None if data.cache is None else {k: int(have.sum()) for k, (_, have) in sorted(data.cache.store.items())}
    result.update(heldout_wmse_end=None if final is None else final["heldout/wmse"], traces=traces["train"],
                  state=state, encoder_cache=cache,
                  last_metrics=to_host(metrics) if metrics is not None else None)  # fmt: skip
    return result
