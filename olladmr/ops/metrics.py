"""
Prometheus metrics and in-process statistics.

:class:`Metrics` owns one ``prometheus_client`` registry per service (no
global state, so tests and reloads stay isolated).  Request counters and
histograms are updated once per finished exchange; endpoint state (up,
status, breaker, in flight, queue) is read at scrape time by a collector,
so nothing is done per request for it.  Label cardinality is bounded:
a model that no endpoint lists is counted under ``other``.

:class:`ModelStats` keeps per-model request counts and a bounded window of
latencies for the p50/p95/p99 in ``/internal/status/models``.

With ``--workers N`` the request counters and histograms (:data:`SHARED`)
live in ``prometheus_client``'s multiprocess files, one per process, in a
directory the master creates (:func:`share_across_processes`); a scrape of
any process sums every process's files, so one scrape of the shared port
shows fleet-wide counts, and ``/internal/status``'s totals are read the same
way.  What describes one process's own view (its endpoint states, in-flight
requests, health checks, reloads, sessions) stays per process.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from twisted.internet.interfaces import IReactorTime

from .. import __version__
from ..config.schema import Config
from ..fleet.models import normalise_model
from ..fleet.state import Fleet
from ..proxy.record import OK, ExchangeRecord
from .lifecycle import ReloadResult

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()
#: The metric families summed over every process with ``--workers`` (the traffic; the rest is per process).
SHARED = frozenset({
    "olladmr_requests", "olladmr_request_outcomes", "olladmr_requests_succeeded", "olladmr_request_duration_seconds",
    "olladmr_time_to_first_byte_seconds", "olladmr_upstream_response_bytes", "olladmr_failovers", "olladmr_tokens",
    "olladmr_completion_tokens_per_second",
})
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_across_processes(directory: str, clock: IReactorTime) -> None:
    """
    From now on, this process's metric values live in ``prometheus_client``'s
    per-process files in ``directory`` (multiprocess mode; workers inherit
    the directory through the environment), written once per reactor turn
    (:func:`batched_values`).  Call it before any :class:`Metrics` is built;
    it is for a process that serves one daemon.
    """
    os.environ[MULTIPROCESS_ENV] = directory
    values.ValueClass = batched_values(values.MultiProcessValue(), clock)


def batched_values(mmaped: Any, clock: IReactorTime) -> Any:
    """
    ``prometheus_client``'s mmap-backed value class, with the increments a
    reactor turn makes added up and written at its end: one locked write
    (and ``getpid``) per value per turn instead of one per increment, which
    cost a worker about 20 µs per request.  A scrape (in any process) sees
    every earlier turn's increments; the turn it runs in sees its own too.
    """
    dirty: list[Any] = []
    scheduled: list[Any] = []

    def flush() -> None:
        scheduled.clear()
        owed = list(dirty)
        dirty.clear()
        for value in owed:
            value.write_owed()

    class BatchedValue(mmaped):
        """A metric value in this process's mmap file; owns the increments not yet written to it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._owed = 0.0
            self._dirty = False

        def inc(self, amount: float) -> None:
            self._owed += amount
            if not self._dirty:
                self._dirty = True
                dirty.append(self)
                if not scheduled:
                    scheduled.append(clock.callLater(0, flush))

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._owed = 0.0  # a set replaces what was counted before it in this turn
            super().set(value, timestamp)

        def write_owed(self) -> None:
            owed, self._owed, self._dirty = self._owed, 0.0, False
            if owed:
                super().inc(owed)

        def get(self) -> float:
            return float(super().get()) + self._owed

    return BatchedValue


class ReactorThreadValue(values.MutexValue):
    """
    A metric value that only the reactor thread reads and writes: no lock
    around each increment (a request makes about a dozen).  Installed by
    :func:`values_for_one_thread` in a daemon's single process.
    """

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def get(self) -> float:
        return float(self._value)


def values_for_one_thread() -> None:
    """
    From now on, metric values are :class:`ReactorThreadValue` (a daemon's
    metrics are touched by its reactor thread only).  Call it before any
    :class:`Metrics` is built; it is for a process that serves one daemon.
    """
    if values.ValueClass is values.MutexValue:
        values.ValueClass = ReactorThreadValue


class _Exposition:
    """What a scrape renders: the shared families summed over every process's files, the rest from this process."""

    def __init__(self, local: CollectorRegistry, directory: str) -> None:
        self._local = local
        self._directory = directory

    def collect(self) -> Iterator[Any]:
        for family in MultiProcessCollector(None, path=self._directory).collect():
            if family.name in SHARED:
                yield family
        for family in self._local.collect():
            if family.name not in SHARED:
                yield family
