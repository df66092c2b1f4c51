#!/usr/bin/env python3
"""
A 20 MB embeddings request and its 20 MB answer, relayed by olladmr: how much its RSS grows.

    python bench/bigbody.py [--mb 20] [--rounds 3] [--python PATH]

Starts an upstream (this file with ``--upstream PORT``: a Twisted server that lists
``ai/smollm2``, reads each POST whole and answers a JSON body of the same size) and
olladmr (``twistd -n olladmr``) on 127.0.0.1, sends ``--rounds`` embeddings requests
of ``--mb`` MB (``input``: a list of 1 KB strings) one after another and reads each
answer, and reads olladmr's ``VmRSS`` before, after each round, and its peak
(``VmHWM``) from ``/proc``.  Every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ai/smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def upstream(port: int) -> None:
    """The upstream: GET lists the model; a POST is read whole and answered with a JSON body of its size."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    listing = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                         "owned_by": "docker"}]}).encode()

    class Upstream(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            if request.path.endswith(b"/models"):
                return listing
            request.setResponseCode(404)
            return b"{}"

        def render_POST(self, request: server.Request) -> bytes:
            size = len(request.content.read())  # type: ignore[union-attr]
            count = max(1, size // 1000)
            body = b'{"object":"list","data":[' + b",".join(
                b'{"object":"embedding","index":%d,"embedding":[%s]}' % (i, b"0.1234," * 120 + b"0.5") for i in range(count)
            ) + b'],"model":"ai/smollm2","usage":{"prompt_tokens":1,"total_tokens":1}}'
            request.setHeader(b"content-type", b"application/json")
            return body

    reactor.listenTCP(port, server.Site(Upstream()), interface="127.0.0.1")
    reactor.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python", default=sys.executable, type=os.path.abspath)  # (the daemon runs in another directory)
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        upstream(args.upstream)
        return
    procs: list[subprocess.Popen[bytes]] = []
    try:
        uport, oport = free_port(), free_port()
        procs.append(subprocess.Popen([args.python, __file__, "--upstream", str(uport)]))
        tmp = Path(tempfile.mkdtemp(prefix="olladmr-bigbody-"))
        config = tmp / "olla.yaml"
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {oport}, request_limits: {{max_body_size: 200MB}}}}\n"
            f"logging: {{level: warn}}\n"
            f"endpoints:\n  - {{name: up, url: 'http://127.0.0.1:{uport}', check_interval: 5s}}\n"
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        odmr = subprocess.Popen(
            [args.python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
             "-n", "--pidfile=", "olladmr", "--config", str(config)], env=env, cwd=str(tmp),
            stdout=subprocess.DEVNULL,
        )
        procs.append(odmr)
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", oport, timeout=5)
                conn.request("GET", "/olla/dmr/engines/v1/models")
                if MODEL.encode() in conn.getresponse().read():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("olladmr did not come up")
            time.sleep(0.2)
        time.sleep(1.0)
        before = status_kb(odmr.pid, "VmRSS")
        item = "x" * 1000
        count = int(args.mb * 1_000_000 / (len(item) + 3))
        body = json.dumps({"model": MODEL, "input": [item] * count}).encode()
        rows = []
        for round_ in range(1, args.rounds + 1):
            conn = http.client.HTTPConnection("127.0.0.1", oport, timeout=120)
            started = time.monotonic()
            conn.request("POST", "/olla/dmr/engines/v1/embeddings", body, {"content-type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            elapsed = time.monotonic() - started
            assert response.status == 200, (response.status, answer[:200])
            rows.append((round_, len(body), len(answer), elapsed, status_kb(odmr.pid, "VmRSS"),
                         status_kb(odmr.pid, "VmHWM")))
        print(f"olladmr idle RSS before: {before / 1024:.1f} MB; request {len(body) / 1e6:.1f} MB, "
              f"answer {rows[0][2] / 1e6:.1f} MB")
        print()
        print("| round | time (s) | RSS after (MB) | growth after (MB) | peak RSS (MB) | peak growth (MB) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for round_, _, _, elapsed, rss, hwm in rows:
            print(f"| {round_} | {elapsed:.2f} | {rss / 1024:.1f} | {(rss - before) / 1024:.1f} | {hwm / 1024:.1f} | "
                  f"{(hwm - before) / 1024:.1f} |")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
