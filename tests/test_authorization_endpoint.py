"""The authorization endpoint (/authorize, /authorize/continue), discovery and JWKS.

Every test asserts where the browser is sent: to the agency's registered redirect URI with
``error``, ``state`` and RFC 9207 ``iss`` exactly once each, or to a hub error page with no
``Location`` header at all (RFC 6749 4.1.2.1: never redirect to an unvalidated URI).
"""

from __future__ import annotations

import html
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest
from jose import jwt as jose_jwt

from tests.conftest import HUB_ISSUER
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    allow_consent,
    full_login,
    path_of,
    pkce_pair,
    redeem,
    upstream_login,
)
from tests.flows import TestAgency as Agency

REGISTERED = AGENCY_ONE.redirect_uri  # https://one.agency.example/cb
#: idp/provider.py S256Challenge's error_description for each of its two refusals
PKCE_REQUIRED = ("PKCE is required: send code_challenge with code_challenge_method=S256 "
                 "(RFC 7636).")
S256_ONLY = "code_challenge_method must be S256."
#: every printable ASCII character (RFC 6749 VSCHAR), most of which need URL-encoding
AWKWARD_STATE = " !\"#$%&'()*+,-./0123456789:;<=>?@AZ[\\]^_`az{|}~"


# -- helpers -------------------------------------------------------------------------------


def params_for(auth: AuthRequest, **changes: str | None) -> dict[str, str]:
    """The request's parameters with ``changes`` applied (``None`` removes a parameter)."""
    params = auth.params()
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return params


def authorize(client: Any, auth: AuthRequest, *, post: bool = False,
              **changes: str | None) -> Any:
    params = params_for(auth, **changes)
    if post:
        return client.post("/authorize", data=params)
    return client.get("/authorize", query_string=params)


def authorize_pairs(client: Any, pairs: list[tuple[str, str]]) -> Any:
    """GET /authorize with a raw parameter list (to repeat a parameter)."""
    return client.get("/authorize?" + urlencode(pairs))


def redirect_params(response: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(response.headers["Location"]).query, keep_blank_values=True)


def assert_lands_on(response: Any, redirect_uri: str) -> dict[str, list[str]]:
    """A 302 to exactly ``redirect_uri`` (no fragment), with ``iss`` once (RFC 9207 2)."""
    assert response.status_code == 302, response.get_data(as_text=True)[:800]
    parts = urlsplit(response.headers["Location"])
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == redirect_uri
    assert parts.fragment == ""
    params = redirect_params(response)
    assert params["iss"] == [HUB_ISSUER]
    return params


def assert_error_redirect(response: Any, error: str, state: str | None,
                          redirect_uri: str = REGISTERED,
                          description: str | None = None) -> dict[str, list[str]]:
    """An error at ``redirect_uri``; with ``description``, the ``error_description`` that
    names the one check expected to refuse the request (several give the same ``error``)."""
    params = assert_lands_on(response, redirect_uri)
    assert params["error"] == [error], params
    if description is not None:
        assert params.get("error_description") == [description], params
    assert params.get("state") == ([state] if state is not None else None)
    assert "code" not in params
    return params


def assert_code_redirect(response: Any, auth: AuthRequest) -> str:
    params = assert_lands_on(response, auth.agency.redirect_uri)
    assert set(params) == {"code", "state", "iss"}, params
    assert params["state"] == [auth.state]
    assert len(params["code"]) == 1 and len(params["code"][0]) >= 32
    return params["code"][0]


def assert_error_page(response: Any, error: str, description: str | None = None) -> str:
    """The hub's own error page: 400, HTML, no redirect, no link to the agency. With
    ``description``, the page names that reason (the check that refused the request)."""
    assert response.status_code == 400, (response.status_code, response.headers)
    assert "Location" not in response.headers
    assert response.mimetype == "text/html"
    body = response.get_data(as_text=True)
    assert f"<code>{error}</code>" in body, body[:1500]
    if description is not None:
        assert f"<code>{error}</code> \u2014 {description}</p>" in html.unescape(body), \
            body[:1500]
    assert "agency.example" not in body
    return body


def assert_login_page_redirect(response: Any) -> str:
    """303 to the hub's own login page for a new flow; returns the flow id."""
    assert response.status_code == 303, response.get_data(as_text=True)[:800]
    location = response.headers["Location"]
    parts = urlsplit(location)
    assert parts.netloc in ("", urlsplit(HUB_ISSUER).netloc)
    assert parts.path == "/login"
    flow = parse_qs(parts.query)["flow"]
    assert len(flow) == 1 and flow[0]
    assert "code=" not in location
    return flow[0]


def login_from(client: Any, response: Any, username: str = "alice") -> tuple[Any, str]:
    """Complete a login started by ``response`` (a 303 to /login); return the response of
    /authorize/continue and that URL."""
    flow_id = assert_login_page_redirect(response)
    page = client.get(f"/login?flow={flow_id}")
    assert page.status_code == 200
    links = re.findall(r'href="(/login/op/start\?flow=[^"]+)"', page.get_data(as_text=True))
    assert links, page.get_data(as_text=True)[:800]
    started = client.get(html.unescape(links[0]))
    assert started.status_code == 303
    callback = upstream_login(started.headers["Location"], username)
    back = client.get(path_of(callback))
    assert back.status_code == 303, back.get_data(as_text=True)[:800]
    continue_url = path_of(back.headers["Location"])
    assert continue_url == f"/authorize/continue?flow={flow_id}"
    return client.get(continue_url), continue_url


