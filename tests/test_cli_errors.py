"""Bad input to the `prefork` command: one clear line naming the problem, a non-zero exit (2 for usage),
no traceback unless --log-level debug. Also: the control socket refuses other users."""

from __future__ import annotations

import os
import socket
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another uid")
NOBODY = 65534


def _check(result, code: int, pattern: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("prefork: error:")]
    assert len(errors) == 1, out
    assert pattern in errors[0], out
    assert "Traceback" not in out, out


def _serve(app: str, *extra: str, timeout: float = 20.0, **kw):
    return run_prefork(
        [
            "serve",
            app,
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--control",
            os.path.join(tempfile.mkdtemp(), "c.sock"),
            *extra,
        ],
        timeout=timeout,
        **kw,
    )


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("tests.apps.nope:app", "no module named 'tests.apps.nope'"),
        ("tests.apps.star:nope", "module 'tests.apps.star' has no attribute 'nope'"),
        ("tests.apps.bad:app", "is not an ASGI or WSGI application (it is int 42)"),
        ("tests.apps.bad:no_args", "is not an ASGI or WSGI application: it takes 0 argument"),
        ("tests.apps.broken:app", "failed to import: ModuleNotFoundError: No module named 'this_dependency"),
    ],
)
def test_bad_app(app, message):
    _check(_serve(app), 1, message)


def test_bad_app_preloaded_fails_before_forking():
    result = _serve("tests.apps.star:nope", "--preload")
    _check(result, 1, "has no attribute 'nope'")
    assert "is ready" not in result.stderr and "[worker" not in result.stderr


def test_traceback_with_debug_log_level():
    result = _serve("tests.apps.broken:app", "--log-level", "debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "this_dependency_does_not_exist" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "tests.apps.star:app", "--bind", "nonsense"], "--bind: 'nonsense': expected HOST:PORT"),
        (["serve", "tests.apps.star:app", "--bind", "127.0.0.1:99999"], "port 99999 is out of range"),
        (["serve", "tests.apps.star:app", "--bind", "unix:"], "unix: needs a path"),
        (["serve", "tests.apps.star:app", "--workers", "0"], "--workers: expected a whole number of workers"),
        (["serve", "tests.apps.star:app", "--workers", "abc"], "not 'abc'"),
        (["run", "--workers", "-1", "x.py"], "--workers: expected a whole number of workers"),
        (["serve", "tests.apps.star:app", "--timeout", "soon"], "--timeout: expected a number of seconds"),
        (["serve", "tests.apps.star:app", "--max-memory", "lots"], "expected a size such as 512M"),
        (["serve", "tests.apps.star:app", "--policy", "random"], "--policy: expected one of rr, none"),
        (["serve", "tests.apps.star:app", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["serve", "star"], "expected MODULE:APP"),
        (["serve"], "serve needs the app to serve"),
        (["run", "/no/such/script.py"], "no such script: /no/such/script.py"),
        (["ctl", "--control", "/tmp/x.sock", "scale", "abc"], "scale: expected a number of workers"),
        (["ctl"], "ctl needs an action"),
        ([], "a command is needed"),
    ],
)
def test_usage_errors(args, message):
    _check(run_prefork(args), 2, message)


def test_environment_variable_errors_name_the_variable():
    _check(
        run_prefork(["serve", "tests.apps.star:app"], env={"PREFORK_WORKERS": "many"}),
        2,
        "PREFORK_WORKERS: expected a whole number",
    )


def test_address_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_prefork(
            [
                "serve",
                "tests.apps.star:app",
                "--bind",
                f"127.0.0.1:{port}",
                "--control",
                os.path.join(tempfile.mkdtemp(), "c.sock"),
            ]
        )
    _check(result, 1, f"cannot bind 127.0.0.1:{port}: address already in use")


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setgroups([])
    os.setuid(NOBODY)


def _open_dir() -> str:
    folder = tempfile.mkdtemp()
    os.chmod(folder, 0o777)
    return folder


class _Result:
    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, "", stderr


