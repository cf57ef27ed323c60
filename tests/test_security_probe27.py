"""Security probe of the production deployment surfaces (27th session): defects found by real
requests against `civitas serve --workers`, the session cookie and the documented proxy. Each
test failed before its fix."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from civitas.inline_worker import REQUEST_BODY_SECONDS, REQUEST_HEAD_SECONDS
from tests import servers, test_reverse_proxy
from tests.conftest import fresh_pg_database, hub_config
from tests.flows import AuthRequest

# -- slow clients against the hub's own workers (no proxy in front) ------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, upstream_issuer: str, postgres_url: str,
           redis_url: str) -> Iterator[servers.HubProcess]:
    """`civitas serve --workers 2 --threads 2` (four serving threads in all), as an operator
    who reaches it without a proxy runs it."""
    tmp = tmp_path_factory.mktemp("slow")
    config = tmp / "civitas.yaml"
    with fresh_pg_database(postgres_url, "slow_") as database_url:
        config.write_text(yaml.safe_dump(hub_config(upstream_issuer, database_url,
                                                    redis_url=redis_url)))
        with servers.hub_process(config, tmp / "hub.log") as hub:
            yield hub


def _port(hub: servers.HubProcess) -> int:
    return int(hub.base.rsplit(":", 1)[1])


def _trickle(port: int, first: bytes, stop: threading.Event, closed: list[bool]) -> None:
    """Send ``first``, then one more byte of a header line every 0.3 s (never the blank line
    that ends the head) until ``stop``; note in ``closed`` whether the hub closed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(first)
        while not stop.wait(0.3):
            try:
                sock.sendall(b"a")
            except OSError:
                closed.append(True)
                return
    finally:
        sock.close()


def test_request_heads_sent_slowly_hold_no_worker_thread(served):
    """Slowloris: connections that send a request head a byte at a time, and never end it.
    Each took one of the worker's threads until the head was complete, with no time limit:
    eight of them (twice the hub's four threads) and the hub answered nobody, for as long
    as they kept sending. A head now waits in the worker's poller until it is whole, and a
    connection whose head is not whole within REQUEST_HEAD_SECONDS is closed."""
    port = _port(served)
    stop, closed = threading.Event(), []
    slow = [threading.Thread(target=_trickle, daemon=True, args=(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", stop, closed))
        for _ in range(8)]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.5)  # every worker holds some of them
        for _ in range(4):
            # answered while the slow heads are still held (the hub closes them only
            # REQUEST_HEAD_SECONDS after they began): a liveness bound, not a speed target
            r = requests.get(served.base + "/healthz", timeout=REQUEST_HEAD_SECONDS / 2 - 1)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        deadline = time.monotonic() + REQUEST_HEAD_SECONDS + 5
        while len(closed) < len(slow) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(closed) == len(slow), "the hub kept connections whose head never ended"
    finally:
        stop.set()
        for thread in slow:
            thread.join(timeout=5)


def test_a_request_body_that_stalls_frees_its_thread(served):
    """A whole head, then a body that stops coming (Content-Length says more): the thread
    that serves the request waits for the body, and waited for ever. It now waits at most
    REQUEST_BODY_SECONDS, then the request is refused as cut off and the connection closed
    (what the connection sends next cannot be told apart from the rest of the body)."""
    port = _port(served)
    stalled = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_BODY_SECONDS + 10)
        sock.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                     b"x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant_type=")
        stalled.append(sock)
    try:
        time.sleep(1)
        started = time.monotonic()
        r = requests.get(served.base + "/healthz", timeout=2 * REQUEST_BODY_SECONDS + 10)
        assert r.status_code == 200
        assert time.monotonic() - started < 2 * REQUEST_BODY_SECONDS + 2
        for sock in stalled:  # each answered (or closed), then closed
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:  # (closed with the rest of the body unread)
                pass
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    finally:
        for sock in stalled:
            sock.close()


def test_pipelined_requests_behind_a_slow_head_are_still_answered_in_order(served):
    """A whole request, then the start of a second one in the same packet: the first is
    answered at once, the second once its head is whole (it waits in the poller, not in a
    thread)."""
    port = _port(served)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHo")
        time.sleep(0.5)
        sock.sendall(b"st: x\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk
    first, second = answers.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200") and second.startswith(b"404")


# -- the session cookie over https: __Host- (OWASP ASVS 3.4.4) ------------------------------

PUBLIC = "https://login.example.test"


@pytest.fixture
def https_hub(make_hub: Any) -> Any:
    """A hub whose issuer is https, as in production (behind the proxy)."""
    return make_hub(issuer=PUBLIC)


def _login_page(client: Any) -> tuple[str, str]:
    """An authorization request that leaves a login flow in a new session: (the session
    cookie's Set-Cookie, the login page's path)."""
    r = client.get(AuthRequest().url(), base_url=PUBLIC)
    assert r.status_code in (302, 303), r.get_data(as_text=True)[:300]
    return r.headers["Set-Cookie"], r.headers["Location"]


def test_over_https_the_session_cookie_is_a_host_cookie(https_hub):
    """A sibling host (an agency's site on the same parent domain, or any page there with an
    XSS) can set a cookie for the parent domain named like the hub's. The browser sends both,
    the more specific path first, and the hub read the first: the sibling could put the
    citizen in a session of its choosing (signed in as the attacker: login CSRF). A cookie
    whose name starts with __Host- is kept by the browser only if this very host set it,
    Secure, with Path=/ and no Domain (RFC 6265bis 4.1.3.2)."""
    cookie, _ = _login_page(https_hub.test_client())
    name, _, rest = cookie.partition("=")
    assert name == "__Host-civitas_session", cookie
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in rest.split(";")[1:]}
    assert "secure" in attributes and "httponly" in attributes, cookie
    assert attributes["path"] == "Path=/" and "domain" not in attributes, cookie


