"""Checks a LoRA spec against a base model's config.json: every module must exist and fit.

The base architecture is instantiated from the config on PyTorch's meta device (no memory, no
weights), so any transformers architecture works, and layer shapes come from the real modules
(`nn.Linear` [out, in] or GPT-2 `Conv1D` [in, out]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from converters.spec import LoraSpec
from dnd_jax.errors import DndError


def load_base_config(config_path: str | os.PathLike):
    """Reads a base model config.json (or its directory) as a transformers config."""
    import transformers

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise DndError(f"{path}: no such base model config")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        cfg = transformers.AutoConfig.for_model(**d)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError) as e:
        raise DndError(f"{path}: not a transformers model config ({e})") from None
    return cfg


def base_layer_shapes(config) -> dict[str, tuple[int, int]]:
    """Returns {module path: (in_features, out_features)} for every linear layer of a base model.

    Args:
      config: a transformers config, or a config.json file / directory holding one.
    """
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    cfg = config if isinstance(config, transformers.PretrainedConfig) else load_base_config(config)
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        except ValueError:
            model = transformers.AutoModel.from_config(cfg)
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, Conv1D):
            shapes[name] = tuple(mod.weight.shape)
    return shapes


def check_against_base(spec: LoraSpec, config_path: str | os.PathLike, where: str = "adapter") -> None:
    """Raises DndError unless every LoRA module names a linear layer of the base whose shape fits.

    Args:
      spec: the adapter spec.
      config_path: base model config.json (or its directory).
      where: the adapter file, for messages.
    """
    shapes = base_layer_shapes(config_path)
    for m in spec.modules:
        key = f"{spec.key_prefix}{m.path}.lora_A.weight"
        if m.path not in shapes:
            raise DndError(f"{where}: key {key!r}: the base model ({config_path}) has no linear layer {m.path!r}")
        if shapes[m.path] != (m.in_features, m.out_features):
            fi, fo = shapes[m.path]
            raise DndError(
                f"{where}: key {key!r}: LoRA shape [{m.in_features}->{m.out_features}] does not fit "
                f"layer {m.path!r} [{fi}->{fo}] of the base model ({config_path})"
            )
