"""Figures on whatever backend JAX finds: the paper's generator step, the original's step, generation, correctness,
SFT mode's step.

On the lent GPU machine (device tool `run`, from the repository root). ml_collections is not installed there, so
its wheel travels, and so does the original's hyperconv.py; both sit in the git-ignored .cache/, hence `carry`:

  carry: [".cache/wheels", ".cache/original"]    timeout_s: 540
  command:
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site
    .cache/wheels/*.whl && PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
    python3 benchmarks/accelerator.py --original .cache/original/hyperconv.py --out $OUT/accelerator.jsonl
    2>&1 | tee $OUT/accelerator.log

(one line; the JSON lines come back as $OUT/accelerator.jsonl).

Made once here, never committed:

  .venv/bin/python -m pip download ml_collections --no-deps -d .cache/wheels
  mkdir -p .cache/original && git -C <the `fetch` snapshot of github jerryliang24/Drag-and-Drop-LLMs> \
      show HEAD:workspace/dnd/module/hyperconv.py > .cache/original/hyperconv.py

Without --original (or with a path that does not exist) the repository's PyTorch transcription of the original,
benchmarks/torch_hyperconv.py, stands in, and the line says so. On CPU, everything shrunk (tests/accelerator_test.py):

  PYTHONPATH=. python benchmarks/accelerator.py --small

Parts (`--only`, comma-separated; all by default), run in this order:
  correctness  a small float32 generator: its forward and one trainer step on jax.devices()[0] (a 1-device mesh)
               against the same weights and batch on the CPU, within 1e-4 relative, at matmul precision "highest";
               on an accelerator also at the default precision (where GPUs run float32 as TF32), reported only.
  original     the original's step in PyTorch on the same device: BertModel (train mode, no grad), noise, the
               original generator module under bf16 autocast, weighted MSE, backward, clip, AdamW.
  step         ours: `trainer.make_steps`' train step at configs/arc_c.py sizes (1,113,203,220 parameters, k 9,
               128 prompts x 384 tokens through a frozen MiniLM-L6-sized BERT inside the step, targets (4296, 10,
               130)), jitted as the trainer jits it, bf16 compute (last layer float32, as configured).
  generate     prompts -> encoder -> generator -> detokenized LoRA pytree on the host (PEFT-ready arrays, the
               Qwen2.5-0.5B r 8 layout), for 1 adapter and for 8.
  sft          SFT mode's train step (dnd_jax/objectives/sft.py) at Qwen2.5-0.5B's shape (8 tasks x 4 examples x
               256 tokens, the many-task generator, random weights), and one PEFT LoRA step of the same rows on the
               same LM in PyTorch, same device, same run (`part_sft`).

The step and the original each run at the largest batch of `--batches` (descending) that fits, an out-of-memory
error moving to the next. Times are medians of timed calls after a warm-up; compile time is apart. Model FLOPs
per step = the frozen encoder's forward + 3 x the generator's forward (2 FLOPs per multiply-add, from the layer
shapes; `generator_flops`, `encoder_flops`); MFU = model FLOP/s over the device kind's dense bf16 peak (`PEAKS`;
null where unknown, e.g. CPU). No weights are loaded: every model is randomly initialised from its config, and
prompts are random token ids ([CLS] word pieces [SEP], right-padded; no tokenizer). Each part has a time guard
(`--budget`, seconds for the whole run, split between the parts, time one leaves unused going to the next): past
it, no further batch sizes, adapter counts or repeats (a compile in flight is not cut short). A part that fails
prints a JSON line with "error" and the run goes on. "peak_bytes" is the process's peak device memory so far.

JAX's GPU memory is not preallocated here (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so that PyTorch and JAX
share the device in one process; the original runs before our step and hands its cache back.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # after the allocator settings above
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dnd_jax import generate, lora_tokens, sharding, trainer
from dnd_jax.models.encoder import BertConfig, BertEncoder, keys_needed
from dnd_jax.models.hyperconv import HyperConvDecoder, count_params

# Dense bf16 peak FLOP/s per device kind (datasheets, without sparsity), matched as substrings of
# `device_kind`, first match wins. MFU is null for a kind not listed (CPUs).
PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)
FIGURES = {"correctness": "correctness", "original": "original_step", "step": "train_step",
           "generate": "generation", "sft": "sft_step"}  # fmt: skip
# The keys every line of a figure carries (tests/accelerator_test.py checks them), besides COMMON.
COMMON = ("figure", "device", "platform", "jax", "torch", "dtype")
KEYS = {
    "correctness": ("ok", "tol", "precision", "forward_rel_err", "loss_rel_err", "update_rel_err", "reference"),
    "original_step": ("batch", "step_s", "samples_per_s", "model_flop_per_s", "mfu", "first_step_s", "source"),
    "train_step": ("batch", "step_s", "samples_per_s", "flop_per_step", "model_flop_per_s", "mfu", "compile_s",
                   "params", "speedup_vs_original"),
    "generation": ("adapters", "per_call_s", "per_adapter_s", "compile_s", "host_bytes"),
    "sft_step": ("lm", "rows", "length", "step_s", "rows_per_s", "compile_s", "generator_params", "torch_step_s",
                 "ratio_vs_torch"),
}  # fmt: skip
# The SFT step's tasks x examples x tokens at full size (benchmarks/sft_step.py's defaults).
SFT_ROWS = (8, 4, 256)
TINY_QWEN2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the generator, the prompts, the batches tried, the LoRA layout, the time."""

    features: tuple | None  # None: configs/arc_c.py's (the paper's)
    kernel_size: int
    text_tokens: tuple[int, int]  # real tokens per text, [CLS] and [SEP] included: uniform in [lo, hi]
    batches: tuple[int, ...]
    repeats: int
    adapters: tuple[int, ...]
    lora: str  # "0.5B" (Qwen2.5-0.5B, the paper's) or "tiny"
    chunk: int
    budget_s: float  # the whole run's time guard
    encoder_layers: int = 6  # MiniLM-L6's