def id_token_claims(client: Any, auth: AuthRequest, code: str) -> dict[str, Any]:
    r = redeem(client, auth, code)
    assert r.status_code == 200, r.json
    body = r.json
    return jose_jwt.decode(body["id_token"], client.get("/jwks").json, algorithms=["ES256"],
                           audience=auth.agency.client_id, issuer=HUB_ISSUER,
                           access_token=body["access_token"])


# -- RFC 6749 3.1.2.3 / RFC 9700 4.1.3: redirect URI exact match -----------------------------

REDIRECT_URI_VARIANTS = {
    "trailing_slash": "https://one.agency.example/cb/",
    "upper_case_host": "https://ONE.agency.example/cb",
    "path_prefix_extra": "https://one.agency.example/cb/extra",
    "added_query": "https://one.agency.example/cb?x=1",
    "empty_query": "https://one.agency.example/cb?",
    "added_fragment": "https://one.agency.example/cb#frag",
    "http_instead_of_https": "http://one.agency.example/cb",
    "different_port": "https://one.agency.example:8443/cb",
    "explicit_default_port": "https://one.agency.example:443/cb",
    "path_case": "https://one.agency.example/CB",
    "percent_encoded_path": "https://one.agency.example/%63b",
    "whole_uri_url_encoded": "https%3A%2F%2Fone.agency.example%2Fcb",
    "dot_segment": "https://one.agency.example/x/../cb",
    "userinfo": "https://attacker@one.agency.example/cb",
    "host_suffix": "https://one.agency.example.evil.example/cb",
    "shorter_prefix": "https://one.agency.example/c",
    "leading_space": " https://one.agency.example/cb",
    "other_agency": AGENCY_TWO.redirect_uri,
    "empty": "",
}


@pytest.mark.parametrize("redirect_uri", REDIRECT_URI_VARIANTS.values(),
                         ids=REDIRECT_URI_VARIANTS.keys())
def test_rfc6749_3_1_2_3_redirect_uri_variant_gets_error_page_not_redirect(client, redirect_uri):
    r = authorize(client, AuthRequest(), redirect_uri=redirect_uri)
    assert_error_page(r, "invalid_request")


def test_rfc6749_3_1_2_3_registered_redirect_uri_is_accepted(client):
    # Positive control for the variants above: the exact string starts a login.
    assert_login_page_redirect(authorize(client, AuthRequest(), redirect_uri=REGISTERED))


def test_oidc_core_3_1_2_1_missing_redirect_uri_gets_error_page(client):
    r = authorize(client, AuthRequest(), redirect_uri=None)
    assert_error_page(r, "invalid_request", "Missing 'redirect_uri' in request.")


def test_rfc6749_4_1_2_1_bad_redirect_uri_wins_over_other_errors(client):
    # Missing PKCE would be redirected, but the redirect URI is checked first.
    r = authorize(client, AuthRequest(), redirect_uri=REGISTERED + "/", code_challenge=None,
                  code_challenge_method=None)
    assert_error_page(r, "invalid_request")


def test_rfc6749_4_1_2_1_unknown_client_id_gets_error_page(client):
    r = authorize(client, AuthRequest(), client_id="no-such-agency")
    assert_error_page(r, "invalid_client", "The client does not exist on this server.")


def test_rfc6749_4_1_2_1_missing_client_id_gets_error_page(client):
    r = authorize(client, AuthRequest(), client_id=None)
    # refused as missing, not only because no agency is found under an empty name
    assert_error_page(r, "invalid_client", "Missing 'client_id' parameter.")


# -- RFC 7636 / RFC 9700 2.1.1: PKCE S256 required ------------------------------------------


def test_rfc7636_missing_code_challenge_is_redirected_invalid_request(client):
    auth = AuthRequest()
    r = authorize(client, auth, code_challenge=None, code_challenge_method=None)
    # the PKCE-required check itself, not the method check that an absent method also fails
    assert_error_redirect(r, "invalid_request", auth.state, description=PKCE_REQUIRED)


def test_rfc9700_2_1_1_plain_code_challenge_method_is_refused(client):
    auth = AuthRequest()
    verifier, _ = pkce_pair()
    r = authorize(client, auth, code_challenge=verifier, code_challenge_method="plain")
    assert_error_redirect(r, "invalid_request", auth.state, description=S256_ONLY)


def test_rfc7636_4_3_absent_method_defaults_to_plain_and_is_refused(client):
    auth = AuthRequest()
    r = authorize(client, auth, code_challenge_method=None)
    assert_error_redirect(r, "invalid_request", auth.state, description=S256_ONLY)


def test_rfc7636_4_3_method_is_case_sensitive(client):
    auth = AuthRequest()
    r = authorize(client, auth, code_challenge_method="s256")
    # the hub's S256 check, not only Authlib's list of methods (which also lacks "s256")
    assert_error_redirect(r, "invalid_request", auth.state, description=S256_ONLY)


