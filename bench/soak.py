"""
Soak test: steady mixed traffic plus periodic chaos against the real `twistd -n olladmr`,
watching the daemon's memory and file descriptors.

Three fake DMRs (tests/fakedmr.py) run in this process on loopback.  `--clients`
workers send, back to back, a mix of non-streaming chats, streams (8 tokens,
`--chunk-delay` apart), embeddings, model lists, bad requests (expected 4xx) and
streams the client abandons after the first event.  Every `--chaos-interval`
seconds (shortened for short runs so that the whole cycle fits: a 1-minute run
has a step every 8.6 s) the next step of a cycle runs: kill a DMR, SIGHUP-reload to another
endpoint set, restart the DMR, make a DMR slow (`header_delay`), reload back,
make it fast again.  Every 5 s the daemon's VmRSS (/proc/PID/status) and open
fds (/proc/PID/fd) are sampled (summed over its child processes, if any).

At the end: requests sent, failures by reason, chaos events, and an RSS/fd table
(start, min, max, end).  Every loop is bounded by the deadline and an iteration cap,
every request by a timeout; all traffic stays on 127.0.0.1; the daemon and the fakes
are stopped however the run ends.

    python bench/soak.py [--minutes 10] [--clients 12] [--chaos-interval 30] [--python PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sys
import tempfile
import warnings
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from twisted.internet import defer, protocol, reactor, task  # noqa: E402
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from failover import _free_port  # noqa: E402
from fakedmr import FakeDMR  # noqa: E402

warnings.filterwarnings("ignore", message="Using readBody with a transport")

TOKENS = [f"t{i} " for i in range(8)]
CHAT = "/olla/dmr/engines/v1/chat/completions"
EMBED = "/olla/dmr/engines/v1/embeddings"
JSON_HEADERS = {b"content-type": [b"application/json"]}
REQUEST_TIMEOUT = 30.0  # seconds any single client request may take (bounded waits)
SAMPLE_EVERY = 5.0
MAX_ITERATIONS = 10_000_000  # per worker, a guard on top of the deadline
CHAOS_STEPS = 6  # kill, reload, restart, slow, reload, fast


class DaemonOutput(protocol.ProcessProtocol):
    """The daemon's stdout/stderr: readiness, reload and trouble counters, the last lines."""

    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.counts: Counter[str] = Counter()
        self.tail: list[str] = []
        self.trouble: list[str] = []
        self._partial = b""
        self.exit: Any = None

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if "listening on" in line and not self.ready.called:
                self.ready.callback(None)
            for key in ("reloaded ", "reload failed", "Traceback", "Unhandled", "is now offline", "is now healthy",
                        "stream ended early", "failed: "):
                if key in line:
                    self.counts[key.strip()] += 1
            if ("Traceback" in line or "Unhandled" in line or "CRITICAL" in line or "[-] ERROR" in line
                    or "internal error" in line) and len(self.trouble) < 40:
                self.trouble.append(line[:400])
            self.tail.append(line[:300])
            if len(self.tail) > 60:
                del self.tail[:-60]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit = reason.value
        if not self.ended.called:
            self.ended.callback(None)


def write_config(path: str, fakes: list[FakeDMR], args: argparse.Namespace) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(
            "proxy: {load_balancer: least-connections, response_header_timeout: 10s, read_timeout: 10s}\n"
            "logging: {level: %s}\nendpoints:\n" % args.log_level
        )
        for f in fakes:
            handle.write(f"  - {{url: '{f.url}', name: {f.name}, priority: 50, check_interval: 2s, check_timeout: 1s}}\n")
    os.replace(path + ".tmp", path)  # a reload never reads a half-written file


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def sample(pid: int) -> tuple[float, int, int] | None:
    """(RSS in MB, open fds, processes) of the daemon's process tree, or None once it is gone."""
    rss_kb, fds, procs = 0, 0, 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss_kb += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
            procs += 1
        except OSError:
            continue
    return (rss_kb / 1024, fds, procs) if procs else None


