"""Defects found by probing the hub as an operator deploys it (production mode: PostgreSQL,
Redis, `civitas serve`, the CLI). Each test failed before its fix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from click.testing import CliRunner
from sqlalchemy import create_engine, text

from civitas.app import create_app, stop_background
from civitas.cli import main
from tests.conftest import hub_config
from tests.test_storage_outage import AUTH, EVALUATION, terminate_connections


@contextlib.contextmanager
def postgres_refusing_connections(url: str) -> Iterator[None]:
    """PostgreSQL as during a restart or an outage: every open connection of the hub's
    database dropped, and every new one refused (as a stopped server refuses them), until
    the block ends."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(url.rsplit("/", 1)[0] + "/civitas", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        terminate_connections(url)
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_decision_api_answers_503_not_500_while_postgres_refuses_connections(
        upstream_issuer, pg_database_url):
    """A PostgreSQL outage (the server stopped, not only its connections dropped): the
    decision API, whose reads go through the hub's own psycopg connections, answered 500
    server_error ("unexpected error" and a traceback in the log) from its second request on,
    when it had to open a connection: psycopg's error came out raw, not as SQLAlchemy's."""
    app = create_app(hub_config(upstream_issuer, pg_database_url))
    try:
        client = app.test_client()
        for _ in range(3):  # warm the connections
            assert client.post("/access/v1/evaluation", json=EVALUATION,
                               headers=AUTH).status_code == 200
        with postgres_refusing_connections(pg_database_url):
            for _ in range(3):
                r = client.post("/access/v1/evaluation", json=EVALUATION, headers=AUTH)
                assert r.status_code == 503, (r.status_code, r.get_data(as_text=True))
                assert r.json["error"] == "temporarily_unavailable"
                assert r.headers["Retry-After"] == "5"
            assert client.get("/readyz").status_code == 503
        # and the hub recovers by itself once PostgreSQL takes connections again
        assert client.get("/readyz").status_code == 200
        r = client.post("/access/v1/evaluation", json=EVALUATION, headers=AUTH)
        assert r.status_code == 200, r.get_data(as_text=True)
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()


def unreachable_config(tmp_path, upstream_issuer, **overrides):
    import yaml

    from tests import servers

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(hub_config(
        upstream_issuer, f"postgresql+psycopg://civitas:x@127.0.0.1:{servers.free_port()}"
                         "/civitas", **overrides)))
    return str(path)


def test_cli_commands_say_plainly_that_postgres_cannot_be_reached(tmp_path, upstream_issuer):
    """Every operator command (`db upgrade`, `agency list`, `keys list`, `housekeeping`,
    `events list`, `audit checkpoint`...) printed a 139-line Python traceback when
    PostgreSQL was down; only `secrets reencrypt` said it in a line."""
    config = unreachable_config(tmp_path, upstream_issuer)
    for command in (["db", "upgrade"], ["agency", "list"], ["keys", "list"],
                    ["housekeeping"], ["events", "list"], ["audit", "checkpoint"]):
        result = CliRunner().invoke(main, ["--config", config, *command])
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, repr(result.exception))
        assert "Error: the database failed" in result.output, (command, result.output)
        assert "Traceback" not in result.output


def test_keys_rotate_refuses_negative_or_impossible_durations(upstream_issuer,
                                                              pg_database_url, tmp_path):
    """`civitas keys rotate --lead-time -1h --retire-after -1d` was accepted: the new key
    signed at once (an hour before it was published, so agencies' cached JWKS could not
    verify it) and the key it replaced left the JWKS at once (every token it had signed
    failed verification). `--retire-after 1e400s` was a traceback."""
    import yaml

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(hub_config(upstream_issuer, pg_database_url)))
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(path), "keys", "list"]).exit_code == 0
    before = runner.invoke(main, ["--config", str(path), "keys", "list"]).output
    for lead, retire in (("-1h", "1d"), ("1h", "-1d"), ("1h", "1e400s"), ("nanh", "1d"),
                         ("1h", "99999999d")):
        result = runner.invoke(main, ["--config", str(path), "keys", "rotate",
                                      "--lead-time", lead, "--retire-after", retire])
        assert result.exit_code == 2, (lead, retire, result.output, repr(result.exception))
        assert "is not a duration" in result.output
    # nothing changed: the one key, still signing, still published with no retirement
    assert runner.invoke(main, ["--config", str(path), "keys", "list"]).output == before
    result = runner.invoke(main, ["--config", str(path), "keys", "rotate", "--lead-time", "0",
                                  "--retire-after", "1d"])
    assert result.exit_code == 0, result.output


