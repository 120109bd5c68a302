"""JAX LoRA pytree -> PEFT adapter directory (loadable by `PeftModel.from_pretrained`).

  python -m converters.jax_to_peft IN.safetensors OUT_DIR [--index K | --step S | --all]

IN is a file written by converters.peft_to_jax (or by dnd_jax.generate). For a stacked batch
file pick one row with --index/--step, or write every row with --all as OUT_DIR/step-<S>/.
OUT_DIR receives adapter_model.safetensors (keys "base_model.model.<module>.lora_{A,B}.weight",
A = lora_a.T [r, in], B = lora_b.T [out, r]) and adapter_config.json, written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from converters import safetensors_io
from converters.pytree import get_module, load_pytree
from converters.spec import LoraSpec, check_config
from dnd_jax.errors import DndError, run_cli
from dnd_jax.fileio import atomic_dir


def pytree_to_state_dict(params: Mapping, spec: LoraSpec, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Turns a single-adapter pytree into a PEFT state dict, checking every shape against the spec.

    Args:
      params: {tree path: {"lora_a": [in, r], "lora_b": [r, out]}} (NumPy or JAX arrays).
      spec: the adapter spec (gives module paths, ranks and sizes).
      dtype: cast to this dtype name ("bfloat16", ...); default: keep the arrays' dtype.

    Returns:
      PEFT keys -> C-contiguous NumPy arrays.
    """
    out = {}
    for m in spec.modules:
        try:
            node = get_module(params, spec, m.path)
            a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
        except (KeyError, TypeError):
            raise DndError(f"pytree has no lora_a/lora_b for module {'/'.join(spec.tree_path(m))!r}") from None
        if a.shape != (m.in_features, m.rank) or b.shape != (m.rank, m.out_features):
            raise DndError(
                f"module {m.path!r}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not match "
                f"the spec [{m.in_features}, {m.rank}] / [{m.rank}, {m.out_features}]"
            )
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        out[f"{spec.key_prefix}{m.path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{spec.key_prefix}{m.path}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def save_peft_adapter(
    params: Mapping,
    spec: LoraSpec,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    dtype: str | None = None,
    config_updates: Mapping | None = None,
) -> Path:
    """Writes a PEFT adapter directory atomically (temp dir, then rename).

    Args:
      params: single-adapter pytree.
      spec: adapter spec; its peft_config becomes adapter_config.json verbatim.
      out_dir: destination directory.
      overwrite: replace an existing directory.
      dtype: cast the weights (e.g. "bfloat16"); default keeps them as they are.
      config_updates: fields to change in adapter_config.json (e.g. base_model_name_or_path).

    Returns:
      The output directory.
    """
    if Path(out_dir).exists() and not overwrite:
        raise DndError(f"{out_dir}: output already exists (pass --overwrite to replace it)")
    config = dict(spec.peft_config)
    config.update(config_updates or {})
    check_config(config, "adapter spec")
    state = pytree_to_state_dict(params, spec, dtype)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        safetensors_io.save(tmp / "adapter_model.safetensors", state, spec.file_metadata or {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def select_row(params: Mapping, i: int) -> dict:
    """Row i of a stacked batch pytree."""
    return {k: select_row(v, i) if isinstance(v, Mapping) else v[i] for k, v in params.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m converters.jax_to_peft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("src", help="JAX LoRA .safetensors file (from converters.peft_to_jax or dnd_jax.generate)")
    ap.add_argument("out_dir", help="output PEFT adapter directory")
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--index", type=int, help="batch file: row to export")
    sel.add_argument("--step", type=int, help="batch file: checkpoint step to export")
    sel.add_argument("--all", action="store_true", help="batch file: export every row as OUT_DIR/step-<S>/")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    params, spec, steps = load_pytree(args.src)
    if steps is None:
        if args.index is not None or args.step is not None or args.all:
            raise DndError(f"{args.src}: holds one adapter; --index/--step/--all apply to batch files")
        save_peft_adapter(params, spec, args.out_dir, args.overwrite, args.dtype)
        print(f"wrote {args.out_dir}: {len(spec.modules)} modules")
        return 0
    if args.all:
        if Path(args.out_dir).exists() and not args.overwrite:
            raise DndError(f"{args.out_dir}: output already exists (pass --overwrite to replace it)")
        with atomic_dir(args.out_dir, overwrite=args.overwrite) as tmp:
            for i, s in enumerate(steps):
                save_peft_adapter(select_row(params, i), spec, tmp / f"step-{s:06d}", dtype=args.dtype)
        print(f"wrote {args.out_dir}: {len(steps)} adapters")
        return 0
    if args.step is not None:
        if args.step not in steps:
            raise DndError(f"{args.src}: no step {args.step} (steps {steps[0]}..{steps[-1]})")
        i = steps.index(args.step)
    elif args.index is not None:
        if not -len(steps) <= args.index < len(steps):
            raise DndError(f"{args.src}: --index {args.index} out of range ({len(steps)} checkpoints)")
        i = args.index
    else:
        raise DndError(f"{args.src}: holds {len(steps)} checkpoints; pass --index, --step or --all")
    save_peft_adapter(select_row(params, i), spec, args.out_dir, args.overwrite, args.dtype)
    print(f"wrote {args.out_dir}: step {steps[i]}, {len(spec.modules)} modules")
    return 0


if __name__ == "__main__":
    run_cli(main)
