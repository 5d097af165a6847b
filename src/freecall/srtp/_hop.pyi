"""Types of the C extension `freecall.srtp._hop` (see _hop.c)."""

from collections.abc import Callable
from typing import Any

MAX_PACKET: int
MAX_TRAILER: int

class Hop:
    def __init__(
        self,
        session: object,
        ctx: int,
        fn: int,
        fd: int,
        dest: tuple[Any, ...],
        fallback: Callable[[bytes, tuple[Any, ...]], None],
        *,
        unprotect: bool = False,
        source: tuple[Any, ...] | None = None,
        latch: Callable[[tuple[Any, ...]], None] | None = None,
    ) -> None: ...
    def __call__(self, data: bytes, addr: tuple[Any, ...], /) -> None: ...
    def set_dest(self, addr: tuple[Any, ...], /) -> None: ...
    def set_source(self, addr: tuple[Any, ...] | None, /) -> None: ...
    def take(self) -> tuple[int, int, int, int, int, int]: ...
    @property
    def counters(self) -> tuple[int, int, int, int, int, int]: ...
    rx_state: tuple[int, int, int, int, int, int, int, int]

READER_SLOT: int

class Reader:
    """A socket's datagrams read in C for ``loop.add_reader`` (see _hop.c)."""

    def __init__(
        self,
        fd: int,
        protocol: object,
        *,
        batch: int = 16,
        limit: int = 64,
        routes: dict[int, Hop] | None = None,
    ) -> None: ...
    def __call__(self) -> None: ...
    def close(self) -> None: ...
    protocol: object
    @property
    def stats(self) -> tuple[int, int, int, int]: ...
    @property
    def closed(self) -> bool: ...

def route_key(addr: tuple[Any, ...], /) -> int: ...
