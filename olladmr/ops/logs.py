"""
Log output: ``twisted.logger`` events rendered as text or JSON lines,
filtered by level.  Level and format can change at runtime (reload).

The daemon's service declares this observer to the twistd application
(see :func:`install_on`), so ``twistd -n olladmr`` uses it without any
``--logger`` flag; an explicit ``--logger`` still wins.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

from ..config.schema import Config
from ..proxy.record import ExchangeRecord

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


@implementer(ILogObserver)
class SwitchableOutput:
    """Writes events to a stream as classic text or as one JSON object per line."""

    def __init__(self, stream: IO[str], fmt: str = "text") -> None:
        self.stream = stream
        self.format = fmt

    def __call__(self, event: dict[str, Any]) -> None:
        text: str | None
        if self.format == "json":
            text = eventAsJSON(event) + "\n"
        else:
            text = formatEventAsClassicLogText(event)
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


class LogControl:
    """Owns the process's log observer: its level predicate and output format."""

    def __init__(self, level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        self.output = SwitchableOutput(stream or sys.stdout, fmt)
        self.observer = FilteringLogObserver(self.output, [self.predicate])
        self.level = level

    def reconfigure(self, config: Config) -> None:
        """Adopt the reloaded ``logging`` section."""
        self.level = config.logging.level
        self.predicate.setLogLevelForNamespace("", LEVELS[config.logging.level])
        self.output.format = config.logging.format


def install_on(application: Any, control: LogControl) -> None:
    """Make ``control``'s observer the application's, unless one is set already."""
    getter = getattr(application, "getComponent", None)
    if getter is None or getter(ILogObserver, None) is not None:
        return
    application.setComponent(ILogObserver, control.observer)


def access_fields(record: ExchangeRecord) -> dict[str, Any]:
    """The access-log fields of one proxied request."""
    ttfb = record.ttfb
    usage = record.usage or {}
    return {
        "request_id": record.request_id,
        "client": record.client,
        "method": record.method,
        "path": record.path,
        "model": record.model,
        "endpoint": record.endpoint,
        "status": record.status,
        "bytes": record.bytes_sent,
        "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 2),
        "total_ms": round((record.ended - record.arrived) * 1000, 2),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "attempts": record.attempts,
        "failovers": record.failovers,
        "outcome": record.outcome,
        "error": record.error,
    }


_FORMATS: dict[tuple[bool, ...], str] = {}  # access_format's results by which fields are present (at most 256)


def access_format(fields: dict[str, Any]) -> str:
    """
    The text line's format for ``fields``: a field without a value is left
    out (never ``None``), every duration carries its unit.  The event keeps
    every field, so the JSON format shows the missing ones as ``null``.
    """
    present = (
        fields["model"] is not None,
        fields["endpoint"] is not None,
        bool(fields["status"]),
        fields["ttfb_ms"] is not None,
        fields["prompt_tokens"] is not None,
        fields["completion_tokens"] is not None,
        bool(fields["failovers"]),
        fields["error"] is not None,
    )
    cached = _FORMATS.get(present)
    if cached is not None:
        return cached
    model, endpoint, status, ttfb, prompt, completion, failovers, error = present
    parts = ["{request_id} {client} {method} {path}"]
    if model:
        parts.append("model={model}")
    if endpoint:
        parts.append("endpoint={endpoint}")
    parts.append("-> {status}" if status else "-> no response")
    parts.append("{bytes}B")
    if ttfb:
        parts.append("ttfb={ttfb_ms}ms")
    parts.append("total={total_ms}ms")
    if prompt and completion:
        parts.append("tokens={prompt_tokens}/{completion_tokens}")
    elif prompt:
        parts.append("prompt_tokens={prompt_tokens}")
    elif completion:
        parts.append("completion_tokens={completion_tokens}")
    if failovers:
        parts.append("failovers={failovers}")
    parts.append("{outcome}")
    if error:
        parts.append('error="{error}"')
    text = _FORMATS[present] = " ".join(parts)
    return text


class AccessLog:
    """Emits one ``olladmr.access`` event per request, with its fields as event keys."""

    def __init__(self, control: LogControl | None = None) -> None:
        self.log = Logger(namespace="olladmr.access")
        self._control = control

    @property
    def enabled(self) -> bool:
        """False when the level filters info events out: then none is even built."""
        return self._control is None or self._control.level == "debug" or self._control.level == "info"

    def exchange_done(self, record: ExchangeRecord) -> None:
        """A proxied request ended (completed, failed or abandoned)."""
        if not self.enabled:
            return
        fields = access_fields(record)
        self.log.info(access_format(fields), **fields)

    def local_request(self, request: Any, elapsed: float) -> None:
        """A request olladmr answered itself (errors, status, models list)."""
        if not self.enabled:
            return
        client = request.getClientAddress()
        self.log.info(
            "{request_id} {client} {method} {path} -> {status} {bytes}B total={total_ms}ms {outcome}",
            request_id=request.request_id,
            client=getattr(client, "host", "") or "",
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            total_ms=round(elapsed * 1000, 2),
            outcome="ok" if request.code < 400 else "rejected",
        )
