#!/usr/bin/env python3
"""
olladmr benchmark suite: one command, one table.

    python bench/run.py [--quick] [--olla PATH] [--python PATH] [--json FILE]

Starts fast DMR-like upstreams (nginx serving fixed JSON; bench/sse_upstream.py
for event streams), then nginx as a reverse proxy (the practical floor),
olladmr (``twistd -n olladmr``) and, with ``--olla``, Olla, all on 127.0.0.1,
and measures the same scenarios directly against the upstreams and through
every proxy.  Prints a markdown table with ratios.  Needs ``wrk`` and
``nginx`` on PATH (Debian: ``apt-get install -y wrk nginx``) and a Python
that can import olladmr for the daemon (``--python``; the bench itself uses
only the standard library).  Every process it starts is stopped on exit,
failure or Ctrl-C.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client as httpclient
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import sse_client  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CHAT_MODEL = "ai/smollm2"  # served by the static nginx upstream (non-streaming)
STREAM_MODEL = "ai/llama3.2"  # served by sse_upstream.py (event streams)
CHAT_PATH = "/engines/v1/chat/completions"
MODELS_PATH = "/engines/v1/models"
PREFIX = "/olla/dmr"

CHAT_BODY = json.dumps(
    {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "What is Docker Model Runner?"}], "max_tokens": 32},
    separators=(",", ":"),
)
STREAM_BODY = json.dumps(
    {
        "model": STREAM_MODEL,
        "messages": [{"role": "user", "content": "What is Docker Model Runner?"}],
        "stream": True,
    },
    separators=(",", ":"),
).encode()
# A llama.cpp-shaped non-streaming answer, as DMR returns it (~700 bytes).
CHAT_RESPONSE = json.dumps(
    {
        "choices": [
            {
                "finish_reason": "stop",
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Docker Model Runner lets you pull, run and serve AI models locally "
                    "through an OpenAI-compatible API.",
                },
            }
        ],
        "created": 1732600000,
        "model": CHAT_MODEL,
        "system_fingerprint": "b1-5c0dca2",
        "object": "chat.completion",
        "usage": {"completion_tokens": 21, "prompt_tokens": 14, "total_tokens": 35},
        "id": "chatcmpl-benchfixed0123456789",
        "timings": {
            "prompt_n": 14,
            "prompt_ms": 11.2,
            "prompt_per_token_ms": 0.8,
            "prompt_per_second": 1250.0,
            "predicted_n": 21,
            "predicted_ms": 140.5,
            "predicted_per_token_ms": 6.69,
            "predicted_per_second": 149.46,
        },
    },
    separators=(",", ":"),
)


def models_json(*ids: str) -> str:
    return json.dumps(
        {"object": "list", "data": [{"id": i, "object": "model", "created": 1732600000, "owned_by": "docker"} for i in ids]},
        separators=(",", ":"),
    )


# --------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Every child goes in its own session; stop_all() ends each group we started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            env=env,
            cwd=str(cwd or self.tmp),
            start_new_session=True,
        )
        log.close()
        self.items.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for _, proc in reversed(self.items):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.items):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in reversed(self.items):
            # the group may still hold workers even when the leader has gone
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(2)
        self.items.clear()


def proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()


def settle(targets: list[Any], limit: float = 15.0) -> None:
    """Wait until every proxy is idle (under 3% of a core over 0.3 s): the last scenario's teardown is over."""
    deadline = time.monotonic() + limit
    for t in targets:
        if not t.is_proxy:
            continue
        while time.monotonic() < deadline:
            before = cpu_ticks(t.pids())
            time.sleep(0.3)
            if (cpu_ticks(t.pids()) - before) / CLK_TCK < 0.3 * 0.03:
                break


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = proc_stat(pid)
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(proc_stat(int(entry))[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


# --------------------------------------------------------------------------
# HTTP helpers (readiness probes)


def hget(port: int, method: str, path: str, body: str | bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None = None,
               procs: Procs | None = None, name: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = procs.log_tail(name) if procs else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except (OSError, httpclient.HTTPException) as exc:
            last = exc
        time.sleep(0.1)
    tail = procs.log_tail(name) if procs and name else ""
    raise RuntimeError(f"{what}: not ready after {timeout:g}s ({last!r})\n{tail}")


# --------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str
    chat_port: int
    stream_port: int
    prefix: str
    pids: Callable[[], list[int]] | None = None  # the proxy's processes (None: direct)

    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.chat_port}{self.prefix}{CHAT_PATH}"

    def stream_path(self, n: int, iv_ms: float, first_ms: float = 0) -> str:
        return f"{self.prefix}{CHAT_PATH}?n={n}&iv={iv_ms:g}&first={first_ms:g}"

    @property
    def is_proxy(self) -> bool:
        return self.pids is not None


def write_static_nginx(tmp: Path, port: int) -> Path:
    conf = tmp / "nginx-upstream.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx-upstream.pid;
error_log {tmp}/nginx-upstream.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nu-body;
    proxy_temp_path {tmp}/nu-proxy;
    fastcgi_temp_path {tmp}/nu-fcgi;
    uwsgi_temp_path {tmp}/nu-uwsgi;
    scgi_temp_path {tmp}/nu-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {CHAT_PATH} {{
            default_type application/json;
            return 200 '{CHAT_RESPONSE}';
        }}
        location = {MODELS_PATH} {{
            default_type application/json;
            return 200 '{models_json(CHAT_MODEL)}';
        }}
        location / {{
            default_type application/json;
            return 404 '{{"error":"not found"}}';
        }}
    }}
}}
""")
    return conf


def write_proxy_nginx(tmp: Path, port: int, static_port: int, sse_port: int) -> Path:
    # Routes by the query string: streaming requests carry ?n=...  (olladmr and
    # Olla route by the model named in the body instead).
    conf = tmp / "nginx-proxy.conf"
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/np-body;
    proxy_temp_path {tmp}/np-proxy;
    fastcgi_temp_path {tmp}/np-fcgi;
    uwsgi_temp_path {tmp}/np-uwsgi;
    scgi_temp_path {tmp}/np-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server_tokens off;
    upstream static_up {{ server 127.0.0.1:{static_port}; keepalive 32; keepalive_requests 10000000; }}
    upstream sse_up {{ server 127.0.0.1:{sse_port}; keepalive 32; keepalive_requests 10000000; }}
    map $arg_n $bench_backend {{ "" static_up; default sse_up; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location {PREFIX}/ {{
            rewrite ^{PREFIX}(/.*)$ $1 break;
            proxy_pass http://$bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
    return conf


def write_olladmr_config(tmp: Path, port: int, static_port: int, sse_port: int, name: str = "olladmr") -> Path:
    conf = tmp / f"{name}.yaml"
    conf.write_text(f"""server:
  host: 127.0.0.1
  port: {port}
  shutdown_timeout: 1s
