"""The SFT-mode training step (dnd_jax/objectives/sft.py), raced against a PyTorch + PEFT LoRA SFT step on the same
rows in the same run.

  PYTHONPATH=. python benchmarks/sft_step.py [--lm smollm2|qwen2.5-0.5b] [--tasks 8] [--examples 4] [--length 256]
                                             [--repeats 3] [--dtype float32|bfloat16] [--weights random|real]
                                             [--response 0.25] [--head both|all|labels] [--microbatches 1]

Ours: the jitted `sft` train step as the trainer runs it: the frozen MiniLM-L6-shaped extractor on B x N prompts,
the many-task generator (configs/many_task_smollm2.py's shapes, its last layer the LM's token layout), detokenize,
each row's LoRA in the frozen causal LM on B x M examples of S tokens, the response NLL, backward into the
generator, clipped AdamW. Baseline: one LoRA (rank 8, the 7 projections) on the same LM in PyTorch + PEFT, forward
and backward of the same B x M rows and an AdamW step on the LoRA: the LM's share of a Text-to-LoRA SFT step, and
what an mt_lora step costs there. Labels: the last quarter of each row (the response), the rest -100.

`--lm smollm2` is SmolLM2-135M (30 layers, 576 wide, tied head, vocab 49152); `--lm qwen2.5-0.5b` is Qwen2.5-0.5B's
shape (24 layers, 896 wide, vocab 151936) for a GPU run. `--weights random` (the default; the GPU machine has no
weights) initialises both models from their configs; the speed does not depend on the weights. Prompts and
examples are random token ids. Prints one JSON line per measurement and the CPU / device it ran on.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks.cpuinfo import describe
from benchmarks.timing import time_it

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, max_position_embeddings=8192)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(lm: str):
    if lm == "smollm2":
        return transformers.LlamaConfig(**SMOLLM2)
    from converters.synthetic import qwen2_config

    return qwen2_config("0.5B")


def make_config(layout, b: int, m: int, dtype: str, features=None):
    """configs/many_task_smollm2.py's generator and prompts, its output the LM's token layout (`features`: the
    whole generator's shapes instead, e.g. a small one; its first layer sets the prompts per row and their
    length)."""
    from configs import many_task_smollm2

    c = many_task_smollm2.get_config()
    c.model.features = (*c.model.features[:2], (64, 10, layout.shape[2]), layout.shape)
    if features is not None:
        c.model.features = tuple(features)
        c.data.num_texts, c.data.max_text_length = features[0][:2]
    c.train.batch_size, c.train.objective, c.sft.examples = b, "sft", m
    c.sft.compute_dtype, c.model.compute_dtype, c.encoder.dtype = dtype, dtype, dtype
    return c


def random_rows(rng, shape, vocab: int, response: float = 0.25):
    """ids, mask, labels [..., S]: full-length rows, the last `response` fraction labelled."""
    ids = rng.integers(10, vocab, size=shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    labels = np.where(np.arange(shape[-1]) >= shape[-1] - max(round(shape[-1] * response), 1), ids, -100)
    labels = labels.astype(np.int32)
    return ids, mask, labels


def jax_sft_step(args, hf, layout, head_at_labels: bool = False) -> float:
    """Median seconds of the jitted SFT train step (after a first call that compiles)."""
    run = build_sft_step(args, hf, layout, head_at_labels)[0]
    return time_it(run, args.repeats, np.median)


def build_sft_step(args, hf, layout, head_at_labels: bool = False, features=None, encoder_layers: int = 6):
    """(run, compile_step, config): `run()` calls the jitted SFT train step once and waits for it (the first call
    compiles); `compile_step()` compiles it ahead (timed apart) and returns the compiled step, which `run` then calls.
    `features`: the generator's shapes (`make_config`)."""
    from dnd_jax import lora_tokens, trainer
    from dnd_jax.models.causal_lm import CausalLM, spec_scales
    from dnd_jax.models.decoder_lm import DecoderConfig
    from dnd_jax.models.encoder import BertConfig, BertEncoder
    from dnd_jax.models.hyperconv import HyperConvDecoder, generator_config
    from dnd_jax.objectives import sft

    c = make_config(layout, args.tasks, args.examples, args.dtype, features)
    c.sft.microbatches = args.microbatches
    dt = jnp.dtype(args.dtype)
    hfd = hf.to_dict()
    cfg = DecoderConfig.from_hf(hfd, "config", num_layers=hfd["num_hidden_layers"])
    lm = CausalLM(cfg, bool(hfd.get("tie_word_embeddings")), dt, nnx.Rngs(0))
    encoder = BertEncoder(BertConfig(num_layers=encoder_layers), dtype=dt, rngs=nnx.Rngs(1))
    if args.weights == "real":
        from dnd_jax.extractors import load_extractor
        from dnd_jax.models.causal_lm import load_causal_lm

        lm, _, _ = load_causal_lm("smollm2-135m-instruct", dt)
        encoder, _ = load_extractor(c.encoder)
    gen = generator_config(c)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: HyperConvDecoder(gen, nnx.Rngs(0))), nnx.Param)
    enc_graphdef, enc_state = nnx.split(encoder)
    lm_graphdef, lm_state = nnx.split(lm)
    tx, schedule = trainer.make_optimizer(c)
    rng = np.random.default_rng(0)
    control = (0.1 * rng.standard_normal(layout.shape)).astype(np.float32)
    step, _ = sft.make_steps(c, graphdef, enc_graphdef, lm_graphdef, tx, schedule, layout, spec_scales(layout.spec))
    aux = {"enc": enc_state, "lm": lm_state, "control": jnp.asarray(control),
           "centre": jax.tree.map(jnp.asarray, lora_tokens.detokenize(control, layout)),
           "weight": jnp.ones(layout.num_tokens, jnp.float32)}  # fmt: skip
    b, n, length = args.tasks, c.data.num_texts, c.data.max_text_length
    p_ids, p_mask, _ = random_rows(rng, (b, n, length), 30522)
    s_ids, s_mask, s_labels = random_rows(rng, (b, args.examples, args.length), hfd["vocab_size"], args.response)
    host = dict(input_ids=p_ids, attention_mask=p_mask, sft_ids=s_ids, sft_mask=s_mask, sft_labels=s_labels,
                tokens=np.zeros((b, *layout.shape), np.float32))  # fmt: skip
    if head_at_labels:  # what the trainer's batches carry when sft.bucket > 0
        from dnd_jax.models.causal_lm import label_positions

        host["sft_pos"] = label_positions(s_labels)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    jitted = jax.jit(step, donate_argnums=(0,))
    box = {"state": jax.jit(trainer.make_init_state(c))(), "step": jitted}

    def run():
        box["state"], metrics = box["step"](box["state"], aux, batch)
        metrics["loss"].block_until_ready()

    def compile_step():
        box["step"] = jitted.lower(box["state"], aux, batch).compile()
        return box["step"]

    return run, compile_step, c


