"""The OIDC connector against the real upstream OP and a tampering proxy in front of it."""

from __future__ import annotations

import html
import logging
import re
from urllib.parse import urlencode

import pytest

from tests import servers
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import (
    UPSTREAM_CLIENT_ID,
    UPSTREAM_SECRET,
    AuthRequest,
    finish_login,
    metric,
    path_of,
    query,
    start_login,
    upstream_login,
)
from tests.tamper_proxy import DISCOVERY_FIELDS, MAX_ANSWER_BYTES, TamperProxy


@pytest.fixture(scope="module")
def proxy(upstream_issuer):
    with TamperProxy(upstream_issuer).running() as p:
        yield p


@pytest.fixture
def proxied_client(proxy, upstream_issuer, tmp_path):
    """A hub whose upstream 'op-proxy' is the proxy, an OP of its own in front of the real
    one (tests/tamper_proxy.py), set to ``mode``."""
    from civitas.app import create_app

    def make(mode: str):
        proxy.mode = mode
        cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/p-{mode}.db", upstreams=[{
            "kind": "oidc", "id": "op-proxy", "display_name": "Proxied ID",
            "issuer": proxy.url, "client_id": UPSTREAM_CLIENT_ID,
            "client_secret": UPSTREAM_SECRET,
        }])
        return create_app(cfg).test_client()

    return make


def _login_through(proxy, client):
    return finish_login(client, proxy.as_issuer(_callback_for(client, "op-proxy")))


def _refused_because(caplog, r, reason: str) -> None:
    """The page says no more than that the answer could not be verified; the operator's log
    line of that request names the one check that refused it."""
    _assert_error_page(r, 502, "could not be verified")
    assert reason not in r.get_data(as_text=True)
    lines = [rec.getMessage() for rec in caplog.records
             if r.headers["X-Request-Id"] in rec.getMessage()]
    assert any("UpstreamResponseInvalid" in line and reason in line for line in lines), lines


def _assert_error_page(r, status: int, text: str) -> None:
    assert r.status_code == status, r.get_data(as_text=True)[:600]
    body = r.get_data(as_text=True)
    assert text in body
    assert "Reference" in body or "reference" in body
    assert r.headers.get("X-Request-Id") and r.headers["X-Request-Id"] in body
    assert "Traceback" not in body
    assert "Location" not in r.headers


def _callback_for(client, upstream_id="op", username="alice"):
    url = start_login(client, AuthRequest(), upstream_id)
    return upstream_login(url, username)


def test_replayed_callback_in_another_browser_fails(client, app):
    callback = _callback_for(client)
    other_browser = app.test_client()
    r = other_browser.get(path_of(callback))
    _assert_error_page(r, 400, "different browser")
    # the rightful browser still completes its login afterwards
    r = finish_login(client, callback)
    assert r.status_code == 302 and "code=" in r.headers["Location"]


def test_callback_is_single_use_in_the_same_browser(client):
    callback = _callback_for(client)
    r = finish_login(client, callback)
    assert r.status_code == 302
    r = client.get(path_of(callback))
    _assert_error_page(r, 400, "expired")


def test_callback_with_unknown_state_fails(client):
    _callback_for(client)
    r = client.get("/login/op/callback?code=abc&state=forged")
    _assert_error_page(r, 400, "expired")


def test_the_connector_refuses_a_callback_with_another_logins_state(upstream_issuer):
    """Under the broker's lookup by state (which never hands the connector another login's
    state) the connector compares the callback's state with its login's itself: a callback
    right in every other way, its code fresh, is refused by that check alone, before the code
    is redeemed (the same callback then completes its own login)."""
    from connectors import PendingLogin
    from connectors.base import UpstreamResponseInvalid
    from connectors.oidc import OIDCConfig, OIDCConnector

    connector = OIDCConnector(OIDCConfig(
        id="op", display_name="Example ID", issuer=upstream_issuer,
        client_id=UPSTREAM_CLIENT_ID, client_secret=UPSTREAM_SECRET))
    redirect_uri = f"{HUB_ISSUER}/login/op/callback"
    url, pending = connector.begin(redirect_uri)
    params = query(upstream_login(url))
    another = PendingLogin(state="another-logins-state", data=pending.data)
    with pytest.raises(UpstreamResponseInvalid) as refused:
        connector.complete(params, another, redirect_uri)
    assert refused.value.detail == "the callback's state is not the login's"
    assert connector.complete(params, pending, redirect_uri).subject


