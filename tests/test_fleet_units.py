"""
Deterministic unit tests for the fleet's building blocks: circuit breaker,
balancers, model-name normalisation, concurrency slots, the health monitor
and model-aware routing.

No sockets and no sleeping: time is a ``twisted.internet.task.Clock`` and
the upstream client is a fake whose answers the tests hand out.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from olladmr.fleet.balancer import LeastConnectionsBalancer, PriorityBalancer, RoundRobinBalancer
from olladmr.fleet.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from olladmr.config import Config, EndpointConfig, parse_config
from olladmr.errors import ClientError
from olladmr.fleet.state import (
    BUSY,
    HEALTHY,
    OFFLINE,
    UNHEALTHY,
    UNKNOWN,
    EndpointState,
    Fleet,
    QueueFull,
    QueueTimeout,
)
from olladmr.fleet.health import BACKOFF_CAP, HealthMonitor
from olladmr.fleet.models import normalise_model
from olladmr.fleet.routing import route
from olladmr.failures import UpstreamFailure

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# 1. CircuitBreaker


def make_breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(clock, threshold, cooldown), clock


def open_breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    breaker, clock = make_breaker(threshold, cooldown)
    for _ in range(threshold):
        breaker.on_failure()
    assert breaker.state == OPEN
    return breaker, clock


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    """The breaker stays closed below the threshold and opens on the Nth consecutive failure."""
    breaker, _ = make_breaker(threshold=3)
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is False
    assert breaker.on_failure() is False
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN
    assert not breaker.allows()


def test_breaker_success_resets_failure_count() -> None:
    """A success in between means failures are no longer consecutive, so the count restarts."""
    breaker, _ = make_breaker(threshold=3)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()
    assert breaker.failures == 0
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN


def test_breaker_attempts_while_closed_never_block() -> None:
    """``on_attempt`` in the closed state does not limit how many requests may go."""
    breaker, _ = make_breaker()
    for _ in range(5):
        breaker.on_attempt()
        assert breaker.allows()


def test_breaker_half_open_after_cooldown_admits_exactly_one_trial() -> None:
    """After the cooldown the breaker is half-open: ``allows()`` is true until the one trial is sent."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(9.999)
    assert breaker.state == OPEN and not breaker.allows()
    clock.advance(0.001)
    assert breaker.state == HALF_OPEN
    assert breaker.allows()
    assert breaker.allows()  # asking has no side effect
    breaker.on_attempt()
    assert not breaker.allows()
    assert breaker.state == HALF_OPEN


def test_breaker_trial_success_closes() -> None:
    """A successful half-open trial closes the breaker and clears the failure count."""
    breaker, clock = open_breaker()
    clock.advance(10)
    breaker.on_attempt()
    breaker.on_success()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert breaker.allows()
    assert breaker.retry_after() == 0.0


def test_breaker_trial_failure_reopens_for_a_full_cooldown() -> None:
    """A failed half-open trial re-opens the breaker for another whole cooldown."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(12)
    breaker.on_attempt()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN
    assert not breaker.allows()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(10)
    assert breaker.state == HALF_OPEN and breaker.allows()


def test_breaker_retry_after_counts_down_the_cooldown() -> None:
    """``retry_after()`` is 0 when closed, the remaining cooldown when open, and 0 once half-open."""
    breaker, clock = make_breaker(threshold=1, cooldown=10.0)
    assert breaker.retry_after() == 0.0
    breaker.on_failure()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(4)
    assert breaker.retry_after() == pytest.approx(6.0)
    clock.advance(6)
    assert breaker.retry_after() == 0.0
    clock.advance(100)
    assert breaker.retry_after() == 0.0


def test_breaker_unreported_trial_does_not_block_forever() -> None:
    """A half-open trial whose outcome is never reported stops blocking after another cooldown."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(10)
    breaker.on_attempt()  # e.g. the client went away before the upstream answered
    clock.advance(9.9)
    assert not breaker.allows()
    clock.advance(0.1)
    assert breaker.allows()
    breaker.on_attempt()
    assert not breaker.allows()
    breaker.on_success()
    assert breaker.state == CLOSED and breaker.allows()


