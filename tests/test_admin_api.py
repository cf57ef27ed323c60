"""The agency registration API (/admin/api/agencies): bearer-token auth, CRUD, RFC 7591
errors that name the field, and agencies it registers logging in for real."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jose import jwt as jose_jwt
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from tests.conftest import HUB_ISSUER
from tests.flows import AGENCY_ONE, AuthRequest, allow_consent, full_login, query, redeem
from tests.flows import TestAgency as Agency

TOKEN = "admin-" + "t" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/admin/api/agencies"


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "admin_api_token": TOKEN}


def registration(client_id: str = "api-agency", **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "name": "API Agency",
            "redirect_uris": [f"https://{client_id}.agency.example/cb"], **extra}


def post(client: Any, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(API, json=body, headers=headers if headers is not None else AUTH)


def agency_from(body: dict[str, Any]) -> Agency:
    return Agency(body["client_id"], body["client_secret"], body["redirect_uris"][0],
                  body["name"])


def assert_refused(r: Any, field: str, says: str, error: str = "invalid_client_metadata") -> None:
    """Refused for ``field``, for the reason ``says`` (two checks of one field are told
    apart by what they say)."""
    assert r.status_code == 400, (r.status_code, r.get_data(as_text=True))
    assert r.json["error"] == error, r.json
    assert r.json["error_description"].startswith(f"{field}: "), r.json
    assert says in r.json["error_description"], r.json


def code_for(client: Any, agency: Agency) -> tuple[AuthRequest, str]:
    """A code for ``agency`` from the browser's hub session (one login already done)."""
    auth = AuthRequest(agency=agency)
    r = allow_consent(client, client.get(auth.url()))  # first use: consent
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    return auth, query(r.headers["Location"])["code"]


# -- authentication -------------------------------------------------------------------------

def test_rfc6750_bearer_token_is_required(client):
    for headers in ({}, {"Authorization": "Basic " + TOKEN}, {"Authorization": "Bearer "}):
        r = client.get(API, headers=headers)
        assert r.status_code == 401 and r.json["error"] == "invalid_request"
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="civitas-admin"'
    r = client.get(API, headers={"Authorization": "Bearer " + TOKEN + "x"})
    assert r.status_code == 401 and r.json["error"] == "invalid_token"
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    r = post(client, registration(), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert client.get(API, headers=AUTH).status_code == 200


def test_api_without_a_token_setting_does_not_exist(make_hub):
    client = make_hub().test_client()
    for method in ("GET", "POST"):
        r = client.open(API, method=method, headers=AUTH, json=registration())
        assert r.status_code == 404
    assert client.get(f"{API}/agency-one", headers=AUTH).status_code == 404


# -- CRUD -----------------------------------------------------------------------------------

def test_crud_round_trip(client, hub):
    r = post(client, registration(scopes=["openid", "email"],
                                  post_logout_redirect_uris=["https://api-agency.agency.example/"]))
    assert r.status_code == 201, r.json
    created = r.json
    assert r.headers["Location"].endswith(f"{API}/api-agency")
    assert r.headers["Cache-Control"] == "no-store"
    secret = created["client_secret"]
    assert len(secret) >= 40 and created["client_secret_expires_at"] == 0
    assert created["source"] == "api" and created["subject_type"] == "pairwise"
    assert created["id_token_signed_response_alg"] == "ES256"
    assert created["sector_identifier"] == "api-agency.agency.example"
    assert hub.agencies.client("api-agency").check_client_secret(secret)

    r = client.get(f"{API}/api-agency", headers=AUTH)
    assert r.status_code == 200 and "client_secret" not in r.json
    assert r.json["scopes"] == ["openid", "email"]
    listed = client.get(API, headers=AUTH).json["agencies"]
    assert {"agency-one", "agency-two", "api-agency"} <= {a["client_id"] for a in listed}
    for body in (created, r.json, *listed):
        assert "secret_hash" not in body and "sha256$" not in json.dumps(body)

    # PUT takes back what GET gave, changed
    changed = {**r.json, "name": "Renamed", "redirect_uris": ["https://api-agency.agency.example/2"]}
    r = client.put(f"{API}/api-agency", json=changed, headers=AUTH)
    assert r.status_code == 200, r.json
    assert r.json["name"] == "Renamed" and "client_secret" not in r.json
    assert hub.agencies.client("api-agency").check_client_secret(secret)  # kept
    r = client.put(f"{API}/api-agency", json={**changed, "client_id": "other"}, headers=AUTH)
    assert_refused(r, "client_id", "does not match the agency's address")

    assert client.delete(f"{API}/api-agency", headers=AUTH).status_code == 204
    for method in ("GET", "PUT", "DELETE"):
        r = client.open(f"{API}/api-agency", method=method, headers=AUTH, json=changed)
        assert r.status_code == 404 and r.json["error"] == "not_found"
    assert hub.agencies.get("api-agency") is None


def test_generated_client_id_and_duplicate(client):
    r = post(client, {k: v for k, v in registration().items() if k != "client_id"})
    assert r.status_code == 201 and r.json["client_id"].startswith("agency-")
    assert post(client, registration("dup-agency")).status_code == 201
    assert_refused(post(client, registration("dup-agency")), "client_id", "already registered")


def test_agencies_from_the_settings_file_are_read_only(client):
    for method in ("PUT", "DELETE"):
        r = client.open(f"{API}/{AGENCY_ONE.client_id}", method=method, headers=AUTH,
                        json=registration(AGENCY_ONE.client_id))
        assert r.status_code == 409, r.json
    assert client.get(f"{API}/{AGENCY_ONE.client_id}", headers=AUTH).json["source"] == "config"


def test_switching_methods_issues_or_drops_the_secret(client, hub):
    key = ECKey.generate_key("P-256", private=True, auto_kid=True)
    jwks = {"keys": [key.as_dict(private=False)]}
    r = post(client, registration("switch", token_endpoint_auth_method="private_key_jwt",
                                  jwks=jwks))
    assert r.status_code == 201 and "client_secret" not in r.json
    assert r.json["jwks"] == jwks
    r = client.put(f"{API}/switch", json=registration("switch"), headers=AUTH)
    assert r.status_code == 200 and len(r.json["client_secret"]) >= 40
    assert hub.agencies.client("switch").check_client_secret(r.json["client_secret"])
    r = client.put(f"{API}/switch", headers=AUTH, json=registration(
        "switch", token_endpoint_auth_method="private_key_jwt", jwks=jwks))
    assert r.status_code == 200 and "client_secret" not in r.json
    assert hub.agencies.get("switch").secret_hash == ""


# -- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "says"), [
    ("javascript:alert(1)", "must be an absolute https URL"),
    ("data:text/html,<script>alert(1)</script>", "must be an absolute https URL"),
    ("https://api-agency.agency.example/cb#frag", "must not contain a fragment"),
    ("http://api-agency.agency.example/cb", "must use https"),
    ("/relative/cb", "must be an absolute https URL"),
], ids=["javascript", "data", "fragment", "http-non-loopback", "relative"])
def test_rfc7591_3_2_2_bad_redirect_uri(client, uri, says):
    assert_refused(post(client, registration(redirect_uris=[uri])), "redirect_uris",
                   f"redirect URI {uri!r} {says}", "invalid_redirect_uri")


