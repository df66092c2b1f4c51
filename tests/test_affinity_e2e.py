"""End-to-end: KV-cache session affinity through the real service tree, three fake DMRs and the OpenAI SDK.

Every test runs olladmr on a real port in front of the ``fakes`` fixture (three
FakeDMRs on loopback).  Unless a test is about the fakes' loaded models, every
fake is warmed with ``ai/smollm2`` *before* the daemon starts (a request sent
straight to it), so ``/engines/ps`` shows the model loaded everywhere and
placement is decided by the session key alone (rendezvous), not by which
endpoint happens to have the model loaded.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

import openai
import pytest_twisted
from conftest import config_for, eventually, in_thread
from twisted.web.http_headers import Headers

from olladmr.fleet.models import normalise_model
from olladmr.fleet.sessions import rendezvous

MODEL = "ai/smollm2"
MODEL_KEY = normalise_model(MODEL)  # "ai/smollm2:latest"
NAMES = ["fake-0", "fake-1", "fake-2"]
ROUND_ROBIN = {"load_balancer": "round-robin"}


# -- helpers


def equal_priorities(fakes: list[Any], **sections: Any) -> Any:
    """``config_for`` with every endpoint at priority 50 (one tier, so rendezvous spreads over all of them)."""
    return config_for(*fakes, **{f"endpoint{i}": {"priority": 50} for i in range(len(fakes))}, **sections)


async def warm(fake: Any, model: str = MODEL) -> None:
    """Load ``model`` on ``fake`` with a chat request sent straight to it (not through olladmr)."""
    client = openai.OpenAI(base_url=fake.url + "/engines/v1", api_key="direct", max_retries=0, timeout=10)
    await in_thread(client.chat.completions.create, model=model, messages=[{"role": "user", "content": "warm-up"}])
    ps = json.loads(await in_thread(lambda: urllib.request.urlopen(fake.url + "/engines/ps", timeout=10).read()))
    assert [(e["model_name"], e["mode"]) for e in ps] == [(model, "completion")]


async def warm_all(fakes: list[Any]) -> None:
    for fake in fakes:
        await warm(fake)


@dataclass
class Turn:
    """What olladmr said about one answered request."""

    status: int
    endpoint: str
    sticky: str | None
    source: str | None
    session_id: str | None
    content: str | None = None


def turn_of(raw: Any, content: str | None = None) -> Turn:
    headers = raw.headers
    return Turn(
        status=raw.status_code,
        endpoint=headers.get("x-olla-endpoint"),
        sticky=headers.get("x-olla-sticky-session"),
        source=headers.get("x-olla-sticky-key-source"),
        session_id=headers.get("x-olla-session-id"),
        content=content,
    )


class Conversation:
    """A chat with its own system prompt and opening, whose history grows by one user and one assistant turn per ask."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": f"You are the assistant of conversation {tag}."},
            {"role": "user", "content": f"[{tag}] Let us talk about topic {tag}."},
        ]
        self.turns: list[Turn] = []

    @property
    def opening(self) -> list[dict[str, str]]:
        return self.messages[:2]

    def ask(self, client: Any, headers: dict[str, str] | None = None) -> Turn:
        """One turn (blocking: run it with ``in_thread``)."""
        if self.turns:
            self.messages.append({"role": "user", "content": f"[{self.tag}] follow-up {len(self.turns)}"})
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=list(self.messages), extra_headers=headers
        )
        content = raw.parse().choices[0].message.content
        self.messages.append({"role": "assistant", "content": content})
        turn = turn_of(raw, content)
        self.turns.append(turn)
        return turn

    def run(self, client: Any, turns: int) -> list[Turn]:
        """``turns`` turns in a row (blocking)."""
        return [self.ask(client) for _ in range(turns)]

    def received_by(self, fake: Any) -> int:
        """How many of this conversation's requests ``fake`` received."""
        marker = f"[{self.tag}]"
        return sum(1 for r in fake.inference_requests if marker in json.dumps(r.json().get("messages")))


