"""
Deterministic unit tests for the edge of the proxy: rate limits and
concurrency caps, inbound API keys and CORS.

No sockets and no sleeping: time is a ``twisted.internet.task.Clock`` and
configuration sections are built directly with ``olladmr.config.Section``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from olladmr.edge import auth as auth_module
from olladmr.config import ConfigError, Section
from olladmr.config.parse import parse_auth, parse_cors, parse_rate_limits
from olladmr.config.schema import DEFAULT_EXPOSED_HEADERS, AuthConfig, CorsConfig, RateLimitConfig
from olladmr.config.schema import OLLA_RATE_LIMITS as OLLA_DEFAULTS
from olladmr.edge.auth import Authenticator, admin_unauthorized, hash_key, unauthorized
from olladmr.edge.clientaddr import client_address
from olladmr.edge.cors import Cors
from olladmr.edge.ratelimit import (
    UNLIMITED,
    Decision,
    RateLimiter,
    TokenBucket,
    rate_limited,
    too_many_concurrent,
)
from olladmr.proxy.headers import add_response_headers, merge_vary

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPOCH = 1_700_000_000.0


def section(data: dict[str, Any], path: str) -> Section:
    """A config section as parse_config would hand it over."""
    return Section(data, path, "c.yaml", [])


def make_limiter(**values: Any) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    clock.advance(EPOCH)
    return RateLimiter(RateLimitConfig(**values), clock), clock


def drain(limiter: RateLimiter, client: str, n: int, key: str | None = None) -> list[Decision]:
    return [limiter.check(client, key) for _ in range(n)]


# --------------------------------------------------------------------------
# Token buckets


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


# --------------------------------------------------------------------------
# Decisions and headers


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


# --------------------------------------------------------------------------
# Client address


def trusting(**values: Any) -> RateLimiter:
    limiter, _ = make_limiter(trust_proxy_headers=True, **values)
    return limiter


def test_xff_ignored_unless_trusted() -> None:
    """Without trust_proxy_headers the TCP peer is the client whatever X-Forwarded-For says."""
    limiter, _ = make_limiter()
    assert client_address("10.0.0.5", [b"1.2.3.4"], limiter.config) == "10.0.0.5"


def test_xff_from_untrusted_peer_is_ignored() -> None:
    """A peer outside trusted_proxy_cidrs cannot set its address through X-Forwarded-For."""
    limiter = trusting()
    assert client_address("203.0.113.9", [b"1.2.3.4"], limiter.config) == "203.0.113.9"
    assert client_address("203.0.113.9", None, limiter.config) == "203.0.113.9"


def test_xff_from_trusted_peer_gives_client() -> None:
    """Behind a trusted proxy the address it appended is the client."""
    limiter = trusting()
    assert client_address("10.0.0.5", [b"198.51.100.7"], limiter.config) == "198.51.100.7"
    assert client_address("127.0.0.1", [b" 198.51.100.7 "], limiter.config) == "198.51.100.7"
    assert client_address("10.0.0.5", [], limiter.config) == "10.0.0.5"


def test_xff_spoofed_chain_takes_rightmost_untrusted() -> None:
    """Addresses a client put in front of the chain are skipped: the right-most untrusted hop wins."""
    limiter = trusting()
    header = [b"1.1.1.1, 8.8.8.8, 198.51.100.7, 10.0.0.3"]
    assert client_address("10.0.0.5", header, limiter.config) == "198.51.100.7"
    split = [b"1.1.1.1, 8.8.8.8", b"198.51.100.7", b"10.0.0.3"]
    assert client_address("10.0.0.5", split, limiter.config) == "198.51.100.7"


def test_xff_garbage_stops_at_last_trusted_hop() -> None:
    """A malformed hop is not believed: the last trusted proxy's address is used instead."""
    limiter = trusting()
    assert client_address("10.0.0.5", [b"1.2.3.4, not-an-ip, 10.0.0.3"], limiter.config) == "10.0.0.3"
    assert client_address("10.0.0.5", [b"evil"], limiter.config) == "10.0.0.5"


