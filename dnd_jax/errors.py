"""The one exception type for errors a user can cause, and the CLI wrapper that prints it.

Every user-facing failure (a wrong path, a corrupt file, a shape that does not fit, a config
typo) raises `DndError` with a message naming the file, key or field at fault. Command lines
run through `run_cli`, which prints that message as one line and exits with status 2 instead of
a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn


class DndError(Exception):
    """An error caused by user input: the message names the file, key or field at fault."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Runs a command-line `main`, turning `DndError` into one line on stderr and exit code 2.

    Args:
      main: function taking argv (None = sys.argv[1:]) and returning an exit code or None.
      argv: arguments to pass on.
    """
    try:
        code = main(argv)
    except DndError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except Exception as e:  # a full disk, wherever it strikes, is the user's to fix: one line too
        if not disk_full(e):
            raise
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        print(f"error: {where}write failed: {DISK_FULL_ADVICE}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    sys.exit(code or 0)


DISK_FULL_ADVICE = ("no space left on the device (or over a file-size quota); free some and re-run the same "
                    "command: finished outputs are kept and it resumes")  # fmt: skip
_DISK_FULL = re.compile(r"No space left|File too large|Disk quota|FileTooLarge|StorageFull|os_error_code='(27|28|122)'")


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for want of space (ENOSPC, EDQUOT, or EFBIG: a file-size limit),
    raised by Python or reported in the message of a C++ library (tensorstore, safetensors, torch)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return bool(_DISK_FULL.search(str(e)))


def _exit(code: int) -> NoReturn:
    """Exits; in a multi-process JAX run a failing process leaves at once instead of waiting in JAX's
    shutdown barrier for peers that may never get there (they stop on the missing heartbeat).

    Background writers that failed with the main thread (orbax's async save threads) would print their
    own tracebacks while the interpreter shuts down: after the one-line error, those are silenced."""
    import threading

    sys.unraisablehook = lambda *_: None
    threading.excepthook = lambda *_: None

    if multi_process_active():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def multi_process_active() -> bool:
    """Whether this process has joined a multi-process JAX runtime (without importing JAX)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed as _d

    return _d.global_state.client is not None
