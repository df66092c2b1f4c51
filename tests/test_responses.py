"""Unit tests for ``olladmr.fleet.responses``: the bounded ``response id -> endpoint`` directory, on a ``Clock``."""

from __future__ import annotations

import gc
import random
import string
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.internet.task import Clock

from olladmr.config import Config, parse_config
from olladmr.fleet.responses import DEFAULT_MAX_ENTRIES, DEFAULT_TTL, GENERATIONS, ResponseDirectory

TTL = 600.0
SPAN = TTL / GENERATIONS  # 100 s: one generation


def affinity_config(**settings_: Any) -> Config:
    """A parsed ``Config`` whose ``proxy.response_affinity`` holds ``settings_``."""
    return parse_config({"proxy": {"response_affinity": settings_}, "endpoints": [{"url": "http://a:1"}]}, "t")


def directory(max_entries: int = 100, ttl: float = TTL, start: float = 0.0) -> tuple[ResponseDirectory, Clock]:
    """A directory on its own ``Clock`` (advanced to ``start``)."""
    clock = Clock()
    clock.advance(start)
    return ResponseDirectory(clock, max_entries=max_entries, ttl=ttl), clock


def owners(d: ResponseDirectory, *ids: str) -> list[str | None]:
    """``d.owner`` of each id, in order."""
    return [d.owner(rid) for rid in ids]


# -- remember / owner


def test_defaults_are_one_hour_and_100k_entries() -> None:
    """A directory built without limits keeps 100,000 entries for one hour."""
    d = ResponseDirectory(Clock())
    assert (d.max_entries, d.ttl, DEFAULT_MAX_ENTRIES, DEFAULT_TTL) == (100_000, 3600.0, 100_000, 3600.0)
    assert (len(d), d.evictions) == (0, 0)


def test_remember_then_owner_names_the_endpoint() -> None:
    """Each remembered id is owned by the endpoint it was remembered on; unknown ids have no owner."""
    d, _ = directory()
    d.remember("resp_1", "a")
    d.remember("resp_2", "b")
    d.remember("resp_3", "a")
    assert owners(d, "resp_1", "resp_2", "resp_3", "resp_4") == ["a", "b", "a", None]
    assert len(d) == 3


def test_remembering_again_moves_the_id_to_the_new_endpoint() -> None:
    """Re-remembering an id replaces its endpoint and does not count it twice."""
    d, clock = directory()
    d.remember("resp_1", "a")
    clock.advance(SPAN * 2)  # the second remember lands in a newer generation
    d.remember("resp_1", "b")
    assert d.owner("resp_1") == "b"
    assert len(d) == 1
    d.forget("resp_1")
    assert (d.owner("resp_1"), len(d)) == (None, 0)  # no stale copy left behind in the old generation


def test_remembering_again_restarts_the_ttl() -> None:
    """An id remembered again lives a full TTL from the second remember, not the first."""
    d, clock = directory()
    d.remember("resp_1", "a")
    clock.advance(TTL - 1)
    d.remember("resp_1", "a")
    clock.advance(TTL - 1)  # 2*TTL - 2 after the first remember
    assert (d.owner("resp_1"), len(d)) == ("a", 1)


def test_endpoint_names_are_shared_not_copied() -> None:
    """Every entry of one endpoint refers to the same name object, whatever string the caller passed."""
    d, _ = directory()
    d.remember("resp_1", "".join(["end", "point"]))
    d.remember("resp_2", "".join(["endp", "oint"]))
    first, second = d.owner("resp_1"), d.owner("resp_2")
    assert first == "endpoint"
    assert first is second


# -- expiry


