"""
Contract tests for ``olladmr/_twisted_compat.py``.

Each wrapper there leans on a private Twisted internal.  These tests run the
wrappers against real Twisted objects (a real reactor, a real loopback
``Site``, real ``Agent``/``HTTPConnectionPool``), so when a Twisted release
renames or reshapes one of those internals a test here fails by name.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import pytest_twisted
import twisted
from twisted.application import app
from twisted.internet import reactor, task, tcp
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint, _ISupportsExitSignalCapturing
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.web import client
from twisted.web.client import URI, Agent, HTTPConnectionPool, readBody
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from olladmr import _twisted_compat as compat
from olladmr._twisted_compat import (
    QuietHTTP11ClientFactory,
    agent_endpoint,
    agent_host_header,
    clear_exit_signal,
    accept_one_at_a_time,
    channel_busy,
    use_quiet_factory,
    write_now,
)

# -- helpers: a real loopback HTTP server, log capture, polling


@dataclass(frozen=True)
class Seen:
    """What the loopback server saw of one request."""

    method: bytes
    uri: bytes
    hosts: list[bytes]
    body: bytes
    client_port: int


class Recorder(Resource):
    """Answers every request with ``ok <uri>`` and records it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def render(self, request: Request) -> bytes:
        content = request.content.read() if request.content is not None else b""
        address: Any = request.getClientAddress()
        self.seen.append(
            Seen(
                method=request.method,
                uri=request.uri,
                hosts=list(request.requestHeaders.getRawHeaders(b"host", [])),
                body=content,
                client_port=address.port,
            )
        )
        request.setHeader(b"content-type", b"text/plain")
        return b"ok " + request.uri


@dataclass
class Loopback:
    """A real ``Site`` listening on 127.0.0.1."""

    resource: Recorder
    port: IListeningPort

    @property
    def number(self) -> int:
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    @property
    def origin(self) -> bytes:
        return b"http://127.0.0.1:%d" % self.number


@pytest_twisted.async_yield_fixture
async def loopback() -> AsyncIterator[Loopback]:
    resource = Recorder()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[arg-type]  # Site vs ServerFactory generics
    try:
        yield Loopback(resource, port)
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


@pytest_twisted.async_yield_fixture
async def pool(loopback: Loopback) -> AsyncIterator[HTTPConnectionPool]:
    """A persistent pool, closed before the loopback server stops."""
    connections = HTTPConnectionPool(reactor, persistent=True)
    try:
        yield connections
    finally:
        await connections.closeCachedConnections()


@dataclass
class LogCapture:
    """Every log event published while active, as formatted text."""

    events: list[LogEvent] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def factory_lines(self) -> list[str]:
        return [text for text in self.texts if "Starting factory" in text or "Stopping factory" in text]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    observer: ILogObserver = capture.events.append  # type: ignore[assignment]
    globalLogPublisher.addObserver(observer)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(observer)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll the real reactor every 10 ms until ``predicate()`` holds, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """A real TCP endpoint that remembers which factories it was asked to connect."""

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self.wrapped = wrapped
        self.factories: list[IProtocolFactory] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        self.factories.append(protocolFactory)
        return self.wrapped.connect(protocolFactory)


# -- the Twisted version


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()))


def test_tested_versions_are_major_minor() -> None:
    """TESTED_TWISTED is a non-empty list of ``major.minor`` release numbers."""
    assert compat.TESTED_TWISTED
    for version in compat.TESTED_TWISTED:
        assert version.count(".") == 1 and all(part.isdigit() for part in version.split(".")), version


def test_installed_twisted_major_is_tested() -> None:
    """The installed Twisted's major version is no newer than the newest one these contracts were run against."""
    newest = max(_major_minor(version) for version in compat.TESTED_TWISTED)
    installed = _major_minor(twisted.__version__)
    assert installed[0] <= newest[0], (
        f"Twisted {twisted.__version__} is a newer major than any in TESTED_TWISTED {compat.TESTED_TWISTED}: "
        "run these contract tests against it, then add it to TESTED_TWISTED (and the setup.py cap)"
    )


# -- QuietHTTP11ClientFactory / use_quiet_factory  (HTTPConnectionPool._factory, _HTTP11ClientFactory)


