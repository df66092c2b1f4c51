"""Unit tests for ``olladmr.fleet.sessions``: session keys, rendezvous placement, the pin table, bounded load and
loaded-model preference, all on a ``task.Clock``."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from olladmr.config import Config, parse_config
from olladmr.fleet.sessions import (
    HIT,
    MISS,
    REPIN,
    SPILL,
    PinTable,
    Placement,
    SessionKey,
    SessionRouter,
    conversation_prefix,
    rendezvous,
    session_key,
)
from olladmr.fleet.state import EndpointState, Fleet

MODEL = "ai/smollm2"
OTHER_MODEL = "ai/llama3.2"
CHAT = "chat/completions"
ALL_SOURCES = ["session_header", "prefix", "auth", "ip"]
DETERMINISTIC = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# -- builders


def make_config(
    affinity: dict[str, Any] | None = None,
    endpoints: Sequence[tuple[str, int]] = (("a", 100), ("b", 100), ("c", 100)),
    **endpoint_settings: Any,
) -> Config:
    """A config with ``proxy.affinity`` = ``affinity`` and one endpoint per (name, priority)."""
    return parse_config(
        {
            "proxy": {"affinity": {"placement": "hash", **(affinity or {})}},
            "endpoints": [
                {"name": name, "url": f"http://{name}:1", "priority": priority, **endpoint_settings}
                for name, priority in endpoints
            ],
        },
        "t",
    )


def healthy_fleet(config: Config, clock: Clock) -> Fleet:
    """A ``Fleet`` of ``config`` whose endpoints are all routable."""
    fleet = Fleet(config, clock)
    for ep in fleet:
        ep.status = "healthy"
    return fleet


def setup(
    affinity: dict[str, Any] | None = None,
    endpoints: Sequence[tuple[str, int]] = (("a", 100), ("b", 100), ("c", 100)),
    **endpoint_settings: Any,
) -> tuple[Clock, SessionRouter, Fleet, list[EndpointState]]:
    """A clock, a router and a healthy fleet built from the same config."""
    clock = Clock()
    config = make_config(affinity, endpoints, **endpoint_settings)
    fleet = healthy_fleet(config, clock)
    return clock, SessionRouter(clock, config), fleet, list(fleet)


def key_of(
    router: SessionRouter,
    *,
    route: str = CHAT,
    model: str = MODEL,
    headers: dict[bytes, list[bytes]] | None = None,
    body: dict[str, Any] | None = None,
    ip: str = "",
) -> SessionKey | None:
    """``router.key_for`` with keyword defaults."""
    return router.key_for(route=route, model_key=model, headers=Headers(headers or {}), body=body or {}, client_ip=ip)


def header_session(router: SessionRouter, session_id: str, model: str = MODEL) -> SessionKey:
    """The session key of a request carrying ``X-Olla-Session-ID: session_id``."""
    session = key_of(router, model=model, headers={b"x-olla-session-id": [session_id.encode()]})
    assert session is not None
    return session


def sessions(router: SessionRouter, count: int, tag: str = "s") -> list[SessionKey]:
    """``count`` distinct header-derived session keys."""
    return [header_session(router, f"{tag}-{i}") for i in range(count)]


def names(endpoints: Iterable[EndpointState]) -> list[str]:
    return [ep.name for ep in endpoints]


def find_session(router: SessionRouter, predicate: Any, tag: str = "find") -> SessionKey:
    """The first header-derived session key (in a fixed sequence) for which ``predicate(key)`` holds."""
    for i in range(10_000):
        session = header_session(router, f"{tag}-{i}")
        if predicate(session.key):
            return session
    raise AssertionError("no session key satisfies the predicate")


def chat(*messages: tuple[str, str]) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": role, "content": content} for role, content in messages]}


def substrings(secret: bytes, size: int = 8) -> list[str]:
    """Every ``size``-byte window of ``secret`` as text, plus windows of its hex form."""
    text = secret.decode("ascii")
    out = [text[i : i + size] for i in range(len(text) - size + 1)]
    hexed = secret.hex()
    out += [hexed[i : i + 2 * size] for i in range(0, len(hexed) - 2 * size + 1, 2)]
    return out


# -- session keys: sources


def test_session_header_gives_a_key_and_echoes_the_id() -> None:
    """An ``X-Olla-Session-ID`` header yields a ``session_header`` key that echoes the id back."""
    _, router, _, _ = setup()
    session = key_of(router, headers={b"X-Olla-Session-ID": [b"conv-42"]}, body=chat(("user", "hi")))
    assert session is not None
    assert (session.source, session.session_id) == ("session_header", b"conv-42")
    assert session.key != key_of(router, body=chat(("user", "hi"))).key  # type: ignore[union-attr]


def test_session_header_of_256_bytes_is_used_and_257_is_ignored() -> None:
    """A session id of 256 bytes is used; one of 257 bytes is ignored and the next source (prefix) yields the key."""
    _, router, _, _ = setup()
    body = chat(("user", "hello"))
    at_limit = key_of(router, headers={b"x-olla-session-id": [b"x" * 256]}, body=body)
    too_long = key_of(router, headers={b"x-olla-session-id": [b"x" * 257]}, body=body)
    assert at_limit is not None and at_limit.source == "session_header" and at_limit.session_id == b"x" * 256
    assert too_long is not None and too_long.source == "prefix" and too_long.session_id is None


def test_session_header_too_long_and_nothing_else_yields_no_key() -> None:
    """An oversized session id with no other usable source gives no key at all."""
    _, router, _, _ = setup({"key_sources": ["session_header"]})
    assert key_of(router, headers={b"x-olla-session-id": [b"y" * 300]}, body=chat(("user", "x"))) is None


def test_prefix_source_keys_a_chat_by_its_opening() -> None:
    """With no session header, a chat's key comes from its conversation prefix."""
    _, router, _, _ = setup()
    session = key_of(router, body=chat(("system", "be brief"), ("user", "hello")))
    assert session is not None and session.source == "prefix" and session.session_id is None


@pytest.mark.parametrize("header", [b"authorization", b"x-api-key"])
def test_auth_source_uses_authorization_or_x_api_key(header: bytes) -> None:
    """The ``auth`` source keys a request by its Authorization or x-api-key credential (different credentials differ)."""
    _, router, _, _ = setup({"key_sources": ["auth"]})
    one = key_of(router, headers={header: [b"Bearer one-credential"]}, body=chat(("user", "x")))
    two = key_of(router, headers={header: [b"Bearer two-credential"]}, body=chat(("user", "x")))
    assert one is not None and two is not None
    assert one.source == two.source == "auth"
    assert one.key != two.key


