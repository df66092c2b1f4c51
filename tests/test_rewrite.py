"""Unit tests for ``olladmr.proxy.rewrite``: a model alias's body names the real model, every other byte kept."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from olladmr.proxy import rewrite
from olladmr.proxy.rewrite import rewrite_model

NEW = "ai/smollm2:latest"

PROPERTY = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def pairs(raw: bytes | str) -> Any:
    """``raw`` parsed with every object as its list of (key, value) pairs: order and duplicates count."""
    return json.loads(raw, object_pairs_hook=list)


def with_model(document: dict[str, Any], model: str) -> dict[str, Any]:
    """``document`` with its top-level ``model`` replaced, key order kept."""
    return {key: (model if key == "model" else value) for key, value in document.items()}


# -- examples


def test_only_the_top_level_model_changes_and_every_other_byte_is_kept() -> None:
    """Nested "model" keys, odd whitespace, number spellings and escapes elsewhere come out byte for byte."""
    raw = (
        b'{\n  "messages": [{"role": "user", "content": "caf\\u00e9 \\"model\\": \\"gpt-4o-mini\\"",'
        b' "model": "gpt-4o-mini"}],\n\t"model"  :\r\n  "gpt-4o-mini" ,\n  "temperature": 1.50,'
        b' "n": 1E2, "emoji": "\\ud83d\\ude00", "slash": "a\\/b"\n}'
    )
    expected = raw.replace(b'"model"  :\r\n  "gpt-4o-mini"', b'"model"  :\r\n  "ai/smollm2:latest"')
    assert expected != raw
    assert rewrite_model(raw, NEW) == expected


def test_a_top_level_model_after_nested_ones_is_the_one_replaced() -> None:
    """The body's own "model" is replaced even when nested ones with the same value come first."""
    raw = b'{"input":[{"model":"gpt-4o-mini"},{"model":"gpt-4o-mini","x":[{"model":"gpt-4o-mini"}]}],"model":"gpt-4o-mini"}'
    out = rewrite_model(raw, NEW)
    assert out == raw[: raw.rindex(b'"gpt-4o-mini"')] + b'"ai/smollm2:latest"}'
    assert pairs(out)[0] == ("input", pairs(raw)[0][1])


def test_the_model_value_s_own_escapes_are_replaced_whole() -> None:
    """A model value written with escapes is replaced from its opening to its closing quote."""
    raw = b'{"model": "gpt\\u002d4o\\/mini\\"x", "stream": true}'
    assert rewrite_model(raw, NEW) == b'{"model": "ai/smollm2:latest", "stream": true}'


def test_the_new_model_is_written_as_a_json_string() -> None:
    """A model name with quotes, backslashes or non-ASCII characters is escaped as JSON does."""
    raw = b'{"model": "gpt-4o-mini", "x": "\xc3\xa9"}'
    model = 'caf\u00e9 "q" \\ /'
    out = rewrite_model(raw, model)
    assert out == b'{"model": ' + json.dumps(model).encode() + b', "x": "\xc3\xa9"}'
    assert json.loads(out) == {"model": model, "x": "\u00e9"}


def test_raw_utf8_elsewhere_is_kept_as_utf8() -> None:
    """Unescaped UTF-8 text in the body stays the same bytes (it is not re-escaped)."""
    raw = '{"messages":[{"content":"日本語 ✓ café"}],"model":"gpt-4o-mini"}'.encode()
    assert rewrite_model(raw, NEW) == raw.replace(b"gpt-4o-mini", NEW.encode())


def test_keys_that_merely_contain_model_are_left_alone() -> None:
    """Keys such as ``"\\"model"``, ``model"`` or ``submodel`` keep their values."""
    raw = b'{"\\"model": "gpt-4o-mini", "model\\"": "gpt-4o-mini", "submodel": "gpt-4o-mini", "model": "gpt-4o-mini"}'
    out = rewrite_model(raw, NEW)
    assert out == raw[: raw.rindex(b'"gpt-4o-mini"')] + b'"ai/smollm2:latest"}'
    assert json.loads(out) == {'"model': "gpt-4o-mini", 'model"': "gpt-4o-mini", "submodel": "gpt-4o-mini", "model": NEW}