def _run_as_nobody(fn) -> _Result:
    """`fn()` (an exit code) in a forked child that dropped to uid nobody, its stderr collected.

    The child runs code this interpreter has already imported: nobody may not exec it (it lives under
    /root) nor read the checkout when it was cloned into a folder only its owner may enter (mktemp -d).
    For the same reason the child works in a world-readable temporary folder, not in the checkout."""
    import encodings.idna  # noqa: F401 - imported before the fork: nobody cannot read the stdlib here
    import importlib
    import pkgutil
    import ssl  # noqa: F401
    import traceback

    import uvicorn  # noqa: F401

    import prefork
    import prefork.cli

    for module in pkgutil.walk_packages(prefork.__path__, "prefork."):  # every one the CLI may import late
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    prefork.cli.config._toml_reader("")  # tomllib, or tomli on Python 3.10
    workdir = _open_dir()
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: the child runs no other thread's code
        pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            os.dup2(w, 2)
            sys.stderr = os.fdopen(2, "w")
            os.chdir(workdir)
            _as_nobody()
            code = fn()
            sys.stderr.flush()
        except BaseException:
            traceback.print_exc()  # say why, rather than a bare exit 99
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    os.rmdir(workdir)
    return _Result(os.waitstatus_to_exitcode(status), err)


def _main_as_nobody(argv: list[str]) -> _Result:
    """`prefork.cli.main(argv)` run as uid nobody (see _run_as_nobody)."""
    import prefork.cli

    return _run_as_nobody(lambda: prefork.cli.main(argv))


@ROOT_ONLY
def test_privileged_port_as_a_normal_user():
    result = _main_as_nobody(
        [
            "serve",
            "tests.apps.star:app",
            "--bind",
            "127.0.0.1:81",
            "--control",
            os.path.join(_open_dir(), "c.sock"),
        ]
    )
    _check(result, 1, "cannot bind 127.0.0.1:81: permission denied (ports below 1024 are privileged")


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tool.prefork\nworkers = 2\n")
    _check(run_prefork(["serve", "tests.apps.star:app", "--config", str(bad)]), 2, "invalid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[tool.prefork]\nwrokers = 2\n")
    _check(
        run_prefork(["serve", "tests.apps.star:app", "--config", str(unknown)]),
        2,
        "unknown setting 'wrokers'",
    )
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[tool.prefork]\nworkers = 0\n")
    _check(
        run_prefork(["serve", "tests.apps.star:app", "--config", str(wrong)]),
        2,
        "[tool.prefork] workers: expected a whole number",
    )
    _check(
        run_prefork(["serve", "tests.apps.star:app", "--config", str(tmp_path / "missing.toml")]),
        2,
        "no such file",
    )
    _check(run_prefork(["serve", "tests.apps.star:app", "--config", str(tmp_path)]), 2, "is a folder")


@ROOT_ONLY
def test_unreadable_config_file():
    config = Path(_open_dir()) / "secret.toml"
    config.write_text("[tool.prefork]\nworkers = 2\n")
    os.chmod(config, 0o600)
    _check(
        _main_as_nobody(["serve", "tests.apps.star:app", "--config", str(config)]),
        2,
        "permission denied (cannot read it)",
    )


def test_ctl_without_primary(tmp_path):
    missing = tmp_path / "none.sock"
    _check(run_prefork(["ctl", "--control", str(missing), "status"]), 1, "does not exist")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: a primary that died
    _check(run_prefork(["ctl", "--control", str(stale), "status"]), 1, "no primary is listening")
    _check(run_prefork(["ctl", "--control", str(stale), "reload"]), 1, "no primary is listening")


def test_control_socket_is_private_and_refuses_other_uids(prefork_cmd):  # noqa: F811
    folder = _open_dir()
    os.chmod(folder, 0o1777)  # as /tmp: everyone may enter and create, only the owner may replace
    control = os.path.join(folder, "c.sock")
    cmd = prefork_cmd(
        "serve",
        "tests.apps.star:app",
        "--workers",
        "1",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--control",
        control,
    )
    cmd.wait_ready()
    cmd.track_workers(control)
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as another uid")

    # the client refuses, before connecting, a socket that another user owns
    _check(_main_as_nobody(["ctl", "--control", control, "status"]), 1,
           f"control socket {control} belongs to uid 0")
    os.chmod(control, 0o666)  # even with the file opened up, the primary checks the peer's uid

    def raw_stop() -> int:
        import json

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(control)
            s.sendall(b'{"cmd": "stop"}\n')
            reply = json.loads(s.makefile("rb").readline())
        print(f"prefork: error: {reply['error']}", file=sys.stderr)
        return 1

    _check(_run_as_nobody(raw_stop), 1, f"permission denied: uid {NOBODY} may not control this primary")
    assert cmd.proc.poll() is None  # the refused stop did nothing
    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    assert cmd.finish() == 0
