"""The typed LoRA adapter spec that travels with a JAX LoRA pytree.

It keeps every field needed to write the adapter back for PEFT: the complete original
`adapter_config.json`, the key layout of the PEFT file, and per module the rank, alpha and scale
PEFT would use (rank_pattern / alpha_pattern / rsLoRA resolved exactly as PEFT resolves them).

Pytree layout (Flax kernel convention, x @ kernel):
  params[<module path relative to spec.prefix, split on ".">]["lora_a"]  [in, r]   = PEFT lora_A.T
  params[...]["lora_b"]                                                     [r, out]  = PEFT lora_B.T
  delta(x) = x @ lora_a @ lora_b * module.scale
A batch file stacks every leaf on a leading checkpoint axis: [n, in, r], [n, r, out].
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from dnd_jax.errors import DndError

# PEFT adapter_config.json fields whose non-default values change what the weights mean. A
# value other than the default listed here is refused rather than converted silently wrong.
UNSUPPORTED_CONFIG = {
    "use_dora": (False, None),
    "modules_to_save": (None, [], ()),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "megatron_config": (None,),
    "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
}
VARIANT_NAMES = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "megatron_config": "Megatron LoRA",
    "use_qalora": "QALoRA",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


def natural_key(s: str) -> list:
    """Sort key that orders digit runs numerically ("layers.10" after "layers.9")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-adapted linear layer.

    Attributes:
      path: full dotted module path inside the base model, e.g. "model.layers.0.self_attn.q_proj".
      rank: r of this module (rank_pattern resolved).
      alpha: lora_alpha of this module (alpha_pattern resolved).
      scale: alpha / r, or alpha / sqrt(r) with rsLoRA: the factor PEFT multiplies B A x by.
      in_features: input size of the layer (rows of lora_a).
      out_features: output size of the layer (columns of lora_b).
    """

    path: str
    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Everything about a LoRA adapter except its weights.

    Attributes:
      peft_config: the adapter_config.json dict, verbatim.
      modules: the adapted layers, in natural (numeric) order of their paths.
      prefix: dotted prefix stripped from module paths to form pytree paths ("model" for Qwen2).
      dtype: dtype name of the weights ("float32", "bfloat16", "float16").
      key_prefix: prefix of the PEFT state-dict keys ("base_model.model.").
      file_metadata: the safetensors `__metadata__` of the source file ({"format": "pt"}).
    """

    peft_config: dict
    modules: tuple[ModuleSpec, ...]
    prefix: str = ""
    dtype: str = "float32"
    key_prefix: str = "base_model.model."
    file_metadata: dict = dataclasses.field(default_factory=lambda: {"format": "pt"})

    # Convenience views of the config.
    @property
    def r(self) -> int:
        return int(self.peft_config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return self.peft_config.get("lora_alpha", 8)

    @property
    def use_rslora(self) -> bool:
        return bool(self.peft_config.get("use_rslora", False))

    @property
    def rank_pattern(self) -> dict:
        return dict(self.peft_config.get("rank_pattern") or {})

    @property
    def alpha_pattern(self) -> dict:
        return dict(self.peft_config.get("alpha_pattern") or {})

    @property
    def target_modules(self) -> Any:
        return self.peft_config.get("target_modules")

    @property
    def base_model(self) -> str | None:
        return self.peft_config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.peft_config.get("fan_in_fan_out", False))

    def tree_path(self, module: ModuleSpec | str) -> tuple[str, ...]:
        """Pytree path of a module: its dotted path minus `prefix`, split on dots."""
        path = module.path if isinstance(module, ModuleSpec) else module
        if self.prefix:
            path = path[len(self.prefix) + 1 :]
        return tuple(path.split("."))

    def module(self, path: str) -> ModuleSpec:
        for m in self.modules:
            if m.path == path:
                return m
        raise DndError(f"adapter spec has no module {path!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "spec") -> LoraSpec:
        try:
            d = json.loads(text)
            d["modules"] = tuple(ModuleSpec(**m) for m in d["modules"])
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DndError(f"{where}: invalid dnd_jax LoRA spec ({e})") from None


def check_config(config: dict, where: str) -> None:
    """Refuses adapter configs this converter cannot represent exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise DndError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for field, defaults in UNSUPPORTED_CONFIG.items():
        value = config.get(field)
        if value not in defaults:
            raise DndError(f"{where}: {VARIANT_NAMES[field]} ({field}={value!r}) is not supported")


def module_scale(config: dict, path: str, rank: int, where: str) -> tuple[float, float]:
    """Resolves a module's (alpha, scale) exactly as PEFT does; checks its rank against the config.

    Args:
      config: adapter_config.json dict.
      path: full dotted module path.
      rank: rank found in the weights.
      where: file name for error messages.

    Returns:
      (alpha, scale).
    """
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk = pattern_key(list(rank_pattern), path)
    expected = rank_pattern[rk] if rk is not None else config.get("r", 8)
    if rank != expected:
        raise DndError(f"{where}: module {path!r} has rank {rank} but the config says {expected}")
    ak = pattern_key(list(alpha_pattern), path)
    alpha = alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    return alpha, scale