def test_a_string_that_spells_a_model_key_is_left_alone() -> None:
    """Text that reads ``"model": "...`` inside a string value is not mistaken for the key."""
    raw = b'{"prompt": "say \\"model\\": \\"x\\" please", "model": "m"}'
    assert rewrite_model(raw, NEW) == b'{"prompt": "say \\"model\\": \\"x\\" please", "model": "ai/smollm2:latest"}'


def test_the_same_model_name_gives_the_same_bytes() -> None:
    """Rewriting to the name the body already has returns the body unchanged."""
    raw = b'{ "model" : "ai/smollm2:latest" , "messages" : [ ] }'
    assert rewrite_model(raw, NEW) == raw


def test_with_duplicate_model_keys_the_one_that_counts_is_replaced() -> None:
    """With two top-level "model" keys, the last (the one JSON parsers keep) names the new model."""
    raw = b'{"model":"a","messages":[],"model":"b"}'
    out = rewrite_model(raw, NEW)
    assert out == b'{"model":"a","messages":[],"model":"ai/smollm2:latest"}'
    assert json.loads(out)["model"] == NEW


def test_an_escaped_model_key_is_replaced_in_place_too() -> None:
    """A top-level key spelled with escapes is still the model member: its value is replaced, every other byte kept."""
    raw = b'{ "mod\\u0065l" : "gpt-4o-mini", "x": "\\u00e9", "n": 1.50 }'
    assert rewrite_model(raw, NEW) == b'{ "mod\\u0065l" : "ai/smollm2:latest", "x": "\\u00e9", "n": 1.50 }'


def test_a_non_string_model_is_replaced_by_reserialising() -> None:
    """A top-level model that is not a string is still replaced (by re-serialising)."""
    raw = b'{"model": 5, "stream": false}'
    assert json.loads(rewrite_model(raw, NEW)) == {"model": NEW, "stream": False}


def test_a_utf8_bom_is_kept() -> None:
    """A body starting with a UTF-8 byte order mark keeps it."""
    raw = b'\xef\xbb\xbf{"model":"gpt-4o-mini"}'
    assert rewrite_model(raw, NEW) == b'\xef\xbb\xbf{"model":"ai/smollm2:latest"}'


@pytest.mark.parametrize(
    "raw",
    [b'{"mod\\u0065l": "gpt-4o-mini", "text": "\\ud800"}', b'{"model": "gpt-4o-mini", "text": "\xed\xa0\x80"}'],
    ids=["escaped-key-and-lone-surrogate-escape", "raw-surrogate-bytes"],
)
def test_a_body_with_a_lone_surrogate_is_still_rewritten(raw: bytes) -> None:
    """A body holding a lone surrogate (which the route's ``json.loads`` accepts) is rewritten, not crashed on."""
    out = rewrite_model(raw, NEW)
    assert json.loads(out) == {"model": NEW, "text": "\ud800"}


