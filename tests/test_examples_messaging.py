"""The seed's messaging examples, run as a user would: `python examples/NAME.py`, output and exit code."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

EXAMPLES = ROOT / "examples"

# Line-buffered (as on a terminal), block-buffered (as when piped to a file) and unbuffered: the
# output must be complete every way, since workers and primaries end by themselves.
BUFFERING = pytest.mark.parametrize("stdio", [{}, {"PYTEST_STDIO": "block"}, {"PYTHONUNBUFFERED": "1"}],
                                    ids=["line", "block", "unbuffered"])


@BUFFERING
def test_echo(py, stdio):
    result = py.run(EXAMPLES / "echo.py", cwd=ROOT, env=stdio)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert "msg = 主进程" in lines, result
    assert "message = 你好" in lines, result
    assert "worker 1 exited with code 0" in lines, result
    assert lines.index("message = 你好") < lines.index("worker 1 exited with code 0")
    assert result.stderr == "", result


@BUFFERING
def test_each_worker(py, stdio):
    result = py.run(EXAMPLES / "each_worker.py", cwd=ROOT, env=stdio)
    assert result.returncode == 0, result
    # Not anchored to lines: unbuffered, print() writes text and newline apart, so lines of
    # different workers may interleave (a terminal's line buffering doesn't).
    got = re.findall(r"worker (\d+) got: big announcement to all workers", result.stdout)
    assert sorted(got) == ["1", "2", "3", "4"], result
    lines = result.stdout.splitlines()
    assert lines[-2:] == ["every worker has heard it: disconnecting them", "all workers are gone"], result
    assert result.stderr == "", result