# --------------------------------------------------------------------------
# 2. Balancers


def make_endpoint(
    name: str, priority: int = 100, in_flight: int = 0, clock: Clock | None = None, **config: Any
) -> EndpointState:
    ep = EndpointState(
        EndpointConfig(name=name, url=f"http://{name}.test:12434", priority=priority, **config),
        clock or Clock(),
        breaker_failures=3,
        breaker_cooldown=10.0,
    )
    ep.in_flight = in_flight
    return ep


def names(endpoints: list[EndpointState]) -> list[str]:
    return [ep.name for ep in endpoints]


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


# --------------------------------------------------------------------------
# 3. Model-name normalisation

SMOLLM2_ALIASES = [
    "smollm2",
    "ai/smollm2",
    "ai/smollm2:latest",
    "AI/SmolLM2",
    "AI/SMOLLM2",
    " ai/smollm2 ",
    "\tai/smollm2\n",
    "smollm2:",
    "docker.io/ai/smollm2",
    "index.docker.io/ai/smollm2:latest",
    "registry-1.docker.io/ai/smollm2",
    "DOCKER.IO/AI/SMOLLM2:latest",
]


@pytest.mark.parametrize("alias", SMOLLM2_ALIASES)
def test_normalise_aliases_of_one_model_are_equal(alias: str) -> None:
    """Every spelling DMR treats as ai/smollm2:latest gets the same routing key."""
    assert normalise_model(alias) == normalise_model("smollm2") == "ai/smollm2:latest"


@pytest.mark.parametrize(
    "other", ["smollm2:LATEST", "myorg/smollm2", "ai/smollm2:360M", "ai/smollm3", "hf.co/ai/smollm2"]
)
def test_normalise_distinct_models_differ(other: str) -> None:
    """Another tag (tags are case-sensitive), namespace or registry is another model."""
    assert normalise_model(other) != normalise_model("ai/smollm2")


def test_normalise_hugging_face_short_host() -> None:
    """``hf.co/`` is ``huggingface.co/``; the repository is case-insensitive, the tag is not."""
    assert normalise_model("hf.co/Org/Repo:Q4") == normalise_model("huggingface.co/org/repo:Q4")
    assert normalise_model("hf.co/Org/Repo:Q4") == "huggingface.co/org/repo:Q4"
    assert normalise_model("HF.CO/org/repo") == "huggingface.co/org/repo:latest"
    assert normalise_model("hf.co/org/repo:q4") != normalise_model("hf.co/org/repo:Q4")


def test_normalise_keeps_other_registries_and_ports() -> None:
    """A non-Docker-Hub registry (with or without a port) stays part of the key."""
    assert normalise_model("ghcr.io/Org/Model:v1") == "ghcr.io/org/model:v1"
    assert normalise_model("localhost:5000/m") == "localhost:5000/m:latest"
    assert normalise_model("localhost:5000/m:Q4") == "localhost:5000/m:Q4"


def test_normalise_leaves_ids_alone() -> None:
    """12- and 64-hex IDs and ``sha256:`` digests are keys as they are (only trimmed)."""
    short = "0123456789ab"
    full = "0123456789abcdef" * 4
    assert normalise_model(short) == short
    assert normalise_model(f" {full} ") == full
    assert normalise_model(f"sha256:{full}") == f"sha256:{full}"


def test_normalise_docker_hub_prefix_before_another_registry_is_idempotent() -> None:
    """A Docker Hub repository whose first segment looks like a registry keeps its Hub prefix, so its key is stable."""
    for name in ("docker.io/docker.io/x", "docker.io/hf.co/x", "index.docker.io/ghcr.io/a/b:T"):
        key = normalise_model(name)
        assert normalise_model(key) == key
    assert normalise_model("docker.io/hf.co/x") != normalise_model("hf.co/x")
    assert normalise_model("index.docker.io/hf.co/x") == normalise_model("docker.io/hf.co/x")


