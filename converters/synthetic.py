"""Random PEFT-format LoRA adapters with the exact key names and shapes of a real base model.

Shapes come from the architecture built on the meta device from a transformers config (e.g. a
`Qwen2Config` with Qwen2.5-7B's published sizes), so benchmarks and shape tests use the real
layout of models that cannot be downloaded here, without allocating the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from converters import safetensors_io
from converters.base_check import base_layer_shapes
from dnd_jax.fileio import atomic_dir

QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qwen2_config(size: str):
    """A `Qwen2Config` with the published sizes of Qwen2.5-{0.5B,1.5B,7B} (random weights only)."""
    import transformers

    sizes = {
        "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    }  # fmt: skip
    return transformers.Qwen2Config(**sizes[size])


def synthetic_state_dict(
    config, r: int, targets=QWEN_TARGETS, dtype: str = "bfloat16", seed: int = 0, std: float = 0.02
) -> dict[str, np.ndarray]:
    """PEFT LoRA state dict with Gaussian A and B for every target linear layer of `config`'s model.

    Args:
      config: transformers config of the base model.
      r: LoRA rank.
      targets: module name suffixes to adapt.
      dtype: weight dtype name.
      seed: RNG seed.
      std: standard deviation of the entries.
    """
    rng = np.random.default_rng(seed)
    pattern = re.compile(rf"(.*\.)?({'|'.join(targets)})$")
    out = {}
    for path, (fin, fout) in base_layer_shapes(config).items():
        if pattern.match(path):
            prefix = f"base_model.model.{path}"
            out[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, fin), np.float32) * std).astype(dtype)
            out[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fout, r), np.float32) * std).astype(dtype)
    return out


def write_synthetic_adapter(
    out_dir: str | Path,
    config,
    r: int,
    alpha: float,
    targets=QWEN_TARGETS,
    dtype: str = "bfloat16",
    seed: int = 0,
    base_name: str = "synthetic",
) -> Path:
    """Writes a random PEFT adapter directory for `config`'s architecture (see synthetic_state_dict)."""
    state = synthetic_state_dict(config, r, targets, dtype, seed)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "use_rslora": False,
    }
    with atomic_dir(out_dir, overwrite=True) as tmp:
        safetensors_io.save(tmp / "adapter_model.safetensors", state, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return Path(out_dir)


def spec_from_config(
    config, r: int, alpha: float, targets=QWEN_TARGETS, dtype: str = "bfloat16", base_name: str = "synthetic"
):
    """The LoraSpec a PEFT LoRA (rank r, alpha, targets) on `config`'s architecture would have."""
    from converters.peft_to_jax import state_dict_to_pytree

    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "base_model_name_or_path": base_name,
    }
    pattern = re.compile(rf"(.*\.)?({'|'.join(targets)})$")
    state = {}
    for path, (fin, fout) in base_layer_shapes(config).items():
        if pattern.match(path):  # zero-strided views: shapes without memory
            state[f"base_model.model.{path}.lora_A.weight"] = np.broadcast_to(np.zeros((), dtype), (r, fin))
            state[f"base_model.model.{path}.lora_B.weight"] = np.broadcast_to(np.zeros((), dtype), (fout, r))
    return state_dict_to_pytree(state, adapter_config, f"{base_name} config")[1]
