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
from typing import Iterator

from twisted.web.http_headers import Headers

from ..config.schema import AuthConfig
from ..errors import ClientError

KEY_ID_LENGTH = 8


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what goes into ``api_keys`` / ``admin_keys``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: bytes) -> str:
    """The short, non-secret name of a key: the first hex characters of its digest."""
    return digest.hex()[:KEY_ID_LENGTH]


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
    """Owns the accepted key digests and checks presented keys against them in constant time."""

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
