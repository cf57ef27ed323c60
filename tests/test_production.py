"""Production mode: health, readiness, metrics, JSON logs, and several gunicorn workers on a
real PostgreSQL and Redis serving full brokered logins."""

from __future__ import annotations

import contextlib
import html
import http.client
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
import yaml
from click.testing import CliRunner
from cryptography.fernet import Fernet

from civitas.cli import main
from civitas.observability import JSONFormatter
from tests import servers
from tests.conftest import HUB_ISSUER, HUB_PORT, fresh_pg_database, hub_config
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    allow_over_http,
    full_login,
    query,
    redeem,
)


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json["checks"] == {"database": "ok", "store": "ok", "signing_keys": "ok"}


def test_readyz_reports_a_dead_store(make_hub):
    app = make_hub(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0")
    r = app.test_client().get("/readyz")
    assert r.status_code == 503 and r.json["checks"]["store"].startswith("failed")
    assert r.json["checks"]["database"] == "ok"


def test_metrics_count_logins_tokens_and_requests(client):
    auth = AuthRequest()
    params = full_login(client, auth)
    redeem(client, auth, params["code"])
    text = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'civitas_logins_total\{outcome="ok",upstream="op"\} [1-9]', text)
    assert re.search(r'civitas_tokens_issued_total\{grant_type="authorization_code"\} [1-9]',
                     text)
    assert 'civitas_http_requests_total{endpoint="/token",method="POST",status="200"}' in text
    assert 'civitas_http_request_seconds_bucket{endpoint="/authorize"' in text


def test_metrics_label_unknown_methods_as_other(client):
    """A client chooses the method: made-up ones must not each open a new series."""
    for i in range(5):
        assert client.open("/nowhere", method=f"MADEUP{i}").status_code in (404, 405)
    client.open("/token", method="BREW")
    text = client.get("/metrics").get_data(as_text=True)
    assert "MADEUP" not in text and "BREW" not in text
    assert re.search(r'civitas_http_requests_total\{endpoint="unmatched",method="OTHER",'
                     r'status="404"\} 5\.0', text), text
    # a known path with a method it does not take is refused before routing: "unmatched"
    assert 'civitas_http_requests_total{endpoint="unmatched",method="OTHER",status="405"}' in text


def test_json_logs_carry_the_request_id_shown_on_error_pages(app, client, caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    r = client.get("/login/op/start?flow=nope")
    assert r.status_code == 400
    request_id = r.headers["X-Request-Id"]
    assert request_id in r.get_data(as_text=True)
    formatter = JSONFormatter()
    with app.test_request_context():
        from flask import g

        g.request_id = request_id
        lines = [json.loads(formatter.format(rec)) for rec in caplog.records]
    assert any(line["request_id"] == request_id and line["level"] == "warning"
               for line in lines)


def test_every_response_carries_its_id_and_the_security_headers(client):
    """The envelope (civitas/envelope.py) adds them to views, Authlib's answers, error pages
    and redirects alike; HTML also gets the CSP and no-store; a header a view chose stays."""
    answers = {
        "json": client.get("/jwks"),
        "oauth error": client.post("/token", data={"grant_type": "password"}),
        "page": client.get("/"),
        "missing page": client.get("/no/such/page"),
        "redirect": client.get(AuthRequest().url()),
    }
    ids = set()
    for name, r in answers.items():
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers.get("X-Request-Id", "")), name
        ids.add(r.headers["X-Request-Id"])
        assert r.headers["X-Content-Type-Options"] == "nosniff", name
        assert r.headers["X-Frame-Options"] == "DENY", name
        assert r.headers["Referrer-Policy"] == "no-referrer", name
        assert len(r.headers.getlist("X-Frame-Options")) == 1, name
        html_page = r.mimetype == "text/html"
        assert ("Content-Security-Policy" in r.headers) == html_page, name
    assert len(ids) == len(answers)
    assert answers["missing page"].status_code == 404
    assert answers["missing page"].headers["Cache-Control"] == "no-store"
    assert answers["missing page"].headers["X-Request-Id"] in answers["missing page"].get_data(
        as_text=True)
    assert answers["json"].headers["Cache-Control"].startswith("public")  # the view's own
    assert answers["oauth error"].json["error"] == "unsupported_grant_type"


def test_a_store_outage_while_opening_the_session_is_a_503_with_its_request_id(make_hub,
                                                                            caplog):
    """With the session store down, opening the request's session fails before any hook
    ran; the 503 page, its header and the log line still name one request id."""
    caplog.set_level(logging.ERROR, logger="civitas")
    app = make_hub(redis_url=f"redis://127.0.0.1:{servers.free_port()}/0")
    client = app.test_client()
    client.set_cookie("civitas_session", "a" * 43)  # a session id to look up
    r = client.get("/account")
    assert r.status_code == 503 and r.mimetype == "text/html"
    request_id = r.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{16}", request_id)
    assert request_id in r.get_data(as_text=True)
    assert any(request_id in rec.getMessage() for rec in caplog.records)


