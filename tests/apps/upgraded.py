"""The app a hot upgrade switches to (tests/test_upgrade.py): its body says which app answered."""

from tests.apps.lifespan import lifespan


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"9")]})
    await send({"type": "http.response.body", "body": b"upgraded\n"})
