"""
Reading a few top-level members of a large JSON object without building the rest.

A model-routed POST needs its ``model`` (and, for affinity, the conversation's
opening); a 20 MB embeddings request is almost all ``input``.  :func:`members`
validates the whole document exactly as :func:`json.loads` does -- same
encodings, same grammar (``NaN``/``Infinity`` included), same strict strings,
duplicate keys resolved the same way -- but builds Python objects only for
the members asked for.  UTF-8 (the usual case) is scanned as bytes, with no
decoded copy of the document: its encoding is checked a megabyte at a time,
strings and numbers are matched by regular expressions (C speed), and
containers by a small iterative state machine, so nesting depth costs no
recursion.  ``tests/test_jsonscan.py`` checks the equivalence with property
tests.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Collection

_WS = re.compile(rb"[ \t\n\r]*")
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]+|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LITERALS = {ord("n"): b"null", ord("t"): b"true", ord("f"): b"false", ord("N"): b"NaN", ord("I"): b"Infinity"}
_CHUNK = 1 << 20


class NotAnObject(ValueError):
    """The document is valid JSON of another type than an object (the caller decides what to say)."""


def _ws(raw: bytes, at: int) -> int:
    match = _WS.match(raw, at)
    return match.end() if match is not None else at


def _string(raw: bytes, at: int) -> int:
    """The end of the JSON string whose quote is at ``at`` (strict, as json.loads), or a JSONDecodeError."""
    match = _STRING.match(raw, at)
    if match is None:
        raise json.JSONDecodeError("Invalid string", raw.decode("utf-8", "replace"), at)
    return match.end()


def _skip(raw: bytes, at: int) -> int:
    """The end of the JSON value starting at ``at`` (no leading whitespace), checked but not built."""
    stack: list[int] = []
    while True:
        if at >= len(raw):
            raise _error("Expecting value", raw, at)
        char = raw[at]
        if char == 0x22:  # "
            at = _string(raw, at)
        elif char == 0x7B:  # {
            at = _ws(raw, at + 1)
            if raw.startswith(b"}", at):
                at += 1
            else:
                stack.append(0x7D)
                at = _key(raw, at)
                continue
        elif char == 0x5B:  # [
            at = _ws(raw, at + 1)
            if raw.startswith(b"]", at):
                at += 1
            else:
                stack.append(0x5D)
                continue
        elif char in _LITERALS and raw.startswith(_LITERALS[char], at):
            at += len(_LITERALS[char])
        elif char == 0x2D and raw.startswith(b"-Infinity", at):
            at += 9
        else:
            number = _NUMBER.match(raw, at)
            if number is None or number.end() == at:
                raise _error("Expecting value", raw, at)
            at = number.end()
        while True:
            if not stack:
                return at
            at = _ws(raw, at)
            if at < len(raw) and raw[at] == stack[-1]:
                stack.pop()
                at += 1
                continue
            if not raw.startswith(b",", at):
                raise _error("Expecting ',' delimiter", raw, at)
            at = _ws(raw, at + 1)
            if stack[-1] == 0x7D:
                at = _key(raw, at)
            break


def _key(raw: bytes, at: int) -> int:
    if not raw.startswith(b'"', at):
        raise _error("Expecting property name enclosed in double quotes", raw, at)
    at = _ws(raw, _string(raw, at))
    if not raw.startswith(b":", at):
        raise _error("Expecting ':' delimiter", raw, at)
    return _ws(raw, at + 1)


def _error(message: str, raw: bytes, at: int) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, raw[max(0, at - 40) : at + 40].decode("utf-8", "replace"), min(at, 40))


def _validate_utf8(raw: bytes) -> None:
    """Raise UnicodeDecodeError where ``raw.decode("utf-8", "surrogatepass")`` would, a megabyte at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    view = memoryview(raw)
    for start in range(0, len(raw), _CHUNK):
        decoder.decode(view[start : start + _CHUNK])
    decoder.decode(b"", final=True)


def _members_utf8(raw: bytes, wanted: Collection[str]) -> dict[str, Any]:
    _validate_utf8(raw)
    at = _ws(raw, 0)
    if not raw.startswith(b"{", at):
        json.loads(raw)  # raises for invalid JSON, as json.loads would
        raise NotAnObject("the document is not a JSON object")
    found: dict[str, Any] = {}
    at = _ws(raw, at + 1)
    if raw.startswith(b"}", at):
        at += 1
    else:
        while True:
            if not raw.startswith(b'"', at):
                raise _error("Expecting property name enclosed in double quotes", raw, at)
            end = _string(raw, at)
            key = json.loads(raw[at:end])
            at = _ws(raw, end)
            if not raw.startswith(b":", at):
                raise _error("Expecting ':' delimiter", raw, at)
            at = _ws(raw, at + 1)
            end = _skip(raw, at)
            if key in wanted:
                found[key] = json.loads(raw[at:end])
            at = _ws(raw, end)
            if raw.startswith(b"}", at):
                at += 1
                break
            if not raw.startswith(b",", at):
                raise _error("Expecting ',' delimiter", raw, at)
            at = _ws(raw, at + 1)
    if _ws(raw, at) != len(raw):
        raise _error("Extra data", raw, at)
    return found


def members(raw: bytes | str, wanted: Collection[str]) -> dict[str, Any]:
    """
    The top-level members of the JSON object ``raw`` whose keys are in
    ``wanted`` (what ``{k: v for k, v in json.loads(raw).items() if k in
    wanted}`` gives).  Raises :class:`ValueError` (``json.JSONDecodeError``
    or ``UnicodeDecodeError``) exactly when :func:`json.loads` would, and
    :class:`NotAnObject` for valid JSON that is not an object.  UTF-8 bytes
    are scanned as they are; other encodings and ``str`` are decoded first.
    """
    if isinstance(raw, (bytes, bytearray)):
        encoding = json.detect_encoding(raw)
        if encoding == "utf-8":
            return _members_utf8(bytes(raw), wanted)
        text = raw.decode(encoding, "surrogatepass")  # UTF-16/32, or UTF-8 with a BOM (which json.loads drops)
    else:
        text = raw
        if text.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _members_utf8(text.encode("utf-8", "surrogatepass"), wanted)
