"""Ablation: dataset arrangements (spec §7.9, paper Table 4c), cross-validated (configs/ablations/common.py).

The argument is `<k>` or `<k>,smoke`: each fold's generator is trained on a seeded subset of k of the
fold's training tasks (experiment.train_tasks; nested, so the k = 2 tasks are among the k = 4 ones) and
tested on the same held-out tasks as every other arm; `all` is the reference arm. The arm's own
prompt-blind control (the mean of its k tasks' checkpoints) is scored next to it. The paper trains on
6/4/3/2 of its 7 sets and tests on the rest.

  python -m dnd_jax.experiment --config configs/ablations/arrangements.py:2 --workdir runs/ablations
"""

from configs.ablations import common


def get_config(arg=None):
    value, smoke = common.parse(arg)
    if value != "all" and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"unknown config argument {arg!r} (expected <k> >= 1 or 'all', optionally ',smoke')")
    c = common.get_config(smoke, "reference" if value == "all" else f"train-{value}")
    c.experiment.train_tasks = 0 if value == "all" else int(value)
    return c
