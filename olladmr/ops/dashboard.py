"""
The live dashboard's server side: ``/internal/ui/`` and its event stream.

The page itself (``olladmr/ui/``: HTML, CSS and JavaScript written for it,
nothing fetched from elsewhere) holds no data; everything it shows comes
from :class:`Dashboard`:

* a **snapshot** (service, endpoints, models, affinity, traffic), the same
  the status API reports, built at most once a second by a
  ``LoopingCall`` and pushed to every open event stream only when
  something in it changed;
* an **event log** of the last 50 operator events -- endpoint status
  changes, breaker trips and recoveries, reloads (with their one-line
  summary) and refused configurations -- pushed the moment they happen;
* a **traffic history**: requests and completion tokens per second over
  the last five minutes, for the page's charts.

Each open stream is a push producer registered on its request: while the
client's socket is full nothing more is written, only the newest snapshot
(and the events) are kept, and a client that leaves is forgotten.  Nothing
sent carries a secret: endpoint URLs cannot hold credentials (config), and
API or admin keys are never part of the state shown.
"""

from __future__ import annotations

import json
from collections import deque
from importlib import resources
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from .lifecycle import Lifecycle, ReloadResult
from .metrics import Metrics
from .status import StatusReport

log = Logger()

#: The page's files (in the ``olladmr.ui`` package) and their content types.
ASSETS = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}
#: What a browser may load from the page: its own files and its own API, nothing else.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}
EVENT_LOG_SIZE = 50
HISTORY_SECONDS = 300
KEEPALIVE_SECONDS = 15.0
MAX_STREAMS = 64


def load_assets() -> dict[str, bytes]:
    """The page's files, read once from the package."""
    folder = resources.files("olladmr") / "ui"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event: ``event: NAME`` and its data as one line of JSON."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data, separators=(",", ":")).encode())


class EventLog:
    """Owns the last :data:`EVENT_LOG_SIZE` operator events (oldest first in storage, newest first when read)."""

    def __init__(self, clock: IReactorTime, size: int = EVENT_LOG_SIZE) -> None:
        self._clock = clock
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._sequence = 0

    def add(self, kind: str, message: str, **details: Any) -> dict[str, Any]:
        """Record an event of ``kind`` (``status``, ``breaker``, ``reload``, ``config_error``); returns it."""
        self._sequence += 1
        event = {"id": self._sequence, "time": self._clock.seconds(), "kind": kind, "message": message, **details}
        self._events.append(event)
        return event

    def recent(self) -> list[dict[str, Any]]:
        """The events kept, newest first."""
        return list(reversed(self._events))

    def since(self, sequence: int) -> list[dict[str, Any]]:
        """The events kept whose id is above ``sequence``, oldest first."""
        return [event for event in self._events if event["id"] > sequence]

    @property
    def last_id(self) -> int:
        return self._sequence

    def reload_observed(self, result: ReloadResult) -> None:
        """A reload was applied (its one-line summary) or refused (the config error)."""
        if result.ok:
            self.add("reload", f"reloaded: {result.summary}", summary=result.summary)
        else:
            self.add("config_error", f"reload refused: {result.summary}", error=result.summary)


class TrafficHistory:
    """Owns requests and completion tokens per second, one sample a second, over the last five minutes."""

    def __init__(self, seconds: int = HISTORY_SECONDS) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=seconds)
        self._last: tuple[float, int, int] | None = None

    def sample(self, now: float, requests: int, tokens: int) -> None:
        """Add the rates since the previous sample, from the running totals ``requests`` and ``tokens``."""
        if self._last is not None:
            then, requests_then, tokens_then = self._last
            elapsed = now - then
            if elapsed > 0:
                self._samples.append(
                    (round(now, 3), round((requests - requests_then) / elapsed, 3), round((tokens - tokens_then) / elapsed, 3))
                )
        self._last = (now, requests, tokens)

    def samples(self) -> list[list[float]]:
        """``[time, requests/s, tokens/s]`` per sample, oldest first."""
        return [list(sample) for sample in self._samples]

    def latest(self) -> tuple[float, float]:
        """The newest (requests/s, tokens/s), or zeros."""
        return self._samples[-1][1:] if self._samples else (0.0, 0.0)


@implementer(IPushProducer)
class EventStream:
    """
    One open ``/internal/ui/events`` response: writes what the dashboard
    pushes; while the client's socket is full (paused), keeps only the
    newest snapshot and the events, and writes them on resume.
    """

    def __init__(self, request: Request, forget: Callable[[EventStream], None]) -> None:
        self._request = request
        self._forget = forget
        self._paused = False
        self._held_snapshot: bytes | None = None
        self._held_events: deque[bytes] = deque(maxlen=EVENT_LOG_SIZE)
        self.open = True
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)

    def send(self, chunk: bytes, *, snapshot: bool = False) -> None:
        if not self.open:
            return
        if self._paused:
            if snapshot:
                self._held_snapshot = chunk
            else:
                self._held_events.append(chunk)
            return
        self._request.write(chunk)

    def close(self) -> None:
        """End the stream (the daemon is stopping, or the dashboard was turned off)."""
        if self.open:
            self.open = False
            self._request.unregisterProducer()
            self._request.finish()

    def _finished(self, _: object) -> None:
        if self.open:
            self.open = False
            self._request.unregisterProducer()
        self._forget(self)

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        held = [*self._held_events, *([self._held_snapshot] if self._held_snapshot is not None else [])]
        self._held_events.clear()
        self._held_snapshot = None
        for chunk in held:
            self.send(chunk)

    def stopProducing(self) -> None:
        self.open = False


