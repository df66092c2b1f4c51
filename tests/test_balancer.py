"""Unit tests for ``olladmr.fleet.balancer``: priority, round-robin and least-connections."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from support import FAST, make_endpoint

from olladmr.fleet.balancer import LeastConnectionsBalancer, PriorityBalancer, RoundRobinBalancer
from olladmr.fleet.state import EndpointState


def test_priority_picks_only_the_top_tier() -> None:
    """The priority balancer never leaves the highest-priority tier, however busy it is."""
    low_a = make_endpoint("a", priority=50)
    low_b = make_endpoint("b", priority=50)
    top = make_endpoint("z", priority=90, in_flight=7)
    balancer = PriorityBalancer()
    assert [balancer.pick([low_a, top, low_b]).name for _ in range(4)] == ["z"] * 4


def test_priority_prefers_fewest_in_flight_within_the_tier() -> None:
    """Inside the top tier the endpoint with the fewest requests in flight wins."""
    eps = [make_endpoint("a", in_flight=2), make_endpoint("b", in_flight=0), make_endpoint("c", in_flight=1)]
    assert PriorityBalancer().pick(eps).name == "b"


def test_priority_rotates_over_ties() -> None:
    """Equally loaded endpoints of the top tier take turns, in name order."""
    eps = [make_endpoint("c"), make_endpoint("a"), make_endpoint("b"), make_endpoint("x", priority=10)]
    balancer = PriorityBalancer()
    assert [balancer.pick(eps).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


endpoint_specs = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=4)),
    min_size=1,
    max_size=8,
)


def build(specs: list[tuple[int, int]]) -> list[EndpointState]:
    return [make_endpoint(f"ep{i:02d}", priority=p, in_flight=n) for i, (p, n) in enumerate(specs)]


@FAST
@given(specs=endpoint_specs, warmup=st.integers(min_value=0, max_value=5), data=st.data())
def test_priority_never_picks_a_lower_tier(specs: list[tuple[int, int]], warmup: int, data: Any) -> None:
    """Priority never picks a lower tier while a higher-priority candidate is present, nor a busier peer."""
    eps = build(specs)
    balancer = PriorityBalancer()
    for _ in range(warmup):
        balancer.pick(eps)
    candidates = data.draw(st.permutations(eps))
    chosen = balancer.pick(candidates)
    assert chosen.config.priority == max(ep.config.priority for ep in eps)
    tier = [ep for ep in eps if ep.config.priority == chosen.config.priority]
    assert chosen.in_flight == min(ep.in_flight for ep in tier)


def test_round_robin_is_a_strict_rotation_in_name_order() -> None:
    """Round-robin ignores load and priority and cycles through the candidates by name."""
    eps = [make_endpoint("b", in_flight=9), make_endpoint("c", priority=1), make_endpoint("a")]
    balancer = RoundRobinBalancer()
    assert [balancer.pick(eps).name for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


@FAST
@given(n=st.integers(min_value=1, max_value=6), rounds=st.integers(min_value=1, max_value=4), data=st.data())
def test_round_robin_spreads_k_picks_evenly(n: int, rounds: int, data: Any) -> None:
    """Over k picks from a stable set of n endpoints each is chosen k/n times, in name order."""
    eps = build([(data.draw(st.integers(0, 3)), data.draw(st.integers(0, 4))) for _ in range(n)])
    candidates = data.draw(st.permutations(eps))
    balancer = RoundRobinBalancer()
    picks = [balancer.pick(candidates).name for _ in range(n * rounds)]
    assert picks == sorted(ep.name for ep in eps) * rounds


@FAST
@given(n=st.integers(min_value=2, max_value=6), rounds=st.integers(min_value=1, max_value=3), data=st.data())
def test_round_robin_state_survives_rebuilt_candidate_lists(n: int, rounds: int, data: Any) -> None:
    """Building a new candidate list (new list object, any order) for every pick does not reset the rotation."""
    eps = build([(100, 0)] * n)
    balancer = RoundRobinBalancer()
    picks = [balancer.pick(list(data.draw(st.permutations(eps)))).name for _ in range(n * rounds)]
    assert picks == [ep.name for ep in eps] * rounds


def test_round_robin_continues_after_an_endpoint_drops_out() -> None:
    """When the chosen endpoint leaves the candidate list, the rotation continues after it by name."""
    a, b, c = make_endpoint("a"), make_endpoint("b"), make_endpoint("c")
    balancer = RoundRobinBalancer()
    assert balancer.pick([a, b, c]).name == "a"
    assert balancer.pick([a, b, c]).name == "b"
    assert balancer.pick([a, c]).name == "c"
    assert balancer.pick([c, a, b]).name == "a"


def test_least_connections_picks_fewest_in_flight_over_priority() -> None:
    """Least-connections takes the least loaded endpoint even if others have higher priority."""
    eps = [make_endpoint("a", priority=200, in_flight=3), make_endpoint("b", priority=100, in_flight=1)]
    assert LeastConnectionsBalancer().pick(eps).name == "b"


def test_least_connections_breaks_ties_by_priority_then_rotation() -> None:
    """Among equally loaded endpoints the higher priority wins; equal priorities rotate."""
    eps = [
        make_endpoint("a", priority=100, in_flight=1),
        make_endpoint("b", priority=200, in_flight=1),
        make_endpoint("c", priority=200, in_flight=1),
        make_endpoint("d", priority=300, in_flight=2),
    ]
    balancer = LeastConnectionsBalancer()
    assert [balancer.pick(eps).name for _ in range(4)] == ["b", "c", "b", "c"]


@FAST
@given(specs=endpoint_specs, warmup=st.integers(min_value=0, max_value=5), data=st.data())
def test_least_connections_never_picks_a_busier_endpoint(specs: list[tuple[int, int]], warmup: int, data: Any) -> None:
    """Least-connections never picks an endpoint with more in flight than another candidate."""
    eps = build(specs)
    balancer = LeastConnectionsBalancer()
    for _ in range(warmup):
        balancer.pick(eps)
    chosen = balancer.pick(data.draw(st.permutations(eps)))
    assert all(chosen.in_flight <= ep.in_flight for ep in eps)
    fewest = [ep for ep in eps if ep.in_flight == chosen.in_flight]
    assert chosen.config.priority == max(ep.config.priority for ep in fewest)
