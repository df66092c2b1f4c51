"""``olladmr.jsonscan.members`` against ``json.loads``: the same documents accepted, the same members returned."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from olladmr.jsonscan import NotAnObject, members

KEYS = ["model", "input", "messages", "m", "", "modél", "a\"b"]
WANTED = {"model", "messages", "modél"}
CHECKS = settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

whitespace = st.text(alphabet=" \t\n\r", max_size=3)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)


def render(value: Any, draw: Any) -> str:
    """``value`` as JSON text with random whitespace (objects are lists of pairs: duplicate keys survive)."""
    ws = lambda: draw(whitespace)  # noqa: E731
    if isinstance(value, tuple):  # an object: ((key, value), ...)
        inner = ",".join(f"{ws()}{json.dumps(k)}{ws()}:{ws()}{render(v, draw)}{ws()}" for k, v in value)
        return "{" + (inner or ws()) + "}"
    if isinstance(value, list):
        return "[" + (",".join(f"{ws()}{render(v, draw)}{ws()}" for v in value) or ws()) + "]"
    return json.dumps(value, ensure_ascii=draw(st.booleans()))


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(st.tuples(st.sampled_from(KEYS), children), max_size=4).map(tuple),
    ),
    max_leaves=25,
)
documents = st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=6).map(tuple)


def same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def expected(text: str | bytes) -> dict[str, Any]:
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return {k: v for k, v in parsed.items() if k in WANTED}


@CHECKS
@given(documents, st.data())
def test_valid_objects_give_the_members_json_loads_gives(document: Any, data: Any) -> None:
    text = data.draw(whitespace) + render(document, data.draw) + data.draw(whitespace)
    assert same(members(text, WANTED), expected(text))
    assert same(members(text.encode("utf-8"), WANTED), expected(text.encode("utf-8")))


@CHECKS
@given(documents, st.data())
def test_damaged_documents_are_refused_exactly_when_json_loads_refuses(document: Any, data: Any) -> None:
    text = render(document, data.draw)
    position = data.draw(st.integers(0, len(text)))
    edit = data.draw(st.sampled_from(["delete", "insert", "truncate"]))
    if edit == "delete":
        text = text[:position] + text[position + 1:]
    elif edit == "insert":
        text = text[:position] + data.draw(st.sampled_from(list(',:[]{}"\\ 0-.eE1nx\x00\u00e9'))) + text[position:]
    else:
        text = text[:position]
    raw = text.encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):  # damage the bytes too: invalid UTF-8, a BOM
        raw = raw[:position] + data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf"])) + raw[position:]
    for document_ in (text, raw):
        try:
            reference: Any = json.loads(document_)
        except ValueError:
            with pytest.raises(ValueError):
                members(document_, WANTED)
            continue
        if isinstance(reference, dict):
            assert same(members(document_, WANTED), {k: v for k, v in reference.items() if k in WANTED})
        else:
            with pytest.raises(NotAnObject):
                members(document_, WANTED)


@pytest.mark.parametrize(
    "text",
    [
        '{"model": 1, "model": "x"}', '{"model": "x", "input": [1, {"a": [true, false, null]}]}',
        '{"input": NaN, "model": -Infinity}', '{"a": "\\ud800"}', "{}", ' { } ',
        '{"model":"m"} x', '{"model":"m",}', '{"model" "m"}', '{"a": [1,]}', '{"a": 01}', '{"a": "\t"}',
        '{"a": tru}', '{"a": -}', '{"a": 1.}', '{"a": .5}', '{"a": "x}', '[1]', '"model"', "", "\ufeff{}",
        '{"a": [[[[[[[[[[1]]]]]]]]]], "model": "m"}', '{"a": {"b": {"c": {}}}, "model": "m"}',
    ],
)
def test_edge_cases_match_json_loads(text: str) -> None:
    for raw in (text, text.encode("utf-8"), text.encode("utf-16")):
        try:
            reference = json.loads(raw)
        except ValueError:
            with pytest.raises(ValueError):
                members(raw, WANTED)
            continue
        if isinstance(reference, dict):
            result = members(raw, WANTED)
            assert same(result, {k: v for k, v in reference.items() if k in WANTED})
        else:
            with pytest.raises(NotAnObject):
                members(raw, WANTED)


def test_deep_nesting_in_a_skipped_member_costs_no_recursion() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    document = '{"input": ' + deep + ', "model": "m"}'
    assert members(document, WANTED) == members(document.encode(), WANTED) == {"model": "m"}


def test_nan_survives() -> None:
    assert math.isnan(members('{"model": NaN}', WANTED)["model"])


# -- through the proxy: large bodies are routed from their members, forwarded unchanged


@pytest_twisted.ensureDeferred
async def test_a_large_body_is_routed_by_its_members_and_forwarded_byte_for_byte(daemon_factory, fake):
    from conftest import config_for

    from olladmr.routes import LARGE_BODY

    daemon = await daemon_factory(config_for(fake))
    inputs = [f"line {i} " + "x" * 200 for i in range(2 * LARGE_BODY // 200)]
    raw = json.dumps({"input": inputs, "model": "ai/smollm2", "encoding_format": "float"}).encode()
    assert len(raw) > LARGE_BODY
    response, body = await daemon.request(
        "POST", "/olla/dmr/engines/v1/embeddings", raw, {"content-type": "application/json"}
    )
    assert response.code == 200, body
    assert fake.requests[-1].body == raw
    chat = json.dumps({"messages": [{"role": "system", "content": "s" * LARGE_BODY}, {"role": "user", "content": "hi"}],
                       "model": "ai/smollm2"}).encode()
    response, _ = await daemon.request("POST", "/olla/dmr/engines/v1/chat/completions", chat,
                                       {"content-type": "application/json"})
    assert response.code == 200 and response.headers.getRawHeaders(b"x-olla-sticky-key-source") == [b"prefix_hash"]
    for broken, code in ((raw[:-1], "invalid_json"), (b"[" + raw + b"]", "invalid_json"),
                         (raw.replace(b'"ai/smollm2"', b"17"), "invalid_model")):
        response, body = await daemon.request(
            "POST", "/olla/dmr/engines/v1/embeddings", broken, {"content-type": "application/json"}
        )
        assert response.code == 400 and json.loads(body)["error"]["code"] == code, body