def test_several_workers_refuse_embedded_storage(tmp_path, upstream_issuer):
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db")
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["--config", str(path), "serve", "--workers", "2"])
    assert result.exit_code != 0
    assert "database_url is SQLite" in result.output and "redis_url is not set" in result.output


def test_serve_refuses_a_worker_without_threads(tmp_path, upstream_issuer):
    """A worker with no thread would accept connections and never answer them: refused
    with a usage error before anything starts."""
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db")
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for threads in ("0", "-2"):
        result = CliRunner().invoke(main, ["--config", str(path), "serve", "--threads", threads])
        assert result.exit_code == 2, result.output
        assert "--threads" in result.output and "range" in result.output


#: the log file and home directory of the `workers_hub` process
WORKERS_HUB_FILES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def workers_hub(tmp_path_factory, upstream_issuer, postgres_url, redis_url):
    """`civitas serve --workers 2` as a real process on PostgreSQL and Redis."""
    tmp = tmp_path_factory.mktemp("workers")
    # a database of its own: its signing keys are encrypted under this hub's own key, which
    # no other suite's hub on the server's shared database has (nor this one theirs)
    database = contextlib.ExitStack()
    database_url = database.enter_context(fresh_pg_database(postgres_url))
    cfg = hub_config(upstream_issuer, database_url, redis_url=redis_url,
                     encryption_key=Fernet.generate_key().decode(), agencies=[
                         AGENCY_ONE.config(scopes=["openid", "profile", "email",
                                                   "offline_access"]), AGENCY_TWO.config()])
    path = tmp / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (tmp / "hub.log").open("wb")
    (tmp / "home").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "civitas.cli", "--config", str(path), "serve", "--workers", "2",
         "--threads", "2", "--port", str(HUB_PORT)], stdout=log, stderr=subprocess.STDOUT,
        # as an operator starts it: no metrics directory chosen beforehand; a home directory
        # of its own, to see what it writes there
        env={**{k: v for k, v in os.environ.items()
                if k not in ("PROMETHEUS_MULTIPROC_DIR", "XDG_RUNTIME_DIR")},
             "HOME": str(tmp / "home")},
        start_new_session=True)
    WORKERS_HUB_FILES["log"], WORKERS_HUB_FILES["home"] = tmp / "hub.log", tmp / "home"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{HUB_ISSUER}/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise RuntimeError((tmp / "hub.log").read_text()[-3000:])
        yield HUB_ISSUER
    finally:
        servers.stop_process(proc)
        log.close()
        database.close()


def browser_login(base: str, auth: AuthRequest) -> dict[str, str]:
    """A full login over real HTTP: one cookie jar, like a browser; the redirect's query."""
    return login_over_http(base, auth)[1]


def login_over_http(base: str, auth: AuthRequest) -> tuple[requests.Session, dict[str, str]]:
    """:func:`browser_login`, and the browser (its cookie jar holds the hub session)."""
    browser = requests.Session()
    r = browser.get(base + auth.url(), timeout=10)
    link = html.unescape(re.search(r'href="(/login/op/start\?flow=[^"]+)"', r.text).group(1))
    r = browser.get(base + link, timeout=10)
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text).group(1)
    r = browser.post(urljoin(r.url, html.unescape(action)),
                     data={"username": "alice", "password": "alice-password"},
                     allow_redirects=False, timeout=10)
    for _ in range(12):
        r = allow_over_http(browser, r)  # offline access is asked (OpenID Connect Core 11)
        location = urljoin(r.url, r.headers["Location"])
        if location.startswith(auth.agency.redirect_uri):
            return browser, query(location)
        r = browser.get(location, allow_redirects=False, timeout=10)
    raise AssertionError("never reached the agency")


