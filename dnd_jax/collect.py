"""LoRA checkpoint collection with PyTorch + PEFT, in the paper's two phases.

  python -m dnd_jax.collect --config configs/collect/commonsense_smollm2.py:ARC-e --out runs/collect

Phase 1 trains a LoRA (AdamW, cosine schedule with warm-up); phase 2 continues from it at a
constant learning rate and saves a PEFT adapter after every optimizer step:
  <out>/<dataset>/step-000041/ ... step-000064/   (adapter_config.json + adapter_model.safetensors)
  <out>/<dataset>/manifest.json                  (steps, config, base model; "complete" at the end)
  <out>/<dataset>/resume.pt                       (LoRA, optimizer and RNG state of the last finished step)
Loss is on the response tokens only, with the model's chat template. The data order is a pure
function of the seed and the step, so a run that is killed and re-run continues from its last
saved step and ends with the same checkpoints as a run that never stopped. Every file is
written to a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dnd_jax.config_cli import check_same_config, config_dict, parse_or_exit
from dnd_jax.data.prompts import load_split
from dnd_jax.distributed import StopOnSigterm
from dnd_jax.errors import DndError, run_cli
from dnd_jax.fileio import atomic_dir, atomic_file, workdir_lock
from dnd_jax.lm import encode_sft_example, load_base, pick_device

PHASE1_SAVE_EVERY = 10


def _examples_per_step(config, step: int) -> int:
    p = config.phase1 if step < config.phase1.steps else config.phase2
    return p.batch_size * p.grad_accum


def _example_offset(config, step: int) -> int:
    """Examples consumed before optimizer step `step` (0-based)."""
    p1 = config.phase1.steps
    b1 = config.phase1.batch_size * config.phase1.grad_accum
    b2 = config.phase2.batch_size * config.phase2.grad_accum
    return min(step, p1) * b1 + max(0, step - p1) * b2


def example_indices(config, step: int, n: int) -> np.ndarray:
    """Dataset indices used by optimizer step `step`: epochs of seeded permutations, no state."""
    start = _example_offset(config, step)
    pos = np.arange(start, start + _examples_per_step(config, step))
    epochs = pos // n
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = np.random.default_rng([config.seed, int(e)]).permutation(n)
        out[epochs == e] = perm[pos[epochs == e] % n]
    return out


def learning_rate(config, step: int) -> float:
    """Phase 1: linear warm-up then cosine to 0; phase 2: constant."""
    p1 = config.phase1
    if step >= p1.steps:
        return config.phase2.lr
    warm = max(1, math.ceil(p1.warmup_ratio * p1.steps))
    if step < warm:
        return p1.lr * (step + 1) / warm
    progress = (step - warm) / max(1, p1.steps - warm)
    return p1.lr * 0.5 * (1 + math.cos(math.pi * progress))


def init_hash(model) -> str:
    """sha256 of the LoRA's initial A matrices (name order, float32 bytes): equal for two collections
    exactly when they start from the same point. B starts at zero, so A is the whole init."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if "lora_A" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int, device: str):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), mask.to(device), labels.to(device)


def response_loss(model, ids, mask, labels):
    """The causal-LM loss of `model(input_ids, attention_mask, labels=labels).loss` (the mean cross-entropy over the
    label tokens, logits in float32), with the LM head run only over the positions from the batch's first to its
    last predicted label (`logits_to_keep`) instead of every position: the prompt's logits are never used, and on
    SmolLM2-135M the head over all positions was ~20 % of a step (4.35 -> 3.53 s, a 4 x 149-token ARC-c batch with
    20 label tokens, one thread of the 2-core EPYC). The same loss and gradient up to float rounding; a model's own
    logit post-processing (Gemma's soft-capping) still applies, inside its forward."""
    import torch

    rows = (labels[:, 1:] != -100).any(0).nonzero()[:, 0]  # position t predicts labels[:, t + 1]
    if len(rows) == 0:  # nothing to predict: the model's own (NaN) loss, which the caller reports
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.arange(lo, hi, device=ids.device)).logits
    target = labels[:, lo + 1 : hi + 1]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)


def _write_manifest(ds_dir: Path, manifest: dict) -> None:
    with atomic_file(ds_dir / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)


def _previous_seconds(manifest_path: Path) -> float:
    if not manifest_path.is_file():
        return 0.0
    return float(json.loads(manifest_path.read_text()).get("seconds", 0.0))