def test_over_https_a_cookie_without_the_prefix_is_not_a_session(https_hub):
    """The session id of a cookie a sibling host could have planted (no __Host- prefix) is
    not read: the login flow it holds is not found."""
    owner = https_hub.test_client()
    cookie, login = _login_page(owner)
    sid = cookie.split(";")[0].partition("=")[2]
    assert owner.get(login, base_url=PUBLIC).status_code == 200
    planted = https_hub.test_client()
    planted.set_cookie("civitas_session", sid, domain="login.example.test")
    r = planted.get(login, base_url=PUBLIC)
    assert r.status_code != 200 or "Example ID" not in r.get_data(as_text=True)


def test_over_https_an_emptied_session_deletes_the_host_cookie(https_hub):
    """Signing out empties the session and deletes its cookie: a deletion of a __Host-
    cookie must itself be Secure, or the browser ignores it and keeps the cookie."""
    from flask import request

    cookie, _ = _login_page(https_hub.test_client())
    sid = cookie.split(";")[0].partition("=")[2]
    with https_hub.test_request_context(
            "/account", base_url=PUBLIC, headers={"Cookie": f"__Host-civitas_session={sid}"}):
        interface = https_hub.session_interface
        opened = interface.open_session(https_hub, request)
        assert opened.sid == sid and opened
        opened.clear()
        response = https_hub.response_class()
        interface.save_session(https_hub, opened, response)
    deleted = response.headers["Set-Cookie"]
    assert deleted.startswith("__Host-civitas_session=;") and "Secure" in deleted, deleted


# -- the documented proxy: no version in what it answers (OWASP ASVS 14.3.3) ----------------

#: deploy/nginx.conf in front of `civitas serve` (tests/test_reverse_proxy.py)
proxied = test_reverse_proxy.proxied


def test_the_proxy_names_no_version(proxied):
    """deploy/nginx.conf left nginx's `server_tokens` on: every answer through the proxy
    said `Server: nginx/1.22.1`, and nginx's own error pages (a body over 64 KiB, a head too
    large, /metrics) printed the version too: what an attacker looks up in a list of
    known vulnerabilities first."""
    session = proxied.client()
    answers = [
        session.get(f"{proxied.base}/.well-known/openid-configuration", timeout=10),
        session.get(f"{proxied.base}/metrics", timeout=10),
        session.post(f"{proxied.base}/token", data="a" * (65 * 1024), timeout=10, headers={
            "Content-Type": "application/x-www-form-urlencoded"}),
        requests.get(f"{proxied.http_base}/", allow_redirects=False, timeout=10),
    ]
    assert [r.status_code for r in answers] == [200, 404, 413, 301]
    for r in answers:
        assert r.headers.get("Server") == "nginx", r.headers
        assert not re.search(r"nginx/\d", r.text), r.text


def test_one_process_hub_closes_connections_that_send_nothing(tmp_path, upstream_issuer,
                                                              pg_database_url, redis_url):
    """`civitas serve` with one process runs waitress, which takes 100 connections at most
    and closed an idle one after 120 s, looked for every 30 s: 120 connections that sent
    nothing, and the hub answered nobody for two minutes (then again, for as long as they
    were opened anew). It now closes them after the same 2 s as the workers of
    `--workers N`."""
    port = servers.free_port()
    settings = hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                          issuer=f"http://127.0.0.1:{port}")
    with servers.run_hub(tmp_path, settings, port, workers=1):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(120)]
        try:
            time.sleep(0.5)
            r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=8)
            assert r.status_code == 200
            for sock in idle:  # closed by the hub, not left open
                assert sock.recv(1) == b""
        finally:
            for sock in idle:
                sock.close()


# -- what the hub writes: readable by its own user alone -----------------------------------


def test_a_sqlite_database_the_hub_creates_is_its_user_s_alone(tmp_path, upstream_issuer):
    """With SQLite (one process, the demo) the hub creates the database file and its
    directory: they were made with the process's umask (0644, 0755), so any user of the
    machine could copy the consents, the agencies' decision history and the ledger. PostgreSQL
    keeps its files to its own user; so does the hub now (0600, and 0700 for a directory it
    makes)."""
    from civitas.app import create_app, stop_background

    where = tmp_path / "var" / "hub"
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{where}/civitas.db"))
    try:
        assert (where / "civitas.db").stat().st_mode & 0o777 == 0o600
        assert where.stat().st_mode & 0o777 == 0o700
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()