_HEX_ID_CHARS = frozenset("0123456789abcdef")


def _looks_like_id(text: str) -> bool:
    text = text.strip()
    hexpart = text[len("sha256:") :] if text.startswith("sha256:") else text
    return len(hexpart) in (12, 64) and set(hexpart) <= _HEX_ID_CHARS


NAME_CHARS = string.ascii_letters + string.digits + "._-"
segment = st.text(alphabet=NAME_CHARS, min_size=1, max_size=10)
registry_prefix = st.sampled_from(
    [
        "docker.io/",
        "index.docker.io/",
        "registry-1.docker.io/",
        "hf.co/",
        "HF.CO/",
        "huggingface.co/",
        "ghcr.io/",
        "localhost:5000/",
    ]
)
model_names = st.builds(
    lambda pad1, registries, spaces, name, tag, pad2: (
        pad1 + "".join(registries) + "".join(s + "/" for s in spaces) + name + tag + pad2
    ),
    st.sampled_from(["", " ", "\t", " \n "]),  # padding
    st.lists(registry_prefix, max_size=2),  # registries (two in a row are rare but legal)
    st.lists(segment, max_size=2),  # namespaces
    segment,  # repository
    st.one_of(st.just(""), st.just(":"), st.text(alphabet=NAME_CHARS, min_size=1, max_size=8).map(lambda t: ":" + t)),
    st.sampled_from(["", " ", "\n"]),  # padding
)


@FAST
@given(name=st.one_of(model_names, st.text(max_size=40)))
def test_normalise_is_idempotent(name: str) -> None:
    """Normalising a routing key again gives the same key."""
    key = normalise_model(name)
    assert normalise_model(key) == key


@FAST
@given(name=model_names)
def test_normalise_result_always_has_a_tag(name: str) -> None:
    """Every non-ID key ends in an explicit tag (``latest`` when none or an empty one was given)."""
    assume(not _looks_like_id(name))
    key = normalise_model(name)
    assert key.rfind(":") > key.rfind("/")
    if ":" not in name.strip().rsplit("/", 1)[-1] or name.strip().endswith(":"):
        assert key.endswith(":latest")


@FAST
@given(repo=segment, tag=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8))
def test_normalise_name_case_insensitive_tag_case_sensitive(repo: str, tag: str) -> None:
    """Changing the case of the name keeps the key; the tag is kept exactly as given."""
    assume(not _looks_like_id(repo) and not _looks_like_id(repo.lower()))
    assert normalise_model(f"{repo.upper()}:{tag}") == normalise_model(f"{repo.lower()}:{tag}")
    assert normalise_model(f"{repo}:{tag}").endswith(":" + tag)
    assert normalise_model(f"ai/{repo}") == normalise_model(f"docker.io/ai/{repo}:latest") == normalise_model(repo)


# --------------------------------------------------------------------------
# 4. Concurrency slots


def slotted(max_concurrent: int = 1, queue_size: int = 3, queue_timeout: float = 5.0) -> tuple[EndpointState, Clock]:
    clock = Clock()
    ep = make_endpoint(
        "slots", clock=clock, max_concurrent=max_concurrent, queue_size=queue_size, queue_timeout=queue_timeout
    )
    return ep, clock


def test_slots_unlimited_when_max_concurrent_is_zero() -> None:
    """With ``max_concurrent=0`` every acquire succeeds at once."""
    ep, _ = slotted(max_concurrent=0)
    for _ in range(100):
        assert ep.acquire() is None
    assert ep.in_flight == 100 and ep.queued == 0


def test_slots_second_acquire_waits_for_release() -> None:
    """At ``max_concurrent=1`` the first acquire gets the slot and the second waits until it is released."""
    ep, clock = slotted()
    assert ep.acquire() is None
    assert ep.in_flight == 1 and not ep.has_free_slot
    waiting = ep.acquire()
    assert isinstance(waiting, Deferred)
    results: list[object] = []
    waiting.addBoth(results.append)
    assert results == [] and ep.queued == 1
    ep.release()
    assert results == [None]
    assert ep.in_flight == 1 and ep.queued == 0
    assert clock.getDelayedCalls() == []  # the queue timer was cancelled
    ep.release()
    assert ep.in_flight == 0 and ep.has_free_slot