def test_rfc9207_wrong_iss_parameter_is_rejected(client, caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    callback = _callback_for(client)
    params = query(callback)
    params["iss"] = "http://127.0.0.1:1/evil"
    r = client.get("/login/op/callback?" + urlencode(params))
    _refused_because(caplog, r, "iss parameter is not the issuer (RFC 9207 section 2.4)")


def test_rfc9207_missing_iss_rejected_when_upstream_announces_it(client, caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    callback = _callback_for(client)
    params = query(callback)
    params.pop("iss")
    r = client.get("/login/op/callback?" + urlencode(params))
    _refused_because(caplog, r, "has no iss parameter (RFC 9207 section 2.4)")


def _cancelled_at_the_upstream(client, auth):
    """Start a login for ``auth`` and press the real upstream's "cancel" (its interaction's
    abort: access_denied back to the hub); the hub's answer to that callback."""
    import requests

    browser = requests.Session()
    r = browser.get(start_login(client, auth, "op"), allow_redirects=True, timeout=10)
    assert r.status_code == 200 and "/interaction/" in r.url, r.text[:300]
    r = browser.get(r.url.rstrip("/") + "/abort", allow_redirects=False, timeout=10)
    for _ in range(5):  # the upstream's own redirects, then back to the hub
        location = r.headers["Location"]
        if location.startswith(HUB_ISSUER):
            break
        r = browser.get(location if "://" in location else upstream_origin(r.url) + location,
                        allow_redirects=False, timeout=10)
    assert query(location)["error"] == "access_denied", location
    return client.get(path_of(location))


def upstream_origin(url: str) -> str:
    return "/".join(url.split("/")[:3])


def test_rfc6749_4_1_2_1_cancelled_at_the_upstream_the_citizen_chooses_again_or_cancels(
        client):
    """Not a dead end: the citizen is back at the choice, told what happened, and may
    sign in another way, or cancel, which tells the agency (access_denied at its redirect
    URI, with its state and the hub's iss). The flow is used once."""
    auth = AuthRequest()
    rejected = metric("civitas_logins_total", upstream="op", outcome="rejected")
    back = _cancelled_at_the_upstream(client, auth)
    assert back.status_code == 303 and back.headers["Location"].startswith("/login?flow=")
    assert metric("civitas_logins_total", upstream="op", outcome="rejected") == rejected + 1
    page = client.get(back.headers["Location"]).get_data(as_text=True)
    assert 'id="notice"' in page and "cancelled or refused at" in page
    cancel = re.search(r'<form method="post" action="([^"]+)" id="cancel">', page)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    action = html.unescape(cancel.group(1))
    assert client.post(action, data={"csrf": "wrong"}).status_code == 400  # a forged cancel
    r = client.post(action, data={"csrf": csrf})
    assert r.status_code == 302 and r.headers["Location"].startswith(
        auth.agency.redirect_uri + "?")
    assert query(r.headers["Location"]) == {
        "error": "access_denied", "error_description": "The citizen cancelled the sign-in.",
        "state": auth.state, "iss": HUB_ISSUER}
    assert client.post(action, data={"csrf": csrf}).status_code == 400  # once only


def test_cancelled_at_the_upstream_the_citizen_can_sign_in_another_way(client):
    auth = AuthRequest()
    back = _cancelled_at_the_upstream(client, auth)
    page = client.get(back.headers["Location"]).get_data(as_text=True)
    link = html.unescape(re.search(r'href="(/login/op/start\?flow=[^"]+)"', page).group(1))
    started = client.get(link)
    assert started.status_code == 303
    r = finish_login(client, upstream_login(started.headers["Location"]))
    assert r.status_code == 302 and "code=" in r.headers["Location"]


def test_proxy_passthrough_logs_in(proxied_client, proxy):
    """Control: a login through the proxy, which signs the ID token again as the issuer the
    hub knows, succeeds; so each fault below is the one reason its login fails."""
    client = proxied_client("pass")
    r = _login_through(proxy, client)
    assert r.status_code == 302 and "code=" in r.headers["Location"]
    assert "/tamper-proxy/jwks" in proxy.seen  # the proxy's key verified the ID token


@pytest.mark.parametrize(("mode", "reason"), [
    # OpenID Connect Core 3.1.3.7, one step each
    ("tamper-id-token", "signature does not verify with the upstream's keys"),
    ("alg-none", "alg 'none' is not one of"),
    ("foreign-issuer", "iss is not the issuer (OpenID Connect Core 3.1.3.7 step 2)"),
    ("wrong-aud", "aud does not name this hub (OpenID Connect Core 3.1.3.7 step 3)"),
    ("several-audiences",
     "several audiences and azp is not this hub (OpenID Connect Core 3.1.3.7 step 4)"),
    ("wrong-azp", "the ID token's azp is not this hub (OpenID Connect Core 3.1.3.7 step 5)"),
    ("expired", "expired, or no exp (OpenID Connect Core 3.1.3.7 step 9)"),
    ("future-iat", "issued in the future, or no iat (OpenID Connect Core 3.1.3.7 step 10)"),
    ("wrong-nonce", "nonce is not the login's (OpenID Connect Core 3.1.3.7 step 11)"),
    ("no-sub", "sub is missing, longer than 255 characters or not ASCII (OpenID Connect "
               "Core 2)"),
    ("long-sub", "sub is missing, longer than 255 characters or not ASCII"),
    ("non-ascii-sub", "sub is missing, longer than 255 characters or not ASCII"),
    ("surrogate-sub", "sub is missing, longer than 255 characters or not ASCII"),
    ("no-id-token", "no ID token, or not a compact JWS"),
    # the token endpoint's answer itself
    ("token-type", "token endpoint: token_type is not Bearer"),
    ("huge-token", f"the answer is larger than {MAX_ANSWER_BYTES} bytes"),
    # OpenID Connect Core 5.3.2
    ("userinfo-sub", "userinfo's sub is not the ID token's (OpenID Connect Core 5.3.2)"),
])
def test_a_faulty_upstream_answer_is_refused_by_its_own_check(proxied_client, proxy, caplog,
                                                              mode, reason):
    caplog.set_level(logging.WARNING, logger="civitas")
    client = proxied_client(mode)
    invalid = metric("civitas_logins_total", upstream="op-proxy", outcome="invalid")
    r = _login_through(proxy, client)
    _refused_because(caplog, r, reason)
    assert metric("civitas_logins_total", upstream="op-proxy", outcome="invalid") == invalid + 1
    r = client.get("/account")  # no hub session was opened
    assert r.status_code in (302, 303) and "/account" not in r.headers["Location"], r.status_code


def test_rotated_upstream_key_is_fetched_once_and_a_forgery_never_refetches(
        proxied_client, proxy, monkeypatch):
    """OpenID Connect Core 10.1.1: a signer announces a new key by its ``kid``; the hub
    fetches the keys again when a signature does not verify, at most once a minute
    (connectors.oidc.JWKS_REFRESH_MIN_SECONDS), so forged tokens cannot make it hammer
    the upstream."""
    from joserfc.jwk import RSAKey

    app = proxied_client("pass").application
    jwks = lambda: proxy.seen.count("/tamper-proxy/jwks")  # noqa: E731
    before = jwks()
    assert _login_through(proxy, app.test_client()).status_code == 302
    assert jwks() == before + 1
    old_key = proxy.key
    proxy.key = RSAKey.generate_key(2048, parameters={"kid": "tamper-proxy-1"}, private=True)
    try:
        # within the minute: the new key is not fetched, the login is refused
        assert _login_through(proxy, app.test_client()).status_code == 502
        assert jwks() == before + 1
        # once the minute has passed, one fetch picks the new key up
        monkeypatch.setattr("connectors.oidc.JWKS_REFRESH_MIN_SECONDS", 0)
        assert _login_through(proxy, app.test_client()).status_code == 302
        assert jwks() == before + 2
    finally:
        proxy.key = old_key


@pytest.mark.parametrize(("mode", "reason"), [
    ("wrong-discovery-issuer", "discovery names another issuer than the configured one "
                               "(OpenID Connect Discovery 1.0 section 4.3)"),
    *((f"discovery-no-{name}", f"discovery has no {name}") for name in DISCOVERY_FIELDS),
])
def test_a_faulty_discovery_document_stops_before_redirect(proxied_client, caplog, mode,
                                                           reason):
    caplog.set_level(logging.WARNING, logger="civitas")
    client = proxied_client(mode)
    r = client.get(AuthRequest().url())
    r = client.get(path_of(r.headers["Location"]))
    link = [x for x in r.get_data(as_text=True).split('"') if "/login/op-proxy/start" in x][0]
    r = client.get(link.replace("&amp;", "&"))
    _refused_because(caplog, r, reason)


def test_upstream_down_gives_502_page_quickly(upstream_issuer, tmp_path):
    import time

    from civitas.app import create_app

    port = servers.free_port()  # nothing listens there
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/down.db", upstreams=[{
        "kind": "oidc", "id": "op-down", "display_name": "Down ID",
        "issuer": f"http://127.0.0.1:{port}", "client_id": "x", "client_secret": "y",
        "timeout_seconds": 2,
    }])
    client = create_app(cfg).test_client()
    r = client.get(AuthRequest().url())
    flow = query(r.headers["Location"])["flow"]
    started = time.monotonic()
    unavailable = metric("civitas_logins_total", upstream="op-down", outcome="unavailable")
    r = client.get(f"/login/op-down/start?flow={flow}")
    assert time.monotonic() - started < 5
    _assert_error_page(r, 502, "could not be reached")
    assert metric("civitas_logins_total", upstream="op-down",
                  outcome="unavailable") == unavailable + 1


