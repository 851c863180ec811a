"""Bad configuration found while prefork starts: one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def config_error(message: str) -> NoReturn:
    """End the process as a command line tool does for bad input (exit 2), naming what was wrong."""
    try:
        sys.stderr.write(f"prefork: error: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    raise SystemExit(2)
