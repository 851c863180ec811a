"""`prefork` started the way a service manager or a container runtime starts it: behind a wrapper
(`taskset -c 0`, `systemd-socket-activate -l ...`, `unshare --pid --fork`), with descriptors passed
on (`pass_fds`) and variables of the test's choosing. Cmd's output pumping, `expect` and cleanup."""

from __future__ import annotations

import subprocess
import threading

from cli_helpers import PREFORK, ROOT, Cmd, clean_env


class Wrapped(Cmd):
    def __init__(self, prefix: list[str], args: list[str], env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.proc = subprocess.Popen([*prefix, PREFORK, *args], cwd=ROOT, env=clean_env(env),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds)
        self.pgid = self.proc.pid
        self.worker_pids: set[int] = set()
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
