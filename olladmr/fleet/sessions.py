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
from .state import EndpointState

SESSION_HEADER = b"x-olla-session-id"
HIT, MISS, REPIN, SPILL, DISABLED = "hit", "miss", "repin", "spill", "disabled"
#: Routes that generate with a chat runner: their prompts build a KV cache worth returning to (the others carry a
#: key only from the header), and /engines/ps's completion runners say where their model is loaded.
GENERATION_ROUTES = frozenset({"chat/completions", "completions", "messages", "responses"})


@dataclass(frozen=True)
class SessionKey:
    """A conversation's model-scoped key (a digest), where it came from, and the session id to echo."""

    key: str
    source: str
    session_id: bytes | None = None


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


class SessionRouter:
    """Owns session placement: the settings in force, the pin table and the affinity counters."""

    def __init__(self, clock: IReactorTime, config: Config) -> None:
        self.settings = config.proxy.affinity
        self.pins = PinTable(clock, self.settings.max_sessions, self.settings.idle_ttl)
        self.counts = {HIT: 0, MISS: 0, REPIN: 0, SPILL: 0}
        self.cold_avoided = 0
        self.cold_taken = 0

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded settings; pins to endpoints that remain are kept."""
        self.settings = config.proxy.affinity
        self.pins.max_sessions = self.settings.max_sessions
        self.pins.idle_ttl = self.settings.idle_ttl
        self.pins.keep_only({ep.name for ep in config.endpoints})
        self.pins.trim()

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
        self, session: SessionKey, candidates: Sequence[EndpointState], model_key: str | None, route: str | None = None
    ) -> Placement:
        """The order to try ``candidates`` in for ``session`` (first choice first) and the verdict."""
        routable = [ep for ep in candidates if ep.routable]
        if not routable:
            return Placement(list(candidates), MISS, None)
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

    def prefer_loaded(self, pool: list[EndpointState], model_key: str) -> list[EndpointState]:
        """
        For a request without a key: the endpoints of ``pool`` that have the
        model loaded and are within the load bound, when there are some and
        others would have to load it; else ``pool`` (the balancer decides).
        """
        bound = self._bound(pool)
        loaded = [ep for ep in pool if ep.model_loaded(model_key) is True and ep.in_flight <= bound]
        if loaded and len(loaded) < len(pool):
            if any(ep.model_loaded(model_key) is False for ep in pool):
                self.cold_avoided += 1
            return loaded
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
            "key_sources": list(self.settings.key_sources),
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
        }
