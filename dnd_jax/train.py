"""Entry point: train the DnD generator.

  python -m dnd_jax.train --config configs/arc_c.py:smoke --workdir runs/train/arc_c_smoke
  python -m dnd_jax.train --config configs/arc_c.py --workdir runs/train/arc_c --config.train.batch_size=16

Any config field can be overridden with --config.<field>=<value>. Re-running with the same workdir
resumes from its latest checkpoint. With several processes (TPU pods, multi-node GPU) each
process runs the same command; jax.distributed is initialised from the environment.
"""

from __future__ import annotations

import os
import sys

from dnd_jax.config_cli import parse_or_exit, versions
from dnd_jax.errors import DndError, run_cli


def _maybe_init_distributed() -> None:
    import jax

    multi = any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                                              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))  # fmt: skip
    if multi and os.environ.get("SLURM_NTASKS", "2") != "1":
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/<target>.py[:smoke])",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, config); resumes when present")
    parse_or_exit(argv if argv is not None else sys.argv)
    if flags.FLAGS.config is None or flags.FLAGS.workdir is None:
        raise DndError("both --config and --workdir are required")
    _maybe_init_distributed()
    import jax

    from dnd_jax.trainer import train_and_evaluate

    print(f"{versions()}; devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.process_count()} process(es))", file=sys.stderr)  # fmt: skip
    r = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    start = r.get("heldout_wmse_start")
    print(
        f"held-out weighted MSE: {'' if start is None else f'{start:.5f} at step 0 -> '}"
        f"{r['heldout_wmse_end']:.5f} at step {flags.FLAGS.config.train.steps}; workdir {flags.FLAGS.workdir}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
