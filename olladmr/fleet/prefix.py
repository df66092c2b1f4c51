"""
Prompt blocks and the prefix index: which endpoint has already computed
how much of a prompt.

* :func:`prompt_blocks` reads a generation request the way the engine
  will see it -- tools, system/instructions, then every message in order,
  as one canonical text -- and cuts it into blocks of ``block_chars``
  characters.  Each block's digest covers the model and everything before
  it (one BLAKE2b over the text, read out at every block boundary), so two
  prompts share their first *n* digests exactly when they share their
  first *n* blocks, and a conversation's next turn extends the digests of
  the turn before it.  The first digest (the tenant's head: its system
  prompt and tool definitions) is what placement hashes for a prefix no
  endpoint has seen, so every olladmr instance sends it to the same place.
* :class:`PrefixIndex` remembers, per endpoint and model, the block
  digests recently sent there (LRU, bounded by the endpoint's estimated
  cache size) and answers how many leading blocks of a prompt an endpoint
  holds.  It forgets an endpoint's entries when the endpoint goes down
  (a restarted engine has an empty cache), when ``/engines/ps`` shows the
  model unloaded there, or when the endpoint leaves the configuration.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from .state import EndpointState

#: What a token is taken to be, in characters of canonical prompt text (for ``cache_tokens`` and the headers).
CHARS_PER_TOKEN = 4
#: At most this many blocks of one prompt are hashed (the rest is uncached, wherever it goes).
MAX_BLOCKS = 8192
#: The opening that names a prompt's family (a tenant's head) for rendezvous placement.
HEAD_CHARS = 1024
#: A shared opening shorter than this (``"You are a helpful assistant."``) saves less prefill than a request costs
#: anyway: such prompts are a family only with their first message, so distinct conversations spread.
MIN_HEAD_CHARS = 256

_RECORD, _UNIT = "\x1e", "\x1f"  # separators that do not occur in ordinary prompt text
_PREAMBLE = (_RECORD + "system", _RECORD + "developer", _RECORD + "tools")
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """A prompt as the engine will read it: its length in characters, its chained block digests and their ends."""

    chars: int
    digests: tuple[bytes, ...]
    ends: tuple[int, ...]  # the character each block ends at
    head_index: int = 0
    opening_index: int = 0  # the block that ends the first message after the head (a conversation's opening)

    @property
    def head(self) -> bytes:
        """
        The digest of the prompt's opening: its system prompt and tools (or
        its first message when it has none), at most :data:`HEAD_CHARS` of
        them -- what a tenant's requests, and a conversation's turns, share;
        the opening with the first message when they are shorter than
        :data:`MIN_HEAD_CHARS`.
        """
        return self.digests[self.head_index] if self.digests else b""

    @property
    def opening(self) -> bytes:
        """The digest of the conversation's opening: its head and first message (the same on every turn)."""
        return self.digests[self.opening_index] if self.digests else b""

    def covered(self, blocks: int) -> int:
        """The characters the first ``blocks`` blocks cover."""
        return self.ends[blocks - 1] if blocks > 0 else 0


def _text(value: Any) -> str:
    """A message's content as text: a string, text parts joined, anything else as canonical JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for part in value:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
            else:
                out.append(_CANONICAL.encode(part))
        return _UNIT.join(out)
    if value is None:
        return ""
    return _CANONICAL.encode(value)


def _message(item: Any) -> str:
    """One chat, Anthropic or Responses message: its role, its text, and its tool calls when it has some."""
    if isinstance(item, str):
        return _RECORD + "user" + _UNIT + item
    if not isinstance(item, dict):
        return _RECORD + _CANONICAL.encode(item)
    role = item.get("role") or item.get("type") or ""
    text = _text(item.get("content"))
    extra = ""
    for key in ("tool_calls", "tool_call_id", "name", "call_id", "output", "arguments"):
        value = item.get(key)
        if value is not None:
            extra += _UNIT + key + _UNIT + (value if isinstance(value, str) else _CANONICAL.encode(value))
    return _RECORD + str(role) + _UNIT + text + extra


def canonical_prompt(route: str, body: Mapping[str, Any]) -> list[str] | None:
    """
    The prompt of a generation request as its parts, in the order the
    engine's template reads them: tools, system (or ``instructions``),
    then the messages (or input items) in order; a text completion's
    prompt as it is.  ``None`` when the request carries no prompt olladmr
    can read.  The next turn of a conversation starts with the same parts.
    """
    parts: list[str] = []
    if route == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return [prompt] if prompt else None
        return [_CANONICAL.encode(prompt)] if isinstance(prompt, list) and prompt else None
    tools = body.get("tools")
    if tools:
        parts.append(_RECORD + "tools" + _UNIT + _CANONICAL.encode(tools))
    if route in ("chat/completions", "messages"):
        system = body.get("system") if route == "messages" else None  # (Anthropic's system prompt)
        if system:
            parts.append(_RECORD + "system" + _UNIT + _text(system))
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        parts.extend(_message(m) for m in messages)
    elif route == "responses":
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            parts.append(_RECORD + "system" + _UNIT + instructions)
        given = body.get("input")
        items = given if isinstance(given, list) else [given] if given is not None else []
        parts.extend(_message(m) for m in items)
    else:
        return None
    return parts or None


def boundaries(ends: list[int], block_chars: int) -> list[int]:
    """
    Where a prompt whose parts end at ``ends`` is cut: at the end of every
    part (a message: the next turn of a conversation repeats them exactly)
    and every ``block_chars`` characters (so a long message is matched in
    pieces), in order, at most :data:`MAX_BLOCKS`.
    """
    size = ends[-1] if ends else 0
    cuts: list[int] = []
    fixed = block_chars
    for end in ends:
        while fixed < end:
            cuts.append(fixed)
            fixed += block_chars
        if end > (cuts[-1] if cuts else 0):
            cuts.append(end)
        if fixed == end:
            fixed += block_chars
    if len(cuts) > MAX_BLOCKS:
        del cuts[MAX_BLOCKS:]
    assert not cuts or cuts[-1] <= size
    return cuts


def block_digests(model_key: str, parts: list[str], block_chars: int) -> PromptBlocks:
    """The prompt made of ``parts`` cut at :func:`boundaries`, each digest covering the model and all before it."""
    text = "".join(parts)
    ends: list[int] = []
    total = 0
    for part in parts:
        total += len(part)
        ends.append(total)
    leading = 0  # the system prompt and tools: what a tenant's requests share
    while leading < len(parts) and parts[leading].startswith(_PREAMBLE):
        leading += 1
    limit = min(HEAD_CHARS, ends[max(0, leading - 1)]) if ends else 0
    opening_end = ends[min(leading, len(ends) - 1)] if ends else 0
    h = hashlib.blake2b(model_key.encode("utf-8") + b"\0", digest_size=8)
    digests: list[bytes] = []
    cuts = boundaries(ends, block_chars)
    start = 0
    head = opening = 0
    for index, end in enumerate(cuts):
        h.update(text[start:end].encode("utf-8", "surrogatepass"))
        digests.append(h.digest())
        start = end
        if end <= limit:
            head = index
        if end <= opening_end:
            opening = index
    if cuts and cuts[head] < MIN_HEAD_CHARS:
        head = opening  # a short system prompt is no tenant's head: the conversation's opening names its family
    return PromptBlocks(total, tuple(digests), tuple(cuts), head, opening)


def prompt_blocks(route: str, body: Mapping[str, Any], model_key: str, block_chars: int) -> PromptBlocks | None:
    """The request's :class:`PromptBlocks`, or ``None`` when it has no prompt to place by."""
    parts = canonical_prompt(route, body)
    if parts is None:
        return None
    return block_digests(model_key, parts, block_chars)


