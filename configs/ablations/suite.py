"""Every ablation of the paper (spec §7.9-7.10) on the same cross-validated folds, with one report.

  python -m dnd_jax.ablations --config configs/ablations/suite.py --workdir runs/ablations \
      --report_dir results/ablations
  python -m dnd_jax.ablations --config configs/ablations/suite.py:smoke --workdir /tmp/ablations_smoke

Each group names a config file configs/ablations/<group>.py and the arguments of its arms; every arm is
that file's config with the suite's own settings (and command-line overrides) underneath, run in the
one workdir (shared collection, folds and baseline scores). The report puts each arm next to the
reference arm, the prompt-blind control, retrieval, the training LoRAs and the base model, with the
same paired statistics as the many-task report. Re-running resumes; finished arms are skipped.
"""

import ml_collections

from configs.ablations import common


def get_config(arg=None):
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config argument {arg!r} (expected nothing or 'smoke')")
    smoke = arg == "smoke"
    c = common.get_config(smoke)
    c.ablations = ml_collections.ConfigDict()
    # Arms in their CPU-test size (each arm's config argument gets ",smoke").
    c.ablations.smoke = smoke
    # Groups in the order they run (after the reference arm) and appear in the report; the few-shot LoRAs,
    # one collection per held-out task and size, cost the most CPU time and run last.
    c.ablations.order = ("conditions", "arrangements", "num_conditions", "extractors_cv", "fewshot")
    # group -> arm arguments of configs/ablations/<group>.py.
    c.ablations.groups = ml_collections.ConfigDict()
    c.ablations.groups.conditions = ("prompts", "answers", "prompts_answers", "mix")
    c.ablations.groups.num_conditions = ("2", "8", "16") if not smoke else ("2", "4")
    c.ablations.groups.arrangements = ("2", "4", "all") if not smoke else ("1", "all")
    c.ablations.groups.extractors_cv = ("sentence_bert", "static", "decoder_lm") if not smoke else ("static",)
    c.ablations.groups.fewshot = ("1", "16", "64", "256") if not smoke else ("1", "4")
    return c
