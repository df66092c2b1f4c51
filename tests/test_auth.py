"""Unit tests for ``olladmr.edge.auth``: inbound API keys and admin keys."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from support import headers
from twisted.web.http_headers import Headers

from olladmr.config.schema import AuthConfig
from olladmr.edge import auth as auth_module
from olladmr.edge.auth import Authenticator, admin_unauthorized, hash_key, unauthorized


KEY, OTHER, ADMIN = "sk-olla-good", "sk-olla-other", "sk-olla-admin"


def authenticator(*keys: str, admin: tuple[str, ...] = ()) -> Authenticator:
    return Authenticator(
        AuthConfig(
            api_key_digests=tuple(hashlib.sha256(k.encode()).digest() for k in keys),
            admin_key_digests=tuple(hashlib.sha256(k.encode()).digest() for k in admin),
        )
    )


def test_hash_key_is_sha256_hex() -> None:
    """hash_key gives the SHA-256 hex digest operators put in the configuration."""
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_bearer_and_x_api_key_forms() -> None:
    """A valid key is accepted as a Bearer token or an x-api-key, and named by a short digest prefix."""
    auth = authenticator(OTHER, KEY)
    expected = hash_key(KEY)[:8]
    assert auth.required
    assert auth.identify(headers(authorization=f"Bearer {KEY}")) == expected
    assert auth.identify(headers(authorization=f"bearer   {KEY} ")) == expected
    assert auth.identify(headers(x_api_key=KEY)) == expected
    assert auth.identify(headers(authorization="Bearer unused", x_api_key=KEY)) == expected
    assert auth.identify(headers(authorization=f"Bearer {OTHER}")) == hash_key(OTHER)[:8]


def test_wrong_or_missing_key_is_refused() -> None:
    """A missing, wrong, empty or non-Bearer key identifies nobody."""
    auth = authenticator(KEY)
    assert auth.identify(Headers()) is None
    assert auth.identify(headers(authorization="Bearer nope")) is None
    assert auth.identify(headers(authorization="Bearer ")) is None
    assert auth.identify(headers(authorization=f"Basic {KEY}")) is None
    assert auth.identify(headers(x_api_key=KEY + "x")) is None
    assert not authenticator().required
    error = unauthorized()
    assert (error.status, error.code) == (401, "invalid_api_key")
    assert KEY not in error.message


def test_comparison_is_constant_time_over_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """hmac.compare_digest is used against every stored digest, even after the first one matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    auth = authenticator(KEY, OTHER, "third", "fourth")
    assert auth.identify(headers(x_api_key=KEY)) == hash_key(KEY)[:8]
    assert len(calls) == 4
    assert all(b == hashlib.sha256(KEY.encode()).digest() for _, b in calls)
    calls.clear()
    assert auth.identify(headers(x_api_key="wrong")) is None
    assert len(calls) == 4


def test_presented_key_is_not_kept() -> None:
    """The authenticator keeps digests and ids only, never the key it was shown."""
    auth = authenticator(KEY)
    auth.identify(headers(authorization=f"Bearer {KEY}"))
    assert KEY.encode() not in repr(vars(auth)).encode()
    assert KEY not in repr(auth.config)


def test_admin_keys_guard_internal_routes() -> None:
    """check_admin needs an admin key when admin keys exist, and an API key is not one."""
    auth = authenticator(KEY, admin=(ADMIN,))
    assert auth.admin_required
    assert auth.check_admin(headers(authorization=f"Bearer {ADMIN}"))
    assert auth.check_admin(headers(x_api_key=ADMIN))
    assert not auth.check_admin(headers(x_api_key=KEY))
    assert not auth.check_admin(Headers())
    assert auth.identify(headers(x_api_key=ADMIN)) is None
    assert authenticator(KEY).check_admin(Headers())
    assert admin_unauthorized().status == 401
