"""ASGI apps that fail at each point of a response, and a server-sent-events stream, chosen by path
(tests/test_http_errors.py)."""

import asyncio

from tests.apps.lifespan import lifespan

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    path = scope["path"]
    if path == "/hello":  # as tests/apps/hello.py
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")]})
        await send({"type": "http.response.body", "body": b"hello world\n"})
    elif path == "/raise-after-start":
        await send(START)
        raise RuntimeError("failed after the start")
    elif path == "/raise-after-yield":  # the held head went out at the end of the iteration
        await send(START)
        await asyncio.sleep(0.2)
        raise RuntimeError("failed after the head was flushed")
    elif path == "/trailers-after-yield":  # trailers are not supported (as uvicorn): the app fails
        await send({**START, "trailers": True})
        await asyncio.sleep(0.2)
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})
    elif path == "/second-start":
        await send(START)
        await send(START)
    elif path == "/too-long":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
        await send({"type": "http.response.body", "body": b"hello"})
    elif path == "/raise-after-body":
        await send(START)
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("failed after bytes went out")
    elif path == "/sse":  # headers at once, the first event a second later
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        await asyncio.sleep(1.0)
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
