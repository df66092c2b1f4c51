"""
Inbound API keys (``server.auth``).

The configuration never holds a key, only its SHA-256 digest (64 hex
characters), given in any mix of three forms::

    server:
      auth:
        api_keys: ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        api_keys_file: /etc/olladmr/api_keys   # one digest per line, "#" comments
        api_keys_env: OLLADMR_API_KEYS         # comma-separated digests
        admin_keys: [...]                      # also admin_keys_file, admin_keys_env
        requests_per_minute: 60                # per API key; 0: no per-key limit

A client presents its key as ``Authorization: Bearer KEY`` or
``x-api-key: KEY``.  The presented key is hashed and the digest compared
with every stored digest using :func:`hmac.compare_digest`, without
stopping at the first match, so the time taken does not depend on which
(or whether a) digest matched.  The presented key is never stored or
logged: a client is known by a short key id, the first 8 hex characters of
its key's digest.

Admin keys protect ``/internal/*`` (except ``/internal/health``); API keys
protect everything else.  A source that is configured but yields no digest
(an empty file, an unset variable) is an error, so a typo cannot silently
open the proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from twisted.web.http_headers import Headers

from .errors import ClientError

if TYPE_CHECKING:  # config.py may import this module: no runtime import back
    from .config import ConfigError, _Section

KEY_ID_LENGTH = 8
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HINT = "hash the key with: printf %s 'KEY' | sha256sum"


@dataclass(frozen=True)
class AuthConfig:
    """Accepted API and admin key digests (raw 32-byte SHA-256) and the per-key rate limit."""

    api_key_digests: tuple[bytes, ...] = ()
    admin_key_digests: tuple[bytes, ...] = ()
    per_key_requests_per_minute: int = 0


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what goes into ``api_keys`` / ``admin_keys``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: bytes) -> str:
    """The short, non-secret name of a key: the first hex characters of its digest."""
    return digest.hex()[:KEY_ID_LENGTH]


# --------------------------------------------------------------------------
# Parsing


def _digest(value: object, fail: Callable[[str], ConfigError]) -> bytes:
    """One configured digest as 32 bytes; never echoes the value (it might be a key pasted by mistake)."""
    if not isinstance(value, str):
        raise fail(f"expected a SHA-256 hex digest as a quoted string, got {type(value).__name__}")
    text = value.strip()
    if not _HEX_DIGEST.fullmatch(text):
        if len(text) == 64:
            problem = "got 64 characters that are not all hex digits"
        else:
            problem = f"got {len(text)} characters"
        raise fail(f"expected a SHA-256 hex digest (64 hex characters), {problem}; {_HINT}")
    return bytes.fromhex(text)


def _read_digest_file(section: _Section, key: str) -> list[bytes]:
    path = section.string(key, "").strip()
    if not path:
        raise section.error(key, "expected a file name")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise section.error(key, f'cannot read "{path}": {exc.strerror or exc}') from None
    except UnicodeDecodeError:
        raise section.error(key, f'"{path}" is not UTF-8 text') from None
    digests: list[bytes] = []
    for number, line in enumerate(lines, 1):
        text = line.partition("#")[0].strip()
        if text:
            digests.append(_digest(text, lambda problem: section.error(key, f"{path} line {number}: {problem}")))
    if not digests:
        raise section.error(key, f'"{path}" holds no key digests (one per line; "#" starts a comment)')
    return digests


def _read_digest_env(section: _Section, key: str, environ: Mapping[str, str]) -> list[bytes]:
    name = section.string(key, "").strip()
    if not _ENV_NAME.fullmatch(name):
        raise section.error(key, f'expected an environment variable name, got "{name}"')
    value = environ.get(name)
    if value is None:
        raise section.error(key, f"environment variable {name} is not set")
    digests: list[bytes] = []
    for index, part in enumerate(value.split(",")):
        if part.strip():
            digests.append(_digest(part, lambda problem: section.error(key, f"${name} entry {index + 1}: {problem}")))
    if not digests:
        raise section.error(key, f"environment variable {name} holds no key digests (comma-separated)")
    return digests


def _digests(section: _Section, base: str, environ: Mapping[str, str]) -> tuple[bytes, ...]:
    """The digests of ``base``, ``base_file`` and ``base_env`` together, each once, in order."""
    found: dict[bytes, None] = {}
    for index, item in enumerate(section.sequence(base)):
        found[_digest(item, lambda problem: section.error(f"{base}[{index}]", problem))] = None
    if section.has(f"{base}_file"):
        found.update(dict.fromkeys(_read_digest_file(section, f"{base}_file")))
    else:
        section.raw(f"{base}_file")
    if section.has(f"{base}_env"):
        found.update(dict.fromkeys(_read_digest_env(section, f"{base}_env", environ)))
    else:
        section.raw(f"{base}_env")
    return tuple(found)


def parse_auth(section: _Section, environ: Mapping[str, str] = os.environ) -> AuthConfig:
    """
    Read a ``server.auth`` section into an :class:`AuthConfig`.

    Files are read and environment variables looked up now (again on each
    reload).  Raises :class:`~olladmr.config.ConfigError` naming the key
    and, for files, the file and line.
    """
    api = _digests(section, "api_keys", environ)
    admin = _digests(section, "admin_keys", environ)
    rpm = section.integer("requests_per_minute", 0, minimum=0)
    if rpm and not api:
        raise section.error("requests_per_minute", "is a per-API-key limit but no api_keys are configured")
    section.finish()
    return AuthConfig(api_key_digests=api, admin_key_digests=admin, per_key_requests_per_minute=rpm)


# --------------------------------------------------------------------------
# Checking


def presented_keys(headers: Headers) -> Iterator[bytes]:
    """The keys a request presents: its ``Authorization: Bearer`` token, then its ``x-api-key``."""
    authorization = headers.getRawHeaders(b"authorization")
    if authorization:
        scheme, _, token = authorization[0].strip().partition(b" ")
        token = token.strip()
        if scheme.lower() == b"bearer" and token:
            yield token
    api_key = headers.getRawHeaders(b"x-api-key")
    if api_key and api_key[0].strip():
        yield api_key[0].strip()


def _match(digest: bytes, accepted: tuple[bytes, ...]) -> int:
    """The index of ``digest`` in ``accepted`` or -1, comparing against every entry in constant time."""
    found = -1
    for index, candidate in enumerate(accepted):
        if hmac.compare_digest(candidate, digest) and found < 0:
            found = index
    return found


class Authenticator:
    """Checks presented keys against the configured digests."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._ids = tuple(key_id(digest) for digest in config.api_key_digests)

    @property
    def required(self) -> bool:
        """Whether API keys are configured (so requests without a valid one are refused)."""
        return bool(self.config.api_key_digests)

    @property
    def admin_required(self) -> bool:
        """Whether admin keys are configured (so ``/internal/*`` needs one)."""
        return bool(self.config.admin_key_digests)

    def identify(self, headers: Headers) -> str | None:
        """The key id of a valid API key among the presented ones, or ``None`` if missing or wrong."""
        if not self.config.api_key_digests:
            return None
        for key in presented_keys(headers):
            index = _match(hashlib.sha256(key).digest(), self.config.api_key_digests)
            if index >= 0:
                return self._ids[index]
        return None

    def check_admin(self, headers: Headers) -> bool:
        """Whether the request may use the admin routes: true if no admin keys are configured."""
        if not self.config.admin_key_digests:
            return True
        for key in presented_keys(headers):
            if _match(hashlib.sha256(key).digest(), self.config.admin_key_digests) >= 0:
                return True
        return False


def unauthorized() -> ClientError:
    """The 401 answer for a missing or wrong API key."""
    return ClientError(
        401,
        "a valid API key is required: send it as \"Authorization: Bearer KEY\" or \"x-api-key: KEY\"",
        "invalid_request_error",
        "invalid_api_key",
        {b"www-authenticate": b'Bearer realm="olladmr"'},
    )


def admin_unauthorized() -> ClientError:
    """The 401 answer for a missing or wrong admin key on ``/internal/*``."""
    return ClientError(
        401,
        "this route needs an admin key: send it as \"Authorization: Bearer KEY\" or \"x-api-key: KEY\"",
        "invalid_request_error",
        "invalid_admin_key",
        {b"www-authenticate": b'Bearer realm="olladmr-admin"'},
    )
