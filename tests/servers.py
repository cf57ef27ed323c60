"""Start real servers for the test suite: Redis, PostgreSQL, and the upstream OP.

Plain Python (no pytest dependency) so the same helpers can serve fixtures,
scripts and the demo. Every server:

* listens on 127.0.0.1 only, on a free port,
* keeps its files and its log inside the given temp directory,
* runs in its own process group, and is stopped (SIGTERM/SIGINT, then SIGKILL
  after a timeout) when the context manager exits -- also when start-up fails,
* on start-up failure raises RuntimeError with the tail of its log.

Use the ``find_*`` helpers to decide whether to skip a test because a server
binary is genuinely not installed.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_DIR = REPO_ROOT / "demo" / "upstream"
UPSTREAM_SERVER = UPSTREAM_DIR / "server.mjs"

STOP_TIMEOUT = 10.0  # seconds between the polite signal and SIGKILL


# --------------------------------------------------------------------------
# generic helpers


#: ports this process has handed out, not handed out twice
_HANDED_OUT: set[int] = set()


@contextlib.contextmanager
def run_silent_server() -> Iterator[tuple[int, threading.Event]]:
    """A TCP server on loopback that takes connections and never answers (an upstream that
    has stopped answering): its port, and an event set once it has taken a connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.settimeout(0.2)
    taken: list[socket.socket] = []
    connected, stop = threading.Event(), threading.Event()

    def take() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                taken.append(listener.accept()[0])
                connected.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], connected
    finally:
        stop.set()
        thread.join(5)
        for conn in taken:
            conn.close()
        listener.close()


@contextlib.contextmanager
def run_trickle_server(body: bytes, gap: float, status: str = "200 OK") -> Iterator[int]:
    """An HTTP server on loopback that answers every request with ``status`` and ``body``
    (JSON, no Content-Length) one byte every ``gap`` seconds: each byte comes well within
    any read timeout longer than ``gap``, the whole answer does not (a "slow read" attack).
    Its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n\r\n"
                         .encode())
            for byte in body:
                if stop.wait(gap):
                    return
                conn.sendall(bytes([byte]))

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn = listener.accept()[0]
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from below the kernel's
    ephemeral range where there is room: a port from that range (what binding port 0 gives)
    may meanwhile become the local port of one of the suite's own outgoing connections, and
    a server started on it later fails with "Address already in use" (a module fixture that
    starts minutes after its port was chosen met exactly that)."""
    low = _ephemeral_low()
    for _ in range(50 if low > 11_000 else 0):
        port = 10_000 + secrets.randbelow(low - 10_000)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        _HANDED_OUT.add(port)
        return port


def _give_to(user: str) -> Callable[[Path], None]:
    """When running as root: a function that hands a path to the service's OS user (the
    service drops to that user and must own its files)."""
    try:
        owner = pwd.getpwnam(user)
    except KeyError:
        raise RuntimeError(f"running as root but there is no `{user}` OS user") from None

    def give(path: Path) -> None:
        os.chown(path, owner.pw_uid, owner.pw_gid)

    return give


def _writable_as(user: str, directory: Path) -> bool:
    """Give ``directory`` to ``user`` and check that ``user`` can write it: a tmpdir may sit
    under a 0700 root-owned dir (pytest's tmp_path does)."""
    _give_to(user)(directory)
    check = ["runuser", "-u", user, "--", "test", "-w", str(directory)]
    return subprocess.run(check, timeout=10).returncode == 0


def _keep(path: Path) -> None:
    """Not root: files already belong to the user the service runs as."""


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _fail(name: str, log: Path, msg: str) -> RuntimeError:
    return RuntimeError(f"{name} {msg}; last lines of {log}:\n{_log_tail(log)}")


def _unique_path(directory: Path, stem: str, suffix: str = "") -> Path:
    """directory/stem+suffix, or stem-2, stem-3... if that already exists."""
    candidate = directory / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = directory / f"{stem}-{n}{suffix}"
        n += 1
    return candidate


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> None:
    """Signal the process group we created, then SIGKILL it after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout)


@contextlib.contextmanager
def _process(
    cmd: list[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` with stdout+stderr appended to `log`; always stop it on exit.

    start_new_session puts it (and anything it forks, e.g. under runuser) in a
    process group of its own, so stopping it reaches every child.
    """
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError(f"could not start {cmd[0]}: {exc}") from exc
        try:
            yield proc
        finally:
            stop_process(proc, stop_signal)


