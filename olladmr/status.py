"""
The JSON bodies of the status API (``/internal/status*``).

Plain functions over the running service; no credentials are ever shown
(endpoint URLs cannot carry any, see config).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import __version__
from .fleet import EndpointState

if TYPE_CHECKING:
    from .service import OllaService


def endpoint_status(ep: EndpointState) -> dict[str, Any]:
    return {
        "name": ep.name,
        "url": ep.config.display_url,
        "type": ep.config.type,
        "status": ep.status,
        "status_reason": ep.status_reason,
        "routable": ep.routable,
        "priority": ep.config.priority,
        "models": [m["id"] for m in ep.models],
        "model_count": len(ep.models),
        "active_connections": ep.in_flight,
        "queued": ep.queued,
        "max_concurrent": ep.config.max_concurrent,
        "request_count": ep.request_count,
        "failure_count": ep.failure_count,
        "last_check": ep.last_check,
        "last_latency_ms": ep.last_latency_ms,
        "check_interval_s": ep.config.check_interval,
        "breaker": ep.breaker.state,
        "breaker_failures": ep.breaker.failures,
        "issues": ep.issues(),
    }


def endpoints_status(service: OllaService) -> dict[str, Any]:
    eps = list(service.fleet)
    return {
        "endpoints": [endpoint_status(ep) for ep in eps],
        "total_count": len(eps),
        "healthy_count": sum(1 for ep in eps if ep.status == "healthy"),
        "routable_count": sum(1 for ep in eps if ep.routable),
    }


def models_status(service: OllaService) -> dict[str, Any]:
    """Every known model with its endpoints, plus request counts and latency percentiles."""
    listing = service.catalogue.olla_list(include_unavailable=True)
    stats = service.metrics.model_stats
    models = []
    for entry in listing["data"]:
        models.append({**entry, **stats.summary(entry["key"])})
    others = {name: stats.summary(name) for name in stats.requests if name not in {m["key"] for m in models}}
    return {"models": models, "total_models": listing["total"], "unlisted": others}


def service_status(service: OllaService) -> dict[str, Any]:
    now = service.reactor.seconds()
    eps = list(service.fleet)
    return {
        "name": "olladmr",
        "version": __version__,
        "uptime_s": round(now - service.started_at, 3),
        "listen": service.address,
        "pid": os.getpid(),
        "worker": service.worker_index,
        "workers": service.workers.count if service.workers is not None else 1,
        "config_file": service.config.source,
        "config_loaded_at": service.loaded_at,
        "balancer": service.proxy.balancer.name,
        "draining": service.draining,
        "active_requests": len(service.proxy.active),
        "requests": {
            "total": service.metrics.total,
            "succeeded": service.metrics.succeeded,
            "success_rate": (
                round(service.metrics.succeeded / service.metrics.total, 4) if service.metrics.total else None
            ),
        },
        "reloads": {"succeeded": service.reloader.reloads, "failed": service.reloader.failures},
        "endpoints": {
            "total": len(eps),
            "healthy": sum(1 for ep in eps if ep.status == "healthy"),
            "routable": sum(1 for ep in eps if ep.routable),
        },
    }