@pytest.mark.parametrize("challenge", [
    "tooshort",
    "A" * 42,                      # one below the 43-character minimum
    "A" * 129,                     # one above the maximum
    "A" * 43 + "=",                # base64 padding is not base64url-without-padding
    "A" * 42 + "+",                # '+' is not in the unreserved set
], ids=["short", "42_chars", "129_chars", "padded", "plus_sign"])
def test_rfc7636_4_2_malformed_code_challenge_is_invalid_request(client, challenge):
    auth = AuthRequest()
    r = authorize(client, auth, code_challenge=challenge)
    params = assert_error_redirect(r, "invalid_request", auth.state)
    assert "code_challenge" in params["error_description"][0]


def test_rfc7636_two_code_challenges_are_invalid_request(client):
    auth = AuthRequest()
    _, other = pkce_pair()
    pairs = list(auth.params().items()) + [("code_challenge", other)]
    assert_error_redirect(authorize_pairs(client, pairs), "invalid_request", auth.state)


# -- RFC 6749 4.1.2.1: response_type and scope ----------------------------------------------


@pytest.mark.parametrize("response_type", ["token", "id_token", "code id_token", "code token",
                                           "id_token token", "Code", "none"])
def test_rfc6749_4_1_2_1_unsupported_response_type_is_redirected(client, response_type):
    auth = AuthRequest()
    r = authorize(client, auth, response_type=response_type)
    params = assert_error_redirect(r, "unsupported_response_type", auth.state)
    # response_type=token must never put anything in a fragment (RFC 9700 2.1.2)
    assert "access_token" not in params and "id_token" not in params


def test_rfc6749_4_1_2_1_missing_response_type_is_unsupported_response_type(client):
    auth = AuthRequest()
    r = authorize(client, auth, response_type=None)
    assert_error_redirect(r, "unsupported_response_type", auth.state)


def test_rfc6749_4_1_2_1_unsupported_response_type_with_bad_redirect_uri_gets_page(client):
    r = authorize(client, AuthRequest(), response_type="token", redirect_uri=REGISTERED + "/")
    assert_error_page(r, "unsupported_response_type")


def test_rfc6749_4_1_2_1_unsupported_response_type_with_unknown_client_gets_page(client):
    r = authorize(client, AuthRequest(), response_type="token", client_id="no-such-agency")
    assert_error_page(r, "unsupported_response_type")


@pytest.mark.parametrize("scope", ["openid admin", "openid offline_access", "openid phone"])
def test_rfc6749_4_1_2_1_unknown_scope_is_invalid_scope(client, scope):
    auth = AuthRequest(scope=scope)
    assert_error_redirect(authorize(client, auth), "invalid_scope", auth.state)


@pytest.mark.parametrize("scope", ["profile email", "", "email"])
def test_oidc_core_3_1_2_1_openid_scope_is_required(client, scope):
    auth = AuthRequest(scope=scope)
    assert_error_redirect(authorize(client, auth), "invalid_scope", auth.state)


@pytest.mark.parametrize("mode", ["form_post", "fragment", "jwt"])
def test_oauth_multiple_response_types_2_1_only_query_response_mode(client, mode):
    auth = AuthRequest(extra={"response_mode": mode})
    assert_error_redirect(authorize(client, auth), "invalid_request", auth.state)


# -- OpenID Connect Core 3.1.2.1: prompt and max_age ------------------------------------------


def test_oidc_core_3_1_2_1_prompt_none_without_session_is_login_required(client):
    auth = AuthRequest(extra={"prompt": "none"})
    assert_error_redirect(authorize(client, auth), "login_required", auth.state)


def test_oidc_core_3_1_2_1_prompt_none_with_session_issues_code_without_upstream(client):
    first = full_login(client, AuthRequest())
    assert first["iss"] == HUB_ISSUER
    auth = AuthRequest(extra={"prompt": "none"})
    r = authorize(client, auth)
    code = assert_code_redirect(r, auth)  # 302 straight to the agency, not /login or the OP
    claims = id_token_claims(client, auth, code)
    assert claims["nonce"] == auth.nonce


def test_rfc6749_10_10_codes_are_unguessable_and_url_safe(client):
    """RFC 6749 10.10: the chance of guessing a code must be at most 2^-128. Each code the
    endpoint issues is 48 characters of the URL-safe base64 alphabet (RFC 4648 5) drawn
    from 36 random bytes, 288 bits, so it needs no escaping in the redirect's query; and
    codes issued one after another within one session all differ."""
    full_login(client, AuthRequest())
    codes = []
    for _ in range(20):
        auth = AuthRequest(extra={"prompt": "none"})
        codes.append(assert_code_redirect(authorize(client, auth), auth))
    for code in codes:
        assert re.fullmatch(r"[A-Za-z0-9_-]{48}", code), code
    assert len(set(codes)) == len(codes)
    # every character position varies: not a counter or a timestamp with a random tail
    assert all(len({code[i] for code in codes}) > 1 for i in range(48))


def test_oidc_core_3_1_2_1_prompt_none_with_other_value_is_invalid_request(client):
    auth = AuthRequest(extra={"prompt": "none login"})
    assert_error_redirect(authorize(client, auth), "invalid_request", auth.state)


def test_oidc_core_3_1_2_1_prompt_login_with_session_forces_login(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={"prompt": "login"})
    r = authorize(client, auth)
    flow_id = assert_login_page_redirect(r)
    # The old session cannot be used to skip the new login: the flow is not authenticated.
    skipped = client.get(f"/authorize/continue?flow={flow_id}")
    assert skipped.status_code == 400 and "Location" not in skipped.headers
    # Logging in again completes the same flow with a code.
    done, _ = login_from(client, r)
    assert_code_redirect(done, auth)


