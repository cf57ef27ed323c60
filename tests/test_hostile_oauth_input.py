"""Hostile input at the OAuth and OpenID endpoints gets the answer the standards give for any
other bad input, never a server error: JOSE headers joserfc does not expect, malformed HTTP
Basic credentials, a client id that is no Unicode text, unknown token type hints, and
parameters sent twice."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from civitas.app import create_app, stop_background
from idp.agency_keys import ASSERTION_ALGS
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import AGENCY_ONE, AuthRequest, full_login, query, redeem
from tests.test_client_auth import ASSERTION_TYPE, PK_RSA, RSA_KEY, assertion, public_set

#: the probe's token: {"alg":"ES256","crit":5} (RFC 7515 4.1.11: crit is an array of names)
CRIT_TOKEN = "eyJhbGciOiJFUzI1NiIsImNyaXQiOjV9.e30.AA"
#: "crit" values of the wrong shape; each made joserfc raise TypeError
BAD_CRITS = [5, True, None, [5], [[]], [{}]]
CRIT_IDS = ["int", "bool", "null", "list-of-int", "list-of-list", "list-of-object"]

USERINFO_REFUSAL = {"error": "invalid_token",
                    "error_description": "The access token is invalid or expired"}
DECISION_CHALLENGE = ('Bearer realm="civitas-consent", scope="consent.decisions", '
                      'Basic realm="civitas-consent"')
#: RFC 6750 3.1: a bearer token that is not a live token of the hub
INVALID_TOKEN_CHALLENGE = ('Bearer realm="civitas-consent", error="invalid_token", '
                           'scope="consent.decisions"')
EVALUATION = {"subject": {"type": "user", "id": "someone"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def crit_token(crit: Any, alg: str = "ES256") -> str:
    """A JWS whose header has this "crit" (by hand: joserfc refuses to write one)."""
    header = json.dumps({"alg": alg, "crit": crit}).encode()
    return f"{b64(header)}.{b64(b'{}')}.AA"


def signed_by_hand(header: dict[str, Any], claims: dict[str, Any] | bytes) -> str:
    """An RS256 JWS signed with RSA_KEY, header and payload written as given."""
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}"
    signature = RSA_KEY.private_key.sign(signing_input.encode(), padding.PKCS1v15(),
                                         hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


AGENCY = basic(AGENCY_ONE.client_id, AGENCY_ONE.secret)
RS256_HEADER = b64(b'{"alg":"RS256"}')


def client_token(client: Any) -> str:
    r = client.post("/token", data={"grant_type": "client_credentials"}, headers=AGENCY)
    assert r.status_code == 200, r.json
    return str(r.json["access_token"])


@pytest.fixture
def pk_agency(hub: Any) -> None:
    """A private_key_jwt agency with RSA_KEY."""
    hub.agencies.add(client_id=PK_RSA.client_id, name=PK_RSA.name,
                     redirect_uris=[PK_RSA.redirect_uri], auth_method="private_key_jwt",
                     jwks=public_set(RSA_KEY))


# -- 1. a "crit" header joserfc cannot read is an invalid token ------------------------------


@pytest.mark.parametrize("token", [CRIT_TOKEN, *(crit_token(c) for c in BAD_CRITS)],
                         ids=["probe", *CRIT_IDS])
def test_bad_crit_is_an_invalid_token_at_userinfo_and_the_decision_api(client, token):
    # RFC 6750 3.1: the same answer as for any other token that is not the hub's
    for value in (token, "a.b.c"):
        r = client.get("/userinfo", headers={"Authorization": "Bearer " + value})
        assert r.status_code == 401, (value, r.status_code)
        assert r.json == USERINFO_REFUSAL
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas", error="invalid_token"'
        for path in ("/access/v1/evaluation", "/access/v1/evaluations"):
            body = EVALUATION if path.endswith("evaluation") else {"evaluations": [EVALUATION]}
            r = client.post(path, json=body, headers={"Authorization": "Bearer " + value})
            assert r.status_code == 401, (path, value, r.status_code)
            assert r.json["error"] == "invalid_token"
            assert r.headers["WWW-Authenticate"] == INVALID_TOKEN_CHALLENGE


@pytest.mark.parametrize("token", [CRIT_TOKEN, crit_token([5]), crit_token(None)],
                         ids=["probe", "list-of-int", "null"])
def test_bad_crit_is_an_unknown_token_at_introspection_and_revocation(client, token):
    # RFC 7662 2.2: inactive; RFC 7009 2.2: an invalid token is answered 200 all the same
    r = client.post("/introspect", data={"token": token}, headers=AGENCY)
    assert (r.status_code, r.json) == (200, {"active": False})
    r = client.post("/revoke", data={"token": token}, headers=AGENCY)
    assert (r.status_code, r.json) == (200, {})


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bad_crit_id_token_hint_is_refused_at_end_session(client, method):
    # RP-Initiated Logout 1.0 section 4: an invalid request, never redirected
    params = {"id_token_hint": CRIT_TOKEN,
              "post_logout_redirect_uri": "https://one.agency.example/signed-out"}
    if method == "GET":
        r = client.get("/logout/end-session?" + urlencode(params))
    else:
        r = client.post("/logout/end-session", data=params)
    assert r.status_code == 400 and "Location" not in r.headers
    assert "(the id_token_hint is not an ID token from Civitas)" in r.get_data(as_text=True)


def test_bad_crit_id_token_hint_is_invalid_request_at_authorize(client):
    auth = AuthRequest(extra={"id_token_hint": CRIT_TOKEN})
    r = client.get(auth.url())
    assert r.status_code == 302
    location = r.headers["Location"]
    assert location.startswith(AGENCY_ONE.redirect_uri + "?"), location
    assert query(location) == {
        "error": "invalid_request",
        "error_description": "id_token_hint is not an ID token from this hub for this agency.",
        "state": auth.state, "iss": HUB_ISSUER}


def _assertion_claims() -> dict[str, Any]:
    now = int(time.time())
    return {"iss": PK_RSA.client_id, "sub": PK_RSA.client_id, "aud": f"{HUB_ISSUER}/token",
            "iat": now, "exp": now + 120, "jti": f"jti-{time.monotonic_ns()}"}


@pytest.mark.parametrize("crit", BAD_CRITS, ids=CRIT_IDS)
def test_bad_crit_client_assertion_is_invalid_client(client, pk_agency, crit):
    """Signed with the agency's registered key, claims all fine: only "crit" is malformed,
    and the assertion is refused as one with a bad signature is."""
    refused = ("The client assertion's algorithm or signature is not accepted (allowed: "
               f"{', '.join(ASSERTION_ALGS)}).")
    good = assertion(PK_RSA.client_id)
    for value in (good[:-6] + "AAAAAA",  # a bad signature: the answer to match
                  signed_by_hand({"alg": "RS256", "kid": RSA_KEY.kid, "crit": crit},
                                 _assertion_claims())):
        r = client.post("/token", data={"grant_type": "client_credentials",
                                        "client_assertion_type": ASSERTION_TYPE,
                                        "client_assertion": value})
        assert r.status_code == 400, (r.status_code, r.get_data(as_text=True))
        assert r.json == {"error": "invalid_client", "error_description": refused}
        assert r.headers["Cache-Control"] == "no-store"
    r = client.post("/token", data={"grant_type": "client_credentials",
                                    "client_assertion_type": ASSERTION_TYPE,
                                    "client_assertion": assertion(PK_RSA.client_id)})
    assert r.status_code == 200, r.json  # the agency itself is fine


@pytest.mark.parametrize("where", ["payload", "sub"])
def test_a_client_assertion_nested_too_deep_is_invalid_client(client, pk_agency, where):
    """Its claims are read before its signature is checked (for "sub"): a JSON document
    nested deeper than Python's parser goes (RecursionError) is an invalid assertion, not a
    server error. Under the hub's 8192-character limit for an assertion."""
    depth = 2800
    nested = b"[" * depth + b"]" * depth
    payload = nested if where == "payload" else b'{"sub":' + nested + b"}"
    value = f"{RS256_HEADER}.{b64(payload)}.AA"
    assert len(value) <= 8192
    r = client.post("/token", data={"grant_type": "client_credentials",
                                    "client_assertion_type": ASSERTION_TYPE,
                                    "client_assertion": value})
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.json == {"error": "invalid_client", "error_description": "Invalid JWT payload."}


