"""A Starlette app for the CLI tests: plain text, a slow route, a WebSocket echo and lifespan hooks."""

import asyncio
import contextlib
import os
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute


def _note(event: str) -> None:
    path = os.environ.get("APP_LIFESPAN_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {os.getpid()}\n")


@contextlib.asynccontextmanager
async def lifespan(app):
    _note("startup")
    yield
    _note("shutdown")


async def home(request):
    return PlainTextResponse(f"hello from starlette {os.getpid()}\n")


async def slow(request):
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return PlainTextResponse(f"slow done {os.getpid()}\n")


async def block(request):
    """Blocks the event loop (a bug in an app): the heartbeat goes unanswered."""
    time.sleep(float(request.query_params.get("s", "5")))
    return PlainTextResponse("unblocked\n")


async def hello_print(request):
    print("printed by the app")
    return PlainTextResponse("printed\n")


async def info(request):
    return JSONResponse({"pid": os.getpid(), "root_path": request.scope.get("root_path", ""),
                         "client": request.client.host if request.client else None,
                         "scheme": request.url.scheme})


async def echo(websocket):
    await websocket.accept()
    while True:
        try:
            text = await websocket.receive_text()
        except Exception:
            return
        await websocket.send_text(f"echo: {text}")


app = Starlette(routes=[Route("/", home), Route("/slow", slow), Route("/info", info), Route("/block", block),
                        Route("/print", hello_print),
                        WebSocketRoute("/ws", echo)], lifespan=lifespan)


def create_app():
    """For --factory."""
    return app
