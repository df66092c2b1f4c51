#!/usr/bin/env python3
"""
A health shim for SGLang's router in front of real DMRs (``bench/routing.py --scenario real``).

    python bench/routing_shim.py --map LISTEN=UPSTREAM_PORT [--map ...]

sglang-router registers a worker only once ``GET <worker-url>/health`` answers 200, and a real DMR
has no ``/engines/health``.  For every accepted connection the shim reads the first request's
head: a ``GET``/``HEAD`` of a path ending in ``/health`` gets ``200 {}`` and ``Connection: close``;
anything else is spliced byte for byte to 127.0.0.1:UPSTREAM_PORT for the rest of the connection
(so a connection carries either health checks or proxied traffic, never both).  Prints ``READY``
once listening; stops on SIGTERM.  stdlib asyncio only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys

HEALTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
          b"Connection: close\r\n\r\n{}")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def handle(upstream: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = await reader.read(65536)
            if not data:
                return
            head += data
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) >= 2 and line[0] in (b"GET", b"HEAD") and line[1].split(b"?")[0].endswith(b"/health"):
            writer.write(HEALTH)
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        up_writer.write(head)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main(maps: list[tuple[int, int]]) -> None:
    servers = []
    for listen, upstream in maps:
        servers.append(await asyncio.start_server(functools.partial(handle, upstream), "127.0.0.1", listen))
    print("READY " + " ".join(str(listen) for listen, _ in maps), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--map", action="append", required=True, help="LISTEN=UPSTREAM_PORT")
    ns = ap.parse_args()
    pairs = []
    for item in ns.map:
        a, _, b = item.partition("=")
        pairs.append((int(a), int(b)))
    asyncio.run(main(pairs))
    sys.exit(0)
