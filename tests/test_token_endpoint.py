"""The token endpoint (/token) and the UserInfo endpoint (/userinfo).

Codes come from one brokered login per test: after it, the hub session answers further
authorization requests with a code straight away (no upstream round trip).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time
from typing import Any

import pytest
from jose import jwt as jose_jwt

from tests.conftest import HUB_ISSUER
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    allow_consent,
    full_login,
    pkce_pair,
    query,
    redeem,
)
from tests.flows import TestAgency as Agency

POST_AGENCY = Agency("agency-post", "sp-" + "p" * 40, "https://post.agency.example/cb",
                     "Agency Post")
UNKNOWN_AGENCY = Agency("no-such-agency", "su-" + "u" * 40, AGENCY_ONE.redirect_uri, "Nobody")


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def browser(client: Any) -> Any:
    """A browser with a hub session (one full brokered login)."""
    full_login(client, AuthRequest())
    return client


@pytest.fixture
def post_agency(hub: Any) -> Agency:
    hub.agencies.add(client_id=POST_AGENCY.client_id, name=POST_AGENCY.name,
                     redirect_uris=[POST_AGENCY.redirect_uri], secret=POST_AGENCY.secret,
                     auth_method="client_secret_post")
    return POST_AGENCY


def new_code(browser: Any, auth: AuthRequest) -> str:
    """A fresh code from the hub session (no upstream login)."""
    r = allow_consent(browser, browser.get(auth.url()))  # first use: consent
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    assert r.headers["Location"].startswith(auth.agency.redirect_uri + "?code=")
    params = query(r.headers["Location"])
    assert params["state"] == auth.state and params["iss"] == HUB_ISSUER
    return params["code"]


def as_agency(auth: AuthRequest, agency: Agency) -> AuthRequest:
    """The same request (same PKCE verifier) with another agency's credentials."""
    return dataclasses.replace(auth, agency=agency)


def assert_no_store(r: Any) -> None:
    assert r.headers["Cache-Control"] == "no-store"  # RFC 6749 5.1 and 5.2
    assert r.headers["Pragma"] == "no-cache"