FULL = Sizes(None, 9, (16, 120), (16, 8, 4, 2, 1), 10, (1, 8), "0.5B", 128, 420.0)
SMALL = Sizes(((4, 32, 384), (8, 16, 64), (87, 10, 34)), 3, (4, 24), (4, 2), 2, (1, 8), "tiny", 32, 600.0, 2)
# Share of the budget per part (the step compiles the 1.1 B generator's forward and backward). Each part's
# deadline is its cumulative share of the run's budget: what an earlier part leaves unused goes to the later ones.
SHARES = {"correctness": 0.10, "original": 0.22, "step": 0.35, "generate": 0.15, "sft": 0.18}
# The correctness run: small, float32.
CHECK = Sizes(((4, 32, 384), (8, 16, 48), (16, 10, 34)), 3, (4, 24), (2,), 1, (1,), "tiny", 32, 60.0, 2)
TOL = 1e-4


def generator_flops(features, k: int) -> int:
    """Forward FLOPs per sample of the generator (2 per multiply-add), from the conv shapes.

    Per layer (N, H, W) -> (N', H', W'), every conv k x k 'same' (k^2 multiply-adds per output element and
    input channel): ConvW1 W -> W' over (H, N), then ConvH1 H -> H' over (N, W'); ConvH2 H -> H' over (N, W),
    then ConvW2 W -> W' over (N, H'); ConvL N -> N' over (H', W'). LayerNorm, tanh and sums are left out.
    """
    k2, total = k * k, 0
    for (n, h, w), (n2, h2, w2) in itertools.pairwise(features):
        macs = h * n * w * w2 + n * w2 * h * h2 + n * w * h * h2 + n * h2 * w * w2 + h2 * w2 * n * n2
        total += 2 * k2 * macs
    return total


def encoder_flops(cfg: BertConfig, texts: int, length: int, key_length: int) -> int:
    """Forward FLOPs of the BERT encoder's matmuls over `texts` texts of `length` tokens, attending to the first
    `key_length` keys (encoder key trimming): per layer Q and the output projection over every position, K and V
    over the kept keys, scores and context (length x key_length x hidden each), the two FFN matmuls."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    macs = 2 * length * d * d + 2 * key_length * d * d + 2 * length * key_length * d + 2 * length * d * f
    return 2 * macs * cfg.num_layers * texts


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind (`PEAKS`), None when unknown."""
    return next((p for name, p in PEAKS if name.lower() in device_kind.lower()), None)


