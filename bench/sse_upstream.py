#!/usr/bin/env python3
"""
A tiny DMR-like HTTP/1.1 upstream for the streaming benchmarks (stdlib only).

    python bench/sse_upstream.py --port 0 [--host 127.0.0.1] [--models ai/llama3.2]

It prints ``LISTENING <port>`` on stdout once it accepts connections.

Routes (keep-alive, Content-Length or chunked request bodies):

* ``GET /engines/v1/models`` -- an OpenAI model list (used by health checks).
* ``POST /engines/v1/chat/completions?n=N&iv=MS&first=MS`` -- a
  ``text/event-stream`` answer with chunked transfer encoding: ``N`` chunk
  events, the first ``first`` ms after the headers, then one every ``iv`` ms
  (an absolute schedule, so no drift), then ``data: [DONE]``.  Every event is
  its own HTTP chunk and its own ``write``, like llama.cpp emitting tokens.
  Each event carries ``"bench_ts":<time.monotonic() at send>``; on Linux that
  clock is shared by all processes, so a client on the same machine can
  compute how long each chunk took to reach it.  ``iv=0`` sends as fast as
  the socket takes it (with flow control).

The request body is not parsed; query parameters default to n=20, iv=10,
first=0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

CHUNK_HEAD = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],'
    b'"created":1732600000,"id":"chatcmpl-bench","model":"ai/llama3.2",'
    b'"system_fingerprint":"b1-bench","object":"chat.completion.chunk","bench_ts":'
)
LAST_HEAD = CHUNK_HEAD.replace(b'"finish_reason":null', b'"finish_reason":"stop"').replace(
    b'"content":" token"', b'"content":""'
)
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def frame(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Upstream(asyncio.Protocol):
    def __init__(self, models_body: bytes) -> None:
        self.models_body = models_body
        self.buf = b""
        self.busy = False
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._can_write: asyncio.Future[None] | None = None

    # -- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._parse()

    # -- requests

    def _parse(self) -> None:
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self._reply(400, b"bad request line", b"text/plain", close=True)
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            rest = self.buf[end + 4 :]
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body, rest = self._dechunk(rest)
                if body is None:
                    return  # wait for more
            else:
                length = int(headers.get("content-length", "0") or 0)
                if len(rest) < length:
                    return
                rest = rest[length:]
            self.buf = rest
            close = headers.get("connection", "").lower() == "close"
            self._handle(method, target, close)

    @staticmethod
    def _dechunk(data: bytes) -> tuple[bytes | None, bytes]:
        body = []
        pos = 0
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return None, data
            size = int(data[pos:eol].split(b";")[0], 16)
            start = eol + 2
            if size == 0:
                # skip (empty) trailers
                end = data.find(b"\r\n", start)
                if end < 0:
                    return None, data
                return b"".join(body), data[end + 2 :]
            if len(data) < start + size + 2:
                return None, data
            body.append(data[start : start + size])
            pos = start + size + 2

    def _reply(self, status: int, body: bytes, ctype: bytes, close: bool = False) -> None:
        assert self.transport is not None
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"X")
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            reason,
            ctype,
            len(body),
            b"Connection: close\r\n" if close else b"",
        )
        self.transport.write(head + body)
        if close:
            self.transport.close()
            self.closed = True

    def _handle(self, method: str, target: str, close: bool) -> None:
        url = urlsplit(target)
        if method in ("GET", "HEAD") and url.path == "/engines/v1/models":
            self._reply(200, self.models_body, b"application/json", close)
            return
        if method == "POST" and url.path.endswith("/chat/completions"):
            q = parse_qs(url.query)

            def num(key: str, default: float) -> float:
                try:
                    return float(q[key][0])
                except (KeyError, ValueError, IndexError):
                    return default

            self.busy = True
            asyncio.ensure_future(
                self._stream(int(num("n", 20)), num("iv", 10.0) / 1000.0, num("first", 0.0) / 1000.0, close)
            )
            return
        self._reply(404, b'{"error":"not found"}', b"application/json", close)

    async def _stream(self, n: int, iv: float, first: float, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport.write(SSE_HEADERS)
            start = loop.time()
            paced = iv > 0 or first > 0
            for k in range(n):
                if paced:
                    delay = start + first + k * iv - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                elif k and k % 8 == 0:
                    await asyncio.sleep(0)  # let the other streams in
                if self._can_write is not None:
                    await self._can_write
                if self.closed:
                    return
                head = LAST_HEAD if k == n - 1 else CHUNK_HEAD
                transport.write(frame(b"%s%.6f}\n\n" % (head, time.monotonic())))
            if self.closed:
                return
            transport.write(frame(DONE) + b"0\r\n\r\n")
            if close:
                transport.close()
                self.closed = True
        finally:
            self.busy = False
        if not self.closed and self.buf:
            self._parse()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--models", default="ai/llama3.2", help="comma-separated model ids to list")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    models_body = json.dumps(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 1732600000, "owned_by": "docker"} for m in models],
        },
        separators=(",", ":"),
    ).encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(models_body), args.host, args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
