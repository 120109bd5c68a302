"""PEFT LoRA adapter directory(ies) -> JAX LoRA pytree file.

  python -m converters.peft_to_jax ADAPTER_DIR OUT.safetensors [--base-config config.json]
  python -m converters.peft_to_jax --batch CHECKPOINT_FOLDER OUT.safetensors

A single adapter becomes {module path: {"lora_a": [in, r], "lora_b": [r, out]}} plus its spec
(see converters/spec.py). In batch mode every checkpoint of a folder (PEFT directories such as
`step-000123/` or `checkpoint-123/`, or the original DnD's flat `123.safetensors` files next to
one adapter_config.json) is read in numeric step order and every leaf is stacked on a leading
axis. Bits are never changed: bf16 stays bf16, and the transposes are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from converters import safetensors_io
from converters.pytree import save_pytree
from converters.spec import LoraSpec, ModuleSpec, check_config, module_scale, natural_key
from dnd_jax.errors import DndError, run_cli

KEY_PREFIX = "base_model.model."
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Key fragments of LoRA variants we refuse, with the name to tell the user.
_VARIANT_KEYS = {
    "lora_magnitude_vector": "DoRA",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "modules_to_save": "modules_to_save",
    "trainable_tokens": "trainable tokens",
}


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Reads and validates an adapter_config.json."""
    path = Path(path)
    if not path.is_file():
        raise DndError(f"{path}: missing adapter_config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DndError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DndError(f"{path}: expected a JSON object")
    check_config(config, str(path))
    return config


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads adapter weights (.safetensors memory-mapped, or a torch .bin) as NumPy arrays.

    Returns:
      (state dict, safetensors metadata or {"format": "pt"} for .bin).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_io.load(path)
    import ml_dtypes
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a corrupt pickle or zip)
        raise DndError(f"{path}: cannot read torch checkpoint ({e.__class__.__name__}: {str(e)[:120]})") from None
    out = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise DndError(f"{path}: key {k!r} is not a tensor")
        if t.dtype == torch.bfloat16:
            out[k] = t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.contiguous().numpy()
    return out, {"format": "pt"}


def find_weights(adapter_dir: Path) -> Path:
    """Returns the weights file of a PEFT adapter directory."""
    if not adapter_dir.is_dir():
        raise DndError(f"{adapter_dir}: no such adapter directory")
    for name in _WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise DndError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _module_prefix(paths: list[str]) -> str:
    """Dotted prefix to strip so pytree paths start at the layer container ("layers/0/...").

    The prefix is everything before the container of the first numeric path component
    ("model" for "model.layers.0.self_attn.q_proj"), when every module shares it.
    """
    first = paths[0].split(".")
    idx = next((i for i, c in enumerate(first) if c.isdigit()), None)
    if idx is None or idx < 2:
        return ""
    prefix = ".".join(first[: idx - 1])
    return prefix if all(p.startswith(prefix + ".") for p in paths) else ""


