"""
Several processes on one listening socket (``--workers N``).

The twistd process (the *master*) binds the socket as usual and serves on it
itself; :class:`WorkerPool` then starts ``N - 1`` worker processes that
adopt the same socket (passed as file descriptor 3) and run the same
service tree.  Health checks are the master's: after each one it sends
what every endpoint's checks found to each worker as a JSON line on the
worker's stdin, and workers adopt it (``HealthMonitor.adopt``).  Their traffic metrics are
summed across processes (``ops.metrics``: multiprocess files in a directory
the master creates, removed when the pool has stopped).  The kernel hands each new
connection to one of them.

Signals: the master forwards SIGHUP (reload) to every worker after
reloading itself, and on shutdown sends SIGTERM and waits for the workers
to drain (up to ``server.shutdown_timeout`` plus a grace period, then
SIGKILL).  A worker whose master disappears (its stdin pipe closes) shuts
down by itself.  A worker that dies unexpectedly is restarted after a
short delay.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from .reactors import IReactor

log = Logger()

WORKER_FD = 3
_RESTART_DELAY = 1.0


class _Worker(protocol.ProcessProtocol):
    """One worker process: relays nothing, tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool.worker_ended(self, reason.value)


class WorkerPool(Service):
    """Owns the worker processes of a master: start, signal forwarding, drain, restart."""

    name = "workers"

    def __init__(
        self,
        reactor: IReactor,
        count: int,
        fd: Callable[[], int],
        family: Callable[[], int],
        argv: list[str],
        shutdown_timeout: Callable[[], float],
        shared_dir: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self._fd = fd
        self._family = family
        self.argv = argv
        self._shutdown_timeout = shutdown_timeout
        self._shared_dir = shared_dir  # the metrics files of every process: removed once all have stopped
        self._health: bytes | None = None  # the master's latest health checks, one JSON line
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False
        self._quick_deaths = 0

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *self.argv,
                "--inherit-fd", str(WORKER_FD), "--inherit-family", str(int(self._family())),
                "--worker-index", str(index), "--workers", str(self.count)]
        transport = self.reactor.spawnProcess(
            worker, sys.executable, args, env=os.environ.copy(),
            childFDs={0: "w", 1: 1, 2: 2, WORKER_FD: self._fd()},
        )
        worker.started = self.reactor.seconds()
        self.workers[index] = (worker, transport)
        if self._health is not None:
            transport.write(self._health)
        log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    def worker_ended(self, worker: _Worker, reason: Any) -> None:
        """``worker`` exited: restart it unless we are stopping (or it keeps dying at start-up)."""
        current = self.workers.get(worker.index)
        if current is None or current[0] is not worker:
            return
        del self.workers[worker.index]
        if self._stopping:
            return
        quick = self.reactor.seconds() - worker.started < 10
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        if self._quick_deaths >= 5:
            log.critical("worker {index} keeps dying at start-up ({reason}); not restarting it", index=worker.index,
                         reason=reason)
            return
        log.error("worker {index} exited unexpectedly ({reason}); restarting it", index=worker.index, reason=reason)
        self.reactor.callLater(_RESTART_DELAY * (1 + self._quick_deaths), self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def share_health(self, states: list[dict[str, object]]) -> None:
        """Send what the master's health checks found to every worker (a JSON line on its stdin)."""
        self._health = json.dumps(states, separators=(",", ":")).encode() + b"\n"
        for _, transport in list(self.workers.values()):
            try:
                transport.write(self._health)
            except Exception:  # the worker is going away; it is restarted with the latest line
                pass

    def signal_all(self, name: str) -> None:
        """Send a signal (``"HUP"``, ``"TERM"``, ...) to every running worker."""
        for _, transport in list(self.workers.values()):
            try:
                transport.signalProcess(name)
            except Exception:  # already gone
                pass

    def reload_all(self) -> None:
        """Tell every worker to reload its configuration (SIGHUP)."""
        self.signal_all("HUP")

    def terminate(self) -> None:
        """Ask every worker to drain and exit (once)."""
        if not self._stopping:
            self._stopping = True
            self.signal_all("TERM")

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ended = [worker.ended for worker, _ in self.workers.values()]
        self.terminate()
        if not ended:
            self._remove_shared()
            return Deferred.fromCoroutine(_none())
        all_ended = DeferredList(ended)
        all_ended.addBoth(self._removed_shared)
        grace = self._shutdown_timeout() + 5.0

        def kill() -> None:
            if not all_ended.called:
                log.warn("workers did not stop within {grace}s: killing them", grace=grace)
                self.signal_all("KILL")

        timer = self.reactor.callLater(grace, kill)
        all_ended.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return all_ended

    def _remove_shared(self) -> None:
        if self._shared_dir is not None:
            shutil.rmtree(self._shared_dir, ignore_errors=True)

    def _removed_shared(self, result: Any) -> Any:
        self._remove_shared()
        return result


async def _none() -> None:
    return None


class _MasterWatch(LineOnlyReceiver):
    """In a worker: the master's health checks arrive as JSON lines on stdin; when the pipe closes, stop."""

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, on_lost: Callable[[], None], on_health: Callable[[list[dict[str, Any]]], None]) -> None:
        self.on_lost = on_lost
        self.on_health = on_health

    def lineReceived(self, line: bytes) -> None:
        try:
            states = json.loads(line)
        except ValueError:
            log.warn("worker: unreadable health line from the master ({size} bytes)", size=len(line))
            return
        if isinstance(states, list):
            self.on_health([s for s in states if isinstance(s, dict)])

    def connectionLost(self, reason: Any = None) -> None:
        self.on_lost()


def watch_master(
    reactor: IReactor, on_lost: Callable[[], None], on_health: Callable[[list[dict[str, Any]]], None] = lambda _: None
) -> None:
    """Apply the master's health lines with ``on_health``; call ``on_lost`` when stdin (the pipe) closes."""
    from twisted.internet import stdio

    stdio.StandardIO(_MasterWatch(on_lost, on_health), reactor=reactor)


def adopt(reactor: IReactor, fd: int, family: int, factory: Any) -> IListeningPort:
    """Listen on an inherited, already-bound socket."""
    port = reactor.adoptStreamPort(fd, socket.AddressFamily(family), factory)
    os.close(fd)  # adoptStreamPort duplicated it
    return port

