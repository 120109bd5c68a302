"""`python -m dnd_jax.experiment`: the many-task experiment, kept at its old name (experiments/many_task.py)."""

from dnd_jax.experiments.many_task import *  # noqa: F403
from dnd_jax.experiments.many_task import main

if __name__ == "__main__":
    from dnd_jax.errors import run_cli

    run_cli(main)
