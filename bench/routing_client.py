"""
The streaming chat client of ``bench/routing.py`` (stdlib asyncio, no dependencies).

One :class:`Connection` is one keep-alive HTTP/1.1 connection carrying one request at a time; a
:class:`Client` (one simulated user) holds one per router address and reconnects when the server
closed it.  A request is written in one ``write``; the response is decoded incrementally (chunked,
Content-Length or close-delimited) and split into SSE events as bytes arrive.  Times are
``time.monotonic()``: ``sent`` just before the request's ``write``, ``first_content`` when the
bytes holding the first ``data:`` event whose ``choices[0].delta.content`` is non-empty arrived.
The answer's text is the concatenation of every content delta.  ``timings`` (llama.cpp's block,
usually in the final chunk) and ``usage`` are kept from whichever chunk carries them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from sse_client import BodyDecoder


class ClientError(Exception):
    pass


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names; last value wins
    sent: float = 0.0
    first_byte: float | None = None
    first_content: float | None = None
    finished: float | None = None
    content: list[str] = field(default_factory=list)
    done: bool = False  # saw data: [DONE]
    events: int = 0
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error_body: bytes = b""

    @property
    def text(self) -> str:
        return "".join(self.content)


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.keep_alive = True
        self._reset()

    def _reset(self) -> None:
        self.state = "idle"
        self.buf = b""
        self.ev = b""
        self.body: BodyDecoder | None = None
        self.reply: Reply | None = None
        self.future: asyncio.Future[Reply] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state == "body" and self.body is not None and self.body.mode == "close":
            self._finish(time.monotonic())
        elif self.future is not None and not self.future.done():
            self.future.set_exception(ClientError(f"connection lost ({self.state}): {exc!r}"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        reply = self.reply
        if reply is None:
            return
        if reply.first_byte is None:
            reply.first_byte = now
        if self.state == "head":
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            rest, self.buf = self.buf[end + 4 :], b""
            parts = lines[0].split(" ", 2)
            try:
                reply.status = int(parts[1])
            except (IndexError, ValueError):
                self._fail(f"bad status line {lines[0]!r}")
                return
            for line in lines[1:]:
                name, _, value = line.partition(":")
                reply.headers[name.strip().lower()] = value.strip()
            h = reply.headers
            self.keep_alive = h.get("connection", "").lower() != "close"
            self.body = BodyDecoder(h)
            self.keep_alive = self.keep_alive and self.body.mode != "close"
            self.state = "body"
            if self.body.empty:
                self._finish(now)
                return
            data = rest
            if not data:
                return
        if self.state != "body" or self.body is None:
            return
        try:
            pieces, complete = self.body.feed(data)
        except ValueError:
            self._fail("bad chunk size")
            return
        for piece in pieces:
            self._body(piece, now)
        if complete:
            self._finish(now)

    # -- body

    def _body(self, data: bytes, now: float) -> None:
        reply = self.reply
        assert reply is not None
        if reply.status != 200:
            reply.error_body = (reply.error_body + data)[:2000]
            return
        ev = self.ev + data if self.ev else data
        if b"\r" in ev:
            ev = ev.replace(b"\r\n", b"\n")
        pos = 0
        while True:
            end = ev.find(b"\n\n", pos)
            if end < 0:
                break
            self._event(ev[pos:end], now)
            pos = end + 2
        self.ev = ev[pos:]

    def _event(self, event: bytes, now: float) -> None:
        reply = self.reply
        assert reply is not None
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                reply.done = True
                continue
            reply.events += 1
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if "timings" in chunk:
                reply.timings = chunk["timings"]
            if chunk.get("usage"):
                reply.usage = chunk["usage"]
            choices = chunk.get("choices")
            if choices:
                delta = choices[0].get("delta") or {}
                content = delta.get("content")
                if content:
                    if reply.first_content is None:
                        reply.first_content = now
                    reply.content.append(content)

    def _finish(self, now: float) -> None:
        reply, future = self.reply, self.future
        if self.ev and reply is not None and reply.status == 200:  # an unterminated last event
            self._event(self.ev, now)
        self._reset()
        if reply is not None:
            reply.finished = now
        if future is not None and not future.done() and reply is not None:
            future.set_result(reply)

    def _fail(self, text: str) -> None:
        future = self.future
        self.state = "broken"
        if future is not None and not future.done():
            future.set_exception(ClientError(text))
        if self.transport is not None:
            self.transport.abort()

    # -- use

    def usable(self) -> bool:
        return self.transport is not None and not self.lost and self.keep_alive and self.state == "idle"

    def send(self, raw: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None and self.state == "idle"
        self.reply = Reply()
        self.future = asyncio.get_running_loop().create_future()
        self.state = "head"
        self.reply.sent = time.monotonic()
        self.transport.write(raw)
        return self.future

    def abort(self) -> None:
        self.state = "broken"
        if self.transport is not None:
            self.transport.abort()


class Client:
    """One simulated user: a keep-alive connection per address, one request at a time."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, int], Connection] = {}

    async def post(self, host: str, port: int, path: str, body: bytes, timeout: float,
                   headers: dict[str, str] | None = None) -> Reply:
        key = (host, port)
        conn = self._conns.get(key)
        if conn is None or not conn.usable():
            if conn is not None:
                conn.abort()
            loop = asyncio.get_running_loop()
            _, fresh = await asyncio.wait_for(loop.create_connection(Connection, host, port), timeout)
            self._conns[key] = conn = fresh
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        raw = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode("latin-1") + body
        try:
            return await asyncio.wait_for(conn.send(raw), timeout)
        except BaseException:
            conn.abort()
            self._conns.pop(key, None)
            raise

    def close(self) -> None:
        for conn in self._conns.values():
            conn.abort()
        self._conns.clear()


async def get_json(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """A one-off GET on its own connection: (status, parsed JSON or the text)."""
    return await request_json(host, port, "GET", path, None, timeout)


async def request_json(host: str, port: int, method: str, path: str, body: Any, timeout: float = 5.0
                       ) -> tuple[int, Any]:
    """A one-off request (JSON body if not None) on its own connection: (status, parsed JSON or the text)."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(head.encode() + b"\r\n" + payload)
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    if not data:
        raise ClientError(f"{method} {path}: empty answer")
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    if any(line.lower().startswith("transfer-encoding:") and "chunked" in line.lower() for line in lines[1:]):
        body = _dechunk(body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(body[pos:eol].split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out.append(body[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)