def _save_resume(ds_dir: Path, model, opt, step: int, cfg: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict

    # The RNG states too: with lora.dropout > 0 the dropout masks of the steps after a resume must be the
    # ones an uninterrupted run draws (the data order needs none: it is a function of seed and step).
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    state = {"step": step, "config": cfg, "lora": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
             "rng": rng}  # fmt: skip
    with atomic_file(ds_dir / "resume.pt") as f:
        torch.save(state, f)


def _load_resume(ds_dir: Path, model, opt, cfg: dict) -> int:
    import torch
    from peft import set_peft_model_state_dict

    path = ds_dir / "resume.pt"
    if not path.exists():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user-facing error)
        raise DndError(f"{path}: unreadable resume state ({e.__class__.__name__}); delete it to restart") from None
    check_same_config(state["config"], cfg, str(ds_dir))
    result = set_peft_model_state_dict(model, state["lora"])
    if getattr(result, "unexpected_keys", None):
        raise DndError(f"{path}: resume state does not match the model ({result.unexpected_keys[:2]})")
    opt.load_state_dict(state["optimizer"])
    if "rng" not in state:
        raise DndError(f"{path}: resume state has no RNG state (written by an older version); delete it to restart")
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def validate_config(config) -> None:
    """Impossible values of a collection config, each a one-line error naming the field."""
    checks = [("max_samples", 1), ("cutoff_len", 1), ("lora.r", 1), ("lora.alpha", 0), ("phase1.steps", 0),
              ("phase1.batch_size", 1), ("phase1.grad_accum", 1), ("phase1.lr", 0), ("phase1.weight_decay", 0),
              ("phase1.warmup_ratio", 0), ("phase2.steps", 1), ("phase2.batch_size", 1), ("phase2.grad_accum", 1),
              ("phase2.lr", 0)]  # fmt: skip
    for name, low in checks:
        node = config
        for part in name.split("."):
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
            raise DndError(f"config field {name}: {node!r} is not a number")
        if node < low:
            raise DndError(f"config field {name}: {node!r} must be {'positive' if low else '>= 0'}")
    if not 0 <= config.lora.dropout < 1:
        raise DndError(f"config field lora.dropout: {config.lora.dropout!r} must be in [0, 1)")


def collect(config, out: str | Path) -> Path:
    """Runs (or resumes) the two-phase collection for `config.dataset`.

    Args:
      config: a collection ConfigDict (configs/collect/*.py).
      out: output root; checkpoints go to <out>/<dataset>/.

    Returns:
      The dataset's checkpoint folder.
    """
    validate_config(config)
    cfg = config_dict(config)
    ds_dir = Path(out) / config.dataset
    records = load_split(config.data_dir, f"{config.dataset}_train")[: config.max_samples]
    total = config.phase1.steps + config.phase2.steps
    manifest_path = ds_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        check_same_config(manifest["config"], cfg, str(ds_dir))
        if manifest.get("complete"):
            print(f"{ds_dir}: already complete ({len(manifest['steps'])} checkpoints)", file=sys.stderr)
            return ds_dir
    # torch and PEFT only now: a bad config or dataset, or a finished collection, answers in a fraction of a second
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    ds_dir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(ds_dir, "collect"):  # one writer; the leftovers below are then nobody's
        for leftover in [*ds_dir.glob(".*.tmp-*"), *ds_dir.glob(".*.old-*")]:  # from a run killed while writing
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        device = pick_device(config.device)
        model, tok, model_path = load_base(config.model, config.dtype, device)
        # Seeded right before the LoRA layers are made, after anything that may consume the global RNG
        # (building the base model, dequantizing it into the cache on first use): the initial A is a
        # function of (seed, base model, LoRA config) only, shared by every dataset, as in the original
        # (one LLaMA-Factory seed for all). `init_hash` in the manifest records it.
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM",
                          base_model_name_or_path=str(model_path))  # fmt: skip
        model = get_peft_model(model, lora)
        ihash = init_hash(model)
        if manifest_path.exists() and json.loads(manifest_path.read_text()).get("init_hash", ihash) != ihash:
            raise DndError(
                f"{ds_dir}: LoRA init differs from the one this collection started with; delete it to restart"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.phase1.lr, weight_decay=config.phase1.weight_decay)
        start = _load_resume(ds_dir, model, opt, cfg)
        examples = [encode_sft_example(tok, r, config.cutoff_len) for r in records]
        manifest = {"dataset": config.dataset, "model": config.model, "base_model_path": str(model_path),
                    "phase1_steps": config.phase1.steps, "phase2_steps": config.phase2.steps, "config": cfg,
                    "init_hash": ihash, "seconds": _previous_seconds(manifest_path),
                    "steps": sorted(int(p.name[5:]) for p in ds_dir.glob("step-*") if int(p.name[5:]) <= start),
                    "complete": False}  # fmt: skip
        model.train()
        t_start = time.perf_counter() - manifest["seconds"]
        bar = tqdm(total=total, initial=start, desc=f"collect {config.dataset}", unit="step", dynamic_ncols=True)
        stop = StopOnSigterm()
        try:
            for step in range(start, total):
                phase = config.phase1 if step < config.phase1.steps else config.phase2
                for g in opt.param_groups:
                    g["lr"] = learning_rate(config, step)
                idx = example_indices(config, step, len(examples))
                t0, loss_sum = time.perf_counter(), 0.0
                for mb in np.split(idx, phase.grad_accum):
                    ids, mask, labels = _collate([examples[i] for i in mb], tok.pad_token_id, device)
                    loss = response_loss(model, ids, mask, labels) / phase.grad_accum
                    loss.backward()
                    loss_sum += loss.detach().item()
                if not math.isfinite(loss_sum):
                    raise DndError(f"{ds_dir}: non-finite loss at step {step + 1}")
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                if done > config.phase1.steps:
                    with atomic_dir(ds_dir / f"step-{done:06d}", overwrite=True) as tmp:
                        model.save_pretrained(tmp)
                        (tmp / "README.md").unlink(missing_ok=True)
                    manifest["steps"] = sorted(set(manifest["steps"]) | {done})
                manifest["seconds"] = round(time.perf_counter() - t_start, 1)  # training wall time, over resumes
                if done > config.phase1.steps or done % PHASE1_SAVE_EVERY == 0 or done == config.phase1.steps:
                    _save_resume(ds_dir, model, opt, done, cfg)
                    _write_manifest(ds_dir, manifest)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{learning_rate(config, step):.1e}",
                                s_per_step=f"{time.perf_counter() - t0:.1f}")  # fmt: skip
                bar.update()
                if stop.requested(done) and done < total:  # SIGTERM (preemption): save here and leave
                    _save_resume(ds_dir, model, opt, done, cfg)
                    _write_manifest(ds_dir, manifest)
                    bar.close()
                    print(f"stopped by SIGTERM after step {done} of {config.dataset}; its state is in {ds_dir}; "
                          "re-run the same command to resume", file=sys.stderr)  # fmt: skip
                    raise SystemExit(0)
        finally:  # the bar ends its line before any error is printed
            stop.restore()
            bar.close()
        manifest["complete"] = True
        _write_manifest(ds_dir, manifest)
        return ds_dir


