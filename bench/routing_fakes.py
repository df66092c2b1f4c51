#!/usr/bin/env python3
"""
A stand-in fleet of fake DMRs for ``bench/routing.py``, used only while ``tests/fakedmr.py`` has no
``serve`` command of its own (``routing.py`` prefers that one as soon as it exists).

    python bench/routing_fakes.py serve --port P1 --port P2 --models ai/small --preset gpukv [knobs]

Serves one ``FakeDMR`` (tests/fakedmr.py) per port in this one process, each with its own
``BackendState``, prints ``READY p1 p2 …`` once every port listens and stops on SIGTERM/SIGINT.
On top of the in-repo fake it adds, per endpoint:

* a prefill gate: at most ``--prefill-parallel`` prefills run at once (a compute-bound engine), the
  others wait for it after their stream's headers, in arrival order; ``--slots`` (llama.cpp's slots,
  held from the prefill to the end of the answer) is the BackendState's own;
* ``--contention X``: a prefill that starts while k others run costs ``per_token × (1 + X·k)`` a word;
* ``--cache-prompts N``: the prefix cache keeps at most N prompts (LRU), besides ``--cache-tokens``;
* ``--recompute-answer``: a finished answer is not cached (the next turn prefills it again, as llama.cpp
  does when the answer re-tokenizes differently);
* ``GET /engines/health`` (200, for SGLang's router) and ``GET /fake/stats`` (JSON counters).

Not modelled here (the real CLI's business): ``--share-busy`` is accepted and ignored (a busy slot's
prefix is always shared by this stand-in).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from twisted.internet import defer, reactor  # noqa: E402

from fakedmr import BackendState, FakeDMR, Lease, Prompt, _clean_path  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # issue 19's small-cache fleet: a GPU KV cache of 6 prompts, one prefill at a time per endpoint
    "gpukv": dict(slots=0, prefill_parallel=1, base=0.015, per_token=0.0001, contention=0.0, cache_prompts=6,
                  cache_tokens=1 << 30, recompute_answer=False, tokens=16, token_interval=0.004),
    # roughly the real DMR bundle's ai/small (bundle README): 4 slots, big host cache, answers recomputed
    "real": dict(slots=4, prefill_parallel=4, base=0.005, per_token=0.0003, contention=0.3, cache_prompts=0,
                 cache_tokens=1 << 30, recompute_answer=True, tokens=24, token_interval=0.004),
    # BackendState's defaults, no gate
    "none": dict(slots=0, prefill_parallel=0, base=0.02, per_token=0.00025, contention=0.0, cache_prompts=0,
                 cache_tokens=65536, recompute_answer=False, tokens=16, token_interval=0.004),
}


class GatedState(BackendState):
    """BackendState with a prompt-count bound, optional answer recomputation and bench counters."""

    def __init__(self, *, cache_prompts: int, recompute_answer: bool, prefill_parallel: int, contention: float,
                 **kwargs: Any) -> None:
        self.cache_prompts = cache_prompts
        self.recompute_answer = recompute_answer
        self.prefill_parallel = prefill_parallel
        self.contention = contention
        self.gate = defer.DeferredSemaphore(prefill_parallel) if prefill_parallel > 0 else None
        self.waiting = self.prefilling = 0
        self.max_queue = 0
        self.queue_wait = 0.0
        super().__init__(**kwargs)

    def remember(self, lease: Lease, generated: str = "") -> None:
        super().remember(lease, "" if self.recompute_answer else generated)

    def _insert(self, model: str, sequence: Prompt) -> None:
        super()._insert(model, sequence)
        if self.cache_prompts > 0:
            while len(self._entries) > self.cache_prompts:
                self._drop(next(iter(self._entries)))


class BenchFake(FakeDMR):
    """FakeDMR with the prefill gate, ``/engines/health`` and ``/fake/stats``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inference = 0
        self.max_active = 0

    def _record(self, request: Any) -> Any:
        recorded = super()._record(request)
        self.requests.clear()  # the bench never reads them back; do not hold every prompt
        return recorded

    def _route(self, request: Any) -> None:
        path = _clean_path(request.path.decode("latin-1"))
        if request.method in (b"GET", b"HEAD") and path in ("/engines/health", "/fake/stats", "/health"):
            body = json.dumps(self.stats() if path == "/fake/stats" else {"status": "ok"}).encode()
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
            return
        if request.method == b"POST" and "/v1/" in path:
            self.inference += 1
            self.max_active = max(self.max_active, self.active + 1)
        super()._route(request)

    def stats(self) -> dict[str, Any]:
        state = self.state
        assert isinstance(state, GatedState)
        return {"port": self.port, "requests": self.inference, "active": self.active, "max_active": self.max_active,
                "cache_miss_tokens": state.cache_miss_tokens, "cache_hits_tokens": state.cache_hits_tokens,
                "cold_loads": state.cold_loads, "max_queue": state.max_queue,
                "queue_wait_s": round(state.queue_wait, 6), "cache_entries": len(state.entries),
                "cache_used": state.cache_used}

    async def _first_token(self, exchange: Any, *, headers: bool = False) -> None:
        lease = exchange.lease
        if lease is None or exchange.prompt_texts is None:
            return
        if headers:
            exchange.write(b"")
        state = lease.state
        assert isinstance(state, GatedState)
        queued_at = self._reactor.seconds()
        state.waiting += 1
        state.max_queue = max(state.max_queue, state.waiting)
        held = False
        try:
            await state.slot(lease)
            if state.gate is not None:
                await state.gate.acquire()
                held = True
        finally:
            state.waiting -= 1
            state.queue_wait += self._reactor.seconds() - queued_at
        try:
            others = state.prefilling
            state.prefilling += 1
            base_per_token = state.per_token
            state.per_token = base_per_token * (1.0 + state.contention * others)
            try:
                delay = state.prefill(lease, exchange.prompt_texts)
            finally:
                state.per_token = base_per_token
            await exchange.sleep(delay)
        finally:
            state.prefilling -= 1
            if held and state.gate is not None:
                state.gate.release()
        lease.record.first_token = self._reactor.seconds()


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="stand-in fake DMR fleet for bench/routing.py")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, action="append", required=True)
    s.add_argument("--models", default="ai/small", help="comma-separated")
    s.add_argument("--preset", choices=sorted(PRESETS), default="gpukv")
    s.add_argument("--slots", type=int)
    s.add_argument("--prefill-parallel", type=int)
    s.add_argument("--base", type=float)
    s.add_argument("--per-token", type=float)
    s.add_argument("--contention", type=float)
    s.add_argument("--cache-prompts", type=int)
    s.add_argument("--cache-tokens", type=int)
    s.add_argument("--share-busy", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--recompute-answer", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--tokens", type=int)
    s.add_argument("--token-interval", type=float)
    s.add_argument("--cold-load", type=float, default=0.0)
    return ap.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    knobs = dict(PRESETS[args.preset])
    for key in list(knobs):
        value = getattr(args, key, None)
        if value is not None:
            knobs[key] = value
    fakes: list[BenchFake] = []
    for i, port in enumerate(args.port):
        fake = BenchFake(models=[m for m in args.models.split(",") if m], name=f"fake-{i}")
        fake.state = GatedState(cache_prompts=knobs["cache_prompts"], recompute_answer=knobs["recompute_answer"],
                                prefill_parallel=knobs["prefill_parallel"], contention=knobs["contention"],
                                resident_capacity=2, cold_load=args.cold_load, base=knobs["base"],
                                per_token=knobs["per_token"], cache_tokens=knobs["cache_tokens"],
                                slots=knobs["slots"])
        fake.tokens = [f" tok{j}" for j in range(knobs["tokens"])]
        fake.chunk_delay = knobs["token_interval"]
        fakes.append(fake)

    async def start() -> None:
        for fake, port in zip(fakes, args.port):
            await fake.start(port)
        print("READY " + " ".join(str(f.port) for f in fakes), flush=True)

    def failed(failure: Any) -> None:
        print(f"routing_fakes: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    def stop(*_: Any) -> None:
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()).addErrback(failed))
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(sys.argv[1:])
