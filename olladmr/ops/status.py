"""
The status API's answers (``/internal/status*``, ``/internal/ready``).

:class:`StatusReport` reads the fleet, the catalogue, the metrics and the
lifecycle it is given; it owns nothing.  No credentials are ever shown
(endpoint URLs cannot carry any, see config).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import __version__
from ..fleet.catalogue import Catalogue
from ..fleet.prefix import CHARS_PER_TOKEN
from ..fleet.state import EndpointState, Fleet
from .lifecycle import Lifecycle
from .metrics import Metrics


def endpoint_status(ep: EndpointState) -> dict[str, Any]:
    """One endpoint as ``/internal/status/endpoints`` shows it."""
    return {
        "name": ep.name,
        "url": ep.config.display_url,
        "type": ep.config.type,
        "status": ep.status,
        "status_reason": ep.status_reason,
        "routable": ep.routable,
        "priority": ep.config.priority,
        "models": [m["id"] for m in ep.models],
        "loaded_models": ep.loaded_models(),
        "model_count": len(ep.models),
        "active_connections": ep.in_flight,
        "queued": ep.queued,
        "max_concurrent": ep.config.max_concurrent,
        "slots": ep.capacity,
        "prefilling": ep.prefilling,
        "prefill_queue_tokens": ep.prefill_pending // CHARS_PER_TOKEN,
        "request_count": ep.request_count,
        "failure_count": ep.failure_count,
        "last_check": ep.last_check,
        "last_latency_ms": ep.last_latency_ms,
        "check_interval_s": ep.config.check_interval,
        "breaker": ep.breaker.state,
        "breaker_failures": ep.breaker.failures,
        "issues": ep.issues(),
    }


class StatusReport:
    """Builds the status API's JSON bodies from the parts it reads."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        catalogue: Catalogue,
        metrics: Metrics,
        lifecycle: Lifecycle,
        in_flight: Callable[[], int],
        balancer: Callable[[], str],
        reloads: Callable[[], tuple[int, int]],
        prefix_cache: Callable[[EndpointState], dict[str, int]] | None = None,
    ) -> None:
        self._prefix_cache = prefix_cache
        self._fleet = fleet
        self._catalogue = catalogue
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._in_flight = in_flight
        self._balancer = balancer
        self._reloads = reloads

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why (``/internal/ready``)."""
        if self._lifecycle.draining:
            return False, "shutting down"
        routable = self._fleet.routable()
        if not routable:
            return False, "no endpoint is routable"
        return True, f"{len(routable)} of {len(self._fleet)} endpoints routable"

    def endpoints(self) -> dict[str, Any]:
        """``/internal/status/endpoints``."""
        eps = list(self._fleet)
        return {
            "endpoints": [
                {
                    **endpoint_status(ep),
                    "traffic": self._metrics.endpoint_stats.summary(ep.name),
                    "prefix_cache": self._prefix_cache(ep) if self._prefix_cache is not None else None,
                }
                for ep in eps
            ],
            "total_count": len(eps),
            "healthy_count": sum(1 for ep in eps if ep.status == "healthy"),
            "routable_count": sum(1 for ep in eps if ep.routable),
        }

    def models(self) -> dict[str, Any]:
        """``/internal/status/models``: every known model with its endpoints, request counts and latency percentiles."""
        listing = self._catalogue.olla_list(include_unavailable=True)
        stats = self._metrics.model_stats
        models = []
        for entry in listing["data"]:
            models.append({**entry, **stats.summary(entry["key"])})
        known = {m["key"] for m in models}
        others = {name: stats.summary(name) for name in stats.requests if name not in known}
        return {"models": models, "total_models": listing["total"], "unlisted": others}

    def model_stats(self) -> dict[str, Any]:
        """``/internal/stats/models`` (Olla's route): per-model requests, success rate and latency percentiles."""
        stats = self._metrics.model_stats
        models = []
        for name, total in sorted(stats.requests.items(), key=lambda item: -item[1]):
            summary = stats.summary(name)
            failed = summary["failures"]
            latency = summary["latency_ms"]
            models.append(
                {
                    "name": name,
                    "total_requests": total,
                    "successful_requests": total - failed,
                    "failed_requests": failed,
                    "success_rate": round((total - failed) / total, 4) if total else None,
                    "p50_latency_ms": latency["p50"],
                    "p95_latency_ms": latency["p95"],
                    "p99_latency_ms": latency["p99"],
                }
            )
        total = sum(stats.requests.values())
        failed = sum(stats.failures.values())
        return {
            "timestamp": self._lifecycle.now(),
            "models": models,
            "summary": {
                "total_models": len(models),
                "total_requests": total,
                "overall_success_rate": round((total - failed) / total, 4) if total else None,
                "most_popular_model": models[0]["name"] if models else None,
            },
        }

    def service(self) -> dict[str, Any]:
        """``/internal/status``."""
        life = self._lifecycle
        metrics = self._metrics
        eps = list(self._fleet)
        reloads_ok, reloads_failed = self._reloads()
        total, succeeded = metrics.totals()
        return {
            "name": "olladmr",
            "version": __version__,
            "uptime_s": round(life.uptime(), 3),
            "listen": life.address(),
            "pid": os.getpid(),
            "worker": life.worker_index,
            "workers": life.workers,
            "config_file": life.config.source,
            "config_loaded_at": life.loaded_at,
            "balancer": self._balancer(),
            "draining": life.draining,
            "active_requests": self._in_flight(),
            "requests": {
                "total": total,
                "succeeded": succeeded,
                "success_rate": round(succeeded / total, 4) if total else None,
            },
            "reloads": {"succeeded": reloads_ok, "failed": reloads_failed},
            "endpoints": {
                "total": len(eps),
                "healthy": sum(1 for ep in eps if ep.status == "healthy"),
                "routable": sum(1 for ep in eps if ep.routable),
            },
        }
