"""
Model aliases (``model_aliases: {alias: [real, real, ...]}``): names that
clients hard-wire (``gpt-4o-mini``, ``claude-sonnet-4``) served by any
endpoint that lists one of the real models.

The routing rule: a request for an alias may go to every routable endpoint
that lists one of its models; on each, the first of the alias's models (in
the order configured) that the endpoint lists is the one its request body
names -- the only body rewrite olladmr ever does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..config.schema import Config
from .models import normalise_model


@dataclass(frozen=True)
class Alias:
    """One alias: its name as configured, and its real models (as configured and as routing keys)."""

    name: str
    targets: tuple[str, ...]
    keys: tuple[str, ...]


class Aliases:
    """Owns the alias table in force, keyed by the alias's routing key."""

    def __init__(self, config: Config) -> None:
        self._table: dict[str, Alias] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Adopt the reloaded ``model_aliases``."""
        table: dict[str, Alias] = {}
        for name, targets in config.model_aliases:
            table[normalise_model(name)] = Alias(name, tuple(targets), tuple(normalise_model(t) for t in targets))
        self._table = table

    def __bool__(self) -> bool:
        return bool(self._table)

    def __iter__(self) -> Iterator[Alias]:
        return iter(list(self._table.values()))

    def get(self, model_key: str | None) -> Alias | None:
        """The alias whose routing key is ``model_key``, if any."""
        if model_key is None or not self._table:
            return None
        return self._table.get(model_key)
