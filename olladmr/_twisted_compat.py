"""
The one place olladmr touches private Twisted internals.

Everything here reaches past Twisted's public API, either to keep the
request path cheap (no per-request URI parsing or endpoint construction in
``Agent.request``) or because Twisted has no public knob for the behaviour
(a drained SIGTERM exiting 0).  Each function is a thin, named wrapper so
that the rest of the package stays on public API, and each is pinned by a
contract test in ``tests/test_twisted_compat.py``: when a Twisted release
renames or reshapes one of these internals, those tests fail first, and
``setup.py`` caps Twisted below the first release they have not been run
against.
"""

from __future__ import annotations

from typing import Any, Collection, Hashable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as _ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

#: The Twisted releases the contract tests have been run against (setup.py pins below the next major).
TESTED_TWISTED = ("24.7", "26.10")


class QuietHTTP11ClientFactory(_ClientFactory):
    """The pool's per-connection client factory, without a log line per connection."""

    noisy = False


def use_quiet_factory(pool: HTTPConnectionPool) -> None:
    """Make ``pool`` build its connections with :class:`QuietHTTP11ClientFactory`."""
    pool._factory = QuietHTTP11ClientFactory


def pool_has_idle_connection(pool: HTTPConnectionPool, key: Hashable) -> bool:
    """Whether ``pool`` holds a cached (idle, keep-alive) connection for ``key``."""
    return bool(pool._connections.get(key))


def agent_endpoint(agent: Agent, uri: URI) -> IStreamClientEndpoint:
    """The client endpoint ``agent`` would connect to for ``uri`` (TCP, or TLS for https)."""
    endpoint: IStreamClientEndpoint = agent._getEndpoint(uri)
    return endpoint


def agent_host_header(agent: Agent, uri: URI) -> bytes:
    """The ``Host`` header value ``agent`` would send for ``uri``."""
    value: bytes = agent._computeHostValue(uri.scheme, uri.host, uri.port)
    return value


def agent_request(
    agent: Agent,
    key: tuple[bytes, bytes, int],
    endpoint: IStreamClientEndpoint,
    method: bytes,
    uri: URI,
    headers: Headers,
    body: IBodyProducer | None,
    path: bytes,
) -> Deferred[IResponse]:
    """
    ``agent.request`` with the origin already parsed: ``key`` is the pool key,
    ``endpoint`` the connection endpoint and ``path`` the request target.
    ``headers`` must already carry ``Host``.
    """
    d: Deferred[IResponse] = agent._requestWithEndpoint(key, endpoint, method, uri, headers, body, path)
    return d


def clear_exit_signal(reactor: Any, signals: Collection[int]) -> bool:
    """
    Forget that the reactor was stopped by one of ``signals``, so twistd exits
    0 instead of re-raising the signal; returns whether it did.
    """
    if getattr(reactor, "_exitSignal", None) in signals:
        reactor._exitSignal = None
        return True
    return False
