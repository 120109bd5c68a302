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

from dnd_jax import sharding
from dnd_jax.checkpointing import Checkpointer
from dnd_jax.config_cli import check_same_config, config_dict, save_config
from dnd_jax.data import pairs
from dnd_jax.distributed import StopOnSigterm
from dnd_jax.errors import DndError
from dnd_jax.fileio import workdir_lock
from dnd_jax.metrics_writer import Writer, to_host
from dnd_jax.models.hyperconv import HyperConvDecoder, generator_config, layer_flops
from dnd_jax.objectives.recon import _encode, b_token_mask, make_steps, seed_array, weighted_mse  # noqa: F401 (callers use trainer.*)
from dnd_jax.train_data import (  # noqa: F401 (callers use trainer.*)
    Data,
    _barrier,
    _global_batch,
    attach_cache,
    check_width,
    heldout_batches,
    load_data,
    load_target_offset,
    training_texts,
)


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

    def init_state(seed=None):  # seed: a runtime seed_array (one program for every seed); None: config.seed
        key = jax.random.key(config.seed if seed is None else seed)
        params = nnx.to_pure_dict(nnx.state(HyperConvDecoder(gen, nnx.Rngs(params=key)), nnx.Param))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init_state


def _tree_shardings(tree, param_sh, rep):
    """Shardings of an optimizer state: subtrees shaped like the params follow them, the rest replicate."""
    pstruct = jax.tree.structure(param_sh)

    def is_params(x):
        return not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == pstruct

    return jax.tree.map(lambda x: param_sh if is_params(x) else rep, tree, is_leaf=is_params)


def exit_if_stopped(result: dict, workdir) -> None:
    """After a SIGTERM stop, says where to resume and exits 0 (train; and pipeline / experiment, which
    would otherwise go on with an unfinished generator)."""
    if result.get("stopped_at") is not None:
        print(f"stopped by SIGTERM after step {result['stopped_at']}; its checkpoint is in {workdir}/checkpoints; "
              "re-run the same command to resume", file=sys.stderr)  # fmt: skip
        raise SystemExit(0)


_POSITIVE = ("train.steps", "train.batch_size", "sft.examples", "sft.cutoff_len", "sft.microbatches",
             "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.eval_batches", "data.num_texts", "data.max_text_length", "data.real_length", "data.chunk",
             "model.kernel_size")  # fmt: skip
_NON_NEGATIVE = ("data.max_prompts", "train.eval_every", "train.learning_rate", "train.weight_decay",
                 "train.max_grad_norm", "train.noise_condition", "train.noise_target", "train.eps", "sft.l2",
                 "sft.recon_weight")  # fmt: skip


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
    seed = config.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise DndError(f"config field seed: {seed!r} must be a whole number from 0 to 2147483647")
    from dnd_jax.data.prompts import check_condition
    from dnd_jax.objectives.sft import objective_of

    objective = objective_of(config)
    groups = config.get("sft", {}).get("microbatches", 1)
    if groups > 1 and (objective not in ("sft", "mt_lora") or get("train.batch_size") % groups):
        raise DndError(f"config field sft.microbatches={groups}: needs train.objective sft or mt_lora and a "
                       f"train.batch_size ({get('train.batch_size')}) it divides")  # fmt: skip

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
        from dnd_jax.objectives.sft import CONTROL_FILE

        if created and jax.process_index() == 0 and {p.name for p in workdir.iterdir()} <= {".lock", CONTROL_FILE}:
            shutil.rmtree(workdir, ignore_errors=True)  # a run that failed in its set-up leaves nothing behind
        raise


def _setup_and_run(config, workdir: Path, devices) -> dict:
    from dnd_jax.objectives import sft

    if sft.uses_lm(config):
        sft.start_at_control(config, workdir)
    cfg_path = workdir / "config.json"
    if cfg_path.is_file():
        check_same_config(json.loads(cfg_path.read_text()), config_dict(config), str(workdir))
    t = config.train
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    if t.batch_size % mesh.size:
        raise DndError(f"config field train.batch_size {t.batch_size} is not divisible by the {mesh.size} devices")
    data = load_data(config)
    if sft.uses_lm(config):  # the LM, the examples and what the data cannot fill: checked before any output
        data.sft = sft.prepare(config, data)
    gen = generator_config(config)
    if jax.process_index() == 0:
        save_config(config, cfg_path)
    rules = [tuple(r) for r in config.mesh.rules]
    with jax.set_mesh(mesh):
        return _run(config, workdir, data, gen, mesh, rules)


