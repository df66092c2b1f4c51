"""
The twistd entry point: command-line options and ``makeService``.

``twistd -n olladmr [--config FILE] [--listen ENDPOINT]``.  A configuration
or listen-address problem ends the process before it listens, with one line
on stderr (file, key path, problem) and exit status 1 -- never a traceback.

``twistd olladmr [--config FILE] --check`` (like ``nginx -t``) reads and
validates the configuration exactly as start-up and SIGHUP do, prints
``FILE: ok (N endpoints: a, b)`` and exits 0, or prints that one line and
exits 1 -- while twistd is still parsing options: no port is bound, no
endpoint contacted, no log or pid file written.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from typing import TYPE_CHECKING, Any, Mapping, cast

from twisted.python import usage

from .config.files import find_config, resolve_config
from .config.reader import ConfigError
from .lean import import_without_tls, needs_tls
from .reactors import IReactor

if TYPE_CHECKING:
    from .service import OllaService


class Options(usage.Options):
    """``twistd olladmr`` options."""

    synopsis = "[--config FILE] [--listen ENDPOINT] [--check]"
    longdesc = (
        "An OpenAI-compatible proxy in front of Docker Model Runner servers. "
        "Config lookup: --config, $OLLA_CONFIG_FILE, ./config.yaml, /etc/olladmr/config.yaml, built-in defaults."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file."],
        [
            "listen",
            "l",
            None,
            "Twisted endpoint to listen on (e.g. tcp:40114:interface=127.0.0.1, unix:/run/olladmr.sock); "
            "overrides server.host/server.port.",
        ],
        ["workers", "w", 1, "Processes serving the listening socket (tcp: or unix: listen addresses); "
         "'auto': one per CPU this process may run on.", None],
        ["inherit-fd", None, None, "(internal) serve on this inherited listening socket", int],
        ["inherit-family", None, None, "(internal) address family of the inherited socket", int],
        ["worker-index", None, 0, "(internal) this worker's number", int],
    ]
    optFlags = [
        ["check", None, "Validate the configuration (as start-up and SIGHUP do), print the verdict, exit 0 or 1."],
    ]

    def postOptions(self) -> None:
        self["workers"] = parse_workers(self["workers"])
        if self["check"]:
            code, line = check(self)
            print(line, file=sys.stdout if code == 0 else sys.stderr, flush=True)
            raise SystemExit(code)


def parse_workers(value: object) -> int:
    """``--workers``: a count of at least 1, or ``auto`` (the CPUs this process may run on)."""
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif str(value).strip().lower() == "auto":
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            count = os.cpu_count() or 1
    else:
        try:
            count = int(str(value))
        except ValueError:
            raise usage.UsageError(f"--workers: expected a number or 'auto', got {value!r}") from None
    if count < 1:
        raise usage.UsageError("--workers must be at least 1")
    return count


def check(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """``--check``: (exit status, the one line to print) for the configuration start-up would use."""
    explicit = options.get("config")
    try:
        config = resolve_config(explicit, environ)
    except ConfigError as error:
        return 1, str(error)
    listen = options.get("listen")
    if listen:
        problem = _listen_problem(listen)
        if problem is not None:
            return 1, problem
    names = [ep.name for ep in config.endpoints]
    where = find_config(explicit, environ) or "built-in defaults"
    count = f"{len(names)} endpoint{'' if len(names) == 1 else 's'}"
    return 0, f"{where}: ok ({count}: {', '.join(names)})" if names else f"{where}: ok (no endpoints)"


def _listen_problem(listen: str, reactor: IReactor | None = None) -> str | None:
    """Why ``--listen`` is not a server endpoint description, or ``None`` (parsing it binds nothing)."""
    from twisted.internet import endpoints

    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = cast(IReactor, installed)  # (the installed reactor provides every interface IReactor names)
    try:
        endpoints.serverFromString(reactor, listen)
    except (ValueError, KeyError, TypeError) as exc:
        return f"--listen {listen}: not a valid Twisted endpoint description ({exc})"
    return None


def _tune_pypy() -> None:
    """On PyPy, let the JIT trace Twisted's long call chains (default limit: no speed-up)."""
    if platform.python_implementation() == "PyPy":
        try:
            import pypyjit

            pypyjit.set_param("trace_limit=16000")
        except Exception:  # pragma: no cover - other PyPy versions
            pass


def settle_gc() -> None:
    """
    Once the daemon runs: collect what start-up left behind, then move every
    object alive now (modules, the service tree, configuration) out of the
    collector's sight (``gc.freeze``), so the full collections the request
    path triggers now and then walk only request-time objects: shorter
    pauses, a lower latency tail.  CPython only.
    """
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        gc.collect()
        freeze()


def makeService(
    options: Mapping[str, Any], reactor: IReactor | None = None, environ: Mapping[str, str] = os.environ
) -> OllaService:
    """Build the service tree from parsed options (or exit with one line)."""
    _tune_pypy()
    explicit = options.get("config")
    try:
        config = resolve_config(explicit, environ)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    listen = options.get("listen")
    if not needs_tls(config, listen):
        import_without_tls()  # no pyOpenSSL in memory unless TLS is configured (a no-op if Twisted's is loaded)
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IReactor, global_reactor)  # (the installed reactor provides every interface IReactor names)
    if listen:
        problem = _listen_problem(listen, reactor)
        if problem is not None:
            raise SystemExit(problem)
    from .build import build
    from .ops.metrics import values_for_one_thread

    workers = int(options.get("workers") or 1)
    description = listen or config.server.listen
    if workers > 1 and not description.startswith(("tcp:", "unix:")):
        raise SystemExit(f"--workers {workers}: needs a tcp: or unix: listen address, not {description!r}")
    path = find_config(explicit, environ)
    inherit = None
    if options.get("inherit-fd") is not None:
        inherit = (int(options["inherit-fd"]), int(options["inherit-family"]))
    reactor.callWhenRunning(settle_gc)
    values_for_one_thread()  # metrics are the reactor thread's alone: no lock per increment (--workers: mmap values)
    return build(
        config,
        reactor=reactor,
        listen=listen,
        config_path=path,
        environ=environ,
        workers=workers,
        inherit=inherit,
        worker_index=int(options.get("worker-index") or 0),
    ).service
