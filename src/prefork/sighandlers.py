"""What the supervisor does on each signal: one `handle_<sig>` per signal, as gunicorn's arbiter.

A signal handler itself only wakes the primary's loop (signals.py); these run on the loop thread
afterwards, with the rest of the supervisor (supervisor.py, which mixes this class in).
"""

from __future__ import annotations

from typing import Any


class SignalHandlers:
    """Mixed into Supervisor: HUP reloads, TERM stops (after --shutdown-delay), INT drains (twice:
    at once), USR1 reopens the logs, USR2 upgrades the primary, TTIN/TTOU add or remove a worker."""

    # the supervisor's, for type checkers
    rolling: Any
    shutdown_delay: float
    stopping: bool
    delaying: bool
    primary: Any
    watchers: list[Any]
    slots: list[Any]
    exit_code: int
    _sigints: int
    log: Any
    tell: Any
    _stop: Any
    _scale: Any

    def handle_hup(self) -> None:
        self.rolling.reload()

    def handle_term(self) -> None:
        self._stop_after_delay("SIGTERM")

    def _stop_after_delay(self, why: str) -> None:
        """Graceful stop; with a shutdown delay, first report not ready and serve on for that long
        (a load balancer or Kubernetes stops sending meanwhile), then drain. A second one drains."""
        if self.shutdown_delay and not self.stopping and not self.delaying:
            self.delaying = True
            self.log(f"{why}: not ready any more; serving for {self.shutdown_delay:g} s more, "
                     "then draining (--shutdown-delay)")
            self.tell("stopping")
            self.primary.loop.call_later(self.shutdown_delay, self._delay_over)
            return
        self._stop(True)

    def _delay_over(self) -> None:
        if not self.stopping:
            self.log("shutdown delay over: draining the workers")
            self._stop(True)

    def handle_usr1(self) -> None:
        """Reopen the log files (logrotate): whoever owns them watches `reopen`."""
        self.tell("reopen")

    def handle_usr2(self) -> None:
        """Hot upgrade of the primary: whoever can do it (upgrade.py) watches `upgrade`."""
        if not any(hasattr(w, "on_upgrade") for w in self.watchers):
            self.log("SIGUSR2: no hot upgrade here (only the prefork command's primary does it)")
        self.tell("upgrade")

    def handle_int(self) -> None:
        """First Ctrl-C drains; a second one stops at once."""
        self._sigints += 1
        if self._sigints == 1:
            self.log("stopping gracefully (Ctrl-C again to stop at once)")
            self._stop(True)
        else:
            self.exit_code = 130
            self._stop(False)

    def handle_ttin(self) -> None:
        self._scale(len(self.slots) + 1)

    def handle_ttou(self) -> None:
        self._scale(max(1, len(self.slots) - 1))

