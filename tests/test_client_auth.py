"""private_key_jwt client authentication (RFC 7523 section 3, OpenID Connect Core 9).

Agencies register an RSA or EC public key inline (``jwks``) or publish it at a ``jwks_uri``
(here a small http.server on 127.0.0.1; the hub runs with ``allow_insecure_jwks_uri``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.fernet import Fernet
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from config import settings_from_mapping
from idp.agency_keys import AgencyKeys, JWKSUnavailable
from kernel.errors import ConfigError
from tests import servers
from tests.conftest import HUB_ISSUER
from tests.flows import AGENCY_ONE, AuthRequest, allow_consent, full_login, query
from tests.flows import TestAgency as Agency

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_URL = f"{HUB_ISSUER}/token"

RSA_KEY = RSAKey.generate_key(2048, private=True, auto_kid=True)
EC_KEY = ECKey.generate_key("P-256", private=True, auto_kid=True)
ATTACKER_KEY = RSAKey.generate_key(2048, private=True, auto_kid=True)
ATTACKER_EC_KEY = ECKey.generate_key("P-256", private=True, auto_kid=True)
ROTATED_KEY = ECKey.generate_key("P-256", private=True, auto_kid=True)

PK_RSA = Agency("pk-rsa", "", "https://rsa.agency.example/cb", "RSA Agency")
PK_EC = Agency("pk-ec", "", "https://ec.agency.example/cb", "EC Agency")
PK_URI = Agency("pk-uri", "", "https://uri.agency.example/cb", "Remote Keys Agency")


def public_set(*keys: RSAKey | ECKey) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


# -- a JWKS server --------------------------------------------------------------------------

class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the hub hanging up on a too large or slow answer is the point of some tests


class JWKSServer:
    """Serves ``routes[path] = (status, headers, body)`` to GET and to POST (whose body it
    reads and drops: an event receiver's); ``/slow`` answers after 2 s; ``hits`` counts the
    requests per path. A header given the value "" is left out (``Content-Length``: the
    body then ends when the connection closes, HTTP/1.0)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path == "/slow":
                    time.sleep(2)
                status, headers, body = routes.get(self.path, (404, {}, b"{}"))
                self.send_response(status)
                for name, value in headers.items():
                    if value:
                        self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, data: object, status: int = 200,
              headers: dict[str, str] | None = None) -> str:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.routes[path] = (status, {"Content-Type": "application/json", **(headers or {})},
                             body)
        return self.base + path


def serving() -> Iterator[JWKSServer]:
    """A :class:`JWKSServer` answering on its own thread until the generator is closed
    (the body of a ``jwks_server`` fixture, of whatever scope)."""
    server = JWKSServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JWKSServer]:
    yield from serving()


# -- the hub --------------------------------------------------------------------------------

@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "allow_insecure_jwks_uri": True}


@pytest.fixture
def agencies(hub: Any, jwks_server: JWKSServer) -> None:
    for agency, jwks in ((PK_RSA, public_set(RSA_KEY)), (PK_EC, public_set(EC_KEY))):
        row, secret = hub.agencies.add(client_id=agency.client_id, name=agency.name,
                                       redirect_uris=[agency.redirect_uri],
                                       auth_method="private_key_jwt", jwks=jwks)
        assert secret is None and row.secret_hash == ""
    hub.agencies.add(client_id=PK_URI.client_id, name=PK_URI.name,
                     redirect_uris=[PK_URI.redirect_uri], auth_method="private_key_jwt",
                     jwks_uri=jwks_server.serve("/pk-uri.json", public_set(EC_KEY, RSA_KEY)))


@pytest.fixture
def browser(client: Any, agencies: None) -> Any:
    full_login(client, AuthRequest())
    return client