OTHER_MODEL = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STATUSES = ("unknown", "healthy", "busy", "unhealthy", "offline")
_BREAKER = {"closed": 0, "half-open": 1, "open": 2}


def status_class(status: int) -> str:
    return f"{status // 100}xx" if status else "none"


class _FleetCollector:
    """Reads endpoint state at scrape time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("olladmr_endpoint_up", "1 when the endpoint is routable", labels=["endpoint"])
        status = GaugeMetricFamily(
            "olladmr_endpoint_status", "1 for the endpoint's current health status", labels=["endpoint", "status"]
        )
        breaker = GaugeMetricFamily(
            "olladmr_endpoint_breaker_state", "circuit breaker: 0 closed, 1 half-open, 2 open", labels=["endpoint"]
        )
        in_flight = GaugeMetricFamily("olladmr_endpoint_in_flight", "requests in flight", labels=["endpoint"])
        queued = GaugeMetricFamily("olladmr_endpoint_queued", "requests waiting for a slot", labels=["endpoint"])
        models = GaugeMetricFamily("olladmr_endpoint_models", "models the endpoint lists", labels=["endpoint"])
        for ep in self.fleet:
            up.add_metric([ep.name], 1 if ep.routable else 0)
            for name in _STATUSES:
                status.add_metric([ep.name, name], 1 if ep.status == name else 0)
            breaker.add_metric([ep.name], _BREAKER[ep.breaker.state])
            in_flight.add_metric([ep.name], ep.in_flight)
            queued.add_metric([ep.name], ep.queued)
            models.add_metric([ep.name], len(ep.models))
        yield from (up, status, breaker, in_flight, queued, models)


class _StickyCollector:
    """Reads the session router's counters at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        stats = self.stats()
        results = CounterMetricFamily(
            "olladmr_sticky_sessions", "keyed requests by placement result", labels=["result"]
        )
        for label, key in (("hit", "hits"), ("miss", "misses"), ("repin", "repins"), ("spill", "spills")):
            results.add_metric([label], stats[key])
        yield results
        cold = CounterMetricFamily(
            "olladmr_cold_routes", "requests that could go to an endpoint with the model loaded (avoided) or could not (taken)",
            labels=["result"],
        )
        cold.add_metric(["avoided"], stats["cold_route_avoided"])
        cold.add_metric(["taken"], stats["cold_route_taken"])
        yield cold
        yield CounterMetricFamily("olladmr_sticky_evictions", "session pins evicted (idle or full)",
                                  value=stats["evictions"])
        reasons = CounterMetricFamily(
            "olladmr_placements", "keyed requests by why they went where they went", labels=["reason"]
        )
        for reason, count in stats["placements"].items():
            reasons.add_metric([reason], count)
        yield reasons
        prompt = CounterMetricFamily(
            "olladmr_prompt_tokens_placed",
            "prompt tokens of cost-placed requests, found cached where they went (matched) or not (unmatched); "
            "estimated at 4 characters a token",
            labels=["cache"],
        )
        prompt.add_metric(["matched"], stats["prompt_tokens_matched"])
        prompt.add_metric(["unmatched"], stats["prompt_tokens_unmatched"])
        yield prompt
        yield GaugeMetricFamily("olladmr_sticky_sessions_active", "sessions pinned now", value=stats["sessions"])


def _percentile(window: Sequence[float], p: float, scale: float = 1.0) -> float | None:
    """The ``p`` quantile of the sorted ``window`` times ``scale`` (``None`` when empty)."""
    if not window:
        return None
    return round(window[min(len(window) - 1, int(p * len(window)))] * scale, 2)