def _wait_until(
    name: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    ready: Callable[[], bool],
    timeout: float,
) -> None:
    """Poll `ready()` until it is true; fail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        code = proc.poll()
        if code is not None:
            raise _fail(name, log, f"exited with code {code} during start-up")
        try:
            if ready():
                return
        except Exception as exc:  # noqa: BLE001 - any error just means "not yet"
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last check error: {last_error!r})" if last_error else ""
            raise _fail(name, log, f"not ready after {timeout:.0f}s{detail}")
        time.sleep(0.1)


# --------------------------------------------------------------------------
# binaries


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def find_postgres_bindir() -> Path | None:
    """Directory holding initdb and postgres: `pg_config --bindir`, else the
    newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/", p)
        return tuple(int(x) for x in m.groups() if x) if m else (0,)

    candidates += [
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True)
    ]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


def find_node() -> str | None:
    return shutil.which("node")


# --------------------------------------------------------------------------
# Redis


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


@contextlib.contextmanager
def run_redis(tmpdir: str | os.PathLike[str]) -> Iterator[str]:
    """Yield `redis://127.0.0.1:PORT/0` for a throw-away, non-persistent Redis."""
    tmpdir = Path(tmpdir)
    binary = find_redis_server()
    if not binary:
        raise RuntimeError("redis-server is not installed (run scripts/ensure-system-deps)")
    port = free_port()
    data_dir = _unique_path(tmpdir, "redis")
    data_dir.mkdir(parents=True)
    log = data_dir / "redis.log"
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--logfile",
        "",  # log to stdout, i.e. our log file
    ]
    with _process(cmd, log) as proc:
        _wait_until("redis-server", proc, log, lambda: _redis_ping(port), timeout=20)
        yield f"redis://127.0.0.1:{port}/0"


# --------------------------------------------------------------------------
# PostgreSQL

# Unix socket paths are limited to 107 bytes; leave room for "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR = 80


def _run_logged(cmd: list[str], log: Path, name: str, cwd: Path, timeout: float = 120) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            code = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
            ).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _fail(name, log, f"failed: {exc}") from exc
    if code != 0:
        raise _fail(name, log, f"exited with code {code}")