def random_texts(rng: np.random.Generator, shape, vocab: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and attention mask [..., L] of random texts: [CLS] (101), random word pieces, [SEP] (102), then
    [PAD] (0); lo..hi real tokens each. What the encoder costs does not depend on which words these are."""
    *lead, length = shape
    lens = rng.integers(lo, min(hi, length) + 1, size=lead)
    mask = (np.arange(length) < lens[..., None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1000, vocab, size=shape), 0).astype(np.int32)
    ids[..., 0] = 101
    np.put_along_axis(ids, (lens - 1)[..., None], 102, axis=-1)
    return ids, mask


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "OutOfMemory" in s


class Guard:
    """A part's time guard: seconds left until its deadline (`end`, a time.perf_counter() value)."""

    def __init__(self, end: float):
        self.end = end

    def left(self) -> float:
        return self.end - time.perf_counter()


def timed(fn, repeats: int, guard: Guard) -> list[float]:
    """Wall times of up to `repeats` calls of fn (which waits for its device work); at least one, fewer once
    the guard's deadline has passed."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if guard.left() <= 0:
            break
    return times


def paper_config(sizes: Sizes, dtype: str):
    """configs/arc_c.py (the paper's generator and recipe), shrunk to `sizes` where they say so."""
    from configs import arc_c

    c = arc_c.get_config()
    if sizes.features is not None:
        c.model.features = sizes.features
        c.data.num_texts, c.data.max_text_length = sizes.features[0][:2]
    c.model.kernel_size = sizes.kernel_size
    c.encoder.dtype = c.model.compute_dtype = dtype
    return c


def make_encoder(config, layers: int) -> BertEncoder:
    """all-MiniLM-L6-v2's shape (BertConfig's defaults) with `layers` layers and random weights."""
    return BertEncoder(BertConfig(num_layers=layers), dtype=jnp.dtype(config.encoder.dtype), rngs=nnx.Rngs(0))


class Step:
    """`trainer.make_steps`' train step and the generator's forward, jitted as `trainer._run` jits them, on a mesh
    of `devices` (config.mesh). Trace, compile and call inside `with jax.set_mesh(step.mesh)`."""

    def __init__(self, config, encoder, devices, key_length: int | None):
        mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
        gen = trainer.generator_config(config)
        abstract = nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        rules = [tuple(r) for r in config.mesh.rules]
        specs = nnx.to_pure_dict(sharding.param_specs(abstract_params, mesh, rules))
        rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        tx, schedule = trainer.make_optimizer(config)
        self.init_state = trainer.make_init_state(config)
        opt_sh = trainer._tree_shardings(jax.eval_shape(self.init_state)["opt_state"], param_sh, rep)
        self.state_sh = {"params": param_sh, "opt_state": opt_sh, "step": rep}
        enc_graphdef, enc_state = nnx.split(encoder)
        self.enc_state = jax.device_put(enc_state, rep)
        train_step, _ = trainer.make_steps(config, graphdef, enc_graphdef, tx, schedule, key_length)
        self.train = jax.jit(train_step, in_shardings=(self.state_sh, rep, batch_sh, rep),
                             out_shardings=(self.state_sh, rep), donate_argnums=(0,))  # fmt: skip
        self.forward = jax.jit(lambda p, c: nnx.merge(graphdef, p)(c), in_shardings=(param_sh, batch_sh),
                               out_shardings=batch_sh)  # fmt: skip
        self.mesh, self.rep, self.batch_sh, self.param_sh, self.graphdef = mesh, rep, batch_sh, param_sh, graphdef

    def new_state(self):
        return jax.jit(self.init_state, out_shardings=self.state_sh)()

    def batch(self, ids, mask, tokens) -> dict:
        host = {"input_ids": ids, "attention_mask": mask, "tokens": tokens}
        return jax.device_put(host, self.batch_sh)


def step_memory(compiled, device) -> dict:
    """Peak device bytes in use (None where the backend keeps no count) and the compiled step's temporaries."""
    out = {"peak_bytes": None, "temp_bytes": None}
    try:
        out["peak_bytes"] = (device.memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001  (backends without memory stats)
        pass
    try:
        out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def batch_for(config, sizes: Sizes, b: int, seed: int = 0):
    """Random prompts [b, N, L] and random targets [b, T, R, K] for the config's shapes."""
    n, length, _ = config.model.features[0]
    rng = np.random.default_rng(seed)
    ids, mask = random_texts(rng, (b, n, length), BertConfig().vocab_size, *sizes.text_tokens)
    tokens = rng.standard_normal((b, *config.model.features[-1]), dtype=np.float32)
    return ids, mask, tokens


def flop_fields(config, enc_cfg: BertConfig, b: int, key_length: int, seconds: float, kind: str) -> dict:
    """Model FLOPs of a step at batch b (encoder forward + 3 x generator forward), their rate and the MFU."""
    n, length, _ = config.model.features[0]
    per_sample = 3 * generator_flops(config.model.features, config.model.kernel_size)
    per_sample += encoder_flops(enc_cfg, n, length, key_length)
    rate = b * per_sample / seconds
    peak = peak_flops(kind)
    return {"flop_per_step": b * per_sample, "model_flop_per_s": rate, "mfu": None if peak is None else rate / peak,
            "peak_flop_per_s": peak}  # fmt: skip


def jax_step_at(config, encoder, sizes: Sizes, b: int, guard: Guard) -> dict:
    """Our train step at batch b on jax.devices()[0]: compile, warm-up, timed steps."""
    config.train.batch_size = b
    ids, mask, tokens = batch_for(config, sizes, b)
    key_length = keys_needed(mask)
    dev = jax.devices()[0]
    step = Step(config, encoder, [dev], key_length)
    with jax.set_mesh(step.mesh):
        box = {"state": step.new_state()}
        batch = step.batch(ids, mask, tokens)
        weight = jax.device_put(np.ones(tokens.shape[1], np.float32), step.rep)
        t0 = time.perf_counter()
        compiled = step.train.lower(box["state"], step.enc_state, batch, weight).compile()
        compile_s = time.perf_counter() - t0

        def run():
            box["state"], box["metrics"] = compiled(box["state"], step.enc_state, batch, weight)
            jax.block_until_ready((box["state"], box["metrics"]))

        first = timed(run, 1, guard)[0]
        times = timed(run, sizes.repeats, guard)
        loss = float(box["metrics"]["loss"])
        mem = step_memory(compiled, dev)
        box.clear()  # the state's device memory goes back before the next part
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at batch {b}")
    med = float(np.median(times))
    return {"batch": b, "step_s": med, "step_s_min": min(times), "repeats": len(times), "compile_s": compile_s,
            "first_step_s": first, "samples_per_s": b / med, "key_length": key_length, "loss": loss, **mem,
            **flop_fields(config, encoder.cfg, b, key_length, med, dev.device_kind)}  # fmt: skip


def first_fit(a, sizes: Sizes, guard: Guard, attempt, release=gc.collect) -> tuple[dict, list]:
    """The first batch of `batches` (largest first) at which `attempt(b)` runs without running out of memory:
    (its record, the batches tried before it). `release` runs after each out-of-memory attempt, outside the
    except block, whose traceback would still hold the failed attempt's arrays."""
    tried = []
    for b in batches(a, sizes):
        if tried and guard.left() <= 0:
            tried.append({"batch": b, "skipped": "time guard"})
            break
        rec = None
        try:
            rec = attempt(b)
        except Exception as e:
            if not is_oom(e):
                raise
            tried.append({"batch": b, "oom": str(e).splitlines()[0][:300]})
        if rec is None:
            release()
            continue
        return rec, tried
    raise RuntimeError(f"no batch size fit: {tried}")


def part_step(a, sizes: Sizes, guard: Guard, done: dict) -> dict:
    config = paper_config(sizes, a.dtype)
    encoder = make_encoder(config, a.encoder_layers)
    rec, tried = first_fit(a, sizes, guard, lambda b: jax_step_at(config, encoder, sizes, b, guard))
    orig = done.get("original_step", {})
    speedup = rec["samples_per_s"] / orig["samples_per_s"] if orig.get("samples_per_s") else None
    return {"params": count_params(trainer.generator_config(config)), **rec, "tried": tried,
            "speedup_vs_original": speedup, "original_batch": orig.get("batch"),
            "speedup_meaning": "ours samples/s over the original's (its step time over ours at equal batches); "
                               "> 1: ours faster",
            "encoder_layers": a.encoder_layers, "conv_impl": config.model.conv_impl,
            "matmul_precision": "default"}  # fmt: skip


def original_decoder(path: str | None):
    """(constructor features, k -> torch module, where it came from): the original's hyperconv.py at `path`, else
    the repository's transcription."""
    if path and Path(path).is_file():
        spec = importlib.util.spec_from_file_location("dnd_original_hyperconv", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)

        def make(features, k):
            return mod.HyperConvDecoder([tuple(f) for f in features], tuple(features[0]), k)

        return make, str(path)
    from benchmarks.torch_hyperconv import TorchHyperConvDecoder

    why = "absent" if path else "not given"
    return TorchHyperConvDecoder, f"benchmarks/torch_hyperconv.py (the repo's transcription; --original {why})"


def torch_step_at(config, make, sizes: Sizes, b: int, guard: Guard, layers: int) -> dict:
    """The original's whole step at batch b, as it trains (bf16 autocast unless float32)."""
    import torch
    import transformers

    from benchmarks.torch_hyperconv import original_train_step

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, m, e = config.train, config.model, BertConfig(num_layers=layers)
    torch.manual_seed(0)
    bert_cfg = transformers.BertConfig(vocab_size=e.vocab_size, hidden_size=e.hidden_size, num_hidden_layers=layers,
                                       num_attention_heads=e.num_heads, intermediate_size=e.intermediate_size,
                                       max_position_embeddings=e.max_position)  # fmt: skip
    bert = transformers.BertModel(bert_cfg, add_pooling_layer=False).to(dev).train().requires_grad_(False)
    model = make(m.features, m.kernel_size).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps,
                            weight_decay=t.weight_decay)  # fmt: skip
    ids, mask, tokens = batch_for(config, sizes, b)
    _, n, length = ids.shape
    ids_t = torch.from_numpy(ids.reshape(b * n, length)).long().to(dev)
    mask_t = torch.from_numpy(mask.reshape(b * n, length)).long().to(dev)
    y = torch.from_numpy(tokens).to(dev)
    w = torch.ones(y.shape[1], device=dev)[None, :, None, None]
    autocast = m.compute_dtype != "float32"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {}

    def run():
        loss = original_train_step(model, opt, bert, ids_t, mask_t, y, w, t, (b, n, length), dev.type, autocast)
        sync()
        out["loss"] = loss.detach()

    first = timed(run, 1, guard)[0]
    times = timed(run, sizes.repeats, guard)
    loss = float(out["loss"])
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    med = float(np.median(times))
    kind = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return {"batch": b, "step_s": med, "step_s_min": min(times), "repeats": len(times), "first_step_s": first,
            "samples_per_s": b / med, "loss": loss, "peak_bytes": peak, "torch_device": kind,
            "attention": getattr(bert.config, "_attn_implementation", None), "autocast": autocast,
            **flop_fields(config, e, b, keys_needed(mask), med, kind)}  # fmt: skip


def part_original(a, sizes: Sizes, guard: Guard, done: dict) -> dict:
    import torch

    config = paper_config(sizes, a.dtype)
    make, source = original_decoder(a.original)

    def release():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    try:

        def attempt(b):
            return torch_step_at(config, make, sizes, b, guard, a.encoder_layers)

        rec, tried = first_fit(a, sizes, guard, attempt, release)
        return {**rec, "source": source, "tried": tried, "optimizer": "torch.optim.AdamW (default foreach)"}
    finally:
        release()  # hand the memory back before JAX's parts


def lora_layout(sizes: Sizes):
    """The token layout of a rank-8 LoRA on every linear of Qwen2.5-0.5B ((4296, 10, 130) at chunk 128; the
    paper's) or of a tiny Qwen2 ((87, 10, 34) at chunk 32), built from the architecture alone."""
    import transformers

    from converters.synthetic import qwen2_config, spec_from_config

    cfg = qwen2_config("0.5B") if sizes.lora == "0.5B" else transformers.Qwen2Config(**TINY_QWEN2)
    return lora_tokens.make_layout(spec_from_config(cfg, r=8, alpha=16), sizes.chunk)


def part_generate(a, sizes: Sizes, guard: Guard, done: dict) -> list[dict]:
    """Prompts (host ids) -> LoRA pytree on the host through `generate.make_generate_fn`, for each adapter count."""
    config = paper_config(sizes, a.dtype)
    layout = lora_layout(sizes)
    if layout.shape != tuple(config.model.features[-1]):
        raise ValueError(f"layout {layout.shape} != generator output {config.model.features[-1]}")
    gen = trainer.generator_config(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0))), nnx.Param)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(HyperConvDecoder(gen, nnx.Rngs(params=0)), nnx.Param)))()
    enc_graphdef, enc_state = nnx.split(make_encoder(config, a.encoder_layers))
    enc_state = jax.device_put(enc_state)
    fn = generate.make_generate_fn(config, graphdef, enc_graphdef, layout)
    n, length, _ = config.model.features[0]
    rows = []
    for k in sizes.adapters:
        if rows and guard.left() <= 0:
            rows.append({"adapters": k, "skipped": "time guard"})
            continue
        ids, mask = random_texts(np.random.default_rng(k), (k, n, length), BertConfig().vocab_size, *sizes.text_tokens)
        t0 = time.perf_counter()
        compiled = fn.lower(params, enc_state, jnp.asarray(ids), jnp.asarray(mask), None).compile()
        compile_s = time.perf_counter() - t0
        out = {}

        def run(ids=ids, mask=mask, compiled=compiled, out=out):
            out["lora"] = jax.device_get(compiled(params, enc_state, jax.device_put(ids), jax.device_put(mask), None))

        first = timed(run, 1, guard)[0]
        times = timed(run, sizes.repeats, guard)
        leaves = jax.tree.leaves(out["lora"])
        if not all(isinstance(x, np.ndarray) and np.isfinite(x).all() for x in leaves):
            raise FloatingPointError("generated LoRA arrays are not finite host arrays")
        med = float(np.median(times))
        rows.append({"adapters": k, "per_call_s": med, "per_adapter_s": med / k, "compile_s": compile_s,
                     "first_call_s": first, "repeats": len(times), "host_bytes": int(sum(x.nbytes for x in leaves)),
                     "modules": len(layout.spec.modules), "token_shape": list(layout.shape)})  # fmt: skip
        del out
        gc.collect()
    return rows


