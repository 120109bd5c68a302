"""The gold response's loss: mean negative log-likelihood per response token, in the chat format the
LoRAs were trained on (`dnd_jax.lm.encode_sft_example`, the same cut-off as the collection).

Cheap and far less noisy than accuracy: every item contributes a real number (and a LoRA that only
learned the answer format already moves it), so differences between adapters show on tens of items.
Items of a batch share the chat template and system prompt: that common token prefix runs once (batch
1) and its KV cache is repeated for every row; each row's own tokens follow, right-padded (padding after
the real tokens cannot change them under a causal mask). The LM head runs only where a response token
is predicted.
"""

from __future__ import annotations

from dnd_jax.errors import DndError


def _prefix_len(seqs: list[list[int]], first_label: list[int]) -> int:
    """Longest common prefix, short enough that every predicted position (first label - 1) follows it."""
    limit = min(min(first_label) - 1, min(len(q) for q in seqs) - 1)
    p = 0
    while p < limit and all(q[p] == seqs[0][p] for q in seqs):
        p += 1
    return max(p, 0)


def _body_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def response_nll(model, tok, records: list[dict], batch_size: int, device: str, cutoff_len: int) -> dict:
    """Mean NLL per gold-response token over `records` ({"prompt", "response", "system"}).

    Args:
      model: a causal LM (a PeftModel with its adapter set, or the base model).
      tok: its tokenizer.
      records: the items; each contributes its response tokens (incl. the end-of-turn token).
      batch_size: items per forward.
      device: torch device.
      cutoff_len: the collection's cutoff (prompt cut first, as in training).

    Returns:
      {"nll": total NLL / total response tokens, "tokens": total response tokens}.
    """
    import torch

    from dnd_jax.lm import cache_name, encode_sft_example, output_cache

    enc = [encode_sft_example(tok, r, cutoff_len) for r in records]
    for i, (_, labels) in enumerate(enc):
        if all(x == -100 for x in labels) or labels[0] != -100:
            raise DndError(f"item {i}: no response token after a prompt to score (prompt {records[i]['prompt']!r:.60})")
    body, head = _body_and_head(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    total, count = 0.0, 0
    for lo in range(0, len(order), batch_size):
        rows = [enc[i] for i in order[lo : lo + batch_size]]
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
                cache = output_cache(body(input_ids=torch.tensor([seqs[0][:p]], device=device), use_cache=True))
                cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))
                kw[cache_name(body)] = cache
            hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=p > 0, **kw)
            hidden = hidden.last_hidden_state
            sel_r, sel_t, target = [], [], []
            for j, (_, lab) in enumerate(rows):
                for t in range(first[j], len(lab)):
                    sel_r.append(j)
                    sel_t.append(t - 1 - p)  # hidden state that predicts token t
                    target.append(lab[t])
            logits = head(hidden[torch.tensor(sel_r), torch.tensor(sel_t)]).float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(target, device=device), reduction="sum")
        total += float(nll)
        count += len(target)
    return {"nll": total / count, "tokens": count}
