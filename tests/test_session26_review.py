"""Defects found reviewing the changes of 25 November (071f54d..de42b00). Each test failed
before its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from tests.conftest import hub_config
from tests.flows import AuthRequest, full_login, redeem

# -- /login?next=: the regex of the pages a sign-in may lead back to -------------------------


def test_login_next_regex_cannot_be_made_to_backtrack_for_ever():
    """``RETURN_PAGES`` matched ``officer/(?:[\\w-]+/?)*``: a run of word characters can be
    split into ``[\\w-]+`` pieces in 2^n ways, and a value that then fails to match (one
    character the regex refuses at the end) makes ``re`` try them all. An unauthenticated
    ``GET /login?next=/officer/aaaa...a!`` (60 characters) held a worker thread, with the
    GIL, for longer than the universe has existed: a denial of service by one request.
    The match runs in a child process that is killed if it does not end (the fixed regex
    answers in microseconds)."""
    code = ("from broker.views import return_page\n"
            "assert return_page('/officer/' + 'a' * 60 + '!') is None\n"
            "assert return_page('/officer/' + 'a-' * 40 + '\\\\') is None\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=30, check=False,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail("return_page() never answered: catastrophic backtracking in RETURN_PAGES")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", [
    "/account", "/account/consents", "/account/consents/receipts/abc-123",
    "/officer/", "/officer/art30", "/officer/agencies/x/", "/officer/?q=a&page=2",
    "/account/consents?page=3",
])
def test_login_next_still_leads_back_to_the_hub_s_own_pages(path):
    from broker.views import return_page

    assert return_page(path) == path


@pytest.mark.parametrize("path", [
    "//evil.example", "/\\evil.example", "/account/../logout", "/officer//evil.example",
    "/account%2F%2Fevil", "https://evil.example/account", "/account\r\nSet-Cookie: x=1",
    "/officer/\u0430", "/account?next=\n", "/officer", "/accounts/../x",
])
def test_login_next_refuses_other_places(path):
    from broker.views import return_page

    assert return_page(path) is None


# -- the code restored after a database outage ------------------------------------------------


def test_a_code_replayed_while_its_redemption_failed_is_not_put_back(app, client):
    """A redemption takes the code, then the database fails (503, "try again"), and the
    code is put back (TokenStore.restore_code). A second redemption of the same code that
    came meanwhile (RFC 6749 4.1.2 / 10.5: a replay, an attacker holding a leaked code)
    found it taken and marked the code revoked. The code was put back all the same, and
    the next redemption was answered with tokens (a valid ID token, which cannot be
    revoked): after a replay was detected, the code was no longer single use."""
    hub = app.extensions["civitas"]
    services = hub.server.hub
    auth = AuthRequest()
    code = full_login(client, auth)["code"]
    real = services.citizen_claims
    calls = {"n": 0}
    replay: dict[str, object] = {}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            # while this redemption holds the code: the replay, by another client of the hub
            replay["response"] = redeem(app.test_client(), auth, code)
            raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError(
                "connection refused"))
        return real(*args, **kwargs)

    services.citizen_claims = failing
    try:
        first = redeem(client, auth, code)
    finally:
        del services.citizen_claims
    assert first.status_code == 503, first.get_data(as_text=True)
    assert replay["response"].status_code == 400  # type: ignore[attr-defined]
    assert replay["response"].json["error"] == "invalid_grant"  # type: ignore[attr-defined]
    retry = redeem(client, auth, code)
    assert retry.status_code == 400, retry.get_data(as_text=True)
    assert retry.json["error"] == "invalid_grant"


def test_a_code_cut_off_by_an_outage_is_still_put_back(app, client):
    """(The fix keeps what the change was for: without a replay, the retry succeeds.)"""
    services = app.extensions["civitas"].server.hub
    auth = AuthRequest()
    code = full_login(client, auth)["code"]
    real = services.citizen_claims
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
        return real(*args, **kwargs)

    services.citizen_claims = failing
    try:
        assert redeem(client, auth, code).status_code == 503
    finally:
        del services.citizen_claims
    r = redeem(client, auth, code)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert redeem(client, auth, code).json["error"] == "invalid_grant"


# -- civitas serve --workers: the metrics directory it made -----------------------------------


def _metrics_dir_of(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for item in environ:
        if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return item.split(b"=", 1)[1].decode()
    return None


def test_a_worker_that_exits_does_not_remove_the_metrics_directory(
        tmp_path, upstream_issuer, pg_database_url, redis_url):
    """``civitas serve --workers`` removes the metrics directory it made when gunicorn
    returns (a ``finally`` around ``run_gunicorn``). But a gunicorn worker is a fork of
    that same call: it leaves with ``sys.exit``, whose SystemExit unwinds through
    ``run_gunicorn`` in the worker too, and that ``finally`` removed the directory the
    master and the other workers still use, at every worker exit (a graceful restart,
    max-requests, the worker that waits out a storage outage and exits 1). Every worker
    started afterwards fails to create its metric files there, and /metrics loses them."""
    import requests
    import yaml

    from tests import servers

    config = tmp_path / "civitas.yaml"
    config.write_text(yaml.safe_dump(hub_config(upstream_issuer, pg_database_url,
                                                redis_url=redis_url)))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with servers.hub_process(config, tmp_path / "hub.log", args=("--plain-logs",),
                             env={"TMPDIR": str(scratch)}) as hub:
        metrics_dir = _metrics_dir_of(hub.proc.pid)
        assert metrics_dir and metrics_dir.startswith(str(scratch)), metrics_dir
        assert Path(metrics_dir).is_dir()
        victim = min(hub.workers())
        os.kill(victim, signal.SIGTERM)  # a graceful worker exit (as at max-requests)
        hub.until(lambda: hub.ready() and len(hub.workers()) == 2
                  and victim not in hub.workers(), "a replacement worker")
        assert Path(metrics_dir).is_dir(), "a worker's exit removed the metrics directory"
        for _ in range(6):  # both workers answer, counting their metrics there
            assert requests.get(f"{hub.base}/.well-known/openid-configuration",
                                timeout=5).status_code == 200
    # the directory the command made is gone with it
    assert not any(scratch.glob("civitas-metrics-*")), list(scratch.iterdir())


def test_an_ambiguous_commit_of_the_refresh_grant_does_not_make_a_second_grant(make_hub):
    """The failure may come after the database did the work: the refresh grant's INSERT
    committed and the reply was lost (a connection cut at COMMIT raises OperationalError as
    a refused one does). The code is put back all the same ("no token was made from it"),
    and the retry makes a second refresh grant from the one code: two live grants, one of
    them with a token nobody was given (it shows on the citizen's page as the agency's
    offline access and lives its whole lifetime unless consent is withdrawn). Now the code
    put back names the grant of the failed attempt, and the redemption that succeeds
    revokes it."""
    from tests.flows import AGENCY_ONE, allow_consent, query

    app = make_hub(agencies=[AGENCY_ONE.config(
        scopes=["openid", "profile", "email", "offline_access"])])
    client = app.test_client()
    hub = app.extensions["civitas"]
    services = hub.server.hub
    auth = AuthRequest(scope="openid email offline_access")
    r = allow_consent(client, client.get(auth.url()))
    params = full_login(client, auth) if r.status_code == 303 else query(r.headers["Location"])
    code = params["code"]
    real = services.refresh_tokens.issue
    calls = {"n": 0}

    def committed_then_lost(*args, **kwargs):
        token = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise sa_exc.OperationalError("COMMIT", {}, ConnectionResetError(
                "server closed the connection unexpectedly"))
        return token

    services.refresh_tokens.issue = committed_then_lost
    try:
        assert redeem(client, auth, code).status_code == 503
        retry = redeem(client, auth, code)
    finally:
        del services.refresh_tokens.issue
    assert retry.status_code == 200, retry.get_data(as_text=True)
    from sqlalchemy import text

    with hub.db.engine.connect() as conn:
        live = conn.execute(text("SELECT count(*) FROM refresh_grants WHERE revoked_at IS NULL"
                                 )).scalar_one()
    assert live == 1, f"{live} live refresh grants from one authorization code"


# -- limits per client address: an address as a proxy may write it ---------------------------


@pytest.mark.parametrize(("one", "other"), [
    ("198.51.100.7:40001", "198.51.100.7:40002"),
    ("[2001:db8::1]:40001", "[2001:db8::2]:40002"),
    ("[2001:db8::1]:40001", "2001:db8::3"),
    ("198.51.100.7:40001", "198.51.100.7"),
])
def test_a_client_address_with_its_port_is_one_bucket(one, other):
    """``address_bucket`` returned any value with a colon that is no IPv6 address as it
    was. Some load balancers write the client's source port into X-Forwarded-For
    (``198.51.100.7:40001``, ``[2001:db8::1]:40001``): behind one (trusted_proxy_hops), every
    connection from a new source port was a fresh bucket, and the login and token limits per
    address limited nothing; a bracketed IPv6 address escaped its /64 too."""
    from kernel.ratelimit import address_bucket

    assert address_bucket(one) == address_bucket(other)


def test_different_clients_keep_different_buckets():
    from kernel.ratelimit import address_bucket

    assert address_bucket("198.51.100.7:1") != address_bucket("198.51.100.8:1")
    assert address_bucket("[2001:db8:0:1::1]:1") != address_bucket("[2001:db8:0:2::1]:1")
    assert address_bucket("1:2:3:4:5:6:7:8") == "1:2:3:4::/64"
