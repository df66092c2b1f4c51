#!/usr/bin/env python3
"""
Lost requests on real DMRs: how many of N streamed chats fail as the client sees them, sent straight to two real
DMRs (round-robin) and through olladmr in front of the same two (``proxy.lost_requests`` on, and off).

A failure is anything but a 200 whose stream ended with ``data: [DONE]`` within ``--timeout`` seconds. A real DMR
loses about 1-3 % of requests (an empty 502 at once, or no headers at all for 30 s and more); olladmr retries such
a request once (issue 20).  Every process runs in its own process group and is stopped at the end.

    .venv/bin/python bench/lost.py --requests 1000 --clients 4 [--seeds 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from routing_client import Client, ClientError, get_json  # noqa: E402

REALDMR = os.path.normpath(os.path.join(ROOT, "..", "shared", "tools", "realdmr", "dmr"))
MODEL = "ai/tiny"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run(targets: list[tuple[int, str]], requests: int, clients: int, timeout: float, seed: int
              ) -> dict[str, Any]:
    """``requests`` streamed chats over ``targets`` ((port, path), round-robin); failures by kind."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(("alpha", "beta", "gamma", "delta", "river", "stone")) for _ in range(12))
               for _ in range(requests)]
    pending = iter(range(requests))
    failures: dict[str, int] = {}
    ok = 0
    slow: list[float] = []

    async def user() -> None:
        nonlocal ok
        client = Client()
        try:
            for index in pending:
                port, path = targets[index % len(targets)]
                body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 8, "seed": index,
                                   "messages": [{"role": "user", "content": prompts[index]}]}).encode()
                started = time.monotonic()
                try:
                    reply = await client.post("127.0.0.1", port, path, body, timeout)
                except (ClientError, OSError, asyncio.TimeoutError) as error:
                    kind = type(error).__name__ + (": timeout" if isinstance(error, asyncio.TimeoutError) else "")
                    failures[kind] = failures.get(kind, 0) + 1
                    client.close()
                    client = Client()
                    continue
                took = time.monotonic() - started
                if reply.status == 200 and reply.done:
                    ok += 1
                    if took > 5:
                        slow.append(round(took, 1))
                else:
                    kind = f"HTTP {reply.status}" + ("" if reply.status != 200 else " without [DONE]")
                    kind += f" {reply.error_body[:60]!r}" if reply.error_body else " (empty body)"
                    failures[kind] = failures.get(kind, 0) + 1
        finally:
            client.close()

    began = time.monotonic()
    await asyncio.gather(*(user() for _ in range(clients)))
    return {"requests": requests, "ok": ok, "failed": requests - ok, "failures": failures, "slow_over_5s": slow,
            "wall_s": round(time.monotonic() - began, 1)}


def start_dmrs(count: int, statedir: str) -> list[int]:
    ports = [free_port() for _ in range(count)]
    env = {**os.environ, "TMPDIR": statedir}
    for port in ports:
        subprocess.run(["bash", os.path.join(REALDMR, "start.sh"), str(port)], env=env, check=True, timeout=180,
                       stdout=subprocess.DEVNULL)
    return ports


def stop_dmrs(ports: list[int], statedir: str) -> None:
    env = {**os.environ, "TMPDIR": statedir}
    for port in ports:
        subprocess.run(["bash", os.path.join(REALDMR, "stop.sh"), str(port), "--purge"], env=env, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def start_olladmr(ports: list[int], retry: bool, workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "proxy": {"lost_requests": {"retry": retry}, "response_header_timeout": "60s"},
        "endpoints": [{"name": f"dmr-{i}", "url": f"http://127.0.0.1:{p}", "check_interval": "2s", "priority": 100}
                      for i, p in enumerate(ports)],
        "logging": {"level": "warn"},
    }
    path = os.path.join(workdir, f"olla-{port}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)  # (JSON is YAML)
    log = open(os.path.join(workdir, f"olla-{port}.log"), "wb")
    proc = subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "twistd"), "-n", "--pidfile=", "olladmr",
                             "--config", path], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            status, document = await get_json("127.0.0.1", port, "/internal/status/endpoints")
            if status == 200 and all(e.get("status") == "healthy" for e in document.get("endpoints", document)):
                return proc, port
        except (OSError, ClientError, asyncio.TimeoutError, ValueError):
            pass
        await asyncio.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"olladmr did not become ready; see {log.name}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


async def main(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="lost-bench-")
    ports: list[int] = []
    report: dict[str, Any] = {"command": " ".join(sys.argv), "runs": []}
    try:
        ports = start_dmrs(2, workdir)
        for port in ports:  # load the model on both before timing anything
            await run([(port, "/engines/v1/chat/completions")], 2, 1, 60, 0)
        for seed in args.seeds:
            for name, retry in (("direct", None), ("olladmr", True), ("olladmr, retry off", False)):
                if retry is None:
                    targets = [(p, "/engines/v1/chat/completions") for p in ports]
                    result = await run(targets, args.requests, args.clients, args.timeout, seed)
                else:
                    proc, port = await start_olladmr(ports, retry, workdir)
                    try:
                        result = await run([(port, "/olla/dmr/engines/v1/chat/completions")], args.requests,
                                           args.clients, args.timeout, seed)
                    finally:
                        stop(proc)
                result.update(route=name, seed=seed)
                report["runs"].append(result)
                print(f"seed {seed} {name}: {result['failed']} of {result['requests']} failed "
                      f"{result['failures'] or ''} in {result['wall_s']} s; over 5 s: {result['slow_over_5s']}",
                      flush=True)
    finally:
        stop_dmrs(ports, workdir)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n| route | requests | failed (client saw) | what failed | over 5 s |\n|---|---|---|---|---|")
    for name in ("direct", "olladmr", "olladmr, retry off"):
        runs = [r for r in report["runs"] if r["route"] == name]
        kinds: dict[str, int] = {}
        for r in runs:
            for k, v in r["failures"].items():
                kinds[k] = kinds.get(k, 0) + v
        print(f"| {name} | {sum(r['requests'] for r in runs)} | {sum(r['failed'] for r in runs)} | "
              f"{'; '.join(f'{v} × {k}' for k, v in kinds.items()) or '–'} | "
              f"{sum(len(r['slow_over_5s']) for r in runs)} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits for a whole answer")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    parser.add_argument("--json")
    sys.exit(asyncio.run(main(parser.parse_args())))
