"""
The one body rewrite olladmr does: a model alias's request gets the real
model name the chosen endpoint lists.

Only the top-level ``"model"`` string changes; every other byte of the
body stays as the client sent it when that can be done safely (the value
is replaced in place and the result re-parsed to prove nothing else
moved), otherwise the JSON is re-serialised.
"""

from __future__ import annotations

import json
import re
from typing import Any

_MODEL_KEY = re.compile(rb'"model"\s*:\s*"')


def rewrite_model(raw: bytes, model: str) -> bytes:
    """``raw`` (a JSON object with a top-level ``model``) naming ``model`` instead."""
    original: Any = json.loads(raw)
    wanted = dict(original)
    wanted["model"] = model
    replacement = json.dumps(model).encode("utf-8")
    for match in _MODEL_KEY.finditer(raw):
        start = match.end() - 1  # the value's opening quote
        try:
            _, end = json.JSONDecoder().raw_decode(raw[start:].decode("utf-8"))
        except ValueError:
            continue
        end = start + len(raw[start:].decode("utf-8")[:end].encode("utf-8"))
        candidate = raw[:start] + replacement + raw[end:]
        try:
            if json.loads(candidate) == wanted:
                return candidate
        except ValueError:
            continue
    return json.dumps(wanted, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
