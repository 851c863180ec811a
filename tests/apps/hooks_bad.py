"""A --hooks module for tests/test_hooks.py whose when_ready is not a function: refused (exit 2)."""

when_ready = "not callable"
