"""Issue 7 audit: what production mode claims, checked against a real two-worker hub on
PostgreSQL and Redis (metrics that move with their events) and through the test client
(rate limits, request ids)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import yaml
from cryptography.fernet import Fernet

from tests import servers
from tests.conftest import HUB_ISSUER, HUB_PORT, fresh_pg_database, hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest
from tests.test_consent_flow import CONSENT, Receiver
from tests.test_production import login_over_http


def samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition: ``name{labels}`` -> value."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


@pytest.fixture(scope="module")
def audit_hub(tmp_path_factory, upstream_issuer, postgres_url, redis_url):
    """`civitas serve --workers 2` on PostgreSQL and Redis; agency one asks for consent and
    has both a back-channel logout and a security event endpoint."""
    receiver = Receiver()
    tmp = tmp_path_factory.mktemp("audit")
    # a database of its own: signing keys encrypted under this hub's key must not be left
    # in the server's shared database for other suites' hubs, which have keys of their own
    database = contextlib.ExitStack()
    database_url = database.enter_context(fresh_pg_database(postgres_url))
    cfg = hub_config(upstream_issuer, database_url, redis_url=redis_url,
                     encryption_key=Fernet.generate_key().decode(), agencies=[
                         AGENCY_ONE.config(consent=CONSENT,
                                           backchannel_logout_uri=receiver.base + "/bc",
                                           event_delivery_uri=receiver.base + "/events"),
                         AGENCY_TWO.config()])
    try:
        with database, servers.run_hub(tmp, cfg, HUB_PORT, workers=2) as log:
            yield HUB_ISSUER, receiver, log
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def basic(agency: Any) -> tuple[str, str]:
    return agency.client_id, agency.secret


def test_every_metric_family_moves_with_its_event_across_two_workers(audit_hub):
    """A login, a code exchange, client_credentials, a permit and a deny, and a withdrawal
    that pushes a logout token and a security event: each moves its own series in the
    /metrics that any worker answers (aggregated over both)."""
    base, receiver, _ = audit_hub
    before = samples(requests.get(f"{base}/metrics", timeout=5).text)

    auth = AuthRequest()
    browser, params = login_over_http(base, auth)
    r = requests.post(f"{base}/token", auth=basic(AGENCY_ONE), timeout=10, data={
        "grant_type": "authorization_code", "code": params["code"],
        "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": auth.verifier})
    assert r.status_code == 200, r.text
    sub = requests.get(f"{base}/userinfo", timeout=5, headers={
        "Authorization": f"Bearer {r.json()['access_token']}"}).json()["sub"]
    r = requests.post(f"{base}/token", auth=basic(AGENCY_ONE), timeout=10, data={
        "grant_type": "client_credentials", "scope": "consent.decisions"})
    assert r.status_code == 200, r.text
    for claim, purpose, expected in (("email", "benefits", True),
                                     ("email", "newsletter", False)):
        r = requests.post(f"{base}/access/v1/evaluation", auth=basic(AGENCY_ONE), timeout=5,
                          json={"subject": {"type": "user", "id": sub},
                                "action": {"name": "use"},
                                "resource": {"type": "claim", "id": claim},
                                "context": {"purpose": purpose}})
        assert r.status_code == 200 and r.json()["decision"] is expected, r.text
    page = browser.get(f"{base}/account/consents", timeout=5).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = browser.post(f"{base}/account/consents/withdraw", allow_redirects=False, timeout=10,
                     data={"csrf": csrf, "client_id": AGENCY_ONE.client_id})
    assert r.status_code in (302, 303), r.text
    deadline = time.monotonic() + 20
    while {"/bc", "/events"} - set(receiver.received) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {"/bc", "/events"} <= set(receiver.received), receiver.received

    wanted = [
        'civitas_logins_total{outcome="ok",upstream="op"}',
        'civitas_tokens_issued_total{grant_type="authorization_code"}',
        'civitas_tokens_issued_total{grant_type="client_credentials"}',
        'civitas_consent_decisions_total{decision="permit"}',
        'civitas_consent_decisions_total{decision="deny"}',
        'civitas_http_requests_total{endpoint="/token",method="POST",status="200"}',
        'civitas_http_requests_total{endpoint="/access/v1/evaluation",method="POST",'
        'status="200"}',
        'civitas_http_request_seconds_count{endpoint="/authorize"}',
        'civitas_http_request_seconds_count{endpoint="/access/v1/evaluation"}',
    ]
    delivered = ['civitas_event_deliveries_total{kind="backchannel_logout",outcome="delivered"}',
                 'civitas_event_deliveries_total{kind="security_event",outcome="delivered"}']
    after: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the delivery is recorded just after its POST
        after = samples(requests.get(f"{base}/metrics", timeout=5).text)
        if all(after.get(name, 0) > before.get(name, 0) for name in delivered):
            break
        time.sleep(0.2)
    unmoved = [name for name in wanted + delivered
               if after.get(name, 0) <= before.get(name, 0)]
    assert not unmoved, unmoved


def test_the_bench_scripts_call_only_what_tests_servers_has():
    """bench/run.py starts and stops its servers through tests.servers: a helper renamed
    there (``_stop`` became ``stop_process``) broke the whole benchmark at its first
    scenario, with nothing in the suite running it."""
    import ast
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    missing = []
    for script in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "servers" and not hasattr(servers, node.attr)):
                missing.append(f"{script.name}:{node.lineno}: servers.{node.attr}")
    assert not missing, missing


EVALUATION = {"subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}


@pytest.mark.parametrize("credentials", [
    {"Authorization": "Basic " + base64.b64encode(b"agency-one:wrong-secret").decode()},
    {"Authorization": "Bearer not-a-token"},
    {},
], ids=["wrong secret", "bad bearer", "none"])
def test_decision_api_limit_per_address_counts_requests_that_fail_authentication(
        make_hub, credentials):
    """The limit per client address stops one source, as the token endpoint's does (counted
    before authentication there): requests that fail to authenticate count too, or one
    address could send the decision API (and its credential checks) any number of them."""
    from tests.test_rate_limits import assert_limited_json, from_address, limited_hub

    app = limited_hub(make_hub, decision_per_address=3)
    client = from_address(app, "203.0.113.40")
    for _ in range(3):
        r = client.post("/access/v1/evaluation", json=EVALUATION, headers=credentials)
        assert r.status_code == 401, r.get_data(as_text=True)
    r = client.post("/access/v1/evaluation", json=EVALUATION, headers=credentials)
    assert_limited_json(r)
    assert "this address" in r.json["error_description"]
    # the agency itself, from another address, is not held up
    other = from_address(app, "203.0.113.41")
    r = other.post("/access/v1/evaluation", json=EVALUATION, headers={
        "Authorization": "Basic " + base64.b64encode(
            f"{AGENCY_ONE.client_id}:{AGENCY_ONE.secret}".encode()).decode()})
    assert r.status_code == 200, r.get_data(as_text=True)


def logged_lines(log: Any, request_id: str, seconds: float = 5) -> list[dict[str, Any]]:
    """The hub's JSON log lines that carry ``request_id`` (waiting for them a little)."""
    import json

    deadline = time.monotonic() + seconds
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines()
                 if line.startswith("{")]
        found = [line for line in lines if request_id in line.values()]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_the_request_id_of_an_error_page_is_on_the_json_log_line(audit_hub):
    base, _, log = audit_hub
    r = requests.get(f"{base}/login/op/start?flow=nope", timeout=5)
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("text/html")
    request_id = r.headers["X-Request-Id"]
    assert request_id in r.text
    assert logged_lines(log, request_id)