def check_config():
    """The correctness run's config: small, float32, AdamW with eps 1 and no decay (its first update is then
    smooth in the gradient, ~lr g, instead of ~lr sign(g), so the comparison sees the gradient itself)."""
    c = paper_config(CHECK, "float32")
    c.train.batch_size, c.train.eps, c.train.weight_decay, c.train.learning_rate = 2, 1.0, 0.0, 1e-3
    return c


def run_on(devices, config, encoder, host_state, data, key_length) -> dict:
    """The generator's forward on `data["cond"]` and one train step from `host_state`, on a mesh of `devices`."""
    step = Step(config, encoder, devices, key_length)
    with jax.set_mesh(step.mesh):
        params = jax.device_put(jax.tree.map(np.array, host_state["params"]), step.param_sh)
        fwd = np.asarray(step.forward(params, jax.device_put(data["cond"], step.batch_sh)), np.float64)
        state = jax.device_put(jax.tree.map(np.array, host_state), step.state_sh)
        weight = jax.device_put(np.ones(data["tokens"].shape[1], np.float32), step.rep)
        new, m = step.train(state, step.enc_state, step.batch(data["ids"], data["mask"], data["tokens"]), weight)
        new_params = jax.device_get(new["params"])
    pairs = zip(jax.tree.leaves(new_params), jax.tree.leaves(host_state["params"]), strict=True)
    delta = [np.asarray(x, np.float64) - np.asarray(y, np.float64) for x, y in pairs]
    return {"forward": fwd, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
            "update": np.concatenate([d.ravel() for d in delta])}  # fmt: skip


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def closure_constants_baked() -> bool:
    """Whether jit embeds an array closed over by the jitted function in the program as a literal (as
    `trainer.attach_cache`'s encode does with the encoder's weights): 1 MiB of random values in the HLO text."""
    big = jnp.asarray(np.random.default_rng(0).random((256, 1024), np.float32))
    return len(jax.jit(lambda x: x + big).lower(jnp.ones((256, 1024))).as_text()) > 1_000_000