def test_slots_are_handed_over_in_fifo_order() -> None:
    """Waiters get the slot in the order they asked, one per release."""
    ep, _ = slotted(queue_size=5)
    assert ep.acquire() is None
    order: list[int] = []
    for i in range(4):
        d = ep.acquire()
        assert d is not None
        d.addCallback(lambda _, i=i: order.append(i))
    for expected in range(4):
        ep.release()
        assert order == list(range(expected + 1))
    assert ep.in_flight == 1 and ep.queued == 0


def test_slots_newcomer_queues_behind_waiters() -> None:
    """A new request does not jump the queue even at the moment a slot is free."""
    ep, _ = slotted(max_concurrent=2)
    assert ep.acquire() is None and ep.acquire() is None
    first = ep.acquire()
    assert first is not None
    ep.in_flight -= 1  # a slot frees without a release() hand-over (e.g. a limit change)
    second = ep.acquire()
    assert second is not None and ep.queued == 2


def test_slots_full_queue_raises_queue_full() -> None:
    """When ``queue_size`` requests already wait, one more raises QueueFull at once."""
    ep, _ = slotted(queue_size=2)
    assert ep.acquire() is None
    ep.acquire()
    ep.acquire()
    with pytest.raises(QueueFull):
        ep.acquire()
    assert ep.queued == 2


def test_slots_waiter_times_out() -> None:
    """A waiter that gets no slot within ``queue_timeout`` fails with QueueTimeout and leaves the queue."""
    ep, clock = slotted(queue_timeout=5.0)
    assert ep.acquire() is None
    waiting = ep.acquire()
    assert waiting is not None
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    clock.advance(4.9)
    assert failures == [] and ep.queued == 1
    clock.advance(0.1)
    assert len(failures) == 1 and failures[0].check(QueueTimeout)
    assert ep.queued == 0
    ep.release()
    assert ep.in_flight == 0  # the slot was not given to the expired waiter


def test_slots_cancelled_waiter_leaves_the_queue() -> None:
    """Cancelling a waiter removes it (and its timer) so the next release goes to the one behind it."""
    ep, clock = slotted()
    assert ep.acquire() is None
    first, second = ep.acquire(), ep.acquire()
    assert first is not None and second is not None
    failures: list[Failure] = []
    first.addErrback(failures.append)
    got: list[object] = []
    second.addCallback(got.append)
    first.cancel()
    assert len(failures) == 1 and failures[0].check(CancelledError)
    assert ep.queued == 1
    assert len(clock.getDelayedCalls()) == 1
    ep.release()
    assert got == [None] and ep.in_flight == 1 and ep.queued == 0
    clock.advance(60)  # no stray timeout fires for the cancelled waiter


def test_slots_fail_waiters() -> None:
    """``fail_waiters`` fails every queued request with the given reason and empties the queue."""
    ep, clock = slotted()
    assert ep.acquire() is None
    failures: list[Failure] = []
    for _ in range(3):
        d = ep.acquire()
        assert d is not None
        d.addErrback(failures.append)
    ep.fail_waiters(CancelledError("gone"))
    assert len(failures) == 3 and ep.queued == 0
    assert clock.getDelayedCalls() == []


# --------------------------------------------------------------------------
# 5. HealthMonitor


class FakeResponse:
    """Enough of IResponse for ``read_body``: a status code and a body delivered at once."""

    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Error"
        self.headers = Headers({b"content-type": [b"application/json"]})
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(StringTransport())
        if self._body:
            protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


@dataclass
class FakeCall:
    endpoint: str
    method: bytes
    url: bytes
    headers: Headers
    options: dict[str, Any]
    at: float
    deferred: Deferred = field(default_factory=Deferred)

    def answer(self, code: int = 200, body: bytes | object = b'{"object":"list","data":[]}') -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.deferred.callback(FakeResponse(code, body))

    def refuse(self) -> None:
        self.deferred.errback(ConnectionRefusedError())


