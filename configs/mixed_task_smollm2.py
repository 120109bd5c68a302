"""Mixed-format many-task DnD: 128 English tasks, multiple choice and free text (SmolLM2-135M-Instruct).

  python -m dnd_jax.experiment --config configs/mixed_task_smollm2.py --workdir runs/mixed_task_smollm2
  python -m dnd_jax.experiment --config configs/mixed_task_smollm2.py:random --workdir runs/mixed_task_smollm2
  python -m dnd_jax.experiment --config configs/mixed_task_smollm2.py:smoke --workdir /tmp/mixed_smoke

configs/many_task_smollm2.py (same LoRA recipe, generator, metrics and statistics) on a pool where the
answer's form differs between tasks: its 48 multiple-choice tasks ("[C]" answers under one shared system
prompt) plus 80 generative tasks, each answered in its own words under no shared system prompt
(dnd_jax/data/bigbench.py): the 60 Natural Instructions subtasks of BIG-bench with at least 100 examples
(subtask053 has 58) and 20 generative BIG-bench tasks with exact-match targets (or numeric / near-exact ones:
unit conversion, SQL, categories) and at least 100 examples. English only, no images-as-text, one variant
where a task group has near-copies (linguistic_mappings' question_formation shares 2889 of its 3040 prompts
with sentence_negation, so only the latter is in).

Families are source datasets: one per BIG-bench task group, one per dataset the Natural Instructions
subtasks are built from (subtasks 043-045 and 047 ask ARC's questions, 046 types SQuAD's), and a common-sense
set joins the family of its source (ARC-c with ARC-e, SIQA with social_iqa, WinoGrande with the winogrande
subtasks). The primary split is "family" (a source never trains the generator that is scored on it);
`:random` is the secondary split, its own cv directory in the same workdir. Whatever the split, tasks that ask
the common-sense sets' own items (measured: ARC-c/ARC-e questions in subtasks 043-045 and 047, WinoGrande
sentences in the winogrande subtasks) share a fold (experiment.linked).

The primary metric (the mean NLL per gold-response token) is defined for both formats and scored on every task;
the secondary one, exact match, on the generative tasks (their records carry every acceptable target in
"answers"): a secondary protocol scores only the tasks whose answer format it reads.

`:smoke` is the same experiment on 6 tasks (two of them generative, from BIG-bench), 2 folds, a few steps.
"""

from configs import many_task_smollm2

# (task, family): the 41 multiple-choice BIG-bench tasks of configs/many_task_smollm2.py, by source.
MULTIPLE_CHOICE_TASKS = tuple((t, "social_iqa" if t == "social_iqa" else t.split("/")[0])
                              for t, _ in many_task_smollm2.BIGBENCH_TASKS)  # fmt: skip