def test_rewrite_work_stays_linear_with_many_nested_model_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON parsing done for one rewrite stays within a few times the body size, however many nested keys."""
    parsed = [0]
    real_loads = json.loads

    class CountingDecoder(json.JSONDecoder):
        def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
            parsed[0] += len(s) - idx
            return super().raw_decode(s, idx)

    def loads(s: Any, *args: Any, **kwargs: Any) -> Any:
        parsed[0] += len(s)
        return real_loads(s, *args, **kwargs)

    monkeypatch.setattr(rewrite, "json", SimpleNamespace(loads=loads, dumps=json.dumps, JSONDecoder=CountingDecoder))
    body = {"messages": [{"role": "user", "content": "hi", "model": "x"} for _ in range(500)], "model": "gpt-4o-mini"}
    raw = json.dumps(body).encode()
    out = rewrite_model(raw, NEW)
    assert out == raw.replace(b'"model": "gpt-4o-mini"', b'"model": "ai/smollm2:latest"')
    assert parsed[0] <= 8 * len(raw), f"parsed {parsed[0]:,} characters for a {len(raw):,}-byte body"


# -- properties

MODELS = st.sampled_from(["gpt-4o-mini", NEW, "caf\u00e9", 'q"uote\\', "model"]) | st.text(max_size=10)
KEYS = st.sampled_from(["model", "messages", "content", "role", '"model', 'model"', "Model", "a\\"]) | st.text(
    max_size=6
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | MODELS
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=24,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with a string top-level "model" somewhere among other (nested, model-keyed) members."""
    others = draw(st.dictionaries(KEYS.filter(lambda k: k != "model"), VALUES, max_size=6))
    items = list(others.items())
    items.insert(draw(st.integers(min_value=0, max_value=len(items))), ("model", draw(MODELS)))
    return dict(items)


FORMATS = st.fixed_dictionaries(
    {
        "indent": st.sampled_from([None, 0, 1, 2, 4, "\t", " \r\n"]),
        "separators": st.sampled_from([None, (",", ":"), (", ", ": "), (" ,\t", " :  "), (",\n", ":\r\n")]),
        "ensure_ascii": st.booleans(),
    }
)


@PROPERTY
@given(document=documents(), model=MODELS, fmt=FORMATS)
def test_rewrite_parses_to_the_original_with_only_model_replaced(
    document: dict[str, Any], model: str, fmt: dict[str, Any]
) -> None:
    """For any object and any formatting, the result parses to the original with only the top-level model changed."""
    raw = json.dumps(document, **fmt).encode("utf-8")
    out = rewrite_model(raw, model)
    assert pairs(out) == pairs(json.dumps(with_model(document, model)))


PLACEHOLDER = "\x00placeholder\x00"  # longer than any generated string, so it occurs once


@PROPERTY
@given(document=documents(), model=MODELS, fmt=FORMATS)
def test_rewrite_is_the_same_dump_with_the_model_replaced(
    document: dict[str, Any], model: str, fmt: dict[str, Any]
) -> None:
    """A body dumped with any formatting comes back as that same dump, its model value now ``json.dumps(model)``."""
    raw = json.dumps(document, **fmt).encode("utf-8")
    template = json.dumps(with_model(document, PLACEHOLDER), **fmt).encode("utf-8")
    slot = json.dumps(PLACEHOLDER).encode()
    assert template.count(slot) == 1
    expected = template.replace(slot, json.dumps(model).encode())
    assert rewrite_model(raw, model) == expected
    if fmt["ensure_ascii"] or model.isascii():
        assert expected == json.dumps(with_model(document, model), **fmt).encode("utf-8")


@PROPERTY
@given(document=documents(), model=MODELS)
def test_rewrite_of_a_comma_space_colon_space_dump_equals_that_dump_with_the_model(
    document: dict[str, Any], model: str
) -> None:
    """A body dumped with ``separators=(", ", ": ")`` comes back as exactly that dump with the new model."""
    raw = json.dumps(document, separators=(", ", ": ")).encode()
    assert rewrite_model(raw, model) == json.dumps(with_model(document, model), separators=(", ", ": ")).encode()


@PROPERTY
@given(document=documents(), model=MODELS, fmt=FORMATS)
def test_rewriting_twice_is_rewriting_once(document: dict[str, Any], model: str, fmt: dict[str, Any]) -> None:
    """Rewriting a rewritten body to the same model changes nothing more."""
    once = rewrite_model(json.dumps(document, **fmt).encode("utf-8"), model)
    assert rewrite_model(once, model) == once