Behaviour = Callable[[FakeCall], None]


def models_doc(*ids: str) -> dict[str, object]:
    return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "docker"} for i in ids]}


def answer_with(code: int = 200, body: bytes | object = b'{"object":"list","data":[]}') -> Behaviour:
    return lambda call: call.answer(code, body)


def refuse(call: FakeCall) -> None:
    call.refuse()


class FakeClient:
    """Stands in for treq's HTTPClient: records every GET and answers per endpoint (the URL's first host label) as told."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[FakeCall] = []
        self.behaviour: dict[str, Behaviour | None] = {}

    def get(self, url: str, **options: Any) -> Deferred:
        endpoint = (urlsplit(url).hostname or "").split(".")[0]
        headers = options.pop("headers")
        call = FakeCall(endpoint, b"GET", url.encode(), headers, options, self.clock.seconds())
        self.calls.append(call)
        behave = self.behaviour.get(endpoint, answer_with())
        if behave is not None:
            behave(call)
        return call.deferred

    def calls_to(self, endpoint: str) -> list[FakeCall]:
        return [c for c in self.calls if c.endpoint == endpoint]

    def pending(self, endpoint: str) -> list[FakeCall]:
        return [c for c in self.calls_to(endpoint) if not c.deferred.called]


def fleet_config(*endpoints: dict[str, object], **proxy: object) -> Config:
    return parse_config({"proxy": dict(proxy), "endpoints": list(endpoints)}, "test")


@dataclass
class Monitored:
    clock: Clock
    config: Config
    fleet: Fleet
    client: FakeClient
    monitor: HealthMonitor

    def ep(self, name: str) -> EndpointState:
        ep = self.fleet.get(name)
        assert ep is not None
        return ep

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Advance in small steps so every LoopingCall tick runs at its own time."""
        steps = round(seconds / step)
        for _ in range(steps):
            self.clock.advance(step)


def monitored(
    *endpoints: dict[str, object],
    behaviour: dict[str, Behaviour | None] | None = None,
    start: bool = True,
    listeners: tuple[Callable[[EndpointState, str, str], None], ...] = (),
    **proxy: object,
) -> Monitored:
    clock = Clock()
    config = fleet_config(*endpoints, **proxy)
    fleet = Fleet(config, clock)
    client = FakeClient(clock)
    client.behaviour.update(behaviour or {})
    monitor = HealthMonitor(fleet, client, clock, config, listeners=listeners)
    m = Monitored(clock, config, fleet, client, monitor)
    if start:
        monitor.startService()
    return m


def ep_conf(name: str, interval: str = "10s", timeout: str | None = None, **more: object) -> dict[str, object]:
    conf: dict[str, object] = {"name": name, "url": f"http://{name}.test:12434", "check_interval": interval}
    if timeout is not None:
        conf["check_timeout"] = timeout
    conf.update(more)
    return conf


def test_health_one_loop_per_endpoint_at_its_own_interval() -> None:
    """Each endpoint is checked at start and then every ``check_interval`` of its own."""
    m = monitored(ep_conf("a", "2s", "1s"), ep_conf("b", "5s", "1s"))
    assert len(m.client.calls_to("a")) == 1 and len(m.client.calls_to("b")) == 1
    m.advance(10)
    assert [c.at for c in m.client.calls_to("a")] == [0, 2, 4, 6, 8, 10]
    assert [c.at for c in m.client.calls_to("b")] == [0, 5, 10]
    call = m.client.calls_to("a")[0]
    assert call.method == b"GET"
    assert call.url == b"http://a.test:12434/engines/v1/models"
    assert call.options == {"allow_redirects": False, "unbuffered": True}  # treq: no redirects, no buffering
    m.monitor.stopService()
    m.advance(20)
    assert len(m.client.calls) == 9
    assert m.clock.getDelayedCalls() == []


