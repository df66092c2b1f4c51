"""
Unit tests of :mod:`olladmr.proxy.relay`: :class:`ResponseRelay` driven
directly (as ``IResponse.deliverBody`` would), :class:`StreamWatch` and
:class:`UsageTail`, on a :class:`~twisted.internet.task.Clock` with the
in-memory fakes of :mod:`proxyfakes`.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyfakes import FakeRequest, FakeUpstreamTransport, connection_lost, sse_event
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from olladmr.proxy.record import CLIENT_DISCONNECTED, OK, READ_TIMEOUT, REQUEST_TIMEOUT, UPSTREAM_TRUNCATED
from olladmr.proxy.relay import ResponseRelay, StreamWatch, UsageTail, parse_usage, usage_window

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)
"""Hypothesis settings: deterministic (derandomised, no example database), no deadline."""


# --------------------------------------------------------------------------- fakes


class Relayed:
    """One relay under test with its clock, request, upstream transport and every ``on_done`` call."""

    def __init__(self, *, sse: bool, read_timeout: float = 10.0, usage: bool = False, connect: bool = True) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.transport = FakeUpstreamTransport()
        self.done: list[tuple[str, int]] = []
        self.relay = ResponseRelay(
            cast(Any, self.request),
            self.clock,
            read_timeout,
            StreamWatch() if sse else None,
            lambda outcome, sent: self.done.append((outcome, sent)),
            "dmr-1",
            UsageTail() if usage else None,
        )
        if connect:
            self.relay.makeConnection(cast(Any, self.transport))

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.relay.dataReceived(chunk)

    def end(self, reason: Exception | None = None) -> None:
        self.relay.connectionLost(Failure(reason or ResponseDone()))


CHUNK_1 = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
CHUNK_2 = b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}\n\n'
FINISH = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"
IN_BAND_ERROR = b'data: {"error":{"message":"context length exceeded","type":"server_error"}}\n\n'
CLEAN_ENDS = [ResponseDone(), PotentialDataLoss()]
CLEAN_IDS = ["ResponseDone", "PotentialDataLoss"]


# --------------------------------------------------------------------------- ResponseRelay


def test_connection_made_registers_the_upstream_as_a_streaming_producer_and_arms_the_read_timer() -> None:
    """connectionMade registers the upstream transport as a push producer on the request and starts the read timer."""
    r = Relayed(sse=False, read_timeout=7.5)
    assert r.request.producer is r.transport and r.request.streaming is True
    assert [call.getTime() for call in r.clock.getDelayedCalls()] == [7.5]
    assert r.transport.calls == [] and r.done == []


def test_zero_read_timeout_arms_no_timer() -> None:
    """With read_timeout 0 no timer is armed, so silence never ends the relay."""
    r = Relayed(sse=False, read_timeout=0)
    assert r.clock.getDelayedCalls() == []
    r.clock.advance(10_000)
    assert r.transport.calls == [] and r.done == []


def test_each_chunk_is_written_at_once_without_coalescing() -> None:
    """Every upstream chunk is written to the client the moment it arrives, as its own write."""
    r = Relayed(sse=True)
    r.clock.advance(1.5)
    for expected, chunk in enumerate([CHUNK_1, b"x", CHUNK_2], start=1):
        r.feed(chunk)
        assert len(r.request.written) == expected
        assert r.request.written[-1] == chunk
    assert r.relay.bytes == len(CHUNK_1) + 1 + len(CHUNK_2)
    assert r.relay.first_byte_at == 1.5


def test_read_timer_resets_on_each_chunk() -> None:
    """The read timeout counts from the last chunk, not from the start."""
    r = Relayed(sse=True, read_timeout=5)
    r.clock.advance(4)
    r.feed(CHUNK_1)
    r.clock.advance(4)
    r.feed(CHUNK_2)
    r.clock.advance(4.9)
    assert r.transport.calls == []
    assert [call.getTime() for call in r.clock.getDelayedCalls()] == [13.0]
    r.clock.advance(0.1)
    assert r.transport.calls == ["stopProducing"]


def test_read_timeout_on_a_stream_ends_it_with_an_sse_error_event() -> None:
    """A stream silent for read_timeout is stopped and, once the upstream closes, finished with a read_timeout error event."""
    r = Relayed(sse=True, read_timeout=5)
    r.feed(CHUNK_1)
    r.clock.advance(5)
    assert r.transport.calls == ["stopProducing"]
    assert r.done == [] and not r.request.finished
    r.end(connection_lost())

    assert r.request.written[0] == CHUNK_1 and len(r.request.written) == 2
    assert sse_event(r.request.written[1]) == {
        "error": {
            "message": "the upstream sent nothing for longer than proxy.read_timeout",
            "type": "upstream_error",
            "code": "read_timeout",
        }
    }
    assert r.request.finished and r.request.finish_calls == 1
    assert r.request.transport.aborted == 0
    assert r.request.unregistered == 1
    assert r.done == [(READ_TIMEOUT, len(CHUNK_1))]
    assert r.clock.getDelayedCalls() == []


def test_read_timeout_on_a_plain_body_aborts_the_client_connection() -> None:
    """A non-stream body silent for read_timeout ends with the client connection aborted, not finished."""
    r = Relayed(sse=False, read_timeout=5)
    r.feed(b'{"partial":')
    r.clock.advance(5)
    assert r.transport.calls == ["stopProducing"]
    r.end(connection_lost())

    assert r.request.written == [b'{"partial":']
    assert r.request.transport.aborted == 1
    assert not r.request.finished and r.request.finish_calls == 0
    assert r.done == [(READ_TIMEOUT, 11)]
    assert r.clock.getDelayedCalls() == []


@pytest.mark.parametrize("reason", CLEAN_ENDS, ids=CLEAN_IDS)
def test_clean_end_of_a_plain_body_finishes_the_request(reason: Exception) -> None:
    """A plain body that ends with ResponseDone or PotentialDataLoss finishes the request and unregisters the producer."""
    r = Relayed(sse=False)
    r.feed(b'{"a":', b"1}")
    r.end(reason)

    assert r.request.body == b'{"a":1}'
    assert r.request.finished and r.request.finish_calls == 1
    assert r.request.producer is None and r.request.unregistered == 1
    assert r.request.transport.aborted == 0
    assert r.transport.calls == []
    assert r.done == [(OK, 7)]
    assert r.clock.getDelayedCalls() == []


@pytest.mark.parametrize("reason", CLEAN_ENDS, ids=CLEAN_IDS)
@pytest.mark.parametrize(
    "stream",
    [[CHUNK_1, FINISH, DONE], [CHUNK_1, DONE], [CHUNK_1, FINISH], [CHUNK_1, IN_BAND_ERROR]],
    ids=["finish-and-done", "done", "finish-reason", "in-band-error"],
)
def test_complete_stream_with_a_clean_end_is_finished_unchanged(stream: list[bytes], reason: Exception) -> None:
    """A stream that said it is over ([DONE], a finish_reason or an in-band error) and closed cleanly is finished with nothing added."""
    r = Relayed(sse=True)
    r.feed(*stream)
    r.end(reason)

    assert r.request.written == stream
    assert r.request.finished and r.request.finish_calls == 1
    assert r.done == [(OK, sum(map(len, stream)))]


@pytest.mark.parametrize("reason", CLEAN_ENDS, ids=CLEAN_IDS)
def test_stream_that_closed_cleanly_without_an_end_marker_is_truncated(reason: Exception) -> None:
    """An event stream that closed cleanly but never sent [DONE] or a finish_reason gets an upstream_truncated error event."""
    r = Relayed(sse=True)
    r.feed(CHUNK_1, CHUNK_2)
    r.end(reason)

    assert r.request.written[:2] == [CHUNK_1, CHUNK_2] and len(r.request.written) == 3
    assert sse_event(r.request.written[2])["error"]["code"] == "upstream_truncated"
    assert b"[DONE]" not in r.request.body
    assert r.request.finished
    assert r.done == [(UPSTREAM_TRUNCATED, len(CHUNK_1 + CHUNK_2))]


def test_stream_cut_mid_event_gets_a_blank_line_before_the_error_event() -> None:
    """An error event after a half-sent event is preceded by a blank line so it parses as its own event."""
    r = Relayed(sse=True)
    r.feed(CHUNK_1, b'data: {"choices":[{"del')
    r.end(connection_lost())

    last = r.request.written[-1]
    assert last.startswith(b"\n\ndata: ")
    assert sse_event(last[2:])["error"]["code"] == "upstream_truncated"
    assert r.done == [(UPSTREAM_TRUNCATED, len(CHUNK_1) + 23)]


@pytest.mark.parametrize(
    "reason", [connection_lost(), ConnectionDone(), ValueError("parser error")], ids=["lost", "done", "other"]
)
def test_unclean_end_of_a_plain_body_aborts_the_client(reason: Exception) -> None:
    """A plain body ending with anything but ResponseDone/PotentialDataLoss aborts the client connection."""
    r = Relayed(sse=False)
    r.feed(b"partial")
    r.end(reason)

    assert r.request.transport.aborted == 1 and not r.request.finished
    assert r.request.written == [b"partial"]
    assert r.done == [(UPSTREAM_TRUNCATED, 7)]


def test_stop_for_a_client_that_left_stops_the_producer_and_writes_nothing() -> None:
    """stop(CLIENT_DISCONNECTED) stops the upstream producer; the end then neither writes, finishes nor unregisters."""
    r = Relayed(sse=True)
    r.feed(CHUNK_1)
    r.request.lose_client()
    r.relay.stop(CLIENT_DISCONNECTED)

    assert r.transport.calls == ["stopProducing"]
    assert r.relay.client_gone is True
    r.end(connection_lost())
    assert r.request.written == [CHUNK_1] and r.request.dropped == []
    assert r.request.finish_calls == 0 and r.request.unregistered == 0
    assert r.request.transport.aborted == 0
    assert r.done == [(CLIENT_DISCONNECTED, len(CHUNK_1))]
    assert r.clock.getDelayedCalls() == []


def test_chunks_arriving_after_the_client_left_are_not_written() -> None:
    """Bytes already in flight from the upstream after the client left are not written to the request."""
    r = Relayed(sse=False)
    r.request.lose_client()
    r.relay.stop(CLIENT_DISCONNECTED)
    r.feed(b"late")
    assert r.request.written == [] and r.request.dropped == []


def test_stop_is_idempotent_and_on_done_is_called_once_with_the_first_reason() -> None:
    """A second stop does not stop the producer again, and on_done reports the first reason exactly once."""
    r = Relayed(sse=True, read_timeout=5)
    r.feed(CHUNK_1)
    r.relay.stop(REQUEST_TIMEOUT)
    r.clock.advance(5)  # the read timer fires too
    r.relay.stop(READ_TIMEOUT)
    assert r.transport.calls == ["stopProducing"]
    r.end(connection_lost())

    assert r.done == [(REQUEST_TIMEOUT, len(CHUNK_1))]
    assert sse_event(r.request.written[-1])["error"]["code"] == "request_timeout"


def test_stop_before_a_clean_end_is_still_reported_as_the_stop_reason() -> None:
    """A stream that was stopped is never reported ok, even if the upstream then closes cleanly."""
    r = Relayed(sse=False)
    r.feed(b"{}")
    r.relay.stop(REQUEST_TIMEOUT)
    r.end(ResponseDone())
    assert r.done == [(REQUEST_TIMEOUT, 2)]
    assert r.request.transport.aborted == 1 and not r.request.finished


def test_client_leaving_after_a_read_timeout_still_reports_done_once() -> None:
    """A client that leaves after the read timeout stopped the stream is not written to or finished, and on_done still runs once."""
    r = Relayed(sse=True, read_timeout=5)
    r.feed(CHUNK_1)
    r.clock.advance(5)
    r.request.lose_client()
    r.relay.stop(CLIENT_DISCONNECTED)
    r.end(connection_lost())  # must not touch the request: Twisted would raise RuntimeError on finish()

    assert r.request.finish_calls == 0
    assert r.done == [(READ_TIMEOUT, len(CHUNK_1))]  # what stopped the stream first


def test_usage_tail_is_fed_with_the_relayed_bytes() -> None:
    """A relay given a UsageTail exposes the body's usage object after the end."""
    r = Relayed(sse=False, usage=True)
    r.feed(b'{"id":"x","usage":{"prompt_tokens":2,', b'"completion_tokens":4}}')
    r.end()
    assert r.relay.usage is not None
    assert r.relay.usage.usage() == {"prompt_tokens": 2, "completion_tokens": 4}
    assert r.done == [(OK, 60)]


