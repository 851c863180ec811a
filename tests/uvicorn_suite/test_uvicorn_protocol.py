"""uvicorn's tests/protocols/test_http.py (the installed uvicorn's, fetched by uvicorn_upstream.py),
every test of it that takes `http_protocol_cls`, run with prefork's protocol class too (conftest.py)."""

from __future__ import annotations

import inspect

from . import uvicorn_upstream

_upstream = uvicorn_upstream.load()  # imported once already by conftest.py
pytestmark = _upstream.pytestmark
for _name, _test in vars(_upstream).items():
    if _name.startswith("test_") and "http_protocol_cls" in inspect.signature(_test).parameters:
        globals()[_name] = _test
