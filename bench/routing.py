#!/usr/bin/env python3
"""
Routers side by side on agent-style traffic: prefix caching against queueing (issue 19).

    .venv/bin/python bench/routing.py [--scenario tenants-small,...] [--routers olladmr,rr,lc,sglang,olla]
                                      [--extra-olladmr NAME=YAML] [--scale 0.25] [--seed N | --seeds 1,2,3]
                                      [--json FILE]

Every process runs on 127.0.0.1 on free ports, each in its own process group, and is stopped when
the run ends, fails or is interrupted (Ctrl-C, SIGTERM); every wait and loop is bounded by a count
and a deadline.  For each scenario, seed and router, a fresh fleet and a fresh router are started,
the trace is replayed, then both are stopped.  The fleet: fake DMRs in one process
(``tests/fakedmr.py serve``, one port per endpoint, the model loaded on every endpoint by a one-word
request before the router starts), or, for ``real``, real DMRs from ``../shared/tools/realdmr/dmr``
(started once per scenario with their state in the run's directory; before each run every engine
is unloaded, then ``ai/small`` is preloaded through ``_configure`` with ``--threads 1``).

Routers: ``olladmr`` (defaults), ``rr`` / ``lc`` (olladmr, affinity off, round-robin /
least-connections), ``sglang`` (SGLang's router, ``cache_aware``; in front of real DMRs through
``bench/routing_shim.py``, which answers the ``/engines/health`` the router needs and splices the
rest), ``olla`` (Olla, sticky sessions on, ``prefix_hash``), ``olladmr2`` (two olladmr daemons on
one fleet, each conversation alternating between them turn by turn), and variants given with
``--extra-olladmr NAME=YAML`` (``NAME2``: two instances of it).  A peer whose binary is missing is
skipped with a note.  Peers run as ``/tmp/peers/NOTES.md`` describes (``$ROUTING_PEERS`` moves it).

Traces (seeded; bench/routing_trace.py): "tenants" — T tenants, each with its own system prompt
of H words; C conversations × K turns (turn 1 a unique task, each later turn the answer read from
the stream plus a tool result as a new user message), conversations assigned to tenants
round-robin (or a share from tenant 0, "skewed"); "sessions" — every conversation has its own
system prompt.  N simulated users (asyncio, a keep-alive connection each, SSE read incrementally)
each take the next conversation and run its turns strictly in sequence, waiting a seeded uniform
[0, --think-ms) before each turn.

Metrics (per router, pooled over seeds): TTFT = request written → arrival of the first SSE
``data:`` event whose ``choices[0].delta.content`` is non-empty (``time.monotonic``), mean / p50 /
p95 (nearest rank) over all turns and over turns ≥ 2; words prefilled = Σ over the fakes of the
``cache_miss_tokens`` delta of ``/fake/stats`` (real engines: Σ ``timings.prompt_n`` of each
stream's final chunk, cross-checked with the "prompt eval time" lines of the engines' llama-server
logs), against the ideal (each distinct prompt prefix computed once, counted from the prompts
actually sent; ``routing_trace.PrefixLedger``); requests per endpoint (the fakes' request
counters; real engines: slots launched, from their logs); the fakes' max queue per endpoint
(requests waiting at once for a slot or a prefill turn) and summed queue wait; cold loads; failed
requests (no retries by the client: a failed turn ends its conversation, its remaining turns are
counted as skipped); CPU seconds of the client, the fleet, the router and everything else on the
machine (``other``: not part of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import copy
import functools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import yaml  # noqa: E402

from routing_client import Client, ClientError, get_json, request_json  # noqa: E402
from routing_trace import PrefixLedger, TraceSpec, build  # noqa: E402

MODEL = "ai/small"
VENV = os.path.join(ROOT, ".venv", "bin")
PEERS = os.environ.get("ROUTING_PEERS", "/tmp/peers")
REALDMR = os.path.normpath(os.path.join(ROOT, "..", "shared", "tools", "realdmr", "dmr"))
OLLADMR_CHAT = "/olla/dmr/engines/v1/chat/completions"
SGLANG_CHAT = "/v1/chat/completions"
OLLA_CHAT = "/olla/dmr/engines/v1/chat/completions"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- scenarios


@dataclass
class Scenario:
    name: str
    spec: TraceSpec
    clients: int
    endpoints: int
    fake_args: list[str] = field(default_factory=list)
    routers: tuple[str, ...] = ("olladmr", "rr", "lc", "sglang", "olla")
    real: bool = False
    seeds: tuple[int, ...] = ()
    max_tokens: int = 64
    about: str = ""
    #: The fake engine's prefill cost (seconds fixed, seconds per uncached word) for the no-wait floor, if known.
    floor_cost: tuple[float, float] | None = None


def scenarios() -> dict[str, Scenario]:
    small = TraceSpec(kind="tenants", tenants=6, head=3000, task=120, tool=40, conversations=72, turns=6)
    gpukv = ["--preset", "gpukv"]
    gpukv_cost = (0.015, 0.0001)  # BackendState.GPU_KV: base, per_token
    return {
        "tenants-small": Scenario(
            "tenants-small", small, 12, 3, gpukv, floor_cost=gpukv_cost,
            about="fakes `--preset gpukv`: KV cache of 6 prompts per endpoint, one prefill at a time, 15 ms + 0.1 ms "
                  "per uncached word, 16 tokens 4 ms apart"),
        "tenants-large": Scenario(
            "tenants-large", TraceSpec(kind="tenants", tenants=8, head=3000, task=120, tool=40, conversations=72,
                                       turns=6), 12, 4,
            gpukv + ["--cache-prompts", "1000", "--prefill-parallel", "2"], floor_cost=gpukv_cost,
            about="fakes `--preset gpukv --cache-prompts 1000 --prefill-parallel 2`"),
        "skewed": Scenario(
            "skewed", TraceSpec(**{**small.__dict__, "skew": 0.6}), 12, 3, gpukv, floor_cost=gpukv_cost,
            about="tenants-small with 60 % of the conversations from tenant 0"),
        "sessions": Scenario(
            "sessions", TraceSpec(kind="sessions", tenants=0, head=1000, task=120, tool=40, conversations=72, turns=6),
            12, 3, gpukv, floor_cost=gpukv_cost,
            about="fakes `--preset gpukv`; every conversation its own 1,000-word system prompt"),
        "two-instances": Scenario(
            "two-instances", small, 12, 3, gpukv, floor_cost=gpukv_cost, routers=("olladmr", "olladmr2"),
            about="tenants-small; `olladmr2` = two daemons on the same fleet, turns alternating between them"),
        "real-fake": Scenario(
            "real-fake", TraceSpec(kind="tenants", tenants=4, head=1250, task=300, tool=100, conversations=16, turns=4,
                                   unit="char"), 4, 2, ["--preset", "real"],
            routers=("olladmr", "lc", "sglang", "olla"), seeds=(1, 2, 3, 4), max_tokens=24,
            about="the real scenario's trace on fakes `--preset real` (calibrated on the bundle's ai/small: 1 char = "
                  "1 token, batched prefills, 4 slots, busy prefixes not shared, answers recomputed), to compare "
                  "with `real`"),
        "real": Scenario(
            "real", TraceSpec(kind="tenants", tenants=4, head=1250, task=300, tool=100, conversations=16, turns=4,
                              unit="char"), 4, 2, routers=("olladmr", "lc", "sglang", "olla"), real=True,
            seeds=(1, 2, 3, 4), max_tokens=24,
            about="2 real DMRs (bundle), ai/small (1 char = 1 token), engines unloaded between runs; sizes in "
                  "characters"),
    }


# -- processes


class Procs:
    """Every child: own process group, log file in the run's directory; stop_all() ends them all."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.items: list[tuple[str, subprocess.Popen[bytes], Any]] = []
        self.cleanups: list[tuple[str, Callable[[], None]]] = []
        self.counter = 0

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen[bytes]:
        self.counter += 1
        path = os.path.join(self.logdir, f"{self.counter:03d}-{name}.log")
        log = open(path, "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
        proc.log_path = path  # type: ignore[attr-defined]
        self.items.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the whole group, also what the leader left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            print(f"warning: pid {proc.pid} did not exit", file=sys.stderr)
        for i, (_, p, log) in enumerate(self.items):
            if p is proc:
                log.close()
                del self.items[i]
                break

    def stop_all(self) -> None:
        for _, proc, _ in list(reversed(self.items)):
            self.stop(proc, grace=3.0)
        while self.cleanups:
            name, fn = self.cleanups.pop()
            try:
                fn()
            except Exception as error:  # keep cleaning
                print(f"warning: cleanup {name}: {error!r}", file=sys.stderr)


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system, with reaped children) of every live process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state (field 3)
            total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (every core: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


_taken: set[int] = set()


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _taken:
            _taken.add(port)
            return port
    raise RuntimeError("no free port")


async def wait_for(what: str, check: Callable[[], Any], deadline: float, proc: Any = None,
                   interval: float = 0.2) -> Any:
    """Poll ``check`` (async) until it returns a truthy value or the deadline (seconds from now) passes."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode}); see {proc.log_path}")
        try:
            result = await check()
            if result:
                return result
        except (OSError, asyncio.TimeoutError, ValueError, ClientError) as error:
            last = error
        await asyncio.sleep(interval)
    tail = ""
    if proc is not None:
        with open(proc.log_path, "rb") as f:
            tail = f.read()[-1500:].decode("utf-8", "replace")
    raise RuntimeError(f"{what}: not ready within {deadline:.0f} s (last error {last!r})\n{tail}")


def log_tail(proc: Any, n: int = 1500) -> str:
    with open(proc.log_path, "rb") as f:
        return f.read()[-n:].decode("utf-8", "replace")


# -- fleets


def fake_cli() -> tuple[list[str], str]:
    tests = os.path.join(ROOT, "tests", "fakedmr.py")
    return [os.path.join(VENV, "python"), tests, "serve"], "tests/fakedmr.py serve"


class FakeFleet:
    real = False

    def __init__(self, procs: Procs, count: int, argv: list[str]) -> None:
        self.procs = procs
        self.ports = [free_port() for _ in range(count)]
        self.argv = argv
        self.proc: Any = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def start(self) -> None:
        argv = list(self.argv)
        for p in self.ports:
            argv += ["--port", str(p)]
        self.proc = self.procs.spawn("fakes", argv, cwd=ROOT)

        async def ready() -> bool:
            with open(self.proc.log_path, "rb") as f:
                return any(line.startswith(b"READY") for line in f.read().splitlines())

        await wait_for("fake fleet", ready, 30, self.proc, interval=0.05)
        await self.reset()

    async def reset(self) -> None:
        """Load the model on every endpoint (a one-word request each), as on a fleet that has been serving."""
        for port in self.ports:
            status, body = await request_json(
                "127.0.0.1", port, "POST", "/engines/v1/chat/completions",
                {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "~"}]}, timeout=30)
            if status != 200:
                raise RuntimeError(f"warm-up request to fake {port}: HTTP {status} {str(body)[:200]}")

    async def stats(self) -> list[dict[str, Any]]:
        out = []
        for p in self.ports:
            status, body = await get_json("127.0.0.1", p, "/fake/stats")
            out.append(body if status == 200 and isinstance(body, dict) else {})
        return out

    def cpu(self) -> float:
        return group_cpu(self.proc.pid) if self.proc is not None and self.proc.poll() is None else 0.0

    async def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


class RealFleet:
    """Real DMRs from the bundle, state under this run's directory; engines unloaded before each run."""

    real = True

    def __init__(self, procs: Procs, count: int, statedir: str, threads: int) -> None:
        self.procs = procs
        self.ports = [free_port() for _ in range(count)]
        self.statedir = statedir
        self.threads = threads
        self.started: list[int] = []
        self.env = {**os.environ, "TMPDIR": statedir}

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    async def start(self) -> None:
        for port in self.ports:
            self.started.append(port)
            self.procs.cleanups.append((f"stop.sh {port}", functools.partial(self._stop_sync, port)))
            await self._start(port)

    async def _start(self, port: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            "bash", os.path.join(REALDMR, "start.sh"), str(port), env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 180)
        except asyncio.TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"start.sh {port}: no answer within 180 s")
        if proc.returncode != 0:
            raise RuntimeError(f"start.sh {port} failed: {err.decode(errors='replace')[-800:]}")

    async def reset(self) -> None:
        """Unload every engine (empties its caches), then preload ai/small with the run's threads."""
        for port in self.ports:
            await request_json("127.0.0.1", port, "POST", "/engines/unload", {"all": True}, timeout=30)
        for port in self.ports:
            async def unloaded(port: int = port) -> bool:
                _, ps = await get_json("127.0.0.1", port, "/engines/ps")
                return isinstance(ps, list) and not ps
            try:
                await wait_for(f"unload on {port}", unloaded, 20)
            except RuntimeError:  # a request DMR never answered holds the runner: restart that DMR
                print(f"note: DMR {port} did not unload (a request still hangs in it); restarting it",
                      file=sys.stderr, flush=True)
                await asyncio.get_running_loop().run_in_executor(None, self._stop_sync, port)
                await self._start(port)
            flags = ["--threads", str(self.threads)] if self.threads > 0 else []
            await request_json("127.0.0.1", port, "POST", "/engines/_configure",
                               {"model": MODEL, "runtime-flags": flags, "keep_alive": "-1"}, timeout=30)
        for port in self.ports:
            async def loaded(port: int = port) -> bool:
                _, ps = await get_json("127.0.0.1", port, "/engines/ps")
                return isinstance(ps, list) and any(MODEL in str(e.get("model_name", "")) and not e.get("loading")
                                                    for e in ps)
            await wait_for(f"preload of {MODEL} on {port}", loaded, 90)
            # one tiny request: the runner is up and answering (its prompt shares nothing with the trace)
            await request_json("127.0.0.1", port, "POST", "/engines/v1/chat/completions",
                               {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "~"}]},
                               timeout=60)

    async def stats(self) -> list[dict[str, Any]]:
        """Per engine, from its llama-server log (DMR appends every run of the engine to one file):
        ``requests`` = slots launched, ``prompt_tokens`` = Σ tokens of the "prompt eval time" lines."""
        out = []
        for port in self.ports:
            path = os.path.join(self.statedir, f"realdmr-{port}", "logs", "inference-llama.cpp-server.log")
            requests = tokens = 0
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if "launch_slot_" in line:
                            requests += 1
                        elif "prompt eval time" in line:
                            m = re.search(r"/\s*(\d+) tokens", line)
                            if m:
                                tokens += int(m.group(1))
            except OSError:
                pass
            out.append({"requests": requests, "prompt_tokens": tokens})
        return out

    def cpu(self) -> float:
        total = 0.0
        for port in self.started:
            try:
                with open(os.path.join(self.statedir, f"realdmr-{port}", "dmr.pid")) as f:
                    total += group_cpu(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return total

    def _stop_sync(self, port: int) -> None:
        subprocess.run(["bash", os.path.join(REALDMR, "stop.sh"), str(port)], env=self.env, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def stop(self) -> None:
        pass  # the fleet serves every router of the scenario: close() at its end

    def close(self) -> None:
        """stop.sh every engine now (the Procs cleanups do it at exit if this is never reached)."""
        names = {f"stop.sh {port}" for port in self.started}
        self.procs.cleanups = [(n, fn) for n, fn in self.procs.cleanups if n not in names]
        for port in self.started:
            self._stop_sync(port)
        self.started = []


# -- routers


@dataclass
class RouterSpec:
    name: str
    kind: str  # olladmr | sglang | olla
    overlay: dict[str, Any] = field(default_factory=dict)
    instances: int = 1
    src: str | None = None  # olladmr source tree (PYTHONPATH)
    label: str = ""


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def router_specs(extras: list[str], src: str | None) -> dict[str, RouterSpec]:
    src = os.path.abspath(src or ROOT)  # on PYTHONPATH: its olladmr package and twisted/plugins
    off = {"affinity": {"enabled": False}}
    specs = {
        "olladmr": RouterSpec("olladmr", "olladmr", {}, src=src, label="olladmr (default)"),
        "rr": RouterSpec("rr", "olladmr", {"proxy": {**off, "load_balancer": "round-robin"}}, src=src,
                         label="round-robin (olladmr, affinity off)"),
        "lc": RouterSpec("lc", "olladmr", {"proxy": {**off, "load_balancer": "least-connections"}}, src=src,
                         label="least-connections (olladmr, affinity off)"),
        "olladmr2": RouterSpec("olladmr2", "olladmr", {}, instances=2, src=src,
                               label="olladmr × 2 instances, turns alternating"),
        "sglang": RouterSpec("sglang", "sglang", label="SGLang router `cache_aware`"),
        "olla": RouterSpec("olla", "olla", label="Olla (sticky sessions)"),
    }
    for item in extras:
        name, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) or name in specs:
            raise SystemExit(f"--extra-olladmr {item!r}: want NAME=YAML with a new name")
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        overlay = yaml.safe_load(text) or {}
        if not isinstance(overlay, dict):
            raise SystemExit(f"--extra-olladmr {name}: the YAML must be a mapping")
        own_src = os.path.abspath(overlay.pop("src", None) or src)
        specs[name] = RouterSpec(name, "olladmr", overlay, src=own_src, label=f"olladmr `{name}`")
        specs[name + "2"] = RouterSpec(name + "2", "olladmr", overlay, instances=2, src=own_src,
                                       label=f"olladmr `{name}` × 2 instances")
    return specs


def peer_missing(kind: str) -> str | None:
    if kind == "sglang":
        py = os.path.join(PEERS, "sglv", "bin", "python")
        if not os.path.exists(py):
            return f"{py} missing"
        probe = subprocess.run([py, "-c", "import sglang_router.launch_router"], capture_output=True, timeout=60)
        if probe.returncode != 0:
            return "sglang_router does not import: " + probe.stderr.decode(errors="replace").strip()[-200:]
    if kind == "olla":
        exe = os.path.join(PEERS, "bin", "olla")
        if not os.access(exe, os.X_OK):
            return f"{exe} missing"
    return None


class Router:
    """One started router (one or two processes) and where clients send their chats."""

    def __init__(self, spec: RouterSpec, fleet: Any, procs: Procs, workdir: str) -> None:
        self.spec = spec
        self.fleet = fleet
        self.procs = procs
        self.workdir = workdir
        self.ports: list[int] = []
        self.path = OLLADMR_CHAT
        self.model = MODEL  # what clients put in "model"
        self.proc_list: list[Any] = []

    async def start(self) -> None:
        kind = self.spec.kind
        if kind == "olladmr":
            for i in range(self.spec.instances):
                await self._olladmr(i)
        elif kind == "sglang":
            await self._sglang()
        elif kind == "olla":
            await self._olla()

    def cpu(self) -> float:
        return sum(group_cpu(p.pid) for p in self.proc_list if p.poll() is None)

    async def stop(self) -> None:
        for proc in self.proc_list:
            self.procs.stop(proc)
        self.proc_list = []

    async def _olladmr(self, index: int) -> None:
        port = free_port()
        document: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": port},
            "logging": {"level": "warn"},
            "discovery": {"static": {"endpoints": [
                {"name": f"dmr{i}", "url": url, "type": "docker-model-runner", "priority": 100,
                 "check_interval": "1s", "check_timeout": "1s"}
                for i, url in enumerate(self.fleet.urls)]}},
        }
        overlay = dict(self.spec.overlay)
        per_endpoint = overlay.pop("endpoint_defaults", None)
        document = deep_merge(document, overlay)
        if per_endpoint:
            document["discovery"]["static"]["endpoints"] = [
                deep_merge(e, per_endpoint) for e in document["discovery"]["static"]["endpoints"]]
        path = os.path.join(self.workdir, f"olladmr-{self.spec.name}-{index}-{port}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(document, f, sort_keys=False)
        env = dict(os.environ)
        if self.spec.src:
            env["PYTHONPATH"] = self.spec.src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = self.procs.spawn(f"olladmr-{self.spec.name}-{index}",
                                [os.path.join(VENV, "twistd"), "-n", "--pidfile=", "olladmr", "--config", path],
                                env=env, cwd=self.workdir)
        self.proc_list.append(proc)
        count = len(self.fleet.urls)

        async def ready() -> bool:
            status, body = await get_json("127.0.0.1", port, "/internal/status/endpoints")
            if status != 200 or not isinstance(body, dict):
                return False
            eps = body.get("endpoints", [])
            def has(names: Any) -> bool:
                return any(str(m).split("/")[-1].split(":")[0] == MODEL.split("/")[-1] for m in names or [])

            return len(eps) == count and all(e.get("status") == "healthy" and e.get("routable") and has(e.get("models"))
                                             and has(e.get("loaded_models")) for e in eps)

        await wait_for(f"olladmr {self.spec.name}#{index}", ready, 40, proc)
        self.ports.append(port)
        self.path = OLLADMR_CHAT

    async def _sglang(self) -> None:
        port = free_port()
        urls = list(self.fleet.urls)
        if self.fleet.real:  # a real DMR has no /engines/health, which the router needs to register a worker
            urls = await self._health_shim(urls)
        argv = [os.path.join(PEERS, "sglv", "bin", "python"), "-m", "sglang_router.launch_router",
                "--policy", "cache_aware", "--worker-urls", *[u + "/engines" for u in urls],
                "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn"]
        argv += sglang_extra_args()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
        proc = self.procs.spawn("sglang", argv, cwd=self.workdir, env=env)
        self.proc_list.append(proc)
        count = len(urls)

        async def ready() -> bool:
            status, body = await get_json("127.0.0.1", port, "/readiness")
            return status == 200 and isinstance(body, dict) and body.get("healthy_workers") == count

        await wait_for("sglang router", ready, 90, proc, interval=0.3)
        self.ports.append(port)
        self.path = SGLANG_CHAT

    async def _olla(self) -> None:
        port = free_port()
        template = os.path.join(PEERS, "olla-example.yaml")
        document: dict[str, Any] = {}
        if os.path.exists(template):
            with open(template, encoding="utf-8") as f:
                document = yaml.safe_load(f) or {}
        document = deep_merge(document, {
            "server": {"host": "127.0.0.1", "port": port, "request_logging": False},
            "proxy": {"sticky_sessions": {"enabled": True}},
            "logging": {"level": "warn"},
        })
        document.setdefault("discovery", {})["type"] = "static"
        document["discovery"]["static"] = {"endpoints": [
            {"url": url, "name": f"dmr{i}", "type": "docker-model-runner", "priority": 100,
             "model_url": "/engines/v1/models", "health_check_url": "/engines/v1/models",
             "check_interval": "2s", "check_timeout": "1s"} for i, url in enumerate(self.fleet.urls)]}
        path = os.path.join(self.workdir, f"olla-{port}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(document, f, sort_keys=False)
        cwd = os.path.join(PEERS, "olla-build")
        env = {**os.environ, "OLLA_CONFIG_FILE": path}
        proc = self.procs.spawn("olla", [os.path.join(PEERS, "bin", "olla"), "-c", path], env=env,
                                cwd=cwd if os.path.isdir(cwd) else self.workdir)
        self.proc_list.append(proc)
        count = len(self.fleet.urls)

        async def ready() -> bool:
            status, body = await get_json("127.0.0.1", port, "/internal/status/endpoints")
            if status != 200 or not isinstance(body, dict):
                return False
            eps = body.get("endpoints") or []
            healthy = [e for e in eps if str(e.get("status", "")).lower() == "healthy"]
            if len(healthy) < count:
                return False
            status, models = await get_json("127.0.0.1", port, "/olla/models")
            if status != 200 or not isinstance(models, dict):
                return False
            # Olla's strict routing wants the name the endpoints list (a real DMR lists docker.io/ai/small:latest)
            ids = [str(m.get("id", "")) for m in models.get("data", []) if isinstance(m, dict)]
            short = MODEL.split("/")[-1]
            match = [i for i in ids if i.split("/")[-1].split(":")[0] == short]
            if match:
                self.model = MODEL if MODEL in match else match[0]
            return bool(match)

        await wait_for("olla", ready, 60, proc, interval=0.3)
        self.ports.append(port)
        self.path = OLLA_CHAT


    async def _health_shim(self, urls: list[str]) -> list[str]:
        """Start bench/routing_shim.py in front of each real DMR (answers /engines/health, splices the rest)."""
        ports = [free_port() for _ in urls]
        argv = [sys.executable, os.path.join(HERE, "routing_shim.py")]
        for listen, url in zip(ports, urls):
            argv += ["--map", f"{listen}={url.rsplit(':', 1)[1]}"]
        proc = self.procs.spawn("health-shim", argv, cwd=self.workdir)
        self.proc_list.append(proc)

        async def ready() -> bool:
            with open(proc.log_path, "rb") as f:  # type: ignore[attr-defined]
                return b"READY" in f.read()

        await wait_for("health shim", ready, 20, proc, interval=0.05)
        return [f"http://127.0.0.1:{p}" for p in ports]


def sglang_extra_args() -> list[str]:
    extra = os.environ.get("ROUTING_SGLANG_ARGS", "")
    return extra.split() if extra else []


# -- the traffic


@dataclass
class Turn:
    router: str
    seed: int
    conversation: int
    tenant: int
    turn: int
    instance: int
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft: float | None = None  # seconds
    total: float = 0.0
    endpoint: str = ""
    sticky: str = ""
    reason: str = ""  # X-Olla-Placement
    prefix_match: str = ""  # X-Olla-Prefix-Match
    prompt_units: int = 0
    ideal_new: int = 0
    prompt_n: int | None = None
    cache_n: int | None = None
    usage_prompt: int | None = None
    answer_units: int = 0


async def drive(router: Router, spec: RouterSpec, trace: list[Any], tspec: TraceSpec, scn: Scenario, seed: int,
                clients: int, timeout: float, deadline: float, ledger: PrefixLedger,
                think: float, ramp: float) -> tuple[list[Turn], int]:
    pending = iter(trace)
    turns: list[Turn] = []
    skipped = 0
    end = time.monotonic() + deadline
    ports = router.ports

    async def user(uid: int) -> None:
        nonlocal skipped
        client = Client()
        try:
            if ramp > 0:
                await asyncio.sleep(uid * ramp)
            while time.monotonic() < end:
                conv = next(pending, None)
                if conv is None:
                    return
                conv.start()
                for k in range(1, tspec.turns + 1):
                    if time.monotonic() >= end:
                        skipped += tspec.turns - k + 1
                        break
                    if think > 0:  # the tool's run (or the user reading): seeded, so the same in every run
                        await asyncio.sleep(think * random.Random(f"{seed}/think/{conv.index}/{k}").random())
                    if k > 1:
                        conv.messages.append({"role": "user", "content": conv.tools[k - 2]})
                    instance = (conv.index + k - 1) % len(ports)
                    t = Turn(spec.name, seed, conv.index, conv.tenant, k, instance)
                    t.prompt_units = sum(len(ledger.tokens(m["content"])) for m in conv.messages)
                    t.ideal_new = ledger.add(conv.messages)
                    body = json.dumps({"model": router.model, "messages": conv.messages, "stream": True,
                                       "max_tokens": scn.max_tokens,
                                       "stream_options": {"include_usage": True},
                                       **({"temperature": 0} if scn.real else {})}).encode()
                    started = time.monotonic()
                    try:
                        reply = await client.post("127.0.0.1", ports[instance], router.path, body,
                                                  min(timeout, max(0.1, end - time.monotonic())))
                        t.status = reply.status
                        h = reply.headers
                        t.endpoint = h.get("x-olla-endpoint", "")
                        t.sticky = h.get("x-olla-sticky-session", "")
                        t.reason = h.get("x-olla-placement", "")
                        t.prefix_match = h.get("x-olla-prefix-match", "")
                        if reply.first_content is not None:
                            t.ttft = reply.first_content - reply.sent
                        t.total = (reply.finished or time.monotonic()) - reply.sent
                        if reply.timings:
                            t.prompt_n = reply.timings.get("prompt_n")
                            t.cache_n = reply.timings.get("cache_n")
                        if reply.usage:
                            t.usage_prompt = reply.usage.get("prompt_tokens")
                        t.ok = reply.status == 200 and reply.done and bool(reply.content)
                        if not t.ok:
                            t.error = (f"HTTP {reply.status}: " + reply.error_body[:200].decode("utf-8", "replace")
                                       if reply.status != 200 else
                                       f"stream ended (done={reply.done}, {len(reply.content)} content events)")
                    except (ClientError, OSError, asyncio.TimeoutError) as error:
                        t.error = repr(error)[:200]
                        t.total = time.monotonic() - started
                    turns.append(t)
                    if not t.ok:
                        skipped += tspec.turns - k
                        break
                    answer = reply.text
                    t.answer_units = len(ledger.tokens(answer))
                    conv.messages.append({"role": "assistant", "content": answer})
            skipped_rest = sum(1 for _ in pending) if time.monotonic() >= end else 0
            skipped += skipped_rest * tspec.turns
        finally:
            client.close()

    await asyncio.gather(*(user(i) for i in range(clients)))
    return turns, skipped


# -- one run, one scenario


@dataclass
class Run:
    router: str
    seed: int
    turns: list[Turn]
    skipped: int
    ideal: int
    prompt_units: int
    fleet_delta: list[dict[str, Any]]
    wall: float
    cpu: dict[str, float]
    note: str = ""


def delta(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b, a in zip(before, after):
        d: dict[str, Any] = {}
        for key, value in a.items():
            if key.startswith("max_") or key in ("port", "active", "cache_entries", "cache_used"):
                d[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                d[key] = value - b.get(key, 0)
        out.append(d)
    return out


async def run_router(scn: Scenario, spec: RouterSpec, seed: int, args: argparse.Namespace, procs: Procs,
                     workdir: str, fleet: Any) -> Run:
    tspec = scn.spec
    trace = build(tspec, seed)
    own_fleet = fleet is None
    if own_fleet:
        fleet = FakeFleet(procs, scn.endpoints, args.fake_argv + scn.fake_args + args.fake_args)
        await fleet.start()
    else:
        await fleet.reset()
    router = Router(spec, fleet, procs, workdir)
    try:
        await router.start()
        await asyncio.sleep(args.settle)
        before = await fleet.stats()
        cpu0 = (time.process_time(), fleet.cpu(), router.cpu(), machine_busy())
        ledger = PrefixLedger(tspec.unit, template=tspec.unit == "char")
        started = time.monotonic()
        turns, skipped = await drive(router, spec, trace, tspec, scn, seed, min(scn.clients, len(trace)),
                                     args.request_timeout or (10.0 if scn.real else 60.0), args.deadline, ledger,
                                     args.think_ms / 1000.0, args.ramp_ms / 1000.0)
        wall = time.monotonic() - started
        cpu1 = (time.process_time(), fleet.cpu(), router.cpu(), machine_busy())
        after = await fleet.stats()
    finally:
        await router.stop()
        if own_fleet:
            await fleet.stop()
    cpu = {"client": cpu1[0] - cpu0[0], "fleet": cpu1[1] - cpu0[1], "router": cpu1[2] - cpu0[2]}
    cpu["other"] = max(0.0, cpu1[3] - cpu0[3] - sum(cpu.values()))  # processes that are not part of the run
    return Run(spec.name, seed, turns, skipped, ledger.total, ledger.prompt_tokens, delta(before, after), wall, cpu)


# -- numbers


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(runs: list[Run], real: bool, endpoints: int,
              floor_cost: tuple[float, float] | None = None) -> dict[str, Any]:
    turns = [t for r in runs for t in r.turns]
    ttft = [t.ttft for t in turns if t.ok and t.ttft is not None]
    # The no-wait floor: each request's prefill with an ideal cache (only what no earlier prompt computed), no
    # queue, no proxy, no client -- what no router can beat on this engine.
    floor = [floor_cost[0] + floor_cost[1] * max(1, t.ideal_new) for t in turns if t.ok] if floor_cost else []
    later = [t.ttft for t in turns if t.ok and t.ttft is not None and t.turn >= 2]
    first = [t.ttft for t in turns if t.ok and t.ttft is not None and t.turn == 1]
    seeds = len(runs)
    ideal = sum(r.ideal for r in runs)
    if real:
        prompt_n = [t.prompt_n for t in turns if t.ok]
        from_timings = all(p is not None for p in prompt_n) and bool(prompt_n)
        metric_total = sum(d.get("prompt_tokens", 0) for r in runs for d in r.fleet_delta)
        prefilled = sum(p for p in prompt_n if p is not None) if from_timings else metric_total
        prefilled_source = "timings.prompt_n" if from_timings else "llama-server log (prompt eval)"
        per_endpoint_prefill = [sum(r.fleet_delta[i].get("prompt_tokens", 0) for r in runs)
                                for i in range(endpoints)]
    else:
        prefilled = sum(d.get("cache_miss_tokens", 0) for r in runs for d in r.fleet_delta)
        prefilled_source = "fake cache_miss_tokens"
        metric_total = None
        per_endpoint_prefill = [sum(r.fleet_delta[i].get("cache_miss_tokens", 0) for r in runs)
                                for i in range(endpoints)]
    share = [sum(r.fleet_delta[i].get("requests", 0) for r in runs) for i in range(endpoints)]
    share_source = "fake request counters"
    if not any(share):
        names = sorted({t.endpoint for t in turns if t.endpoint})
        if names:
            share = [sum(1 for t in turns if t.endpoint == n) for n in names]
            share_source = "X-Olla-Endpoint"
        else:
            share, share_source = [], "unknown"
    max_queue = [max((r.fleet_delta[i].get("max_queue", 0) or 0) for r in runs) for i in range(endpoints)] \
        if runs and all("max_queue" in d for d in runs[0].fleet_delta) else None
    queue_wait = [sum(r.fleet_delta[i].get("queue_wait_s", 0.0) for r in runs) for i in range(endpoints)] \
        if runs and all("queue_wait_s" in d for d in runs[0].fleet_delta) else None
    cold = sum(d.get("cold_loads", 0) for r in runs for d in r.fleet_delta) if not real else None
    failed = sum(1 for t in turns if not t.ok)
    errors: dict[str, int] = {}
    for t in turns:
        if not t.ok:
            errors[t.error[:80]] = errors.get(t.error[:80], 0) + 1
    return {
        "requests": len(turns), "ok": len(turns) - failed, "failed": failed,
        "skipped": sum(r.skipped for r in runs), "errors": errors,
        "ttft_mean": mean(ttft), "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
        "ttft2_mean": mean(later), "ttft2_p95": pct(later, 0.95), "ttft1_mean": mean(first),
        "prefilled": prefilled, "prefilled_per_seed": prefilled / seeds if seeds else None,
        "prefilled_source": prefilled_source, "prefilled_log": metric_total,
        "prefilled_per_endpoint": per_endpoint_prefill,
        "ideal": ideal, "ideal_per_seed": ideal / seeds if seeds else None,
        "prompt_units": sum(r.prompt_units for r in runs),
        "ratio": prefilled / ideal if ideal else None,
        "share": share, "share_source": share_source, "max_queue": max_queue, "queue_wait_s": queue_wait,
        "cold_loads": cold, "wall": sum(r.wall for r in runs), "seeds": seeds,
        "cpu": {k: sum(r.cpu[k] for r in runs) for k in ("client", "fleet", "router", "other")},
        "reasons": _count([t.reason for t in turns if t.reason]),
        "floor_mean": mean(floor), "floor_p95": pct(floor, 0.95),
    }


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"


def table(scn: Scenario, results: dict[str, dict[str, Any]], labels: dict[str, str], unit: str) -> list[str]:
    word = "tokens" if unit == "char" else "words"
    per_seed = len(scn.seeds) > 1
    lines = [f"| router | TTFT mean ms | p50 | p95 | turns ≥ 2 mean | turns ≥ 2 p95 | {word} prefilled"
             f"{' per seed' if per_seed else ''} (× ideal) | requests per endpoint | max queue | cold loads | "
             f"failed (skipped) | run s | CPU s client / fleet / router / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        pre = s["prefilled_per_seed"] if per_seed else s["prefilled"]
        ratio = f" ({s['ratio']:.2f}×)" if s["ratio"] else ""
        queue = "/".join(str(q) for q in s["max_queue"]) if s["max_queue"] is not None else "–"
        share = "/".join(str(x) for x in s["share"]) or "–"
        cpu = s["cpu"]
        lines.append(
            f"| {labels.get(name, name)} | {ms(s['ttft_mean'])} | {ms(s['ttft_p50'])} | {ms(s['ttft_p95'])} | "
            f"{ms(s['ttft2_mean'])} | {ms(s['ttft2_p95'])} | {pre:,.0f}{ratio} | {share} | {queue} | "
            f"{'–' if s['cold_loads'] is None else s['cold_loads']} | {s['failed']} ({s['skipped']}) | "
            f"{s['wall']:.1f} | {cpu['client']:.1f} / {cpu['fleet']:.1f} / {cpu['router']:.1f} / {cpu['other']:.1f} |")
    return lines


def checks(scn: Scenario, results: dict[str, dict[str, Any]], specs: dict[str, RouterSpec]) -> list[str]:
    """Issue 19's targets for this scenario, for every olladmr-family router measured (not rr/lc)."""
    out: list[str] = []
    peers = [p for p in ("sglang", "olla", "lc") if p in results and results[p]["ttft_mean"] is not None]
    ours = [n for n in results if specs[n].kind == "olladmr" and n not in ("rr", "lc")
            and specs[n].instances == 1]

    def mark(ok: bool | None) -> str:
        return "➖" if ok is None else ("✅" if ok else "❌")

    def vs_peers(factor: float) -> None:
        if not peers:
            out.append(f"- ➖ TTFT ≤ {factor}× the best peer: no peer measured")
            return
        best_mean = min(results[p]["ttft_mean"] for p in peers)
        best_p95 = min(results[p]["ttft_p95"] for p in peers)
        for n in ours:
            s = results[n]
            if s["ttft_mean"] is None:
                continue
            rm, rp = s["ttft_mean"] / best_mean, s["ttft_p95"] / best_p95
            floor = ""
            if s.get("floor_mean"):
                floor = (f"; no-wait floor {ms(s['floor_mean'])} / {ms(s['floor_p95'])} ms, so the target "
                         f"{ms(factor * best_mean)} / {ms(factor * best_p95)} ms leaves "
                         f"{ms(factor * best_mean - s['floor_mean'])} / {ms(factor * best_p95 - s['floor_p95'])} ms "
                         f"for every queue and hop")
            out.append(f"- {mark(rm <= factor and rp <= factor)} {n}: TTFT mean {ms(s['ttft_mean'])} ms = {rm:.2f}× "
                       f"and p95 {ms(s['ttft_p95'])} ms = {rp:.2f}× the best of {', '.join(peers)} "
                       f"({ms(best_mean)} / {ms(best_p95)} ms); target ≤ {factor}×{floor}")

    for n in results:
        s = results[n]
        if s["failed"] and not scn.real:
            out.append(f"- ❌ {n}: {s['failed']} failed requests on fakes (must be 0): {s['errors']}")
    if scn.name in ("tenants-small",):
        for n in ours:
            r = results[n]["ratio"]
            out.append(f"- {mark(r is not None and r <= 1.2)} {n}: words prefilled {results[n]['prefilled']:,} = "
                       f"{r:.2f}× the ideal ({results[n]['ideal']:,}); target ≤ 1.2×")
        vs_peers(0.8)
    elif scn.name == "tenants-large":
        vs_peers(0.9)
    elif scn.name == "skewed":
        vs_peers(0.8)
        for n in ours:
            qw = results[n]["queue_wait_s"]
            if qw:
                avg = sum(qw) / len(qw)
                ok = max(qw) <= 2 * avg if avg > 0 else True
                out.append(f"- {mark(ok)} {n}: queue wait per endpoint {', '.join(f'{q:.1f}' for q in qw)} s, "
                           f"max {max(qw) / avg if avg else 0:.2f}× the average; target ≤ 2×")
    elif scn.name in ("real", "real-fake"):
        vs_peers(0.9)
    elif scn.name == "sessions":
        if "rr" in results:
            base = results["rr"]["ttft2_mean"]
            for n in ours:
                own = results[n]["ttft2_mean"]
                if own and base:
                    out.append(f"- {mark(base / own >= 4)} {n}: turns ≥ 2 mean TTFT {ms(own)} ms, round-robin "
                               f"{ms(base)} ms: {base / own:.1f}× lower; target ≥ 4×")
    elif scn.name == "two-instances":
        for n in results:
            if specs[n].instances == 2:
                one = n[:-1]
                if one in results:
                    a, b = results[one], results[n]
                    dw = b["prefilled"] / a["prefilled"] - 1 if a["prefilled"] else 0
                    dt = b["ttft_mean"] / a["ttft_mean"] - 1 if a["ttft_mean"] else 0
                    out.append(f"- {mark(abs(dw) <= 0.10 or b['prefilled'] <= a['prefilled'])} {n}: words prefilled "
                               f"{b['prefilled']:,} vs {a['prefilled']:,} with one instance ({dw:+.0%}); target "
                               f"within 10 %")
                    out.append(f"- {mark(abs(dt) <= 0.10 or b['ttft_mean'] <= a['ttft_mean'])} {n}: TTFT mean "
                               f"{ms(b['ttft_mean'])} vs {ms(a['ttft_mean'])} ms ({dt:+.0%}); target within 10 %")
    return out


# -- main


def scaled(scn: Scenario, args: argparse.Namespace) -> Scenario:
    spec = copy.deepcopy(scn.spec)
    clients, endpoints = scn.clients, scn.endpoints
    for attr, flag in (("tenants", "tenants"), ("head", "head_words"), ("conversations", "conversations"),
                       ("turns", "turns"), ("task", "task_words"), ("tool", "tool_words"), ("skew", "skew")):
        value = getattr(args, flag)
        if value is not None and not (attr == "tenants" and spec.kind == "sessions"):
            setattr(spec, attr, value)
    if args.clients is not None:
        clients = args.clients
    if args.endpoints is not None:
        endpoints = args.endpoints
    if args.scale != 1.0:
        spec.conversations = max(2, round(spec.conversations * args.scale))
        spec.head = max(16, round(spec.head * args.scale))
        clients = max(1, min(clients, round(clients * max(args.scale, 0.34))))
    if spec.kind == "tenants":
        spec.tenants = max(1, min(spec.tenants, spec.conversations))
    seeds = tuple(args.seeds) if args.seeds else (scn.seeds or (args.seed,))
    max_tokens = args.max_tokens or scn.max_tokens
    return Scenario(scn.name, spec, clients, endpoints, scn.fake_args, scn.routers, scn.real, seeds, max_tokens,
                    scn.about, scn.floor_cost)


def revision(src: str) -> str:
    """The git commit of an olladmr source tree, +dirty when its olladmr/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "not a git tree"
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "olladmr"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def describe(scn: Scenario) -> str:
    s = scn.spec
    unit = "chars" if s.unit == "char" else "words"
    if s.kind == "sessions":
        shape = f"{s.conversations} conversations, each its own {s.head:,}-{unit} system prompt"
    else:
        shape = f"{s.tenants} tenants × {s.head:,}-{unit} heads, {s.conversations} conversations"
        if s.skew:
            shape += f" ({s.skew:.0%} from tenant 0)"
    return (f"{shape} × {s.turns} turns (task {s.task} {unit}, tool result {s.tool} {unit}), {scn.clients} clients, "
            f"{scn.endpoints} endpoints, seeds {','.join(map(str, scn.seeds))}, max_tokens {scn.max_tokens}")


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="routing-bench-")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir)
    procs = Procs(logdir)
    atexit.register(procs.stop_all)
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    stopped_by: list[int] = []

    def interrupted(signum: int) -> None:
        stopped_by.append(signum)
        me.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, interrupted, signum)
    all_scenarios = scenarios()
    names = [n.strip() for n in args.scenario.split(",") if n.strip()]
    for n in names:
        if n not in all_scenarios:
            raise SystemExit(f"unknown scenario {n!r}; known: {', '.join(all_scenarios)}")
    specs = router_specs(args.extra_olladmr, args.olladmr_src)
    extra_names = [item.partition("=")[0] for item in args.extra_olladmr]
    args.fake_argv, fake_label = fake_cli()
    sources = sorted({spec.src for spec in specs.values() if spec.kind == "olladmr" and spec.src})
    print(f"# bench/routing.py — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; fakes: {fake_label}; olladmr from "
          + ", ".join(f"{src} ({revision(src)})" for src in sources) + f"; logs in {logdir}", flush=True)
    missing: dict[str, str | None] = {}
    report: dict[str, Any] = {"command": " ".join(sys.argv), "fakes": fake_label, "scenarios": {},
                              "olladmr": {src: revision(src) for src in sources},
                              "cpus": os.cpu_count(), "host": platform.node()}
    exit_code = 0
    try:
        for name in names:
            scn = scaled(all_scenarios[name], args)
            if args.routers:
                wanted = [r.strip() for r in args.routers.split(",") if r.strip()]
            else:
                wanted = list(scn.routers)
                for e in extra_names:
                    wanted += [e, e + "2"] if name == "two-instances" else [e]
            unknown = [r for r in wanted if r not in specs]
            if unknown:
                raise SystemExit(f"unknown router(s) {unknown}; known: {', '.join(specs)}")
            routers = []
            for r in wanted:
                kind = specs[r].kind
                if kind not in missing:
                    missing[kind] = peer_missing(kind) if kind in ("sglang", "olla") else None
                if missing[kind]:
                    print(f"note: skipping {r}: {missing[kind]}", flush=True)
                else:
                    routers.append(r)
            print(f"\n## {name}: {describe(scn)}\n\n{scn.about}\n", flush=True)
            t0 = time.monotonic()
            fleet = None
            if scn.real:
                if not os.path.exists(os.path.join(REALDMR, "start.sh")):
                    print(f"note: skipping real: {REALDMR}/start.sh missing", flush=True)
                    continue
                fleet = RealFleet(procs, scn.endpoints, workdir, args.real_threads)
                await fleet.start()
            runs: dict[str, list[Run]] = {r: [] for r in routers}
            for seed in scn.seeds:
                for r in routers:
                    print(f"… {name} seed {seed}: {r}", file=sys.stderr, flush=True)
                    try:
                        run = await run_router(scn, specs[r], seed, args, procs, workdir, fleet)
                    except RuntimeError as error:
                        print(f"note: {r} failed to run: {error}", flush=True)
                        exit_code = 1
                        continue
                    runs[r].append(run)
                    bad = sum(1 for t in run.turns if not t.ok)
                    print(f"    {r} seed {seed}: {len(run.turns)} requests, {bad} failed, {run.wall:.1f} s",
                          file=sys.stderr, flush=True)
            if fleet is not None:
                fleet.close()
            results = {r: summarize(v, scn.real, scn.endpoints, scn.floor_cost) for r, v in runs.items() if v}
            labels = {r: specs[r].label for r in results}
            lines = table(scn, results, labels, scn.spec.unit)
            elapsed = time.monotonic() - t0
            print("\n".join(lines))
            ideal_note = ("ideal = each distinct prompt prefix computed once, from the prompts sent "
                          f"({next(iter(results.values()))['ideal_per_seed']:,.0f} per seed)" if results else "")
            cpus = os.cpu_count()
            print(f"\n{ideal_note}. Scenario wall time {elapsed:.0f} s. {cpus} CPUs shared by the client (this "
                  f"process), the {'real DMRs (llama.cpp, ' + (str(args.real_threads) + ' thread(s) each' if args.real_threads else 'default threads') + ')' if scn.real else 'fake fleet (one process)'} "
                  f"and the router under test.", flush=True)
            for r, sm in results.items():
                if sm["reasons"]:
                    print(f"- {r}: placements by reason (X-Olla-Placement) "
                          + ", ".join(f"{k} {v}" for k, v in sorted(sm["reasons"].items(), key=lambda kv: -kv[1])))
                if sm["failed"]:
                    print(f"- {r}: failed requests: " + "; ".join(f"{v} × {k}" for k, v in sm["errors"].items()))
            target_lines = checks(scn, results, specs)
            if target_lines:
                print("\nTargets (issue 19):\n")
                print("\n".join(target_lines), flush=True)
            report["scenarios"][name] = {
                "trace": scn.spec.__dict__, "clients": scn.clients, "endpoints": scn.endpoints,
                "seeds": list(scn.seeds), "fake_args": scn.fake_args, "wall_s": elapsed, "summary": results,
                "checks": target_lines,
                "runs": {r: [{"seed": run.seed, "ideal": run.ideal, "wall": run.wall, "cpu": run.cpu,
                              "skipped": run.skipped, "fleet_delta": run.fleet_delta,
                              "turns": [t.__dict__ for t in run.turns]} for run in v] for r, v in runs.items()},
            }
    finally:
        procs.stop_all()
        if args.json:
            report["elapsed_s"] = time.monotonic() - started
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
            print(f"\nraw numbers: {args.json}")
        if args.keep or exit_code:
            print(f"kept {workdir}" + ("" if args.keep else " (something failed)"))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return exit_code


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="tenants-small",
                    help="comma-separated: tenants-small, tenants-large, skewed, sessions, two-instances, real, "
                         "real-fake")
    ap.add_argument("--routers", help="comma-separated: olladmr, rr, lc, sglang, olla, olladmr2, extra NAME / NAME2 "
                                      "(default: per scenario)")
    ap.add_argument("--extra-olladmr", action="append", default=[], metavar="NAME=YAML",
                    help="an olladmr variant: a YAML mapping deep-merged into its config document (or @FILE); "
                         "'endpoint_defaults: {...}' is merged into every endpoint, 'src: DIR' runs olladmr from DIR")
    ap.add_argument("--olladmr-src", help="run olladmr from this source tree (PYTHONPATH), e.g. an export of main")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], help="pool these seeds")
    ap.add_argument("--tenants", type=int)
    ap.add_argument("--head-words", type=int, help="system prompt size (chars on real)")
    ap.add_argument("--task-words", type=int)
    ap.add_argument("--tool-words", type=int)
    ap.add_argument("--conversations", type=int)
    ap.add_argument("--turns", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--endpoints", type=int)
    ap.add_argument("--skew", type=float, help="share of conversations from tenant 0")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink conversations, heads and clients (e.g. 0.25)")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--ramp-ms", type=float, default=0.0,
                    help="client i starts i × this many ms after the first (0: all at once, as in issue 19)")
    ap.add_argument("--think-ms", type=float, default=20.0,
                    help="before each turn a client waits uniform [0, this) ms, seeded per conversation and turn "
                         "(the tool's run; without it the fakes' exact timings keep clients in lock-step, and "
                         "round-robin then pins every client to one endpoint)")
    ap.add_argument("--fake-args", type=lambda s: s.split(), default=[], help="extra flags for every fake fleet")
    ap.add_argument("--real-threads", type=int, default=1, help="llama.cpp threads per real engine (0: default)")
    ap.add_argument("--request-timeout", type=float, help="seconds per request (default 60; real 10: a real DMR "
                    "sometimes never answers, see its README)")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds per router run")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between router ready and traffic")
    ap.add_argument("--json", help="write raw numbers (every request) here")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (configs, logs)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    try:
        sys.exit(asyncio.run(main(options)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every process of the run was stopped", file=sys.stderr)
        sys.exit(130)
