"""
Who is asking: the client address a request is limited and logged by.

The TCP peer, unless ``server.rate_limits.trust_proxy_headers`` is on and
the peer is a trusted proxy (``trusted_proxy_cidrs``); then the right-most
address in ``X-Forwarded-For`` that is not a trusted proxy.  Only the
hops appended by trusted proxies are believed, so a client cannot choose
its address by sending its own ``X-Forwarded-For``.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from ..config.schema import IPAddress, IPNetwork, RateLimitConfig


def parse_address(text: str) -> IPAddress | None:
    """An address from ``1.2.3.4``, ``1.2.3.4:5678``, ``::1`` or ``[::1]:80``; IPv4-mapped IPv6 as IPv4."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    for network in networks:
        if address in network:
            return True
    return False


def client_address(peer_ip: str, xff_header_values: Sequence[bytes] | None, config: RateLimitConfig) -> str:
    """
    The address to limit ``peer_ip``'s request by (see the module docstring).

    A malformed hop stops the walk at the last trusted proxy; a chain made
    only of trusted proxies gives its left-most address.
    """
    if not xff_header_values or not config.trust_proxy_headers:
        return peer_ip
    networks = config.trusted_proxy_cidrs
    peer = parse_address(peer_ip)
    if peer is None or not _trusted(peer, networks):
        return peer_ip
    client = str(peer)
    for value in reversed(xff_header_values):
        for hop in reversed(value.decode("latin-1").split(",")):
            if not hop.strip():
                continue
            address = parse_address(hop)
            if address is None:
                return client
            client = str(address)
            if not _trusted(address, networks):
                return client
    return client
