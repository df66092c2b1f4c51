"""olladmr in front of upstreams that break the protocol.

The upstream is a :class:`fakebroken.BrokenUpstream`: it answers the health
check normally and misbehaves on every POST (garbage, a close mid-headers,
1 MB of headers, silence, endless or stalled bodies, a body delimited by
closing, a chunked SSE stream cut before ``[DONE]``).  Requests are written
and answers read as raw bytes (:mod:`rawhttp`).  Each test checks what the
client got (status, OpenAI-shaped JSON error, how the response ended, whether
olladmr closed the connection), how the access log says the request ended
(``outcome``), and that afterwards the daemon is healthy, the broken
upstream's connection is closed and nothing was logged as a failure.

No assertion is about how long anything took: which timeout ended a request
shows in its answer and its access-log outcome (``request_timeout``,
``read_timeout``, ``upstream_timeout``); the timeouts themselves are tested
with a fake clock in the unit tests.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import pytest_twisted
from conftest import Daemon, config_for, eventually

from fakebroken import BrokenUpstream
from fakedmr import FakeDMR
from rawhttp import HANG_GUARD, LogWatch, assert_daemon_healthy, chat_wire, olladmr_error_problem, raw_exchange


def _broken_config(broken: BrokenUpstream, healthy: FakeDMR, **proxy: Any) -> Any:
    """The broken upstream serves ai/smollm2 only; a healthy fake serves ai/llama3.2 only."""
    return config_for(broken, healthy, proxy={"response_header_timeout": "2s", **proxy})


@pytest_twisted.async_yield_fixture
async def broken():
    upstream = BrokenUpstream(name="broken")
    # Endless bodies really are endless here (the fixture's stop() aborts them): an upstream
    # connection found closed was closed by olladmr, never by the fake's own bound.
    upstream.endless_limit = 10 * HANG_GUARD
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest_twisted.async_yield_fixture
async def healthy():
    dmr = FakeDMR(models=("ai/llama3.2",), name="healthy")
    await dmr.start()
    yield dmr
    await dmr.stop()


async def _after_broken(daemon: Daemon, broken: BrokenUpstream, logs: LogWatch) -> None:
    """The daemon stays healthy; no upstream connection or exchange is leaked; nothing crashed."""
    await assert_daemon_healthy(daemon, model="ai/llama3.2")
    await eventually(lambda: broken.open_posts == 0, 5.0, "the broken upstream's POST connections closed")
    assert not logs.bad, logs.describe()


PRE_HEADER_MODES = ["garbage", "close_mid_headers", "close_silently", "huge_header_line", "stall_headers"]


@pytest.mark.parametrize("mode", PRE_HEADER_MODES)
@pytest_twisted.ensureDeferred
async def test_broken_upstream_before_headers_gives_502_json(daemon_factory, broken, healthy, mode):
    """No usable status line/headers: the client gets olladmr's JSON 502 (504 for silence), not a hang."""
    daemon = await daemon_factory(_broken_config(broken, healthy))
    broken.mode = mode
    with LogWatch() as logs:
        for attempt in range(2):  # once on a pooled (health-check) connection, once more
            result = await raw_exchange(daemon.port, chat_wire(daemon.port), timeout=HANG_GUARD)
            assert not result.hung and result.responses, f"{mode}: no answer"
            response = result.responses[0]
            print(f"\n{mode} #{attempt}: {response.status} {response.body[:300]!r} after {result.elapsed:.2f}s")
            expected = 504 if mode == "stall_headers" else 502
            assert response.status == expected, response.body
            assert olladmr_error_problem(response) is None
            error = json.loads(response.body)["error"]
            assert error["type"] == "upstream_error"
            if mode == "stall_headers":  # answered by proxy.response_header_timeout, nothing else
                assert error["code"] == "upstream_timeout" and "response_header_timeout" in error["message"], error
            else:  # answered because the upstream broke the protocol, not by a timeout
                assert error["code"] in ("bad_response", "connection_reset"), error
            event = await logs.access_event(attempt)
            assert (event["status"], event["outcome"]) == (expected, "upstream_error"), event
        await _after_broken(daemon, broken, logs)
    print(f"{mode}: the broken upstream received {broken.posts} POSTs for 2 client requests")


