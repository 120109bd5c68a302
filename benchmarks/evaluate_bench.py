"""Evaluation speed: dnd_jax.evaluate's scoring against the plain way, same model, data and run.

  PYTHONPATH=. python benchmarks/evaluate_bench.py --data ../shared/data/commonsense --dataset SIQA [--limit 100]

Plain way (what dnd_jax.evaluate did before, and what most harnesses do):
  ll   one right-padded sequence per (question, option): the question is re-read for every option;
  gen  left-padded HF generate of the full chat prompts, max_new_tokens tokens for every row.
dnd_jax.evaluate:
  ll   each question once, its KV cache repeated for its options (`loglikelihoods`);
  gen  the batch's common prefix (chat template + system prompt) once, shared through the cache,
       and generation stopped once every row has more characters than the parser reads.
  swap  adapters of one layout in turn (--adapters N random LoRAs of the collection's recipe): PEFT's
       load_adapter for each (plain) against copying each into the attached adapter's layers (Scorer).
Prints both times, the speed-up, the largest log-likelihood difference and how many parsed answer
windows (first 20 characters) differ; the scores must agree for the speed-up to count.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.cpuinfo import describe
from dnd_jax import evaluate
from dnd_jax.data.prompts import load_split
from dnd_jax.errors import run_cli
from dnd_jax.lm import chat_prompt_text, load_base
from dnd_jax.protocols.gen import PARSED_CHARS, generate_batch
from dnd_jax.protocols.ll import loglikelihoods, question_stem


def plain_loglikelihoods(model, tok, pairs, batch_size):
    out, pad = [], tok.pad_token_id
    enc = [
        (tok(c, add_special_tokens=False)["input_ids"], tok(x, add_special_tokens=False)["input_ids"]) for c, x in pairs
    ]
    for i in range(0, len(enc), batch_size):
        chunk = enc[i : i + batch_size]
        width = max(len(c) + len(x) for c, x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (c, x) in enumerate(chunk):
            ids[j, : len(c) + len(x)], mask[j, : len(c) + len(x)] = torch.tensor(c + x), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for j, (c, x) in enumerate(chunk):
            out.append(float(logp[j, torch.arange(len(c) - 1, len(c) + len(x) - 1), torch.tensor(x)].sum()))
    return out


def plain_generate(model, tok, texts, batch_size, max_new_tokens):
    tok.padding_side = "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(g[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--data", required=True, help="data dir with dataset_info.json (e.g. ../shared/data/commonsense)")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=12, help="random LoRAs for the swap figure (0: skip it)")
    a = ap.parse_args(argv)
    print(describe())
    torch.manual_seed(0)
    records = load_split(a.data, f"{a.dataset}_test")[: a.limit]
    lm, tok, _ = load_base(a.base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    pairs = [
        (f"Question: {question_stem(r['prompt'], r['choices'])}\nAnswer:", " " + str(c))
        for r in records
        for c in r["choices"]
    ]
    print(f"{a.dataset}: {len(records)} items, {len(pairs)} (question, option) pairs, batch {a.batch_size}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip

    plain, t_plain = timed(lambda: plain_loglikelihoods(lm, tok, pairs, a.batch_size))
    ours, t_ours = timed(lambda: loglikelihoods(lm, tok, pairs, a.batch_size, "cpu"))
    diff = max(abs(p - o) for p, o in zip(plain, ours, strict=True))
    print(f"ll : plain {t_plain:6.1f} s   dnd_jax {t_ours:6.1f} s   speed-up {t_plain / t_ours:.2f}x   "
          f"max |log-lik difference| {diff:.1e} nats")  # fmt: skip

    texts = [chat_prompt_text(tok, r.get("system", ""), r["prompt"]) for r in records]
    seqs = tok(texts, add_special_tokens=False)["input_ids"]
    plain, t_plain = timed(lambda: plain_generate(lm, tok, texts, a.batch_size, 12))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

    def ours_gen():
        out = [""] * len(seqs)
        for i in range(0, len(order), a.batch_size):
            idx = order[i : i + a.batch_size]
            for j, g in zip(idx, generate_batch(lm, tok, [seqs[j] for j in idx], 12, "cpu"), strict=True):
                out[j] = g
        return out

    ours, t_ours = timed(ours_gen)
    n = PARSED_CHARS
    differ = sum(p[:n] != o[:n] for p, o in zip(plain, ours, strict=True))
    print(f"gen: plain {t_plain:6.1f} s   dnd_jax {t_ours:6.1f} s   speed-up {t_plain / t_ours:.2f}x   "
          f"parsed windows that differ: {differ}/{len(seqs)}")  # fmt: skip
    if a.adapters:
        swap(a.base, records[:8], a.adapters, a.batch_size)


def swap(base: str, records: list[dict], n: int, batch_size: int) -> None:
    """Scores n random adapters of one layout (the collection's LoRA recipe) on `records` (nll) with PEFT's
    load_adapter for each, then with the in-place swap, in one run; the scores must be equal."""
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from configs.collect import commonsense_smollm2

    lora = commonsense_smollm2.get_config().lora
    with tempfile.TemporaryDirectory() as tmp:
        lm, _, _ = load_base(base)
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                         init_lora_weights=False)  # fmt: skip
        model = get_peft_model(lm, cfg)
        paths = []
        for i in range(n):
            torch.manual_seed(i)
            for name, p in model.named_parameters():
                if "lora_" in name:
                    torch.nn.init.normal_(p, std=0.02)
            model.save_pretrained(Path(tmp) / f"a{i}")
            paths.append(Path(tmp) / f"a{i}")
        del model, lm
        out = {}
        for mode in (False, True):
            scorer = evaluate.Scorer(base, "cpu", batch_size, swap_in_place=mode)
            scorer.score(None, records, ("nll",))  # the model warm
            t = time.perf_counter()
            out[mode] = [scorer.score(p, records, ("nll",))["nll"]["nll"] for p in paths], time.perf_counter() - t
        diff = max(abs(x - y) for x, y in zip(out[False][0], out[True][0], strict=True))
        print(f"swap: {n} adapters x {len(records)} items (nll): PEFT load_adapter {out[False][1]:6.1f} s   "
              f"in place {out[True][1]:6.1f} s   speed-up {out[False][1] / out[True][1]:.2f}x   "
              f"max |nll difference| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
