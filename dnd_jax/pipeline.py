"""`python -m dnd_jax.pipeline`: the leave-one-out pipeline (the demo), kept at its old name.

The code is dnd_jax/experiments/pipeline.py.
"""

from dnd_jax.experiments.pipeline import *  # noqa: F403
from dnd_jax.experiments.pipeline import main

if __name__ == "__main__":
    from dnd_jax.errors import run_cli

    run_cli(main)