@pytest_twisted.ensureDeferred
async def test_broken_upstream_huge_headers_gives_502(daemon_factory, broken, healthy):
    """1 MB of response header lines is not a usable answer: a JSON 502 (nginx: 'upstream sent too big header')."""
    daemon = await daemon_factory(_broken_config(broken, healthy))
    broken.mode = "huge_headers"
    with LogWatch() as logs:
        for attempt in range(2):
            result = await raw_exchange(daemon.port, chat_wire(daemon.port), timeout=HANG_GUARD)
            assert not result.hung and result.responses, "no answer"
            response = result.responses[0]
            print(f"\nhuge_headers #{attempt}: {response.status}, {len(response.headers)} headers, "
                  f"body {response.body[:160]!r}, {result.elapsed:.2f}s")
            assert response.status == 502 and olladmr_error_problem(response) is None
            assert len(response.headers) < 50
            assert json.loads(response.body)["error"]["code"] != "upstream_timeout"
            event = await logs.access_event(attempt)
            assert (event["status"], event["outcome"]) == (502, "upstream_error"), event
        await _after_broken(daemon, broken, logs)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_no_content_length_then_close(daemon_factory, broken, healthy):
    """A body delimited by the upstream closing is valid HTTP/1.1: relayed whole, response ended cleanly."""
    daemon = await daemon_factory(_broken_config(broken, healthy))
    broken.mode = "no_content_length_then_close"
    with LogWatch() as logs:
        result = await raw_exchange(daemon.port, chat_wire(daemon.port), timeout=HANG_GUARD)
        assert not result.hung and result.responses
        response = result.responses[0]
        print(f"\nno_content_length_then_close: {response.status} complete={response.complete} "
              f"te={response.header(b'transfer-encoding')!r} body={response.body!r} {result.elapsed:.2f}s")
        assert response.status == 200 and response.complete
        assert json.loads(response.body)["choices"][0]["message"]["content"] == "broken but whole"
        event = await logs.access_event(0)
        assert (event["status"], event["outcome"]) == (200, "ok"), event
        await _after_broken(daemon, broken, logs)