# --------------------------------------------------------------------------- StreamWatch


def watch_of(*chunks: bytes) -> StreamWatch:
    watch = StreamWatch()
    for chunk in chunks:
        watch.feed(chunk)
    return watch


def verdict(watch: StreamWatch) -> tuple[bool, bool, bool, bool, bool]:
    return (watch.done, watch.finished, watch.error, watch.complete, watch.at_event_boundary)


@pytest.mark.parametrize(
    "stream, expected",
    [
        (b"", (False, False, False, False, True)),
        (CHUNK_1 + CHUNK_2, (False, False, False, False, True)),
        (CHUNK_1 + DONE, (True, False, False, True, True)),
        (CHUNK_1 + FINISH, (False, True, False, True, True)),
        (b'data: {"choices":[{"finish_reason": "length"}]}\n\n', (False, True, False, True, True)),
        (IN_BAND_ERROR, (False, False, True, True, True)),
        (b'data:{"error":"x"}\n\n', (False, False, True, True, True)),
        (CHUNK_1 + b'data: {"cho', (False, False, False, False, False)),
        (CHUNK_1.replace(b"\n\n", b"\r\n\r\n"), (False, False, False, False, True)),
    ],
    ids=["empty", "no-end", "done", "finish", "finish-spaced", "error", "error-tight", "mid-event", "crlf"],
)
def test_stream_watch_verdicts(stream: bytes, expected: tuple[bool, bool, bool, bool, bool]) -> None:
    """StreamWatch reports [DONE], a non-null finish_reason, an in-band error and whether the stream sits at an event boundary."""
    assert verdict(watch_of(stream)) == expected


