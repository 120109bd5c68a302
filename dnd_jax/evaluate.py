"""Entry point: PyTorch evaluation of a base model and LoRA adapters on a multiple-choice dataset.

  python -m dnd_jax.evaluate --base smollm2-135m-instruct --data ../shared/data/commonsense \
      --dataset ARC-c --training runs/collect/ARC-e/step-000050 --generated runs/generated/arc_c/adapter-* \
      --limit 200 --out runs/eval/arc_c

The base model is loaded once; adapters are attached, scored and removed in turn (PEFT
load_adapter / set_adapter / delete_adapter), never reloading the model. Two protocols:
  ll   multiple-choice log-likelihood as lm-evaluation-harness computes it: context
       "Question: <stem>\\nAnswer:", one continuation " <choice>" per option; acc = argmax of the
       summed log-probabilities, acc_norm = argmax of log-probability per character of the choice.
  gen  the original DnD protocol (spec §6.3): chat template + the dataset's system prompt, greedy
       decoding, the answer parsed from the first 20 characters; unparseable outputs are counted
       as format failures (and as wrong).
Writes OUT/results.json, OUT/results.md (rows: base, each training LoRA, their mean, each generated
adapter, their mean +- std) and OUT/results.png (bar chart).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError, run_cli

_OPTION = re.compile(r"^[A-H]: ")
PARSED_CHARS = 20  # the original parses the answer from the first 20 characters of a generation


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
            cache = res.past_key_values
            cache.reorder_cache(sel.to(device))
            fpos = mask.sum(-1)[sel, None] + torch.arange(rest)
            logits = model(input_ids=feed.to(device), attention_mask=torch.cat([mask[sel], fmask], 1).to(device),
                           position_ids=fpos.to(device), past_key_values=cache, use_cache=True).logits  # fmt: skip
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
        lens = np.array([len(" " + str(c)) for c in r["choices"]])
        acc += int(np.argmax(s) == r["answer"])
        acc_norm += int(np.argmax(s / lens) == r["answer"])
        k += n
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records)}


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


def generate_batch(model, tok, seqs: list[list[int]], max_new_tokens: int, device: str) -> list[str]:
    """Greedy generations for token-id prompts, decoded, stopped once the parser has enough text.

    The prompts' longest common token prefix (the chat template and system prompt) runs once and its
    KV cache is shared by every row; each row's own tokens follow it after padding that the
    attention mask hides ([prefix][pad][own tokens]), with positions counted from the mask, so each
    row is computed as if alone."""
    import torch
    from transformers import StoppingCriteriaList

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
            cache = model(input_ids=ids[:1, :p].to(device), use_cache=True, logits_to_keep=1).past_key_values
        cache.reorder_cache(torch.zeros(len(seqs), dtype=torch.long, device=device))
        kw["past_key_values"] = cache
    stop = StoppingCriteriaList([_EnoughText(tok, width)])
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


def check_adapter(path: Path, base_dir: Path) -> None:
    """An adapter must be a PEFT LoRA dir whose every layer fits the base model."""
    from converters.base_check import check_against_base
    from converters.peft_to_jax import load_peft_adapter

    if not (path / "adapter_config.json").is_file():
        raise DndError(f"{path}: not a PEFT adapter directory (adapter_config.json missing)")
    _, spec = load_peft_adapter(path)
    check_against_base(spec, base_dir / "config.json", where=str(path))


def evaluate(base: str, data_dir, dataset: str, adapters: list[tuple[str, str, Path]], out, split: str = "test",
             limit: int | None = None, protocols=("ll", "gen"), batch_size: int = 16, device: str = "auto",
             overwrite: bool = False) -> dict:  # fmt: skip
    """Scores the base model and each (kind, name, path) adapter; writes results into `out`.

    Args:
      base: base model name (dnd_jax/assets.py) or local directory.
      data_dir: data directory with dataset_info.json.
      dataset: dataset name; its "<dataset>_<split>" records need choices and answer.
      adapters: (kind "training" | "generated" | "heldout", display name, PEFT dir).
      out: output directory (results.json, results.md, results.png), written atomically.
      limit: first N records only.
    """
    from peft import PeftModel
    from tqdm import tqdm

    from dnd_jax.data.prompts import load_split
    from dnd_jax.fileio import atomic_dir
    from dnd_jax.lm import load_base, pick_device

    out = Path(out)
    if out.exists() and not overwrite:
        raise DndError(f"{out}: output already exists (pass --overwrite to replace it)")
    records = load_split(data_dir, f"{dataset}_{split}")[:limit]
    check_records(records, f"{data_dir}/{dataset}_{split}")
    device = pick_device(device)
    lm, tok, base_dir = load_base(base, "float32", device)
    for _, _, p in adapters:  # all checked before any scoring starts
        check_adapter(Path(p), Path(base_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def run(model) -> dict:
        res = {}
        if "ll" in protocols:
            res["ll"] = score_ll(model, tok, records, batch_size, device)
        if "gen" in protocols:
            res["gen"] = score_gen(model, tok, records, batch_size, device)
        return res

    rows = [{"kind": "base", "name": "base", "path": str(base_dir), **run(lm)}]
    model = None
    for i, (kind, name, path) in enumerate(tqdm(adapters, desc="adapters", file=sys.stderr)):
        an = f"a{i}"
        if model is None:
            model = PeftModel.from_pretrained(lm, str(path), adapter_name=an, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=an, is_trainable=False)
        model.set_adapter(an)
        model.eval()
        rows.append({"kind": kind, "name": name, "path": str(path), **run(model)})
        if len(adapters) > i + 1:
            model.delete_adapter(an)
    result = {"base_model": str(base_dir), "dataset": dataset, "split": split, "items": len(records),
              "protocols": list(protocols), "rows": rows, "summary": summarize(rows, protocols)}  # fmt: skip
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "results.md").write_text(markdown_table(result))
        plot(result, tmp / "results.png")
    return result


def _metrics(protocols) -> list[tuple[str, str]]:
    out = []
    if "ll" in protocols:
        out += [("ll", "acc"), ("ll", "acc_norm")]
    if "gen" in protocols:
        out += [("gen", "acc"), ("gen", "format_failures")]
    return out


def summarize(rows: list[dict], protocols) -> dict:
    """Mean (and std) of each metric over the training LoRAs and over the generated adapters."""
    s = {}
    for kind in ("training", "generated"):
        group = [r for r in rows if r["kind"] == kind]
        if group:
            s[kind] = {f"{p}/{m}": {"mean": float(np.mean([r[p][m] for r in group])),
                                    "std": float(np.std([r[p][m] for r in group])), "n": len(group)}
                       for p, m in _metrics(protocols)}  # fmt: skip
    return s


def markdown_table(result: dict) -> str:
    cols = _metrics(result["protocols"])
    head = "| adapter | " + " | ".join(f"{p} {m}" for p, m in cols) + " |\n|---|" + "---|" * len(cols) + "\n"

    def row(name, vals):
        return f"| {name} | " + " | ".join(vals) + " |\n"

    lines = [row("base", [f"{100 * result['rows'][0][p][m]:.1f}" for p, m in cols])]
    for kind in ("heldout", "training", "generated"):
        group = [r for r in result["rows"] if r["kind"] == kind]
        label = "held-out LoRA (reference, trained on the test task)" if kind == "heldout" else kind
        lines += [row(f"{label}: {r['name']}", [f"{100 * r[p][m]:.1f}" for p, m in cols]) for r in group]
        if kind == "heldout":
            continue
        if group:
            sm = result["summary"][kind]
            fmt = (lambda v: f"**{100 * v['mean']:.1f}**") if kind == "training" else (
                lambda v: f"**{100 * v['mean']:.1f} ± {100 * v['std']:.1f}**")  # fmt: skip
            lines.append(row(f"**{kind} ({len(group)}), mean" + (" ± std**" if kind == "generated" else "**"),
                             [fmt(sm[f"{p}/{m}"]) for p, m in cols]))  # fmt: skip
    title = f"{result['dataset']} ({result['split']}, {result['items']} items), accuracy in %\n\n"
    return title + head + "".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no results.png", file=sys.stderr)
        return
    cols = [c for c in _metrics(result["protocols"]) if c[1] != "format_failures"]
    groups = [("base", [result["rows"][0]])] + [
        (k, [r for r in result["rows"] if r["kind"] == k]) for k in ("heldout", "training", "generated")
    ]
    groups = [(k, g) for k, g in groups if g]
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(cols), 3.5))
    w = 0.8 / len(groups)
    for gi, (k, g) in enumerate(groups):
        means = [100 * np.mean([r[p][m] for r in g]) for p, m in cols]
        stds = [100 * np.std([r[p][m] for r in g]) for p, m in cols]
        ax.bar(np.arange(len(cols)) + gi * w, means, w, yerr=stds, label=f"{k} ({len(g)})", capsize=3)
    ax.set_xticks(np.arange(len(cols)) + w * (len(groups) - 1) / 2, [f"{p} {m}" for p, m in cols])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{result['dataset']} ({result['split']}, {result['items']} items)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dnd_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--base", required=True, help="base model: built-in name or local directory")
    ap.add_argument("--data", required=True, help="data directory with dataset_info.json")
    ap.add_argument("--dataset", required=True, help="dataset name (its <name>_<split> entry is scored)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--training", nargs="*", default=[], help="PEFT dirs of training LoRAs")
    ap.add_argument("--generated", nargs="*", default=[], help="PEFT dirs of generated adapters")
    ap.add_argument("--heldout", nargs="*", default=[], help="PEFT dirs of LoRAs trained on the evaluated task itself")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", type=int, default=None, help="score the first N items only")
    ap.add_argument("--protocols", default="ll,gen", help="comma-separated: ll (log-likelihood), gen (DnD)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    protocols = tuple(p for p in a.protocols.split(",") if p)
    if not protocols or set(protocols) - {"ll", "gen"}:
        raise DndError(f"--protocols {a.protocols!r}: expected a comma-separated subset of ll,gen")
    adapters = [(kind, _name(p), Path(p)) for kind, ps in (("heldout", a.heldout), ("training", a.training),
                                                            ("generated", a.generated)) for p in ps]  # fmt: skip
    r = evaluate(a.base, a.data, a.dataset, adapters, a.out, a.split, a.limit, protocols, a.batch_size, a.device,
                 a.overwrite)  # fmt: skip
    print(markdown_table(r))
    return 0


def _name(p: str) -> str:
    path = Path(p)
    return f"{path.parent.name}/{path.name}"


if __name__ == "__main__":
    run_cli(main)
