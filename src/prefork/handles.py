"""Placeholder registry of the primary's shared server handles (filled in by the policies)."""

from __future__ import annotations

from typing import Any


class Servers:
    def __init__(self, primary: Any) -> None:
        self.primary = primary

    def worker_gone(self, worker: Any) -> None:
        pass

    def worker_leaving(self, worker: Any) -> None:
        pass

    def any_open(self) -> bool:
        return False

    def close_all(self) -> None:
        pass
