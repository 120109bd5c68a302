"""The nll protocol's answer-only NLL on the real SmolLM2-135M-Instruct, against an oracle built apart:
transformers' generation prompt + the ChatML assistant turn written out by hand, LLaMA-Factory's cut-off,
one unbatched, uncached forward per item, the answer's tokens found by counting the tokens of the
response text before the answer and through it (no offsets)."""

from __future__ import annotations

import pytest
import torch

from dnd_jax.lm import load_base
from dnd_jax.protocols.nll import answer_span, response_nll

SYS = "Answer by a single [ans]."
LONG_WHY = "Because " + " ".join(["the second option is the one that the story supports, not the first one"] * 6)
# (record, the answer text the metric must score, its character offset in the response); the last one
# has a long prompt and a long response, so the cut-off keeps only the start of the response
CASES = [
    ({"prompt": "Is the sky blue?\nA: yes\nB: no", "response": "[A]", "system": SYS}, "A", 1),
    ({"prompt": "Water is wet. True or false?", "response": "[True]", "system": SYS}, "True", 1),
    ({"prompt": "Which is a fruit?\nA: stone\nB: apple", "response": "[B] because apples grow", "system": SYS},
     "B", 1),
    ({"prompt": "Two plus two?", "response": " [4]", "system": ""}, "4", 2),
    ({"prompt": "What is the capital of France?", "response": "Paris is the capital", "system": SYS},
     "Paris is the capital", 0),
    ({"prompt": "word " * 120 + "Pick one.\nA: x\nB: y", "response": f"{LONG_WHY}, [B]", "system": SYS},
     "B", len(LONG_WHY) + 3),
]  # fmt: skip
CUTOFF = 128


def llama_factory_split(source: int, target: int) -> tuple[int, int]:
    """Tokens kept of (prompt, response) under CUTOFF (LLaMA-Factory's infer_seqlen)."""
    if 2 * target < CUTOFF:
        max_target = CUTOFF
    elif 2 * source < CUTOFF:
        max_target = CUTOFF - source
    else:
        max_target = int(CUTOFF * target / (source + target))
    keep = min(max_target, target)
    return min(max(CUTOFF - keep, 0), source), keep


def oracle(lm, tok, rec: dict, answer: str, at: int) -> tuple[float, int, float | None]:
    """(summed NLL of the kept response tokens, their count, summed NLL of the answer tokens or None
    when the cut-off drops one of them)."""
    assert rec["response"][at : at + len(answer)] == answer
    msgs = [{"role": "system", "content": rec["system"]}] if rec["system"] else []
    prompt = tok.apply_chat_template([*msgs, {"role": "user", "content": rec["prompt"]}],
                                     add_generation_prompt=True, tokenize=False)  # fmt: skip
    text = rec["response"] + "<|im_end|>\n"  # SmolLM2's ChatML assistant turn after the generation prompt
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    r_ids = tok(text, add_special_tokens=False).input_ids
    n_src, n_tgt = llama_factory_split(len(p_ids), len(r_ids))
    p_ids, kept = p_ids[:n_src], r_ids[:n_tgt]
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([p_ids + kept])).logits[0].double(), dim=-1)
    nll = [-float(logp[len(p_ids) + k - 1, y]) for k, y in enumerate(kept)]
    # the answer's tokens: those after the tokens of the text before it, up to those of the text through it
    n0 = len(tok(text[:at], add_special_tokens=False).input_ids)
    upto = tok(text[: at + len(answer)], add_special_tokens=False).input_ids
    assert upto == r_ids[: len(upto)] and n0 < len(upto), "the answer's characters start and end tokens"
    return sum(nll), len(kept), (sum(nll[n0 : len(upto)]) if len(upto) <= len(kept) else None)


def test_answer_span():
    assert answer_span("[C]") == (1, 2)
    assert answer_span("[ Golden Gate ] maybe") == (2, 13)
    assert answer_span(" Paris \n") == (1, 6)
    assert answer_span("[]")[0] == answer_span("[]")[1]


@pytest.mark.needs_models
def test_answer_nll_matches_unbatched_oracle():
    """Over batch sizes 1-3 (shared-prefix cache, padding, length-sorted order): nll_answer is the mean
    of the oracle's per-item answer NLLs over the items whose answer survives the cut-off, and nll is
    unchanged (all kept response tokens, token-weighted)."""
    lm, tok, _ = load_base("smollm2-135m-instruct")
    assert tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "[A]"}],
                                   tokenize=False).endswith("<|im_start|>assistant\n[A]<|im_end|>\n")  # fmt: skip
    recs = [r for r, _, _ in CASES]
    want = [oracle(lm, tok, *case) for case in CASES]
    total, count = sum(w[0] for w in want), sum(w[1] for w in want)
    answers = [w[2] for w in want if w[2] is not None]
    assert want[-1][2] is None and len(answers) == len(CASES) - 1  # the last answer is cut off, only it
    for bs in (1, 2, 3):
        got = response_nll(lm, tok, recs, bs, "cpu", cutoff_len=CUTOFF)
        assert got["tokens"] == count
        assert got["nll"] == pytest.approx(total / count, abs=1e-4)
        assert got["answer_items"] == len(answers)
        assert got["nll_answer"] == pytest.approx(sum(answers) / len(answers), abs=1e-4)
    # one item per call: each answer alone, and None when the only item's answer is cut off
    for rec, (_, _, ans) in zip(recs, want, strict=True):
        got = response_nll(lm, tok, [rec], 1, "cpu", cutoff_len=CUTOFF)
        assert got["answer_items"] == (ans is not None)
        assert got["nll_answer"] == (None if ans is None else pytest.approx(ans, abs=1e-4))
