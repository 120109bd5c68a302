"""PyTorch causal-LM helpers shared by collection and evaluation: loading and chat formatting."""

from __future__ import annotations

from pathlib import Path

from dnd_jax.assets import resolve_model
from dnd_jax.errors import DndError


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DndError("config asks for device 'cuda' but no CUDA device is available")
    return device


def model_dir(model: str) -> Path:
    """The directory of a built-in model name or a local directory, checked to hold a transformers config.json
    (without importing torch: callers check adapters against it before loading the model)."""
    path = Path(resolve_model(model))
    if not (path / "config.json").is_file():
        raise DndError(f"{path}: not a transformers model directory (no config.json)")
    return path


def load_base(model: str, dtype: str = "float32", device: str = "cpu"):
    """Loads (model in eval mode, tokenizer, resolved path) from a built-in name or a local directory."""
    import torch
    import transformers

    path = model_dir(model)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as e:
        raise DndError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm.to(device).eval(), tok, Path(path)


def chat_messages(system: str, prompt: str) -> list[dict]:
    """[system (if any), user] messages, as LLaMA-Factory builds them."""
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


def chat_prompt_text(tok, system: str, prompt: str) -> str:
    """The chat-templated prompt, ending where the assistant's answer starts."""
    if tok.chat_template is None:
        return (system + "\n\n" if system else "") + prompt + "\n"
    return tok.apply_chat_template(chat_messages(system, prompt), add_generation_prompt=True, tokenize=False)


def encode_sft_example(tok, rec: dict, cutoff_len: int) -> tuple[list[int], list[int]]:
    """Chat-templated (input_ids, labels) with the loss on the response tokens only.

    Args:
      tok: the model's tokenizer.
      rec: {"prompt", "response", "system"}.
      cutoff_len: maximum total length; the prompt is cut from the right first (LLaMA-Factory).

    Returns:
      (input_ids, labels) with labels -100 on prompt positions.
    """
    prompt = chat_prompt_text(tok, rec.get("system", ""), rec["prompt"])
    if tok.chat_template is None:
        full = prompt + rec["response"] + (tok.eos_token or "")
    else:
        msgs = [*chat_messages(rec.get("system", ""), rec["prompt"]), {"role": "assistant", "content": rec["response"]}]
        full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DndError("the chat template does not render the prompt as a prefix of the full conversation")
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    r_ids = tok(full[len(prompt) :], add_special_tokens=False).input_ids
    n_src, n_tgt = _infer_seqlen(len(p_ids), len(r_ids), cutoff_len)
    return p_ids[:n_src] + r_ids[:n_tgt], [-100] * n_src + r_ids[:n_tgt]


def _infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of cutoff_len between prompt and response (the response is kept)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    return min(max(cutoff_len - new_target, 0), source_len), new_target


def cache_name(model) -> str:
    """The forward keyword of the KV cache: `cache` (transformers >= 5.24) or `past_key_values` (older)."""
    import inspect

    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a forward's output, under either transformers naming."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
