"""Values that used to end in a traceback or a runaway start: one line on stderr, exit code 2.
Also WEB_CONCURRENCY, and Python 3.10 without tomli. Everything through real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cli_helpers import ROOT, clean_env, ctl_json, free_port, prefork_cmd, run_prefork  # noqa: F401

PY310 = next((p for p in ("/root/.pyenv/versions/3.10.13/bin/python3.10", shutil.which("python3.10"))
              if p and os.path.exists(p)), None)


def _check(result, pattern: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("prefork: error:"), out
    assert pattern in errors[0], out
    assert "Traceback" not in out, out


def _serve_args(*extra: str) -> list[str]:
    control = os.path.join(tempfile.mkdtemp(), "c.sock")
    return ["serve", "tests.apps.star:app", "--bind", f"127.0.0.1:{free_port()}", "--control", control,
            *extra]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"tool = 1\n", "'tool' must be a table"),
        (b"[tool]\nprefork = 3\n", "[tool.prefork] must be a table"),
        (b"\xff\xfe[tool.prefork]\nworkers = 2\n", "not UTF-8"),
        (b"[tool.prefork]\nworkers = \"\xe9\"\n", "not UTF-8"),
    ],
    ids=["tool-int", "prefork-int", "utf16-bom", "latin1"],
)
def test_config_file_shapes(tmp_path, content, pattern):
    config = tmp_path / "prefork.toml"
    config.write_bytes(content)
    _check(run_prefork(_serve_args("--config", str(config))), pattern)


def test_config_file_that_never_ends():
    _check(run_prefork(_serve_args("--config", "/dev/zero")), "larger than 4 MiB")


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "0", "1e300", "soon"])
def test_ctl_timeout(value):
    _check(run_prefork(["ctl", f"--timeout={value}", "status"]), "--timeout: expected a number of seconds")


def test_ctl_status_interval_and_count():
    _check(run_prefork(["ctl", "status", "--watch", "--interval", "inf"]), "--interval")
    _check(run_prefork(["ctl", "status", "--watch", "--count", "-1"]), "--count")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--backlog", str(10**20)], "--backlog: expected a whole number from 1 to 65535"),
        (["--backlog", "65536"], "--backlog: expected a whole number from 1 to 65535"),
        (["--workers", str(10**20)], "--workers: expected a whole number of workers (1 to 1024)"),
        (["--workers", "1025"], "--workers: expected a whole number of workers (1 to 1024)"),
    ],
)
def test_sizes_past_the_cap(args, pattern):
    _check(run_prefork(_serve_args(*args)), pattern)


def test_run_workers_cap():
    _check(run_prefork(["run", "--workers", "5000", "x.py"]), "--workers: expected a whole number of workers")


@pytest.mark.parametrize("value", ["", "abc", "0", "2.5", str(10**20)])
def test_web_concurrency_bad_values(value):
    result = run_prefork(_serve_args(), env={"WEB_CONCURRENCY": value})
    _check(result, "WEB_CONCURRENCY: expected a whole number of workers")


def test_web_concurrency_sets_the_worker_count(prefork_cmd, tmp_path):  # noqa: F811
    control = str(tmp_path / "c.sock")
    cmd = prefork_cmd("serve", "tests.apps.star:app", "--bind", f"127.0.0.1:{free_port()}",
                      "--control", control, env={"WEB_CONCURRENCY": "2"})
    cmd.wait_ready()
    assert len(cmd.track_workers(control)) == 2
    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    assert cmd.finish() == 0, cmd.output


def test_web_concurrency_is_the_weakest_source(tmp_path):
    # resolve() in a real interpreter: flag > PREFORK_WORKERS > config file > WEB_CONCURRENCY
    config = tmp_path / "p.toml"
    config.write_text("[tool.prefork]\nworkers = 3\n")
    code = (
        "import sys\n"
        "from prefork.cli.config import resolve\n"
        "e = {'WEB_CONCURRENCY': '5'}\n"
        "print(resolve('run', {}, None, e)['workers'],"
        " resolve('run', {}, sys.argv[1], e)['workers'],"
        " resolve('run', {}, None, dict(e, PREFORK_WORKERS='4'))['workers'],"
        " resolve('run', {'workers': '6'}, None, e)['workers'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(config)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "3", "4", "6"]


def test_uvicorn_config_ignores_web_concurrency():
    # serve's workers build uvicorn.Config with workers=1: uvicorn never parses WEB_CONCURRENCY itself
    code = (
        "from prefork.http.uvconfig import build_config\n"
        "async def app(scope, receive, send): pass\n"
        "print('workers', build_config({}, app, 'asgi3').workers)\n"
    )
    env = clean_env({"WEB_CONCURRENCY": "abc"})
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "workers 1" in result.stdout


def _py310(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The prefork command under Python 3.10 without its site-packages (so without tomli)."""
    if PY310 is None:
        pytest.skip("python3.10 is not installed")
    env = clean_env({"PYTHONPATH": str(ROOT / "src")})
    main = "import sys; from prefork.cli import main; sys.exit(main())"
    return subprocess.run([PY310, "-S", "-c", main, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)


def test_python310_without_tomli_and_without_config_file(tmp_path):
    result = _py310(tmp_path, "run", "--workers", "1", "no_such_script.py")
    _check(result, "no such script")  # got past the options: no TOML reader was needed


def test_python310_without_tomli_with_a_config_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.prefork]\nworkers = 2\n")
    _check(_py310(tmp_path, "run", "x.py"), "reading TOML needs Python 3.11+ or `pip install tomli`")


@pytest.mark.parametrize("n", ["1025", "+5000", "99999999999999999999", "٣"])
def test_ctl_scale_past_the_cap(n):
    _check(run_prefork(["ctl", "--control", "/nonexistent/c.sock", "scale", n]),
           "scale: expected a number of workers (1 to 1024)")