def test_quiet_factory_subclasses_the_pools_factory() -> None:
    """HTTPConnectionPool builds connections from its ``_factory`` class, which QuietHTTP11ClientFactory subclasses."""
    default = HTTPConnectionPool._factory
    assert default is client._HTTP11ClientFactory
    assert issubclass(QuietHTTP11ClientFactory, default)
    assert HTTPConnectionPool(reactor)._factory is default


def test_quiet_factory_takes_the_pools_constructor_arguments() -> None:
    """The pool calls ``_factory(quiescentCallback, metadata)`` and the factory builds HTTP11ClientProtocols."""
    factory = QuietHTTP11ClientFactory(lambda protocol: None, "<endpoint>")
    assert isinstance(factory.buildProtocol(None), client.HTTP11ClientProtocol)


def test_quiet_factory_does_not_log_start_and_stop(logs: LogCapture) -> None:
    """``noisy = False`` silences the per-connection 'Starting/Stopping factory' lines the pool's factory logs."""
    noisy = HTTPConnectionPool._factory(lambda protocol: None, "<noisy>")
    noisy.doStart()
    noisy.doStop()
    assert len(logs.factory_lines()) == 2, logs.texts  # the default really is noisy

    quiet = QuietHTTP11ClientFactory(lambda protocol: None, "<quiet>")
    assert quiet.noisy is False
    quiet.doStart()
    quiet.doStop()
    assert len(logs.factory_lines()) == 2, logs.texts


@pytest_twisted.ensureDeferred
async def test_use_quiet_factory_makes_the_pool_connect_with_it(
    loopback: Loopback, pool: HTTPConnectionPool, logs: LogCapture
) -> None:
    """After use_quiet_factory, a real pool hands its endpoint a QuietHTTP11ClientFactory and logs no factory lines."""
    use_quiet_factory(pool)
    assert pool._factory is QuietHTTP11ClientFactory
    assert HTTPConnectionPool(reactor)._factory is not QuietHTTP11ClientFactory  # per pool, not global

    endpoint = RecordingEndpoint(TCP4ClientEndpoint(reactor, "127.0.0.1", loopback.number))
    connection = await pool.getConnection(("test", loopback.number), endpoint)
    transport = connection.transport
    assert transport is not None
    try:
        assert [type(factory) for factory in endpoint.factories] == [QuietHTTP11ClientFactory]
        assert isinstance(connection, client.HTTP11ClientProtocol)
    finally:
        transport.loseConnection()
    assert logs.factory_lines() == []


@pytest_twisted.ensureDeferred
async def test_default_pool_logs_factory_lines_through_an_agent(
    loopback: Loopback, pool: HTTPConnectionPool, logs: LogCapture
) -> None:
    """Without use_quiet_factory a real Agent request logs 'Starting factory', so the quiet check above is meaningful."""
    response = await Agent(reactor, pool=pool).request(b"GET", loopback.origin + b"/noisy")
    assert await readBody(response) == b"ok /noisy"
    assert any("Starting factory" in line for line in logs.factory_lines()), logs.texts


@pytest_twisted.ensureDeferred
async def test_quiet_pool_logs_no_factory_lines_through_an_agent(
    loopback: Loopback, pool: HTTPConnectionPool, logs: LogCapture
) -> None:
    """With use_quiet_factory the same real Agent request succeeds and logs no factory lines."""
    use_quiet_factory(pool)
    response = await Agent(reactor, pool=pool).request(b"GET", loopback.origin + b"/quiet")
    assert await readBody(response) == b"ok /quiet"
    assert logs.factory_lines() == []


# -- agent_endpoint  (Agent._getEndpoint)


@pytest.mark.parametrize("url", [b"http://example.com/", b"http://127.0.0.1:8080/x", b"https://example.com/", b"https://[::1]:8443/"])
def test_agent_endpoint_is_a_client_endpoint(url: bytes) -> None:
    """``Agent._getEndpoint(uri)`` returns an IStreamClientEndpoint for http and https URIs."""
    endpoint = agent_endpoint(Agent(reactor), URI.fromBytes(url))
    assert IStreamClientEndpoint.providedBy(endpoint)


