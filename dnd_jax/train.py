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
    start, end = r.get("eval_start") or {}, r.get("eval_end") or {}
    key = "heldout/wmse" if "heldout/wmse" in end else "heldout/nll"
    name = "held-out weighted MSE" if key == "heldout/wmse" else "held-out response NLL"
    print(
        f"{name}: {'' if key not in start else f'{start[key]:.5f} at step 0 -> '}"
        f"{end[key]:.5f} at step {flags.FLAGS.config.train.steps}; workdir {flags.FLAGS.workdir}"
        + (f"; adapter {flags.FLAGS.workdir}/adapter" if f.config.train.get("objective") == "mt_lora" else "")
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
