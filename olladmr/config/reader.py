"""
Reading configuration values: the leaf every section parser builds on.

:class:`Section` walks one YAML mapping, remembers its key path and which
keys were used, and turns each bad value into a :class:`ConfigError` whose
text is one line naming the file, the key path and what is wrong, e.g.::

    config.yaml: discovery.static.endpoints[1].check_interval: expected a
    duration such as "10s", got "ten"

This module imports nothing from olladmr.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem: where it is and what is wrong, on one line."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source = source
        self.path = path
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return one_line(f"{self.source}: {where}{self.problem}")


def one_line(text: str) -> str:
    """Escape line breaks and other control characters so a message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_value(value: object) -> str:
    """Render a bad configuration value the way a person wrote it: strings quoted."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def fmt_seconds(seconds: float) -> str:
    """``0.5`` -> ``500ms``, ``10.0`` -> ``10s``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# --------------------------------------------------------------------------
# Value parsers


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """
    Parse a Go-style duration (``500ms``, ``10s``, ``5m``, ``1h30m``) into
    seconds.  ``0`` (number or string) means zero.  Raises ``ValueError``.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ValueError(value)
    text = value.strip()
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            raise ValueError(value)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(value)
    return total


def count(value: object) -> int:
    """``value`` if it is a whole number of zero or more (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def parse_size(value: object) -> int:
    """
    Parse a byte size (``50MB``, ``512KB``, ``1GiB``, or a plain integer of
    bytes).  Units are binary (1KB = 1024 bytes), as in Olla.
    """
    if isinstance(value, int):
        return count(value)
    if not isinstance(value, str):
        raise ValueError(value)
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(value)
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def strict_int(value: object) -> int:
    """``value`` if it is an int (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(value)
    return value


def strict_bool(value: object) -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def strict_str(value: object) -> str:
    """``value`` if it is a str, else ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(value)
    return value


# --------------------------------------------------------------------------
# The reader: walks a YAML mapping, remembering the key path


class Section:
    """
    A mapping being read: owns its key path, the keys used so far and the
    set of keys that are accepted but ignored here (Olla keys olladmr has
    no use for), which :meth:`finish` reports into the shared ``sink``.

    ``ignored`` maps a section name (``"proxy"``, ``"endpoint"``, ...) to
    those keys; child sections look their own name up in the same table.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        source: str,
        sink: list[str] | None = None,
        ignored: Mapping[str, frozenset[str]] | None = None,
        name: str | None = None,
    ) -> None:
        self._data = data
        self._path = path
        self.source = source
        self._table = ignored or {}
        self._ignored = self._table.get(path if name is None else name, frozenset())
        self.sink = sink if sink is not None else []
        self._used: set[str] = set()

    @property
    def path(self) -> str:
        """This section's key path (``""`` at the top level)."""
        return self._path

    def key_path(self, key: str) -> str:
        """The full key path of ``key`` in this section."""
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` about ``key`` of this section."""
        return ConfigError(self.source, self.key_path(key), problem)

    def has(self, key: str) -> bool:
        """Whether ``key`` is present and not null."""
        return key in self._data and self._data[key] is not None

    def raw(self, key: str) -> Any:
        """The value of ``key`` as YAML gave it (``None`` if missing); marks it used."""
        self._used.add(key)
        return self._data.get(key)

    def get(self, key: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        """Read ``key`` through ``convert``; a missing or null key gives ``default``."""
        value = self.raw(key)
        if value is None:
            return default
        try:
            return convert(value)
        except (ValueError, TypeError):
            raise self.error(key, f"expected {expected}, got {show_value(value)}") from None

    def duration(self, key: str, default: float, minimum: float = 0.0) -> float:
        """A duration in seconds, at least ``minimum``."""
        value = self.get(key, default, parse_duration, 'a duration such as "10s"')
        if value < minimum:
            raise self.error(key, f"must be at least {fmt_seconds(minimum)}, got {show_value(self.raw(key))}")
        return value

    def integer(self, key: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        """A whole number within the bounds given."""
        value = self.get(key, default, strict_int, "a whole number")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        """A number (int or float), at least ``minimum``."""

        def convert(value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(value)
            return float(value)

        value = self.get(key, default, convert, "a number")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, got {value:g}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false``."""
        return self.get(key, default, strict_bool, "true or false")

    def string(self, key: str, default: str) -> str:
        """A string."""
        return self.get(key, default, strict_str, "a string")

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices`` (case-insensitive), lower-cased."""
        value = self.string(key, default)
        if value.lower() not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {show_value(value)}")
        return value.lower()

    def section(self, key: str, name: str | None = None) -> Section:
        """The sub-mapping ``key`` (empty if missing); ``name`` picks its ignored-keys entry."""
        value = self.raw(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {show_value(value)}")
        return Section(value, self.key_path(key), self.source, self.sink, self._table, name)

    def item(self, value: object, path: str, name: str) -> Section:
        """A mapping found in a list of this section (e.g. one endpoint) as a section of its own."""
        if not isinstance(value, dict):
            raise ConfigError(self.source, path, f"expected a mapping, got {show_value(value)}")
        return Section(value, path, self.source, self.sink, self._table, name)

    def sequence(self, key: str) -> list[Any]:
        """A list (empty if missing)."""
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {show_value(value)}")
        return value

    def report_ignored(self, key: str) -> None:
        """Mark ``key`` as read and report it as accepted but not used (for value-dependent cases)."""
        self._used.add(key)
        self.sink.append(self.key_path(key))

    def finish(self) -> None:
        """Fail on unknown keys; record the accepted-but-ignored ones in the sink."""
        for key in self._data:
            if not isinstance(key, str):
                raise ConfigError(self.source, self._path or "(top level)", f"keys must be strings, got {key!r}")
            if key in self._used:
                continue
            if key in self._ignored:
                self.sink.append(self.key_path(key))
                continue
            raise self.error(key, "unknown key")