def test_oidc_core_3_1_2_1_max_age_zero_with_session_forces_login(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={"max_age": "0"})
    assert_login_page_redirect(authorize(client, auth))


def test_oidc_core_3_1_2_1_max_age_zero_with_prompt_none_is_login_required(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={"max_age": "0", "prompt": "none"})
    assert_error_redirect(authorize(client, auth), "login_required", auth.state)


def test_oidc_core_3_1_2_1_max_age_not_exceeded_uses_session(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={"max_age": "3600"})
    assert_code_redirect(authorize(client, auth), auth)


@pytest.mark.parametrize("max_age", ["abc", "-1", "1.5", " 5", "0x10", "\u00b2", "\u0661"],
                         ids=["letters", "negative", "decimal", "space", "hex",
                              "superscript_two", "arabic_indic_one"])
def test_oidc_core_3_1_2_1_invalid_max_age_is_invalid_request(client, max_age):
    auth = AuthRequest(extra={"max_age": max_age})
    params = assert_error_redirect(authorize(client, auth), "invalid_request", auth.state)
    assert "max_age" in params["error_description"][0]


@pytest.mark.parametrize("name", ["max_age", "response_mode", "prompt", "id_token_hint",
                                  "acr_values", "ui_locales", "login_hint"])
def test_rfc6749_3_1_a_parameter_sent_without_a_value_is_as_if_omitted(client, name):
    """RFC 6749 3.1: "Parameters sent without a value MUST be treated as if they were
    omitted from the request": with a session, the code comes as it would without it."""
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={name: ""})
    assert_code_redirect(authorize(client, auth), auth)


@pytest.mark.parametrize(("name", "values"), [
    ("prompt", ["none", "login"]), ("max_age", ["0", "3600"]), ("nonce", ["a", "b"]),
    ("code_challenge_method", ["S256", "S256"]), ("ui_locales", ["en", "fr"])])
def test_rfc6749_3_1_a_repeated_parameter_is_invalid_request_at_the_redirect_uri(
        client, name, values):
    """RFC 6749 3.1: "Request and response parameters MUST NOT be included more than
    once". Authlib refuses five of them itself; the others took their first value
    (prompt=none&prompt=login gave a code). With the client and redirect URI known good,
    the agency is told at its redirect URI."""
    full_login(client, AuthRequest())
    auth = AuthRequest()
    pairs = [(k, v) for k, v in auth.params().items() if k != name]
    pairs += [(name, value) for value in values]
    assert_error_redirect(authorize_pairs(client, pairs), "invalid_request", auth.state,
                          description=f"Multiple '{name}' in request.")


# -- OpenID Connect Core 6: request objects are not supported ---------------------------------


@pytest.mark.parametrize(("name", "value", "error"), [
    ("request", "eyJhbGciOiJub25lIn0.eyJzdGF0ZSI6IngifQ.", "request_not_supported"),
    ("request_uri", "https://one.agency.example/request.jwt", "request_uri_not_supported"),
    ("registration", '{"logo_uri":"https://evil.example/x.png"}', "registration_not_supported"),
])
def test_oidc_core_6_request_parameters_are_refused(client, name, value, error):
    auth = AuthRequest(extra={name: value})
    assert_error_redirect(authorize(client, auth), error, auth.state)


