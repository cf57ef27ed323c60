"""RP-Initiated Logout 1.0 and Back-Channel Logout 1.0.

Agencies' back-channel endpoints are a real HTTP server on 127.0.0.1 that records what it
receives and can be told to fail, redirect or hang; logins go through the real upstream."""

from __future__ import annotations

import base64
import html
import json
import re
import secrets
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode

import pytest
import yaml
from click.testing import CliRunner
from jose import jwt as jose_jwt
from joserfc import jwt as jose_rfc_jwt
from joserfc.jwk import ECKey
from sqlalchemy import select

from civitas.app import create_app
from civitas.cli import main
from idp.backchannel import EVENT, MAX_ATTEMPTS, LogoutNotice
from idp.logout import SessionParticipants
from idp.models import LogoutDelivery
from kernel.db import utcnow
from kernel.store import MemoryStore, RedisStore
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem

ONE_SIGNED_OUT = "https://one.agency.example/signed-out"
TWO_SIGNED_OUT = "https://two.agency.example/bye"


class AgencyEndpoints:
    """Agencies' back-channel logout endpoints: ``/bc/<client_id>`` on one small server."""

    RESPONSES = {"ok": 200, "no-content": 204, "fail": 500, "redirect": 302}

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.modes: dict[str, str] = {}
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                name = self.path.rsplit("/", 1)[-1]
                mode = outer.modes.get(name, "ok")
                outer.received.append({
                    "name": name, "mode": mode, "at": time.monotonic(),
                    "content_type": self.headers.get("Content-Type"),
                    "form": {k: v[0] for k, v in parse_qs(body).items()},
                })
                if mode == "hang":
                    outer.release.wait(15)
                    self.close_connection = True
                    return
                self.send_response(outer.RESPONSES[mode])
                if mode == "redirect":
                    self.send_header("Location", outer.url("followed"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # the default 5 drops bursts of parallel deliveries

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/bc/{name}"

    def tokens_for(self, name: str) -> list[str]:
        return [r["form"]["logout_token"] for r in self.received if r["name"] == name]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints():
    e = AgencyEndpoints()
    yield e
    e.close()


def agency_configs(endpoints):
    return [
        AGENCY_ONE.config(post_logout_redirect_uris=[ONE_SIGNED_OUT],
                          backchannel_logout_uri=endpoints.url(AGENCY_ONE.client_id)),
        AGENCY_TWO.config(post_logout_redirect_uris=[TWO_SIGNED_OUT],
                          backchannel_logout_uri=endpoints.url(AGENCY_TWO.client_id)),
    ]


@pytest.fixture
def logout_app(make_hub, endpoints):
    return make_hub(agencies=agency_configs(endpoints), backchannel_dispatcher=False,
                    backchannel_timeout_seconds=1)


def sso_both(client):
    """Log in at agency one (upstream login), then agency two by SSO; both ID tokens."""
    auth_one = AuthRequest(agency=AGENCY_ONE)
    one = redeem(client, auth_one, full_login(client, auth_one)["code"]).json
    auth_two = AuthRequest(agency=AGENCY_TWO)
    r = client.get(auth_two.url())
    assert r.status_code == 302 and "code=" in r.headers["Location"]
    two = redeem(client, auth_two, query(r.headers["Location"])["code"]).json
    return one, two


def end_session(client, **params):
    return client.get("/logout/end-session?" + urlencode(params))


def silent_login_works(client) -> bool:
    r = client.get(AuthRequest(agency=AGENCY_ONE, extra={"prompt": "none"}).url())
    location = r.headers["Location"]
    assert "code=" in location or "error=login_required" in location, location
    return "code=" in location


def claims(token):
    return jose_jwt.get_unverified_claims(token)


# -- discovery and registration ----------------------------------------------------------------


def test_discovery_advertises_logout(client):
    doc = client.get("/.well-known/openid-configuration").json
    assert doc["end_session_endpoint"] == f"{HUB_ISSUER}/logout/end-session"
    assert doc["backchannel_logout_supported"] is True
    assert doc["backchannel_logout_session_supported"] is True


def test_registration_fields_validated_and_described(tmp_path, upstream_issuer):
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/reg.db", backchannel_dispatcher=False)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def cli(*args):
        return CliRunner().invoke(main, ["--config", str(path), *args], catch_exceptions=False)

    result = cli("agency", "add", "--client-id", "agency-three", "--name", "Three",
                 "--redirect-uri", "https://three.example/cb",
                 "--post-logout-redirect-uri", "https://three.example/bye",
                 "--post-logout-redirect-uri", "https://three.example/bye2",
                 "--backchannel-logout-uri", "https://three.example/bc")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(cli("agency", "show", "agency-three").output)
    assert shown["post_logout_redirect_uris"] == ["https://three.example/bye",
                                                  "https://three.example/bye2"]
    assert shown["backchannel_logout_uri"] == "https://three.example/bc"
    for option, uri, key in [
        ("--backchannel-logout-uri", "http://three.example/bc", "backchannel_logout_uri"),
        ("--post-logout-redirect-uri", "javascript:alert(1)", "post_logout_redirect_uris"),
        ("--post-logout-redirect-uri", "https://three.example/#x", "post_logout_redirect_uris"),
    ]:
        result = cli("agency", "add", "--client-id", "agency-four", "--name", "Four",
                     "--redirect-uri", "https://four.example/cb", option, uri)
        assert result.exit_code != 0 and key in result.output, result.output

    from config import settings_from_mapping
    from kernel.errors import ConfigError

    bad = dict(cfg, agencies=[AGENCY_ONE.config(backchannel_logout_uri="http://one.example/bc")])
    with pytest.raises(ConfigError, match="backchannel_logout_uri"):
        settings_from_mapping(bad)


# -- RP-Initiated Logout -------------------------------------------------------------------------


def test_logout_with_hint_redirects_with_state_and_ends_session(logout_app):
    client = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    tokens = redeem(client, auth, full_login(client, auth)["code"]).json
    r = end_session(client, id_token_hint=tokens["id_token"],
                    post_logout_redirect_uri=ONE_SIGNED_OUT, state="st-123", ui_locales="fr")
    assert r.status_code == 303
    assert r.headers["Location"] == ONE_SIGNED_OUT + "?state=st-123"
    assert not silent_login_works(client)
    assert client.get("/account").status_code == 302
    # tokens issued in the session stop working
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 401


def test_expired_hint_is_accepted_and_client_id_may_accompany_it(logout_app):
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    id_token = redeem(client, auth, full_login(client, auth)["code"]).json["id_token"]
    stale = dict(claims(id_token), iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    key = hub.keys.signing_key("ES256")
    expired = jose_rfc_jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "JWT"}, stale,
                                  key.key)
    r = end_session(client, id_token_hint=expired, client_id=AGENCY_ONE.client_id,
                    post_logout_redirect_uri=ONE_SIGNED_OUT)
    assert r.status_code == 303 and r.headers["Location"] == ONE_SIGNED_OUT
    assert not silent_login_works(client)


def _tamper(token: str, part: int) -> str:
    parts = token.split(".")
    i = len(parts[part]) // 2
    c = parts[part][i]
    parts[part] = parts[part][:i] + ("B" if c == "A" else "A") + parts[part][i + 1:]
    return ".".join(parts)


def _forge_payload(token: str, **changes: object) -> str:
    """The token with claims changed after signing, well formed, its signature kept."""
    header, payload, signature = token.split(".")
    forged = dict(claims(token), **changes)
    encoded = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    assert encoded != payload
    return ".".join([header, encoded, signature])


def test_tampered_or_foreign_hints_give_no_redirect(logout_app):
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    id_token = redeem(client, auth, full_login(client, auth)["code"]).json["id_token"]
    hub_kid = hub.keys.signing_key("ES256").kid
    other = ECKey.generate_key("P-256", private=True, auto_kid=True)
    forged_claims = claims(id_token)
    bad_hints = {
        # a claim no logout check reads, changed: iss, aud and sid still pass every check
        # but the signature's
        "payload changed": _forge_payload(id_token, iat=claims(id_token)["iat"] - 1),
        "signature byte": _tamper(id_token, 2),
        "other key, hub kid": jose_rfc_jwt.encode({"alg": "ES256", "kid": hub_kid},
                                                  forged_claims, other),
        "other key, own kid": jose_rfc_jwt.encode({"alg": "ES256", "kid": other.kid},
                                                  forged_claims, other),
        "unsigned": id_token.rsplit(".", 1)[0] + ".",
        "not a JWT": "not-a-token",
    }
    for label, hint in bad_hints.items():
        r = end_session(client, id_token_hint=hint, post_logout_redirect_uri=ONE_SIGNED_OUT,
                        state="s")
        assert r.status_code == 400, label
        assert "Location" not in r.headers, label
        assert "not valid" in r.get_data(as_text=True), label
    # a hub-signed token of another issuer, and a logout token, are not ID tokens for here
    key = hub.keys.signing_key("ES256")
    wrong_iss = jose_rfc_jwt.encode({"alg": "ES256", "kid": key.kid},
                                    dict(forged_claims, iss="https://elsewhere.example"),
                                    key.key)
    not_id_token = jose_rfc_jwt.encode({"alg": "ES256", "kid": key.kid, "typ": "logout+jwt"},
                                       forged_claims, key.key)
    for hint in (wrong_iss, not_id_token):
        r = end_session(client, id_token_hint=hint, post_logout_redirect_uri=ONE_SIGNED_OUT)
        assert r.status_code == 400 and "Location" not in r.headers
    assert silent_login_works(client)  # none of these signed the citizen out


def test_unregistered_post_logout_redirect_uri_gives_no_redirect(logout_app):
    client = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    id_token = redeem(client, auth, full_login(client, auth)["code"]).json["id_token"]
    for uri in [ONE_SIGNED_OUT + "/", "https://evil.example/signed-out",
                "https://one.agency.example.evil.example/signed-out", ONE_SIGNED_OUT + "?x=1",
                ONE_SIGNED_OUT.replace("https", "HTTPS"), AGENCY_ONE.redirect_uri,
                TWO_SIGNED_OUT]:  # another agency's URI is not this agency's
        r = end_session(client, id_token_hint=id_token, post_logout_redirect_uri=uri)
        assert r.status_code == 400 and "Location" not in r.headers, uri
    # client_id that is not the hint's audience, unknown client (with and without a URI),
    # URI without any client: each refused for its own reason, which the page names
    for params, reason in [
            (dict(id_token_hint=id_token, client_id=AGENCY_TWO.client_id),
             "client_id is not the audience of id_token_hint"),
            (dict(client_id="nobody", post_logout_redirect_uri=ONE_SIGNED_OUT),
             "the agency is not registered"),
            (dict(client_id="nobody"), "the agency is not registered"),
            (dict(post_logout_redirect_uri=ONE_SIGNED_OUT),
             "post_logout_redirect_uri needs id_token_hint or client_id")]:
        r = end_session(client, **params)
        assert r.status_code == 400 and "Location" not in r.headers, params
        assert f"({reason})" in r.get_data(as_text=True), params
    assert silent_login_works(client)


def test_rfc6749_3_1_a_parameter_sent_twice_gives_no_redirect(logout_app):
    """As at /authorize and /token, a parameter sent twice is refused (the first value was
    taken), naming it, and never redirected: the session stays."""
    client = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    id_token = redeem(client, auth, full_login(client, auth)["code"]).json["id_token"]
    for name, values in (("post_logout_redirect_uri", [ONE_SIGNED_OUT, TWO_SIGNED_OUT]),
                         ("state", ["a", "b"]), ("client_id", [AGENCY_ONE.client_id] * 2),
                         ("id_token_hint", [id_token, id_token])):
        pairs = [("id_token_hint", id_token), ("post_logout_redirect_uri", ONE_SIGNED_OUT)]
        pairs = [(k, v) for k, v in pairs if k != name] + [(name, v) for v in values]
        r = client.get(f"/logout/end-session?{urlencode(pairs)}")
        assert r.status_code == 400 and "Location" not in r.headers, name
        assert f"({name} is sent more than once)" in r.get_data(as_text=True), name
    assert silent_login_works(client)


def _hidden_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in
            re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page)}