def test_a_decision_api_error_can_be_found_in_the_log_by_the_agencys_request_id(audit_hub):
    """AuthZEN: the PDP echoes the PEP's X-Request-ID, which then replaces the hub's own id in
    the response; the agency quoting it to support must still lead to the log line."""
    base, _, log = audit_hub
    given = "pep-" + os.urandom(6).hex()
    r = requests.post(f"{base}/access/v1/evaluation", json=EVALUATION, timeout=5,
                      headers={"X-Request-ID": given})
    assert r.status_code == 401 and r.headers["X-Request-ID"] == given
    found = logged_lines(log, given)
    assert found and all(line.get("request_id") for line in found), found


class AnswersNothingUseful(BaseHTTPRequestHandler):
    """200 to everything: ``{"active":false}`` to a POST, a page to a GET."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.answer(b'{"active":false}', "application/json")

    def do_GET(self) -> None:  # noqa: N802
        self.answer(b"<html>sign in</html>", "text/html")

    def answer(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def bench_env() -> dict[str, str]:
    """The environment bench/run.py gives scenario 4b's wrk run (its own additions)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_run", Path(__file__).resolve().parent.parent / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    return dict(bench_run.INTROSPECTION_ENV)


@pytest.mark.skipif(not __import__("shutil").which("wrk"), reason="wrk is not installed")
@pytest.mark.parametrize("scenario", ["4b introspection", "3 sso"])
def test_the_bench_counts_only_real_successes(scenario):
    """A 2xx is not always a success: an introspection of a token that is not active is a 200
    too (RFC 7662 2.2), and in scenario 3 a login is counted only when its token request
    gives tokens, not when the authorization endpoint answers 200 with a page."""
    import json
    from pathlib import Path

    if scenario.startswith("4b"):
        env = {**bench_env(), "BENCH_MODE": "static", "BENCH_METHOD": "POST",
               "BENCH_PATH": "/introspect", "BENCH_BODY": "token=t",
               "BENCH_CTYPE": "application/x-www-form-urlencoded"}
    else:
        env = {"BENCH_MODE": "sso", "BENCH_COOKIE": "civitas_session=x",
               "BENCH_AUTHZ": "/authorize?state=s{N}", "BENCH_TOKEN": "/token",
               "BENCH_TOKEN_AUTH": "Basic eDp5", "BENCH_TOKEN_BODY": "code={CODE}"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), AnswersNothingUseful)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(
            ["wrk", "-t", "1", "-c", "1", "-d", "1s", "-s",
             str(Path(__file__).resolve().parent.parent / "bench" / "wrk.lua"),
             f"http://127.0.0.1:{server.server_address[1]}"],
            env=dict(os.environ, **env), capture_output=True, text=True, timeout=30).stdout
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads(next(x for x in out.splitlines() if x.startswith("BENCH "))[6:])
    assert result["requests"] > 0 and result["good"] == 0, result