def test_agent_endpoint_wraps_https_in_tls() -> None:
    """https URIs get a different (TLS-wrapping) endpoint than http URIs for the same host and port."""
    agent = Agent(reactor)
    plain = agent_endpoint(agent, URI.fromBytes(b"http://example.com:8443/"))
    tls = agent_endpoint(agent, URI.fromBytes(b"https://example.com:8443/"))
    assert type(plain) is not type(tls)


@pytest_twisted.ensureDeferred
async def test_agent_endpoint_connects_to_the_uris_host_and_port(loopback: Loopback, pool: HTTPConnectionPool) -> None:
    """The http endpoint really connects to the URI's host and port (here a loopback server)."""
    endpoint = agent_endpoint(Agent(reactor, pool=pool), URI.fromBytes(loopback.origin + b"/"))
    connection = await pool.getConnection(("endpoint", loopback.number), endpoint)
    transport = connection.transport
    assert transport is not None
    try:
        peer = transport.getPeer()
        assert isinstance(peer, IPv4Address) and (peer.host, peer.port) == ("127.0.0.1", loopback.number)
    finally:
        transport.loseConnection()


# -- agent_host_header  (Agent._computeHostValue)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"http://example.com/", b"example.com"),
        (b"http://example.com:80/", b"example.com"),
        (b"http://example.com:8080/", b"example.com:8080"),
        (b"http://[::1]:8080/", b"[::1]:8080"),
        (b"http://[::1]/", b"[::1]"),
        (b"https://example.com/", b"example.com"),
        (b"https://example.com:443/", b"example.com"),
        (b"https://example.com:8443/", b"example.com:8443"),
        (b"http://example.com:443/", b"example.com:443"),
    ],
)
def test_agent_host_header(url: bytes, expected: bytes) -> None:
    """``Agent._computeHostValue(scheme, host, port)`` omits default ports and brackets IPv6 hosts."""
    assert agent_host_header(Agent(reactor), URI.fromBytes(url)) == expected


# -- write_now  (FileDescriptor.dataBuffer/offset/_tempDataBuffer, tcp.Connection.socket)


class _Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest_twisted.ensureDeferred
async def test_write_now_sends_before_the_reactor_turns_and_keeps_order() -> None:
    """
    On an idle TCP transport the bytes leave at once (nothing is queued for
    the reactor); once something is queued, later bytes queue behind it.
    """
    sink = _Sink()
    factory = Factory.forProtocol(lambda: sink)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(Protocol))
        transport = client.transport
        assert type(transport) is tcp.Client
        assert (transport.dataBuffer, transport.offset, transport._tempDataBuffer) == (b"", 0, [])
        write_now(transport, b"one ")
        assert (transport.dataBuffer, transport._tempDataBuffer) == (b"", [])  # sent, not queued
        transport.write(b"two ")  # queued for the reactor, as Twisted does
        assert transport._tempDataBuffer == [b"two "]
        write_now(transport, b"three")  # must not overtake "two "
        assert transport._tempDataBuffer == [b"two ", b"three"]
        await eventually(lambda: sink.received == b"one two three", "the bytes in order")
        transport.loseConnection()
        write_now(transport, b"late")  # a closing transport: handed to Twisted, which drops or queues it as usual
    finally:
        await port.stopListening()


def test_write_now_hands_other_transports_to_their_own_write() -> None:
    """Anything but a plain TCP connection (TLS, a test transport) gets an ordinary ``write``."""
    transport = StringTransport()
    write_now(transport, b"abc")
    assert transport.value() == b"abc"


# -- accept_one_at_a_time  (tcp.Port.numberAccepts, Port.doRead)


