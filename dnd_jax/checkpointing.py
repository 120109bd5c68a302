"""The only file that talks to orbax: atomic, keep-last-k checkpoints of the training state."""

from __future__ import annotations

import shutil
from pathlib import Path

import orbax.checkpoint as ocp

TRASH = "deleted"  # subdirectory of the checkpoint root that old checkpoints pass through


class Checkpointer:
    """Saves and restores a pytree training state under <workdir>/checkpoints.

    Args:
      directory: checkpoint root.
      keep: number of most recent checkpoints kept.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        # Old checkpoints are renamed into TRASH (atomic) and emptied from there: a process killed while
        # deleting one leaves a partial directory in TRASH, never a partial step that looks committed.
        # Temporary directories of a save cut short by a kill are removed when the manager starts.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True, todelete_subdir=TRASH),
        )  # fmt: skip
        self._empty_trash()

    def _empty_trash(self) -> None:
        import jax

        trash = self.directory / TRASH
        if jax.process_index() == 0 and trash.is_dir():
            for p in trash.iterdir():  # entries only: orbax may be renaming a new one into it meanwhile
                shutil.rmtree(p, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, force: bool = False) -> None:
        """Starts an (async, atomic) save of `state` at `step`."""
        self._empty_trash()
        self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, abstract_state):
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_local(self, step: int, abstract_state):
        """Restores `step` whole onto this process's first device, whatever mesh or process count saved it
        (a checkpoint's own shardings name the devices of the run that wrote it)."""
        import jax

        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_state)
        return self.restore(step, target)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._empty_trash()
