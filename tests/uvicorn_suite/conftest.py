"""uvicorn's protocol suite against prefork serve's protocol class: the `http_protocol_cls` fixture
gets a "prefork" parameter beside uvicorn's own httptools class (the reference), and EXPECTED lists
every case where prefork answers otherwise, with why. Any other failure fails the run; an expected
difference that stops happening fails too (strict xfail), as does an entry that matches no test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.protocols import utils as uvicorn_utils
from uvicorn.protocols.http import httptools_impl

from . import uvicorn_upstream

try:
    _theirs = uvicorn_upstream.conftest()
except uvicorn_upstream.UpstreamError as exc:
    raise pytest.UsageError(f"uvicorn's protocol suite: {exc}") from None
anyio_backend = _theirs.anyio_backend  # uvicorn's fixtures its tests use
ws_protocol_cls = _theirs.ws_protocol_cls

_XFAIL_500 = "nothing was written yet, so prefork answers a whole 500 (onewrite.py); uvicorn had " \
             "written the head and closes"
_BAD_HEADER = "nothing was written yet, so prefork answers a whole 500 (onewrite.py); uvicorn closes " \
              "without a byte (it checks the headers after marking the response started)"
_NO_UVICORN_ACCESS = "prefork serve never logs to uvicorn.access: its access lines are written by its " \
                     "own middleware (--access-log, http/asgi.py AccessLog)"
# test function (every parametrization of it, with prefork's class) -> (what happens, why)
EXPECTED: dict[str, tuple[str, str]] = {
    "test_request_logging": ("xfail", _NO_UVICORN_ACCESS),
    "test_request_logging_escapes_quotes": ("xfail", _NO_UVICORN_ACCESS),
    "test_keepalive_timeout_with_pipelined_websocket_upgrade": (
        "skip", "uvicorn skips this for its httptools class by class name; prefork's class is httptools'"),
    "test_duplicate_start_message": ("xfail", _XFAIL_500),
    "test_partial_response_returned": ("xfail", _XFAIL_500),
    "test_invalid_header_name": ("xfail", _BAD_HEADER),
    "test_response_header_splitting": ("xfail", _BAD_HEADER),
}


class PreforkProtocol:
    """The protocol class `prefork serve` gives each connection (http/server.py `Counted`, over
    uvicorn's httptools protocol with onewrite.py's cycle), built for the Config each test makes, as
    a worker builds it for its own. Access lines go through prefork's middleware, not uvicorn.access."""

    access_lines: list[str] = []

    def __new__(cls, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> Any:
        from prefork.http.asgi import AccessLog
        from prefork.http.server import Server

        if not config.loaded:
            config.load()
        asyncio.get_running_loop()  # Server() needs one: each test runs in anyio's
        server = Server({"binds": []}, config, None)
        protocol = server._protocol_class(None)(
            config=config, server_state=server_state, app_state=app_state, _loop=_loop
        )
        protocol.access_log = False  # as in a worker: uvconfig.configure_logging mutes uvicorn.access
        protocol.app = AccessLog(protocol.app, cls.access_lines.append)
        return protocol


@pytest.fixture(params=["httptools", "prefork"])
def http_protocol_cls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    from prefork.http import onewrite, uvconfig

    # onewrite.install() swaps the cycle class uvicorn's module uses: only for prefork's cases
    monkeypatch.setattr(httptools_impl, "RequestResponseCycle", onewrite.RequestResponseCycle)
    # so does server.py's _cheap_addresses with the address functions: each case starts on uvicorn's
    for name in ("get_local_addr", "get_remote_addr"):
        monkeypatch.setattr(httptools_impl, name, getattr(uvicorn_utils, name))
    if request.param == "httptools":
        return httptools_impl.HttpToolsProtocol
    assert onewrite.install()
    monkeypatch.setattr(uvconfig, "FAST", [True])  # server.py reads it as uvconfig's FAST
    return PreforkProtocol


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("http_protocol_cls") != "prefork":
            continue
        what, why = EXPECTED.get(getattr(item, "originalname", item.name), ("", ""))
        if what:
            item.add_marker(pytest.mark.xfail(strict=True, reason=why) if what == "xfail"
                            else pytest.mark.skip(reason=why))


# tests a later uvicorn added -> the first version (major, minor) that has them
SINCE = {"test_request_logging_escapes_quotes": (0, 55)}
_installed = tuple(int("".join(c for c in part if c.isdigit()) or 0)
                   for part in uvicorn_upstream.installed_version().split(".")[:2])
_stale = sorted(name for name in set(EXPECTED) - set(uvicorn_upstream.suite_tests())
                if SINCE.get(name, (0, 0)) <= _installed)
if _stale:  # uvicorn renamed or dropped a test: the table must follow
    raise pytest.UsageError(f"uvicorn's protocol suite: EXPECTED names tests uvicorn no longer has: {_stale}")