def test_accept_one_at_a_time_takes_one_connection_per_readable_event() -> None:
    """Twisted's accept loop takes every queued connection at once; bounded, each doRead takes one."""
    import socket as socketlib

    built: list[object] = []

    class Counting(Factory):
        def buildProtocol(self, addr: object) -> Protocol:
            built.append(addr)
            return Protocol()

    for bounded, expected in ((False, 3), (True, 1)):
        built.clear()
        port = reactor.listenTCP(0, Counting(), interface="127.0.0.1")  # type: ignore[attr-defined]
        port.stopReading()  # the test calls doRead itself
        clients = [socketlib.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
        try:
            if bounded:
                assert accept_one_at_a_time(port) is True
            port.doRead()
            assert len(built) == expected
            if bounded:
                port.doRead()
                assert len(built) == 2 and port.numberAccepts == 1
        finally:
            for client in clients:
                client.close()
            port.connectionLost(None)
    assert accept_one_at_a_time(StringTransport()) is False


# -- BadRequestHook / channel_busy  (HTTPChannel._respondToBadRequestAndDisconnect, _handlingRequest)


class _Held(http.Request):
    """Records what ``requestReceived`` was given and answers nothing (the channel stays busy)."""

    got: list[tuple[bytes, bytes, bytes]] = []

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        type(self).got.append((command, path, version))


class _Hooked(compat.BadRequestHook, HTTPChannel):
    refused: list[bytes] = []

    def bad_request(self) -> None:
        type(self).refused.append(self.transport.value())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/2.0\r\n\r\n",  # the request line (only 1.0 and 1.1 have one)
    b"GET /x HTTP/1.1\r\nno colon here\r\n\r\n",  # a header line
    b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",  # two lengths
    b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a broken chunk
])
def test_bad_request_hook_gets_what_twisted_refuses(raw: bytes) -> None:
    """Every refusal of Twisted's parser goes through the hook, before anything was written, and nothing is served."""
    _Hooked.refused = []
    _Held.got = []
    channel = _Hooked()
    channel.requestFactory = _Held  # type: ignore[assignment]
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    assert _Hooked.refused == [b""]
    assert _Held.got == [] and transport.value() == b""