class _FirstEventThenLeave(protocol.Protocol):
    """Reads a stream until its first bytes, then drops the connection (a client leaving mid-stream)."""

    def __init__(self, done: defer.Deferred[int]) -> None:
        self.done = done
        self.bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.bytes)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rnd = random.Random(args.seed)
        self.results: Counter[str] = Counter()  # kind -> count of successes
        self.failures: Counter[str] = Counter()  # "kind: reason" -> count
        self.sent = 0
        self.samples: list[tuple[float, float, int, int]] = []  # (t, rss MB, fds, procs)
        self.events: list[tuple[float, str]] = []
        self.started = 0.0
        self.deadline = 0.0
        self.proc: Any = None
        self.out = DaemonOutput()
        self.fakes: list[FakeDMR] = []
        self.cfg = ""

    # -- helpers

    def now(self) -> float:
        return reactor.seconds() - self.started

    def note(self, what: str) -> None:
        self.events.append((self.now(), what))
        print(f"[{self.now():6.1f}s] {what}", flush=True)

    async def request(self, agent: Agent, method: bytes, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        d = agent.request(method, self.base + path.encode(), Headers(JSON_HEADERS), producer)
        d.addTimeout(REQUEST_TIMEOUT, reactor)
        response = await d
        body_d = readBody(response)
        body_d.addTimeout(REQUEST_TIMEOUT, reactor)
        return response.code, await body_d

    # -- traffic

    def pick(self) -> str:
        r = self.rnd.random()
        for kind, weight in (("chat", 0.33), ("stream", 0.25), ("embeddings", 0.14), ("models", 0.05),
                             ("bad", 0.13), ("leave", 0.10)):
            if r < weight:
                return kind
            r -= weight
        return "chat"

    async def one(self, agent: Agent, leave_agent: Agent, kind: str) -> str | None:
        """Run one request of ``kind``; return None on success or a failure reason."""
        model = self.rnd.choice(["ai/smollm2", "ai/llama3.2"])
        if kind == "chat":
            code, body = await self.request(agent, b"POST", CHAT, json.dumps(
                {"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
            if code != 200:
                return f"HTTP {code} {_code_of(body)}"
            if json.loads(body)["choices"][0]["message"]["content"] != "".join(TOKENS):
                return "wrong content"
        elif kind == "stream":
            code, body = await self.request(agent, b"POST", CHAT, json.dumps(
                {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode())
            if code != 200:
                return f"HTTP {code} {_code_of(body)}"
            if not body.endswith(b"data: [DONE]\n\n"):
                tail = body.rstrip().rsplit(b"\n\n", 1)[-1]
                return f"stream not complete ({_code_of(tail[len(b'data: '):]) or tail[-60:]!r})"
        elif kind == "embeddings":
            code, body = await self.request(agent, b"POST", EMBED, json.dumps(
                {"model": model, "input": ["soak", "test"]}).encode())
            if code != 200:
                return f"HTTP {code} {_code_of(body)}"
            if len(json.loads(body)["data"]) != 2:
                return "wrong embeddings"
        elif kind == "models":
            code, body = await self.request(agent, b"GET", "/olla/dmr/engines/v1/models")
            if code != 200:
                return f"HTTP {code}"
        elif kind == "bad":
            method, path, payload, expected = self.rnd.choice([
                (b"POST", CHAT, b"{not json", 400),
                (b"POST", CHAT, b'{"messages": []}', 400),
                (b"POST", CHAT, b'{"model": 7}', 400),
                (b"POST", CHAT, b'{"model": "ai/nope", "messages": []}', 404),
                (b"GET", CHAT, None, 405),
                (b"GET", "/olla/dmr/metrics", None, 404),  # (DMR's per-engine metrics: not served)
                (b"POST", "/olla/dmr/models/create", b"{}", 403),  # a model-management write: never forwarded
                (b"POST", EMBED, b"[" * 20000, 400),
            ])
            code, body = await self.request(agent, method, path, payload)
            if code != expected:
                return f"expected {expected}, got HTTP {code} {_code_of(body)}"
        elif kind == "leave":
            body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
            d = leave_agent.request(b"POST", self.base + CHAT.encode(), Headers(JSON_HEADERS),
                                    FileBodyProducer(io.BytesIO(body)))
            d.addTimeout(REQUEST_TIMEOUT, reactor)
            response = await d
            if response.code != 200:
                await readBody(response)
                return f"HTTP {response.code}"
            got: defer.Deferred[int] = defer.Deferred()
            got.addTimeout(REQUEST_TIMEOUT, reactor)
            response.deliverBody(_FirstEventThenLeave(got))
            if await got == 0:
                return "no first event"
        return None

    async def worker(self, index: int) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        agent = Agent(reactor, pool=pool)
        leave_agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        try:
            for _ in range(MAX_ITERATIONS):
                if reactor.seconds() >= self.deadline:
                    break
                kind = self.pick()
                self.sent += 1
                try:
                    reason = await self.one(agent, leave_agent, kind)
                except Exception as exc:  # a client-visible failure
                    reason = f"{type(exc).__name__}: {str(exc)[:80]}"
                if reason is None:
                    self.results[kind] += 1
                else:
                    self.failures[f"{kind}: {reason}"] += 1
        finally:
            await pool.closeCachedConnections()

    # -- chaos and sampling

    async def chaos(self, interval: float) -> None:
        fakes = self.fakes
        victim, slow = fakes[0], fakes[2]
        sets = [fakes, [fakes[1], fakes[2]], [fakes[0], fakes[1]]]
        reload_n = 0

        def reload() -> None:
            nonlocal reload_n
            reload_n += 1
            chosen = sets[reload_n % len(sets)]
            write_config(self.cfg, chosen, self.args)
            self.proc.signalProcess("HUP")
            self.note(f"chaos: SIGHUP reload -> endpoints {[f.name for f in chosen]}")

        async def kill() -> None:
            await victim.stop()
            self.note(f"chaos: killed {victim.name}")

        async def restart() -> None:
            await victim.start(victim.port)
            victim.tokens, victim.chunk_delay = list(TOKENS), self.args.chunk_delay
            self.note(f"chaos: restarted {victim.name}")

        async def make_slow() -> None:
            slow.header_delay = 1.5
            self.note(f"chaos: {slow.name} slow (header_delay 1.5s)")

        async def make_fast() -> None:
            slow.header_delay = 0.0
            self.note(f"chaos: {slow.name} fast again")

        async def do_reload() -> None:
            reload()

        steps = [kill, do_reload, restart, make_slow, do_reload, make_fast]
        for n in range(10_000):
            at = self.started + (n + 1) * interval
            if at >= self.deadline - 1.0:
                break
            for _ in range(100_000):  # sleep in short slices so an early end (Ctrl-C) is noticed
                if reactor.seconds() >= min(at, self.deadline):
                    break
                await task.deferLater(reactor, min(1.0, at - reactor.seconds()), lambda: None)
            if reactor.seconds() >= self.deadline - 1.0:
                break
            await steps[n % len(steps)]()
        # leave the fleet whole for the end of the run
        if not victim._listening:
            await restart()
        if slow.header_delay:
            await make_fast()

    async def sampler(self) -> None:
        for _ in range(1_000_000):
            point = sample(self.proc.pid)
            if point is not None:
                self.samples.append((self.now(), *point))
            if reactor.seconds() >= self.deadline:
                break
            await task.deferLater(reactor, min(SAMPLE_EVERY, max(0.0, self.deadline - reactor.seconds())), lambda: None)

    # -- the run

    async def run(self) -> int:
        args = self.args
        self.fakes = [FakeDMR(name=f"dmr{i}") for i in range(3)]
        for f in self.fakes:
            await f.start()
            f.tokens, f.chunk_delay = list(TOKENS), args.chunk_delay
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}".encode()
        self.cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False).name
        write_config(self.cfg, self.fakes, args)
        python = args.python or sys.executable
        self.proc = reactor.spawnProcess(
            self.out, python,
            [python, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "olladmr",
             "--config", self.cfg, "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT,
        )
        shutdown_hook = reactor.addSystemEventTrigger("before", "shutdown", self._kill_daemon)
        try:
            ready = self.out.ready
            ready.addTimeout(30, reactor)
            await defer.DeferredList([ready, self.out.ended], fireOnOneCallback=True, fireOnOneErrback=True)
            if not ready.called or self.out.ended.called:
                print("the daemon did not start:\n" + "\n".join(self.out.tail))
                return 1
            self.started = reactor.seconds()
            duration = args.minutes * 60
            self.deadline = self.started + duration
            interval = min(args.chaos_interval, max(duration / (CHAOS_STEPS + 1), 1.0))
            print(f"daemon pid {self.proc.pid} on 127.0.0.1:{port}; {args.clients} clients for {duration:g}s; "
                  f"chaos every {interval:.1f}s; fakes {[f.url for f in self.fakes]}", flush=True)
            await defer.DeferredList(
                [defer.ensureDeferred(self.worker(i)) for i in range(args.clients)]
                + [defer.ensureDeferred(self.chaos(interval)), defer.ensureDeferred(self.sampler())]
            )
            await task.deferLater(reactor, 2.5, lambda: None)  # in-flight work and health checks settle
            point = sample(self.proc.pid)
            if point is not None:
                self.samples.append((self.now(), *point))
            self.report(duration)
        finally:
            await self._stop_daemon()
            reactor.removeSystemEventTrigger(shutdown_hook)
            for f in self.fakes:
                if f._listening is not None:
                    await f.stop()
            for path in (self.cfg, self.cfg + ".tmp"):
                if path and os.path.exists(path):
                    os.unlink(path)
        return 0

    async def _stop_daemon(self) -> None:
        if self.proc is None or self.out.ended.called:
            return
        self.proc.signalProcess("TERM")
        ended = self.out.ended
        timer = reactor.callLater(20, self._kill_daemon)
        await ended
        if timer.active():
            timer.cancel()
        print(f"daemon stopped: {self.out.exit}")

    def _kill_daemon(self) -> None:
        if self.proc is not None and not self.out.ended.called:
            try:
                self.proc.signalProcess("KILL")
            except Exception:
                pass

    def report(self, duration: float) -> None:
        ok = sum(self.results.values())
        failed = sum(self.failures.values())
        print()
        print(f"=== soak: {duration:g}s, {self.args.clients} clients, chunk_delay {self.args.chunk_delay:g}s ===")
        print(f"requests sent: {self.sent}  ok: {ok}  failed: {failed}  "
              f"({self.sent / max(duration, 1e-9):.0f}/s)")
        print("ok by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.results.items())))
        if self.failures:
            print("failures by reason:")
            for reason, count in self.failures.most_common():
                print(f"  {count:6d}  {reason}")
        print("chaos events: " + ("; ".join(f"{t:.0f}s {what.removeprefix('chaos: ')}" for t, what in self.events)
                                  or "none"))
        print("daemon log: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.out.counts.items())))
        for line in self.out.trouble[:10]:
            print(f"  !! {line}")
        print("served per endpoint:", {f.name: len(f.inference_requests) for f in self.fakes})
        if self.samples:
            rss = [s[1] for s in self.samples]
            fds = [s[2] for s in self.samples]
            procs = max(s[3] for s in self.samples)
            print(f"\nsamples: {len(self.samples)} (every {SAMPLE_EVERY:g}s; processes: {procs})")
            print(f"{'':10} {'start':>8} {'min':>8} {'max':>8} {'end':>8}")
            print(f"{'RSS (MB)':10} {rss[0]:8.1f} {min(rss):8.1f} {max(rss):8.1f} {rss[-1]:8.1f}")
            print(f"{'open fds':10} {fds[0]:8d} {min(fds):8d} {max(fds):8d} {fds[-1]:8d}")
            if self.args.series:
                for t, r, f, _ in self.samples:
                    print(f"  {t:7.1f}s  rss {r:7.1f} MB  fds {f}")


def _code_of(body: bytes) -> str:
    """The OpenAI error code in ``body``, if it is one."""
    try:
        return str(json.loads(body)["error"]["code"])
    except Exception:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--chaos-interval", type=float, default=30.0)
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between a stream's events")
    parser.add_argument("--python", help="interpreter that runs the daemon (must import olladmr)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--series", action="store_true", help="also print every RSS/fd sample")
    args = parser.parse_args()
    if args.minutes <= 0 or args.clients <= 0:
        parser.error("--minutes and --clients must be positive")

    def run(_reactor: Any) -> defer.Deferred[int]:
        soak = Soak(args)

        def stop(signum: int, frame: Any) -> None:  # Ctrl-C / SIGTERM: end the run early, still clean up
            soak.deadline = reactor.seconds()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        d = defer.ensureDeferred(soak.run())
        d.addCallback(lambda code: sys.exit(code) if code else None)
        return d

    task.react(run)


if __name__ == "__main__":
    main()