def test_two_workers_serve_full_logins_and_consent_decisions(workers_hub):
    from concurrent.futures import ThreadPoolExecutor

    def pid(_: int) -> int:
        return int(requests.get(f"{workers_hub}/healthz", timeout=5).json()["pid"])

    # with 2 threads per worker, 8 concurrent clients spill over to the second worker once
    # it has started (/readyz answers as soon as the first one has)
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= set(pool.map(pid, range(100)))
    assert len(pids) >= 2, "expected requests to reach both workers"
    for _ in range(4):
        auth = AuthRequest()
        params = browser_login(workers_hub, auth)
        assert params["iss"] == HUB_ISSUER
        r = requests.post(f"{workers_hub}/token", timeout=10, auth=(
            AGENCY_ONE.client_id, AGENCY_ONE.secret), data={
            "grant_type": "authorization_code", "code": params["code"],
            "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": auth.verifier})
        assert r.status_code == 200, r.text
        access = r.json()["access_token"]
        for _ in range(4):  # any worker knows the token
            info = requests.get(f"{workers_hub}/userinfo", timeout=5,
                                headers={"Authorization": f"Bearer {access}"})
            assert info.status_code == 200 and info.json()["email"] == "alice@example.org"
        sub = info.json()["sub"]

    # the consent decision API across workers: a client_credentials token minted by one
    # worker is honoured by every worker, and every answer is the same
    token = requests.post(f"{workers_hub}/token", timeout=10, auth=(
        AGENCY_ONE.client_id, AGENCY_ONE.secret), data={
        "grant_type": "client_credentials"}).json()["access_token"]
    evaluation = {"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
                  "resource": {"type": "claim", "id": "email"},
                  "context": {"purpose": "service-delivery"}}

    def decide(_: int) -> tuple[int, bool, str]:
        r = requests.post(f"{workers_hub}/access/v1/evaluation", json=evaluation, timeout=10,
                          headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        return r.json()["decision"], r.json()["context"]["reason"], r.headers["X-Request-Id"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(decide, range(40)))
    assert {(d, reason) for d, reason, _ in answers} == {(True, "consented")}
    metrics = requests.get(f"{workers_hub}/metrics", timeout=5).text
    assert re.search(r'civitas_logins_total\{outcome="ok",upstream="op"\} [4-9]', metrics), \
        [line for line in metrics.splitlines() if "logins" in line]
    assert re.search(r'civitas_consent_decisions_total\{decision="permit"\} (4\d|[5-9]\d)',
                     metrics), metrics


def test_refresh_tokens_rotate_across_workers_and_a_replay_revokes_the_grant(workers_hub):
    """RFC 9700 4.14.2 on the real stack: each refresh goes out on a new connection (any
    worker), rotates the grant's token in PostgreSQL, and a replay of a used token, seen by
    whichever worker, revokes the grant; the operator sees it in /metrics and in the log."""
    auth = AuthRequest(scope="openid email offline_access")
    params = browser_login(workers_hub, auth)
    agency = (AGENCY_ONE.client_id, AGENCY_ONE.secret)
    r = requests.post(f"{workers_hub}/token", timeout=10, auth=agency, data={
        "grant_type": "authorization_code", "code": params["code"],
        "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": auth.verifier})
    assert r.status_code == 200, r.text
    issued = [r.json()["refresh_token"]]
    for _ in range(6):
        r = requests.post(f"{workers_hub}/token", timeout=10, auth=agency, data={
            "grant_type": "refresh_token", "refresh_token": issued[-1]})
        assert r.status_code == 200, r.text
        issued.append(r.json()["refresh_token"])
    assert len(set(issued)) == len(issued)
    access = r.json()["access_token"]
    assert requests.get(f"{workers_hub}/userinfo", timeout=5, headers={
        "Authorization": f"Bearer {access}"}).status_code == 200

    r = requests.post(f"{workers_hub}/token", timeout=10, auth=agency, data={
        "grant_type": "refresh_token", "refresh_token": issued[2]})  # a used one, replayed
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    r = requests.post(f"{workers_hub}/token", timeout=10, auth=agency, data={
        "grant_type": "refresh_token", "refresh_token": issued[-1]})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert requests.get(f"{workers_hub}/userinfo", timeout=5, headers={
        "Authorization": f"Bearer {access}"}).status_code == 401
    metrics = requests.get(f"{workers_hub}/metrics", timeout=5).text
    assert re.search(r'civitas_refresh_grants_revoked_total\{reason="reuse"\} 1\.0', metrics), \
        [line for line in metrics.splitlines() if "refresh" in line]
    deadline = time.monotonic() + 5
    while "refresh token reuse by agency agency-one" not in (
            logged := WORKERS_HUB_FILES["log"].read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    [line] = [json.loads(line) for line in logged.splitlines() if "refresh token reuse" in line]
    assert line["level"] == "warning" and issued[2] not in logged


def test_every_line_the_workers_log_is_json_and_nothing_is_written_in_home(workers_hub):
    """What `civitas serve --workers 2` writes, gunicorn's own lines included (its start, each
    worker booting), is one JSON object per line; and gunicorn's control socket, which would
    be created under the home directory (a read-only container has none), is off."""
    requests.get(f"{workers_hub}/readyz", timeout=5)
    lines = [line for line in WORKERS_HUB_FILES["log"].read_text().splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry)
        entries.append(entry)
    assert any(e["logger"] == "gunicorn.error" and "Booting worker" in e["message"]
               for e in entries), entries[:10]
    assert any(e["message"].startswith("Civitas listening on http://") for e in entries)
    assert not any("Control server" in e["message"] for e in entries)
    assert list(WORKERS_HUB_FILES["home"].iterdir()) == []


def wait_for_both_workers(port: int) -> None:
    """Until the master and both workers hold the listening socket, and both workers' loops
    have run since (a worker not seen yet is left out of the balance, as it should be)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        if len(set(re.findall(r"pid=(\d+)", listing))) >= 3:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the master and two workers do not all listen: {listing}")
    time.sleep(2.5)


def worker_pid(conn: http.client.HTTPConnection) -> int:
    """Which worker answers on this (kept-alive) connection."""
    conn.request("GET", "/healthz")
    return int(json.loads(conn.getresponse().read())["pid"])


def test_kept_alive_connections_spread_evenly_over_the_workers(workers_hub):
    """A proxy's pool of kept-alive connections must not sit in one worker while the other
    idles. With one shared socket and no rule, the first worker to wake takes them; with one
    SO_REUSEPORT socket per worker the kernel's hash seldom splits a few connections evenly
    (8 on 2 workers: 4/4 in 27% of cases). The workers share one socket and each accepts
    only while it holds no more connections than the other (BalancedWorker): a new
    connection goes to whichever holds fewer."""
    port = int(workers_hub.rsplit(":", 1)[1])
    listing = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.splitlines()
    assert len(listing) == 1, listing  # one listening socket, shared by master and workers
    wait_for_both_workers(port)

    held: list[http.client.HTTPConnection] = []
    try:
        for rounds in range(3):
            for _ in range(8):  # opened one after another, as a pool fills
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                held.append(conn)
                worker_pid(conn)
            seen = [worker_pid(conn) for conn in held]  # kept alive: each stays in its worker
            assert seen == [worker_pid(conn) for conn in held]
            counts = sorted(seen.count(pid) for pid in set(seen))
            assert counts == [4 * (rounds + 1)] * 2, (rounds, counts)
            if rounds == 1:  # connections closed in one worker are refilled there first
                mine = seen[0]
                for conn in [c for c, pid in zip(held, seen, strict=True) if pid == mine][:6]:
                    conn.close()
                    held.remove(conn)
                time.sleep(1.0)  # the worker sees them closed and says so on the board
                for _ in range(6):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    held.append(conn)
                    assert worker_pid(conn) == mine
    finally:
        for conn in held:
            conn.close()


def test_a_worker_that_dies_does_not_hold_up_new_connections(workers_hub):
    """A worker takes a new connection only while it holds no more than the others; a
    worker that was killed holds none, whatever it last wrote on the board: the master
    clears its slot when it reaps it (and gives it, empty, to the worker it starts in its
    place), so the surviving worker accepts at once instead of waiting until the dead
    worker's slot went stale, and the new worker gets connections again."""
    import signal

    port = int(workers_hub.rsplit(":", 1)[1])
    wait_for_both_workers(port)

    held: list[http.client.HTTPConnection] = []
    try:
        for _ in range(3):  # 2 in one worker, 1 in the other
            held.append(http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            worker_pid(held[-1])
        pids = [worker_pid(conn) for conn in held]
        victim = min(set(pids), key=pids.count)  # the one with fewer connections
        survivor = max(set(pids), key=pids.count)
        assert pids.count(survivor) == 2 and pids.count(victim) == 1, pids
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the master has reaped it (and cleared
            try:                            # its slot): a zombie still answers signal 0
                os.kill(victim, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        held.append(conn)
        assert worker_pid(conn) == survivor
        assert time.monotonic() - started < 1.0  # not held until the dead slot went stale
        deadline = time.monotonic() + 60
        replacement = None
        while replacement is None and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            held.append(conn)
            pid = worker_pid(conn)
            replacement = pid if pid not in (survivor, victim) else None
            time.sleep(0.1)
        assert replacement is not None, "no worker was started in the dead one's place"
    finally:
        for conn in held:
            conn.close()


def test_pipelined_requests_are_all_answered_in_order(workers_hub):
    """RFC 9112 9.3.2: a client may send requests without waiting for each response; the
    server answers them in order. 600 on one connection, in one write, a known path and an
    unknown one in turn, so the order shows in the statuses: the worker reads ahead,
    handles the requests it holds one after another, then waits for the rest on the socket
    (finish_request hands a connection with bytes read ahead straight back)."""
    import socket

    port = int(workers_hub.rsplit(":", 1)[1])
    count = 600
    paths = [b"/healthz" if i % 2 == 0 else b"/no-such-page-%d" % i for i in range(count)]
    statuses: list[int] = []
    pids: set[bytes] = set()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path
                              for path in paths))
        buffer = b""
        while len(statuses) < count:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head) if sep else None
            if length is not None and len(rest) >= int(length[1]):
                body, buffer = rest[:int(length[1])], rest[int(length[1]):]
                statuses.append(int(head.split(b" ", 2)[1]))
                pids.update(re.findall(rb'"pid":\s*(\d+)', body))
                continue
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(statuses)} responses"
            buffer += chunk
        assert buffer == b""  # nothing more than one response per request
    assert statuses == [200 if i % 2 == 0 else 404 for i in range(count)]
    assert len(pids) == 1  # one connection, one worker


def test_connections_that_send_nothing_hold_no_worker_thread(workers_hub):
    """Connections opened ahead of use (a browser's preconnect, a proxy's pool) wait for
    their first bytes in the worker's poller, not in one of its threads (gunicorn's gthread
    worker waits up to 5 s in a thread: 20 of them took both threads of both workers, and
    requests on other connections waited). One that stays silent is closed after the
    keep-alive time, like an idle kept-alive connection."""
    import http.client
    import socket

    port = int(workers_hub.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.5)  # every worker has accepted its share
        for _ in range(6):  # new connections, spread over both workers by the kernel
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            try:
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
            finally:
                conn.close()
        for sock in idle:  # closed by the hub, not left open
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


def test_several_workers_refuse_a_port_someone_listens_on(tmp_path, upstream_issuer,
                                                         postgres_url, redis_url):
    """A port another program listens on (here with SO_REUSEPORT, which a careless
    listener with the same option would share): `serve` refuses to start, and says why."""
    import socket

    cfg = hub_config(upstream_issuer, postgres_url, redis_url=redis_url)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "civitas.cli", "--config", str(path), "serve",
             "--workers", "2", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Listening at" not in done.stdout + done.stderr  # no worker was started


def test_several_workers_stop_before_any_worker_when_the_schema_cannot_be_upgraded(
        tmp_path, upstream_issuer, redis_url):
    """`serve --workers N` upgrades the schema once, before gunicorn starts; when that fails
    (here: nobody listens at the database's address) it exits 1 and says why, and no worker
    is started."""
    cfg = hub_config(upstream_issuer, f"postgresql+psycopg://civitas:x@127.0.0.1:"
                     f"{servers.free_port()}/civitas", redis_url=redis_url)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "civitas.cli", "--config", str(path), "serve", "--workers", "2",
         "--port", str(servers.free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the database schema could not be upgraded" in done.stderr
    assert "Connection refused" in done.stderr
    assert "Booting worker" not in done.stdout + done.stderr


def test_a_gunicorn_worker_loads_the_app_without_alembic(tmp_path, upstream_issuer,
                                                          pg_database_url, redis_url):
    """The workers of `serve --workers N` build the app on a schema the master brought up to
    date (in a child process), so neither they nor the master import Alembic and Mako: about
    11 MB of RSS per worker (bench/README.md). Nor ldap3 where no LDAP upstream is
    configured (this one has an OIDC upstream only): about 5 MB more."""
    cfg = hub_config(upstream_issuer, pg_database_url, redis_url=redis_url)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from civitas.gunicorn_app import upgrade_schema

    assert re.fullmatch(r"database at revision \w+", upgrade_schema(str(path)))
    probe = ("import sys; from civitas.gunicorn_app import HubApplication; "
             f"app = HubApplication({str(path)!r}, {{}}).load(); "
             "print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('alembic', 'mako', 'ldap3')))"
             "; print(type(app).__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(
                              tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "HubFlask"], done.stdout + done.stderr


def test_db_upgrade_waits_for_the_start_up_lock(tmp_path, upstream_issuer, pg_database_url):
    """`civitas db upgrade` (run by `serve --workers N` and by the container's entry point on
    every host) takes the start-up lock, so hosts that start together migrate one at a time."""
    from sqlalchemy import create_engine, text

    from kernel.db import startup_lock

    cfg = hub_config(upstream_issuer, pg_database_url)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    engine = create_engine(pg_database_url)
    try:
        with startup_lock(engine):  # another host, starting
            upgrade = subprocess.Popen(
                [sys.executable, "-m", "civitas.cli", "--config", str(path), "db", "upgrade"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with pytest.raises(subprocess.TimeoutExpired):
                upgrade.wait(3)
            with engine.connect() as conn:  # it has not touched the schema
                assert conn.execute(text(
                    "SELECT to_regclass('alembic_version')")).scalar() is None
        out, err = upgrade.communicate(timeout=60)
        assert upgrade.returncode == 0, err
        assert re.fullmatch(r"database at revision \w+", out.strip())
    finally:
        engine.dispose()


def test_connection_board_leaves_out_workers_that_stopped_or_hung():
    """A worker takes a new connection only while it holds no more than every other *live*
    worker; one whose loop has not run for ``STALE`` seconds (stopping, hung, not started)
    or whose slot the master cleared (exited) must not stop the others from accepting."""
    from civitas.gunicorn_app import ConnectionBoard

    board = ConnectionBoard()
    first, second, third = (board.assign(taken) for taken in (set(), {0}, {0, 1}))
    assert (first, second, third) == (0, 1, 2)
    now = 1000.0
    board.publish(first, 3, now)
    board.publish(second, 5, now)
    assert board.fewest_elsewhere(second, now) == 3  # third never ran: left out
    board.publish(third, 1, now - ConnectionBoard.STALE)  # last seen too long ago
    assert board.fewest_elsewhere(second, now) == 3
    board.publish(third, 1, now - 0.5)
    assert board.fewest_elsewhere(second, now) == 1
    board.clear(third)  # the master saw it exit
    assert board.fewest_elsewhere(second, now) == 3
    assert board.fewest_elsewhere(first, now) == 5
    board.clear(second)
    assert board.fewest_elsewhere(first, now) is None  # alone: always its turn
    assert board.assign({0, 2}) == 1  # a freed slot is given out again, empty
    assert board.fewest_elsewhere(first, now) is None


def test_the_hub_serves_with_the_inline_worker_unless_told_gthread(monkeypatch):
    """`civitas serve` runs BalancedInlineWorker where the system has epoll (every test
    above that starts `civitas serve` runs it), and gunicorn's gthread worker
    (BalancedWorker) when CIVITAS_WORKER=gthread."""
    import select

    from civitas import gunicorn_app

    monkeypatch.delenv(gunicorn_app.WORKER_ENV, raising=False)
    assert hasattr(select, "epoll")
    assert gunicorn_app.worker_class() == "civitas.gunicorn_app.BalancedInlineWorker"
    monkeypatch.setenv(gunicorn_app.WORKER_ENV, "gthread")
    assert gunicorn_app.worker_class() == "civitas.gunicorn_app.BalancedWorker"
    monkeypatch.setenv(gunicorn_app.WORKER_ENV, "inline")
    assert gunicorn_app.worker_class() == "civitas.gunicorn_app.BalancedInlineWorker"
    monkeypatch.delattr(select, "epoll")
    monkeypatch.delenv(gunicorn_app.WORKER_ENV)
    assert gunicorn_app.worker_class() == "civitas.gunicorn_app.BalancedWorker"


def test_serve_refuses_a_worker_it_does_not_have(tmp_path, upstream_issuer, monkeypatch):
    """CIVITAS_WORKER=gevent (or a typo) is said plainly before anything starts, not
    silently replaced by the default worker."""
    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/x.db")
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("CIVITAS_WORKER", "gevent")
    result = CliRunner().invoke(main, ["--config", str(path), "serve", "--workers", "2"])
    assert result.exit_code == 1, result.output
    assert "CIVITAS_WORKER='gevent' names no worker" in result.output
    assert "'inline', 'gthread'" in result.output


def read_answer(reader: Any) -> bytes:
    """One HTTP/1.1 answer with a Content-Length read off a raw connection: its status line
    (the head and the body are read past)."""
    status: bytes = reader.readline()
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    reader.read(length)
    return status


def test_a_kept_alive_connection_is_served_again_then_closed_when_idle(workers_hub):
    """RFC 9112 9.3: the connection stays open between requests, and the hub closes it
    after KEEPALIVE_SECONDS without one (nginx closes its own idle connections first:
    deploy/nginx.conf); a connection with a request in progress is never closed under it."""
    import socket

    from civitas.gunicorn_app import KEEPALIVE_SECONDS

    port = int(workers_hub.rsplit(":", 1)[1])
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def answer() -> bytes:
            return read_answer(reader)

        sock.sendall(request)
        assert answer().startswith(b"HTTP/1.1 200")
        time.sleep(KEEPALIVE_SECONDS / 2)  # idle, within the keep-alive time
        sock.sendall(request)
        assert answer().startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert reader.read(1) == b""  # then closed by the hub once idle that long
        waited = time.monotonic() - started
        assert KEEPALIVE_SECONDS - 0.5 <= waited <= KEEPALIVE_SECONDS + 2, waited


def test_a_reload_lets_the_old_workers_answer_then_hands_over_to_new_ones(workers_hub):
    """SIGHUP (an operator's reload): gunicorn starts new workers and stops the old ones
    gracefully. A request on an old worker's kept-alive connection is still answered (and
    the connection then closed), never cut off; new connections reach the new workers."""
    import signal

    port = int(workers_hub.rsplit(":", 1)[1])
    wait_for_both_workers(port)
    listing = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    holders = {int(pid) for pid in re.findall(r"pid=(\d+)", listing)}
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
               for pid in holders}
    master = next(pid for pid, parent in parents.items() if parent not in holders)
    old = holders - {master}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert worker_pid(conn) in old
        os.kill(master, signal.SIGHUP)
        time.sleep(0.5)  # the old workers are stopping, within their 2 s for kept-alive ones
        conn.request("GET", "/healthz")
        answer = conn.getresponse()
        assert answer.status == 200 and int(json.loads(answer.read())["pid"]) in old
        assert answer.getheader("Connection", "").lower() == "close"
    finally:
        conn.close()
    deadline = time.monotonic() + 60
    seen: set[int] = set()
    while time.monotonic() < deadline and not seen - old:
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            seen.add(worker_pid(fresh))
        finally:
            fresh.close()
        time.sleep(0.1)
    assert seen - old, "no new worker answered after the reload"
    wait_for_both_workers(port)  # (the tests after this one find two live workers)


def test_a_malformed_request_gets_gunicorns_400_and_the_worker_serves_on(workers_hub):
    """A request line that is not HTTP is answered 400 Bad Request by the server (before
    the app), the connection closed, and the worker goes on serving others."""
    import socket

    port = int(workers_hub.rsplit(":", 1)[1])
    for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(garbage)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    for _ in range(4):  # both workers still answer
        assert requests.get(f"{HUB_ISSUER}/healthz", timeout=5).status_code == 200


def test_the_date_header_is_the_current_second_in_imf_fixdate(workers_hub, monkeypatch):
    """RFC 9110 6.6.1 / 5.6.7: every response's Date is the time it was made, in
    IMF-fixdate, also now that each worker formats it once a second (civitas.gunicorn_app
    .cache_http_date); the cache gives what gunicorn's own formatting gives, second by
    second."""
    import email.utils

    from gunicorn import util

    from civitas.gunicorn_app import cache_http_date

    for _ in range(3):
        before = time.time()
        date = requests.get(f"{HUB_ISSUER}/healthz", timeout=5).headers["Date"]
        after = time.time()
        assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|"
                            r"Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT", date), date
        stamp = email.utils.parsedate_to_datetime(date).timestamp()
        assert int(before) <= stamp <= after
        time.sleep(0.6)

    original = util.http_date
    monkeypatch.setattr(util, "http_date", original)
    cache_http_date()
    cached = util.http_date
    assert cached is not original
    cache_http_date()
    assert util.http_date is cached  # once only
    clock = [1_700_000_000.2]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for step in (0.0, 0.5, 0.4, 0.2, 7.9, 86_400.0):
        clock[0] += step
        assert cached() == original(clock[0])
    assert cached(1_600_000_000.0) == original(1_600_000_000.0)


def test_a_body_the_app_did_not_read_is_skipped_and_the_connection_serves_on(workers_hub):
    """RFC 9112 9.3: on a kept-alive connection, the next request starts after the whole
    body of the one before, never inside it. Both ways out of a request are taken here:
    a body read to its end (the token endpoint's form) or none at all (the GET), which the
    worker passes over without touching the socket, and a body the app left unread (sent
    to a page that ignores it), which gthread's bounded drain takes off the socket."""
    import socket

    port = int(workers_hub.rsplit(":", 1)[1])
    unread = b"GET /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n" * 20  # looks like requests
    form = b"grant_type=client_credentials&scope=nothing"
    requests = [
        b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(unread), unread),
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(form), form),
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ]
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            statuses.append(int(read_answer(reader).split(b" ", 2)[1]))
    # /healthz answers GET only; /token: no client authentication; then the GET is served
    assert statuses == [405, 401, 200]


