"""
The fleet-wide model view: the union model list and, per model, the
endpoints that list it (``/engines/v1/models``, ``/olla/models``,
``/olla/anthropic/v1/models``), with the configured aliases listed as
models of their own.
"""

from __future__ import annotations

import datetime
from typing import Any

from .aliases import Aliases
from .models import normalise_model
from .state import Fleet


class Catalogue:
    """Reads the fleet's model lists and the alias table into the catalogue views; owns nothing."""

    def __init__(self, fleet: Fleet, aliases: Aliases) -> None:
        self.fleet = fleet
        self.aliases = aliases

    def openai_list(self) -> list[dict[str, object]]:
        """
        Every model of a routable endpoint, once, as the first endpoint listed
        it; then every alias one of whose models is served, with the
        ``owned_by`` (and ``created``) of its first served model.
        """
        seen: dict[str, dict[str, object]] = {}
        for ep in self.fleet:
            if not ep.routable:
                continue
            for model in ep.models:
                seen.setdefault(normalise_model(str(model["id"])), model)
        for alias in self.aliases:
            first = next((seen[key] for key in alias.keys if key in seen), None)
            if first is not None and normalise_model(alias.name) not in seen:
                seen[normalise_model(alias.name)] = {
                    "id": alias.name,
                    "object": "model",
                    "created": first.get("created", 0),
                    "owned_by": first.get("owned_by", "docker"),
                }
        return list(seen.values())

    def anthropic_list(self) -> dict[str, Any]:
        """``/olla/anthropic/v1/models``: the same models in Anthropic's list shape."""
        data = []
        for model in self.openai_list():
            created = model.get("created")
            stamp = created if isinstance(created, (int, float)) and created > 0 else 0
            data.append(
                {
                    "type": "model",
                    "id": model["id"],
                    "display_name": model["id"],
                    "created_at": datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
                    .isoformat()
                    .replace("+00:00", "Z"),
                }
            )
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def olla_model(self, model_id: str) -> dict[str, Any] | None:
        """``/olla/models/{id}``: one model (or alias) with its endpoints, by any name DMR would accept for it."""
        key = normalise_model(model_id)
        for entry in self.olla_list(include_unavailable=True)["data"]:
            if entry["key"] == key or normalise_model(str(entry["id"])) == key:
                return entry
        alias = self.aliases.get(key)
        if alias is not None:
            endpoints = []
            for ep in self.fleet:
                listed = next((ep.listed_name(k) for k in alias.keys if ep.listed_name(k) is not None), None)
                if listed is not None:
                    endpoints.append({"name": ep.name, "status": ep.status, "routable": ep.routable, "id": listed})
            return {
                "id": alias.name,
                "key": key,
                "object": "model",
                "alias_of": list(alias.targets),
                "endpoints": endpoints,
                "available": any(e["routable"] for e in endpoints),
            }
        return None

    def olla_list(self, include_unavailable: bool = False) -> dict[str, Any]:
        """``/olla/models``: each model with the endpoints that have it and their status."""
        by_key: dict[str, dict[str, Any]] = {}
        for ep in self.fleet:
            for model in ep.models:
                key = normalise_model(str(model["id"]))
                entry = by_key.setdefault(
                    key, {"id": model["id"], "key": key, "object": "model", "endpoints": [], "available": False}
                )
                entry["endpoints"].append(
                    {"name": ep.name, "status": ep.status, "routable": ep.routable, "id": model["id"],
                     "loaded": ep.model_loaded(key)}
                )
                entry["available"] = entry["available"] or ep.routable
        aliases_of: dict[str, list[str]] = {}
        for alias in self.aliases:
            for target in alias.keys:
                aliases_of.setdefault(target, []).append(alias.name)
        for key, entry in by_key.items():
            entry["aliases"] = aliases_of.get(key, [])
        data = [e for e in by_key.values() if include_unavailable or e["available"]]
        data.sort(key=lambda e: e["key"])
        return {"object": "list", "data": data, "total": len(data)}
