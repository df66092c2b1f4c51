"""Unit tests for ``olladmr.edge.ratelimit``: token buckets, the RateLimiter and concurrency caps."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import EPOCH, make_limiter
from twisted.internet.task import Clock

from olladmr.config.schema import OLLA_RATE_LIMITS as OLLA_DEFAULTS
from olladmr.config.schema import RateLimitConfig
from olladmr.edge.ratelimit import (
    UNLIMITED,
    Decision,
    RateLimiter,
    TokenBucket,
    rate_limited,
    too_many_concurrent,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drain(limiter: RateLimiter, client: str, n: int, key: str | None = None) -> list[Decision]:
    return [limiter.check(client, key) for _ in range(n)]


def test_bucket_starts_full_and_refills_at_rate() -> None:
    """A bucket allows `capacity` requests at once, then one more per 60/rate seconds."""
    bucket = TokenBucket(per_minute=60, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.5)
    assert bucket.take(1.0)
    assert not bucket.take(1.0)


def test_bucket_never_exceeds_capacity_after_long_idle() -> None:
    """Idling for an hour refills a bucket only up to its capacity."""
    bucket = TokenBucket(per_minute=600, capacity=5, now=0.0)
    assert bucket.refill(3600.0) == 5.0
    assert sum(bucket.take(3600.0) for _ in range(10)) == 5


def test_bucket_ignores_clock_going_backwards() -> None:
    """A clock that steps back adds no tokens and does not delay later refills."""
    bucket = TokenBucket(per_minute=60, capacity=1, now=100.0)
    assert bucket.take(100.0)
    assert not bucket.take(50.0)
    assert bucket.take(51.0)


@FAST
@given(
    per_minute=st.integers(1, 6000),
    capacity=st.integers(1, 200),
    gaps=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=300),
)
def test_bucket_never_allows_more_than_burst_plus_rate(per_minute: int, capacity: int, gaps: list[float]) -> None:
    """Over any run of requests a bucket allows at most burst + rate * elapsed of them."""
    bucket = TokenBucket(per_minute, capacity, now=0.0)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.take(now)
        assert allowed <= capacity + per_minute / 60.0 * now + 1e-6


@FAST
@given(per_minute=st.integers(1, 6000), capacity=st.integers(1, 100), idle=st.floats(0.0, 600.0))
def test_bucket_allows_everything_refilled(per_minute: int, capacity: int, idle: float) -> None:
    """After draining, idling refills floor(min(capacity, rate * idle)) whole tokens (within rounding)."""
    bucket = TokenBucket(per_minute, capacity, now=0.0)
    while bucket.take(0.0):
        pass
    expected = min(capacity, per_minute / 60.0 * idle)
    got = 0
    while bucket.take(idle):
        got += 1
    assert expected - 1 - 1e-6 <= got <= expected + 1e-6


def test_disabled_by_default_allows_everything_without_headers() -> None:
    """With the default (all zero) configuration every request is allowed and no headers are added."""
    limiter, _ = make_limiter()
    decisions = drain(limiter, "10.0.0.1", 1000)
    assert all(d is UNLIMITED for d in decisions)
    assert UNLIMITED.headers() == {}
    assert limiter.tracked() == 0
    assert RateLimitConfig().enabled is False
    assert (OLLA_DEFAULTS.global_requests_per_minute, OLLA_DEFAULTS.per_ip_requests_per_minute, OLLA_DEFAULTS.burst_size) == (
        1000,
        100,
        50,
    )


def test_burst_then_429_decision_values_and_headers() -> None:
    """Past the burst the decision refuses with Retry-After, zero remaining and the reset time."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=60, burst_size=3)
    first, second, third, refused = drain(limiter, "10.0.0.1", 4)
    assert (first.allowed, first.limit, first.remaining, first.scope) == (True, 60, 2, "ip")
    assert (second.remaining, third.remaining) == (1, 0)
    assert third.reset == EPOCH + 3
    assert not refused.allowed
    assert (refused.remaining, refused.retry_after, refused.reset) == (0, 1, EPOCH + 3)
    assert refused.headers() == {
        b"x-ratelimit-limit": b"60",
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"%d" % (EPOCH + 3),
        b"retry-after": b"1",
    }
    assert b"retry-after" not in first.headers()
    clock.advance(1.0)
    assert limiter.check("10.0.0.1").allowed
    assert not limiter.check("10.0.0.1").allowed


def test_retry_after_rounds_up_for_slow_rates() -> None:
    """At 2 requests a minute an empty bucket says to retry in 30 seconds, then 11 after 19.5 s."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=2, burst_size=1)
    assert limiter.check("a").allowed
    assert limiter.check("a").retry_after == 30
    clock.advance(19.5)
    assert limiter.check("a").retry_after == 11


def test_burst_zero_means_one_minute_of_rate() -> None:
    """burst_size 0 makes a bucket hold one minute's worth of requests."""
    limiter, _ = make_limiter(per_ip_requests_per_minute=5)
    assert [d.allowed for d in drain(limiter, "a", 6)] == [True] * 5 + [False]