# -- 2. malformed HTTP Basic credentials are invalid_client ----------------------------------

#: base64 of b"\xff:\xfe" (no UTF-8), a non-ASCII character, only whitespace, not base64,
#: no colon (RFC 7617 2: user-id ":" password), nothing
BAD_BASIC = ["Basic /8z+", "Basic é", "Basic \x0b", "Basic !!!",
             "Basic " + base64.b64encode(AGENCY_ONE.client_id.encode()).decode(), "Basic "]
BAD_BASIC_IDS = ["not-utf8", "non-ascii", "whitespace", "not-base64", "no-colon", "empty"]
OAUTH_ENDPOINTS = [("/token", {"grant_type": "client_credentials"}),
                   ("/introspect", {"token": "x"}), ("/revoke", {"token": "x"})]


@pytest.mark.parametrize("header", BAD_BASIC, ids=BAD_BASIC_IDS)
@pytest.mark.parametrize(("path", "form"), OAUTH_ENDPOINTS, ids=["token", "introspect", "revoke"])
def test_malformed_basic_credentials_are_invalid_client(client, path, form, header):
    """RFC 6749 5.2: a client that tried to authenticate with the Authorization header is
    answered 401 invalid_client with a WWW-Authenticate of its scheme (2.3.1: Basic)."""
    r = client.post(path, data=form, headers={"Authorization": header})
    assert r.status_code == 401, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.json["error"] == "invalid_client", r.json
    assert r.headers["WWW-Authenticate"].startswith('Basic error="invalid_client"')
    assert r.headers["Cache-Control"] == "no-store"
    assert "access_token" not in r.json and "active" not in r.json
    # and the agency's own credentials still work there
    assert client.post(path, data=form, headers=AGENCY).status_code == 200