@pytest.mark.parametrize("offset", [0.0, SPAN / 2, SPAN - 0.001])
def test_an_entry_lives_at_least_ttl_and_at_most_ttl_plus_one_generation(offset: float) -> None:
    """An entry made anywhere in a generation is still owned just before its TTL and gone by TTL + TTL/6."""
    d, clock = directory()
    d.remember("resp_opener", "a")  # opens the generation at t=0
    clock.advance(offset)
    d.remember("resp_x", "b")
    clock.advance(TTL - 0.001)
    assert d.owner("resp_x") == "b"
    clock.advance(SPAN + 0.001)  # now exactly TTL + SPAN after the entry
    assert d.owner("resp_x") is None
    assert d.owner("resp_opener") is None
    assert len(d) == 0


def test_expiry_drops_a_whole_generation_at_its_end() -> None:
    """Entries of one generation all go together, when the generation's newest entry turns TTL old."""
    d, clock = directory()
    d.remember("resp_1", "a")  # t=0: a generation opens (it takes entries until t=100)
    clock.advance(40)
    d.remember("resp_2", "a")  # t=40: same generation, now its newest entry
    clock.advance(70)
    d.remember("resp_3", "b")  # t=110: the next generation
    clock.advance(TTL + 40 - 110 - 0.001)  # t=639.999
    assert (len(d), owners(d, "resp_1", "resp_2", "resp_3")) == (3, ["a", "a", "b"])
    clock.advance(0.001)  # t=640: the first generation's newest entry is TTL old
    assert (len(d), owners(d, "resp_1", "resp_2", "resp_3")) == (1, [None, None, "b"])
    clock.advance(70)  # t=710: the second one too
    assert (len(d), owners(d, "resp_3")) == (0, [None])
    assert d.evictions == 0  # expiry is not eviction


def test_len_expires_without_a_lookup() -> None:
    """``len`` alone notices that entries expired."""
    d, clock = directory()
    for i in range(5):
        d.remember(f"resp_{i}", "a")
    clock.advance(TTL + SPAN)
    assert len(d) == 0


# -- size cap


def test_the_size_cap_evicts_the_oldest_first_and_counts_it() -> None:
    """Past ``max_entries`` the oldest entry goes, one per new entry, counted in ``evictions``."""
    d, clock = directory(max_entries=3)
    for i in range(1, 4):
        d.remember(f"resp_{i}", "a")
        clock.advance(1)
    assert (len(d), d.evictions) == (3, 0)
    d.remember("resp_4", "b")
    assert owners(d, "resp_1", "resp_2", "resp_3", "resp_4") == [None, "a", "a", "b"]
    assert (len(d), d.evictions) == (3, 1)
    d.remember("resp_5", "b")
    assert owners(d, "resp_2", "resp_3", "resp_4", "resp_5") == [None, "a", "b", "b"]
    assert (len(d), d.evictions) == (3, 2)


def test_the_size_cap_evicts_across_generations_oldest_generation_first() -> None:
    """Eviction empties the oldest generation before touching a newer one."""
    d, clock = directory(max_entries=4)
    d.remember("resp_1", "a")
    d.remember("resp_2", "a")  # generation 1
    clock.advance(SPAN)
    d.remember("resp_3", "b")
    d.remember("resp_4", "b")  # generation 2
    clock.advance(SPAN)
    d.remember("resp_5", "c")
    d.remember("resp_6", "c")
    d.remember("resp_7", "c")
    assert owners(d, *(f"resp_{i}" for i in range(1, 8))) == [None, None, None, "b", "c", "c", "c"]
    assert (len(d), d.evictions) == (4, 3)


def test_a_re_remembered_id_is_the_newest_for_eviction() -> None:
    """Remembering an id again makes it the last to be evicted."""
    d, _ = directory(max_entries=3)
    d.remember("resp_1", "a")
    d.remember("resp_2", "a")
    d.remember("resp_3", "a")
    d.remember("resp_1", "b")  # now the newest
    d.remember("resp_4", "a")
    assert owners(d, "resp_1", "resp_2", "resp_3", "resp_4") == ["b", None, "a", "a"]
    assert (len(d), d.evictions) == (3, 1)