def test_health_empty_model_list_is_healthy() -> None:
    """A 200 with an empty OpenAI list is healthy, with the model list known and empty."""
    m = monitored(ep_conf("a"), behaviour={"a": answer_with(200, {"object": "list", "data": []})})
    ep = m.ep("a")
    assert ep.status == HEALTHY and ep.routable
    assert ep.models_known is True
    assert ep.models == [] and ep.model_keys == frozenset()
    assert ep.last_check == 0


def test_health_model_list_sets_models() -> None:
    """A 200 with a model list stores the models and their normalised keys."""
    listing = models_doc("ai/smollm2:latest", "docker.io/ai/gemma3n:latest")
    m = monitored(ep_conf("a"), behaviour={"a": answer_with(200, listing)})
    ep = m.ep("a")
    assert ep.status == HEALTHY
    assert [mdl["id"] for mdl in ep.models] == ["ai/smollm2:latest", "docker.io/ai/gemma3n:latest"]
    assert ep.has_model(normalise_model("SmolLM2"))
    assert ep.has_model(normalise_model("ai/gemma3n"))


def test_health_non_list_answer_keeps_previous_models() -> None:
    """A 2xx that is not a model list leaves the endpoint healthy and keeps the models it had."""
    m = monitored(ep_conf("a", "2s", "1s"), behaviour={"a": answer_with(200, models_doc("ai/smollm2"))})
    m.client.behaviour["a"] = answer_with(200, b"not json")
    m.advance(2)
    ep = m.ep("a")
    assert ep.status == HEALTHY
    assert [mdl["id"] for mdl in ep.models] == ["ai/smollm2"]


@pytest.mark.parametrize("code", [404, 500, 503])
def test_health_non_2xx_is_unhealthy(code: int) -> None:
    """An answer outside 2xx makes the endpoint unhealthy (not routable)."""
    m = monitored(ep_conf("a"), behaviour={"a": answer_with(code, b"oops")})
    ep = m.ep("a")
    assert ep.status == UNHEALTHY
    assert f"HTTP {code}" in ep.status_reason
    assert not ep.routable


def test_health_connection_refused_is_offline() -> None:
    """A refused connection makes the endpoint offline."""
    m = monitored(ep_conf("a"), behaviour={"a": refuse})
    ep = m.ep("a")
    assert ep.status == OFFLINE
    assert "connection_refused" in ep.status_reason
    assert not ep.routable and ep.consecutive_check_failures == 1


def test_health_backoff_doubles_up_to_the_cap_and_success_restores_the_interval() -> None:
    """Consecutive failures double the delay up to 60s; the first success brings back the normal interval."""
    m = monitored(ep_conf("a", "2s", "1s"), behaviour={"a": refuse})
    m.advance(300)
    times = [c.at for c in m.client.calls_to("a")]
    assert times == [0, 2, 6, 14, 30, 62, 122, 182, 242]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == [2, 4, 8, 16, 32, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP]
    m.client.behaviour["a"] = answer_with()
    m.advance(10)
    times = [c.at for c in m.client.calls_to("a")]
    assert times[9:] == [302, 304, 306, 308, 310]
    assert m.ep("a").status == HEALTHY
    assert m.ep("a").consecutive_check_failures == 0


def test_health_backoff_counts_from_the_start_of_a_slow_failing_check() -> None:
    """A check that takes a while to fail (e.g. a timeout) still gets the doubling delays, not one tick more."""
    m = monitored(ep_conf("a", "2s", "1s"), behaviour={"a": None})

    def fail_late() -> None:
        m.advance(0.5)
        for call in m.client.pending("a"):
            call.deferred.errback(UpstreamFailure("a", "header_timeout", "no response headers within 1s"))

    fail_late()
    for _ in range(40):
        m.advance(1.5)
        fail_late()
    times = [c.at for c in m.client.calls_to("a")]
    assert times[:5] == [0, 2, 6, 14, 30]
    assert m.ep("a").status == OFFLINE


def test_health_backoff_tolerates_a_tick_slightly_before_the_due_time() -> None:
    """A tick that runs a hair before the backoff is due (reactor jitter) checks then, not one interval later."""
    m = monitored(ep_conf("a", "2s", "1s"), behaviour={"a": refuse})
    m.ep("a").next_check_due = 2.001  # as if the failed check had started 1ms after its tick
    m.advance(2)
    assert [c.at for c in m.client.calls_to("a")] == [0, 2]