def test_auth_source_without_credential_yields_nothing() -> None:
    """Without Authorization or x-api-key (or with a blank one) the ``auth`` source yields no key."""
    _, router, _, _ = setup({"key_sources": ["auth"]})
    assert key_of(router, body=chat(("user", "x"))) is None
    assert key_of(router, headers={b"authorization": [b"   "]}, body=chat(("user", "x"))) is None


def test_ip_source_keys_by_client_address() -> None:
    """The ``ip`` source keys by client address: the same address gives the same key, another address another."""
    _, router, _, _ = setup({"key_sources": ["ip"]})
    one = key_of(router, ip="10.0.0.1")
    again = key_of(router, ip="10.0.0.1", body=chat(("user", "other")))
    two = key_of(router, ip="10.0.0.2")
    assert one is not None and again is not None and two is not None
    assert one.source == "ip" and one.key == again.key and one.key != two.key
    assert key_of(router, ip="") is None


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (["session_header", "prefix", "auth", "ip"], "session_header"),
        (["prefix", "session_header", "auth", "ip"], "prefix"),
        (["auth", "prefix", "session_header", "ip"], "auth"),
        (["ip", "auth", "prefix", "session_header"], "ip"),
    ],
)
def test_order_of_key_sources_decides(sources: list[str], expected: str) -> None:
    """When every source could yield a key, the first listed in ``key_sources`` wins."""
    _, router, _, _ = setup({"key_sources": sources})
    session = key_of(
        router,
        headers={b"x-olla-session-id": [b"sid"], b"authorization": [b"Bearer k"]},
        body=chat(("user", "hello")),
        ip="10.1.2.3",
    )
    assert session is not None and session.source == expected


def test_first_source_that_yields_wins() -> None:
    """Sources that yield nothing are skipped: no header, no messages, no credential -> the ``ip`` source."""
    _, router, _, _ = setup({"key_sources": ALL_SOURCES})
    session = key_of(router, body={"model": MODEL}, ip="192.0.2.7")
    assert session is not None and session.source == "ip"


def test_disabled_affinity_gives_no_key() -> None:
    """With ``enabled: false`` no request gets a key, even with a session header."""
    _, router, _, _ = setup({"enabled": False})
    assert not router.enabled
    assert key_of(router, headers={b"x-olla-session-id": [b"sid"]}, body=chat(("user", "x"))) is None


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_keys_are_scoped_by_model(source: str) -> None:
    """The same conversation (or header, credential, address) for a different model gets a different key."""
    _, router, _, _ = setup({"key_sources": [source]})
    request = dict(
        headers={b"x-olla-session-id": [b"sid"], b"authorization": [b"Bearer k"]},
        body=chat(("system", "s"), ("user", "hello")),
        ip="10.0.0.9",
    )
    one = key_of(router, model=MODEL, **request)  # type: ignore[arg-type]
    same = key_of(router, model=MODEL, **request)  # type: ignore[arg-type]
    other = key_of(router, model=OTHER_MODEL, **request)  # type: ignore[arg-type]
    assert one is not None and same is not None and other is not None
    assert one.source == other.source == source
    assert one.key == same.key and one.key != other.key


@pytest.mark.parametrize("route", ["embeddings", "rerank", "score", "images/generations"])
def test_non_conversation_routes_are_keyed_only_by_session_header(route: str) -> None:
    """Embeddings, rerank, score and images get no key from prefix, auth or ip; only from the session header."""
    _, router, _, _ = setup({"key_sources": ALL_SOURCES})
    body = {"model": MODEL, "input": ["a text"], "prompt": "a prompt", "messages": [{"role": "user", "content": "x"}]}
    creds = {b"authorization": [b"Bearer k"], b"x-api-key": [b"k2"]}
    assert key_of(router, route=route, headers=creds, body=body, ip="10.0.0.1") is None
    keyed = key_of(router, route=route, headers={**creds, b"x-olla-session-id": [b"sid"]}, body=body, ip="10.0.0.1")
    assert keyed is not None and keyed.source == "session_header"


# -- session keys: stable across turns, different openings


def test_chat_key_is_stable_as_the_conversation_grows() -> None:
    """A chat growing turn by turn (assistant and user messages appended) keeps the key of its first turn."""
    _, router, _, _ = setup()
    turns = [("system", "You are terse."), ("user", "What is 2+2?")]
    first = key_of(router, body=chat(*turns))
    assert first is not None
    for n in range(3):
        turns += [("assistant", f"answer {n}"), ("user", f"follow-up {n}")]
        assert key_of(router, body=chat(*turns)) == first
    assert key_of(router, body=chat(("system", "You are terse."), ("user", "What is 3+3?"))) != first


@DETERMINISTIC
@given(
    opening=st.text(min_size=1, max_size=50),
    later=st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)), min_size=1, max_size=6),
)
def test_chat_key_is_stable_for_any_appended_turns(opening: str, later: list[tuple[str, str]]) -> None:
    """Whatever assistant/user turns are appended after the first user message, the chat key does not change."""
    _, router, _, _ = setup()
    turns = [("system", "sys"), ("user", opening)]
    first = key_of(router, body=chat(*turns))
    for answer, question in later:
        turns += [("assistant", answer), ("user", question)]
    assert first is not None and key_of(router, body=chat(*turns)) == first


def test_anthropic_messages_key_is_stable_as_the_conversation_grows() -> None:
    """An Anthropic Messages conversation keyed by ``system`` plus the first message keeps its key as turns append."""
    _, router, _, _ = setup()
    body: dict[str, Any] = {"model": MODEL, "system": "be kind", "messages": [{"role": "user", "content": "hi"}]}
    first = key_of(router, route="messages", body=body)
    assert first is not None and first.source == "prefix"
    for n in range(3):
        body["messages"] = body["messages"] + [
            {"role": "assistant", "content": [{"type": "text", "text": f"reply {n}"}]},
            {"role": "user", "content": f"more {n}"},
        ]
        assert key_of(router, route="messages", body=body) == first
    assert key_of(router, route="messages", body={**body, "system": "be rude"}) != first


