"""
Unit tests for ``olladmr.fleet.health``: the HealthMonitor on a ``Clock``,
against a fake upstream client whose answers the tests hand out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
from support import ep_conf, fleet_config
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

from olladmr.config import Config
from olladmr.failures import UpstreamFailure
from olladmr.fleet.health import BACKOFF_CAP, USER_AGENT, HealthMonitor
from olladmr.fleet.models import normalise_model
from olladmr.fleet.state import BUSY, HEALTHY, OFFLINE, UNHEALTHY, UNKNOWN, EndpointState, Fleet


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
        """Health checks and model discovery (the /engines/ps polls are ``ps_calls_to``)."""
        return [c for c in self.calls if c.endpoint == endpoint and not c.url.endswith(b"/engines/ps")]

    def ps_calls_to(self, endpoint: str) -> list[FakeCall]:
        return [c for c in self.calls if c.endpoint == endpoint and c.url.endswith(b"/engines/ps")]

    def pending(self, endpoint: str) -> list[FakeCall]:
        return [c for c in self.calls_to(endpoint) if not c.deferred.called]


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
    assert len([c for c in m.client.calls if not c.url.endswith(b"/engines/ps")]) == 9
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
# The real treq client, in memory (StubTreq)


class ModelList(Resource):
    """A DMR-like ``/engines/v1/models`` answering as told, recording the requests it saw."""

    isLeaf = True

    def __init__(self, code: int = 200, body: bytes = b'{"object":"list","data":[{"id":"ai/smollm2"}]}') -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.seen: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append((request.path, request.getHeader(b"user-agent"), request.getHeader(b"x-extra")))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


def stub_monitored(resource: Resource, **endpoint: Any) -> tuple[HealthMonitor, Fleet, StubTreq]:
    clock = Clock()
    config = fleet_config(ep_conf("a", **endpoint))
    fleet = Fleet(config, clock)
    stub = StubTreq(resource)
    monitor = HealthMonitor(fleet, stub, clock, config)
    return monitor, fleet, stub


def test_health_through_real_treq_reads_models_and_sends_headers() -> None:
    """With treq's own client (StubTreq) a check GETs the model list with olladmr's User-Agent and endpoint headers."""
    dmr = ModelList()
    monitor, fleet, stub = stub_monitored(dmr, headers={"X-Extra": "1"})
    monitor.startService()
    stub.flush()
    ep = fleet.get("a")
    assert ep is not None and ep.status == HEALTHY
    assert [m["id"] for m in ep.models] == ["ai/smollm2"]
    assert dmr.seen == [(b"/engines/v1/models", USER_AGENT, b"1"), (b"/engines/ps", USER_AGENT, b"1")]
    assert monitor.first_round.called
    monitor.stopService()


def test_health_through_real_treq_non_2xx_is_unhealthy_and_garbage_keeps_models() -> None:
    """A 500 through treq is unhealthy with its code in the reason; a 200 that is not a model list keeps the old list."""
    dmr = ModelList(500, b"boom")
    monitor, fleet, stub = stub_monitored(dmr)
    monitor.startService()
    stub.flush()
    ep = fleet.get("a")
    assert ep is not None and ep.status == UNHEALTHY and "HTTP 500" in ep.status_reason
    dmr.code, dmr.body = 200, b'{"object":"list","data":[{"id":"ai/x"}]}'
    monitor.check(ep)
    stub.flush()
    assert ep.status == HEALTHY and [m["id"] for m in ep.models] == ["ai/x"]
    dmr.body = b"<html>not json</html>"
    monitor.check(ep)
    stub.flush()
    assert ep.status == HEALTHY and [m["id"] for m in ep.models] == ["ai/x"]
    monitor.stopService()


# -- --workers: the master checks, its workers adopt what it found


def test_a_master_shares_every_check_and_a_follower_adopts_it_without_checking() -> None:
    """The master's states after each check, applied by a follower that sends no check of its own."""
    shared: list[list[dict[str, object]]] = []
    clock = Clock()
    config = fleet_config(ep_conf("a", "2s", "1s"), ep_conf("b", "2s", "1s"))
    fleet = Fleet(config, clock)
    client = FakeClient(clock)
    client.behaviour["a"] = answer_with(200, models_doc("ai/smollm2"))
    client.behaviour["b"] = refuse
    master = HealthMonitor(fleet, client, clock, config, share=shared.append)
    master.startService()
    assert shared and {s["name"]: s["status"] for s in shared[-1]} == {"a": HEALTHY, "b": OFFLINE}

    worker_fleet = Fleet(config, clock)
    worker_client = FakeClient(clock)
    follower = HealthMonitor(worker_fleet, worker_client, clock, config, follower=True)
    follower.startService()
    assert not follower.first_round.called
    follower.adopt(json.loads(json.dumps(shared[-1])))  # as it travels: one JSON line
    assert follower.first_round.called
    a, b = worker_fleet.get("a"), worker_fleet.get("b")
    assert a is not None and b is not None
    assert (a.status, a.routable, a.has_model(normalise_model("ai/smollm2"))) == (HEALTHY, True, True)
    assert (b.status, b.status_reason) == (OFFLINE, fleet.get("b").status_reason)  # type: ignore[union-attr]
    clock.advance(10)
    assert worker_client.calls == []  # never checked anything itself
    follower.adopt([{"name": "nope", "status": HEALTHY}, {"name": "a", "status": "exploded"}])
    assert a.status == HEALTHY  # unknown endpoints and statuses are ignored


def test_a_follower_serves_anyway_when_the_master_says_nothing() -> None:
    """No health line from the master within FOLLOWER_WAIT: the worker accepts (endpoints stay unknown)."""
    from olladmr.fleet.health import FOLLOWER_WAIT

    m = monitored(ep_conf("a"), start=False)
    follower = HealthMonitor(m.fleet, m.client, m.clock, m.config, follower=True)
    follower.startService()
    m.clock.advance(FOLLOWER_WAIT - 0.1)
    assert not follower.first_round.called
    m.clock.advance(0.2)
    assert follower.first_round.called and m.client.calls == [] and m.ep("a").status == UNKNOWN


def test_adopting_the_same_loaded_models_keeps_what_traffic_taught_the_worker() -> None:
    """A repeated /engines/ps answer from the master does not erase a model this worker just served."""
    m = monitored(ep_conf("a"), start=False)
    ep = m.ep("a")
    state = {"name": "a", "status": HEALTHY, "reason": "ok", "models": None, "loaded": None}
    ep.adopt_checked(state)
    ep.note_served("ai/smollm2:latest")
    ep.adopt_checked(state)  # unchanged: nothing new from ps
    assert ep.model_loaded("ai/smollm2:latest") is True
    ep.adopt_checked({**state, "loaded": {}})  # ps now says: nothing loaded
    assert ep.model_loaded("ai/smollm2:latest") is False
