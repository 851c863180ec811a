"""What each worker of `prefork run` executes: `python -m prefork.cli._boot SCRIPT [ARGS]`.

prefork is imported first, so the channel to the primary is set up before the script runs (the
script then finds `prefork.is_worker` true); the script runs as __main__ with its own argv. Its
output lines are prefixed with the worker's id, so interleaved output stays readable.
"""

from __future__ import annotations

import io
import os
import runpy
import sys
from typing import Any

import prefork


class Prefixed(io.TextIOBase):
    """A text stream that starts every line with a prefix, then writes to `target`."""

    def __init__(self, target: Any, prefix: str) -> None:
        self.target = target
        self.prefix = prefix
        self._bol = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        parts = []
        for piece in text.splitlines(keepends=True):
            if self._bol:
                parts.append(self.prefix)
            parts.append(piece)
            self._bol = piece.endswith("\n")
        self.target.write("".join(parts))
        if getattr(self.target, "line_buffering", False) and "\n" in text:
            self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.target.encoding

    @property
    def buffer(self) -> Any:
        return self.target.buffer


def main() -> None:
    script, *args = sys.argv[1:]
    if prefork.worker is not None:
        prefix = f"[worker {prefork.worker.id}] "
        sys.stdout = Prefixed(sys.stdout, prefix)  # type: ignore[assignment]
        sys.stderr = Prefixed(sys.stderr, prefix)  # type: ignore[assignment]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
