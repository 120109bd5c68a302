"""The gold response's loss in the chat format the LoRAs were trained on (`dnd_jax.lm.encode_sft_example`,
the same cut-off as the collection): mean negative log-likelihood per response token, and the answer's
own NLL per item.

Cheap and far less noisy than accuracy: every item contributes a real number (and a LoRA that only
learned the answer format already moves it), so differences between adapters show on tens of items.
The per-token mean divides an answer-level difference by the ~5 tokens of "[C]<|im_end|>\\n", most of
them format; `nll_answer` sums only the tokens that carry the answer itself ("C" in "[C]").
Items of a batch share the chat template and system prompt: that common token prefix runs once (batch
1) and its KV cache is repeated for every row; each row's own tokens follow, right-padded (padding after
the real tokens cannot change them under a causal mask). The model's own forward runs its LM head only over the
span of positions that predict a response token (`logits_to_keep`).
"""

from __future__ import annotations

import re

from dnd_jax.errors import DndError

_BRACKET = re.compile(r"\[(.*?)\]")  # the gold answer's form, as `dnd_jax.protocols.gen.gold_answer` reads it


def answer_span(response: str) -> tuple[int, int]:
    """Character span of the answer in a response: the label inside the first [...], else the whole
    response; surrounding whitespace excluded (an empty span when there is no answer text)."""
    m = _BRACKET.search(response)
    lo, hi = m.span(1) if m else (0, len(response))
    text = response[lo:hi]
    if not text.strip():
        return lo, lo
    return lo + len(text) - len(text.lstrip()), hi - (len(text) - len(text.rstrip()))


def _response_text(tok, rec: dict) -> str:
    """The text `encode_sft_example` tokenizes as the response: the conversation after the prompt."""
    from dnd_jax.lm import chat_messages, chat_prompt_text

    prompt = chat_prompt_text(tok, rec.get("system", ""), rec["prompt"])
    if tok.chat_template is None:
        return rec["response"] + (tok.eos_token or "")
    msgs = [*chat_messages(rec.get("system", ""), rec["prompt"]), {"role": "assistant", "content": rec["response"]}]
    return tok.apply_chat_template(msgs, tokenize=False)[len(prompt) :]


def answer_positions(tok, rec: dict, labels: list[int]) -> list[int] | None:
    """Positions in `labels` of the tokens whose characters overlap the answer span, or None when the
    answer cannot be located among the label tokens (cut off, empty, a slow tokenizer without offsets).

    The response tokens of `encode_sft_example` are its response text tokenized alone, so the fast
    tokenizer's offsets on that text give each label token's characters exactly (checked: same ids).
    """
    if not getattr(tok, "is_fast", False):
        return None
    text, resp = _response_text(tok, rec), rec["response"]
    lo, hi = answer_span(resp)
    core = resp.strip()
    at = text.find(core) if core else -1  # a template may trim the message
    if lo == hi or at < 0:
        return None
    lo, hi = (at + x - (len(resp) - len(resp.lstrip())) for x in (lo, hi))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    first = next(t for t, y in enumerate(labels) if y != -100)
    if enc["input_ids"][: len(labels) - first] != labels[first:]:
        return None
    ks = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if s < hi and e > lo]
    if not ks or first + ks[-1] >= len(labels):
        return None
    return [first + k for k in ks]


def _prefix_len(seqs: list[list[int]], first_label: list[int]) -> int:
    """Longest common prefix, short enough that every predicted position (first label - 1) follows it."""
    limit = min(min(first_label) - 1, min(len(q) for q in seqs) - 1)
    p = 0
    while p < limit and all(q[p] == seqs[0][p] for q in seqs):
        p += 1
    return max(p, 0)


