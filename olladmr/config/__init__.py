"""
Configuration: YAML in, immutable typed objects out.

* :mod:`~olladmr.config.reader` -- :class:`ConfigError`, the :class:`Section` reader, durations and sizes (a leaf);
* :mod:`~olladmr.config.schema` -- the frozen dataclasses every feature reads;
* :mod:`~olladmr.config.parse` -- ``parse_config`` and every section's parser;
* :mod:`~olladmr.config.files` -- finding and loading the file.

Features import :mod:`olladmr.config.schema` only; this package namespace
re-exports the common names for the daemon's entry points and for tests.
"""

from .files import find_config, load_config, resolve_config
from .parse import parse_config
from .reader import ConfigError, Section, parse_duration, parse_size
from .schema import (
    AuthConfig,
    Config,
    CorsConfig,
    EndpointConfig,
    LoggingConfig,
    ProxyConfig,
    RateLimitConfig,
    RequestLimits,
    ServerConfig,
    default_config,
)

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "EndpointConfig",
    "LoggingConfig",
    "ProxyConfig",
    "RateLimitConfig",
    "RequestLimits",
    "Section",
    "ServerConfig",
    "default_config",
    "find_config",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "resolve_config",
]
