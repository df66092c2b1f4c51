#!/usr/bin/env python3
"""
Profile olladmr's request path: starts the bench's nginx upstream and olladmr
(one process), loads it with wrk (non-streaming chat, 32 connections) while
``py-spy record`` samples the daemon, and prints the functions that take the
most samples, by own time and by time inside them.

    python bench/profile.py [--seconds 10] [--connections 32] [--out DIR]

Needs wrk, nginx and py-spy (``pip install py-spy``) on PATH.  Also writes
the collapsed stacks (``DIR/stacks.txt``) for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", default=None, help="where to keep stacks.txt (default: a temporary directory)")
    ap.add_argument("--python", default=None)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--no-spy", action="store_true", help="only measure CPU per request (no py-spy attached)")
    ap.add_argument("--stream", action="store_true",
                    help="streaming requests (bench/sse_upstream.py, 2 events each) instead of nginx's fixed JSON")
    args = ap.parse_args()
    py = bench.find_python(args.python)
    tmp = Path(args.out or tempfile.mkdtemp(prefix="olladmr-profile-"))
    tmp.mkdir(parents=True, exist_ok=True)
    procs = bench.Procs(tmp)
    try:
        static_port = bench.free_port()
        nginx = procs.start("nginx-static", ["nginx", "-p", str(tmp), "-e", str(tmp / "static.error.log"),
                                             "-c", str(bench.write_static_nginx(tmp, static_port))])
        bench.wait_until("nginx", lambda: bench.hget(static_port, "GET", bench.MODELS_PATH)[0] == 200, 10, nginx, procs, "nginx-static")
        sse_port = static_port
        if args.stream:
            sse = procs.start("sse-upstream", [sys.executable, str(HERE / "sse_upstream.py"), "--port", "0",
                                               "--models", bench.STREAM_MODEL], stdout=subprocess.PIPE)
            assert sse.stdout is not None
            sse_port = int(sse.stdout.readline().split()[1])
        oport = bench.free_port()
        env = dict(os.environ, PYTHONPATH=str(bench.ROOT))
        odmr = procs.start("olladmr", [py, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                                       "-n", "--pidfile=", "olladmr", "--config",
                                       str(bench.write_olladmr_config(tmp, oport, static_port, sse_port))], env=env, cwd=bench.ROOT)
        bench.wait_until("olladmr", lambda: bench.hget(oport, "GET", bench.PREFIX + bench.MODELS_PATH)[0] == 200, 30, odmr, procs, "olladmr")
        target = bench.Target("olladmr", oport, oport, bench.PREFIX, pids=lambda: [odmr.pid])
        if args.stream:
            bench.CHAT_BODY = bench.STREAM_BODY.decode()  # what run_wrk posts
            target = _StreamTarget("olladmr", oport, oport, bench.PREFIX, pids=lambda: [odmr.pid])
        bench.run_wrk(target, args.connections, 1, HERE / "wrk_post.lua")  # warm up
        stacks = tmp / "stacks.txt"
        spy = None if args.no_spy else subprocess.Popen(["py-spy", "record", "--pid", str(odmr.pid), "--format", "raw", "--rate", "500",
                                "--duration", str(int(args.seconds) + 1), "--output", str(stacks)] + ([] if os.environ.get("SPY_BLOCKING") else ["--nonblocking"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if spy is not None:
            time.sleep(0.5)
        t0 = bench.cpu_ticks([odmr.pid])
        r = bench.run_wrk(target, args.connections, args.seconds, HERE / "wrk_post.lua")
        t1 = bench.cpu_ticks([odmr.pid])
        cpu_us = (t1 - t0) / bench.CLK_TCK * 1e6 / max(1, r["requests"])
        print(f"{r['requests']:.0f} requests, {r['requests'] / args.seconds:,.0f} req/s, CPU {cpu_us:.0f} µs/request, "
              f"latency p50 {r['p50_us']:.0f} p99 {r['p99_us']:.0f} µs"
              + ("" if spy is None else " (with py-spy attached)"))
        errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
        if errors:
            print(f"  {errors:g} wrk errors (non-2xx {r['status']:g}, timeouts {r['timeout']:g}): not a valid run")
        if spy is not None:
            spy.wait()
            report(stacks, args.top)
            print(f"stacks: {stacks}")
    finally:
        procs.stop_all()
    return 0


class _StreamTarget(bench.Target):
    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.chat_port}{self.stream_path(n=2, iv_ms=0)}"


def report(stacks: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inside: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        frames, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        names = [f.split(" (")[0] + " " + f.split("/")[-1].split(":")[0].rstrip(")") for f in frames.split(";")]
        own[names[-1]] += count
        for name in set(names):
            inside[name] += count
    print(f"\n{total} samples\n\nown time:")
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninside (inclusive):")
    for name, n in inside.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
