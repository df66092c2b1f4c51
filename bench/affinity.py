#!/usr/bin/env python3
"""
State-aware routing, measured: KV-cache affinity and loaded-model awareness through olladmr.

    python bench/affinity.py [--append bench/README.md]

Runs in one process on 127.0.0.1: three in-repo fake DMRs (tests/fakedmr.py) that each
model an endpoint's state with a ``BackendState`` (resident models with a capacity and
a cold-load delay; a prefix KV cache, time to first token = base + per_token x the
prompt tokens not already cached there), olladmr services built by ``olladmr.build``,
and a Twisted HTTP client sending streaming chat completions.

The main workload: 30 conversations x 8 turns over 3 models, at most 8 conversations
in flight, each conversation's turns strictly sequential; a ~500-word system message,
then each turn adds ~850 words of user text and the ~150-word reply (read from the
stream and appended as a client would), so the last turn's prompt is ~8.3k tokens.
It is run three times, on freshly started fakes and olladmr each time (cold caches,
nothing loaded, every endpoint at the same priority):

* affinity off, ``load_balancer: round-robin``;
* affinity off, ``load_balancer: least-connections``;
* affinity on (``proxy.affinity.enabled: true``), default balancer.

For each: client-side time to first content chunk (first SSE ``data:`` event carrying
content) for turn 1 and turns >= 2, cold loads, and cold loads started while another
endpoint already had that model resident (caught at the moment a fake starts a load,
by wrapping ``BackendState._admit`` in this process), per-endpoint request share, and a
cross-check against the fakes' ``StateRecord``s.  Then, with affinity on:

* request share over 300 distinct conversations (1 or 2 turns each);
* two olladmr instances alternating the turns of the same 100 conversations: do they
  agree on the endpoint (every model warm everywhere first, ``resident_capacity: 3``);
* the pinned endpoint dies between turns 3 and 4: failed turns, and whether the moved
  conversations stay on their new endpoint after it comes back.

Delays are scaled so the whole run takes a few minutes (see the printed header); every
wait is bounded and everything is stopped at the end, also on error.  Needs the test
dependencies (``pip install ".[test]"``) for the fake DMR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, readBody  # noqa: E402
from twisted.web.http import PotentialDataLoss  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from fakedmr import BackendState, FakeDMR, normalize_model_name  # noqa: E402
from olladmr.build import Daemon, build  # noqa: E402
from olladmr.config import parse_config  # noqa: E402
from olladmr.fleet.models import normalise_model  # noqa: E402
from io import BytesIO  # noqa: E402

from twisted.web.client import FileBodyProducer  # noqa: E402

CHAT = "/olla/dmr/engines/v1/chat/completions"
MODELS = ("ai/smollm2", "ai/llama3.2", "ai/qwen3")
ENDPOINTS = 3
WORDS_PER_EVENT = 5  # reply words per SSE content event
TURN_TIMEOUT = 120.0  # seconds; a turn that takes longer counts as failed
STATE_TIMEOUT = 20.0  # seconds to wait for olladmr to see a state (health, /engines/ps)
JSON_HEADERS = Headers({b"content-type": [b"application/json"]})


# -- the workload


@dataclass(frozen=True)
class Shape:
    """How big a conversation's messages are, in whitespace words (the fakes' tokens)."""

    system: int
    user: int
    reply: int

    def decode(self, prompt_tokens: int, conversations: int) -> tuple[int, int] | None:
        """(conversation, turn) of a prompt of that many tokens (system messages are ``system + index`` words)."""
        step = self.user + self.reply
        if conversations > step:
            return None
        offset = prompt_tokens - self.system - self.user
        if offset < 0:
            return None
        turn, index = divmod(offset, step)
        return (index, turn + 1) if index < conversations else None


def reply_tokens(words: int) -> list[str]:
    """The fakes' reply: ``words`` words in events of WORDS_PER_EVENT words (the same every turn)."""
    vocabulary = [f"r{i}" for i in range(words)]
    return [" " + " ".join(vocabulary[i : i + WORDS_PER_EVENT]) for i in range(0, words, WORDS_PER_EVENT)]


class Conversation:
    """One chat: its model, its messages so far (as the client resends them), its turns' results."""

    def __init__(self, index: int, model: str, shape: Shape, seed: int) -> None:
        self.index = index
        self.model = model
        self.shape = shape
        self._rng = random.Random(seed * 1_000_003 + index)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self._text(shape.system + index)}]
        self.turns: list[TurnResult] = []

    def _text(self, words: int) -> str:
        rng = self._rng
        return " ".join(f"w{rng.randrange(100_000)}" for _ in range(words))

    def next_user(self) -> None:
        self.messages.append({"role": "user", "content": self._text(self.shape.user)})

    def endpoint_of(self, turn: int) -> str | None:
        return next((t.endpoint for t in self.turns if t.turn == turn and t.ok), None)