def test_without_hint_a_confirmation_is_needed(logout_app):
    client = logout_app.test_client()
    full_login(client, AuthRequest(agency=AGENCY_ONE))
    params = dict(client_id=AGENCY_ONE.client_id, post_logout_redirect_uri=ONE_SIGNED_OUT,
                  state="xyz")
    r = end_session(client, **params)
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    assert "Sign out of Civitas?" in page and "Agency One" in page
    # the confirmation may redirect to the agency after the post: form-action allows it
    assert "form-action 'self' https://one.agency.example;" in r.headers[
        "Content-Security-Policy"]
    assert silent_login_works(client)  # a GET alone does not sign out
    # a cross-site form POST of the same request only gets the confirmation page
    r = client.post("/logout/end-session", data=params)
    assert r.status_code == 200 and "Sign out of Civitas?" in r.get_data(as_text=True)
    assert silent_login_works(client)
    fields = _hidden_fields(page)
    assert fields["client_id"] == AGENCY_ONE.client_id and fields["state"] == "xyz"
    r = client.post("/logout/end-session", data=dict(fields, csrf="forged"))
    assert r.status_code == 400 and "Location" not in r.headers
    assert silent_login_works(client)
    r = client.post("/logout/end-session", data=fields)
    assert r.status_code == 303
    assert r.headers["Location"] == ONE_SIGNED_OUT + "?state=xyz"
    assert not silent_login_works(client)