def test_upstream_that_trickles_its_answer_is_given_up_at_the_timeout(upstream_issuer,
                                                                      tmp_path, caplog):
    """A slow read: discovery sent one byte every 0.2 s, each within the 1 s read timeout,
    would hold the thread for 20 s (100 bytes); the hub gives it up at the timeout plus at
    most one read's wait, and says so in the log."""
    import time

    from civitas.app import create_app

    caplog.set_level(logging.WARNING, logger="civitas")
    with servers.run_trickle_server(b"{" + b" " * 98 + b"}", 0.2) as port:
        cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/slow.db", upstreams=[{
            "kind": "oidc", "id": "op-slow", "display_name": "Slow ID",
            "issuer": f"http://127.0.0.1:{port}", "client_id": "x", "client_secret": "y",
            "timeout_seconds": 1,
        }])
        client = create_app(cfg).test_client()
        flow = query(client.get(AuthRequest().url()).headers["Location"])["flow"]
        started = time.monotonic()
        r = client.get(f"/login/op-slow/start?flow={flow}")
        assert time.monotonic() - started < 5
    _assert_error_page(r, 502, "could not be reached")
    assert any("still arriving after the timeout" in rec.getMessage()
               for rec in caplog.records if r.headers["X-Request-Id"] in rec.getMessage())


