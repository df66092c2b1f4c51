"""
The HTTP server side: a ``Site`` whose requests know their id, their
arrival time and whether their body broke the size limit, and whose
channels (:mod:`olladmr.edge.channel`) enforce the request limits.

Bodies are still spooled by twisted.web (memory under 100 KB, a temporary
file above); past ``max_body_size`` nothing more is kept and the request is
answered 413.  The limits live in :class:`EdgeLimits`, which reloads
reconfigure; connections read them per request.
"""

from __future__ import annotations

import io
import os
from functools import partial
from itertools import count
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import IResource

from .._twisted_compat import put_header
from ..proxy.headers import ResponseHeaders, client_request_id
from ..sending import SendQueue
from .channel import EdgeLimits, OllaChannel, http_date
from .gate import CLOSED, Admission

log = Logger()


class AccessObserver(Protocol):
    """Told about every request olladmr answered itself (proxied ones are logged by their exchange)."""

    def local_request(self, request: OllaRequest, elapsed: float) -> None: ...


class OllaRequest(server.Request):
    """
    A request that carries ``request_id``, ``arrived``, ``body_too_large``,
    whether it was ``proxied``, and the gate's ``admission`` (recorded by
    the front door before any route runs; until then nothing is allowed).
    """

    request_id: str = "-"
    body_too_large = False
    proxied = False
    admission: Admission = CLOSED

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.responseHeaders = ResponseHeaders()
        site = getattr(channel, "site", None)
        self._olla_site: OllaSite | None = site if isinstance(site, OllaSite) else None
        self.arrived = self._olla_site.clock.seconds() if self._olla_site else 0.0
        self._body_seen = 0

    def resource_path(self) -> None:
        """Set ``prepath`` and ``postpath`` as Twisted's resource traversal starts them (for Klein)."""
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))

    def parseCookies(self) -> None:
        """Nothing: olladmr reads no cookies (Twisted parses them for every request)."""

    @property
    def body_limit(self) -> int:
        """``server.request_limits.max_body_size`` for this request."""
        return self._olla_site.limits.max_body_size if self._olla_site else 50 * 1024**2

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.body_limit:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self.body_limit:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        """413 at once: the rest of the body is never read into memory or disk."""
        self.body_too_large = True
        content = getattr(self, "content", None)
        if content is not None:
            content.close()
        self.content = io.BytesIO()
        reject = getattr(self.channel, "reject", None)
        if reject is not None:
            reject(
                413,
                "request_too_large",
                f"request body is larger than the limit of {self.body_limit} bytes (server.request_limits.max_body_size)",
            )

    def process(self) -> None:
        rid = client_request_id(self.requestHeaders)
        if rid is None and self._olla_site is not None:
            rid = self._olla_site.new_request_id()
        self.request_id = (rid or b"-").decode("ascii")
        site = self._olla_site
        root = site.resource if site is not None else None
        if site is None or not getattr(root, "isLeaf", False) or hasattr(root, "getEncoder") or self.path == b"*":
            self.responseHeaders.setRawHeaders(b"x-olla-request-id", [rid or b"-"])
            super().process()
            return
        # What twisted.web's Request.process does for a leaf root, less the work olladmr
        # undoes or never needs: no Server header (no version advertising), a Date
        # formatted once a second, no resource traversal (the path is split for the routes
        # that read it: resource_path), no encoder (the root has none).
        headers = self.responseHeaders
        put_header(headers, b"date", http_date(site.clock))
        put_header(headers, b"x-olla-request-id", rid or b"-")
        self.site = site
        self.prepath = []
        self.postpath = []  # (the root is a leaf; routes that need it, Klein's, call resource_path)
        self.sitepath: list[bytes] = []
        try:
            self.render(root)
        except BaseException:
            self.processingFailed(Failure())


class OllaSite(server.Site):
    """Serves the route tree; owns request ids and hands locally answered requests to the access log."""

    requestFactory = OllaRequest
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        limits: EdgeLimits,
        access_log: AccessObserver | None = None,
        sends: SendQueue | None = None,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=clock)
        self.clock = clock
        self.sends = sends if sends is not None else SendQueue(clock)
        self.limits = limits
        self._access_log = access_log
        self._prefix = os.urandom(4).hex()
        self._ids = count(1)
        # Each channel is built with this site's limits, clock, send queue and request ids (it never looks the
        # site up); Twisted's Site.buildProtocol then sets what it sets on every channel.  Plain HTTP/1.1: no
        # HTTP/2 negotiation wrapper, which HTTPFactory types ``protocol`` as.
        # (type: HTTPFactory declares ``protocol`` as the HTTP/2 wrapper's factory)
        self.protocol = partial(OllaChannel, limits, clock, self.sends, self.new_request_id)  # type: ignore[assignment]

    @property
    def timeOut(self) -> float | None:
        """The idle keep-alive timeout new connections get (``server.idle_timeout``; 0: none)."""
        return self.limits.idle_timeout or None

    @timeOut.setter
    def timeOut(self, value: float | None) -> None:
        pass  # set by HTTPFactory.__init__; the limits decide

    def new_request_id(self) -> bytes:
        """A process-unique id: a random boot prefix and a counter."""
        return f"{self._prefix}-{next(self._ids):x}".encode()

    def log(self, request: Any) -> None:
        """twisted.web's access log hook: olladmr's own event for requests it answered itself."""
        if self._access_log is not None and not getattr(request, "proxied", False):
            self._access_log.local_request(request, self.clock.seconds() - getattr(request, "arrived", 0.0))
