"""The JAX LoRA file: one safetensors file holding the flattened pytree and its spec.

Why safetensors rather than orbax: a LoRA export is a small, framework-neutral artifact that
other tools (and PyTorch) can open, that memory-maps for batches of hundreds of checkpoints, and
that is written atomically as one file. Orbax holds the generator's training state instead.

File layout: tensor names are pytree paths joined by "/" ("layers/0/self_attn/q_proj/lora_a");
`__metadata__` holds "dnd_jax.spec" (LoraSpec JSON) and, for batches, "dnd_jax.steps" (JSON
list of checkpoint steps, one per row of the leading axis) and "dnd_jax.sources".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import safetensors_io
from converters.spec import LoraSpec
from dnd_jax.errors import DndError

SPEC_KEY = "dnd_jax.spec"
STEPS_KEY = "dnd_jax.steps"
SOURCES_KEY = "dnd_jax.sources"


def flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out["/".join((*prefix, str(k)))] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def get_module(params: Mapping, spec: LoraSpec, path: str) -> Mapping:
    """Returns the {"lora_a", "lora_b"} node of module `path` (full dotted path)."""
    node = params
    for p in spec.tree_path(path):
        node = node[p]
    return node


def save_pytree(
    path: str | os.PathLike,
    params: Mapping,
    spec: LoraSpec,
    steps: list[int] | None = None,
    sources: list[str] | None = None,
) -> None:
    """Writes a LoRA pytree (single or stacked batch) and its spec to one safetensors file.

    Args:
      path: destination .safetensors file (written atomically).
      params: nested dict of arrays (NumPy or JAX; JAX arrays are fetched to host).
      spec: the adapter spec.
      steps: for a stacked batch, the checkpoint step of each row.
      sources: for a stacked batch, the source name of each row.
    """
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    meta = {SPEC_KEY: spec.to_json()}
    if steps is not None:
        meta[STEPS_KEY] = json.dumps([int(s) for s in steps])
    if sources is not None:
        meta[SOURCES_KEY] = json.dumps(list(sources))
    safetensors_io.save(path, flat, meta)


def load_pytree(path: str | os.PathLike, mmap: bool = True) -> tuple[dict, LoraSpec, list[int] | None]:
    """Reads a file written by `save_pytree`.

    Args:
      path: the .safetensors file.
      mmap: memory-map the arrays (read-only views).

    Returns:
      (params nested dict of NumPy arrays, spec, steps or None for a single adapter).
    """
    flat, meta = safetensors_io.load(path, mmap=mmap)
    if SPEC_KEY not in meta:
        raise DndError(
            f"{path}: not a dnd_jax LoRA file (no {SPEC_KEY!r} metadata); "
            "for a PEFT adapter directory use converters.peft_to_jax"
        )
    spec = LoraSpec.from_json(meta[SPEC_KEY], where=str(path))
    steps = json.loads(meta[STEPS_KEY]) if STEPS_KEY in meta else None
    params = unflatten(flat)
    for m in spec.modules:
        try:
            node = get_module(params, spec, m.path)
            node["lora_a"], node["lora_b"]
        except KeyError:
            raise DndError(f"{path}: module {m.path!r} of the spec has no lora_a/lora_b arrays") from None
    return params, spec, steps
