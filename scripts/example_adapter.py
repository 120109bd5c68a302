"""Writes a PEFT LoRA adapter (rank 8, all 7 projections, random A and B) for SmolLM2-135M-Instruct.

  python scripts/example_adapter.py OUT_DIR

Used by the README to show the converters on an adapter for a real model; real trained adapters
come from `python -m dnd_jax.collect`.
"""

import sys

import torch
import transformers
from peft import LoraConfig, get_peft_model

from dnd_jax.assets import smollm2_path

if __name__ == "__main__":
    base = smollm2_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                     base_model_name_or_path=str(base))  # fmt: skip
    get_peft_model(model, cfg).save_pretrained(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
