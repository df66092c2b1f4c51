"""Unit tests for ``olladmr.proxy.affinity``: locating a stored response by probing endpoints, on a ``Clock``."""

from __future__ import annotations

import gc
from typing import Any, cast

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from olladmr.config import Config, parse_config
from olladmr.failures import REFUSED, UpstreamFailure
from olladmr.fleet.responses import ResponseDirectory
from olladmr.fleet.state import EndpointState, Fleet
from olladmr.proxy.affinity import FOUND, MISSING, PROBE_PATH, ResponseAffinity
from olladmr.proxy.headers import HeaderPairs, header_values
from olladmr.proxy.upstream import USER_AGENT

RID = "resp_0123456789abcdefABCDEF01"


# -- fakes


class FakeBodyTransport:
    """The push producer under a fake response body: records ``stopProducing``."""

    def __init__(self) -> None:
        self.stopped = 0

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped += 1


class FakeResponse:
    """An ``IResponse`` whose body is ``body`` then ``end`` (``ResponseDone``; ``None`` leaves it open)."""

    def __init__(self, code: int, body: bytes = b'{"id":"x"}', end: Exception | None = ResponseDone()) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Not Found"
        self.headers = Headers({b"content-type": [b"application/json"]})
        self.length = len(body)
        self.version = (b"HTTP", 1, 1)
        self.request = None
        self.previousResponse = None
        self.body = body
        self.end = end
        self.transport = FakeBodyTransport()
        self.delivered = 0

    def deliverBody(self, protocol: Any) -> None:
        self.delivered += 1
        protocol.makeConnection(self.transport)
        protocol.dataReceived(self.body)
        if self.end is not None:
            protocol.connectionLost(Failure(self.end))

    def setPreviousResponse(self, response: object) -> None:
        pass


class Call:
    """One ``client.request`` the affinity made, and the Deferred it got back."""

    def __init__(self, endpoint: str, method: bytes, url: bytes, headers: HeaderPairs, body: object, timeout: float | None):
        self.endpoint = endpoint
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.header_timeout = timeout
        self.deferred: Deferred[Any] = Deferred()
        self.settled = False


class FakeClient:
    """An ``UpstreamClient`` stand-in: records every request; the test settles each one by endpoint name."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.outstanding = 0
        self.most_outstanding = 0
        self.raise_for: set[str] = set()

    def request(
        self,
        endpoint: str,
        method: bytes,
        url: bytes,
        headers: HeaderPairs,
        body: object,
        *,
        fresh: bool = False,
        header_timeout: float | None = None,
    ) -> Deferred[Any]:
        if endpoint in self.raise_for:
            raise UpstreamFailure(endpoint, REFUSED, "connection refused", sent=False)
        call = Call(endpoint, method, url, headers, body, header_timeout)
        self.calls.append(call)
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        return call.deferred

    def pending(self) -> list[str]:
        """Endpoints of the requests not settled yet, in the order made."""
        return [c.endpoint for c in self.calls if not c.settled]

    def call_for(self, endpoint: str) -> Call:
        (call,) = [c for c in self.calls if c.endpoint == endpoint and not c.settled]
        return call

    def _settle(self, endpoint: str) -> Call:
        call = self.call_for(endpoint)
        call.settled = True
        self.outstanding -= 1
        return call

    def answer(self, endpoint: str, code: int, **response: Any) -> FakeResponse:
        resp = FakeResponse(code, **response)
        self._settle(endpoint).deferred.callback(resp)
        return resp

    def refuse(self, endpoint: str) -> None:
        self._settle(endpoint).deferred.errback(UpstreamFailure(endpoint, REFUSED, "connection refused", sent=False))

    def blow_up(self, endpoint: str) -> None:
        self._settle(endpoint).deferred.errback(RuntimeError("unexpected"))


class Harness:
    """A ResponseAffinity over a fake client, a fleet of endpoints and a directory, all on one Clock."""

    def __init__(self, *names: str, timeout: float = 2.0, max_probes: int = 32, **endpoint: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.fleet = Fleet(fleet_config(*names, **endpoint), self.clock)
        self.directory = ResponseDirectory(self.clock)
        self.client = FakeClient()
        self.observed: list[tuple[str, float]] = []
        self.affinity = ResponseAffinity(
            self.directory,
            cast(Any, self.client),
            self.clock,
            timeout=timeout,
            max_probes=max_probes,
            observe_probe=lambda outcome, seconds: self.observed.append((outcome, seconds)),
        )

    def eps(self, *names: str) -> list[EndpointState]:
        out = []
        for name in names:
            ep = self.fleet.get(name)
            assert ep is not None
            out.append(ep)
        return out

    def locate(self, rid: str, *names: str) -> tuple[Deferred[EndpointState | None], list[object]]:
        """Start a locate of ``rid`` over ``names``; the list gets its result (or Failure) once it fires."""
        results: list[object] = []
        d = self.affinity.locate(rid, self.eps(*names))
        d.addBoth(results.append)
        return d, results


def fleet_config(*names: str, **endpoint: Any) -> Config:
    """Endpoints ``names`` at ``http://<name>.test:1``, each with the extra endpoint settings given."""
    return parse_config(
        {"endpoints": [{"name": n, "url": f"http://{n}.test:1", **endpoint} for n in names]}, "t"
    )


