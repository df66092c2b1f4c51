"""
Why an upstream request produced no usable response.

:class:`UpstreamFailure` names the kind of failure and whether the upstream
can have started on the request, which is what decides failover (the
proxy), offline marking (health feedback) and the error the client gets.
:func:`classify` maps whatever Twisted's HTTP client raised onto it.  A
leaf: used by the proxy and by the health monitor alike.
"""

from __future__ import annotations

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

# Failure kinds.  "Safe" ones mean the upstream cannot have started work.
REFUSED = "connection_refused"
CONNECT_TIMEOUT = "connect_timeout"
UNREACHABLE = "unreachable"
RESET = "connection_reset"
HEADER_TIMEOUT = "header_timeout"
BAD_RESPONSE = "bad_response"
SAFE_KINDS = frozenset({REFUSED, CONNECT_TIMEOUT, UNREACHABLE})


class UpstreamFailure(Exception):
    """Why an upstream request produced no usable response."""

    def __init__(self, endpoint: str, kind: str, detail: str, *, reused: bool = False, sent: bool = True) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.detail = detail
        self.reused = reused  # the request went out on a pooled keep-alive connection
        self.sent = sent  # the whole request may have reached the upstream
        super().__init__(f"{endpoint}: {kind}: {detail}")

    @property
    def safe_to_retry(self) -> bool:
        """The upstream cannot have started on the request."""
        return self.kind in SAFE_KINDS or (self.kind == RESET and not self.sent)

    @property
    def stale_connection(self) -> bool:
        """A pooled connection died before any response byte: retry it fresh."""
        return self.kind == RESET and self.reused

    @property
    def marks_offline(self) -> bool:
        return self.kind in SAFE_KINDS


def was_cancelled(failure: Failure) -> bool:
    """Twisted wraps a cancelled request in ResponseNeverReceived/RequestTransmissionFailed."""
    reasons = getattr(failure.value, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def _first_reason(failure: Failure) -> BaseException:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return reasons[0].value
    assert failure.value is not None  # a Failure always holds its exception
    return failure.value


def classify(endpoint: str, failure: Failure, *, reused: bool) -> UpstreamFailure:
    """Turn a failed ``Agent.request`` into an :class:`UpstreamFailure`."""
    value = failure.value
    if isinstance(value, ierror.ConnectionRefusedError):
        return UpstreamFailure(endpoint, REFUSED, "connection refused", sent=False)
    if isinstance(value, ierror.TimeoutError):
        return UpstreamFailure(endpoint, CONNECT_TIMEOUT, "timed out connecting", sent=False)
    if isinstance(value, (ierror.DNSLookupError, ierror.NoRouteError)):
        return UpstreamFailure(endpoint, UNREACHABLE, str(value).strip() or type(value).__name__, sent=False)
    if isinstance(value, ierror.ConnectError):
        return UpstreamFailure(endpoint, UNREACHABLE, str(value).strip() or type(value).__name__, sent=False)
    if isinstance(value, RequestTransmissionFailed):
        return UpstreamFailure(
            endpoint, RESET, f"connection lost while sending the request ({_first_reason(failure)!r})",
            reused=reused, sent=False,
        )
    if isinstance(value, ResponseNeverReceived):
        reason = _first_reason(failure)
        if isinstance(reason, (ierror.ConnectionLost, ierror.ConnectionDone)):
            return UpstreamFailure(endpoint, RESET, "connection closed before any response", reused=reused)
        return UpstreamFailure(endpoint, BAD_RESPONSE, f"invalid response: {reason}", reused=reused)
    if isinstance(value, ResponseFailed):
        return UpstreamFailure(endpoint, BAD_RESPONSE, f"invalid response: {_first_reason(failure)}", reused=reused)
    return UpstreamFailure(endpoint, BAD_RESPONSE, f"{type(value).__name__}: {value}", reused=reused)


_TRANSPORT_ERRORS = (
    ierror.ConnectError,
    ierror.ConnectionLost,
    ierror.ConnectionDone,
    ierror.TimeoutError,
    ierror.DNSLookupError,
    ierror.NoRouteError,
    RequestTransmissionFailed,
    ResponseNeverReceived,
    ResponseFailed,
)


def is_transport_failure(failure: Failure) -> bool:
    """Whether ``failure`` is what an HTTP client raises for a network or protocol problem (not a bug)."""
    return failure.check(*_TRANSPORT_ERRORS) is not None
