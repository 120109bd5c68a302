"""Entry point: train the DnD generator.

  python -m dnd_jax.train --config configs/arc_c.py:smoke --workdir runs/train/arc_c_smoke
  python -m dnd_jax.train --config configs/arc_c.py --workdir runs/train/arc_c --config.train.batch_size=16

Any config field can be overridden with --config.<field>=<value>. Re-running with the same workdir
resumes from its latest checkpoint. With several processes (TPU pods, multi-node GPU) each
process runs the same command and they form one global mesh: JAX finds the others from the
cluster's environment (TPU pods, SLURM, Open MPI), or from --coordinator HOST:PORT
--num_processes N --process_id I (what `python -m dnd_jax.launch` passes). Each process feeds
its share of every global batch; process 0 alone writes config.json, metrics.jsonl and the
TensorBoard events; all processes write their shards of each checkpoint.
"""

from __future__ import annotations

import sys

from dnd_jax import distributed
from dnd_jax.config_cli import parse_or_exit, versions
from dnd_jax.errors import DndError, run_cli


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config (configs/<target>.py[:smoke])",
                                    lock_config=True)  # fmt: skip
    flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, config); resumes when present")
    distributed.define_flags()
    parse_or_exit(argv if argv is not None else sys.argv)
    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        raise DndError("both --config and --workdir are required")
    distributed.initialize(f.coordinator, f.num_processes, f.process_id, f.heartbeat_timeout)
    import jax

    from dnd_jax.trainer import exit_if_stopped, train_and_evaluate

    print(f"{versions()}; devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
          f"({jax.process_count()} process(es), this is process {jax.process_index()})", file=sys.stderr)  # fmt: skip
    with distributed.one_line_runtime_errors():
        r = train_and_evaluate(f.config, f.workdir)
    if jax.process_index() != 0:
        return 0
    exit_if_stopped(r, f.workdir)
    start = r.get("heldout_wmse_start")
    print(
        f"held-out weighted MSE: {'' if start is None else f'{start:.5f} at step 0 -> '}"
        f"{r['heldout_wmse_end']:.5f} at step {flags.FLAGS.config.train.steps}; workdir {flags.FLAGS.workdir}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