async def get_json(daemon: Any, path: str) -> Any:
    response, body = await daemon.request("GET", path)
    assert response.code == 200, body
    return json.loads(body)


async def metric_values(daemon: Any, name: str) -> dict[str, float]:
    """``{result label: value}`` of the Prometheus counter ``name`` from ``/internal/metrics``."""
    response, body = await daemon.request("GET", "/internal/metrics")
    assert response.code == 200
    pattern = re.compile(rf'^{re.escape(name)}\{{result="([a-z]+)"\}} ([0-9.e+]+)$', re.M)
    return {label: float(value) for label, value in pattern.findall(body.decode())}


def expected_endpoint(daemon: Any, conversation: Conversation) -> str:
    """Where rendezvous hashing of the conversation's prefix key puts it (the first of the key's order)."""
    session = daemon.parts.sessions.key_for(
        route="chat/completions", model_key=MODEL_KEY, headers=Headers(),
        body={"model": MODEL, "messages": conversation.opening}, client_ip="127.0.0.1",
    )
    assert session is not None and session.source == "prefix"
    return rendezvous(session.key, list(daemon.parts.fleet))[0].name


def embed(client: Any, text: str, headers: dict[str, str] | None = None) -> Turn:
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=[text], extra_headers=headers)
    assert len(raw.parse().data) == 1
    return turn_of(raw)


# -- 1. a conversation stays on one endpoint


@pytest_twisted.ensureDeferred
async def test_every_turn_of_a_ten_turn_conversation_lands_on_one_endpoint_despite_round_robin(daemon_factory, fakes):
    """Each of four 10-turn SDK conversations is served by one endpoint (miss, then nine hits, key source prefix) although round-robin rotates them; unkeyed requests are not pinned, they follow the loaded model."""
    await warm_all(fakes)
    daemon = await daemon_factory(equal_priorities(fakes, proxy=ROUND_ROBIN))
    client = daemon.openai()
    conversations = [Conversation(f"c1-{i}") for i in range(4)]
    for conversation in conversations:
        turns = await in_thread(conversation.run, client, 10)
        assert [t.status for t in turns] == [200] * 10
        assert [t.content for t in turns] == ["Hello, world!"] * 10
        assert len({t.endpoint for t in turns}) == 1, [t.endpoint for t in turns]
        assert [t.sticky for t in turns] == ["miss"] + ["hit"] * 9
        assert [t.source for t in turns] == ["prefix_hash"] * 10
        assert [t.session_id for t in turns] == [None] * 10
        home = turns[0].endpoint
        for fake in fakes:  # the fakes confirm it: all ten requests reached the endpoint named, none the others
            assert conversation.received_by(fake) == (10 if fake.name == home else 0)
        assert len(conversation.messages) == 2 + 2 * 10 - 1  # the history really grew turn by turn
    # Unkeyed requests (embeddings without a session id): the first loads the embedding model where round-robin
    # says, the others go where it is loaded now instead of loading it again elsewhere.
    unkeyed = [await in_thread(embed, client, f"unkeyed {i}") for i in range(3)]
    assert len({t.endpoint for t in unkeyed}) == 1
    assert [t.sticky for t in unkeyed] == ["disabled"] * 3
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["misses"], stats["hits"], stats["repins"], stats["spills"]) == (4, 4, 36, 0, 0)


# -- 2. different conversations spread


