"""
Request rate limits and per-client concurrency caps (``server.rate_limits``).

Olla's keys are accepted as they are: ``global_requests_per_minute``,
``per_ip_requests_per_minute``, ``health_requests_per_minute``,
``burst_size``, ``cleanup_interval``, ``trust_proxy_headers`` and
``trusted_proxy_cidrs``; olladmr adds ``max_concurrent_per_client``.  Per-API
key limits come from ``server.auth.requests_per_minute`` and are passed in
through :attr:`RateLimitConfig.per_key_requests_per_minute`.

Every limit is a token bucket: it holds at most ``burst_size`` tokens (one
minute's worth when ``burst_size`` is 0), refills at ``N / 60`` tokens a
second, and a request takes one token from each bucket that applies to it
(global, its client address, its API key) -- or from none of them, when any
one of them is empty.  A limit of 0 disables that bucket.  Unlike Olla,
olladmr ships with every limit at 0 (rate limiting off); :data:`~olladmr.config.schema.OLLA_RATE_LIMITS`
holds Olla's numbers.

Time comes from an injected :class:`~twisted.internet.interfaces.IReactorTime`,
so tests drive it with :class:`twisted.internet.task.Clock`.  The per-client
tables are bounded (least recently used clients are evicted first) and a
periodic :meth:`RateLimiter.sweep` drops buckets that have been idle long
enough to refill completely: forgetting such a bucket changes nothing, since
a new one starts full.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from ..config.schema import RateLimitConfig
from ..errors import ClientError

#: Upper bound on the clients (addresses, API keys) tracked per table.
DEFAULT_MAX_CLIENTS = 100_000


# --------------------------------------------------------------------------
# Buckets


class TokenBucket:
    """
    A token bucket that refills lazily: ``tokens`` is exact as of ``stamp``.

    ``per_minute`` tokens are added per minute, up to ``capacity``; a new
    bucket starts full.
    """

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, per_minute: int, capacity: int, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> float:
        """Bring ``tokens`` up to date at ``now`` and return it (a clock going backwards adds nothing)."""
        elapsed = now - self.stamp
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.capacity else self.capacity
        self.stamp = now
        return self.tokens

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        if self.refill(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds from ``stamp`` until one whole token is available."""
        missing = 1.0 - self.tokens
        return missing / self.rate if missing > 0 else 0.0

    def full_in(self) -> float:
        """Seconds from ``stamp`` until the bucket is full again."""
        missing = self.capacity - self.tokens
        return missing / self.rate if missing > 0 else 0.0

    def full_at(self, now: float) -> bool:
        """Whether the bucket has refilled completely by ``now`` (so forgetting it changes nothing)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.capacity

    def reshape(self, per_minute: int, capacity: int) -> None:
        """Adopt a new rate and capacity, keeping the tokens (capped to the new capacity)."""
        self.rate = per_minute / 60.0
        self.capacity = float(capacity)
        if self.tokens > self.capacity:
            self.tokens = self.capacity


class _BucketTable:
    """Buckets per client id, least recently used first, at most ``limit`` of them."""

    __slots__ = ("per_minute", "capacity", "limit", "buckets")

    def __init__(self, per_minute: int, capacity: int, limit: int) -> None:
        self.per_minute = per_minute
        self.capacity = capacity
        self.limit = limit
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def bucket(self, ident: str, now: float) -> TokenBucket:
        """The bucket for ``ident`` (created full, evicting the least recently used one if the table is full)."""
        buckets = self.buckets
        found = buckets.get(ident)
        if found is not None:
            buckets.move_to_end(ident)
            return found
        while len(buckets) >= self.limit:
            buckets.popitem(last=False)
        found = buckets[ident] = TokenBucket(self.per_minute, self.capacity, now)
        return found

    def reshape(self, per_minute: int, capacity: int, now: float) -> None:
        """Apply a new rate and capacity to every bucket (tokens earned so far count at the old rate)."""
        if (per_minute, capacity) == (self.per_minute, self.capacity):
            return
        self.per_minute, self.capacity = per_minute, capacity
        for bucket in self.buckets.values():
            bucket.refill(now)
            bucket.reshape(per_minute, capacity)

    def sweep(self, now: float) -> int:
        """Drop every bucket that is full again by ``now``; return how many were dropped."""
        idle = [ident for ident, bucket in self.buckets.items() if bucket.full_at(now)]
        for ident in idle:
            del self.buckets[ident]
        return len(idle)


# --------------------------------------------------------------------------
# Decisions


class Decision(NamedTuple):
    """
    The outcome of one :meth:`RateLimiter.check`.

    ``limit`` is the binding bucket's requests per minute (0: nothing was
    limited), ``remaining`` its whole tokens left, ``reset`` the unix time
    at which it is full again and ``retry_after`` the whole seconds to wait
    before a retry can succeed (0 when allowed).  ``scope`` names the
    binding bucket: ``global``, ``ip``, ``key`` or ``health``.  (A named
    tuple: immutable and cheap to build on every request.)
    """

    allowed: bool
    limit: int = 0
    remaining: int = 0
    reset: int = 0
    retry_after: int = 0
    scope: str = ""

    def headers(self) -> dict[bytes, bytes]:
        """``X-RateLimit-Limit/-Remaining/-Reset`` (and ``Retry-After`` when refused); none when unlimited."""
        if self.limit <= 0:
            return {}
        out = {
            b"x-ratelimit-limit": b"%d" % self.limit,
            b"x-ratelimit-remaining": b"%d" % self.remaining,
            b"x-ratelimit-reset": b"%d" % self.reset,
        }
        if not self.allowed:
            out[b"retry-after"] = b"%d" % self.retry_after
        return out


#: The decision when no limit applies.
UNLIMITED = Decision(allowed=True)

_SCOPE_TEXT = {
    "global": "the server-wide limit",
    "ip": "the per-client limit",
    "key": "the per-API-key limit",
    "health": "the health-check limit",
}


def rate_limited(decision: Decision) -> ClientError:
    """The 429 answer for a refused ``decision``, carrying its headers (``Retry-After`` included)."""
    what = _SCOPE_TEXT.get(decision.scope, "the rate limit")
    return ClientError(
        429,
        f"rate limit exceeded: {what} is {decision.limit} requests per minute; retry after {decision.retry_after}s",
        "rate_limit_error",
        "rate_limit_exceeded",
        decision.headers(),
    )


def too_many_concurrent(limit: int) -> ClientError:
    """The 429 answer when a client already has ``limit`` requests in flight."""
    return ClientError(
        429,
        f"too many concurrent requests: at most {limit} per client (server.rate_limits.max_concurrent_per_client)",
        "rate_limit_error",
        "too_many_concurrent_requests",
        {b"retry-after": b"1"},
    )


# --------------------------------------------------------------------------
# The limiter


class RateLimiter:
    """
    Global, per-client, per-key and health-check token buckets plus a
    per-client cap on concurrent requests.

    One instance lives for the whole process; :meth:`reconfigure` adopts a
    reloaded configuration without forgetting anyone's bucket.
    """

    def __init__(self, config: RateLimitConfig, clock: IReactorTime, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self._clock = clock
        self._max_clients = max(1, max_clients)
        self._config = RateLimitConfig()
        self._global: TokenBucket | None = None
        self._ip: _BucketTable | None = None
        self._key: _BucketTable | None = None
        self._health: _BucketTable | None = None
        self._active: dict[str, int] = {}
        self._sweeper: LoopingCall | None = None
        self.reconfigure(config)

    @property
    def config(self) -> RateLimitConfig:
        """The configuration in force."""
        return self._config

    # -- configuration

    def reconfigure(self, config: RateLimitConfig) -> None:
        """Adopt ``config``: existing buckets keep their tokens; disabled scopes are forgotten."""
        now = self._clock.seconds()
        self._config = config
        rpm = config.global_requests_per_minute
        if rpm <= 0:
            self._global = None
        elif self._global is None:
            self._global = TokenBucket(rpm, config.capacity(rpm), now)
        else:
            self._global.refill(now)
            self._global.reshape(rpm, config.capacity(rpm))
        self._ip = self._table(self._ip, config.per_ip_requests_per_minute, now)
        self._key = self._table(self._key, config.per_key_requests_per_minute, now)
        self._health = self._table(self._health, config.health_requests_per_minute, now)
        if self._sweeper is not None and self._sweeper.running and self._sweeper.interval != config.cleanup_interval:
            self.stop()
            self.start()

    def _table(self, table: _BucketTable | None, rpm: int, now: float) -> _BucketTable | None:
        if rpm <= 0:
            return None
        capacity = self._config.capacity(rpm)
        if table is None:
            return _BucketTable(rpm, capacity, self._max_clients)
        table.reshape(rpm, capacity, now)
        return table

    # -- rate limits

    def check(self, client: str, key_id: str | None = None, *, health: bool = False) -> Decision:
        """
        Take one token for a request from ``client`` (authenticated as
        ``key_id``, if any) from every bucket that applies, or from none.

        ``health=True`` checks only the client's health-check bucket
        (``health_requests_per_minute``), as Olla does for its health route.
        """
        now = self._clock.seconds()
        if health:
            table = self._health
            if table is None:
                return UNLIMITED
            return self._single(now, table.bucket(client, now), table.per_minute, "health")
        ip, keys, glob = self._ip, self._key, self._global
        if key_id is None or keys is None:
            if glob is None:  # the common shapes: one bucket or none
                return UNLIMITED if ip is None else self._single(now, ip.bucket(client, now), ip.per_minute, "ip")
            if ip is None:
                return self._single(now, glob, self._config.global_requests_per_minute, "global")
        applied: list[tuple[TokenBucket, int, str]] = []
        if ip is not None:
            applied.append((ip.bucket(client, now), ip.per_minute, "ip"))
        if key_id is not None and keys is not None:
            applied.append((keys.bucket(key_id, now), keys.per_minute, "key"))
        if glob is not None:
            applied.append((glob, self._config.global_requests_per_minute, "global"))
        return self._many(now, applied)

    @staticmethod
    def _single(now: float, bucket: TokenBucket, rpm: int, scope: str) -> Decision:
        """The decision for one bucket (the hot path: no lists, one refill)."""
        if bucket.refill(now) < 1.0:
            return Decision(False, rpm, 0, math.ceil(now + bucket.full_in()), max(1, math.ceil(bucket.wait())), scope)
        tokens = bucket.tokens = bucket.tokens - 1.0
        return Decision(True, rpm, min(rpm, int(tokens)), math.ceil(now + bucket.full_in()), 0, scope)

    @staticmethod
    def _many(now: float, applied: Sequence[tuple[TokenBucket, int, str]]) -> Decision:
        """The decision for several buckets: refused by the one with the longest wait, else all pay."""
        blocked: tuple[TokenBucket, int, str] | None = None
        for entry in applied:
            bucket = entry[0]
            if bucket.refill(now) < 1.0 and (blocked is None or bucket.wait() > blocked[0].wait()):
                blocked = entry
        if blocked is not None:
            bucket, rpm, scope = blocked
            return Decision(False, rpm, 0, math.ceil(now + bucket.full_in()), max(1, math.ceil(bucket.wait())), scope)
        binding = applied[0]
        for entry in applied:
            entry[0].tokens -= 1.0
            if entry[0].tokens < binding[0].tokens:
                binding = entry
        bucket, rpm, scope = binding
        return Decision(True, rpm, min(rpm, int(bucket.tokens)), math.ceil(now + bucket.full_in()), 0, scope)

    # -- concurrency

    def acquire_concurrent(self, client: str) -> bool:
        """Count one more request in flight for ``client``, unless it is at ``max_concurrent_per_client``."""
        active = self._active.get(client, 0)
        cap = self._config.max_concurrent_per_client
        if cap > 0 and active >= cap:
            return False
        self._active[client] = active + 1
        return True

    def release_concurrent(self, client: str) -> None:
        """Count one request from ``client`` as finished (call once per successful acquire)."""
        active = self._active.get(client, 0)
        if active <= 1:
            self._active.pop(client, None)
        else:
            self._active[client] = active - 1

    def in_flight(self, client: str) -> int:
        """Requests from ``client`` currently in flight."""
        return self._active.get(client, 0)

    # -- bounded memory

    def tracked(self) -> int:
        """How many per-client buckets are held (addresses, keys and health checks together)."""
        return sum(len(table.buckets) for table in (self._ip, self._key, self._health) if table is not None)

    def sweep(self) -> int:
        """Forget every per-client bucket that has refilled completely; return how many were dropped."""
        now = self._clock.seconds()
        return sum(table.sweep(now) for table in (self._ip, self._key, self._health) if table is not None)

    def start(self) -> None:
        """Sweep every ``cleanup_interval`` seconds (on the injected clock) until :meth:`stop`."""
        if self._sweeper is not None and self._sweeper.running:
            return
        sweeper = LoopingCall(self.sweep)
        sweeper.clock = self._clock
        sweeper.start(self._config.cleanup_interval, now=False)
        self._sweeper = sweeper

    def stop(self) -> None:
        """Stop the periodic sweep."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
