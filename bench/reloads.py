"""
Reloads under steady streaming traffic, against the real `twistd -n olladmr`.

Three fake DMRs stream 8 tokens 50 ms apart (about 0.4 s a stream).  N
clients stream back to back; meanwhile the config file is rewritten and
`kill -HUP` sent every `--interval` seconds, alternating between endpoint
sets {dmr0, dmr1} and {dmr1, dmr2}, so endpoints carrying live streams are
removed and re-added.  A stream counts as lost unless it ends with
`data: [DONE]`.

    python bench/reloads.py [--reloads 20] [--clients 16] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from failover import _free_port, _Out  # noqa: E402
from fakedmr import FakeDMR  # noqa: E402


def write_config(path: str, fakes: list[FakeDMR]) -> None:
    with open(path, "w") as handle:
        handle.write("logging: {level: info}\nendpoints:\n")
        for f in fakes:
            handle.write(f"  - {{url: '{f.url}', name: {f.name}, priority: 50, check_interval: 2s, check_timeout: 1s}}\n")


async def main(args: argparse.Namespace) -> None:
    fakes = [FakeDMR(name=f"dmr{i}") for i in range(3)]
    for f in fakes:
        await f.start()
        f.tokens = [f"t{i} " for i in range(8)]
        f.chunk_delay = 0.05
    sets = [[fakes[0], fakes[1]], [fakes[1], fakes[2]]]
    port = _free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False).name
    write_config(cfg, sets[0])
    out = _Out()
    proc = reactor.spawnProcess(
        out, sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "olladmr",
         "--config", cfg, "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT,
    )
    await out.ready
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = args.clients
    agent = Agent(reactor, pool=pool)
    url = f"http://127.0.0.1:{port}/olla/dmr/engines/v1/chat/completions".encode()
    body = json.dumps({"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    results: Counter[str] = Counter()
    done = False

    async def client() -> None:
        while not done:
            try:
                r = await agent.request(b"POST", url, Headers({b"content-type": [b"application/json"]}),
                                        FileBodyProducer(io.BytesIO(body)))
                data = await readBody(r)
                results["complete" if r.code == 200 and data.endswith(b"data: [DONE]\n\n") else f"lost:{r.code}"] += 1
            except Exception as exc:
                results[f"lost:{type(exc).__name__}"] += 1

    clients = [defer.ensureDeferred(client()) for _ in range(args.clients)]
    await task.deferLater(reactor, 1.0, lambda: None)
    for n in range(args.reloads):
        write_config(cfg, sets[(n + 1) % 2])
        proc.signalProcess("HUP")
        await task.deferLater(reactor, args.interval, lambda: None)
    await task.deferLater(reactor, 1.0, lambda: None)
    done = True
    await defer.DeferredList(clients)
    reloaded = out.buf.count(b"reloaded ")
    failed = out.buf.count(b"reload failed")
    lost = sum(v for k, v in results.items() if k.startswith("lost"))
    print(f"reloads: {args.reloads} sent, {reloaded} applied, {failed} failed; clients={args.clients}")
    print(f"streams: {sum(results.values())} started, {results['complete']} complete, {lost} lost ({dict(results)})")
    print("served per endpoint:", {f.name: len(f.inference_requests) for f in fakes})
    await pool.closeCachedConnections()
    proc.signalProcess("TERM")
    await out.ended
    for f in fakes:
        await f.stop()
    os.unlink(cfg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.5)
    task.react(lambda _r, a: defer.ensureDeferred(main(a)), [parser.parse_args()])
