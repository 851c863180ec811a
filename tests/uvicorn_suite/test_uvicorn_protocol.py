"""uvicorn's tests/protocols/test_http.py (the installed uvicorn's, fetched by uvicorn_upstream.py),
every test of it that takes `http_protocol_cls`, run with prefork's protocol class too (conftest.py)."""

from __future__ import annotations

from . import uvicorn_upstream

pytestmark = uvicorn_upstream.load().pytestmark  # anyio: each test runs in an event loop
globals().update(uvicorn_upstream.suite_tests())
