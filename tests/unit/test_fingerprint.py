"""Fingerprints: canonical JSON of redacted parameters, xxh3_128 hex."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.engine.canonical import canonical_json, parse_json_text
from guard.engine.config import RedactionConfig, RedactionRule
from guard.engine.fingerprint import params_hash
from guard.engine.redact import Redactor

R = Redactor(RedactionConfig(rules=(RedactionRule(name="order", pattern=r"#A\d{5}"),)), key=b"k")


def test_seed_forms_fingerprint_the_same() -> None:
    forms = [{"b": 1, "a": 2}, {"a": 2, "b": 1}, '{"a":2,"b":1}', '  {"b": 1,\n "a": 2} ']
    hashes = {params_hash(form, R) for form in forms}
    assert len(hashes) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", hashes.pop())


def test_canonical_form() -> None:
    assert canonical_json({"b": [1.0, 1.5, None, True, False], "a": "é"}) == (
        '{"a":"é","b":[1,1.5,null,true,false]}'.encode()
    )
    assert canonical_json({"z": {"y": 1, "x": 2}}) == b'{"z":{"x":2,"y":1}}'


def test_integral_float_is_the_integer() -> None:
    assert params_hash({"n": 1.0}, R) == params_hash({"n": 1}, R)
    assert params_hash({"n": 1.5}, R) != params_hash({"n": 1}, R)


def test_different_values_differ() -> None:
    assert params_hash({"path": "a.py", "offset": 0}, R) != params_hash(
        {"path": "a.py", "offset": 100}, R
    )
    assert params_hash({"x": True}, R) != params_hash({"x": 1}, R)
    assert params_hash({"x": "1"}, R) != params_hash({"x": 1}, R)


def test_masked_secrets_merge_pseudonyms_do_not() -> None:
    # Two tokens are one call (masked); two orders stay two calls (pseudonymized).
    assert params_hash({"token": "a"}, R) == params_hash({"token": "b"}, R)
    assert params_hash({"q": "#A10001"}, R) != params_hash({"q": "#A10002"}, R)


def test_json_strings_parsed_only_when_json() -> None:
    assert parse_json_text('{"a": 1}') == {"a": 1}
    assert parse_json_text(b"[1, 2]") == [1, 2]
    assert parse_json_text("{not json") == "{not json"
    assert parse_json_text("plain") == "plain"
    assert params_hash("{not json", R) == params_hash("{not json", R)


def test_matches_canonical_json_of_redacted() -> None:
    value = {"q": "mail bob@example.com", "n": [1.0, 2], "nested": {"password": "x"}}
    import xxhash

    assert params_hash(value, R) == xxhash.xxh3_128_hexdigest(canonical_json(R.redact(value)))


JSON = st.recursive(
    st.one_of(
        st.text(max_size=20),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def _shuffled(value: object, rnd: st.DataObject) -> object:
    if isinstance(value, dict):
        keys = rnd.draw(st.permutations(list(value)))
        return {k: _shuffled(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(JSON, st.data(), st.sampled_from([None, 1, 2, "\t"]))
def test_invariant_to_key_order_and_whitespace(value: object, data: st.DataObject, indent) -> None:
    shuffled = _shuffled(value, data)
    assert canonical_json(shuffled) == canonical_json(value)
    text = json.dumps(shuffled, indent=indent, ensure_ascii=bool(indent))
    assert params_hash(shuffled, R) == params_hash(value, R)
    if isinstance(value, dict | list):
        assert params_hash(text, R) == params_hash(value, R)


def test_float_forms() -> None:
    assert canonical_json([1e-05, 1.5e-20, float("nan"), float("inf"), -0.5, 1e16]) == (
        b"[1e-05,1.5e-20,NaN,Infinity,-0.5,10000000000000000]"
    )
    assert canonical_json({"big": 2**70}) == b'{"big":1180591620717411303424}'


NUMBERS_AND_TEXT = st.recursive(
    st.one_of(
        st.text(max_size=20),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(NUMBERS_AND_TEXT)
def test_orjson_and_stdlib_paths_agree(value: object) -> None:
    # The accelerator must never change a fingerprint: replicas with and without it
    # share one Redis store.
    from guard.engine import canonical

    if canonical._ORJSON is None:
        pytest.skip("orjson not installed: only the stdlib encoder is in use")
    normalized = canonical.normalize(value)
    stdlib = canonical._stdlib_encode(normalized).encode("utf-8", "surrogatepass")
    assert canonical.encode_canonical(normalized) == stdlib


# Integers orjson cannot hold (it would parse them as the nearest float, silently).
WIDE = [-(2**63) - 1, 2**64, 10**20, 10**20 + 1, -(10**30) - 7]


@pytest.mark.parametrize("number", WIDE)
def test_wide_integers_parse_exactly(number: int) -> None:
    from guard.engine.canonical import loads_json

    parsed = loads_json(f'{{"amount": {number}}}'.encode())
    assert parsed == {"amount": number} and type(parsed["amount"]) is int
    assert loads_json(f"[{number}]") == [number]  # str input too
    assert loads_json(memoryview(f"[{number}]".encode())) == [number]


def test_wide_integers_that_share_a_float_are_different_calls() -> None:
    # 10**20 and 10**20 + 1 are one float: as floats they would be one call, and a
    # guard would stop the second as a repeat of the first.
    assert float(10**20) == float(10**20 + 1)
    texts = ['{"wei": 100000000000000000000}', '{"wei": 100000000000000000001}']
    assert params_hash(texts[0], R) != params_hash(texts[1], R)
    for text in texts:  # the same call, however it arrives
        assert params_hash(text, R) == params_hash(json.loads(text), R)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([b"0", b"9", b"5", b"55555", b'"', b"-", b".", b"e", b" "]),
            st.binary(max_size=3),
        ),
        max_size=60,
    ).map(b"".join),
    st.integers(min_value=0, max_value=8),
)
def test_wide_integer_check_finds_every_run_of_19_digits(data: bytes, pad: int) -> None:
    from guard.engine.canonical import may_hold_wide_integer

    for text in (data, b" " * pad + data, data + b"1234567890123456789"[: pad * 2]):
        assert may_hold_wide_integer(text) == bool(re.search(rb"[0-9]{19}", text))