EVENTS = [CHUNK_1, CHUNK_2, FINISH, DONE, IN_BAND_ERROR, b": keep-alive\n\n", b'data: {"choices":[]}\n\n']


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """An SSE stream made of known events (maybe cut short), and the same bytes split at random points."""
    events = draw(st.lists(st.sampled_from(EVENTS), max_size=8))
    stream = b"".join(events)
    stream = stream[: draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])]


@PROPERTY
@given(split_stream())
def test_stream_watch_verdict_does_not_depend_on_chunk_boundaries(case: tuple[bytes, list[bytes]]) -> None:
    """However the stream is split into chunks (markers cut in two included), StreamWatch reaches the same verdict as on the whole."""
    stream, chunks = case
    assert verdict(watch_of(*chunks)) == verdict(watch_of(stream))


def test_stream_watch_finds_markers_split_byte_by_byte() -> None:
    """Each marker is found even when delivered one byte at a time."""
    for stream, flag in [(DONE, "done"), (FINISH, "finished"), (IN_BAND_ERROR, "error")]:
        watch = watch_of(*(stream[i : i + 1] for i in range(len(stream))))
        assert getattr(watch, flag) is True, flag
        assert watch.complete


# --------------------------------------------------------------------------- UsageTail


USAGE = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}