def part_correctness(a, sizes: Sizes, guard: Guard, done: dict) -> list[dict]:
    config = check_config()
    encoder = make_encoder(config, CHECK.encoder_layers)
    ids, mask, tokens = batch_for(config, CHECK, config.train.batch_size, seed=1)
    cond = np.random.default_rng(2).standard_normal((2, *CHECK.features[0]), dtype=np.float32)
    data = {"ids": ids, "mask": mask, "tokens": tokens, "cond": cond}
    key_length = keys_needed(mask)
    cpu, acc = jax.devices("cpu")[0], jax.devices()[0]
    with jax.default_device(cpu):
        host_state = jax.device_get(jax.jit(trainer.make_init_state(config))())
    with jax.default_matmul_precision("highest"):
        want = run_on([cpu], config, encoder, host_state, data, key_length)
    rows = []
    for precision in ("highest", "default") if acc.platform != "cpu" else ("highest",):
        if rows and guard.left() <= 0:
            break
        if precision == "default":
            got = run_on([acc], config, encoder, host_state, data, key_length)
        else:
            with jax.default_matmul_precision(precision):
                got = run_on([acc], config, encoder, host_state, data, key_length)
        errs = {"forward_rel_err": rel_err(got["forward"], want["forward"]),
                "loss_rel_err": rel_err(got["loss"], want["loss"]),
                "grad_norm_rel_err": rel_err(got["grad_norm"], want["grad_norm"]),
                "update_rel_err": rel_err(got["update"], want["update"])}  # fmt: skip
        ok = all(v <= TOL for v in errs.values())
        rows.append({"precision": precision, **errs, "tol": TOL, "ok": ok if precision == "highest" else None,
                     "within_tol": ok, "reference": f"{cpu.platform}:{cpu.id}", "features": CHECK.features,
                     "conv_impl": config.model.conv_impl,
                     "jit_closure_constants_baked": closure_constants_baked()})  # fmt: skip
    return rows