def state_dict_to_pytree(
    state: dict[str, np.ndarray], config: dict, where: str, file_metadata: dict | None = None
) -> tuple[dict, LoraSpec]:
    """Turns a PEFT LoRA state dict into (pytree, spec).

    Args:
      state: PEFT keys ("base_model.model.<module>.lora_A.weight") -> arrays.
      config: the adapter_config.json dict (already validated).
      where: file name used in error messages.
      file_metadata: safetensors metadata of the source file, kept for the way back.

    Returns:
      (params, spec): params[<tree path>] = {"lora_a": A.T, "lora_b": B.T}.
    """
    for key in state:  # refuse known variants first, whatever the key order
        for frag, name in _VARIANT_KEYS.items():
            if frag in key:
                raise DndError(f"{where}: key {key!r}: {name} is not supported")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            if key.endswith(".lora_B.bias"):
                raise DndError(f"{where}: key {key!r}: lora_bias is not supported")
            raise DndError(
                f"{where}: key {key!r} is not a PEFT LoRA weight (expected "
                f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')"
            )
        if arr.ndim != 2:
            raise DndError(
                f"{where}: key {key!r} has rank {arr.ndim} (shape {list(arr.shape)}); "
                "LoRA on conv layers is not supported"
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = arr
    if not pairs:
        raise DndError(f"{where}: no LoRA weights found")
    dtypes = {a.dtype for p in pairs.values() for a in p.values()}
    if len(dtypes) != 1:
        raise DndError(f"{where}: mixed dtypes {sorted(d.name for d in dtypes)} in one adapter")
    modules = []
    for path in sorted(pairs, key=natural_key):
        p = pairs[path]
        for ab in "AB":
            if ab not in p:
                raise DndError(f"{where}: key {KEY_PREFIX}{path}.lora_{ab}.weight is missing")
        a, b = p["A"], p["B"]
        if a.shape[0] != b.shape[1]:
            raise DndError(
                f"{where}: module {path!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank"
            )
        alpha, scale = module_scale(config, path, int(a.shape[0]), where)
        modules.append(ModuleSpec(path, int(a.shape[0]), alpha, scale, int(a.shape[1]), int(b.shape[0])))
    prefix = _module_prefix([m.path for m in modules])
    spec = LoraSpec(
        peft_config=config,
        modules=tuple(modules),
        prefix=prefix,
        dtype=dtypes.pop().name,
        key_prefix=KEY_PREFIX,
        file_metadata=dict(file_metadata or {"format": "pt"}),
    )
    params: dict = {}
    for m in modules:
        node = params
        for c in spec.tree_path(m):
            node = node.setdefault(c, {})
        node["lora_a"] = pairs[m.path]["A"].T
        node["lora_b"] = pairs[m.path]["B"].T
    return params, spec


def load_peft_adapter(
    adapter_dir: str | os.PathLike, base_config: str | os.PathLike | None = None
) -> tuple[dict, LoraSpec]:
    """Loads a PEFT LoRA adapter directory as a JAX-layout pytree of NumPy arrays.

    Args:
      adapter_dir: directory with adapter_config.json and adapter_model.safetensors (or .bin).
      base_config: optional base model config.json (or its directory): every LoRA shape must fit.

    Returns:
      (params, spec). Arrays may be read-only memory-mapped views; `jnp.asarray` copies them.
    """
    adapter_dir = Path(adapter_dir)
    weights = find_weights(adapter_dir)
    config = read_adapter_config(adapter_dir / "adapter_config.json")
    state, meta = read_state_dict(weights)
    params, spec = state_dict_to_pytree(state, config, str(weights), meta)
    if base_config is not None:
        from converters.base_check import check_against_base

        check_against_base(spec, base_config, where=str(weights))
    return params, spec


_STEP_RE = re.compile(r"(\d+)(?:\.safetensors)?$")


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Lists the checkpoints of a collection folder in numeric step order.

    Entries are PEFT adapter directories whose name ends in a number (`step-000123`,
    `checkpoint-123`) or flat `<step>.safetensors` files (the original DnD layout). Other files
    (manifests, configs) are ignored.

    Returns:
      [(step, path)], sorted by step.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DndError(f"{folder}: no such checkpoint folder")
    found: dict[int, Path] = {}
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        is_ckpt = (entry.is_dir() and any((entry / w).is_file() for w in _WEIGHT_FILES)) or (
            entry.is_file() and entry.suffix == ".safetensors"
        )
        m = _STEP_RE.search(entry.name)
        if not is_ckpt or m is None:
            continue
        step = int(m.group(1))
        if step in found:
            raise DndError(f"{folder}: two checkpoints for step {step}: {found[step].name} and {entry.name}")
        found[step] = entry
    if not found:
        raise DndError(f"{folder}: no checkpoints (expected step-N/ adapter dirs or N.safetensors files)")
    return sorted(found.items())


def load_peft_batch(
    folder: str | os.PathLike, limit: int | None = None, base_config: str | os.PathLike | None = None
) -> tuple[dict, LoraSpec, list[int], list[str]]:
    """Loads many checkpoints of one adapter layout, stacked on a leading axis in step order.

    Args:
      folder: collection folder (see `list_checkpoints`).
      limit: keep only the first `limit` checkpoints in step order.
      base_config: optional base model config.json to check the shapes against.

    Returns:
      (stacked params, spec of the first checkpoint, steps, source names).
    """
    ckpts = list_checkpoints(folder)[:limit]
    folder = Path(folder)
    stacked: dict | None = None
    spec0: LoraSpec | None = None
    for i, (_step, entry) in enumerate(ckpts):
        if entry.is_dir():
            weights, config_path = find_weights(entry), entry / "adapter_config.json"
        else:
            weights, config_path = entry, folder / "adapter_config.json"
        config = read_adapter_config(config_path)
        state, meta = read_state_dict(weights)
        params, spec = state_dict_to_pytree(state, config, str(weights), meta)
        if spec0 is None:
            spec0 = spec
            if base_config is not None:
                from converters.base_check import check_against_base

                check_against_base(spec, base_config, where=str(weights))
            stacked = {}
        elif spec.modules != spec0.modules or spec.dtype != spec0.dtype:
            _explain_mismatch(spec0, spec, str(weights), ckpts[0][1].name)
        _stack_into(stacked, params, i, len(ckpts))
    return stacked, spec0, [s for s, _ in ckpts], [e.name for _, e in ckpts]


def _stack_into(stacked: dict, params: dict, i: int, n: int) -> None:
    for k, v in params.items():
        if isinstance(v, dict):
            _stack_into(stacked.setdefault(k, {}), v, i, n)
        else:
            if k not in stacked:
                stacked[k] = np.empty((n, *v.shape), dtype=v.dtype)
            stacked[k][i] = v


def _explain_mismatch(spec0: LoraSpec, spec: LoraSpec, where: str, first: str) -> None:
    if spec.dtype != spec0.dtype:
        raise DndError(f"{where}: dtype {spec.dtype} differs from {spec0.dtype} of {first}")
    ref = {m.path: m for m in spec0.modules}
    for m in spec.modules:
        r = ref.get(m.path)
        if r is None:
            raise DndError(f"{where}: module {m.path!r} is not in {first}")
        if r != m:
            raise DndError(
                f"{where}: module {m.path!r} has rank {m.rank}, shape "
                f"[{m.in_features}->{m.out_features}], alpha {m.alpha}; {first} has rank {r.rank}, "
                f"shape [{r.in_features}->{r.out_features}], alpha {r.alpha} (mixed ranks in a batch)"
            )
    missing = sorted(set(ref) - {m.path for m in spec.modules}, key=natural_key)
    raise DndError(f"{where}: module {missing[0]!r} of {first} is missing")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m converters.peft_to_jax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("src", help="PEFT adapter directory, or a checkpoint folder with --batch")
    ap.add_argument("out", help="output .safetensors file (JAX LoRA pytree + spec)")
    ap.add_argument("--batch", action="store_true", help="stack every checkpoint of SRC in step order")
    ap.add_argument("--limit", type=int, default=None, help="with --batch: first N checkpoints only")
    ap.add_argument("--base-config", default=None, help="base model config.json to check shapes against")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        raise DndError(f"{args.out}: output already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    if args.batch:
        params, spec, steps, sources = load_peft_batch(args.src, args.limit, args.base_config)
        save_pytree(args.out, params, spec, steps=steps, sources=sources)
        what = f"{len(steps)} checkpoints (steps {steps[0]}..{steps[-1]})"
    else:
        params, spec = load_peft_adapter(args.src, args.base_config)
        save_pytree(args.out, params, spec)
        what = "1 adapter"
    n = sum(m.rank * (m.in_features + m.out_features) for m in spec.modules)
    print(
        f"wrote {args.out}: {what}, {len(spec.modules)} modules, {n:,} parameters each, "
        f"{spec.dtype}, in {time.perf_counter() - t0:.2f} s"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
