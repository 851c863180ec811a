"""fork() and setup_primary() with real processes: ids, what a worker runs, settings."""

from __future__ import annotations

import json
import os


def test_ids_are_never_reused(py):
    """Fork 1 and 2, kill 2, fork again: the new worker is 3, and `workers` is keyed by id."""
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            w1, w2 = cluster.fork(), cluster.fork()
            print("ids", w1.id, w2.id, sorted(cluster.workers), flush=True)
            state = {"forked": False}

            @cluster.on("online")
            def online(w):
                if w.id == 2:
                    w.kill()

            @cluster.on("exit")
            def on_exit(w, code, sig):
                print("exit", w.id, sorted(cluster.workers), flush=True)
                if w.id == 2 and not state["forked"]:
                    state["forked"] = True
                    w3 = cluster.fork()
                    print("new", w3.id, sorted(cluster.workers), flush=True)
                    cluster.disconnect()
        else:
            cluster.worker.on("message", lambda m, h: None)  # stay alive until disconnected
    """)
    assert result.returncode == 0, result
    assert "ids 1 2 [1, 2]" in result.stdout
    assert "exit 2 [1]" in result.stdout
    assert "new 3 [1, 3]" in result.stdout
    assert "new 1" not in result.stdout and "new 2" not in result.stdout


def test_worker_runs_the_script_from_the_top(py):
    result = py.run("""
        import os, prefork as cluster
        print("top", "worker" if cluster.is_worker else "primary", os.getpid(), flush=True)
        counter = 41
        if cluster.is_primary:
            w = cluster.fork()
            print("forked", w.process.pid, flush=True)
        else:
            counter += 1
            print("worker body", counter, flush=True)
    """)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("top")] == ["primary", "worker"]
    worker_pid = next(line.split()[1] for line in lines if line.startswith("forked"))
    assert f"top worker {worker_pid}" in result.stdout
    assert "worker body 42" in result.stdout


def test_python_dash_m_package_primary(py):
    """`python -m pkg`: workers must run the package's __main__ the same way (relative imports work)."""
    py.write("pkg/__init__.py", "")
    py.write("pkg/helper.py", "VALUE = 'from helper'\n")
    py.write("pkg/__main__.py", """
        import prefork as cluster
        from .helper import VALUE
        if cluster.is_primary:
            cluster.setup_primary()
            print("primary module", cluster.settings["module"], flush=True)
            cluster.fork()
        else:
            print("worker", __name__, __package__, VALUE, flush=True)
    """)
    result = py.run("", module="pkg")
    assert result.returncode == 0, result
    assert "primary module pkg" in result.stdout
    assert "worker __main__ pkg from helper" in result.stdout


def test_setup_primary_options_reach_the_worker(py, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    py.write("sub/w.py", """
        import json, os, sys, prefork as cluster

        def on_message(msg, handle):
            print("worker got", type(msg).__name__, sorted(msg), flush=True)
            cluster.worker.disconnect()

        print("worker", json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "x": sys._xoptions,
                                    "file": os.path.basename(__file__)}), flush=True)
        cluster.worker.on("message", on_message)
    """)
    result = py.run(f"""
        import prefork as cluster
        seen = []
        cluster.on("setup", lambda s: seen.append(dict(s)))
        cluster.setup_primary(exec="w.py", args=["a", "b c"], exec_argv=["-X", "probe=1"],
                              cwd={str(sub)!r}, serialization="pickle")
        print("setup events", len(seen), seen[0]["exec"], seen[0]["serialization"], flush=True)
        w = cluster.fork()
        w.send({{3, 1, 2}})  # a set: only pickle carries it
    """)
    assert result.returncode == 0, result
    assert "setup events 1 w.py pickle" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("worker {"))
    info = json.loads(line[len("worker "):])
    assert info == {"argv": ["a", "b c"], "cwd": str(sub), "x": {"probe": "1"}, "file": "w.py"}
    assert "worker got set [1, 2, 3]" in result.stdout


def test_settings_defaults_after_setup_primary(py):
    path = py.write("prim.py", """
        import json, os, sys, prefork as cluster
        before = dict(cluster.settings)
        events = []
        cluster.on("setup", events.append)
        cluster.setup_primary()
        s = cluster.settings
        print(json.dumps({
            "before": before, "exec": s["exec"], "args": s["args"], "silent": s["silent"],
            "serialization": s["serialization"], "keys": sorted(s), "as_dict": dict(s) == {**s},
            "event_is_settings": events == [s], "file": os.path.abspath(__file__),
        }))
    """)
    result = py.run(path, "--flag", "x")
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert out["exec"] == out["file"] == str(path)
    assert out["args"] == ["--flag", "x"]
    assert out["silent"] is False
    assert out["serialization"] == "json"
    assert {"exec", "args", "exec_argv", "cwd", "silent", "serialization"} <= set(out["keys"])
    assert out["as_dict"] and out["event_is_settings"]


