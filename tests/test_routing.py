"""Unit tests for ``olladmr.fleet.routing``: model-aware choice of candidate endpoints."""

from __future__ import annotations

import json
from typing import Any

import pytest
from support import ep_conf, fleet_config, names
from twisted.internet.task import Clock

from olladmr.errors import ClientError
from olladmr.fleet.models import normalise_model
from olladmr.fleet.routing import route
from olladmr.fleet.state import BUSY, HEALTHY, OFFLINE, UNHEALTHY, UNKNOWN, EndpointState, Fleet


def routing_fleet(*endpoints: dict[str, object]) -> tuple[Fleet, Clock]:
    clock = Clock()
    specs = endpoints or (ep_conf("a"), ep_conf("b"), ep_conf("c"))
    return Fleet(fleet_config(*specs, breaker_failures=2, breaker_cooldown="20s"), clock), clock


def set_state(fleet: Fleet, name: str, status: str, models: list[str] | None) -> EndpointState:
    ep = fleet.get(name)
    assert ep is not None
    ep.status = status
    ep.status_reason = "test"
    if models is not None:
        ep.set_models([{"id": m, "object": "model"} for m in models])
    return ep


def route_model(fleet: Fleet, model: str | None) -> Any:
    return route(fleet, model, None if model is None else normalise_model(model))


def test_route_model_found_candidates_are_exactly_the_holders() -> None:
    """A listed model goes only to the routable endpoints that list it (under any alias)."""
    fleet, _ = routing_fleet()
    set_state(fleet, "a", HEALTHY, ["ai/smollm2:latest"])
    set_state(fleet, "b", HEALTHY, ["ai/gemma3"])
    set_state(fleet, "c", BUSY, ["docker.io/ai/smollm2:latest", "ai/gemma3"])
    decision = route_model(fleet, "SmolLM2")
    assert names(decision.candidates) == ["a", "c"]
    assert (decision.strategy, decision.decision, decision.reason) == ("model-aware", "routed", "model_found")
    assert decision.headers() == {
        b"x-olla-routing-strategy": b"model-aware",
        b"x-olla-routing-decision": b"routed",
        b"x-olla-routing-reason": b"model_found",
    }


def test_route_skips_holders_that_are_not_routable() -> None:
    """Holders that are offline or whose breaker is open are left out while another holder is routable."""
    fleet, _ = routing_fleet()
    set_state(fleet, "a", OFFLINE, ["ai/smollm2"])
    b = set_state(fleet, "b", HEALTHY, ["ai/smollm2"])
    set_state(fleet, "c", HEALTHY, ["ai/smollm2"])
    b.breaker.on_failure()
    b.breaker.on_failure()
    assert names(route_model(fleet, "ai/smollm2").candidates) == ["c"]


@pytest.mark.parametrize("unknown_list", [True, False])
def test_route_unlisted_model_falls_back_to_lazy_endpoints(unknown_list: bool) -> None:
    """An unlisted model goes to the routable endpoints whose list is empty or not yet known."""
    fleet, _ = routing_fleet()
    set_state(fleet, "a", HEALTHY, ["ai/smollm2"])
    set_state(fleet, "b", HEALTHY, None if unknown_list else [])
    set_state(fleet, "c", OFFLINE, [])
    decision = route_model(fleet, "ai/qwen3")
    assert names(decision.candidates) == ["b"]
    assert (decision.decision, decision.reason) == ("fallback", "model_not_listed_lazy_endpoint")
    assert decision.headers()[b"x-olla-routing-decision"] == b"fallback"