def test_forwarded_headers_are_believed_only_from_the_proxies_addresses(make_hub):
    """trusted_proxy_hops says how many proxies to believe, not which: anything else that
    reaches the hub's port (a scraper, a neighbour container, a local process) could name
    any client address. With trusted_proxy_addresses, only those peers' X-Forwarded-* count."""
    from tests.flows import within_one_window
    from tests.test_rate_limits import REFRESH, assert_limited_json, from_address
    from tests.test_rate_limits import basic as basic_header

    app = make_hub(trusted_proxy_hops=1, trusted_proxy_addresses=["192.0.2.0/28"],
                   rate_limits={"token_per_address": 1, "token_per_agency": 0})
    within_one_window()
    proxy = from_address(app, "192.0.2.5")
    for address in ("198.51.100.1", "198.51.100.2"):  # two clients behind the proxy
        r = proxy.post("/token", data=REFRESH, headers={**basic_header(AGENCY_ONE),
                                                        "X-Forwarded-For": address})
        assert r.status_code == 400, r.get_data(as_text=True)
    direct = from_address(app, "203.0.113.9")
    r = direct.post("/token", data=REFRESH, headers={**basic_header(AGENCY_ONE),
                                                     "X-Forwarded-For": "198.51.100.3"})
    assert r.status_code == 400, r.get_data(as_text=True)
    # a second forged address from the same peer: counted as the peer, so refused
    r = direct.post("/token", data=REFRESH, headers={**basic_header(AGENCY_ONE),
                                                     "X-Forwarded-For": "198.51.100.4"})
    assert_limited_json(r)


