"""Defects found by provoking, on a real PostgreSQL and Redis, the faults a deployment sees:
Redis out of memory (``maxmemory`` with ``noeviction``) or losing its data (a restart without
persistence, FLUSHALL), PostgreSQL dropping a connection between two writes that belong
together, a full file system under the workers' metrics, an upstream that stops answering,
a clock put back. Each test failed before its fix."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from sqlalchemy import select

from civitas.app import create_app, stop_background
from idp.models import RefreshGrantRecord
from tests import servers
from tests.conftest import hub_config, in_forked_child
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, query, redeem
from tests.test_consent_flow import CONSENT, Receiver, answer, basic, to_consent_page


@pytest.fixture
def redis_url(tmp_path: Any) -> Iterator[str]:
    """A Redis of the test's own (its memory limit and data are the test's to change)."""
    with servers.run_redis(tmp_path) as url:
        yield url


@contextlib.contextmanager
def redis_out_of_memory(url: str) -> Iterator[None]:
    """Redis at its ``maxmemory`` with the ``noeviction`` policy, as a Redis sized too small
    is: reads are answered, every write is refused (``OOM command not allowed``)."""
    client = redis.Redis.from_url(url)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", max(1, int(client.info("memory")["used_memory"]) // 2))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("civitas-probe", "x")
        yield
    finally:
        client.config_set("maxmemory", 0)
        client.close()


@pytest.fixture
def consent_hub(upstream_issuer: str, pg_database_url: str, redis_url: str
                ) -> Iterator[tuple[Any, Receiver]]:
    """A hub on PostgreSQL and the test's Redis; agency one asks for consent, may have
    refresh tokens, and has a back-channel logout endpoint (a real one, recording)."""
    receiver = Receiver()
    app = create_app(hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                                backchannel_dispatcher=False, agencies=[
        AGENCY_ONE.config(consent=CONSENT, backchannel_logout_uri=receiver.url,
                          scopes=["openid", "profile", "email", "offline_access"]),
        AGENCY_TWO.config()]))
    yield app, receiver
    stop_background(app)
    app.extensions["civitas"].db.dispose()
    receiver.server.shutdown()
    receiver.server.server_close()


def test_redis_out_of_memory_is_a_503_not_a_500(consent_hub, redis_url):
    """Redis refusing writes for want of memory answered 500 "something went wrong" (and a
    traceback in the log) on every page and endpoint that writes to it: it is the same
    "try again" as a Redis that cannot be reached."""
    app, _ = consent_hub
    client = app.test_client()
    with redis_out_of_memory(redis_url):
        r = client.get(AuthRequest().url())  # the login flow is written to Redis
        assert r.status_code == 503 and r.mimetype == "text/html", r.status_code
        assert r.headers["Retry-After"] == "5"
        assert "briefly unavailable" in r.get_data(as_text=True)
        r = client.post("/token", headers=basic(AGENCY_ONE),  # a rate-limit counter
                        data={"grant_type": "client_credentials"})
        assert r.status_code == 503 and r.json["error"] == "temporarily_unavailable"
    # Redis has room again: the hub serves on by itself
    assert client.get(AuthRequest().url()).status_code == 303


def test_a_withdrawal_cut_off_after_its_commit_still_ends_the_agencys_refresh_grant(
        consent_hub, redis_url):
    """The withdrawal committed, then its consequences ran apart from it: the access-token
    mark in Redis first, the refresh grants and the logout token after. Redis refusing that
    mark (here: out of memory; a Redis restarting at that moment does the same) left the
    consent withdrawn, but the agency's refresh grant live (it went on refreshing tokens)
    and the agency never told; the citizen, trying again, was told there was nothing left
    to withdraw. The grant's end and the agency's notice now commit with the withdrawal."""
    app, receiver = consent_hub
    hub = app.extensions["civitas"]
    client = app.test_client()
    auth = AuthRequest(scope="openid profile email offline_access")
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow", claims=["name", "offline_access"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    assert "refresh_token" in body
    page = client.get("/account/consents").get_data(as_text=True)
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    with redis_out_of_memory(redis_url):
        r = client.post("/account/consents/withdraw",
                        data={"csrf": found.group(1), "client_id": AGENCY_ONE.client_id})
    assert r.status_code in (303, 503), r.status_code

    r = client.post("/token", headers=basic(AGENCY_ONE), data={
        "grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert r.status_code == 400 and r.json["error"] == "invalid_grant", r.json
    with hub.db.session() as s:
        assert s.scalars(select(RefreshGrantRecord.revoked_reason)).all() == [
            "consent_withdrawn"]
    assert hub.dispatcher.deliver_due().delivered == 1
    assert len(receiver.tokens) == 1


def test_revoked_access_tokens_stay_revoked_when_redis_loses_its_data(consent_hub, redis_url):
    """Revocations of access tokens are marks in Redis. A Redis restarted without persistence
    (or flushed, or whose keys were evicted) forgot them, and a token revoked before (by the
    agency, RFC 7009; by a logout; by a withdrawal or a replayed code) opened userinfo again
    until it expired. The store now says since when it holds the marks: a token issued
    before is refused. Tokens issued after it, and refresh grants (in PostgreSQL), work."""
    app, _ = consent_hub
    client = app.test_client()
    auth = AuthRequest(agency=AGENCY_TWO)
    body = redeem(client, auth, full_login(client, auth)["code"]).json
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert client.get("/userinfo", headers=bearer).status_code == 200
    assert client.post("/revoke", headers=basic(AGENCY_TWO),
                       data={"token": body["access_token"]}).status_code == 200
    assert client.get("/userinfo", headers=bearer).status_code == 401

    redis.Redis.from_url(redis_url).flushall()  # what a restart without persistence leaves
    assert client.get("/userinfo", headers=bearer).status_code == 401
    assert client.post("/introspect", headers=basic(AGENCY_TWO),
                       data={"token": body["access_token"]}).json == {"active": False}
    # the hub serves on: a new login gets tokens that work, on every worker's reading
    time.sleep(1.1)  # (a token's iat is in whole seconds)
    client = app.test_client()  # the browser's session went with Redis's data
    auth = AuthRequest(agency=AGENCY_TWO)
    body = redeem(client, auth, full_login(client, auth)["code"]).json
    time.sleep(1.1)
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200 and r.json["email"] == "alice@example.org"


@contextlib.contextmanager
def small_file_system(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``directory`` (as the container's /tmp is a tmpfs):
    skips the test where this process may not mount one."""
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(directory)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_full_metrics_file_system_does_not_kill_the_workers(tmp_path, upstream_issuer,
                                                             pg_database_url, redis_url):
    """Each worker keeps its metrics in memory-mapped files under PROMETHEUS_MULTIPROC_DIR
    (``/tmp``, a tmpfs in compose.yaml). prometheus-client only sizes those files: with
    that file system full, a worker's first write to a page it had not written yet killed
    it (SIGBUS), and every worker started in its place, so the hub answered no request at
    all (connections closed) until room was made. The pages are now allocated before they
    are written: without room the worker keeps the values in memory and serves on."""
    config = tmp_path / "civitas.yaml"
    config.write_text(yaml.safe_dump(hub_config(upstream_issuer, pg_database_url,
                                                redis_url=redis_url)))
    with small_file_system(tmp_path / "metrics", "2m") as metrics, servers.hub_process(
            config, tmp_path / "hub.log", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)}) as hub:
        workers = hub.workers()
        # whatever else fills /tmp
        with contextlib.suppress(OSError), (metrics / "filler").open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 65536)
        answers = []
        for n in range(40):  # new series (endpoints, statuses) in new pages of the files
            with contextlib.suppress(requests.RequestException):
                answers.append(requests.get(f"{hub.base}/no-such-page-{n}", timeout=10)
                               .status_code)
            with contextlib.suppress(requests.RequestException):
                answers.append(requests.post(f"{hub.base}/token", timeout=10,
                                             data={"grant_type": "nonsense"}).status_code)
        assert answers == [404, 400] * 40, f"connections closed without an answer: {answers}"
        assert hub.workers() == workers, "workers died"
        (metrics / "filler").unlink()
        assert requests.get(f"{hub.base}/metrics", timeout=10).status_code == 200