def test_route_unknown_model_is_404_naming_available_models() -> None:
    """When every routable list is known and none has the model: 404 model_not_found listing what exists."""
    fleet, _ = routing_fleet()
    set_state(fleet, "a", HEALTHY, ["ai/smollm2:latest"])
    set_state(fleet, "b", BUSY, ["ai/gemma3:latest", "ai/smollm2:latest"])
    set_state(fleet, "c", OFFLINE, ["ai/secret:latest"])
    with pytest.raises(ClientError) as caught:
        route_model(fleet, "ai/qwen3")
    err = caught.value
    assert (err.status, err.code) == (404, "model_not_found")
    assert "'ai/qwen3'" in err.message
    assert "ai/gemma3:latest, ai/smollm2:latest" in err.message
    assert "secret" not in err.message
    assert err.headers[b"x-olla-routing-decision"] == b"rejected"
    assert err.headers[b"x-olla-routing-reason"] == b"model_not_found"
    assert err.headers[b"x-olla-routing-strategy"] == b"model-aware"
    body = json.loads(err.body())
    assert body["error"]["code"] == "model_not_found"


def test_route_model_only_on_offline_endpoints_is_503_with_retry_after() -> None:
    """A model held only by endpoints that are down gets 503 model_unavailable, Retry-After from their interval."""
    fleet, _ = routing_fleet(ep_conf("a", "7s"), ep_conf("b", "30s"), ep_conf("c"))
    set_state(fleet, "a", OFFLINE, ["ai/smollm2"])
    set_state(fleet, "b", UNHEALTHY, ["ai/smollm2"])
    set_state(fleet, "c", HEALTHY, ["ai/gemma3"])
    with pytest.raises(ClientError) as caught:
        route_model(fleet, "smollm2")
    err = caught.value
    assert (err.status, err.code) == (503, "model_unavailable")
    assert err.headers[b"retry-after"] == b"7"
    assert err.headers[b"x-olla-routing-reason"] == b"model_unavailable"
    assert "a offline" in err.message and "b unhealthy" in err.message


def test_route_model_behind_open_breaker_retry_after_is_the_remaining_cooldown() -> None:
    """When the only holder's breaker is open, Retry-After is the rest of its cooldown, rounded up."""
    fleet, clock = routing_fleet()
    a = set_state(fleet, "a", HEALTHY, ["ai/smollm2"])
    set_state(fleet, "b", HEALTHY, ["ai/gemma3"])
    set_state(fleet, "c", HEALTHY, ["ai/gemma3"])
    a.breaker.on_failure()
    a.breaker.on_failure()
    clock.advance(12.5)
    with pytest.raises(ClientError) as caught:
        route_model(fleet, "ai/smollm2")
    assert caught.value.code == "model_unavailable"
    assert caught.value.headers[b"retry-after"] == b"8"
    assert "a circuit open" in caught.value.message


@pytest.mark.parametrize("model", [None, "ai/smollm2"])
def test_route_nothing_routable_is_503_no_endpoints_available(model: str | None) -> None:
    """With no routable endpoint at all, any request gets 503 no_endpoints_available with Retry-After."""
    fleet, _ = routing_fleet(ep_conf("a", "4s"), ep_conf("b", "9s"))
    set_state(fleet, "a", OFFLINE, None)
    set_state(fleet, "b", UNKNOWN, None)
    with pytest.raises(ClientError) as caught:
        route_model(fleet, model)
    err = caught.value
    assert (err.status, err.code) == (503, "no_endpoints_available")
    assert err.headers[b"retry-after"] == b"4"
    assert err.headers[b"x-olla-routing-decision"] == b"rejected"
    assert err.headers[b"x-olla-routing-reason"] == b"no_endpoints_available"
    assert "a offline" in err.message and "b unknown" in err.message


def test_route_without_model_uses_every_routable_endpoint() -> None:
    """A model-less request may go to any routable endpoint."""
    fleet, _ = routing_fleet()
    set_state(fleet, "a", HEALTHY, ["ai/smollm2"])
    set_state(fleet, "b", OFFLINE, [])
    set_state(fleet, "c", BUSY, [])
    decision = route_model(fleet, None)
    assert names(decision.candidates) == ["a", "c"]
    assert (decision.decision, decision.reason) == ("routed", "no_model")
