"""Unit tests for placement by expected cost: prompt blocks per dialect (``olladmr.fleet.prefix``), the prefix index
(bounds, forgetting) and the cost choice of ``SessionRouter`` -- all on a ``task.Clock``."""

from __future__ import annotations

from typing import Any, Sequence

import pytest
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from olladmr.config import Config, parse_config
from olladmr.fleet.prefix import HEAD_CHARS, PrefixIndex, boundaries, canonical_prompt, prompt_blocks
from olladmr.fleet.sessions import BALANCE, COLD, HIT, MISS, PREFIX, REPIN, SPILL, SessionKey, SessionRouter, rendezvous
from olladmr.fleet.state import EndpointState, Fleet

MODEL = "ai/smollm2"
CHAT = "chat/completions"


def make_config(affinity: dict[str, Any] | None = None, names: Sequence[str] = ("a", "b", "c"), **ep: Any) -> Config:
    return parse_config(
        {
            "proxy": {"affinity": affinity or {}},
            "endpoints": [{"name": name, "url": f"http://{name}:1", **ep} for name in names],
        },
        "t",
    )


def setup(affinity: dict[str, Any] | None = None, names: Sequence[str] = ("a", "b", "c"), **ep: Any
          ) -> tuple[Clock, SessionRouter, list[EndpointState]]:
    clock = Clock()
    config = make_config(affinity, names, **ep)
    fleet = Fleet(config, clock)
    for state in fleet:
        state.status = "healthy"
    return clock, SessionRouter(clock, config), list(fleet)


def words(tag: str, count: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(count))


def chat_body(system: str, *turns: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"model": MODEL, "messages": messages}


def key_for(router: SessionRouter, body: dict[str, Any], route: str = CHAT, headers: Headers | None = None
            ) -> SessionKey:
    key = router.key_for(route=route, model_key=MODEL, headers=headers or Headers(), body=body, client_ip="")
    assert key is not None
    return key


def serve(router: SessionRouter, key: SessionKey, eps: list[EndpointState], finish: bool = True
          ) -> tuple[str, EndpointState, str]:
    """Place ``key``, send it to the first choice (its prefill counted), serve it; returns (verdict, endpoint, reason)."""
    placement = router.place(key, eps, MODEL, CHAT)
    chosen = placement.order[0]
    assert key.blocks is not None
    work = router.sending(chosen, MODEL, key.blocks)
    verdict = router.served(key, placement, chosen)
    if finish:
        router.prefilled(chosen, work)
        for moment in ("first_token", "finish"):
            router.cached(chosen, MODEL, key.blocks, moment)
    return verdict, chosen, placement.reason


# -- prompt blocks, per dialect


def test_a_chat_turn_extends_the_blocks_of_the_turn_before() -> None:
    """Turn N+1's block digests start with every digest of turn N (message ends and fixed blocks are cut alike)."""
    system = words("s", 400)
    turns = [words("u", 30)]
    before = prompt_blocks(CHAT, chat_body(system, *turns), MODEL, 256)
    for n in range(4):
        turns += [words(f"a{n}", 20), words(f"t{n}", 40)]
        after = prompt_blocks(CHAT, chat_body(system, *turns), MODEL, 256)
        assert before is not None and after is not None
        assert after.digests[: len(before.digests)] == before.digests
        assert len(after.digests) > len(before.digests)
        assert after.head == before.head  # the same family: the system prompt's opening
        before = after


def test_blocks_depend_on_the_model_and_on_every_character_before_them() -> None:
    """A change in the first message changes every digest after it; another model shares no digest."""
    body = chat_body(words("s", 300), words("u", 10))
    blocks = prompt_blocks(CHAT, body, MODEL, 256)
    other_model = prompt_blocks(CHAT, body, "ai/llama3.2", 256)
    changed = prompt_blocks(CHAT, chat_body("X" + words("s", 300)[1:], words("u", 10)), MODEL, 256)
    assert blocks is not None and other_model is not None and changed is not None
    assert not set(blocks.digests) & set(other_model.digests)
    assert not set(blocks.digests) & set(changed.digests)


