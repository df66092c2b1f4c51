"""
Reading a few top-level members of a large JSON object without building the rest.

A model-routed POST needs its ``model`` (and, for affinity, the conversation's
opening); a 20 MB embeddings request is almost all ``input``.  :func:`members`
validates the whole document exactly as :func:`json.loads` does -- same
encodings, same grammar (``NaN``/``Infinity`` included), same strict strings,
duplicate keys resolved the same way -- but builds Python objects only for
the members asked for; every other value is checked and skipped (strings by
the C-accelerated :func:`json.decoder.scanstring`, the rest by a small
iterative state machine, so nesting depth costs no recursion).
``tests/test_jsonscan.py`` checks the equivalence with property tests.
"""

from __future__ import annotations

import codecs
import json
import json.decoder
import re
from typing import Any, Callable, Collection

#: json's own string scanner (C-accelerated), strict like json.loads; typeshed does not declare it.
scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS_RE = re.compile(r"[ \t\n\r]*")


def _ws(text: str, at: int) -> int:
    """Past the JSON whitespace at ``at``."""
    match = _WS_RE.match(text, at)
    return match.end() if match is not None else at
# json's C scanner takes ASCII digits only (the pure-Python one's \d would take any Unicode digit)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LITERALS = {"n": "null", "t": "true", "f": "false", "N": "NaN", "I": "Infinity"}
_DECODER = json.JSONDecoder()


class NotAnObject(ValueError):
    """The document is valid JSON of another type than an object (the caller decides what to say)."""


def _error(message: str, text: str, at: int) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, text, at)


def _skip(text: str, at: int) -> int:
    """The end of the JSON value starting at ``at`` (no leading whitespace), checked but not built."""
    stack: list[str] = []  # "[" or "{" per open container
    while True:
        # a value starts at ``at``
        if at >= len(text):
            raise _error("Expecting value", text, at)
        char = text[at]
        if char == '"':
            at = scanstring(text, at + 1, True)[1]
        elif char == "{":
            at = _ws(text, at + 1)
            if text.startswith("}", at):
                at += 1
            else:
                stack.append("{")
                at = _key(text, at)
                continue
        elif char == "[":
            at = _ws(text, at + 1)
            if text.startswith("]", at):
                at += 1
            else:
                stack.append("[")
                continue
        elif char in _LITERALS and text.startswith(_LITERALS[char], at):
            at += len(_LITERALS[char])
        elif char == "-" and text.startswith("-Infinity", at):
            at += 9
        else:
            number = _NUMBER.match(text, at)
            if number is None or number.end() == at:
                raise _error("Expecting value", text, at)
            at = number.end()
        # after a value: close containers or move to the next element
        while True:
            if not stack:
                return at
            at = _ws(text, at)
            closer = "]" if stack[-1] == "[" else "}"
            if text.startswith(closer, at):
                stack.pop()
                at += 1
                continue
            if not text.startswith(",", at):
                raise _error("Expecting ',' delimiter", text, at)
            at = _ws(text, at + 1)
            if stack[-1] == "{":
                at = _key(text, at)
            break


def _key(text: str, at: int) -> int:
    """Past ``"key" :`` and the whitespace after it (``at`` is where the key's quote must be)."""
    if not text.startswith('"', at):
        raise _error("Expecting property name enclosed in double quotes", text, at)
    at = scanstring(text, at + 1, True)[1]
    at = _ws(text, at)
    if not text.startswith(":", at):
        raise _error("Expecting ':' delimiter", text, at)
    return _ws(text, at + 1)


# -- UTF-8 bytes, scanned as they are (the usual case: no decoded copy of the document is made)

_B_WS = re.compile(rb"[ \t\n\r]*")
_B_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]+|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"')
_B_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_B_LITERALS = {ord("n"): b"null", ord("t"): b"true", ord("f"): b"false", ord("N"): b"NaN", ord("I"): b"Infinity"}
_CHUNK = 1 << 20


def _bws(raw: bytes, at: int) -> int:
    match = _B_WS.match(raw, at)
    return match.end() if match is not None else at


def _bstring(raw: bytes, at: int) -> int:
    """The end of the JSON string whose quote is at ``at`` (strict, as json.loads), or a JSONDecodeError."""
    match = _B_STRING.match(raw, at)
    if match is None:
        raise json.JSONDecodeError("Invalid string", raw.decode("utf-8", "replace"), at)
    return match.end()