def test_oidc_core_6_request_uri_refused_even_with_session(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(extra={"request_uri": "urn:ietf:params:oauth:request_uri:abc"})
    assert_error_redirect(authorize(client, auth), "request_uri_not_supported", auth.state)


# -- RFC 6749 3.1: parameters must not be repeated -------------------------------------------


def test_rfc6749_3_1_duplicate_state_is_invalid_request_page(client):
    # Which state would be echoed is ambiguous, so the hub shows its page, not a redirect.
    auth = AuthRequest()
    pairs = list(auth.params().items()) + [("state", "second-state")]
    assert_error_page(authorize_pairs(client, pairs), "invalid_request",
                      "Multiple 'state' in request.")


@pytest.mark.parametrize("second", [REGISTERED, "https://evil.example/cb"],
                         ids=["same_value", "attacker_value"])
def test_rfc6749_3_1_duplicate_redirect_uri_gets_page_not_redirect(client, second):
    auth = AuthRequest()
    pairs = list(auth.params().items()) + [("redirect_uri", second)]
    assert_error_page(authorize_pairs(client, pairs), "invalid_request",
                      "Multiple 'redirect_uri' in request.")


def test_rfc6749_3_1_duplicate_redirect_uri_attacker_first_gets_page(client):
    # Refused as a duplicate, not merely because the first value is unregistered.
    auth = AuthRequest()
    pairs = [("redirect_uri", "https://evil.example/cb")] + list(auth.params().items())
    assert_error_page(authorize_pairs(client, pairs), "invalid_request",
                      "Multiple 'redirect_uri' in request.")


@pytest.mark.parametrize("name", ["client_id", "response_type", "scope"])
def test_rfc6749_3_1_other_duplicates_are_invalid_request_page(client, name):
    auth = AuthRequest()
    pairs = list(auth.params().items()) + [(name, auth.params()[name])]
    assert_error_page(authorize_pairs(client, pairs), "invalid_request",
                      f"Multiple '{name}' in request.")


def test_rfc6749_3_1_a_parameter_in_both_query_and_form_is_a_duplicate(client):
    """A POST's parameters are its query's and its form's together (OpenID Connect Core
    3.1.2.1): one in each is sent twice. A GET's form is never read, so it is no duplicate."""
    auth = AuthRequest()
    params = auth.params()
    r = client.post("/authorize?" + urlencode({"client_id": params["client_id"]}), data=params)
    assert_error_page(r, "invalid_request")
    r = client.get("/authorize?" + urlencode(params), data={"client_id": "someone-else"})
    done, _ = login_from(client, r)  # the request was taken as its query has it
    assert_code_redirect(done, auth)


# -- OpenID Connect Core 3.1.2.1: POST is the same as GET ------------------------------------


def test_oidc_core_3_1_2_1_post_without_session_starts_login_and_issues_code(client):
    auth = AuthRequest()
    r = authorize(client, auth, post=True)
    done, _ = login_from(client, r)
    code = assert_code_redirect(done, auth)
    assert id_token_claims(client, auth, code)["nonce"] == auth.nonce


def test_oidc_core_3_1_2_1_post_with_session_issues_code(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(agency=AGENCY_TWO)
    assert_code_redirect(authorize(client, auth, post=True), auth)


@pytest.mark.parametrize(("changes", "error"), [
    ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"scope": "openid admin"}, "invalid_scope"),
    ({"prompt": "none"}, "login_required"),
    ({"request_uri": "https://one.agency.example/r"}, "request_uri_not_supported"),
], ids=["no_pkce", "response_type", "scope", "prompt_none", "request_uri"])
def test_oidc_core_3_1_2_1_post_errors_match_get(client, changes, error):
    auth = AuthRequest()
    via_get = authorize(client, auth, **changes)
    via_post = authorize(client, auth, post=True, **changes)
    assert_error_redirect(via_get, error, auth.state)
    assert_error_redirect(via_post, error, auth.state)
    assert redirect_params(via_get)["error"] == redirect_params(via_post)["error"]


def test_oidc_core_3_1_2_1_post_bad_redirect_uri_gets_page(client):
    r = authorize(client, AuthRequest(), post=True, redirect_uri=REGISTERED + "?x=1")
    assert_error_page(r, "invalid_request")


# -- RFC 6749 4.1.2: state echoed exactly; OIDC Core 3.1.3.7: nonce in the ID token ------------


def test_rfc6749_4_1_2_state_with_special_characters_echoed_after_login(client):
    auth = AuthRequest(state=AWKWARD_STATE)
    r = authorize(client, auth)
    done, _ = login_from(client, r)
    assert_code_redirect(done, auth)  # exactly AWKWARD_STATE once, iss once


def test_rfc6749_4_1_2_state_with_special_characters_echoed_with_session(client):
    full_login(client, AuthRequest())
    auth = AuthRequest(state=AWKWARD_STATE + "iss=x&code=y")
    assert_code_redirect(authorize(client, auth), auth)


def test_rfc6749_4_1_2_1_state_with_special_characters_echoed_on_error(client):
    state = AWKWARD_STATE + "&iss=https://evil.example&error=none"
    auth = AuthRequest(state=state)
    r = authorize(client, auth, code_challenge=None)
    assert_error_redirect(r, "invalid_request", state)


def test_rfc6749_4_1_2_no_state_means_no_state_in_response(client):
    auth = AuthRequest()
    r = authorize(client, auth, state=None, code_challenge=None)
    params = assert_error_redirect(r, "invalid_request", None)
    assert "state" not in params


def test_oidc_core_3_1_3_7_nonce_echoed_in_id_token(client):
    auth = AuthRequest(nonce="n-" + AWKWARD_STATE)
    params = full_login(client, auth)
    assert id_token_claims(client, auth, params["code"])["nonce"] == auth.nonce


def test_a_nonce_is_used_once_per_agency_while_its_code_lives(client):
    """OpenID Connect Core 15.5.2 (nonce against replay): the hub refuses a second
    authorization request of the same agency with a nonce it has just issued a code for;
    another nonce, or another agency with that nonce, goes through."""
    first = AuthRequest(nonce="once-" + "n" * 20)
    full_login(client, first)
    again = AuthRequest(nonce=first.nonce)
    assert_error_redirect(authorize(client, again), "invalid_request", again.state)
    fresh = AuthRequest()
    assert "code" in redirect_params(authorize(client, fresh))
    other = AuthRequest(agency=AGENCY_TWO, nonce=first.nonce)
    assert "code" in redirect_params(authorize(client, other))


def test_a_nonce_replayed_on_the_consent_page_path_gets_an_error_and_no_code(client):
    """OpenID Connect Core 15.5.2: the nonce is claimed with the code, so a replay that
    reaches the consent page is refused when the citizen answers it: an error at the
    agency's redirect URI, and no code."""
    first = AuthRequest(nonce="consent-once-" + "n" * 20)
    full_login(client, first)
    again = AuthRequest(nonce=first.nonce, extra={"prompt": "consent"})
    r = allow_consent(client, client.get(again.url()))
    assert r.status_code == 302
    params = redirect_params(r)
    assert params["error"] == ["invalid_request"] and "code" not in params
    assert params["state"] == [again.state]
    fresh = AuthRequest()
    assert "code" in redirect_params(client.get(fresh.url()))