def test_the_head_is_the_system_prompt_opening_capped() -> None:
    """The head covers the system prompt (at most HEAD_CHARS); conversations of one tenant share it, others do not."""
    tenant = words("tenant", 900)
    one = prompt_blocks(CHAT, chat_body(tenant, "task one"), MODEL, 256)
    two = prompt_blocks(CHAT, chat_body(tenant, "another task entirely"), MODEL, 256)
    other = prompt_blocks(CHAT, chat_body(words("other", 900), "task one"), MODEL, 256)
    assert one is not None and two is not None and other is not None
    assert one.head == two.head != other.head
    assert one.ends[one.head_index] <= HEAD_CHARS < one.ends[one.head_index + 1]
    short = prompt_blocks(CHAT, {"messages": [{"role": "user", "content": "hi"}]}, MODEL, 256)
    assert short is not None and short.head == short.digests[0]


@pytest.mark.parametrize(
    ("route", "first", "second"),
    [
        (
            "messages",
            {"system": "be brief " * 50, "messages": [{"role": "user", "content": [{"type": "text", "text": "q1"}]}]},
            {"system": "be brief " * 50, "messages": [{"role": "user", "content": [{"type": "text", "text": "q1"}]},
                                                      {"role": "assistant", "content": "a1"},
                                                      {"role": "user", "content": "q2"}]},
        ),
        (
            "responses",
            {"instructions": "you are a coder " * 40, "input": [{"role": "user", "content": "fix it"}]},
            {"instructions": "you are a coder " * 40, "input": [{"role": "user", "content": "fix it"},
                                                                 {"type": "function_call_output", "call_id": "c1",
                                                                  "output": "ok"}]},
        ),
        ("completions", {"prompt": "once upon a time " * 40}, {"prompt": "once upon a time " * 40 + "there was"}),
        (
            "chat/completions",
            {"tools": [{"type": "function", "function": {"name": "ls"}}],
             "messages": [{"role": "user", "content": "list files"}]},
            {"tools": [{"type": "function", "function": {"name": "ls"}}],
             "messages": [{"role": "user", "content": "list files"},
                          {"role": "assistant", "content": None,
                           "tool_calls": [{"id": "1", "function": {"name": "ls", "arguments": "{}"}}]},
                          {"role": "tool", "tool_call_id": "1", "content": "a b c"}]},
        ),
    ],
)
def test_every_dialect_chains_its_blocks(route: str, first: dict[str, Any], second: dict[str, Any]) -> None:
    """Anthropic messages, Responses input items, text completions and chat with tools: the longer prompt extends
    the shorter one's blocks."""
    a = prompt_blocks(route, first, MODEL, 64)
    b = prompt_blocks(route, second, MODEL, 64)
    assert a is not None and b is not None
    assert b.digests[: len(a.digests) - 1] == a.digests[:-1]  # (a completion's last cut is its own end)
    assert len(b.digests) > len(a.digests) - 1 and b.chars > a.chars


def test_no_prompt_no_blocks() -> None:
    """Requests with nothing to place by give no blocks; embeddings are not generation."""
    assert canonical_prompt(CHAT, {"messages": "nope"}) is None
    assert canonical_prompt("messages", {}) is None
    assert canonical_prompt("completions", {"prompt": ""}) is None
    assert canonical_prompt("embeddings", {"input": "x"}) is None


def test_boundaries_cut_at_message_ends_and_every_block() -> None:
    assert boundaries([10, 300, 600], 256) == [10, 256, 300, 512, 600]
    assert boundaries([256, 512], 256) == [256, 512]
    assert boundaries([], 256) == []


# -- the prefix index


