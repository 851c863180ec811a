"""SCHED_REUSEPORT: one SO_REUSEPORT listening socket ("slot") per worker; the kernel balances by hash.

Closing a SO_REUSEPORT socket resets the connections queued on it (unless the kernel has
net.ipv4.tcp_migrate_req=1). So the primary owns every slot and gives each worker a duplicate:
when a worker stops, its copy closes but the slot stays open in the primary, and the slot (with
its queue intact) is passed at once to a live worker, or to the next worker that listens. A slot
is closed only when no worker listens on the address any more, i.e. when the server shuts down.

The kernel keeps hashing new connections to every slot of the group, owned or not: a slot nobody
accepts from holds its share of them until their clients give up. So no slot may stay without an
owner while a worker listens: one that listens takes every slot left orphaned (after a scale-down
and a crash the slots outnumber the workers), in its listen() reply.
"""

from __future__ import annotations

from typing import Any

from ..binding import adopted_slots, bind_socket
from .base import Handle, close_fds, wire_name


class ReusePortHandle(Handle):
    policy = "reuseport"

    def __init__(self, servers: Any, hid: int, family: int, addr: Any, backlog: int) -> None:
        super().__init__(servers, hid, family, addr, backlog)
        self.slots: dict[int, Any] = {}  # slot id -> socket
        self.owner: dict[int, int | None] = {}  # slot id -> worker id
        self.leaving: set[int] = set()  # draining workers: heirs only when nobody else is left
        self._next_slot = 0
        self._new_slot()  # binds now, so a bind error reaches the first worker's listen()
        for _ in range(adopted_slots(family, addr)):  # a hot upgrade's: all served (upgrade.py)
            self._new_slot()

    def _new_slot(self) -> int:
        addr = self.addr
        if self.sockname is not None and not isinstance(addr, str):
            addr = (addr[0], self.sockname[1])  # port 0: every slot on the port the first got
        sock = bind_socket(self.family, addr, self.backlog, reuseport=True)
        if self.sockname is None:
            self.sockname = wire_name(sock)
        sid, self._next_slot = self._next_slot, self._next_slot + 1
        self.slots[sid], self.owner[sid] = sock, None
        return sid

    def _slots_of(self, wid: int) -> list[int]:
        return [sid for sid, owner in self.owner.items() if owner == wid]

    def add(self, worker: Any, link: list[int]) -> tuple[dict[str, Any], list[int]]:
        close_fds(link)
        self.workers[worker.id] = worker
        self.leaving.discard(worker.id)
        sid = self._free_slot()
        if sid is None:
            sid = self._spare_slot()
        if sid is None:
            sid = self._new_slot()
        self.owner[sid] = worker.id
        mine = [sid]
        while (orphan := self._free_slot()) is not None:  # nobody accepts there: this one will
            self.owner[orphan] = worker.id
            mine.append(orphan)
        return {"mode": "s", "slots": mine}, [self.slots[s].fileno() for s in mine]

    def _free_slot(self) -> int | None:
        return next((sid for sid, owner in self.owner.items() if owner is None), None)

    def _spare_slot(self) -> int | None:
        """A slot a worker holds on top of its own: take it back for the newcomer."""
        for wid in self.workers:
            mine = self._slots_of(wid)
            if len(mine) > 1:
                sid = mine[-1]
                self.workers[wid]._channel.send_internal(["-", self.id, sid])
                self.owner[sid] = None
                return sid
        return None

    def sockets(self) -> list[Any]:
        return list(self.slots.values())

    def pause(self, worker: Any) -> None:
        self.leaving.add(worker.id)

    def remove(self, worker: Any) -> None:
        super().remove(worker)
        self.leaving.discard(worker.id)
        for sid in self._slots_of(worker.id):
            self.owner[sid] = None
        for sid in [sid for sid, owner in self.owner.items() if owner is None]:
            self._adopt(sid)  # its own, and any an earlier adoption could not place

    def _adopt(self, sid: int) -> None:
        """Give an orphaned slot to the live worker with the fewest, so its queue keeps moving
        (one still serving before one draining, which would soon hand it on again). With none,
        it waits for the next worker that listens (add)."""
        live = [w for w in self.workers.values() if w.is_connected()]
        live.sort(key=lambda w: (w.id in self.leaving, len(self._slots_of(w.id))))
        for heir in live:
            if heir._channel.send_internal(["+", self.id, sid], [self.slots[sid].fileno()]):
                self.owner[sid] = heir.id
                return

    def close(self) -> None:
        if not self.closed:
            super().close()
            for sock in self.slots.values():
                sock.close()
            self.slots.clear()
