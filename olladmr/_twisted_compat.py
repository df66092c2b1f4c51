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

from typing import Any, Collection

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint
from twisted.protocols.basic import LineReceiver
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as _ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

#: The Twisted releases the contract tests have been run against (setup.py pins below the next major).
TESTED_TWISTED = ("26.4", "26.10")


_PLAIN_TCP = (tcp.Server, tcp.Client)


class QuietHTTP11ClientFactory(_ClientFactory):
    """The pool's per-connection client factory, without a log line per connection."""

    noisy = False


def use_quiet_factory(pool: HTTPConnectionPool) -> None:
    """Make ``pool`` build its connections with :class:`QuietHTTP11ClientFactory`."""
    pool._factory = QuietHTTP11ClientFactory


def agent_endpoint(agent: Agent, uri: URI) -> IStreamClientEndpoint:
    """The client endpoint ``agent`` would connect to for ``uri`` (TCP, or TLS for https)."""
    endpoint: IStreamClientEndpoint = agent._getEndpoint(uri)
    return endpoint


def agent_host_header(agent: Agent, uri: URI) -> bytes:
    """The ``Host`` header value ``agent`` would send for ``uri``."""
    value: bytes = agent._computeHostValue(uri.scheme, uri.host, uri.port)
    return value


def plain_tcp(transport: Any) -> bool:
    """Whether ``transport`` is a plain (not TLS) TCP connection of the reactor's, which :func:`write_now` can send on."""
    return type(transport) in _PLAIN_TCP


def write_now(transport: Any, data: bytes) -> None:
    """
    ``transport.write(data)``, sent at once when ``transport`` is a plain TCP
    connection with nothing queued.  Twisted queues every write until the
    reactor's next turn finds the socket writable, which costs two
    ``epoll_ctl`` calls and a reactor iteration per response; one
    ``send`` now does the same job, and whatever the kernel does not take is
    queued the ordinary way (behind it, in order).  Any other transport
    (TLS, Unix, test transports), or one that is closing or has bytes
    queued, gets its ordinary ``write``.
    """
    if (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # would block, or broken: Twisted's own write path finds out and reports it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def accept_one_at_a_time(port: Any) -> bool:
    """
    Make a listening TCP ``port`` accept at most one connection each time
    the socket is readable (nginx's ``multi_accept off``), so that processes
    sharing one listening socket take turns: Twisted's ``Port.doRead``
    accepts up to ``numberAccepts`` (100, growing) at once, and one worker
    woken first would take a whole burst of keep-alive connections while
    the others idle.  Returns whether ``port`` is such a port.
    """
    if not isinstance(port, tcp.Port):
        return False
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        try:
            return read()
        finally:
            port.numberAccepts = 1

    port.doRead = doRead  # type: ignore[method-assign]  # (the point: a wrapper around this port's own)
    return True


class BadRequestHook:
    """
    For an ``HTTPChannel`` subclass: when Twisted's request parser refuses a
    request (a malformed request line or header line, a bad or duplicate
    ``Content-Length``, a broken chunk), it calls :meth:`bad_request` instead
    of writing its bare ``400 Bad Request``.  Put it before ``HTTPChannel``
    among the bases.
    """

    __slots__ = ()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """Answer the refused request and end the connection."""
        raise NotImplementedError


def put_header(headers: Headers, name: bytes, value: bytes) -> None:
    """
    ``headers.setRawHeaders(name, [value])`` for a lower-case ``name`` olladmr
    spells itself, without the per-call name encoding and value scan
    (about a dozen per proxied response).  A value with a CR or LF goes
    through ``setRawHeaders`` and its sanitising (line breaks become spaces).
    """
    key = _STORED.get(name)
    if key is None or b"\r" in value or b"\n" in value:
        headers.setRawHeaders(name, [value])
        if key is None and len(_STORED) < 256:
            probe = Headers()
            probe.setRawHeaders(name, [b""])
            _STORED[name] = next(iter(probe._rawHeaders))  # the key Headers keeps the name under
        return
    headers._rawHeaders[key] = [value]


_STORED: dict[bytes, bytes] = {}


def line_buffer(receiver: LineReceiver) -> bytes:
    """The bytes ``receiver`` holds of a line not yet ended (``LineReceiver`` keeps them between reads)."""
    buffered: bytes = receiver._buffer
    return buffered


def channel_busy(channel: HTTPChannel) -> bool:
    """Whether ``channel`` is answering a request (set by ``allContentReceived``, cleared by ``requestDone``)."""
    return bool(channel._handlingRequest)


def clear_exit_signal(reactor: IReactorCore, signals: Collection[int]) -> bool:
    """
    Forget that the reactor was stopped by one of ``signals``, so twistd exits
    0 instead of re-raising the signal; returns whether it did.
    """
    if getattr(reactor, "_exitSignal", None) in signals:
        setattr(reactor, "_exitSignal", None)  # (a private attribute of ReactorBase: this module's business)
        return True
    return False
