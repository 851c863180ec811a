"""The primary of `prefork serve` and `prefork run`: a Supervisor, the control socket, the banner."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import prefork
from prefork import _stdio, logline, sdnotify, upgrade

from . import output
from .config import UsageError


class BootWatch:
    """A worker whose app cannot start tells the primary why (internal message "boot_error").

    Before any worker was ever ready that is fatal: the problem is printed once (not once per worker)
    and everything stops. Later (a reload with a broken app) the old workers keep serving, and the
    problem is printed once per reload: not again for each worker a crash loop starts meanwhile."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self.message: str | None = None
        self.shown: str | None = None  # the last error printed since the last reload began

    def __call__(self, worker: Any, message: Any, fds: list[int]) -> None:
        text = str(message.get("message", "the app failed to start"))
        if self.supervisor.ever_ready:
            if text != self.shown:
                self.shown = text
                _traceback(message.get("traceback"))
                output.log(f"worker {worker.id} (pid {worker.process.pid}) could not start: {text}")
            return
        if self.message is None:
            self.message = text
            _traceback(message.get("traceback"))
            output.error(text)
            self.supervisor.stop(graceful=False)

    def on_reloading(self) -> None:  # a new save: its error (even the same one) is news again
        self.shown = None


def _traceback(trace: Any) -> None:
    """A worker's traceback (the app's import failed with something else than a SyntaxError or an
    ImportError, or --log-level debug): as it is, or one JSON object with --log-format json."""
    if trace and isinstance(trace, str):
        if logline.is_json():
            logline.emit("error", trace.rstrip("\n"))
        else:
            _stdio.write(trace if trace.endswith("\n") else trace + "\n")


