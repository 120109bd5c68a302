"""The shared base of the paper's ablations (spec §7.9) as cross-validated many-task experiments.

Every ablation arm (configs/ablations/{conditions,num_conditions,arrangements,extractors_cv,fewshot}.py)
is this experiment with one thing changed and its own `experiment.variant` name, run in ONE workdir:
the collection, tokens, folds, and the base / own-LoRA / control / retrieval / training-LoRA scores
are made once and shared, so every arm has the same held-out tasks, items, baselines and statistics
as configs/many_task_smollm2.py. The arm that equals this config (prompts, 8 texts, all of a fold's
training tasks, Sentence-BERT) is the variant "reference" in every ablation table.

CPU scale: 12 tasks (6 common-sense sets, 6 BIG-bench tasks; no near-duplicate pairs such as ARC-c /
ARC-e or SIQA / social_iqa), 3 random folds of 4, of which folds 0 and 1 are run (8 held-out tasks,
each generator trained on the other 8 tasks), 50 generator steps, primary metric only.

  python -m dnd_jax.ablations --config configs/ablations/suite.py --workdir runs/ablations \
      --report_dir results/ablations
"""

from configs import many_task_smollm2

BIGBENCH = ("strategyqa", "winowhy", "navigate", "sports_understanding", "hyperbaton",
            "logical_deduction/three_objects")  # fmt: skip
COMMONSENSE = ("ARC-e", "OBQA", "BoolQ", "PIQA", "WinoGrande", "SIQA")


def get_config(smoke: bool = False, variant: str = "reference"):
    c = many_task_smollm2.get_config("smoke" if smoke else None)
    c.pipeline.config_name = "configs/ablations/suite.py"
    # The arm's name: its generators, adapters and scores go to WORKDIR/cv-*/<variant>/.
    c.experiment.variant = variant
    if not smoke:
        c.experiment.bigbench_tasks = BIGBENCH
        c.experiment.commonsense_tasks = COMMONSENSE
        c.experiment.folds = 3
        c.train.steps = 50
        c.train.eval_every = 0
        c.train.checkpoint_every = 50
        # Primary metric only (CPU time): the secondary protocols are the many-task report's.
        c.experiment.secondary = ()
    if smoke:  # one generator seed per fold in the test suite (the many-task smoke covers several)
        c.experiment.seeds = (c.seed,)
    # Folds 0 and 1 of 3 are run (8 held-out tasks).
    c.experiment.run_folds = (0,) if smoke else (0, 1)
    return c


def parse(arg: str | None, choices=None) -> tuple[str, bool]:
    """'<value>' or '<value>,smoke' -> (value, smoke); a value outside `choices` is a one-line error."""
    value, *rest = (arg or "").split(",")
    if rest not in ([], ["smoke"]) or (choices is not None and value not in choices):
        raise ValueError(f"unknown config argument {arg!r} (expected <value> or <value>,smoke"
                         + (f"; values: {', '.join(choices)})" if choices else ")"))  # fmt: skip
    return value, rest == ["smoke"]
