"""--env-file: a dotenv file read by the primary before it starts workers (they inherit the variables).

uvicorn reads it with python-dotenv, which `prefork[serve]` does not bring in (uvicorn's [standard]
does), so here is the same format: `KEY=VALUE` lines, an optional `export `, `#` comments, blank
lines; 'single quotes' keep the text as it is; "double quotes" understand \\n \\t \\" \\\\ and, like an
unquoted value, ${VAR} and ${VAR:-default} (from the variables already set or earlier lines). As
uvicorn does (override=False), a variable already in the environment wins over the file.
"""

from __future__ import annotations

import os
import re

from .config import UsageError, read_text

MAX_BYTES = 1 << 20  # an env file is small: --env-file /dev/zero must not fill the memory
_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*")
_EXPAND = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def read(path: str) -> dict[str, str]:
    """The file's variables, expanded; a UsageError naming the file and line for a bad one."""
    where = f"--env-file {path}"
    text = read_text(path, where, MAX_BYTES, "an env file") or ""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise UsageError(f"{where} line {number}: expected KEY=VALUE, not {line.strip()[:60]!r}")
        try:
            values[m.group(1)] = _value(m.group(2), values)
        except ValueError as exc:
            raise UsageError(f"{where} line {number}: {exc}") from None
    return values


def _value(text: str, seen: dict[str, str]) -> str:
    if text[:1] == "'":
        end = text.find("'", 1)
        if end < 0:
            raise ValueError("a single quote is not closed")
        _only_comment(text[end + 1:])
        return text[1:end]
    if text[:1] == '"':
        out, i = [], 1
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                out.append(_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
                continue
            if c == '"':
                _only_comment(text[i + 1:])
                return _expand("".join(out), seen)
            out.append(c)
            i += 1
        raise ValueError("a double quote is not closed")
    return _expand(re.sub(r"\s+#.*$", "", text), seen)


def _only_comment(rest: str) -> None:
    if rest.strip() and not rest.strip().startswith("#"):
        raise ValueError(f"unexpected text after the quoted value: {rest.strip()[:40]!r}")


def _expand(text: str, seen: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        found = os.environ.get(name, seen.get(name))
        return found if found is not None else (m.group(2) or "")
    return _EXPAND.sub(one, text)


def load(path: str) -> int:
    """Set the file's variables that the environment does not already have; how many were set."""
    count = 0
    for name, value in read(path).items():
        if name not in os.environ:
            os.environ[name] = value
            count += 1
    return count
