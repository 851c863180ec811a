"""`--shutdown-delay`: on SIGTERM /readyz turns 503 at once, every request is still served for the
delay (the time a load balancer or Kubernetes takes to stop sending), then the workers drain and
the primary exits 0. Both phases are logged."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from cli_helpers import prefork_cmd  # noqa: F401
from conftest import wait_until
from test_admin import admin_get, answers, serve

DELAY = 3.0


class Load:
    """A client sending requests one after the other, each on a new connection, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                reply = httpx.get(f"http://127.0.0.1:{self.port}/", timeout=10,
                                  headers={"Connection": "close"})
                if reply.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {reply.status_code}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))

    def end(self) -> None:
        self.stop.set()
        self.thread.join(15)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("policy", ["rr", "reuseport"])
def test_requests_are_served_through_the_delay_while_readyz_is_503(
        prefork_cmd, tmp_path: Path, policy: str) -> None:  # noqa: F811
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.slow_start:app", "--policy", policy,
                             "--shutdown-delay", str(DELAY))
    cmd.wait_ready()
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    assert admin_get(admin, "/readyz") == (200, "ready\n")
    load = Load(port)
    try:
        assert wait_until(lambda: load.ok >= 5, 10)
        cmd.proc.send_signal(signal.SIGTERM)
        term = time.monotonic()
        assert wait_until(lambda: answers(admin, "/readyz") == (503, "shutting down (shutdown delay)\n"), 5)
        assert time.monotonic() - term < 2.0, "readyz did not turn 503 at once"
        cmd.expect(r"SIGTERM: not ready any more; serving for 3 s more, then draining \(--shutdown-delay\)")
        served = load.ok
        while time.monotonic() - term < DELAY - 1.0:  # the client goes on during the delay
            assert cmd.proc.poll() is None
            time.sleep(0.05)
    finally:
        load.end()
    assert load.failures == [], load.failures
    assert load.ok > served, "no request was served during the delay"
    assert "draining the workers" not in cmd.output  # still in the delay when the client stopped
    cmd.expect(r"shutdown delay over: draining the workers", 15)
    assert time.monotonic() - term >= DELAY - 0.5
    seen = answers(admin, "/readyz")  # during the drain (or already closed, if it was quick)
    assert seen is None or seen == (503, "stopping\n")
    assert cmd.finish(30) == 0
    cmd.expect(r"\[prefork\] stopped")


@pytest.mark.timeout(60)
def test_a_second_sigterm_drains_at_once(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.slow_start:app", "--shutdown-delay", "60")
    cmd.wait_ready()
    cmd.track_workers(str(tmp_path / "ctl.sock"))
    cmd.proc.send_signal(signal.SIGTERM)
    cmd.expect(r"serving for 60 s more")
    assert admin_get(admin, "/readyz")[0] == 503
    assert admin_get(admin, "/livez")[0] == 200
    cmd.proc.send_signal(signal.SIGTERM)
    assert cmd.finish(30) == 0


@pytest.mark.timeout(60)
def test_ctl_stop_waits_the_delay_too_and_now_does_not(prefork_cmd, tmp_path: Path) -> None:  # noqa: F811
    """`prefork ctl stop` is a graceful stop like SIGTERM: behind a load balancer it must not skip
    the delay; `ctl stop --now` (no drain) does."""
    from cli_helpers import run_prefork

    cmd, port, admin = serve(prefork_cmd, tmp_path, "tests.apps.slow_start:app", "--shutdown-delay", "60")
    cmd.wait_ready()
    control = str(tmp_path / "ctl.sock")
    cmd.track_workers(control)
    assert run_prefork(["ctl", "--control", control, "stop"]).returncode == 0
    cmd.expect(r"stop requested: not ready any more; serving for 60 s more")
    assert admin_get(admin, "/readyz")[0] == 503
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    assert cmd.proc.poll() is None
    assert run_prefork(["ctl", "--control", control, "stop", "--now"]).returncode == 0
    assert cmd.finish(30) == 0
