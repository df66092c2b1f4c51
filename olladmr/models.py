"""
Model names the way DMR reads them, and the fleet-wide model catalogue.

DMR treats ``smollm2``, ``ai/smollm2``, ``ai/smollm2:latest``,
``docker.io/ai/smollm2`` and ``AI/SmolLM2`` as one model: the name is
case-insensitive, the default namespace is ``ai`` and the default tag is
``latest`` (the tag itself stays case-sensitive).  We normalise the same way
for routing only; the body sent upstream is never rewritten.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_HEX_ID = re.compile(r"^(sha256:)?([0-9a-f]{12}|[0-9a-f]{64})$")
_REGISTRY_ALIASES = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")


def _has_registry(name: str) -> bool:
    """Whether the first path segment names a registry (``host.tld/``, ``host:port/``, ``localhost/``)."""
    first, slash, _ = name.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


@lru_cache(maxsize=4096)
def normalise_model(name: str) -> str:
    """The canonical routing key of a model reference (``ai/smollm2:latest``); memoised, bounded."""
    text = name.strip()
    if _HEX_ID.match(text):
        return text
    if text.lower().startswith("hf.co/"):
        text = "huggingface.co/" + text[len("hf.co/") :]
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        base, tag = text[:colon], text[colon + 1 :]
    else:
        base, tag = text, ""
    base = base.lower()
    for prefix in _REGISTRY_ALIASES:
        if base.startswith(prefix):
            base = base[len(prefix) :]
            if _has_registry(base):
                # a Docker Hub repository named like a registry ("docker.io/hf.co/x"):
                # keep the Hub prefix, or the key would not normalise to itself
                base = "docker.io/" + base
            break
    if "/" not in base:
        base = "ai/" + base
    return f"{base}:{tag or 'latest'}"


def model_ids(document: object) -> list[dict[str, object]] | None:
    """
    The model objects of an OpenAI model list (``{"object":"list","data":[...]}``),
    or ``None`` when the document is not such a list.  Entries without a
    string ``id`` are dropped.
    """
    if not isinstance(document, dict):
        return None
    data = document.get("data")
    if not isinstance(data, list):
        return None
    return [item for item in data if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]]


class Catalogue:
    """The fleet-wide model view: the union list and the per-model endpoint map."""

    def __init__(self, fleet: Any) -> None:
        self.fleet = fleet

    def openai_list(self) -> list[dict[str, object]]:
        """Every model of a routable endpoint, once, as the first endpoint listed it."""
        seen: dict[str, dict[str, object]] = {}
        for ep in self.fleet:
            if not ep.routable:
                continue
            for model in ep.models:
                seen.setdefault(normalise_model(str(model["id"])), model)
        return list(seen.values())

    def olla_list(self, include_unavailable: bool = False) -> dict[str, object]:
        """``/olla/models``: each model with the endpoints that have it and their status."""
        by_key: dict[str, dict[str, Any]] = {}
        for ep in self.fleet:
            for model in ep.models:
                key = normalise_model(str(model["id"]))
                entry = by_key.setdefault(
                    key, {"id": model["id"], "key": key, "object": "model", "endpoints": [], "available": False}
                )
                entry["endpoints"].append(
                    {"name": ep.name, "status": ep.status, "routable": ep.routable, "id": model["id"]}
                )
                entry["available"] = entry["available"] or ep.routable
        data = [e for e in by_key.values() if include_unavailable or e["available"]]
        data.sort(key=lambda e: e["key"])
        return {"object": "list", "data": data, "total": len(data)}