def test_xff_all_trusted_gives_leftmost_and_handles_ports_and_v6() -> None:
    """A chain of trusted proxies gives its left-most hop; ports, brackets and mapped IPv4 are understood."""
    limiter = trusting(trusted_proxy_cidrs=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))
    assert client_address("10.0.0.5", [b"10.1.1.1, 10.2.2.2"], limiter.config) == "10.1.1.1"
    assert client_address("10.0.0.5", [b"198.51.100.7:4321"], limiter.config) == "198.51.100.7"
    assert client_address("fd00::1", [b"[2001:db8::1]:443"], limiter.config) == "2001:db8::1"
    assert client_address("::ffff:10.0.0.5", [b"2001:db8::2"], limiter.config) == "2001:db8::2"
    assert client_address("unix", [b"1.2.3.4"], limiter.config) == "unix"


# --------------------------------------------------------------------------
# Bounded memory


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


# --------------------------------------------------------------------------
# Concurrency


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


# --------------------------------------------------------------------------
# Parsing server.rate_limits


def test_parse_rate_limits_reads_olla_keys() -> None:
    """Olla's keys (and max_concurrent_per_client) are read into RateLimitConfig."""
    config = parse_rate_limits(
        section(
            {
                "global_requests_per_minute": 1000,
                "per_ip_requests_per_minute": 100,
                "health_requests_per_minute": 500,
                "burst_size": 50,
                "cleanup_interval": "1m",
                "trust_proxy_headers": True,
                "trusted_proxy_cidrs": ["10.0.0.0/8", "192.168.1.1/24", "::1"],
                "max_concurrent_per_client": 4,
            },
            "server.rate_limits",
        )
    )
    assert (config.global_requests_per_minute, config.per_ip_requests_per_minute, config.burst_size) == (1000, 100, 50)
    assert (config.health_requests_per_minute, config.cleanup_interval, config.max_concurrent_per_client) == (500, 60.0, 4)
    assert [str(n) for n in config.trusted_proxy_cidrs] == ["10.0.0.0/8", "192.168.1.0/24", "::1/128"]
    assert parse_rate_limits(section({}, "server.rate_limits")) == RateLimitConfig()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"trusted_proxy_cidrs": ["10.0.0.0/8", "10.0.0.0/33"]},
            'c.yaml: server.rate_limits.trusted_proxy_cidrs[1]: not a valid CIDR (such as "10.0.0.0/8"): "10.0.0.0/33"',
        ),
        (
            {"trusted_proxy_cidrs": [8]},
            'c.yaml: server.rate_limits.trusted_proxy_cidrs[0]: expected a CIDR such as "10.0.0.0/8", got 8',
        ),
        ({"burst_size": -1}, "c.yaml: server.rate_limits.burst_size: must be at least 0, got -1"),
        ({"per_ip_requests_per_minute": "lots"}, 'server.rate_limits.per_ip_requests_per_minute: expected a whole number'),
        ({"trust_proxy_headers": True, "trusted_proxy_cidrs": []}, "server.rate_limits.trusted_proxy_cidrs: is empty"),
        ({"requests_per_hour": 5}, "c.yaml: server.rate_limits.requests_per_hour: unknown key"),
    ],
)
def test_parse_rate_limits_errors(data: dict[str, Any], message: str) -> None:
    """Bad rate limit settings are one-line errors naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_rate_limits(section(data, "server.rate_limits"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------
# API keys

KEY, OTHER, ADMIN = "sk-olla-good", "sk-olla-other", "sk-olla-admin"


def authenticator(*keys: str, admin: tuple[str, ...] = ()) -> Authenticator:
    return Authenticator(
        AuthConfig(
            api_key_digests=tuple(hashlib.sha256(k.encode()).digest() for k in keys),
            admin_key_digests=tuple(hashlib.sha256(k.encode()).digest() for k in admin),
        )
    )


def headers(**values: str) -> Headers:
    return Headers({name.replace("_", "-").encode(): [value.encode()] for name, value in values.items()})


def test_hash_key_is_sha256_hex() -> None:
    """hash_key gives the SHA-256 hex digest operators put in the configuration."""
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_bearer_and_x_api_key_forms() -> None:
    """A valid key is accepted as a Bearer token or an x-api-key, and named by a short digest prefix."""
    auth = authenticator(OTHER, KEY)
    expected = hash_key(KEY)[:8]
    assert auth.required
    assert auth.identify(headers(authorization=f"Bearer {KEY}")) == expected
    assert auth.identify(headers(authorization=f"bearer   {KEY} ")) == expected
    assert auth.identify(headers(x_api_key=KEY)) == expected
    assert auth.identify(headers(authorization="Bearer unused", x_api_key=KEY)) == expected
    assert auth.identify(headers(authorization=f"Bearer {OTHER}")) == hash_key(OTHER)[:8]


def test_wrong_or_missing_key_is_refused() -> None:
    """A missing, wrong, empty or non-Bearer key identifies nobody."""
    auth = authenticator(KEY)
    assert auth.identify(Headers()) is None
    assert auth.identify(headers(authorization="Bearer nope")) is None
    assert auth.identify(headers(authorization="Bearer ")) is None
    assert auth.identify(headers(authorization=f"Basic {KEY}")) is None
    assert auth.identify(headers(x_api_key=KEY + "x")) is None
    assert not authenticator().required
    error = unauthorized()
    assert (error.status, error.code) == (401, "invalid_api_key")
    assert KEY not in error.message


def test_comparison_is_constant_time_over_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest is used against every stored digest, even after the first one matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    auth = authenticator(KEY, OTHER, "third", "fourth")
    assert auth.identify(headers(x_api_key=KEY)) == hash_key(KEY)[:8]
    assert len(calls) == 4
    assert all(b == hashlib.sha256(KEY.encode()).digest() for _, b in calls)
    calls.clear()
    assert auth.identify(headers(x_api_key="wrong")) is None
    assert len(calls) == 4


def test_presented_key_is_not_kept() -> None:
    """The authenticator keeps digests and ids only, never the key it was shown."""
    auth = authenticator(KEY)
    auth.identify(headers(authorization=f"Bearer {KEY}"))
    assert KEY.encode() not in repr(vars(auth)).encode()
    assert KEY not in repr(auth.config)


def test_admin_keys_guard_internal_routes() -> None:
    """check_admin needs an admin key when admin keys exist, and an API key is not one."""
    auth = authenticator(KEY, admin=(ADMIN,))
    assert auth.admin_required
    assert auth.check_admin(headers(authorization=f"Bearer {ADMIN}"))
    assert auth.check_admin(headers(x_api_key=ADMIN))
    assert not auth.check_admin(headers(x_api_key=KEY))
    assert not auth.check_admin(Headers())
    assert auth.identify(headers(x_api_key=ADMIN)) is None
    assert authenticator(KEY).check_admin(Headers())
    assert admin_unauthorized().status == 401


def test_parse_auth_all_three_forms(tmp_path: Path) -> None:
    """Digests from the list, a commented file and an environment variable are merged, each once."""
    keyfile = tmp_path / "keys"
    keyfile.write_text(
        f"# API keys for olladmr\n\n{hash_key('b')}   # team b\n  {hash_key('c').upper()}\n{hash_key('a')}\n"
    )
    environ = {"OLLA_KEYS": f" {hash_key('d')}, ,{hash_key('a')}", "OLLA_ADMIN": hash_key("root")}
    config = parse_auth(
        section(
            {
                "api_keys": [hash_key("a")],
                "api_keys_file": str(keyfile),
                "api_keys_env": "OLLA_KEYS",
                "admin_keys_env": "OLLA_ADMIN",
                "requests_per_minute": 30,
            },
            "server.auth",
        ),
        environ,
    )
    assert config.api_key_digests == tuple(bytes.fromhex(hash_key(k)) for k in "abcd")
    assert config.admin_key_digests == (bytes.fromhex(hash_key("root")),)
    assert config.per_key_requests_per_minute == 30
    auth = Authenticator(config)
    assert auth.identify(headers(x_api_key="c")) == hash_key("c")[:8]
    assert auth.check_admin(headers(x_api_key="root"))
    assert parse_auth(section({}, "server.auth"), {}) == AuthConfig()


def test_parse_auth_admin_file(tmp_path: Path) -> None:
    """admin_keys_file is read like api_keys_file."""
    keyfile = tmp_path / "admin"
    keyfile.write_text(hash_key("root") + "\n")
    config = parse_auth(section({"admin_keys_file": str(keyfile)}, "server.auth"), {})
    assert config.admin_key_digests == (bytes.fromhex(hash_key("root")),)
    assert not Authenticator(config).required


@pytest.mark.parametrize(
    "data, environ, message",
    [
        (
            {"api_keys": [hash_key("a"), "sk-live-secret"]},
            {},
            "c.yaml: server.auth.api_keys[1]: expected a SHA-256 hex digest (64 hex characters), got 14 characters",
        ),
        ({"api_keys": ["z" * 64]}, {}, "server.auth.api_keys[0]: expected a SHA-256 hex digest (64 hex characters), got 64"),
        ({"admin_keys": [12]}, {}, "server.auth.admin_keys[0]: expected a SHA-256 hex digest as a quoted string, got int"),
        ({"api_keys_env": "MISSING"}, {}, "server.auth.api_keys_env: environment variable MISSING is not set"),
        ({"api_keys_env": "EMPTY"}, {"EMPTY": " , "}, "server.auth.api_keys_env: environment variable EMPTY holds no"),
        ({"admin_keys_env": "BAD"}, {"BAD": f"{hash_key('x')},sk-secret"}, "server.auth.admin_keys_env: $BAD entry 2:"),
        ({"api_keys_env": "not a name"}, {}, 'server.auth.api_keys_env: expected an environment variable name'),
        ({"api_keys_file": "/nonexistent/olladmr-keys"}, {}, 'server.auth.api_keys_file: cannot read "/nonexistent/olladmr-keys"'),
        ({"requests_per_minute": 10}, {}, "server.auth.requests_per_minute: is a per-API-key limit but no api_keys"),
        ({"api_key": [hash_key("a")]}, {}, "server.auth.api_key: unknown key"),
    ],
)
def test_parse_auth_rejects_bad_digests(data: dict[str, Any], environ: dict[str, str], message: str) -> None:
    """Bad digests and unusable sources are one-line errors that never echo the value."""
    with pytest.raises(ConfigError) as caught:
        parse_auth(section(data, "server.auth"), environ)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    assert "secret" not in text


def test_parse_auth_file_errors_name_file_and_line(tmp_path: Path) -> None:
    """A bad line in a key file is reported with the file name and line number; an empty file is refused."""
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# comment\n{hash_key('a')}\nsk-oops-a-raw-key\n")
    with pytest.raises(ConfigError) as caught:
        parse_auth(section({"api_keys_file": str(keyfile)}, "server.auth"), {})
    assert f"c.yaml: server.auth.api_keys_file: {keyfile} line 3: expected a SHA-256 hex digest" in str(caught.value)
    assert "oops" not in str(caught.value)
    keyfile.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match="holds no key digests"):
        parse_auth(section({"api_keys_file": str(keyfile)}, "server.auth"), {})


# --------------------------------------------------------------------------
# CORS

APP = "https://app.example.com"


def cors(**values: Any) -> Cors:
    return Cors(CorsConfig(enabled=True, **values))


def preflight_headers(origin: str = APP, method: str = "POST", requested: str | None = None) -> Headers:
    h = Headers({b"origin": [origin.encode()], b"access-control-request-method": [method.encode()]})
    if requested is not None:
        h.setRawHeaders(b"access-control-request-headers", [requested.encode()])
    return h


def test_cors_off_by_default() -> None:
    """Disabled CORS answers no preflight and adds no header."""
    off = Cors(CorsConfig())
    assert off.preflight(preflight_headers()) is None
    assert off.response_headers(preflight_headers()) == {}
    assert parse_cors(section({}, "server.cors")) == CorsConfig()


def test_preflight_from_allowed_origin() -> None:
    """An allowed origin's preflight gets 204 with its origin echoed, methods, headers, max age and Vary."""
    status, h = cors(allowed_origins=(APP,), max_age=300).preflight(preflight_headers())
    assert status == 204
    assert h == {
        b"access-control-allow-origin": APP.encode(),
        b"access-control-allow-methods": b"GET, POST, OPTIONS",
        b"access-control-allow-headers": b"Authorization, Content-Type, X-API-Key, X-Request-ID",
        b"access-control-max-age": b"300",
        b"vary": b"Origin",
    }


