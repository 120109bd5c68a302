"""dnd_jax: Drag-and-Drop LLMs (prompt-to-LoRA weights) in JAX/Flax.

Pipeline stages, one module each: collect (PEFT LoRA checkpoints) -> lora_tokens (LoRA pytree
<-> parameter tokens) -> extractors (frozen prompt encoder: models.encoder, models.decoder_lm or
models.static, by encoder.type) -> models.hyperconv (generator)
-> trainer (sharded weighted-MSE loop) -> generate (prompts -> PEFT adapters) -> evaluate.
"""

__version__ = "0.1.0"