def sse_with_usage(padding: int = 0) -> bytes:
    """A stream whose chunks carry ``"usage":null`` and whose last chunk carries the usage (and timings)."""
    content = "x" * padding
    early = f'data: {{"choices":[{{"delta":{{"content":"{content}"}}}}],"usage":null}}\n\n'.encode()
    final = json.dumps({"choices": [], "usage": USAGE, "timings": {"predicted_ms": 1.5}}, separators=(",", ":"))
    return early * 3 + b"data: " + final.encode() + b"\n\n" + DONE


def tail_of(*chunks: bytes) -> UsageTail:
    tail = UsageTail()
    for chunk in chunks:
        tail.feed(chunk)
    return tail


def test_usage_tail_returns_the_last_usage_object() -> None:
    """The last non-null usage object wins over earlier ``"usage":null`` ones and earlier usage objects."""
    body = b'{"usage":{"completion_tokens":1}}\n' + sse_with_usage()
    assert tail_of(body).usage() == USAGE


def test_usage_tail_without_usage_is_none() -> None:
    """A body with no usage object (or only nulls, or a truncated one) gives None."""
    assert tail_of(CHUNK_1, DONE).usage() is None
    assert tail_of(b'data: {"usage":null}\n\n').usage() is None
    assert tail_of(b'{"usage":{"prompt_tokens":1,').usage() is None


