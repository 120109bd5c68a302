"""Many-task, task-level cross-validated DnD at the scale of a 2-core CPU (SmolLM2-135M-Instruct).

  python -m dnd_jax.experiment --config configs/many_task_smollm2.py --workdir runs/many_task_smollm2
  python -m dnd_jax.experiment --config configs/many_task_smollm2.py:smoke --workdir /tmp/mt_smoke

41 English multiple-choice BIG-bench tasks (one variant per task family, no images-as-text, no
non-English tasks; from a local BIG-bench, $DND_JAX_BIGBENCH, or the cached sdist) plus the seven common-sense sets of
`experiment.commonsense_dir` when that directory exists. One LoRA recipe collects every task (one
shared LoRA init). K folds over tasks: each fold's generator is trained on the other folds' tasks and
writes adapters for its held-out tasks from their unlabeled test prompts. Every held-out task is
scored with the same items and protocol for: the base model, its own LoRA (upper reference), the
prompt-blind control (mean training token tensor, detokenized), retrieval (the LoRA of the training
task whose prompts are nearest in the encoder's space), a seeded sample of training LoRAs, and the
generated adapters. The primary metric is fixed here, before any run: the mean NLL per gold-response
token in the chat format the LoRAs were trained on (`experiment.primary`).

`:smoke` is the same experiment on 4 common-sense sets, 2 folds, a few steps and items (the test suite
runs it on tiny tasks of its own).
"""

import ml_collections

from configs import base
from configs.collect import commonsense_smollm2 as collect_cfg

# (task, family): one variant per BIG-bench family; families group tasks for the far-transfer split.
BIGBENCH_TASKS = (
    ("abstract_narrative_understanding/4_distractors", "narrative"),
    ("anachronisms", "knowledge"),
    ("bbq_lite_json/gender_identity_ambig", "social"),
    ("causal_judgment", "causal"),
    ("contextual_parametric_knowledge_conflicts", "reading"),
    ("cs_algorithms/valid_parentheses", "symbolic"),
    ("disambiguation_qa", "language"),
    ("elementary_math_qa/question_only", "math"),
    ("epistemic_reasoning", "logic"),
    ("fact_checker/fever", "knowledge"),
    ("fantasy_reasoning", "causal"),
    ("formal_fallacies_syllogisms_negation", "logic"),
    ("goal_step_wikihow/goal_inference", "procedural"),
    ("hindu_knowledge", "knowledge"),
    ("hyperbaton", "language"),
    ("implicatures", "language"),
    ("logical_deduction/three_objects", "logic"),
    ("logical_fallacy_detection", "logic"),
    ("metaphor_boolean", "language"),
    ("misconceptions", "knowledge"),
    ("moral_permissibility", "social"),
    ("movie_dialog_same_or_different", "reading"),
    ("movie_recommendation", "knowledge"),
    ("multiemo/all_sentence_en", "emotion"),
    ("navigate", "math"),
    ("physics", "science"),
    ("play_dialog_same_or_different", "reading"),
    ("presuppositions_as_nli", "language"),
    ("reasoning_about_colored_objects", "symbolic"),
    ("ruin_names", "language"),
    ("snarks", "emotion"),
    ("social_iqa", "social"),
    ("social_support", "emotion"),
    ("sports_understanding", "knowledge"),
    ("strategyqa", "knowledge"),
    ("temporal_sequences", "symbolic"),
    ("timedial", "causal"),
    ("tracking_shuffled_objects/three_objects", "symbolic"),
    ("unit_conversion/unit_identification", "science"),
    ("vitaminc_fact_verification", "reading"),
    ("winowhy", "social"),
)
COMMONSENSE_TASKS = (
    ("ARC-c", "science"), ("ARC-e", "science"), ("OBQA", "science"), ("BoolQ", "knowledge"),
    ("WinoGrande", "social"), ("PIQA", "procedural"), ("SIQA", "social"),
)  # fmt: skip
SMOKE_TASKS = (("ARC-c", "science"), ("ARC-e", "science"), ("BoolQ", "knowledge"), ("PIQA", "procedural"))


