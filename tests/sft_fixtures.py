"""A tiny real causal LM on disk for SFT tests: random-weight Qwen2 of tests/lora_fixtures.QWEN2's shapes (so
the tiny collections' adapters fit it) with a byte-level Qwen2 tokenizer without merges (one token per byte, no
chat template: `lm.chat_prompt_text`'s plain format). Loadable by `dnd_jax.models.causal_lm.load_causal_lm`,
transformers and PEFT."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.lora_fixtures import QWEN2

VOCAB = 264  # 2 special tokens + 256 bytes, rounded up
# Weight init std: 0.02 (transformers' default) leaves a 64-wide head unable to make any token likely (max logit
# gaps ~0.2), so no adapter could learn anything; at 0.5 the random LM is as peaked as a trained one.
INIT = 0.5


def byte_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """<|endoftext|> 0 (padding), <|im_end|> 1 (EOS), then the 256 byte symbols."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    return transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>")  # fmt: skip


def write_tiny_lm(out: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 causal LM and its tokenizer in `out` (safetensors)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        **{**QWEN2, "vocab_size": VOCAB}, pad_token_id=0, eos_token_id=1, initializer_range=INIT
    )
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out
