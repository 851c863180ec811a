"""An ASGI app for tests/test_launch.py (--user/--group/--umask): it answers with who its worker
process runs as: uid, gid, supplementary groups and umask, as JSON."""

import json
import os


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "umask": _umask(),
                       "pid": os.getpid()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
