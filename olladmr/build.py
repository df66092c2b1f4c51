"""
The composition root: the one place every part is constructed.

:func:`build` creates each component once, in dependency order, and passes
collaborators as constructor arguments; nothing is assigned onto another
object afterwards.  Data flows one way on a request::

    site -> gate -> routes -> proxy/exchange -> upstream -> relay

with what the gate decided carried in the :class:`~olladmr.proxy.record.ProxyCall`,
and health feedback from real traffic passed to the proxy as a callable.
A reload goes through :class:`~olladmr.reload.Reconfiguration`, which calls
``reconfigure(config)`` on the parts below in this order.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

from .reactors import IReactor
from .config.files import load_config
from .config.schema import Config
from .lean import check_tls
from .edge.gate import Gate
from .edge.channel import EdgeLimits
from .edge.site import OllaSite
from .fleet.aliases import Aliases
from .fleet.catalogue import Catalogue
from .fleet.health import HealthMonitor, health_client
from .fleet.responses import ResponseDirectory
from .fleet.sessions import SessionRouter
from .fleet.view import FleetView
from .fleet.state import Fleet
from .ops.dashboard import Dashboard, EventLog
from .ops.lifecycle import Lifecycle
from .ops.logs import AccessLog, LogControl
from .ops.metrics import MULTIPROCESS_ENV, Metrics, share_across_processes
from .ops.process import ProcessStats
from .ops.status import StatusReport
from .proxy.affinity import ResponseAffinity
from .proxy.proxy import InFlight, Proxy
from .proxy.upstream import UpstreamClient
from .reload import ConfigReloader, Reconfiguration
from .routes import OllaApp
from .sending import SendQueue
from .service import Listener, OllaService
from .workers import WorkerPool


@dataclass(frozen=True)
class Daemon:
    """Every part of one built daemon; :attr:`service` is what twistd runs."""

    service: OllaService
    config: Config
    listener: Listener
    fleet: Fleet
    aliases: Aliases
    sessions: SessionRouter
    catalogue: Catalogue
    responses: ResponseAffinity
    upstream: UpstreamClient
    inflight: InFlight
    metrics: Metrics
    health: HealthMonitor
    gate: Gate
    access_log: AccessLog
    proxy: Proxy
    limits: EdgeLimits
    lifecycle: Lifecycle
    reconfiguration: Reconfiguration
    reloader: ConfigReloader
    status: StatusReport
    dashboard: Dashboard
    app: OllaApp
    site: OllaSite
    workers: WorkerPool | None


def build(
    config: Config,
    *,
    reactor: IReactor,
    listen: str | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] = os.environ,
    log_control: LogControl | None = None,
    workers: int = 1,
    inherit: tuple[int, int] | None = None,
    worker_index: int = 0,
) -> Daemon:
    """Construct the whole daemon for ``config`` (nothing starts until the service does)."""
    log_control = log_control or LogControl(config.logging.level, config.logging.format)
    listener = Listener(reactor, listen or config.server.listen, inherit=inherit, shared=workers > 1)
    lifecycle = Lifecycle(
        reactor,
        config,
        address=listener.address,
        worker_index=worker_index,
        workers=workers,
    )
    sends = SendQueue(reactor)  # one per process: the listener's and the upstreams' writes of a turn go out together
    upstream = UpstreamClient(reactor, config.proxy, sends)
    fleet = Fleet(config, reactor)
    aliases = Aliases(config)
    catalogue = Catalogue(fleet, aliases)
    inflight = InFlight()
    sessions = SessionRouter(reactor, config)
    settings = config.proxy.response_affinity
    directory = ResponseDirectory(reactor, settings.max_entries, settings.ttl)
    master = workers > 1 and inherit is None  # --workers N: this process binds, checks and starts the rest
    shared_dir: str | None = None  # --workers: the traffic metrics of every process, summed at each scrape
    if master:
        shared_dir = tempfile.mkdtemp(prefix="olladmr-metrics-")  # the master's; its workers inherit the variable
    elif inherit is not None and environ.get(MULTIPROCESS_ENV):
        shared_dir = environ[MULTIPROCESS_ENV]
    if shared_dir is not None:
        share_across_processes(shared_dir, reactor)
    metrics = Metrics(fleet, reactor, inflight.__len__, directory.__len__, sessions.stats, shared_dir=shared_dir)
    affinity = ResponseAffinity(
        directory,
        upstream,
        reactor,
        timeout=settings.probe_timeout,
        max_probes=settings.max_concurrent_probes,
        observe_probe=metrics.probe_observed,
    )
    pool: WorkerPool | None = None
    if master:
        argv = ["-n", "--pidfile=", "olladmr"] + (["--config", config_path] if config_path else [])
        pool = WorkerPool(
            reactor,
            workers,
            fd=listener.fileno,
            family=listener.family,
            argv=argv,
            shutdown_timeout=lambda: lifecycle.config.server.shutdown_timeout,
            shared_dir=shared_dir,
        )
    health_http, health_pool = health_client(reactor)
    health = HealthMonitor(
        fleet,
        health_http,
        reactor,
        config,
        pool=health_pool,
        observe_check=metrics.health_checks_observe,
        share=pool.share_health if pool is not None else None,  # the master checks for every process
        follower=inherit is not None,  # a worker adopts the master's checks
    )
    gate = Gate(config.server, reactor, share=workers)
    access_log = AccessLog(log_control)
    proxy = Proxy(
        fleet,
        upstream,
        reactor,
        config,
        inflight=inflight,
        responses=affinity,
        sessions=sessions,
        mark_offline=health.mark_offline,
        observers=(metrics, access_log),
    )
    limits = EdgeLimits(config.server)
    reconfiguration = Reconfiguration(
        config,
        # fleet first: the health monitor reconciles its loops against it, last
        [fleet, aliases, sessions, directory, affinity, upstream, proxy, gate, limits, log_control, metrics, lifecycle, health],
        listen=listener.description,
        listen_fixed=listen is not None or inherit is not None,
    )
    events = EventLog(reactor)
    reloader = ConfigReloader(
        config_path,
        reactor,
        load=lambda path: check_tls(load_config(path, environ), listener.description),
        apply=reconfiguration.apply,
        observers=(metrics.reload_observed, events.reload_observed),
        forward=pool.reload_all if pool is not None else None,
    )
    status = StatusReport(
        fleet=fleet,
        catalogue=catalogue,
        metrics=metrics,
        lifecycle=lifecycle,
        in_flight=inflight.__len__,
        balancer=lambda: proxy.balancer.name,
        reloads=reloader.counts,
        prefix_cache=sessions.cache_estimate,
    )
    process = ProcessStats(lifecycle)
    dashboard = Dashboard(reactor, lifecycle, status=status, metrics=metrics, events=events, sticky=sessions.stats)
    app = OllaApp(
        proxy=proxy,
        catalogue=catalogue,
        aliases=aliases,
        sessions=sessions,
        status=status,
        metrics=metrics,
        lifecycle=lifecycle,
        process=process,
        dashboard=dashboard,
        reload=reloader.reload,
        view=FleetView(fleet, health.fetch),
    )
    site = OllaSite(app.resource(gate), reactor, limits, access_log, sends)
    service = OllaService(
        reactor=reactor,
        listener=listener,
        site=site,
        fleet=fleet,
        health=health,
        gate=gate,
        inflight=inflight,
        upstream=upstream,
        lifecycle=lifecycle,
        log_control=log_control,
        children=(reloader, process, dashboard),
        workers=pool,
    )
    return Daemon(
        service=service,
        config=config,
        listener=listener,
        fleet=fleet,
        aliases=aliases,
        sessions=sessions,
        catalogue=catalogue,
        responses=affinity,
        upstream=upstream,
        inflight=inflight,
        metrics=metrics,
        health=health,
        gate=gate,
        access_log=access_log,
        proxy=proxy,
        limits=limits,
        lifecycle=lifecycle,
        reconfiguration=reconfiguration,
        reloader=reloader,
        status=status,
        dashboard=dashboard,
        app=app,
        site=site,
        workers=pool,
    )