def test_a_cap_of_zero_still_keeps_the_latest_entry() -> None:
    """A directory built with ``max_entries=0`` behaves as a cap of one."""
    d, _ = directory(max_entries=0)
    d.remember("resp_1", "a")
    d.remember("resp_2", "a")
    assert (d.max_entries, owners(d, "resp_1", "resp_2"), len(d), d.evictions) == (1, [None, "a"], 1, 1)


# -- forget


def test_forget_drops_one_id_only() -> None:
    """``forget`` removes that id (once), leaving the others and ``evictions`` alone."""
    d, clock = directory()
    d.remember("resp_1", "a")
    clock.advance(SPAN)
    d.remember("resp_2", "a")
    d.forget("resp_1")
    assert (owners(d, "resp_1", "resp_2"), len(d)) == ([None, "a"], 1)
    d.forget("resp_1")
    d.forget("resp_unknown")
    assert (owners(d, "resp_2"), len(d), d.evictions) == (["a"], 1, 0)


def test_forget_endpoint_drops_every_id_of_that_endpoint_and_returns_the_count() -> None:
    """``forget_endpoint`` removes exactly the ids held by that endpoint, across generations."""
    d, clock = directory()
    d.remember("resp_1", "a")
    d.remember("resp_2", "b")
    clock.advance(SPAN * 3)
    d.remember("resp_3", "a")
    d.remember("resp_4", "c")
    assert d.forget_endpoint("a") == 2
    assert owners(d, "resp_1", "resp_2", "resp_3", "resp_4") == [None, "b", None, "c"]
    assert len(d) == 2
    assert d.forget_endpoint("a") == 0
    assert d.forget_endpoint("nobody") == 0
    assert len(d) == 2
    d.remember("resp_5", "a")  # the endpoint can come back
    assert (d.owner("resp_5"), len(d)) == ("a", 3)


def test_forgotten_slots_are_reused_before_evicting() -> None:
    """After a ``forget`` the directory has room again: the next remember evicts nothing."""
    d, _ = directory(max_entries=2)
    d.remember("resp_1", "a")
    d.remember("resp_2", "a")
    d.forget("resp_1")
    d.remember("resp_3", "a")
    assert (owners(d, "resp_2", "resp_3"), len(d), d.evictions) == (["a", "a"], 2, 0)


def test_eviction_after_forgets_emptied_the_oldest_generation() -> None:
    """An oldest generation emptied by ``forget`` is skipped: eviction takes the oldest entry still held."""
    d, clock = directory(max_entries=2)
    d.remember("resp_1", "a")
    clock.advance(SPAN)
    d.remember("resp_2", "a")
    d.forget("resp_1")  # generation 1 is now empty
    clock.advance(SPAN)
    d.remember("resp_3", "b")
    d.remember("resp_4", "b")
    assert (owners(d, "resp_2", "resp_3", "resp_4"), len(d), d.evictions) == ([None, "b", "b"], 2, 1)


# -- reconfigure


def test_reconfigure_shrinking_the_cap_evicts_the_oldest() -> None:
    """A reloaded smaller ``max_entries`` evicts down to it at once, oldest first, counted."""
    d, clock = directory(max_entries=10)
    for i in range(10):
        d.remember(f"resp_{i}", "a")
        clock.advance(SPAN / 4)  # spans several generations
    d.reconfigure(affinity_config(max_entries=3, ttl="10m"))
    assert d.max_entries == 3
    assert (len(d), d.evictions) == (3, 7)
    assert owners(d, *(f"resp_{i}" for i in range(10))) == [None] * 7 + ["a"] * 3


def test_reconfigure_growing_the_cap_keeps_everything() -> None:
    """A reloaded larger ``max_entries`` evicts nothing and lets more in."""
    d, _ = directory(max_entries=2)
    d.remember("resp_1", "a")
    d.remember("resp_2", "a")
    d.reconfigure(affinity_config(max_entries=3, ttl="10m"))
    d.remember("resp_3", "a")
    assert (owners(d, "resp_1", "resp_2", "resp_3"), len(d), d.evictions) == (["a", "a", "a"], 3, 0)