@pytest.mark.parametrize("header", BAD_BASIC, ids=BAD_BASIC_IDS)
def test_malformed_basic_credentials_are_refused_by_the_decision_api(client, header):
    wrong_secret = basic(AGENCY_ONE.client_id, "not-the-secret")
    for path, body in (("/access/v1/evaluation", EVALUATION),
                       ("/access/v1/evaluations", {"evaluations": [EVALUATION]})):
        expected = client.post(path, json=body, headers=wrong_secret)
        r = client.post(path, json=body, headers={"Authorization": header})
        assert r.status_code == expected.status_code == 401, (path, r.status_code)
        assert r.json == expected.json and r.json["error"] == "invalid_client"
        assert r.headers["WWW-Authenticate"] == DECISION_CHALLENGE
        assert client.post(path, json=body, headers=AGENCY).status_code == 200


def test_malformed_basic_credentials_do_not_give_way_to_form_credentials(client):
    """A request with an Authorization header the hub cannot read is refused as it stands,
    not authenticated by a secret in its form instead (RFC 6749 2.3: one method)."""
    r = client.post("/introspect", headers={"Authorization": "Basic /8z+"}, data={
        "token": "x", "client_id": AGENCY_ONE.client_id, "client_secret": AGENCY_ONE.secret})
    assert r.status_code == 401 and r.json["error"] == "invalid_client"


# -- 3. a client id that is no Unicode text is an unknown client -----------------------------


