"""An app that holds 80 MiB from its import (shared by preloaded workers) and grows on /grow."""

SHARED = bytearray(80 << 20)
SHARED[::4096] = b"x" * len(SHARED[::4096])  # touch every page: resident in the template
grown: list[bytearray] = []


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/grow":
        block = bytearray(80 << 20)
        block[::4096] = b"y" * len(block[::4096])  # the worker's own pages
        grown.append(block)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\n"})