@pytest_twisted.ensureDeferred
async def test_thirty_conversations_spread_over_all_three_equal_endpoints_by_rendezvous(daemon_factory, fakes):
    """Thirty conversations with different openings use all three equal-priority endpoints, each where rendezvous hashing of its key puts it."""
    await warm_all(fakes)
    daemon = await daemon_factory(equal_priorities(fakes))
    client = daemon.openai()
    conversations = [Conversation(f"c2-{i}") for i in range(30)]
    placed: dict[str, int] = {}
    for conversation in conversations:
        turn = await in_thread(conversation.ask, client)
        assert (turn.status, turn.sticky, turn.source) == (200, "miss", "prefix_hash")
        assert turn.endpoint == expected_endpoint(daemon, conversation)
        placed[turn.endpoint] = placed.get(turn.endpoint, 0) + 1
    assert sorted(placed) == NAMES, placed
    assert sum(placed.values()) == 30
    assert max(placed.values()) <= 20, placed  # spread, not piled onto one endpoint
    assert sum(len(f.inference_requests) - 1 for f in fakes) == 30  # minus each fake's warm-up
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["misses"], stats["hits"], stats["cold_route_avoided"]) == (30, 30, 0, 0)


# -- 3. the X-Olla-Session-ID header


@pytest_twisted.ensureDeferred
async def test_a_session_id_header_keys_chat_and_embeddings_and_is_echoed(daemon_factory, fakes):
    """``X-Olla-Session-ID`` is the key (source session_header, id echoed): different prompts of one session stay on one endpoint, and it pins embeddings too, which without it report disabled."""
    await warm_all(fakes)
    daemon = await daemon_factory(equal_priorities(fakes, proxy=ROUND_ROBIN))
    client = daemon.openai()
    session = {"X-Olla-Session-ID": "agent-42"}
    chats = []
    for i in range(6):  # a different opening every time: only the header ties them together
        chats.append(await in_thread(Conversation(f"c3-{i}").ask, client, session))
    assert [t.status for t in chats] == [200] * 6
    assert len({t.endpoint for t in chats}) == 1, [t.endpoint for t in chats]
    assert [t.sticky for t in chats] == ["miss"] + ["hit"] * 5
    assert [t.source for t in chats] == ["session_header"] * 6
    assert [t.session_id for t in chats] == ["agent-42"] * 6

    embed_session = {"X-Olla-Session-ID": "embedder-7"}
    pinned = [await in_thread(embed, client, f"text {i}", embed_session) for i in range(4)]
    assert len({t.endpoint for t in pinned}) == 1, [t.endpoint for t in pinned]
    assert [t.sticky for t in pinned] == ["miss", "hit", "hit", "hit"]
    assert [t.source for t in pinned] == ["session_header"] * 4
    assert [t.session_id for t in pinned] == ["embedder-7"] * 4

    unkeyed = [await in_thread(embed, client, f"loose {i}") for i in range(3)]
    assert [t.sticky for t in unkeyed] == ["disabled"] * 3
    assert [(t.source, t.session_id) for t in unkeyed] == [(None, None)] * 3
    assert len({t.endpoint for t in unkeyed}) == 1  # where the embedding model is loaded (no second cold load)
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["misses"], stats["hits"]) == (2, 2, 8)


# -- 4. an endpoint dies mid-conversation


@pytest_twisted.ensureDeferred
async def test_a_conversation_moves_once_when_its_endpoint_dies_and_stays_after_it_returns(daemon_factory, fakes):
    """When the conversation's endpoint is killed the next turn succeeds elsewhere (repin), and once the old endpoint is healthy again the conversation stays on the new one (hit)."""
    await warm_all(fakes)
    daemon = await daemon_factory(equal_priorities(fakes))
    client = daemon.openai()
    conversation = Conversation("c4")
    first = await in_thread(conversation.run, client, 3)
    assert [t.sticky for t in first] == ["miss", "hit", "hit"]
    home = first[0].endpoint
    assert {t.endpoint for t in first} == {home}
    dead = next(f for f in fakes if f.name == home)
    port = dead.port
    await dead.stop()

    moved = await in_thread(conversation.ask, client)
    assert (moved.status, moved.content, moved.sticky, moved.source) == (200, "Hello, world!", "repin", "prefix_hash")
    new_home = moved.endpoint
    assert new_home != home and new_home in NAMES
    endpoint = daemon.parts.fleet.get(home)
    assert endpoint.status == "offline" and not endpoint.routable  # the refused connection marked it

    assert await dead.start(port) == port
    await daemon.parts.health.check(endpoint)
    await eventually(lambda: endpoint.status == "healthy" and endpoint.routable, 10, f"{home} healthy again")

    rest = await in_thread(conversation.run, client, 6)
    turns = first + [moved] + rest
    assert len(turns) == 10
    assert [t.status for t in turns] == [200] * 10  # 0 failed turns
    assert [t.content for t in turns] == ["Hello, world!"] * 10
    assert [t.endpoint for t in rest] == [new_home] * 6
    assert [t.sticky for t in rest] == ["hit"] * 6
    assert conversation.received_by(dead) == 3  # nothing after the kill, even once it was back
    assert conversation.received_by(next(f for f in fakes if f.name == new_home)) == 7
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["misses"], stats["hits"], stats["repins"]) == (1, 1, 8, 1)


