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
olladmr ships with every limit at 0 (rate limiting off); :data:`OLLA_DEFAULTS`
holds Olla's numbers.

Time comes from an injected :class:`~twisted.internet.interfaces.IReactorTime`,
so tests drive it with :class:`twisted.internet.task.Clock`.  The per-client
tables are bounded (least recently used clients are evicted first) and a
periodic :meth:`RateLimiter.sweep` drops buckets that have been idle long
enough to refill completely: forgetting such a bucket changes nothing, since
a new one starts full.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .errors import ClientError
from .errors import show_value as _quote

if TYPE_CHECKING:
    from .config import _Section

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Olla's own default trusted proxies: loopback and the RFC 1918 ranges.
DEFAULT_TRUSTED_PROXY_CIDRS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr) for cidr in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
#: Upper bound on the clients (addresses, API keys) tracked per table.
DEFAULT_MAX_CLIENTS = 100_000


@dataclass(frozen=True)
class RateLimitConfig:
    """``server.rate_limits``: requests per minute per scope (0 disables a scope)."""

    global_requests_per_minute: int = 0
    per_ip_requests_per_minute: int = 0
    health_requests_per_minute: int = 0
    burst_size: int = 0  # bucket capacity; 0: one minute's worth of the bucket's rate
    cleanup_interval: float = 300.0
    trust_proxy_headers: bool = False
    trusted_proxy_cidrs: tuple[IPNetwork, ...] = DEFAULT_TRUSTED_PROXY_CIDRS
    max_concurrent_per_client: int = 0  # 0: no cap
    per_key_requests_per_minute: int = 0  # from server.auth.requests_per_minute

    def capacity(self, per_minute: int) -> int:
        """The size of a bucket that refills at ``per_minute`` requests a minute."""
        return self.burst_size if self.burst_size > 0 else per_minute

    @property
    def enabled(self) -> bool:
        """Whether any rate limit (as opposed to the concurrency cap) is on."""
        return (
            self.global_requests_per_minute > 0
            or self.per_ip_requests_per_minute > 0
            or self.health_requests_per_minute > 0
            or self.per_key_requests_per_minute > 0
        )


#: Olla's defaults, for operators who want Olla's behaviour.
OLLA_DEFAULTS = RateLimitConfig(
    global_requests_per_minute=1000,
    per_ip_requests_per_minute=100,
    health_requests_per_minute=1000,
    burst_size=50,
)


def parse_rate_limits(section: _Section) -> RateLimitConfig:
    """
    Read a ``server.rate_limits`` section into a :class:`RateLimitConfig`.

    Raises :class:`~olladmr.config.ConfigError` naming the key, e.g.
    ``server.rate_limits.trusted_proxy_cidrs[1]: not a valid CIDR ...``.
    """
    global_rpm = section.integer("global_requests_per_minute", 0, minimum=0)
    per_ip_rpm = section.integer("per_ip_requests_per_minute", 0, minimum=0)
    health_rpm = section.integer("health_requests_per_minute", 0, minimum=0)
    burst = section.integer("burst_size", 0, minimum=0)
    cleanup = section.duration("cleanup_interval", 300.0, minimum=1.0)
    trust = section.boolean("trust_proxy_headers", False)
    max_concurrent = section.integer("max_concurrent_per_client", 0, minimum=0)
    cidrs = DEFAULT_TRUSTED_PROXY_CIDRS
    if section.has("trusted_proxy_cidrs"):
        parsed: list[IPNetwork] = []
        for index, item in enumerate(section.sequence("trusted_proxy_cidrs")):
            where = f"trusted_proxy_cidrs[{index}]"
            if not isinstance(item, str):
                raise section.error(where, f'expected a CIDR such as "10.0.0.0/8", got {_quote(item)}')
            try:
                parsed.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise section.error(where, f'not a valid CIDR (such as "10.0.0.0/8"): {_quote(item)}') from None
        cidrs = tuple(parsed)
    if trust and not cidrs:
        raise section.error(
            "trusted_proxy_cidrs",
            "is empty but trust_proxy_headers is true; list the proxies whose X-Forwarded-For may be trusted",
        )
    section.finish()
    return RateLimitConfig(
        global_requests_per_minute=global_rpm,
        per_ip_requests_per_minute=per_ip_rpm,
        health_requests_per_minute=health_rpm,
        burst_size=burst,
        cleanup_interval=cleanup,
        trust_proxy_headers=trust,
        trusted_proxy_cidrs=cidrs,
        max_concurrent_per_client=max_concurrent,
    )


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


def _parse_address(text: str) -> IPAddress | None:
    """An address from ``1.2.3.4``, ``1.2.3.4:5678``, ``::1`` or ``[::1]:80``; IPv4-mapped IPv6 as IPv4."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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

    # -- who is asking

    def _trusted(self, address: IPAddress) -> bool:
        for network in self._config.trusted_proxy_cidrs:
            if address in network:
                return True
        return False

    def client_ip(self, peer_ip: str, xff_header_values: list[bytes] | None) -> str:
        """
        The address to rate-limit: the TCP peer, unless ``trust_proxy_headers``
        is on and the peer is a trusted proxy, in which case the right-most
        address in ``X-Forwarded-For`` that is not a trusted proxy.

        Only the hops appended by trusted proxies are believed, so a client
        cannot choose its address by sending its own ``X-Forwarded-For``.  A
        malformed hop stops the walk at the last trusted proxy; a chain made
        only of trusted proxies gives its left-most address.
        """
        if not xff_header_values or not self._config.trust_proxy_headers:
            return peer_ip
        peer = _parse_address(peer_ip)
        if peer is None or not self._trusted(peer):
            return peer_ip
        client = str(peer)
        for value in reversed(xff_header_values):
            for hop in reversed(value.decode("latin-1").split(",")):
                if not hop.strip():
                    continue
                address = _parse_address(hop)
                if address is None:
                    return client
                client = str(address)
                if not self._trusted(address):
                    return client
        return client

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