def test_the_index_is_bounded_and_evicts_tails_before_heads() -> None:
    """At most cache_tokens x 4 / block_chars blocks per endpoint and model; a prompt's head outlives its tail."""
    _, router, (a, *_) = setup({"cache_tokens": 640, "block_chars": 256})  # 10 blocks
    index = router.index
    assert index.capacity(a) == 10
    head = words("h", 300)
    first = prompt_blocks(CHAT, chat_body(head, words("x", 400)), MODEL, 256)
    second = prompt_blocks(CHAT, chat_body(head, words("y", 400)), MODEL, 256)
    assert first is not None and second is not None and len(first.digests) > 10
    index.record(a, MODEL, first)
    index.record(a, MODEL, second)
    assert index.held(a) == 10
    shared = sum(1 for x, y in zip(first.digests, second.digests) if x == y)
    assert index.match(a, MODEL, second) > shared  # the newest prompt, from its head on
    assert index.match(a, MODEL, first) == shared  # the older one lost its tail, not the shared head


def test_the_index_forgets_a_restart_an_unload_and_a_removal() -> None:
    """An endpoint that went down, a model unloaded there (/engines/ps) and a removed endpoint hold nothing."""
    _, router, (a, b, c) = setup()
    blocks = prompt_blocks(CHAT, chat_body(words("s", 300), "q"), MODEL, 256)
    assert blocks is not None
    for ep in (a, b, c):
        router.index.record(ep, MODEL, blocks)
        assert router.index.match(ep, MODEL, blocks) == len(blocks.digests)
    a.cache_lost()
    assert router.index.match(a, MODEL, blocks) == 0
    b.set_loaded({MODEL: False})
    assert router.index.match(b, MODEL, blocks) == len(blocks.digests)  # loaded: still there
    b.set_loaded({})
    assert router.index.match(b, MODEL, blocks) == 0  # unloaded: its cache went with it
    router.reconfigure(make_config(names=("a", "b")))
    assert router.index.held(c) == 0


# -- the cost choice


def test_a_tenants_conversations_go_where_its_head_is_cached() -> None:
    """The first conversation of a tenant lands by rendezvous of its head; the tenant's next ones follow it there."""
    _, router, eps = setup()
    tenant = words("tenant", 800)
    first = key_for(router, chat_body(tenant, "task zero"))
    assert first.blocks is not None
    home = rendezvous(first.blocks.head.hex(), eps)[0]
    assert serve(router, first, eps) == (MISS, home, BALANCE)
    for n in range(1, 5):
        key = key_for(router, chat_body(tenant, f"task {n}"))
        verdict, chosen, reason = serve(router, key, eps)
        assert (verdict, chosen, reason) == (HIT, home, PREFIX)
    assert router.stats()["prompt_tokens_matched"] > 0


def test_a_busy_home_spills_a_new_conversation_when_waiting_costs_more_than_its_head() -> None:
    """With more prefill waiting at the tenant's endpoint than its head costs, a new conversation goes elsewhere."""
    _, router, eps = setup()
    tenant = words("tenant", 300)  # ~2,700 characters
    first = key_for(router, chat_body(tenant, "task zero"))
    _, home, _ = serve(router, first, eps)
    home.prefill_pending = 100_000
    home.in_flight = 6
    verdict, chosen, reason = serve(router, key_for(router, chat_body(tenant, "task one")), eps)
    assert chosen is not home and (verdict, reason) == (SPILL, SPILL)
    home.prefill_pending = 0
    home.in_flight = 0
    # now both hold the head: the cheaper one of the two is used
    verdict, chosen, reason = serve(router, key_for(router, chat_body(tenant, "task two")), eps)
    assert verdict == HIT and reason == PREFIX


def test_a_conversation_never_leaves_a_warm_endpoint_with_a_free_slot() -> None:
    """Even with prefill waiting there and none elsewhere, a conversation stays where its whole history is cached
    while that endpoint has a free slot; once every slot is taken, cost decides."""
    _, router, eps = setup()
    turns = [words("u", 20)]
    _, home, _ = serve(router, key_for(router, chat_body("short system", *turns)), eps)
    turns += [words("a", 10), words("v", 10)]
    home.prefill_pending = 5_000  # other prompts waiting there, bigger than this whole conversation
    home.in_flight = 3  # of 4 slots
    assert serve(router, key_for(router, chat_body("short system", *turns)), eps)[1] is home
    home.in_flight = 4
    turns += [words("b", 10), words("w", 10)]
    verdict, chosen, _ = serve(router, key_for(router, chat_body("short system", *turns)), eps)
    assert chosen is not home and verdict == SPILL