@dataclass
class TurnResult:
    conversation: int
    turn: int
    model: str
    via: int  # which olladmr instance
    sent: float  # reactor seconds
    status: int = 0
    endpoint: str = ""
    sticky: str = ""
    ttft: float | None = None
    total: float = 0.0
    ok: bool = False
    error: str = ""


class StreamReader(Protocol):
    """Reads an SSE body: the time of the first event carrying content, the content, whether it ended in [DONE]."""

    def __init__(self) -> None:
        self.buffer = b""
        self.first_content: float | None = None
        self.parts: list[str] = []
        self.done_seen = False
        self.finished: defer.Deferred[bool] = defer.Deferred(lambda _: self._cancel())

    def _cancel(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                return
            event, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done_seen = True
                    continue
                try:
                    chunk = json.loads(payload)
                    content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    continue
                if content:
                    if self.first_content is None:
                        self.first_content = reactor.seconds()
                    self.parts.append(content)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.finished.called:
            self.finished.callback(reason is not None and reason.check(ResponseDone, PotentialDataLoss) is not None)


# -- one rig: three fakes and one or more olladmr instances


@dataclass
class LoadEvent:
    """A fake started a cold load: when, where, which model, who else had it resident, what olladmr knew."""

    at: float
    fake: str
    model: str
    record: Any  # the StateRecord of the request that started it (its prompt is filled in later)
    elsewhere: list[str]  # other fakes that had the model resident at that moment
    loading_elsewhere: list[str]
    view: list[dict[str, bool | None]]  # per olladmr instance: endpoint -> model_loaded()
    evicted: list[str] = field(default_factory=list)  # what this fake unloaded to make room


@dataclass
class Settings:
    cold_load: float
    base: float
    per_token: float
    chunk_delay: float
    concurrency: int
    seed: int


class Rig:
    """Owns fresh fakes (each with its own BackendState), olladmr instances and a client; close() stops all."""

    def __init__(self, settings: Settings, proxy: dict[str, Any], *, capacity: int, shape: Shape,
                 instances: int = 1) -> None:
        self.settings = settings
        self.proxy = proxy
        self.capacity = capacity
        self.shape = shape
        self.instances = instances
        self.fakes: list[FakeDMR] = []
        self.daemons: list[Daemon] = []
        self.ports: list[int] = []
        self.loads: list[LoadEvent] = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        self.agent = Agent(reactor, pool=self.pool)

    async def start(self) -> None:
        s = self.settings
        for i in range(ENDPOINTS):
            fake = FakeDMR(models=MODELS, name=f"dmr-{i}")
            fake.state = BackendState(resident_capacity=self.capacity, cold_load=s.cold_load, base=s.base,
                                      per_token=s.per_token)
            fake.tokens = reply_tokens(self.shape.reply)
            fake.chunk_delay = s.chunk_delay
            self.fakes.append(fake)
            self._watch(fake)
            await fake.start()
        document = {
            "server": {"host": "127.0.0.1", "port": 0},
            "proxy": self.proxy,
            "logging": {"level": "critical"},
            "endpoints": [{"url": f.url, "name": f.name, "priority": 100, "check_interval": "1s"} for f in self.fakes],
        }
        config = parse_config(document, "bench/affinity.py")
        for _ in range(self.instances):
            daemon = build(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1")
            self.daemons.append(daemon)
            daemon.service.startService()
            await daemon.service.serving
            assert daemon.listener.port is not None
            self.ports.append(daemon.listener.port.getHost().port)  # type: ignore[attr-defined]
        if not await wait_until(lambda: all(ep.routable and ep.loaded is not None
                                            for d in self.daemons for ep in d.fleet), STATE_TIMEOUT):
            raise RuntimeError("olladmr did not see every endpoint healthy with /engines/ps in time")

    def _watch(self, fake: FakeDMR) -> None:
        """Wrap the fake's BackendState._admit (where a load starts) to note who else had the model then."""
        state = state_of(fake)
        original = getattr(state, "_admit", None)
        if original is None:
            raise RuntimeError("tests/fakedmr.py: BackendState has no _admit any more; update Rig._watch")

        def admit(admission: Any) -> Any:
            elsewhere = [f.name for f in self.fakes if f is not fake and admission.model in state_of(f).resident]
            loading = [f.name for f in self.fakes if f is not fake and admission.model in state_of(f).loading]
            before, resident = state.cold_loads, state.resident
            result = original(admission)
            if state.cold_loads > before:  # this admission started a load here
                key = normalise_model(admission.ref)
                view = [{ep.name: ep.model_loaded(key) for ep in d.fleet} for d in self.daemons]
                evicted = [m for m in resident if m not in state.resident]
                self.loads.append(LoadEvent(reactor.seconds(), fake.name, admission.model, admission.record,
                                            elsewhere, loading, view, evicted))
            return result

        setattr(state, "_admit", admit)  # the instance attribute shadows the method for acquire() and _drain()

    async def close(self) -> None:
        for daemon in self.daemons:
            try:
                await daemon.service.stopService()
            except Exception as error:  # keep stopping the rest
                print(f"warning: stopping olladmr: {error!r}", file=sys.stderr)
        try:
            await self.pool.closeCachedConnections()
        except Exception as error:
            print(f"warning: closing the client pool: {error!r}", file=sys.stderr)
        for fake in self.fakes:
            try:
                await fake.stop()
            except Exception as error:
                print(f"warning: stopping {fake.name}: {error!r}", file=sys.stderr)

    # -- traffic

    async def ask(self, conversation: Conversation, turn: int, via: int = 0) -> TurnResult:
        """Send one streaming turn of ``conversation`` through olladmr instance ``via``."""
        conversation.next_user()
        body = json.dumps({"model": conversation.model, "messages": conversation.messages, "stream": True}).encode()
        url = f"http://127.0.0.1:{self.ports[via]}{CHAT}".encode()
        result = TurnResult(conversation.index, turn, conversation.model, via, reactor.seconds())
        try:
            d = self.agent.request(b"POST", url, JSON_HEADERS.copy(), FileBodyProducer(BytesIO(body)))
            d.addTimeout(TURN_TIMEOUT, reactor)
            response = await d
            result.status = response.code
            result.endpoint = (response.headers.getRawHeaders(b"x-olla-endpoint") or [b""])[0].decode()
            result.sticky = (response.headers.getRawHeaders(b"x-olla-sticky-session") or [b""])[0].decode()
            if response.code != 200:
                result.error = (await readBody(response))[:200].decode("utf-8", "replace")
            else:
                reader = StreamReader()
                response.deliverBody(reader)
                reader.finished.addTimeout(TURN_TIMEOUT, reactor)
                clean = await reader.finished
                if reader.first_content is not None:
                    result.ttft = reader.first_content - result.sent
                result.ok = clean and reader.done_seen and bool(reader.parts)
                if result.ok:
                    conversation.messages.append({"role": "assistant", "content": "".join(reader.parts)})
                else:
                    result.error = "stream ended without [DONE]"
        except Exception as error:
            result.error = repr(error)[:200]
        result.total = reactor.seconds() - result.sent
        if not result.ok:
            conversation.messages.pop()  # the turn never happened; the next one asks again
        conversation.turns.append(result)
        return result

    async def converse(self, conversations: Sequence[Conversation], turns: Iterable[int],
                       via: Callable[[Conversation, int], int] = lambda c, t: 0,
                       concurrency: int | None = None) -> list[TurnResult]:
        """Every conversation's ``turns`` in order, at most ``concurrency`` conversations in flight."""
        turn_numbers = list(turns)
        pending: Iterator[Conversation] = iter(conversations)
        results: list[TurnResult] = []

        async def worker() -> None:
            for conversation in pending:  # the workers share one iterator
                for turn in turn_numbers:
                    results.append(await self.ask(conversation, turn, via(conversation, turn)))

        workers = concurrency or self.settings.concurrency
        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(workers)], consumeErrors=True)
        return results

    async def warm_everywhere(self) -> None:
        """Load every model on every fake (direct requests, not through olladmr) and wait until olladmr sees it."""
        warmups = []
        for fake in self.fakes:
            for model in MODELS:
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": "warm up"}]}).encode()
                d = self.agent.request(b"POST", f"{fake.url}/engines/v1/chat/completions".encode(),
                                       JSON_HEADERS.copy(), FileBodyProducer(BytesIO(body)))
                d.addTimeout(TURN_TIMEOUT, reactor)
                warmups.append(d.addCallback(readBody))
        await defer.gatherResults(warmups, consumeErrors=True)
        keys = [normalise_model(m) for m in MODELS]
        wanted = {normalize_model_name(m) for m in MODELS}
        if not all(set(state_of(f).resident) == wanted for f in self.fakes):
            raise RuntimeError("warm-up did not leave every model resident everywhere")
        if not await wait_until(lambda: all(ep.model_loaded(k) is True for d in self.daemons for ep in d.fleet
                                            for k in keys), STATE_TIMEOUT):
            raise RuntimeError("olladmr did not see every model loaded everywhere in time")
        self.loads.clear()

    # -- what the fakes recorded

    def cold_loads(self) -> int:
        return sum(state_of(f).cold_loads for f in self.fakes)

    def evictions(self) -> int:
        return sum(state_of(f).evictions for f in self.fakes)


