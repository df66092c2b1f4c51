"""Unit tests for ``olladmr.edge.clientaddr``: the client address behind trusted proxies (X-Forwarded-For)."""

from __future__ import annotations

import ipaddress
from typing import Any

from support import make_limiter

from olladmr.edge.clientaddr import client_address
from olladmr.edge.ratelimit import RateLimiter


def trusting(**values: Any) -> RateLimiter:
    limiter, _ = make_limiter(trust_proxy_headers=True, **values)
    return limiter


def test_xff_ignored_unless_trusted() -> None:
    """Without trust_proxy_headers the TCP peer is the client whatever X-Forwarded-For says."""
    limiter, _ = make_limiter()
    assert client_address("10.0.0.5", [b"1.2.3.4"], limiter.config) == "10.0.0.5"


def test_xff_from_untrusted_peer_is_ignored() -> None:
    """A peer outside trusted_proxy_cidrs cannot set its address through X-Forwarded-For."""
    limiter = trusting()
    assert client_address("203.0.113.9", [b"1.2.3.4"], limiter.config) == "203.0.113.9"
    assert client_address("203.0.113.9", None, limiter.config) == "203.0.113.9"


def test_xff_from_trusted_peer_gives_client() -> None:
    """Behind a trusted proxy the address it appended is the client."""
    limiter = trusting()
    assert client_address("10.0.0.5", [b"198.51.100.7"], limiter.config) == "198.51.100.7"
    assert client_address("127.0.0.1", [b" 198.51.100.7 "], limiter.config) == "198.51.100.7"
    assert client_address("10.0.0.5", [], limiter.config) == "10.0.0.5"


def test_xff_spoofed_chain_takes_rightmost_untrusted() -> None:
    """Addresses a client put in front of the chain are skipped: the right-most untrusted hop wins."""
    limiter = trusting()
    header = [b"1.1.1.1, 8.8.8.8, 198.51.100.7, 10.0.0.3"]
    assert client_address("10.0.0.5", header, limiter.config) == "198.51.100.7"
    split = [b"1.1.1.1, 8.8.8.8", b"198.51.100.7", b"10.0.0.3"]
    assert client_address("10.0.0.5", split, limiter.config) == "198.51.100.7"


def test_xff_garbage_stops_at_last_trusted_hop() -> None:
    """A malformed hop is not believed: the last trusted proxy's address is used instead."""
    limiter = trusting()
    assert client_address("10.0.0.5", [b"1.2.3.4, not-an-ip, 10.0.0.3"], limiter.config) == "10.0.0.3"
    assert client_address("10.0.0.5", [b"evil"], limiter.config) == "10.0.0.5"


def test_xff_all_trusted_gives_leftmost_and_handles_ports_and_v6() -> None:
    """A chain of trusted proxies gives its left-most hop; ports, brackets and mapped IPv4 are understood."""
    limiter = trusting(trusted_proxy_cidrs=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))
    assert client_address("10.0.0.5", [b"10.1.1.1, 10.2.2.2"], limiter.config) == "10.1.1.1"
    assert client_address("10.0.0.5", [b"198.51.100.7:4321"], limiter.config) == "198.51.100.7"
    assert client_address("fd00::1", [b"[2001:db8::1]:443"], limiter.config) == "2001:db8::1"
    assert client_address("::ffff:10.0.0.5", [b"2001:db8::2"], limiter.config) == "2001:db8::2"
    assert client_address("unix", [b"1.2.3.4"], limiter.config) == "unix"
