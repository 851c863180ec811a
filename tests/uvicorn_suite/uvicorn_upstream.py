"""uvicorn's own tests, fetched from the package index for the installed uvicorn: its source
distribution, pinned by version and sha256, unpacked (only the files the suite needs) into
tests/uvicorn_suite/.upstream/ (ignored by git). Nothing of uvicorn's is kept in the repository."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import os
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

# version -> (sdist URL on files.pythonhosted.org, its sha256, from https://pypi.org/simple/uvicorn/).
# pyproject.toml bounds uvicorn below the next minor; a newer uvicorn needs its line here.
SDISTS = {
    "0.54.0": (
        "https://files.pythonhosted.org/packages/da/34/"
        "30e9280707135d2cfc589dfff3cb796bd07a3aeb1a3e415ba09dd89d7bb4/uvicorn-0.54.0.tar.gz",
        "a2e33cbfaa0306f8e6b0c13e0cb89d7d7a2da3e62b90c66e18c33d9807b28620",
    ),
    "0.55.0": (
        "https://files.pythonhosted.org/packages/60/32/"
        "ed1b49f4eca183639f1048bc48494c8e24386c865dce1357cd108d5871ea/uvicorn-0.55.0.tar.gz",
        "b65ae5f0f30cdcbc26a104b93d7d19723aa5f46fec3915a6c247d5795449331c",
    ),
}
NEEDED = (  # test_http.py and what it imports (tests.response; fixtures of tests/conftest.py)
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/response.py",
    "tests/protocols/__init__.py",
    "tests/protocols/test_http.py",
)
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".upstream"
TIMEOUT_S = 60


class UpstreamError(Exception):
    """The suite cannot be had; the message is one line for a person."""


def installed_version() -> str:
    import uvicorn

    return uvicorn.__version__


def suite_version(version: str) -> str:
    """The pinned release whose tests run for `version`: itself, else the newest pinned one of the
    same minor (pyproject.toml's range lets patch releases in; they keep their minor's tests)."""
    if version in SDISTS:
        return version
    minor = version.split(".")[:2]
    same = [v for v in SDISTS if v.split(".")[:2] == minor]
    return max(same, key=lambda v: [int(p) if p.isdigit() else -1 for p in v.split(".")]) if same else version


def fetch(version: str) -> Path:
    """The directory holding uvicorn `version`'s tests/ (downloaded and checked once, then reused)."""
    if version not in SDISTS:
        known = ", ".join(sorted(SDISTS))
        raise UpstreamError(f"uvicorn {version} is installed but tests/uvicorn_suite/uvicorn_upstream.py "
                            f"pins only {known}: install one of those, or add {version}'s sdist URL "
                            "and sha256 to SDISTS")
    url, sha256 = SDISTS[version]
    root = CACHE / f"uvicorn-{version}"
    stamp = root / "sha256"
    if stamp.exists() and stamp.read_text().strip() == sha256:
        return root
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
            data = answer.read()
    except OSError as exc:
        raise UpstreamError(f"cannot download uvicorn {version}'s sdist from {url}: {exc}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise UpstreamError(f"uvicorn {version}'s sdist from {url} has sha256 {got}, expected {sha256}")
    CACHE.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"uvicorn-{version}.", dir=CACHE))
    prefix = f"uvicorn-{version}/"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in NEEDED:
            member = tar.getmember(prefix + name)  # KeyError: the sdist changed shape (the hash says not)
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None, name
            target.write_bytes(source.read())
    (work / "sha256").write_text(sha256 + "\n")
    try:
        os.rename(work, root)  # atomic: a concurrent run sees all or nothing
    except OSError:  # another run got there first (or a stale copy without its stamp): use it
        if not (stamp.exists() and stamp.read_text().strip() == sha256):
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            os.rename(work, root)
    return root


_loaded: list[ModuleType] = []


def load() -> ModuleType:
    """uvicorn's tests.protocols.test_http, imported from the fetched copy (its `tests` package). The
    name `tests` is given back afterwards: prefork's own tests import tests.apps.* by that name."""
    if _loaded:
        return _loaded[0]
    root = str(fetch(suite_version(installed_version())))
    if "tests" in sys.modules:
        raise UpstreamError(f"a module named 'tests' is already imported ({sys.modules['tests']!r}): "
                            "uvicorn's suite needs that name for its own package while it loads")
    sys.path.insert(0, root)
    try:
        importlib.import_module("tests.conftest")
        _loaded.append(importlib.import_module("tests.protocols.test_http"))
    finally:
        sys.path.remove(root)
        for name in [n for n in sys.modules if n == "tests" or n.startswith("tests.")]:
            _loaded.append(sys.modules.pop(name))  # kept alive here: their functions use their globals
    return _loaded[0]


def suite_tests() -> dict[str, Any]:
    """name -> function: the tests of test_http.py that take `http_protocol_cls` (the ones run here)."""
    return {name: test for name, test in vars(load()).items()
            if name.startswith("test_") and "http_protocol_cls" in inspect.signature(test).parameters}


def conftest() -> ModuleType:
    """uvicorn's tests/conftest.py, loaded by load()."""
    load()
    return next(m for m in _loaded if m.__name__ == "tests.conftest")