def test_reconfigure_adopts_the_ttl_for_new_entries() -> None:
    """After a reload to a 60 s TTL, a new entry is still there at 59.9 s and gone by 70 s."""
    d, clock = directory(ttl=DEFAULT_TTL)
    d.reconfigure(affinity_config(ttl="60s"))
    assert (d.ttl, d.max_entries) == (60.0, 100_000)
    d.remember("resp_1", "a")
    clock.advance(59.9)
    assert d.owner("resp_1") == "a"
    clock.advance(10.1)
    assert (d.owner("resp_1"), len(d)) == (None, 0)


def test_reconfigure_to_a_longer_ttl_keeps_entries_longer() -> None:
    """An entry remembered before a reload to a two-hour TTL outlives the old one-hour TTL."""
    d, clock = directory(ttl=DEFAULT_TTL)
    d.remember("resp_1", "a")
    d.reconfigure(affinity_config(ttl="2h"))
    clock.advance(7199)
    assert d.owner("resp_1") == "a"
    clock.advance(7200 / GENERATIONS + 1)
    assert d.owner("resp_1") is None


def test_reconfigure_to_a_shorter_ttl_keeps_young_entries_for_the_new_ttl() -> None:
    """An entry made just before a reload to a 60 s TTL still has an owner 30 s later."""
    d, clock = directory(ttl=DEFAULT_TTL)
    d.remember("resp_old", "a")  # t=0 opens a 600 s generation
    clock.advance(500)
    d.remember("resp_young", "a")  # t=500: same generation
    d.reconfigure(affinity_config(ttl="60s"))
    clock.advance(30)
    assert d.owner("resp_young") == "a"


# -- the whole contract against a model


class DirectoryMachine(RuleBasedStateMachine):
    """
    Random remember / forget / forget_endpoint / clock / reload sequences
    against an insertion-ordered model dict.

    The model knows when each entry was made; within the one-generation
    grace window (TTL to TTL + TTL/6) it asks the directory whether the entry
    already expired, and checks expiry only ever takes the oldest entries.
    Outside that window every answer, ``len`` and ``evictions`` are exact.
    """

    IDS = [f"resp_{i}" for i in range(8)]
    ENDPOINTS = ["a", "b", "c"]

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cap = 5
        self.directory = ResponseDirectory(self.clock, max_entries=self.cap, ttl=TTL)
        self.model: dict[str, tuple[str, float]] = {}  # id -> (endpoint, made at); oldest first
        self.evictions = 0

    def settle(self) -> None:
        """Drop the model's expired entries, checking the directory's answer for each."""
        now = self.clock.seconds()
        kept: dict[str, tuple[str, float]] = {}
        newer_kept = False
        for rid, (endpoint, made) in self.model.items():
            held = self.directory.owner(rid)
            age = now - made
            if age < TTL:
                assert held == endpoint, f"{rid} ({age}s old) lost early"
            elif age >= TTL + SPAN:
                assert held is None, f"{rid} ({age}s old) outlived TTL + TTL/6"
            else:
                assert held in (None, endpoint)
            if held is None:
                assert not newer_kept, f"{rid} expired while an older entry is still held"
            else:
                newer_kept = True
                kept[rid] = (endpoint, made)
        self.model = kept

    def fit(self) -> None:
        """Evict the model's oldest entries down to the cap."""
        while len(self.model) > self.cap:
            del self.model[next(iter(self.model))]
            self.evictions += 1

    @rule(rid=st.sampled_from(IDS), endpoint=st.sampled_from(ENDPOINTS))
    def remember(self, rid: str, endpoint: str) -> None:
        self.settle()
        self.directory.remember(rid, endpoint)
        self.model.pop(rid, None)
        self.model[rid] = (endpoint, self.clock.seconds())
        self.fit()

    @rule(rid=st.sampled_from(IDS))
    def forget(self, rid: str) -> None:
        self.settle()
        self.directory.forget(rid)
        self.model.pop(rid, None)

    @rule(endpoint=st.sampled_from(ENDPOINTS))
    def forget_endpoint(self, endpoint: str) -> None:
        self.settle()
        dropped = self.directory.forget_endpoint(endpoint)
        mine = [rid for rid, (ep, _) in self.model.items() if ep == endpoint]
        assert dropped == len(mine)
        for rid in mine:
            del self.model[rid]

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 37.5, 99.999, 100.0, 250.0, 599.999, 600.0, 700.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(cap=st.integers(min_value=1, max_value=8))
    def reload_cap(self, cap: int) -> None:
        self.settle()
        self.directory.reconfigure(affinity_config(max_entries=cap, ttl="10m"))
        self.cap = cap
        self.fit()

    @invariant()
    def matches_the_model(self) -> None:
        self.settle()
        assert len(self.directory) == len(self.model)
        assert self.directory.evictions == self.evictions
        for rid in self.IDS:
            expected = self.model.get(rid)
            assert self.directory.owner(rid) == (None if expected is None else expected[0])