def part_sft(a, sizes: Sizes, guard: Guard, done: dict) -> dict:
    """SFT mode's train step (dnd_jax/objectives/sft.py, through benchmarks/sft_step.py): B tasks' prompts through
    the extractor, the many-task generator to each row's LoRA at the LM's token layout, the frozen LM on M examples
    of S tokens per task (the head at the label positions, as the trainer's bucketed batches), the response NLL,
    backward into the generator, AdamW; random weights. Beside it, in the same run and on the same device: one
    PEFT LoRA on the same LM in PyTorch, forward + backward of the same rows + AdamW (an mt_lora or Text-to-LoRA
    step's LM share)."""
    import argparse

    import transformers

    from benchmarks import sft_step
    from converters.synthetic import spec_from_config

    full = sizes.lora == "0.5B"
    hf = sft_step.hf_config("qwen2.5-0.5b") if full else transformers.Qwen2Config(**TINY_QWEN2)
    layout = lora_tokens.make_layout(spec_from_config(hf, r=8, alpha=16, dtype="float32"), sizes.chunk)
    b, m, length = a.sft_rows if full else (2, 2, 32)
    features = None if full else (*sizes.features[:2], layout.shape)  # the small generator, the tiny LM's layout
    args = argparse.Namespace(tasks=b, examples=m, length=length, dtype=a.dtype, microbatches=a.sft_microbatches,
                              weights="random", response=0.25, repeats=sizes.repeats)  # fmt: skip
    run, compile_step, config = sft_step.build_sft_step(args, hf, layout, head_at_labels=True, features=features,
                                                        encoder_layers=a.encoder_layers)  # fmt: skip
    t = time.perf_counter()
    compiled = compile_step()
    compile_s = time.perf_counter() - t
    first_s = timed(run, 1, guard)[0]  # the first call of the compiled step (a warm-up, not in step_s)
    times = timed(run, sizes.repeats, guard)
    step_s = float(np.median(times))
    out = {"lm": "Qwen2.5-0.5B shape" if full else "tiny Qwen2", "tasks": b, "examples": m, "length": length,
           "microbatches": a.sft_microbatches,
           "rows": b * m, "layout": list(layout.shape), "prompts": [config.data.num_texts, config.data.max_text_length],
           "generator_params": count_params(trainer.generator_config(config)), "step_s": step_s,
           "step_s_min": float(min(times)), "repeats": len(times), "rows_per_s": b * m / step_s,
           "compile_s": compile_s, "first_step_s": first_s, **step_memory(compiled, jax.devices()[0])}  # fmt: skip
    torch_s = None
    if guard.left() > 0:
        import torch

        run_t = sft_step.torch_lora_run(args, hf)
        run_t()
        torch_s = float(np.median(timed(run_t, sizes.repeats, guard)))
        del run_t
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    precision = "bf16 model" if a.dtype == "bfloat16" else "float32"
    return {
        **out,
        "torch_step_s": torch_s,
        "ratio_vs_torch": None if torch_s is None else step_s / torch_s,
        "torch_source": f"PyTorch + PEFT LoRA r 8 (7 projections), {precision}",
    }


