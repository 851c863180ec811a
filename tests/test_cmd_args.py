"""PREFORK_CMD_ARGS (gunicorn's GUNICORN_CMD_ARGS): options from the environment, split as a shell
would, checked as flags are; above the config file and the PREFORK_* variables, below the flags;
shown as the source in --print-config; a bad one is one line naming PREFORK_CMD_ARGS, exit 2."""

from __future__ import annotations

import httpx
import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hello:asgi"


def _config(result) -> dict[str, tuple[str, str]]:
    """--print-config's lines: name -> (value, source)."""
    out = {}
    for line in result.stdout.splitlines():
        name, sep, rest = line.partition(" = ")
        if sep and "  # " in rest:
            value, _, source = rest.partition("  # ")
            out[name] = (value, source)
    return out


def test_precedence_and_sources(tmp_path):
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 4\nkeep_alive = 9\nthreads = 6\nbacklog = 100\n")
    env = {"PREFORK_CMD_ARGS": "--workers 3 --keep-alive 7 --backlog 300 --header 'X-A: one two'",
           "PREFORK_BACKLOG": "200", "PREFORK_LIMIT_CONCURRENCY": "50"}
    result = run_prefork(["serve", APP, "--config", str(config), "--workers", "2", "--print-config"], env=env)
    assert result.returncode == 0, result.stderr
    got = _config(result)
    assert got["workers"] == ("2", "--workers")  # the command line wins
    assert got["keep_alive"] == ("7", "PREFORK_CMD_ARGS --keep-alive")  # over the config file
    assert got["backlog"] == ("300", "PREFORK_CMD_ARGS --backlog")  # over a PREFORK_* variable
    assert got["threads"][0] == "6" and got["threads"][1].endswith("threads")  # the file, where alone
    assert got["limit_concurrency"] == ("50", "PREFORK_LIMIT_CONCURRENCY")
    assert got["header"] == ('[["X-A", "one two"]]', "PREFORK_CMD_ARGS --header")  # shlex's quoting


def test_config_file_named_there(tmp_path):
    config = tmp_path / "other.toml"
    config.write_text("threads = 3\n")
    env = {"PREFORK_CMD_ARGS": f"--config {config}"}
    result = run_prefork(["serve", APP, "--print-config"], env=env)
    assert result.returncode == 0, result.stderr
    assert _config(result)["threads"] == ("3", f"{config} [tool.prefork] threads")


@pytest.mark.parametrize(("value", "pattern"), [
    ("--workers x", "PREFORK_CMD_ARGS --workers: expected a whole number of workers"),
    ("--keep-alive -1", "PREFORK_CMD_ARGS --keep-alive: expected a whole number from 1"),
    ("--bogus 1", "PREFORK_CMD_ARGS: unrecognized arguments: --bogus 1 (options of 'prefork serve' only)"),
    ("other:app", "PREFORK_CMD_ARGS: unrecognized arguments: other:app"),
    ("--bind '127.0.0.1:80", "PREFORK_CMD_ARGS: No closing quotation"),
    ("--workers", "PREFORK_CMD_ARGS: argument --workers: expected one argument"),
])
def test_bad_values_are_one_line(value, pattern):
    result = run_prefork(["serve", APP, "--print-config"], env={"PREFORK_CMD_ARGS": value})
    out = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, out
    assert len(errors) == 1 and errors[0].startswith("prefork: error: "), out
    assert pattern in errors[0], out
    assert "Traceback" not in out


def test_a_server_takes_them(prefork_cmd, tmp_path):  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", APP, "--bind", f"127.0.0.1:{port}", "--control", str(tmp_path / "c.sock"),
                      env={"PREFORK_CMD_ARGS": "--workers 1 --header X-From:cmd-args"})
    cmd.expect(r"ready: 1 worker\(s\)", 30)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).headers["x-from"] == "cmd-args"
    cmd.track_workers(str(tmp_path / "c.sock"))
