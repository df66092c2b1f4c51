#!/usr/bin/env python3
"""
Response affinity, measured: Responses API conversations through olladmr.

    python bench/responses.py [--turns 100] [--entries 100000]

Runs in one process on 127.0.0.1: three in-repo fake DMRs (tests/fakedmr.py,
each with its own in-memory response store) behind olladmr services built by
``olladmr.build`` with ``load_balancer: round-robin``, and a plain Twisted
HTTP client.  It reports:

* turns failed in an N-turn conversation chained by ``previous_response_id``
  through one olladmr (every follow-up must reach the endpoint that holds
  the previous answer, whatever round-robin would pick);
* the same conversation alternating between two olladmr instances (each
  follow-up is a miss in the receiving instance's map, found by probing);
* the probe's added latency: median turn time on a miss minus on a hit;
* the affinity map's memory per 100,000 ids (tracemalloc).

Needs the test dependencies (``pip install ".[test]"``) for the fake DMR.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import time
import tracemalloc
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from fakedmr import FakeDMR  # noqa: E402
from olladmr.build import build  # noqa: E402
from olladmr.config import parse_config  # noqa: E402
from olladmr.fleet.responses import ResponseDirectory  # noqa: E402
from io import BytesIO  # noqa: E402

from twisted.web.client import FileBodyProducer  # noqa: E402

PATH = "/olla/dmr/engines/v1/responses"


async def turn(agent: Agent, port: int, previous: str | None, text: str) -> tuple[int, dict[str, Any], float]:
    body = {"model": "ai/smollm2", "input": text}
    if previous:
        body["previous_response_id"] = previous
    started = time.perf_counter()
    response = await agent.request(
        b"POST", f"http://127.0.0.1:{port}{PATH}".encode(), Headers({b"content-type": [b"application/json"]}),
        FileBodyProducer(BytesIO(json.dumps(body).encode())),
    )
    data = await readBody(response)
    elapsed = time.perf_counter() - started
    try:
        document = json.loads(data)
    except ValueError:
        document = {}
    return response.code, document, elapsed


async def conversation(agent: Agent, ports: list[int], turns: int) -> tuple[int, list[float], list[str]]:
    """``turns`` chained turns, turn i sent to ports[i % len(ports)]; (failed turns, per-turn seconds, ids)."""
    failed = 0
    times: list[float] = []
    ids: list[str] = []
    previous = None
    for i in range(turns):
        code, document, elapsed = await turn(agent, ports[i % len(ports)], previous, f"turn {i}")
        expected = f"[turn {i + 1}]"
        text = "".join(c.get("text", "") for item in document.get("output", []) for c in item.get("content", []))
        if code != 200 or document.get("status") != "completed" or expected not in text:
            failed += 1
        else:
            previous = document["id"]
            ids.append(previous)
        times.append(elapsed)
    return failed, times, ids


def directory_memory(entries: int) -> tuple[float, float]:
    """Bytes per entry of a full ResponseDirectory: (its own structures, plus the id strings it keeps alive)."""
    alphabet = string.ascii_letters + string.digits
    rng = random.Random(7)
    ids = ["resp_" + "".join(rng.choice(alphabet) for _ in range(24)) for _ in range(entries)]
    names = ["dmr-gpu-1", "dmr-gpu-2", "dmr-gpu-3"]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    directory = ResponseDirectory(Clock(), max_entries=entries)
    for index, rid in enumerate(ids):
        directory.remember(rid, names[index % 3])
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    own = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    id_bytes = sum(sys.getsizeof(rid) for rid in ids)
    assert len(directory) == entries
    return own / entries, (own + id_bytes) / entries


async def main(args: argparse.Namespace) -> None:
    fakes = [FakeDMR(name=f"dmr-{i}") for i in range(3)]
    for fake in fakes:
        await fake.start()
    document = {
        "server": {"host": "127.0.0.1", "port": 0},
        "proxy": {"load_balancer": "round-robin"},
        "logging": {"level": "warn"},
        "endpoints": [{"url": f.url, "name": f.name, "check_interval": "30s"} for f in fakes],
    }
    config = parse_config(document, "bench")
    daemons = [build(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1") for _ in range(2)]
    for parts in daemons:
        parts.service.startService()
        await parts.service.serving
    ports = [parts.listener.port.getHost().port for parts in daemons]  # type: ignore[union-attr]
    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)
    try:
        await conversation(agent, ports[:1], 5)  # warm up
        failed_one, hit_times, ids = await conversation(agent, ports[:1], args.turns)
        owners = {next(f.name for f in fakes if rid in f.stored_responses) for rid in ids}
        failed_two, miss_times, _ = await conversation(agent, ports, args.turns)
        hit = statistics.median(hit_times[1:]) * 1e6
        miss = statistics.median(miss_times[1:]) * 1e6
        own, with_ids = directory_memory(args.entries)
        print(f"# olladmr response affinity ({args.turns} turns, 3 fake DMRs, round-robin)")
        print("| measure | value |")
        print("|---|---|")
        print(f"| turns failed, one olladmr, {args.turns}-turn conversation | {failed_one} |")
        print(f"| endpoints that held that conversation | {len(owners)} |")
        print(f"| turns failed, two olladmr instances alternating, {args.turns} turns | {failed_two} |")
        print(f"| median turn, hit in the local map (µs) | {hit:,.0f} |")
        print(f"| median turn, miss: owner found by probing (µs) | {miss:,.0f} |")
        print(f"| probe's added latency on a miss (µs) | {miss - hit:,.0f} |")
        print(f"| affinity map memory per 100,000 ids (MB), its own structures | {own * 100_000 / 1e6:.1f} |")
        print(f"| the same with the id strings it keeps alive (MB) | {with_ids * 100_000 / 1e6:.1f} |")
    finally:
        await pool.closeCachedConnections()
        for parts in daemons:
            await parts.service.stopService()
        for fake in fakes:
            await fake.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--entries", type=int, default=100_000)
    options = ap.parse_args()

    def run() -> Any:
        return defer.ensureDeferred(main(options))

    task.react(lambda _reactor: run())