def test_rfc9207_iss_on_success_and_error_redirects(client):
    auth = AuthRequest()
    params = full_login(client, auth)
    assert params["iss"] == HUB_ISSUER
    bad = AuthRequest(scope="openid admin")
    assert_error_redirect(authorize(client, bad), "invalid_scope", bad.state)
    # exactly once on the session (no login page) path as well
    auth2 = AuthRequest()
    assert_code_redirect(authorize(client, auth2), auth2)


# -- /authorize/continue: single use -------------------------------------------------------


@pytest.mark.parametrize("query", ["?flow=no-such-flow", "?flow=", ""],
                         ids=["unknown", "empty", "missing"])
def test_continue_with_unknown_flow_is_readable_400_without_code(client, query):
    full_login(client, AuthRequest())  # even with a hub session
    r = client.get("/authorize/continue" + query)
    assert r.status_code == 400
    assert "Location" not in r.headers
    assert r.mimetype == "text/html"
    assert "This sign-in has expired" in r.get_data(as_text=True)


def test_continue_replayed_after_use_issues_no_second_code(client):
    auth = AuthRequest()
    done, continue_url = login_from(client, authorize(client, auth))
    assert_code_redirect(done, auth)
    replay = client.get(continue_url)
    assert replay.status_code == 400
    assert "Location" not in replay.headers
    assert "This sign-in has expired" in replay.get_data(as_text=True)


def test_continue_of_another_browser_is_refused(client, app):
    auth = AuthRequest()
    first = authorize(client, auth)
    flow_id = assert_login_page_redirect(first)
    other = app.test_client()
    full_login(other, AuthRequest())  # the other browser has its own hub session
    r = other.get(f"/authorize/continue?flow={flow_id}")
    assert r.status_code == 400 and "Location" not in r.headers


# -- OpenID Connect Discovery 1.0 / RFC 8414 ------------------------------------------------


def test_discovery_3_issuer_is_exact_and_endpoints_start_with_it(client, hub):
    r = client.get("/.well-known/openid-configuration")
    assert r.status_code == 200 and r.mimetype == "application/json"
    doc = r.json
    assert doc["issuer"] == hub.settings.issuer == HUB_ISSUER
    assert not doc["issuer"].endswith("/")
    for name in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
        assert doc[name].startswith(HUB_ISSUER + "/"), (name, doc[name])
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["response_types_supported"] == ["code"]
    assert doc["request_parameter_supported"] is False
    assert doc["request_uri_parameter_supported"] is False
    # the advertised endpoints are really there
    assert client.get(path_of(doc["jwks_uri"])).status_code == 200
    assert client.get(path_of(doc["userinfo_endpoint"])).status_code == 401
    assert client.post(path_of(doc["token_endpoint"])).json["error"] == "unsupported_grant_type"
    assert_error_page(client.get(path_of(doc["authorization_endpoint"])),
                      "unsupported_response_type")


def test_discovery_4_trailing_slash_is_not_a_second_document(client):
    r = client.get("/.well-known/openid-configuration/")
    assert r.status_code == 404
    assert r.mimetype == "text/html"
    assert "issuer" not in r.get_data(as_text=True)


def test_rfc7517_jwks_keys_are_public_signing_keys(client):
    r = client.get("/jwks")
    assert r.status_code == 200
    assert r.mimetype == "application/jwk-set+json"
    keys = r.json["keys"]
    assert keys
    kids = [k["kid"] for k in keys]
    assert len(set(kids)) == len(kids)
    for key in keys:
        assert key["kid"] and key["alg"] in ("ES256", "RS256") and key["use"] == "sig"
        assert not {"d", "p", "q", "dp", "dq", "qi", "oth", "k"} & set(key), key


# -- RFC 9207 with a registered redirect URI that has a query ---------------------------------

QUERY_AGENCY = Agency("agency-three", "s3-" + "c" * 40,
                          "https://three.agency.example/cb?dismiss=1", "Agency Three")


@pytest.fixture
def query_agency(hub):
    hub.agencies.add(client_id=QUERY_AGENCY.client_id, name=QUERY_AGENCY.name,
                     redirect_uris=[QUERY_AGENCY.redirect_uri], secret=QUERY_AGENCY.secret)
    return QUERY_AGENCY


def test_rfc6749_3_1_2_registered_query_is_kept_and_iss_added_once_on_success(client,
                                                                              query_agency):
    full_login(client, AuthRequest())
    auth = AuthRequest(agency=query_agency)
    r = allow_consent(client, client.get(auth.url()))  # a new agency: consent first
    assert r.status_code == 302
    assert r.headers["Location"].startswith(query_agency.redirect_uri + "&code=")
    params = redirect_params(r)
    assert params["dismiss"] == ["1"]
    assert params["state"] == [auth.state] and params["iss"] == [HUB_ISSUER]


def test_rfc9207_iss_on_error_redirect_when_registered_uri_has_query(client, query_agency):
    auth = AuthRequest(agency=query_agency)
    r = authorize(client, auth, code_challenge=None)
    assert r.status_code == 302
    assert r.headers["Location"].startswith(query_agency.redirect_uri + "&error=")
    params = redirect_params(r)
    assert params["dismiss"] == ["1"]
    assert params["error"] == ["invalid_request"] and params["state"] == [auth.state]
    assert params["iss"] == [HUB_ISSUER]