def _causal_lm(model):
    """The causal LM under a PEFT wrapper (its LoRA layers are in place), called with `logits_to_keep`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _batch_nll(lm, rows, pad: int, device: str):
    """One forward of a batch of (input_ids, labels): (summed NLL, per-token NLL of the label tokens
    in row order, each row's first label position and offset into that vector). The model's own forward makes the
    logits (any final soft-capping or scaling of its included), at the span of positions that predict a label only
    (`logits_to_keep`)."""
    import torch

    from dnd_jax.lm import cache_name, output_cache

    seqs = [ids for ids, _ in rows]
    first = [next(t for t, y in enumerate(lab) if y != -100) for _, lab in rows]
    p = _prefix_len(seqs, first)
    width = max(len(q) for q in seqs) - p
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    mask[:, :p] = 1
    for j, q in enumerate(seqs):
        ids[j, : len(q) - p], mask[j, p : len(q)] = torch.tensor(q[p:]), 1
    with torch.no_grad():
        kw = {}
        if p > 0:
            prefix = lm(input_ids=torch.tensor([seqs[0][:p]], device=device), use_cache=True, logits_to_keep=1)
            cache = output_cache(prefix)
            cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))
            kw[cache_name(lm)] = cache
        sel_r, sel_t, target, starts = [], [], [], []
        for j, (_, lab) in enumerate(rows):
            starts.append(len(target))
            for t in range(first[j], len(lab)):
                sel_r.append(j)
                sel_t.append(t - 1 - p)  # the position that predicts token t
                target.append(lab[t])
        lo, hi = min(sel_t), max(sel_t) + 1
        keep = torch.arange(lo, hi, device=device)
        out = lm(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=p > 0, logits_to_keep=keep, **kw)
        logits = out.logits[torch.tensor(sel_r), torch.tensor(sel_t) - lo].float()
        target = torch.tensor(target, device=device)
        # cross_entropy(reduction="sum") is exactly nll_loss(log_softmax, "sum"): the same sum as before,
        # bit for bit (reduction="none" then .sum() adds in another order); the gather is reduction="none".
        logp = torch.nn.functional.log_softmax(logits, dim=1)
        total = torch.nn.functional.nll_loss(logp, target, reduction="sum")
        per_token = -logp.gather(1, target[:, None])[:, 0]
    return float(total), per_token.cpu(), list(zip(first, starts, strict=True))


def response_nll(model, tok, records: list[dict], batch_size: int, device: str, cutoff_len: int) -> dict:
    """Mean NLL per gold-response token, and mean NLL of the answer per item, over `records`.

    Args:
      model: a causal LM (a PeftModel with its adapter set, or the base model).
      tok: its tokenizer.
      records: the items ({"prompt", "response", "system"}); each contributes its response tokens
        (incl. the end-of-turn token), and its answer tokens (`answer_positions`) where they survive the
        cut-off.
      batch_size: items per forward.
      device: torch device.
      cutoff_len: the collection's cutoff (prompt cut first, as in training).

    Returns:
      {"nll": total NLL / total response tokens, "tokens": total response tokens, "nll_answer": mean
      over the items with located answer tokens of their summed NLL (None if there is none),
      "answer_items": how many items that is, "per_item": each item's mean NLL per response token, in
      record order (for statistics paired over items)}.
    """
    from dnd_jax.lm import encode_sft_example

    enc = [encode_sft_example(tok, r, cutoff_len) for r in records]
    for i, (_, labels) in enumerate(enc):
        if all(x == -100 for x in labels) or labels[0] != -100:
            raise DndError(f"item {i}: no response token after a prompt to score (prompt {records[i]['prompt']!r:.60})")
    answers = [answer_positions(tok, r, labels) for r, (_, labels) in zip(records, enc, strict=True)]
    lm = _causal_lm(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    total, count, answer_nll, per_item = 0.0, 0, [], [0.0] * len(enc)
    for lo in range(0, len(order), batch_size):
        items = order[lo : lo + batch_size]
        nll, per_token, places = _batch_nll(lm, [enc[i] for i in items], pad, device)
        total += nll
        count += len(per_token)
        ends = [start for _, start in places[1:]] + [len(per_token)]
        for i, (first, start), end in zip(items, places, ends, strict=True):
            per_item[i] = float(per_token[start:end].mean())
            if answers[i] is not None:
                answer_nll.append(float(per_token[[start + t - first for t in answers[i]]].sum()))
    mean_answer = sum(answer_nll) / len(answer_nll) if answer_nll else None
    return {
        "nll": total / count,
        "tokens": count,
        "nll_answer": mean_answer,
        "answer_items": len(answer_nll),
        "per_item": per_item,
    }