def test_a_metrics_file_that_must_grow_on_a_full_file_system_keeps_its_values(tmp_path):
    """The same, for a worker's file that outgrows its first 64 KiB (many series): the
    library doubles it, sparse again; it is now allocated first, or kept in memory."""
    from kernel.metric_files import AllocatedMmapedDict

    with small_file_system(tmp_path / "metrics", "1m") as metrics:
        values = AllocatedMmapedDict(str(metrics / "counter_1.db"))
        with contextlib.suppress(OSError), (metrics / "filler").open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)

        def grows() -> bool:
            for n in range(2000):  # about 200 KiB of keys
                values.write_value(f"civitas_http_requests_total-{n:05}", float(n), 0.0)
            return values.read_value("civitas_http_requests_total-01999") == (1999.0, 0.0)

        assert in_forked_child(grows), "the process died"
        values.close()


def test_a_clock_put_back_does_not_refuse_every_access_token(consent_hub, redis_url):
    """Since when the store holds the revocation marks is a time of the clock that wrote it:
    one that was ahead (by an hour, here), then put back by NTP, must not make every token
    issued meanwhile look older than it."""
    app, _ = consent_hub
    client = app.test_client()
    redis.Redis.from_url(redis_url).set("civitas:revocation-marks-since",
                                        json.dumps({"at": int(time.time()) + 3600}))
    auth = AuthRequest(agency=AGENCY_TWO)
    body = redeem(client, auth, full_login(client, auth)["code"]).json
    r = client.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert r.status_code == 200


