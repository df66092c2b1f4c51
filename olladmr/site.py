"""
The HTTP server side: a ``Site`` whose requests know their id, their
arrival time and whether their body broke the size limit.

Bodies are still spooled by twisted.web (memory under 100 KB, a temporary
file above); past ``max_body_size`` nothing more is kept and the request is
answered 413.
"""

from __future__ import annotations

import io
import os
from itertools import count
from typing import Any

from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web import server
from twisted.web.resource import IResource

from .headers import client_request_id


class OllaRequest(server.Request):
    """A request that carries ``request_id``, ``arrived`` and ``body_too_large``."""

    request_id: str = ""
    body_too_large = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        self._olla_site: OllaSite | None = site if isinstance(site, OllaSite) else None
        self.arrived = self._olla_site.clock.seconds() if self._olla_site else 0.0
        self._body_seen = 0

    def _limit(self) -> int:
        return self._olla_site.max_body_size if self._olla_site else 50 * 1024**2

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self._limit():
            self.body_too_large = True
            self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        rid = client_request_id(self.requestHeaders)
        if rid is None and self._olla_site is not None:
            rid = self._olla_site.new_request_id()
        self.request_id = (rid or b"-").decode("ascii")
        self.site = self.channel.site
        # Like server.Request.process, minus the Server header (no version advertising).
        headers = self.responseHeaders
        headers.setRawHeaders(b"date", [datetimeToString()])
        headers.setRawHeaders(b"x-olla-request-id", [rid or b"-"])
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        try:
            self.render(self.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())


class OllaSite(server.Site):
    """Serves the route tree; owns request ids and the body size limit."""

    requestFactory = OllaRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: IResource, clock: IReactorTime, max_body_size: int) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False)
        self.clock = clock
        self.max_body_size = max_body_size
        self._prefix = os.urandom(4).hex()
        self._ids = count(1)

    def new_request_id(self) -> bytes:
        """A process-unique id: a random boot prefix and a counter."""
        return f"{self._prefix}-{next(self._ids):x}".encode()

    access_log: Any = None  # an AccessLog; proxied requests are logged by their exchange

    def log(self, request: Any) -> None:
        """twisted.web's access log hook: olladmr's own event for requests it answered itself."""
        if self.access_log is not None and not getattr(request, "proxied", False):
            self.access_log.local_request(request, self.clock.seconds() - getattr(request, "arrived", 0.0))
