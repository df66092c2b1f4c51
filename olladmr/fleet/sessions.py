"""
KV-cache affinity: a conversation goes back to the endpoint that already
processed its prefix, and every olladmr instance agrees which one that is.

* **Session keys** (:func:`session_key`): the first of the configured
  sources that yields one -- the ``X-Olla-Session-ID`` header, a hash of
  the conversation's stable prefix (system messages plus the first user
  message; for text completions the first ``prefix_bytes`` of the prompt),
  a hash of the client's credential, or the client address -- scoped by
  model.  Only digests are kept: a credential never appears in clear.
* **Placement** (:meth:`SessionRouter.place`): rendezvous
  (highest-random-weight) hashing of the key over the routable candidates
  of the highest priority tier, so any number of instances with the same
  endpoint names pick the same endpoint, across restarts and reloads, and
  when an endpoint leaves only its own sessions move.  A bounded pin table
  (LRU, idle TTL) on top keeps a conversation that had to move on its new
  endpoint when the old one returns (its cache is warm there now).
* **Bounded load**: an endpoint whose in-flight count exceeds
  ``load_factor`` x the tier's mean + 1, or that has no free slot, is
  passed over for the next one in the key's order (``spill``).  A spill
  is a one-off detour: the session stays pinned to the endpoint placement
  chose, so instances that bound load by their own in-flight counts still
  agree where each conversation lives.
* **Loaded models**: without a pin, an endpoint that has the model loaded
  (``/engines/ps``) wins over one that would have to load it, then one
  already loading it; a model loaded nowhere goes where the fewest models
  are resident, so models spread over the fleet.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ..config.schema import AffinityConfig, Config
from .prefix import CHARS_PER_TOKEN, MIN_HEAD_CHARS, PrefixIndex, PromptBlocks, prompt_blocks
from .models import normalise_model
from .state import EndpointState

SESSION_HEADER = b"x-olla-session-id"
HIT, MISS, REPIN, SPILL, DISABLED = "hit", "miss", "repin", "spill", "disabled"
#: Why a request went where it went (``X-Olla-Placement``): its cached prefix, its explicit session, a detour
#: from its prefix's endpoint for load, a model load nobody could avoid, or load alone (nothing cached anywhere).
PREFIX, SESSION, COLD, BALANCE = "prefix", "session", "cold", "balance"
REASONS = (PREFIX, SESSION, SPILL, COLD, BALANCE)
#: Olla's names for the key sources, as its ``X-Olla-Sticky-Key-Source`` reports them.
OLLA_SOURCE_NAMES = {"session_header": "session_header", "prefix": "prefix_hash", "auth": "auth_header", "ip": "ip"}
#: A cold load, in prompt characters: seconds to minutes, worth more than any prefill placement can save.
COLD_CHARS = 4_000_000
#: Routes that generate with a chat runner: their prompts build a KV cache worth returning to (the others carry a
#: key only from the header), and /engines/ps's completion runners say where their model is loaded.
GENERATION_ROUTES = frozenset({"chat/completions", "completions", "messages", "responses"})


@dataclass(frozen=True)
class SessionKey:
    """A conversation's model-scoped key (a digest), where it came from, and the session id to echo."""

    key: str
    source: str
    session_id: bytes | None = None
    blocks: PromptBlocks | None = None  # the prompt's blocks, when it is placed by expected cost


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # (built once, not per call)


def _canonical(value: Any) -> bytes:
    return _CANONICAL.encode(value).encode("utf-8")


