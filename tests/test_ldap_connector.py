"""The LDAP connector against a real OpenLDAP slapd (tests/servers.py:run_slapd).

No mocks: the faults are real too (a closed port, a socket that accepts and stays silent, a
TCP proxy that cuts pooled connections, a certificate from another CA or for another name).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ldap3
import pytest

from connectors.base import (
    ConnectorError,
    PasswordConnector,
    UpstreamResponseInvalid,
    UpstreamUnavailable,
)
from connectors.ldap import InvalidCredentials, LDAPConfig, LDAPConnector
from kernel.errors import ConfigError
from tests import servers

pytestmark = pytest.mark.skipif(not servers.find_slapd(), reason="slapd is not installed")

PEOPLE = "ou=people,dc=example,dc=org"
GROUPS = "ou=groups,dc=example,dc=org"
STAR_UID = "st*r(x)\\y"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with servers.run_slapd(tmp_path_factory.mktemp("slapd"), tls=True) as info:
        yield info


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


def search_config(slapd: dict[str, Any], **overrides: Any) -> LDAPConfig:
    """Search-then-bind as the service account, groups by group search."""
    config = LDAPConfig(
        id="agency-ldap", display_name="Agency Directory", url=slapd["url"],
        bind_dn=slapd["svc_dn"], bind_password=slapd["svc_password"], user_base_dn=PEOPLE,
        group_base_dn=GROUPS, timeout_seconds=TIMEOUT, pool_size=2,
    )
    return replace(config, **overrides)


def direct_config(slapd: dict[str, Any], **overrides: Any) -> LDAPConfig:
    """Direct bind; the person reads their own entry and its memberOf."""
    config = LDAPConfig(
        id="agency-ldap", display_name="Agency Directory", url=slapd["url"],
        user_dn_template=f"uid={{username}},{PEOPLE}", group_attribute="memberOf",
        timeout_seconds=TIMEOUT,
    )
    return replace(config, **overrides)


MODES = {"search": search_config, "direct": direct_config}


@pytest.fixture(params=sorted(MODES))
def connector(request: pytest.FixtureRequest, slapd: dict[str, Any]) -> Iterator[LDAPConnector]:
    c = LDAPConnector(MODES[request.param](slapd))
    yield c
    c.close()


def entry_uuid(slapd: dict[str, Any], dn: str) -> str:
    server = ldap3.Server("127.0.0.1", port=_port(slapd["url"]), get_info=ldap3.NONE)
    with ldap3.Connection(server, slapd["admin_dn"], slapd["admin_password"],
                          auto_bind=True, receive_timeout=5) as conn:
        conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["entryUUID"])
        return str(conn.response[0]["raw_attributes"]["entryUUID"][0].decode())


# -- logins ------------------------------------------------------------------------------


def test_is_a_password_connector(connector: LDAPConnector) -> None:
    assert isinstance(connector, PasswordConnector)
    assert connector.acr == "urn:civitas:acr:ial1:aal1"


def test_login_returns_the_mapped_identity(connector: LDAPConnector, slapd: dict[str, Any]):
    identity = connector.login("alice", "alice-ldap-pw")
    dn = f"uid=alice,{PEOPLE}"
    assert identity.connector_id == "agency-ldap"
    assert identity.subject == entry_uuid(slapd, dn)
    assert identity.subject not in (dn, "alice")
    assert identity.attributes == {
        "name": "Alice Directory", "given_name": "Alice", "family_name": "Directory",
        "email": "alice@agency.example", "preferred_username": "alice",
        "groups": ["admins", "staff"],
    }
    assert identity.acr == "urn:civitas:acr:ial1:aal1"
    assert identity.amr == ("pwd",)
    assert identity.connector_data == {"dn": dn}


def test_member_of_groups_in_search_mode(slapd: dict[str, Any]) -> None:
    c = LDAPConnector(search_config(slapd, group_base_dn=None, group_attribute="memberOf"))
    assert c.login("bob", "bob-ldap-pw").attributes["groups"] == ["staff"]


def test_no_groups_configured_means_no_groups_claim(slapd: dict[str, Any]) -> None:
    c = LDAPConnector(search_config(slapd, group_base_dn=None))
    assert "groups" not in c.login("bob", "bob-ldap-pw").attributes


def test_username_with_filter_and_dn_metacharacters(connector: LDAPConnector,
                                                    slapd: dict[str, Any]) -> None:
    identity = connector.login(STAR_UID, "star-pw")
    assert identity.attributes["preferred_username"] == STAR_UID
    # the group search puts this DN into a filter: it must be escaped there too
    assert identity.attributes["groups"] == ["puzzlers"]
    assert identity.subject == entry_uuid(slapd, identity.connector_data["dn"])
    with pytest.raises(InvalidCredentials):
        connector.login(STAR_UID, "alice-ldap-pw")


def test_wrong_password_and_unknown_user_look_the_same(connector: LDAPConnector) -> None:
    with pytest.raises(InvalidCredentials) as wrong:
        connector.login("alice", "not-her-password")
    with pytest.raises(InvalidCredentials) as unknown:
        connector.login("mallory", "alice-ldap-pw")
    assert type(wrong.value) is type(unknown.value) is InvalidCredentials
    assert str(wrong.value) == str(unknown.value) == "Wrong username or password."
    assert wrong.value.public_message == unknown.value.public_message
    assert wrong.value.status_code == unknown.value.status_code == 401


def test_more_than_one_match_is_a_failed_login(slapd: dict[str, Any]) -> None:
    broad = "(&(objectClass=inetOrgPerson)(|(uid={username})(mail=*@agency.example)))"
    c = LDAPConnector(search_config(slapd, user_filter=broad))
    with pytest.raises(InvalidCredentials):
        c.login("alice", "alice-ldap-pw")


def test_two_matches_within_the_size_limit_are_a_failed_login(slapd: dict[str, Any]) -> None:
    """Exactly two entries match: within the search's size limit (2), so the directory
    answers success with both, and only the count of entries refuses them, whichever comes
    first (each logs in with their own password)."""
    two = "(&(objectClass=inetOrgPerson)(|(uid={username})(uid=alice)(uid=bob)))"
    c = LDAPConnector(search_config(slapd, user_filter=two))
    for username in ("alice", "bob"):
        with pytest.raises(InvalidCredentials):
            c.login(username, f"{username}-ldap-pw")
    c.close()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_entry_without_its_subject_is_refused_and_the_log_says_why(slapd: dict[str, Any],
                                                                     mode: str) -> None:
    """The password was right, but the entry has no stable subject to map to an account:
    the login is refused (never keyed on something else) and the error names the cause."""
    c = LDAPConnector(MODES[mode](slapd, subject_attribute="employeeNumber"))
    with pytest.raises(UpstreamResponseInvalid) as caught:
        c.login("alice", "alice-ldap-pw")
    assert caught.value.detail == "the entry has 0 values of employeeNumber, not one"
    assert caught.value.status_code == 502 and "employeeNumber" not in str(caught.value)


@pytest.mark.parametrize("password", ["", " ", "\t\n ", "\u3000"])
def test_empty_password_never_reaches_the_server(slapd: dict[str, Any], password: str) -> None:
    closed = f"ldap://127.0.0.1:{servers.free_port()}"
    for make in MODES.values():
        offline = LDAPConnector(make(slapd, url=closed))
        with pytest.raises(InvalidCredentials):
            offline.login("alice", password)
        # ...while a real attempt against that port does reach the network and fails there
        with pytest.raises(UpstreamUnavailable):
            offline.login("alice", "alice-ldap-pw")
        online = LDAPConnector(make(slapd))
        with pytest.raises(InvalidCredentials):
            online.login("alice", password)


@pytest.mark.parametrize(("username", "password"), [
    ("", "alice-ldap-pw"), ("  ", "alice-ldap-pw"), ("alice\x00", "alice-ldap-pw"),
    ("a" * 257, "alice-ldap-pw"), ("alice", "p" * 1025),
])
def test_what_can_never_be_a_login_never_reaches_the_server(slapd: dict[str, Any],
                                                            username: str,
                                                            password: str) -> None:
    """A blank username, a NUL, a username or password past its length cap: refused by the
    hub's own input check, so the closed port (which a real attempt reaches, see above) is
    never tried."""
    closed = f"ldap://127.0.0.1:{servers.free_port()}"
    for make in MODES.values():
        with pytest.raises(InvalidCredentials):
            LDAPConnector(make(slapd, url=closed)).login(username, password)


@pytest.mark.parametrize("username", [
    "*", "*)(uid=*))(|(uid=*", "alice)(|(uid=*", "al*", "alice\x00", "\x00",
    "alice,ou=people", f"alice,{PEOPLE}", "cn=admin", "cn=admin,dc=example,dc=org",
    "alice)", "(uid=alice)", "alice\\", " ", "", "a" * 257,
    "al\\69ce",  # "alice" to a directory that reads the escape (RFC 4515 3, RFC 4514 2.4)
])
def test_injection_usernames_never_log_in(connector: LDAPConnector, username: str) -> None:
    with pytest.raises(InvalidCredentials):
        connector.login(username, "alice-ldap-pw")


def test_admin_dn_as_username_with_admin_password(connector: LDAPConnector,
                                                  slapd: dict[str, Any]) -> None:
    for username in ("cn=admin", slapd["admin_dn"], "admin"):
        with pytest.raises(InvalidCredentials):
            connector.login(username, slapd["admin_password"])


def test_service_account_is_not_a_citizen(slapd: dict[str, Any]) -> None:
    c = LDAPConnector(search_config(slapd))
    for username in ("civitas-svc", slapd["svc_dn"]):
        with pytest.raises(InvalidCredentials):
            c.login(username, slapd["svc_password"])


def test_a_refused_service_account_is_not_a_wrong_password(slapd: dict[str, Any]) -> None:
    c = LDAPConnector(search_config(slapd, bind_password="not-the-service-password"))
    with pytest.raises(ConnectorError) as err:
        c.login("alice", "alice-ldap-pw")
    assert not isinstance(err.value, InvalidCredentials)
    assert err.value.status_code == 502


# -- TLS ---------------------------------------------------------------------------------


def _tls_variants(slapd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    port = _port(slapd["url"])
    return {
        "ldaps": {"url": slapd["ldaps_url"]},
        "ldaps-localhost": {"url": f"ldaps://localhost:{_port(slapd['ldaps_url'])}"},
        "starttls": {"url": slapd["url"], "start_tls": True},
        "starttls-localhost": {"url": f"ldap://localhost:{port}", "start_tls": True},
    }


@pytest.mark.parametrize("variant", ["ldaps", "ldaps-localhost", "starttls",
                                     "starttls-localhost"])
def test_tls_with_the_right_ca(slapd: dict[str, Any], variant: str) -> None:
    settings = _tls_variants(slapd)[variant]
    for make in MODES.values():
        c = LDAPConnector(make(slapd, ca_file=slapd["ca_file"], **settings))
        assert c.login("alice", "alice-ldap-pw").attributes["groups"] == ["admins", "staff"]
        c.close()


def _causes(exc: BaseException) -> str:
    """The messages of ``exc`` and of what it was raised from, down the chain."""
    messages = []
    cause: BaseException | None = exc
    while cause is not None:
        messages.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(messages)


@pytest.mark.parametrize("variant", ["ldaps", "starttls"])
def test_tls_with_another_ca_fails_closed(slapd: dict[str, Any], variant: str,
                                          tmp_path: Any) -> None:
    other_ca = servers.write_test_ca(tmp_path, "Some Other CA")
    settings = _tls_variants(slapd)[variant]
    for make in MODES.values():
        c = LDAPConnector(make(slapd, ca_file=str(other_ca), **settings))
        with pytest.raises(UpstreamUnavailable) as refused:
            c.login("alice", "alice-ldap-pw")
        # refused by the chain's verification, not by some other failure to connect
        assert "certificate verify failed" in _causes(refused.value), _causes(refused.value)
        assert "mismatch" not in _causes(refused.value)


@pytest.mark.parametrize("variant", ["ldaps", "starttls"])
def test_tls_to_a_name_the_certificate_does_not_carry_fails_closed(slapd: dict[str, Any],
                                                                  variant: str) -> None:
    """The real slapd, its certificate (for localhost and 127.0.0.1) from the trusted CA,
    reached at 127.0.0.2 (a TCP proxy there): LDAPS and StartTLS alike check the name."""
    target = slapd["ldaps_url"] if variant == "ldaps" else slapd["url"]
    proxy = TCPProxy(_port(target), host="127.0.0.2")
    try:
        scheme = "ldaps" if variant == "ldaps" else "ldap"
        url = f"{scheme}://127.0.0.2:{proxy.port}"
        for make in MODES.values():
            c = LDAPConnector(make(slapd, url=url, start_tls=variant == "starttls",
                                   ca_file=slapd["ca_file"]))
            with pytest.raises(UpstreamUnavailable) as refused:
                c.login("alice", "alice-ldap-pw")
            assert "IP address mismatch" in _causes(refused.value), _causes(refused.value)
        assert proxy.accepted == 2  # the directory was reached, once for each mode
    finally:
        proxy.close()


class TLSServer:
    """Accepts TLS with the given certificate; records whether any handshake completed."""

    def __init__(self, cert: Any, key: Any) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except OSError:
                conn.close()

    def close(self) -> None:
        self.sock.close()


def test_tls_certificate_for_another_name_fails_closed(slapd: dict[str, Any],
                                                       tmp_path: Any) -> None:
    # issued by the trusted CA, but for another host
    cert, key = servers.write_server_cert(tmp_path, slapd["ca_file"], ("ldap.other.example",))
    server = TLSServer(cert, key)
    try:
        c = LDAPConnector(search_config(slapd, url=f"ldaps://127.0.0.1:{server.port}",
                                        ca_file=slapd["ca_file"]))
        with pytest.raises(UpstreamUnavailable) as refused:
            c.login("alice", "alice-ldap-pw")
        assert "IP address mismatch" in _causes(refused.value), _causes(refused.value)
        assert server.handshakes == 0
    finally:
        server.close()


# -- an unreachable or silent directory --------------------------------------------------


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never sends a byte."""
    sock = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
        for conn in accepted:
            conn.close()