def test_a_store_outage_logs_one_line_per_request_with_its_id_and_no_traceback(make_hub,
                                                                              caplog):
    """With Redis down, each browser request (its session cannot be opened) logged three
    error lines: Flask's "Exception on /login [GET]" with a traceback and no request id,
    the hub's "storage unavailable" line, and "Request finalizing failed with an error while
    handling an error" with the traceback of an AssertionError in the session interface
    (saving a session that was never opened). Alerts on logged tracebacks then fire for a
    known state, and the line with the traceback cannot be found by the page's reference."""
    from tests import servers

    app = make_hub(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0")
    client = app.test_client()
    caplog.set_level(logging.ERROR)
    for path, cookie in (("/login", None), ("/account", "a" * 43)):
        if cookie:
            client.set_cookie("civitas_session", cookie)
        caplog.clear()
        r = client.get(path)
        assert r.status_code == 503 and r.mimetype == "text/html"
        request_id = r.headers["X-Request-Id"]
        assert request_id in r.get_data(as_text=True)
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert [rec.getMessage() for rec in errors] == [
            rec.getMessage() for rec in errors if request_id in rec.getMessage()], [
            rec.getMessage() for rec in errors]
        assert len(errors) == 1 and errors[0].exc_info is None


def test_a_wrong_encryption_key_stops_start_up_with_the_setting_named(upstream_issuer,
                                                                      pg_database_url,
                                                                      tmp_path):
    """A hub started with an encryption key that did not write its signing keys (a typo in
    the secret file, or the old key removed too early in the documented rotation) died with
    a bare traceback ending in "kernel.crypto.DecryptionError: Stored data could not be
    decrypted." from `civitas serve`, and so did `civitas keys list`."""
    import yaml

    from kernel.crypto import FieldCipher

    config = hub_config(upstream_issuer, pg_database_url)
    app = create_app(config)  # the signing keys are made, under the configured key
    stop_background(app)
    app.extensions["civitas"].db.dispose()
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump({**config, "encryption_key": FieldCipher.generate_key()}))
    for command in (["keys", "list"], ["serve", "--port", "1"]):
        result = CliRunner().invoke(main, ["--config", str(path), *command])
        assert result.exit_code == 1, (command, result.output, repr(result.exception))
        assert isinstance(result.exception, SystemExit), (command, repr(result.exception))
        assert "Error: encryption_key:" in result.output, (command, result.output)
        assert "CIVITAS_ENCRYPTION_KEY" in result.output


def test_a_code_exchange_cut_off_by_a_database_outage_can_be_retried(upstream_issuer,
                                                                    pg_database_url):
    """The token endpoint answers a code exchange during a PostgreSQL outage with 503
    temporarily_unavailable and Retry-After: "try again". But the code had already been
    taken from Redis, so the retry got invalid_grant (and counted as a replay): every
    sign-in at that step during a database restart or fail-over was lost."""
    from tests.flows import AuthRequest, full_login, redeem

    app = create_app(hub_config(upstream_issuer, pg_database_url))
    try:
        client = app.test_client()
        auth = AuthRequest()
        code = full_login(client, auth)["code"]
        with postgres_refusing_connections(pg_database_url):
            r = redeem(client, auth, code)
            assert r.status_code == 503, r.get_data(as_text=True)
            assert r.json["error"] == "temporarily_unavailable"
            assert r.headers["Retry-After"] == "5"
        r = redeem(client, auth, code)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.json["id_token"] and r.json["access_token"]
        # and the code still works once only
        assert redeem(client, auth, code).json["error"] == "invalid_grant"
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()


def test_every_error_page_s_reference_is_found_in_the_log(make_hub, caplog):
    """Error pages say "If you contact support, quote this reference", but for the
    refusals no other line names (an authorization request from an unknown agency or with
    no parameters, a page not there, a method not allowed) nothing was logged: the operator
    had no line to find by the reference a citizen or an agency's developer quoted."""
    app = make_hub()
    client = app.test_client()
    caplog.set_level(logging.INFO, logger="civitas")
    for method, path in (("GET", "/authorize?client_id=nobody"), ("GET", "/authorize"),
                         ("GET", "/no/such/page"), ("DELETE", "/token")):
        caplog.clear()
        r = client.open(path, method=method)
        assert r.status_code >= 400, path
        request_id = r.headers["X-Request-Id"]
        if r.mimetype == "text/html":
            assert request_id in r.get_data(as_text=True), path
        assert any(request_id in rec.getMessage() for rec in caplog.records), (
            path, [rec.getMessage() for rec in caplog.records])