def new_code(browser: Any, auth: AuthRequest) -> str:
    """A code from the hub session; each request gets a fresh nonce (reuse is refused)."""
    auth.nonce = secrets.token_urlsafe(16)
    r = allow_consent(browser, browser.get(auth.url()))  # first use: consent
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    return query(r.headers["Location"])["code"]


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def assertion(client_id: str, key: Any = RSA_KEY, alg: str = "RS256", *,
              header: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "iat": now,
                            "exp": now + 120, "jti": secrets.token_urlsafe(16)}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if getattr(key, "kid", None):
        head["kid"] = key.kid
    head.update(header or {})
    if alg == "none":
        return f"{b64(head)}.{b64(body)}."
    if isinstance(key, bytes):  # HS256 by hand: joserfc refuses public keys as HMAC keys
        signing_input = f"{b64(head)}.{b64(body)}"
        mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    return jwt.encode(head, body, key, algorithms=[alg])


def redeem(browser: Any, auth: AuthRequest, code: str, client_assertion: str,
           **extra: str) -> Any:
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": auth.agency.redirect_uri, "code_verifier": auth.verifier,
            "client_assertion_type": ASSERTION_TYPE, "client_assertion": client_assertion}
    form.update(extra)
    return browser.post("/token", data=form)


def assert_ok(browser: Any, r: Any, auth: AuthRequest) -> dict[str, Any]:
    """A token response whose ID token verifies with the hub's published keys."""
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.json
    hub_keys = KeySet.import_key_set(browser.get("/jwks").json)
    claims = jwt.decode(body["id_token"], hub_keys,
                        algorithms=["ES256", "RS256", "PS256"]).claims
    assert claims["aud"] == auth.agency.client_id and claims["nonce"] == auth.nonce
    return body


def assert_invalid_client(r: Any, *, contains: str = "") -> None:
    assert r.status_code in (400, 401), (r.status_code, r.get_data(as_text=True))
    assert r.json["error"] == "invalid_client", r.json
    assert contains.lower() in r.json.get("error_description", "").lower(), r.json
    assert "access_token" not in r.json and r.headers["Cache-Control"] == "no-store"


# -- happy paths ----------------------------------------------------------------------------

@pytest.mark.parametrize(("agency", "key", "alg"), [
    (PK_RSA, RSA_KEY, "RS256"), (PK_RSA, RSA_KEY, "PS256"), (PK_EC, EC_KEY, "ES256"),
    (PK_URI, EC_KEY, "ES256"), (PK_URI, RSA_KEY, "RS256"),
], ids=["rsa-rs256", "rsa-ps256", "ec-es256", "jwks_uri-ec", "jwks_uri-rsa"])
def test_rfc7523_3_private_key_jwt_redeems_a_code(browser, agency, key, alg):
    auth = AuthRequest(agency=agency)
    body = assert_ok(browser, redeem(browser, auth, new_code(browser, auth),
                            assertion(agency.client_id, key, alg)), auth)
    r = browser.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200


def test_oidc_core_9_issuer_as_audience_and_client_id_parameter(browser):
    auth = AuthRequest(agency=PK_EC)
    a = assertion(PK_EC.client_id, EC_KEY, "ES256", aud=[HUB_ISSUER])
    assert_ok(browser, redeem(browser, auth, new_code(browser, auth), a, client_id=PK_EC.client_id),
              auth)


def test_jwks_uri_is_cached_and_refetched_for_a_new_kid(browser, hub, jwks_server):
    def login(key: Any, alg: str) -> None:
        auth = AuthRequest(agency=PK_URI)
        assert_ok(browser, redeem(browser, auth, new_code(browser, auth),
                                  assertion(PK_URI.client_id, key, alg)), auth)

    login(EC_KEY, "ES256")
    before = jwks_server.hits["/pk-uri.json"]
    login(RSA_KEY, "RS256")
    assert jwks_server.hits["/pk-uri.json"] == before  # served from the cache
    # the agency rotates to a new key: an unknown kid makes the hub look again
    jwks_server.serve("/pk-uri.json", public_set(ROTATED_KEY))
    hub.server.hub.agency_keys.min_refresh = 0
    login(ROTATED_KEY, "ES256")
    assert jwks_server.hits["/pk-uri.json"] == before + 1