def torch_lora_step(args, hf) -> float:
    """Median seconds of the PyTorch + PEFT LoRA step (after one untimed call)."""
    return time_it(torch_lora_run(args, hf), args.repeats, np.median)


def torch_lora_run(args, hf):
    """`run()`: one PyTorch + PEFT LoRA SFT step on the same rows' shape (forward, backward, AdamW), waited for."""
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf).to(device)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rng = np.random.default_rng(0)
    ids, mask, labels = random_rows(rng, (args.tasks * args.examples, args.length), hf.vocab_size)
    ids, mask, labels = (torch.tensor(x, dtype=torch.long, device=device) for x in (ids, mask, labels))

    def run():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    from converters.synthetic import spec_from_config
    from dnd_jax import lora_tokens

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm", default="smollm2", choices=("smollm2", "qwen2.5-0.5b"))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--weights", default="random", choices=("random", "real"))
    ap.add_argument("--response", type=float, default=0.25, help="labelled fraction of each example (its end)")
    ap.add_argument(
        "--head",
        default="both",
        choices=("both", "all", "labels"),
        help="the LM head at all positions, at the label positions only (the trainer's batches), or both",
    )
    ap.add_argument("--microbatches", type=int, default=1, help="sft.microbatches: row groups run one after another")
    ap.add_argument("--skip_torch", action="store_true")
    args = ap.parse_args()
    hf = hf_config(args.lm)
    chunk = 64 if args.lm == "smollm2" else 128
    layout = lora_tokens.make_layout(spec_from_config(hf, r=8, alpha=16, dtype="float32"), chunk)
    where = {"device": str(jax.devices()[0].device_kind), "cpu": describe(), "lm": args.lm, "rows": args.tasks *
             args.examples, "length": args.length, "dtype": args.dtype, "tokens": list(layout.shape),
             "microbatches": args.microbatches}  # fmt: skip
    ours = None
    if args.head in ("both", "all"):
        ours = jax_sft_step(args, hf, layout)
        print(json.dumps({**where, "what": "dnd_jax sft step (encoder + generator + LM, per-row LoRA)", "s": ours}))
    if args.head in ("both", "labels"):
        at_labels = jax_sft_step(args, hf, layout, head_at_labels=True)
        print(json.dumps({**where, "what": "the same, the LM head at the label positions only (sft.bucket > 0)",
                          "response": args.response, "s": at_labels,
                          **({"ratio": at_labels / ours} if ours else {})}))  # fmt: skip
        ours = ours or at_labels
    if not args.skip_torch:
        base = torch_lora_step(args, hf)
        print(json.dumps({**where, "what": "torch+peft LoRA SFT step (LM only)", "s": base, "ratio": ours / base}))


if __name__ == "__main__":
    main()