def test_a_request_is_validated_once_and_a_refusal_every_time(client, monkeypatch):
    """The hub validates an authorization request before deciding on consent; issuing the
    code does not validate it a second time (idp/provider.py CodeGrant), and a request that
    fails validation is refused on each attempt, never remembered as valid."""
    from authlib.oauth2.rfc6749 import grants

    calls: list[str] = []
    original = grants.AuthorizationCodeGrant.validate_authorization_request

    def counted(self: Any) -> Any:
        calls.append(self.request.payload.client_id)
        return original(self)

    full_login(client, AuthRequest())  # alice has a hub session
    monkeypatch.setattr(grants.AuthorizationCodeGrant, "validate_authorization_request",
                        counted)
    auth = AuthRequest(agency=AGENCY_TWO, scope="openid email")
    assert_code_redirect(client.get(auth.url()), auth)
    assert calls == [AGENCY_TWO.client_id]
    bad = AuthRequest(agency=AGENCY_TWO, scope="openid email")
    for _ in (1, 2):
        r = authorize(client, bad, code_challenge=pkce_pair()[0], code_challenge_method="plain")
        assert_error_redirect(r, "invalid_request", bad.state, AGENCY_TWO.redirect_uri)
    assert len(calls) == 3


@pytest.mark.parametrize(("location", "expected"), [
    ("https://one.agency.example/cb?code=c&state=s",
     "https://one.agency.example/cb?code=c&state=s&iss=https%3A%2F%2Fhub.example%2Fa%20b"),
    ("https://one.agency.example/cb", "https://one.agency.example/cb?iss=https%3A%2F%2Fhub"
     ".example%2Fa%20b"),
    ("https://one.agency.example/cb?", "https://one.agency.example/cb?iss=https%3A%2F%2Fhub"
     ".example%2Fa%20b"),
    ("https://one.agency.example/cb?x=1&", "https://one.agency.example/cb?x=1&iss=https%3A"
     "%2F%2Fhub.example%2Fa%20b"),
])
def test_rfc9207_iss_is_appended_to_the_query_as_it_stands(location, expected):
    from werkzeug.wrappers import Response

    from idp.provider import HubIssuerParameter

    response = Response(status=302, headers={"Location": location})
    HubIssuerParameter("https://hub.example/a b").add_issuer_parameter(None, response)
    assert response.headers["Location"] == expected
    assert parse_qs(urlsplit(expected).query)["iss"] == ["https://hub.example/a b"]


def test_rfc9207_iss_before_a_fragment_goes_through_authlib():
    """A Location with a fragment never comes from a registered redirect URI (RFC 6749
    3.1.2), but if one did, ``iss`` would still go into its query, not after the '#'."""
    from werkzeug.wrappers import Response

    from idp.provider import HubIssuerParameter

    response = Response(status=302, headers={"Location": "https://a.example/cb?code=c#f"})
    HubIssuerParameter("https://hub.example").add_issuer_parameter(None, response)
    parts = urlsplit(response.headers["Location"])
    assert parse_qs(parts.query) == {"code": ["c"], "iss": ["https://hub.example"]}
    assert parts.fragment == "f"


def test_authorization_redirects_are_labelled_as_werkzeug_labels_them(client):
    """The code and error redirects carry the Content-Type Werkzeug gives a response with
    none (idp/provider.py handle_response), and an empty body; the token response its
    JSON type (RFC 6749 5.1)."""
    full_login(client, AuthRequest())
    auth = AuthRequest(agency=AGENCY_TWO, scope="openid email")
    r = client.get(auth.url())
    assert_code_redirect(r, auth)
    assert r.headers["Content-Type"] == "text/html; charset=utf-8" and r.data == b""
    assert r.headers.getlist("Content-Type") == ["text/html; charset=utf-8"]
    bad = AuthRequest()
    r = authorize(client, bad, code_challenge=None)
    assert_error_redirect(r, "invalid_request", bad.state)
    assert r.headers["Content-Type"] == "text/html; charset=utf-8" and r.data == b""
    again = AuthRequest(agency=AGENCY_TWO, scope="openid email")
    token = redeem(client, again, assert_code_redirect(client.get(again.url()), again))
    assert token.status_code == 200 and token.headers["Content-Type"] == "application/json"


# -- a fresh sign-in, asked of the upstream too (OpenID Connect Core 3.1.2.1) --------------


def _to_upstream(client: Any, auth: AuthRequest) -> str:
    """From the agency's request to the URL the hub sends the browser to at the upstream."""
    page = client.get(f"/login?flow={assert_login_page_redirect(authorize(client, auth))}")
    links = re.findall(r'href="(/login/op/start\?flow=[^"]+)"', page.get_data(as_text=True))
    started = client.get(html.unescape(links[0]))
    assert started.status_code == 303
    return str(started.headers["Location"])