def assert_token_ok(r: Any, auth: AuthRequest, hub: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    assert_no_store(r)
    body = r.json
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "id_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == hub.tokens.access_token_lifetime
    assert body["scope"] == auth.scope
    claims = jose_jwt.get_unverified_claims(body["id_token"])
    assert claims["aud"] == auth.agency.client_id and claims["iss"] == HUB_ISSUER
    assert claims["nonce"] == auth.nonce
    return body


def assert_token_error(r: Any, status: int, error: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    assert r.mimetype == "application/json"
    assert_no_store(r)
    body = r.json
    assert body["error"] == error, body
    assert not {"access_token", "id_token", "refresh_token"} & set(body)
    assert "Location" not in r.headers
    return body


def assert_invalid_client(r: Any, status: int = 401, description: str | None = None) -> None:
    body = assert_token_error(r, status, "invalid_client")
    if description is not None:
        assert body["error_description"] == description, body
    if status == 401:
        # RFC 6749 5.2: a 401 names the scheme the client may use
        assert r.headers["WWW-Authenticate"].startswith("Basic ")


def userinfo(client: Any, token: str, method: str = "GET") -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    return client.open("/userinfo", method=method, headers=headers)


# -- RFC 6749 2.3.1: client authentication ----------------------------------------------------


@pytest.mark.parametrize("agency", [AGENCY_ONE, AGENCY_TWO], ids=["agency_one", "agency_two"])
def test_rfc6749_2_3_1_client_secret_basic_for_configured_agencies(browser, hub, agency):
    auth = AuthRequest(agency=agency)
    assert_token_ok(redeem(browser, auth, new_code(browser, auth)), auth, hub)


def test_rfc6749_2_3_1_client_secret_post_for_agency_registered_so(browser, hub, post_agency):
    auth = AuthRequest(agency=post_agency)
    assert_token_ok(redeem(browser, auth, new_code(browser, auth), method="post"), auth, hub)


def test_rfc6749_2_3_1_basic_agency_using_post_is_invalid_client(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert_invalid_client(redeem(browser, auth, code, method="post"))
    # Client authentication fails before the code is looked at: the code is still good.
    assert_token_ok(redeem(browser, auth, code), auth, hub)


def test_rfc6749_2_3_1_post_agency_using_basic_is_invalid_client(browser, hub, post_agency):
    auth = AuthRequest(agency=post_agency)
    code = new_code(browser, auth)
    assert_invalid_client(redeem(browser, auth, code, method="basic"))
    assert_token_ok(redeem(browser, auth, code, method="post"), auth, hub)


def test_rfc6749_2_3_1_wrong_secret_basic_is_invalid_client(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    wrong = as_agency(auth, dataclasses.replace(AGENCY_ONE, secret=AGENCY_ONE.secret + "x"))
    assert_invalid_client(redeem(browser, wrong, code))
    assert_token_ok(redeem(browser, auth, code), auth, hub)


def test_rfc6749_2_3_1_wrong_secret_post_is_invalid_client(browser, post_agency):
    auth = AuthRequest(agency=post_agency)
    code = new_code(browser, auth)
    wrong = as_agency(auth, dataclasses.replace(post_agency, secret="nope-" + "n" * 40))
    assert_invalid_client(redeem(browser, wrong, code, method="post"))


def test_rfc6749_2_3_1_other_agencys_secret_is_invalid_client(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    mixed = as_agency(auth, dataclasses.replace(AGENCY_ONE, secret=AGENCY_TWO.secret))
    assert_invalid_client(redeem(browser, mixed, code))


@pytest.mark.parametrize(("method", "status"), [("basic", 401), ("post", 400)])
def test_rfc6749_2_3_1_unknown_client_is_invalid_client(browser, hub, method, status):
    # RFC 6749 5.2: 401 is a MUST only when the client used the Authorization header. The
    # description tells "no such client" from a known client's wrong secret or method.
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert_invalid_client(redeem(browser, as_agency(auth, UNKNOWN_AGENCY), code, method=method),
                          status, "The client does not exist on this server.")
    assert_token_ok(redeem(browser, auth, code), auth, hub)


def test_rfc6749_2_3_1_no_client_authentication_is_invalid_client(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = browser.post("/token", data={"grant_type": "authorization_code", "code": code,
                                     "redirect_uri": auth.agency.redirect_uri,
                                     "code_verifier": auth.verifier,
                                     "client_id": auth.agency.client_id})
    assert_invalid_client(r)


def test_rfc6749_2_3_1_malformed_basic_header_is_invalid_client(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": auth.agency.redirect_uri, "code_verifier": auth.verifier}
    for header in ("Basic !!!not-base64!!!",
                   "Basic " + base64.b64encode(AGENCY_ONE.client_id.encode()).decode(),
                   "Bearer " + AGENCY_ONE.secret):
        r = browser.post("/token", data=form, headers={"Authorization": header})
        assert_invalid_client(r)


def test_rfc6749_2_3_two_authentication_methods_at_once_are_refused(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = redeem(browser, auth, code, client_id=AGENCY_ONE.client_id,
               client_secret=AGENCY_ONE.secret)  # plus the Basic header redeem() adds
    assert_token_error(r, 400, "invalid_request")


# -- RFC 6749 4.1.2 / 10.5: a code is single use -------------------------------------------


def test_rfc6749_4_1_2_second_redemption_is_invalid_grant_and_revokes_tokens(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    body = assert_token_ok(redeem(browser, auth, code), auth, hub)
    assert userinfo(browser, body["access_token"]).status_code == 200
    # an unrelated grant's token must survive the revocation
    other = AuthRequest()
    other_body = assert_token_ok(redeem(browser, other, new_code(browser, other)), other, hub)

    assert_token_error(redeem(browser, auth, code), 400, "invalid_grant")

    r = userinfo(browser, body["access_token"])
    assert r.status_code == 401 and r.json["error"] == "invalid_token"
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert userinfo(browser, other_body["access_token"]).status_code == 200


def test_rfc6749_10_5_parallel_redemptions_only_one_wins(browser, app):
    for _ in range(10):
        auth = AuthRequest()
        code = new_code(browser, auth)
        barrier = threading.Barrier(2)
        results: list[Any] = [None, None]

        def attempt(i: int, auth: AuthRequest = auth, code: str = code,
                    barrier: threading.Barrier = barrier, results: list[Any] = results) -> None:
            agency_client = app.test_client()
            barrier.wait(timeout=10)
            results[i] = redeem(agency_client, auth, code)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert all(r is not None for r in results)
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 400], [r.get_data(as_text=True) for r in results]
        loser = next(r for r in results if r.status_code == 400)
        assert_token_error(loser, 400, "invalid_grant")
        winner = next(r for r in results if r.status_code == 200)
        assert winner.json["access_token"]


def test_rfc6749_10_5_concurrent_second_redemption_revokes_first_tokens(browser, app, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    store = hub.tokens._store
    original_take = store.take_marked
    code_taken, second_done = threading.Event(), threading.Event()

    def slow_take(key: str, **kwargs: Any) -> Any:
        value, marked = original_take(key, **kwargs)
        if key.startswith("code:") and value is not None and not code_taken.is_set():
            code_taken.set()
            second_done.wait(timeout=10)  # widen the gap right after the atomic take
        return value, marked

    store.take_marked = slow_take
    try:
        first: list[Any] = []
        t = threading.Thread(target=lambda: first.append(redeem(app.test_client(), auth, code)))
        t.start()
        assert code_taken.wait(timeout=10)
        second = redeem(app.test_client(), auth, code)
        second_done.set()
        t.join(timeout=10)
    finally:
        store.take_marked = original_take
    assert_token_error(second, 400, "invalid_grant")
    assert first[0].status_code == 200
    r = userinfo(browser, first[0].json["access_token"])
    assert r.status_code == 401  # the code was presented twice: its tokens are revoked


def test_rfc6749_4_1_3_code_of_another_client_is_invalid_grant(browser):
    auth = AuthRequest(agency=AGENCY_ONE)
    code = new_code(browser, auth)
    # Agency two presents agency one's code with everything else agency one would send (its
    # redirect_uri and PKCE verifier): only the code's binding to its client refuses it.
    stolen = as_agency(auth, AGENCY_TWO)
    r = redeem(browser, stolen, code, redirect_uri=AGENCY_ONE.redirect_uri)
    body = assert_token_error(r, 400, "invalid_grant")
    assert body["error_description"] == "Invalid 'code' in request."
    # The hub treats the code as compromised once another client presented it: it is gone
    # for its own agency too (it was taken atomically before the client check).
    assert_token_error(redeem(browser, auth, code), 400, "invalid_grant")


def test_rfc6749_4_1_2_expired_code_is_invalid_grant(make_hub):
    """The one slow test: a code lives code_lifetime_seconds (5, the minimum)."""
    app = make_hub(code_lifetime_seconds=5)
    hub = app.extensions["civitas"]
    client = app.test_client()
    full_login(client, AuthRequest())
    fresh, stale = AuthRequest(), AuthRequest()
    stale_code = new_code(client, stale)
    issued = time.monotonic()
    # positive control on the same hub: a code redeemed at once works
    assert_token_ok(redeem(client, fresh, new_code(client, fresh)), fresh, hub)
    time.sleep(max(0.0, issued + 6 - time.monotonic()))
    assert_token_error(redeem(client, stale, stale_code), 400, "invalid_grant")


@pytest.mark.parametrize("code", ["", "not-a-code", "A" * 48],
                         ids=["empty", "garbage", "code_shaped"])
def test_rfc6749_5_2_unknown_code_is_invalid_grant(browser, code):
    assert_token_error(redeem(browser, AuthRequest(), code), 400, "invalid_grant")


def test_rfc6749_4_1_3_missing_code_is_invalid_request(browser):
    assert_token_error(redeem(browser, AuthRequest(), None), 400, "invalid_request")


# -- RFC 6749 4.1.3: redirect_uri must be identical -----------------------------------------


@pytest.mark.parametrize("redirect_uri", [
    AGENCY_ONE.redirect_uri + "/",
    "https://ONE.agency.example/cb",
    AGENCY_TWO.redirect_uri,
    "",
    None,
], ids=["trailing_slash", "upper_case_host", "other_agency", "empty", "missing"])
def test_rfc6749_4_1_3_redirect_uri_mismatch_is_invalid_grant(browser, hub, redirect_uri):
    auth = AuthRequest()
    code = new_code(browser, auth)
    body = assert_token_error(redeem(browser, auth, code, redirect_uri=redirect_uri), 400,
                              "invalid_grant")
    assert "redirect_uri" in body["error_description"]


# -- RFC 7636 4.5 / 4.6: code_verifier -------------------------------------------------------


def test_rfc7636_4_6_wrong_code_verifier_is_invalid_grant(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    other_verifier, _ = pkce_pair()
    assert_token_error(redeem(browser, auth, code, code_verifier=other_verifier), 400,
                       "invalid_grant")


def test_rfc7636_4_6_challenge_as_verifier_is_invalid_grant(browser):
    # a "plain" downgrade: sending the challenge itself must not work for an S256 code
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert_token_error(redeem(browser, auth, code, code_verifier=auth.challenge), 400,
                       "invalid_grant")


@pytest.mark.parametrize("verifier", [None, ""], ids=["missing", "empty"])
def test_rfc7636_4_5_missing_code_verifier_is_invalid_request(browser, verifier):
    auth = AuthRequest()
    code = new_code(browser, auth)
    body = assert_token_error(redeem(browser, auth, code, code_verifier=verifier), 400,
                              "invalid_request")
    assert "code_verifier" in body["error_description"]


@pytest.mark.parametrize("verifier", ["short", "A" * 129, "A" * 42 + "/"],
                         ids=["short", "too_long", "bad_character"])
def test_rfc7636_4_1_malformed_code_verifier_is_invalid_request(browser, verifier):
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert_token_error(redeem(browser, auth, code, code_verifier=verifier), 400,
                       "invalid_request")


def test_rfc7636_4_6_matching_verifier_on_used_code_is_invalid_grant(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert_token_ok(redeem(browser, auth, code), auth, hub)
    assert_token_error(redeem(browser, auth, code), 400, "invalid_grant")


def test_rfc7636_4_6_failed_verifier_burns_the_code(browser):
    # The code is taken atomically before PKCE is checked: guessing verifiers is one shot.
    auth = AuthRequest()
    code = new_code(browser, auth)
    wrong, _ = pkce_pair()
    assert_token_error(redeem(browser, auth, code, code_verifier=wrong), 400, "invalid_grant")
    assert_token_error(redeem(browser, auth, code), 400, "invalid_grant")


# -- RFC 6749 5.2: grant types ---------------------------------------------------------------


@pytest.mark.parametrize(("grant_type", "extra"), [
    ("password", {"username": "alice", "password": "alice-password"}),
    ("implicit", {}),
    ("urn:ietf:params:oauth:grant-type:device_code", {"device_code": "x"}),
    ("urn:ietf:params:oauth:grant-type:jwt-bearer", {"assertion": "e30.e30."}),
    ("AUTHORIZATION_CODE", {}),
    ("", {}),
    (None, {}),
], ids=["password", "implicit", "device_code",
        "jwt_bearer", "upper_case", "empty", "missing"])
def test_rfc6749_5_2_unsupported_grant_type(browser, grant_type, extra):
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = redeem(browser, auth, code, grant_type=grant_type, **extra)
    assert_token_error(r, 400, "unsupported_grant_type")


def test_rfc6749_4_4_client_credentials_never_gives_a_citizen_scope(browser):
    """client_credentials exists for the hub's own APIs (tests/test_client_credentials.py);
    asking it for OpenID scopes is invalid_scope, not a token."""
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = redeem(browser, auth, code, grant_type="client_credentials", scope="openid")
    assert_token_error(r, 400, "invalid_scope")


def test_rfc6749_5_2_refresh_grant_for_agency_without_offline_access(browser):
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = redeem(browser, auth, code, grant_type="refresh_token", refresh_token="A" * 48)
    assert_token_error(r, 400, "unauthorized_client")


def test_rfc6749_5_1_no_refresh_token_is_issued(browser, hub):
    auth = AuthRequest()
    body = assert_token_ok(redeem(browser, auth, new_code(browser, auth)), auth, hub)
    assert "refresh_token" not in body


def test_rfc6749_3_2_token_endpoint_refuses_get(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    r = browser.get("/token", query_string={"grant_type": "authorization_code", "code": code,
                                            "redirect_uri": auth.agency.redirect_uri,
                                            "code_verifier": auth.verifier})
    assert r.status_code == 405
    assert "access_token" not in r.get_data(as_text=True)
    # the refused GET did not touch the code
    assert_token_ok(redeem(browser, auth, code), auth, hub)


def test_rfc6749_5_1_success_and_error_responses_are_not_cached(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    ok = redeem(browser, auth, code)
    assert_token_ok(ok, auth, hub)
    for r in (redeem(browser, auth, code),                                  # invalid_grant
              redeem(browser, as_agency(auth, UNKNOWN_AGENCY), code),       # invalid_client
              redeem(browser, auth, code, grant_type="password")):          # unsupported
        assert_no_store(r)
        assert r.mimetype == "application/json" and set(r.json) >= {"error"}


# -- OpenID Connect Core 5.3 / RFC 6750: UserInfo ------------------------------------------


@pytest.fixture
def access_token(browser: Any, hub: Any) -> str:
    auth = AuthRequest()
    return str(assert_token_ok(redeem(browser, auth, new_code(browser, auth)), auth, hub)
               ["access_token"])


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_rfc6750_3_userinfo_without_token_is_401_bearer_challenge(client, method):
    r = client.open("/userinfo", method=method)
    assert r.status_code == 401
    # RFC 6750 3.1: no error code in the challenge when no credentials were sent
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas"'
    assert r.json["error"] == "invalid_request"
    assert "sub" not in r.json


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Basic YWdlbmN5LW9uZTpzZWNyZXQ=",
                                    "token abc"],
                         ids=["empty_bearer", "blank_bearer", "basic", "other_scheme"])
def test_rfc6750_2_1_userinfo_without_bearer_credentials_is_401(client, header):
    r = client.get("/userinfo", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas"'
    assert "sub" not in r.json


def assert_invalid_token(r: Any) -> None:
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas", error="invalid_token"'
    assert r.json["error"] == "invalid_token"
    assert "sub" not in r.json


@pytest.mark.parametrize("token", ["garbage", "A" * 43], ids=["garbage", "token_shaped"])
def test_rfc6750_3_1_userinfo_with_invalid_token_is_invalid_token(client, token):
    assert_invalid_token(userinfo(client, token))


def test_rfc6750_3_1_userinfo_with_unsigned_jwt_is_invalid_token(browser, access_token):
    """A real access token re-headed ``alg: none`` with its signature dropped (RFC 7519 6):
    its claims are all still valid, so only the signature check can refuse it."""
    header, payload, _ = access_token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    fields["alg"] = "none"
    unsigned = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    assert userinfo(browser, access_token).status_code == 200  # the signed original is good
    assert_invalid_token(userinfo(browser, f"{unsigned}.{payload}."))


def test_oidc_core_5_3_1_userinfo_accepts_get_and_post(browser, access_token):
    by_get = userinfo(browser, access_token, "GET")
    by_post = userinfo(browser, access_token, "POST")
    for r in (by_get, by_post):
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.mimetype == "application/json"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.json["sub"] and r.json["email"] == "alice@example.org"
    assert by_get.json == by_post.json


def test_rfc6750_2_userinfo_token_in_query_string_is_not_accepted(browser, access_token):
    r = browser.get("/userinfo", query_string={"access_token": access_token})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas"'


# -- the account and the browser session at the token endpoint ---------------------------------


def test_rfc6749_5_2_code_of_an_account_deleted_before_redemption_is_invalid_grant(browser, hub):
    auth = AuthRequest()
    code = new_code(browser, auth)
    hub.accounts.close(hub.accounts.account_for_credential("op", "alice-0001"))
    assert_token_error(redeem(browser, auth, code), 400, "invalid_grant")


def test_program_endpoints_neither_read_nor_write_the_browser_session(browser, hub, monkeypatch):
    """A browser's cookie sent to /token, /userinfo, the decision API or /jwks is not looked
    up (no store read) and no session cookie comes back; the session itself still works."""
    reads: list[str] = []
    real_get = hub.store.get
    monkeypatch.setattr(hub.store, "get",
                        lambda key: reads.append(key) or real_get(key))  # type: ignore[func-returns-value]
    auth = AuthRequest()
    code = new_code(browser, auth)
    assert any(k.startswith("session:") for k in reads)  # /authorize reads it
    reads.clear()
    r = redeem(browser, auth, code)
    token = assert_token_ok(r, auth, hub)["access_token"]
    for response in (r, userinfo(browser, token), browser.get("/jwks"),
                     browser.post("/access/v1/evaluation", json={})):
        assert "Set-Cookie" not in response.headers
    assert userinfo(browser, token).status_code == 200
    assert not [k for k in reads if k.startswith("session:")]
    assert browser.get("/account").status_code == 200  # still signed in


def test_no_browser_session_refuses_writes():
    from broker.session import NoBrowserSession

    session = NoBrowserSession()
    with pytest.raises(RuntimeError):
        session["login"] = {"account_id": "x"}
