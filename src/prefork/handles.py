"""The primary's shared server handles, keyed as Node keys them (family, address, port, policy).

The first worker that listens on a key makes the primary bind; later ones share the handle; when
the last worker closes its listener the primary closes the socket. A bind error goes back to the
worker's `listen()` as the OSError a plain bind raises. Each handle's scheduling lives in policies/.
"""

from __future__ import annotations

import errno
from typing import Any

from .policies import make_handle
from .policies.base import Handle, close_fds


class Servers:
    """Every handle of the primary, by key and by id; routes the workers' server messages."""

    def __init__(self, primary: Any) -> None:
        self.primary = primary
        self.by_key: dict[tuple[Any, ...], Handle] = {}
        self.by_id: dict[int, Handle] = {}
        self._next_id = 1
        primary.internal.update({"listen": self._on_listen, "x": self._on_close})

    def _on_listen(self, worker: Any, msg: dict[str, Any], fds: list[int]) -> None:
        """A worker's listen() (checked by protocol.py): always answered, with the handle or
        with the error, whatever it is, so that the call never waits forever."""
        seq = msg["seq"]
        try:
            handle = self._handle_for(msg)
            reply, out_fds = handle.add(worker, fds)
        except Exception as exc:
            close_fds(fds)
            self.refuse(worker, seq, exc)
            return
        reply.update({"t": "L", "seq": seq, "h": handle.id, "name": handle.sockname})
        worker._channel.send_internal(reply, out_fds)

    def refuse(self, worker: Any, seq: int, exc: Exception) -> None:
        """Answer a listen() call with its error (an OSError's own errno, else EINVAL)."""
        if isinstance(exc, OSError) and exc.errno:
            err = [exc.errno, exc.strerror or str(exc)]
        else:
            err = [errno.EINVAL, f"{type(exc).__name__}: {exc}"]
        channel = worker._channel
        if channel is not None and not channel.closed:
            channel.send_internal({"t": "L", "seq": seq, "err": err})

    def _handle_for(self, msg: dict[str, Any]) -> Handle:
        family, addr, policy = msg["family"], msg["addr"], msg["policy"]
        key = (family, addr if isinstance(addr, str) else tuple(addr), policy)
        handle = self.by_key.get(key)
        if handle is None or handle.closed or handle.stopped:
            hid, self._next_id = self._next_id, self._next_id + 1
            handle = make_handle(policy, self, hid, family, addr, msg.get("backlog") or 511)
            handle.key = key  # the key asked for (a unix path under reuseport is a shared handle)
            self.by_key[key], self.by_id[hid] = handle, handle
        elif handle.refusing:  # a worker listens again after a stop began (disconnect(), then fork())
            handle.accept_new()
        return handle

    def _on_close(self, worker: Any, msg: list[Any], fds: list[int]) -> None:
        handle = self.by_id.get(msg[1])
        if handle is not None:
            handle.remove(worker)
            self.close_if_unused(handle)

    def worker_leaving(self, worker: Any) -> None:
        """A draining worker gets no new connection from now on."""
        for handle in list(self.by_id.values()):
            handle.pause(worker)

    def worker_gone(self, worker: Any) -> None:
        """Its channel closed: whatever it was handed and had not taken goes to the others."""
        for handle in list(self.by_id.values()):
            if handle.has(worker):
                handle.remove(worker)
                if worker.exited_after_disconnect:
                    self.close_if_unused(handle)

    def close_if_unused(self, handle: Handle) -> None:
        if not handle.workers:
            handle.close()
            self.by_id.pop(handle.id, None)
            if self.by_key.get(handle.key) is handle:
                del self.by_key[handle.key]

    def stop_accepting(self) -> None:
        for handle in list(self.by_id.values()):
            handle.stop_accepting()

    def close_unused(self) -> None:
        for handle in list(self.by_id.values()):
            self.close_if_unused(handle)

    def any_open(self) -> bool:
        return bool(self.by_id)

    def close_all(self) -> None:
        for handle in list(self.by_id.values()):
            handle.close()
        self.by_id.clear()
        self.by_key.clear()