def test_responses_key_is_stable_as_the_conversation_grows() -> None:
    """A Responses conversation keyed by ``instructions`` plus the first input item keeps its key as items append."""
    _, router, _, _ = setup()
    items: list[dict[str, Any]] = [{"role": "user", "content": "open the pod bay doors"}]
    body: dict[str, Any] = {"model": MODEL, "instructions": "You are HAL.", "input": items}
    first = key_of(router, route="responses", body=body)
    assert first is not None and first.source == "prefix"
    for n in range(3):
        items = items + [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": f"no {n}"}]},
            {"role": "user", "content": f"please {n}"},
        ]
        assert key_of(router, route="responses", body={**body, "input": items}) == first
    assert key_of(router, route="responses", body={**body, "instructions": "You are Clippy."}) != first


def test_text_completion_key_uses_only_the_first_prefix_bytes() -> None:
    """A prompt that only grows after byte N keeps its key when prefix_bytes <= N, and loses it when prefix_bytes > N."""
    base = "Once upon a time, " * 4  # 72 bytes
    assert len(base.encode()) == 72
    _, short, _, _ = setup({"prefix_bytes": 64})
    _, long, _, _ = setup({"prefix_bytes": 128})
    grown = base + "there was a proxy that remembered where conversations lived."
    k1 = key_of(short, route="completions", body={"prompt": base})
    k2 = key_of(short, route="completions", body={"prompt": grown})
    assert k1 is not None and k1.source == "prefix" and k1 == k2
    assert key_of(long, route="completions", body={"prompt": base}) != key_of(
        long, route="completions", body={"prompt": grown}
    )
    assert key_of(short, route="completions", body={"prompt": "X" + base}) != k1  # a change within the prefix counts


def test_text_completion_prompt_list_uses_its_first_prompt() -> None:
    """A list ``prompt`` is keyed by its first string; a token-id prompt or an empty one yields no prefix key."""
    assert conversation_prefix("completions", {"prompt": ["first prompt", "second"]}, 1024) == b"first prompt"
    assert conversation_prefix("completions", {"prompt": [1, 2, 3]}, 1024) is None
    assert conversation_prefix("completions", {"prompt": ""}, 1024) is None
    assert conversation_prefix("completions", {"prompt": "abcdefghij"}, 4) == b"abcd"


def test_conversation_prefix_without_an_opening_is_none() -> None:
    """Bodies without messages, input or prompt have no conversation prefix (so the next source is tried)."""
    assert conversation_prefix(CHAT, {"messages": "nope"}, 1024) is None
    assert conversation_prefix(CHAT, {"messages": []}, 1024) is None
    assert conversation_prefix("messages", {"messages": []}, 1024) is None
    assert conversation_prefix("responses", {}, 1024) is None
    assert conversation_prefix("embeddings", {"input": "x"}, 1024) is None


@DETERMINISTIC
@given(st.lists(st.text(max_size=40), min_size=2, max_size=25, unique=True))
def test_distinct_first_user_messages_never_collide(openings: list[str]) -> None:
    """Conversations with distinct first user messages (same system prompt, same later turns) get distinct keys."""
    _, router, _, _ = setup()
    keys = [
        key_of(router, body=chat(("system", "shared"), ("user", text), ("assistant", "ok"), ("user", "next")))
        for text in openings
    ]
    assert all(k is not None and k.source == "prefix" for k in keys)
    assert len({k.key for k in keys if k is not None}) == len(openings)


# -- session keys: secrets


@pytest.mark.parametrize("header", [b"authorization", b"x-api-key"])
def test_auth_key_never_holds_the_credential(header: bytes) -> None:
    """The auth-derived key contains neither the credential nor any 8-byte piece of it (or of its hex form)."""
    credential = b"Bearer sk-proj-QWERTYuiopZXCVBNMasdfghjklTOPSECRET"
    _, router, _, _ = setup({"key_sources": ["auth"]})
    session = key_of(router, headers={header: [credential]}, body=chat(("user", "x")))
    assert session is not None and session.source == "auth" and session.session_id is None
    text = repr(session)
    assert not [piece for piece in substrings(credential) if piece in text]


def test_pin_table_holds_no_trace_of_the_credential() -> None:
    """After an auth-keyed session is pinned, nothing in the router, its pin table or its stats holds the credential."""
    credential = b"sk-ant-api03-NOTHEXmnopqrstuvwxyzSECRETzz"
    _, router, _, eps = setup({"key_sources": ["auth"]})
    session = key_of(router, headers={b"x-api-key": [credential]}, body=chat(("user", "x")))
    assert session is not None
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, placement.order[0])
    assert len(router.pins) == 1
    dumps = [repr(vars(router)), repr(vars(router.pins)), repr(router.stats())]
    dumps += [repr(k) + repr(v) for k, v in vars(router.pins)["_pins"].items()]
    assert not [piece for piece in substrings(credential) for dump in dumps if piece in dump]


# -- rendezvous


def test_rendezvous_is_the_same_on_two_instances() -> None:
    """Two independent routers built from the same config (two olladmr instances) order every key the same way."""
    config = make_config(endpoints=[("a", 100), ("b", 100), ("c", 100), ("d", 100)])
    one_clock, two_clock = Clock(), Clock()
    one, two = SessionRouter(one_clock, config), SessionRouter(two_clock, config)
    fleet_one, fleet_two = healthy_fleet(config, one_clock), healthy_fleet(config, two_clock)
    firsts: Counter[str] = Counter()
    for i in range(200):
        s1, s2 = header_session(one, f"conv-{i}"), header_session(two, f"conv-{i}")
        assert s1 == s2
        p1, p2 = one.place(s1, list(fleet_one), MODEL), two.place(s2, list(fleet_two), MODEL)
        assert names(p1.order) == names(p2.order)
        assert names(p1.order) == names(rendezvous(s1.key, list(reversed(list(fleet_two)))))  # input order is irrelevant
        firsts[p1.order[0].name] += 1
    assert set(firsts) == {"a", "b", "c", "d"}  # and it really depends on the key


def test_removing_an_endpoint_moves_only_its_keys() -> None:
    """Over 1,000 keys and 4 endpoints, taking one out of rotation moves exactly the keys that were on it."""
    _, router, _, eps = setup(endpoints=[("a", 100), ("b", 100), ("c", 100), ("d", 100)])
    keys = sessions(router, 1000)
    before = {s.key: router.place(s, eps, MODEL).order[0].name for s in keys}
    eps[2].status = "offline"  # "c"
    after = {s.key: router.place(s, eps, MODEL).order[0].name for s in keys}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k in before if before[k] == "c"}
    assert moved  # some keys were on "c"
    assert "c" not in after.values()