def test_a_new_prompt_takes_its_rendezvous_home_unless_every_slot_there_is_taken() -> None:
    """A prompt cached nowhere goes where every instance sends it -- whatever this instance thinks is waiting there
    (it may be a later turn another instance placed) -- unless that endpoint is full and another is not."""
    _, router, eps = setup()
    key = key_for(router, chat_body(words("s", 100), "q"))
    assert key.blocks is not None
    order = rendezvous(key.blocks.head.hex(), eps)
    order[0].prefill_pending = key.blocks.chars * 10
    order[0].in_flight = 3
    assert router.place(key, eps, MODEL, CHAT).order[0] is order[0]
    order[0].in_flight = 4
    assert router.place(key, eps, MODEL, CHAT).order[0] is not order[0]
    for ep in eps:
        ep.in_flight = 4
    assert router.place(key, eps, MODEL, CHAT).order[0] is order[0]


def test_cost_avoids_a_cold_load_and_counts_it() -> None:
    """An endpoint without the model loaded costs a cold load; when it is the only choice the reason is cold."""
    _, router, (a, b, c) = setup()
    a.set_loaded({})
    b.set_loaded({MODEL: False})
    c.set_loaded({})
    key = key_for(router, chat_body(words("s", 50), "q"))
    verdict, chosen, reason = serve(router, key, [a, b, c])
    assert chosen is b and reason == BALANCE and router.cold_avoided == 1
    b.status = "offline"
    verdict, chosen, reason = serve(router, key_for(router, chat_body(words("z", 50), "q")), [a, b, c])
    assert reason == COLD and chosen in (a, c)


def test_a_failed_first_choice_is_a_repin_and_the_prompt_follows_where_it_was_served() -> None:
    _, router, eps = setup()
    turns = [words("u", 50)]
    key = key_for(router, chat_body("sys", *turns))
    _, home, _ = serve(router, key, eps)
    turns += ["answer", "next"]
    key = key_for(router, chat_body("sys", *turns))
    placement = router.place(key, eps, MODEL, CHAT)
    assert placement.order[0] is home
    other = placement.order[1]
    assert key.blocks is not None
    router.prefilled(other, router.sending(other, MODEL, key.blocks))
    assert router.served(key, placement, other) == REPIN
    router.cached(other, MODEL, key.blocks, "finish")
    home.cache_lost()  # it died
    turns += ["answer 2", "next 2"]
    assert serve(router, key_for(router, chat_body("sys", *turns)), eps)[:2] == (HIT, other)


def test_prefill_work_is_counted_while_it_waits() -> None:
    _, router, (a, *_) = setup()
    key = key_for(router, chat_body(words("s", 100), "q"))
    assert key.blocks is not None
    work = router.sending(a, MODEL, key.blocks)
    assert (a.prefill_pending, a.prefilling) == (work, 1)
    assert work == key.blocks.chars + router.overhead_chars()
    assert router.sending(a, MODEL, key.blocks) == work  # not cached while the first is running (llama.cpp)
    router.prefilled(a, work)
    router.cached(a, MODEL, key.blocks, "first_token")
    assert router.uncached(a, MODEL, key.blocks) == key.blocks.chars  # nor once its first token came
    router.cached(a, MODEL, key.blocks, "finish")
    again = router.sending(a, MODEL, key.blocks)  # now cached: only the fixed cost
    assert again == router.overhead_chars()
    router.prefilled(a, work)
    router.prefilled(a, again)
    assert (a.prefill_pending, a.prefilling) == (0, 0)


def test_an_explicit_session_keeps_its_pin_placement() -> None:
    """``X-Olla-Session-ID`` still places by the session's rendezvous and pins, reason session."""
    _, router, eps = setup()
    key = key_for(router, chat_body("s", "q"), headers=Headers({b"x-olla-session-id": [b"abc"]}))
    assert key.blocks is None and key.source == "session_header"
    placement = router.place(key, eps, MODEL, CHAT)
    assert placement.reason == "session" and placement.matched is None