def test_directory_matches_a_model_dict_through_random_operations() -> None:
    """Through any sequence of operations, owners, ``len`` and ``evictions`` match an ordered-dict model."""
    run_state_machine_as_test(
        DirectoryMachine,
        settings=settings(
            max_examples=300,
            stateful_step_count=40,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- memory

N_IDS = 100_000
ID_ALPHABET = string.ascii_letters + string.digits
MEMORY_BUDGET = 16_000_000  # bytes


def _id_maker(seed: int) -> Any:
    rng = random.Random(seed)

    def make() -> str:
        return "resp_" + "".join(rng.choices(ID_ALPHABET, k=24))

    return make


def _fill(ids: Any, clock: Clock) -> ResponseDirectory:
    """A directory holding N_IDS ids over three endpoints, spread over one TTL (every generation in use)."""
    d = ResponseDirectory(clock, max_entries=N_IDS, ttl=DEFAULT_TTL)
    endpoints = ("dmr-a", "dmr-b", "dmr-c")
    step = DEFAULT_TTL / N_IDS
    for i, rid in enumerate(ids):
        d.remember(rid, endpoints[i % 3])
        clock.advance(step)
    return d


def _traced(build: Any) -> tuple[int, Any]:
    """Bytes still allocated (and traced) after ``build()``, and what it returned."""
    gc.collect()
    tracemalloc.start()
    try:
        result = build()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return used, result


def test_memory_of_100k_ids_over_three_endpoints() -> None:
    """100,000 ``resp_`` ids over 3 endpoints cost the directory under 16 MB, id strings included."""
    make = _id_maker(20240601)
    ids = [make() for _ in range(N_IDS)]
    assert len(set(ids)) == N_IDS and all(len(rid) == 29 for rid in ids)

    own, full = _traced(lambda: _fill(ids, Clock()))
    assert len(full) == N_IDS
    del full

    make = _id_maker(20240602)
    with_ids, full = _traced(lambda: _fill((make() for _ in range(N_IDS)), Clock()))
    assert len(full) == N_IDS
    assert full.owner("resp_" + "x" * 24) is None
    del full

    print(
        f"\nResponseDirectory, {N_IDS:,} ids x 3 endpoints over one TTL: "
        f"{own:,} bytes ({own / N_IDS:.1f} B/entry) without the id strings, "
        f"{with_ids:,} bytes ({with_ids / N_IDS:.1f} B/entry) with them"
    )
    assert own < with_ids < MEMORY_BUDGET
    assert with_ids - own > N_IDS * 29  # the id strings really were counted the second time