PARTS = {"correctness": part_correctness, "original": part_original, "step": part_step,
         "generate": part_generate, "sft": part_sft}  # fmt: skip
DTYPES = {"correctness": lambda a: "float32",
          "original": lambda a: "bfloat16 autocast" if a.dtype != "float32" else "float32",
          "step": lambda a: f"{a.dtype} (last layer float32)", "generate": lambda a: f"{a.dtype} (last layer float32)",
          "sft": lambda a: a.dtype}  # fmt: skip


def batches(a, sizes: Sizes) -> tuple[int, ...]:
    return tuple(int(b) for b in a.batches.split(",")) if a.batches else sizes.batches


def common(figure: str, dtype: str) -> dict:
    import torch

    dev = jax.devices()[0]
    return {"figure": figure, "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "torch": torch.__version__, "dtype": dtype}  # fmt: skip


def _gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _fmt(v, spec: str) -> str:
    """v formatted by spec, or "-" padded to the spec's width."""
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].rstrip("d%f") or 0))


def table(records: list[dict]) -> str:
    """A short text table of the figures (the JSON lines carry everything)."""
    head = f"{'figure':15s} {'batch':>5s} {'s/step|call':>11s} {'samples/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}  note"
    lines = [head, "-" * len(head)]
    for r in records:
        note = r.get("error") or r.get("skipped") or ""
        if r["figure"] == "correctness" and "error" not in r:
            note = f"{r['precision']}: fwd {r['forward_rel_err']:.1e} update {r['update_rel_err']:.1e} ok {r['ok']}"
        if r["figure"] == "train_step" and "error" not in r:
            speed = r["speedup_vs_original"]
            note = (f"{'-' if speed is None else f'{speed:.2f}x'} the original's samples/s; compile "
                    f"{r['compile_s']:.0f} s; peak {_gb(r['peak_bytes'])}")  # fmt: skip
        if r["figure"] == "original_step" and "error" not in r:
            note = f"{Path(r['source'].split()[0]).name}; peak {_gb(r['peak_bytes'])}"
        if r["figure"] == "sft_step" and "step_s" in r:
            vs = r["ratio_vs_torch"]
            note = (f"{r['lm']}, {r['rows']} rows x {r['length']}: {'-' if vs is None else f'{vs:.2f}x'} the "
                    f"PyTorch LoRA step's time; compile {r['compile_s']:.0f} s")  # fmt: skip
        if r["figure"] == "generation" and "per_call_s" in r:
            note = f"{r['adapters']} adapter(s), {r['per_adapter_s']:.3f} s each; compile {r['compile_s']:.0f} s"
        sec = r.get("step_s", r.get("per_call_s"))
        tf = r.get("model_flop_per_s")
        lines.append(f"{r['figure']:15s} {_fmt(r.get('batch'), '5d')} {_fmt(sec, '11.4f')} "
                     f"{_fmt(r.get('samples_per_s'), '9.2f')} {_fmt(tf and tf / 1e12, '8.1f')} "
                     f"{_fmt(r.get('mfu'), '6.1%')}  {str(note)[:100]}")  # fmt: skip
    dev = jax.devices()[0]
    lines.append(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="shrink every size (CPU, under a minute)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts, comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--out", default=None, help="also write the JSON lines to this file")
    ap.add_argument("--original", default=None, help="the original's workspace/dnd/module/hyperconv.py")
    ap.add_argument("--batches", default=None, help="batch sizes to try, descending (default 16,8,4,2,1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; --small 2)")
    ap.add_argument("--budget", type=float, default=None, help="time guard of the whole run, s (default 420)")
    ap.add_argument("--dtype", default="bfloat16", help="encoder and generator compute dtype of the step parts")
    ap.add_argument("--encoder-layers", type=int, default=None,
                    help="BERT layers (default MiniLM-L6's 6, --small 2; the original code's L12: 12)")  # fmt: skip
    ap.add_argument("--sft-rows", default=",".join(map(str, SFT_ROWS)),
                    help="the sft part's tasks,examples,tokens at full size (default 8,4,256)")  # fmt: skip
    ap.add_argument("--sft-microbatches", type=int, default=1, help="the sft part's sft.microbatches (row groups)")
    a = ap.parse_args(argv)
    try:  # checked before any part runs: a typo must not cost the device minutes of the parts before it
        rows = tuple(int(x) for x in a.sft_rows.split(","))
        if len(rows) != 3 or min(rows) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--sft-rows {a.sft_rows!r}: expected three positive integers, tasks,examples,tokens (e.g. 8,4,256)")
    a.sft_rows = rows
    sizes = SMALL if a.small else FULL
    sizes = dataclasses.replace(sizes, repeats=a.repeats or sizes.repeats, budget_s=a.budget or sizes.budget_s)
    a.encoder_layers = a.encoder_layers or sizes.encoder_layers
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    out = open(a.out, "w") if a.out else None  # closed below
    done, records = {}, []
    chosen = [p for p in PARTS if p in parts]
    shares = np.cumsum([SHARES[p] for p in chosen]) / (sum(SHARES[p] for p in chosen) or 1.0)
    ends = dict(zip(chosen, time.perf_counter() + sizes.budget_s * shares, strict=True))
    try:
        for name in chosen:
            guard = Guard(float(ends[name]))
            head = common(FIGURES[name], DTYPES[name](a))
            t = time.perf_counter()
            try:
                got = PARTS[name](a, sizes, guard, done)
                part_s = time.perf_counter() - t  # the part's whole wall time (builds, compiles, timed calls)
                rows = [{**head, **r, "part_s": part_s} for r in (got if isinstance(got, list) else [got])]
            except Exception as e:  # noqa: BLE001  (one part's failure is a line; the next part runs)
                traceback.print_exc(file=sys.stderr)
                rows = [{**head, "error": f"{type(e).__name__}: {str(e)[:1500]}"}]
            done[head["figure"]] = rows[-1]
            for r in rows:
                line = json.dumps(r, default=str)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
            records += rows
    finally:
        if out:
            out.close()
    print(table(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