def test_an_upstream_that_stops_answering_is_given_up_after_its_timeout_not_twice_that():
    """An idempotent GET to an upstream is retried once, for a pooled connection the
    upstream had closed meanwhile; a read timeout was retried too, so an upstream that had
    stopped answering held the citizen's request, and a worker thread, for twice its
    ``timeout_seconds`` (per GET: discovery, keys, userinfo), when the login's calls all
    together must stay under gunicorn's 30 s watchdog."""
    from connectors.base import UpstreamUnavailable
    from connectors.oidc import OIDCConfig, OIDCConnector

    with servers.run_silent_server() as (port, _):
        connector = OIDCConnector(OIDCConfig(
            id="silent", display_name="Silent", issuer=f"http://127.0.0.1:{port}",
            client_id="hub", client_secret="s" * 32, timeout_seconds=2.0))
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            connector.metadata()
        # one timeout (2 s), not two (4 s): a bound with room for a loaded machine
        assert time.monotonic() - started < 3.5


def test_a_logout_cut_off_before_its_notices_are_queued_tells_the_agencies_when_retried(
        upstream_issuer, pg_database_url, redis_url):
    """A hub logout takes the session's agencies from Redis (read and deleted at once: a
    logout happens once), then queues a logout token for each in PostgreSQL. The database
    failing at that moment (here its backend terminated at the INSERT) answered "try
    again", but the agencies were gone from Redis: the citizen's second try ended the
    session and told no agency, whose sessions at the agency sites stayed signed in
    (Back-Channel Logout 1.0). They are now put back when the queueing fails."""
    from tests.test_logout import AgencyEndpoints, agency_configs, sso_both
    from tests.test_storage_outage import StatementCut

    endpoints = AgencyEndpoints()
    app = create_app(hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                                agencies=agency_configs(endpoints),
                                backchannel_dispatcher=False, backchannel_timeout_seconds=1))
    hub = app.extensions["civitas"]
    try:
        client = app.test_client()
        sso_both(client)
        page = client.get("/account").get_data(as_text=True)
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found
        with StatementCut(hub.db.engine, pg_database_url, "INSERT INTO logout_deliveries") \
                as cut:
            r = client.post("/logout", data={"csrf": found.group(1)})
        assert cut.fired and r.status_code == 503, r.status_code
        page = client.get("/account").get_data(as_text=True)
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, "the session ended without its agencies being told"
        assert client.post("/logout", data={"csrf": found.group(1)}).status_code == 303
        assert hub.dispatcher.deliver_due().delivered == 2
        assert sorted(r["name"] for r in endpoints.received) == [AGENCY_ONE.client_id,
                                                                 AGENCY_TWO.client_id]
    finally:
        stop_background(app)
        hub.db.dispose()
        endpoints.close()


