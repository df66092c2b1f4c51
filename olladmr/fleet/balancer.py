"""
Load balancing: which candidate endpoint gets the next attempt.

All three strategies read the proxy's own live in-flight counts.  Their
state (rotation cursors) lives in the balancer object, not in the endpoint
list, so model-list refreshes and reloads do not reset it.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .state import EndpointState


class Balancer(Protocol):
    """Chooses one endpoint out of a non-empty candidate list."""

    name: str

    def pick(self, candidates: Sequence[EndpointState]) -> EndpointState: ...


class _Rotation:
    """Breaks ties by rotating over them (by name, so the order is stable)."""

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, ties: Sequence[EndpointState]) -> EndpointState:
        if len(ties) == 1:
            chosen = ties[0]
        else:
            ordered = sorted(ties, key=lambda ep: ep.name)
            chosen = ordered[0]
            if self._last is not None:
                for ep in ordered:
                    if ep.name > self._last:
                        chosen = ep
                        break
        self._last = chosen.name
        return chosen


class PriorityBalancer:
    """Highest priority tier only; inside it the fewest in flight, ties rotated."""

    name = "priority"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[EndpointState]) -> EndpointState:
        top = max(ep.config.priority for ep in candidates)
        tier = [ep for ep in candidates if ep.config.priority == top]
        least = min(ep.in_flight for ep in tier)
        return self._rotation.choose([ep for ep in tier if ep.in_flight == least])


class RoundRobinBalancer:
    """A strict rotation over the candidates, in name order."""

    name = "round-robin"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[EndpointState]) -> EndpointState:
        return self._rotation.choose(candidates)


class LeastConnectionsBalancer:
    """Fewest in flight over all candidates; priority, then rotation, break ties."""

    name = "least-connections"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def pick(self, candidates: Sequence[EndpointState]) -> EndpointState:
        least = min(ep.in_flight for ep in candidates)
        fewest = [ep for ep in candidates if ep.in_flight == least]
        top = max(ep.config.priority for ep in fewest)
        return self._rotation.choose([ep for ep in fewest if ep.config.priority == top])


BALANCERS: dict[str, type[PriorityBalancer] | type[RoundRobinBalancer] | type[LeastConnectionsBalancer]] = {
    "priority": PriorityBalancer,
    "round-robin": RoundRobinBalancer,
    "least-connections": LeastConnectionsBalancer,
}


def make_balancer(name: str) -> Balancer:
    return BALANCERS[name]()
