"""Probes of Civitas as an agency developer sees it: logout (RP-Initiated and Back-Channel
Logout 1.0), discovery, introspection (RFC 7662) and the agency documentation.

Each test names the specification section it holds the hub to. Logins go through the real
upstream; agencies' back-channel endpoints are the real HTTP server of tests/test_logout.py.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from urllib.parse import urljoin

import pytest
from jose import jwt as jose_jwt

from idp.backchannel import EVENT
from idp.claims import SCOPE_CLAIMS
from tests.conftest import HUB_ISSUER
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, path_of, query, redeem
from tests.test_logout import AgencyEndpoints

ONE_SIGNED_OUT = "https://one.agency.example/signed-out"
OFFLINE = ["openid", "profile", "email", "offline_access"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def endpoints():
    e = AgencyEndpoints()
    yield e
    e.close()


@pytest.fixture
def logout_app(make_hub, endpoints):
    return make_hub(agencies=[
        AGENCY_ONE.config(post_logout_redirect_uris=[ONE_SIGNED_OUT],
                          backchannel_logout_uri=endpoints.url(AGENCY_ONE.client_id)),
        AGENCY_TWO.config(backchannel_logout_uri=endpoints.url(AGENCY_TWO.client_id)),
    ], backchannel_dispatcher=False, backchannel_timeout_seconds=1)


def claims(token):
    return jose_jwt.get_unverified_claims(token)


def basic(agency):
    return {"Authorization": "Basic " + base64.b64encode(
        f"{agency.client_id}:{agency.secret}".encode()).decode()}


def silent_login_works(client) -> bool:
    r = client.get(AuthRequest(agency=AGENCY_ONE, extra={"prompt": "none"}).url())
    location = r.headers["Location"]
    assert "code=" in location or "error=login_required" in location, location
    return "code=" in location


# -- Back-Channel Logout 1.0 ------------------------------------------------------------------


def test_bcl_2_a_person_signing_in_over_another_ends_the_first_persons_session(logout_app,
                                                                               endpoints):
    """Back-Channel Logout 1.0 section 2 / 2.7 (and the hub's own rule that a hub session's
    tokens die with it): on a shared computer Alice signs in to agency one, then Bob signs in
    through agency two (prompt=login) in the same browser. Alice's hub session is gone from
    the browser, replaced by Bob's under a new ``sid``. Agency one must be sent a logout token
    for Alice's ``sid`` and Alice's session tokens must stop working; otherwise agency one
    keeps Alice signed in and no later logout ever reaches it (Bob's logout takes only Bob's
    sid's agencies)."""
    hub = logout_app.extensions["civitas"]
    client = logout_app.test_client()
    auth_one = AuthRequest(agency=AGENCY_ONE)
    alice = redeem(client, auth_one, full_login(client, auth_one)["code"]).json
    auth_two = AuthRequest(agency=AGENCY_TWO, extra={"prompt": "login"})
    bob = redeem(client, auth_two, full_login(client, auth_two, username="bob")["code"]).json
    assert claims(alice["id_token"])["sid"] != claims(bob["id_token"])["sid"]

    hub.dispatcher.deliver_due()
    told = [claims(t) for t in endpoints.tokens_for(AGENCY_ONE.client_id)]
    assert [(c["sid"], c["sub"]) for c in told] == [
        (claims(alice["id_token"])["sid"], claims(alice["id_token"])["sub"])], \
        "agency one was not told that Alice's hub session ended"
    assert all(c["events"] == {EVENT: {}} for c in told)
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {alice['access_token']}"})
    assert r.status_code == 401, "Alice's session token outlives her hub session"
    # Bob's session is untouched, and agency two (Bob's) was not told anything
    assert endpoints.tokens_for(AGENCY_TWO.client_id) == []
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {bob['access_token']}"})
    assert r.status_code == 200


# -- RP-Initiated Logout 1.0 -----------------------------------------------------------------


def test_rpil_2_a_cross_site_post_without_the_session_cookie_still_signs_out(logout_app):
    """RP-Initiated Logout 1.0 section 2: "OPs MUST support the use of the HTTP GET and POST
    methods". The hub's session cookie is SameSite=Lax, so a browser leaves it off a form POST
    from the agency's site (cross-site). The hub then sees no session and redirected straight
    back to the agency's post_logout_redirect_uri with its state, as if the citizen were
    signed out, while the hub session (and every other agency's) stayed alive.

    The browser is the test client with its cookies (the hub session); the agency's
    cross-site POST is a client without them, as a browser sends it. A redirect the hub
    answers with is a top-level GET navigation, which does carry Lax cookies, so it is
    followed with the browser's cookies."""
    hub = logout_app.extensions["civitas"]
    browser = logout_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    tokens = redeem(browser, auth, full_login(browser, auth)["code"]).json
    assert silent_login_works(browser)

    cross_site = logout_app.test_client()  # no cookies: SameSite=Lax on a cross-site POST
    r = cross_site.post("/logout/end-session", data={
        "id_token_hint": tokens["id_token"], "post_logout_redirect_uri": ONE_SIGNED_OUT,
        "state": "bye-123"})
    for _ in range(5):  # the browser follows the hub's own redirects, with its cookies
        location = r.headers.get("Location", "")
        if r.status_code not in (302, 303) or not urljoin(HUB_ISSUER + "/", location).startswith(
                HUB_ISSUER):
            break
        r = browser.get(path_of(urljoin(HUB_ISSUER + "/", location)))
    assert r.status_code == 303 and r.headers["Location"] == ONE_SIGNED_OUT + "?state=bye-123"
    assert not silent_login_works(browser), \
        "sent back to the agency as signed out, but the hub session is still alive"
    hub.dispatcher.deliver_due()
    r = browser.get("/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 401


def test_rpil_2_the_session_cookie_is_samesite_lax(logout_app):
    """The premise of the test above: the browser session cookie is SameSite=Lax, which
    browsers leave off cross-site POSTs (RFC 6265bis 5.6.7.1)."""
    client = logout_app.test_client()
    r = client.get(AuthRequest(agency=AGENCY_ONE).url())
    cookie = next(v for k, v in r.headers.items()
                  if k.lower() == "set-cookie" and v.startswith("civitas_session="))
    assert "SameSite=Lax" in cookie


@pytest.fixture
def chromium_hub(upstream_issuer, tmp_path):
    """The hub over real HTTP on HUB_PORT (the only callback the upstream knows), with agency
    one registered for a post-logout redirect."""
    from civitas.app import create_app
    from tests.conftest import HUB_PORT, hub_config
    from tests.servers import serve_wsgi, stop_serving

    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/chromium.db", agencies=[
        AGENCY_ONE.config(post_logout_redirect_uris=[ONE_SIGNED_OUT])]))
    running = [serve_wsgi(app, HUB_PORT, threads=4)]
    try:
        yield app
    finally:
        stop_serving(running)
        app.extensions["civitas"].db.dispose()