def is_complete(out: str | Path, dataset: str) -> bool:
    """Whether <out>/<dataset>/ holds a finished collection (its manifest says "complete")."""
    m = Path(out) / dataset / "manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("complete", False)


def collect_tasks(config, datasets: list[str], out: str | Path, data_dir: str | None = None) -> list[Path]:
    """Collects (or resumes) several datasets in turn with one recipe; a progress bar over tasks with ETA.

    Args:
      config: a collection ConfigDict; its `dataset` (and `data_dir`, if given) are replaced per task.
      datasets: dataset names, each a `<name>_train` entry of the data directory.
      out: output root; checkpoints go to <out>/<dataset>/.
      data_dir: data directory of every dataset (default: config.data_dir).

    Returns:
      The datasets' checkpoint folders.
    """
    import copy

    from tqdm import tqdm

    todo = [n for n in datasets if not is_complete(out, n)]
    bar = tqdm(total=len(datasets), initial=len(datasets) - len(todo), desc="collect tasks", unit="task",
               dynamic_ncols=True, position=1)  # fmt: skip
    dirs = []
    for name in datasets:
        c = copy.deepcopy(config)
        c.dataset = name  # existing fields: allowed on a locked ConfigDict
        if data_dir is not None:
            c.data_dir = str(data_dir)
        was_done = is_complete(out, name)
        dirs.append(collect(c, out))
        if not was_done:
            bar.set_postfix(last=name)
            bar.update()
    bar.close()
    return dirs


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "collection config file (configs/collect/*.py:<dataset>)",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("out", None, "output root directory; checkpoints go to OUT/<dataset>/")
    flags.DEFINE_list("datasets", None, "collect these datasets in turn (one recipe) instead of config.dataset")
    parse_or_exit(argv if argv is not None else sys.argv)
    if flags.FLAGS.config is None or flags.FLAGS.out is None:
        raise DndError("both --config and --out are required")
    if flags.FLAGS.datasets:
        for d in collect_tasks(flags.FLAGS.config, flags.FLAGS.datasets, flags.FLAGS.out):
            print(f"checkpoints in {d}")
        return 0
    ds_dir = collect(flags.FLAGS.config, flags.FLAGS.out)
    print(f"checkpoints in {ds_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
