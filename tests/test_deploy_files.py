"""The files in deploy/ say what the code does: they parse, and they agree with each other and with prefork.

Every prefork command line in them (the Deployment's args, the Dockerfile's ENTRYPOINT + CMD, the
hosts' command in haproxy.cfg's header, systemd's ExecStart=) uses only serve's options, with values
prefork accepts; systemd's TimeoutStopSec= exceeds the shutdown delay plus the graceful timeout.

- deploy/kubernetes/*.yaml parse (PyYAML from .venv, else the system python3's; skipped when neither
  has it); the probes reach the admin port (`--admin` in the args) on paths the admin endpoint
  serves; terminationGracePeriodSeconds exceeds --shutdown-delay + --graceful-timeout; a CPU limit is
  set for `--workers auto` to follow; the Service selects the pods and targets a named port.
- deploy/Dockerfile uses the exec form (a JSON array) for ENTRYPOINT, CMD and HEALTHCHECK, stops with
  SIGTERM, runs as a non-root user, and its health check asks the admin port's /livez.
- deploy/haproxy/haproxy.cfg passes `haproxy -c` (when haproxy is installed) and checks /readyz on each
  server's admin port.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prefork.cli.config import BY_NAME

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ADMIN_SOURCE = ROOT / "src" / "prefork" / "admin.py"


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        yaml = None
    if yaml is not None:
        return [d for d in yaml.safe_load_all(path.read_text()) if d]
    # The project does not depend on PyYAML; Debian's python3 often has it (python3-yaml)
    system = shutil.which("python3", path="/usr/bin")
    if system:
        code = ("import json, sys, yaml; "
                "print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))")
        done = subprocess.run([system, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return json.loads(done.stdout)
        if "No module named 'yaml'" not in done.stderr:
            pytest.fail(f"{path} does not parse:\n{done.stderr}")
    pytest.skip("PyYAML is not installed (neither in .venv nor in /usr/bin/python3)")


def _option(args: list[str], name: str) -> str | None:
    """The value of --name in an argument list (`--name VALUE` or `--name=VALUE`), or None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _seconds(args: list[str], name: str) -> float:
    value = _option(args, name)
    return float(value) if value is not None else float(BY_NAME[name[2:].replace("-", "_")].default)


def _check_options(args: list[str], where: str) -> None:
    """Every option in a serve command line is one of prefork's, with a value prefork accepts."""
    rest = list(args[1:] if args and not args[0].startswith("-") else args)  # the app comes first
    while rest:
        flag = rest.pop(0)
        name = flag[2:].split("=", 1)[0].replace("-", "_") if flag.startswith("--") else ""
        option = BY_NAME.get(name) or BY_NAME.get(name[3:] if name.startswith("no_") else "")
        assert option is not None and "serve" in option.commands, f"{where}: {flag} is not an option of serve"
        if option.flag:  # a switch: --x / --no-x, no value
            assert "=" not in flag, f"{where}: {flag} is a switch, it takes no value"
            continue
        assert name == option.name, f"{where}: {flag} is not a switch"
        value = flag.split("=", 1)[1] if "=" in flag else rest.pop(0) if rest else None
        assert value is not None, f"{where}: {flag} needs a value"
        option.convert(value)  # raises ValueError on a bad value


def _admin_paths() -> set[str]:
    if not ADMIN_SOURCE.exists():
        pytest.skip("src/prefork/admin.py has not landed yet")
    return set(re.findall(r"""["'](/(?:livez|readyz|metrics|status))["']""", ADMIN_SOURCE.read_text()))


def _deployment() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in _load_yaml(f)]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service"} <= set(kinds), sorted(kinds)
    return kinds["Deployment"], kinds["Service"]