# -- 5. two olladmr instances agree


@pytest_twisted.ensureDeferred
async def test_two_olladmr_instances_place_the_same_conversations_on_the_same_endpoints(daemon_factory, fakes):
    """Two olladmr services with the same configuration send the first turns of the same twenty conversations to the same endpoints."""
    await warm_all(fakes)
    config = equal_priorities(fakes, proxy=ROUND_ROBIN)
    first, second = await daemon_factory(config), await daemon_factory(config)
    assert first.port != second.port
    placements = []
    for daemon in (first, second):
        client = daemon.openai()
        turns = [await in_thread(Conversation(f"c5-{i}").ask, client) for i in range(20)]
        assert [(t.status, t.sticky, t.source) for t in turns] == [(200, "miss", "prefix_hash")] * 20
        placements.append([t.endpoint for t in turns])
    agreement = sum(a == b for a, b in zip(*placements)) / 20
    assert agreement == 1.0, placements
    assert len(set(placements[0])) > 1  # they agree on a spread, not on one endpoint for everything


# -- 6. affinity off


@pytest_twisted.ensureDeferred
async def test_with_affinity_disabled_headers_say_disabled_and_round_robin_rotates_a_conversation(daemon_factory, fakes):
    """With ``proxy.affinity.enabled: false`` every answer says disabled, no key source or pin is reported, and round-robin rotates even one conversation's turns."""
    await warm_all(fakes)
    daemon = await daemon_factory(
        equal_priorities(fakes, proxy={**ROUND_ROBIN, "affinity": {"enabled": False}})
    )
    client = daemon.openai()
    turns = await in_thread(Conversation("c6").run, client, 6)
    assert [t.status for t in turns] == [200] * 6
    assert [t.endpoint for t in turns] == NAMES * 2
    assert [t.sticky for t in turns] == ["disabled"] * 6
    assert [(t.source, t.session_id) for t in turns] == [(None, None)] * 6
    with_header = await in_thread(Conversation("c6-h").ask, client, {"X-Olla-Session-ID": "ignored"})
    assert (with_header.sticky, with_header.source, with_header.session_id) == ("disabled", None, None)
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert stats["enabled"] is False
    assert (stats["sessions"], stats["misses"], stats["hits"], stats["repins"]) == (0, 0, 0, 0)


# -- 7. statistics and metrics