def _fails_unavailable_in_time(c: LDAPConnector) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as err:
        c.login("alice", "alice-ldap-pw")
    assert time.monotonic() - started < TIMEOUT + 1
    assert err.value.status_code == 502
    assert "Agency Directory could not be reached" in err.value.public_message


@pytest.mark.parametrize("mode", sorted(MODES))
def test_closed_port(slapd: dict[str, Any], mode: str) -> None:
    c = LDAPConnector(MODES[mode](slapd, url=f"ldap://127.0.0.1:{servers.free_port()}"))
    _fails_unavailable_in_time(c)


def transport(slapd: dict[str, Any], variant: str, port: int) -> dict[str, Any]:
    """The settings that reach 127.0.0.1:``port`` as ``variant`` (ldap, ldaps, starttls)."""
    return {
        "ldap": {"url": f"ldap://127.0.0.1:{port}"},
        "ldaps": {"url": f"ldaps://127.0.0.1:{port}", "ca_file": slapd["ca_file"]},
        "starttls": {"url": f"ldap://127.0.0.1:{port}", "start_tls": True,
                     "ca_file": slapd["ca_file"]},
    }[variant]


@pytest.mark.parametrize("variant", ["ldap", "ldaps", "starttls"])
def test_silent_server(slapd: dict[str, Any], variant: str) -> None:
    with silent_server() as port:
        settings = transport(slapd, variant, port)
        _fails_unavailable_in_time(LDAPConnector(search_config(slapd, **settings)))
        _fails_unavailable_in_time(LDAPConnector(direct_config(slapd, **settings)))


