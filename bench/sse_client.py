"""
Streaming clients for the benchmarks (stdlib asyncio, no dependencies).

Every stream is a POST to a chat completions URL on a keep-alive HTTP/1.1
connection.  The client decodes the response (chunked, Content-Length or
close-delimited), splits it into SSE events and, for every event that
carries the upstream's ``bench_ts`` send stamp, records
``time.monotonic() at arrival - bench_ts``: the time that chunk took from the
upstream's ``write`` to the client (the same clock in every process on
Linux).  It also records the time to the first event from the moment the
request was written.

Three drivers:

* :func:`run_streams` -- ``concurrency`` workers, each running streams back to
  back, either ``rounds`` times or until ``duration`` seconds have passed.
* :func:`hold_streams` -- opens ``count`` slow streams (in batches), waits
  until every one has its first event, calls ``while_held()`` and then drops
  them all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

_TS = b'"bench_ts":'


class BodyDecoder:
    """One HTTP/1.1 response body, framed by its headers (chunked, Content-Length or until close), as it arrives."""

    def __init__(self, headers: dict[str, str]) -> None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.mode = "chunked"
        elif "content-length" in headers:
            self.mode, self.remaining = "length", int(headers["content-length"])
        else:
            self.mode = "close"
        self.buf = b""

    @property
    def empty(self) -> bool:
        """A Content-Length: 0 body: complete before any byte."""
        return self.mode == "length" and self.remaining <= 0

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """The payload pieces in ``data`` and whether the body is complete; ValueError on a bad chunk size."""
        if self.mode == "length":
            self.remaining -= len(data)
            return [data], self.remaining <= 0
        if self.mode == "close":
            return [data], False
        buf, pos = self.buf + data, 0
        pieces: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if buf.find(b"\r\n", eol + 2) < 0:
                    break
                self.buf = b""
                return pieces, True
            start = eol + 2
            if len(buf) < start + size + 2:
                break
            pieces.append(buf[start : start + size])
            pos = start + size + 2
        self.buf = buf[pos:]
        return pieces, False


class StreamError(Exception):
    pass


@dataclass
class Stats:
    streams: int = 0
    events: int = 0
    errors: int = 0
    first_error: str = ""
    ttfc: list[float] = field(default_factory=list)  # seconds, per stream, from writing the request
    start: list[float] = field(default_factory=list)  # seconds, per stream, from connecting (if it had to)
    rates: list[float] = field(default_factory=list)  # events/s per stream, first to last event
    chunk_delay: list[float] = field(default_factory=list)  # seconds, per event (maybe sampled)
    elapsed: float = 0.0

    def error(self, text: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = text


class _Conn(asyncio.Protocol):
    """One keep-alive client connection; one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.ev = b""
        self.state = "idle"
        self.body: BodyDecoder | None = None
        self.done: asyncio.Future[None] | None = None
        self.first: asyncio.Future[None] | None = None
        self.lost = False
        self.sent_at = 0.0
        self.first_at = 0.0
        self.last_at = 0.0
        self.events = 0
        self.delays: list[float] | None = None
        self.sample_every = 1
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state == "body" and self.body is not None and self.body.mode == "close":
            self._finish()
            return
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(StreamError(f"connection lost in state {self.state}: {exc!r}"))

    def request(self, raw: bytes, delays: list[float] | None, sample_every: int = 1,
                want_first: bool = False) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.first = loop.create_future() if want_first else None
        self.state = "head"
        self.buf = b""
        self.ev = b""
        self.events = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.delays = delays
        self.sample_every = sample_every
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.write(raw)
        return self.done

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.state == "head":
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            rest = self.buf[end + 4 :]
            self.buf = b""
            status = head[0].split(" ", 2)
            if len(status) < 2 or status[1] != "200":
                self._fail(f"HTTP status {head[0]!r}")
                return
            hdrs = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip().lower()
            self.keep_alive = hdrs.get("connection", "") != "close"
            self.body = BodyDecoder(hdrs)
            self.keep_alive = self.keep_alive and self.body.mode != "close"
            self.state = "body"
            data = rest
            if not data:
                return
        if self.state != "body" or self.body is None:
            return
        pieces, complete = self.body.feed(data)
        for piece in pieces:
            self._payload(piece, now)
        if complete:
            self._finish()

    def _payload(self, data: bytes, now: float) -> None:
        ev = self.ev + data if self.ev else data
        pos = 0
        while True:
            end = ev.find(b"\n\n", pos)
            if end < 0:
                break
            at = ev.find(_TS, pos, end)
            if at >= 0:
                if self.events == 0:
                    self.first_at = now
                    if self.first is not None and not self.first.done():
                        self.first.set_result(None)
                self.events += 1
                self.last_at = now
                if self.delays is not None and self.events % self.sample_every == 0:
                    self.delays.append(now - float(ev[at + len(_TS) : ev.find(b"}", at, end)]))
            pos = end + 2
        self.ev = ev[pos:]

    def _finish(self) -> None:
        self.state = "idle"
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        """Drop the connection on purpose (nobody waits for this response any more)."""
        self.state = "closed"
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, text: str) -> None:
        self.state = "error"
        for fut in (self.first, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(StreamError(text))
        if self.transport is not None:
            self.transport.abort()


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, len(body), body)
    )


