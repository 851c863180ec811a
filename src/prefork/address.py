"""The address object of the `listening` event, and how server addresses are written and keyed."""

from __future__ import annotations

import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Address:
    """What Node's `listening` event carries: address, port, and address_type 4, 6 or "unix"."""

    __slots__ = ("address", "port", "address_type")

    def __init__(self, address: str, port: int | None, address_type: int | str) -> None:
        self.address, self.port, self.address_type = address, port, address_type

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and self.to_wire() == other.to_wire()

    def __hash__(self) -> int:
        return hash((self.address, self.port, self.address_type))

    def __repr__(self) -> str:
        return f"Address(address={self.address!r}, port={self.port!r}, address_type={self.address_type!r})"

    @property
    def family(self) -> socket.AddressFamily:
        return {4: socket.AF_INET, 6: socket.AF_INET6}.get(self.address_type, socket.AF_UNIX)  # type: ignore

    def to_wire(self) -> list[Any]:
        return [self.address, self.port, self.address_type]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Address:
        return cls(data[0], data[1], data[2])

    @classmethod
    def from_sockname(cls, family: int, name: Any) -> Address:
        if family == socket.AF_UNIX:
            path = name.decode() if isinstance(name, bytes) else name
            return cls(path, None, "unix")
        return cls(name[0], name[1], 6 if family == socket.AF_INET6 else 4)

    def __str__(self) -> str:
        if self.address_type == "unix":
            return f"unix:{self.address}"
        if self.address_type == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


def normalize(address: Any) -> tuple[int, Any]:
    """(family, sockaddr) for `listen()`'s address: (host, port) or a unix socket path."""
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        path = address.decode() if isinstance(address, bytes) else address
        if not path:
            raise ValueError("empty unix socket path")
        return socket.AF_UNIX, path
    if isinstance(address, int) and not isinstance(address, bool):
        address = ("", address)
    if not (isinstance(address, (tuple, list)) and len(address) in (2, 4)):
        raise TypeError(f"address must be (host, port) or a unix socket path, not {address!r}")
    host, port = address[0], address[1]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer 0-65535, not {port!r}")
    host = host or "0.0.0.0"
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, port)