proxy:
  load_balancer: priority
endpoints:
  - url: "http://127.0.0.1:{static_port}"
    name: static
    check_interval: 10s
    check_timeout: 2s
  - url: "http://127.0.0.1:{sse_port}"
    name: sse
    check_interval: 10s
    check_timeout: 2s
logging:
  level: warn
""")
    return conf


def write_olla_config(tmp: Path, port: int, static_port: int, sse_port: int) -> Path:
    conf = tmp / "olla.yaml"
    endpoints = ""
    for name, p in (("static", static_port), ("sse", sse_port)):
        endpoints += f"""      - url: "http://127.0.0.1:{p}"
        name: "{name}"
        type: "docker-model-runner"
        priority: 100
        model_url: "{MODELS_PATH}"
        health_check_url: "{MODELS_PATH}"
        check_interval: 10s
        check_timeout: 2s
"""
    conf.write_text(f"""server:
  host: "127.0.0.1"
  port: {port}
  write_timeout: 0s
  shutdown_timeout: 1s
  request_logging: false
  rate_limits:
    global_requests_per_minute: 0
    per_ip_requests_per_minute: 0
    health_requests_per_minute: 0
    burst_size: 1000000
proxy:
  engine: "olla"
  load_balancer: "priority"
  connection_timeout: 10s
  response_timeout: 600s
  read_timeout: 600s
  max_retries: 1