def conversation_prefix(route: str, body: Mapping[str, Any], prefix_bytes: int) -> bytes | None:
    """
    The stable opening of a conversation, which stays the same as it grows
    turn by turn: chat -> its system messages and first user message;
    Anthropic -> ``system`` and the first message; Responses -> its
    ``instructions`` and first input item; text completion -> the first
    ``prefix_bytes`` of the prompt.
    """
    if route == "chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        first = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        return _canonical([system, first]) if first is not None or system else None
    if route == "messages":
        turns = body.get("messages")
        opening: Any = turns[0] if isinstance(turns, list) and turns else None
        preamble: Any = body.get("system")
        return _canonical([preamble, opening]) if opening is not None or preamble else None
    if route == "responses":
        given = body.get("input")
        item: Any = _input_text(given[0] if isinstance(given, list) and given else given)
        instructions: Any = body.get("instructions")
        return _canonical([instructions, item]) if item is not None or instructions else None
    if route == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return prompt.encode("utf-8")[:prefix_bytes]
        return None
    return None


def _input_text(item: Any) -> Any:
    """A Responses API input item as its role and text, however it is spelled (a string, a message, parts)."""
    if isinstance(item, str):
        return ["user", item]
    if isinstance(item, dict):
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str):
            return [item.get("role", "user"), content]
    return item


def _credential(headers: Headers) -> bytes | None:
    for name in (b"authorization", b"x-api-key"):
        values = headers.getRawHeaders(name)
        if values and values[0].strip():
            return values[0].strip()
    return None


def session_key(
    settings: AffinityConfig,
    *,
    route: str,
    model_key: str,
    headers: Headers,
    body: Mapping[str, Any],
    client_ip: str,
) -> SessionKey | None:
    """The request's session key from the first configured source that yields one, or ``None``."""
    scope = model_key.encode("utf-8")
    for source in settings.key_sources:
        if source == "session_header":
            values = headers.getRawHeaders(SESSION_HEADER)
            value = values[0].strip() if values else b""
            if value and len(value) <= 256:
                return SessionKey(_digest(scope, b"s", value), source, value)
        elif route not in GENERATION_ROUTES:
            continue  # embeddings, rerank, score, images: only an explicit session id
        elif source == "prefix" and settings.placement == "cost":
            blocks = prompt_blocks(route, body, model_key, settings.block_chars)
            if blocks is not None and blocks.digests:
                return SessionKey(blocks.head.hex(), source, blocks=blocks)
        elif source == "prefix":
            prefix = conversation_prefix(route, body, settings.prefix_bytes)
            if prefix is not None:
                return SessionKey(_digest(scope, b"p", prefix), source)
        elif source == "auth":
            credential = _credential(headers)
            if credential is not None:
                return SessionKey(_digest(scope, b"a", credential), source)
        elif source == "ip" and client_ip:
            return SessionKey(_digest(scope, b"i", client_ip.encode()), source)
    return None


def rendezvous(key: str, endpoints: Sequence[EndpointState]) -> list[EndpointState]:
    """``endpoints`` in the key's highest-random-weight order (the same on every instance)."""
    if len(endpoints) < 2:
        return list(endpoints)
    prefix = key.encode("ascii") + b"\0"

    def weight(ep: EndpointState) -> bytes:
        return hashlib.blake2b(prefix + ep.name.encode("utf-8"), digest_size=8).digest()

    return sorted(endpoints, key=weight, reverse=True)


def _by_tier(key: str, endpoints: Sequence[EndpointState]) -> list[EndpointState]:
    """``endpoints`` by priority tier, highest first, each tier in the key's rendezvous order."""
    tiers = sorted({ep.config.priority for ep in endpoints}, reverse=True)
    if len(tiers) < 2:
        return rendezvous(key, endpoints)
    return [ep for tier in tiers for ep in rendezvous(key, [e for e in endpoints if e.config.priority == tier])]


def _real(names: Mapping[str, str], ep: EndpointState, model_key: str) -> str:
    """The model key ``ep`` knows a request for ``model_key`` by: an alias's real model there, else the key itself."""
    real = names.get(ep.name)
    return normalise_model(real) if real is not None else model_key


def _warm(ep: EndpointState, model_key: str) -> bool:
    """Whether ``model_key`` is loaded at ``ep`` or a load of it is under way there."""
    return ep.model_loaded(model_key) is True or ep.model_loading(model_key)