@contextlib.contextmanager
def run_postgres(tmpdir: str | os.PathLike[str]) -> Iterator[str]:
    """Yield `postgresql+psycopg://civitas:PASSWORD@127.0.0.1:PORT/civitas`.

    A fresh cluster (initdb) with fsync off, TCP on 127.0.0.1 only, and its
    unix socket in a private directory. The role `civitas` (random password)
    owns the database `civitas`.
    """
    import psycopg  # local import: only needed here
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    tmpdir = Path(tmpdir)
    bindir = find_postgres_bindir()
    if not bindir:
        raise RuntimeError("PostgreSQL server binaries not found (run scripts/ensure-system-deps)")

    as_root = os.geteuid() == 0
    # PostgreSQL refuses to run as root: then everything runs as `postgres`.
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    give_to_postgres = _give_to("postgres") if as_root else _keep

    log = _unique_path(tmpdir, "postgres", ".log")
    base = _unique_path(tmpdir, "postgres")
    base.mkdir(parents=True)
    cleanup_base: Path | None = None  # a fallback dir outside tmpdir, removed at the end

    def usable(directory: Path) -> bool:
        if len(str(directory / "sock")) > _MAX_SOCKET_DIR:
            return False
        if not as_root:
            return True
        give_to_postgres(directory)
        # tmpdir may sit under a 0700 root-owned dir (pytest's tmp_path does):
        # check that the postgres user can actually reach it.
        return subprocess.run(prefix + ["test", "-w", str(directory)], timeout=10).returncode == 0

    try:
        if not usable(base):
            base = Path(tempfile.mkdtemp(prefix="civitas-pg-"))
            cleanup_base = base
            if not usable(base):
                raise RuntimeError(
                    f"cannot prepare a PostgreSQL directory usable by postgres: {base}"
                )
        data_dir, sock_dir = base / "data", base / "sock"
        for d in (data_dir, sock_dir):
            d.mkdir(mode=0o700)
            give_to_postgres(d)

        _run_logged(
            prefix
            + [
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth-local=trust",  # socket dir is private (0700)
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            log,
            "initdb",
            cwd=base,  # runuser keeps the cwd, which `postgres` may not be able to enter
        )

        port = free_port()
        cmd = prefix + [
            str(bindir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-k",
            str(sock_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        # SIGINT = "fast" shutdown; SIGTERM ("smart") would wait for clients
        # (e.g. a pool left open by a test) to disconnect.
        with _process(cmd, log, cwd=base, stop_signal=signal.SIGINT) as proc:
            admin = make_conninfo(
                host=str(sock_dir), port=port, user="postgres", dbname="postgres", connect_timeout=2
            )

            def admin_ready() -> bool:
                with psycopg.connect(admin):
                    return True

            _wait_until("postgres", proc, log, admin_ready, timeout=60)

            password = secrets.token_urlsafe(18)
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("CREATE ROLE civitas LOGIN CREATEDB PASSWORD {}").format(
                        sql.Literal(password)
                    )
                )
                conn.execute("CREATE DATABASE civitas OWNER civitas")

            def app_ready() -> bool:
                with psycopg.connect(
                    host="127.0.0.1",
                    port=port,
                    user="civitas",
                    password=password,
                    dbname="civitas",
                    connect_timeout=2,
                ):
                    return True

            _wait_until("postgres", proc, log, app_ready, timeout=20)
            yield f"postgresql+psycopg://civitas:{password}@127.0.0.1:{port}/civitas"
    finally:
        if cleanup_base is not None:
            shutil.rmtree(cleanup_base, ignore_errors=True)


# --------------------------------------------------------------------------
# upstream OpenID Provider (demo/upstream/server.mjs)


@contextlib.contextmanager
def run_upstream_op(
    tmpdir: str | os.PathLike[str],
    clients: list[dict[str, Any]],
    alg: str = "RS256",
    users: list[dict[str, Any]] | None = None,
) -> Iterator[str]:
    """Yield the issuer URL of a fresh oidc-provider OP.

    `clients`: [{client_id, client_secret, redirect_uris, ...extra metadata}].
    `users`: replaces the built-in alice/bob table (see server.mjs).
    """
    tmpdir = Path(tmpdir)
    node = find_node()
    if not node:
        raise RuntimeError("node is not installed (run scripts/ensure-system-deps)")
    if not (UPSTREAM_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"{UPSTREAM_DIR}/node_modules is missing: run scripts/ensure-node-deps")

    tmpdir.mkdir(parents=True, exist_ok=True)
    log = _unique_path(tmpdir, "upstream-op", ".log")
    env = dict(os.environ, PORT="0", CLIENTS=json.dumps(clients), ID_TOKEN_ALG=alg)
    env.pop("ISSUER", None)
    if users is not None:
        env["USERS"] = json.dumps(users)
    else:
        env.pop("USERS", None)

    with _process([node, str(UPSTREAM_SERVER)], log, env=env, cwd=UPSTREAM_DIR) as proc:
        _wait_until("upstream OP", proc, log, lambda: announced_issuer(log) is not None,
                    timeout=20)
        yield str(announced_issuer(log))


def announced_issuer(log: Path) -> str | None:
    """The issuer a node OP prints as `LISTENING <issuer>` once bound (it shares the log
    with stderr, so the line is looked for rather than a pipe read)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("LISTENING "):
            return line.split(" ", 1)[1].strip()
    return None


# --------------------------------------------------------------------------
# throw-away TLS material (cryptography)


def write_test_ca(directory: str | os.PathLike[str], name: str = "Civitas Test CA") -> Path:
    """Write a self-signed CA as ``<stem>.pem`` (certificate) and ``<stem>.key`` into
    `directory`; return the certificate path. Good for one test run, nothing else."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = _unique_path(directory, re.sub(r"[^a-z0-9]+", "-", name.lower()), ".pem")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = cert_path.with_suffix(".key")
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path


def write_server_cert(
    directory: str | os.PathLike[str],
    ca_cert: str | os.PathLike[str],
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    stem: str = "server",
) -> tuple[Path, Path]:
    """Issue a TLS server certificate for `names` (DNS names or IP addresses, as SANs) from
    the CA written by :func:`write_test_ca`; return (certificate path, key path)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    ca_cert_path = Path(ca_cert)
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(
        ca_cert_path.with_suffix(".key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = _unique_path(directory, stem, ".pem")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = cert_path.with_suffix(".key")
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


# --------------------------------------------------------------------------
# OpenLDAP slapd

LDAP_SUFFIX = "dc=example,dc=org"
LDAP_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")


def find_slapd() -> str | None:
    """slapd lives in /usr/sbin on Debian, which is not on every user's PATH."""
    return shutil.which("slapd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def _ssha(password: str) -> str:
    """An RFC 2307 ``{SSHA}`` userPassword value (what slapd's default password-hash writes)."""
    import base64
    import hashlib

    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


#: the test tree: (rdn under the suffix, attributes); userPassword values are cleartext here
#: and hashed on the way in. Group members are given as rdns and completed with the suffix.
LDAP_TEST_PEOPLE: dict[str, dict[str, str]] = {
    "alice": {"password": "alice-ldap-pw", "cn": "Alice Directory", "givenName": "Alice",
              "sn": "Directory", "mail": "alice@agency.example"},
    "bob": {"password": "bob-ldap-pw", "cn": "Bob Builder", "givenName": "Bob",
            "sn": "Builder", "mail": "bob@agency.example"},
    "st*r(x)\\y": {"password": "star-pw", "cn": "Star Puzzler", "givenName": "Star",
                   "sn": "Puzzler", "mail": "star@agency.example"},
}
#: group cn -> member uids. ``puzzlers`` holds the user whose DN needs escaping in a filter.
LDAP_TEST_GROUPS: dict[str, tuple[str, ...]] = {
    "staff": ("alice", "bob"),
    "admins": ("alice",),
    "puzzlers": ("st*r(x)\\y",),
}


def _slapd_conf(
    run_dir: Path, data_dir: Path, admin_dn: str, admin_password: str, svc_dn: str,
    tls: tuple[Path, Path, Path] | None,
) -> str:
    schemas = "\n".join(f"include /etc/ldap/schema/{s}.schema" for s in LDAP_SCHEMAS)
    tls_lines = ""
    if tls:
        ca, cert, key = tls
        tls_lines = (f"TLSCACertificateFile {ca}\nTLSCertificateFile {cert}\n"
                     f"TLSCertificateKeyFile {key}\n")
    people = f"ou=people,{LDAP_SUFFIX}"
    groups = f"ou=groups,{LDAP_SUFFIX}"
    return f"""# generated by tests/servers.py:run_slapd
{schemas}
pidfile {run_dir}/slapd.pid
argsfile {run_dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
{tls_lines}
database mdb
suffix "{LDAP_SUFFIX}"
rootdn "{admin_dn}"
rootpw {_ssha(admin_password)}
directory {data_dir}
maxsize 16777216
dbnosync
index objectClass eq
index uid eq
index member eq

overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE

# Anyone may try to bind (RFC 4513 5.1.3); nobody reads a password hash.
access to attrs=userPassword
    by anonymous auth
    by * none
# The service account reads people and groups; a person reads their own entry.
access to dn.subtree="{people}"
    by dn.exact="{svc_dn}" read
    by self read
    by * none
access to dn.subtree="{groups}"
    by dn.exact="{svc_dn}" read
    by * none
access to *
    by * none
"""


def _ldap_test_tree(svc_dn: str, svc_password: str) -> list[tuple[str, dict[str, Any]]]:
    from ldap3.utils.dn import escape_rdn

    def person_dn(uid: str) -> str:
        return f"uid={escape_rdn(uid)},ou=people,{LDAP_SUFFIX}"

    entries: list[tuple[str, dict[str, Any]]] = [
        (LDAP_SUFFIX, {"objectClass": ["dcObject", "organization"], "dc": "example",
                       "o": "Example Agency"}),
    ]
    for ou in ("people", "groups", "services"):
        entries.append((f"ou={ou},{LDAP_SUFFIX}", {"objectClass": ["organizationalUnit"],
                                                   "ou": ou}))
    entries.append((svc_dn, {"objectClass": ["applicationProcess", "simpleSecurityObject"],
                             "cn": "civitas-svc", "userPassword": _ssha(svc_password)}))
    for uid, attrs in LDAP_TEST_PEOPLE.items():
        person = {k: v for k, v in attrs.items() if k != "password"}
        entries.append((person_dn(uid), {
            "objectClass": ["inetOrgPerson"], "uid": uid,
            "userPassword": _ssha(attrs["password"]), **person,
        }))
    for cn, members in LDAP_TEST_GROUPS.items():
        entries.append((f"cn={cn},ou=groups,{LDAP_SUFFIX}", {
            "objectClass": ["groupOfNames"], "cn": cn,
            "member": [person_dn(uid) for uid in members],
        }))
    return entries


@contextlib.contextmanager
def run_slapd(tmpdir: str | os.PathLike[str], *, tls: bool = False) -> Iterator[dict[str, Any]]:
    """Run a throw-away OpenLDAP slapd holding the test tree; yield how to reach it.

    The mdb database (suffix dc=example,dc=org) is loaded over LDAP by the root DN, so the
    memberof overlay fills ``memberOf``. With ``tls`` a fresh CA and a certificate for
    localhost/127.0.0.1 are generated: ``url`` then offers StartTLS and ``ldaps_url`` serves
    LDAPS; ``ca_file`` verifies both. Yields the keys url, ldaps_url (None without tls),
    base_dn, admin_dn, admin_password, svc_dn, svc_password, ca_file (None without tls).
    """
    import ldap3

    tmpdir = Path(tmpdir)
    binary = find_slapd()
    if not binary:
        raise RuntimeError("slapd is not installed (run scripts/ensure-system-deps)")

    as_root = os.geteuid() == 0
    # slapd binds its ports as root and then drops to openldap (-u/-g): from then on it
    # reads its configuration, database and TLS key as that user.
    owner = pwd.getpwnam("openldap") if as_root else None
    give_to_openldap = _give_to("openldap") if as_root else _keep

    log = _unique_path(tmpdir, "slapd", ".log")
    base = _unique_path(tmpdir, "slapd")
    base.mkdir(parents=True)
    cleanup_base: Path | None = None

    def usable(directory: Path) -> bool:
        return not as_root or _writable_as("openldap", directory)

    try:
        if not usable(base):
            base = Path(tempfile.mkdtemp(prefix="civitas-slapd-"))
            cleanup_base = base
            if not usable(base):
                raise RuntimeError(f"cannot prepare a slapd directory usable by openldap: {base}")
        data_dir = base / "data"
        data_dir.mkdir(mode=0o700)
        give_to_openldap(data_dir)

        port = free_port()
        urls = [f"ldap://127.0.0.1:{port}/"]
        ldaps_url: str | None = None
        ca_file: Path | None = None
        tls_files: tuple[Path, Path, Path] | None = None
        if tls:
            ca_file = write_test_ca(base, "Civitas LDAP Test CA")
            cert, key = write_server_cert(base, ca_file, ("localhost", "127.0.0.1"), "slapd")
            give_to_openldap(key)
            tls_files = (ca_file, cert, key)
            ldaps_port = free_port()
            while ldaps_port == port:
                ldaps_port = free_port()
            ldaps_url = f"ldaps://127.0.0.1:{ldaps_port}"
            urls.append(ldaps_url + "/")

        admin_dn = f"cn=admin,{LDAP_SUFFIX}"
        admin_password = secrets.token_urlsafe(18)
        svc_dn = f"cn=civitas-svc,ou=services,{LDAP_SUFFIX}"
        svc_password = secrets.token_urlsafe(18)
        conf = base / "slapd.conf"
        conf.write_text(_slapd_conf(base, data_dir, admin_dn, admin_password, svc_dn, tls_files))
        conf.chmod(0o640)
        give_to_openldap(conf)

        # -d 256 (stats): stay in the foreground and log each operation to our log file.
        cmd = [binary, "-d", "256", "-h", " ".join(urls), "-f", str(conf)]
        if owner is not None:  # root: bind the ports, then drop to openldap
            cmd += ["-u", "openldap", "-g", grp.getgrgid(owner.pw_gid).gr_name]
        url = f"ldap://127.0.0.1:{port}"

        def bound_as(dn: str, password: str) -> ldap3.Connection:
            # A fresh Server each time: ldap3 shuns an address for a few seconds after one
            # refused connection, which would slow the start-up poll down.
            server = ldap3.Server("127.0.0.1", port=port, get_info=ldap3.NONE, connect_timeout=2)
            conn = ldap3.Connection(server, dn, password, receive_timeout=5,
                                    raise_exceptions=True)
            conn.bind()
            return conn

        def admin_ready() -> bool:
            bound_as(admin_dn, admin_password).unbind()
            return True

        with _process(cmd, log, cwd=base) as proc:
            _wait_until("slapd", proc, log, admin_ready, timeout=30)
            admin = bound_as(admin_dn, admin_password)
            try:
                for dn, attrs in _ldap_test_tree(svc_dn, svc_password):
                    admin.add(dn, attributes=attrs)
            except ldap3.core.exceptions.LDAPException as exc:
                raise _fail("slapd", log, f"refused the test tree: {exc}") from exc
            finally:
                admin.unbind()
            bound_as(svc_dn, svc_password).unbind()
            yield {
                "url": url,
                "ldaps_url": ldaps_url,
                "base_dn": LDAP_SUFFIX,
                "admin_dn": admin_dn,
                "admin_password": admin_password,
                "svc_dn": svc_dn,
                "svc_password": svc_password,
                "ca_file": str(ca_file) if ca_file else None,
            }
    finally:
        if cleanup_base is not None:
            shutil.rmtree(cleanup_base, ignore_errors=True)


# --------------------------------------------------------------------------
# nginx (the reverse proxy of deploy/nginx.conf)


def find_nginx() -> str | None:
    """nginx lives in /usr/sbin on Debian, which is not on every user's PATH."""
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def _nginx_main_conf(base: Path, temp_dir: Path, site: Path, worker_user: str | None) -> str:
    temp_paths = "\n".join(
        f"    {kind}_temp_path {temp_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user_line = f"user {worker_user};" if worker_user else ""
    return f"""# generated by tests/servers.py:run_nginx
daemon off;
master_process on;
worker_processes 1;
{user_line}
pid {base / "nginx.pid"};
error_log {base / "error.log"} info;

events {{
    worker_connections 128;
}}

http {{
    access_log {base / "access.log"};
{temp_paths}
    include {site};
}}
"""


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@contextlib.contextmanager
def run_nginx(
    tmpdir: str | os.PathLike[str], site_config: str, ports: tuple[int, ...]
) -> Iterator[Path]:
    """Run a throw-away nginx serving `site_config` (server blocks, as for an http {} block:
    deploy/nginx.conf rendered for the test), listening on `ports` of 127.0.0.1; yield its
    directory, which holds error.log and access.log.

    The master process reads the configuration and the TLS key and binds the ports; as root
    its workers drop to `www-data` (then the temp directory for buffered bodies is theirs).
    Pid, logs and temp files stay inside the directory: nothing under /etc, /var or /run is
    read or written.
    """
    tmpdir = Path(tmpdir)
    binary = find_nginx()
    if not binary:
        raise RuntimeError("nginx is not installed (run scripts/ensure-system-deps)")

    as_root = os.geteuid() == 0
    worker_user = "www-data" if as_root else None

    base = _unique_path(tmpdir, "nginx")
    base.mkdir(parents=True)
    log = base / "nginx.log"  # stdout/stderr of the master; error.log has the rest
    temp_dir = base / "temp"
    cleanup_temp: Path | None = None

    def usable(directory: Path) -> bool:
        return not as_root or _writable_as("www-data", directory)

    try:
        temp_dir.mkdir()
        if not usable(temp_dir):
            temp_dir = Path(tempfile.mkdtemp(prefix="civitas-nginx-"))
            cleanup_temp = temp_dir
            if not usable(temp_dir):
                raise RuntimeError(f"cannot prepare an nginx temp directory for www-data: "
                                   f"{temp_dir}")
        site = base / "site.conf"
        site.write_text(site_config)
        conf = base / "nginx.conf"
        conf.write_text(_nginx_main_conf(base, temp_dir, site, worker_user))
        # -e: the error log from the very start (before the configuration is read)
        cmd = [binary, "-e", str(base / "error.log"), "-p", str(base), "-c", str(conf)]
        _run_logged(cmd + ["-t"], log, "nginx -t", cwd=base, timeout=30)

        def listening() -> bool:
            return all(_accepts(port) for port in ports)

        with _process(cmd, log, cwd=base, stop_signal=signal.SIGQUIT) as proc:
            try:
                _wait_until("nginx", proc, log, listening, timeout=20)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\nerror.log:\n{_log_tail(base / 'error.log')}") from None
            yield base
    finally:
        if cleanup_temp is not None:
            shutil.rmtree(cleanup_temp, ignore_errors=True)


# --------------------------------------------------------------------------
# the hub itself, as `civitas serve` runs it in production


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


@contextlib.contextmanager
def run_hub(
    tmpdir: str | os.PathLike[str], settings: dict[str, Any], port: int, *, workers: int = 1
) -> Iterator[Path]:
    """Run `civitas serve` (waitress for one worker, gunicorn for several) with `settings`
    written to a YAML file, on 127.0.0.1:`port` with JSON logs; yield the log file once
    /readyz answers 200. The environment's CIVITAS_* variables (and others that would change
    what the hub believes, such as gunicorn's FORWARDED_ALLOW_IPS) are not passed on."""
    import sys

    import yaml

    tmpdir = Path(tmpdir)
    base = _unique_path(tmpdir, "hub")
    base.mkdir(parents=True)
    config = base / "civitas.yaml"
    config.write_text(yaml.safe_dump(settings))
    log = base / "hub.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CIVITAS_")
                  and k not in ("AUTHLIB_INSECURE_TRANSPORT", "PROMETHEUS_MULTIPROC_DIR",
                         "FORWARDED_ALLOW_IPS")}
    cmd = [sys.executable, "-m", "civitas.cli", "--config", str(config), "serve",
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--threads", "4", "--json-logs"]
    with _process(cmd, log, env=env, cwd=REPO_ROOT) as proc:
        _wait_until("civitas serve", proc, log,
                    lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), timeout=60)
        yield log


def serve_wsgi(app: Any, port: int, *, threads: int = 8) -> tuple[Any, threading.Thread]:
    """A WSGI app (the hub, an agency site) over real HTTP on 127.0.0.1:``port`` (waitress,
    in a thread); stop it with :func:`stop_serving`."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=port, threads=threads)
    thread = threading.Thread(target=server.run, name=f"waitress-{port}", daemon=True)
    thread.start()
    return server, thread


def stop_serving(running: list[tuple[Any, threading.Thread]]) -> None:
    """Stop what :func:`serve_wsgi` started, the last first. The sockets are closed by the
    server's own loop (a thunk through its trigger), which then has nothing left to watch
    and returns: closed from this thread, a socket could go while that loop's select()
    waited on it (EBADF, an exception in the server's thread)."""
    for server, thread in reversed(running):
        sockets = server._map  # noqa: SLF001 - waitress keeps its dispatchers there

        def close_all(sockets: dict[int, Any] = sockets) -> None:
            for dispatcher in list(sockets.values()):
                dispatcher.close()

        server.trigger.pull_trigger(close_all)
        thread.join(timeout=5)
        server.task_dispatcher.shutdown(timeout=2)


class HubProcess:
    """`civitas serve --workers 2` as a real process (:func:`hub_process`): its workers, its
    readiness, and a wait for a condition that fails at once, with the log, if the hub
    stops."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log

    def workers(self) -> set[int]:
        listing = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                 text=True, check=False).stdout
        return {int(pid) for pid in listing.split()}

    def ready(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def until(self, check: Callable[[], bool], what: str, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert self.proc.poll() is None, f"the hub stopped while waiting for {what}: " + (
                self.log.read_text()[-1500:])
            assert time.monotonic() < deadline, f"never: {what}: {self.log.read_text()[-1500:]}"
            time.sleep(0.2)


@contextlib.contextmanager
def hub_process(config: Path, log: Path, *, args: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> Iterator[HubProcess]:
    """`civitas serve --workers 2 --threads 2` on a free port of 127.0.0.1, as an operator
    starts it (no CIVITAS_* variables or metrics directory from this environment; ``env``
    added), logging to ``log``; ready (both workers) when it is yielded; stopped after."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("CIVITAS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "civitas.cli", "--config", str(config), "serve",
             "--workers", "2", "--threads", "2", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**clean, **(env or {})},
            start_new_session=True)
    hub = HubProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        hub.until(lambda: hub.ready() and len(hub.workers()) == 2, "two workers ready")
        yield hub
    finally:
        stop_process(proc)
