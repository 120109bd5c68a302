"""Multiple-choice log-likelihood as lm-evaluation-harness computes it (its generic multiple-choice task).

Context "Question: <stem>\nAnswer:", one continuation " <choice>" per option; acc = argmax of the
summed log-probabilities, acc_norm = argmax of log-probability divided by len(choice) in characters
(lm-eval's `completion_len`: the choice text, without the leading space). This is lm-eval's generic
template, not its per-task ones (BoolQ reads a passage, OBQA its own fact-less template, WinoGrande
scores the partial sentence after the blank): numbers here are comparable across our adapters and
with `lm_eval` run on the same template, not with published per-task lm-eval tables.
"""

from __future__ import annotations

import re

import numpy as np

from dnd_jax.errors import DndError

_OPTION = re.compile(r"^[A-H]: ")


def question_stem(prompt: str, choices=None) -> str:
    """The prompt without its option lines and answer instructions (the lm-eval context).

    An option line is "<letter>: <text>"; with `choices` given, only lines whose text is one of the
    choices are removed, so dialogue lines such as "A: See you at five." (BIG-bench timedial) stay.
    """
    keep = {str(c).strip() for c in choices} if choices is not None else None

    def is_option(ln: str) -> bool:
        m = _OPTION.match(ln)
        return bool(m) and (keep is None or ln[m.end() :].strip() in keep)

    lines = [ln for ln in prompt.splitlines() if not is_option(ln) and not ln.startswith("Please answer")]
    return "\n".join(lines).strip()


def check_records(records: list[dict], where: str) -> None:
    for i, r in enumerate(records):
        ch, ans = r.get("choices"), r.get("answer")
        if not isinstance(ch, list) or len(ch) < 2 or not isinstance(ans, int) or not 0 <= ans < len(ch):
            raise DndError(f"{where}: record {i} needs 'choices' (a list of >= 2 answers) and an 'answer' index")


def loglikelihoods(model, tok, pairs: list[tuple[str, str]], batch_size: int, device: str) -> list[float]:
    """Summed log P(continuation | context) per (context, continuation).

    Each distinct context runs once: `batch_size` contexts (sorted by length, left-padded) go
    through the model with a KV cache, the cache is repeated once per continuation of each context,
    and all continuations of the batch run in one more call (right-padded, positions continuing
    after their own context). The first continuation token is scored from the context call's last
    position. For multiple choice this reads each question once instead of once per option.
    """
    import torch

    from dnd_jax.lm import cache_name, output_cache

    groups: dict[str, tuple[list[int], list[tuple[int, list[int]]]]] = {}
    for k, (ctx, cont) in enumerate(pairs):
        if ctx not in groups:
            groups[ctx] = (tok(ctx, add_special_tokens=False)["input_ids"], [])
        x = tok(cont, add_special_tokens=False)["input_ids"]
        if not groups[ctx][0] or not x:
            raise DndError(f"log-likelihood scoring needs a non-empty context and continuation: {ctx!r} + {cont!r}")
        groups[ctx][1].append((k, x))
    order = sorted(groups.values(), key=lambda g: len(g[0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = [0.0] * len(pairs)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        width = max(len(c) for c, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (c, _) in enumerate(chunk):
            ids[j, width - len(c) :], mask[j, width - len(c) :] = torch.tensor(c), 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [(j, k, x) for j, (_, conts) in enumerate(chunk) for k, x in conts]
        sel = torch.tensor([j for j, _, _ in rows])
        with torch.no_grad():
            res = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True, logits_to_keep=1)  # fmt: skip
            first = torch.log_softmax(res.logits[:, -1].float(), -1).cpu()[sel]
            for r, (_, k, x) in enumerate(rows):
                out[k] = float(first[r, x[0]])
            rest = max(len(x) for _, _, x in rows) - 1
            if rest == 0:
                continue
            feed = torch.full((len(rows), rest), pad, dtype=torch.long)
            fmask = torch.zeros_like(feed)
            for r, (_, _, x) in enumerate(rows):
                feed[r, : len(x) - 1], fmask[r, : len(x) - 1] = torch.tensor(x[:-1]), 1
            cache = output_cache(res)
            cache.reorder_cache(sel.to(device))
            fpos = mask.sum(-1)[sel, None] + torch.arange(rest)
            kw = {cache_name(model): cache}
            logits = model(input_ids=feed.to(device), attention_mask=torch.cat([mask[sel], fmask], 1).to(device),
                           position_ids=fpos.to(device), use_cache=True, **kw).logits  # fmt: skip
            logp = torch.log_softmax(logits.float(), -1).cpu()
        for r, (_, k, x) in enumerate(rows):
            out[k] += float(logp[r, torch.arange(len(x) - 1), torch.tensor(x[1:], dtype=torch.long)].sum())
    return out


def score_ll(model, tok, records, batch_size: int, device: str) -> dict:
    pairs = []
    for r in records:
        ctx = f"Question: {question_stem(r['prompt'], r['choices'])}\nAnswer:"
        for ch in r["choices"]:
            pairs.append((ctx, " " + str(ch)))
    ll = loglikelihoods(model, tok, pairs, batch_size, device)
    acc = acc_norm = 0
    k = 0
    for r in records:
        n = len(r["choices"])
        s = np.array(ll[k : k + n])
        lens = np.array([len(str(c)) for c in r["choices"]])  # lm-eval: len(choice), not of " " + choice
        acc += int(np.argmax(s) == r["answer"])
        acc_norm += int(np.argmax(s / lens) == r["answer"])
        k += n
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}
