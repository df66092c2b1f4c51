"""
The fleet-wide model view: the union model list and, per model, the
endpoints that list it (``/engines/v1/models``, ``/olla/models``).
"""

from __future__ import annotations

from typing import Any

from .models import normalise_model
from .state import Fleet


class Catalogue:
    """Reads the fleet's model lists into the union list and the per-model endpoint map; owns nothing."""

    def __init__(self, fleet: Fleet) -> None:
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
                    {"name": ep.name, "status": ep.status, "routable": ep.routable, "id": model["id"]}
                )
                entry["available"] = entry["available"] or ep.routable
        data = [e for e in by_key.values() if include_unavailable or e["available"]]
        data.sort(key=lambda e: e["key"])
        return {"object": "list", "data": data, "total": len(data)}
