"""
Model names the way DMR reads them, and the fleet-wide model catalogue.

The normalisation itself (``normalise_model``: DMR treats ``smollm2``,
``ai/smollm2:latest`` and ``AI/SmolLM2`` as one model) lives in the leaf
:mod:`olladmr.names`, so the configuration can use it too; it is
re-exported here for the fleet and for existing imports.
"""

from __future__ import annotations

from ..names import normalise_model

__all__ = ["model_ids", "normalise_model"]


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
