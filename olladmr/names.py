"""
Model names the way DMR reads them: the routing key of a model reference.

DMR treats ``smollm2``, ``ai/smollm2``, ``ai/smollm2:latest``,
``docker.io/ai/smollm2`` and ``AI/SmolLM2`` as one model: the name is
case-insensitive, the default namespace is ``ai`` and the default tag is
``latest`` (the tag itself stays case-sensitive).  We normalise the same way
for routing only; the body sent upstream is never rewritten.

A leaf: it imports nothing from olladmr, so the configuration (model
aliases) and the fleet (the model catalogue) can both use it.
"""

from __future__ import annotations

import re
from functools import lru_cache

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
