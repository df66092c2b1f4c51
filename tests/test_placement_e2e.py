"""End-to-end: placement by expected cost through the real service tree and three fake DMRs.

The two cases issue 19 fixed: a conversation never leaves an idle warm endpoint
between turns, and an unkeyed request never pays a cold load while an endpoint
with its model loaded has capacity.  Plus the headers that say why a request
went where it went, and the tenant behaviour: a tenant's conversations follow
its cached head.
"""

from __future__ import annotations

import json
import random
import urllib.request
from typing import Any

import openai
import pytest_twisted
from conftest import config_for, in_thread
from twisted.internet import defer

from olladmr.fleet.models import normalise_model

MODEL = "ai/smollm2"
MODEL_KEY = normalise_model(MODEL)
EMBED = "ai/mxbai-embed-large"
NAMES = ["fake-0", "fake-1", "fake-2"]
CHAT = "/olla/dmr/engines/v1/chat/completions"


def equal(fakes: list[Any], **sections: Any) -> Any:
    return config_for(*fakes, **{f"endpoint{i}": {"priority": 50} for i in range(len(fakes))}, **sections)


async def warm(fake: Any) -> None:
    client = openai.OpenAI(base_url=fake.url + "/engines/v1", api_key="direct", max_retries=0, timeout=10)
    await in_thread(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "warm-up"}])


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(100_000)}" for _ in range(count))


async def chat(daemon: Any, messages: list[dict[str, str]]) -> tuple[str, dict[str, str]]:
    """One non-streaming chat through olladmr: (the answer's text, the X-Olla-* headers)."""
    response, body = await daemon.post_json(CHAT, {"model": MODEL, "messages": messages})
    assert response.code == 200, body
    headers = {
        name.decode().lower(): values[0].decode()
        for name, values in response.headers.getAllRawHeaders()
        if name.lower().startswith(b"x-olla-")
    }
    return json.loads(body)["choices"][0]["message"]["content"], headers


@pytest_twisted.ensureDeferred
async def test_two_turn_conversations_never_change_endpoint_on_an_idle_fleet(daemon_factory, fakes):
    """300 two-turn conversations from 4 concurrent clients over 3 idle endpoints: every second turn lands where
    the first did (the first turns still spread over all three), with X-Olla-Placement and X-Olla-Prefix-Match."""
    for fake in fakes:
        await warm(fake)
    daemon = await daemon_factory(equal(fakes, proxy={"load_balancer": "round-robin"}))
    rng = random.Random(19)
    moved: list[tuple[str, str]] = []
    firsts: list[str] = []
    headers_seen: list[dict[str, str]] = []

    async def conversation(index: int) -> None:
        messages = [{"role": "system", "content": f"Agent {index}. " + words(rng, 60)},
                    {"role": "user", "content": words(rng, 30)}]
        answer, first = await chat(daemon, messages)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": words(rng, 10)}]
        _, second = await chat(daemon, messages)
        firsts.append(first["x-olla-endpoint"])
        headers_seen.append(second)
        if first["x-olla-endpoint"] != second["x-olla-endpoint"]:
            moved.append((first["x-olla-endpoint"], second["x-olla-endpoint"]))

    queue = list(range(300))

    async def client() -> None:
        while queue:
            await conversation(queue.pop())

    await defer.gatherResults([defer.ensureDeferred(client()) for _ in range(4)])
    assert moved == []
    assert set(firsts) == set(NAMES)  # the first turns spread (rendezvous of distinct heads)
    assert {h["x-olla-placement"] for h in headers_seen} == {"prefix"}
    assert {h["x-olla-sticky-session"] for h in headers_seen} == {"hit"}
    for h in headers_seen:
        matched, total = (int(x) for x in h["x-olla-prefix-match"].split("/"))
        assert 0 < matched < total  # the first turn's prompt, not the new answer and message
    stats = json.loads((await daemon.request("GET", "/internal/stats/sticky"))[1])
    assert stats["placements"]["prefix"] == 300 and stats["prompt_tokens_matched"] > 0


@pytest_twisted.ensureDeferred
async def test_a_tenants_new_conversations_follow_its_cached_head(daemon_factory, fakes):
    """Ten conversations sharing one long system prompt, one after another, all go where the first one went."""
    for fake in fakes:
        await warm(fake)
    daemon = await daemon_factory(equal(fakes, proxy={"load_balancer": "round-robin"}))
    rng = random.Random(7)
    tenant = "You are tenant A's coding agent. " + words(rng, 800)
    placed = []
    for n in range(10):
        _, headers = await chat(daemon, [{"role": "system", "content": tenant}, {"role": "user", "content": f"task {n}"}])
        placed.append((headers["x-olla-endpoint"], headers["x-olla-placement"]))
    home = placed[0][0]
    assert placed == [(home, "balance")] + [(home, "prefix")] * 9


@pytest_twisted.ensureDeferred
async def test_unkeyed_embeddings_never_pay_a_cold_load_while_the_loaded_endpoint_has_capacity(daemon_factory, fakes):
    """Three endpoints list the embeddings model, one has it loaded (/engines/ps): 20 sequential unkeyed embeddings
    all go there -- 0 cold loads elsewhere -- and olladmr_cold_routes_total counts them as avoided."""
    for fake in fakes:
        fake.cold_load_delay = 0.05
        fake.models = [MODEL, EMBED]
    daemon = await daemon_factory(equal(fakes, proxy={"load_balancer": "round-robin"}))
    direct = openai.OpenAI(base_url=fakes[2].url + "/engines/v1", api_key="direct", max_retries=0, timeout=10)
    await in_thread(direct.embeddings.create, model=EMBED, input=["warm-up"])
    ps = json.loads(await in_thread(lambda: urllib.request.urlopen(fakes[2].url + "/engines/ps", timeout=10).read()))
    assert [e["mode"] for e in ps] == ["embedding"]
    endpoints = [daemon.parts.fleet.get(name) for name in NAMES]
    for ep in endpoints:
        await daemon.parts.health.poll_loaded(ep)
    runner = "embedding " + normalise_model(EMBED)
    assert [ep.model_loaded(runner) for ep in endpoints] == [False, False, True]

    client = daemon.openai()
    placed = []
    for n in range(20):
        raw = await in_thread(client.embeddings.with_raw_response.create, model=EMBED, input=[f"text {n}"])
        placed.append((raw.headers.get("x-olla-endpoint"), raw.headers.get("x-olla-placement")))
    assert placed == [("fake-2", "balance")] * 20
    for fake in fakes[:2]:  # nothing was loaded there: no request reached them at all
        assert fake.inference_requests == []
    stats = json.loads((await daemon.request("GET", "/internal/stats/sticky"))[1])
    assert (stats["cold_route_avoided"], stats["cold_route_taken"]) == (20, 0)
    _, metrics = await daemon.request("GET", "/internal/metrics")
    assert 'olladmr_cold_routes_total{result="avoided"} 20.0' in metrics.decode()