def test_a_refresh_cut_off_between_use_and_rotation_can_be_retried(upstream_issuer,
                                                                  pg_database_url, redis_url):
    """A refresh takes the grant's live token (one statement), then writes its successor
    (another). PostgreSQL lost between the two (here the backend ends itself as the
    successor is written, as in a restart) answered "try again" (503): but the grant had
    no live token any more, so the agency's retry, with the token it holds, was taken for
    a replay (RFC 9700 4.14.2), revoked the grant and raised the reuse alarm. The token is
    now put back, as a code is (RFC 6749 4.1.2: nothing was issued from it)."""
    from sqlalchemy import create_engine, text

    app = create_app(hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                                backchannel_dispatcher=False, agencies=[
        AGENCY_ONE.config(scopes=["openid", "profile", "email", "offline_access"]),
        AGENCY_TWO.config()]))
    hub = app.extensions["civitas"]
    admin = create_engine(pg_database_url, isolation_level="AUTOCOMMIT")
    try:
        client = app.test_client()
        auth = AuthRequest(scope="openid profile email offline_access")
        tokens = redeem(client, auth, full_login(client, auth)["code"]).json
        with admin.connect() as conn:
            conn.execute(text("CREATE SEQUENCE cuts"))  # (not rolled back: fires once)
            conn.execute(text(
                "CREATE FUNCTION cut_rotation() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF OLD.token_hash IS NULL AND NEW.token_hash IS NOT NULL "
                "AND nextval('cuts') = 1 THEN "
                "PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$"))
            conn.execute(text("CREATE TRIGGER cut BEFORE UPDATE ON refresh_grants FOR EACH ROW "
                              "EXECUTE FUNCTION cut_rotation()"))
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        r = client.post("/token", data=refresh, headers=basic(AGENCY_ONE))
        assert r.status_code == 503 and r.json["error"] == "temporarily_unavailable", r.json
        with admin.connect() as conn:
            conn.execute(text("DROP TRIGGER cut ON refresh_grants"))

        r = client.post("/token", data=refresh, headers=basic(AGENCY_ONE))
        assert r.status_code == 200, r.json
        with hub.db.session() as s:
            assert s.scalars(select(RefreshGrantRecord.revoked_reason)).all() == [None]
        r = client.post("/token", headers=basic(AGENCY_ONE), data={
            "grant_type": "refresh_token", "refresh_token": r.json["refresh_token"]})
        assert r.status_code == 200, r.json
    finally:
        admin.dispose()
        stop_background(app)
        hub.db.dispose()


def test_readyz_is_not_ready_while_redis_refuses_writes(consent_hub, redis_url):
    """/readyz PINGed Redis, which a Redis out of memory (or a read-only replica after a
    failover) answers: it said ready while every sign-in, code and token got 503. It now
    writes a key, and names the store."""
    app, _ = consent_hub
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    with redis_out_of_memory(redis_url):
        r = client.get("/readyz")
        assert r.status_code == 503, r.json
        assert r.json["checks"]["store"] == "failed: OutOfMemoryError", r.json
        assert r.json["checks"]["database"] == "ok"
    assert client.get("/readyz").status_code == 200
