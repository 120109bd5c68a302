"""Converters between PEFT LoRA adapters (PyTorch) and JAX LoRA pytrees.

Library entry points:
  load_peft_adapter(dir) -> (params, spec)        one PEFT adapter directory
  load_peft_batch(folder) -> (params, spec, steps, names)   a collection, stacked in step order
  save_pytree / load_pytree                        the JAX LoRA file (safetensors + spec)
  save_peft_adapter(params, spec, out_dir)         back to a PEFT adapter directory
  lora_delta(x, lora_a, lora_b, scale)             the LoRA output change x @ A @ B * scale
"""

import importlib

# Lazy exports: `python -m converters.peft_to_jax` must not find its module already imported.
_EXPORTS = {
    "pytree_to_state_dict": "jax_to_peft",
    "save_peft_adapter": "jax_to_peft",
    "select_row": "jax_to_peft",
    "list_checkpoints": "peft_to_jax",
    "load_peft_adapter": "peft_to_jax",
    "load_peft_batch": "peft_to_jax",
    "flatten": "pytree",
    "get_module": "pytree",
    "load_pytree": "pytree",
    "save_pytree": "pytree",
    "unflatten": "pytree",
    "LoraSpec": "spec",
    "ModuleSpec": "spec",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"converters.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")


def lora_delta(x, lora_a, lora_b, scale):
    """The LoRA term PEFT adds to a layer's output, in JAX: (x @ lora_a @ lora_b) * scale.

    Args:
      x: [..., in] inputs.
      lora_a: [in, r].
      lora_b: [r, out].
      scale: the module's scale (ModuleSpec.scale).

    Returns:
      [..., out].
    """
    import jax.numpy as jnp

    return (jnp.asarray(x) @ jnp.asarray(lora_a) @ jnp.asarray(lora_b)) * scale


__all__ = [
    "LoraSpec",
    "ModuleSpec",
    "flatten",
    "get_module",
    "list_checkpoints",
    "load_peft_adapter",
    "load_peft_batch",
    "load_pytree",
    "lora_delta",
    "pytree_to_state_dict",
    "save_peft_adapter",
    "save_pytree",
    "select_row",
    "unflatten",
]