def test_health_slow_2xx_is_busy() -> None:
    """A 2xx slower than ``busy_threshold`` marks the endpoint busy, still routable; a fast one makes it healthy."""
    m = monitored(ep_conf("a", "10s", "5s"), behaviour={"a": None}, busy_threshold="2s")
    (call,) = m.client.pending("a")
    m.clock.advance(3)
    call.answer(200, models_doc("ai/smollm2"))
    ep = m.ep("a")
    assert ep.status == BUSY
    assert ep.routable
    assert ep.last_latency_ms == 3000
    assert ep.has_model("ai/smollm2:latest")
    m.client.behaviour["a"] = answer_with(200, models_doc("ai/smollm2"))
    m.advance(7)
    assert ep.status == HEALTHY


def test_health_first_round_waits_for_every_endpoint() -> None:
    """``first_round`` fires only once every endpoint's first check has finished, whatever its outcome."""
    m = monitored(ep_conf("a"), ep_conf("b"), ep_conf("c"), behaviour={"a": None, "b": None, "c": None})
    fired: list[object] = []
    m.monitor.first_round.addCallback(fired.append)
    m.client.pending("b")[0].answer()
    assert not fired
    m.client.pending("a")[0].refuse()
    assert not fired
    m.clock.advance(4)
    m.client.pending("c")[0].answer(500, b"no")
    assert fired == [None]
    assert (m.ep("a").status, m.ep("b").status, m.ep("c").status) == (OFFLINE, HEALTHY, UNHEALTHY)


def test_health_first_round_with_no_pending_checks_fires_at_start() -> None:
    """When every first check answers at once, ``first_round`` has fired by the end of ``startService``."""
    m = monitored(ep_conf("a"), ep_conf("b"))
    assert m.monitor.first_round.called


def test_health_unexpected_exception_does_not_kill_the_loop() -> None:
    """A probe that raises something unexpected is logged; later ticks still check the endpoint."""

    def explode(call: FakeCall) -> None:
        raise RuntimeError("boom")

    m = monitored(ep_conf("a", "2s", "1s"), behaviour={"a": explode})
    assert m.monitor.first_round.called
    assert m.ep("a").status == UNKNOWN
    m.advance(4)
    assert len(m.client.calls_to("a")) == 3

    def fail_async(call: FakeCall) -> None:
        call.deferred.errback(ValueError("weird"))

    m.client.behaviour["a"] = fail_async
    m.advance(2)
    assert len(m.client.calls_to("a")) == 4
    m.client.behaviour["a"] = answer_with()
    m.advance(2)
    assert len(m.client.calls_to("a")) == 5
    assert m.ep("a").status == HEALTHY


def test_health_check_in_progress_is_not_doubled() -> None:
    """A tick that finds the previous check still running (here: its model discovery) does not start a second one."""
    m = monitored(ep_conf("a", "2s", "2s", model_url="/models"), behaviour={"a": None})
    m.advance(1.5)
    m.client.pending("a")[0].answer()  # health answered at 1.5s; discovery now pending until 3.5s
    assert len(m.client.calls_to("a")) == 2
    m.advance(0.5)  # the 2s tick finds the check still running
    assert len(m.client.calls_to("a")) == 2
    m.client.pending("a")[0].answer(200, models_doc("ai/smollm2"))
    m.advance(2)
    assert len(m.client.calls_to("a")) == 3


def test_health_unanswered_check_times_out_on_the_clock() -> None:
    """A check with no answer within check_timeout is cancelled and the endpoint goes offline (header_timeout)."""
    m = monitored(ep_conf("a", "10s", "1s"), behaviour={"a": None})
    (call,) = m.client.pending("a")
    m.clock.advance(0.9)
    assert not call.deferred.called and m.ep("a").status == UNKNOWN
    m.clock.advance(0.2)
    assert call.deferred.called  # cancelled by the monitor's own timeout
    assert m.ep("a").status == OFFLINE and "header_timeout" in m.ep("a").status_reason