# -- the service-account pool ------------------------------------------------------------


class TCPProxy:
    """Forwards 127.0.0.1:port to a target; counts connections and can cut them all."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.accepted += 1
                self.open += [client, upstream]
            self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            conns, self.open = self.open, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()
        self.cut()


class TrickleProxy(TCPProxy):
    """:class:`TCPProxy` that passes the directory's answers on a byte at a time, ``gap``
    seconds apart (each within the read timeout: a "slow read"), and cuts every connection
    after ``give_up`` seconds (so that a hub without its deadline still ends the test).
    Until ``slow`` is set, answers pass at once."""

    def __init__(self, target_port: int, *, gap: float, give_up: float,
                 slow: bool = True) -> None:
        self.gap, self.give_up, self.slow = gap, give_up, slow
        super().__init__(target_port)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._trickle, args=(upstream, client), daemon=True).start()

    def _trickle(self, src: socket.socket, dst: socket.socket) -> None:
        ends = time.monotonic() + self.give_up
        try:
            while data := src.recv(65536):
                if not self.slow:
                    dst.sendall(data)
                    ends = time.monotonic() + self.give_up
                    continue
                if time.monotonic() >= ends:
                    break
                for i in range(len(data)):
                    dst.sendall(data[i:i + 1])
                    time.sleep(self.gap)
                    if time.monotonic() >= ends:
                        break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("variant", ["ldap", "ldaps", "starttls"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_directory_answering_a_byte_at_a_time_is_cut_at_its_deadline(
        slapd: dict[str, Any], mode: str, variant: str) -> None:
    """ldap3's receive timeout bounds each wait, not the answer: each byte here comes well
    within it. The exchange (a TLS handshake, a bind, a search) is cut at the timeout plus
    one read's wait (2 s here), as for HTTP upstreams (kernel.bounded), and the login is
    refused as unavailable, instead of holding its thread for as long as the directory
    likes (a second for every two bytes)."""
    target = slapd["ldaps_url"] if variant == "ldaps" else slapd["url"]
    trickle = TrickleProxy(_port(target), gap=TIMEOUT / 2, give_up=15)
    try:
        c = LDAPConnector(MODES[mode](slapd, **transport(slapd, variant, trickle.port)))
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable) as err:
            c.login("alice", "alice-ldap-pw")
        took = time.monotonic() - started
        assert took < 2 * TIMEOUT + 1.5, took
        assert "Agency Directory could not be reached" in err.value.public_message
        if variant == "ldaps":
            # Python's TLS handshake is one socket operation, which the socket's timeout
            # bounds as a whole: it gives up first, at the timeout
            assert took < TIMEOUT + 0.5, took
        else:
            assert took >= 2 * TIMEOUT, took
            assert "no whole answer within 2 s" in (err.value.detail or "")
        c.close()
    finally:
        trickle.close()
    # the same directory, answering at once, is fine
    assert LDAPConnector(MODES[mode](slapd)).login("alice", "alice-ldap-pw").subject


def test_a_search_on_a_pooled_connection_is_cut_at_its_deadline_and_the_connection_dropped(
        slapd: dict[str, Any]) -> None:
    """The service account's pooled connection, reused for a search that the directory then
    answers a byte at a time (the test above cuts the pool's opening bind instead): cut at
    the deadline, and dropped, not given back to the pool for the next login to find
    dead."""
    trickle = TrickleProxy(_port(slapd["url"]), gap=TIMEOUT / 2, give_up=15, slow=False)
    try:
        c = LDAPConnector(search_config(slapd, url=f"ldap://127.0.0.1:{trickle.port}"))
        assert c.login("alice", "alice-ldap-pw").subject
        assert c._pool is not None and len(c._pool._idle) == 1
        trickle.slow = True
        with pytest.raises(UpstreamUnavailable) as err:
            c.login("alice", "alice-ldap-pw")
        assert "no whole answer within 2 s" in (err.value.detail or "")
        assert c._pool._idle == []
        c.close()
    finally:
        trickle.close()


def test_each_exchange_s_deadline_is_an_alarm_of_the_process_s_one_watchdog(
        slapd: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread per exchange (threading.Timer): each deadline is armed on kernel.watchdog's
    one thread, and disarmed when its exchange is done, none left behind."""
    from kernel.watchdog import WATCHDOG

    def no_timer(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a thread per exchange")

    armed: list[float] = []
    arm = WATCHDOG.arm
    monkeypatch.setattr(threading, "Timer", no_timer)
    monkeypatch.setattr(WATCHDOG, "arm", lambda seconds, action: (
        armed.append(seconds), arm(seconds, action))[1])
    c = LDAPConnector(search_config(slapd))
    for _ in range(3):
        assert c.login("alice", "alice-ldap-pw").subject
    c.close()
    # per login at least the search and the password check, each within its deadline
    assert len(armed) >= 6 and set(armed) == {2 * TIMEOUT}
    assert WATCHDOG.pending() == 0


@pytest.fixture
def proxy(slapd: dict[str, Any]) -> Iterator[TCPProxy]:
    p = TCPProxy(_port(slapd["url"]))
    yield p
    p.close()


def test_service_connection_is_reused(slapd: dict[str, Any], proxy: TCPProxy) -> None:
    c = LDAPConnector(search_config(slapd, url=f"ldap://127.0.0.1:{proxy.port}"))
    for _ in range(3):
        c.login("alice", "alice-ldap-pw")
    # one pooled service connection, plus one short-lived connection per password check
    assert proxy.accepted == 1 + 3
    c.close()


def test_pool_recovers_from_cut_connections(slapd: dict[str, Any], proxy: TCPProxy) -> None:
    """As after a directory restart: every pooled connection is dead, the next login works."""
    c = LDAPConnector(search_config(slapd, url=f"ldap://127.0.0.1:{proxy.port}", pool_size=3))
    assert run_concurrently(c, [("alice", "alice-ldap-pw"), ("bob", "bob-ldap-pw")] * 3)
    proxy.cut()
    time.sleep(0.05)
    assert c.login("bob", "bob-ldap-pw").attributes["preferred_username"] == "bob"
    c.close()


def run_concurrently(c: LDAPConnector, who: list[tuple[str, str]]) -> bool:
    """Log everyone in at once; True if each got their own identity."""
    barrier = threading.Barrier(len(who))
    results: dict[int, Any] = {}

    def login(i: int, username: str, password: str) -> None:
        barrier.wait()
        try:
            results[i] = c.login(username, password).attributes["preferred_username"]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=login, args=(i, u, p)) for i, (u, p) in enumerate(who)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: u for i, (u, _) in enumerate(who)}
    return True