@pytest.mark.parametrize("cut", ["between_events", "mid_chunk"])
@pytest_twisted.ensureDeferred
async def test_broken_upstream_truncated_chunked_sse(daemon_factory, broken, healthy, cut):
    """A chunked SSE stream cut before [DONE]: the client gets the events, then an SSE error event, cleanly."""
    daemon = await daemon_factory(_broken_config(broken, healthy))
    broken.mode = "truncated_chunked"
    broken.cut_mid_chunk = cut == "mid_chunk"
    with LogWatch() as logs:
        result = await raw_exchange(daemon.port, chat_wire(daemon.port, stream=True), timeout=HANG_GUARD)
        assert not result.hung and result.responses
        response = result.responses[0]
        print(f"\ntruncated_chunked/{cut}: {response.status} complete={response.complete} "
              f"tail={response.body[-220:]!r} {result.elapsed:.2f}s")
        assert response.status == 200 and response.complete, "the client's response must end cleanly"
        assert b"[DONE]" not in response.body
        events = [e for e in response.body.split(b"\n\n") if e.strip()]
        assert events[0].startswith(b"data: {\"choices\"")
        last = json.loads(events[-1][len(b"data: "):])
        assert last["error"]["code"] == "upstream_truncated"
        event = await logs.access_event(0)
        assert (event["status"], event["outcome"]) == (200, "upstream_truncated"), event
        await _after_broken(daemon, broken, logs)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_endless_body_cut_by_request_timeout(daemon_factory, broken, healthy):
    """An endless Content-Length body: with proxy.request_timeout the client connection is cut (non-SSE)."""
    daemon = await daemon_factory(_broken_config(broken, healthy, request_timeout="2s"))
    broken.mode = "endless_body"
    with LogWatch() as logs:
        result = await raw_exchange(daemon.port, chat_wire(daemon.port), timeout=HANG_GUARD)
        assert not result.hung and result.responses
        response = result.responses[0]
        print(f"\nendless_body: {response.status} declared={response.header(b'content-length')!r} "
              f"got {response.body_bytes} bytes, complete={response.complete}, closed after {result.elapsed:.2f}s")
        assert response.status == 200 and not response.complete and result.closed_by_server
        assert response.body_bytes > 0  # relayed as it came, until the cut
        event = await logs.access_event(0)  # cut by proxy.request_timeout (the upstream never ends)
        assert (event["status"], event["outcome"]) == (200, "request_timeout"), event
        await _after_broken(daemon, broken, logs)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_endless_sse_cut_by_request_timeout(daemon_factory, broken, healthy):
    """An endless SSE stream with proxy.request_timeout: the stream ends with a request_timeout error event."""
    daemon = await daemon_factory(_broken_config(broken, healthy, request_timeout="2s"))
    broken.mode = "endless_sse"
    with LogWatch() as logs:
        result = await raw_exchange(daemon.port, chat_wire(daemon.port, stream=True), timeout=HANG_GUARD)
        assert not result.hung and result.responses
        response = result.responses[0]
        print(f"\nendless_sse: {response.status} got {response.body_bytes} bytes, complete={response.complete}, "
              f"tail={response.body[-160:]!r}, {result.elapsed:.2f}s")
        assert response.status == 200 and response.complete
        assert json.loads(response.body.rstrip().rsplit(b"\n\n", 1)[-1][len(b"data: "):])["error"]["code"] == "request_timeout"
        event = await logs.access_event(0)
        assert (event["status"], event["outcome"]) == (200, "request_timeout"), event
        await _after_broken(daemon, broken, logs)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_endless_body_client_leaves(daemon_factory, broken, healthy):
    """A client leaving an endless body mid-way: olladmr closes the upstream connection."""
    daemon = await daemon_factory(_broken_config(broken, healthy))
    broken.mode = "endless_body"
    with LogWatch() as logs:
        # The body never goes quiet, so the client reads until its timeout fires and then leaves (aborts).
        result = await raw_exchange(daemon.port, chat_wire(daemon.port), expect=None, quiet=0.5, timeout=5.0)
        assert result.responses and result.responses[0].status == 200 and result.responses[0].body_bytes > 0
        assert not result.closed_by_server, "the client left, not olladmr"
        left = time.monotonic()
        # The upstream never ends the body itself (see the fixture): only olladmr can close it.
        await eventually(lambda: broken.open_posts == 0, HANG_GUARD, "upstream connection closed after the client left")
        print(f"\nendless_body, client left after {result.responses[0].body_bytes} bytes: upstream closed "
              f"{(time.monotonic() - left) * 1000:.0f} ms later; {broken.bytes_sent} bytes sent upstream side")
        event = await logs.access_event(0)
        assert (event["status"], event["outcome"]) == (200, "client_disconnected"), event
        await _after_broken(daemon, broken, logs)


@pytest_twisted.ensureDeferred
async def test_broken_upstream_stalled_body_cut_by_read_timeout(daemon_factory, broken, healthy):
    """Headers, some body, then silence: proxy.read_timeout cuts it (connection closed for non-SSE)."""
    daemon = await daemon_factory(_broken_config(broken, healthy, read_timeout="1s"))
    broken.mode = "stall_body"
    with LogWatch() as logs:
        result = await raw_exchange(daemon.port, chat_wire(daemon.port), timeout=HANG_GUARD)
        assert not result.hung and result.responses
        response = result.responses[0]
        print(f"\nstall_body: {response.status} got {response.body_bytes} bytes, complete={response.complete}, "
              f"closed={result.closed_by_server} after {result.elapsed:.2f}s")
        assert response.status == 200 and not response.complete and result.closed_by_server
        assert 0 < response.body_bytes < 1000  # what the upstream sent of its declared 1000 bytes
        event = await logs.access_event(0)  # cut by proxy.read_timeout (the upstream stays silent)
        assert (event["status"], event["outcome"]) == (200, "read_timeout"), event
        await _after_broken(daemon, broken, logs)