def test_preflight_wildcard_and_credentials() -> None:
    """A "*" origin list echoes any origin; credentials add Allow-Credentials; "*" headers echo the request."""
    status, h = cors(allowed_origins=("*",), allowed_headers=("*",)).preflight(
        preflight_headers("http://localhost:3000", requested="content-type, x-custom")
    )
    assert status == 204
    assert h[b"access-control-allow-origin"] == b"http://localhost:3000"
    assert h[b"access-control-allow-headers"] == b"content-type, x-custom"
    _, h = cors(allowed_origins=(APP,), allow_credentials=True).preflight(preflight_headers())
    assert h[b"access-control-allow-credentials"] == b"true"


def test_preflight_from_disallowed_origin_is_403_json() -> None:
    """A preflight from an origin not listed is refused with 403 and a JSON error."""
    c = cors(allowed_origins=(APP,))
    request = preflight_headers("https://evil.example")
    assert c.preflight(request) == (403, {b"vary": b"Origin"})
    error = c.denied(request)
    assert error.status == 403
    assert json.loads(error.body())["error"]["code"] == "cors_origin_not_allowed"
    assert c.preflight(preflight_headers(APP + ".evil.example")) == (403, {b"vary": b"Origin"})


def test_options_without_preflight_headers_is_not_a_preflight() -> None:
    """OPTIONS without Origin or Access-Control-Request-Method is left to the routes."""
    c = cors(allowed_origins=(APP,))
    assert c.preflight(Headers({b"origin": [APP.encode()]})) is None
    assert c.preflight(Headers({b"access-control-request-method": [b"POST"]})) is None


