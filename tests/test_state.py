"""Unit tests for ``olladmr.fleet.state``: an endpoint's concurrency slots and its wait queue."""

from __future__ import annotations

import pytest
from support import make_endpoint
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from olladmr.fleet.state import EndpointState, QueueFull, QueueTimeout


def slotted(max_concurrent: int = 1, queue_size: int = 3, queue_timeout: float = 5.0) -> tuple[EndpointState, Clock]:
    clock = Clock()
    ep = make_endpoint(
        "slots", clock=clock, max_concurrent=max_concurrent, queue_size=queue_size, queue_timeout=queue_timeout
    )
    return ep, clock


def test_slots_unlimited_when_max_concurrent_is_zero() -> None:
    """With ``max_concurrent=0`` every acquire succeeds at once."""
    ep, _ = slotted(max_concurrent=0)
    for _ in range(100):
        assert ep.acquire() is None
    assert ep.in_flight == 100 and ep.queued == 0


def test_slots_second_acquire_waits_for_release() -> None:
    """At ``max_concurrent=1`` the first acquire gets the slot and the second waits until it is released."""
    ep, clock = slotted()
    assert ep.acquire() is None
    assert ep.in_flight == 1 and not ep.has_free_slot
    waiting = ep.acquire()
    assert isinstance(waiting, Deferred)
    results: list[object] = []
    waiting.addBoth(results.append)
    assert results == [] and ep.queued == 1
    ep.release()
    assert results == [None]
    assert ep.in_flight == 1 and ep.queued == 0
    assert clock.getDelayedCalls() == []  # the queue timer was cancelled
    ep.release()
    assert ep.in_flight == 0 and ep.has_free_slot


def test_slots_are_handed_over_in_fifo_order() -> None:
    """Waiters get the slot in the order they asked, one per release."""
    ep, _ = slotted(queue_size=5)
    assert ep.acquire() is None
    order: list[int] = []
    for i in range(4):
        d = ep.acquire()
        assert d is not None
        d.addCallback(lambda _, i=i: order.append(i))
    for expected in range(4):
        ep.release()
        assert order == list(range(expected + 1))
    assert ep.in_flight == 1 and ep.queued == 0


def test_slots_newcomer_queues_behind_waiters() -> None:
    """A new request does not jump the queue even at the moment a slot is free."""
    ep, _ = slotted(max_concurrent=2)
    assert ep.acquire() is None and ep.acquire() is None
    first = ep.acquire()
    assert first is not None
    ep.in_flight -= 1  # a slot frees without a release() hand-over (e.g. a limit change)
    second = ep.acquire()
    assert second is not None and ep.queued == 2


def test_slots_full_queue_raises_queue_full() -> None:
    """When ``queue_size`` requests already wait, one more raises QueueFull at once."""
    ep, _ = slotted(queue_size=2)
    assert ep.acquire() is None
    ep.acquire()
    ep.acquire()
    with pytest.raises(QueueFull):
        ep.acquire()
    assert ep.queued == 2


def test_slots_waiter_times_out() -> None:
    """A waiter that gets no slot within ``queue_timeout`` fails with QueueTimeout and leaves the queue."""
    ep, clock = slotted(queue_timeout=5.0)
    assert ep.acquire() is None
    waiting = ep.acquire()
    assert waiting is not None
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    clock.advance(4.9)
    assert failures == [] and ep.queued == 1
    clock.advance(0.1)
    assert len(failures) == 1 and failures[0].check(QueueTimeout)
    assert ep.queued == 0
    ep.release()
    assert ep.in_flight == 0  # the slot was not given to the expired waiter


def test_slots_cancelled_waiter_leaves_the_queue() -> None:
    """Cancelling a waiter removes it (and its timer) so the next release goes to the one behind it."""
    ep, clock = slotted()
    assert ep.acquire() is None
    first, second = ep.acquire(), ep.acquire()
    assert first is not None and second is not None
    failures: list[Failure] = []
    first.addErrback(failures.append)
    got: list[object] = []
    second.addCallback(got.append)
    first.cancel()
    assert len(failures) == 1 and failures[0].check(CancelledError)
    assert ep.queued == 1
    assert len(clock.getDelayedCalls()) == 1
    ep.release()
    assert got == [None] and ep.in_flight == 1 and ep.queued == 0
    clock.advance(60)  # no stray timeout fires for the cancelled waiter


def test_slots_fail_waiters() -> None:
    """``fail_waiters`` fails every queued request with the given reason and empties the queue."""
    ep, clock = slotted()
    assert ep.acquire() is None
    failures: list[Failure] = []
    for _ in range(3):
        d = ep.acquire()
        assert d is not None
        d.addErrback(failures.append)
    ep.fail_waiters(CancelledError("gone"))
    assert len(failures) == 3 and ep.queued == 0
    assert clock.getDelayedCalls() == []