class PinTable:
    """Owns the bounded session -> endpoint pins: least recently used first, idle ones expire after ``idle_ttl``."""

    def __init__(self, clock: IReactorTime, max_sessions: int, idle_ttl: float) -> None:
        self._clock = clock
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        self._expire(self._clock.seconds())
        return len(self._pins)

    def _expire(self, now: float) -> None:
        pins = self._pins
        while pins:
            key, (_, used) = next(iter(pins.items()))
            if used + self.idle_ttl > now:
                return
            del pins[key]
            self.evictions += 1

    def get(self, key: str) -> str | None:
        """The endpoint ``key`` is pinned to (the pin's idle time restarts), if any."""
        now = self._clock.seconds()
        self._expire(now)
        entry = self._pins.get(key)
        if entry is None:
            return None
        self._pins[key] = (entry[0], now)
        self._pins.move_to_end(key)
        return entry[0]

    def pin(self, key: str, endpoint: str) -> None:
        """Pin ``key`` to ``endpoint`` (the least recently used pin makes room if the table is full)."""
        now = self._clock.seconds()
        self._expire(now)
        self._pins[key] = (endpoint, now)
        self._pins.move_to_end(key)
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)
            self.evictions += 1

    def trim(self) -> None:
        """Evict least recently used pins down to ``max_sessions`` (after a reload lowered it)."""
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)
            self.evictions += 1

    def keep_only(self, endpoints: set[str]) -> int:
        """Drop the pins to endpoints not in ``endpoints`` (removed by a reload); returns how many."""
        gone = [key for key, (name, _) in self._pins.items() if name not in endpoints]
        for key in gone:
            del self._pins[key]
        return len(gone)


@dataclass
class Placement:
    """
    Where one keyed request goes first, and why: the endpoints in order,
    hit/miss/repin/spill, the session's pin before it, and its home (the
    endpoint placement chose before the load bound: a spill is a detour
    from it, and the session stays pinned there).
    """

    order: list[EndpointState]
    verdict: str
    pinned: str | None
    home: str | None = None
    reason: str = SESSION
    matched: dict[str, int] | None = None  # by prompt cost: characters of the prompt each endpoint holds


