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
from prefork import _stdio


class Prefixed(io.TextIOBase):
    """A text stream that starts every line with a prefix, then writes to `target`.

    Whole lines are written at once (a partial line waits for its end, or a flush): print() writes
    its pieces one by one, and two workers sharing the terminal would otherwise mix them mid-line.
    """

    def __init__(self, target: Any, prefix: str) -> None:
        self.target = target
        self.prefix = prefix
        self._partial = ""

    def write(self, text: str) -> int:
        if not text:
            return 0
        pending = self._partial + text
        head, sep, self._partial = pending.rpartition("\n")
        if sep:
            lines = (head + sep).splitlines(keepends=True)
            _stdio.write("".join(self.prefix + line for line in lines), self.target)
        return len(text)

    def flush(self) -> None:
        """A closed pipe behind it is silenced (prefork/_stdio.py): the app's print() never fails."""
        partial, self._partial = self._partial, ""
        _stdio.write(self.prefix + partial if partial else "", self.target)

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
