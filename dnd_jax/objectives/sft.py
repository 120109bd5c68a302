"""SFT mode: the generator trained through the frozen LM on the tasks' own loss (train.objective).

Objectives:
  "sft"        prompts -> extractor -> generator -> residual tokens (+ the control's tokens) -> detokenize
               -> each row's LoRA in the frozen causal LM (models/causal_lm.py) -> mean NLL of the gold response
               tokens of m labelled examples of the row's task (the collection's chat format and cut-off)
               + sft.l2 * the generated adapter's squared distance from the control (Text-to-LoRA's penalty).
  "sft+recon"  the same + sft.recon_weight * the reconstruction loss (objectives/recon.py) of the same rows.
  "mt_lora"    the prompt-blind counterpart: one LoRA (A and B, started at the control), the same loss, batches,
               examples, penalty and optimizer, no prompts (Text-to-LoRA's multi-task LoRA).

A step draws train.batch_size distinct training tasks; per task its condition (data.num_texts prompts of its
pool, as the recon sampler) and sft.examples labelled examples of its train split, other items than the
prompts where the split allows. The generator starts at the control: its targets are residuals from the mean
training tokens (data.target_offset; made in the workdir when unset) and its last layer starts at zero.

Legend: B tasks per step, M examples per task, S example length, N prompts, T/R/K tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dnd_jax import fast_random, lora_tokens
from dnd_jax.errors import DndError
from dnd_jax.objectives.recon import _encode, step_key, weighted_mse

OBJECTIVES = ("recon", "sft", "sft+recon", "mt_lora")
CONTROL_FILE = "control_tokens.npy"


def objective_of(config) -> str:
    name = config.train.get("objective", "recon")
    if name not in OBJECTIVES:
        raise DndError(f"config field train.objective: {name!r} (expected one of {', '.join(OBJECTIVES)})")
    return name


def uses_lm(config) -> bool:
    return objective_of(config) != "recon"


def start_at_control(config, workdir: Path) -> None:
    """SFT objectives start at the control: residual targets from the mean training tokens, zero last layer.
    Without data.target_offset the mean is written to WORKDIR/control_tokens.npy on first use (`ensure_control`)."""
    if not config.data.get("target_offset", ""):
        config.data.target_offset = str((workdir / CONTROL_FILE).resolve())
    config.model.zero_init_output = True


def ensure_control(config, train_sets) -> None:
    """Writes the mean of every training checkpoint's tokens to data.target_offset if it is the workdir's own
    control file and is missing (atomically: a kill leaves no half-written file)."""
    from dnd_jax.data.prepare import pooled_mean
    from dnd_jax.fileio import atomic_file

    path = Path(config.data.target_offset)
    if path.name != CONTROL_FILE or path.is_file():
        return
    with atomic_file(path) as f:
        np.save(f, pooled_mean(train_sets))


@dataclasses.dataclass
class Examples:
    """One task's labelled examples, chat-formatted and padded: ids/mask/labels [n, S] (labels -100 off the
    response)."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def encode_examples(tok, records: list[dict], cutoff: int, where: str) -> list[tuple[list[int], list[int]]]:
    from dnd_jax.lm import encode_sft_example

    out = [encode_sft_example(tok, r, cutoff) for r in records]
    if not any(any(x != -100 for x in lab) for _, lab in out):
        raise DndError(f"{where}: no example keeps a response token within sft.cutoff_len={cutoff}")
    return out


def pad_examples(encoded: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> Examples:
    n = len(encoded)
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    labels = np.full((n, length), -100, np.int32)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(y)] = x, 1, y
    return Examples(ids, mask, labels)


@dataclasses.dataclass
class SftParts:
    """The frozen LM, its scales, and every task's examples (loaded once, checked before compiling)."""

    lm: object  # models.causal_lm.CausalLM
    scale: dict  # {tree path: PEFT scale}
    examples: dict  # task -> Examples


