"""
The OpenAI Responses API through olladmr with the official ``openai`` SDK:
response affinity under round-robin, across two olladmr instances, and
when the endpoint holding a conversation is down.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import pytest_twisted
from conftest import Daemon, config_for, in_thread
from twisted.internet import reactor

from olladmr import build as assembly

MODEL = "ai/smollm2"
ROUND_ROBIN = {"proxy": {"load_balancer": "round-robin"}}


def holder(fakes: list[Any], response_id: str) -> Any:
    """The fake whose own store holds ``response_id``."""
    (owner,) = [f for f in fakes if response_id in f.stored_responses]
    return owner


def converse(client: openai.OpenAI, turns: int, previous: str | None = None, stream: bool = False) -> list[Any]:
    """A conversation chained by previous_response_id; every turn's response object, in order."""
    out = []
    for turn in range(turns):
        text = f"turn {turn} of the conversation"
        if stream:
            with client.responses.stream(model=MODEL, input=text, previous_response_id=previous) as events:
                response = events.get_final_response()
        else:
            response = client.responses.create(model=MODEL, input=text, previous_response_id=previous)
        out.append(response)
        previous = response.id
    return out


@pytest_twisted.ensureDeferred
async def test_ten_turns_under_round_robin_over_three_endpoints(daemon_factory, fakes):
    """Each follow-up goes to the endpoint holding the previous answer, whatever round-robin says: 0 failed turns."""
    daemon = await daemon_factory(config_for(*fakes, **ROUND_ROBIN))
    client = daemon.openai()
    # interleave other traffic so round-robin really rotates between turns
    responses = await in_thread(converse, client, 10)
    assert len(responses) == 10 and all(r.status == "completed" for r in responses)
    owner = holder(fakes, responses[0].id)
    assert all(holder(fakes, r.id) is owner for r in responses)  # the whole conversation on one DMR
    assert [r.previous_response_id for r in responses[1:]] == [r.id for r in responses[:-1]]
    assert "[turn 10]" in responses[-1].output_text  # the fake saw the whole chain of 10 turns
    others = [f for f in fakes if f is not owner]
    assert not any(r.uri.endswith("/responses") for f in others for r in f.inference_requests)


@pytest_twisted.ensureDeferred
async def test_streamed_turns_retrieve_input_items_and_delete(daemon_factory, fakes):
    """Streamed creates chain too; retrieve, input_items and delete go to the holder; a deleted id is gone."""
    daemon = await daemon_factory(config_for(*fakes, **ROUND_ROBIN))
    client = daemon.openai()
    responses = await in_thread(converse, client, 3, None, True)
    last = responses[-1]
    owner = holder(fakes, last.id)
    for _ in range(3):  # round-robin would spread these: affinity keeps them on the owner
        fetched = await in_thread(client.responses.retrieve, last.id)
        assert fetched.id == last.id and fetched.output_text == last.output_text
    items = await in_thread(client.responses.input_items.list, last.id)
    assert [i.type for i in items.data] and items.data[0].content[0].text == "turn 2 of the conversation"
    await in_thread(client.responses.delete, last.id)
    assert last.id not in owner.stored_responses
    assert daemon.parts.responses.owner(last.id) is None  # forgotten once deleted
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.retrieve, last.id)


@pytest_twisted.ensureDeferred
async def test_a_conversation_across_two_olladmr_instances(daemon_factory, fakes):
    """Turn N through instance 1, turn N+1 through instance 2: the second finds the holder by probing, 0 failures."""
    config = config_for(*fakes, **ROUND_ROBIN)
    first = await daemon_factory(config)
    second = await daemon_factory(config)
    clients = [first.openai(), second.openai()]
    previous = None
    for turn in range(10):
        response = await in_thread(
            clients[turn % 2].responses.create, model=MODEL, input=f"turn {turn}", previous_response_id=previous
        )
        assert response.status == "completed"
        previous = response.id
    owner = holder(fakes, previous)
    assert "[turn 10]" in response.output_text
    probes = second.parts.metrics.render().decode()
    assert 'olladmr_response_probe_duration_seconds_count{result="found"}' in probes
    assert second.parts.responses.owner(previous) in (None, owner.name)


