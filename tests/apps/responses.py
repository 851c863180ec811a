"""ASGI responses of every shape the HTTP framing cares about, chosen by path (tests/test_responses.py)."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    path = scope["path"]
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if path == "/length":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")],
            }
        )
        await send({"type": "http.response.body", "body": b"hello"})
    elif path == "/chunks":  # no length: chunked, in three parts and an empty last one
        await send({"type": "http.response.start", "status": 200, "headers": [[b"x-list", b"pair"]]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/echo":
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
    elif path == "/big":
        data = bytes(range(256)) * 1024  # 256 KiB: past what is joined onto the head
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data[:1000], "more_body": True})
        await send({"type": "http.response.body", "body": data[1000:]})
    elif path == "/close":  # the app asks to close the connection
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"connection", b"close"), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/teapot":
        await send(
            {"type": "http.response.start", "status": 418, "headers": [(b"x-a", b"1"), (b"x-a", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"short and stout"})
    elif path == "/bad-header":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"bad name", b"x")]})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
