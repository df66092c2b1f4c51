"""
Anthropic Messages through olladmr with the official ``anthropic`` SDK (as
Claude Code uses it): plain, streamed, count_tokens, credentials, and the
exception class the SDK raises for each of olladmr's own errors.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import pytest_twisted
from conftest import config_for, in_thread

from olladmr.edge.auth import hash_key

MODEL = "ai/smollm2"
MESSAGES = [{"role": "user", "content": "Hello from the Anthropic SDK"}]
BASES = ("/olla/dmr/anthropic", "/olla/dmr/engines", "/olla/dmr/engines/llama.cpp", "/olla/anthropic")


def sdk(daemon: Any, base: str, key: str = "not-needed") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.base + base, api_key=key, max_retries=0, timeout=20)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("base", BASES)
async def test_create_stream_and_count_tokens(daemon_factory, fake, base):
    """messages.create, messages.stream and messages.count_tokens work through every Anthropic base URL."""
    daemon = await daemon_factory(config_for(fake))
    client = sdk(daemon, base)
    raw = await in_thread(client.messages.with_raw_response.create, model=MODEL, max_tokens=64, messages=MESSAGES)
    message = raw.parse()
    assert message.type == "message" and message.content[0].text == "".join(fake.tokens)
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == len(fake.tokens)
    assert raw.headers["x-olla-endpoint"] == "fake-a" and raw.headers["x-olla-model"] == MODEL
    if base == "/olla/anthropic":
        assert raw.headers["x-olla-mode"] == "passthrough"

    def streamed() -> tuple[str, Any]:
        with client.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    text, final = await in_thread(streamed)
    assert text == "".join(fake.tokens) and final.stop_reason == "end_turn"
    count = await in_thread(client.messages.count_tokens, model=MODEL, messages=MESSAGES)
    assert count.input_tokens == len(MESSAGES[0]["content"].split())


@pytest_twisted.ensureDeferred
async def test_x_api_key_is_an_olladmr_key_and_never_forwarded(daemon_factory, fake):
    """With keys configured the SDK's x-api-key is checked by olladmr, stripped, and anthropic-version goes upstream."""
    daemon = await daemon_factory(config_for(fake, server={"auth": {"api_keys": [hash_key("sk-claude")]}}))
    good = sdk(daemon, "/olla/dmr/anthropic", "sk-claude")
    message = await in_thread(good.messages.create, model=MODEL, max_tokens=16, messages=MESSAGES)
    assert message.content[0].text
    upstream = fake.inference_requests[-1]
    assert "x-api-key" not in upstream.headers and "authorization" not in upstream.headers
    assert len(upstream.headers["anthropic-version"]) == 1  # the SDK's version header went upstream
    response, _ = await daemon.post_json(
        "/olla/dmr/anthropic/v1/messages",
        {"model": MODEL, "max_tokens": 16, "messages": MESSAGES},
        {"x-api-key": "sk-claude", "anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"},
    )
    assert response.code == 200
    upstream = fake.inference_requests[-1]
    assert upstream.headers["anthropic-version"] == ["2023-06-01"]
    assert upstream.headers["anthropic-beta"] == ["tools-2024-04-04"] and "x-api-key" not in upstream.headers
    bad = sdk(daemon, "/olla/dmr/anthropic", "sk-wrong")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await in_thread(bad.messages.create, model=MODEL, max_tokens=16, messages=MESSAGES)
    assert caught.value.body["error"]["type"] == "authentication_error"


@pytest_twisted.ensureDeferred
async def test_olladmr_errors_raise_the_right_anthropic_exceptions(daemon_factory, fake):
    """Unknown model, bad body, rate limit, too large, nothing routable: each in Anthropic's shape and class."""
    limits = {"rate_limits": {"per_ip_requests_per_minute": 2}, "request_limits": {"max_body_size": "8KB"}}
    daemon = await daemon_factory(config_for(fake, server=limits))
    client = sdk(daemon, "/olla/dmr/anthropic")
    with pytest.raises(anthropic.NotFoundError) as not_found:
        await in_thread(client.messages.create, model="ai/nope", max_tokens=16, messages=MESSAGES)
    assert not_found.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.ContentTooLargeError) as too_large:
        await in_thread(client.messages.create, model=MODEL, max_tokens=16,
                        messages=[{"role": "user", "content": "x" * 20000}])
    assert too_large.value.body["error"]["type"] == "request_too_large"
    response, body = await daemon.request("POST", "/olla/dmr/engines/v1/messages", b"{not json",
                                          {"content-type": "application/json"})
    assert response.code == 400 and json.loads(body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": json.loads(body)["error"]["message"]},
    }
    with pytest.raises(anthropic.RateLimitError) as limited:
        await in_thread(client.messages.create, model=MODEL, max_tokens=16, messages=MESSAGES)
    assert limited.value.body["error"]["type"] == "rate_limit_error"


@pytest_twisted.ensureDeferred
async def test_no_endpoint_is_overloaded_and_a_broken_stream_ends_with_an_error_event(daemon_factory, fake):
    """503 is Anthropic's overloaded_error; a stream cut mid-way ends with event: error, never a fake message_stop."""
    daemon = await daemon_factory(config_for(fake))
    client = sdk(daemon, "/olla/dmr/anthropic")
    fake.truncate_stream = True
    response, body = await daemon.post_json(
        "/olla/dmr/anthropic/v1/messages", {"model": MODEL, "max_tokens": 16, "messages": MESSAGES, "stream": True}
    )
    assert response.code == 200 and b"event: message_stop" not in body
    last = [block for block in body.decode().split("\n\n") if block.strip()][-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "api_error"
    fake.truncate_stream = False

    def broken_stream() -> None:
        fake.truncate_stream = True
        with client.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as stream:
            for _ in stream.text_stream:
                pass

    with pytest.raises(anthropic.APIStatusError):
        await in_thread(broken_stream)
    fake.truncate_stream = False
    daemon.parts.health.mark_offline(daemon.parts.fleet.get("fake-a"), "test")
    with pytest.raises(anthropic.ServiceUnavailableError) as unavailable:
        await in_thread(client.messages.create, model=MODEL, max_tokens=16, messages=MESSAGES)
    assert unavailable.value.body["error"]["type"] == "overloaded_error"
