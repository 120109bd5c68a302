"""Baseline: few-shot and full-shot LoRAs on the held-out task (spec §7.10, paper Fig. 4b/4c).

The argument is `<shots>` or `<shots>,smoke`: instead of generating, each held-out task gets a LoRA trained
with `dnd_jax.collect` and the experiment's own recipe on the first `shots` labelled examples of its train
split (1 / 16 / 64 / 256 in the paper; a task with fewer examples uses all of them, i.e. full-shot),
scored like every generated adapter, with its training wall time (the time to an adapter).

  python -m dnd_jax.experiment --config configs/ablations/fewshot.py:16 --workdir runs/ablations
"""

from configs.ablations import common


def get_config(arg=None):
    value, smoke = common.parse(arg)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"unknown config argument {arg!r} (expected <shots> >= 1, optionally ',smoke')")
    c = common.get_config(smoke, f"fewshot-{value}")
    c.experiment.shots = int(value)
    return c
