"""The client_credentials grant (RFC 6749 4.4) for the hub's own APIs: an agency's token for
the consent decision API, never for a citizen's data (RFC 9068 2.2 JWT access tokens)."""

from __future__ import annotations

import base64
import time
from typing import Any

from jose import jwt as jose_jwt

from tests.conftest import HUB_ISSUER
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, citizen, full_login, redeem

EVALUATION = {"subject": {"type": "user", "id": "someone"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}


def basic(agency: Any, secret: str | None = None) -> dict[str, str]:
    cred = f"{agency.client_id}:{secret or agency.secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(cred).decode()}


def client_token(client: Any, agency: Any = AGENCY_ONE, **form: str) -> Any:
    return client.post("/token", data={"grant_type": "client_credentials", **form},
                       headers=basic(agency))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token}


def test_rfc6749_4_4_token_for_the_decision_api_verifies_with_python_jose(client):
    r = client_token(client)
    assert r.status_code == 200, r.json
    body = r.json
    assert body["token_type"] == "Bearer" and body["scope"] == "consent.decisions"
    assert body["expires_in"] > 0
    # RFC 6749 4.4.3: no refresh token; no citizen, so no ID token
    assert "refresh_token" not in body and "id_token" not in body
    assert r.headers["Cache-Control"] == "no-store"
    header = jose_jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"  # RFC 9068 2.1
    key = next(k for k in client.get("/jwks").json["keys"] if k["kid"] == header["kid"])
    claims = jose_jwt.decode(body["access_token"], key, algorithms=[header["alg"]],
                             audience=HUB_ISSUER, issuer=HUB_ISSUER)
    # RFC 9068 2.2: without a resource owner, sub identifies the client
    assert claims["sub"] == claims["client_id"] == AGENCY_ONE.client_id
    assert claims["scope"] == "consent.decisions"
    assert not {"auth_time", "acr", "sid"} & set(claims)
    discovery = client.get("/.well-known/openid-configuration").json
    assert "client_credentials" in discovery["grant_types_supported"]
    assert "consent.decisions" in discovery["scopes_supported"]


def test_rfc6749_3_3_only_service_scopes_are_given(client):
    assert client_token(client, scope="consent.decisions").status_code == 200
    for scope in ("openid", "openid profile", "consent.decisions email", "offline_access"):
        r = client_token(client, scope=scope)
        assert r.status_code == 400 and r.json["error"] == "invalid_scope", (scope, r.json)
    wrong = client.post("/token", data={"grant_type": "client_credentials"},
                        headers=basic(AGENCY_ONE, "not-the-secret"))
    assert wrong.status_code == 401 and wrong.json["error"] == "invalid_client"
    anonymous = client.post("/token", data={"grant_type": "client_credentials",
                                            "client_id": AGENCY_ONE.client_id})
    assert anonymous.status_code == 401 and anonymous.json["error"] == "invalid_client"


def test_decision_api_accepts_the_token_and_only_that_token(client, hub):
    token = client_token(client).json["access_token"]
    r = client.post("/access/v1/evaluation", json=EVALUATION, headers=bearer(token))
    assert r.status_code == 200 and r.json["decision"] is False  # nobody consented
    assert r.json["context"]["reason"] == "no_consent"
    decisions = hub.consent.decisions.for_agency(AGENCY_ONE.client_id)
    assert [d.id for d in decisions] == [r.json["context"]["decision_id"]]

    # a citizen's access token (openid scope, a person behind it) is not an agency login
    auth = AuthRequest()
    params = full_login(client, auth)
    user_token = redeem(client, auth, params["code"]).json["access_token"]
    # ... not even one that carries the decision API's scope: only the citizen behind it
    # (it is not a client_credentials token) refuses it
    provider = hub.server.hub
    account_id = citizen(hub, "someone")
    scoped_user_token = provider.access_tokens.issue(
        client_id=AGENCY_ONE.client_id, alg="ES256", account_id=account_id,
        sub=provider.subject_for(hub.agencies.client(AGENCY_ONE.client_id), account_id),
        scope="consent.decisions", grant_id="grant", sid="sid", auth_time=int(time.time()),
        acr="urn:civitas:acr:ial1:aal1")
    valid = client.post("/introspect", data={"token": scoped_user_token},
                        headers=basic(AGENCY_ONE)).json
    assert valid["active"] is True and valid["scope"] == "consent.decisions"
    # RFC 6750 3.1: a citizen's live token lacks the scope (403 insufficient_scope); what is
    # no live token of the hub's is invalid_token (401)
    for bad, status, error in ((user_token, 403, "insufficient_scope"),
                               (scoped_user_token, 403, "insufficient_scope"),
                               (token[:-4] + "AAAA", 401, "invalid_token"),
                               ("garbage", 401, "invalid_token"), ("", 401, "invalid_token")):
        r = client.post("/access/v1/evaluation", json=EVALUATION, headers=bearer(bad))
        assert (r.status_code, r.json["error"]) == (status, error), bad
        assert r.headers["WWW-Authenticate"].startswith(
            f'Bearer realm="civitas-consent", error="{error}"'), r.headers["WWW-Authenticate"]
    # and the agency's token opens no citizen's data: a live token without 'openid'
    r = client.get("/userinfo", headers=bearer(token))
    assert r.status_code == 403 and r.json["error"] == "insufficient_scope"
    assert r.headers["WWW-Authenticate"] == (
        'Bearer realm="civitas", error="insufficient_scope", scope="openid"')


def test_rfc7662_and_rfc7009_introspection_and_revocation_of_an_agency_token(client):
    token = client_token(client).json["access_token"]
    own = client.post("/introspect", data={"token": token}, headers=basic(AGENCY_ONE)).json
    assert own["active"] is True and own["sub"] == own["client_id"] == AGENCY_ONE.client_id
    assert own["scope"] == "consent.decisions" and own["aud"] == HUB_ISSUER
    other = client.post("/introspect", data={"token": token}, headers=basic(AGENCY_TWO)).json
    assert other == {"active": False}
    # another agency cannot revoke it (refused as for citizens' tokens)
    assert client.post("/revoke", data={"token": token},
                       headers=basic(AGENCY_TWO)).status_code == 400
    assert client.post("/access/v1/evaluation", json=EVALUATION,
                       headers=bearer(token)).status_code == 200
    assert client.post("/revoke", data={"token": token},
                       headers=basic(AGENCY_ONE)).status_code == 200
    r = client.post("/access/v1/evaluation", json=EVALUATION, headers=bearer(token))
    assert r.status_code == 401
    assert client.post("/introspect", data={"token": token},
                       headers=basic(AGENCY_ONE)).json == {"active": False}


def test_a_removed_agency_token_stops_working(client, hub):
    token = client_token(client, AGENCY_TWO).json["access_token"]
    assert client.post("/access/v1/evaluation", json=EVALUATION,
                       headers=bearer(token)).status_code == 200
    hub.agencies.remove(AGENCY_TWO.client_id)
    assert client.post("/access/v1/evaluation", json=EVALUATION,
                       headers=bearer(token)).status_code == 401