# Natural Instructions subtasks with at least 100 examples, by the dataset each is built from.
NATURAL_INSTRUCTIONS_TASKS = (
    ("natural_instructions/subtask001_quoref_question_generation", "quoref"),
    ("natural_instructions/subtask002_quoref_answer_generation", "quoref"),
    ("natural_instructions/subtask003_mctaco_question_generation_event_duration", "mctaco"),
    ("natural_instructions/subtask004_mctaco_answer_generation_event_duration", "mctaco"),
    ("natural_instructions/subtask005_mctaco_wrong_answer_generation_event_duration", "mctaco"),
    ("natural_instructions/subtask006_mctaco_question_generation_transient_stationary", "mctaco"),
    ("natural_instructions/subtask007_mctaco_answer_generation_transient_stationary", "mctaco"),
    ("natural_instructions/subtask008_mctaco_wrong_answer_generation_transient_stationary", "mctaco"),
    ("natural_instructions/subtask009_mctaco_question_generation_event_ordering", "mctaco"),
    ("natural_instructions/subtask010_mctaco_answer_generation_event_ordering", "mctaco"),
    ("natural_instructions/subtask011_mctaco_wrong_answer_generation_event_ordering", "mctaco"),
    ("natural_instructions/subtask012_mctaco_question_generation_absolute_timepoint", "mctaco"),
    ("natural_instructions/subtask013_mctaco_answer_generation_absolute_timepoint", "mctaco"),
    ("natural_instructions/subtask014_mctaco_wrong_answer_generation_absolute_timepoint", "mctaco"),
    ("natural_instructions/subtask015_mctaco_question_generation_frequency", "mctaco"),
    ("natural_instructions/subtask016_mctaco_answer_generation_frequency", "mctaco"),
    ("natural_instructions/subtask017_mctaco_wrong_answer_generation_frequency", "mctaco"),
    ("natural_instructions/subtask018_mctaco_temporal_reasoning_presence", "mctaco"),
    ("natural_instructions/subtask019_mctaco_temporal_reasoning_category", "mctaco"),
    ("natural_instructions/subtask020_mctaco_span_based_question", "mctaco"),
    ("natural_instructions/subtask021_mctaco_grammatical_logical", "mctaco"),
    ("natural_instructions/subtask022_cosmosqa_passage_inappropriate_binary", "cosmosqa"),
    ("natural_instructions/subtask023_cosmosqa_question_generation", "cosmosqa"),
    ("natural_instructions/subtask024_cosmosqa_answer_generation", "cosmosqa"),
    ("natural_instructions/subtask025_cosmosqa_incorrect_answer_generation", "cosmosqa"),
    ("natural_instructions/subtask026_drop_question_generation", "drop"),
    ("natural_instructions/subtask027_drop_answer_type_generation", "drop"),
    ("natural_instructions/subtask028_drop_answer_generation", "drop"),
    ("natural_instructions/subtask029_winogrande_full_object", "winogrande"),
    ("natural_instructions/subtask030_winogrande_full_person", "winogrande"),
    ("natural_instructions/subtask031_winogrande_question_generation_object", "winogrande"),
    ("natural_instructions/subtask032_winogrande_question_generation_person", "winogrande"),
    ("natural_instructions/subtask033_winogrande_answer_generation", "winogrande"),
    ("natural_instructions/subtask034_winogrande_question_modification_object", "winogrande"),
    ("natural_instructions/subtask035_winogrande_question_modification_person", "winogrande"),
    ("natural_instructions/subtask036_qasc_topic_word_to_generate_related_fact", "qasc"),
    ("natural_instructions/subtask037_qasc_generate_related_fact", "qasc"),
    ("natural_instructions/subtask038_qasc_combined_fact", "qasc"),
    ("natural_instructions/subtask039_qasc_find_overlapping_words", "qasc"),
    ("natural_instructions/subtask040_qasc_question_generation", "qasc"),
    ("natural_instructions/subtask041_qasc_answer_generation", "qasc"),
    ("natural_instructions/subtask042_qasc_incorrect_option_generation", "qasc"),
    ("natural_instructions/subtask043_essential_terms_answering_incomplete_questions", "arc"),
    ("natural_instructions/subtask044_essential_terms_identifying_essential_words", "arc"),
    ("natural_instructions/subtask045_miscellaneous_sentence_paraphrasing", "arc"),
    ("natural_instructions/subtask046_miscellaenous_question_typing", "squad"),
    ("natural_instructions/subtask047_misc_answering_science_questions", "arc"),
    ("natural_instructions/subtask048_multirc_question_generation", "multirc"),
    ("natural_instructions/subtask049_multirc_questions_needed_to_answer", "multirc"),
    ("natural_instructions/subtask050_multirc_answerability", "multirc"),
    ("natural_instructions/subtask051_multirc_correct_answer_single_sentence", "multirc"),
    ("natural_instructions/subtask052_multirc_identify_bad_question", "multirc"),
    ("natural_instructions/subtask054_multirc_write_correct_answer", "multirc"),
    ("natural_instructions/subtask055_multirc_write_incorrect_answer", "multirc"),
    ("natural_instructions/subtask056_multirc_classify_correct_answer", "multirc"),
    ("natural_instructions/subtask057_multirc_classify_incorrect_answer", "multirc"),
    ("natural_instructions/subtask058_multirc_question_answering", "multirc"),
    ("natural_instructions/subtask059_ropes_story_generation", "ropes"),
    ("natural_instructions/subtask060_ropes_question_generation", "ropes"),
    ("natural_instructions/subtask061_ropes_answer_generation", "ropes"),
)
# Generative BIG-bench tasks (a "target", no "target_scores"), by task group.
GENERATIVE_TASKS = (
    ("auto_categorization", "auto_categorization"),
    ("chinese_remainder_theorem", "chinese_remainder_theorem"),
    ("cryptonite", "cryptonite"),
    ("linguistic_mappings/past_tense_json", "linguistic_mappings"),
    ("linguistic_mappings/plural_json", "linguistic_mappings"),
    ("linguistic_mappings/pronoun_replacement_json", "linguistic_mappings"),
    ("linguistic_mappings/sentence_negation_json", "linguistic_mappings"),
    ("list_functions/05_shot_baseline", "list_functions"),
    ("matrixshapes", "matrixshapes"),
    ("modified_arithmetic/three_digit_addition_plus_one", "modified_arithmetic"),
    ("object_counting", "object_counting"),
    ("operators", "operators"),
    ("periodic_elements/subtask_1", "periodic_elements"),
    ("qa_wikidata", "qa_wikidata"),
    ("semantic_parsing_spider", "semantic_parsing_spider"),
    ("tense", "tense"),
    ("unit_conversion/unit_addition_general", "unit_conversion"),
    ("unit_conversion/unit_conversion_with_relative_error", "unit_conversion"),
    ("word_sorting", "word_sorting"),
    ("word_unscrambling", "word_unscrambling"),
)
BIGBENCH_TASKS = (*MULTIPLE_CHOICE_TASKS, *NATURAL_INSTRUCTIONS_TASKS, *GENERATIVE_TASKS)
COMMONSENSE_TASKS = (
    ("ARC-c", "arc"), ("ARC-e", "arc"), ("OBQA", "obqa"), ("BoolQ", "boolq"),
    ("WinoGrande", "winogrande"), ("PIQA", "piqa"), ("SIQA", "social_iqa"),
)  # fmt: skip
# Tasks that ask a common-sense set's own items: one fold whatever the split.
LINKED = (
    "ARC-c,ARC-e,natural_instructions/subtask043_essential_terms_answering_incomplete_questions,"
    "natural_instructions/subtask044_essential_terms_identifying_essential_words,"
    "natural_instructions/subtask045_miscellaneous_sentence_paraphrasing,"
    "natural_instructions/subtask047_misc_answering_science_questions",
    "social_iqa,SIQA",
    "WinoGrande," + ",".join(t for t, f in NATURAL_INSTRUCTIONS_TASKS if f == "winogrande"),
)
SMOKE_BIGBENCH = (("navigate", "navigate"), ("object_counting", "object_counting"), ("tense", "tense"))
SMOKE_COMMONSENSE = (("ARC-c", "arc"), ("ARC-e", "arc"), ("BoolQ", "boolq"))