def test_refused_request_consumes_no_tokens() -> None:
    """A request refused by its own bucket leaves the global bucket untouched."""
    limiter, _ = make_limiter(global_requests_per_minute=10, per_ip_requests_per_minute=2)
    drain(limiter, "a", 50)
    assert sum(d.allowed for d in drain(limiter, "b", 10)) == 2
    remaining = [limiter.check(f"c{i}").allowed for i in range(10)]
    assert remaining.count(True) == 10 - 2 - 2


def test_per_ip_buckets_are_independent() -> None:
    """Exhausting one address leaves another address's allowance intact."""
    limiter, _ = make_limiter(per_ip_requests_per_minute=60, burst_size=2)
    assert [d.allowed for d in drain(limiter, "10.0.0.1", 3)] == [True, True, False]
    assert [d.allowed for d in drain(limiter, "10.0.0.2", 3)] == [True, True, False]


def test_global_limit_binds_across_addresses() -> None:
    """The global bucket refuses once all addresses together used it up, naming the global scope."""
    limiter, clock = make_limiter(global_requests_per_minute=60, per_ip_requests_per_minute=600, burst_size=5)
    allowed = [limiter.check(f"10.0.0.{i}").allowed for i in range(8)]
    assert allowed == [True] * 5 + [False] * 3
    refused = limiter.check("10.0.0.99")
    assert (refused.allowed, refused.scope, refused.limit, refused.retry_after) == (False, "global", 60, 1)
    clock.advance(1.0)
    assert limiter.check("10.0.0.99").allowed


def test_allowed_decision_reports_the_tightest_bucket() -> None:
    """The headers of an allowed request describe the bucket with the fewest tokens left."""
    limiter, _ = make_limiter(global_requests_per_minute=1000, per_ip_requests_per_minute=10)
    d = limiter.check("a")
    assert (d.scope, d.limit, d.remaining) == ("ip", 10, 9)
    limiter2, _ = make_limiter(global_requests_per_minute=3, per_ip_requests_per_minute=100)
    d = limiter2.check("a")
    assert (d.scope, d.limit, d.remaining) == ("global", 3, 2)


def test_per_key_limit_applies_to_the_key_across_addresses() -> None:
    """A per-API-key bucket follows the key whichever address it comes from."""
    limiter, _ = make_limiter(per_ip_requests_per_minute=100, per_key_requests_per_minute=3)
    results = [limiter.check(f"10.0.0.{i}", "abcd1234").allowed for i in range(5)]
    assert results == [True, True, True, False, False]
    refused = limiter.check("10.0.0.9", "abcd1234")
    assert refused.scope == "key"
    assert limiter.check("10.0.0.9", "ffff0000").allowed
    assert limiter.check("10.0.0.9").allowed


def test_health_bucket_is_separate() -> None:
    """Health checks use their own per-client bucket and no other."""
    limiter, _ = make_limiter(global_requests_per_minute=1, per_ip_requests_per_minute=1, health_requests_per_minute=2)
    assert limiter.check("a").allowed
    assert not limiter.check("a").allowed
    assert [limiter.check("a", health=True).allowed for _ in range(3)] == [True, True, False]
    assert limiter.check("a", health=True).scope == "health"
    limiter2, _ = make_limiter(per_ip_requests_per_minute=1)
    assert limiter2.check("a", health=True) is UNLIMITED


def test_rate_limited_error_is_a_429_with_headers() -> None:
    """The 429 ClientError carries Retry-After and the X-RateLimit headers in the OpenAI shape."""
    limiter, _ = make_limiter(per_ip_requests_per_minute=1)
    limiter.check("a")
    error = rate_limited(limiter.check("a"))
    assert error.status == 429
    assert error.headers[b"retry-after"] == b"60"
    assert error.headers[b"x-ratelimit-limit"] == b"1"
    body = json.loads(error.body())
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "1 requests per minute" in body["error"]["message"]


