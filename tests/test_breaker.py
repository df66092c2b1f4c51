"""Unit tests for ``olladmr.fleet.breaker``: the per-endpoint circuit breaker on a ``Clock``."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from olladmr.fleet.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def make_breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(clock, threshold, cooldown), clock


def open_breaker(threshold: int = 3, cooldown: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    breaker, clock = make_breaker(threshold, cooldown)
    for _ in range(threshold):
        breaker.on_failure()
    assert breaker.state == OPEN
    return breaker, clock


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    """The breaker stays closed below the threshold and opens on the Nth consecutive failure."""
    breaker, _ = make_breaker(threshold=3)
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is False
    assert breaker.on_failure() is False
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN
    assert not breaker.allows()


def test_breaker_success_resets_failure_count() -> None:
    """A success in between means failures are no longer consecutive, so the count restarts."""
    breaker, _ = make_breaker(threshold=3)
    breaker.on_failure()
    breaker.on_failure()
    breaker.on_success()
    assert breaker.failures == 0
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == CLOSED and breaker.allows()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN


def test_breaker_attempts_while_closed_never_block() -> None:
    """``on_attempt`` in the closed state does not limit how many requests may go."""
    breaker, _ = make_breaker()
    for _ in range(5):
        breaker.on_attempt()
        assert breaker.allows()


def test_breaker_half_open_after_cooldown_admits_exactly_one_trial() -> None:
    """After the cooldown the breaker is half-open: ``allows()`` is true until the one trial is sent."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(9.999)
    assert breaker.state == OPEN and not breaker.allows()
    clock.advance(0.001)
    assert breaker.state == HALF_OPEN
    assert breaker.allows()
    assert breaker.allows()  # asking has no side effect
    breaker.on_attempt()
    assert not breaker.allows()
    assert breaker.state == HALF_OPEN


def test_breaker_trial_success_closes() -> None:
    """A successful half-open trial closes the breaker and clears the failure count."""
    breaker, clock = open_breaker()
    clock.advance(10)
    breaker.on_attempt()
    breaker.on_success()
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert breaker.allows()
    assert breaker.retry_after() == 0.0


def test_breaker_trial_failure_reopens_for_a_full_cooldown() -> None:
    """A failed half-open trial re-opens the breaker for another whole cooldown."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(12)
    breaker.on_attempt()
    assert breaker.on_failure() is True
    assert breaker.state == OPEN
    assert not breaker.allows()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(10)
    assert breaker.state == HALF_OPEN and breaker.allows()


def test_breaker_retry_after_counts_down_the_cooldown() -> None:
    """``retry_after()`` is 0 when closed, the remaining cooldown when open, and 0 once half-open."""
    breaker, clock = make_breaker(threshold=1, cooldown=10.0)
    assert breaker.retry_after() == 0.0
    breaker.on_failure()
    assert breaker.retry_after() == pytest.approx(10.0)
    clock.advance(4)
    assert breaker.retry_after() == pytest.approx(6.0)
    clock.advance(6)
    assert breaker.retry_after() == 0.0
    clock.advance(100)
    assert breaker.retry_after() == 0.0


def test_breaker_unreported_trial_does_not_block_forever() -> None:
    """A half-open trial whose outcome is never reported stops blocking after another cooldown."""
    breaker, clock = open_breaker(cooldown=10.0)
    clock.advance(10)
    breaker.on_attempt()  # e.g. the client went away before the upstream answered
    clock.advance(9.9)
    assert not breaker.allows()
    clock.advance(0.1)
    assert breaker.allows()
    breaker.on_attempt()
    assert not breaker.allows()
    breaker.on_success()
    assert breaker.state == CLOSED and breaker.allows()


def test_breaker_trial_now_skips_the_cooldown():
    """An open breaker told that its endpoint is back online admits one trial at once."""
    from twisted.internet.task import Clock

    from olladmr.fleet.breaker import CircuitBreaker

    clock = Clock()
    breaker = CircuitBreaker(clock, threshold=2, cooldown=30)
    breaker.on_failure()
    breaker.on_failure()
    assert breaker.state == "open" and not breaker.allows()
    breaker.trial_now()
    assert breaker.state == "half-open" and breaker.allows()
    breaker.on_attempt()
    assert not breaker.allows()
    breaker.on_success()
    assert breaker.state == "closed"
