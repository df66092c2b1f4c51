"""
A per-endpoint circuit breaker fed by real traffic.

``closed``: requests flow; consecutive failures are counted.  After
``threshold`` of them the breaker opens: the endpoint is not routable for
``cooldown`` seconds.  Then it is ``half-open``: exactly one trial request
may go; its success closes the breaker, its failure opens it again.  A
trial whose outcome is never reported (the client left, the attempt was
abandoned) stops blocking after another ``cooldown``, so the breaker
cannot stay half-open for ever.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitBreaker:
    """Owns one endpoint's failure count and open/half-open/closed state."""

    def __init__(self, clock: IReactorTime, threshold: int, cooldown: float) -> None:
        self._clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self._opened_at: float | None = None
        self._trial_out: float | None = None  # when the half-open trial was sent

    def reconfigure(self, threshold: int, cooldown: float) -> None:
        """Adopt reloaded settings; the failure count and open/half-open state are kept."""
        self.threshold = threshold
        self.cooldown = cooldown

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if self._clock.seconds() - self._opened_at < self.cooldown:
            return OPEN
        return HALF_OPEN

    def allows(self) -> bool:
        """Whether a request may be sent now (half-open admits one trial)."""
        if self._opened_at is None:
            return True  # closed (the common case, asked several times per request)
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            return self._trial_out is None or self._clock.seconds() - self._trial_out >= self.cooldown
        return False

    def on_attempt(self) -> None:
        """A request is being sent; in half-open it is the trial."""
        if self._opened_at is not None and self.state == HALF_OPEN:
            self._trial_out = self._clock.seconds()

    def on_success(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._trial_out = None

    def on_failure(self) -> bool:
        """Count a failure; returns True when this failure (re)opened the breaker."""
        self.failures += 1
        if self._opened_at is not None or self.failures >= self.threshold:
            self._opened_at = self._clock.seconds()
            self._trial_out = None
            return True
        return False

    def trial_now(self) -> None:
        """
        Skip the rest of the cool-down: an open breaker becomes half-open at
        once (used when a health check finds a dead endpoint back online).
        """
        if self._opened_at is not None:
            self._opened_at = min(self._opened_at, self._clock.seconds() - self.cooldown)
            self._trial_out = None

    def retry_after(self) -> float:
        """Seconds until the breaker lets a trial through (0 if it does now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (self._clock.seconds() - self._opened_at))
