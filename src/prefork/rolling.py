"""Replacing workers with no downtime: rolling reloads (HUP, `ctl reload`) and recycling.

A slot's replacement is started beside its worker (Slot.incoming, supervisor.py); once it is ready
it becomes the slot's worker and the old one drains. If it fails, only this replacement fails: the
old worker keeps serving and the reload says why (`status["reload"]`). Runs on the primary's loop
thread, as all of the supervisor does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .supervisor import Member, Slot, Supervisor


class Rolling:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.running = False
        self.again = False
        self.status: dict[str, Any] = {"state": "none"}

    def replace(self, slot: Slot, why: str, done: Callable[[bool, str], None],
                held: list[Member] | None = None) -> None:
        """Give `slot` a new worker; once it is ready, drain the old one (or put it in `held`, for
        the caller to drain). If it fails, the old one keeps serving and only this replacement fails."""
        if slot.removed:  # scaled away meanwhile: nothing left to replace
            done(True, "")
            return
        if self.sup.stopping:
            done(False, "stopping")
            return
        if slot.incoming is not None:  # one replacement at a time: this one follows it
            slot.incoming.waiters.append(lambda ok, r: self.replace(slot, why, done, held))
            return
        current = slot.current
        if current is None:  # empty: start it now, with the new code
            if slot.timer is not None:
                slot.timer.cancel()
            self.sup.fill(slot)
            if slot.current is None:
                done(False, self.sup.last_error or "could not start a worker")
            else:
                slot.current.waiters.append(done)
            return
        if current.state == "starting":  # it may run the old code: replace it once it is ready
            # or start the new code once it failed (a crash loop fixed on disk): its failure is not
            # this reload's; after its exit is handled (call_soon), the slot is empty or draining
            current.waiters.append(lambda ok, r: self.replace(slot, why, done, held) if ok else
                                   self.sup.primary.loop.call_soon(self.replace, slot, why, done, held))
            return
        new, error = self.sup.fork_for(slot)
        if new is None:
            done(False, error)
            return
        slot.incoming = new

        def settled(ok: bool, reason: str) -> None:
            if slot.incoming is new:
                if not ok:
                    slot.incoming = None
                    if new.worker.id in self.sup.members:
                        self.sup.retire(new, "failed to become ready", graceful=False)
                    done(slot.removed, reason)  # a slot scaled away has nothing left to replace
                    return
                old, slot.current, slot.incoming = slot.current, new, None
                if old is not None and old.worker.id in self.sup.members:
                    if held is not None:
                        held.append(old)
                    else:
                        self.sup.retire(old, why)
            done(ok, reason)  # else the old one died meanwhile and `new` took the slot already

        new.waiters.append(settled)

    def recycle(self, member: Member, why: str) -> None:
        """max_requests, max_memory (health.py): replace a ready worker gracefully, once."""
        slot = member.slot
        if slot.current is not member or slot.incoming is not None or self.running:
            return
        self.sup.log(f"worker {member.worker.id} (pid {member.worker.process.pid}) {why}: replacing it")
        self.replace(slot, why, lambda ok, reason: None if ok else self.sup.log(
            f"could not replace worker {member.worker.id}: {reason}"))

    def reload(self) -> None:
        if self.sup.stopping:
            return
        if self.sup.holding:  # the first template is importing the code on disk right now
            self.sup.log("reload ignored: the app is still being imported for the first workers")
            return
        if self.running:
            self.again = True
            return
        self.running = True
        self.status = {"state": "running", "started": time.time()}
        self.sup.log(f"reloading {len(self.sup.slots)} worker(s), {self.sup.reload_batch} at a time")
        self.sup.tell("reloading")
        if self.sup.code is not None:  # serve --preload: import the new code once, in a new template
            self.status["step"] = "importing"
            self.sup.code.prepare(self._prepared)
            return
        self._reload_step(list(self.sup.slots))

    def _prepared(self, ok: bool, why: str) -> None:
        if not ok:
            self._reload_finished(False, why)
            return
        self.status["step"] = "rolling"
        self._reload_step(list(self.sup.slots))

    def _reload_step(self, todo: list[Slot]) -> None:
        todo = [slot for slot in todo if not slot.removed]
        if not todo or self.sup.stopping:
            self._reload_finished(True, "")
            return
        batch, rest = todo[: self.sup.reload_batch], todo[self.sup.reload_batch:]
        remaining = [len(batch)]
        failures: list[str] = []
        held: list[Member] = []  # the batch's old workers drain once all its new ones are ready

        def one_done(ok: bool, why: str) -> None:
            if not ok:
                failures.append(why)
            remaining[0] -= 1
            if remaining[0] == 0:
                for old in held:
                    if old.worker.id in self.sup.members:
                        self.sup.retire(old, "reload")
                if failures:
                    self._reload_finished(False, failures[0])
                else:
                    self._reload_step(rest)

        for slot in batch:
            self.replace(slot, "reload", one_done, held)

    def _reload_finished(self, ok: bool, why: str) -> None:
        self.running = False
        if self.sup.code is not None:
            self.sup.code.finished(ok)
        self.status.update(state="done" if ok else "failed", finished=time.time())
        if ok:
            self.sup.log("reload done")
        else:
            self.status["error"] = why
            self.sup.last_error = f"reload failed: {why}"
            self.sup.log(f"reload failed, the old workers keep serving: {why}")
        self.sup.reloads["ok" if ok else "failed"] += 1
        self.sup.tell("reloaded", ok, why)
        if self.again:
            self.again = False
            self.reload()