def test_adding_an_endpoint_moves_only_keys_to_it_about_a_fifth() -> None:
    """Adding a fifth endpoint moves keys only onto the new one, and between 12% and 28% of 1,000 keys."""
    clock = Clock()
    four = make_config(endpoints=[(n, 100) for n in "abcd"])
    five = make_config(endpoints=[(n, 100) for n in "abcde"])
    router = SessionRouter(clock, four)
    eps4, eps5 = list(healthy_fleet(four, clock)), list(healthy_fleet(five, clock))
    keys = sessions(router, 1000)
    before = {s.key: router.place(s, eps4, MODEL).order[0].name for s in keys}
    router.reconfigure(five)
    after = {s.key: router.place(s, eps5, MODEL).order[0].name for s in keys}
    moved = [k for k in before if before[k] != after[k]]
    assert all(after[k] == "e" for k in moved)
    assert sorted(moved) == sorted(k for k in after if after[k] == "e")
    assert 120 <= len(moved) <= 280


def test_rendezvous_spreads_keys_evenly() -> None:
    """3,000 keys over 3 equal endpoints land within 10% of 1,000 each."""
    _, router, _, eps = setup()
    counts = Counter(router.place(s, eps, MODEL).order[0].name for s in sessions(router, 3000))
    assert set(counts) == {"a", "b", "c"}
    assert all(900 <= n <= 1100 for n in counts.values()), counts


# -- placement


def test_first_sight_is_a_miss_then_a_hit_after_served() -> None:
    """A new session is a miss on its rendezvous choice; once served there, the next request is a hit on it."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    first = router.place(session, eps, MODEL)
    assert (first.verdict, first.pinned) == (MISS, None)
    assert names(first.order) == names(rendezvous(session.key, eps))
    assert router.served(session, first, first.order[0]) == MISS
    second = router.place(session, eps, MODEL)
    assert (second.verdict, second.pinned) == (HIT, first.order[0].name)
    assert second.order[0] is first.order[0]
    assert router.served(session, second, second.order[0]) == HIT
    assert (router.counts[MISS], router.counts[HIT]) == (1, 1)


def test_unroutable_pinned_endpoint_repins_to_the_next() -> None:
    """When the pinned endpoint is unroutable, the next in the key's order is first, and serving there repins."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    placement = router.place(session, eps, MODEL)
    old = placement.order[0]
    router.served(session, placement, old)
    old.status = "unhealthy"
    moved = router.place(session, eps, MODEL)
    assert (moved.verdict, moved.pinned) == (REPIN, old.name)
    assert old not in moved.order
    assert moved.order[0] is rendezvous(session.key, eps)[1]
    assert router.served(session, moved, moved.order[0]) == REPIN
    assert router.pins.get(session.key) == moved.order[0].name


def test_repinned_session_stays_on_its_new_endpoint_when_the_old_returns() -> None:
    """After a repin, the conversation stays on its new endpoint even when the old (rendezvous) choice is back."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    placement = router.place(session, eps, MODEL)
    old = placement.order[0]
    router.served(session, placement, old)
    old.status = "offline"
    moved = router.place(session, eps, MODEL)
    new = moved.order[0]
    router.served(session, moved, new)
    old.status = "healthy"
    back = router.place(session, eps, MODEL)
    assert rendezvous(session.key, eps)[0] is old  # rendezvous alone would go back
    assert (back.verdict, back.pinned, back.order[0]) == (HIT, new.name, new)
    assert router.served(session, back, new) == HIT


def test_hit_on_a_failed_pin_moves_the_session() -> None:
    """A hit whose pinned endpoint fails and is answered by the next one reports ``repin`` and moves the pin."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, placement.order[0])
    hit = router.place(session, eps, MODEL)
    assert hit.verdict == HIT
    assert router.served(session, hit, hit.order[1]) == REPIN
    assert router.pins.get(session.key) == hit.order[1].name


def test_only_the_highest_routable_tier_is_used() -> None:
    """New sessions land only on the highest routable priority tier; lower tiers come after it, then take over."""
    _, router, _, eps = setup(endpoints=[("a", 100), ("b", 100), ("c", 50), ("d", 50)])
    keys = sessions(router, 200)
    firsts: Counter[str] = Counter()
    for s in keys:
        order = names(router.place(s, eps, MODEL).order)
        assert set(order[:2]) == {"a", "b"} and set(order[2:]) == {"c", "d"}
        firsts[order[0]] += 1
    assert set(firsts) == {"a", "b"}
    eps[0].status = "offline"
    assert {router.place(s, eps, MODEL).order[0].name for s in keys} == {"b"}
    eps[1].status = "offline"
    assert {router.place(s, eps, MODEL).order[0].name for s in keys} == {"c", "d"}


def test_no_routable_candidate_returns_them_unchanged() -> None:
    """With no routable candidate the candidates come back as given, a miss without a pin."""
    _, router, _, eps = setup()
    for ep in eps:
        ep.status = "offline"
    placement = router.place(header_session(router, "x"), eps, MODEL)
    assert (placement.order, placement.verdict, placement.pinned) == (eps, MISS, None)


def test_hit_fallbacks_keep_priority_order() -> None:
    """On a hit, the endpoints after the pinned one still come highest priority tier first."""
    _, router, _, eps = setup(endpoints=[("a", 100), ("b", 100), ("c", 50)])
    a, b, c = eps
    session = find_session(
        router, lambda key: rendezvous(key, [a, b])[0] is a and rendezvous(key, [b, c])[0] is c
    )
    placement = router.place(session, eps, MODEL)
    assert names(placement.order) == ["a", "b", "c"]
    router.served(session, placement, a)
    hit = router.place(session, eps, MODEL)
    assert hit.verdict == HIT
    assert names(hit.order) == ["a", "b", "c"]  # got ["a", "c", "b"]: if "a" fails, the low tier "c" is tried first


def test_a_pin_to_a_lower_tier_stays_when_the_higher_tier_returns() -> None:
    """A session that moved to a fallback tier during an outage stays where its cache now is when the primary returns."""
    _, router, _, eps = setup(endpoints=[("a", 100), ("c", 50)])
    a, c = eps
    session = header_session(router, "conv")
    a.status = "offline"
    outage = router.place(session, eps, MODEL)
    assert outage.order[0] is c
    router.served(session, outage, c)
    a.status = "healthy"
    back = router.place(session, eps, MODEL)
    assert (back.order[0], back.verdict) == (c, "hit")  # the pin wins over the tier: no move back to a cold cache
    fresh = header_session(router, "another conversation")
    assert router.place(fresh, eps, MODEL).order[0] is a  # new sessions use the highest tier again