def test_hint_of_another_session_asks_for_confirmation(logout_app):
    old_browser = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    old_hint = redeem(old_browser, auth, full_login(old_browser, auth)["code"]).json["id_token"]
    client = logout_app.test_client()
    full_login(client, AuthRequest(agency=AGENCY_ONE))
    r = end_session(client, id_token_hint=old_hint, post_logout_redirect_uri=ONE_SIGNED_OUT)
    assert r.status_code == 200 and "Sign out of Civitas?" in r.get_data(as_text=True)
    assert silent_login_works(client)


def test_without_session_or_target_a_signed_out_page(logout_app):
    client = logout_app.test_client()
    r = end_session(client)
    assert r.status_code == 200 and "You are signed out" in r.get_data(as_text=True)
    r = end_session(client, client_id=AGENCY_ONE.client_id,
                    post_logout_redirect_uri=ONE_SIGNED_OUT, state="a b")
    assert r.status_code == 303 and r.headers["Location"] == ONE_SIGNED_OUT + "?state=a+b"


# -- Back-Channel Logout ------------------------------------------------------------------------


def _deliveries(hub):
    with hub.db.session() as s:
        return {r.client_id: r for r in s.scalars(select(LogoutDelivery))}


def test_rp_logout_sends_logout_tokens_to_every_agency_of_the_session(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    one, two = sso_both(client)
    r = end_session(client, id_token_hint=one["id_token"],
                    post_logout_redirect_uri=ONE_SIGNED_OUT)
    assert r.status_code == 303
    done = hub.dispatcher.deliver_due()
    assert (done.delivered, done.retrying) == (2, 0)
    jwks = client.get("/jwks").json
    for agency, id_token in ((AGENCY_ONE, one["id_token"]), (AGENCY_TWO, two["id_token"])):
        [request] = [r for r in endpoints.received if r["name"] == agency.client_id]
        assert request["content_type"] == "application/x-www-form-urlencoded"
        token = request["form"]["logout_token"]
        header = jose_jwt.get_unverified_header(token)
        assert header["typ"] == "logout+jwt"
        assert header["kid"] in {k["kid"] for k in jwks["keys"]}
        got = jose_jwt.decode(token, jwks, algorithms=["ES256"], audience=agency.client_id,
                              issuer=HUB_ISSUER)
        # section 2.4: python-jose lets a token without aud through its audience check
        assert set(got) == {"iss", "aud", "iat", "exp", "jti", "events", "sub", "sid"}, got
        assert got["aud"] == agency.client_id and got["iss"] == HUB_ISSUER
        assert got["events"] == {EVENT: {}}
        assert got["sid"] == claims(id_token)["sid"]
        assert got["sub"] == claims(id_token)["sub"]
        assert "nonce" not in got and got["jti"]
        assert got["exp"] - got["iat"] == 120 and abs(got["iat"] - time.time()) < 60
    # the same session, different pairwise subjects
    assert claims(one["id_token"])["sid"] == claims(two["id_token"])["sid"]
    assert claims(one["id_token"])["sub"] != claims(two["id_token"])["sub"]
    rows = _deliveries(hub)
    assert all(r.delivered_at is not None and r.next_attempt_at is None and r.attempts == 1
               for r in rows.values())
    assert hub.dispatcher.deliver_due().attempted == 0  # delivered once only


def test_hub_logout_triggers_backchannel_logout(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    one, two = sso_both(client)
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert not silent_login_works(client)
    assert hub.dispatcher.deliver_due().delivered == 2
    [token] = endpoints.tokens_for(AGENCY_TWO.client_id)
    assert claims(token)["sid"] == claims(two["id_token"])["sid"]
    assert claims(token)["sub"] == claims(two["id_token"])["sub"]


def test_account_deletion_triggers_backchannel_logout(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    one, _ = sso_both(client)
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/delete", data={"csrf": csrf, "confirm": "delete"})
    assert r.status_code == 303
    # per agency: the session's logout token, and a subject-wide one because deleting the
    # account withdrew every consent (Back-Channel Logout 1.0 2.4: sid and/or sub)
    assert hub.dispatcher.deliver_due().delivered == 4
    tokens = endpoints.tokens_for(AGENCY_ONE.client_id)
    assert len(tokens) == 2
    assert {claims(t)["sub"] for t in tokens} == {claims(one["id_token"])["sub"]}
    assert sorted("sid" in claims(t) for t in tokens) == [False, True]


def test_agency_outside_the_session_or_without_uri_is_not_told(make_hub, endpoints):
    app = make_hub(agencies=[AGENCY_ONE.config(), agency_configs(endpoints)[1]],
                   backchannel_dispatcher=False)
    hub = app.extensions["civitas"]
    client = app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    tokens = redeem(client, auth, full_login(client, auth)["code"]).json
    r = end_session(client, id_token_hint=tokens["id_token"])
    assert r.status_code == 200 and "You are signed out" in r.get_data(as_text=True)
    assert hub.dispatcher.deliver_due().attempted == 0 and endpoints.received == []


def _notice(endpoints, name=AGENCY_TWO.client_id, sid="sid-1"):
    return LogoutNotice(client_id=name, logout_uri=endpoints.url(name), alg="ES256",
                        sub="pairwise-sub", sid=sid)


def test_failing_endpoint_is_retried_with_backoff_then_delivered(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]
    endpoints.modes[AGENCY_TWO.client_id] = "fail"
    now = utcnow()
    hub.dispatcher.enqueue([_notice(endpoints)], now=now)
    assert hub.dispatcher.deliver_due(now).retrying == 1
    row = _deliveries(hub)[AGENCY_TWO.client_id]
    assert row.attempts == 1 and row.last_error == "HTTP 500" and row.delivered_at is None
    assert row.next_attempt_at == now + timedelta(seconds=10)
    assert hub.dispatcher.deliver_due(now + timedelta(seconds=5)).attempted == 0
    endpoints.modes[AGENCY_TWO.client_id] = "no-content"  # 204 counts as success too
    assert hub.dispatcher.deliver_due(now + timedelta(seconds=11)).delivered == 1
    row = _deliveries(hub)[AGENCY_TWO.client_id]
    assert row.attempts == 2 and row.delivered_at is not None and row.next_attempt_at is None
    assert len(endpoints.received) == 2


def test_delivery_gives_up_after_max_attempts_with_fresh_tokens(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]
    endpoints.modes[AGENCY_TWO.client_id] = "redirect"  # never followed: a failure
    now = utcnow()
    hub.dispatcher.enqueue([_notice(endpoints)], now=now)
    at = now
    for attempt in range(1, MAX_ATTEMPTS + 1):
        done = hub.dispatcher.deliver_due(at)
        row = _deliveries(hub)[AGENCY_TWO.client_id]
        assert row.attempts == attempt
        if attempt < MAX_ATTEMPTS:
            assert done.retrying == 1 and row.last_error == "HTTP 302"
            assert row.next_attempt_at > at
            at = row.next_attempt_at
        else:
            assert done.given_up == 1 and row.next_attempt_at is None
            assert row.last_error.startswith(f"gave up after {MAX_ATTEMPTS} attempts")
    assert [r["name"] for r in endpoints.received] == [AGENCY_TWO.client_id] * MAX_ATTEMPTS
    # tokens are re-signed when late: each attempt's token was valid at its time
    sent = [claims(t) for t in endpoints.tokens_for(AGENCY_TWO.client_id)]
    assert len({c["jti"] for c in sent}) > 1
    # a re-signed token says what the first one said: the same agency, subject and session
    # (without its sid it would end every session of the subject, section 2.4)
    jwks = logout_app.test_client().get("/jwks").json
    for token in endpoints.tokens_for(AGENCY_TWO.client_id):
        got = jose_jwt.decode(token, jwks, algorithms=["ES256"], audience=AGENCY_TWO.client_id,
                              issuer=HUB_ISSUER, options={"verify_exp": False,
                                                          "verify_iat": False})
        assert (got["aud"], got["sub"], got.get("sid"), got["events"]) == (
            AGENCY_TWO.client_id, "pairwise-sub", "sid-1", {EVENT: {}}), got
        assert "nonce" not in got
    assert sent[-1]["exp"] > at.timestamp() and sent[-1]["iat"] <= at.timestamp()
    assert hub.dispatcher.deliver_due(at + timedelta(days=1)).attempted == 0


def test_hanging_endpoint_is_abandoned_within_the_timeout(logout_app, endpoints):
    hub = logout_app.extensions["civitas"]  # backchannel_timeout_seconds=1
    endpoints.modes[AGENCY_TWO.client_id] = "hang"
    now = utcnow()
    # the hanging agency's token is the older one, so it is claimed (and posted) first
    hub.dispatcher.enqueue([_notice(endpoints)], now=now - timedelta(seconds=1))
    hub.dispatcher.enqueue([_notice(endpoints, AGENCY_ONE.client_id)], now=now)
    started = time.monotonic()
    done = hub.dispatcher.deliver_due(now)
    assert time.monotonic() - started < 3
    assert (done.delivered, done.retrying) == (1, 1)
    row = _deliveries(hub)[AGENCY_TWO.client_id]
    assert "timed out" in row.last_error.lower() or "timeout" in row.last_error.lower()
    assert _deliveries(hub)[AGENCY_ONE.client_id].delivered_at is not None
    # the other agency is not held up: its token went out while the hung post was still
    # waiting, not after its 1 s timeout (as it would be, posted one after the other)
    at = {r["name"]: r["at"] for r in endpoints.received}
    assert at[AGENCY_ONE.client_id] - at[AGENCY_TWO.client_id] < 0.9, at


def test_queue_survives_a_restart(make_hub, endpoints, upstream_issuer):
    first = make_hub(agencies=agency_configs(endpoints), backchannel_dispatcher=False)
    hub = first.extensions["civitas"]
    client = first.test_client()
    _, two = sso_both(client)
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    hub.db.dispose()  # "crash" before anything was delivered
    settings = hub.settings
    second = create_app(hub_config(
        upstream_issuer, settings.database_url, agencies=agency_configs(endpoints),
        backchannel_dispatcher=False,
        encryption_key=settings.encryption_key.get_secret_value(),
        pairwise_secret=settings.pairwise_secret.get_secret_value()))
    try:
        assert second.extensions["civitas"].dispatcher.deliver_due().delivered == 2
        jwks = second.test_client().get("/jwks").json
    finally:
        second.extensions["civitas"].db.dispose()
    [token] = endpoints.tokens_for(AGENCY_TWO.client_id)
    got = jose_jwt.decode(token, jwks, algorithms=["ES256"], audience=AGENCY_TWO.client_id,
                          issuer=HUB_ISSUER)
    assert got["sid"] == claims(two["id_token"])["sid"]


def test_cli_delivers_one_pass(tmp_path, upstream_issuer, endpoints):
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/cli.db",
                     agencies=agency_configs(endpoints), backchannel_dispatcher=False)
    app = create_app(cfg)
    app.extensions["civitas"].dispatcher.enqueue([_notice(endpoints)])
    app.extensions["civitas"].db.dispose()
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["--config", str(path), "logout", "deliver"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 delivered, 0 to retry, 0 given up" in result.output
    assert len(endpoints.tokens_for(AGENCY_TWO.client_id)) == 1




def test_workers_never_deliver_a_row_twice(upstream_issuer, database_url, endpoints):
    app = create_app(hub_config(upstream_issuer, database_url, backchannel_dispatcher=False))
    hub = app.extensions["civitas"]
    try:
        _deliver_concurrently(hub, endpoints)
    finally:
        hub.db.dispose()


def _deliver_concurrently(hub, endpoints):
    hub.dispatcher.enqueue([_notice(endpoints, sid=f"sid-{i}") for i in range(12)])
    barrier = threading.Barrier(4)
    passes = []

    def worker():
        barrier.wait()
        passes.append(hub.dispatcher.deliver_due())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(p.delivered for p in passes) == 12
    sids = sorted(claims(t)["sid"] for t in endpoints.tokens_for(AGENCY_TWO.client_id))
    assert sids == sorted(f"sid-{i}" for i in range(12))


def test_background_dispatcher_delivers_and_stops_with_the_database(make_hub, endpoints):
    app = make_hub(agencies=agency_configs(endpoints))  # dispatcher on (the default)
    hub = app.extensions["civitas"]
    assert hub.dispatcher.running
    client = app.test_client()
    one, _ = sso_both(client)
    r = end_session(client, id_token_hint=one["id_token"])
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while len(endpoints.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(r["name"] for r in endpoints.received) == [AGENCY_ONE.client_id,
                                                             AGENCY_TWO.client_id]
    hub.db.dispose()
    deadline = time.monotonic() + 3
    while hub.dispatcher.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not hub.dispatcher.running


# -- session participants --------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(request.getfixturevalue("redis_url"),
                      prefix=f"logout-{secrets.token_hex(4)}:")


def test_participants_recorded_concurrently_are_all_kept(store):
    participants = SessionParticipants(store, ttl=60)
    barrier = threading.Barrier(8)

    def add(i):
        barrier.wait()
        participants.add("sid-x", f"agency-{i}")
        participants.add("sid-x", f"agency-{i}")  # once only

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(participants.take("sid-x")) == sorted(f"agency-{i}" for i in range(8))
    assert participants.take("sid-x") == []


def test_participants_recorded_before_the_set_are_still_logged_out(store):
    """Sessions from a release that kept a JSON list (under a lock) until they expire."""
    participants = SessionParticipants(store, ttl=60)
    store.put(SessionParticipants.LEGACY_PREFIX + "sid-old", {"client_ids": ["agency-a"]}, 60)
    participants.add("sid-old", "agency-b")
    assert participants.take("sid-old") == ["agency-a", "agency-b"]
    assert participants.take("sid-old") == []
