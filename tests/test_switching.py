"""docs/switching.md covers every option of `uvicorn --help`: a flag of `prefork serve`, or a row that
says why not. A uvicorn upgrade with a new option fails here until it is one or the other."""

from __future__ import annotations

import re
import subprocess

from cli_helpers import ROOT, run_prefork


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9_-]*)", help_text))


def test_every_uvicorn_option_is_supported_or_explained():
    uvicorn = subprocess.run([str(ROOT / ".venv" / "bin" / "uvicorn"), "--help"], capture_output=True,
                             text=True, timeout=30)
    assert uvicorn.returncode == 0, uvicorn.stderr
    theirs = set(re.findall(r"^\s+(--[a-z0-9][a-z0-9-]*)", uvicorn.stdout, re.M))  # the option lines
    ours = _flags(run_prefork(["serve", "--help"]).stdout) | {"--version", "--help"}
    explained: set[str] = set()
    for line in (ROOT / "docs" / "switching.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "not supported" in cells[2]:
            explained |= _flags(cells[1])
    missing = sorted(f for f in theirs if f not in ours and f not in explained)
    assert not missing, f"uvicorn options not in `prefork serve --help` nor in docs/switching.md: {missing}"


def test_rows_that_say_same_name_real_flags():
    ours = _flags(run_prefork(["serve", "--help"]).stdout) | {"--version", "--help"}
    for line in (ROOT / "docs" / "switching.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 2 and cells[2].strip().startswith("same"):
            for flag in _flags(cells[1]):
                if flag != "--access-logfile":  # gunicorn's, spelled --access-log here (the row says so)
                    assert flag.replace("_", "-") in ours or flag in ours, (flag, line)