def test_usage_tail_forgets_what_is_older_than_its_size() -> None:
    """A usage object is found while its ``"usage"`` key is within the last UsageTail.SIZE bytes, and lost once the key slid out."""
    usage = b'{"usage":{"completion_tokens":9}}'
    assert tail_of(usage, b" " * (UsageTail.SIZE - len(usage))).usage() == {"completion_tokens": 9}
    assert tail_of(usage, b" " * (UsageTail.SIZE - len(usage) + 1)).usage() == {"completion_tokens": 9}  # only '{' lost
    assert tail_of(usage, b" " * (UsageTail.SIZE - len(usage) + 2)).usage() is None  # '{"' lost: the key is cut
    assert tail_of(usage + b" " * UsageTail.SIZE).usage() is None  # in one big chunk as well


@PROPERTY
@given(st.integers(0, 3000), st.data())
def test_usage_tail_finds_usage_split_anywhere_and_stays_bounded(padding: int, data: st.DataObject) -> None:
    """However the body is chunked, the final usage is found and the tail never holds more than UsageTail.SIZE bytes (the body's last bytes)."""
    body = sse_with_usage(padding)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    bounds = [0, *cuts, len(body)]
    tail = UsageTail()
    seen = b""
    for a, b in zip(bounds, bounds[1:]):
        tail.feed(body[a:b])
        seen += body[a:b]
        kept: bytes = tail._tail  # the window itself: the only way to check its size
        assert len(kept) <= UsageTail.SIZE
        assert kept == usage_window(seen[-UsageTail.SIZE :])  # the last SIZE bytes, from their first "usage" key
        assert parse_usage(kept) == parse_usage(seen[-UsageTail.SIZE :])
    assert tail.usage() == USAGE


def test_usage_window_keeps_only_what_a_usage_key_could_be_in() -> None:
    """No key: the last 6 bytes (a key may be split across reads); otherwise from the first key on."""
    assert usage_window(b"data: " + b"x" * 500) == b"x" * 6
    assert usage_window(b'xx"usag') == b'x"usag'
    assert usage_window(b'zzz"usage":null,"usage":{"a":1}') == b'"usage":null,"usage":{"a":1}'
    assert usage_window(b'"us') == b'"us'
    held = UsageTail()
    for _ in range(200):
        held.feed(b'data: {"choices":[{"delta":{"content":" token"}}]}\n\n')
    assert len(held._tail) == 6  # a held stream without usage keeps next to nothing


def test_parse_usage_ignores_a_usage_key_not_followed_by_an_object() -> None:
    """A ``"usage"`` key whose value is not an object is skipped for the previous one."""
    assert parse_usage(b'{"usage":{"total_tokens":3}} {"usage":"n/a"} {"x":{}}') == {"total_tokens": 3}
