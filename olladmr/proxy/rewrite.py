"""
The one body rewrite olladmr does: a model alias's request gets the real
model name the chosen endpoint lists.

Only the top-level ``"model"`` value changes (``"name"`` on DMR's Ollama
API when a request names its model there: DMR reads it first); every other byte of the
body stays as the client sent it.  The top-level members are walked once
(each value parsed once, so the cost is linear in the body), the value of
the last ``model`` member (the one JSON parsers keep) is replaced in
place, and the result is re-parsed to prove nothing else moved; if that
ever fails, the JSON is re-serialised instead.
"""

from __future__ import annotations

import json
from json.decoder import scanstring  # type: ignore[attr-defined]  # (public in json.decoder, absent from its stub)
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = " \t\n\r"


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _SPACE:
        at += 1
    return at


def _model_span(text: str, member: str = "model") -> tuple[int, int] | None:
    """Where the last top-level ``member``'s value is in ``text`` (a JSON object), if anywhere."""
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        return None
    at = _skip(text, at + 1)
    span = None
    while at < len(text) and text[at] != "}":
        if text[at] != '"':
            return None
        key, at = scanstring(text, at + 1)
        at = _skip(text, at)
        if text[at : at + 1] != ":":
            return None
        start = _skip(text, at + 1)
        _, at = _DECODER.raw_decode(text, start)
        if key == member:
            span = (start, at)
        at = _skip(text, at)
        if text[at : at + 1] == ",":
            at = _skip(text, at + 1)
    return span


def rewrite_model(raw: bytes, model: str, member: str = "model") -> bytes:
    """``raw`` (a JSON object with a top-level ``member``, ``model`` by default) naming ``model`` instead."""
    bom = b"\xef\xbb\xbf" if raw.startswith(b"\xef\xbb\xbf") else b""
    text = raw[len(bom) :].decode("utf-8", "surrogatepass")
    original: Any = json.loads(text)
    wanted = dict(original)
    wanted[member] = model
    try:
        span = _model_span(text, member)
    except (ValueError, IndexError):
        span = None
    if span is not None:
        candidate = text[: span[0]] + json.dumps(model) + text[span[1] :]
        try:
            if json.loads(candidate) == wanted:
                return bom + candidate.encode("utf-8", "surrogatepass")
        except ValueError:
            pass
    compact = json.dumps(wanted, separators=(",", ":"), ensure_ascii=False)
    try:
        return bom + compact.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        return bom + json.dumps(wanted, separators=(",", ":")).encode("ascii")