# -- bounded load


def test_overloaded_choice_spills_to_the_next_in_the_key_order() -> None:
    """A first choice whose in-flight exceeds load_factor x mean + 1 gives way to the key's next endpoint (spill)."""
    _, router, _, eps = setup(endpoints=[(n, 100) for n in "abcd"])
    session = header_session(router, "conv")
    order = rendezvous(session.key, eps)
    for ep in order[1:]:
        ep.in_flight = 2
    order[0].in_flight = 4  # mean 2.5, bound 1.25 * 2.5 + 1 = 4.125: not over
    within = router.place(session, eps, MODEL)
    assert (within.verdict, within.order[0]) == (MISS, order[0])
    order[0].in_flight = 5  # mean 2.75, bound 4.4375: over
    spilled = router.place(session, eps, MODEL)
    assert (spilled.verdict, spilled.pinned) == (SPILL, None)
    assert names(spilled.order) == names([order[1], order[0], order[2], order[3]])
    assert router.served(session, spilled, spilled.order[0]) == SPILL
    assert router.counts[SPILL] == 1


def test_a_new_sessions_spill_is_a_detour_from_its_home() -> None:
    """A new session that spills is pinned to its home, not to the spill target: its next turn goes home once it can."""
    _, router, _, eps = setup(endpoints=[(n, 100) for n in "abc"])
    session = header_session(router, "conv")
    home, second, _ = rendezvous(session.key, eps)
    home.in_flight = 6  # mean 2, bound 3.5: over
    spilled = router.place(session, eps, MODEL)
    assert (spilled.verdict, spilled.order[0], spilled.home) == (SPILL, second, home.name)
    assert router.served(session, spilled, second) == SPILL
    home.in_flight = 0
    back = router.place(session, eps, MODEL)
    assert (back.verdict, back.order[0], back.pinned) == (HIT, home, home.name)  # got ("hit", <second>, ...)


def test_two_instances_agree_after_one_of_them_spills() -> None:
    """Instance 1 spills a new session on its own load, instance 2 (idle) places it: both then send it to one endpoint."""
    clock = Clock()
    config = make_config()
    busy_fleet, idle_fleet = healthy_fleet(config, clock), healthy_fleet(config, clock)
    busy, idle = SessionRouter(clock, config), SessionRouter(clock, config)
    session = header_session(busy, "conv")
    busy_eps, idle_eps = list(busy_fleet), list(idle_fleet)
    home = rendezvous(session.key, busy_eps)[0]
    home.in_flight = 9
    first = busy.place(session, busy_eps, MODEL)
    busy.served(session, first, first.order[0])
    assert first.verdict == SPILL
    second = idle.place(session, idle_eps, MODEL)
    idle.served(session, second, second.order[0])
    home.in_flight = 0
    third = busy.place(session, busy_eps, MODEL)
    assert second.order[0].name == third.order[0].name == home.name


def test_load_bound_is_strictly_exceeded() -> None:
    """In-flight exactly at load_factor x mean + 1 does not spill; one more does."""
    _, router, _, eps = setup({"load_factor": 1.0}, endpoints=[("a", 100), ("b", 100)])
    session = header_session(router, "conv")
    first = rendezvous(session.key, eps)[0]
    first.in_flight = 2  # mean 1, bound 2
    assert router.place(session, eps, MODEL).verdict == MISS
    first.in_flight = 3  # mean 1.5, bound 2.5
    assert router.place(session, eps, MODEL).verdict == SPILL


def test_load_bound_uses_the_configured_load_factor() -> None:
    """The same loads spill under load_factor 1.25 and stay put under load_factor 3."""
    for factor, verdict in ((1.25, SPILL), (3.0, MISS)):
        _, router, _, eps = setup({"load_factor": factor})
        session = header_session(router, "conv")
        rendezvous(session.key, eps)[0].in_flight = 6  # mean 2: bounds 3.5 and 7
        assert router.place(session, eps, MODEL).verdict == verdict


def test_spill_from_the_new_choice_leaves_an_existing_pin() -> None:
    """Pinned endpoint down and its replacement overloaded: the spill is served but the pin stays where it was."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    x, y, z = rendezvous(session.key, eps)
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, x)
    x.status = "offline"
    y.in_flight = 10  # mean 5, bound 7.25
    spilled = router.place(session, eps, MODEL)
    assert (spilled.verdict, spilled.pinned, names(spilled.order)) == (SPILL, x.name, [z.name, y.name])
    assert router.served(session, spilled, z) == SPILL
    assert router.pins.get(session.key) == x.name
    x.status = "healthy"
    y.in_flight = 0
    assert router.place(session, eps, MODEL).order[0] is x


@pytest.mark.parametrize("pressure", ["load", "slot"])
def test_overloaded_pinned_endpoint_spills_and_keeps_the_pin(pressure: str) -> None:
    """A pinned endpoint over the load bound (or without a free slot) spills to the key's next; the pin stays."""
    _, router, _, eps = setup(max_concurrent=1 if pressure == "slot" else 0)
    session = header_session(router, "conv")
    x, y, _ = rendezvous(session.key, eps)
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, x)
    x.in_flight = 10 if pressure == "load" else 1  # bound 5.17 / no free max_concurrent=1 slot
    spilled = router.place(session, eps, MODEL)
    assert (spilled.verdict, spilled.pinned, spilled.order[0]) == (SPILL, x.name, y)  # got ("hit", "<x>", x)
    assert router.served(session, spilled, y) == SPILL
    assert router.pins.get(session.key) == x.name


@pytest.mark.parametrize(("limit", "verdict"), [(1, SPILL), (0, MISS)])
def test_no_free_slot_spills(limit: int, verdict: str) -> None:
    """A first choice at its ``max_concurrent`` limit (within the load bound) spills; without a limit it does not."""
    _, router, _, eps = setup(max_concurrent=limit)
    session = header_session(router, "conv")
    x, y, _ = rendezvous(session.key, eps)
    x.in_flight = 1  # mean 1/3, bound 1.42: only the slot limit matters
    placement = router.place(session, eps, MODEL)
    assert placement.verdict == verdict
    assert placement.order[0] is (y if verdict == SPILL else x)


