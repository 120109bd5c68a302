"""The only file that talks to orbax: atomic, keep-last-k checkpoints of the training state."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

import orbax.checkpoint as ocp

from dnd_jax.errors import DISK_FULL_ADVICE, DndError, disk_full


class _NotOrbax(logging.Filter):
    """orbax logs through absl; its warnings and the errors of its background threads (which it also raises
    to the caller, where they are reported) are dropped from the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/orbax/" not in record.pathname or record.levelno >= logging.CRITICAL


logging.getLogger("absl").addFilter(_NotOrbax())


class _NotOrbaxDiskFull(logging.Filter):
    """A failed async save can also surface as asyncio's "Task exception was never retrieved" (when the
    task is garbage-collected, so only sometimes) with the full traceback of the write: dropped when it is
    a disk-full error raised inside orbax, which the save's caller already reports in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not disk_full(exc):
            return True
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        return not any("/orbax/" in f for f in frames)


logging.getLogger("asyncio").addFilter(_NotOrbaxDiskFull())


def _quiet_closed_loop(hook):
    """After an async save fails, orbax closes its event loop while tensorstore still completes writes on
    its own threads; each completion reports "RuntimeError: Event loop is closed" as an unraisable
    exception. Those (and only those) are dropped: the failure itself reaches the caller."""

    def filtered(u):
        if not (u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    return filtered


sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)

TRASH = "deleted"  # subdirectory of the checkpoint root that old checkpoints pass through


def finished_steps(directory: str | Path) -> list[int]:
    """Committed checkpoint steps under `directory`, read from the directory alone (no manager: nothing is
    started, cleaned or left running, so it is safe next to a run that is writing there).

    orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` when committed; a
    committed step directory holds `_CHECKPOINT_METADATA`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file())  # fmt: skip


def latest_finished_step(directory: str | Path) -> int | None:
    steps = finished_steps(directory)
    return steps[-1] if steps else None


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
        with self._disk_full_is_one_line():
            self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        """A save that failed for want of space (raised here or, for an async save, at the next save or
        wait) becomes a DndError naming the directory and the checkpoint a re-run resumes from."""
        try:
            yield
        except Exception as e:
            if not disk_full(e):
                raise
            steps = list(self.manager.all_steps())
            last = f"step {max(steps)}" if steps else "the start"
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):  # the failed save's partial files
                shutil.rmtree(tmp, ignore_errors=True)
            raise DndError(f"{self.directory}: checkpoint not written: {DISK_FULL_ADVICE} (from {last})") from None

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
        with self._disk_full_is_one_line():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._disk_full_is_one_line():
            self.manager.wait_until_finished()
        self.manager.close()
        self._empty_trash()