def _plan(config, workdir: Path, data: Data, gen, mesh, rules, lo: int, hi: int) -> dict:
    """What differs between train.objective values: the parameters and their init, the step functions and
    their aux arguments (replicated), the batches of this process's rows [lo, hi), the monitoring batches."""
    from dnd_jax.objectives import sft

    objective = sft.objective_of(config)
    tx, schedule = make_optimizer(config)
    enc_graphdef, enc_state = nnx.split(data.encoder)
    graphdef, param_sh, flops = None, None, 0
    if objective != "mt_lora":
        abstract = nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        specs = nnx.to_pure_dict(sharding.param_specs(abstract_params, mesh, rules))
        param_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
        flops = 3 * layer_flops(gen) * config.train.batch_size  # forward + backward ~ 3x forward
    if objective == "recon":
        step, evaluate = make_steps(config, graphdef, enc_graphdef, tx, schedule, data.key_length)
        return {"init_state": make_init_state(config), "param_sh": param_sh, "flops": flops,
                "aux": {"enc": enc_state, "weight": jnp.asarray(data.weight)},
                "steps": (lambda st, aux, b: step(st, aux["enc"], b, aux["weight"], aux["seed"]),
                          lambda p, aux, b: dict(zip(("wmse", "generated_mean_square"),
                                                     evaluate(p, aux["enc"], b, aux["weight"]), strict=True))),
                "rows": lambda s: data.sampler.rows(s, lo, hi),
                "eval_sets": {"heldout": [b.slice(lo, hi) for b in heldout_batches(data, config)]}}  # fmt: skip
    parts, sampler = data.sft
    lm_graphdef, aux = sft.lm_aux(config, data, parts, enc_state)
    steps = sft.make_steps(config, graphdef, enc_graphdef, lm_graphdef, tx, schedule, data.layout, parts.scale,
                           data.key_length)  # fmt: skip
    init_state, finish = make_init_state(config), None
    if objective == "mt_lora":
        centre = aux["centre"]
        param_sh = jax.tree.map(lambda _: sharding.replicated(mesh), centre)

        def init_state(seed=None):  # starts at the control: no random init
            params = jax.tree.map(jnp.asarray, centre)
            return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

        def finish(params):
            sft.save_mt_lora(jax.device_get(params), data.layout, workdir / "adapter")

    evals = {k: [{n: x[lo:hi] for n, x in b.items()} for b in v]
             for k, v in sft.eval_batches(data, sampler, config).items()}  # fmt: skip
    return {"init_state": init_state, "param_sh": param_sh, "flops": 0, "aux": aux, "steps": steps,
            "rows": lambda s: sampler.rows(s, lo, hi), "eval_sets": evals, "finish": finish}  # fmt: skip


def _run(config, workdir, data: Data, gen, mesh, rules) -> dict:
    t = config.train
    rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    n_proc, pid = jax.process_count(), jax.process_index()
    lo, hi = pid * t.batch_size // n_proc, (pid + 1) * t.batch_size // n_proc
    plan = _plan(config, workdir, data, gen, mesh, rules, lo, hi)
    # The seed is a runtime input of the init and the step (not a constant in them): runs that differ only in seed
    # (an experiment's generator seeds) share the compiled programs.
    aux = jax.device_put({**plan["aux"], "seed": seed_array(config.seed)}, rep)
    init_state, param_sh = plan["init_state"], plan["param_sh"]
    abstract_state = jax.eval_shape(init_state)
    state_sh = {"params": param_sh, "opt_state": _tree_shardings(abstract_state["opt_state"], param_sh, rep),
                "step": rep}  # fmt: skip
    train_step, eval_step = plan["steps"]
    traces = {"train": 0}

    def counted(*a):
        traces["train"] += 1  # runs at trace time only: counts compilations
        return train_step(*a)

    train_jit = jax.jit(counted, in_shardings=(state_sh, rep, batch_sh), out_shardings=(state_sh, rep),
                        donate_argnums=(0,))  # fmt: skip
    eval_jit = jax.jit(eval_step, in_shardings=(param_sh, rep, batch_sh), out_shardings=rep)

    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state, start = jax.jit(init_state, in_shardings=(rep,), out_shardings=state_sh)(aux["seed"]), 0
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
        state = ckpt.restore(start, target)
        if jax.process_index() == 0:
            print(f"resumed from step {start} in {workdir / 'checkpoints'}", file=sys.stderr)

    eval_sets, flops = plan["eval_sets"], plan["flops"]
    writer = Writer(workdir, start)

    def evaluate(step: int, params) -> dict:
        m = {}
        for name, batches in eval_sets.items():
            vals = to_host([eval_jit(params, aux, _global_batch(b, batch_sh, t.batch_size)) for b in batches])
            m.update({f"{name}/{k}": float(np.mean([float(v[k]) for v in vals])) for k in vals[0]})
        writer.write(step, m)
        return m

    result = {"start_step": start}
    if start == 0:
        result["eval_start"] = evaluate(0, state["params"])
        result["heldout_wmse_start"] = result["eval_start"].get("heldout/wmse")
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, desc="train", disable=pid != 0 or not t.progress, file=sys.stderr)
    metrics, t_last, last_logged = None, time.perf_counter(), start
    stop = StopOnSigterm(multi_process=jax.process_count() > 1)
    final = None
    try:
        for step, b in pairs.prefetch(plan["rows"], range(start, t.steps)):
            state, metrics = train_jit(state, aux, _global_batch(b, batch_sh, t.batch_size))
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
                m = {**m, "step_time_s": dt, "samples_per_s": t.batch_size / dt}
                if flops:
                    m["flop_per_s"] = flops / dt
                writer.write(done, m)
                bar.set_postfix(loss=f"{float(m['loss']):.4g}")
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
            if plan.get("finish") and pid == 0:
                plan["finish"](state["params"])
    finally:
        stop.restore()
        bar.close()
        ckpt.close()  # waits for the last (async) save
        writer.close()
    cache = None if data.cache is None else {k: int(have.sum()) for k, (_, have) in sorted(data.cache.store.items())}
    result.update(heldout_wmse_end=None if final is None else final.get("heldout/wmse"), eval_end=final,
                  traces=traces["train"], state=state, encoder_cache=cache,
                  last_metrics=to_host(metrics) if metrics is not None else None)  # fmt: skip
    return result
