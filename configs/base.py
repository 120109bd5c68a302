"""Shared defaults of the DnD generator experiments (the paper's common-sense recipe, spec §4-§5).

Each target config (configs/arc_c.py, ...) calls `get_config(target, train_datasets, steps, arg)`.
The argument ":smoke" swaps in the CPU-sized setting of this repository: SmolLM2-135M-Instruct
LoRA checkpoints collected with configs/collect/commonsense_smollm2.py, all-MiniLM-L6-v2, a tiny
generator, a few steps. Without it the config is the paper's: Qwen2.5-0.5B LoRA tokens (4296, 10, 130),
all-MiniLM-L12-v2, the 1.1 B generator, batch 64; its data paths must then be pointed at such
checkpoints (they cannot be had offline here).

  python -m dnd_jax.train --config configs/arc_c.py:smoke --workdir runs/train/arc_c_smoke
"""

import ml_collections

# The paper's common-sense generator (spec §4.4): 1,113,203,220 parameters.
PAPER_FEATURES = (
    (128, 384, 384), (128, 200, 300), (128, 100, 256), (256, 50, 200), (512, 50, 200),
    (1024, 25, 200), (1024, 10, 200), (2048, 10, 200), (4296, 10, 130),
)  # fmt: skip
# The common-sense datasets of the paper; SIQA replaces HellaSwag in ../shared/data/commonsense.
PAPER_DATASETS = ("ARC-c", "ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "HellaSwag")
LOCAL_DATASETS = ("ARC-c", "ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "SIQA")
# SmolLM2-135M, r 8, chunk 64 -> 4770 tokens of (10, 66).
SMOLLM2_TOKENS = (4770, 10, 66)


def get_config(target: str, train_datasets, steps: int, arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of initialisation, batch sampling, dropout and noise (the original: 999).
    c.seed = 999

    c.data = ml_collections.ConfigDict()
    # Held-out (target) dataset: its checkpoints and prompts are never trained on, only monitored.
    c.data.heldout_dataset = target
    # Training datasets: checkpoints of each are paired with the same dataset's train prompts.
    c.data.train_datasets = tuple(train_datasets)
    # Collected PEFT checkpoints: <collection_dir>/<dataset>/step-*/ (python -m dnd_jax.collect).
    c.data.collection_dir = "data/common_sense_reasoning"
    # Token store (made on first use by dnd_jax.data.prepare; reused when up to date).
    c.data.token_dir = "runs/tokens/qwen2.5-0.5b"
    # Prompt datasets (dataset_info.json + <dataset>_train.json), read in place.
    c.data.prompts_dir = "../shared/data/commonsense"
    # Checkpoints per dataset, first in step order (the original: listdir()[:50]).
    c.data.real_length = 50
    # Token chunk width C (spec §2.2): 128 for Qwen2.5-0.5B.
    c.data.chunk = 128
    # Zero-pad feature sizes that chunk does not divide.
    c.data.pad = False
    # Accept datasets collected from different LoRA inits (their A tokens then disagree; refused by default).
    c.data.allow_mixed_init = False
    # Optional .npy token tensor [T, R, K]: the generator learns tokens - offset (residual targets) and
    # generation adds it back; "" = the original (absolute tokens).
    c.data.target_offset = ""
    # Tokens in the loss: "all" (the original) or "b" (B^T tokens only; A comes from target_offset).
    c.data.loss_tokens = "all"
    # Condition form (spec §7.9): "prompts" (the paper's: unlabeled prompts), "answers" (responses only),
    # "prompts_answers" (prompt + "answer: " + response) or "mix" (each text carries its answer with p 0.2).
    c.data.condition = "prompts"
    # Prompt pool per dataset: the first N texts of its train split (0: all; the number-of-conditions ablation).
    c.data.max_prompts = 0
    # Prompts per sample (N).
    c.data.num_texts = 128
    # Prompt length in encoder tokens (L), padded and truncated.
    c.data.max_text_length = 384

    c.encoder = ml_collections.ConfigDict()
    # Prompt extractor (dnd_jax/extractors.py): "sentence_bert" (the paper's), "decoder_lm" (hidden states of a
    # Llama/Qwen2 LM, the Qwen2.5-7B ablation) or "static" (context-free word vectors, the GloVe ablation);
    # configs/ablations/extractors.py sets the others up.
    c.encoder.type = "sentence_bert"
    # Its checkpoint: a built-in name (dnd_jax/assets.py) or a local directory.
    c.encoder.path = "models/all-MiniLM-L12-v2"
    # decoder_lm only: decoder layers run (0: round(15/28 of the model's layers), the paper's 15 of Qwen2.5-7B's 28).
    c.encoder.num_layers = 0
    # Encoder compute dtype (the original runs it under bf16 autocast).
    c.encoder.dtype = "bfloat16"
    # Dropout in the frozen encoder during training (the original's train-mode behaviour).
    c.encoder.train_dropout = True
    # Zero the hidden states of padded prompt positions (the original does not).
    c.encoder.mask_padding = False
    # Encode each prompt once and reuse its output (host memory: prompts drawn x L x D floats; needs
    # train_dropout=False). The original re-encodes every step with dropout on, so this is off by default.
    c.encoder.cache = False

    c.model = ml_collections.ConfigDict()
    # Activation shapes (N, H, W) from the condition (num_texts, max_text_length, hidden) to the tokens.
    c.model.features = PAPER_FEATURES
    # k of every k x k conv.
    c.model.kernel_size = 9
    # Conv compute dtype; parameters stay float32.
    c.model.compute_dtype = "bfloat16"
    # Run the last layer (whose output holds the scale code) in float32.
    c.model.fp32_last_layer = True
    # Conv algorithm: "auto" = on CPU an FFT along one spatial axis where it is cheaper (float32 convs,
    # k > 1, >= 24 channels) and one bf16 GEMM per conv for bfloat16 layers where the CPU has AMX or
    # AVX-512-BF16; lax.conv on GPU/TPU; or "direct" / "fft" / "gemm" (dnd_jax/models/hyperconv.py).
    c.model.conv_impl = "auto"
    # Start the last conv at zero (the generator's first output is 0; with data.target_offset, the offset).
    c.model.zero_init_output = False

    c.train = ml_collections.ConfigDict()
    # Global batch (the code: 64 = 4 GPUs x 16).
    c.train.batch_size = 64
    # Optimizer steps (spec §5.1, per target).
    c.train.steps = steps
    # Peak learning rate, cosine-decayed to 0 over the run.
    c.train.learning_rate = 3e-5
    # AdamW decoupled weight decay, on all parameters.
    c.train.weight_decay = 0.1
    # AdamW moments and epsilon.
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Global-norm gradient clip.
    c.train.max_grad_norm = 1.0
    # Gaussian noise added to the conditions and (x 0.1) to the targets (noise_enhance).
    c.train.noise_condition = 1e-4
    c.train.noise_target = 1e-5
    # Steps between metric logs (the only host syncs).
    c.train.log_every = 10
    # Steps between held-out evaluations (0: only at the start and the end).
    c.train.eval_every = 100
    # Held-out evaluation batches (fixed for the run).
    c.train.eval_batches = 2
    # Steps between checkpoints (and one at the end); checkpoints kept.
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    # Progress bar on stderr.
    c.train.progress = True
    # What the generator is fitted to (dnd_jax/objectives/): "recon" (the paper's: checkpoint tokens by weighted
    # MSE), "sft" (the tasks' own loss through the frozen LM, sft.*), "sft+recon" (their weighted sum), or
    # "mt_lora" (no generator: one LoRA trained by the sft loss on every training task, the prompt-blind baseline).
    c.train.objective = "recon"

    c.sft = ml_collections.ConfigDict()
    # The frozen LM of the SFT objectives: a built-in name or a directory; "" = the checkpoints' base model.
    c.sft.model = ""
    # Labelled examples per task per step (M); a step draws train.batch_size distinct training tasks.
    c.sft.examples = 4
    # Chat-format cut-off of an example in LM tokens (the collection's cutoff_len; the prompt is cut first).
    c.sft.cutoff_len = 256
    # Examples of a batch are cut to its longest, rounded up to a multiple of this (fewer padded tokens through
    # the LM; one compiled shape per length); 0 = every batch padded to the longest example of all tasks.
    c.sft.bucket = 0
    # LM compute dtype (its weights stay float32; the loss is float32).
    c.sft.compute_dtype = "float32"
    # Row groups a step runs one after another, gradients summed (the same loss; the LM's activation memory of one
    # group): for long examples on a small machine. It must divide train.batch_size; sft and mt_lora only.
    c.sft.microbatches = 1
    # L2 penalty on the adapter's distance from the control: sum over modules of mean(dA^2) + mean(dB^2).
    c.sft.l2 = 1e-3
    # Weight of the reconstruction term in "sft+recon".
    c.sft.recon_weight = 1.0

    c.mesh = ml_collections.ConfigDict()
    # Device mesh: batch over both axes, parameters and optimizer state over fsdp (ZeRO-3 style); -1 = the rest.
    c.mesh.shape = (1, -1)
    c.mesh.axes = ("data", "fsdp")
    # (logical axis, mesh axis) rules in priority order (dnd_jax/sharding.py).
    c.mesh.rules = (("tokens_out", "fsdp"), ("width_out", "fsdp"), ("height_out", "fsdp"), ("tokens_in", "fsdp"),
                    ("width_in", "fsdp"), ("height_in", "fsdp"))  # fmt: skip

    c.generate = ml_collections.ConfigDict()
    # Adapters generated per run (the original: 10), each from its own prompt batch.
    c.generate.num_adapters = 10
    # Prompt split of the held-out dataset used as conditions at generation (unlabeled test prompts).
    c.generate.split = "test"
    # Floor on decoded per-chunk sigmas of generated tokens (the decoding can give sigma < 0, flipping a
    # chunk's sign); None = the paper's decoding, unfloored.
    c.generate.sigma_floor = ml_collections.config_dict.placeholder(float)

    if arg == "smoke":
        smoke(c, target)
    elif arg not in (None, ""):
        raise ValueError(f"unknown config argument {arg!r} (expected nothing or 'smoke')")
    return c


def smoke(c: ml_collections.ConfigDict, target: str) -> None:
    """CPU-sized: SmolLM2 checkpoints, MiniLM-L6, a ~3 M parameter generator, seconds per run."""
    c.data.train_datasets = tuple(d.replace("HellaSwag", "SIQA") for d in c.data.train_datasets)
    c.data.heldout_dataset = target.replace("HellaSwag", "SIQA")
    c.data.collection_dir = "runs/collect"
    c.data.token_dir = "runs/tokens/smollm2"
    c.data.real_length = 20
    c.data.chunk = 64
    c.data.num_texts = 8
    c.data.max_text_length = 32
    c.encoder.path = "all-minilm-l6-v2"
    c.encoder.dtype = "float32"
    c.model.features = ((8, 32, 384), (16, 16, 96), (64, 10, 66), SMOLLM2_TOKENS)
    c.model.kernel_size = 3
    c.model.compute_dtype = "float32"
    c.train.batch_size = 8
    c.train.steps = 20
    c.train.learning_rate = 1e-3
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 1
    c.train.checkpoint_every = 10
    c.generate.num_adapters = 2


# What every SmolLM2-scale experiment in this repository changes from the paper (listed in reports).
SMOLLM2_DEVIATIONS = (
    "Base LM SmolLM2-135M-Instruct (4-bit GGUF round trip, fp32) instead of Qwen2.5-0.5B-Instruct: token "
    "tensor (4770, 10, 66) with chunk 64 instead of (4296, 10, 130).",
    "Prompt encoder all-MiniLM-L6-v2 (the paper's appendix) instead of L12 (the code), in float32.",
    "LoRA collection shrunk to CPU scale (see the settings); the paper trains 75 phase-1 steps of batch 32 and "
    "keeps 50 phase-2 checkpoints per dataset.",
    "Generator shrunk to CPU scale (see the settings) instead of the 1.1 B parameter, 8-layer, k = 9 decoder; "
    "fewer prompts per sample and shorter prompts than 128 x 384; learning rate raised to match the short run.",
    "Plain float32 AdamW instead of bitsandbytes AdamW8bit; optax cosine decay over T steps (the original: "
    "T + 1 updates with the schedule stepped on rank 0 only).",
    "Evaluation by greedy decoding with the training chat template (the original samples at T 0.95 with "
    "LLaMA-Factory's default template) and by log-likelihood; first `eval.limit` test items only.",
)


def add_pipeline(c: ml_collections.ConfigDict, collect: ml_collections.ConfigDict, config_name: str) -> None:
    """Fields of `python -m dnd_jax.pipeline`: collection recipe, evaluation, data source."""
    # LoRA collection recipe (configs/collect/*.py); dataset and data_dir are set per dataset.
    c.collect = collect
    c.eval = ml_collections.ConfigDict()
    # Split of the held-out dataset that is scored.
    c.eval.split = "test"
    # First N items only (None: all).
    c.eval.limit = 200
    # "ll": lm-eval style log-likelihood; "gen": the original DnD generation protocol.
    c.eval.protocols = ("ll", "gen")
    # Scoring batch size.
    c.eval.batch_size = 16
    c.pipeline = ml_collections.ConfigDict()
    # The config file, for the report.
    c.pipeline.config_name = config_name
    # "dir": data.prompts_dir as it is; "bigbench": build it from BIG-bench ($DND_JAX_BIGBENCH).
    c.pipeline.source = "dir"
    # BIG-bench tasks (source "bigbench"), test items per task, and a cap on training items.
    c.pipeline.bigbench_tasks = ()
    c.pipeline.test_size = 300
    c.pipeline.max_train = ml_collections.FieldReference(None, field_type=int)
    # Deviations from the paper, copied into the report.
    c.pipeline.deviations = SMOLLM2_DEVIATIONS
