"""
Header hygiene between the client and an upstream DMR.

Hop-by-hop headers (RFC 9110 section 7.6.1, plus every header a
``Connection`` header names) never cross the proxy in either direction.
Client credentials stay with the proxy unless an endpoint asks for them;
upstreams cannot set ``X-Olla-*`` headers or cookies on our clients.
"""

from __future__ import annotations

from typing import Any, AnyStr, Iterable, Iterator, Sequence, TypeVar, overload

from twisted.web.http_headers import Headers

_T = TypeVar("_T")

#: Headers as they go upstream: (lower-case name, value) pairs, in order.
HeaderPairs = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Set by the proxy itself on the way up.
_REQUEST_MANAGED = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"}
)
CLIENT_CREDENTIALS = frozenset({b"authorization", b"cookie", b"x-api-key", b"proxy-authorization"})
_RESPONSE_DROPPED = frozenset({b"set-cookie"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The header names listed in ``Connection`` (lower-cased)."""
    return _listed(headers.getRawHeaders(b"connection") or ())


def _listed(values: Iterable[bytes]) -> frozenset[bytes]:
    """The header names listed in ``Connection`` values (lower-cased)."""
    return frozenset(token.strip().lower() for value in values for token in value.split(b",") if token.strip())


def _is_hop(name: bytes, named: frozenset[bytes]) -> bool:
    return name in HOP_BY_HOP or name.startswith(b"proxy-") or name in named


def upstream_request_headers(
    incoming: Headers,
    *,
    request_id: bytes,
    client_ip: bytes,
    scheme: bytes,
    endpoint_headers: Iterable[tuple[bytes, bytes]] = (),
    forward_credentials: bool = False,
) -> HeaderPairs:
    """
    Build the headers for the upstream request from the client's (values
    as Twisted's server parsed them: no CR, LF or NUL).

    Adds ``X-Olla-Request-ID``, ``X-Forwarded-For`` (the client address
    appended to any existing chain), ``X-Forwarded-Host`` and
    ``X-Forwarded-Proto``, then the endpoint's configured headers, which
    replace any client header of the same name.
    """
    named = connection_tokens(incoming)
    out: HeaderPairs = []
    append = out.append
    chain: list[bytes] = []
    host = b""
    endpoint_names = {name.lower() for name, _ in endpoint_headers} if endpoint_headers else ()
    for name, values in incoming.getAllRawHeaders():
        lname = name.lower()
        if lname in _REQUEST_MANAGED:
            if lname == b"x-forwarded-for":
                chain.extend(values)
            elif lname == b"host" and values:
                host = values[0]
            continue
        if _is_hop(lname, named) or lname.startswith(b"x-olla-") or lname in endpoint_names:
            continue
        if lname in CLIENT_CREDENTIALS and not forward_credentials:
            continue
        for value in values:
            append((lname, value))
    append((b"x-forwarded-for", b", ".join([*chain, client_ip]) if chain else client_ip))
    if host:
        append((b"x-forwarded-host", host))
    append((b"x-forwarded-proto", scheme))
    append((b"x-olla-request-id", request_id))
    for name, value in endpoint_headers:
        append((name.lower(), value))
    return out


def header_values(pairs: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of ``name`` (lower-case) among ``pairs``."""
    return [value for key, value in pairs if key == name]


def _dropped(lname: bytes, named: frozenset[bytes]) -> bool:
    """Whether a response header stays with the proxy: hop-by-hop, one of ours (``X-Olla-*``), a cookie."""
    return _is_hop(lname, named) or lname.startswith(b"x-olla-") or lname in _RESPONSE_DROPPED


def copy_response_headers(upstream: Headers, outgoing: Headers) -> None:
    """
    Copy the upstream's end-to-end response headers onto ``outgoing``.

    Twisted's HTTP client keeps framing headers (``Content-Length``,
    ``Transfer-Encoding``, ``Connection``) out of ``response.headers``; the
    proxy restores ``Content-Length`` from ``response.length``.
    """
    named = connection_tokens(upstream)
    put = outgoing.setRawHeaders
    for name, values in upstream.getAllRawHeaders():
        lname = name.lower()
        if not _dropped(lname, named):
            put(lname, list(values))


#: Upstream response headers olladmr also sets or merges: copied into the response's ``Headers``, never passed through.
_MANAGED_RESPONSE = frozenset({b"date", b"vary"})


class ResponseHeaders(Headers):
    """
    A response's headers: olladmr's own (what ``Headers`` stores) and the
    upstream's end-to-end header lines as it sent them (``passthrough``).
    Every accessor sees both, olladmr's own first and winning: an upstream
    line is hidden where olladmr set the same name, as ``setRawHeaders``
    would have replaced it; ``removeHeader`` removes both.
    """

    __slots__ = ("passthrough",)

    def __init__(self, rawHeaders: Any = None) -> None:
        super().__init__(rawHeaders)
        self.passthrough: HeaderPairs = []

    def take_upstream(self, pairs: HeaderPairs) -> None:
        """The upstream's response headers (as parsed: no CR, LF or NUL), less what stays with the proxy."""
        named = _listed(value for name, value in pairs if len(name) == 10 and name.lower() == b"connection")
        through: HeaderPairs = []
        managed: dict[bytes, list[bytes]] = {}
        for name, value in pairs:
            lname = name.lower()
            if _dropped(lname, named):
                continue
            if lname in _MANAGED_RESPONSE:
                managed.setdefault(lname, []).append(value)
            else:
                through.append((name, value))
        for lname, values in managed.items():
            self.setRawHeaders(lname, values)
        self.passthrough = through

    @staticmethod
    def _key(name: bytes | str) -> bytes:
        return (name.encode("ascii", "replace") if isinstance(name, str) else name).lower()

    def _through(self, name: bytes | str) -> list[bytes]:
        key = self._key(name)
        return [value for line, value in self.passthrough if line.lower() == key]

    @overload
    def getRawHeaders(self, name: AnyStr) -> Sequence[AnyStr] | None: ...

    @overload
    def getRawHeaders(self, name: AnyStr, default: _T) -> Sequence[AnyStr] | _T: ...

    def getRawHeaders(self, name: Any, default: Any = None) -> Any:
        if not self.passthrough or super().hasHeader(name):
            return super().getRawHeaders(name, default)
        found = self._through(name)
        if not found:
            return default
        return [value.decode("utf-8") for value in found] if isinstance(name, str) else found

    def hasHeader(self, name: Any) -> bool:
        return super().hasHeader(name) or bool(self.passthrough and self._through(name))

    def removeHeader(self, name: Any) -> None:
        super().removeHeader(name)
        if self.passthrough:
            key = self._key(name)
            self.passthrough = [(line, value) for line, value in self.passthrough if line.lower() != key]

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, Sequence[bytes]]]:
        if not self.passthrough:
            yield from super().getAllRawHeaders()
            return
        own = set()
        for name, values in super().getAllRawHeaders():
            own.add(name.lower())
            yield name, values
        for name, value in self.passthrough:  # the upstream's lines, as it sent them
            if name.lower() not in own:
                yield name, [value]

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, passthrough={self.passthrough!r})"

    def copy(self) -> ResponseHeaders:
        copied = ResponseHeaders()
        for name, values in super().getAllRawHeaders():
            copied.setRawHeaders(name, list(values))
        copied.passthrough = list(self.passthrough)
        return copied


def merge_vary(existing: Sequence[bytes] | None, token: bytes) -> bytes:
    """A ``Vary`` value holding the ``existing`` tokens plus ``token`` (once, case-insensitively)."""
    tokens = [t.strip() for value in existing or () for t in value.split(b",") if t.strip()]
    if b"*" in tokens or token.lower() in (t.lower() for t in tokens):
        return b", ".join(tokens)
    return b", ".join([*tokens, token])


def add_response_headers(outgoing: Headers, extra: dict[bytes, bytes]) -> None:
    """Set ``extra`` on ``outgoing``; a ``Vary`` in ``extra`` is merged into any existing one."""
    for name, value in extra.items():
        if name == b"vary":
            value = merge_vary(outgoing.getRawHeaders(b"vary"), value)
        outgoing.setRawHeaders(name, [value])


_PRINTABLE = frozenset(range(0x21, 0x7F))


def client_request_id(headers: Headers) -> bytes | None:
    """The client's ``X-Request-ID`` if it is 1-128 printable ASCII characters."""
    values = headers.getRawHeaders(b"x-request-id")
    if not values:
        return None
    value = values[0]
    if 0 < len(value) <= 128 and _PRINTABLE.issuperset(value):
        return value
    return None
