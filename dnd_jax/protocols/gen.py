"""The original DnD generation protocol (spec §6.3): chat template + system prompt, greedy decoding,
the answer parsed from the first 20 characters; unparseable outputs are format failures (and wrong)."""

from __future__ import annotations

import re

PARSED_CHARS = 20  # the original parses the answer from the first 20 characters of a generation


def parse_answer(text: str, boolean: bool) -> str | None:
    """The answer in the first 20 characters of a generation (spec §6.3), or None (format failure)."""
    head = text[:PARSED_CHARS]
    if boolean:
        m = re.search(r"true|false", head, re.IGNORECASE)
        return m.group(0).capitalize() if m else None
    m = re.search(r"\[(.*?)\]", head)
    cand = (m.group(1) if m else head.strip()[:1]).strip()[:1].upper()
    if cand in "1234" and cand:
        cand = "ABCD"["1234".index(cand)]
    return cand if cand and cand in "ABCDEFGH" else None


def gold_answer(record: dict) -> str:
    m = re.search(r"\[(.*?)\]", record["response"])
    return (m.group(1) if m else record["response"]).strip()


def _EnoughText(tok, prompt_len: int, chars: int = PARSED_CHARS + 4):
    """A stopping criterion: a row is done once its generation decodes to more characters than the
    parser reads (+4 so that a token cut inside a multi-byte character cannot change them), so
    stopping never changes a parsed answer; generation ends when every row is done or at EOS."""
    import torch
    from transformers import StoppingCriteria

    class EnoughText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([len(t) >= chars for t in texts], device=input_ids.device)

    return EnoughText()


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(q) for q in seqs) - 1  # every row keeps at least one token to run
    for i in range(max(n, 0)):
        if any(q[i] != seqs[0][i] for q in seqs):
            return i
    return max(n, 0)


def generate_batch(model, tok, seqs: list[list[int]], max_new_tokens: int, device: str,
                   chars: int = PARSED_CHARS + 4) -> list[str]:  # fmt: skip
    """Greedy generations for token-id prompts, decoded, stopped once every row has `chars` characters (what the
    parser reads, +4) or at EOS.

    The prompts' longest common token prefix (the chat template and system prompt) runs once and its
    KV cache is shared by every row; each row's own tokens follow it after padding that the
    attention mask hides ([prefix][pad][own tokens]), with positions counted from the mask, so each
    row is computed as if alone."""
    import torch
    from transformers import StoppingCriteriaList

    from dnd_jax.lm import cache_name, output_cache

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    p = _common_prefix(seqs)
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, q in enumerate(seqs):
        ids[j, :p], mask[j, :p] = torch.tensor(q[:p]), 1
        ids[j, width - len(q) + p :], mask[j, width - len(q) + p :] = torch.tensor(q[p:]), 1
    kw = {}
    if p > 0:
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids[:1, :p].to(device), use_cache=True, logits_to_keep=1))
        cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=device))
        kw[cache_name(model)] = cache
    stop = StoppingCriteriaList([_EnoughText(tok, width, chars)])
    with torch.no_grad():
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, stopping_criteria=stop, pad_token_id=pad, **kw)  # fmt: skip
    return tok.batch_decode(gen[:, width:], skip_special_tokens=True)


def score_gen(model, tok, records, batch_size: int, device: str, max_new_tokens: int = 12) -> dict:
    from dnd_jax.lm import chat_prompt_text

    boolean = all(gold_answer(r) in ("True", "False") for r in records)
    texts = [chat_prompt_text(tok, r.get("system", ""), r["prompt"]) for r in records]
    seqs = tok(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(records)), key=lambda i: len(seqs[i]))  # similar lengths share a batch: less padding
    correct = failures = 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for j, text in zip(
            idx, generate_batch(model, tok, [seqs[j] for j in idx], max_new_tokens, device), strict=True
        ):
            pred = parse_answer(text, boolean)
            failures += pred is None
            gold = gold_answer(records[j])
            correct += pred is not None and pred.lower() == gold.lower()
    return {"acc": correct / len(records), "format_failures": failures / len(records)}