def test_everyone_overloaded_keeps_the_first_choice() -> None:
    """When no endpoint of the tier is within bound or has a slot, the rendezvous choice is kept (no spill)."""
    _, router, _, eps = setup(max_concurrent=1)
    for ep in eps:
        ep.in_flight = 1
    session = header_session(router, "conv")
    placement = router.place(session, eps, MODEL)
    assert (placement.verdict, placement.order[0]) == (MISS, rendezvous(session.key, eps)[0])


# -- pin table


def test_pin_table_evicts_least_recently_used_at_max_sessions() -> None:
    """A full table makes room by evicting its least recently used pin (a ``get`` counts as use), counting it."""
    clock = Clock()
    table = PinTable(clock, 3, 100.0)
    for key, endpoint in (("k1", "a"), ("k2", "b"), ("k3", "c")):
        table.pin(key, endpoint)
        clock.advance(1)
    assert table.get("k1") == "a"
    table.pin("k4", "a")
    assert (len(table), table.evictions) == (3, 1)
    assert table.get("k2") is None
    assert [table.get(k) for k in ("k1", "k3", "k4")] == ["a", "c", "a"]
    table.pin("k4", "b")  # re-pinning an existing key does not evict
    assert (len(table), table.evictions, table.get("k4")) == (3, 1, "b")


def test_router_evicts_old_sessions_at_max_sessions() -> None:
    """With max_sessions 2, a third served session evicts the oldest, which is a miss again."""
    _, router, _, eps = setup({"max_sessions": 2})
    s1, s2, s3 = sessions(router, 3)
    for s in (s1, s2, s3):
        placement = router.place(s, eps, MODEL)
        router.served(s, placement, placement.order[0])
    assert (router.stats()["sessions"], router.stats()["evictions"]) == (2, 1)
    assert router.place(s1, eps, MODEL).verdict == MISS
    assert router.place(s3, eps, MODEL).verdict == HIT


def test_idle_ttl_forgets_only_unused_pins() -> None:
    """A pin used within idle_ttl survives (its idle time restarts); one unused beyond it disappears."""
    clock = Clock()
    table = PinTable(clock, 10, 10.0)
    table.pin("used", "a")
    table.pin("idle", "b")
    clock.advance(9)
    assert table.get("used") == "a"
    clock.advance(0.5)
    assert len(table) == 2  # "idle" is 9.5s old
    clock.advance(1)
    assert table.get("idle") is None
    assert len(table) == 1
    clock.advance(8)  # "used" last used 9.5s ago
    assert table.get("used") == "a"
    clock.advance(10.5)
    assert table.get("used") is None and len(table) == 0


def test_router_session_expires_after_idle_ttl() -> None:
    """A session served and then left idle past idle_ttl is a miss again; one used in time stays a hit."""
    clock, router, _, eps = setup({"idle_ttl": "1m"})
    kept, dropped = sessions(router, 2)
    for s in (kept, dropped):
        placement = router.place(s, eps, MODEL)
        router.served(s, placement, placement.order[0])
    clock.advance(59)
    assert router.place(kept, eps, MODEL).verdict == HIT
    clock.advance(2)
    assert router.place(dropped, eps, MODEL).verdict == MISS
    assert router.place(kept, eps, MODEL).verdict == HIT
    assert router.stats()["sessions"] == 1


def test_keep_only_drops_pins_to_other_endpoints() -> None:
    """``keep_only`` drops the pins to endpoints outside the set and says how many."""
    table = PinTable(Clock(), 10, 100.0)
    for key, endpoint in (("k1", "a"), ("k2", "b"), ("k3", "c"), ("k4", "c")):
        table.pin(key, endpoint)
    assert table.keep_only({"a", "b"}) == 2
    assert [table.get(k) for k in ("k1", "k2", "k3", "k4")] == ["a", "b", None, None]


def test_reload_keeps_pins_to_endpoints_that_remain() -> None:
    """``reconfigure`` without an endpoint forgets the pins to it and keeps every other pin, and adopts new settings."""
    clock, router, fleet, eps = setup()
    pinned: dict[str, list[SessionKey]] = {"a": [], "b": [], "c": []}
    for s in sessions(router, 30):
        placement = router.place(s, eps, MODEL)
        router.served(s, placement, placement.order[0])
        pinned[placement.order[0].name].append(s)
    assert all(pinned.values())
    reloaded = make_config({"max_sessions": 500, "idle_ttl": "2m"}, endpoints=[("a", 100), ("b", 100)])
    fleet.reconfigure(reloaded)
    router.reconfigure(reloaded)
    for s in pinned["a"] + pinned["b"]:
        assert router.pins.get(s.key) in ("a", "b")
    assert all(router.pins.get(s.key) is None for s in pinned["c"])
    stats = router.stats()
    assert (stats["sessions"], stats["max_sessions"], stats["idle_ttl_seconds"]) == (
        len(pinned["a"]) + len(pinned["b"]),
        500,
        120.0,
    )


def test_reload_applies_new_table_bounds() -> None:
    """After a reload lowering max_sessions and idle_ttl, the pin table evicts and expires by the new bounds."""
    clock, router, _, eps = setup({"max_sessions": 10, "idle_ttl": "10m"})
    keys = sessions(router, 5)
    for s in keys[:4]:
        placement = router.place(s, eps, MODEL)
        router.served(s, placement, placement.order[0])
    router.reconfigure(make_config({"max_sessions": 2, "idle_ttl": "30s"}))
    placement = router.place(keys[4], eps, MODEL)
    router.served(keys[4], placement, placement.order[0])
    assert (len(router.pins), router.pins.evictions) == (2, 3)
    assert router.place(keys[3], eps, MODEL).verdict == HIT
    clock.advance(31)
    assert len(router.pins) == 0


# -- loaded models


def two_endpoints() -> tuple[SessionRouter, list[EndpointState], SessionKey, EndpointState, EndpointState]:
    """A router over a one-tier fleet of two, a session, and its rendezvous first and second choice."""
    _, router, _, eps = setup(endpoints=[("a", 100), ("b", 100)])
    session = header_session(router, "conv")
    first, second = rendezvous(session.key, eps)
    return router, eps, session, first, second


def test_loaded_endpoint_beats_a_cold_first_choice() -> None:
    """Without a pin, a tier member with the model loaded wins over the key's first choice that lacks it."""
    router, eps, session, first, second = two_endpoints()
    first.set_loaded({})
    second.set_loaded({MODEL: False})
    placement = router.place(session, eps, MODEL)
    assert (placement.verdict, names(placement.order)) == (MISS, [second.name, first.name])
    assert (router.cold_avoided, router.cold_taken) == (1, 0)