def affinity_config(**settings: Any) -> Config:
    return parse_config({"proxy": {"response_affinity": settings}, "endpoints": [{"url": "http://a:1"}]}, "t")


def result_name(results: list[object]) -> str | None:
    """The name of the endpoint a fired locate found (``None`` for none); fails if it has not fired."""
    assert len(results) == 1, f"locate fired {len(results)} times: {results}"
    (only,) = results
    if only is None:
        return None
    assert isinstance(only, EndpointState), only
    return only.name


# -- finding the holder


def test_the_holder_is_found_among_three_and_remembered() -> None:
    """With one endpoint 404, one refused and one 200, locate fires with the 200 one and remembers it."""
    h = Harness("a", "b", "c")
    _, results = h.locate(RID, "a", "b", "c")
    assert h.client.pending() == ["a", "b", "c"]
    assert results == []
    h.clock.advance(0.25)
    h.client.answer("a", 404)
    h.client.refuse("b")
    assert results == []
    h.client.answer("c", 200)
    assert result_name(results) == "c"
    assert h.directory.owner(RID) == "c"
    assert h.affinity.owner(RID) == "c"
    assert h.observed == [(FOUND, 0.25)]


def test_the_probe_is_a_get_of_the_response_with_the_endpoint_headers_and_timeout() -> None:
    """Each probe is ``GET {url}/engines/v1/responses/{id}``, no body, JSON accepted, endpoint headers, timeout."""
    h = Harness("a", "b", timeout=1.5, headers={"X-Api-Key": "k1"})
    h.locate(RID, "a", "b")
    calls = h.client.calls
    assert [(c.endpoint, c.method, c.url, c.body, c.header_timeout) for c in calls] == [
        ("a", b"GET", f"http://a.test:1{PROBE_PATH}{RID}".encode(), None, 1.5),
        ("b", b"GET", f"http://b.test:1{PROBE_PATH}{RID}".encode(), None, 1.5),
    ]
    assert PROBE_PATH == "/engines/v1/responses/"
    headers = calls[0].headers
    assert header_values(headers, b"accept") == [b"application/json"]
    assert header_values(headers, b"user-agent") == [USER_AGENT]
    assert header_values(headers, b"x-api-key") == [b"k1"]


def test_the_first_200_wins_before_the_slow_probes_answer() -> None:
    """Locate fires with the first endpoint to answer 200 while the others are still outstanding."""
    h = Harness("a", "b", "c")
    _, results = h.locate(RID, "a", "b", "c")
    h.client.answer("b", 200)
    assert result_name(results) == "b"
    assert h.client.pending() == ["a", "c"]
    h.clock.advance(1)
    h.client.answer("a", 200)  # a late second holder changes nothing
    h.client.answer("c", 404)
    assert result_name(results) == "b"
    assert h.directory.owner(RID) == "b"
    assert h.observed == [(FOUND, 0.0)]