def state_of(fake: FakeDMR) -> BackendState:
    state = fake.state
    assert state is not None, f"{fake.name} has no BackendState"
    return state


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await task.deferLater(reactor, step, lambda: None)
    return predicate()


# -- statistics


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def p95(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def shares(results: Sequence[TurnResult]) -> tuple[list[float], float]:
    """Each endpoint's share of the answered turns (dmr-0 first), and the largest deviation from even, in %."""
    served = Counter(r.endpoint for r in results if r.ok)
    total = sum(served.values()) or 1
    share = [served.get(f"dmr-{i}", 0) / total for i in range(ENDPOINTS)]
    even = 1 / ENDPOINTS
    return share, max(abs(s - even) / even * 100 for s in share)


@dataclass
class ModeResult:
    name: str
    config: str
    results: list[TurnResult]
    cold_loads: int
    evictions: int
    loads: list[LoadEvent]
    records: list[tuple[str, Any]]  # (fake, StateRecord)
    wall: float
    conversations: int
    shape: Shape
    decoded: dict[tuple[int, int], tuple[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for fake, record in self.records:
            if record.prompt_tokens and record.endpoint == "chat/completions":
                where = self.shape.decode(record.prompt_tokens, self.conversations)
                if where is not None:
                    self.decoded[where] = (fake, record)

    def ttfts(self, first: bool) -> list[float]:
        return [r.ttft for r in self.results if r.ok and r.ttft is not None and (r.turn == 1) == first]

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def bad_loads(self) -> list[LoadEvent]:
        return [e for e in self.loads if e.elsewhere]

    def where(self, record: Any) -> tuple[int, int] | None:
        if not record.prompt_tokens:
            return None
        return self.shape.decode(record.prompt_tokens, self.conversations)

    def result_of(self, conversation: int, turn: int) -> TurnResult | None:
        return next((r for r in self.results if r.conversation == conversation and r.turn == turn), None)


async def run_mode(settings: Settings, name: str, proxy: dict[str, Any], args: argparse.Namespace) -> ModeResult:
    shape = Shape(args.system_words, args.user_words, args.reply_words)
    rig = Rig(settings, proxy, capacity=args.capacity, shape=shape)
    try:
        await rig.start()
        conversations = [Conversation(i, MODELS[i % len(MODELS)], shape, settings.seed)
                         for i in range(args.conversations)]
        started = time.monotonic()
        results = await rig.converse(conversations, range(1, args.turns + 1))
        wall = time.monotonic() - started
        records = [(f.name, r) for f in rig.fakes for r in state_of(f).records]
        return ModeResult(name, json.dumps(proxy, separators=(",", ":")), results, rig.cold_loads(), rig.evictions(),
                          list(rig.loads), records, wall, args.conversations, shape)
    finally:
        await rig.close()


# -- the extra targets


ShareResult = tuple[list[float], float, int, "Counter[str]"]


async def run_share(settings: Settings, args: argparse.Namespace, *, warm: bool) -> ShareResult:
    """300 distinct conversations (1 or 2 turns), affinity on: each endpoint's share and the largest deviation."""
    shape = Shape(100, 100, 20)
    rig = Rig(settings, {"affinity": {"enabled": True}}, capacity=3 if warm else args.capacity, shape=shape)
    try:
        await rig.start()
        if warm:
            await rig.warm_everywhere()
        conversations = [Conversation(i, MODELS[i % len(MODELS)], shape, settings.seed + 1)
                         for i in range(args.share_conversations)]
        one = [c for c in conversations if c.index % 2 == 0]
        two = [c for c in conversations if c.index % 2 == 1]
        results = await rig.converse(one, [1]) + await rig.converse(two, [1, 2])
        share, deviation = shares(results)
        return share, deviation, sum(not r.ok for r in results), Counter(r.sticky for r in results)
    finally:
        await rig.close()


async def run_agreement(settings: Settings, args: argparse.Namespace, concurrency: int | None = None) -> dict[str, Any]:
    """Two olladmr instances from one config alternate the turns of 100 conversations (every model warm everywhere)."""
    shape = Shape(100, 100, 20)
    rig = Rig(settings, {"affinity": {"enabled": True}}, capacity=3, shape=shape, instances=2)
    try:
        await rig.start()
        await rig.warm_everywhere()
        conversations = [Conversation(i, MODELS[i % len(MODELS)], shape, settings.seed + 2)
                         for i in range(args.agreement_conversations)]
        results = await rig.converse(conversations, range(1, 5), via=lambda c, t: (t - 1) % 2, concurrency=concurrency)
        same = sum(len({t.endpoint for t in c.turns if t.ok}) == 1 and all(t.ok for t in c.turns)
                   for c in conversations)
        # Placement: the endpoint each instance sends a conversation to, leaving out the turns a bounded-load
        # `spill` detoured (each instance bounds load by its own in-flight counts; a spill leaves the pin).
        homes = [{t.endpoint for t in c.turns if t.ok and t.sticky != "spill"}
                 or {t.endpoint for t in c.turns if t.ok} for c in conversations]  # every turn a detour: where they went
        placed = sum(len(h) == 1 and all(t.ok for t in c.turns) for h, c in zip(homes, conversations))
        detours = sum(t.sticky == "spill" for c in conversations for t in c.turns)
        first_sight = sum(c.endpoint_of(1) is not None and c.endpoint_of(1) == c.endpoint_of(2) for c in conversations)
        share, _ = shares(results)
        split = []
        for c in conversations:
            if len({t.endpoint for t in c.turns if t.ok}) > 1 or not all(t.ok for t in c.turns):
                split.append(f"c{c.index}: " + ", ".join(
                    f"t{t.turn} via {t.via + 1} → {t.endpoint or '?'} ({t.sticky or t.error[:40]})" for t in c.turns))
        spilled = [(c, [t.sticky == "spill" for t in c.turns[:2]]) for c in conversations]
        both = [c for c, flags in spilled if len(flags) == 2 and all(flags)]
        return {
            "spills": (sum(f[0] for _, f in spilled if f), sum(len(f) > 1 and f[1] for _, f in spilled), len(both),
                       sum(len({t.endpoint for t in c.turns if t.ok}) == 1 for c in both)),
            "split": split,
            "split_with_spill": sum(any(t.sticky == "spill" for t in c.turns[:2]) for c in conversations
                                    if len({t.endpoint for t in c.turns if t.ok}) > 1),
            "conversations": len(conversations),
            "same": same,
            "placed": placed,
            "detours": detours,
            "turns": sum(len(c.turns) for c in conversations),
            "first_sight": first_sight,
            "failed": sum(not r.ok for r in results),
            "verdicts": Counter(f"{r.via}:{r.sticky}" for r in results),
            "share": share,
        }
    finally:
        await rig.close()


async def run_failover(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Stop the endpoint that holds the most conversations after turn 3; restart it after turn 5."""
    shape = Shape(200, 300, 50)
    rig = Rig(settings, {"affinity": {"enabled": True}}, capacity=args.capacity, shape=shape)
    try:
        await rig.start()
        conversations = [Conversation(i, MODELS[i % len(MODELS)], shape, settings.seed + 3)
                         for i in range(args.failover_conversations)]
        before = await rig.converse(conversations, [1, 2, 3])
        holders = Counter(c.endpoint_of(3) for c in conversations if c.endpoint_of(3))
        victim_name = str(holders.most_common(1)[0][0])
        victim = next(f for f in rig.fakes if f.name == victim_name)
        moved = [c for c in conversations if c.endpoint_of(3) == victim_name]
        port = victim.port
        await victim.stop()
        during = await rig.converse(conversations, [4, 5])
        new_home = {c.index: c.endpoint_of(5) for c in moved}
        await victim.start(port)
        restarted = time.monotonic()
        endpoint = rig.daemons[0].fleet.get(victim_name)
        assert endpoint is not None
        seen = reactor.seconds()
        back = await wait_until(lambda: endpoint.routable and (endpoint.last_check or 0) > seen, 60.0)
        healthy_after = time.monotonic() - restarted
        # one more check interval, so its /engines/ps (polled right after a check) has been read too
        await task.deferLater(reactor, 1.2, lambda: None)
        after = await rig.converse(conversations, [6, 7, 8])
        moved_back = sum(any(c.endpoint_of(t) == victim_name for t in (6, 7, 8)) for c in moved)
        stayed = sum(all(c.endpoint_of(t) == new_home[c.index] for t in (4, 5, 6, 7, 8)) for c in moved)
        return {
            "conversations": len(conversations),
            "victim": victim_name,
            "moved": len(moved),
            "failed_before": sum(not r.ok for r in before),
            "failed_during": sum(not r.ok for r in during),
            "failed_after": sum(not r.ok for r in after),
            "errors": [r.error for r in before + during + after if not r.ok][:5],
            "healthy": back,
            "healthy_after": healthy_after,
            "moved_back": moved_back,
            "stayed": stayed,
            "new_homes": Counter(new_home.values()),
            "verdicts_during": Counter(r.sticky for r in during if r.conversation in {c.index for c in moved}),
            "spill_first": sum(c.turns[3].sticky == "spill" for c in moved if len(c.turns) > 3),
            "paths": [f"c{c.index}: " + " ".join(f"{t.endpoint or 'x'}({t.sticky[:1] or '?'})" for t in c.turns)
                      for c in moved],
        }
    finally:
        await rig.close()


# -- report


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "?", ""
    state = " (work tree with uncommitted changes)" if dirty else ""
    return (f"{platform.system()} {platform.machine()}, `nproc` = {os.cpu_count()}, CPU \"{cpu}\", "
            f"Python {platform.python_version()}, olladmr at `{commit}`{state}")


def fmt(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds:.2f}"


def mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def report(args: argparse.Namespace, modes: list[ModeResult], share_cold: ShareResult, share_warm: ShareResult,
           agreement: dict[str, Any], failover: dict[str, Any], wall: float, command: str) -> list[str]:
    out: list[str] = []
    add = out.append
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    step = args.user_words + args.reply_words
    top = args.system_words + args.conversations - 1 + (args.turns - 1) * step + args.user_words
    add(f"`{command}` — {now}; {machine()}; whole run {wall:.0f} s wall.")
    add("")
    add(f"Workload: {args.conversations} conversations × {args.turns} turns (streaming chat completions), "
        f"models {', '.join(MODELS)} in turn, at most {args.concurrency} conversations in flight, turns of one "
        f"conversation strictly sequential; system message {args.system_words}+i words, each turn adds "
        f"{args.user_words} user words and the {args.reply_words}-word reply, so turn {args.turns} sends up to "
        f"{top:,} tokens. Three fake DMRs, each `BackendState(resident_capacity={args.capacity}, "
        f"cold_load={args.cold_load:g}, base={args.base:g}, per_token={args.per_token:g})`, same priority, "
        f"`check_interval: 1s`; fresh fakes and olladmr for every row.")
    add(f"Scaling: a cold load is {args.cold_load:g} s (a real DMR load takes ~5–60 s; scaled down to fit the run); "
        f"prefill is kept realistic: {args.per_token * 1000:g} ms/token, an uncached 8k-token prompt = "
        f"{args.base + args.per_token * 8000:.2f} s to first token; decode: the role chunk, then "
        f"{len(reply_tokens(args.reply_words))} content events, {args.chunk_delay * 1000:g} ms apart. TTFT = "
        f"client-side, from sending the request to the first SSE `data:` event carrying content (so one event gap "
        f"after the fake's first token).")
    add("")
    add("| mode | turn 1 TTFT mean / p95 (s) | turns ≥ 2 TTFT mean / p95 (s) | cold loads | cold loads while another "
        "endpoint had the model resident | requests dmr-0 / dmr-1 / dmr-2 | failed turns | wall (s) |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        first, later = m.ttfts(True), m.ttfts(False)
        share, _ = shares(m.results)
        add(f"| {m.name} | {fmt(mean(first))} / {fmt(p95(first))} | {fmt(mean(later))} / {fmt(p95(later))} | "
            f"{m.cold_loads} | {len(m.bad_loads)} | {' / '.join(f'{s * 100:.0f}%' for s in share)} | {m.failed} | "
            f"{m.wall:.1f} |")
    add("")
    by_name = {m.name.split(" ")[0]: m for m in modes}
    aff = by_name["affinity"]
    aff_later = mean(aff.ttfts(False))
    ratios = {}
    for base_name in ("round-robin", "least-connections"):
        ratios[base_name] = mean(by_name[base_name].ttfts(False)) / aff_later if aff_later else math.nan
        add(f"Turns ≥ 2 mean TTFT, {base_name} / affinity: **{ratios[base_name]:.1f}×**")
        add("")
    add("Cross-check against the fakes' `StateRecord`s (each record mapped back to its conversation and turn by its "
        "prompt length):")
    add("")
    add("| mode | records matched to turns | fake-side turns ≥ 2: arrival → first token mean (s) | of which prefill "
        "mean (s) | prompt tokens cached, turns ≥ 2 | turns that waited for a cold load | evictions | client TTFT − "
        "fake latency, turns ≥ 2, mean (ms) |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        matched = [(k, v) for k, v in m.decoded.items() if k[1] >= 2 and v[1].first_token is not None]
        latency = [rec.latency for _, (_, rec) in matched]
        prefill = [rec.ttft for _, (_, rec) in matched]
        prompt = sum(rec.prompt_tokens for _, (_, rec) in matched)
        cached = sum(rec.cached_tokens for _, (_, rec) in matched)
        waited = sum(rec.cold for _, (_, rec) in m.decoded.items())
        gaps = []
        for (conv, turn), (fake, rec) in matched:
            result = m.result_of(conv, turn)
            if result is not None and result.ok and result.ttft is not None and result.endpoint == fake:
                gaps.append((result.ttft - rec.latency) * 1000)
        add(f"| {m.name.split(' ')[0]} | {len(m.decoded)} / {len(m.results)} | {fmt(mean(latency))} | "
            f"{fmt(mean(prefill))} | {cached / prompt * 100 if prompt else 0:.0f}% | {waited} | {m.evictions} | "
            f"{mean(gaps):.1f} |")
    add("")
    if aff.bad_loads:
        verdicts: Counter[str] = Counter()
        for e in aff.bad_loads:
            where = aff.where(e.record)
            result = aff.result_of(*where) if where else None
            verdicts[result.sticky if result else "?"] += 1
        add(f"Cold loads with affinity on while another endpoint had the model resident ({len(aff.bad_loads)}; by the "
            f"turn's X-Olla-Sticky-Session: {dict(verdicts)}), in order:")
        add("")
        for e in aff.bad_loads[:20]:
            where = aff.where(e.record)
            result = aff.result_of(*where) if where else None
            what = (f"conversation {where[0]} turn {where[1]} (X-Olla-Sticky-Session: {result.sticky or '?'})"
                    if where and result else "a request that never reached its prefill")
            view = ", ".join(f"{k}={v}" for k, v in e.view[0].items()) if e.view else "?"
            add(f"- {e.fake} loaded {e.model} for {what}"
                f"{' evicting ' + ', '.join(e.evicted) if e.evicted else ''}; resident on {', '.join(e.elsewhere)}"
                f"{'; loading on ' + ', '.join(e.loading_elsewhere) if e.loading_elsewhere else ''}; "
                f"olladmr's model_loaded() then: {view}")
        if len(aff.bad_loads) > 20:
            add(f"- … and {len(aff.bad_loads) - 20} more")
        add("")
    aff_cold = [e for e in aff.loads if not e.elsewhere]
    if aff_cold:
        add(f"The other {len(aff_cold)} cold load(s) with affinity on were of models no other endpoint had resident "
            f"(loading elsewhere at the time: {sum(bool(e.loading_elsewhere) for e in aff_cold)}).")
        add("")

    share_c, dev_c, failed_c, verdicts_c = share_cold
    share_w, dev_w, failed_w, verdicts_w = share_warm
    n = args.share_conversations
    add("| extra measure (affinity on) | value | target | |")
    add("|---|---|---|---|")
    add(f"| request share, {n} distinct conversations (1–2 turns), fresh fakes (capacity {args.capacity}, nothing "
        f"loaded) | {' / '.join(f'{s * 100:.1f}%' for s in share_c)}: max deviation from even **{dev_c:.0f}%** "
        f"({failed_c} failed) | ±25% | {mark(dev_c <= 25)} |")
    add(f"| the same, every model warm everywhere (capacity 3) | {' / '.join(f'{s * 100:.1f}%' for s in share_w)}: max "
        f"deviation **{dev_w:.0f}%** ({failed_w} failed) | ±25% | {mark(dev_w <= 25)} |")
    ag = agreement
    pct = ag["placed"] / ag["conversations"] * 100
    add(f"| two olladmr instances alternating turns 1–4 of {ag['conversations']} conversations (every model warm "
        f"everywhere, capacity 3), {args.concurrency} conversations in flight: conversations both instances place on "
        f"the same endpoint (every turn but one-off bounded-load detours) | **{pct:.0f}%** ({ag['placed']}/"
        f"{ag['conversations']}; {ag['failed']} failed) | 100% | {mark(ag['placed'] == ag['conversations'])} |")
    add(f"| … turns that took a one-off `spill` detour (each instance bounds load by its own in-flight counts); "
        f"conversations with every turn on one endpoint | {ag['detours']} of {ag['turns']} turns "
        f"({ag['detours'] / max(1, ag['turns']) * 100:.1f}%); {ag['same']}/{ag['conversations']} | – | |")
    quiet = ag["quiet"]
    add(f"| the same, one conversation at a time (no load, so no bounded-load spill: placement alone) | "
        f"**{quiet['same'] / quiet['conversations'] * 100:.0f}%** ({quiet['same']}/{quiet['conversations']}; "
        f"{quiet['failed']} failed) | 100% | {mark(quiet['same'] == quiet['conversations'])} |")
    fo = failover
    failed_fo = fo["failed_before"] + fo["failed_during"] + fo["failed_after"]
    add(f"| pinned endpoint stopped after turn 3 ({fo['victim']}, held {fo['moved']} of {fo['conversations']} "
        f"conversations): failed turns | **{failed_fo}** (turns 1–3: {fo['failed_before']}, "
        f"4–5: {fo['failed_during']}, 6–8: {fo['failed_after']}) | 0 | {mark(failed_fo == 0)} |")
    add(f"| … after it restarted (same port; healthy again in olladmr after {fo['healthy_after']:.1f} s): moved "
        f"conversations that went back to it in turns 6–8 | **{fo['moved_back']}** (stayed on their new endpoint for "
        f"turns 4–8: {fo['stayed']}/{fo['moved']}) | 0 | {mark(fo['moved_back'] == 0 and fo['healthy'])} |")
    add("")
    add(f"Sticky verdicts: share run (fresh) {dict(verdicts_c)}; share run (warm) {dict(verdicts_w)}; agreement run "
        f"(instance:verdict) {dict(ag['verdicts'])}; failover, moved conversations' turns 4–5 "
        f"{dict(fo['verdicts_during'])}, new endpoints {dict(fo['new_homes'])}.")
    a_spills, b_spills, both_spilled, both_agreed = ag["spills"]
    add("")
    add(f"Two instances: bounded-load spills on first sight of a conversation — instance 1 (turn 1) {a_spills}, "
        f"instance 2 (turn 2) {b_spills}, both on the same conversation {both_spilled} (of which still agreed: "
        f"{both_agreed}). Each instance bounds load by its own in-flight counts.")
    if ag["split"]:
        add("")
        add(f"Conversations with turns on more than one endpoint ({len(ag['split'])}; instance 2's first turn went "
            f"where instance 1's turn 1 did in {ag['first_sight']} of {ag['conversations']}), turn by turn (a `spill` "
            f"is a one-off detour: the conversation stays pinned where placement put it):")
        add("")
        for line in ag["split"][:15]:
            add(f"- {line}")
        if len(ag["split"]) > 15:
            add(f"- … and {len(ag['split']) - 15} more")
    add("")
    if fo["spill_first"]:
        add(f"Failover: {fo['spill_first']} moved conversation(s) spilled on their first turn after the death; a spill "
            f"leaves an existing pin in place (`SessionRouter.served`), so their pin still named the dead "
            f"{fo['victim']} until the next turn repinned them.")
    add("Failover, the moved conversations' endpoints turn by turn (h = hit, m = miss, r = repin, s = spill): "
        + "; ".join(fo["paths"]) + ".")
    if fo["errors"]:
        add(f"Failover errors: {fo['errors']}")
    add("")
    add("Targets from the issue:")
    add("")
    for base_name in ("round-robin", "least-connections"):
        add(f"- {mark(ratios[base_name] >= 4)} turns ≥ 2 mean TTFT at least 4× lower with affinity than with "
            f"{base_name}: {ratios[base_name]:.1f}×")
    add(f"- {mark(not aff.bad_loads)} cold loads paid while another endpoint had the model loaded, affinity on: "
        f"{len(aff.bad_loads)}")
    add(f"- {mark(dev_c <= 25 and dev_w <= 25)} request share within ±25% of even: {dev_c:.0f}% (fresh), "
        f"{dev_w:.0f}% (warm)")
    add(f"- {mark(ag['placed'] == ag['conversations'])} two instances agree on every conversation's endpoint: "
        f"{pct:.0f}% under load ({ag['detours']} one-off bounded-load detours of {ag['turns']} turns), "
        f"{quiet['same'] / quiet['conversations'] * 100:.0f}% of conversations entirely on one endpoint one at a time")
    add(f"- {mark(failed_fo == 0 and fo['moved_back'] == 0 and fo['healthy'])} endpoint death: {failed_fo} failed "
        f"turns, {fo['moved_back']} moved back after it returned")
    return out


INTRO = """\
`python bench/affinity.py [--append bench/README.md]` (in-process, all on 127.0.0.1): three fake DMRs with the
`BackendState` model of `tests/fakedmr.py` (resident models with a capacity and a cold-load delay; a prefix KV cache,
time to first token = base + per_token × uncached prompt tokens), olladmr services from `olladmr.build`, and a Twisted
client streaming chat completions. The same conversation workload runs with affinity off (round-robin, then
least-connections) and on, each on freshly started fakes and olladmr; cold loads "while another endpoint had the model
resident" are caught when a fake starts a load (the bench wraps `BackendState._admit` and looks at the other fakes'
resident sets at that moment). Then, with affinity on: request share over 300 distinct conversations, two olladmr
instances alternating the turns of 100 conversations, and the pinned endpoint dying between turns 3 and 4."""


def append(path: str, lines: list[str]) -> None:
    heading = "## State-aware routing (issue 11)"
    with open(path, encoding="utf-8") as existing:
        present = heading in existing.read()
    with open(path, "a", encoding="utf-8") as readme:
        if not present:
            readme.write(f"\n{heading}\n\n{INTRO}\n\n")
        else:
            readme.write(f"\n### Run of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n")
        readme.write("\n".join(lines) + "\n")


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    settings = Settings(args.cold_load, args.base, args.per_token, args.chunk_delay, args.concurrency, args.seed)
    plan: list[tuple[str, dict[str, Any]]] = [
        ("round-robin (affinity off)", {"affinity": {"enabled": False}, "load_balancer": "round-robin"}),
        ("least-connections (affinity off)", {"affinity": {"enabled": False}, "load_balancer": "least-connections"}),
        ("affinity on (default balancer)", {"affinity": {"enabled": True}}),
    ]
    modes = []
    for name, proxy in plan:
        print(f"… {name}", file=sys.stderr, flush=True)
        modes.append(await run_mode(settings, name, proxy, args))
    print("… request share (fresh)", file=sys.stderr, flush=True)
    share_cold = await run_share(settings, args, warm=False)
    print("… request share (warm)", file=sys.stderr, flush=True)
    share_warm = await run_share(settings, args, warm=True)
    print("… two instances", file=sys.stderr, flush=True)
    agreement = await run_agreement(settings, args)
    print("… two instances, one conversation at a time", file=sys.stderr, flush=True)
    quiet = await run_agreement(settings, args, concurrency=1)
    agreement["quiet"] = quiet
    print("… endpoint death", file=sys.stderr, flush=True)
    failover = await run_failover(settings, args)
    command = "python bench/affinity.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = report(args, modes, share_cold, share_warm, agreement, failover, time.monotonic() - started, command)
    print("\n".join(lines))
    if args.append:
        append(args.append, lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--conversations", type=int, default=30)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--system-words", type=int, default=500)
    ap.add_argument("--user-words", type=int, default=850)
    ap.add_argument("--reply-words", type=int, default=150)
    ap.add_argument("--capacity", type=int, default=2, help="resident_capacity of each fake")
    ap.add_argument("--cold-load", type=float, default=1.0, help="seconds per cold load (scaled down)")
    ap.add_argument("--base", type=float, default=0.02)
    ap.add_argument("--per-token", type=float, default=0.00025)
    ap.add_argument("--chunk-delay", type=float, default=0.005)
    ap.add_argument("--share-conversations", type=int, default=300)
    ap.add_argument("--agreement-conversations", type=int, default=100)
    ap.add_argument("--failover-conversations", type=int, default=12)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--append", metavar="README", help="append the report to this file (e.g. bench/README.md)")
    options = ap.parse_args()

    def run(_reactor: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(main(options))

    task.react(run)