def test_loaded_preference_is_per_model() -> None:
    """Another model loaded elsewhere does not attract the session; the cold first choice is taken."""
    router, eps, session, first, second = two_endpoints()
    first.set_loaded({})
    second.set_loaded({OTHER_MODEL: False})
    assert router.place(session, eps, MODEL).order[0] is first
    assert (router.cold_avoided, router.cold_taken) == (0, 1)


def test_loaded_preference_does_not_override_a_pin() -> None:
    """With a pin, the pinned endpoint wins while its model state is unknown or loaded, even if another has it loaded."""
    router, eps, session, first, second = two_endpoints()
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, first)
    second.set_loaded({MODEL: False})
    first.set_loaded(None)  # unknown (no /engines/ps)
    assert (router.place(session, eps, MODEL).verdict, router.place(session, eps, MODEL).order[0]) == (HIT, first)
    first.set_loaded({MODEL: False})
    hit = router.place(session, eps, MODEL)
    assert (hit.verdict, hit.order[0]) == (HIT, first)
    assert (router.cold_avoided, router.cold_taken) == (0, 0)


def test_a_pin_whose_model_was_unloaded_moves_to_a_loaded_endpoint() -> None:
    """Once /engines/ps shows the pinned endpoint dropped the model (and with it the cache), the session repins warm."""
    router, eps, session, first, second = two_endpoints()
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, first)
    first.set_loaded({})
    second.set_loaded({MODEL: False})
    moved = router.place(session, eps, MODEL)
    assert (moved.verdict, moved.order[0]) == (REPIN, second)
    assert router.served(session, moved, second) == REPIN


def test_a_pin_whose_model_is_loaded_nowhere_stays() -> None:
    """When no endpoint has the model loaded, a session whose pinned endpoint unloaded it stays there (a load anywhere)."""
    router, eps, session, first, second = two_endpoints()
    placement = router.place(session, eps, MODEL)
    router.served(session, placement, first)
    first.set_loaded({})
    second.set_loaded({})
    stay = router.place(session, eps, MODEL)
    assert (stay.verdict, stay.order[0]) == (HIT, first)
    assert router.cold_taken >= 1


def test_nothing_loaded_keeps_the_rendezvous_choice() -> None:
    """When no endpoint has the model loaded, the rendezvous choice is kept and counted as a cold route taken."""
    router, eps, session, first, second = two_endpoints()
    first.set_loaded({})
    second.set_loaded({})
    placement = router.place(session, eps, MODEL)
    assert names(placement.order) == [first.name, second.name]
    assert (router.cold_avoided, router.cold_taken) == (0, 1)


def test_loading_counts_as_not_loaded() -> None:
    """A model that is still loading (``loading: True``) is not loaded: a ready endpoint wins over it."""
    router, eps, session, first, second = two_endpoints()
    first.set_loaded({MODEL: True})
    second.set_loaded({MODEL: False})
    assert first.model_loaded(MODEL) is False and second.model_loaded(MODEL) is True
    assert router.place(session, eps, MODEL).order[0] is second
    assert router.cold_avoided == 1


def test_unknown_loaded_state_is_neutral() -> None:
    """Unknown (``None``) neither counts as cold nor as loaded: the rendezvous order stays and no cold route counts."""
    router, eps, session, first, second = two_endpoints()
    assert first.model_loaded(MODEL) is None
    assert names(router.place(session, eps, MODEL).order) == [first.name, second.name]
    first.set_loaded({})  # first lacks it; the unknown second is not preferred as if loaded
    assert names(router.place(session, eps, MODEL).order) == [first.name, second.name]
    assert (router.cold_avoided, router.cold_taken) == (0, 1)
    first.set_loaded(None)
    second.set_loaded({})  # unknown first choice is not counted as a cold route
    assert names(router.place(session, eps, MODEL).order) == [first.name, second.name]
    assert (router.cold_avoided, router.cold_taken) == (0, 1)


def test_an_endpoint_loading_the_model_beats_one_that_would_start_another_load() -> None:
    """The model loaded nowhere but loading at the key's second choice: the request joins that load."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    x, y, z = rendezvous(session.key, eps)
    x.set_loaded({})
    y.set_loaded({MODEL: True})  # /engines/ps: loading
    z.set_loaded({})
    assert router.place(session, eps, MODEL).order[0] is y
    assert router.cold_avoided == 1
    y.set_loaded({})
    z.note_routed(MODEL)  # olladmr just sent the model there: a load is under way
    assert z.model_loading(MODEL) and z.model_loaded(MODEL) is False
    assert router.place(session, eps, MODEL).order[0] is z


def test_a_model_loaded_nowhere_goes_where_the_fewest_models_are_resident() -> None:
    """Loaded nowhere: the endpoint holding the fewest models (loaded or loading) wins, ties in the key's order."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    x, y, z = rendezvous(session.key, eps)
    x.set_loaded({OTHER_MODEL: False})
    y.set_loaded({"ai/qwen3": True})
    z.set_loaded({})
    assert names(router.place(session, eps, MODEL).order) == names([z, x, y])
    z.note_routed(OTHER_MODEL)
    assert names(router.place(session, eps, MODEL).order) == names([x, y, z])
    z.set_loaded(None)  # one endpoint cannot say what it holds: the key's order alone
    assert names(router.place(session, eps, MODEL).order) == names([x, y, z])
    assert z.resident_count() is None and x.resident_count() == 1


def test_note_routed_lasts_until_an_answer_or_the_next_ps() -> None:
    """``note_routed`` marks a load under way; an answer makes the model loaded, a ``set_loaded`` replaces both."""
    _, _, _, (a, b, _) = setup()
    a.set_loaded({})
    a.note_routed(MODEL)
    assert (a.model_loading(MODEL), a.model_loaded(MODEL), a.resident_count()) == (True, False, 1)
    a.note_served(MODEL)
    assert (a.model_loading(MODEL), a.model_loaded(MODEL)) == (False, True)
    b.set_loaded({})
    b.note_routed(MODEL)
    b.set_loaded({})
    assert (b.model_loading(MODEL), b.resident_count()) == (False, 0)
    b.set_loaded({MODEL: False})
    b.note_routed(MODEL)  # loaded already: no load starts
    assert (b.model_loading(MODEL), b.model_loaded(MODEL)) == (False, True)


