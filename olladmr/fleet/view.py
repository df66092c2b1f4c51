"""
The fleet's read-only management view: what DMR's own tools read
(``docker model ls/ps/df/status/version``, an Ollama app's model list),
answered for the whole fleet as if it were one DMR.

:class:`FleetView` asks every routable endpoint the same ``GET`` at once
(each within its ``check_timeout``), keeps the JSON answers with status
200 and merges them in DMR's own shape: a model held by several endpoints
appears once.  Where DMR's shape is a JSON object its clients decode into
a struct (Go's ``encoding/json`` and the ``ollama`` client's pydantic
models ignore members they do not know), the merged entry gains an
``endpoints`` list naming the endpoints that hold it; ``/engines/status``
is a map of strings, so it gains nothing.  An endpoint that fails or
answers anything else is left out (and logged), never an error for the
client, unless no endpoint answered at all.

These answers are small documents olladmr builds itself, so they are
read whole (bounded by the health client's limit), unlike proxied bodies.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Sequence, cast
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from .health import parse_json
from .models import normalise_model
from .state import EndpointState, Fleet

log = Logger()

#: ``GET path`` on an endpoint: (status, body); raises on a transport failure or timeout.
Fetch = Callable[[EndpointState, str], Awaitable[tuple[int, bytes]]]
#: The zero time Go writes for "never" (DMR's ``last_used`` while in use, ``expires_at`` while busy).
ZERO_TIME = "0001-01-01T00:00:00Z"


class NoAnswer(Exception):
    """No routable endpoint answered the management read."""

    def __init__(self, path: str, tried: Sequence[str], detail: str) -> None:
        super().__init__(f"no DMR endpoint answered GET {path} ({detail}; tried: {', '.join(tried) or 'none'})")
        self.path = path
        self.tried = list(tried)


class FleetView:
    """Owns the fleet-wide management reads: fanning a ``GET`` out to the routable endpoints and merging the answers."""

    def __init__(self, fleet: Fleet, fetch: Fetch) -> None:
        self._fleet = fleet
        self._fetch = fetch

    async def gather(self, path: str) -> list[tuple[EndpointState, int, Any]]:
        """``GET path`` on every routable endpoint at once: (endpoint, status, JSON or None) for each that answered."""
        endpoints = [ep for ep in self._fleet if ep.routable]
        if not endpoints:
            raise NoAnswer(path, [], "no endpoint is routable")
        calls = [Deferred.fromCoroutine(self._one(ep, path)) for ep in endpoints]
        results = await DeferredList(calls, consumeErrors=True)
        out: list[tuple[EndpointState, int, Any]] = []
        errors: list[str] = []
        for ep, (ok, value) in zip(endpoints, results):
            if ok:
                status, body = value
                out.append((ep, status, parse_json(body)))
            else:
                message = cast(Failure, value).getErrorMessage()
                errors.append(f"{ep.name}: {message}")
                log.info("management read {path} on {endpoint} failed: {error}", path=path, endpoint=ep.name,
                         error=message)
        if not out:
            raise NoAnswer(path, [ep.name for ep in endpoints], "; ".join(errors))
        return out

    async def _one(self, ep: EndpointState, path: str) -> tuple[int, bytes]:
        return await self._fetch(ep, path)

    async def _documents(self, path: str, kind: type) -> list[tuple[EndpointState, Any]]:
        answers = await self.gather(path)
        found = [(ep, doc) for ep, status, doc in answers if status == 200 and isinstance(doc, kind)]
        if not found:
            detail = ", ".join(f"{ep.name}: HTTP {status}" for ep, status, _ in answers)
            raise NoAnswer(path, [ep.name for ep, _, _ in answers], f"no usable answer ({detail})")
        return found

    # -- DMR's Ollama API

    async def ollama_tags(self) -> dict[str, Any]:
        """``GET /api/tags``: one entry per model tag, with the endpoints that list it."""
        merged: dict[str, dict[str, Any]] = {}
        for ep, doc in await self._documents("/api/tags", dict):
            for entry in _entries(doc.get("models")):
                _merge(merged, str(entry.get("name") or entry.get("model") or ""), entry, ep)
        return {"models": list(merged.values())}

    async def ollama_ps(self) -> dict[str, Any]:
        """``GET /api/ps``: one entry per loaded model tag, with the endpoints holding it (the latest ``expires_at``)."""
        merged: dict[str, dict[str, Any]] = {}
        for ep, doc in await self._documents("/api/ps", dict):
            for entry in _entries(doc.get("models")):
                name = str(entry.get("name") or entry.get("model") or "")
                kept = _merge(merged, name, entry, ep)
                if kept is not None:
                    expires = entry.get("expires_at")
                    if isinstance(expires, str) and _later(expires, kept.get("expires_at")):
                        kept["expires_at"] = expires
        return {"models": list(merged.values())}

    # -- DMR's management API (what the docker model CLI reads)

    async def models(self) -> list[dict[str, Any]]:
        """``GET /models``: one object per model ID, its tags the union of every endpoint's."""
        merged: dict[str, dict[str, Any]] = {}
        for ep, doc in await self._documents("/models", list):
            for entry in _entries(doc):
                kept = _merge(merged, str(entry.get("id") or ""), entry, ep)
                if kept is not None:
                    tags = kept.setdefault("tags", [])
                    for tag in entry.get("tags") or []:
                        if tag not in tags:
                            tags.append(tag)
        return list(merged.values())

    async def model(self, name: str) -> dict[str, Any] | None:
        """``GET /models/{name}``: the model as the first endpoint that has it describes it, or ``None``."""
        answers = await self.gather("/models/" + quote(name, safe="/:@"))
        found: dict[str, Any] | None = None
        holders: list[str] = []
        for ep, status, doc in answers:
            if status == 200 and isinstance(doc, dict):
                holders.append(ep.name)
                if found is None:
                    found = dict(doc)
        if found is not None:
            found["endpoints"] = holders
        return found

    async def engines_ps(self) -> list[dict[str, Any]]:
        """``GET /engines/ps``: one entry per (backend, model, mode), with the endpoints running it."""
        merged: dict[str, dict[str, Any]] = {}
        for ep, doc in await self._documents("/engines/ps", list):
            for entry in _entries(doc):
                model = str(entry.get("model_name") or "")
                key = f"{entry.get('backend_name')}\0{normalise_model(model) if model else ''}\0{entry.get('mode')}"
                kept = _merge(merged, key, entry, ep)
                if kept is not None:
                    for flag in ("in_use", "loading"):
                        if entry.get(flag):
                            kept[flag] = True
                    if entry.get("in_use") or entry.get("loading"):
                        kept["last_used"] = ZERO_TIME
                    elif _later(str(entry.get("last_used") or ""), kept.get("last_used")):
                        kept["last_used"] = entry["last_used"]
        return list(merged.values())

    async def engines_df(self) -> dict[str, Any]:
        """``GET /engines/df``: the fleet's disk use (the sum), with each endpoint's figures under ``endpoints``."""
        total: dict[str, Any] = {"models_disk_usage": 0, "default_backend_disk_usage": 0}
        each: dict[str, Any] = {}
        for ep, doc in await self._documents("/engines/df", dict):
            for key in ("models_disk_usage", "default_backend_disk_usage"):
                value = doc.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] += value
            each[ep.name] = doc
        total["endpoints"] = each
        return total

    async def engines_status(self) -> dict[str, str]:
        """
        ``GET /engines/status``: per backend, the status every endpoint
        agrees on, else the best one (``Running: ...``) and how many
        endpoints have it (the shape is a map of strings).
        """
        seen: dict[str, list[str]] = {}
        found = await self._documents("/engines/status", dict)
        for _, doc in found:
            for backend, value in doc.items():
                if isinstance(value, str):
                    seen.setdefault(str(backend), []).append(value)
        out: dict[str, str] = {}
        for backend, values in seen.items():
            if len(set(values)) == 1 and len(values) == len(found):
                out[backend] = values[0]
                continue
            running = [v for v in values if v.startswith("Running")]
            best = max(set(running or values), key=(running or values).count)
            out[backend] = f"{best} (on {values.count(best)} of {len(found)} endpoints)"
        return out

    async def version(self, own: str, path: str = "/version") -> dict[str, Any]:
        """``GET /version`` (or ``/api/version``): the endpoints' version (the most common), olladmr's and each one's."""
        each: dict[str, str] = {}
        for ep, doc in await self._documents(path, dict):
            value = doc.get("version")
            if isinstance(value, str):
                each[ep.name] = value
        versions = list(each.values())
        common = max(set(versions), key=versions.count) if versions else ""
        return {"version": common, "olladmr": own, "endpoints": each}


def _entries(value: Any) -> list[dict[str, Any]]:
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []


def _merge(merged: dict[str, dict[str, Any]], key: str, entry: dict[str, Any], ep: EndpointState
           ) -> dict[str, Any] | None:
    """
    Keep the first ``entry`` seen under ``key`` (a copy, with ``endpoints``)
    and return ``None``; for a later one, add ``ep`` to the entry kept and
    return that entry (for the caller to merge the rest into).
    """
    kept = merged.get(key)
    if kept is None:
        merged[key] = {**entry, "endpoints": [ep.name]}
        return None
    if ep.name not in kept["endpoints"]:
        kept["endpoints"].append(ep.name)
    return kept


def _later(value: str, than: Any) -> bool:
    """Whether RFC 3339 time ``value`` is later than ``than`` (Go's zero time is earliest; same format compares as text)."""
    if not isinstance(than, str) or than.startswith("0001-"):
        return not value.startswith("0001-")
    return value > than