def test_rfc7591_3_2_2_bad_metadata_names_the_field(client):
    key = RSAKey.generate_key(2048, private=True, auto_kid=True)
    public = key.as_dict(private=False)
    secret = {"kty": "oct", "k": "c2VjcmV0", "kid": "s"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"scopes": ["openid", "admin"]}, "scopes", "must include 'openid' and only"),
        ({"scopes": "openid"}, "scopes", "must be an array of strings"),
        ({"token_endpoint_auth_method": "none"}, "token_endpoint_auth_method", "one of"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "jwks",
         "private_key_jwt needs jwks or jwks_uri"),
        ({"token_endpoint_auth_method": "private_key_jwt",
          "jwks": {"keys": [key.as_dict(private=True)]}}, "jwks",
         "contains private key members ['d', 'dp', 'dq', 'p', 'q', 'qi']"),
        # each bad key beside a good one, so the set is refused for that key alone
        ({"jwks": {"keys": [public, {k: v for k, v in public.items() if k != "kid"}]}},
         "jwks", "key 1 has no kid"),
        ({"jwks": {"keys": [public, {**public, "kid": None}]}}, "jwks", "key 1 has no kid"),
        ({"jwks": {"keys": [public, secret]}}, "jwks",
         "key 's' is a symmetric key (kty oct)"),
        ({"jwks": {"keys": [public]}, "jwks_uri": "https://keys.example/jwks"}, "jwks",
         "give jwks or jwks_uri, not both"),
        ({"jwks_uri": "http://keys.example/jwks"}, "jwks_uri", "must use https"),
        ({"id_token_signed_response_alg": "HS256"}, "id_token_signed_response_alg", "one of"),
        ({"id_token_signed_response_alg": "none"}, "id_token_signed_response_alg", "one of"),
        ({"subject_type": "public"}, "subject_type", "is not allowed on this hub"),
        ({"subject_type": "random"}, "subject_type", "one of ['pairwise', 'public']"),
        ({"backchannel_logout_uri": "http://rp.example/logout"}, "backchannel_logout_uri",
         "must use https"),
        ({"post_logout_redirect_uris": ["javascript:x"]}, "post_logout_redirect_uris",
         "must be an absolute https URL"),
        ({"sector_identifier": "public"}, "sector_identifier", "and not 'public'"),
        ({"name": ""}, "name", "1 to 120 characters"),
        ({"client_id": "a b"}, "client_id", "3 to 128 characters"),
        ({"client_secret": "mine"}, "client_secret", "unknown field"),
        ({"redirect_uris": []}, "redirect_uris", "at least one is needed"),
    ]
    for extra, field, says in cases:
        error = "invalid_redirect_uri" if field == "redirect_uris" else "invalid_client_metadata"
        assert_refused(post(client, registration(**extra)), field, says, error)
    assert client.get(API, headers=AUTH).json["agencies"][-1]["client_id"] == "agency-two"
    # the good key alone is taken: what was refused above was the other key
    r = post(client, registration("one-good-key", token_endpoint_auth_method="private_key_jwt",
                                  jwks={"keys": [public]}))
    assert r.status_code == 201, r.json