@pytest.mark.browser
def test_rpil_2_form_post_from_the_agency_site_signs_out_in_chromium(chromium_hub):
    """The same as above in Debian's Chromium: the agency's page (http://agency.test, mapped
    to 127.0.0.1 by the browser's resolver, a different site from the hub's 127.0.0.1) posts
    RP-Initiated Logout's form to the end-session endpoint. The citizen must end up signed
    out of the hub, not only sent back to the agency."""
    import html as html_mod
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from tests.servers import free_port
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
    from tests.test_interop_openid_client import login

    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}")
    with requests.Session() as citizen:
        auth = AuthRequest(agency=AGENCY_ONE)
        callback = login(citizen, HUB_ISSUER + auth.url())
        token = requests.post(HUB_ISSUER + "/token", data={
            "grant_type": "authorization_code", "code": query(callback)["code"],
            "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": auth.verifier},
            headers=basic(AGENCY_ONE), timeout=10).json()
        hub_cookie = citizen.cookies.get("civitas_session")
    assert hub_cookie and token.get("id_token")

    def hub_session_alive() -> bool:
        probe = AuthRequest(agency=AGENCY_ONE, extra={"prompt": "none"})
        r = requests.get(HUB_ISSUER + probe.url(), cookies={"civitas_session": hub_cookie},
                         allow_redirects=False, timeout=10)
        return "code=" in r.headers.get("Location", "")

    assert hub_session_alive()
    fields = {"id_token_hint": token["id_token"], "post_logout_redirect_uri": ONE_SIGNED_OUT,
              "state": "bye-chromium"}
    page_html = ("<!doctype html><title>Agency</title><form method=post action="
                 f'"{HUB_ISSUER}/logout/end-session">'
                 + "".join(f'<input type=hidden name="{k}" value="{html_mod.escape(v)}">'
                           for k, v in fields.items())
                 + "<button>Sign out</button></form>").encode()

    class Agency(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page_html)))
            self.end_headers()
            self.wfile.write(page_html)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    site = ThreadingHTTPServer(("127.0.0.1", port), Agency)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    landed: list[str] = []
    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True,
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP agency.test 127.0.0.1"])
            try:
                context = browser.new_context()
                context.add_cookies([{"name": "civitas_session", "value": hub_cookie,
                                      "url": HUB_ISSUER, "httpOnly": True, "sameSite": "Lax"}])

                page = context.new_page()
                # the agency's post-logout page is never loaded (its name does not resolve):
                # where the browser is sent is what counts (Playwright does not route the
                # request of a redirect)
                page.on("request", lambda rq: landed.append(rq.url) if rq.url.startswith(
                    "https://one.agency.example/") else None)
                page.goto(f"http://agency.test:{port}/")
                page.click("button")
                page.wait_for_load_state()
                if not landed and page.get_by_role("button", name="Sign out").count():
                    # the hub asked the citizen to confirm: they do
                    page.get_by_role("button", name="Sign out").click()
                    page.wait_for_load_state()
            finally:
                browser.close()
    finally:
        site.shutdown()
        site.server_close()
    assert landed == [ONE_SIGNED_OUT + "?state=bye-chromium"], landed
    assert not hub_session_alive(), \
        "Chromium was sent back to the agency as signed out; the hub session lives on"