def test_simple_request_headers() -> None:
    """An allowed origin gets Allow-Origin, Expose-Headers and Vary; others only Vary."""
    c = cors(allowed_origins=(APP,))
    h = c.response_headers(Headers({b"origin": [APP.encode()]}))
    assert h[b"access-control-allow-origin"] == APP.encode()
    assert h[b"access-control-expose-headers"] == ", ".join(DEFAULT_EXPOSED_HEADERS).encode()
    assert b"X-Olla-Request-ID" in h[b"access-control-expose-headers"]
    assert h[b"vary"] == b"Origin"
    assert b"access-control-allow-credentials" not in h
    assert c.response_headers(Headers({b"origin": [b"https://evil.example"]})) == {b"vary": b"Origin"}
    assert c.response_headers(Headers()) == {b"vary": b"Origin"}


def test_cors_headers_merge_vary() -> None:
    """CORS headers set after an upstream's keep its Vary and add Origin to it once."""
    c = cors(allowed_origins=(APP,))
    out = Headers({b"vary": [b"Accept-Encoding"]})
    add_response_headers(out, c.response_headers(Headers({b"origin": [APP.encode()]})))
    assert out.getRawHeaders(b"vary") == [b"Accept-Encoding, Origin"]
    assert merge_vary([b"origin"], b"Origin") == b"origin"
    assert merge_vary(None, b"Origin") == b"Origin"


