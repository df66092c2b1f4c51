"""
Helpers shared by several unit-test modules (not a test module itself).

Fleet: Hypothesis settings, EndpointState and config builders. Edge: a
config ``Section`` builder, a rate limiter on a ``Clock``, request headers.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from olladmr.config import Config, EndpointConfig, Section, parse_config
from olladmr.config.schema import RateLimitConfig
from olladmr.edge.ratelimit import RateLimiter
from olladmr.fleet.state import EndpointState

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Hypothesis settings of the fleet property tests (balancers, model names)."""

EPOCH = 1_700_000_000.0
"""Where ``make_limiter`` starts its clock, so reset times are realistic epoch seconds."""


def make_endpoint(
    name: str, priority: int = 100, in_flight: int = 0, clock: Clock | None = None, **config: Any
) -> EndpointState:
    """An ``EndpointState`` named ``name`` (URL ``http://<name>.test:12434``) on its own or the given clock."""
    ep = EndpointState(
        EndpointConfig(name=name, url=f"http://{name}.test:12434", priority=priority, **config),
        clock or Clock(),
        breaker_failures=3,
        breaker_cooldown=10.0,
    )
    ep.in_flight = in_flight
    return ep


def names(endpoints: list[EndpointState]) -> list[str]:
    """The names of ``endpoints``, in order."""
    return [ep.name for ep in endpoints]


def fleet_config(*endpoints: dict[str, object], **proxy: object) -> Config:
    """A parsed ``Config`` with the given endpoint mappings and ``proxy`` settings."""
    return parse_config({"proxy": dict(proxy), "endpoints": list(endpoints)}, "test")


def ep_conf(name: str, interval: str = "10s", timeout: str | None = None, **more: object) -> dict[str, object]:
    """An endpoint mapping as the config file would hold it, checked every ``interval``."""
    conf: dict[str, object] = {"name": name, "url": f"http://{name}.test:12434", "check_interval": interval}
    if timeout is not None:
        conf["check_timeout"] = timeout
    conf.update(more)
    return conf


def section(data: dict[str, Any], path: str) -> Section:
    """A config section as parse_config would hand it over."""
    return Section(data, path, "c.yaml", [])


def make_limiter(**values: Any) -> tuple[RateLimiter, Clock]:
    """A ``RateLimiter`` with the given ``RateLimitConfig`` values, on a ``Clock`` set to ``EPOCH``."""
    clock = Clock()
    clock.advance(EPOCH)
    return RateLimiter(RateLimitConfig(**values), clock), clock


def headers(**values: str) -> Headers:
    """Request headers from keyword arguments; underscores become dashes (``x_api_key`` is ``x-api-key``)."""
    return Headers({name.replace("_", "-").encode(): [value.encode()] for name, value in values.items()})
