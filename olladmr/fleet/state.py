"""
The fleet: every configured DMR endpoint and what we know about it now.

An :class:`EndpointState` owns one endpoint's live state: health status,
model list, in-flight count, concurrency slots and circuit breaker.  The
:class:`Fleet` owns the set of them, keyed by name, and survives reloads:
an endpoint whose configuration is unchanged keeps its state.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .breaker import CircuitBreaker
from ..config.schema import Config, EndpointConfig
from .models import normalise_model

UNKNOWN = "unknown"
HEALTHY = "healthy"
BUSY = "busy"
UNHEALTHY = "unhealthy"
OFFLINE = "offline"
ROUTABLE_STATUSES = frozenset({HEALTHY, BUSY})

log = Logger()


#: DMR's runner mode for the routes that do not generate text (``backendModeForRequest``); the rest: completion.
RUNNER_MODES = {"embeddings": "embedding", "rerank": "reranking", "score": "reranking",
                "images/generations": "image-generation"}


#: How many recent head times (of streamed answers) an endpoint keeps, and needs before it judges a hang.
HEAD_SAMPLES = 32
MIN_HEAD_SAMPLES = 4


def runner_key(route: str, model_key: str) -> str:
    """The key ``/engines/ps`` knows the runner serving ``route`` for ``model_key`` by (its mode, unless completion)."""
    mode = RUNNER_MODES.get(route)
    return model_key if mode is None else f"{mode} {model_key}"


class QueueFull(Exception):
    """The endpoint's wait queue is full."""


class QueueTimeout(Exception):
    """A request waited longer than ``queue_timeout`` for a slot."""