def test_parse_cors_reads_settings() -> None:
    """parse_cors reads every key, normalises origins and accepts max_age as seconds or a duration."""
    config = parse_cors(
        section(
            {
                "enabled": True,
                "allowed_origins": ["https://App.Example.com", "http://localhost:3000"],
                "allowed_methods": ["get", "post"],
                "allowed_headers": ["Content-Type"],
                "exposed_headers": ["X-Olla-Model"],
                "allow_credentials": True,
                "max_age": "10m",
            },
            "server.cors",
        )
    )
    assert config.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert config.allowed_methods == ("GET", "POST")
    assert (config.allow_credentials, config.max_age, config.exposed_headers) == (True, 600, ("X-Olla-Model",))
    assert Cors(config).allows(b"https://app.example.com")
    assert parse_cors(section({"max_age": 86400}, "server.cors")).max_age == 86400


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"allowed_origins": ["*"], "allow_credentials": True},
            'c.yaml: server.cors.allow_credentials: cannot be true while allowed_origins contains "*"',
        ),
        ({"enabled": True}, "server.cors.allowed_origins: is empty but enabled is true"),
        ({"allowed_origins": ["https://app.example.com/"]}, "server.cors.allowed_origins[0]: an origin has no path"),
        ({"allowed_origins": ["app.example.com"]}, 'server.cors.allowed_origins[0]: expected an origin such as'),
        ({"allowed_methods": ["GET POST"]}, 'server.cors.allowed_methods[0]: expected an HTTP method, got "GET POST"'),
        ({"max_age": "soon"}, 'server.cors.max_age: expected a number of seconds or a duration such as "10m", got "soon"'),
        ({"allowed_origin": ["*"]}, "server.cors.allowed_origin: unknown key"),
    ],
)
def test_parse_cors_errors(data: dict[str, Any], message: str) -> None:
    """Bad CORS settings, credentials with "*" among them, are one-line errors naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_cors(section(data, "server.cors"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
