"""Shared helpers for tests that run real cluster scripts in their own processes.

The `py` fixture is the one to use. It writes a script into the test's `tmp_path`, runs it with the
project's interpreter (`.venv/bin/python`) in a new process group, captures stdout and stderr, and on
teardown SIGKILLs the whole group (the primary and every worker it forked) and reaps the primary, so
no test leaves a process behind even when it fails half-way.

    def test_something(py):
        result = py.run('''
            import prefork as cluster
            if cluster.is_primary:
                cluster.fork()
            else:
                print("worker", cluster.worker.id)
        ''')
        assert result.returncode == 0
        assert "worker 1" in result.stdout

    def test_interactive(py):
        script = py.spawn(SOURCE)              # returns at once
        m = script.expect(r"worker pid (\\d+)")  # wait for a stdout line matching a regex
        script.track(int(m[1]))                # also SIGKILLed on teardown, even outside the group
        script.signal("SIGHUP")
        result = script.finish(timeout=10)     # wait for the exit; Result(returncode, stdout, stderr)

Helpers for asserting on processes: `pid_alive(pid)` (exists and is not a zombie), `pid_state(pid)`
(the one-letter state from /proc, None when gone), `wait_until(predicate, timeout)`, `children(pid)`
(live child pids), and `end_processes(proc, pids)` for a test's own Popen.

Scripts (and the workers they fork) run with line-buffered stdout and stderr, as on a terminal: each
line reaches the pipe whole and at once, so `expect` sees it as soon as it is printed and lines of
different processes never interleave mid-line (PYTHONUNBUFFERED would write print()'s pieces apart).
This comes from a generated `sitecustomize` on PYTHONPATH; pass `env={"PYTEST_STDIO": "block"}` to
keep Python's own buffering instead (block-buffered on a pipe, as when output goes to a file), or
`{"PYTHONUNBUFFERED": "1"}` for unbuffered output.
Scripts run without any PREFORK_* variable of the test run; pass `env={...}` to add or override
variables (a value of None removes one). Source given as a string is dedented, so it can be written
inline in the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A shell without job control starts a background job (`pytest ... &`) with SIGINT ignored, and an
# ignored signal stays ignored across exec: every script the tests start would then ignore the
# SIGINT they are sent, and hang. A caught signal is reset to its default at exec instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
_VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable


@dataclass
class Result:
    """How a script ended: its exit status (negative: killed by that signal) and all its output."""

    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"returncode={self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


def pid_state(pid: int) -> str | None:
    """The process's state letter from /proc/PID/stat ('R', 'S', 'Z', ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: the state follows the last ')'.
    return data[data.rindex(")") + 2]


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has exited, just not been reaped)."""
    state = pid_state(pid)
    return state is not None and state not in ("Z", "X")


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; returns its last truth value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`: the workers of a primary."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.add(int(entry))
    return found


def end_processes(proc: subprocess.Popen, pids: list[int]) -> None:
    """Teardown for a test's own Popen (started with start_new_session) and the pids it saw."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_SITECUSTOMIZE = """\
# Generated by tests/conftest.py: line-buffered stdio in test scripts and their workers.
import os as _os
import sys as _sys

if _os.environ.get("PYTEST_STDIO") != "block" and not _os.environ.get("PYTHONUNBUFFERED"):
    for _stream in (_sys.stdout, _sys.stderr):
        try:
            _stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):
            pass
"""
_site: list[Path] = []


def _site_dir() -> Path:
    """A folder holding only the generated sitecustomize.py, made once per test session."""
    if not _site:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="prefork-test-site-"))
        (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        _site.append(folder)
    return _site[0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import shutil

    for folder in _site:
        shutil.rmtree(folder, ignore_errors=True)


class Script:
    """One running script: its Popen, output collected by reader threads, and process clean-up."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)  # its own group: teardown kills it whole
        self.pid = self.proc.pid
        self.tracked: set[int] = set()
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream: object, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            with self._cond:
                sink.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def expect(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """Wait for a stdout line (from line index `start` on) that matches `pattern`; return the match.

        Fails the test with everything printed so far when the line doesn't come in time.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._out[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                ended = self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)
                if left <= 0 or ended:
                    break
                self._cond.wait(min(left, 0.1))
        pytest.fail(f"no stdout line matched {pattern!r} within {timeout}s\n"
                    f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")

    def lines(self) -> list[str]:
        """stdout so far, one stripped string per line."""
        with self._cond:
            return [line.rstrip("\n") for line in self._out]

    def track(self, *pids: int) -> None:
        """Also SIGKILL these pids on teardown (workers, in case one left the process group)."""
        self.tracked.update(pids)

    def signal(self, sig: str | int) -> None:
        """Send a signal (name or number) to the script's own process only."""
        self.proc.send_signal(signal.Signals[sig] if isinstance(sig, str) else sig)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the script's process to exit; fails the test (with its output) on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"script still running after {timeout}s\n--- stdout\n{self.stdout}"
                        f"--- stderr\n{self.stderr}")

    def finish(self, timeout: float = 15.0) -> Result:
        """Wait for the exit and for all its output (workers may hold the pipes a bit longer)."""
        code = self.wait(timeout)
        for t in self._readers:
            t.join(2.0)  # a worker still alive keeps the pipe open: don't wait for it forever
        return Result(code, self.stdout, self.stderr)

    def kill_all(self) -> None:
        """SIGKILL the process group and tracked pids, then reap the script's own process."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.tracked:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except Exception:
                pass


class PyRunner:
    """The `py` fixture: write scripts under tmp_path and run them with the project's interpreter."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.scripts: list[Script] = []

    def write(self, name: str, source: str) -> Path:
        """Write `source` (dedented) to tmp_path/name, making parent folders; return the path."""
        path = self.tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
        return path

    def env(self, extra: dict[str, str | None] | None = None) -> dict[str, str]:
        """The environment scripts run with: ours minus PREFORK_*, line-buffered stdio, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
        env.pop("PYTHONUNBUFFERED", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_site_dir()), env.get("PYTHONPATH")]))
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # stale .pyc files would be compiled in every worker
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def spawn(self, source: str | Path, *args: str, name: str = "main.py",
              env: dict[str, str | None] | None = None, cwd: Path | None = None,
              python_args: tuple[str, ...] = (), module: str | None = None) -> Script:
        """Start a script (source text, or a Path to an existing file) and return at once.

        With `module`, run `python -m module` instead (write the package with `write` first);
        `source` is then ignored and may be "".
        """
        if module is not None:
            target = ["-m", module]
        elif isinstance(source, Path):
            target = [str(source)]
        else:
            target = [str(self.write(name, source))]
        argv = [PYTHON, *python_args, *target, *args]
        script = Script(argv, self.env(env), cwd or self.tmp_path)
        self.scripts.append(script)
        return script

    def run(self, source: str | Path, *args: str, timeout: float = 15.0, **kw: object) -> Result:
        """Run a script to its end and return its Result; fails the test if it outlives `timeout`."""
        return self.spawn(source, *args, **kw).finish(timeout)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        for script in self.scripts:
            script.kill_all()


@pytest.fixture
def py(tmp_path: Path) -> Iterator[PyRunner]:
    """Run cluster scripts in real processes; everything they started is killed on teardown."""
    runner = PyRunner(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()