discovery:
  type: "static"
  refresh_interval: 30s
  static:
    endpoints:
{endpoints}  model_discovery:
    enabled: true
    interval: 5m
    timeout: 10s
model_registry:
  type: "memory"
logging:
  level: "warn"
  format: "text"
  output: "stdout"
""")
    return conf


def find_python(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [sys.executable, str(ROOT / ".venv/bin/python")]
    check = "import twisted, klein, yaml, olladmr.tap"
    for py in candidates:
        if not py or not Path(py).exists():
            continue
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if subprocess.run([py, "-c", check], env=env, cwd=str(ROOT), capture_output=True).returncode == 0:
            return py
        if explicit:
            sys.exit(f"--python {py}: cannot import olladmr and its dependencies")
    sys.exit("no Python that can import olladmr: pass --python PATH (e.g. .venv/bin/python after bash scripts/test.sh)")


# --------------------------------------------------------------------------
# Measurements


@dataclass
class Results:
    rows: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, metric: str, target: str, value: float | None) -> None:
        self.rows.setdefault(metric, {})[target] = value

    def get(self, metric: str, target: str) -> float | None:
        return self.rows.get(metric, {}).get(target)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def run_wrk(target: Target, connections: int, seconds: float, lua: Path) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", str(lua), target.chat_url()]
    env = dict(os.environ, BENCH_BODY=CHAT_BODY)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"^BENCH (.*)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    return {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def scenario_chat(results: Results, targets: list[Target], connections: int, seconds: float, warm: float,
                  lua: Path) -> None:
    label = f"chat c={connections}"
    for t in targets:
        if warm:
            run_wrk(t, connections, warm, lua)
        pids = t.pids() if t.pids else []
        c0 = cpu_ticks(pids)
        r = run_wrk(t, connections, seconds, lua)
        c1 = cpu_ticks(pids)
        errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
        if errors:
            results.notes.append(f"{label} {t.name}: {errors:g} wrk errors of {r['requests']:g} requests "
                                 f"(non-2xx={r['status']:g} timeout={r['timeout']:g}); rates count 2xx answers only")
        n = r["requests"] - r["status"]  # answered with 2xx
        results.put(f"{label}: requests/s", t.name, n / (r["duration_us"] / 1e6))
        results.put(f"{label}: p50 latency (µs)", t.name, r["p50_us"])
        results.put(f"{label}: p99 latency (µs)", t.name, r["p99_us"])
        if t.is_proxy and n:
            results.put(f"{label}: proxy CPU per request (µs)", t.name, (c1 - c0) / CLK_TCK * 1e6 / n)
        print(f"  {label:10} {t.name:8} {n / (r['duration_us'] / 1e6):9.0f} req/s  p50 {r['p50_us']:6.0f} µs  "
              f"p99 {r['p99_us']:6.0f} µs" + (f"  cpu {(c1 - c0) / CLK_TCK * 1e6 / n:6.0f} µs/req" if t.is_proxy and n else ""),
              flush=True)
    direct = results.get(f"{label}: p50 latency (µs)", "direct")
    for t in targets:
        if t.is_proxy and direct is not None:
            results.put(f"{label}: added p50 latency (µs)", t.name, results.get(f"{label}: p50 latency (µs)", t.name) - direct)


def scenario_stream_latency(results: Results, targets: list[Target], quick: bool) -> None:
    # Time to first chunk: one client, short streams back to back (first chunk right after the headers).
    ttfc_rounds = 60 if quick else 500
    # Per-chunk delay: 10 concurrent streams of 100 chunks at 10 ms (100 tokens/s each), started
    # 1 ms apart so that their chunks do not all leave the upstream at the same instant.
    delay_rounds = 1 if quick else 3
    for t in targets:
        st = asyncio.run(sse_client.run_streams(
            "127.0.0.1", t.stream_port, t.stream_path(n=3, iv_ms=1), STREAM_BODY,
            concurrency=1, rounds=ttfc_rounds, timeout=60))
        check_stats(results, "ttfc", t, st, ttfc_rounds * 3)
        results.put("stream: time to first chunk p50 (µs)", t.name, us(pct(st.ttfc, 50)))
        results.put("stream: time to first chunk p99 (µs)", t.name, us(pct(st.ttfc, 99)))
        st = asyncio.run(sse_client.run_streams(
            "127.0.0.1", t.stream_port, t.stream_path(n=100, iv_ms=10), STREAM_BODY,
            concurrency=10, rounds=delay_rounds, timeout=60, stagger=0.001))
        check_stats(results, "chunk delay", t, st, delay_rounds * 10 * 100)
        results.put(f"{DELAY}: chunk delay p50 (µs)", t.name, us(pct(st.chunk_delay, 50)))
        results.put(f"{DELAY}: chunk delay p99 (µs)", t.name, us(pct(st.chunk_delay, 99)))
        print(f"  stream    {t.name:8} ttfc p50 {results.get('stream: time to first chunk p50 (µs)', t.name):6.0f} µs"
              f"  chunk delay p50 {results.get(DELAY + ': chunk delay p50 (µs)', t.name):6.0f} µs"
              f" p99 {results.get(DELAY + ': chunk delay p99 (µs)', t.name):6.0f} µs", flush=True)
    added(results, targets, "stream: time to first chunk p50 (µs)", "stream: added time to first chunk p50 (µs)")
    added(results, targets, f"{DELAY}: chunk delay p50 (µs)", f"{DELAY}: added chunk delay p50 (µs)")
    added(results, targets, f"{DELAY}: chunk delay p99 (µs)", f"{DELAY}: added chunk delay p99 (µs)")


def scenario_stream_load(results: Results, targets: list[Target], quick: bool) -> None:
    seconds = 3 if quick else 8
    # Paced: 100 streams, each one long stream of 100 chunks/s started 0.1 ms apart, so 10,000
    # chunks/s are offered evenly; a proxy that keeps up relays all of them in `seconds`.
    label = LOAD
    for t in targets:
        pids = t.pids() if t.pids else []
        c0 = cpu_ticks(pids)
        st = asyncio.run(sse_client.run_streams(
            "127.0.0.1", t.stream_port, t.stream_path(n=seconds * 100, iv_ms=10), STREAM_BODY,
            concurrency=100, rounds=1, timeout=seconds + 60, stagger=0.0001))
        c1 = cpu_ticks(pids)
        check_stats(results, label, t, st, 100 * seconds * 100)
        # each stream's own rate, first to last chunk, summed: what the proxy sustains once the
        # streams are running (a late start shows up in "slowest stream start" instead)
        rate = statistics.fmean(st.rates) * 100 if st.rates else 0.0
        results.put(f"{label}: chunks/s relayed (10,000 offered)", t.name, rate)
        results.put(f"{label}: slowest stream start (ms)", t.name, max(st.start) * 1e3 if st.start else None)
        results.put(f"{label}: chunk delay p50 (µs)", t.name, us(pct(st.chunk_delay, 50)))
        results.put(f"{label}: chunk delay p99 (µs)", t.name, us(pct(st.chunk_delay, 99)))
        if t.is_proxy and st.events:
            results.put(f"{label}: proxy CPU per chunk (µs)", t.name, (c1 - c0) / CLK_TCK * 1e6 / st.events)
            results.put(f"{label}: proxy CPU (% of one core)", t.name, (c1 - c0) / CLK_TCK / st.elapsed * 100)
        print(f"  {label} {t.name:8} {rate:8.0f} chunks/s  delay p50 {results.get(label + ': chunk delay p50 (µs)', t.name):6.0f}"
              f" p99 {results.get(label + ': chunk delay p99 (µs)', t.name):6.0f} µs"
              + (f"  cpu {(c1 - c0) / CLK_TCK * 1e6 / max(1, st.events):5.1f} µs/chunk" if t.is_proxy else ""), flush=True)
    added(results, targets, f"{label}: chunk delay p50 (µs)", f"{label}: added chunk delay p50 (µs)")
    added(results, targets, f"{label}: chunk delay p99 (µs)", f"{label}: added chunk delay p99 (µs)")
    # Unpaced: the upstream writes as fast as the sockets take it; chunks coalesce into big reads,
    # so this is a ceiling (shared with the Python upstream and client on the same CPUs).
    label = MAXRATE
    for t in targets:
        pids = t.pids() if t.pids else []
        c0 = cpu_ticks(pids)
        st = asyncio.run(sse_client.run_streams(
            "127.0.0.1", t.stream_port, t.stream_path(n=200, iv_ms=0), STREAM_BODY,
            concurrency=100, duration=seconds / 2, timeout=seconds + 60, sample_every=10, stagger=0.0001))
        c1 = cpu_ticks(pids)
        check_stats(results, label, t, st, None)
        rate = st.events / st.elapsed if st.elapsed else 0
        results.put(f"{label}: chunks/s relayed", t.name, rate)
        if t.is_proxy and st.events:
            results.put(f"{label}: proxy CPU per chunk (µs)", t.name, (c1 - c0) / CLK_TCK * 1e6 / st.events)
        print(f"  {label} {t.name:8} {rate:8.0f} chunks/s"
              + (f"  cpu {(c1 - c0) / CLK_TCK * 1e6 / max(1, st.events):5.1f} µs/chunk" if t.is_proxy else ""), flush=True)


DELAY = "stream (10 × 100 tok/s)"
LOAD = "100 streams × 100 tok/s"
MAXRATE = "100 streams, unpaced"


def scenario_hold(results: Results, targets: list[Target], count: int) -> None:
    label = f"{count} slow streams"
    for t in targets:
        if not t.is_proxy:
            continue
        pids = t.pids()
        before = rss_kb(pids)
        sample: dict[str, int] = {}
        held, st = asyncio.run(sse_client.hold_streams(
            "127.0.0.1", t.stream_port, t.stream_path(n=200, iv_ms=1000), STREAM_BODY,
            count=count, batch=50, timeout=90, hold_seconds=1.5,
            while_held=lambda: sample.__setitem__("rss", rss_kb(pids))))
        check_stats(results, label, t, st, None)
        during = sample.get("rss", 0)
        results.put(f"{label}: streams held", t.name, held)
        results.put(f"{label}: proxy RSS (MB)", t.name, during / 1024)
        if held:
            results.put(f"{label}: RSS per stream (KB)", t.name, (during - before) / held)
        print(f"  {label} {t.name:8} held {held}  rss {before / 1024:.1f} -> {during / 1024:.1f} MB  "
              f"{(during - before) / max(1, held):.1f} KB/stream  (opened in {st.elapsed:.1f}s)", flush=True)
        time.sleep(1.0)  # let the proxy tear the upstream streams down


def us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def added(results: Results, targets: list[Target], metric: str, out: str) -> None:
    direct = results.get(metric, "direct")
    for t in targets:
        v = results.get(metric, t.name)
        if t.is_proxy and v is not None and direct is not None:
            results.put(out, t.name, v - direct)


def check_stats(results: Results, label: str, t: Target, st: sse_client.Stats, expected_events: int | None) -> None:
    if st.errors:
        results.notes.append(f"{label} {t.name}: {st.errors} stream errors (first: {st.first_error})")
    if expected_events is not None and st.events != expected_events:
        results.notes.append(f"{label} {t.name}: {st.events} chunks received, expected {expected_events}")


# --------------------------------------------------------------------------
# Report

# metric -> (the target the performance issue (#13) sets, limit for olladmr or None).  A limit of
# ("nginx", k) means "at most k times nginx's value in this run".
TARGETS: dict[str, tuple[str, float | tuple[str, float] | None]] = {
    "chat c=1: added p50 latency (µs)": ("≤ 250", 250.0),
    "chat c=1: p99 latency (µs)": ("< 1,000", 1000.0),
    "chat c=32: proxy CPU per request (µs)": ("≤ 9× nginx", ("nginx", 9.0)),
    "stream: added time to first chunk p50 (µs)": ("< 400", 400.0),
    f"{LOAD}: added chunk delay p99 (µs)": ("< 1,000", 1000.0),
    "idle RSS (MB)": ("< 40", 40.0),
    "1000 slow streams: RSS per stream (KB)": ("< 20", 20.0),
}


def target_cell(metric: str, row: dict[str, float | None]) -> str:
    text, limit = TARGETS.get(metric, ("", None))
    value = row.get("olladmr")
    if limit is None or value is None:
        return text
    if isinstance(limit, tuple):
        base = row.get(limit[0])
        if base is None:
            return text
        limit = base * limit[1]
    inclusive = text.startswith("≤")
    return f"{text} {'✅' if value < limit or (inclusive and value <= limit) else '❌'}"


def fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "–"
    if "MB" in metric or "KB" in metric or "CPU per chunk" in metric:
        return f"{v:.1f}"
    if "(µs)" in metric or abs(v) >= 100 or "held" in metric:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def ratio(a: float | None, b: float | None, metric: str) -> str:
    if a is None or b is None or b <= 0 or a < 0:
        return "–"
    if "added" in metric and b < 20:
        return "–"  # the denominator is within the noise of the subtraction
    return f"{a / b:.2f}"


def render(results: Results, names: list[str], order: list[str]) -> str:
    proxies = [n for n in names if n != "direct"]
    cols = list(names)
    ratio_cols = [("olladmr", "nginx")] if "nginx" in proxies else []
    if "olla" in proxies:
        ratio_cols.append(("olladmr", "olla"))
    head = ["metric", *cols, *[f"{a}/{b}" for a, b in ratio_cols], "target (olladmr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for metric in order:
        row = results.rows.get(metric)
        if not row:
            continue
        cells = [metric, *[fmt(row.get(c), metric) for c in cols]]
        cells += [ratio(row.get(a), row.get(b), metric) for a, b in ratio_cols]
        cells.append(target_cell(metric, row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(py: str) -> str:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tw = subprocess.run([py, "-c", "import sys, twisted; print(sys.version.split()[0], twisted.__version__)"],
                        capture_output=True, text=True).stdout.split()
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1:2]
    load = os.getloadavg()
    return (f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPUs ({cpu}) · "
            f"Linux {platform.release()} · olladmr on Python {tw[0] if tw else '?'}, Twisted {tw[1] if len(tw) > 1 else '?'} · "
            f"nginx {nginx_v} · wrk {wrk_v[0] if wrk_v else '?'} · load avg at start {load[0]:.2f}")


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="olladmr benchmark suite (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    ap.add_argument("--olla", metavar="PATH", help="an olla binary to compare against (optional)")
    ap.add_argument("--python", metavar="PATH", help="Python interpreter that can import olladmr (default: this one, then .venv)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument("--streams", type=int, default=1000, help="concurrent slow streams to hold (default 1000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs and logs)")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="also measure olladmr --workers N (N >= 2) on the same scenarios")
    args = ap.parse_args()

    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found on PATH (Debian: apt-get install -y wrk nginx)")
    if args.olla and not os.access(args.olla, os.X_OK):
        sys.exit(f"--olla {args.olla}: not an executable file")
    py = find_python(args.python)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, 8 * args.streams + 1024)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    except (ValueError, OSError):
        pass

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="olladmr-bench-"))
    procs = Procs(tmp)
    results = Results()
    info = machine_info(py)
    print(f"# olladmr bench{' (quick)' if args.quick else ''}\n{info}\nworkdir {tmp}", flush=True)
    try:
        # -- upstreams
        static_port = free_port()
        p = procs.start("nginx-upstream", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-upstream.error.log"),
                                           "-c", str(write_static_nginx(tmp, static_port))])
        wait_until("nginx upstream", lambda: hget(static_port, "GET", MODELS_PATH)[0] == 200, 10, p, procs, "nginx-upstream")
        sse = procs.start("sse-upstream", [sys.executable, str(HERE / "sse_upstream.py"), "--port", "0",
                                           "--models", STREAM_MODEL], stdout=subprocess.PIPE)
        assert sse.stdout is not None
        line = sse.stdout.readline().decode()
        if not line.startswith("LISTENING"):
            raise RuntimeError(f"sse_upstream did not start: {line!r}\n{procs.log_tail('sse-upstream')}")
        sse_port = int(line.split()[1])

        targets = [Target("direct", static_port, sse_port, "")]

        # -- nginx as a reverse proxy
        nport = free_port()
        nproxy = procs.start("nginx-proxy", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-proxy.error.log"),
                                             "-c", str(write_proxy_nginx(tmp, nport, static_port, sse_port))])
        wait_until("nginx proxy", lambda: hget(nport, "GET", PREFIX + MODELS_PATH)[0] == 200, 10, nproxy, procs, "nginx-proxy")
        targets.append(Target("nginx", nport, nport, PREFIX, pids=lambda: [nproxy.pid, *children(nproxy.pid)]))

        # -- olladmr
        oport = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        odmr = procs.start("olladmr", [py, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                                       "-n", "--pidfile=", "olladmr", "--config",
                                       str(write_olladmr_config(tmp, oport, static_port, sse_port))], env=env, cwd=ROOT)

        def olladmr_ready() -> bool:
            status, body = hget(oport, "GET", PREFIX + MODELS_PATH)
            return status == 200 and CHAT_MODEL.encode() in body and STREAM_MODEL.encode() in body

        wait_until("olladmr", olladmr_ready, 30, odmr, procs, "olladmr")
        targets.append(Target("olladmr", oport, oport, PREFIX, pids=lambda: [odmr.pid]))

        # -- olladmr --workers N (optional)
        if args.workers > 1:
            wport = free_port()
            wname = f"olladmr×{args.workers}"
            odmrw = procs.start(wname, [py, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                                        "-n", "--pidfile=", "olladmr", "--workers", str(args.workers), "--config",
                                        str(write_olladmr_config(tmp, wport, static_port, sse_port, "olladmr-workers"))],
                                env=env, cwd=ROOT)

            def workers_ready() -> bool:
                status, body = hget(wport, "GET", PREFIX + MODELS_PATH)
                return status == 200 and CHAT_MODEL.encode() in body and len(children(odmrw.pid)) >= args.workers - 1

            wait_until(wname, workers_ready, 30, odmrw, procs, wname)
            time.sleep(2.0)  # the workers' first health checks
            targets.append(Target(wname, wport, wport, PREFIX, pids=lambda: [odmrw.pid, *children(odmrw.pid)]))

        # -- olla (optional)
        if args.olla:
            lport = free_port()
            cfg = write_olla_config(tmp, lport, static_port, sse_port)
            # Olla reads $OLLA_CONFIG_FILE (it takes no command-line flags).
            olla = procs.start("olla", [os.path.abspath(args.olla)],
                               env=dict(os.environ, OLLA_CONFIG_FILE=str(cfg), OLLA_LOG_LEVEL="warn",
                                        OLLA_FILE_OUTPUT="false", OLLA_LOG_DIR=str(tmp / "olla-logs")))

            def olla_ready() -> bool:
                return hget(lport, "POST", PREFIX + CHAT_PATH, CHAT_BODY)[0] == 200

            wait_until("olla", olla_ready, 60, olla, procs, "olla")
            targets.append(Target("olla", lport, lport, PREFIX, pids=lambda: [olla.pid]))
        else:
            results.notes.append("Olla not measured: pass --olla PATH to an olla binary to add it.")

        # -- idle RSS (before any proxied request), then check every route works
        time.sleep(0.5)
        for t in targets:
            if t.is_proxy:
                results.put("idle RSS (MB)", t.name, rss_kb(t.pids()) / 1024)
        for t in targets:
            status, body = hget(t.chat_port, "POST", t.prefix + CHAT_PATH, CHAT_BODY)
            if status != 200 or b"chatcmpl-benchfixed" not in body:
                raise RuntimeError(f"{t.name}: chat probe answered {status}: {body[:200]!r}")
            status, body = hget(t.stream_port, "POST", t.stream_path(n=2, iv_ms=0), STREAM_BODY)
            if status != 200 or body.count(b"bench_ts") != 2 or b"[DONE]" not in body:
                raise RuntimeError(f"{t.name}: stream probe answered {status}: {body[:300]!r}")
        names = [t.name for t in targets]
        print(f"targets: {', '.join(f'{t.name}=:{t.chat_port}' for t in targets)}  (setup {time.monotonic() - started:.1f}s)",
              flush=True)

        # -- scenarios (each one runs on every target in turn, so background noise spreads evenly)
        lua = HERE / "wrk_post.lua"
        scenario_hold(results, targets, args.streams)  # first: RSS growth is not hidden by earlier load
        secs, warm = (2, 1) if args.quick else (10, 1)
        settle(targets)  # releasing 1000 streams keeps a proxy busy for a while: not part of the next scenario
        scenario_chat(results, targets, 1, secs, warm, lua)
        settle(targets)
        scenario_chat(results, targets, 32, secs, warm, lua)
        settle(targets)
        scenario_stream_latency(results, targets, args.quick)
        settle(targets)
        scenario_stream_load(results, targets, args.quick)
        for t in targets:
            if t.is_proxy:
                results.put("RSS after the run (MB)", t.name, rss_kb(t.pids()) / 1024)
        if args.workers > 1:
            one = results.rows.get("chat c=32: requests/s", {}).get("olladmr")
            many = results.rows.get("chat c=32: requests/s", {}).get(f"olladmr×{args.workers}")
            if one and many:
                results.notes.append(f"olladmr --workers {args.workers} / one process, chat c=32 requests/s: "
                                     f"{many / one:.2f}× (target ≥ 1.8× for 2 workers)")

        order = [
            "chat c=1: requests/s", "chat c=1: p50 latency (µs)", "chat c=1: p99 latency (µs)",
            "chat c=1: added p50 latency (µs)", "chat c=1: proxy CPU per request (µs)",
            "chat c=32: requests/s", "chat c=32: p50 latency (µs)", "chat c=32: p99 latency (µs)",
            "chat c=32: proxy CPU per request (µs)",
            "stream: time to first chunk p50 (µs)", "stream: added time to first chunk p50 (µs)",
            "stream: time to first chunk p99 (µs)",
            f"{DELAY}: chunk delay p50 (µs)", f"{DELAY}: added chunk delay p50 (µs)",
            f"{DELAY}: chunk delay p99 (µs)", f"{DELAY}: added chunk delay p99 (µs)",
            f"{LOAD}: chunks/s relayed (10,000 offered)", f"{LOAD}: slowest stream start (ms)",
            f"{LOAD}: chunk delay p50 (µs)",
            f"{LOAD}: added chunk delay p50 (µs)", f"{LOAD}: chunk delay p99 (µs)",
            f"{LOAD}: added chunk delay p99 (µs)",
            f"{LOAD}: proxy CPU per chunk (µs)", f"{LOAD}: proxy CPU (% of one core)",
            f"{MAXRATE}: chunks/s relayed", f"{MAXRATE}: proxy CPU per chunk (µs)",
            f"{args.streams} slow streams: streams held", f"{args.streams} slow streams: RSS per stream (KB)",
            f"{args.streams} slow streams: proxy RSS (MB)",
            "idle RSS (MB)", "RSS after the run (MB)",
        ]
        argv = " ".join(["python3", "bench/run.py", *sys.argv[1:]])
        print(f"\n## Results\n\n{info}\n\ncommand: `{argv}` · total {time.monotonic() - started:.0f}s\n")
        print(render(results, names, order))
        if results.notes:
            print("\nNotes:")
            for note in results.notes:
                print(f"- {note}")
        if args.json:
            Path(args.json).write_text(json.dumps({"info": info, "command": argv, "rows": results.rows,
                                                   "notes": results.notes}, indent=1, ensure_ascii=False))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        print(f"\nbench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