def _control_handler(supervisor: Any, path: str, info: dict[str, Any],
                     upgrader: Any) -> Callable[[dict[str, Any]], Any]:
    def handle(request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            status = {**supervisor.status(), "control": path, **info, **upgrader.status()}
            return {"ok": True, "status": status}
        if cmd == "upgrade":  # hot upgrade of the primary (upgrade.py): waits for the outcome
            return upgrader.request(request.get("args"))
        if cmd == "reload":
            supervisor.reload()
            return {"ok": True, "message": "rolling reload started (see the primary's log)"}
        if cmd == "scale":
            n = request.get("n")
            current = supervisor.status().get("target") or len(supervisor.status()["workers"])
            if isinstance(n, str) and n[:1] in "+-" and n[1:].isdigit():
                n = current + int(n)
            if isinstance(n, str) and n.isdigit():
                n = int(n)
            try:
                supervisor.scale(n)
            except ValueError as exc:
                return {"ok": False, "error": f"{exc} (now {current})"}
            return {"ok": True, "message": f"scaling from {current} to {n} worker(s)"}
        if cmd == "stop":
            now = request.get("now") is True
            supervisor.stop(graceful=not now)
            return {"ok": True, "message": "stopping at once" if now else "stopping"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}
    return handle


def run_supervised(opts: dict[str, Any], *, title: str, rows: list[tuple[str, str]],
                   ready: str = "listening", addresses: list[str] | None = None, listens: int = 1,
                   code: Any = None, reloader: Any = None) -> int:
    """Start the pool (settings already set with setup_primary) and serve until it stops."""
    from prefork.admin import AdminError, open_admin
    from prefork.control import ControlError, ControlServer, default_path
    from prefork.supervisor import Supervisor

    if opts.get("policy"):
        prefork.scheduling_policy = opts["policy"]
    workers = opts["workers"]
    how = getattr(workers, "how", str(workers))  # "2 (cgroup quota 2.0 of 64 CPUs)" for auto
    supervisor = Supervisor(
        int(workers), timeout=opts["timeout"] or None, graceful_timeout=opts["graceful_timeout"],
        max_requests=opts["max_requests"], max_requests_jitter=opts["max_requests_jitter"],
        max_memory=opts["max_memory"], ready=ready, ready_timeout=opts["ready_timeout"] or 30.0,
        shutdown_delay=opts.get("shutdown_delay") or 0.0, ready_listens=listens, on_log=output.log)
    from prefork import hooks as hook_module
    from prefork import launch

    from .pidfile import PidFile

    try:  # --user/--group/--umask (launch.py) and --hooks (hooks.py): checked before any worker starts
        supervisor.primary.launch = launch.from_options(opts)
        hooks = hook_module.install(supervisor, opts, opts.get("app") or dict(rows).get("script", ""),
                                    output.log)
    except (launch.LaunchError, hook_module.HookError) as exc:
        raise UsageError(str(exc)) from None
    pid_file = PidFile(opts.get("pid"))  # --pid (pidfile.py): refused while another prefork runs
    if not pid_file.check():
        return 1
    if opts.get("log_file"):  # from here on the pool writes there (logfile.py); SIGUSR1 reopens it
        from prefork import logfile

        try:
            logfile.point_stdio(os.path.abspath(opts["log_file"]))
        except logfile.LogFileError as exc:
            output.error(str(exc))
            return 1
        supervisor.watchers.append(logfile.Reopener(os.path.abspath(opts["log_file"]), supervisor.primary,
                                                    output.log))
    supervisor.code = code  # serve --preload's templates (versions.py)
    boot = BootWatch(supervisor)
    supervisor.primary.internal["boot_error"] = boot
    supervisor.watchers.append(boot)
    supervisor.watchers.append(Announcer(supervisor, addresses, boot))
    notifier = sdnotify.from_environ(supervisor, output.log)  # systemd's Type=notify(-reload)
    if notifier is not None:
        supervisor.watchers.append(notifier)
    name = opts.get("name")  # --name: NAME.sock in the default folder, and in the banner's title
    control = ControlServer(opts.get("control") or (default_path(name) if name else None),
                            lambda r: {"ok": False, "error": "starting"})
    title = f"{title} [{name}]" if name else title
    try:
        control.start()
    except ControlError as exc:
        output.error(str(exc))
        return 1
    info = {"title": title}
    supervisor.workers_how = how
    upgrader = upgrade.Upgrader(supervisor, control, output.log, lambda: boot.message)  # ctl upgrade, USR2
    supervisor.watchers.append(upgrader)
    upgrader.after_failure = pid_file.write  # a failed new primary removed its own pid from --pid
    control.handler = _control_handler(supervisor, control.path, info, upgrader)
    try:  # the admin endpoint (admin.py): bound now, so a bad address stops us before any worker starts
        admin = open_admin(opts.get("admin"), supervisor,
                           lambda: {**supervisor._status(), "control": control.path, **info,
                                    **upgrader.status()})
    except AdminError as exc:
        control.close()
        output.error(str(exc))
        return 1
    upgrader.attach(admin)
    shown = [("admin", f"{admin.url}  (/livez /readyz /metrics /status)")] if admin else []
    try:
        if not pid_file.write() or not hooks.starting():  # the pid once the control socket is up
            return 1
        how_ctl = f"--name {name}" if name and not opts.get("control") else f"--control {control.path}"
        output.banner([("pid", str(os.getpid())), *rows, ("policy", prefork.scheduling_policy),
                       ("workers", how), ("control", f"{control.path}  (prefork ctl {how_ctl} status)"),
                       *shown], title)
        supervisor.start(wait_for=_first_template(code, boot, opts))
        hooks.started(supervisor)  # nworkers_changed(n, None)
        if reloader is not None:
            reloader.start(supervisor)
        if opts.get("init") or os.getpid() == 1:  # an init process: reap orphans (reaper.py)
            from prefork import reaper

            reaper.start_init(supervisor.primary, output.log, subreaper=bool(opts.get("init")))
        if admin:
            admin.start(supervisor.primary.loop)
        code = supervisor.wait()
        hooks.exiting()  # on_exit
    finally:
        pid_file.remove()
        if reloader is not None:
            reloader.stop()
        control.close()
        if admin:
            admin.close()
    if boot.message is not None:
        return 1
    if code == 0:
        output.log("stopped")
    return code


def _first_template(code: Any, boot: BootWatch, opts: dict[str, Any]) -> Any:
    """serve --preload: the workers start once the first template has imported the app, on the
    loop, while control and admin answer; if it cannot, the command stops with one line, exit 1."""
    if code is None:
        return None
    quiet = opts.get("log_level") not in ("debug", "trace")

    def wait_for(start: Callable[[bool, str], None]) -> None:
        def settled(ok: bool, why: str) -> None:
            if not ok:
                boot(None, {"message": why}, [])  # never ready yet: fatal, printed once
            start(ok, why)

        code.prepare(settled, quiet=quiet)
    return wait_for


class Announcer:
    """One line once every first worker is ready: what a person (and a script) waits for."""

    def __init__(self, supervisor: Any, addresses: list[str] | None, boot: BootWatch) -> None:
        self.supervisor, self.addresses, self.boot = supervisor, addresses, boot

    def on_ready(self) -> None:
        if self.boot.message is not None or self.supervisor.stopping:
            return
        where = ", ".join(self.addresses or self.supervisor.health.addresses())
        count = self.supervisor.ready_count()
        output.log(f"ready: {count} worker(s)" + (f" serving on {where}" if where else ""))