def test_reconfigure_keeps_buckets_and_drops_disabled_scopes() -> None:
    """A reload keeps each client's tokens, applies the new rate and forgets scopes set to 0."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=60, burst_size=2)
    drain(limiter, "a", 2)
    limiter.reconfigure(RateLimitConfig(per_ip_requests_per_minute=600, burst_size=2))
    assert not limiter.check("a").allowed
    clock.advance(0.2)
    assert limiter.check("a").allowed
    limiter.reconfigure(RateLimitConfig())
    assert limiter.tracked() == 0
    assert limiter.check("a") is UNLIMITED


def test_eviction_bounds_memory_under_200k_addresses() -> None:
    """200,000 distinct addresses leave at most max_clients buckets, quickly."""
    limiter, _ = make_limiter(per_ip_requests_per_minute=100)
    started = time.perf_counter()
    for i in range(200_000):
        limiter.check(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert limiter.tracked() == 100_000
    assert time.perf_counter() - started < 5.0  # about 0.5 s; the bound only catches non-constant-time lookups


def test_eviction_drops_least_recently_used() -> None:
    """When the table is full the client seen longest ago is forgotten, not an active one."""
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(per_ip_requests_per_minute=60, burst_size=1), clock, max_clients=2)
    assert limiter.check("a").allowed
    assert limiter.check("b").allowed
    assert not limiter.check("a").allowed  # "a" is now the most recent
    assert limiter.check("c").allowed  # evicts "b"
    assert limiter.tracked() == 2
    assert not limiter.check("a").allowed
    assert limiter.check("b").allowed  # a fresh bucket


def test_sweep_drops_only_refilled_buckets() -> None:
    """The periodic sweep forgets buckets that are full again and keeps the rest."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=60, burst_size=10)
    limiter.check("idle")
    clock.advance(0.5)
    drain(limiter, "busy", 10)
    clock.advance(1.0)
    assert limiter.sweep() == 1
    assert limiter.tracked() == 1
    assert [d.allowed for d in drain(limiter, "busy", 2)] == [True, False]


def test_periodic_sweep_runs_on_cleanup_interval() -> None:
    """start() sweeps every cleanup_interval on the injected clock until stop()."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=60, cleanup_interval=30.0)
    limiter.start()
    limiter.check("a")
    clock.advance(29.0)
    assert limiter.tracked() == 1
    clock.advance(1.0)
    assert limiter.tracked() == 0
    limiter.stop()
    limiter.check("b")
    clock.advance(120.0)
    assert limiter.tracked() == 1
    assert not clock.getDelayedCalls()


def test_reconfigure_reschedules_the_sweep() -> None:
    """A reload with a new cleanup_interval moves the running sweep to the new period."""
    limiter, clock = make_limiter(per_ip_requests_per_minute=60, cleanup_interval=300.0)
    limiter.start()
    limiter.reconfigure(RateLimitConfig(per_ip_requests_per_minute=60, cleanup_interval=10.0))
    limiter.check("a")
    clock.advance(10.0)
    assert limiter.tracked() == 0
    assert len(clock.getDelayedCalls()) == 1
    limiter.stop()


def test_concurrency_cap_per_client() -> None:
    """A client at max_concurrent_per_client is refused until one of its requests finishes."""
    limiter, _ = make_limiter(max_concurrent_per_client=2)
    assert limiter.acquire_concurrent("a") and limiter.acquire_concurrent("a")
    assert not limiter.acquire_concurrent("a")
    assert limiter.acquire_concurrent("b")
    limiter.release_concurrent("a")
    assert limiter.acquire_concurrent("a")
    for _ in range(2):
        limiter.release_concurrent("a")
    limiter.release_concurrent("b")
    assert limiter.in_flight("a") == limiter.in_flight("b") == 0
    assert limiter._active == {}
    error = too_many_concurrent(2)
    assert (error.status, error.code, error.headers[b"retry-after"]) == (429, "too_many_concurrent_requests", b"1")


def test_concurrency_uncapped_by_default() -> None:
    """With no cap every acquire succeeds and releases leave nothing behind."""
    limiter, _ = make_limiter()
    assert all(limiter.acquire_concurrent("a") for _ in range(1000))
    for _ in range(1001):
        limiter.release_concurrent("a")
    assert limiter.in_flight("a") == 0


# -- --workers N: each process enforces its share


def test_each_of_n_processes_enforces_a_share_that_sums_to_at_most_the_limit() -> None:
    """100/min across 3 processes: 33 each (99 together); 0 stays off; a limit below N is 1 each."""
    from olladmr.edge.gate import share_of

    limits = RateLimitConfig(global_requests_per_minute=100, per_ip_requests_per_minute=5, burst_size=10,
                             max_concurrent_per_client=8, per_key_requests_per_minute=2)
    assert share_of(limits, 1) is limits
    three = share_of(limits, 3)
    assert (three.global_requests_per_minute, three.per_ip_requests_per_minute, three.burst_size) == (33, 1, 3)
    assert (three.max_concurrent_per_client, three.per_key_requests_per_minute) == (2, 1)
    assert three.health_requests_per_minute == 0  # off stays off
    two = share_of(limits, 2)
    assert two.global_requests_per_minute * 2 <= limits.global_requests_per_minute


def test_a_gate_for_one_of_two_workers_admits_half_the_limit() -> None:
    """Two processes' gates with per_ip 10/min admit 5 each from one client: 10 together, as configured."""
    from olladmr.config import parse_config
    from olladmr.edge.gate import Gate

    config = parse_config({"server": {"rate_limits": {"per_ip_requests_per_minute": 10}}}, "t")
    clock = Clock()
    clock.advance(EPOCH)
    admitted = 0
    for _ in range(2):
        gate = Gate(config.server, clock, share=2)
        admitted += sum(gate.limiter.check("10.0.0.1", None).allowed for _ in range(20))
    assert admitted == 10