async def _connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, host, port)
    return conn


async def run_streams(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    concurrency: int,
    rounds: int | None = None,
    duration: float | None = None,
    timeout: float = 60.0,
    sample_every: int = 1,
    stagger: float = 0.0,
) -> Stats:
    """
    ``concurrency`` workers running streams back to back (bounded by rounds
    and/or duration).  Worker ``i`` starts ``i * stagger`` seconds late, so
    paced streams do not all send their chunks at the same instant.
    """
    assert rounds is not None or duration is not None
    stats = Stats()
    raw = _request(host, port, path, body)
    t0 = time.monotonic()
    deadline = t0 + duration if duration is not None else None
    hard_stop = t0 + timeout

    async def worker(index: int) -> None:
        conn: _Conn | None = None
        done = 0
        try:
            if stagger:
                await asyncio.sleep(index * stagger)
            while (rounds is None or done < rounds) and (deadline is None or time.monotonic() < deadline):
                if time.monotonic() > hard_stop:
                    stats.error("timeout")
                    return
                began = time.monotonic()
                if conn is None or conn.lost or not conn.keep_alive:
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = await _connect(host, port)
                fut = conn.request(raw, stats.chunk_delay, sample_every)
                try:
                    await asyncio.wait_for(fut, max(0.1, hard_stop - time.monotonic()))
                except (StreamError, asyncio.TimeoutError, OSError) as exc:
                    stats.error(f"{type(exc).__name__}: {exc}")
                    if conn.transport is not None:
                        conn.transport.abort()
                    conn = None
                    continue
                done += 1
                stats.streams += 1
                stats.events += conn.events
                if conn.first_at:
                    stats.ttfc.append(conn.first_at - conn.sent_at)
                    stats.start.append(conn.first_at - began)
                    if conn.events > 1 and conn.last_at > conn.first_at:
                        stats.rates.append((conn.events - 1) / (conn.last_at - conn.first_at))
        except OSError as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    stats.elapsed = time.monotonic() - t0
    return stats


async def hold_streams(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    count: int,
    batch: int = 50,
    timeout: float = 60.0,
    while_held: Callable[[], object] | None = None,
    hold_seconds: float = 1.0,
) -> tuple[int, Stats]:
    """Open ``count`` streams, wait for each one's first event, call ``while_held``, then drop them."""
    stats = Stats()
    raw = _request(host, port, path, body)
    conns: list[_Conn] = []
    t0 = time.monotonic()
    hard_stop = t0 + timeout
    held = 0
    try:
        for start in range(0, count, batch):
            if time.monotonic() > hard_stop:
                stats.error("timeout while opening streams")
                break
            n = min(batch, count - start)
            results = await asyncio.gather(*(_connect(host, port) for _ in range(n)), return_exceptions=True)
            firsts = []
            for res in results:
                if isinstance(res, BaseException):
                    stats.error(f"connect: {res!r}")
                    continue
                conns.append(res)
                res.request(raw, None, want_first=True)
                assert res.first is not None
                firsts.append(res.first)
            if firsts:
                got = await asyncio.wait_for(
                    asyncio.gather(*firsts, return_exceptions=True), max(0.1, hard_stop - time.monotonic())
                )
                for res in got:
                    if isinstance(res, BaseException):
                        stats.error(f"first chunk: {res!r}")
                    else:
                        held += 1
        stats.elapsed = time.monotonic() - t0
        await asyncio.sleep(hold_seconds)
        alive = sum(1 for c in conns if not c.lost and c.state == "body")
        if while_held is not None:
            while_held()
        return min(held, alive), stats
    finally:
        for c in conns:
            c.close()
        await asyncio.sleep(0)
