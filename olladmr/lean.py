"""
Importing Twisted's networking without TLS when the configuration needs none.

the reactor (``twisted.internet.posixbase``, ``tcp``), ``twisted.internet.endpoints`` and ``twisted.web.client`` import pyOpenSSL
(and with it ``cryptography`` and ``service_identity``) whenever it is
installed, used or not: about 12 MB of resident memory in a daemon whose
upstreams are plain ``http://`` and whose listener is plain TCP.  Imported
while pyOpenSSL is hidden, they run without TLS support (Twisted's own
optional-dependency path).  The choice is made once, at start-up, from the
configuration; a reload that would need TLS in a process started without
it is refused (:func:`tls_problem`), and a restart picks it up.

This module must be imported before any of Twisted's networking is; it
imports nothing of olladmr but the configuration's schema.
"""

from __future__ import annotations

import sys

from .config.reader import ConfigError
from .config.schema import Config

#: Twisted modules that decide at import whether TLS is available.
_TLS_DECIDERS = ("twisted.internet.posixbase", "twisted.internet.tcp", "twisted.internet.endpoints", "twisted.web.client")


def needs_tls(config: Config, listen: str | None = None) -> bool:
    """Whether ``config`` (or the ``--listen`` override) uses TLS: an ``https://`` endpoint or an ``ssl:`` listener."""
    description = listen or config.server.listen
    if description.split(":", 1)[0].lower() in ("ssl", "tls", "le", "lets"):
        return True
    return any(ep.url.lower().startswith("https:") for ep in config.endpoints)


def import_without_tls() -> bool:
    """
    Import Twisted's endpoints and HTTP client with pyOpenSSL hidden, so
    neither loads it.  Returns whether that took effect (``False`` if they,
    or pyOpenSSL, were imported already: then TLS stays available).
    """
    if any(name in sys.modules for name in (*_TLS_DECIDERS, "OpenSSL")):
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # an import of it raises ImportError meanwhile
    try:
        import treq  # noqa: F401  (imports twisted.web.client)
        import twisted.internet.endpoints  # noqa: F401
        import twisted.internet.posixbase  # noqa: F401  (the reactor's base: no TLS transports)
        import twisted.internet.tcp  # noqa: F401  (the reactor's TCP transports: no TLS start on them)
        import twisted.web.client  # noqa: F401
    finally:
        del sys.modules["OpenSSL"]
    return True


def tls_available() -> bool:
    """Whether this process's Twisted can make TLS connections (it was not imported without TLS)."""
    from twisted.internet import endpoints

    return endpoints.TLSMemoryBIOFactory is not None


def check_tls(config: Config, listen: str | None = None) -> Config:
    """``config``, or a :class:`ConfigError` if it needs TLS and this process started without it (a reload's check)."""
    if not needs_tls(config, listen) or tls_available():
        return config
    https = next((i for i, ep in enumerate(config.endpoints) if ep.url.lower().startswith("https:")), None)
    raise ConfigError(
        config.source,
        f"endpoints[{https}].url" if https is not None else "server",
        "needs TLS, and this olladmr started without it (no https:// endpoint or ssl: listener at start-up, so "
        "pyOpenSSL was not loaded): restart olladmr to use it",
    )