@pytest_twisted.ensureDeferred
async def test_sticky_stats_and_metrics_count_the_traffic_sent(daemon_factory, fakes):
    """``/internal/stats/sticky`` counts exactly the sessions, hits, misses and repins of the traffic sent, and ``/internal/metrics`` shows the same counts."""
    await warm_all(fakes)
    daemon = await daemon_factory(equal_priorities(fakes))
    client = daemon.openai()
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["hits"], stats["misses"], stats["repins"], stats["spills"]) == (0, 0, 0, 0, 0)
    conversations = [Conversation(f"c7-{i}") for i in range(3)]
    for conversation in conversations:
        await in_thread(conversation.run, client, 4)  # 1 miss + 3 hits each
    await in_thread(embed, client, "not keyed")  # disabled: counted nowhere
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["sessions"], stats["hits"], stats["misses"], stats["repins"]) == (3, 9, 3, 0)

    victim = conversations[0].turns[0].endpoint
    on_victim = sum(1 for c in conversations if c.turns[0].endpoint == victim)
    await next(f for f in fakes if f.name == victim).stop()
    fifth = [await in_thread(c.ask, client) for c in conversations]
    assert [t.status for t in fifth] == [200] * 3
    assert [t.sticky for t in fifth] == ["repin" if c.turns[0].endpoint == victim else "hit" for c in conversations]
    assert victim not in {t.endpoint for t in fifth}

    hits, repins = 9 + 3 - on_victim, on_victim
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert stats["enabled"] is True
    assert stats["key_sources"] == ["session_header", "prefix_hash"]
    assert (stats["sessions"], stats["hits"], stats["misses"], stats["repins"], stats["spills"]) == (
        3, hits, 3, repins, 0,
    )
    assert stats["evictions"] == 0
    sticky = await metric_values(daemon, "olladmr_sticky_sessions_total")
    assert sticky == {"hit": float(hits), "miss": 3.0, "repin": float(repins), "spill": 0.0}
    response, body = await daemon.request("GET", "/internal/metrics")
    assert "olladmr_sticky_sessions_active 3.0" in body.decode()


# -- 8. loaded models


@pytest_twisted.ensureDeferred
async def test_an_unkeyed_request_goes_to_the_endpoint_that_has_the_model_loaded(daemon_factory, fakes):
    """A request without a session key goes to the one endpoint whose ``/engines/ps`` shows the model loaded, and the status pages show what is loaded where."""
    daemon = await daemon_factory(
        equal_priorities(fakes, proxy={**ROUND_ROBIN, "affinity": {"key_sources": ["session_header"]}})
    )
    fleet = daemon.parts.fleet
    endpoints = [fleet.get(name) for name in NAMES]
    # The first health round's /engines/ps polls are not awaited by startup: let them land first.
    await eventually(lambda: all(ep.loaded is not None for ep in endpoints), 10, "the first /engines/ps polls")
    status = await get_json(daemon, "/internal/status/endpoints")
    rows = status if isinstance(status, list) else status["endpoints"]
    assert {row["name"]: row["loaded_models"] for row in rows} == {name: [] for name in NAMES}

    warmed = fakes[1]
    await warm(warmed)
    for ep in endpoints:
        await daemon.parts.health.poll_loaded(ep)
    assert [ep.model_loaded(MODEL_KEY) for ep in endpoints] == [False, True, False]

    status = await get_json(daemon, "/internal/status/endpoints")
    rows = status if isinstance(status, list) else status["endpoints"]
    assert {row["name"]: row["loaded_models"] for row in rows} == {
        "fake-0": [], "fake-1": [MODEL_KEY], "fake-2": [],
    }
    models = await get_json(daemon, "/olla/models")
    by_key = {entry["key"]: entry for entry in models["data"]}
    assert {e["name"]: e["loaded"] for e in by_key[MODEL_KEY]["endpoints"]} == {
        "fake-0": False, "fake-1": True, "fake-2": False,
    }
    assert {e["name"]: e["loaded"] for e in by_key["ai/llama3.2:latest"]["endpoints"]} == {n: False for n in NAMES}

    client = daemon.openai()
    turns = [await in_thread(Conversation(f"c8-{i}").ask, client) for i in range(6)]
    assert [t.status for t in turns] == [200] * 6
    assert [t.endpoint for t in turns] == ["fake-1"] * 6  # not rotated by round-robin
    assert [(t.sticky, t.source) for t in turns] == [("disabled", None)] * 6
    assert [len(f.inference_requests) for f in fakes] == [0, 1 + 6, 0]
    stats = await get_json(daemon, "/internal/stats/sticky")
    assert (stats["cold_route_avoided"], stats["cold_route_taken"]) == (6, 0)
    assert await metric_values(daemon, "olladmr_cold_routes_total") == {"avoided": 6.0, "taken": 0.0}
