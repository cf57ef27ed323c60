"""civitas.request.HubRequest reads a URL-encoded form as Werkzeug's request does: the same
fields, the same refusals, the body consumed, for any body (hypothesis) and every case it
hands to Werkzeug."""

from __future__ import annotations

import io

import pytest
from flask import Request
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from civitas.request import HubRequest

LIMIT = 64 * 1024  # the hub's MAX_CONTENT_LENGTH


class Limited:
    max_content_length = LIMIT


class HubLimited(Limited, HubRequest):
    pass


class WerkzeugLimited(Limited, Request):
    pass


def environ(body: bytes, *, content_type: str | None = "application/x-www-form-urlencoded",
            length: str | None = None, terminated: bool = True,
            extra: dict[str, str] | None = None) -> dict:
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/token", "QUERY_STRING": "",
           "SERVER_NAME": "hub.example", "SERVER_PORT": "443", "wsgi.url_scheme": "https",
           "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(),
           "CONTENT_LENGTH": str(len(body)) if length is None else length, **(extra or {})}
    if content_type is not None:
        env["CONTENT_TYPE"] = content_type
    if terminated:  # gunicorn and granian set it; Werkzeug's test client does not
        env["wsgi.input_terminated"] = True
    return env


def outcome(cls: type[Request], env_args: tuple, env_kwargs: dict) -> tuple:
    request = cls(environ(*env_args, **env_kwargs))
    try:
        form = list(request.form.items(multi=True))
    except (RequestEntityTooLarge, ClientDisconnected) as exc:
        return ("refused", type(exc).__name__)
    return ("form", form, list(request.files.items(multi=True)), request.get_data())


def same(*args, **kwargs) -> tuple:
    ours = outcome(HubLimited, args, kwargs)
    assert ours == outcome(WerkzeugLimited, args, kwargs)
    return ours


PIECES = st.sampled_from(["grant_type", "client_id", "=", "&", "+", "%", "%2", "%41", "%zz",
                          "%C3%A9", "%FF", "é", "a", " ", ";", "\x00", "code", "%26", "%3D"])


@settings(max_examples=300, deadline=None)
@given(text=st.lists(PIECES, max_size=30).map("".join), terminated=st.booleans())
def test_any_form_body_gives_werkzeugs_fields(text, terminated):
    same(text.encode(), terminated=terminated)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_bytes_give_werkzeugs_fields_or_its_empty_form(body):
    same(body)


def test_a_token_request_is_parsed_and_its_body_consumed():
    body = b"grant_type=client_credentials&scope=consent.decisions+api&x=%C3%A9&x=2&empty="
    kind, form, files, rest = same(body)
    assert form == [("grant_type", "client_credentials"), ("scope", "consent.decisions api"),
                    ("x", "é"), ("x", "2"), ("empty", "")]
    assert files == [] and rest == b""


@pytest.mark.parametrize("kwargs", [
    {"content_type": "application/x-www-form-urlencoded; charset=UTF-8"},
    {"content_type": "Application/X-WWW-Form-Urlencoded"},
    {"content_type": "application/json"},
    {"content_type": "multipart/form-data; boundary=x"},
    {"content_type": None},
    {"length": ""},
    {"length": " 9"},
    {"length": "+9"},
    {"length": "٩"},  # a digit, but not ASCII
    {"length": "-1"},
    # shorter than the body: only Content-Length's bytes are read (a server that ends the
    # stream, input_terminated, ends it there too: such an environ cannot come from it)
    {"length": "3", "terminated": False},
    {"extra": {"HTTP_TRANSFER_ENCODING": "chunked"}},
])
def test_other_requests_get_werkzeugs_answer(kwargs):
    same(b"grant_type=x&a=b", **kwargs)


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read():
    assert same(b"a=" + b"b" * LIMIT) == ("refused", "RequestEntityTooLarge")
    assert same(b"a=b", length=str(LIMIT + 1)) == ("refused", "RequestEntityTooLarge")


def test_a_body_shorter_than_its_length_is_a_disconnected_client_unless_the_server_ends_it():
    assert same(b"a=b", length="10", terminated=False) == ("refused", "ClientDisconnected")
    assert same(b"a=b", length="10", terminated=True)[0] == "form"


def test_the_hub_uses_it(app):
    assert app.request_class is HubRequest
    answer = app.test_client().post("/token", data={"grant_type": "client_credentials"},
                                    headers={"Authorization": "Basic bm9ib2R5Om5vcGU="})
    assert answer.status_code == 401 and answer.json["error"] == "invalid_client"
