"""
Where each Responses API answer lives.

DMR keeps every Responses API answer in memory on the instance that
produced it, for one hour: a follow-up (``previous_response_id``) or a
``GET``/``DELETE`` of ``responses/{id}`` works only there.
:class:`ResponseDirectory` remembers ``id -> endpoint name`` for the
answers that went through this olladmr, bounded in size and age.

Entries expire one hour after they were made (DMR's TTL counts from the
answer, not from later reads), so the map is kept in *generations* of
ten minutes each: lookups try the newest first, and expiry drops a whole
generation at once.  Nothing is stored per entry but the id and a
reference to the (shared) endpoint name.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..config.schema import Config

DEFAULT_TTL = 3600.0
DEFAULT_MAX_ENTRIES = 100_000
GENERATIONS = 6


class ResponseDirectory:
    """Owns the bounded ``response id -> endpoint name`` map (size-capped, one-hour TTL on the injected clock)."""

    def __init__(self, clock: IReactorTime, max_entries: int = DEFAULT_MAX_ENTRIES, ttl: float = DEFAULT_TTL) -> None:
        self._clock = clock
        self.max_entries = max(1, max_entries)
        self.ttl = ttl
        self._span = ttl / GENERATIONS
        # [generation start time, newest entry's time, its map], oldest first
        self._generations: deque[list[Any]] = deque()
        self._names: dict[str, str] = {}  # one shared str per endpoint name
        self._size = 0
        self.evictions = 0

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded size cap and TTL (entries beyond the new cap are evicted oldest first)."""
        settings = config.proxy.response_affinity
        self.max_entries = settings.max_entries
        self.ttl = settings.ttl
        self._span = settings.ttl / GENERATIONS
        self._expire()
        while self._size > self.max_entries:
            self._evict_oldest()

    def __len__(self) -> int:
        self._expire()
        return self._size

    def _expire(self) -> None:
        horizon = self._clock.seconds() - self.ttl
        generations = self._generations
        # a generation is dropped once its newest entry is older than the TTL
        while generations and generations[0][1] <= horizon:
            _, _, gone = generations.popleft()
            self._size -= len(gone)

    def remember(self, response_id: str, endpoint: str) -> None:
        """``response_id`` was created on ``endpoint`` just now."""
        now = self._clock.seconds()
        self._expire()
        self.forget(response_id)
        generations = self._generations
        if not generations or now - generations[-1][0] >= self._span:
            generations.append([now, now, {}])
        name = self._names.setdefault(endpoint, sys.intern(endpoint))
        generations[-1][1] = now
        generations[-1][2][response_id] = name
        self._size += 1
        while self._size > self.max_entries:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        oldest = self._generations[0][2]
        if oldest:
            del oldest[next(iter(oldest))]
            self._size -= 1
            self.evictions += 1
        if not oldest:
            self._generations.popleft()

    def owner(self, response_id: str) -> str | None:
        """
        The endpoint that holds ``response_id``, if this directory knows.

        Expiry is per generation (when its newest entry is older than the
        TTL), so an entry can outlive the TTL by up to one generation (ten
        minutes): harmless, since no other endpoint can hold it either, and
        its owner answers "not found" itself.
        """
        self._expire()
        for _, _, entries in reversed(self._generations):
            name = entries.get(response_id)
            if name is not None:
                return name
        return None

    def forget(self, response_id: str) -> None:
        """``response_id`` was deleted (or is being re-remembered)."""
        for _, _, entries in self._generations:
            if entries.pop(response_id, None) is not None:
                self._size -= 1
                return

    def forget_endpoint(self, endpoint: str) -> int:
        """Drop every id held by ``endpoint`` (it left the configuration); returns how many."""
        dropped = 0
        for _, _, entries in self._generations:
            ids = [rid for rid, name in entries.items() if name == endpoint]
            for rid in ids:
                del entries[rid]
            dropped += len(ids)
        self._size -= dropped
        return dropped