def test_keep_alive_passes_over_only_a_body_read_to_its_end():
    """The inline worker's ``_keepalive_after``: a request whose body is read to its end (or
    that has none) keeps its connection without gthread's drain touching the socket; a body
    with bytes left, one whose reading failed, or one of unknown length goes through the
    drain, which decides (RFC 9112 9.3: the next request must start after this body)."""
    from types import SimpleNamespace

    from gunicorn.http.body import Body, ChunkedReader, LengthReader

    from civitas.inline_worker import InlineWorker

    drained: list[bool] = []

    def conn_with(body: Any) -> Any:
        def finish_body(deadline: float | None = None) -> bool:
            drained.append(True)
            return False  # what a drain that gave up says: the connection is closed

        return SimpleNamespace(parser=SimpleNamespace(mesg=SimpleNamespace(body=body),
                                                      finish_body=finish_body))

    keep = InlineWorker._keepalive_after
    worker = SimpleNamespace()
    assert keep(worker, conn_with(Body(LengthReader(None, 0))), True) is True
    assert drained == []  # read to its end: nothing to drain
    assert keep(worker, conn_with(Body(LengthReader(None, 0))), False) is False
    left = Body(LengthReader(None, 5))
    assert keep(worker, conn_with(left), True) is False and drained == [True]
    failed = Body(LengthReader(None, 0))
    failed.failed = True
    assert keep(worker, conn_with(failed), True) is False and len(drained) == 2
    chunked = Body(ChunkedReader(None, None))
    assert keep(worker, conn_with(chunked), True) is False and len(drained) == 3