class ModelStats:
    """
    Per-key (a model, or an endpoint) request and failure counts, token
    totals, and bounded windows of latency, time to first byte and
    generation speed.
    """

    WINDOW = 1000

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.latencies: dict[str, deque[float]] = {}
        self.ttfts: dict[str, deque[float]] = {}
        self.speeds: dict[str, deque[float]] = {}

    @classmethod
    def _window(cls, windows: dict[str, deque[float]], key: str) -> deque[float]:
        window = windows.get(key)
        if window is None:
            window = windows[key] = deque(maxlen=cls.WINDOW)
        return window

    def add(
        self, key: str, seconds: float, ok: bool, *, ttft: float | None = None, tokens: int = 0,
        rate: float | None = None,
    ) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        if not ok:
            self.failures[key] = self.failures.get(key, 0) + 1
        self._window(self.latencies, key).append(seconds)
        if ttft is not None:
            self._window(self.ttfts, key).append(ttft)
        if tokens:
            self.completion_tokens[key] = self.completion_tokens.get(key, 0) + tokens
        if rate is not None:
            self._window(self.speeds, key).append(rate)

    def summary(self, key: str) -> dict[str, Any]:
        latency = sorted(self.latencies.get(key, ()))
        ttft = sorted(self.ttfts.get(key, ()))
        speed = sorted(self.speeds.get(key, ()))
        requests = self.requests.get(key, 0)
        failures = self.failures.get(key, 0)
        return {
            "requests": requests,
            "failures": failures,
            "error_rate": round(failures / requests, 4) if requests else None,
            "latency_ms": {"p50": _percentile(latency, 0.50, 1000), "p95": _percentile(latency, 0.95, 1000),
                           "p99": _percentile(latency, 0.99, 1000)},
            "ttft_ms": {"p50": _percentile(ttft, 0.50, 1000), "p95": _percentile(ttft, 0.95, 1000)},
            "tokens_per_second": {"p50": _percentile(speed, 0.50)},
            "completion_tokens": self.completion_tokens.get(key, 0),
        }


class _Bundle:
    """The metric children one kind of exchange (endpoint, model, route, status class, outcome) updates."""

    __slots__ = ("requests", "outcome", "duration", "ttfb", "upstream_bytes")

    def __init__(self, requests: Any, outcome: Any, duration: Any) -> None:
        self.requests = requests
        self.outcome = outcome
        self.duration = duration
        self.ttfb: Any = None  # (made when first observed)
        self.upstream_bytes: Any = None