def test_no_holder_fires_none_and_observes_missing_with_the_duration() -> None:
    """When every probe answers 404, locate fires with None, remembers nothing and reports ("missing", seconds)."""
    h = Harness("a", "b", "c")
    _, results = h.locate(RID, "a", "b", "c")
    h.clock.advance(0.5)
    h.client.answer("a", 404)
    h.clock.advance(1.0)
    h.client.answer("c", 404)
    assert results == []  # b has not answered yet
    h.client.answer("b", 404)
    assert result_name(results) is None
    assert h.directory.owner(RID) is None
    assert len(h.directory) == 0
    assert h.observed == [(MISSING, 1.5)]


@pytest.mark.parametrize("code", [201, 204, 301, 400, 410, 500, 503])
def test_only_a_200_means_holding(code: int) -> None:
    """An endpoint answering anything but 200 does not hold the response."""
    h = Harness("a")
    _, results = h.locate(RID, "a")
    h.client.answer("a", code)
    assert result_name(results) is None
    assert h.observed == [(MISSING, 0.0)]


def test_refused_and_failing_probes_count_as_not_holding() -> None:
    """A refused probe or one failing with any exception is a "no", and locate still fires (with None)."""
    h = Harness("a", "b")
    _, results = h.locate(RID, "a", "b")
    h.client.refuse("a")
    h.client.blow_up("b")
    assert result_name(results) is None
    assert h.observed == [(MISSING, 0.0)]


def test_a_refused_probe_does_not_hide_a_later_holder() -> None:
    """A refusal before the holder's 200 still lets the holder win."""
    h = Harness("a", "b")
    _, results = h.locate(RID, "a", "b")
    h.client.refuse("a")
    assert results == []
    h.client.answer("b", 200)
    assert result_name(results) == "b"


def test_a_probe_that_raises_counts_as_not_holding() -> None:
    """A candidate whose ``client.request`` raises at once counts as not holding; locate fires with None."""
    h = Harness("a", "b")
    h.client.raise_for.add("a")
    try:
        _, results = h.locate(RID, "a", "b")
        h.client.answer("b", 404)
        assert results == [None]
    finally:
        gc.collect()  # any "Unhandled error in Deferred" is logged here, not in a later test


def test_a_body_that_never_ends_is_cut_off_by_the_timeout() -> None:
    """A probe answered with a stalled body is settled by the probe timeout on the clock."""
    h = Harness("a", timeout=2.0)
    _, results = h.locate(RID, "a")
    resp = h.client.answer("a", 404, end=None)
    h.clock.advance(1.9)
    assert results == []
    h.clock.advance(0.1)
    assert result_name(results) is None
    assert resp.transport.stopped == 1  # the body read was abandoned, so the connection is let go
    assert h.observed == [(MISSING, 2.0)]


def test_a_200_whose_body_breaks_still_names_the_holder() -> None:
    """A 200 followed by a lost connection mid-body still means that endpoint holds the response."""
    h = Harness("a")
    _, results = h.locate(RID, "a")
    h.client.answer("a", 200, end=ConnectionLost())
    assert result_name(results) == "a"


# -- what is never probed


@pytest.mark.parametrize(
    "rid",
    ["", "resp_../x", "resp_1/../../models", "resp 1", "resp_1?x=1", "resp_%2e", "résp_1", "r" * 129, "resp_1\n"],
)
def test_an_invalid_id_is_never_probed(rid: str) -> None:
    """An id that could not be a response id fires None at once without any request."""
    h = Harness("a", "b")
    _, results = h.locate(rid, "a", "b")
    assert result_name(results) is None
    assert h.client.calls == []


def test_the_longest_valid_id_is_probed() -> None:
    """An id of 128 allowed characters is probed (the limit is inclusive)."""
    h = Harness("a")
    rid = "r_-9" * 32
    h.locate(rid, "a")
    assert [c.url for c in h.client.calls] == [f"http://a.test:1{PROBE_PATH}{rid}".encode()]


