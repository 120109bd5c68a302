"""`python -m dnd_jax.ablations`: the ablation suite, kept at its old name (dnd_jax/experiments/ablations.py)."""

from dnd_jax.experiments.ablations import *  # noqa: F403
from dnd_jax.experiments.ablations import main

if __name__ == "__main__":
    from dnd_jax.errors import run_cli

    run_cli(main)