@pytest_twisted.ensureDeferred
async def test_holder_down_is_a_503_naming_the_response_and_the_endpoint(daemon_factory, fakes):
    """When the holder is not routable the follow-up is refused with 503 + Retry-After, never sent elsewhere."""
    daemon = await daemon_factory(config_for(*fakes, **ROUND_ROBIN))
    client = daemon.openai()
    (first,) = await in_thread(converse, client, 1)
    owner = holder(fakes, first.id)
    endpoint = daemon.parts.fleet.get(owner.name)
    daemon.parts.health.mark_offline(endpoint, "test")
    before = {f.name: len(f.inference_requests) for f in fakes}
    response, body = await daemon.post_json(
        "/olla/dmr/engines/v1/responses", {"model": MODEL, "input": "next", "previous_response_id": first.id}
    )
    error = json.loads(body)["error"]
    assert response.code == 503 and error["code"] == "response_endpoint_unavailable"
    assert first.id in error["message"] and owner.name in error["message"]
    assert response.headers.getRawHeaders(b"retry-after")
    assert {f.name: len(f.inference_requests) for f in fakes} == before  # nothing sent anywhere


@pytest_twisted.ensureDeferred
async def test_unknown_previous_response_reaches_dmr_and_gets_its_own_answer(daemon_factory, fakes):
    """An id nobody holds is probed for, then sent to one endpoint, whose 400 "not found" passes through unchanged."""
    daemon = await daemon_factory(config_for(*fakes, **ROUND_ROBIN))
    response, body = await daemon.post_json(
        "/olla/dmr/engines/v1/responses",
        {"model": MODEL, "input": "x", "previous_response_id": "resp_000000000000000000000000"},
    )
    assert response.code == 400 and b"was not found" in body


@pytest_twisted.ensureDeferred
async def test_a_restarted_instance_finds_the_holder_again(fakes):
    """A fresh olladmr (empty directory, as after a restart) continues a conversation another one started."""
    config = config_for(*fakes, **ROUND_ROBIN)
    started = []
    try:
        for _ in range(2):
            parts = assembly.build(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1")
            parts.service.startService()
            await parts.service.serving
            started.append(Daemon(parts))
        (first,) = await in_thread(converse, started[0].openai(), 1)
        await started[0].service.stopService()
        (second,) = await in_thread(converse, started[1].openai(), 1, first.id)
        assert second.previous_response_id == first.id and holder(fakes, second.id) is holder(fakes, first.id)
    finally:
        for daemon in started:
            if daemon.service.running:
                await daemon.service.stopService()
            await daemon.pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_a_responses_stream_that_breaks_ends_with_an_error_event(daemon_factory, fake):
    """A Responses stream cut before response.completed ends with an error event the SDK raises on, never a fake completion."""
    daemon = await daemon_factory(config_for(fake))
    fake.truncate_stream = True
    response, body = await daemon.post_json(
        "/olla/dmr/engines/v1/responses", {"model": MODEL, "input": "hello", "stream": True}
    )
    assert response.code == 200 and b"response.completed" not in body
    last = [block for block in body.decode().split("\n\n") if block.strip()][-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["code"] == "upstream_truncated"

    def stream() -> None:
        with daemon.openai().responses.stream(model=MODEL, input="hello") as events:
            for _ in events:
                pass

    with pytest.raises(openai.APIError):
        await in_thread(stream)


@pytest_twisted.ensureDeferred
async def test_anthropic_and_responses_usage_feed_the_token_metrics(daemon_factory, fake):
    """input/output tokens of Anthropic messages (plain and streamed) and Responses answers count as prompt/completion."""
    daemon = await daemon_factory(config_for(fake))
    messages = [{"role": "user", "content": "four words in here"}]
    await daemon.post_json("/olla/dmr/anthropic/v1/messages", {"model": MODEL, "max_tokens": 64, "messages": messages})
    await daemon.post_json(
        "/olla/dmr/anthropic/v1/messages", {"model": MODEL, "max_tokens": 64, "messages": messages, "stream": True}
    )
    await daemon.post_json("/olla/dmr/engines/v1/responses", {"model": MODEL, "input": "four words in here"})
    await daemon.post_json("/olla/dmr/engines/v1/responses", {"model": MODEL, "input": "x y", "stream": True})
    _, metrics = await daemon.request("GET", "/internal/metrics")
    text = metrics.decode()

    def total(kind: str) -> float:
        line = [l for l in text.splitlines() if l.startswith(f'olladmr_tokens_total{{kind="{kind}",model="ai/smollm2:latest"}}')]
        assert line, kind
        return float(line[0].split()[-1])

    assert total("prompt") >= 4 + 4 + 4 + 2
    assert total("completion") >= 4 * len(fake.tokens)
    assert 'route="messages"' in text and 'route="responses"' in text