def test_unknown_upstream_is_404_page(client):
    r = client.get(AuthRequest().url())
    flow = query(r.headers["Location"])["flow"]
    r = client.get(f"/login/nope/start?flow={flow}")
    _assert_error_page(r, 404, "does not exist")


def test_start_without_flow_is_400_page(client):
    r = client.get("/login/op/start")
    _assert_error_page(r, 400, "expired")


def test_account_resolution_never_by_email(client, hub, upstream_issuer, tmp_path):
    """Two different upstream subjects with the same (even verified) email: two accounts."""
    from sqlalchemy import func, select

    from broker.models import ConstituentAccount
    from connectors import UpstreamIdentity

    first = hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject="s-1", attributes={"email": "same@example.org",
                                                     "email_verified": True}, acr="a"))
    second = hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject="s-2", attributes={"email": "same@example.org",
                                                     "email_verified": True}, acr="a"))
    third = hub.accounts.resolve(UpstreamIdentity(
        connector_id="other", subject="s-1", attributes={}, acr="a"))
    assert len({first.account_id, second.account_id, third.account_id}) == 3
    assert first.created and second.created and third.created
    again = hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject="s-1", attributes={}, acr="a"))
    assert again.account_id == first.account_id and not again.created
    with hub.db.session() as s:
        assert s.scalar(select(func.count()).select_from(ConstituentAccount)) == 3
