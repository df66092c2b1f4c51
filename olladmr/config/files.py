"""
Configuration files: where to find one, how to read it.

The lookup order is ``--config``, then ``$OLLA_CONFIG_FILE``, then
``./config.yaml``, then ``/etc/olladmr/config.yaml``; with none of them,
the built-in defaults.  The environment is always passed in, so tests
(and ``api_keys_env`` / ``token_env`` look-ups) never read ``os.environ``
behind the caller's back.
"""

from __future__ import annotations

import os
from typing import Mapping

import yaml

from .parse import parse_config
from .reader import ConfigError
from .schema import Config, default_config

SEARCH_PATH = ("./config.yaml", "/etc/olladmr/config.yaml")


def load_config(path: str, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the YAML file at ``path``."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(path, where, f"invalid YAML: {problem}") from None
    return parse_config(document, source=path, environ=environ)


def find_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """
    The config file to use: ``--config``, then ``$OLLA_CONFIG_FILE``, then
    ``./config.yaml``, then ``/etc/olladmr/config.yaml``; ``None`` means the
    built-in defaults.  An explicitly named file is returned even if missing
    (so that loading it reports the problem).
    """
    if explicit:
        return explicit
    from_env = environ.get("OLLA_CONFIG_FILE")
    if from_env:
        return from_env
    for candidate in SEARCH_PATH:
        if os.path.exists(candidate):
            return candidate
    return None


def resolve_config(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Config:
    """Find and load the configuration (or the built-in defaults), reading ``environ`` only."""
    path = find_config(explicit, environ)
    if path is None:
        return default_config()
    return load_config(path, environ)