def test_a_worker_restarted_during_a_database_outage_does_not_stop_the_hub(
        tmp_path, upstream_issuer, pg_database_url, redis_url):
    """With PostgreSQL down, a worker that dies (the master's timeout watchdog kills one
    stuck on the database, the kernel's OOM killer, a reload) is started again, and the new
    one cannot build its app: gunicorn took that as a boot error (status 3) and stopped the
    master and every other worker ("Reason: Worker failed to boot."). The whole hub was
    gone, /healthz too, and did not come back when PostgreSQL did."""
    import json
    import os
    import signal

    import requests
    import yaml

    from tests import servers

    config = tmp_path / "civitas.yaml"
    config.write_text(yaml.safe_dump(hub_config(upstream_issuer, pg_database_url,
                                                redis_url=redis_url)))
    log = tmp_path / "hub.log"
    with servers.hub_process(config, log) as hub:
        with postgres_refusing_connections(pg_database_url):
            victim = min(hub.workers())
            os.kill(victim, signal.SIGKILL)
            hub.until(lambda: "cannot start: storage unavailable" in log.read_text(),
                      "a replacement worker that waits for the database")
            assert hub.proc.poll() is None, log.read_text()[-1500:]
            r = requests.get(f"{hub.base}/healthz", timeout=5)  # the other worker serves on
            assert r.status_code == 200 and r.json()["pid"] != victim
            assert requests.get(f"{hub.base}/readyz", timeout=5).status_code == 503
        # PostgreSQL is back: a replacement boots, and both workers serve
        hub.until(lambda: hub.ready() and len(hub.workers()) == 2
                  and victim not in hub.workers(),
                  "a replacement worker once the database is back")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert not any("failed to boot" in line["message"] for line in lines)


def test_audit_export_to_a_path_that_cannot_be_written_says_so(tmp_path, upstream_issuer):
    """`civitas audit export /no/such/dir/export.jsonl` ended in a FileNotFoundError
    traceback."""
    import yaml

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(hub_config(upstream_issuer,
                                              f"sqlite:///{tmp_path}/civitas.db")))
    target = tmp_path / "no" / "such" / "export.jsonl"
    result = CliRunner().invoke(main, ["--config", str(path), "audit", "export", str(target)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
        result.output, repr(result.exception))
    assert f"Error: cannot write {target}" in result.output


def test_db_upgrade_to_a_revision_that_does_not_exist_says_so(tmp_path, upstream_issuer):
    """`civitas db upgrade --revision nope` ended in an alembic CommandError traceback."""
    import yaml

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(hub_config(upstream_issuer,
                                              f"sqlite:///{tmp_path}/civitas.db")))
    result = CliRunner().invoke(main, ["--config", str(path), "db", "upgrade",
                                       "--revision", "nope"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
        result.output, repr(result.exception))
    assert "Error: --revision nope: Can't locate revision" in result.output


def test_serve_says_plainly_why_it_cannot_listen(tmp_path, upstream_issuer, postgres_url,
                                                 redis_url):
    """`civitas serve` (one process) on a port another program listens on, or on a --host
    that is not an address of this machine, ended in an OSError traceback from waitress;
    `civitas serve --workers 2` on such a host said "Another program (or another Civitas)
    is listening there", which sends the operator looking for a program that is not
    there."""
    import socket
    import subprocess
    import sys

    import yaml

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(hub_config(upstream_issuer, postgres_url,
                                              redis_url=redis_url)))

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "civitas.cli", "--config", str(path), "serve", *args],
            capture_output=True, text=True, timeout=120, check=False)

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = serve("--port", str(port))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    for workers in ("1", "2"):
        done = serve("--workers", workers, "--host", "192.0.2.77", "--port", str(port))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "cannot listen on 192.0.2.77" in done.stderr
        assert "Another program" not in done.stderr and "Check --host" in done.stderr


def test_limits_per_address_count_an_ipv6_client_by_its_64(make_hub):
    """Limits per client address counted each IPv6 address apart. A subscriber holds a
    whole /64 (2^64 addresses), so a client could send every request from a fresh address
    of its own network: no limit per address at all on the login pages (the only limit
    there), the token endpoint or the decision API."""
    from tests.flows import AGENCY_ONE
    from tests.test_rate_limits import (
        EVALUATION,
        REFRESH,
        assert_limited_json,
        basic,
        from_address,
        limited_hub,
    )

    app = limited_hub(make_hub, token_per_address=1, login_per_address=1,
                      decision_per_address=1)
    first, second = (from_address(app, f"2001:db8:5:7::{n}") for n in (1, 2))
    assert first.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)).status_code == 400
    assert_limited_json(second.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)))
    assert first.get("/login").status_code == 302
    assert second.get("/login").status_code == 429
    assert first.post("/access/v1/evaluation", json=EVALUATION,
                      headers=basic(AGENCY_ONE)).status_code == 200
    assert_limited_json(second.post("/access/v1/evaluation", json=EVALUATION,
                                    headers=basic(AGENCY_ONE)))
    # another /64 has its own allowance; an IPv4 address in IPv6 form counts as IPv4
    other = from_address(app, "2001:db8:5:8::1")
    assert other.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)).status_code == 400
    v4 = from_address(app, "192.0.2.9")
    assert v4.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)).status_code == 400
    mapped = from_address(app, "::ffff:192.0.2.9")
    assert_limited_json(mapped.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)))
