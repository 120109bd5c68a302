"""Entry point: PyTorch evaluation of a base model and LoRA adapters on a multiple-choice dataset.

  python -m dnd_jax.evaluate --base smollm2-135m-instruct --data ../shared/data/commonsense \
      --dataset ARC-c --training runs/collect/ARC-e/step-000050 --generated runs/generated/arc_c/adapter-* \
      --limit 200 --out runs/eval/arc_c

The base model is loaded once; adapters are attached, scored and removed in turn (PEFT
load_adapter / set_adapter / delete_adapter), never reloading the model; an adapter with the attached
one's layout (config, tensor names and shapes) is copied into its layers instead. Protocols
(dnd_jax/protocols/):
  ll   multiple-choice log-likelihood with lm-evaluation-harness's generic template: context
       "Question: <stem>\\nAnswer:", one continuation " <choice>" per option; acc = argmax of the
       summed log-probabilities, acc_norm = argmax of log-probability / len(choice) (lm-eval's).
  gen  the original DnD protocol (spec §6.3): chat template + the dataset's system prompt, greedy
       decoding, the answer parsed from the first 20 characters; unparseable outputs are counted
       as format failures (and as wrong).
  em   exact match of the greedy answer's first line with any acceptable target, normalised (generative tasks).
  nll  the gold response's mean NLL per token in the chat format the LoRAs were trained on, and
       nll_answer, the NLL summed over the answer's own tokens ("C" of "[C]") per item (lower is
       better).
Writes OUT/results.json, OUT/results.md (rows: base, each training LoRA, their mean, each generated
adapter, their mean +- std) and OUT/results.png (bar chart). Each scored row goes to a journal beside OUT
(.OUT.journal.jsonl) first: a stopped or killed evaluation, re-run with the same items, settings and adapter
files, scores only the rows it had not finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError, run_cli
from dnd_jax.journal import Journal, content_key
from dnd_jax.protocols.em import score_em
from dnd_jax.protocols.gen import score_gen
from dnd_jax.protocols.ll import check_records, score_ll
from dnd_jax.protocols.nll import response_nll

PROTOCOLS = ("ll", "gen", "nll", "em")
KINDS = ("heldout", "control", "retrieval", "training", "generated")


def check_adapter(path: Path, base_dir: Path) -> None:
    """An adapter must be a PEFT LoRA dir whose every layer fits the base model."""
    from converters.base_check import check_against_base
    from converters.peft_to_jax import load_peft_adapter

    if not (path / "adapter_config.json").is_file():
        raise DndError(f"{path}: not a PEFT adapter directory (adapter_config.json missing)")
    _, spec = load_peft_adapter(path)
    check_against_base(spec, base_dir / "config.json", where=str(path))


class Scorer:
    """The base model loaded once; PEFT adapters attached, scored and removed in turn (never reloading).

    Args:
      base: base model name (dnd_jax/assets.py) or local directory.
      device: "auto", "cpu" or "cuda".
      batch_size: scoring batch size.
      cutoff_len: token cut-off of the nll protocol (the collection's).
      swap_in_place: copy an adapter of the attached one's layout into its layers (False: every adapter through
        PEFT's load_adapter, as before; benchmarks/evaluate_bench.py times both).
    """

    def __init__(self, base: str, device: str = "auto", batch_size: int = 16, cutoff_len: int = 256,
                 swap_in_place: bool = True):  # fmt: skip
        from dnd_jax.lm import load_base, pick_device

        self.device = pick_device(device)
        self.lm, self.tok, self.base_dir = load_base(base, "float32", self.device)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size, self.cutoff_len = batch_size, cutoff_len
        self.model, self._loaded, self._loaded_path, self._count = None, None, None, 0
        # The attached adapter's config and its LoRA parameters by their saved name: an adapter of the same layout
        # is swapped in by copying its tensors into these (PEFT's load_adapter re-injects every layer: ~0.4 s a
        # swap on SmolLM2-135M, most of a small task's scoring time).
        self._layout, self._params, self.swaps, self.swap_in_place = None, {}, 0, swap_in_place

    def activate(self, path: Path | None):
        """(model, context) with the adapter at `path` attached and active, the previous one removed (None: the base
        model, adapters disabled inside the context). An adapter already active is not reloaded."""
        import contextlib

        from peft import PeftModel

        if path is None:
            model = self.model if self.model is not None else self.lm
            ctx = self.model.disable_adapter() if self.model is not None else contextlib.nullcontext()
        elif self._loaded is not None and self._loaded_path == Path(path):
            model, ctx = self.model, contextlib.nullcontext()
        elif self._swap_in(Path(path)):
            self._loaded_path, model, ctx = Path(path), self.model, contextlib.nullcontext()
        else:
            name = f"a{self._count}"
            self._count += 1
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.lm, str(path), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self.model.set_adapter(name)
            if self._loaded is not None:
                self.model.delete_adapter(self._loaded)
            self._loaded, self._loaded_path, model, ctx = name, Path(path), self.model, contextlib.nullcontext()
            self._layout = _layout(path)
            tag = f".{name}."  # a parameter "...q_proj.lora_A.a3.weight" is saved as "...q_proj.lora_A.weight"
            self._params = {k.replace(tag, "."): v for k, v in self.model.named_parameters() if tag in k}
        model.eval()
        return model, ctx

    def _swap_in(self, path: Path) -> bool:
        """Copies the adapter at `path` into the attached one when both have the same config and the same saved
        tensors (names and shapes); False (nothing changed) otherwise, and the caller loads it through PEFT."""
        import torch
        from safetensors.torch import load_file

        if not self.swap_in_place or self._loaded is None or self._layout is None or _layout(path) != self._layout:
            return False
        file = path / "adapter_model.safetensors"
        if not file.is_file():
            return False
        state = load_file(file)
        if set(state) != set(self._params) or any(state[k].shape != p.shape for k, p in self._params.items()):
            return False
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(state[k])
        self.swaps += 1
        return True

    def score(self, path: Path | None, records: list[dict], protocols) -> dict:
        """{protocol: metrics} of the adapter at `path` (None: the base model) on `records`."""
        model, ctx = self.activate(path)
        res = {}
        with ctx:
            if "ll" in protocols:
                res["ll"] = score_ll(model, self.tok, records, self.batch_size, self.device)
            if "gen" in protocols:
                res["gen"] = score_gen(model, self.tok, records, self.batch_size, self.device)
            if "nll" in protocols:
                res["nll"] = response_nll(model, self.tok, records, self.batch_size, self.device, self.cutoff_len)
            if "em" in protocols:
                res["em"] = score_em(model, self.tok, records, self.batch_size, self.device)
        return res


def _layout(path: Path) -> dict | None:
    """An adapter's config less the fields that do not change what it computes (None when unreadable)."""
    try:
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    for k in ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"):
        cfg.pop(k, None)
    if isinstance(cfg.get("target_modules"), list):  # PEFT saves a set: its order differs between saves
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def evaluate(base: str, data_dir, dataset: str, adapters: list[tuple[str, str, Path]], out, split: str = "test",
             limit: int | None = None, protocols=("ll", "gen"), batch_size: int = 16, device: str = "auto",
             overwrite: bool = False, cutoff_len: int = 256) -> dict:  # fmt: skip
    """Scores the base model and each (kind, name, path) adapter; writes results into `out`.

    Args:
      base: base model name (dnd_jax/assets.py) or local directory.
      data_dir: data directory with dataset_info.json.
      dataset: dataset name; its "<dataset>_<split>" records need choices and answer.
      adapters: (kind, one of KINDS, display name, PEFT dir).
      out: output directory (results.json, results.md, results.png), written atomically.
      limit: first N records only.
      protocols: a subset of PROTOCOLS.
      cutoff_len: token cut-off of the nll protocol (the collection's).
    """
    from tqdm import tqdm

    from dnd_jax.data.prompts import load_split
    from dnd_jax.fileio import atomic_dir

    out = Path(out)
    if out.exists() and not overwrite:
        raise DndError(f"{out}: output already exists (pass --overwrite to replace it)")
    if not protocols or set(protocols) - set(PROTOCOLS):
        raise DndError(f"protocols {list(protocols)}: expected a non-empty subset of {', '.join(PROTOCOLS)}")
    records = load_split(data_dir, f"{dataset}_{split}")[:limit]
    if {"ll", "gen"} & set(protocols):
        check_records(records, f"{data_dir}/{dataset}_{split}")
    from dnd_jax.lm import model_dir

    base_dir = model_dir(base)
    for kind, _, p in adapters:  # all checked before any scoring starts (and before torch loads the base model)
        if kind not in KINDS:
            raise DndError(f"adapter {p}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        check_adapter(Path(p), base_dir)
    # Each scored row is journaled beside the output: a killed evaluation re-run with the same settings scores only
    # what it had not finished (an adapter by its files' content; dnd_jax/journal.py).
    items = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()  # the scored items themselves
    settings = {"base": str(base_dir), "items": items,
                "dataset": dataset, "split": split, "limit": limit, "protocols": list(protocols),
                "batch_size": batch_size, "device": device, "cutoff_len": cutoff_len}  # fmt: skip
    journal = Journal(out.parent / f".{out.name}.journal.jsonl", settings)
    if journal.resumed:
        print(f"{out}: {journal.resumed} row(s) scored before a stop are reused", file=sys.stderr)
    scorer = None

    def score(path: Path | None) -> dict:
        nonlocal scorer
        key = "base" if path is None else content_key(path)
        if journal.get(key) is None:
            if scorer is None:  # the model loads only when something is left to score
                scorer = Scorer(base, device, batch_size, cutoff_len)
            journal.put(key, scorer.score(path, records, protocols))
        return journal.get(key)  # an adapter listed twice (retrieval is also a training LoRA) is scored once

    rows = [{"kind": "base", "name": "base", "path": str(base_dir), **score(None)}]
    for kind, name, path in tqdm(adapters, desc="adapters", file=sys.stderr):
        rows.append({"kind": kind, "name": name, "path": str(path), **score(Path(path))})
    result = {"base_model": str(base_dir), "dataset": dataset, "split": split, "items": len(records),
              "protocols": list(protocols), "rows": rows, "summary": summarize(rows, protocols)}  # fmt: skip
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "results.md").write_text(markdown_table(result))
        plot(result, tmp / "results.png")
    journal.discard()
    return result


def _metrics(protocols) -> list[tuple[str, str]]:
    out = []
    if "ll" in protocols:
        out += [("ll", "acc"), ("ll", "acc_norm")]
    if "gen" in protocols:
        out += [("gen", "acc"), ("gen", "format_failures")]
    if "nll" in protocols:
        out += [("nll", "nll"), ("nll", "nll_answer")]
    return out


def fmt_metric(p: str, v: float | None) -> str:
    """Accuracies in %, the nll protocol in nats; "-" where there is no value (no answer located)."""
    if v is None:
        return "-"
    return f"{v:.3f}" if p == "nll" else f"{100 * v:.1f}"


def _values(group: list[dict], p: str, m: str) -> list[float]:
    """The metric's values over rows, leaving out rows without one (nll_answer None, older results)."""
    return [r[p][m] for r in group if r[p].get(m) is not None]


def summarize(rows: list[dict], protocols) -> dict:
    """Mean (and std) of each metric over the training LoRAs and over the generated adapters."""
    s = {}
    for kind in ("training", "generated"):
        group = [r for r in rows if r["kind"] == kind]
        if group:
            vals = {(p, m): _values(group, p, m) for p, m in _metrics(protocols)}
            s[kind] = {f"{p}/{m}": {"mean": float(np.mean(v)) if v else None,
                                    "std": float(np.std(v)) if v else None, "n": len(v)}
                       for (p, m), v in vals.items()}  # fmt: skip
    return s


def markdown_table(result: dict) -> str:
    cols = _metrics(result["protocols"])
    head = "| adapter | " + " | ".join(f"{p} {m}" for p, m in cols) + " |\n|---|" + "---|" * len(cols) + "\n"

    def row(name, vals):
        return f"| {name} | " + " | ".join(vals) + " |\n"

    labels = {
        "heldout": "held-out LoRA (reference, trained on the test task)",
        "control": "prompt-blind control (mean training tokens)",
        "retrieval": "retrieval (nearest training task)",
    }
    lines = [row("base", [fmt_metric(p, result["rows"][0][p].get(m)) for p, m in cols])]
    for kind in KINDS:
        group = [r for r in result["rows"] if r["kind"] == kind]
        label = labels.get(kind, kind)
        lines += [row(f"{label}: {r['name']}", [fmt_metric(p, r[p].get(m)) for p, m in cols]) for r in group]
        if kind not in ("training", "generated") or not group:
            continue
        sm = result["summary"][kind]
        gen = kind == "generated"

        def fmt(p, v, gen=gen):
            return f"**{fmt_metric(p, v['mean'])}" + (f" ± {fmt_metric(p, v['std'])}**" if gen else "**")

        lines.append(row(f"**{kind} ({len(group)}), mean" + (" ± std**" if gen else "**"),
                         [fmt(p, sm[f"{p}/{m}"]) for p, m in cols]))  # fmt: skip
    title = (
        f"{result['dataset']} ({result['split']}, {result['items']} items); accuracy in %"
        + (
            ", nll in nats per response token, nll_answer in nats per answer (lower is better)"
            if "nll" in result["protocols"]
            else ""
        )
        + "\n\n"
    )
    return title + head + "".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no results.png", file=sys.stderr)
        return
    cols = [c for c in _metrics(result["protocols"]) if c[1] not in ("format_failures", "nll", "nll_answer")]
    if not cols:
        return
    groups = [("base", [result["rows"][0]])] + [(k, [r for r in result["rows"] if r["kind"] == k]) for k in KINDS]
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
    ap.add_argument("--control", nargs="*", default=[], help="PEFT dirs of prompt-blind control adapters")
    ap.add_argument("--retrieval", nargs="*", default=[], help="PEFT dirs of retrieved training LoRAs")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--limit", type=int, default=None, help="score the first N items only")
    ap.add_argument(
        "--protocols",
        default="ll,gen",
        help="comma-separated: ll (log-likelihood), gen (DnD), nll (gold-response loss)",
    )
    ap.add_argument("--cutoff-len", type=int, default=256, help="token cut-off of the nll protocol (the collection's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    protocols = tuple(p for p in a.protocols.split(",") if p)
    if not protocols or set(protocols) - set(PROTOCOLS):
        raise DndError(f"--protocols {a.protocols!r}: expected a comma-separated subset of {','.join(PROTOCOLS)}")
    adapters = [(kind, _name(p), Path(p)) for kind in KINDS for p in getattr(a, kind)]
    r = evaluate(a.base, a.data, a.dataset, adapters, a.out, a.split, a.limit, protocols, a.batch_size, a.device,
                 a.overwrite, a.cutoff_len)  # fmt: skip
    print(markdown_table(r))
    return 0


def _name(p: str) -> str:
    path = Path(p)
    return f"{path.parent.name}/{path.name}"


if __name__ == "__main__":
    run_cli(main)