class EndpointState:
    """
    Owns one endpoint's live state: health status, model list, in-flight
    count, concurrency slots, request and failure counters and its circuit
    breaker.  Real traffic reports through :meth:`record_attempt`,
    :meth:`record_failure` and :meth:`record_response`.
    """

    def __init__(self, config: EndpointConfig, clock: IReactorTime, breaker_failures: int, breaker_cooldown: float):
        self.config = config
        self.name = config.name
        self._clock = clock
        self.status = UNKNOWN
        self.status_reason = "not checked yet"
        self.models: list[dict[str, object]] = []
        self.model_keys: frozenset[str] = frozenset()
        self.models_known = False
        self.models_updated: float | None = None
        self.in_flight = 0
        self.request_count = 0
        self.failure_count = 0
        self.consecutive_check_failures = 0
        self.last_check: float | None = None
        self.last_latency_ms: float | None = None
        self.next_check_due = 0.0
        self.breaker = CircuitBreaker(clock, breaker_failures, breaker_cooldown)
        self.loaded: dict[str, bool] | None = None  # from /engines/ps: model key -> still loading; None: unknown
        self._served: set[str] = set()  # models real traffic just got answers for (loaded until ps says otherwise)
        self._routed: set[str] = set()  # models sent here while not loaded: a load is under way (until ps or an answer)
        self._waiters: deque[tuple[Deferred[None], IDelayedCall]] = deque()
        self.removed = False
        self._restarts = 0  # times the engine may have lost its KV cache (it went down)
        self._unloads: dict[str, int] = {}  # model key -> times /engines/ps showed it unloaded after it was loaded
        self.prefill_pending = 0  # prompt characters sent here whose first token has not come back yet
        self.prefilling = 0  # requests sent here whose first token has not come back yet
        self._head_times: deque[float] = deque(maxlen=HEAD_SAMPLES)  # of streamed answers, model loaded
        self._usual_head_time: float | None = None

    # -- configuration

    def reconfigure(self, config: EndpointConfig, breaker_failures: int, breaker_cooldown: float) -> None:
        """Adopt a reloaded configuration, keeping counters and models; a new URL or model path re-checks from unknown."""
        if config != self.config:
            if config.url != self.config.url or config.model_url != self.config.model_url:
                self.status = UNKNOWN
                self.status_reason = "configuration changed"
                self.models_known = False
            self.config = config
            self.next_check_due = 0.0
        self.breaker.reconfigure(breaker_failures, breaker_cooldown)

    def remove(self) -> None:
        """The endpoint left the configuration: never routable again; its queued requests fail (in-flight ones finish)."""
        self.removed = True
        self.fail_waiters(CancelledError(f"endpoint {self.name} was removed from the configuration"))

    # -- what real traffic tells us

    def record_attempt(self) -> None:
        """A request is being sent to this endpoint (in half-open, it is the breaker's trial)."""
        self.breaker.on_attempt()
        self.request_count += 1

    def record_failure(self) -> None:
        """The attempt failed before a usable response (connect, reset, timeout, bad headers)."""
        self.failure_count += 1
        self.breaker.on_failure()

    def record_head_time(self, seconds: float) -> None:
        """A streamed answer's headers came ``seconds`` after its request went out, its model loaded here."""
        samples = self._head_times
        samples.append(seconds)
        count = len(samples)
        if count >= MIN_HEAD_SAMPLES and (count < HEAD_SAMPLES or self.request_count % MIN_HEAD_SAMPLES == 0):
            ordered = sorted(samples)  # (every few answers once the window is full: a median moves slowly)
            self._usual_head_time = ordered[count // 2]

    def usual_head_time(self) -> float | None:
        """The median of the recent head times of streamed answers here (``None`` until there are a few)."""
        return self._usual_head_time

    def record_response(self, status: int) -> None:
        """The attempt got a response: a 5xx counts against the breaker, anything else closes it."""
        if status >= 500:
            self.breaker.on_failure()
        else:
            self.breaker.on_success()

    # -- routing view

    @property
    def routable(self) -> bool:
        """Healthy or busy, and the breaker lets requests through."""
        return self.status in ROUTABLE_STATUSES and not self.removed and self.breaker.allows()

    def has_model(self, key: str) -> bool:
        return key in self.model_keys

    def model_loaded(self, key: str) -> bool | None:
        """Whether ``key`` is loaded here and ready (``None``: unknown, e.g. no ``/engines/ps``)."""
        if key in self._served:
            return True
        if self.loaded is None:
            return None
        loading = self.loaded.get(key)
        return loading is False

    def model_loading(self, key: str) -> bool:
        """Whether a load of ``key`` is under way here (``/engines/ps`` says so, or we just sent it here unloaded)."""
        if key in self._served:
            return False
        return key in self._routed or (self.loaded is not None and self.loaded.get(key) is True)

    def resident_count(self) -> int | None:
        """How many models are loaded or loading here (``None``: unknown, no ``/engines/ps``)."""
        if self.loaded is None:
            return None
        return len(self.loaded.keys() | self._served | self._routed)

    def set_loaded(self, loaded: dict[str, bool] | None) -> None:
        """What ``/engines/ps`` said is loaded (model key -> still loading), or ``None`` when it cannot say."""
        if loaded is not None:
            before = {k for k, loading in (self.loaded or {}).items() if not loading} | self._served
            for key in before - loaded.keys():  # unloaded since: its KV cache went with it
                self._unloads[key] = self._unloads.get(key, 0) + 1
        self.loaded = loaded
        self._served.clear()
        self._routed.clear()

    def note_routed(self, key: str) -> None:
        """A generation request for ``key`` is being sent here: unless it is loaded, a load starts now."""
        if self.model_loaded(key) is not True:
            self._routed.add(key)

    def note_served(self, key: str) -> None:
        """Real traffic got an answer for ``key`` here: it is loaded now."""
        self._served.add(key)
        self._routed.discard(key)

    # -- what the engine has cached, and how busy its compute is

    def cache_lost(self) -> None:
        """The endpoint went down: whatever its engine had cached is taken as gone."""
        self._restarts += 1

    def cache_epoch(self, key: str) -> tuple[int, int]:
        """Changes whenever this endpoint's cache for ``key`` may have been lost (a restart, an unload)."""
        return self._restarts, self._unloads.get(key, 0)

    @property
    def capacity(self) -> int:
        """How many requests the engine runs at once: ``max_concurrent``, else its configured ``slots``."""
        return self.config.max_concurrent or self.config.slots

    def loaded_models(self) -> list[str] | None:
        """The loaded models' keys, for status pages (``None``: unknown)."""
        if self.loaded is None and not self._served:
            return None
        ready = {k for k, loading in (self.loaded or {}).items() if not loading} | self._served
        return sorted(k for k in ready if " " not in k)  # chat runners (the others are keyed "mode model")

    def listed_name(self, key: str) -> str | None:
        """The model id this endpoint lists for routing key ``key`` (as it spells it), if it lists it."""
        if key not in self.model_keys:
            return None
        for model in self.models:
            if normalise_model(str(model["id"])) == key:
                return str(model["id"])
        return None

    def set_models(self, models: list[dict[str, object]]) -> None:
        self.models = models
        self.model_keys = frozenset(normalise_model(str(m["id"])) for m in models)
        self.models_known = True
        self.models_updated = self._clock.seconds()

    def checked_state(self) -> dict[str, object]:
        """What health checks found (for ``--workers``: the master checks, its workers adopt this)."""
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.status_reason,
            "models": self.models if self.models_known else None,
            "loaded": self.loaded,
            "last_check": self.last_check,
            "latency_ms": self.last_latency_ms,
            "failures": self.consecutive_check_failures,
        }

    def adopt_checked(self, state: Mapping[str, Any]) -> None:
        """Take what another process's health checks found (the status itself goes through the monitor)."""
        models = state.get("models")
        if isinstance(models, list) and all(isinstance(m, dict) and "id" in m for m in models):
            if [m["id"] for m in models] != [m["id"] for m in self.models] or not self.models_known:
                self.set_models(models)
        loaded = state.get("loaded")
        valid = loaded is None or (isinstance(loaded, dict) and all(isinstance(v, bool) for v in loaded.values()))
        if valid and loaded != self.loaded:  # only news from /engines/ps replaces what traffic taught this process
            self.set_loaded(loaded)
        last_check, latency, failures = state.get("last_check"), state.get("latency_ms"), state.get("failures")
        self.last_check = float(last_check) if isinstance(last_check, (int, float)) else self.last_check
        self.last_latency_ms = float(latency) if isinstance(latency, (int, float)) else self.last_latency_ms
        self.consecutive_check_failures = failures if isinstance(failures, int) else self.consecutive_check_failures

    def issues(self) -> list[str]:
        out: list[str] = []
        if self.status not in ROUTABLE_STATUSES:
            out.append(f"{self.status}: {self.status_reason}")
        if self.breaker.state != "closed":
            out.append(f"circuit breaker {self.breaker.state} after {self.breaker.failures} consecutive failures")
        if self.consecutive_check_failures > 3:
            out.append("unstable")
        return out

    # -- concurrency slots

    @property
    def has_free_slot(self) -> bool:
        limit = self.config.max_concurrent
        return limit == 0 or self.in_flight < limit

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def acquire(self) -> Deferred[None] | None:
        """
        Take a slot.  ``None`` means taken at once; otherwise a Deferred that
        fires when a slot is handed over, or fails with :class:`QueueFull`
        / :class:`QueueTimeout`.  Cancelling it leaves the queue.
        """
        if self.has_free_slot and not self._waiters:
            self.in_flight += 1
            return None
        if len(self._waiters) >= self.config.queue_size:
            raise QueueFull(self.name)

        def cancel(d: Deferred[None]) -> None:
            self._drop_waiter(d)

        d: Deferred[None] = Deferred(cancel)
        timer = self._clock.callLater(self.config.queue_timeout, self._expire, d)
        self._waiters.append((d, timer))
        return d

    def _drop_waiter(self, d: Deferred[None]) -> None:
        for entry in self._waiters:
            if entry[0] is d:
                self._waiters.remove(entry)
                if entry[1].active():
                    entry[1].cancel()
                return

    def _expire(self, d: Deferred[None]) -> None:
        for entry in self._waiters:
            if entry[0] is d:
                self._waiters.remove(entry)
                d.errback(QueueTimeout(self.name))
                return

    def release(self) -> None:
        """Give a slot back, handing it straight to the oldest waiter."""
        self.in_flight -= 1
        while self._waiters and self.has_free_slot:
            d, timer = self._waiters.popleft()
            if timer.active():
                timer.cancel()
            self.in_flight += 1
            d.callback(None)

    def fail_waiters(self, reason: Exception) -> None:
        """Fail every queued request (the endpoint went away)."""
        while self._waiters:
            d, timer = self._waiters.popleft()
            if timer.active():
                timer.cancel()
            d.errback(reason)


