"""benchmarks/accelerator.py: its --small run on CPU prints every figure, and its FLOP counts against the traced
programs' own matmuls and convs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import accelerator
from dnd_jax.models.encoder import BertConfig, BertEncoder
from dnd_jax.models.hyperconv import GeneratorConfig, HyperConvDecoder, layer_flops
from tests import warm
from tests.train_fixtures import user_env

REPO = Path(__file__).resolve().parents[1]


def test_small_run_prints_every_figure_as_json(tmp_path):
    out = tmp_path / "figures.jsonl"
    env = user_env(JAX_PLATFORMS="cpu")  # one CPU device, as a user's machine
    # `python -m benchmarks.accelerator` runs the script as `python benchmarks/accelerator.py` does (its __main__),
    # started warm (tests/warm.py)
    r = warm.run([sys.executable, "-m", "benchmarks.accelerator", "--small", "--out", str(out)], cwd=REPO, env=env,
                 capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    written = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert printed == written
    figures: dict[str, list[dict]] = {}
    for rec in written:
        figures.setdefault(rec["figure"], []).append(rec)
    assert set(figures) == set(accelerator.KEYS)
    for name, recs in figures.items():
        for rec in recs:
            assert "error" not in rec, rec
            missing = [k for k in (*accelerator.COMMON, *accelerator.KEYS[name]) if k not in rec]
            assert not missing, (name, missing)
            assert rec["platform"] == "cpu" and rec["jax"] == jax.__version__
    check = figures["correctness"]
    assert [c["precision"] for c in check] == ["highest"] and check[0]["ok"] is True
    step, orig = figures["train_step"][0], figures["original_step"][0]
    assert step["batch"] == orig["batch"] == 4 and step["mfu"] is None  # the largest batch tried; no CPU peak
    assert step["speedup_vs_original"] == step["samples_per_s"] / orig["samples_per_s"]
    assert orig["source"].startswith("benchmarks/torch_hyperconv.py")  # no --original: the transcription
    assert sorted(g["adapters"] for g in figures["generation"]) == [1, 8]
    sft = figures["sft_step"][0]  # SFT mode's step on a tiny Qwen2 (2 tasks x 2 examples), and PyTorch's LoRA step
    assert sft["rows"] == 4 and sft["step_s"] > 0 and sft["torch_step_s"] > 0
    assert sft["ratio_vs_torch"] == sft["step_s"] / sft["torch_step_s"] and sft["generator_params"] > 0
    assert any(ln.startswith("figure") for ln in r.stdout.splitlines())  # the table


def _traced_flops(fn, *args) -> int:
    """2 x multiply-adds of every dot_general and conv in fn's jaxpr (sub-jaxprs included)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
            elif eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape  # [out, in, k, k] after the kernel spec
                kernel = [rhs[d] for d in eqn.params["dimension_numbers"].rhs_spec]
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[1:])
            for v in eqn.params.values():
                sub = getattr(v, "jaxpr", v)
                if hasattr(sub, "eqns"):
                    total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_flop_counts_match_the_traced_programs():
    features, k = ((3, 12, 10), (5, 8, 6), (7, 4, 9)), 3
    gen = GeneratorConfig(features, k, conv_impl="direct")
    model = HyperConvDecoder(gen, nnx.Rngs(0))
    x = jnp.zeros((1, *features[0]))
    assert accelerator.generator_flops(features, k) == _traced_flops(lambda v: model(v), x)
    assert accelerator.generator_flops(features, k) == layer_flops(gen)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24)
    enc = BertEncoder(cfg, rngs=nnx.Rngs(0))
    ids = np.ones((3, 20), np.int32)
    traced = _traced_flops(lambda i, m: enc(i, m, chunk=0, key_length=8), ids, ids)
    assert accelerator.encoder_flops(cfg, 3, 20, 8) == traced


def test_peak_table():
    assert accelerator.peak_flops("NVIDIA H200") == accelerator.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert accelerator.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert accelerator.peak_flops("cpu") is None