# -- refused assertions ---------------------------------------------------------------------

def now() -> int:
    return int(time.time())


@pytest.mark.parametrize(("claims", "why"), [
    ({"iss": "someone-else"}, "iss and sub"),
    ({"iss": None}, "iss and sub"),
    ({"aud": "https://elsewhere.example/token"}, "aud"),
    ({"aud": [TOKEN_URL, "https://elsewhere.example"]}, "aud"),
    ({"aud": f"{HUB_ISSUER}/introspect"}, "aud"),
    ({"aud": None}, "aud"),
    ({"exp": None}, "exp"),
    ({"exp": now() - 300, "iat": now() - 400}, "expired"),
    ({"exp": now() + 3600}, "minutes ahead"),
    ({"iat": now() + 600}, "iat"),
    ({"nbf": now() + 600}, "nbf"),
    ({"jti": None}, "jti"),
], ids=["iss", "no-iss", "aud", "aud-array-with-other", "aud-introspect", "no-aud", "no-exp",
        "expired", "exp-too-far", "iat-future", "nbf-future", "no-jti"])
def test_rfc7523_3_bad_claims_are_invalid_client(browser, claims, why):
    auth = AuthRequest(agency=PK_RSA)
    code = new_code(browser, auth)
    assert_invalid_client(redeem(browser, auth, code, assertion(PK_RSA.client_id, **claims)),
                          contains=why)
    # the code was not consumed: client authentication failed before it was looked at
    assert_ok(browser, redeem(browser, auth, code, assertion(PK_RSA.client_id)), auth)


def test_sub_of_another_agency_is_invalid_client(browser):
    # signed with PK_RSA's key but claiming to be PK_EC: PK_EC's keys do not match
    auth = AuthRequest(agency=PK_EC)
    a = assertion(PK_RSA.client_id, sub=PK_EC.client_id)
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a), contains="kid")
    a = assertion(PK_EC.client_id, RSA_KEY, "RS256")
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a), contains="kid")


def test_rfc7523_3_replayed_jti_is_invalid_client(browser):
    auth = AuthRequest(agency=PK_RSA)
    a = assertion(PK_RSA.client_id)
    assert_ok(browser, redeem(browser, auth, new_code(browser, auth), a), auth)
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="used before")


def test_a_jti_that_is_no_unicode_text_is_single_use_too(browser):
    """A signed assertion whose jti holds a lone surrogate (valid JSON, "\\ud800"; joserfc
    will not write one, so it is signed here by hand) is kept as any other: once, then
    refused as a replay, never a server error."""
    from joserfc import jws

    now_ = int(time.time())
    body = {"iss": PK_RSA.client_id, "sub": PK_RSA.client_id, "aud": TOKEN_URL, "iat": now_,
            "exp": now_ + 120, "jti": secrets.token_urlsafe(8) + "\ud800"}
    a = jws.serialize_compact({"alg": "RS256", "typ": "JWT", "kid": RSA_KEY.kid},
                              json.dumps(body).encode(), RSA_KEY)
    auth = AuthRequest(agency=PK_RSA)
    assert_ok(browser, redeem(browser, auth, new_code(browser, auth), a), auth)
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="used before")