# -- Discovery 1.0 -----------------------------------------------------------------------------


def test_discovery_3_claims_supported_names_every_claim_the_hub_releases(client):
    """Discovery 1.0 section 3: ``claims_supported`` lists "the Claim Names of the Claims
    that the OpenID Provider MAY be able to supply values for". The profile scope releases
    middle_name, nickname, preferred_username, birthdate... (idp/claims.py) which the OIDC
    connector takes from upstreams (connectors/oidc.py STANDARD_CLAIMS), so an agency reading
    discovery to decide what to ask for is told less than it can get."""
    doc = client.get("/.well-known/openid-configuration").json
    releasable = {name for names in SCOPE_CLAIMS.values() for name in names}
    missing = sorted(releasable - set(doc["claims_supported"]))
    assert missing == [], f"released but not advertised: {missing}"


# -- RFC 7662 ------------------------------------------------------------------------------------


@pytest.fixture
def offline_app(make_hub):
    return make_hub(agencies=[AGENCY_ONE.config(scopes=OFFLINE)])


def test_rfc7662_2_2_token_type_is_an_oauth_token_type(offline_app):
    """RFC 7662 2.2: ``token_type`` is the "Type of the token as defined in Section 5.1 of
    OAuth 2.0", i.e. an access token type of RFC 6749 7.1 ("Bearer", as the token response
    said), not a token_type_hint value of RFC 7009 ("access_token", "refresh_token")."""
    client = offline_app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE, scope="openid email offline_access")
    from tests.flows import allow_consent

    r = allow_consent(client, client.get(auth.url()))
    code = query(r.headers["Location"])["code"] if r.status_code == 302 else \
        full_login(client, auth)["code"]
    body = redeem(client, auth, code).json
    assert body["token_type"] == "Bearer"
    info = client.post("/introspect", data={"token": body["access_token"]},
                       headers=basic(AGENCY_ONE)).json
    assert info["active"] is True
    assert info["token_type"] == body["token_type"], info
    info = client.post("/introspect", data={"token": body["refresh_token"]},
                       headers=basic(AGENCY_ONE)).json
    assert info["active"] is True
    assert info.get("token_type") in (None, "Bearer"), info


# -- the agency documentation -------------------------------------------------------------------