class SessionRouter:
    """Owns session placement: the settings in force, the pin table and the affinity counters."""

    def __init__(self, clock: IReactorTime, config: Config) -> None:
        self.settings = config.proxy.affinity
        self.pins = PinTable(clock, self.settings.max_sessions, self.settings.idle_ttl)
        self.index = PrefixIndex(self.settings.cache_tokens, self.settings.block_chars)  # cached there
        self.sent = PrefixIndex(self.settings.cache_tokens, self.settings.block_chars)  # sent there (maybe running)
        self.counts = {HIT: 0, MISS: 0, REPIN: 0, SPILL: 0}
        self.reasons = dict.fromkeys(REASONS, 0)
        self.matched_chars = 0  # prompt characters placed where they were cached (estimated)
        self.unmatched_chars = 0  # prompt characters placed where they had to be computed
        self.cold_avoided = 0
        self.cold_taken = 0

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded settings; pins and cache estimates of endpoints that remain are kept."""
        self.settings = config.proxy.affinity
        self.pins.max_sessions = self.settings.max_sessions
        self.pins.idle_ttl = self.settings.idle_ttl
        names = {ep.name for ep in config.endpoints}
        self.pins.keep_only(names)
        self.pins.trim()
        for index in (self.index, self.sent):
            index.default_cache_tokens = self.settings.cache_tokens
            index.block_chars = self.settings.block_chars
            index.keep_only(names)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def key_for(
        self, *, route: str, model_key: str, headers: Headers, body: Mapping[str, Any], client_ip: str
    ) -> SessionKey | None:
        """The request's session key, or ``None`` (affinity off, or no source yields one)."""
        if not self.settings.enabled:
            return None
        return session_key(
            self.settings, route=route, model_key=model_key, headers=headers, body=body, client_ip=client_ip
        )

    def place(
        self,
        session: SessionKey,
        candidates: Sequence[EndpointState],
        model_key: str | None,
        route: str | None = None,
        names: Mapping[str, str] | None = None,
    ) -> Placement:
        """
        The order to try ``candidates`` in for ``session`` (first choice
        first) and the verdict.  ``names``: for a model alias, the real model
        each endpoint serves it as (what its ``/engines/ps`` shows loaded).
        """
        routable = [ep for ep in candidates if ep.routable]
        if not routable:
            return Placement(list(candidates), MISS, None, reason=BALANCE if session.blocks is not None else SESSION)
        if session.blocks is not None and model_key is not None:
            return self._place_prompt(session.blocks, routable, model_key, names or {})
        generation = model_key is not None and (route is None or route in GENERATION_ROUTES)
        pinned = self.pins.get(session.key)
        if len(routable) == 1:  # one place to go: the verdict is all there is to work out
            only = routable[0]
            if generation and only.model_loaded(model_key or "") is False:
                self.cold_taken += 1
            if pinned == only.name:
                return Placement(routable, HIT, pinned)
            return Placement(routable, REPIN if pinned is not None else MISS, pinned, only.name)
        if pinned is not None:
            holder = next((ep for ep in routable if ep.name == pinned), None)
            if holder is not None and generation and holder.model_loaded(model_key or "") is False:
                # The model was unloaded there since, and the session's cache with it: move to an endpoint
                # that has the model loaded, if one does; else stay (a load is needed anywhere).
                if any(ep.model_loaded(model_key or "") is True for ep in routable if ep is not holder):
                    holder = None
                else:
                    self.cold_taken += 1
            if holder is not None:
                # The pin wins (the session's cache is there), even over a higher tier that came back;
                # the fallbacks keep priority order.
                rest = _by_tier(session.key, [ep for ep in routable if ep is not holder])
                peers = [ep for ep in rest if ep.config.priority == holder.config.priority]
                if peers and not self._within_bound(holder, [holder, *peers]):
                    # a one-off detour, never to a peer known not to have the model loaded (no cold load for a detour)
                    detour = next(
                        (
                            ep for ep in peers
                            if self._within_bound(ep, [holder, *peers])
                            and (not generation or ep.model_loaded(model_key or "") is not False)
                        ),
                        None,
                    )
                    if detour is not None:
                        return Placement([detour, holder, *[ep for ep in rest if ep is not detour]], SPILL, pinned)
                return Placement([holder, *rest], HIT, pinned)
        top = max(ep.config.priority for ep in routable)
        tier = rendezvous(session.key, [ep for ep in routable if ep.config.priority == top])
        others = _by_tier(session.key, [ep for ep in routable if ep.config.priority != top])
        verdict = REPIN if pinned is not None else MISS
        if generation:
            tier = self._prefer_loaded(tier, model_key or "")
        home = tier[0]
        chosen = self._bounded(tier, model_key if generation else None)
        if chosen is not home:
            verdict = SPILL
            tier = [chosen, *[ep for ep in tier if ep is not chosen]]
        return Placement(tier + others, verdict, pinned, home.name)

    # -- placement by expected cost

    def overhead_chars(self) -> int:
        """A request's fixed cost besides its prompt, in prompt characters."""
        return self.settings.request_tokens * CHARS_PER_TOKEN

    def uncached(self, ep: EndpointState, model_key: str, blocks: PromptBlocks) -> int:
        """The characters of the prompt ``ep`` would have to compute."""
        return blocks.chars - self.index.matched_chars(ep, model_key, blocks)

    def cost(self, ep: EndpointState, model_key: str, uncached: int) -> float:
        """
        What sending a prompt with ``uncached`` characters to compute to
        ``ep`` is expected to cost before its first token, in prompt
        characters: the prefill work already waiting there, its own prefill
        and fixed cost, a wait for a slot when every slot is taken, and a
        cold load when the model is not loaded there.
        """
        overhead = self.overhead_chars()
        cost: float = ep.prefill_pending + uncached + overhead
        excess = ep.in_flight - ep.capacity + 1
        if excess > 0:
            cost += excess * 4 * (overhead + ep.prefill_pending / max(1, ep.prefilling))
        loaded = ep.model_loaded(model_key)
        if loaded is False:
            cost += COLD_CHARS // 2 if ep.model_loading(model_key) else COLD_CHARS
        return cost

    def _place_prompt(
        self, blocks: PromptBlocks, routable: list[EndpointState], model_key: str, names: Mapping[str, str]
    ) -> Placement:
        """
        Where a prompt is cheapest to serve (see :meth:`cost`), with two
        rules on top: a prompt whose longest cached prefix is at one endpoint
        stays there while that endpoint has a free slot (no needless moves),
        and a prompt cached nowhere starts where rendezvous hashing of its
        head says -- the same endpoint on every olladmr instance, which may
        have served its earlier turns -- unless every slot there is taken.
        """
        def loaded(ep: EndpointState) -> bool | None:
            return ep.model_loaded(_real(names, ep, model_key))

        top = max(ep.config.priority for ep in routable)
        head = blocks.head.hex()
        tier = rendezvous(head, [ep for ep in routable if ep.config.priority == top])
        others = _by_tier(head, [ep for ep in routable if ep.config.priority != top])
        matched = {ep.name: self.index.matched_chars(ep, model_key, blocks) for ep in routable}
        warmest = max(matched[ep.name] for ep in tier)
        weight = self.settings.move_cost  # the prefill a placement adds over the warmest one delays others too
        costs = {
            ep.name: self.cost(ep, _real(names, ep, model_key), blocks.chars - matched[ep.name])
            + weight * (warmest - matched[ep.name])
            for ep in tier
        }
        # Where the prompt's family lives: cached there, or sent there and still running (its prefix is on its
        # way into that cache): a tenant's conversations that start together stay together.
        placed = {ep.name: max(matched[ep.name], self.sent.matched_chars(ep, model_key, blocks)) for ep in tier}
        longest = max(placed.values())
        ranked = sorted(tier, key=lambda ep: costs[ep.name])  # stable: rendezvous order breaks ties
        best = ranked[0]
        if longest < min(MIN_HEAD_CHARS, blocks.covered(blocks.opening_index + 1)):
            # Nothing of it anywhere this instance knows of, or only a shared opening shorter than a request costs
            # anyway ("You are a helpful assistant."): where every instance sends it (it may be a later turn another
            # instance placed), unless that endpoint is full and another is not, or would load the model cold while
            # another has it loaded.
            home = tier[0]
            cold = loaded(home) is False and any(loaded(ep) for ep in tier)
            if not cold and (home.in_flight < home.capacity or not any(ep.in_flight < ep.capacity for ep in tier)):
                best = home
            verdict, reason = MISS, BALANCE
        else:
            holders = [ep for ep in tier if placed[ep.name] == longest]
            if len(holders) == 1 and holders[0].in_flight < holders[0].capacity and self.settings.stay_while_free:
                best = holders[0]  # a free slot and the warmest cache: never a needless move
            elif any(costs[ep.name] <= costs[best.name] for ep in holders):
                # Among the endpoints that hold as much, the conversation's own rendezvous choice (the same on
                # every instance, whatever each one saw of it) unless another is cheaper by more than a head.
                cheapest = min(holders, key=lambda ep: costs[ep.name])
                mine = rendezvous(blocks.opening.hex(), holders)[0] if len(holders) > 1 else cheapest
                best = mine if costs[mine.name] <= costs[cheapest.name] + longest else cheapest
            verdict, reason = (HIT, PREFIX) if placed[best.name] == longest else (SPILL, SPILL)
        if loaded(best) is False:
            reason = COLD
            if any(loaded(ep) is True for ep in tier):
                self.cold_taken += 1
        elif any(loaded(ep) is False for ep in tier):
            self.cold_avoided += 1
        order = [best, *[ep for ep in ranked if ep is not best], *others]
        return Placement(order, verdict, None, tier[0].name, reason, matched)

    def sending(self, ep: EndpointState, model_key: str, blocks: PromptBlocks) -> int:
        """
        A prompt is being sent to ``ep``: its prefill joins the work waiting
        there; returns that work (give it back with :meth:`prefilled` once
        the first token is back).  With ``cached_after: send`` its blocks
        count as cached there from now on.
        """
        work = self.uncached(ep, model_key, blocks) + self.overhead_chars()
        self.sent.record(ep, model_key, blocks)
        if self.settings.cached_after == "send":
            self.index.record(ep, model_key, blocks)
        ep.prefill_pending += work
        ep.prefilling += 1
        return work

    def cached(self, ep: EndpointState, model_key: str, blocks: PromptBlocks, moment: str) -> None:
        """``moment`` ("first_token", "finish") came for a prompt sent to ``ep``: record it if that is when it counts."""
        if self.settings.cached_after == moment:
            self.index.record(ep, model_key, blocks)

    def cache_estimate(self, ep: EndpointState) -> dict[str, int]:
        """What olladmr believes ``ep`` has cached, for the status page and the dashboard (in tokens)."""
        per_block = self.settings.block_chars // CHARS_PER_TOKEN
        return {
            "tokens": self.index.held(ep) * per_block,
            "capacity_tokens": self.index.capacity(ep) * per_block,
        }

    @staticmethod
    def prefilled(ep: EndpointState, work: int) -> None:
        """The first token of a prompt sent with :meth:`sending` came back (or the attempt ended)."""
        ep.prefill_pending = max(0, ep.prefill_pending - work)
        ep.prefilling = max(0, ep.prefilling - 1)

    def _prefer_loaded(self, tier: list[EndpointState], model_key: str) -> list[EndpointState]:
        """
        ``tier`` (in the key's order) with the endpoints that can answer
        soonest first, when the key's first choice does not have the model
        loaded: those that have it loaded; else those already loading it (the
        request shares that load); else, the model being loaded nowhere, the
        endpoints holding the fewest models (a load there evicts least, and
        the models spread over the fleet instead of piling onto one endpoint).
        """
        first = tier[0].model_loaded(model_key)
        if first is True:
            return tier
        for ready in (
            [ep for ep in tier if ep.model_loaded(model_key) is True],
            [ep for ep in tier if ep.model_loading(model_key)],
        ):
            if ready:
                if first is False and tier[0] not in ready:
                    self.cold_avoided += 1
                return ready + [ep for ep in tier if ep not in ready]
        if first is False:
            self.cold_taken += 1
        counts = [ep.resident_count() for ep in tier]
        if None in counts:
            return tier  # some endpoint cannot say what it holds: the key's order alone
        return [ep for _, _, ep in sorted(zip(counts, range(len(tier)), tier))]

    def prefer_loaded(self, pool: list[EndpointState], runner: str) -> list[EndpointState]:
        """
        For a request without a key: the endpoints of ``pool`` that have its
        runner (``runner``: see :func:`~olladmr.fleet.state.runner_key`)
        loaded and a free slot, when there are some and others would have to
        load it; else ``pool`` (the balancer decides).  A cold load is never
        taken while an endpoint with the model loaded has capacity.
        """
        loaded = [ep for ep in pool if ep.model_loaded(runner) is True]
        ready = [ep for ep in loaded if ep.in_flight < ep.capacity]
        cold = any(ep.model_loaded(runner) is False for ep in pool)
        if ready and len(ready) < len(pool):
            if cold:
                self.cold_avoided += 1
            return ready
        if cold and not loaded:
            loading = [ep for ep in pool if ep.model_loading(runner)]
            if not loading:
                self.cold_taken += 1  # loaded nowhere: some endpoint has to load it
            elif len(loading) < len(pool):
                return loading  # share the load under way
        elif cold and len(loaded) < len(pool):
            self.cold_taken += 1  # the loaded ones are all busy: over capacity, a load pays
        return pool

    def _bound(self, tier: Sequence[EndpointState]) -> float:
        """The most requests in flight an endpoint of ``tier`` may have: ``load_factor`` x the mean + 1."""
        return self.settings.load_factor * sum(ep.in_flight for ep in tier) / len(tier) + 1

    def _within_bound(self, ep: EndpointState, tier: Sequence[EndpointState]) -> bool:
        """Whether ``ep`` has a free slot and is within the tier's load bound."""
        return ep.has_free_slot and ep.in_flight <= self._bound(tier)

    def _bounded(self, tier: list[EndpointState], model_key: str | None = None) -> EndpointState:
        """
        The first endpoint in ``tier`` that is not over its load bound (or the
        first, if all are).  While some endpoint of the tier has the model
        loaded (or is loading it), a spill goes only to one that has it too, unless every such one
        is over twice the bound or out of slots: load imbalance is not worth a
        cold load (seconds to minutes), overload is.
        """
        if len(tier) == 1:
            return tier[0]
        warm = [ep for ep in tier if _warm(ep, model_key)] if model_key is not None else []
        if warm:
            for ep in warm:
                if self._within_bound(ep, tier):
                    return ep
            if any(ep.has_free_slot and not self._over(ep, tier, 2.0) for ep in warm):
                return tier[0]  # busy, not overloaded: stay warm
        for ep in tier:
            if self._within_bound(ep, tier):
                return ep
        return tier[0]

    def _over(self, ep: EndpointState, tier: Sequence[EndpointState], times: float) -> bool:
        return ep.in_flight > times * self._bound(tier)

    def served(self, session: SessionKey, placement: Placement, endpoint: EndpointState) -> str:
        """
        ``endpoint`` answered the request: the session is pinned where its
        cache now is; a spill is a one-off detour that leaves the pin (a new
        session is pinned to its home); returns the verdict to report.
        """
        verdict = placement.verdict
        if placement.matched is not None:  # placed by prompt cost: the prefix index is its memory
            if endpoint is not placement.order[0] and verdict != MISS:
                verdict = REPIN  # the first choice failed: the prompt moves to where it was served
            self.counts[verdict] += 1
            self.reasons[placement.reason] += 1
            matched = placement.matched.get(endpoint.name, 0)
            self.matched_chars += matched
            if session.blocks is not None:
                self.unmatched_chars += max(0, session.blocks.chars - matched)
            self.pins.pin(session.key, endpoint.name)  # (for the count of prompt families placed)
            return verdict
        self.reasons[SESSION] += 1
        if verdict == SPILL:
            if placement.pinned is None and placement.home is not None:
                # A new session's spill is a detour too: it is pinned where placement put it, which is where
                # every other instance sends it, so its next turns converge there once the load allows.
                self.pins.pin(session.key, placement.home)
        elif endpoint.name != placement.pinned:
            if verdict == HIT:
                verdict = REPIN  # the pinned endpoint failed; the session moves
            self.pins.pin(session.key, endpoint.name)
        self.counts[verdict] += 1
        return verdict

    def stats(self) -> dict[str, Any]:
        """``/internal/stats/sticky``."""
        return {
            "enabled": self.settings.enabled,
            "key_sources": [OLLA_SOURCE_NAMES[source] for source in self.settings.key_sources],
            "sessions": len(self.pins),
            "max_sessions": self.settings.max_sessions,
            "idle_ttl_seconds": self.settings.idle_ttl,
            "load_factor": self.settings.load_factor,
            "hits": self.counts[HIT],
            "misses": self.counts[MISS],
            "repins": self.counts[REPIN],
            "spills": self.counts[SPILL],
            "evictions": self.pins.evictions,
            "cold_route_avoided": self.cold_avoided,
            "cold_route_taken": self.cold_taken,
            "placement": self.settings.placement,
            "placements": dict(self.reasons),
            "prompt_tokens_matched": self.matched_chars // CHARS_PER_TOKEN,
            "prompt_tokens_unmatched": self.unmatched_chars // CHARS_PER_TOKEN,
        }