def test_kubernetes_probes_reach_the_admin_endpoint() -> None:
    deployment, _ = _deployment()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    _check_options(args, "deployment.yaml")
    admin = _option(args, "--admin")
    assert admin, f"no --admin in {args}"
    admin_port = int(admin.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = _admin_paths()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert path in served, f"{path} is not served by src/prefork/admin.py ({served})"
        port = get["port"]
        assert ports.get(port, port) == admin_port, f"{probe} asks port {port}, not {admin_port}"


def test_kubernetes_grace_period_covers_the_delay_and_the_drain() -> None:
    deployment, _ = _deployment()
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    delay, graceful = _seconds(args, "--shutdown-delay"), _seconds(args, "--graceful-timeout")
    assert 5 <= delay <= 10, f"--shutdown-delay {delay}: 5 to 10 s covers endpoint removal"
    assert spec["terminationGracePeriodSeconds"] > delay + graceful, (spec["terminationGracePeriodSeconds"],
                                                                       delay, graceful)
    assert "preStop" not in container.get("lifecycle", {}), "--shutdown-delay replaces a preStop sleep"
    assert _option(args, "--workers") in (None, "auto"), "the worker count should follow the CPU limit"
    assert container["resources"]["limits"]["cpu"], "auto follows the CPU limit: set one"


def test_kubernetes_service_selects_the_pods() -> None:
    deployment, service = _deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names, (port, names)


def _dockerfile() -> dict[str, str]:
    """Each instruction of deploy/Dockerfile (continuation lines joined), by its keyword (the last wins)."""
    text = re.sub(r"\\\n\s*", "", (DEPLOY / "Dockerfile").read_text())
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found[keyword.upper()] = rest.strip()
    return found


def test_dockerfile_exec_form_stop_signal_and_health_check() -> None:
    steps = _dockerfile()
    entrypoint, cmd = json.loads(steps["ENTRYPOINT"]), json.loads(steps["CMD"])  # exec form: JSON arrays
    assert entrypoint[:2] == ["prefork", "serve"], entrypoint
    _check_options(entrypoint[2:] + cmd, "Dockerfile")
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert steps["USER"] not in ("root", "0"), steps["USER"]
    admin_port = _option(cmd, "--admin").rsplit(":", 1)[1]
    assert admin_port in steps["EXPOSE"].split()
    options, _, check = steps["HEALTHCHECK"].partition(" CMD ")
    probe = json.loads(check)  # exec form: no shell, and no curl needed
    assert probe[0] == "python" and f"127.0.0.1:{admin_port}/livez" in probe[-1], probe
    assert "/livez" in _admin_paths()
    assert (DEPLOY / ".dockerignore").exists()


def test_haproxy_config_checks_readyz_on_each_admin_port() -> None:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*option httpchk GET /readyz\b", text, re.M)
    assert "/readyz" in _admin_paths()
    servers = re.findall(r"^\s*server (\S+) \S+ check port (\d+)$", text, re.M)
    assert len(servers) >= 2, servers
    (command,) = re.findall(r"^#\s+prefork serve (.*)$", text, re.M)  # the hosts' command line, in a comment
    args = command.split()
    _check_options(args, "haproxy.cfg")
    assert {_option(args, "--admin").rsplit(":", 1)[1]} == {port for _, port in servers}
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if haproxy is None:
        pytest.skip("haproxy is not installed (tests/test_fleet.py installs it): `haproxy -c` not run")
    # -c reads the file without binding; the chroot folder and the user must exist, as on Debian
    done = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_systemd_stop_timeout_covers_the_delay_and_the_drain() -> None:
    unit = DEPLOY / "systemd" / "prefork.service"
    if not unit.exists():
        pytest.skip("deploy/systemd/prefork.service is not there")
    text = re.sub(r"\\\n\s*", " ", unit.read_text())
    (exec_start,) = re.findall(r"^ExecStart=\S*prefork serve (.*)$", text, re.M)
    args = exec_start.split()
    _check_options(args, "prefork.service")
    (stop,) = re.findall(r"^TimeoutStopSec=(\d+)s?$", text, re.M)
    assert float(stop) > _seconds(args, "--shutdown-delay") + _seconds(args, "--graceful-timeout")