def test_setup_primary_is_an_alias_and_merges(py):
    result = py.run("""
        import prefork as cluster
        assert cluster.setup_master is cluster.setup_primary
        cluster.setup_primary(args=["one"])
        cluster.setup_master(silent=True)
        print(cluster.settings["args"], cluster.settings["silent"])
    """)
    assert result.returncode == 0, result
    assert "['one'] True" in result.stdout


def test_silent_pipes_worker_output_to_primary(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            cluster.setup_primary(silent=True)
            w = cluster.fork()
            line = w.process.stdout.readline().decode().strip()
            err = w.process.stderr.readline().decode().strip()
            print("primary read:", line, "|", err, flush=True)
        else:
            import sys
            print("hello from worker", flush=True)
            print("oops on stderr", file=sys.stderr, flush=True)
    """)
    assert result.returncode == 0, result
    assert "primary read: hello from worker | oops on stderr" in result.stdout
    # Not inherited: the worker's own lines never reached the terminal (our pipes) directly.
    assert "hello from worker\n" not in result.stdout.replace("primary read: hello from worker", "")
    assert "oops on stderr" not in result.stderr


def test_fork_env_reaches_worker_only(py):
    result = py.run("""
        import os, prefork as cluster
        if cluster.is_primary:
            cluster.fork({"PF_TEST_VAR": "w1"})
            print("primary sees", os.environ.get("PF_TEST_VAR"), flush=True)
        else:
            print("worker sees", os.environ.get("PF_TEST_VAR"), flush=True)
    """)
    assert result.returncode == 0, result
    assert "worker sees w1" in result.stdout
    assert "primary sees None" in result.stdout


def test_fork_to_online_latency(py, capsys):
    """Loose bound only (the machine is shared); the median is printed for the record."""
    result = py.run("""
        import time, statistics, prefork as cluster
        if cluster.is_primary:
            times, t0 = [], {}

            def start():
                t0["t"] = time.perf_counter()
                cluster.fork()

            @cluster.on("online")
            def online(w):
                times.append(time.perf_counter() - t0["t"])
                w.kill()

            @cluster.on("exit")
            def on_exit(w, code, sig):
                if len(times) < 10:
                    start()
                else:
                    print("median_ms %.1f max_ms %.1f" % (statistics.median(times) * 1000,
                                                          max(times) * 1000), flush=True)
            start()
    """, timeout=40)
    assert result.returncode == 0, result
    median_ms = float(result.stdout.split("median_ms ")[1].split()[0])
    with capsys.disabled():
        print(f"\n[fork->online] {result.stdout.strip()}")
    assert median_ms < 2000, result.stdout


def test_worker_import_cost(py, capsys):
    """`python -X importtime -c "import prefork"` in a worker: report prefork's own share."""
    result = py.run("""
        import subprocess, sys, prefork as cluster
        if cluster.is_primary:
            cluster.setup_primary(exec_argv=["-X", "importtime"], silent=True)
            w = cluster.fork()
            err = w.process.stderr.read().decode()
            w.process.wait()
            print(err)
        else:
            pass
    """)
    assert result.returncode == 0, result
    rows = []  # (cumulative us, depth, name), in the order printed (children before parents)
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            rows.append((int(parts[1]), len(name) - len(name.lstrip()), name.strip()))
    top = [i for i, (_, depth, name) in enumerate(rows) if name == "prefork" and depth == 1]
    assert top, result.stdout[-2000:]
    total = rows[top[0]][0]
    subtree = []
    for us, depth, name in reversed(rows[: top[0]]):
        if depth <= 1:
            break
        if depth == 3:  # what prefork's own modules import directly, or prefork's modules themselves
            subtree.append((us, name))
    heaviest = sorted(subtree, reverse=True)[:8]
    with capsys.disabled():
        print(f"\n[worker import prefork] cumulative {total / 1000:.1f} ms; direct children: "
              + ", ".join(f"{n} {us / 1000:.1f} ms" for us, n in heaviest))
    assert total < 500_000  # loose: 0.5 s even on a loaded machine


def test_worker_env_is_clean_of_channel_fd(py):
    """The channel fd is not inherited by the worker's own children."""
    result = py.run("""
        import os, subprocess, sys, prefork as cluster
        if cluster.is_primary:
            cluster.fork()
        else:
            fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
            out = subprocess.run([sys.executable, "-c",
                                  "import os; print(sorted(int(x) for x in os.listdir('/proc/self/fd')))"],
                                 capture_output=True, text=True)
            print("child fds", out.stdout.strip(), flush=True)
    """)
    assert result.returncode == 0, result
    child_fds = json.loads(result.stdout.split("child fds ")[1].splitlines()[0])
    assert set(child_fds) <= {0, 1, 2, 3}, child_fds  # 3: the listdir fd itself
    assert os.path.exists("/proc/self/fd")
