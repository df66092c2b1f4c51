"""
Failover under load, against the real `twistd -n olladmr` process.

Three fake DMRs (tests/fakedmr.py) on loopback, equal priority; N clients send
chat requests back to back for the whole run.  One DMR is killed at 1/3 of
the run and restarted at 2/3.  Reports requests sent and failed, how long
olladmr took to mark the dead endpoint offline and to route to it again
after the restart (polling /internal/status/endpoints every 20 ms).

    python bench/failover.py [--seconds 15] [--clients 16] [--check-interval 1s]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from twisted.internet import defer, protocol, reactor, task  # noqa: E402
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from fakedmr import FakeDMR  # noqa: E402


class _Out(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.buf = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        if b"listening on" in self.buf and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(args: argparse.Namespace) -> None:
    fakes = [FakeDMR(name=f"dmr{i}") for i in range(3)]
    for f in fakes:
        await f.start()
        f.chunk_delay = 0.0
    port = _free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write("proxy: {load_balancer: least-connections}\nlogging: {level: info}\nendpoints:\n")
    for f in fakes:
        cfg.write(f"  - {{url: '{f.url}', name: {f.name}, priority: 50, check_interval: {args.check_interval}, check_timeout: 500ms}}\n")
    cfg.close()
    out = _Out()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = reactor.spawnProcess(
        out, sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "olladmr",
         "--config", cfg.name, "--listen", f"tcp:{port}:interface=127.0.0.1"],
        env=env, path=ROOT,
    )
    await out.ready
    print('daemon up', flush=True)
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = args.clients
    agent = Agent(reactor, pool=pool)
    base = f"http://127.0.0.1:{port}".encode()
    body = json.dumps({"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}).encode()
    results: Counter[str] = Counter()
    start = reactor.seconds()
    stop_at = start + args.seconds
    events: dict[str, float] = {}

    async def client() -> None:
        while reactor.seconds() < stop_at:
            try:
                r = await agent.request(b"POST", base + b"/olla/dmr/engines/v1/chat/completions",
                                        Headers({b"content-type": [b"application/json"]}),
                                        FileBodyProducer(__import__("io").BytesIO(body)))
                await readBody(r)
                results[str(r.code)] += 1
            except Exception as exc:  # a client-visible failure
                results[type(exc).__name__] += 1

    async def status_of(name: str) -> tuple[str, bool]:
        r = await agent.request(b"GET", base + b"/internal/status/endpoints")
        doc = json.loads(await readBody(r))
        ep = next(e for e in doc["endpoints"] if e["name"] == name)
        return ep["status"], ep["routable"]

    async def chaos() -> None:
        victim = fakes[0]
        await task.deferLater(reactor, args.seconds / 3, lambda: None)
        events["killed"] = reactor.seconds()
        print('killing', dict(results), flush=True)
        await victim.stop()
        while (await status_of(victim.name))[0] != "offline":
            await task.deferLater(reactor, 0.02, lambda: None)
        events["marked_offline"] = reactor.seconds()
        print('offline', flush=True)
        await task.deferLater(reactor, max(0.0, start + 2 * args.seconds / 3 - reactor.seconds()), lambda: None)
        before = len(victim.inference_requests)
        await victim.start(victim.port)
        events["restarted"] = reactor.seconds()
        print('restarted', flush=True)
        while not (await status_of(victim.name))[1]:
            await task.deferLater(reactor, 0.02, lambda: None)
        events["routable_again"] = reactor.seconds()
        while len(victim.inference_requests) == before and reactor.seconds() < stop_at:
            await task.deferLater(reactor, 0.005, lambda: None)
        events["traffic_again"] = reactor.seconds()

    await defer.DeferredList([defer.ensureDeferred(client()) for _ in range(args.clients)] + [defer.ensureDeferred(chaos())])
    sent = sum(results.values())
    failed = sent - results["200"]
    print(f"clients={args.clients} seconds={args.seconds} check_interval={args.check_interval} balancer=least-connections")
    print(f"requests sent: {sent}  ok: {results['200']}  failed: {failed}  ({dict(results)})")
    print(f"killed -> marked offline: {(events['marked_offline'] - events['killed']) * 1000:.0f} ms")
    print(f"restarted -> routable again: {(events['routable_again'] - events['restarted']) * 1000:.0f} ms")
    print(f"restarted -> first request served by it: {(events['traffic_again'] - events['restarted']) * 1000:.0f} ms")
    per = {f.name: len(f.inference_requests) for f in fakes}
    print(f"served per endpoint: {per}")
    if args.show_log:
        print(out.buf.decode(errors="replace"))
    await pool.closeCachedConnections()
    proc.signalProcess("TERM")
    await out.ended
    for f in fakes:
        await f.stop()
    os.unlink(cfg.name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--check-interval", default="1s")
    parser.add_argument("--show-log", action="store_true")
    task.react(lambda _r, a: defer.ensureDeferred(main(a)), [parser.parse_args()])
