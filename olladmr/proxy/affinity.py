"""
Response affinity for the Responses API: every request about a stored
response goes to the endpoint that holds it.

:class:`ResponseAffinity` answers "which endpoint holds ``resp_...``?"
from the local :class:`~olladmr.fleet.responses.ResponseDirectory`, and
when this instance does not know (another olladmr served the create, or
this one restarted) by asking the candidate endpoints in parallel
``GET /engines/v1/responses/{id}``: the one that answers 200 holds it.
Probes are bounded in time (``timeout``) and in number (at most
``max_probes`` in flight across all requests; a probe for an id already
being located joins that one), and counted in the metrics.  So several
olladmr instances behind any L4 balancer serve one conversation
correctly, with no shared store.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ..bodies import read_body
from ..config.schema import Config
from ..fleet.responses import ResponseDirectory
from ..fleet.state import EndpointState
from .upstream import USER_AGENT, UpstreamClient

log = Logger()

#: What a response id may look like before olladmr puts it in a probe URL.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
PROBE_PATH = "/engines/v1/responses/"

FOUND = "found"
MISSING = "missing"
FAILED = "failed"


class ResponseAffinity:
    """Owns the response directory's use and the owner probes (their bound, their coalescing, their counts)."""

    def __init__(
        self,
        directory: ResponseDirectory,
        client: UpstreamClient,
        clock: IReactorTime,
        *,
        timeout: float = 2.0,
        max_probes: int = 32,
        observe_probe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.directory = directory
        self._client = client
        self._clock = clock
        self.timeout = timeout
        self._slots = DeferredSemaphore(max(1, max_probes))
        self._observe = observe_probe
        self._locating: dict[str, list[Deferred[EndpointState | None]]] = {}

    def reconfigure(self, config: Config) -> None:
        """Adopt reloaded probe settings (probes under way keep theirs)."""
        settings = config.proxy.response_affinity
        self.timeout = settings.probe_timeout
        if settings.max_concurrent_probes != self._slots.limit:
            self._slots = DeferredSemaphore(settings.max_concurrent_probes)

    # -- the directory

    def owner(self, response_id: str) -> str | None:
        """The endpoint name this instance knows holds ``response_id``."""
        return self.directory.owner(response_id)

    def remember(self, response_id: str, endpoint: str) -> None:
        """``endpoint`` just created ``response_id``."""
        self.directory.remember(response_id, endpoint)

    def forget(self, response_id: str) -> None:
        """``response_id`` was deleted."""
        self.directory.forget(response_id)

    # -- locating

    def locate(self, response_id: str, candidates: Sequence[EndpointState]) -> Deferred[EndpointState | None]:
        """
        Ask ``candidates`` who holds ``response_id``; fires with that endpoint
        (remembered from now on) or ``None``.  Never fails; cancelling it only
        stops waiting (the probes finish on their own, bounded by ``timeout``).
        """
        waiter: Deferred[EndpointState | None] = Deferred(lambda d: self._drop_waiter(response_id, d))
        waiting = self._locating.get(response_id)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._locating[response_id] = [waiter]
        started = self._clock.seconds()
        Deferred.fromCoroutine(self._probe_all(response_id, list(candidates))).addCallbacks(
            lambda found: self._located(response_id, found, started),
            lambda failure: self._located(response_id, None, started, failure),
        )
        return waiter

    def _drop_waiter(self, response_id: str, waiter: Deferred[EndpointState | None]) -> None:
        waiting = self._locating.get(response_id)
        if waiting is not None and waiter in waiting:
            waiting.remove(waiter)

    def _located(
        self, response_id: str, found: EndpointState | None, started: float, failure: Failure | None = None
    ) -> None:
        if failure is not None:
            log.failure("locating {response_id} failed", failure, response_id=response_id)
        if found is not None:
            self.directory.remember(response_id, found.name)
        if self._observe is not None:
            self._observe(FOUND if found is not None else (FAILED if failure is not None else MISSING),
                          self._clock.seconds() - started)
        for waiter in self._locating.pop(response_id, []):
            if not waiter.called:
                waiter.callback(found)

    async def _probe_all(self, response_id: str, candidates: list[EndpointState]) -> EndpointState | None:
        if not candidates or not RESPONSE_ID.fullmatch(response_id):
            return None
        answer: Deferred[EndpointState | None] = Deferred()
        pending = len(candidates)

        def one_done(holds: bool, endpoint: EndpointState) -> None:
            nonlocal pending
            pending -= 1
            if answer.called:
                return
            if holds:
                answer.callback(endpoint)
            elif pending == 0:
                answer.callback(None)

        def one_failed(failure: Failure, endpoint: EndpointState) -> None:
            log.failure("probing {endpoint} for {response_id} failed", failure, endpoint=endpoint.name,
                        response_id=response_id)
            one_done(False, endpoint)

        for endpoint in candidates:
            self._slots.run(self._probe, response_id, endpoint).addCallbacks(
                one_done, one_failed, callbackArgs=(endpoint,), errbackArgs=(endpoint,)
            )
        return await answer

    def _probe(self, response_id: str, endpoint: EndpointState) -> Deferred[bool]:
        """``GET .../responses/{id}`` on ``endpoint``: whether it answers 200 (never fails)."""
        if self._locating.get(response_id) is None:
            return succeed(False)  # found (or given up) while this probe waited for a slot
        config = endpoint.config
        own = {name.lower() for name, _ in config.encoded_headers}
        headers = [(n, v) for n, v in ((b"user-agent", USER_AGENT), (b"accept", b"application/json")) if n not in own]
        headers += [(name.lower(), value) for name, value in config.encoded_headers]
        url = (config.url + PROBE_PATH + response_id).encode()
        d = self._client.request(endpoint.name, b"GET", url, headers, None, header_timeout=self.timeout)

        def answered(response: IResponse) -> Deferred[bool]:
            body = read_body(response, 1024 * 1024)
            body.addTimeout(self.timeout, self._clock)
            return body.addCallbacks(lambda _: response.code == 200, lambda _: response.code == 200)

        return d.addCallbacks(answered, lambda _: False)