@pytest.fixture
def any_sql_client(upstream_issuer: str, database_url: str) -> Iterator[Any]:
    """A test client of a hub on SQLite and on PostgreSQL."""
    app = create_app(hub_config(upstream_issuer, database_url))
    yield app.test_client()
    stop_background(app)
    app.extensions["civitas"].db.dispose()


@pytest.mark.parametrize("sub", ["\ud800", "a\udfffb", "\udc80\ud800"],
                         ids=["probe", "low-surrogate", "reversed-pair"])
def test_a_lone_surrogate_client_id_is_an_unknown_client(any_sql_client, sub):
    def token_request(payload: bytes) -> Any:
        value = f"{RS256_HEADER}.{b64(payload)}.AAAA"
        return any_sql_client.post("/token", data={
            "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": value})

    # the probe's assertion: {"sub":"\ud800"}, escaped as JSON can carry it
    r = token_request(json.dumps({"sub": sub}).encode())
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.json == {"error": "invalid_client",
                      "error_description": "The client does not exist on this server."}
    # as for any other unknown client (NUL included)
    for other in ("nobody-here", "a\x00"):
        assert token_request(json.dumps({"sub": other}).encode()).json == r.json
    # and the hub still answers its agencies
    r = any_sql_client.post("/token", data={"grant_type": "client_credentials"},
                            headers=AGENCY)
    assert r.status_code == 200, r.json


# -- 4. a token type hint the hub does not know is ignored -----------------------------------


@pytest.mark.parametrize("hint", ["bogus", "id_token", ""])
def test_an_unknown_token_type_hint_is_ignored(client, hint):
    """RFC 7009 2.1 (a hint not understood is ignored; 2.2: 200) and RFC 7662 2.1 (the
    server searches every type it supports)."""
    unknown = {"token": "x", "token_type_hint": hint}
    r = client.post("/introspect", data=unknown, headers=AGENCY)
    assert (r.status_code, r.json) == (200, {"active": False})
    r = client.post("/revoke", data=unknown, headers=AGENCY)
    assert (r.status_code, r.json) == (200, {})
    # a real token is found whatever the hint says, and revoked
    token = client_token(client)
    with_hint = {"token": token, "token_type_hint": hint}
    r = client.post("/introspect", data=with_hint, headers=AGENCY)
    assert r.status_code == 200 and r.json["active"] is True, r.json
    assert r.json["client_id"] == AGENCY_ONE.client_id
    r = client.post("/revoke", data=with_hint, headers=AGENCY)
    assert (r.status_code, r.json) == (200, {})
    r = client.post("/introspect", data={"token": token}, headers=AGENCY)
    assert r.json == {"active": False}


@pytest.mark.parametrize("hint", ["access_token", "refresh_token"])
def test_a_known_token_type_hint_still_works(client, hint):
    token = client_token(client)
    r = client.post("/introspect", data={"token": token, "token_type_hint": hint},
                    headers=AGENCY)
    assert r.status_code == 200 and r.json["active"] is True, r.json
    r = client.post("/revoke", data={"token": token, "token_type_hint": hint},
                    headers=AGENCY)
    assert (r.status_code, r.json) == (200, {})
    assert client.post("/introspect", data={"token": token},
                       headers=AGENCY).json == {"active": False}


# -- 5. a token request parameter sent twice is invalid_request ------------------------------