def test_readme_python_jose_recipe_says_it_cannot_verify_ps256(make_hub):
    """README: ID tokens are "signed ES256 by default (RS256 or PS256 per agency)", then the
    python-jose recipe "as many agency apps do". python-jose has no PS256 at all (its
    ``jwk.construct`` raises "Unable to find an algorithm for key"), so an agency registered
    with PS256 that follows the recipe cannot verify a single token. The docs must say so."""
    from jose.exceptions import JWKError

    app = make_hub(agencies=[AGENCY_ONE.config(id_token_signed_response_alg="PS256")])
    client = app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    body = redeem(client, auth, full_login(client, auth)["code"]).json
    assert jose_jwt.get_unverified_header(body["id_token"])["alg"] == "PS256"
    jwks = client.get("/jwks").json
    with pytest.raises(JWKError):
        jose_jwt.decode(body["id_token"], jwks, algorithms=["PS256"],
                        audience=AGENCY_ONE.client_id, issuer=HUB_ISSUER,
                        access_token=body["access_token"])
    text = README.read_text()
    recipe = text[text.index("Verifying an ID token with python-jose"):]
    recipe = recipe[:recipe.index("```python")]
    assert re.search(r"PS256", recipe), "the python-jose recipe does not warn about PS256"




# -- RFC 6749 2.3.1 ------------------------------------------------------------------------------


def _form_urlencode(value: str) -> str:
    """What openid-client (oauth4webapi ``formUrlEncode``) and RFC 6749 2.3.1 do to the
    client id and secret before HTTP Basic: application/x-www-form-urlencoded, space as '+'."""
    from urllib.parse import quote_plus

    return quote_plus(value, safe="")


def test_rfc6749_2_3_1_basic_credentials_are_form_urlencoded(make_hub):
    """RFC 6749 2.3.1: "The client identifier is encoded using the
    application/x-www-form-urlencoded encoding algorithm ... and the encoded value is used as
    the username; the client password is encoded using the same algorithm and used as the
    password." That encoding writes a space as '+'. A configured secret may hold one (the
    settings take any string), and openid-client sends it as '+': the hub read the '+' as
    itself and answered invalid_client. A '+' in a secret, sent as %2B, must keep working,
    and so must a secret sent unencoded (curl -u, as the README shows)."""
    spaced = "correct horse battery staple " + "z" * 20
    plus = "p+q/r=" + "y" * 30
    agency_spaced = AGENCY_ONE.__class__(AGENCY_ONE.client_id, spaced, AGENCY_ONE.redirect_uri,
                                         AGENCY_ONE.name)
    agency_plus = AGENCY_TWO.__class__(AGENCY_TWO.client_id, plus, AGENCY_TWO.redirect_uri,
                                       AGENCY_TWO.name)
    app = make_hub(agencies=[agency_spaced.config(), agency_plus.config()])
    client = app.test_client()

    def token(client_id: str, secret: str, *, encode: bool) -> int:
        user, password = (_form_urlencode(client_id), _form_urlencode(secret)) if encode \
            else (client_id, secret)
        header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        r = client.post("/token", data={"grant_type": "client_credentials",
                                        "scope": "consent.decisions"},
                        headers={"Authorization": header})
        return r.status_code

    assert token(AGENCY_TWO.client_id, plus, encode=True) == 200
    assert token(AGENCY_TWO.client_id, plus, encode=False) == 200  # curl -u
    assert token(AGENCY_ONE.client_id, spaced, encode=False) == 200
    assert token(AGENCY_ONE.client_id, spaced, encode=True) == 200, \
        "the form-urlencoded secret (space as '+', as openid-client sends it) is refused"
    assert token(AGENCY_ONE.client_id, spaced.replace(" ", "-"), encode=True) == 401


# -- Back-Channel Logout 1.0 delivery: a slow pass ------------------------------------------------


