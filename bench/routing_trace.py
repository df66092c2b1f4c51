"""
The agent-style traces of ``bench/routing.py`` and the ideal prefill they imply.

A trace is a list of conversations, each with its system prompt (a tenant's shared head, or its own
for "sessions"), a unique opening task and one tool result per later turn.  Every text is made of
pseudo-words drawn from ``random.Random`` seeded by a string (seed, what, index), so a trace is the
same for every router, run and Python process.  Sizes are in *units*: whitespace words on the fakes
(their tokens), characters on the real engine (``ai/small`` has no merges: 1 character = 1 token).

The ideal (:class:`PrefixLedger`): each distinct prompt prefix computed once.  Prompts are the token
sequences the engine prefills (the messages' contents in order, words never spanning two messages:
what ``tests/fakedmr.py`` charges); adding every prompt sent in a run to the ledger counts the tokens
not already a prefix of an earlier prompt, at least one per request (an engine always computes the
last prompt token).  An assistant answer counts in full the first time a prompt carries it back (a
real engine re-tokenizes it; the fakes, unless ``--recompute-answer``, kept it from generation, so a
perfect router can prefill a little less than this ideal on them).
"""

from __future__ import annotations

import os
import random
import string
from dataclasses import dataclass, field

LETTERS = string.ascii_lowercase


def _rng(seed: int, *what: object) -> random.Random:
    return random.Random("/".join(str(part) for part in (seed, *what)))


def text_of(rng: random.Random, size: int, unit: str, lead: str = "") -> str:
    """Pseudo-words (2–8 letters) summing to ``size`` words, or to about ``size`` characters (``unit="char"``)."""
    words: list[str] = [lead] if lead else []
    length = len(lead)
    while (len(words) < size) if unit == "word" else (length < size):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8)))
        words.append(word)
        length += len(word) + 1
    text = " ".join(words)
    return text if unit == "word" else text[:size]


@dataclass
class Conversation:
    index: int
    tenant: int  # -1: its own head ("sessions")
    system: str
    task: str
    tools: list[str]  # the user message of turns 2..K
    messages: list[dict[str, str]] = field(default_factory=list)

    def start(self) -> None:
        self.messages = [{"role": "system", "content": self.system}, {"role": "user", "content": self.task}]


@dataclass
class TraceSpec:
    kind: str = "tenants"  # tenants | sessions
    tenants: int = 6
    head: int = 3000
    task: int = 120
    tool: int = 40
    conversations: int = 72
    turns: int = 6
    skew: float = 0.0  # share of conversations from tenant 0 (0: round-robin over tenants)
    unit: str = "word"


def build(spec: TraceSpec, seed: int) -> list[Conversation]:
    heads = [text_of(_rng(seed, "head", t), spec.head, spec.unit, lead=f"tenant{t}") for t in range(spec.tenants)]
    if spec.kind == "sessions":
        owners = [-1] * spec.conversations
    elif spec.skew > 0:
        hot = round(spec.skew * spec.conversations)
        others = max(1, spec.tenants - 1)
        owners = [0] * hot + [1 + i % others if spec.tenants > 1 else 0 for i in range(spec.conversations - hot)]
        _rng(seed, "skew").shuffle(owners)
    else:
        owners = [i % spec.tenants for i in range(spec.conversations)]
    conversations = []
    for i, tenant in enumerate(owners):
        system = heads[tenant] if tenant >= 0 else text_of(_rng(seed, "own-head", i), spec.head, spec.unit,
                                                            lead=f"session{i}")
        task = text_of(_rng(seed, "task", i), spec.task, spec.unit, lead=f"task{i}")
        tools = [text_of(_rng(seed, "tool", i, k), spec.tool, spec.unit, lead=f"result{i}.{k}")
                 for k in range(2, spec.turns + 1)]
        conversations.append(Conversation(i, tenant, system, task, tools))
    return conversations


def _common(a: list[str] | str, b: list[str] | str) -> int:
    if isinstance(a, str) and isinstance(b, str):
        return len(os.path.commonprefix([a, b]))
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixLedger:
    """Counts the tokens an ideal cache computes: each distinct prefix of the prompts added, once.

    Works a message at a time: a node is the chain hash of the messages so far; a message new at a
    node costs its tokens beyond the longest common prefix with the messages seen at that node, and
    everything after a new message is new.  (Exact for prompts whose messages are compared token by
    token; word tokens on the fakes, character tokens on the real engine.)
    """

    def __init__(self, unit: str, template: bool = False) -> None:
        self.unit = unit
        self.template = template  # count ChatML's framing (1 special + role + newline ... 1 special + newline)
        self._children: dict[int, dict[int, list[str] | str]] = {}
        self.total = 0
        self.prompt_tokens = 0
        self.requests = 0

    def tokens(self, text: str) -> list[str] | str:
        return text.split() if self.unit == "word" else text

    def add(self, messages: list[dict[str, str]]) -> int:
        node, fresh, new, size = 0, False, 0, 0
        if self.template:  # what the engine tokenizes: each message framed, then the generation prompt
            messages = [{"role": m["role"], "content": f"\x00{m['role']}\n{m['content']}\x01\n"} for m in messages]
            messages.append({"role": "generation", "content": "\x00assistant\n"})
        for message in messages:
            text = message["content"]
            toks = self.tokens(text)
            size += len(toks)
            key = hash((node, message["role"], text))
            siblings = self._children.setdefault(node, {})
            if not fresh and key in siblings:
                node = key
                continue
            if fresh:
                new += len(toks)
            else:
                lcp = max((_common(toks, other) for other in siblings.values()), default=0)
                new += len(toks) - lcp
                fresh = True
            siblings[key] = toks
            node = key
        new = max(new, 1)
        self.total += new
        self.prompt_tokens += size
        self.requests += 1
        return new