def _bskip(raw: bytes, at: int) -> int:
    """:func:`_skip` for UTF-8 bytes."""
    stack: list[int] = []
    while True:
        if at >= len(raw):
            raise _berror("Expecting value", raw, at)
        char = raw[at]
        if char == 0x22:  # "
            at = _bstring(raw, at)
        elif char == 0x7B:  # {
            at = _bws(raw, at + 1)
            if raw.startswith(b"}", at):
                at += 1
            else:
                stack.append(0x7D)
                at = _bkey(raw, at)
                continue
        elif char == 0x5B:  # [
            at = _bws(raw, at + 1)
            if raw.startswith(b"]", at):
                at += 1
            else:
                stack.append(0x5D)
                continue
        elif char in _B_LITERALS and raw.startswith(_B_LITERALS[char], at):
            at += len(_B_LITERALS[char])
        elif char == 0x2D and raw.startswith(b"-Infinity", at):
            at += 9
        else:
            number = _B_NUMBER.match(raw, at)
            if number is None or number.end() == at:
                raise _berror("Expecting value", raw, at)
            at = number.end()
        while True:
            if not stack:
                return at
            at = _bws(raw, at)
            if at < len(raw) and raw[at] == stack[-1]:
                stack.pop()
                at += 1
                continue
            if not raw.startswith(b",", at):
                raise _berror("Expecting ',' delimiter", raw, at)
            at = _bws(raw, at + 1)
            if stack[-1] == 0x7D:
                at = _bkey(raw, at)
            break


def _bkey(raw: bytes, at: int) -> int:
    if not raw.startswith(b'"', at):
        raise _berror("Expecting property name enclosed in double quotes", raw, at)
    at = _bws(raw, _bstring(raw, at))
    if not raw.startswith(b":", at):
        raise _berror("Expecting ':' delimiter", raw, at)
    return _bws(raw, at + 1)


def _berror(message: str, raw: bytes, at: int) -> json.JSONDecodeError:
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
    at = _bws(raw, 0)
    if not raw.startswith(b"{", at):
        json.loads(raw)  # raises for invalid JSON, as json.loads would
        raise NotAnObject("the document is not a JSON object")
    found: dict[str, Any] = {}
    at = _bws(raw, at + 1)
    if raw.startswith(b"}", at):
        at += 1
    else:
        while True:
            if not raw.startswith(b'"', at):
                raise _berror("Expecting property name enclosed in double quotes", raw, at)
            end = _bstring(raw, at)
            key = json.loads(raw[at:end])
            at = _bws(raw, end)
            if not raw.startswith(b":", at):
                raise _berror("Expecting ':' delimiter", raw, at)
            at = _bws(raw, at + 1)
            end = _bskip(raw, at)
            if key in wanted:
                found[key] = json.loads(raw[at:end])
            at = _bws(raw, end)
            if raw.startswith(b"}", at):
                at += 1
                break
            if not raw.startswith(b",", at):
                raise _berror("Expecting ',' delimiter", raw, at)
            at = _bws(raw, at + 1)
    if _bws(raw, at) != len(raw):
        raise _berror("Extra data", raw, at)
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
        text = raw.decode(encoding, "surrogatepass")
    else:
        text = raw
    if text.startswith("\ufeff"):
        raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    at = _ws(text, 0)
    if not text.startswith("{", at):
        json.loads(text)  # raises for invalid JSON, as json.loads would
        raise NotAnObject("the document is not a JSON object")
    found: dict[str, Any] = {}
    at = _ws(text, at + 1)
    if text.startswith("}", at):
        at += 1
    else:
        while True:
            if not text.startswith('"', at):
                raise _error("Expecting property name enclosed in double quotes", text, at)
            key, at = scanstring(text, at + 1, True)
            at = _ws(text, at)
            if not text.startswith(":", at):
                raise _error("Expecting ':' delimiter", text, at)
            at = _ws(text, at + 1)
            if key in wanted:
                found[key], at = _DECODER.raw_decode(text, at)
            else:
                at = _skip(text, at)
            at = _ws(text, at)
            if text.startswith("}", at):
                at += 1
                break
            if not text.startswith(",", at):
                raise _error("Expecting ',' delimiter", text, at)
            at = _ws(text, at + 1)
    if _ws(text, at) != len(text):
        raise _error("Extra data", text, at)
    return found