def _through_upstream(browser: Any, url: str) -> str:
    """Follow the upstream (signing in if it asks) until it sends the browser back."""
    r = browser.get(url, allow_redirects=False, timeout=10)
    for _ in range(10):
        if r.status_code == 200:  # its sign-in form
            action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
            r = browser.post(urljoin(r.url, html.unescape(action.group(1))), timeout=10,
                             data={"username": "alice", "password": "alice-password"},
                             allow_redirects=False)
            continue
        location = urljoin(r.url, r.headers["Location"])
        if location.startswith(HUB_ISSUER):
            return location
        r = browser.get(location, allow_redirects=False, timeout=10)
    raise AssertionError("the upstream never sent the browser back")


def _id_token_after(client: Any, auth: AuthRequest, callback: str) -> dict[str, Any]:
    back = client.get(path_of(callback))
    assert back.status_code == 303, back.get_data(as_text=True)[:500]
    done = allow_consent(client, client.get(path_of(back.headers["Location"])))
    code = parse_qs(urlsplit(done.headers["Location"]).query)["code"][0]
    return jose_jwt.get_unverified_claims(redeem(client, auth, code).json["id_token"])


@pytest.mark.parametrize("extra", [{"prompt": "login"}, {"prompt": "select_account"},
                                   {"max_age": "0"}], ids=["login", "select_account", "max_age"])
def test_oidc_core_3_1_2_1_a_fresh_sign_in_is_asked_of_the_upstream_too(client, extra):
    """prompt=login, select_account and max_age go on to the upstream, whose own session
    would otherwise answer for a sign-in it did not redo; the ID token's auth_time is the
    upstream's (OpenID Connect Core 2: when the authentication occurred)."""
    import requests

    browser = requests.Session()  # one browser: the upstream keeps its session in it
    first = AuthRequest()
    _id_token_after(client, first, _through_upstream(browser, _to_upstream(client, first)))
    time.sleep(1.1)
    asked = time.time()
    auth = AuthRequest(extra=extra)
    upstream_url = _to_upstream(client, auth)
    sent = parse_qs(urlsplit(upstream_url).query)
    assert sent.get("prompt") == (["login"] if "prompt" in extra else None)
    assert sent.get("max_age") == (["0"] if "max_age" in extra else None)
    claims = _id_token_after(client, auth, _through_upstream(browser, upstream_url))
    assert claims["auth_time"] >= int(asked)


def test_oidc_core_2_auth_time_is_when_the_upstream_authenticated(client, monkeypatch):
    """Without a fresh sign-in asked for, the upstream may answer from its own session:
    the ID token then says when that authentication occurred, not when the hub's login
    happened; and an upstream that ignores prompt=login (a fault the real one, which
    honours it, is made to show by dropping it on the way) gets the agency login_required,
    not a stale sign-in passed off as fresh (Core 3.1.2.1: "it MUST return an error")."""
    import requests

    from connectors.oidc import OIDCConnector

    browser = requests.Session()
    first = AuthRequest()
    signed_in = _id_token_after(
        client, first, _through_upstream(browser, _to_upstream(client, first)))["auth_time"]
    time.sleep(1.1)
    with client.session_transaction() as s:
        s.pop("login")  # the hub's session ends; the upstream's does not
    again = AuthRequest()
    claims = _id_token_after(client, again,
                             _through_upstream(browser, _to_upstream(client, again)))
    assert claims["auth_time"] == signed_in < claims["iat"]

    begin = OIDCConnector.begin
    monkeypatch.setattr(OIDCConnector, "begin", lambda self, uri, **_: begin(self, uri))
    monkeypatch.setattr("idp.views.AUTH_TIME_LEEWAY_SECONDS", 0)  # no skew here: one host
    time.sleep(1.1)
    auth = AuthRequest(extra={"prompt": "login"})
    back = client.get(path_of(_through_upstream(browser, _to_upstream(client, auth))))
    assert back.status_code == 303
    assert_error_redirect(client.get(path_of(back.headers["Location"])), "login_required",
                          auth.state)


def test_oidc_core_3_1_2_1_login_hint_and_ui_locales_go_on_to_the_upstream(client):
    """login_hint and ui_locales are the agency's hints of whom to expect and in which
    languages: the hub signs no one in itself, so they go on to the upstream the citizen
    chooses, which uses them as it can, and the sign-in completes as without them."""
    import requests

    auth = AuthRequest(extra={"login_hint": "alice@example.org", "ui_locales": "fr-CA en"})
    upstream_url = _to_upstream(client, auth)
    sent = parse_qs(urlsplit(upstream_url).query)
    assert sent["login_hint"] == ["alice@example.org"] and sent["ui_locales"] == ["fr-CA en"]
    claims = _id_token_after(client, auth, _through_upstream(requests.Session(), upstream_url))
    assert claims["aud"] == AGENCY_ONE.client_id


@pytest.mark.parametrize("hints", [
    {"login_hint": "x" * 257}, {"login_hint": "alice\nbob"}, {"ui_locales": "en <b>"},
    {"ui_locales": "en" + " fr" * 10}, {"login_hint": "   "},
], ids=["long-hint", "control-hint", "odd-locales", "eleven-locales", "blank-hint"])
def test_oidc_core_3_1_2_1_hints_that_cannot_be_used_are_not_passed_on(client, hints):
    """A hint that cannot be an identifier or a list of language tags is dropped (an OP may
    ignore hints): the sign-in goes on without it, and it never reaches the upstream."""
    sent = parse_qs(urlsplit(_to_upstream(client, AuthRequest(extra=hints))).query)
    assert "login_hint" not in sent and "ui_locales" not in sent