def test_health_body_that_never_ends_times_out_too() -> None:
    """check_timeout bounds the whole answer, body included: headers alone do not make an endpoint healthy."""
    transport = StringTransport()

    class Stalling:
        code = 200
        phrase = b"OK"
        headers = Headers()
        length = UNKNOWN_LENGTH

        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(transport)
            protocol.dataReceived(b'{"object":"list",')

    m = monitored(ep_conf("a", "10s", "1s"), behaviour={"a": lambda call: call.deferred.callback(Stalling())})
    assert m.ep("a").status == UNKNOWN
    m.clock.advance(1.1)
    assert m.ep("a").status == OFFLINE and transport.producerState == "stopped"  # the body read was stopped


def test_health_model_list_over_the_cap_is_unhealthy() -> None:
    """A model list larger than the monitor reads is refused (unhealthy), without holding it in memory."""
    from olladmr.fleet import health as health_module

    big = b"x" * (health_module.MAX_LIST_BYTES + 1)
    m = monitored(ep_conf("a"), behaviour={"a": answer_with(200, big)})
    assert m.ep("a").status == UNHEALTHY and "larger than" in m.ep("a").status_reason


def test_health_mark_offline_rechecks_within_a_second() -> None:
    """``mark_offline`` sets the endpoint offline now and schedules one re-check within 1s."""
    seen: list[tuple[str, str]] = []
    m = monitored(ep_conf("a", "10s"), listeners=(lambda e, old, new: seen.append((old, new)),))
    ep = m.ep("a")
    assert ep.status == HEALTHY and seen == [(UNKNOWN, HEALTHY)]
    seen.clear()
    m.monitor.mark_offline(ep, "connection_refused during a request")
    m.monitor.mark_offline(ep, "connection_refused during a request")
    assert ep.status == OFFLINE and not ep.routable
    assert ep.status_reason == "connection_refused during a request"
    assert seen == [(HEALTHY, OFFLINE)]
    assert len(m.client.calls_to("a")) == 1
    m.clock.advance(1)
    assert len(m.client.calls_to("a")) == 2  # one re-check, not two
    assert ep.status == HEALTHY
    assert seen == [(HEALTHY, OFFLINE), (OFFLINE, HEALTHY)]


def test_health_mark_offline_after_stop_schedules_nothing() -> None:
    """After ``stopService`` ``mark_offline`` only records the status."""
    m = monitored(ep_conf("a"))
    m.monitor.stopService()
    m.monitor.mark_offline(m.ep("a"), "refused")
    assert m.ep("a").status == OFFLINE
    assert m.clock.getDelayedCalls() == []


def test_health_separate_model_url_is_discovered() -> None:
    """When ``model_url`` differs from ``health_check_url`` the models come from a second request."""

    def by_path(call: FakeCall) -> None:
        if call.url.endswith(b"/health"):
            call.answer(200, b"ok")
        else:
            call.answer(200, models_doc("ai/qwen3"))

    m = monitored(ep_conf("a", health_check_url="/health"), behaviour={"a": by_path})
    assert [c.url for c in m.client.calls_to("a")] == [
        b"http://a.test:12434/health",
        b"http://a.test:12434/engines/v1/models",
    ]
    assert m.ep("a").has_model("ai/qwen3:latest")


# --------------------------------------------------------------------------
# 6. Routing


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


def test_breaker_trial_now_skips_the_cooldown():
    """An open breaker told that its endpoint is back online admits one trial at once."""
    from twisted.internet.task import Clock

    from olladmr.fleet.breaker import CircuitBreaker

    clock = Clock()
    breaker = CircuitBreaker(clock, threshold=2, cooldown=30)
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == "open" and not breaker.allows()
    breaker.trial_now()
    assert breaker.state == "half-open" and breaker.allows()
    breaker.on_attempt()
    assert not breaker.allows()
    breaker.on_success()
    assert breaker.state == "closed"
