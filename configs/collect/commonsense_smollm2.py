"""LoRA checkpoint collection on the common-sense suite with SmolLM2-135M-Instruct (CPU-sized).

  python -m dnd_jax.collect --config configs/collect/commonsense_smollm2.py:ARC-e --out runs/collect
  python -m dnd_jax.collect --config configs/collect/commonsense_smollm2.py:ARC-e,smoke --out runs/smoke

The argument is the dataset (a `<name>_train` entry of the data directory's dataset_info.json),
optionally followed by ",smoke" for a few-step run. The paper's recipe (spec §8) is rank 8,
alpha 16, all 7 projections, phase 1 at lr 1e-4 with batch 32, then phase 2 saving every step
(50 checkpoints, lr 1e-5 in the paper's Table 9); this config keeps the LoRA and the learning
rates and shrinks the batch and step counts so that a dataset takes minutes on 2 CPU cores.
"""

import ml_collections


def get_config(arg: str = "ARC-e") -> ml_collections.ConfigDict:
    dataset, _, mode = arg.partition(",")
    c = ml_collections.ConfigDict()
    # Base causal LM: a built-in name (dnd_jax/assets.py) or a local from_pretrained directory.
    c.model = "smollm2-135m-instruct"
    # Directory with dataset_info.json and the dataset files (never copied into the repo).
    c.data_dir = "../shared/data/commonsense"
    # Dataset to train on; its "<dataset>_train" split is used.
    c.dataset = dataset
    # Use the first N training records, as LLaMA-Factory's max_samples.
    c.max_samples = 5000
    # Maximum tokens per example (prompt + response); longer examples are cut from the right.
    c.cutoff_len = 256
    # Seed of the data order (and LoRA init).
    c.seed = 0
    # Compute dtype: "float32" (CPU) or "bfloat16" (GPU).
    c.dtype = "float32"
    # Device: "auto" (cuda if available), "cpu" or "cuda".
    c.device = "auto"

    c.lora = ml_collections.ConfigDict()
    # LoRA rank r.
    c.lora.r = 8
    # LoRA alpha (scale = alpha / r).
    c.lora.alpha = 16
    # LoRA dropout.
    c.lora.dropout = 0.0
    # Adapted modules: all 7 linear projections of a decoder layer.
    c.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    c.phase1 = ml_collections.ConfigDict()
    # Phase 1 optimizer steps (the paper: 75 steps of batch 32).
    c.phase1.steps = 30
    # Examples per micro-batch.
    c.phase1.batch_size = 4
    # Micro-batches per optimizer step.
    c.phase1.grad_accum = 2
    # Peak learning rate (AdamW, cosine with warmup_ratio warm-up).
    c.phase1.lr = 1e-4
    # Fraction of phase-1 steps spent warming up.
    c.phase1.warmup_ratio = 0.01
    # AdamW weight decay.
    c.phase1.weight_decay = 0.0

    c.phase2 = ml_collections.ConfigDict()
    # Phase 2 optimizer steps; a PEFT adapter is saved after every one.
    c.phase2.steps = 20
    # Constant learning rate of phase 2 (the paper's Table 9: 1e-5 for common sense).
    c.phase2.lr = 1e-5
    # Examples per micro-batch.
    c.phase2.batch_size = 4
    # Micro-batches per optimizer step.
    c.phase2.grad_accum = 2

    if mode == "smoke":
        c.max_samples = 64
        c.cutoff_len = 160
        c.phase1.steps = 2
        c.phase1.batch_size = 2
        c.phase1.grad_accum = 1
        c.phase2.steps = 3
        c.phase2.batch_size = 2
        c.phase2.grad_accum = 1
    elif mode:
        raise ValueError(f"unknown config mode {mode!r} (expected 'smoke')")
    return c
