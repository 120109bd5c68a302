"""The reconstruction objective (the paper's): the generator's tokens against checkpoint tokens.

The step: prompts [B, N, L] -> frozen extractor (encoder.type: BERT by default, with dropout as the
original, keyed by the step; dnd_jax/extractors.py) -> condition [B, N, L, D] + 1e-4 noise -> generator ->
tokens [B, T, R, K]; loss = mean over valid entries of w_t (pred - (target + 1e-5 noise))^2 (spec §5.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dnd_jax import fast_random


def _encode(enc_graphdef, enc_state, ids_bnl, mask_bnl, key, mask_padding, key_length=None):
    encoder = nnx.merge(enc_graphdef, enc_state)
    cond = encoder(ids_bnl, mask_bnl, key=key, mask_padding=mask_padding, key_length=key_length)
    return jax.lax.stop_gradient(cond).astype(jnp.float32)  # frozen: no gradient reaches the extractor


def weighted_mse(pred_btrk, target_btrk, weight_t):
    """Mean over valid (non-NaN) entries of w_t * (pred - target)^2, in float32."""
    valid = ~jnp.isnan(target_btrk)
    err = (pred_btrk.astype(jnp.float32) - jnp.where(valid, target_btrk, 0.0)) ** 2
    return jnp.sum(jnp.where(valid, weight_t[None, :, None, None] * err, 0.0)) / jnp.maximum(valid.sum(), 1)


def seed_array(seed: int) -> np.ndarray:
    """config.seed as the int32 scalar that jax.random.key makes of a Python int (x32): passed to a jitted program
    as a runtime input it gives the same key, so one compiled program serves every seed."""
    return np.asarray(seed, np.int32)  # validate_config keeps the seed in [0, 2**31)


def step_key(seed, step):
    """The train step's key: jax.random.key(seed) folded with the step (seed: an int or a seed_array)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def b_token_mask(layout) -> np.ndarray:
    """[T] float32: 1 on B^T tokens, 0 on A tokens."""
    mask = np.zeros(layout.num_tokens, np.float32)
    for s in layout.segments:
        if s.side == "b":
            mask[s.start : s.start + s.count] = 1.0
    return mask


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

    def train_step(state, enc_state, batch, weight, seed=None):  # seed: a runtime seed_array; None: config.seed
        key = step_key(config.seed if seed is None else seed, state["step"])
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