def test_hs256_signed_with_the_client_secret_is_refused(browser, caplog):
    # an agency with a client secret cannot turn it into a client_secret_jwt assertion: it is
    # not registered for assertions at all (its secret is never a key)
    auth = AuthRequest(agency=AGENCY_ONE)
    a = assertion(AGENCY_ONE.client_id, AGENCY_ONE.secret.encode(), "HS256")
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="not registered for private_key_jwt")
    # nor can anyone sign HS256 with a private_key_jwt agency's public key (alg confusion).
    # The algorithm allow-list refuses it; without that, the key's type would (an RSA key is
    # no HMAC key) with the same error_description, so the logged reason tells them apart.
    caplog.set_level(logging.INFO, logger="idp.client_auth")
    auth = AuthRequest(agency=PK_RSA)
    public_pem = RSA_KEY.as_pem(private=False)
    a = assertion(PK_RSA.client_id, public_pem, "HS256", header={"kid": RSA_KEY.kid})
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="algorithm or signature is not accepted (allowed: RS256, "
                                   "PS256, ES256)")
    assert "Algorithm of 'HS256' is not allowed" in caplog.text


def test_alg_none_is_refused(browser):
    auth = AuthRequest(agency=PK_RSA)
    a = assertion(PK_RSA.client_id, None, "none", header={"kid": RSA_KEY.kid})
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a), contains="alg")


def test_unknown_kid_is_refused(browser):
    auth = AuthRequest(agency=PK_RSA)
    a = assertion(PK_RSA.client_id, ATTACKER_KEY, "RS256")
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a), contains="kid")


def test_key_in_the_token_header_is_never_used(browser):
    auth = AuthRequest(agency=PK_EC)
    attacker_public = ATTACKER_EC_KEY.as_dict(private=False)
    # the attacker's own key, carried in the jwk header: its kid is not registered
    a = assertion(PK_EC.client_id, ATTACKER_EC_KEY, "ES256", header={"jwk": attacker_public})
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a), contains="kid")
    # ... and under the registered kid: the registered key does not verify it
    a = assertion(PK_EC.client_id, ATTACKER_EC_KEY, "ES256",
                  header={"kid": EC_KEY.kid, "jwk": attacker_public,
                          "jku": "http://127.0.0.1:9/jwks"})
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="signature")


def test_secret_methods_and_private_key_jwt_do_not_mix(browser):
    # a secret agency cannot use an assertion, even one signed with a key
    auth = AuthRequest(agency=AGENCY_ONE)
    a = assertion(AGENCY_ONE.client_id)
    assert_invalid_client(redeem(browser, auth, new_code(browser, auth), a),
                          contains="not registered for private_key_jwt")
    # a private_key_jwt agency has no secret to present
    auth = AuthRequest(agency=PK_RSA)
    cred = base64.b64encode(f"{PK_RSA.client_id}:".encode() + b"x" * 43).decode()
    r = browser.post("/token", data={"grant_type": "authorization_code",
                                     "code": new_code(browser, auth),
                                     "redirect_uri": PK_RSA.redirect_uri,
                                     "code_verifier": auth.verifier},
                     headers={"Authorization": f"Basic {cred}"})
    assert r.status_code == 401 and r.json["error"] == "invalid_client"
    # an assertion and a secret at once: two methods
    r = redeem(browser, auth, new_code(browser, auth), assertion(PK_RSA.client_id),
               client_secret="x" * 43)
    assert r.status_code == 400 and r.json["error"] == "invalid_request"
    # a client_id that is not the assertion's subject
    r = redeem(browser, auth, new_code(browser, auth), assertion(PK_RSA.client_id),
               client_id=PK_EC.client_id)
    assert_invalid_client(r, contains="client_id")


# -- jwks_uri failures ----------------------------------------------------------------------

def register_remote(hub: Any, client_id: str, uri: str) -> Agency:
    agency = Agency(client_id, "", f"https://{client_id}.agency.example/cb", client_id)
    hub.agencies.add(client_id=client_id, name=client_id, redirect_uris=[agency.redirect_uri],
                     auth_method="private_key_jwt", jwks_uri=uri)
    return agency