def test_no_candidates_fires_none_without_a_request() -> None:
    """Locating among no endpoints fires None at once."""
    h = Harness("a")
    _, results = h.locate(RID)
    assert result_name(results) is None
    assert h.client.calls == []


# -- coalescing


def test_concurrent_locates_of_one_id_share_one_probe_round() -> None:
    """Two locates of the same id make one probe per candidate, and both fire with the holder."""
    h = Harness("a", "b", "c")
    first, firsts = h.locate(RID, "a", "b", "c")
    second, seconds = h.locate(RID, "a", "b", "c")
    assert first is not second
    assert h.client.pending() == ["a", "b", "c"]
    h.client.answer("a", 404)
    h.client.answer("c", 200)
    assert (result_name(firsts), result_name(seconds)) == ("c", "c")
    assert firsts[0] is seconds[0]
    assert len(h.client.calls) == 3
    assert h.observed == [(FOUND, 0.0)]


def test_a_locate_after_the_round_ended_probes_again() -> None:
    """Once a round has fired, the next locate of that id starts a new round."""
    h = Harness("a")
    _, results = h.locate(RID, "a")
    h.client.answer("a", 404)
    assert result_name(results) is None
    _, again = h.locate(RID, "a")
    assert h.client.pending() == ["a"]
    assert len(h.client.calls) == 2
    h.client.answer("a", 200)
    assert result_name(again) == "a"


def test_locates_of_different_ids_do_not_coalesce() -> None:
    """Two ids located at once each get their own probes and their own answer."""
    h = Harness("a", "b")
    _, ones = h.locate("resp_one", "a", "b")
    _, twos = h.locate("resp_two", "a", "b")
    assert [c.url.rsplit(b"/", 1)[1] for c in h.client.calls] == [b"resp_one", b"resp_one", b"resp_two", b"resp_two"]
    (one_b,) = [c for c in h.client.calls if c.endpoint == "b" and c.url.endswith(b"resp_one")]
    (two_a,) = [c for c in h.client.calls if c.endpoint == "a" and c.url.endswith(b"resp_two")]
    one_b.settled = two_a.settled = True
    h.client.outstanding -= 2
    one_b.deferred.callback(FakeResponse(200))
    two_a.deferred.callback(FakeResponse(200))
    assert (result_name(ones), result_name(twos)) == ("b", "a")
    assert (h.directory.owner("resp_one"), h.directory.owner("resp_two")) == ("b", "a")


# -- cancelling


def test_cancelling_one_waiter_leaves_the_others_waiting() -> None:
    """A cancelled locate fails with CancelledError; the other waiter still gets the holder."""
    h = Harness("a", "b")
    first, firsts = h.locate(RID, "a", "b")
    _, seconds = h.locate(RID, "a", "b")
    first.cancel()
    assert len(firsts) == 1 and isinstance(firsts[0], Failure) and firsts[0].check(CancelledError)
    assert seconds == []
    h.client.answer("a", 404)
    h.client.answer("b", 200)
    assert result_name(seconds) == "b"
    assert len(firsts) == 1  # the cancelled one is not fired again
    assert h.directory.owner(RID) == "b"


def test_cancelling_the_only_waiter_still_lets_the_probes_finish_and_remember() -> None:
    """With every waiter gone the round still completes, the holder is remembered, and a later locate joins it."""
    h = Harness("a", "b")
    first, firsts = h.locate(RID, "a", "b")
    first.cancel()
    assert len(firsts) == 1 and isinstance(firsts[0], Failure) and firsts[0].check(CancelledError)
    _, later = h.locate(RID, "a", "b")  # joins the round still under way
    assert len(h.client.calls) == 2
    h.client.answer("b", 200)
    assert result_name(later) == "b"
    h.client.answer("a", 404)
    assert h.directory.owner(RID) == "b"
    assert h.observed == [(FOUND, 0.0)]


# -- the probe bound