class Dashboard(Service):
    """
    Owns the dashboard's state: the event log, the traffic history, the
    last snapshot sent and the open event streams, refreshed by a
    once-a-second sampler on the injected clock.
    """

    name = "dashboard"

    def __init__(
        self,
        clock: IReactorTime,
        lifecycle: Lifecycle,
        *,
        status: StatusReport,
        metrics: Metrics,
        events: EventLog,
        sticky: Callable[[], dict[str, Any]],
        assets: dict[str, bytes] | None = None,
    ) -> None:
        self._clock = clock
        self._lifecycle = lifecycle
        self._status = status
        self._metrics = metrics
        self._sticky = sticky
        self.assets = assets if assets is not None else load_assets()
        self.events = events
        self._pushed = events.last_id  # the newest event already sent to the open streams
        self.traffic = TrafficHistory()
        self._streams: set[EventStream] = set()
        self._seen: dict[str, tuple[str, str, str]] = {}  # endpoint -> (status, reason, breaker) at the last tick
        self._last_change: str | None = None
        self._last_write = clock.seconds()  # when the open streams were last written to (keep-alives between)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    # -- service

    def startService(self) -> None:
        super().startService()
        self._loop.start(1.0, now=True).addErrback(self._loop_failed)

    def _loop_failed(self, failure: Failure) -> None:
        log.failure("the dashboard's sampler stopped", failure)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.close_streams()

    def close_streams(self) -> None:
        """End every open event stream (the daemon stops, or the dashboard was turned off)."""
        for stream in list(self._streams):
            stream.close()

    @property
    def enabled(self) -> bool:
        """``server.admin.dashboard`` in the configuration in force (a reload may turn it off)."""
        return self._lifecycle.config.server.dashboard

    # -- what it shows

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows but the event log, as of now."""
        return {
            "time": self._clock.seconds(),
            "service": self._status.service(),
            "endpoints": self._status.endpoints()["endpoints"],
            "models": self._status.models()["models"],
            "sticky": self._sticky(),
            "traffic": {"interval_s": 1, "samples": self.traffic.samples()},
        }

    def tick(self) -> None:
        """Once a second: sample traffic, log status and breaker changes, push new events and a changed snapshot."""
        now = self._clock.seconds()
        if self._streams and not self.enabled:  # turned off by a reload: the open streams end
            self.close_streams()
        self.traffic.sample(now, self._metrics.total, self._metrics.completion_tokens_total)
        if not self._streams:  # nobody watching: keep the event log, build no snapshot
            self._note_changes(self._status.endpoints()["endpoints"])
            self._pushed = self.events.last_id
            return
        snapshot = self.snapshot()
        self._note_changes(snapshot["endpoints"])
        for event in self.events.since(self._pushed):
            self._broadcast(sse("event", event))
        self._pushed = self.events.last_id
        change = self._fingerprint(snapshot)
        if change != self._last_change:
            self._last_change = change
            self._last_write = now
            self._broadcast(sse("snapshot", snapshot), snapshot=True)
        elif now - self._last_write >= KEEPALIVE_SECONDS:
            self._last_write = now
            self._broadcast(b": keep-alive\n\n")

    def _fingerprint(self, snapshot: dict[str, Any]) -> str:
        """The snapshot without what moves by itself (clock, uptime, chart history), plus the current rates."""
        service = {k: v for k, v in snapshot["service"].items() if k != "uptime_s"}
        rest = {k: v for k, v in snapshot.items() if k not in ("time", "service", "traffic")}
        return json.dumps([service, rest, self.traffic.latest()], sort_keys=True, default=str)

    def _note_changes(self, endpoints: list[dict[str, Any]]) -> None:
        seen: dict[str, tuple[str, str, str]] = {}
        for ep in endpoints:
            name = ep["name"]
            now = (ep["status"], ep.get("status_reason") or "", ep["breaker"])
            seen[name] = now
            before = self._seen.get(name)
            if before is None or before == now:
                if before is None and self._seen:
                    self.events.add("status", f"{name}: added ({now[0]})", endpoint=name, status=now[0])
                continue
            if before[0] != now[0]:
                reason = f" ({now[1]})" if now[1] else ""
                self.events.add(
                    "status", f"{name}: {before[0]} → {now[0]}{reason}", endpoint=name, status=now[0], previous=before[0]
                )
            if before[2] != now[2]:
                self.events.add(
                    "breaker", f"{name}: breaker {before[2]} → {now[2]}", endpoint=name, breaker=now[2],
                    previous=before[2],
                )
        for name in self._seen.keys() - seen.keys():
            self.events.add("status", f"{name}: removed", endpoint=name, status="removed")
        self._seen = seen

    # -- streams

    def subscribe(self, request: Request) -> EventStream | None:
        """Open an event stream on ``request`` (the snapshot and the event log first); ``None`` if too many are open."""
        if len(self._streams) >= MAX_STREAMS:
            return None
        stream = EventStream(request, self._streams.discard)
        self._streams.add(stream)
        self._last_write = self._clock.seconds()
        snapshot = self.snapshot()
        self._last_change = self._fingerprint(snapshot)  # what this stream starts with: the next tick sends only news
        stream.send(b"retry: 2000\n\n")
        stream.send(sse("snapshot", snapshot), snapshot=True)
        stream.send(sse("events", self.events.recent()))
        return stream

    @property
    def streams(self) -> int:
        return len(self._streams)

    def _broadcast(self, chunk: bytes, *, snapshot: bool = False) -> None:
        for stream in list(self._streams):
            stream.send(chunk, snapshot=snapshot)