def test_jwks_uri_down_is_invalid_client_quickly(browser, hub):
    agency = register_remote(hub, "pk-down", f"http://127.0.0.1:{servers.free_port()}/jwks")
    auth = AuthRequest(agency=agency)
    started = time.monotonic()
    r = redeem(browser, auth, new_code(browser, auth),
               assertion(agency.client_id, EC_KEY, "ES256"))
    assert time.monotonic() - started < 2
    assert_invalid_client(r, contains="could not be obtained")


def test_jwks_uri_slow_times_out(browser, hub, jwks_server):
    jwks_server.serve("/slow", public_set(EC_KEY))
    agency = register_remote(hub, "pk-slow", jwks_server.base + "/slow")
    hub.server.hub.agency_keys.timeout = 0.5
    auth = AuthRequest(agency=agency)
    started = time.monotonic()
    r = redeem(browser, auth, new_code(browser, auth),
               assertion(agency.client_id, EC_KEY, "ES256"))
    assert time.monotonic() - started < 1.8
    assert_invalid_client(r)


@pytest.mark.parametrize(("path", "data", "status", "headers"), [
    ("/big", {"keys": [EC_KEY.as_dict(private=False)], "pad": "x" * 70_000}, 200, {}),
    # no Content-Length to refuse it by: the hub stops reading past 64 KiB
    ("/big-unannounced", {"keys": [EC_KEY.as_dict(private=False)], "pad": "x" * 70_000}, 200,
     {"Content-Length": ""}),
    ("/redirect", {}, 302, {"Location": "/pk-uri.json"}),
    ("/private", {"keys": [EC_KEY.as_dict(private=True)]}, 200, {}),
    ("/notjson", b"<html>", 200, {}),
    ("/error", {}, 500, {}),
], ids=["too-large", "too-large-no-length", "redirect", "private-key", "not-json", "http-500"])
def test_jwks_uri_bad_answers_are_invalid_client(browser, hub, jwks_server, path, data, status,
                                                 headers):
    jwks_server.serve(path, data, status, headers)
    agency = register_remote(hub, "pk" + path.replace("/", "-"), jwks_server.base + path)
    auth = AuthRequest(agency=agency)
    r = redeem(browser, auth, new_code(browser, auth),
               assertion(agency.client_id, EC_KEY, "ES256"))
    assert_invalid_client(r, contains="could not be obtained")