def test_note_served_marks_loaded_until_the_next_ps() -> None:
    """``note_served`` makes a model count as loaded until the next ``set_loaded`` replaces what is known."""
    router, eps, session, first, second = two_endpoints()
    first.set_loaded({})
    second.set_loaded({})
    second.note_served(MODEL)
    assert second.model_loaded(MODEL) is True and second.model_loaded(OTHER_MODEL) is False
    assert router.place(session, eps, MODEL).order[0] is second
    second.set_loaded({})
    assert second.model_loaded(MODEL) is False
    assert router.place(session, eps, MODEL).order[0] is first
    unknown = eps[0]
    unknown.set_loaded(None)
    unknown.note_served(MODEL)
    assert unknown.model_loaded(MODEL) is True
    unknown.set_loaded(None)
    assert unknown.model_loaded(MODEL) is None


def test_loaded_preference_respects_the_load_bound() -> None:
    """The only loaded endpoint, busy, keeps the request (no cold load for an imbalance); overloaded, it spills."""
    _, router, _, eps = setup()
    session = header_session(router, "conv")
    x, y, z = rendezvous(session.key, eps)
    x.set_loaded({})
    y.set_loaded({MODEL: False})
    z.set_loaded({})
    y.in_flight = 10  # mean 3.33, bound 5.17: over the bound, not over twice it
    placement = router.place(session, eps, MODEL)
    assert (placement.verdict, placement.order[0]) == (MISS, y)
    y.in_flight = 20  # mean 6.67, bound 9.33, twice 18.67: overloaded
    placement = router.place(session, eps, MODEL)
    assert placement.verdict == SPILL
    assert placement.order[0] is not y and set(placement.order) == {x, y, z}


def test_prefer_loaded_filters_to_loaded_endpoints() -> None:
    """For an unkeyed request, ``prefer_loaded`` keeps only the endpoints with the model loaded, counting the avoidance."""
    _, router, _, (a, b, c) = setup()
    a.set_loaded({})
    b.set_loaded({MODEL: False})
    c.set_loaded({MODEL: True})
    assert router.prefer_loaded([a, b, c], MODEL) == [b]
    assert router.cold_avoided == 1


def test_prefer_loaded_drops_loaded_endpoints_over_the_load_bound() -> None:
    """A loaded endpoint over load_factor x mean + 1 is not preferred; with no other loaded, the pool stays."""
    _, router, _, (a, b, c) = setup()
    a.set_loaded({MODEL: False})
    b.set_loaded({MODEL: False})
    c.set_loaded({})
    a.in_flight = 10  # mean 3.33, bound 5.17
    assert router.prefer_loaded([a, b, c], MODEL) == [b]
    b.set_loaded({})
    pool = [a, b, c]
    assert router.prefer_loaded(pool, MODEL) is pool
    assert router.cold_avoided == 1


@pytest.mark.parametrize("loaded", [{}, {MODEL: False}, {MODEL: True}, None])
def test_prefer_loaded_leaves_the_pool_when_none_or_all_are_loaded(loaded: dict[str, bool] | None) -> None:
    """When no endpoint or every endpoint has the model loaded, ``prefer_loaded`` returns the pool as given."""
    _, router, _, eps = setup()
    for ep in eps:
        ep.set_loaded(loaded)
    assert router.prefer_loaded(eps, MODEL) is eps
    assert router.cold_avoided == 0


# -- stats


def test_stats_count_what_happened() -> None:
    """``stats()`` reports the settings and exactly the hits, misses, repins, spills, evictions and cold routes seen."""
    clock, router, _, eps = setup(
        {"key_sources": ["session_header", "prefix", "auth"], "max_sessions": 2, "idle_ttl": "60s", "load_factor": 1.5}
    )
    s1, s2, s3 = sessions(router, 3)

    def serve(session: SessionKey) -> tuple[Placement, str]:
        placement = router.place(session, eps, MODEL)
        return placement, router.served(session, placement, placement.order[0])

    assert serve(s1)[1] == MISS
    clock.advance(1)
    placement, verdict = serve(s1)
    assert verdict == HIT
    holder = placement.order[0]
    holder.status = "offline"
    clock.advance(1)
    assert serve(s1)[1] == REPIN
    holder.status = "healthy"
    first = rendezvous(s2.key, eps)[0]
    first.in_flight = 10  # mean 3.33, bound 6
    clock.advance(1)
    assert serve(s2)[1] == SPILL
    first.in_flight = 0
    x, y, z = rendezvous(s3.key, eps)
    x.set_loaded({})
    y.set_loaded({MODEL: False})
    clock.advance(1)
    placement, verdict = serve(s3)
    assert (verdict, placement.order[0]) == (MISS, y)
    assert router.stats() == {
        "enabled": True,
        "key_sources": ["session_header", "prefix_hash", "auth_header"],  # (Olla's names)
        "sessions": 2,
        "max_sessions": 2,
        "idle_ttl_seconds": 60.0,
        "load_factor": 1.5,
        "hits": 1,
        "misses": 2,
        "repins": 1,
        "spills": 1,
        "evictions": 1,
        "cold_route_avoided": 1,
        "cold_route_taken": 0,
        "placement": "hash",
        "placements": {"prefix": 0, "session": 5, "spill": 0, "cold": 0, "balance": 0},
        "prompt_tokens_matched": 0,
        "prompt_tokens_unmatched": 0,
    }
    assert router.place(s1, eps, MODEL).verdict == MISS  # s1 was the least recently used: evicted


def test_stats_of_a_fresh_router() -> None:
    """A fresh router reports its settings and zero counters."""
    _, router, _, _ = setup({"enabled": False})
    stats = router.stats()
    assert stats["enabled"] is False and stats["key_sources"] == ["session_header", "prefix_hash"]
    assert (stats["max_sessions"], stats["idle_ttl_seconds"], stats["load_factor"]) == (100_000, 1800.0, 1.25)
    assert all(stats[k] == 0 for k in ("sessions", "hits", "misses", "repins", "spills", "evictions"))


def test_session_key_function_matches_the_router() -> None:
    """``session_key`` with the router's settings gives the router's key."""
    _, router, _, _ = setup()
    body = chat(("user", "hi"))
    direct = session_key(router.settings, route=CHAT, model_key=MODEL, headers=Headers({}), body=body, client_ip="")
    assert direct == key_of(router, body=body)
