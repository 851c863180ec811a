"""`setup_primary` settings: validation, defaults and the command line each worker starts with."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from .channel import DEFAULT_MAX_MESSAGE, MAX_PAYLOAD, MIN_MESSAGE, set_max_message

KNOWN = {
    "exec": "script the workers run (default: the primary's own main script)",
    "args": "arguments given to that script (default: the primary's sys.argv[1:])",
    "exec_argv": "interpreter options (default: the primary's own, e.g. -X, -W, -O)",
    "cwd": "working folder of the workers",
    "silent": "pipe the workers' stdout and stderr to the primary instead of inheriting them",
    "serialization": "'json' (default) or 'pickle'",
    "module": "run `python -m MODULE` instead of a script",
    "start": "'spawn' (default: a fresh interpreter runs the script) or 'fork' (os.fork, then `target`)",
    "target": "with start='fork': the function a forked worker runs (the app is already imported)",
    "max_message_size": "largest message in bytes either side of a channel accepts (default: 64 MiB)",
}


class Settings(Mapping[str, Any]):
    """Read-only mapping of the settings in force; `update` validates and fills in defaults."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def update(self, opts: Mapping[str, Any]) -> None:
        unknown = sorted(set(opts) - set(KNOWN))
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}")
        merged = {**self._values, **opts}
        if "exec" in opts and "module" not in opts:
            merged.pop("module", None)
        _validate(merged)
        self._values = _with_defaults(merged)
        # primary.fork() makes the primary's channels without a limit: they take this one
        set_max_message(self._values["max_message_size"])

    def argv(self) -> list[str]:
        """The command that starts one worker."""
        v = self._values
        target = ["-m", v["module"]] if v.get("module") else [v["exec"]]
        return [sys.executable, *v["exec_argv"], *target, *v["args"]]


def _validate(v: dict[str, Any]) -> None:
    if v.get("start", "spawn") not in ("spawn", "fork"):
        raise ValueError(f"start must be 'spawn' or 'fork', not {v['start']!r}")
    if v.get("start") == "fork" and not callable(v.get("target")):
        raise TypeError("start='fork' needs target=<a function the forked worker runs>")
    if v.get("serialization", "json") not in ("json", "pickle"):
        raise ValueError(f"serialization must be 'json' or 'pickle', not {v['serialization']!r}")
    size = v.get("max_message_size", DEFAULT_MAX_MESSAGE)
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"max_message_size must be a number of bytes (an int), not {size!r}")
    if not MIN_MESSAGE <= size <= MAX_PAYLOAD:
        raise ValueError(f"max_message_size must be from {MIN_MESSAGE} to {MAX_PAYLOAD} bytes, not {size}")
    for key in ("args", "exec_argv"):
        if key in v and (isinstance(v[key], str) or not all(isinstance(a, str) for a in v[key])):
            raise TypeError(f"setting {key!r} must be a list of strings")
    if v.get("exec") is not None and not v.get("module"):
        if not os.path.isfile(os.path.join(v.get("cwd") or "", v["exec"])):
            raise FileNotFoundError(f"exec: no such script {v['exec']!r}")
    if v.get("cwd") is not None and not os.path.isdir(v["cwd"]):
        raise FileNotFoundError(f"cwd: no such folder {v['cwd']!r}")


def _with_defaults(v: dict[str, Any]) -> dict[str, Any]:
    out = dict(v)
    if out.get("exec") is None and not out.get("module"):
        out["exec"], module = _main_script()
        if module:
            out["module"] = module
    out.setdefault("module", None)
    out["args"] = list(out.get("args", sys.argv[1:]))
    out["exec_argv"] = list(out.get("exec_argv", subprocess._args_from_interpreter_flags()))
    out.setdefault("cwd", None)
    out["silent"] = bool(out.get("silent", False))
    out.setdefault("serialization", "json")
    out.setdefault("max_message_size", DEFAULT_MAX_MESSAGE)
    out.setdefault("start", "spawn")
    out.setdefault("target", None)
    return out


def _main_script() -> tuple[str | None, str | None]:
    """The primary's own script, and its module name when it was started with `python -m`."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return getattr(main, "__file__", None), name
    path = getattr(main, "__file__", None)
    if path is None and sys.argv and sys.argv[0] not in ("", "-c", "-"):
        path = sys.argv[0]
    return (os.path.abspath(path) if path else None), None
