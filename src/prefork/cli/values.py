"""Converters for the deploy options (--hooks, --umask, --name, --reload-*): each takes what a flag,
a PREFORK_* variable or the config file gave and returns the checked value or raises ValueError
with the accepted form (config.py turns it into one line naming the option, exit 2)."""

from __future__ import annotations

import re
from typing import Any

from .config import to_str

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def to_module(value: Any) -> str:
    """A dotted module name (`myproject.hooks`), or a path to a .py file."""
    text = to_str(value).strip()
    if text.endswith(".py") or "/" in text:
        return text
    if not _MODULE.fullmatch(text):
        raise ValueError(f"expected a module name such as myproject.hooks, or a file.py, not {value!r}")
    return text


def to_umask(value: Any) -> int:
    """0o22, '022', '0o027' or 18: the mask's bits (0 to 0o777). A string is read as octal, as
    gunicorn and `umask` do; an int from a config file is taken as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        mask = value
    else:
        text = to_str(value).strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(f"expected an octal mask such as 022 or 0o027, not {value!r}")
        mask = int(text, 8)
    if not 0 <= mask <= 0o777:
        raise ValueError(f"expected a mask from 000 to 777 (octal), not {value!r}")
    return mask


def to_name(value: Any) -> str:
    """A short name for process titles, log lines and the control socket's file name."""
    text = to_str(value).strip()
    if not _NAME.fullmatch(text):
        raise ValueError(f"expected 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter or "
                         f"digit), not {value!r}")
    return text


def to_paths(value: Any) -> list[str]:
    """Paths or glob patterns (--reload-dir, --reload-include, repeatable; a list in the config file,
    lines or commas in a PREFORK_* variable)."""
    items = value if isinstance(value, list) else re.split(r"[\n,]", to_str(value))
    out = [to_str(item).strip() for item in items]
    if any(not item for item in out) and isinstance(value, list):
        raise ValueError("expected a path or pattern, not an empty one")
    return [item for item in out if item]