def test_at_most_max_probes_are_outstanding() -> None:
    """With ``max_probes=2`` and five candidates, never more than two requests are out, and all five are made."""
    h = Harness("a", "b", "c", "d", "e", max_probes=2)
    _, results = h.locate(RID, "a", "b", "c", "d", "e")
    assert h.client.pending() == ["a", "b"]
    h.client.answer("a", 404)
    assert h.client.pending() == ["b", "c"]
    h.client.refuse("c")
    assert h.client.pending() == ["b", "d"]
    h.client.answer("b", 404)
    h.client.answer("d", 404)
    assert h.client.pending() == ["e"]
    h.client.answer("e", 404)
    assert result_name(results) is None
    assert [c.endpoint for c in h.client.calls] == ["a", "b", "c", "d", "e"]
    assert h.client.most_outstanding == 2
    assert h.client.outstanding == 0


def test_the_probe_bound_is_shared_by_every_locate() -> None:
    """The bound holds across ids: a second id's probes wait for the first id's to finish."""
    h = Harness("a", "b", max_probes=2)
    _, ones = h.locate("resp_one", "a", "b")
    _, twos = h.locate("resp_two", "a", "b")
    assert len(h.client.calls) == 2
    h.client.answer("a", 200)  # resp_one found on a; its slot goes to resp_two's first probe
    assert result_name(ones) == "a"
    assert [c.url.rsplit(b"/", 1)[1] for c in h.client.calls] == [b"resp_one", b"resp_one", b"resp_two"]
    h.client.answer("b", 404)
    h.client.answer("a", 404)
    h.client.answer("b", 200)
    assert result_name(twos) == "b"
    assert h.client.most_outstanding == 2


def test_slots_come_back_after_failed_probes() -> None:
    """Refused probes give their slot back: with one slot, a later locate still probes."""
    h = Harness("a", max_probes=1)
    _, results = h.locate("resp_one", "a")
    h.client.refuse("a")
    assert result_name(results) is None
    _, again = h.locate("resp_two", "a")
    assert h.client.pending() == ["a"]
    h.client.answer("a", 200)
    assert result_name(again) == "a"


# -- reconfigure


def test_reconfigure_changes_the_timeout_and_the_bound() -> None:
    """After a reload, probes carry the new timeout and at most the new number are outstanding."""
    h = Harness("a", "b", "c", timeout=2.0, max_probes=32)
    h.affinity.reconfigure(affinity_config(probe_timeout="500ms", max_concurrent_probes=1))
    assert h.affinity.timeout == 0.5
    _, results = h.locate(RID, "a", "b", "c")
    assert h.client.pending() == ["a"]
    assert h.client.calls[0].header_timeout == 0.5
    h.client.answer("a", 404)
    assert h.client.pending() == ["b"]
    h.client.answer("b", 200)
    assert result_name(results) == "b"
    assert h.client.most_outstanding == 1


def test_reconfigure_raising_the_bound_lets_more_probes_out() -> None:
    """A reload from one probe slot to three sends three probes at once."""
    h = Harness("a", "b", "c", max_probes=1)
    h.affinity.reconfigure(affinity_config(max_concurrent_probes=3))
    h.locate(RID, "a", "b", "c")
    assert h.client.pending() == ["a", "b", "c"]
    assert [c.header_timeout for c in h.client.calls] == [2.0, 2.0, 2.0]  # the default probe_timeout


def test_the_new_timeout_cuts_a_stalled_body() -> None:
    """A reloaded probe timeout also bounds the body read."""
    h = Harness("a", timeout=2.0)
    h.affinity.reconfigure(affinity_config(probe_timeout="250ms"))
    _, results = h.locate(RID, "a")
    h.client.answer("a", 404, end=None)
    h.clock.advance(0.25)
    assert result_name(results) is None


# -- the directory passthrough


def test_remember_owner_and_forget_go_to_the_directory() -> None:
    """``remember`` / ``owner`` / ``forget`` read and write the shared directory."""
    h = Harness("a")
    h.affinity.remember(RID, "a")
    assert (h.directory.owner(RID), h.affinity.owner(RID)) == ("a", "a")
    h.affinity.forget(RID)
    assert (h.directory.owner(RID), h.affinity.owner(RID), len(h.directory)) == (None, None, 0)
