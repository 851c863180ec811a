"""`prefork run SCRIPT [ARGS]`: the command is the primary; each worker runs SCRIPT (via _boot)."""

from __future__ import annotations

import os
from typing import Any

import prefork
from prefork import proctitle

from . import output
from .config import UsageError
from .supervised import run_supervised


def run(opts: dict[str, Any], script: str, args: list[str]) -> int:
    output.configure(opts)  # --log-format: every later line is JSON when asked
    if not os.path.exists(script):
        raise UsageError(f"no such script: {script}")
    if not os.path.isfile(script):
        raise UsageError(f"{script} is not a file")
    if not os.access(script, os.R_OK):
        raise UsageError(f"cannot read {script}: permission denied")
    # under --chdir, the script's path goes through the folder as given (a `current` symlink), so a
    # worker started after a deploy swapped it runs the new release's script
    path = os.path.join(opts["chdir"], script) if opts.get("chdir") else os.path.abspath(script)
    prefork.setup_primary(module="prefork.cli._boot", args=[path, *args],
                          cwd=opts.get("chdir") or os.getcwd())
    shown = " ".join([script, *args])
    proctitle.set_title(f"primary {os.path.basename(script)}", "prefork-primary")
    return run_supervised(opts, title=f"prefork {prefork.__version__} run", rows=[("script", shown)],
                          ready=opts["ready"])