class Fleet:
    """Owns every endpoint's :class:`EndpointState`, by name, in configuration order."""

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self._clock = clock
        self.endpoints: dict[str, EndpointState] = {}
        self.reconfigure(config)

    def __iter__(self) -> Iterator[EndpointState]:
        return iter(self.endpoints.values())

    def __len__(self) -> int:
        return len(self.endpoints)

    def get(self, name: str) -> EndpointState | None:
        return self.endpoints.get(name)

    def reconfigure(self, config: Config) -> None:
        """
        Reconcile with ``config``: unchanged endpoints keep all their state;
        changed ones keep their counters and models but are re-checked;
        removed ones fail their queued requests (in-flight ones finish).
        """
        old = self.endpoints
        new: dict[str, EndpointState] = {}
        proxy = config.proxy
        for ep_config in config.endpoints:
            state = old.get(ep_config.name)
            if state is None:
                state = EndpointState(ep_config, self._clock, proxy.breaker_failures, proxy.breaker_cooldown)
            else:
                state.reconfigure(ep_config, proxy.breaker_failures, proxy.breaker_cooldown)
            new[ep_config.name] = state
        for name, state in old.items():
            if name not in new:
                state.remove()
        self.endpoints = new

    def routable(self) -> list[EndpointState]:
        return [ep for ep in self.endpoints.values() if ep.routable]