class Metrics:
    """Owns the registry, the request metrics, the per-model statistics and the running totals."""

    def __init__(
        self,
        fleet: Fleet,
        clock: IReactorTime,
        in_flight: Callable[[], int],
        response_entries: Callable[[], int] = lambda: 0,
        sticky: Callable[[], dict[str, Any]] | None = None,
        shared_dir: str | None = None,
    ) -> None:
        self.fleet = fleet
        self._shared_dir = shared_dir
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "olladmr_requests", "proxied requests", ["endpoint", "model", "route", "status_class"], registry=r
        )
        self.outcomes = Counter("olladmr_request_outcomes", "how proxied requests ended", ["outcome"], registry=r)
        self.succeeded_total = Counter(
            "olladmr_requests_succeeded", "proxied requests that ended ok with a status below 500", registry=r
        )
        self.duration = Histogram(
            "olladmr_request_duration_seconds", "arrival to last byte", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfb = Histogram(
            "olladmr_time_to_first_byte_seconds", "arrival to upstream headers", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        Gauge("olladmr_requests_in_flight", "proxied requests in flight", registry=r).set_function(in_flight)
        self.upstream_bytes = Counter(
            "olladmr_upstream_response_bytes", "response body bytes relayed", ["endpoint"], registry=r
        )
        self.failovers = Counter("olladmr_failovers", "attempts moved to another endpoint", registry=r)
        self.tokens = Counter("olladmr_tokens", "tokens reported by upstream usage", ["model", "kind"], registry=r)
        self.tokens_per_second = Histogram(
            "olladmr_completion_tokens_per_second", "generation speed", ["model"],
            buckets=(1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000), registry=r,
        )
        self.health_checks = Histogram(
            "olladmr_health_check_duration_seconds", "health check time", ["endpoint", "result"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.reloads = Counter("olladmr_config_reloads", "configuration reloads", ["result"], registry=r)
        self.response_probes = Histogram(
            "olladmr_response_probe_duration_seconds",
            "looking for the endpoint that holds a stored Responses API answer, by result (found, missing, failed)",
            ["result"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r,
        )
        Gauge(
            "olladmr_response_affinity_entries", "Responses API answers whose endpoint this instance remembers",
            registry=r,
        ).set_function(response_entries)
        self.config_loaded = Gauge(
            "olladmr_config_loaded_timestamp_seconds", "when the running configuration was loaded", registry=r
        )
        info = Gauge("olladmr_info", "olladmr build information", ["version"], registry=r)
        info.labels(__version__).set(1)
        r.register(_FleetCollector(fleet))
        if sticky is not None:
            r.register(_StickyCollector(sticky))
        self.config_loaded.set(clock.seconds())
        self.model_stats = ModelStats()
        self.endpoint_stats = ModelStats()  # the same, per endpoint (the status API and the dashboard)
        self.completion_tokens_total = 0
        self.total = 0
        self.succeeded = 0
        self._children: dict[tuple[Any, ...], Any] = {}
        self._bundles: dict[tuple[Any, ...], _Bundle] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: label sets are bounded, lookups are per request."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str | None) -> str:
        """The model's canonical name if some endpoint lists it, else ``other`` (bounded labels)."""
        if not model:
            return "none"
        key = normalise_model(model)
        for ep in self.fleet:
            if key in ep.model_keys:
                return key
        return OTHER_MODEL

    # -- ExchangeObserver

    def _bundle(self, endpoint: str, model: str, route: str, status: int, outcome: str) -> _Bundle:
        status_label = status_class(status)
        key = (endpoint, model, route, status_label, outcome)
        bundle = self._bundles.get(key)
        if bundle is None:
            if len(self._bundles) > 4096:  # (label sets are bounded; this only caps the memo)
                self._bundles.clear()
            child = self._child
            bundle = self._bundles[key] = _Bundle(
                child(self.requests, endpoint, model, route, status_label),
                child(self.outcomes, outcome),
                child(self.duration, route),
            )
        return bundle

    def exchange_done(self, record: ExchangeRecord) -> None:
        model = self.model_label(record.model)
        endpoint = record.endpoint or "none"
        status = record.status
        route = record.route
        ok = record.outcome == OK and 0 < status < 500
        self.total += 1
        bundle = self._bundle(endpoint, model, route, status, record.outcome)
        if ok:
            self.succeeded += 1
            self.succeeded_total.inc()
        bundle.requests.inc()
        bundle.outcome.inc()
        total = max(0.0, record.ended - record.arrived)
        bundle.duration.observe(total)
        # The children below exist once something was counted in them (a series only appears with a value).
        child = self._child
        if record.headers_at is not None:
            ttfb = bundle.ttfb
            if ttfb is None:
                ttfb = bundle.ttfb = child(self.ttfb, route)
            ttfb.observe(max(0.0, record.headers_at - record.arrived))
        if record.bytes_sent and record.endpoint:
            sent = bundle.upstream_bytes
            if sent is None:
                sent = bundle.upstream_bytes = child(self.upstream_bytes, endpoint)
            sent.inc(record.bytes_sent)
        if record.failovers:
            self.failovers.inc(record.failovers)
        usage = record.usage
        completion = 0
        rate = None
        if usage:
            for kind in ("prompt_tokens", "completion_tokens"):
                value = usage.get(kind)
                if isinstance(value, int) and value >= 0:
                    child(self.tokens, model, kind.split("_")[0]).inc(value)
                    if kind == "completion_tokens":
                        completion = value
            rate = record.tokens_per_second
            if rate is not None:
                child(self.tokens_per_second, model).observe(rate)
        self.completion_tokens_total += completion
        ttft = None if record.first_byte_at is None else max(0.0, record.first_byte_at - record.arrived)
        self.model_stats.add(model, total, ok, ttft=ttft, tokens=completion, rate=rate)
        if record.endpoint:
            self.endpoint_stats.add(record.endpoint, total, ok, ttft=ttft, tokens=completion, rate=rate)

    def health_checks_observe(self, endpoint: str, result: str, seconds: float) -> None:
        """A health check of ``endpoint`` ended with ``result`` after ``seconds``."""
        self.health_checks.labels(endpoint, result).observe(seconds)

    def probe_observed(self, result: str, seconds: float) -> None:
        """A response-owner probe ended with ``result`` after ``seconds``."""
        self.response_probes.labels(result).observe(seconds)

    def reload_observed(self, result: ReloadResult) -> None:
        """A configuration reload succeeded or was refused."""
        self.reloads.labels("success" if result.ok else "failure").inc()

    def reconfigure(self, config: Config) -> None:
        """A new configuration is in force: stamp its load time."""
        self.config_loaded.set(self._clock.seconds())

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry (with ``--workers``, the traffic of every process)."""
        if self._shared_dir is None:
            return generate_latest(self.registry)
        return generate_latest(_Exposition(self.registry, self._shared_dir))

    def totals(self) -> tuple[int, int]:
        """(requests, succeeded) proxied so far: this process's, or with ``--workers`` every process's."""
        if self._shared_dir is None:
            return self.total, self.succeeded
        total = succeeded = 0.0
        for family in MultiProcessCollector(None, path=self._shared_dir).collect():
            if family.name == "olladmr_request_outcomes":
                total = sum(s.value for s in family.samples if s.name.endswith("_total"))
            elif family.name == "olladmr_requests_succeeded":
                succeeded = sum(s.value for s in family.samples if s.name.endswith("_total"))
        return int(total), int(succeeded)