def test_channel_busy_from_a_whole_request_until_it_is_done() -> None:
    """``allContentReceived`` marks the channel busy and ``requestDone`` clears it; a pipelined request waits."""
    _Held.got = []
    channel = HTTPChannel()
    channel.requestFactory = _Held  # type: ignore[assignment]
    channel.makeConnection(StringTransport())
    assert channel_busy(channel) is False
    channel.dataReceived(b"BREW /pot?x=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert channel_busy(channel) is True
    assert _Held.got == [(b"BREW", b"/pot?x=1", b"HTTP/1.1")]  # the second waits for the first's answer
    channel.requestDone(channel.requests[0])
    assert _Held.got[-1] == (b"GET", b"/next", b"HTTP/1.1")
    assert channel_busy(channel) is True


def test_line_buffer_is_the_part_of_a_line_not_yet_ended() -> None:
    """LineReceiver keeps what follows the last delimiter between reads; ``line_buffer`` reads it."""
    from twisted.protocols.basic import LineReceiver

    lines: list[bytes] = []

    class Lines(LineReceiver):
        def lineReceived(self, line: bytes) -> None:
            lines.append(line)

    receiver = Lines()
    receiver.makeConnection(StringTransport())
    receiver.dataReceived(b"one\r\ntw")
    assert lines == [b"one"] and compat.line_buffer(receiver) == b"tw"
    receiver.dataReceived(b"o\r")
    assert compat.line_buffer(receiver) == b"two\r"
    receiver.dataReceived(b"\n")
    assert lines == [b"one", b"two"] and compat.line_buffer(receiver) == b""


# -- clear_exit_signal  (ReactorBase._exitSignal)


@pytest.fixture
def fresh_reactor() -> Iterator[SelectReactor]:
    """A real, never-run SelectReactor; its waker's file descriptors are closed afterwards."""
    fresh = SelectReactor()
    try:
        yield fresh
    finally:
        if fresh.waker is not None:
            fresh.removeReader(fresh.waker)
            fresh.waker.connectionLost(None)


def test_reactor_exit_signal_defaults_to_none(fresh_reactor: SelectReactor) -> None:
    """ReactorBase declares ``_exitSignal = None`` and real reactors support exit-signal capturing."""
    assert "_exitSignal" in vars(ReactorBase) and ReactorBase._exitSignal is None
    assert fresh_reactor._exitSignal is None
    assert _ISupportsExitSignalCapturing.providedBy(fresh_reactor)
    assert clear_exit_signal(fresh_reactor, {signal.SIGTERM, signal.SIGINT}) is False


@pytest.mark.parametrize(("handler", "number"), [("sigTerm", signal.SIGTERM), ("sigInt", signal.SIGINT)])
def test_signal_handlers_record_the_exit_signal(fresh_reactor: SelectReactor, handler: str, number: int) -> None:
    """``sigTerm``/``sigInt`` store the signal in ``_exitSignal``, which clear_exit_signal resets (returning True once)."""
    getattr(fresh_reactor, handler)(number, None)
    assert fresh_reactor._exitSignal == number
    assert clear_exit_signal(fresh_reactor, {signal.SIGTERM, signal.SIGINT}) is True
    assert fresh_reactor._exitSignal is None
    assert clear_exit_signal(fresh_reactor, {signal.SIGTERM, signal.SIGINT}) is False


def test_clear_exit_signal_leaves_other_signals(fresh_reactor: SelectReactor) -> None:
    """A recorded signal not in ``signals`` is left in ``_exitSignal`` and clear_exit_signal returns False."""
    fresh_reactor.sigInt(signal.SIGINT, None)
    assert clear_exit_signal(fresh_reactor, {signal.SIGTERM}) is False
    assert fresh_reactor._exitSignal == signal.SIGINT


class _NoSignalHandlersReactor(SelectReactor):
    """A real SelectReactor whose ``run()`` leaves the process's signal handlers (and pytest's reactor) alone."""

    def run(self, installSignalHandlers: bool = True) -> None:
        super().run(installSignalHandlers=False)


def _run_like_twistd(clear: bool) -> object:
    """Run a real reactor through twistd's ``ApplicationRunner.startReactor``, stopped by SIGTERM; the runner's exit signal."""
    runner = app.ApplicationRunner({"profile": None, "profiler": "cprofile", "debug": False, "nodaemon": True})
    running = _NoSignalHandlersReactor()
    try:
        if clear:  # as OllaService.stopService does, before shutdown
            running.addSystemEventTrigger("before", "shutdown", clear_exit_signal, running, {signal.SIGTERM, signal.SIGINT})
        running.callWhenRunning(running.sigTerm, signal.SIGTERM, None)
        guard = running.callLater(10, running.stop)  # never hang the suite if sigTerm stops stopping
        runner.startReactor(running, sys.stdout, sys.stderr)
        assert guard.active(), "sigTerm did not stop the reactor"
        guard.cancel()
    finally:
        if running.waker is not None:
            running.removeReader(running.waker)
            running.waker.connectionLost(None)
    exit_signal: object = runner._exitSignal
    return exit_signal


def test_twistd_re_raises_the_recorded_signal() -> None:
    """twistd's runner copies ``reactor._exitSignal`` after the reactor stops, so a SIGTERM stop is re-raised at exit."""
    assert _run_like_twistd(clear=False) == signal.SIGTERM


def test_twistd_exits_cleanly_once_the_signal_is_cleared() -> None:
    """Clearing ``_exitSignal`` during shutdown leaves twistd's runner with no signal to re-raise (exit status 0)."""
    assert _run_like_twistd(clear=True) is None


def test_put_header_is_set_raw_headers_for_safe_values() -> None:
    """put_header stores what setRawHeaders would, read back by every public accessor; unsafe values are sanitised."""
    from twisted.web.http_headers import Headers

    from olladmr._twisted_compat import put_header

    ours, theirs = Headers(), Headers()
    for name, value in ((b"x-olla-endpoint", b"gpu-1"), (b"content-length", b"12"), (b"x-olla-endpoint", b"gpu-2")):
        put_header(ours, name, value)
        theirs.setRawHeaders(name, [value])
    assert list(ours.getAllRawHeaders()) == list(theirs.getAllRawHeaders())
    assert ours.getRawHeaders(b"X-Olla-Endpoint") == [b"gpu-2"] and ours.hasHeader(b"content-length")
    assert ours == theirs
    put_header(ours, b"x-olla-model", b"evil\r\nset-cookie: a=b")
    theirs.setRawHeaders(b"x-olla-model", [b"evil\r\nset-cookie: a=b"])
    assert ours.getRawHeaders(b"x-olla-model") == theirs.getRawHeaders(b"x-olla-model")
    assert b"\r" not in ours.getRawHeaders(b"x-olla-model")[0] and b"\n" not in ours.getRawHeaders(b"x-olla-model")[0]
    for value in (b"a\0b", b"a\x0bb", b""):  # what setRawHeaders keeps, put_header keeps
        put_header(ours, b"x-odd", value)
        theirs.setRawHeaders(b"x-odd", [value])
        assert ours.getRawHeaders(b"x-odd") == theirs.getRawHeaders(b"x-odd")