def test_two_concurrent_logins(slapd: dict[str, Any]) -> None:
    c = LDAPConnector(search_config(slapd, pool_size=2))
    assert run_concurrently(c, [("alice", "alice-ldap-pw"), ("bob", "bob-ldap-pw")])
    c.close()


def test_more_concurrent_logins_than_pooled_connections(slapd: dict[str, Any],
                                                       proxy: TCPProxy) -> None:
    c = LDAPConnector(search_config(slapd, url=f"ldap://127.0.0.1:{proxy.port}", pool_size=2))
    who = [("alice", "alice-ldap-pw"), ("bob", "bob-ldap-pw"), (STAR_UID, "star-pw")] * 4
    assert run_concurrently(c, who)
    # at most pool_size service connections, plus one per password check
    assert proxy.accepted <= 2 + len(who)
    c.close()


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "key"), [
    ({"url": "ldap://ldap.example.org"}, "url"),
    ({"url": "http://127.0.0.1:389"}, "url"),
    ({"url": "ldap://127.0.0.1:389/dc=example,dc=org"}, "url"),
    ({"url": "ldaps://127.0.0.1:636", "start_tls": True}, "start_tls"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
    ({"bind_password": None}, "bind_dn"),
    ({"bind_password": ""}, "bind_password"),
    ({"user_base_dn": None}, "user_base_dn"),
    ({"user_filter": "(uid=alice)"}, "user_filter"),
    ({"subject_attribute": "uid"}, "subject_attribute"),
    ({"group_attribute": "memberOf"}, "group_attribute"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
    ({"pool_size": 0}, "pool_size"),
])
def test_config_errors_name_the_field(slapd: dict[str, Any], overrides: dict[str, Any],
                                      key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        search_config(slapd, **overrides)


def test_direct_bind_needs_a_template(slapd: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="user_dn_template"):
        direct_config(slapd, user_dn_template=None)
    with pytest.raises(ConfigError, match="user_dn_template"):
        direct_config(slapd, user_dn_template="uid=alice,ou=people,dc=example,dc=org")


def test_password_is_not_in_the_repr(slapd: dict[str, Any]) -> None:
    assert slapd["svc_password"] not in repr(search_config(slapd))


# -- the test directory itself -----------------------------------------------------------


def test_run_slapd_acls_and_stop(tmp_path: Any) -> None:
    with servers.run_slapd(tmp_path) as info:
        assert info["ldaps_url"] is None and info["ca_file"] is None
        port = _port(info["url"])

        def connection(dn: str | None = None, password: str | None = None) -> Any:
            server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE)
            return ldap3.Connection(server, dn, password, auto_bind=True, receive_timeout=5)

        anonymous = connection()
        assert not anonymous.search(info["base_dn"], "(objectClass=*)")
        anonymous.unbind()
        svc = connection(info["svc_dn"], info["svc_password"])
        for base, object_class in ((PEOPLE, "inetOrgPerson"), (GROUPS, "groupOfNames")):
            svc.search(base, f"(objectClass={object_class})", attributes=["cn", "userPassword"])
            assert len(svc.response) == 3
            assert not any(e["raw_attributes"].get("userPassword") for e in svc.response)
        svc.unbind()
        alice = connection(f"uid=alice,{PEOPLE}", "alice-ldap-pw")
        assert not alice.search(f"uid=bob,{PEOPLE}", "(objectClass=*)", ldap3.BASE)
        alice.unbind()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