def test_malformed_and_oversized_bodies(client):
    # each refused by its own check, which the description names
    for data, content_type, says in [
            ("{not json", "application/json", "The body must be a JSON object."),
            ("[]", "application/json", "The body must be a JSON object."),
            ("client_id=x", "application/x-www-form-urlencoded",  # a form, not JSON
             "The body must be JSON (Content-Type: application/json)."),
            (json.dumps(registration()), "text/plain",  # JSON, but not declared as such
             "The body must be JSON (Content-Type: application/json).")]:
        r = client.post(API, data=data, content_type=content_type, headers=AUTH)
        assert r.status_code == 400 and r.json == {"error": "invalid_request",
                                                   "error_description": says}, data
    assert [a["client_id"] for a in client.get(API, headers=AUTH).json["agencies"]] == [
        "agency-one", "agency-two"]
    # valid JSON whose strings are no Unicode text (a lone surrogate) is refused, saying where
    for body, where in [(registration(name="Bad \ud800 name"), "name"),
                        (registration(redirect_uris=["https://a.example/cb",
                                                     "https://a.example/\udc00"]),
                         "redirect_uris[1]"),
                        ({**registration(), "jwks": {"keys": [{"\ud800": 1}]}},
                         "(a key in) jwks.keys[0]")]:
        r = client.post(API, data=json.dumps(body), content_type="application/json",
                        headers=AUTH)
        assert r.status_code == 400 and r.json == {
            "error": "invalid_request", "error_description":
            f"The body must be Unicode text: {where} holds a lone surrogate."}, r.json
    assert len(client.get(API, headers=AUTH).json["agencies"]) == 2  # nothing stored
    big = registration(name="x" * 70_000)
    r = client.post(API, data=json.dumps(big), content_type="application/json", headers=AUTH)
    assert r.status_code == 413 and r.json["error"] == "invalid_request"


# -- registered agencies work ---------------------------------------------------------------

def test_registered_agency_logs_in_with_an_rs256_id_token(client):
    r = post(client, registration("rs-agency", id_token_signed_response_alg="RS256"))
    assert r.status_code == 201, r.json
    agency = agency_from(r.json)
    auth = AuthRequest(agency=agency)
    code = full_login(client, auth)["code"]
    r = redeem(client, auth, code)
    assert r.status_code == 200, r.json
    body = r.json
    header = jose_jwt.get_unverified_header(body["id_token"])
    assert header["alg"] == "RS256"
    key = next(k for k in client.get("/jwks").json["keys"] if k["kid"] == header["kid"])
    claims = jose_jwt.decode(body["id_token"], key, algorithms=["RS256"],
                             audience=agency.client_id, issuer=HUB_ISSUER,
                             access_token=body["access_token"])
    assert claims["nonce"] == auth.nonce and claims["aud"] == agency.client_id
    # and PS256, with its own RSA key
    r = post(client, registration("ps-agency", id_token_signed_response_alg="PS256"))
    agency = agency_from(r.json)
    auth, code = code_for(client, agency)
    body = redeem(client, auth, code).json
    token = jwt.decode(body["id_token"], KeySet.import_key_set(client.get("/jwks").json),
                       algorithms=["PS256"])
    assert token.header["alg"] == "PS256" and token.claims["aud"] == agency.client_id
    algs = {k["alg"] for k in client.get("/jwks").json["keys"]}
    assert {"ES256", "RS256", "PS256"} <= algs


