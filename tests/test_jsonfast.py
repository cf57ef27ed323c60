"""kernel/jsonfast.py: orjson on the hot paths, with the standard library's answers. What it
writes, ``json`` reads as the same value; what ``json`` wrote (and reads), it reads the same;
what orjson refuses (lone surrogates, big integers, keys that are not strings) still goes
through, and what ``json`` refuses is still refused."""

from __future__ import annotations

import base64
import datetime
import enum
import json
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt

from kernel import jsonfast
from kernel.store import open_store

#: any text, lone surrogates included (an upstream's JSON can carry them as escapes)
TEXT = st.text(alphabet=st.characters(exclude_categories=()))
SCALARS = (st.none() | st.booleans() | st.integers() | TEXT
           | st.floats(allow_nan=False, allow_infinity=False))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(TEXT, inner, max_size=4)
                      | st.dictionaries(st.integers(), inner, max_size=2), max_leaves=12)


@given(VALUES)
def test_what_it_writes_json_reads_as_the_same_value(value):
    expected = json.loads(json.dumps(value))
    written = jsonfast.dumpb(value)
    assert json.loads(written) == expected
    assert jsonfast.loads(written) == expected
    assert jsonfast.loads(written.decode()) == expected


@given(VALUES)
def test_what_json_wrote_it_reads_the_same(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert jsonfast.loads(text) == json.loads(text)


def test_a_lone_surrogate_goes_through_as_json_takes_it():
    """orjson refuses ``"\\ud800"`` both ways; an upstream's claim can be one."""
    assert jsonfast.loads('"\\ud800"') == "\ud800"
    assert jsonfast.loads(jsonfast.dumpb({"name": "x\udc00"})) == {"name": "x\udc00"}


@dataclass
class _Point:
    x: int


class _Level(enum.IntEnum):
    HIGH = 2


@pytest.mark.parametrize("value", [datetime.datetime(2026, 1, 1), _Point(1), {1, 2},
                                   b"bytes"])
def test_what_json_refuses_is_refused(value):
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        jsonfast.dumpb(value)


class _Tag(str):
    pass


class _Count(int):
    pass


def test_subclasses_are_written_as_json_writes_them():
    """A subclass of str or int is left to json (orjson.OPT_PASSTHROUGH_SUBCLASS), which
    shows in the bytes: json writes ``": "``, orjson ``":"``; so are values orjson refuses;
    an enum orjson writes itself, with the same value as json."""
    for value in ({"tag": _Tag("x")}, {"count": _Count(3)}):
        assert jsonfast.dumpb(value) == json.dumps(value).encode(), value
    value = {"level": _Level.HIGH, "big": 2**70, 3: "int key"}
    assert jsonfast.dumpb(value) == json.dumps(value).encode()
    assert json.loads(jsonfast.dumpb({"level": _Level.HIGH})) == {"level": 2}


def test_bad_json_is_refused_with_jsons_error():
    with pytest.raises(json.JSONDecodeError):
        jsonfast.loads("{not json")


def _segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_a_signed_jwt_is_what_joserfcs_encode_makes(hub):
    """Header byte for byte, claims the same value, and it verifies with joserfc."""
    key = hub.keys.signing_key("ES256")
    claims = {"iss": "https://hub.example", "sub": "ü-\ud800", "aud": "agency", "iat": 1,
              "exp": 2, "amr": ["pwd"], "scope": "openid email"}
    for header in ({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"},
                   {"alg": key.alg, "kid": key.kid}):
        ours = key.sign_jwt(header, claims)
        theirs = jwt.encode(header, {**claims, "sub": "ü"}, key.key, algorithms=[key.alg])
        assert _segment(ours, 0) == _segment(theirs, 0)
        assert json.loads(_segment(ours, 1)) == claims
        decoded = jwt.decode(ours, hub.keys.public_keyset(), algorithms=[key.alg])
        assert decoded.claims == claims


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_store_keeps_a_record_with_a_lone_surrogate(kind, redis_url):
    store = open_store("memory:" if kind == "memory" else redis_url)
    record = {"amr": ["x\ud800"], "n": 2**70, "é": 1}
    store.put("jsonfast-test", record, 30)
    assert store.get("jsonfast-test") == record
    assert store.take_marked("jsonfast-test", field="sid", mark_prefix="m:",
                             otherwise="none") == (record, False)


def test_flask_answers_keep_flasks_form(app):
    """jsonify through civitas/json_provider.py: keys sorted, no spaces, the same value as
    Flask's own provider; what orjson does not take (a date) is Flask's own text."""
    from flask import jsonify
    from flask.json.provider import DefaultJSONProvider

    flasks = DefaultJSONProvider(app)
    with app.test_request_context():
        for value in ({"b": [1, 2.5, None], "a": {"z": "é", "y": True}},  # orjson's
                      {"b": [1], "a": {"z": "é\ud800", "y": True}, "c": 2**70}):  # json's
            ours = jsonify(value).get_data()
            theirs = flasks.response(value).get_data()
            assert json.loads(ours) == json.loads(theirs) == value
            assert ours.startswith(b'{"a":{"y":true,"z":') and b", " not in ours
        assert "é".encode() in jsonify({"a": "é"}).get_data()  # UTF-8, not an escape
        dated = {"at": datetime.datetime(2026, 11, 24, tzinfo=datetime.UTC)}
        assert jsonify(dated).get_data() == flasks.response(dated).get_data()
        assert app.json.loads(b'{"a": "\\ud800"}') == {"a": "\ud800"}


#: JSON objects as lists of (name, value) pairs, so that a name can come twice; names and
#: strings often hold a colon, which the fast path of loads_unique counts
NAMES = st.sampled_from(["a", "b", "a:b", ":", "id"]) | TEXT
TREES = st.recursive(
    st.none() | st.integers(-10, 10) | NAMES,
    lambda inner: st.lists(inner, max_size=3).map(lambda items: ("list", items))
    | st.lists(st.tuples(NAMES, inner), max_size=4).map(lambda pairs: ("object", pairs)),
    max_leaves=10)


def _text(tree) -> str:
    if isinstance(tree, tuple):
        kind, items = tree
        if kind == "list":
            return "[" + ",".join(_text(item) for item in items) + "]"
        return "{" + ",".join(f"{json.dumps(name)} : {_text(value)}"
                              for name, value in items) + "}"
    return json.dumps(tree)


def _repeats(tree) -> bool:
    if not isinstance(tree, tuple):
        return False
    kind, items = tree
    if kind == "list":
        return any(_repeats(item) for item in items)
    names = [name for name, _ in items]
    return len(set(names)) < len(names) or any(_repeats(value) for _, value in items)


@given(TREES)
def test_rfc7493_2_3_loads_unique_refuses_exactly_the_text_that_repeats_a_name(tree):
    text = _text(tree).encode()
    if _repeats(tree):
        with pytest.raises(jsonfast.RepeatedName) as refused:
            jsonfast.loads_unique(text)
        assert refused.value.name == jsonfast.repeated_name(text)
    else:
        assert jsonfast.loads_unique(text) == json.loads(text)


def test_loads_unique_refuses_bad_json_as_loads_does():
    for text in (b'{"a": ', b"", b"[1,]"):
        with pytest.raises(ValueError) as refused:
            jsonfast.loads_unique(text)
        assert not isinstance(refused.value, jsonfast.RepeatedName)
    # deeper than json's stack, though orjson reads it: a ValueError, not a RecursionError
    deep = b'{"a:":' * 1000 + b"1" + b"}" * 1000
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonfast.loads_unique(deep)


LONG_INTEGERS = st.integers(min_value=2**63, max_value=2**300) | st.integers(
    min_value=-2**300, max_value=-2**63 - 1)


@given(LONG_INTEGERS | st.integers(), TEXT)
def test_integers_of_any_size_come_back_exact(number, text):
    """orjson reads an integer beyond 64 bits as a float (123456789012345678901 came back
    as 1.2345678901234568e+20); loads gives json's exact answer, whatever the text
    around it."""
    for value in (number, [text, number], {"n": number, "text": text}):
        for written in (json.dumps(value), jsonfast.dumpb(value)):
            read = jsonfast.loads(written)
            assert read == value and type(read) is type(value)
            assert json.dumps(read) == json.dumps(value)


def test_an_upstreams_long_integer_claim_is_released_as_it_was_asserted(hub):
    """An attribute is stored as JSON (encrypted) and read back through jsonfast: a 21-digit
    number an upstream asserted comes out of the account, and out of the reads the token
    endpoint makes, as the same integer."""
    from connectors import UpstreamIdentity

    asserted = {"national_id": 123456789012345678901, "small": 7}
    account = hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject="long-number", acr="urn:civitas:acr:ial1:aal1",
        attributes=asserted)).account_id
    assert hub.accounts.live_attributes(account, list(asserted)) == asserted
    attributes, _, _ = hub.server.hub.citizen_claims(account, "agency-one", list(asserted))
    assert attributes == asserted