def get_config(arg=None):
    c = base.get_config("ARC-c", ("ARC-e",), steps=150, arg="smoke")
    base.add_pipeline(c, collect_cfg.get_config("ARC-c"), "configs/many_task_smollm2.py")
    c.data.prompts_dir = "{workdir}/data"
    c.data.collection_dir = "{workdir}/collect"
    c.data.token_dir = "{workdir}/tokens"
    # Checkpoints per task used for training (all phase-2 checkpoints).
    c.data.real_length = 5
    # Generator: 8 prompts x 48 tokens per sample, k 3. The frozen encoder inside the step is most of the
    # step's time on CPU (8 x 8 x 48 tokens through MiniLM per step, 1.5 s of the step on 2 cores).
    c.data.num_texts = 8
    c.data.max_text_length = 48
    c.model.features = ((8, 48, 384), (16, 16, 96), (64, 10, 66), base.SMOLLM2_TOKENS)
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 1
    c.train.checkpoint_every = 100
    c.train.progress = False

    # One LoRA recipe for every task: 20 adapting steps, then 5 checkpoints (one per step).
    c.collect.max_samples = 1000
    c.collect.cutoff_len = 256
    c.collect.phase1.steps = 20
    c.collect.phase1.lr = 1e-3
    c.collect.phase1.batch_size = 4
    c.collect.phase1.grad_accum = 1
    c.collect.phase2.steps = 5
    c.collect.phase2.lr = 1e-4
    c.collect.phase2.batch_size = 4
    c.collect.phase2.grad_accum = 1

    c.experiment = ml_collections.ConfigDict()
    # BIG-bench tasks (from the PyPI sdist) and their families.
    c.experiment.bigbench_tasks = tuple(t for t, _ in BIGBENCH_TASKS)
    # Common-sense sets read in place from this directory when it exists (skipped otherwise).
    c.experiment.commonsense_dir = "../shared/data/commonsense"
    c.experiment.commonsense_tasks = tuple(t for t, _ in COMMONSENSE_TASKS)
    # Task -> family, for the split that keeps a family in one fold (far transfer).
    c.experiment.families = tuple(f"{t}={f}" for t, f in (*BIGBENCH_TASKS, *COMMONSENSE_TASKS))
    # Test items per BIG-bench task (at most a third of the task), training items cap, options cap.
    c.experiment.test_size = 64
    c.experiment.max_train = 1000
    c.experiment.max_choices = 5
    # Keep only BIG-bench examples that fit collect.cutoff_len whole (no prompt cut; configs/mixed_task_smollm2.py).
    c.experiment.whole_examples = False
    # K folds over tasks; "random" (seeded) or "family" (a family never straddles folds).
    c.experiment.folds = 5
    c.experiment.split = "random"
    c.experiment.fold_seed = 0
    # Near-copy tasks kept in one fold whatever the split (comma-separated groups). Tasks that share test items
    # with another task's train split are found and linked by the leak check (dnd_jax/experiments/leaks.py).
    c.experiment.linked = ("ARC-c,ARC-e", "social_iqa,SIQA")
    # Generator seeds: every fold's generator is trained once per seed; the CIs resample them (per fold).
    c.experiment.seeds = (999, 1000)
    # Primary metric, fixed before any run: mean NLL per gold-response token (chat format).
    c.experiment.primary = "nll"
    # Test items scored per held-out task (first N of the test split), for every adapter.
    c.experiment.limit = 32
    # Secondary protocols ("ll": acc / acc_norm as lm-eval; "gen": the DnD protocol) and their items.
    c.experiment.secondary = ("ll", "gen")
    c.experiment.secondary_limit = 12
    # Generated adapters per held-out task, each from its own batch of test prompts (their mean is scored).
    c.experiment.num_adapters = 1
    # Training LoRAs sampled per held-out task for the "training LoRAs" row (the paper's).
    c.experiment.training_sample = 3
    # Bootstrap resamples over tasks for the 95 % CIs.
    c.experiment.bootstrap = 10000
    # Name of this generator variant (its outputs go to WORKDIR/cv-*/<variant>/; the report compares all).
    c.experiment.variant = "dnd"
    # What is predicted: "full" (all tokens) or "b_only" (loss on B^T tokens only; A = the fold's mean).
    c.experiment.predict = "full"
    # Targets: "tokens" (the original) or "residual" (tokens minus the fold's mean; b_only implies it).
    c.experiment.target = "tokens"
    # Reuse the trained generators of this variant instead of training (e.g. b_only generation from the
    # "residual" generators: A tokens then come from the fold mean at generation time); "" = train.
    c.experiment.train_variant = ""
    # Folds run (empty: all of them); the other folds' tasks still train the run folds' generators.
    c.experiment.run_folds = ()
    # Dataset arrangements: train on a seeded subset of this many of a fold's training tasks (0: all of them).
    c.experiment.train_tasks = 0
    # Few-shot LoRA baseline: N > 0 replaces the generator by a LoRA collected (same recipe) on the first N
    # labelled examples of each held-out task's train split (configs/ablations/fewshot.py); 0 = the generator.
    c.experiment.shots = 0
    # A baseline arm instead of a generator: "soft_retrieval" (the softmax(cos / tau)-weighted mean of the training
    # tasks' tokens, tau by leave-one-task-out inside the fold's training tasks from soft_taus); "" = the generator.
    c.experiment.baseline = ""
    # Prompt swap: each held-out task's adapters also made from another held-out task's prompts (a seeded
    # derangement within the fold) and scored on its own items; swapped - own is whether the generator uses them.
    c.experiment.prompt_swap = False
    # The report's first lines answer the decisive question (dnd_jax/experiments/decisive.py): every generator vs the
    # best prompt-blind baseline per task (the control or the blind_variant) and the soft_variant, with its swap.
    c.experiment.decisive = False
    c.experiment.blind_variant = "mt_lora"
    c.experiment.soft_variant = "soft_retrieval"
    c.experiment.soft_taus = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 10.0)
    c.pipeline.deviations = (
        *base.SMOLLM2_DEVIATIONS,
        "Many-task cross-validation instead of the paper's leave-one-out on 7 sets: BIG-bench tasks "
        "(seeded train/test splits made here) plus the common-sense suite (SIQA for HellaSwag).",
    )
    if arg == "smoke":
        c.experiment.bigbench_tasks = ()
        c.experiment.commonsense_tasks = tuple(t for t, _ in SMOKE_TASKS)
        c.experiment.families = tuple(f"{t}={f}" for t, f in SMOKE_TASKS)
        c.experiment.folds = 2
        c.experiment.limit = 4
        c.experiment.secondary_limit = 2
        c.experiment.training_sample = 2
        c.experiment.bootstrap = 200
        c.collect.max_samples = 16
        c.collect.cutoff_len = 96
        c.collect.phase1.steps = 1
        c.collect.phase2.steps = 2
        c.collect.phase1.batch_size = 2
        c.collect.phase2.batch_size = 2
        c.data.real_length = 2
        c.data.num_texts = 4
        c.data.max_text_length = 16
        c.model.features = ((4, 16, 384), (16, 10, 66), base.SMOLLM2_TOKENS)
        c.train.steps = 2
        c.train.batch_size = 2
        c.train.eval_every = 0
        c.train.checkpoint_every = 2
    elif arg == "sft":
        # SFT mode's settings on these folds, one source for scripts/many_task_sft.sh and scripts/sft_lr_probe.py
        # (the objective and learning rate come per variant): residual targets from the control, 60 steps of 8 tasks
        # x 2 labelled examples cut to a multiple of 64 tokens, one seed (the CPU budget: ~17 s a step on 2 cores).
        c.experiment.target = "residual"
        c.experiment.seeds = (999,)
        c.train.steps = 60
        c.sft.examples = 2
        c.sft.bucket = 64
        c.train.eval_every = 10
        c.train.log_every = 5
        # A checkpoint every 10 steps (~4-8 min of CPU): a stopped fold resumes from its last one.
        c.train.checkpoint_every = 10
    elif arg not in (None, ""):
        raise ValueError(f"unknown config argument {arg!r} (expected nothing, 'smoke' or 'sft')")
    return c
