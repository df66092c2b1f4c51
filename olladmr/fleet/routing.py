"""
Model-aware routing: which endpoints may serve a request for a model.

The answer is a :class:`RoutingDecision` (candidates plus the strategy,
decision and reason reported in ``X-Olla-Routing-*`` headers) or a
:class:`ClientError` (404 ``model_not_found``, 503 ``model_unavailable`` /
``no_endpoints_available``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ClientError, not_found, unavailable
from .aliases import Alias
from .models import normalise_model
from .state import EndpointState, Fleet

STRATEGY = "model-aware"


@dataclass
class RoutingDecision:
    """The endpoints a request may go to, and why."""

    candidates: list[EndpointState]
    decision: str
    reason: str
    strategy: str = STRATEGY
    names: dict[str, str] = field(default_factory=dict)  # for an alias: endpoint -> the real model id it lists

    def headers(self) -> dict[bytes, bytes]:
        return {
            b"x-olla-routing-strategy": self.strategy.encode(),
            b"x-olla-routing-decision": self.decision.encode(),
            b"x-olla-routing-reason": self.reason.encode(),
        }


def _retry_after(endpoints: list[EndpointState]) -> int:
    """A sensible Retry-After: the soonest breaker trial or health re-check."""
    waits = [ep.breaker.retry_after() for ep in endpoints if ep.breaker.state != "closed"]
    waits += [ep.config.check_interval for ep in endpoints if ep.breaker.state == "closed"]
    return max(1, math.ceil(min(waits))) if waits else 5


def _rejected(error: ClientError, reason: str) -> ClientError:
    error.headers.update(RoutingDecision([], "rejected", reason).headers())
    return error


def _describe(ep: EndpointState) -> str:
    if ep.breaker.state == "open":
        return f"{ep.name} circuit open"
    return f"{ep.name} {ep.status} ({ep.status_reason})"


def route(fleet: Fleet, model: str | None, model_key: str | None, alias: Alias | None = None) -> RoutingDecision:
    """Choose candidates for ``model`` (``None`` for model-less requests), resolving an alias first."""
    if alias is not None:
        decision = _route_alias(fleet, alias)
        if decision is not None:
            return decision
    everyone = list(fleet)
    routable = [ep for ep in everyone if ep.routable]
    if model_key is not None:
        holders = [ep for ep in everyone if ep.has_model(model_key)]
        with_model = [ep for ep in holders if ep.routable]
        if with_model:
            return RoutingDecision(with_model, "routed", "model_found")
        lazy = [ep for ep in routable if not ep.models_known or not ep.models]
        if lazy:
            return RoutingDecision(lazy, "fallback", "model_not_listed_lazy_endpoint")
        if holders:
            raise _rejected(
                unavailable(
                    f"model {model!r} is only on endpoints that are not available now: "
                    + ", ".join(_describe(ep) for ep in holders),
                    "model_unavailable",
                    _retry_after(holders),
                ),
                "model_unavailable",
            )
        if routable:
            available = sorted({str(m["id"]) for ep in routable for m in ep.models})
            raise _rejected(
                not_found(
                    f"model {model!r} was not found on any endpoint; available models: "
                    + (", ".join(available) if available else "none"),
                    "model_not_found",
                ),
                "model_not_found",
            )
    if routable:
        return RoutingDecision(routable, "routed", "no_model" if model_key is None else "model_found")
    detail = "; ".join(_describe(ep) for ep in everyone) or "no endpoints are configured"
    raise _rejected(
        unavailable(f"no DMR endpoint is available: {detail}", "no_endpoints_available", _retry_after(everyone)),
        "no_endpoints_available",
    )


def _route_alias(fleet: Fleet, alias: Alias) -> RoutingDecision | None:
    """Every routable endpoint that lists one of the alias's models, with the name it lists (first in alias order)."""
    candidates: list[EndpointState] = []
    holders: list[EndpointState] = []
    names: dict[str, str] = {}
    for ep in fleet:
        for key in alias.keys:
            listed = ep.listed_name(key)
            if listed is not None:
                holders.append(ep)
                if ep.routable:
                    candidates.append(ep)
                    names[ep.name] = listed
                break
    if candidates:
        return RoutingDecision(candidates, "routed", "alias", names=names)
    if holders and not any(ep.routable and ep.has_model(normalise_model(alias.name)) for ep in fleet):
        raise _rejected(
            unavailable(
                f"model {alias.name!r} (an alias of {', '.join(alias.targets)}) is only on endpoints that are not "
                "available now: " + ", ".join(_describe(ep) for ep in holders),
                "model_unavailable",
                _retry_after(holders),
            ),
            "model_unavailable",
        )
    return None  # route the alias's own name (an endpoint may list a model of that name), or fail as usual
