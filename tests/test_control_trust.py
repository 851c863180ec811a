"""`prefork ctl` checks who it talks to before it sends anything (src/prefork/control.py): the folder of
the control socket, the socket file's owner and the server's uid (SO_PEERCRED). A fake primary, run as
uid nobody where that matters, answers anything; it must receive no request. Also: `serve` names the
owner of a control folder that another user made first."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cli_helpers import free_port, run_prefork

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")

# A fake primary that obeys every request. `how`: "me" binds and listens as the test's user; "nobody"
# binds as nobody (the socket file is nobody's); "listen-as-nobody" binds as the test's user and then
# listens as nobody (the file is ours, the server's SO_PEERCRED uid is nobody's).
FAKE = r"""
import os, socket, sys
path, how = sys.argv[1], sys.argv[2]

def drop():
    os.setgid(65534); os.setgroups([]); os.setuid(65534)

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if how == "nobody":
    drop()
s.bind(path)
if how == "listen-as-nobody":
    drop()
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    print("got", repr(data), flush=True)
    try:
        c.sendall(b'{"ok": true, "message": "fake primary obeyed", "status": {"workers": []}}\n')
    except OSError:
        pass
    c.close()
"""


class Fake:
    def __init__(self, path: str, how: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAKE, path, how], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd="/", start_new_session=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.strip() == "listening", line + self.output()

    def output(self) -> str:
        self.proc.kill()
        self.proc.wait(10)
        return self.proc.stdout.read() if self.proc.stdout else ""


@pytest.fixture
def fakes():
    started: list[Fake] = []

    def start(path: str, how: str) -> Fake:
        fake = Fake(path, how)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.proc.kill()
        fake.proc.wait(10)
        if fake.proc.stdout:
            fake.proc.stdout.close()


@pytest.fixture
def base():
    """A folder in /tmp that uid nobody may traverse (pytest's tmp_path is not)."""
    folder = tempfile.mkdtemp(prefix="prefork-trust-")
    os.chmod(folder, 0o711)
    yield Path(folder)
    subprocess.run(["rm", "-rf", folder], check=False, timeout=30)


def _refused(result, pattern: str, fake: Fake) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("prefork: error:"), out
    assert pattern in errors[0], out
    assert "fake primary obeyed" not in out
    seen = fake.output()
    assert "got b'{" not in seen, f"the request reached the fake primary:\n{seen}"


@ROOT_ONLY
def test_default_folder_made_by_another_user(base, fakes):
    folder = base / "prefork"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    fake = fakes(str(folder / "prefork.sock"), "nobody")
    env = {"XDG_RUNTIME_DIR": str(base)}  # the default folder is then base/prefork
    for action in (["stop"], ["scale", "3"]):
        result = run_prefork(["ctl", *action], env=env)
        assert result.returncode == 1 and "belongs to uid 65534" in result.stderr, result
    _refused(run_prefork(["ctl", "status"], env=env), f"control folder {folder} belongs to uid 65534", fake)


@ROOT_ONLY
def test_serve_names_the_owner_of_the_default_folder(base):
    folder = base / "prefork"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    result = run_prefork(["serve", "tests.apps.star:app", "--workers", "1", "--bind",
                          f"127.0.0.1:{free_port()}"], env={"XDG_RUNTIME_DIR": str(base)})
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("prefork: error:")]
    assert len(errors) == 1, result.stderr
    assert f"control folder {folder} belongs to uid 65534" in errors[0], result.stderr
    assert "pass --control PATH" in errors[0]
    assert "[worker" not in result.stdout + result.stderr  # stopped before starting any worker


def test_default_folder_writable_by_others(base, fakes):
    folder = base / "prefork"
    folder.mkdir()
    os.chmod(folder, 0o777)
    fake = fakes(str(folder / "prefork.sock"), "me")
    _refused(run_prefork(["ctl", "stop"], env={"XDG_RUNTIME_DIR": str(base)}),
             "is writable by other users (mode 0777, 0700 expected)", fake)


@ROOT_ONLY
def test_explicit_socket_owned_by_another_user(base, fakes):
    folder = base / "theirs"
    folder.mkdir(mode=0o755)
    os.chown(folder, NOBODY, NOBODY)
    path = str(folder / "c.sock")
    fake = fakes(path, "nobody")
    _refused(run_prefork(["ctl", "--control", path, "stop"]), f"control socket {path} belongs to uid 65534",
             fake)


def test_explicit_folder_writable_by_all_and_not_sticky(base, fakes):
    folder = base / "open"
    folder.mkdir()
    os.chmod(folder, 0o777)
    path = str(folder / "c.sock")
    fake = fakes(path, "me")
    _refused(run_prefork(["ctl", "--control", path, "status"]), "writable by every user (mode 0777)", fake)
    os.chmod(folder, 0o1777)  # sticky, as /tmp: others cannot replace our socket
    fake2 = fakes(path + "2", "me")
    result = run_prefork(["ctl", "--control", path + "2", "reload"])
    assert result.returncode == 0 and "fake primary obeyed" in result.stdout, result
    assert "got b'{" in fake2.output()


@ROOT_ONLY
def test_server_of_another_uid_behind_our_socket_file(base, fakes):
    folder = base / "mine"
    folder.mkdir(mode=0o700)
    path = str(folder / "c.sock")
    fake = fakes(path, "listen-as-nobody")
    assert os.stat(path).st_uid == os.getuid()
    started = time.monotonic()
    _refused(run_prefork(["ctl", "--control", path, "stop"]),
             f"the process behind control socket {path} runs as uid 65534", fake)
    assert time.monotonic() - started < 15

