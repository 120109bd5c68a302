"""The one exception type for errors a user can cause, and the CLI wrapper that prints it.

Every user-facing failure (a wrong path, a corrupt file, a shape that does not fit, a config
typo) raises `DndError` with a message naming the file, key or field at fault. Command lines
run through `run_cli`, which prints that message as one line and exits with status 2 instead of
a traceback.
"""

from __future__ import annotations

import os
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    sys.exit(code or 0)


def _exit(code: int) -> NoReturn:
    """Exits; in a multi-process JAX run a failing process leaves at once instead of waiting in JAX's
    shutdown barrier for peers that may never get there (they stop on the missing heartbeat)."""
    from dnd_jax import distributed

    if distributed.active():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