def test_hash_placement_is_the_old_conversation_key() -> None:
    _, router, _ = setup({"placement": "hash"})
    key = key_for(router, chat_body("s", "q"))
    assert key.blocks is None and key.source == "prefix"


def test_prefer_loaded_for_an_unkeyed_request_never_takes_a_cold_load_while_a_loaded_endpoint_has_a_slot() -> None:
    _, router, (a, b, c) = setup()
    runner = "embedding " + MODEL
    a.set_loaded({runner: False})
    b.set_loaded({})
    c.set_loaded({})
    for in_flight in range(4):
        a.in_flight = in_flight
        assert router.prefer_loaded([a, b, c], runner) == [a]
    a.in_flight = 4  # every slot taken: a load elsewhere pays
    assert router.prefer_loaded([a, b, c], runner) == [a, b, c]
    assert (router.cold_avoided, router.cold_taken) == (4, 1)


@pytest.mark.parametrize("moment", ["send", "first_token", "finish"])
def test_cached_after_says_when_a_prompt_counts_as_cached(moment: str) -> None:
    """``cached_after``: a prompt counts as cached at its endpoint from that moment on, not before."""
    _, router, (a, *_) = setup({"cached_after": moment})
    key = key_for(router, chat_body(words("s", 100), "q"))
    assert key.blocks is not None
    router.sending(a, MODEL, key.blocks)
    seen = []
    for step in ("first_token", "finish"):
        seen.append(router.uncached(a, MODEL, key.blocks) == 0 or router.index.match(a, MODEL, key.blocks) > 0)
        router.cached(a, MODEL, key.blocks, step)
    seen.append(router.index.match(a, MODEL, key.blocks) > 0)
    assert seen == {"send": [True, True, True], "first_token": [False, True, True],
                    "finish": [False, False, True]}[moment]


def test_a_tenants_conversations_that_start_together_stay_together() -> None:
    """The second conversation of a tenant, sent while the first is still running (its head not cached anywhere
    yet with cached_after: finish), goes where the first went -- even though waiting there costs more."""
    _, router, eps = setup()
    tenant = words("tenant", 800)
    first = key_for(router, chat_body(tenant, "task zero"))
    assert first.blocks is not None
    placement = router.place(first, eps, MODEL, CHAT)
    home = placement.order[0]
    router.sending(home, MODEL, first.blocks)  # running: not cached yet
    router.served(first, placement, home)
    second = key_for(router, chat_body(tenant, "task one"))
    assert second.blocks is not None
    assert router.uncached(home, MODEL, second.blocks) == second.blocks.chars  # nothing cached there yet
    verdict, chosen, reason = serve(router, second, eps)
    assert (verdict, chosen, reason) == (HIT, home, PREFIX)


@pytest.mark.parametrize(
    ("affinity", "endpoint", "message"),
    [
        ({"placement": "random"}, {}, "t: proxy.affinity.placement: expected one of cost, hash, got"),
        ({"block_chars": 8}, {}, "t: proxy.affinity.block_chars: must be at least 16, got 8"),
        ({"cached_after": "later"}, {}, "t: proxy.affinity.cached_after: expected one of finish, first_token, send"),
        ({"move_cost": -1}, {}, "t: proxy.affinity.move_cost: must be at least 0"),
        ({}, {"slots": 0}, "t: endpoints[0].slots: must be at least 1, got 0"),
        ({}, {"cache_tokens": -5}, "t: endpoints[0].cache_tokens: must be at least 0, got -5"),
    ],
)
def test_placement_settings_are_checked(affinity: dict[str, Any], endpoint: dict[str, Any], message: str) -> None:
    """A bad placement setting stops the daemon with one line: file, key path, problem."""
    from olladmr.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"proxy": {"affinity": affinity}, "endpoints": [{"url": "http://a:1", **endpoint}]}, "t")
    assert str(caught.value).startswith(message)