def load_parts(config, data) -> SftParts:
    """Loads the LM (sft.model, or the checkpoints' base model) and tokenizes every task's train split."""
    from dnd_jax.data.prompts import load_split
    from dnd_jax.models.causal_lm import load_causal_lm, spec_scales

    s, d = config.sft, config.data
    spec = data.layout.spec
    name = s.get("model", "") or spec.base_model
    if not name:
        raise DndError("config field sft.model is empty and the checkpoints name no base model")
    if data.offset is None:
        raise DndError("SFT objectives need data.target_offset (the control they start at)")
    records = {t: load_split(d.prompts_dir, f"{t}_train") for t in [*d.train_datasets, d.heldout_dataset]}
    for task, recs in records.items():  # what the data cannot fill, before the LM loads
        if len(recs) < s.examples:
            raise DndError(f"{task}: {len(recs)} labelled examples in its train split, fewer than "
                           f"sft.examples={s.examples}")  # fmt: skip
    lm, tok, cfg = load_causal_lm(name, jnp.dtype(s.compute_dtype))
    scale = spec_scales(spec)
    for path in scale:
        if int(path.split("/")[1]) >= cfg.depth:
            raise DndError(f"checkpoint module {path} is not in {name} ({cfg.depth} layers)")
    encoded = {t: encode_examples(tok, recs, s.cutoff_len, f"{d.prompts_dir}/{t}_train") for t, recs in records.items()}
    longest = max(len(x) for enc in encoded.values() for x, _ in enc)
    length = min(-(-longest // 16) * 16, max(s.cutoff_len, longest))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return SftParts(lm, scale, {t: pad_examples(e, length, pad) for t, e in encoded.items()})


def prepare(config, data) -> tuple[SftParts, SftSampler]:
    parts = load_parts(config, data)
    return parts, SftSampler(data, parts, config)


class SftSampler:
    """Deterministic SFT batches: B distinct training tasks per step, each with its prompts, M examples and a
    checkpoint's residual tokens (for "sft+recon"). Batch `step` depends only on (seed, step)."""

    def __init__(self, data, parts: SftParts, config):
        self.sets, self.pools, self.parts, self.control = data.train_sets, data.sampler.pools, parts, data.offset
        self.num_texts, self.batch_size, self.seed = config.data.num_texts, config.train.batch_size, config.seed
        self.m, self.bucket = config.sft.examples, config.sft.get("bucket", 0)
        if self.batch_size > len(self.sets):
            raise DndError(f"config field train.batch_size={self.batch_size}: a step draws that many distinct "
                           f"training tasks and there are {len(self.sets)}")  # fmt: skip

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> dict:
        rng = np.random.default_rng([self.seed, step])
        tasks = rng.choice(len(self.sets), size=self.batch_size, replace=False)
        rngs = rng.spawn(self.batch_size)
        hi = self.batch_size if hi is None else hi
        batch = self.trim(stack([self.row(self.sets[tasks[b]], rngs[b]) for b in range(self.batch_size)]))
        return {k: v[lo:hi] for k, v in batch.items()}

    def trim(self, batch: dict) -> dict:
        """Cuts the examples to the batch's longest, rounded up to a multiple of sft.bucket (0: no cut, one
        compiled shape). Taken over the global batch, so that every process cuts alike."""
        if not self.bucket:
            return batch
        from dnd_jax.models.causal_lm import label_positions

        longest = int(batch["sft_mask"].sum(-1).max())
        length = min(-(-longest // self.bucket) * self.bucket, batch["sft_ids"].shape[-1])
        batch = {k: v[..., :length] if k.startswith("sft_") else v for k, v in batch.items()}
        # the positions the loss reads (the head runs there only; shapes bucketed too)
        return {**batch, "sft_pos": label_positions(batch["sft_labels"])}

    def row(self, token_set, rng) -> dict:
        from dnd_jax.data.pairs import prompt_indices

        pool, ex = self.pools[token_set.name], self.parts.examples[token_set.name]
        sel = prompt_indices(pool, self.num_texts, rng)
        n = ex.ids.shape[0]
        rest = np.setdiff1d(np.arange(n), sel)  # pool index i is train record i (training_texts)
        pick = rng.choice(rest if len(rest) >= self.m else n, size=self.m, replace=False)
        c = rng.integers(token_set.tokens.shape[0])
        row = {"input_ids": pool.input_ids[sel], "attention_mask": pool.attention_mask[sel],
               "tokens": np.asarray(token_set.tokens[c], np.float32) - self.control,
               "sft_ids": ex.ids[pick], "sft_mask": ex.mask[pick], "sft_labels": ex.labels[pick]}  # fmt: skip
        if pool.cache is not None:
            row["cond"] = pool.hidden(sel)
            del row["input_ids"], row["attention_mask"]
        return row


def stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def eval_batches(data, sampler: SftSampler, config) -> dict[str, list[dict]]:
    """Fixed monitoring batches: "heldout" (B rows of the held-out task: its train prompts and examples, never
    its scored test items) and "trainfit" (B distinct training tasks: how well the run fits its own tasks)."""
    rng = np.random.default_rng([config.seed, 1_000_003])
    held = data.heldout
    out: dict[str, list[dict]] = {"heldout": [], "trainfit": []}
    for _ in range(config.train.eval_batches):
        out["heldout"].append(sampler.trim(stack([sampler.row(held, r) for r in rng.spawn(sampler.batch_size)])))
        tasks = rng.choice(len(sampler.sets), size=sampler.batch_size, replace=False)
        rows = [sampler.row(sampler.sets[t], r) for t, r in zip(tasks, rng.spawn(len(tasks)), strict=True)]
        out["trainfit"].append(sampler.trim(stack(rows)))
    return out


def control_lora(layout, control: np.ndarray) -> dict:
    """The control's adapter {path: {lora_a [I, R], lora_b [R, O]}} (the L2 penalty's centre; mt_lora's start)."""
    return jax.tree.map(np.asarray, lora_tokens.detokenize(np.asarray(control, np.float32), layout))


def l2_distance(lora, centre) -> jax.Array:
    """Sum over modules of mean(dA^2) + mean(dB^2), averaged over a leading row axis if `lora` has one."""
    total = 0.0
    for x, c in zip(jax.tree.leaves(lora), jax.tree.leaves(centre), strict=True):
        axes = tuple(range(x.ndim - c.ndim, x.ndim))
        total = total + jnp.mean(jnp.mean(jnp.square(x - c), axis=axes))
    return total


def make_steps(config, graphdef, enc_graphdef, lm_graphdef, tx, schedule, layout, scale, key_length=None):
    """(train_step(state, aux, batch), eval_step(params, aux, batch)) of the SFT objectives, unjitted.

    aux: {"enc": extractor state, "lm": frozen LM state, "control": control tokens [T, R, K],
    "centre": the control's adapter, "weight": [T] recon weight}. `graphdef` is None for mt_lora.
    """
    from dnd_jax.models.causal_lm import IGNORE, response_nll

    t, s, e = config.train, config.sft, config.encoder
    objective = objective_of(config)
    compute = jnp.dtype(config.model.compute_dtype)

    def adapters(params, aux, batch, key):
        """Each row's LoRA (a leading B axis; none for mt_lora) and the generator's residual tokens."""
        if objective == "mt_lora":
            return params, None
        k_drop, k_cond = jax.random.split(key) if key is not None else (None, None)
        if "cond" in batch:
            cond = batch["cond"]
        else:
            drop = k_drop if e.train_dropout else None
            cond = _encode(enc_graphdef, aux["enc"], batch["input_ids"], batch["attention_mask"], drop,
                           e.mask_padding, key_length)  # fmt: skip
        if key is not None:
            cond = cond + t.noise_condition * fast_random.normal(k_cond, cond.shape)
        pred = nnx.merge(graphdef, params)(cond.astype(compute)).astype(jnp.float32)
        return lora_tokens.detokenize(pred + aux["control"], layout, xp=jnp), pred

    def losses(params, aux, batch, key):
        lora, pred = adapters(params, aux, batch, key)
        b, m, length = batch["sft_ids"].shape
        if objective == "mt_lora":
            rows = jax.tree.map(lambda x: jnp.broadcast_to(x, (b * m, *x.shape)), lora)
        else:
            rows = jax.tree.map(lambda x: jnp.repeat(x, m, axis=0), lora)
        lm = nnx.merge(lm_graphdef, jax.lax.stop_gradient(aux["lm"]))
        flat = [batch[k].reshape(b * m, length) for k in ("sft_ids", "sft_mask", "sft_labels")]
        pos = batch["sft_pos"].reshape(b * m, -1) if "sft_pos" in batch else None
        nll = response_nll(lm, *flat, rows, scale, positions=pos)
        out = {"nll": nll, "l2": l2_distance(lora, aux["centre"])}
        if objective == "sft+recon":
            out["recon"] = weighted_mse(pred, batch["tokens"], aux["weight"])
        if pred is not None:
            out["generated_mean_square"] = jnp.mean(jnp.square(pred))
        return out

    def total(out):
        return out["nll"] + s.l2 * out["l2"] + s.recon_weight * out.get("recon", 0.0)

    def loss_fn(params, aux, batch, key):
        out = losses(params, aux, batch, key)
        return total(out), out

    groups = int(s.get("microbatches", 1) or 1)  # checked by trainer.validate_config

    def accumulated(params, aux, batch, key):
        """((loss, metrics), grads) of the whole batch from `groups` row groups run one after another (lax.scan),
        so the LM's backward holds one group's activations: the same mean NLL over every label token of the batch
        (each group's weighted by its label count), the L2 term the mean over groups. Group g is rows g, g + G, ...
        (the sharded leading axis stays leading)."""
        b = batch["sft_ids"].shape[0]
        split = {k: jnp.swapaxes(v.reshape(b // groups, groups, *v.shape[1:]), 0, 1) for k, v in batch.items()}
        labels = split["sft_labels"][..., 1:] != IGNORE
        counts = jnp.sum(labels, axis=tuple(range(1, labels.ndim))).astype(jnp.float32)
        weights = counts / jnp.maximum(counts.sum(), 1.0)

        def group_value(p, part, k, w):
            """This group's share of every term (the NLL by its label count, the others 1 / groups) and of the
            loss: `total` of the shares, as terms and loss are linear in them."""
            share = {n: v * (w if n == "nll" else 1.0 / groups) for n, v in losses(p, aux, part, k).items()}
            return total(share), share

        def body(carry, xs):
            g, part, w = xs
            grad_fn = jax.value_and_grad(group_value, has_aux=True)
            (value, share), grads = grad_fn(params, part, jax.random.fold_in(key, g), w)
            v, acc, mets = carry
            mets = {n: mets[n] + share[n] for n in mets}
            return (v + value, jax.tree.map(jnp.add, acc, grads), mets), None

        shapes = jax.eval_shape(losses, params, aux, {k: v[0] for k, v in split.items()}, key)
        init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
                {n: jnp.zeros(x.shape, x.dtype) for n, x in shapes.items()})  # fmt: skip
        (value, grads, mets), _ = jax.lax.scan(body, init, (jnp.arange(groups), split, weights))
        return (value, mets), grads

    def train_step(state, aux, batch):
        key = step_key(aux.get("seed", config.seed), state["step"])  # the trainer passes the seed at run time
        if groups > 1:
            (loss, out), grads = accumulated(state["params"], aux, batch, key)
        else:
            (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], aux, batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **out, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def eval_step(params, aux, batch):
        out = losses(params, aux, batch, None)
        return {"loss": total(out), **out}

    return train_step, eval_step


def lm_aux(config, data, parts: SftParts, enc_state) -> tuple[object, dict]:
    """(LM graphdef, the step's aux pytree on host)."""
    lm_graphdef, lm_state = nnx.split(parts.lm)
    centre = control_lora(data.layout, data.offset)
    aux = {"enc": enc_state, "lm": lm_state, "control": jnp.asarray(data.offset), "centre": centre,
           "weight": jnp.asarray(data.weight)}  # fmt: skip
    return lm_graphdef, aux


def save_mt_lora(lora: dict, layout, out: Path) -> Path:
    """mt_lora's adapter as a PEFT directory (atomically), the experiment's row for its fold."""
    from converters.jax_to_peft import save_peft_adapter

    lora = jax.tree.map(np.asarray, lora)
    return save_peft_adapter(lora, layout.spec, out, overwrite=True, dtype=layout.spec.dtype)
