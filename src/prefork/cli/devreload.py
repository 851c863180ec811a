"""`prefork serve --reload` (development): a rolling reload when a watched file changes.

The files are watched by watchfiles (the `prefork[reload]` extra; uvicorn's and granian's --reload
use it too) in a daemon thread of the primary. Each batch of changes posts one log line and one
`supervisor.reload()` to the primary's loop, so a reload runs exactly as `ctl reload` or SIGHUP does
(rolling.py): one worker at a time, with any number of workers; a save during a running reload makes
one more reload after it; a save that breaks the app fails the reload, and the old workers keep
serving until the next good save. Which files count follows uvicorn: --reload-include globs (default
*.py) minus --reload-exclude globs (default .*, .py[cod], .sw.*, ~*) or folders. With --reload no
process writes .pyc files (see prepare), so a reload never imports a stale one.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from .config import UsageError

DEFAULT_INCLUDES = ("*.py",)
DEFAULT_EXCLUDES = (".*", ".py[cod]", ".sw.*", "~*")  # uvicorn's
# folders never worth a reload (caches, virtualenvs, VCS data): watchfiles' own default list
IGNORE_DIRS = frozenset(("__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", ".idea", "node_modules",
                         ".mypy_cache", ".pytest_cache", ".hypothesis", ".ruff_cache"))
# watchfiles yields a batch once no new change came for STEP_MS, or DEBOUNCE_MS after its first change.
# Its default step (50 ms) splits a burst whose writes are a little apart (`git checkout` on a busy
# machine, a formatter rewriting files one by one) into several batches; 200 ms keeps such a burst
# one batch and is not felt after a save. The debounce is watchfiles' default.
STEP_MS = 200
DEBOUNCE_MS = 1600
SHOWN_NAMES = 3  # file names in the log line; more are counted, not listed


class FileFilter:
    """Whether a changed path counts (watchfiles' watch_filter: called with (change, path))."""

    def __init__(self, roots: list[str], includes: list[str], excludes: list[str]) -> None:
        self.roots = [Path(root) for root in roots]
        self.includes = [p for p in DEFAULT_INCLUDES if p not in excludes] + list(includes)
        self.excludes = [p for p in DEFAULT_EXCLUDES if p not in includes]
        self.exclude_dirs: list[Path] = []
        for pattern in excludes:
            folder = Path(pattern)
            if folder.is_dir():
                self.exclude_dirs.append(folder.resolve())
            else:
                self.excludes.append(pattern)
        # an include with no wildcard names a file (".env"): it counts even if an exclude matches it
        self.named = [p for p in includes if not any(c in p for c in "*?[")]

    def __call__(self, change: Any, path: str) -> bool:
        file = Path(path)
        if not any(file.match(p) for p in self.includes):
            return False
        if any(str(file).endswith(name) for name in self.named):
            return True
        if any(folder in file.parents for folder in self.exclude_dirs):
            return False
        if any(file.match(p) for p in self.excludes):
            return False
        # the folders between the watched one and the file: `.git/hooks/x.py`, `.venv/.../y.py`
        return not any(part in IGNORE_DIRS or any(fnmatch(part, p) for p in self.excludes if "/" not in p)
                       for part in self._folders(file))

    def _folders(self, file: Path) -> tuple[str, ...]:
        for root in self.roots:
            if root in file.parents:
                return file.parent.relative_to(root).parts
        return file.parent.parts


class DevReload:
    """The watcher thread: start() once the supervisor runs, stop() when it has stopped."""

    def __init__(self, dirs: list[str], file_filter: FileFilter, log: Callable[[str], None]) -> None:
        self.dirs, self.filter, self.log = dirs, file_filter, log
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.supervisor: Any = None

    def start(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self.thread = threading.Thread(target=self._run, name="prefork-reload", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()  # watchfiles looks at it every STEP_MS
        if self.thread is not None:
            self.thread.join(5.0)

    def _run(self) -> None:
        """Watch until stopped. A failure (the OS's inotify watch limit, say) is logged and ends only
        the watching: first natively, then by polling; the server serves on either way."""
        for polling in (False, True):
            try:
                self._watch(polling)
                return
            except Exception as exc:
                if self.stop_event.is_set():
                    return
                then = "polling the files instead" if not polling else \
                    "no more reloads on changes (`prefork ctl reload` still works)"
                self._post(self.log, f"--reload: the file watcher failed ({type(exc).__name__}: {exc}); "
                                     f"{then}")

    def _watch(self, polling: bool) -> None:
        import watchfiles

        for changes in watchfiles.watch(*self.dirs, watch_filter=self.filter, debounce=DEBOUNCE_MS,
                                        step=STEP_MS, stop_event=self.stop_event, raise_interrupt=False,
                                        force_polling=polling or None, ignore_permission_denied=True):
            if self.stop_event.is_set():
                return
            self._post(self._reload, describe(sorted({path for _, path in changes}), self.dirs))

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.supervisor is not None and not self.supervisor.finished():
            self.supervisor.primary.loop.call_soon(fn, *args)

    def _reload(self, line: str) -> None:  # on the loop thread
        if self.supervisor.stopping:
            return
        self.log(line)
        self.supervisor.reload()  # as `ctl reload`: whatever a reload is in this mode


def describe(paths: list[str], dirs: list[str]) -> str:
    """"2 file(s) changed (app.py, lib/db.py): reloading", each path relative to its watched folder."""
    names = [_relative(path, dirs) for path in paths]
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    return f"{len(names)} file(s) changed ({shown}): reloading"


def _relative(path: str, dirs: list[str]) -> str:
    for folder in dirs:
        if path.startswith(folder.rstrip(os.sep) + os.sep):
            return path[len(folder.rstrip(os.sep)) + 1:]
    return path


def prepare(opts: dict[str, Any], log: Callable[[str], None]) -> DevReload | None:
    """The watcher --reload asks for (None without it), checked before any worker starts: a folder
    that does not exist, or watchfiles not installed, is a UsageError (one line, exit 2)."""
    given = [flag for flag, key in (("--reload-dir", "reload_dir"), ("--reload-include", "reload_include"),
                                    ("--reload-exclude", "reload_exclude")) if opts.get(key)]
    if not opts.get("reload"):
        if given:
            log(f"{', '.join(given)} without --reload: no files are watched")
        return None
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise UsageError("--reload needs watchfiles: pip install 'prefork[reload]'") from None
    dirs = []
    for folder in opts.get("reload_dir") or [opts.get("app_dir") or opts.get("chdir") or os.getcwd()]:
        path = os.path.abspath(folder)
        if not os.path.isdir(path):
            flag = "--reload-dir" if opts.get("reload_dir") else "--app-dir"
            raise UsageError(f"{flag} {folder}: no such folder (--reload watches existing folders)")
        if path not in dirs:
            dirs.append(path)
    # Python trusts a .pyc whose source has the same size and the same mtime in whole seconds: a
    # second save within a second ("v1" -> "v2") would import the first one's .pyc, the old code.
    # The workers (and templates) started from now on inherit this and compile the app's files anew.
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True  # and processes forked from this one
    return DevReload(dirs, FileFilter(dirs, opts.get("reload_include") or [],
                                      opts.get("reload_exclude") or []), log)
