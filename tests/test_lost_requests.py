"""
Requests a DMR loses before any byte of an answer are retried once (issue 20):
an empty 502 or 500 (``Content-Length: 0`` or an empty chunked body), or no headers
for far longer than the endpoint usually takes with its model loaded.  Never
twice, never after an answer started, never when ``proxy.lost_requests.retry``
is off.  The upstream is :class:`fakebroken.BrokenUpstream`, scripted per POST.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from conftest import config_for, eventually

from fakebroken import BrokenUpstream

CHAT = {"model": "ai/smollm2", "messages": [{"role": "user", "content": "hi"}]}
PATH = "/olla/dmr/engines/v1/chat/completions"


@pytest_twisted.async_yield_fixture
async def upstreams() -> AsyncIterator[list[BrokenUpstream]]:
    started = [BrokenUpstream(name=f"up-{i}", mode="ok") for i in range(2)]
    for upstream in started:
        await upstream.start()
    yield started
    for upstream in started:
        await upstream.stop()


def config(*upstreams: BrokenUpstream, **lost: Any) -> Any:
    return config_for(*upstreams, proxy={"lost_requests": lost} if lost else {})


@pytest.mark.parametrize("mode", ["empty_502", "empty_502_chunked", "empty_500"])
@pytest_twisted.ensureDeferred
async def test_an_empty_502_is_retried_once_on_the_same_endpoint_when_it_is_the_only_one(daemon_factory, upstreams, mode):
    (only, _) = upstreams
    only.script = [mode]
    daemon = await daemon_factory(config(only))
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 200 and json.loads(body)["choices"][0]["message"]["content"] == "broken but whole"
    assert only.posts == 2


@pytest_twisted.ensureDeferred
async def test_an_empty_502_is_retried_on_another_endpoint_with_the_model(daemon_factory, upstreams):
    first, second = upstreams  # config_for: the first has the higher priority, so it is tried first
    first.script = ["empty_502"]
    daemon = await daemon_factory(config(first, second))
    response, _ = await daemon.post_json(PATH, CHAT)
    assert response.code == 200 and response.headers.getRawHeaders(b"x-olla-endpoint") == [second.name.encode()]
    assert (first.posts, second.posts) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_only_one_retry_then_the_502_passes_through(daemon_factory, upstreams):
    (only, _) = upstreams
    only.mode = "empty_502"
    daemon = await daemon_factory(config(only))
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 502 and body == b"" and only.posts == 2


@pytest_twisted.ensureDeferred
async def test_with_retry_off_an_empty_502_passes_through(daemon_factory, upstreams):
    (only, _) = upstreams
    only.script = ["empty_502"]
    daemon = await daemon_factory(config(only, retry=False))
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 502 and body == b"" and only.posts == 1


@pytest_twisted.ensureDeferred
async def test_a_hang_before_headers_is_cancelled_and_retried_once(daemon_factory, upstreams):
    """After a few quick streamed answers (the model is loaded there), a streamed request that gets no headers for
    far longer is cancelled (its connection closed) and sent again; the client sees one clean answer."""
    (only, _) = upstreams
    daemon = await daemon_factory(config(only, hang_after="0.3s", hang_factor=5))
    streamed = {**CHAT, "stream": True}
    for _ in range(5):  # (the first loads the model: the four after it are the endpoint's usual head times)
        response, _ = await daemon.post_json(PATH, streamed)
        assert response.code == 200
    only.script = ["stall_headers"]
    response, body = await daemon.post_json(PATH, streamed)
    assert response.code == 200 and json.loads(body)["choices"]
    assert only.posts == 7
    await eventually(lambda: only.open_posts == 0, 5, "the stalled upstream request closed")
    stats = daemon.parts.fleet.get(only.name)
    assert stats is not None and stats.failure_count == 1


@pytest_twisted.ensureDeferred
async def test_a_plain_answer_is_never_judged_a_hang(daemon_factory, upstreams):
    """A non-streamed answer's headers wait for the whole answer: however long, it is not cut (here: 504 at
    response_header_timeout, as before), even after many quick answers."""
    (only, _) = upstreams
    daemon = await daemon_factory(config_for(only, proxy={"response_header_timeout": "0.8s",
                                                          "lost_requests": {"hang_after": "0.1s", "hang_factor": 1}}))
    for _ in range(5):
        response, _ = await daemon.post_json(PATH, CHAT)
        assert response.code == 200
    only.script = ["stall_headers"]
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 504 and only.posts == 6


@pytest_twisted.ensureDeferred
async def test_no_hang_watch_before_the_endpoint_has_answered_a_few(daemon_factory, upstreams):
    """A first request (model state unknown, no head times yet) waits for response_header_timeout as before."""
    (only, _) = upstreams
    only.script = ["stall_headers"]
    daemon = await daemon_factory(
        config_for(only, proxy={"response_header_timeout": "0.6s", "lost_requests": {"hang_after": "0.1s"}}))
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert only.posts == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_cut_after_its_first_byte_is_never_retried(daemon_factory, upstreams):
    (only, _) = upstreams
    only.mode = "truncated_chunked"
    daemon = await daemon_factory(config(only))
    response, body = await daemon.post_json(PATH, {**CHAT, "stream": True})
    assert response.code == 200 and b'"error"' in body and b"[DONE]" not in body
    assert only.posts == 1


@pytest_twisted.ensureDeferred
async def test_a_502_with_a_body_is_an_answer_and_passes_through(daemon_factory, upstreams):
    (only, _) = upstreams
    only.script = ["text_502"]
    daemon = await daemon_factory(config(only))
    response, body = await daemon.post_json(PATH, CHAT)
    assert response.code == 502 and body == b"upstream went away\n" and only.posts == 1
