"""
Writes made during one reactor turn, sent together at the start of the
next: one ``send`` per connection, no ``epoll_ctl`` pair.

Twisted queues a transport's writes until the reactor finds the socket
writable, which costs two ``epoll_ctl`` calls and a whole reactor iteration
per response; sending every write at once instead (``write_now``) costs a
``send`` per write and wakes the peer mid-turn, so a busy daemon loses the
batching that the queue gave it (measured: +30 µs of CPU per request at 32
connections).  :class:`SendQueue` keeps both: a turn's first write goes out
at once (at one connection, that is the whole answer: measured 70 µs less
CPU per request than waiting for the turn's end), the rest of what the turn
writes right after it, joined per connection, in order.  A leaf: used by the
server side and by the upstream client alike.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._twisted_compat import plain_tcp, write_now


class SendQueue:
    """Owns the bytes written to plain TCP connections during the current reactor turn, until they are sent."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: dict[Any, list[bytes]] = {}
        self._call: IDelayedCall | None = None

    def write(self, transport: Any, data: bytes) -> None:
        """Write ``data`` to ``transport`` after this turn (at once, the ordinary way, for other transports)."""
        if not data:
            return
        if not plain_tcp(transport):
            transport.write(data)
            return
        if self._call is None:
            # The turn's first write goes out at once (an idle daemon answers sooner, and stays warm);
            # the rest of the turn's writes wait for its end.
            self._call = self._clock.callLater(0, self.flush)
            write_now(transport, data)
            return
        pending = self._pending.get(transport)
        if pending is not None:
            pending.append(data)
            return
        self._pending[transport] = [data]

    def flush_one(self, transport: Any) -> None:
        """Send what ``transport`` has waiting now (before it is closed, or written to directly)."""
        parts = self._pending.pop(transport, None)
        if parts:
            write_now(transport, b"".join(parts))

    def flush(self) -> None:
        """Send everything written so far, connection by connection, in the order it was written."""
        self._call = None
        pending, self._pending = self._pending, {}
        for transport, parts in pending.items():
            write_now(transport, parts[0] if len(parts) == 1 else b"".join(parts))
