"""Wrong calls fail at once with an exception that says what is wrong (real processes)."""

from __future__ import annotations


def test_fork_in_worker_raises_runtime_error(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            cluster.on("exit", lambda w, c, s: print("worker exit", c, flush=True))
            cluster.fork()
        else:
            try:
                cluster.fork()
            except RuntimeError as exc:
                print("worker RuntimeError:", exc, flush=True)
            try:
                cluster.setup_primary(silent=True)
            except RuntimeError as exc:
                print("setup RuntimeError", flush=True)
    """)
    assert result.returncode == 0, result
    assert "worker RuntimeError:" in result.stdout and "primary" in result.stdout
    assert "setup RuntimeError" in result.stdout
    assert "worker exit 0" in result.stdout


def test_unknown_setting_is_type_error_naming_it(py):
    result = py.run("""
        import prefork as cluster
        try:
            cluster.setup_primary(nope=1)
        except TypeError as exc:
            print("TypeError:", exc)
        print("workers", len(cluster.workers))
    """)
    assert result.returncode == 0, result
    assert "TypeError:" in result.stdout and "nope" in result.stdout
    assert "workers 0" in result.stdout


def test_missing_exec_is_file_not_found_naming_it(py):
    result = py.run("""
        import prefork as cluster
        try:
            cluster.setup_primary(exec="no_such_script.py")
        except FileNotFoundError as exc:
            print("FileNotFoundError:", exc)
        else:
            try:
                cluster.fork()
            except FileNotFoundError as exc:
                print("FileNotFoundError at fork:", exc)
    """)
    assert result.returncode == 0, result
    assert "FileNotFoundError" in result.stdout and "no_such_script.py" in result.stdout


def test_bad_signal_name_is_value_error(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()
            for bad in ("SIGNOPE", 99999, "", None):
                try:
                    w.kill(bad)
                except (ValueError, TypeError) as exc:
                    print("rejected", repr(bad), type(exc).__name__, flush=True)
            print("still connected", w.is_connected(), w.exited_after_disconnect, flush=True)
            w.kill()
        else:
            cluster.worker.on("message", lambda m, h: None)
    """)
    assert result.returncode == 0, result
    assert "rejected 'SIGNOPE' ValueError" in result.stdout
    assert "rejected 99999 ValueError" in result.stdout
    # A refused kill() must not have marked the worker as leaving.
    assert "still connected True None" in result.stdout


def test_bad_serialization_is_value_error(py):
    result = py.run("""
        import prefork as cluster
        try:
            cluster.setup_primary(serialization="xml")
        except ValueError as exc:
            print("ValueError:", exc)
        print("serialization now", dict(cluster.settings).get("serialization"))
    """)
    assert result.returncode == 0, result
    assert "ValueError:" in result.stdout and "xml" in result.stdout
    assert "serialization now xml" not in result.stdout


def test_bogus_sched_policy_env_is_a_clear_error(py):
    result = py.run("""
        import prefork
        print("imported", prefork.scheduling_policy)
    """, env={"PREFORK_SCHED_POLICY": "bogus"})
    assert result.returncode != 0, result
    assert "imported" not in result.stdout
    assert "PREFORK_SCHED_POLICY" in result.stderr and "bogus" in result.stderr
    assert "rr" in result.stderr  # it says what is allowed


def test_known_sched_policy_env(py):
    result = py.run("""
        import prefork
        print("policy", prefork.scheduling_policy, prefork.SCHED_NONE, prefork.SCHED_RR,
              prefork.SCHED_REUSEPORT)
    """, env={"PREFORK_SCHED_POLICY": "none"})
    assert result.returncode == 0, result
    assert "policy none none rr reuseport" in result.stdout


def test_send_unserializable_message_is_type_error(py):
    result = py.run("""
        import prefork as cluster
        if cluster.is_primary:
            w = cluster.fork()
            try:
                w.send(object())
            except TypeError as exc:
                print("TypeError on send", flush=True)
            w.disconnect()
        else:
            cluster.worker.on("message", lambda m, h: None)
    """)
    assert result.returncode == 0, result
    assert "TypeError on send" in result.stdout


def test_listener_must_be_callable(py):
    result = py.run("""
        import prefork as cluster
        try:
            cluster.on("exit", 42)
        except TypeError as exc:
            print("TypeError:", exc)
    """)
    assert result.returncode == 0, result
    assert "TypeError:" in result.stdout


def test_bad_args_types(py):
    result = py.run("""
        import prefork as cluster
        for opts in ({"args": "not-a-list"}, {"exec_argv": [1, 2]}):
            try:
                cluster.setup_primary(**opts)
            except TypeError as exc:
                print("TypeError", list(opts)[0])
        try:
            cluster.setup_primary(cwd="/no/such/folder")
        except FileNotFoundError as exc:
            print("FileNotFoundError", exc)
    """)
    assert result.returncode == 0, result
    assert "TypeError args" in result.stdout and "TypeError exec_argv" in result.stdout
    assert "FileNotFoundError" in result.stdout and "/no/such/folder" in result.stdout