def assert_repeated(r: Any, name: str) -> None:
    """RFC 6749 3.2 and 5.2: invalid_request, naming the parameter (the words /authorize uses
    for the same fault)."""
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True)[:300])
    assert r.json == {"error": "invalid_request",
                      "error_description": f"Multiple '{name}' in request."}
    assert r.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(("pairs", "name"), [
    ([("grant_type", "client_credentials"), ("grant_type", "authorization_code")],
     "grant_type"),
    ([("grant_type", "client_credentials"), ("grant_type", "client_credentials")],
     "grant_type"),
    ([("grant_type", "client_credentials"), ("scope", "consent.decisions"),
      ("scope", "consent.decisions")], "scope"),
    ([("grant_type", "client_credentials"), ("client_id", AGENCY_ONE.client_id),
      ("client_secret", AGENCY_ONE.secret), ("client_secret", AGENCY_ONE.secret)],
     "client_secret"),
], ids=["grant_type", "grant_type-same-value", "scope", "client_secret"])
def test_a_repeated_token_request_parameter_is_invalid_request(client, pairs, name):
    headers = {} if any(k == "client_secret" for k, _ in pairs) else AGENCY
    r = client.post("/token", data=urlencode(pairs), headers={**headers, **FORM})
    assert_repeated(r, name)


@pytest.mark.parametrize("raw", ["a%22", "%C3%A9", "b%5C"], ids=["quote", "e-acute", "backslash"])
def test_rfc6749_5_2_a_repeated_parameter_with_an_odd_name_is_invalid_request(client, raw):
    """RFC 6749 5.2 allows no '"', '\\' or non-ASCII in error_description, and Authlib
    refuses to make an error with one (a server error): the name is shown percent-encoded."""
    r = client.post("/token", data=f"grant_type=client_credentials&{raw}=1&{raw}=2",
                    headers={**AGENCY, **FORM})
    assert_repeated(r, raw)


@pytest.mark.parametrize("response_type", ['to"ken', "t\u00e9ken", "tok\\en", "token"],
                         ids=["quote", "e-acute", "backslash", "token"])
def test_rfc6749_4_1_2_1_an_unsupported_response_type_is_redirected_whatever_it_holds(
        client, response_type):
    """Authlib's refusal put the value in error_description, whose characters RFC 6749
    4.1.2.1 limits (a quote was a server error); the agency gets unsupported_response_type
    at its redirect URI with its state and the hub's iss (RFC 9207), in words of the hub's."""
    auth = AuthRequest()
    r = client.get(auth.url().replace("response_type=code", "response_type="
                                      + quote(response_type, safe="")))
    assert r.status_code == 302, r.get_data(as_text=True)[:300]
    assert r.headers["Location"].startswith(auth.agency.redirect_uri + "?")
    answer = query(r.headers["Location"])
    assert answer == {"error": "unsupported_response_type",
                      "error_description": "The only response_type this server supports is "
                                           "'code'.", "state": auth.state, "iss": HUB_ISSUER}
    # an unknown redirect URI still gets no redirect
    r = client.get(auth.url().replace("response_type=code", "response_type=token").replace(
        quote(auth.agency.redirect_uri, safe=""), quote("https://evil.example/cb", safe="")))
    assert r.status_code == 400 and "Location" not in r.headers


def test_a_parameter_in_the_query_and_the_body_is_repeated(client):
    r = client.post("/token?grant_type=client_credentials",
                    data="grant_type=client_credentials", headers={**AGENCY, **FORM})
    assert_repeated(r, "grant_type")
    # once in either place is fine
    r = client.post("/token?scope=consent.decisions", data="grant_type=client_credentials",
                    headers={**AGENCY, **FORM})
    assert r.status_code == 200, r.json


def test_a_repeated_code_is_refused_and_the_code_is_not_used(client):
    auth = AuthRequest()
    code = full_login(client, auth)["code"]
    form = [("grant_type", "authorization_code"), ("code", code), ("code", "garbage"),
            ("redirect_uri", auth.agency.redirect_uri), ("code_verifier", auth.verifier)]
    r = client.post("/token", data=urlencode(form), headers={**AGENCY, **FORM})
    assert_repeated(r, "code")
    # the refused request did not consume the code: it redeems once, as usual
    r = redeem(client, auth, code)
    assert r.status_code == 200, r.json
    assert "id_token" in r.json and "access_token" in r.json
