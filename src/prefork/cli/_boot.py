"""What each worker of `prefork run` executes: `python -m prefork.cli._boot SCRIPT [ARGS]`.

prefork is imported first, so the channel to the primary is set up before the script runs (the
script then finds `prefork.is_worker` true); the script runs as __main__ with its own argv. Its
output lines are prefixed with the worker's id, so interleaved output stays readable; with
`--log-format json` each line becomes one JSON object instead (prefork/logline.py).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import prefork
from prefork import hooks, logfile, logline, proctitle


class Prefixed(logline.Lines):
    """A text stream that starts every whole line with a prefix, then writes to `target`."""

    def __init__(self, target: Any, prefix: str) -> None:
        super().__init__(target, lambda line: prefix + line + "\n")
        self.prefix = prefix


def wrap_output(wid: int, fmt: str) -> None:
    """The worker's stdout and stderr, line by line: `[worker N] line`, or one JSON object."""
    logline.state["worker"] = wid
    if fmt == "json":
        logline.configure("json", wid)
        return
    prefix = f"[worker {wid}] "
    sys.stdout = Prefixed(logline.raw(sys.stdout), prefix)  # type: ignore[assignment]
    sys.stderr = Prefixed(logline.raw(sys.stderr), prefix)  # type: ignore[assignment]


def main() -> None:
    script, *args = sys.argv[1:]
    fmt = logline.take_worker_format()
    if prefork.worker is not None:
        wid = prefork.worker.id
        wrap_output(wid, fmt)
        proctitle.set_title(f"worker {wid} {os.path.basename(script)}", f"prefork-w{wid}")
        logfile.follow_reopen()
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)
    hooks.run_worker()  # --hooks (prefork/hooks.py): post_fork, post_worker_init; worker_exit later
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