def test_bcl_2_5_a_row_delivered_by_another_worker_is_not_queued_again(make_hub, endpoints):
    """The queue's promise (idp/backchannel.py): "any number of workers ... never post a row
    at once", and a delivered row stays delivered. A worker's lease on the rows it claims is
    ``3 * timeout + 30`` s (45 s by default), but one pass posts up to ``batch`` (100) rows
    ``workers`` (8) at a time, each waiting up to ``timeout`` (5 s): about 65 s for rows
    whose agency endpoint hangs. Past the lease, another worker claims the rows the first is
    still posting and delivers them; when the first one's attempt then fails, it records its
    failure over the other's success: the delivered row is queued again and the agency is
    sent the logout token once more (and again at every failure).

    Worker A's pass hangs on the agency; worker B runs when A's lease has run out (its
    ``now`` is 46 s on, the time A's pass has taken) and delivers the row; then A's
    connection fails."""
    import threading
    import time
    from datetime import timedelta

    from idp.backchannel import AgencyNotifier, LogoutNotice
    from kernel.db import utcnow

    app = make_hub(agencies=[
        AGENCY_TWO.config(backchannel_logout_uri=endpoints.url(AGENCY_TWO.client_id))],
        backchannel_dispatcher=False)
    hub = app.extensions["civitas"]
    worker_a = hub.dispatcher
    worker_b = AgencyNotifier(hub.db, hub.keys, issuer=HUB_ISSUER, timeout=worker_a.timeout)
    start = utcnow()
    worker_a.enqueue([LogoutNotice(client_id=AGENCY_TWO.client_id,
                                   logout_uri=endpoints.url(AGENCY_TWO.client_id), alg="ES256",
                                   sub="pairwise-sub", sid="sid-1")], now=start)
    endpoints.modes[AGENCY_TWO.client_id] = "hang"
    passes = {}
    a = threading.Thread(target=lambda: passes.setdefault("a", worker_a.deliver_due(start)))
    a.start()
    deadline = time.monotonic() + 10
    while not endpoints.received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(endpoints.received) == 1  # A is posting, and its agency does not answer
    endpoints.modes[AGENCY_TWO.client_id] = "ok"
    later = start + timedelta(seconds=46)
    assert worker_b.deliver_due(later).delivered == 1
    endpoints.release.set()  # A's connection ends without an answer: a failed attempt
    a.join(15)
    assert not a.is_alive()

    [row] = worker_a.deliveries()
    assert row.delivered_at is not None
    assert row.next_attempt_at is None, \
        f"a delivered row is queued again by the worker whose lease had run out ({row.last_error})"
    sent = len(endpoints.received)
    worker_b.deliver_due(later + timedelta(hours=2))
    assert len(endpoints.received) == sent, "the agency is sent the logout token again"


def test_bcl_2_3_agencies_of_a_session_kept_alive_by_use_are_still_told(make_hub, endpoints):
    """Back-Channel Logout 1.0 section 2.3 ("Remembering Logged-In RPs": the OP keeps, for
    the OP session, the RPs that logged in with it, to tell them at logout). The hub session
    is renewed for ``session_lifetime_seconds`` at every request that writes it (a sign-in
    flow started, even one left unfinished: agency two asking for a fresh sign-in that the
    citizen does not complete), but the record of the session's agencies only when an
    agency is issued a code. A citizen who signs in to agency one, whose session is then
    renewed so, and who signs out after agency one's record has run out: agency one, which
    took part, is not told, and keeps its session.

    With the shortest lifetime the settings allow (60 s): sign in at agency one; 35 s later
    agency two asks for a fresh sign-in (prompt=login), which the citizen leaves; sign out
    35 s after that (70 s after agency one's code, 35 s into the renewed session). The
    in-process store's clock is moved on instead of waiting; nothing is timed."""
    import time

    app = make_hub(agencies=[
        AGENCY_ONE.config(backchannel_logout_uri=endpoints.url(AGENCY_ONE.client_id)),
        AGENCY_TWO.config()], backchannel_dispatcher=False, session_lifetime_seconds=60)
    hub = app.extensions["civitas"]
    now = [time.monotonic()]
    hub.store._clock = lambda: now[0]  # the store every expiry of this test is kept in
    client = app.test_client()
    auth = AuthRequest(agency=AGENCY_ONE)
    id_token = redeem(client, auth, full_login(client, auth)["code"]).json["id_token"]
    now[0] += 35
    r = client.get(AuthRequest(agency=AGENCY_TWO, extra={"prompt": "login"}).url())
    assert r.status_code == 303  # to the sign-in page: the session is written, so renewed
    now[0] += 35
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, "the hub session did not outlive its first 60 s"
    assert client.post("/logout", data={"csrf": csrf.group(1)}).status_code == 303
    hub.dispatcher.deliver_due()
    told = [claims(t)["sid"] for t in endpoints.tokens_for(AGENCY_ONE.client_id)]
    assert told == [claims(id_token)["sid"]], \
        "agency one took part in the session that ended but was not told"