def get_config(arg=None):
    """arg: "" (family split), "random" (the secondary split), "smoke", "smoke,random", or "sft" (SFT mode's settings
    of configs/many_task_smollm2.py:sft on this pool, for scripts/mixed_task_decisive.sh), with or without random."""
    parts = set((arg or "").split(",")) - {""}
    if not parts <= {"smoke", "random", "sft"} or parts >= {"smoke", "sft"}:
        raise ValueError(f"unknown config argument {arg!r} (expected nothing, 'random', 'smoke', 'sft' or one of them "
                         "with ',random')")  # fmt: skip
    smoke = "smoke" in parts
    c = many_task_smollm2.get_config("smoke" if smoke else "sft" if "sft" in parts else None)
    c.pipeline.config_name = "configs/mixed_task_smollm2.py"
    bigbench, commonsense = (SMOKE_BIGBENCH, SMOKE_COMMONSENSE) if smoke else (BIGBENCH_TASKS, COMMONSENSE_TASKS)
    # BIG-bench tasks of both formats ($DND_JAX_BIGBENCH) and their families.
    c.experiment.bigbench_tasks = tuple(t for t, _ in bigbench)
    # Common-sense sets read in place from experiment.commonsense_dir when it exists (skipped otherwise).
    c.experiment.commonsense_tasks = tuple(t for t, _ in commonsense)
    # Task -> source dataset, for the family split.
    c.experiment.families = tuple(f"{t}={f}" for t, f in (*bigbench, *commonsense))
    # Primary split "family" (a source dataset never straddles folds); ":random" is the secondary.
    c.experiment.split = "random" if "random" in parts else "family"
    # Near-copies and tasks asking a common-sense set's items: one fold whatever the split.
    c.experiment.linked = LINKED
    # Whole examples only: at the 48-task recipe's cut-off of 256 tokens the prompts of ~34 generative tasks would
    # be cut (from their end, LLaMA-Factory's rule: often the question itself). The pool's recipe takes 512 and
    # drops the BIG-bench examples that still do not fit whole (a task left with too few is skipped, saying so).
    # A new recipe: none of the 48-task collections is reused.
    if not smoke:
        c.collect.cutoff_len = 512
        c.experiment.whole_examples = True
        # The CPU budget, fixed before any run: scoring is most of it. On the 48-task run one adapter on one task
        # (32 items + 12 secondary) took about 17 s on 2 cores; here each task has about 13 rows to score (base,
        # own, control, retrieval, 1 training LoRA, 2 recon seeds and their swaps, SFT and its swap, mt_lora, soft
        # retrieval), so 16 items (CIs are over the 128 tasks, whose spread dominates), exact match on 8.
        c.experiment.limit = 16
        c.experiment.secondary_limit = 8
        c.experiment.training_sample = 1
        # SFT mode on 512-token examples in 24 GB: a step's 16 rows in 4 groups of 4 (the same loss; XLA asked for one
        # 26 GB buffer in one pass, 10 GB peak in 4 groups, 33 s a step on the 2-core EPYC: benchmarks/README.md).
        c.sft.microbatches = 4
    # Every generator variant is also scored with swapped prompts (own vs swapped: does it use them).
    c.experiment.prompt_swap = True
    # The primary comparison, fixed here before any run: the report opens with each generator vs the best
    # prompt-blind baseline per task (mean control or mt_lora) and vs soft retrieval, and its prompt swap.
    c.experiment.decisive = True
    # Secondary: exact match of the greedy answer ("em"), on the first secondary_limit scored items of the generative
    # tasks ("ll" and "gen" score lettered options, which generative tasks lack; em is not scored on "[C]" answers).
    c.experiment.secondary = ("em",)
    c.pipeline.deviations = (
        *c.pipeline.deviations,
        "Mixed answer formats: multiple-choice tasks answer '[C]' under a shared system prompt; generative "
        "BIG-bench and Natural Instructions tasks answer in their own words under no system prompt.",
    )
    return c