def test_a_jwks_uri_that_trickles_its_answer_is_given_up_at_the_timeout():
    """A slow-read attack on the token endpoint: a jwks_uri that sends one byte every 0.2 s,
    within the 0.5 s read timeout, would hold the request for 13 s (64 bytes); the fetch
    gives it up at its timeout plus at most one read's wait."""
    body = json.dumps({"keys": [], "pad": "x" * 40}).encode()
    assert len(body) >= 60
    with servers.run_trickle_server(body, 0.2) as port:
        keys = AgencyKeys(allow_insecure=True, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(JWKSUnavailable, match="took too long"):
            keys.fetch(f"http://127.0.0.1:{port}/jwks")
        assert time.monotonic() - started < 3


def test_jwks_fetch_refuses_private_addresses_and_http():
    keys = AgencyKeys(allow_insecure=False,
                      lookup=lambda host, port, timeout: ["93.184.215.14", "10.1.2.3"])
    for uri, why in (("http://jwks.agency.example/jwks", "not https"),
                     ("https://127.0.0.1/jwks", "private"),
                     ("https://[::1]/jwks", "private"),
                     ("https://169.254.169.254/latest", "private"),
                     ("https://[::ffff:10.0.0.1]/jwks", "private"),
                     ("https://jwks.agency.example/jwks", "private")):
        with pytest.raises(JWKSUnavailable, match=why):
            keys.fetch(uri)


def test_registration_refuses_insecure_jwks_uri_unless_allowed(hub):
    from idp.agencies import AgencyRegistry, RegistrationPolicy
    from idp.errors import AgencyRegistrationError

    strict = AgencyRegistry(hub.db, policy=RegistrationPolicy())
    for uri in ("http://127.0.0.1:9/jwks", "https://10.0.0.1/jwks",
                "https://user:pw@keys.example/jwks", "https://keys.example/jwks#x"):
        with pytest.raises(AgencyRegistrationError, match="^jwks_uri: "):
            strict.add(client_id="pk-strict", name="Strict", auth_method="private_key_jwt",
                       redirect_uris=["https://strict.example/cb"], jwks_uri=uri)


# -- revocation and introspection -----------------------------------------------------------

def test_rfc7009_and_rfc7662_accept_private_key_jwt(browser):
    auth = AuthRequest(agency=PK_EC)
    body = assert_ok(browser, redeem(browser, auth, new_code(browser, auth),
                            assertion(PK_EC.client_id, EC_KEY, "ES256")), auth)
    form = {"client_assertion_type": ASSERTION_TYPE, "token": body["access_token"]}
    r = browser.post("/introspect", data={
        **form, "client_assertion": assertion(PK_EC.client_id, EC_KEY, "ES256")})
    assert r.status_code == 200 and r.json["active"] is True, r.json
    assert r.json["client_id"] == PK_EC.client_id
    # a bad assertion is refused at these endpoints too
    r = browser.post("/introspect", data={
        **form, "client_assertion": assertion(PK_EC.client_id, EC_KEY, "ES256",
                                              exp=now() - 300)})
    assert r.status_code in (400, 401) and r.json["error"] == "invalid_client"
    r = browser.post("/revoke", data={
        **form, "client_assertion": assertion(PK_EC.client_id, EC_KEY, "ES256",
                                              aud=HUB_ISSUER)})
    assert r.status_code == 200, r.get_data(as_text=True)
    r = browser.post("/introspect", data={
        **form, "client_assertion": assertion(PK_EC.client_id, EC_KEY, "ES256")})
    assert r.json == {"active": False}


def test_discovery_announces_private_key_jwt(client):
    disc = client.get("/.well-known/openid-configuration").json
    for endpoint in ("token", "revocation", "introspection"):
        assert "private_key_jwt" in disc[f"{endpoint}_endpoint_auth_methods_supported"]
        algs = disc[f"{endpoint}_endpoint_auth_signing_alg_values_supported"]
        assert set(algs) == {"RS256", "PS256", "ES256"}
    assert disc["id_token_signing_alg_values_supported"] == ["ES256", "RS256", "PS256"]
    assert disc["subject_types_supported"] == ["pairwise"]


# -- registration from the command line and the settings file ------------------------------

def test_cli_agency_add_private_key_jwt(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from civitas.cli import main
    from tests.test_config_cli import ENV, minimal, write

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = write(tmp_path, minimal(tmp_path))
    jwks_file = tmp_path / "keys.json"
    jwks_file.write_text(json.dumps(public_set(EC_KEY)))

    def cli(*args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        assert (result.exit_code == 0) is ok, result.output
        return result.stdout if ok else result.output

    out = cli("agency", "add", "--client-id", "pk-cli", "--name", "CLI Agency",
              "--redirect-uri", "https://cli.agency.example/cb",
              "--auth-method", "private_key_jwt", "--jwks-file", str(jwks_file),
              "--signing-alg", "PS256")
    assert "registered agency pk-cli" in out and "client_secret" not in out
    shown = json.loads(cli("agency", "show", "pk-cli"))
    assert shown["token_endpoint_auth_method"] == "private_key_jwt"
    assert shown["jwks"] == public_set(EC_KEY) and shown["id_token_signed_response_alg"] == "PS256"
    assert "PS256" in cli("keys", "list")  # the key for the agency's algorithm exists now
    out = cli("agency", "add", "--client-id", "pk-cli-2", "--name", "CLI Agency",
              "--redirect-uri", "https://cli.agency.example/cb", "--auth-method",
              "private_key_jwt", "--jwks-uri", "http://keys.agency.example/jwks", ok=False)
    assert "jwks_uri" in out
    out = cli("agency", "add", "--client-id", "pk-cli-3", "--name", "CLI Agency",
              "--redirect-uri", "https://cli.agency.example/cb", "--subject-type", "public",
              ok=False)
    assert "subject_type" in out


def test_settings_file_agency_with_private_key_jwt(make_hub):
    app = make_hub(allow_insecure_jwks_uri=True, agencies=[
        AGENCY_ONE.config(),
        {"client_id": PK_RSA.client_id, "name": PK_RSA.name,
         "redirect_uris": [PK_RSA.redirect_uri], "token_endpoint_auth_method": "private_key_jwt",
         "jwks": public_set(RSA_KEY), "id_token_signed_response_alg": "RS256"},
    ])
    client = app.test_client()
    full_login(client, AuthRequest())
    auth = AuthRequest(agency=PK_RSA)
    body = assert_ok(client, redeem(client, auth, new_code(client, auth),
                                    assertion(PK_RSA.client_id)), auth)
    assert jwt.decode(body["id_token"], KeySet.import_key_set(client.get("/jwks").json),
                      algorithms=["RS256"]).header["alg"] == "RS256"
    base = {"issuer": HUB_ISSUER, "encryption_key": Fernet.generate_key().decode(),
            "pairwise_secret": "p" * 40}
    # refused when the hub starts: what the settings schema cannot check alone
    with pytest.raises(ConfigError, match=r"agencies\[0\]\.jwks: key 'k' contains private"):
        make_hub(agencies=[{"client_id": "cfg", "name": "Cfg",
                            "redirect_uris": ["https://c.example/cb"],
                            "token_endpoint_auth_method": "private_key_jwt",
                            "jwks": {"keys": [{**EC_KEY.as_dict(private=True), "kid": "k"}]}}])
    for agency, why in (
        ({"token_endpoint_auth_method": "private_key_jwt"}, "jwks"),
        ({"token_endpoint_auth_method": "private_key_jwt", "jwks": public_set(RSA_KEY),
          "client_secret": "s" * 40}, "client_secret"),
        ({"client_secret": "s" * 40, "subject_type": "public"}, "allow_public_subjects"),
    ):
        with pytest.raises((ConfigError, ValueError), match=why):
            settings_from_mapping({**base, "agencies": [{
                "client_id": "cfg", "name": "Cfg", "redirect_uris": ["https://c.example/cb"],
                **agency}]})


def test_jwks_fetch_pins_the_checked_address_and_verifies_tls(tmp_path):
    """The connection goes to the address that was checked, and TLS is verified for the
    host name in the jwks_uri (SNI and certificate), not for that address."""
    import ssl

    ca = servers.write_test_ca(tmp_path)
    cert, key = servers.write_server_cert(tmp_path, ca, names=("keys.agency.test",))
    server = JWKSServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    server.serve("/jwks", public_set(EC_KEY))
    port = server.httpd.server_address[1]
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        looked_up: list[str] = []

        def lookup(host: str, port: int, timeout: float) -> list[str]:
            looked_up.append(host)
            return ["127.0.0.1"]

        keys = AgencyKeys(allow_insecure=True, verify=str(ca), lookup=lookup)
        fetched = keys.fetch(f"https://keys.agency.test:{port}/jwks")
        assert fetched == public_set(EC_KEY) and looked_up == ["keys.agency.test"]
        with pytest.raises(JWKSUnavailable, match="could not be fetched"):
            keys.fetch(f"https://other.agency.test:{port}/jwks")  # certificate mismatch
        with pytest.raises(JWKSUnavailable, match="could not be fetched"):
            AgencyKeys(allow_insecure=True, lookup=lookup).fetch(  # an untrusted CA
                f"https://keys.agency.test:{port}/jwks")
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