def test_trusted_proxy_addresses_need_hops(upstream_issuer, tmp_path):
    from config import settings_from_mapping
    from kernel.errors import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxy_addresses"):
        settings_from_mapping(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db",
                                         trusted_proxy_addresses=["192.0.2.1"]))
    with pytest.raises(ConfigError, match="trusted_proxy_addresses"):
        settings_from_mapping(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db",
                                         trusted_proxy_hops=1,
                                         trusted_proxy_addresses=["not-an-address"]))


def test_limits_are_shared_by_two_workers(tmp_path, upstream_issuer, pg_database_url,
                                          redis_url):
    """Each limit (per address on the token, decision and login endpoints, per agency on the
    token and decision endpoints) is counted in Redis: two workers together let through the
    limit, not twice it. Every request on a new connection, so both workers take some."""
    from tests.flows import within_one_window

    cfg = hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                     encryption_key=Fernet.generate_key().decode())
    cases = {
        "token_per_address": ("POST", "/token", AGENCY_ONE),
        "token_per_agency": ("POST", "/token", AGENCY_TWO),
        "decision_per_address": ("POST", "/access/v1/evaluation", AGENCY_ONE),
        "decision_per_agency": ("POST", "/access/v1/evaluation", AGENCY_TWO),
        "login_per_address": ("GET", "/login", None),
    }
    for number, (limit, (method, path, agency)) in enumerate(cases.items()):
        cfg["rate_limits"] = {**{k: 0 for k in cases}, limit: 4}
        # a Redis database of its own: other hubs of this session counted from 127.0.0.1
        cfg["redis_url"] = redis_url.rsplit("/", 1)[0] + f"/{8 + number}"
        config_file = tmp_path / f"{limit}.yaml"
        config_file.write_text(yaml.safe_dump(cfg))
        with servers.hub_process(config_file, tmp_path / f"{limit}.log") as hub:
            within_one_window(needed=15)
            statuses = []
            for _ in range(8):
                kwargs: dict[str, Any] = {"timeout": 5, "allow_redirects": False,
                                          "headers": {"Connection": "close"}}
                if agency is not None:
                    kwargs["auth"] = basic(agency)
                if path == "/token":
                    kwargs["data"] = {"grant_type": "client_credentials",
                                      "scope": "consent.decisions"}
                elif method == "POST":
                    kwargs["json"] = EVALUATION
                r = requests.request(method, hub.base + path, **kwargs)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert 1 <= int(r.headers["Retry-After"]) <= 60, limit
            assert statuses[4:] == [429] * 4 and 429 not in statuses[:4], (limit, statuses)


def test_no_series_is_named_by_what_a_client_sends(client):
    """Label values come from the hub's own settings and route templates: made-up upstreams,
    agencies, paths and ids in requests add no series to /metrics."""
    made_up = "zz" + os.urandom(4).hex()
    client.get(f"/login/{made_up}/start?flow=x")
    client.get(f"/login/{made_up}/callback?code=x&state=y")
    client.post(f"/login/{made_up}/password", data={"username": "a", "password": "b"})
    client.get(f"/authorize?client_id={made_up}&response_type=code")
    client.post("/token", data={"grant_type": made_up, "client_id": made_up})
    client.get(f"/access/v1/receipts/{made_up}")
    client.get(f"/{made_up}/{made_up}")
    text = client.get("/metrics").get_data(as_text=True)
    assert made_up not in text
    assert 'endpoint="/login/<upstream_id>/start"' in text