class _Entries:
    """One endpoint's digests for one model, least recently used first, and the state they were valid for."""

    __slots__ = ("digests", "epoch")

    def __init__(self, epoch: tuple[int, int]) -> None:
        self.digests: OrderedDict[bytes, None] = OrderedDict()
        self.epoch = epoch


class PrefixIndex:
    """
    Owns what olladmr believes each endpoint's engine has cached: per
    (endpoint, model) the block digests sent there, LRU, at most
    ``capacity(endpoint)`` blocks, dropped when the endpoint's cache epoch
    moves on (it went down, or the model was unloaded there).
    """

    def __init__(self, default_cache_tokens: int, block_chars: int) -> None:
        self.default_cache_tokens = default_cache_tokens
        self.block_chars = block_chars
        self._entries: dict[tuple[str, str], _Entries] = {}

    def capacity(self, ep: EndpointState) -> int:
        """How many blocks ``ep`` is taken to hold for one model."""
        tokens = ep.config.cache_tokens or self.default_cache_tokens
        return max(1, tokens * CHARS_PER_TOKEN // self.block_chars)

    def matched_chars(self, ep: EndpointState, model_key: str, blocks: PromptBlocks) -> int:
        """How many leading characters of the prompt ``ep`` is believed to hold."""
        return blocks.covered(self.match(ep, model_key, blocks))

    def _for(self, ep: EndpointState, model_key: str) -> _Entries | None:
        entries = self._entries.get((ep.name, model_key))
        if entries is not None and entries.epoch != ep.cache_epoch(model_key):
            del self._entries[(ep.name, model_key)]  # restarted or unloaded since: that cache is gone
            return None
        return entries

    def match(self, ep: EndpointState, model_key: str, blocks: PromptBlocks) -> int:
        """How many leading blocks of ``blocks`` ``ep`` is believed to hold (changes nothing)."""
        entries = self._for(ep, model_key)
        if entries is None:
            return 0
        held = entries.digests
        count = 0
        for digest in blocks.digests:
            if digest not in held:
                break
            count += 1
        return count

    def record(self, ep: EndpointState, model_key: str, blocks: PromptBlocks) -> None:
        """``blocks`` are being sent to ``ep``: its engine will hold them (the head most recently used)."""
        if not blocks.digests:
            return
        entries = self._for(ep, model_key)
        if entries is None:
            entries = self._entries[(ep.name, model_key)] = _Entries(ep.cache_epoch(model_key))
        held = entries.digests
        for digest in reversed(blocks.digests):  # tails first, so eviction takes a prompt's tail before its head
            held[digest] = None
            held.move_to_end(digest)
        limit = self.capacity(ep)
        while len(held) > limit:
            held.popitem(last=False)

    def keep_only(self, names: set[str]) -> None:
        """Forget the endpoints not in ``names`` (removed by a reload)."""
        for key in [key for key in self._entries if key[0] not in names]:
            del self._entries[key]

    def held(self, ep: EndpointState) -> int:
        """How many blocks are believed cached at ``ep`` now (all models), for status pages."""
        total = 0
        for (name, model_key), entries in list(self._entries.items()):
            if name == ep.name and self._for(ep, model_key) is not None:
                total += len(entries.digests)
        return total