def test_with_migrations_a_release_step_of_their_own_serve_checks_and_never_migrates(
        tmp_path, upstream_issuer, pg_database_url, redis_url):
    """deploy/README.md: CIVITAS_SKIP_DB_UPGRADE=1 is for installations that migrate in a
    release step of their own. `civitas serve` then checks the schema instead of upgrading
    it (it upgraded it anyway: only the container's entry point skipped its run): on a
    database the release step has not migrated it stops, saying what to run, and creates
    nothing; once migrated it serves. `civitas db check` says the same."""
    from sqlalchemy import create_engine, inspect

    cfg = hub_config(upstream_issuer, pg_database_url, redis_url=redis_url)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CIVITAS_SKIP_DB_UPGRADE": "1"}
    base = [sys.executable, "-m", "civitas.cli", "--config", str(path)]
    for args in (["serve", "--workers", "2"], ["serve"], ["db", "check"]):
        if args[0] == "serve":
            args = [*args, "--port", str(servers.free_port())]
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "no revision (an empty database)" in done.stderr, done.stderr
        assert "run `civitas db upgrade`" in done.stderr
        assert "Booting worker" not in done.stdout + done.stderr
    engine = create_engine(pg_database_url)
    try:
        assert inspect(engine).get_table_names() == []  # nothing was migrated
    finally:
        engine.dispose()
    assert subprocess.run([*base, "db", "upgrade"], capture_output=True, timeout=120,
                          env=env).returncode == 0
    done = subprocess.run([*base, "db", "check"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0 and "as this release needs" in done.stdout


def test_readyz_answers_by_its_deadline_when_the_database_stops_answering(
        upstream_issuer, pg_database_url):
    """A PostgreSQL that stops answering on a connection already open (the server stopped
    with SIGSTOP, a half-open network path) held /readyz for good: only opening a
    connection has a deadline (kernel.db.CONNECT_TIMEOUT_SECONDS), a statement has none.
    The probe's own timeout (4 s in compose.yaml) was all an operator saw, not which
    dependency hung. /readyz now answers by READY_DEADLINE_SECONDS, naming the database,
    holds one waiting thread however often it is asked, and is ready again once the server
    answers."""
    import threading
    from urllib.parse import urlsplit

    from civitas.app import create_app, stop_background
    from civitas.observability import READY_DEADLINE_SECONDS
    from tests.pg_proxy import PgProxy

    parts = urlsplit(pg_database_url)
    proxy = PgProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    app = create_app(hub_config(upstream_issuer, proxy.url(pg_database_url)))
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200  # (the pool has its connection)

        def probe() -> Any:
            answers: list[Any] = []
            thread = threading.Thread(target=lambda: answers.append(client.get("/readyz")),
                                      daemon=True)
            started = time.monotonic()
            thread.start()
            thread.join(READY_DEADLINE_SECONDS + 8)
            assert answers, "/readyz did not answer"
            return answers[0], time.monotonic() - started

        proxy.freeze()
        for _ in range(3):
            r, took = probe()
            assert r.status_code == 503 and took < READY_DEADLINE_SECONDS + 1.5, took
            assert r.json["checks"]["database"].startswith("failed: no answer for"), r.json
            assert r.json["checks"]["store"] == "ok"
        waiting = [t for t in threading.enumerate() if t.name == "civitas-readyz"]
        assert 1 <= len(waiting) <= 2, waiting  # the database's (and the keys', if reloading)
        proxy.thaw()
        deadline = time.monotonic() + 10
        while (r := probe()[0]).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, r.json
    finally:
        proxy.thaw()
        stop_background(app)
        app.extensions["civitas"].db.dispose()
        proxy.close()
