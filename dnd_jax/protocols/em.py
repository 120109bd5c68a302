"""Exact match of the greedy answer, the mixed pool's secondary metric for generative tasks: the chat format the
LoRAs were trained on, greedy decoding, the generation's first line compared with every acceptable target of the item
(its `answers`; the response where it has none) after one normalisation: case folded, whitespace collapsed, quotes
and surrounding punctuation stripped (BIG-bench's exact_str_match compares stripped strings; folding case and
punctuation keeps a right answer from counting wrong for its casing or a final period)."""

from __future__ import annotations

import re
import string

from dnd_jax.protocols.gen import generate_batch

_EDGE = string.punctuation + string.whitespace + "“”‘’"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip(_EDGE)


def answers(record: dict) -> list[str]:
    return [a for a in record.get("answers") or [record["response"]] if isinstance(a, str)]


def matches(generation: str, record: dict) -> bool:
    first = generation.strip().split("\n", 1)[0]
    return normalize(first) in {normalize(a) for a in answers(record)}


def score_em(model, tok, records, batch_size: int, device: str) -> dict:
    """{"em": fraction of items whose greedy answer matches, "n"}: generation stops at EOS, or once a row is 8
    characters longer than the longest acceptable answer of its batch (a longer first line cannot match)."""
    from dnd_jax.lm import chat_prompt_text

    texts = [chat_prompt_text(tok, r.get("system", ""), r["prompt"]) for r in records]
    seqs = tok(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(records)), key=lambda i: len(seqs[i]))
    hits = 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        longest = max(len(a) for j in idx for a in answers(records[j]))
        budget = max(len(tok(a, add_special_tokens=False)["input_ids"]) for j in idx for a in answers(records[j]))
        outs = generate_batch(model, tok, [seqs[j] for j in idx], budget + 8, device, chars=longest + 8)
        hits += sum(matches(o, records[j]) for j, o in zip(idx, outs, strict=True))
    return {"em": hits / len(records), "n": len(records)}