def test_public_subject_type_refused_unless_allowed_then_shared(make_hub):
    refused = make_hub(admin_api_token=TOKEN).test_client()
    assert_refused(post(refused, registration(subject_type="public")), "subject_type",
                   "is not allowed on this hub (allow_public_subjects is off)")

    client = make_hub(admin_api_token=TOKEN, allow_public_subjects=True).test_client()
    disc = client.get("/.well-known/openid-configuration").json
    assert disc["subject_types_supported"] == ["pairwise", "public"]
    public = []
    for client_id in ("public-one", "public-two"):
        r = post(client, registration(client_id, subject_type="public"))
        assert r.status_code == 201 and r.json["subject_type"] == "public", r.json
        public.append(agency_from(r.json))
    pairwise = agency_from(post(client, registration("pairwise-three")).json)

    auth = AuthRequest(agency=public[0])
    code = full_login(client, auth)["code"]
    subs = [jose_jwt.get_unverified_claims(redeem(client, auth, code).json["id_token"])["sub"]]
    for agency in (public[1], pairwise):
        auth, code = code_for(client, agency)
        body = redeem(client, auth, code).json
        subs.append(jose_jwt.get_unverified_claims(body["id_token"])["sub"])
        r = client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
        assert r.json["sub"] == subs[-1]
    assert subs[0] == subs[1] != subs[2]


def test_registration_changes_are_ledger_entries(app, hub, client):
    """Every registration, change and removal of an agency is an audit ledger entry."""
    before = len(list(hub.ledger.entries(None, None, None)))
    _, secret = hub.agencies.add(client_id="ledger-agency", name="Ledger Agency",
                     redirect_uris=["https://ledger.agency.example/cb"])
    from idp.agencies import AgencyMetadata

    hub.agencies.replace(AgencyMetadata(
        client_id="ledger-agency", name="Ledger Agency (renamed)",
        redirect_uris=("https://ledger.agency.example/cb",), scopes=("openid",)))
    hub.agencies.remove("ledger-agency")
    entries = list(hub.ledger.entries(None, None, None))[before:]
    assert [e.kind for e in entries] == ["agency.registered", "agency.changed",
                                         "agency.removed"]
    assert "renamed" in entries[1].entry
    assert all(secret not in e.entry and "secret_hash" not in e.entry for e in entries)


def test_registration_on_a_shared_host_carries_the_privacy_notice(client):
    """OpenID Connect Core 8.1: agencies whose redirect URIs share a host share the default
    pairwise sector (the same `sub` per citizen); the registrant is told, and an explicit
    sector_identifier settles it."""
    def on_portal(client_id: str, **extra: Any) -> dict[str, Any]:
        return registration(client_id, redirect_uris=[
            f"https://portal.gov.example/{client_id}/cb"], **extra)

    first = post(client, on_portal("tax"))
    assert first.status_code == 201 and "civitas_privacy_notices" not in first.json
    second = post(client, on_portal("dmv"))
    assert second.status_code == 201, second.json
    [notice] = second.json["civitas_privacy_notices"]
    assert notice.startswith("agencies dmv, tax share the pairwise sector "
                             "'portal.gov.example'") and "sector_identifier" in notice
    settled = client.put(f"{API}/dmv", headers=AUTH,
                         json=on_portal("dmv", sector_identifier="urn:sector:dmv"))
    assert settled.status_code == 200, settled.json
    assert "civitas_privacy_notices" not in settled.json
    assert settled.json["sector_identifier"] == "urn:sector:dmv"


def test_backchannel_logout_session_required_is_taken_and_always_served(client):
    """Back-Channel Logout 1.0 2.2: an agency's developers register
    ``backchannel_logout_session_required`` (openid-client, Keycloak and Hydra all write
    it); registration refused it as an unknown field. The hub puts ``sid`` in every logout
    token, so true and false are both taken and the agency is described with true, what it
    gets (RFC 7591 3.2.1); anything but a boolean names the field."""
    logout = "https://api-agency.agency.example/logout"
    for given in (True, False):
        r = post(client, registration(f"session-{str(given).lower()}",
                                      backchannel_logout_uri=logout,
                                      backchannel_logout_session_required=given))
        assert r.status_code == 201, r.json
        assert r.json["backchannel_logout_session_required"] is True
        # and what GET describes is taken back by PUT
        described = client.get(f"{API}/{r.json['client_id']}", headers=AUTH).json
        assert client.put(f"{API}/{r.json['client_id']}", json=described,
                          headers=AUTH).status_code == 200
    assert_refused(post(client, registration(backchannel_logout_session_required="yes")),
                   "backchannel_logout_session_required", "must be true or false")


def test_backchannel_logout_session_required_in_the_settings_file(upstream_issuer, tmp_path):
    """The same field in an agency's entry of the settings file is taken, not refused as an
    extra field."""
    from config.schema import Settings
    from tests.conftest import hub_config

    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/hub.db")
    cfg["agencies"][0]["backchannel_logout_session_required"] = True
    Settings.model_validate(cfg)
    cfg["agencies"][0]["backchannel_logout_session_required"] = "sometimes"
    with pytest.raises(ValueError, match="backchannel_logout_session_required"):
        Settings.model_validate(cfg)
