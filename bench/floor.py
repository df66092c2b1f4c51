#!/usr/bin/env python3
"""
The floor of this design: what a proxy built on Twisted's reactor and
httptools costs per request with no logic at all, measured beside nginx.

Starts the bench's nginx upstream (fixed JSON), an nginx reverse proxy, and
a minimal relay (one Twisted process: llhttp parses the request, the bytes go
to a pooled keep-alive upstream connection, llhttp parses the answer, its
body goes back with a fixed head; no routing, headers, metrics, logs or
timeouts), then loads each with wrk at 32 connections and prints the CPU per
request of each proxy and their ratio.

    python bench/floor.py [--python PATH] [--seconds 8]

Anything olladmr does per request comes on top of the relay's figure; the
issue's "9x nginx" has to fit olladmr's routing, placement, metrics, access
record and HTTP semantics into what is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402

RELAY = r'''
import sys
import httptools
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

UPSTREAM, LISTEN = int(sys.argv[1]), int(sys.argv[2])
idle = []


class Upstream(protocol.Protocol):
    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.client = None
        self.body = []

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        body, self.body = b"".join(self.body), []
        client, self.client = self.client, None
        idle.append(self)
        client.respond(self.parser.get_status_code(), body)


class Client(protocol.Protocol):
    def connectionMade(self):
        self.parser = httptools.HttpRequestParser(self)
        self.body = []

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url = url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        body, self.body = b"".join(self.body), []
        upstream = idle.pop()
        upstream.client = self
        path = self.url.replace(b"/olla/dmr", b"", 1)
        upstream.transport.write(
            b"POST %s HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path, len(body), body))

    def respond(self, status, body):
        self.transport.write(
            b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))


def start():
    for _ in range(64):
        TCP4ClientEndpoint(reactor, "127.0.0.1", UPSTREAM).connect(
            protocol.Factory.forProtocol(Upstream)).addCallback(idle.append)
    reactor.listenTCP(LISTEN, protocol.Factory.forProtocol(Client), interface="127.0.0.1")


reactor.callWhenRunning(start)
reactor.run()
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=None, help="the interpreter for the relay (it needs twisted and httptools)")
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    py = bench.find_python(args.python)
    tmp = Path(tempfile.mkdtemp(prefix="olladmr-floor-"))
    procs = bench.Procs(tmp)
    lua = HERE / "wrk_post.lua"
    try:
        static_port = bench.free_port()
        nginx = procs.start("nginx-static", ["nginx", "-p", str(tmp), "-e", str(tmp / "static.error.log"),
                                             "-c", str(bench.write_static_nginx(tmp, static_port))])
        bench.wait_until("nginx", lambda: bench.hget(static_port, "GET", bench.MODELS_PATH)[0] == 200, 10, nginx, procs,
                         "nginx-static")
        proxy_port = bench.free_port()
        proxy = procs.start("nginx-proxy", ["nginx", "-p", str(tmp), "-e", str(tmp / "proxy.error.log"),
                                            "-c", str(bench.write_proxy_nginx(tmp, proxy_port, static_port, static_port))])
        bench.wait_until("nginx proxy", lambda: bench.hget(proxy_port, "POST", bench.PREFIX + bench.CHAT_PATH,
                                                           bench.CHAT_BODY)[0] == 200, 10, proxy, procs, "nginx-proxy")
        relay_port = bench.free_port()
        (tmp / "relay.py").write_text(RELAY)
        relay = procs.start("relay", [py, str(tmp / "relay.py"), str(static_port), str(relay_port)],
                            env=dict(os.environ, PYTHONPATH=str(bench.ROOT)))
        bench.wait_until("relay", lambda: bench.hget(relay_port, "POST", bench.PREFIX + bench.CHAT_PATH,
                                                     bench.CHAT_BODY)[0] == 200, 10, relay, procs, "relay")
        nginx_pids = lambda: [proxy.pid, *bench.children(proxy.pid)]  # noqa: E731
        cpu: dict[str, float] = {}
        for name, port, pids in (("nginx proxy", proxy_port, nginx_pids), ("twisted+httptools relay", relay_port,
                                                                           lambda: [relay.pid])):
            target = bench.Target(name, port, port, bench.PREFIX, pids=pids)
            bench.run_wrk(target, 32, 1, lua)  # warm up
            t0 = bench.cpu_ticks(pids())
            r = bench.run_wrk(target, 32, args.seconds, lua)
            t1 = bench.cpu_ticks(pids())
            cpu[name] = (t1 - t0) / bench.CLK_TCK * 1e6 / max(1, r["requests"])
            print(f"{name:24} {r['requests'] / args.seconds:9,.0f} req/s  CPU {cpu[name]:6.1f} µs/request", flush=True)
            time.sleep(0.5)
        ratio = cpu["twisted+httptools relay"] / cpu["nginx proxy"]
        print(f"relay / nginx: {ratio:.1f}x  (9x nginx here: {9 * cpu['nginx proxy']:.0f} µs per request)")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
