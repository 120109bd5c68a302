"""Tiny real PEFT adapters for tests: random-weight Qwen2 and GPT-2 built from configs (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

QWEN2 = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64)
QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "qwen_plain": dict(arch="qwen2", lora=dict(r=8, lora_alpha=16, target_modules=QWEN_TARGETS)),
    "qwen_rslora": dict(arch="qwen2", lora=dict(r=8, lora_alpha=16, use_rslora=True, target_modules=QWEN_TARGETS)),
    "qwen_rank_pattern": dict(
        arch="qwen2",
        lora=dict(
            r=8,
            lora_alpha=16,
            target_modules=QWEN_TARGETS,
            rank_pattern={"layers.0.self_attn.q_proj": 4, "down_proj": 2},
            alpha_pattern={"v_proj": 5, "down_proj": 3},
        ),
    ),
    "qwen_subset": dict(
        arch="qwen2", lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2])
    ),
    "qwen_bf16": dict(arch="qwen2", dtype=torch.bfloat16, lora=dict(r=8, lora_alpha=16, target_modules=QWEN_TARGETS)),
    "qwen_fp16": dict(arch="qwen2", dtype=torch.float16, lora=dict(r=8, lora_alpha=16, target_modules=QWEN_TARGETS)),
    "qwen_bin": dict(arch="qwen2", safe=False, lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])),
    "gpt2_conv1d": dict(
        arch="gpt2", lora=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    ),
}


def base_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM (deterministic per seed)."""
    torch.manual_seed(seed)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**QWEN2)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(**GPT2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def save_base_config(arch: str, path: Path) -> Path:
    """Writes the tiny base model's config.json to path/ and returns the file."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Qwen2Config(**QWEN2) if arch == "qwen2" else transformers.GPT2Config(**GPT2)
    cfg.save_pretrained(path)
    return path / "config.json"


def make_adapter(variant: str, out: Path, seed: int = 0):
    """Builds and saves a PEFT adapter with random (non-zero) A and B.

    Returns:
      (peft_model in eval mode, out dir).
    """
    v = VARIANTS[variant]
    model = base_model(v["arch"])
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(init_lora_weights=False, base_model_name_or_path=f"tiny-{v['arch']}", **v["lora"])
    peft_model = get_peft_model(model, cfg)
    if "dtype" in v:
        peft_model = peft_model.to(v["dtype"])
    peft_model.save_pretrained(out, safe_serialization=v.get("safe", True))
    return peft_model.eval(), out


def adapter_state(path: Path) -> dict:
    """The adapter weights of a PEFT dir as torch tensors (safetensors or .bin)."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        return load_file(path / "adapter_model.safetensors")
    return torch.load(path / "adapter_model.bin", weights_only=True)


def adapter_config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def write_tiny_llama(out: Path) -> Path:
    """A small randomly initialised Llama with SmolLM2's real tokenizer and chat template, saved with
    save_pretrained: a `collect` step on it costs milliseconds (kill trials, bad-input cases)."""
    from dnd_jax.assets import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
