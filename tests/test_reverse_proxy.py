"""Deployment as deploy/README.md documents it.

* The container files cannot rot silently: every file the Dockerfile copies exists and reaches
  the builder (.dockerignore), the image's command and compose.yaml's are valid `civitas`
  command lines, compose.yaml keeps its promises (health checks, nothing but the hub published
  and only on loopback, no literal secret), and `docker compose config` accepts it where the
  compose plugin is installed. deploy/docker-entrypoint.sh is run for real: it turns
  CIVITAS_*_FILE secrets into settings and upgrades the schema before serving.
* deploy/nginx.conf, run by a real nginx terminating TLS (a certificate made here) in front of
  a real hub (`civitas serve`, two gunicorn workers or one waitress process, PostgreSQL,
  Redis, trusted_proxy_hops: 1): the
  discovery document and redirects are https, the hub sees the address nginx saw and never one
  a client forged, cookies are Secure, a full login works through it. Straight to a hub with
  trusted_proxy_hops: 0, forged X-Forwarded-* headers are not believed.

The image itself is not built here (no Docker engine on the test machines).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import click
import pytest
import requests
import yaml
from click.testing import CliRunner
from requests.adapters import HTTPAdapter

from civitas.cli import main
from tests import servers
from tests.conftest import fresh_pg_database, hub_config
from tests.flows import AGENCY_ONE, UPSTREAM_CLIENT_ID, UPSTREAM_SECRET, AuthRequest, query

REPO = servers.REPO_ROOT
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "compose.yaml"
ENTRYPOINT = REPO / "deploy" / "docker-entrypoint.sh"
NGINX_CONF = REPO / "deploy" / "nginx.conf"
DEPLOY_SETTINGS = REPO / "deploy" / "civitas.yaml"

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(32)
FORGED_ADDRESS = "203.0.113.9"  # TEST-NET-3: never a real client here
CLIENT_ADDRESS = "127.0.0.2"  # the test's client connects to nginx from this address


# -- the Dockerfile -----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending: list[str] = []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) may sit inside a continuation too
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, rest = " ".join([*pending, line]).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def copies() -> list[tuple[dict[str, str], list[str], str]]:
    """(flags, sources, destination) of every COPY."""
    out = []
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY":
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
        paths = [w for w in words if not w.startswith("--")]
        out.append((flags, paths[:-1], paths[-1]))
    return out


def exec_form(keyword: str) -> list[str]:
    values = [rest for k, rest in dockerfile_instructions() if k == keyword]
    assert values, f"the Dockerfile has no {keyword}"
    parsed = json.loads(values[-1])  # the last one counts; exec form: no shell in between
    assert isinstance(parsed, list) and all(isinstance(w, str) for w in parsed)
    return parsed


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def sent_to_builder(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the repository) into the build context:
    the last matching pattern decides, and a pattern matching a parent directory matches its
    contents (Docker's rules, for the patterns this repository uses)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


def test_every_file_the_dockerfile_copies_exists_and_reaches_the_builder():
    local = [(flags, sources, dest) for flags, sources, dest in copies() if "from" not in flags]
    assert local, "the Dockerfile copies nothing from the repository"
    for _, sources, _ in local:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert sent_to_builder(source), f"COPY {source}: excluded by .dockerignore"
            if (REPO / source).is_dir():
                for f in (REPO / source).rglob("*.py"):
                    rel = f.relative_to(REPO).as_posix()
                    assert "__pycache__" in rel or sent_to_builder(rel), rel
    # every package pyproject.toml installs is copied: `pip install .` would miss the others
    copied = {s.strip("/") for _, sources, _ in local for s in sources}
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r'include = \[([^\]]*)\]', pyproject)
    assert include is not None
    packages = {p.strip(' "*') for p in include.group(1).split(",")}
    assert packages <= copied, f"packages not copied: {sorted(packages - copied)}"


def test_the_build_context_leaves_secrets_and_local_state_out():
    for path in ("deploy/secrets/civitas_encryption_key", "deploy/secrets/postgres_password",
                 ".env", "var/civitas.db", ".venv/bin/python", ".git/config", "tests/conftest.py",
                 "civitas/server.key", "config/tls.pem", "civitas/__pycache__/cli.pyc"):
        assert not sent_to_builder(path), f"{path} would be sent to the image builder"


def test_dockerfile_builds_a_non_root_image_without_dev_extras_or_secrets():
    steps = dockerfile_instructions()
    bases = [rest.split()[0] for k, rest in steps if k == "FROM"]
    assert len(bases) >= 2, "expected a multi-stage build"
    assert set(bases) == {"python:3.11-slim-bookworm"}
    runtime = [k for k, _ in steps][max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]
    assert "USER" in runtime, "the runtime stage never leaves root"
    user = [rest for k, rest in steps if k == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    installs = " ".join(rest for k, rest in steps if k == "RUN" and "pip install" in rest)
    assert re.search(r"pip install \.(\s|$)", installs), "install the project (pyproject.toml)"
    assert "[test]" not in installs
    health = [rest for k, rest in steps if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    for k, rest in steps:
        if k in ("ENV", "ARG"):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", rest), rest


def check_civitas_command(argv: list[str]) -> None:
    """`argv` is a valid `civitas` command line: --help works on it, and every option value
    converts (types, ranges) as in a real run, which is not started."""
    assert argv[0] == "civitas", argv
    args = list(argv[1:])
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    command: click.Command = main
    ctx = command.make_context("civitas", list(args))
    while isinstance(command, click.Group):
        rest = list(ctx.args)  # a group leaves its subcommand's name and arguments
        name = args[len(args) - len(rest) - 1]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"no command {name!r} in {argv}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command, args = sub, rest


def test_dockerfile_runs_the_entrypoint_then_a_valid_civitas_serve():
    entrypoint = exec_form("ENTRYPOINT")
    assert len(entrypoint) == 1
    targets = {dest: sources for _, sources, dest in copies()}
    installed_as = entrypoint[0] if entrypoint[0].startswith("/") else \
        f"/usr/local/bin/{entrypoint[0]}"  # on the image's PATH
    assert targets.get(installed_as) == ["deploy/docker-entrypoint.sh"]
    assert os.access(ENTRYPOINT, os.X_OK)
    cmd = exec_form("CMD")
    assert cmd[:2] == ["civitas", "serve"]
    check_civitas_command(cmd)
    assert "0.0.0.0" in cmd and "--workers" in cmd  # reachable from outside the container
    port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{port}/healthz" in " ".join(r for k, r in dockerfile_instructions()
                                                   if k == "HEALTHCHECK")
    # the entry point's own civitas invocations are valid too
    script = ENTRYPOINT.read_text()
    calls = re.findall(r"^\s*(civitas [a-z ]+)$", script, re.MULTILINE)
    assert calls == ["civitas db upgrade"]
    for call in calls:
        check_civitas_command(call.split())


# -- compose.yaml ---------------------------------------------------------------------------


def _default(value: str) -> str:
    """A compose value with its ${VAR:-default} interpolations at their defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_file_keeps_its_promises():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"hub", "sealer", "postgres", "redis"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"] == "redis:7"
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    hub = services["hub"]
    assert hub["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "redis": {"condition": "service_healthy"}}
    # only the hub publishes a port, and on loopback unless the operator says otherwise
    assert "ports" not in services["postgres"] and "ports" not in services["redis"]
    assert hub["ports"] and all(_default(p).startswith("127.0.0.1:") for p in hub["ports"])
    # data lives in named volumes
    for name in ("postgres", "redis"):
        for volume in services[name]["volumes"]:
            assert volume.split(":")[0] in compose["volumes"], f"{name}: {volume}"
    # no secret is written in the file: they are files mounted as compose secrets
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"KEY|SECRET|PASSWORD|TOKEN", key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), \
                    f"{name}: {key} holds a literal value"
        assert set(service.get("secrets", [])) <= set(compose["secrets"])
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"file"} and secret["file"].startswith("./deploy/secrets/"), name
        assert not sent_to_builder(secret["file"].removeprefix("./"))
    # the hub's command and settings
    check_civitas_command(hub["command"])
    assert "./deploy/civitas.yaml:/etc/civitas/civitas.yaml:ro" in hub["volumes"]
    assert hub["environment"]["CIVITAS_CONFIG"] == "/etc/civitas/civitas.yaml"
    port = hub["command"][hub["command"].index("--port") + 1]
    assert any(_default(p).endswith(f":{port}") for p in hub["ports"])
    assert f"127.0.0.1:{port}/" in " ".join(hub["healthcheck"]["test"])
    # one sealer process signs the ledger's checkpoints, from the hub's image and settings,
    # and the hub's workers leave sealing to it; its health check reads its heartbeat file
    sealer = services["sealer"]
    check_civitas_command(sealer["command"])
    assert sealer["command"][1:3] == ["audit", "seal"] and "ports" not in sealer
    assert sealer["image"] == hub["image"] and sealer["volumes"] == hub["volumes"]
    assert sealer["depends_on"] == {"hub": {"condition": "service_healthy"}}
    for service in (hub, sealer):
        assert service["environment"]["CIVITAS_LEDGER_SEAL_INTERVAL_SECONDS"] == "0"
    heartbeat = sealer["command"][sealer["command"].index("--heartbeat") + 1]
    assert heartbeat.startswith("/tmp/") and heartbeat in " ".join(sealer["healthcheck"]["test"])
    assert {k: v for k, v in sealer["environment"].items() if k.endswith("_FILE")} == {
        k: v for k, v in hub["environment"].items() if k.endswith("_FILE")}
    # the settings file points at the compose services and trusts exactly one proxy
    settings = yaml.safe_load(DEPLOY_SETTINGS.read_text())
    assert "@postgres:5432/" in settings["database_url"]
    assert settings["redis_url"].startswith("redis://redis:6379/")
    assert settings["trusted_proxy_hops"] == 1 and settings["issuer"].startswith("https://")


def test_secret_files_are_never_committed():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("civitas_encryption_key", "postgres_password", "anything-else"):
        path = f"deploy/secrets/{name}"
        checked = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, timeout=30)
        assert checked.returncode == 0, f"{path} is not ignored by git"


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_docker_compose_accepts_the_compose_file(tmp_path):
    if not _docker_compose_available():
        pytest.skip("the docker compose plugin is not installed (`docker compose version` "
                    "fails), so compose.yaml is checked by the structural test only")
    # a copy with stand-ins for the secret files, which only operators have
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    (tmp_path / "deploy" / "secrets").mkdir(parents=True)
    shutil.copy(DEPLOY_SETTINGS, tmp_path / "deploy" / "civitas.yaml")
    for name in yaml.safe_load(COMPOSE.read_text())["secrets"]:
        (tmp_path / "deploy" / "secrets" / name).write_text("stand-in\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIVITAS_", "COMPOSE_"))}
    result = subprocess.run(["docker", "compose", "-f", "compose.yaml", "config", "--quiet"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- deploy/docker-entrypoint.sh ----------------------------------------------------------


def run_entrypoint(tmp_path: Path, command: list[str],
                   **env: str) -> subprocess.CompletedProcess[str]:
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    if not (venv_bin / "civitas").exists():
        venv_bin = Path(shutil.which("civitas") or "civitas").parent
    base = {"PATH": f"{venv_bin}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path),
            "LANG": "C.UTF-8"}
    return subprocess.run([str(ENTRYPOINT), *command], env={**base, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def secret_file(directory: Path, name: str, value: str) -> str:
    path = directory / name
    path.write_text(value + "\n")  # as `echo` or an editor would leave it
    path.chmod(0o400)
    return str(path)


@pytest.fixture
def secret_env(tmp_path: Path) -> dict[str, str]:
    """The image's environment as compose.yaml sets it, with secret files made here."""
    from cryptography.fernet import Fernet

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    return {
        "CIVITAS_CONFIG": str(DEPLOY_SETTINGS),
        "CIVITAS_ENCRYPTION_KEY_FILE": secret_file(secrets_dir, "civitas_encryption_key",
                                                   Fernet.generate_key().decode()),
        "CIVITAS_PAIRWISE_SECRET_FILE": secret_file(secrets_dir, "civitas_pairwise_secret",
                                                    secrets.token_urlsafe(48)),
        # the PostgreSQL of compose.yaml is not here: the schema goes to SQLite instead
        "CIVITAS_DATABASE_URL_FILE": secret_file(secrets_dir, "database_url",
                                                 f"sqlite:///{tmp_path}/civitas.db"),
        "PGPASSWORD_FILE": secret_file(secrets_dir, "postgres_password", "pg-secret"),
    }


def test_entrypoint_upgrades_the_schema_before_serving(tmp_path, secret_env):
    # `serve --help` stands in for the server: the upgrade must have run before it
    result = run_entrypoint(tmp_path, ["civitas", "serve", "--help"], **secret_env)
    assert result.returncode == 0, result.stderr
    assert "database at revision" in result.stdout and "--workers" in result.stdout
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path}/civitas.db")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    skipped = run_entrypoint(tmp_path, ["civitas", "serve", "--help"], **secret_env,
                             CIVITAS_SKIP_DB_UPGRADE="1")
    assert skipped.returncode == 0 and "database at revision" not in skipped.stdout


def test_entrypoint_turns_secret_files_into_settings(tmp_path, secret_env):
    # deploy/civitas.yaml is valid with the secrets the entry point reads from files
    check = run_entrypoint(tmp_path, ["civitas", "config", "check", str(DEPLOY_SETTINGS)],
                           **secret_env)
    assert check.returncode == 0, check.stderr
    assert "valid" in check.stdout and "civitas db upgrade" not in check.stdout
    shown = run_entrypoint(tmp_path, ["sh", "-c", "env"], **secret_env)
    env = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert env["PGPASSWORD"] == "pg-secret"  # newline stripped
    assert env["CIVITAS_DATABASE_URL"] == f"sqlite:///{tmp_path}/civitas.db"
    assert not [k for k in env if k.endswith("_FILE")], "the *_FILE variables stay set"


def test_entrypoint_refuses_a_missing_or_doubled_secret(tmp_path, secret_env):
    missing = run_entrypoint(tmp_path, ["true"], **{
        **secret_env, "CIVITAS_PAIRWISE_SECRET_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 1
    assert "CIVITAS_PAIRWISE_SECRET_FILE" in missing.stderr and "cannot be read" in missing.stderr
    doubled = run_entrypoint(tmp_path, ["true"], **secret_env, PGPASSWORD="inline")
    assert doubled.returncode == 1 and "give only one of PGPASSWORD" in doubled.stderr


def test_nginx_closes_idle_hub_connections_before_the_hub_does():
    """A request nginx sends on a kept-alive connection that the hub is closing at that
    moment fails, and nginx retries no POST (/token, the decision API) elsewhere: a 502 for
    the client. So nginx's idle time for its connections to the hub must be shorter than
    the hub's own (RFC 9112 section 9.6: either side may close an idle connection)."""
    from civitas.gunicorn_app import KEEPALIVE_SECONDS

    upstream = re.search(r"upstream civitas_hub \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert upstream is not None
    timeout = re.search(r"^\s*keepalive_timeout\s+(\d+)s;", upstream.group(1), re.M)
    assert timeout is not None, "the upstream block sets no keepalive_timeout (nginx: 60 s)"
    assert int(timeout.group(1)) < KEEPALIVE_SECONDS


# -- a real nginx in front of a real hub --------------------------------------------------


def render_nginx_conf(*, https_port: int, http_port: int, hub_port: int, cert: Path,
                      key: Path) -> str:
    """deploy/nginx.conf with the test's ports, host name and certificate; everything else,
    the headers above all, exactly as operators get it."""
    text = NGINX_CONF.read_text()
    replacements = [
        ("listen 443 ssl http2 default_server;",
         f"listen 127.0.0.1:{https_port} ssl http2 default_server;", 1),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 1),
        ("listen 80;", f"listen 127.0.0.1:{http_port};", 1),
        ("server_name login.example.gov;", "server_name 127.0.0.1;", 2),
        ("/etc/ssl/civitas/fullchain.pem", str(cert), 2),
        ("/etc/ssl/civitas/privkey.pem", str(key), 2),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{hub_port};", 1),
    ]
    for old, new, count in replacements:
        assert text.count(old) == count, \
            f"deploy/nginx.conf no longer holds {old!r} {count} time(s): update this test"
        text = text.replace(old, new)
    listens = [line for line in text.splitlines() if line.strip().startswith("listen")]
    assert listens and all(" 127.0.0.1:" in line for line in listens), listens
    return text


def distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(servers.free_port())
    return sorted(ports)


@dataclass(frozen=True)
class ProxiedHub:
    base: str  # https://127.0.0.1:PORT, nginx: the issuer
    http_base: str  # nginx's plain-HTTP port
    direct: str  # the hub itself, behind nginx
    ca_file: str
    hub_log: Path

    def client(self, address: str = CLIENT_ADDRESS) -> requests.Session:
        """A browser-like session that trusts the test CA and connects from `address`."""
        session = requests.Session()
        # not the environment's CA bundle or proxies (REQUESTS_CA_BUNDLE would win over
        # session.verify): the test CA, and straight to 127.0.0.1
        session.trust_env = False
        session.verify = self.ca_file
        adapter = SourceAddressAdapter(address)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session


class SourceAddressAdapter(HTTPAdapter):
    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module", params=["gunicorn", "waitress"])
def proxied(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            postgres_url: str, redis_url: str) -> Iterator[ProxiedHub]:
    """nginx in front of `civitas serve`: two workers (gunicorn) or one process (waitress,
    which must pass the proxy's X-Forwarded-* on to the hub rather than drop them)."""
    if not servers.find_nginx():
        pytest.skip("nginx is not installed (run scripts/ensure-system-deps)")
    tmp = tmp_path_factory.mktemp("proxy")
    https_port, http_port, hub_port = distinct_ports(3)
    issuer = f"https://127.0.0.1:{https_port}"
    ca = servers.write_test_ca(tmp, "Civitas Proxy Test CA")
    cert, key = servers.write_server_cert(tmp, ca, ("127.0.0.1", "localhost"), "nginx")
    op_clients = [{"client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
                   "redirect_uris": [f"{issuer}/login/op/callback"]}]
    with contextlib.ExitStack() as stack:
        op_issuer = stack.enter_context(servers.run_upstream_op(tmp, op_clients))
        db_url = stack.enter_context(fresh_pg_database(postgres_url, "proxy_"))
        settings = hub_config(op_issuer, db_url, issuer=issuer, redis_url=redis_url,
                              trusted_proxy_hops=1, admin_api_token=ADMIN_TOKEN)
        hub_log = stack.enter_context(servers.run_hub(
            tmp, settings, hub_port, workers=2 if request.param == "gunicorn" else 1))
        site = render_nginx_conf(https_port=https_port, http_port=http_port,
                                 hub_port=hub_port, cert=cert, key=key)
        stack.enter_context(servers.run_nginx(tmp, site, (https_port, http_port)))
        yield ProxiedHub(issuer, f"http://127.0.0.1:{http_port}",
                         f"http://127.0.0.1:{hub_port}", str(ca), hub_log)


def log_lines(log: Path, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The hub's JSON log lines of one request (waits a moment for them to be written)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in log.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                found.append(json.loads(line))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_discovery_through_the_proxy_is_https_with_the_issuer(proxied):
    r = proxied.client().get(f"{proxied.base}/.well-known/openid-configuration", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert doc["issuer"] == proxied.base
    urls = {k: v for k, v in doc.items() if k.endswith(("_endpoint", "_uri"))
            and isinstance(v, str)}
    assert {"authorization_endpoint", "token_endpoint", "jwks_uri"} <= set(urls)
    for name, url in urls.items():
        assert url.startswith(f"{proxied.base}/"), f"{name}: {url}"
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    assert proxied.client().get(doc["jwks_uri"], timeout=10).json()["keys"]


def test_plain_http_only_redirects_to_https(proxied):
    r = proxied.client().get(f"{proxied.http_base}/authorize?client_id=x", timeout=10,
                             allow_redirects=False)
    assert r.status_code == 301
    assert r.headers["Location"].startswith("https://127.0.0.1/authorize?client_id=x")


def test_hub_sees_the_address_nginx_saw_not_a_forged_one(proxied):
    forged = {"X-Forwarded-For": FORGED_ADDRESS, "X-Real-IP": FORGED_ADDRESS,
              "Forwarded": f"for={FORGED_ADDRESS};proto=https"}
    r = proxied.client().get(f"{proxied.base}/admin/api/agencies", timeout=10, headers={
        "Authorization": "Bearer not-the-token", **forged})
    assert r.status_code == 401
    lines = log_lines(proxied.hub_log, r.headers["X-Request-Id"])
    refused = [line["message"] for line in lines if "refused a bearer token" in line["message"]]
    assert refused == [f"admin API: refused a bearer token from {CLIENT_ADDRESS}"], lines
    assert FORGED_ADDRESS not in proxied.hub_log.read_text()


def test_scheme_and_host_the_hub_sees_are_nginx_s(proxied):
    r = proxied.client().post(f"{proxied.base}/admin/api/agencies", timeout=10, json={
        "name": "Proxied Agency", "redirect_uris": ["https://proxied.agency.example/cb"],
    }, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "evil.example", "Host": "127.0.0.1"})
    assert r.status_code == 201, r.text
    # the port comes from nginx ($server_port), not from the Host the client sent
    assert r.headers["Location"] == \
        f"{proxied.base}/admin/api/agencies/{r.json()['client_id']}"


def test_other_host_names_are_dropped(proxied):
    with pytest.raises(requests.ConnectionError):
        proxied.client().get(f"{proxied.base}/.well-known/openid-configuration", timeout=10,
                             headers={"Host": "evil.example"})


def test_metrics_are_not_served_through_the_proxy(proxied):
    assert proxied.client().get(f"{proxied.base}/metrics", timeout=10).status_code == 404
    assert requests.get(f"{proxied.direct}/metrics", timeout=10).status_code == 200


def test_full_login_through_the_proxy_with_secure_cookies(proxied):
    browser = proxied.client()
    auth = AuthRequest()
    r = browser.get(proxied.base + auth.url(), timeout=10, allow_redirects=False)
    assert r.status_code in (302, 303)
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-civitas_session=")  # https: a host-only cookie
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly"} <= attributes, cookie
    assert urljoin(proxied.base, r.headers["Location"]).startswith(f"{proxied.base}/login")
    r = browser.get(urljoin(proxied.base, r.headers["Location"]), timeout=10)
    link = re.search(r'href="(/login/op/start\?flow=[^"]+)"', r.text)
    assert link, r.text
    r = browser.get(proxied.base + html.unescape(link.group(1)), timeout=10)
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    assert action, r.text
    r = browser.post(urljoin(r.url, html.unescape(action.group(1))),
                     data={"username": "alice", "password": "alice-password"},
                     allow_redirects=False, timeout=10)
    for _ in range(12):
        location = urljoin(r.url, r.headers["Location"])
        if location.startswith(AGENCY_ONE.redirect_uri):
            break
        r = browser.get(location, allow_redirects=False, timeout=10)
    else:
        raise AssertionError("never reached the agency")
    params = query(location)
    assert params["iss"] == proxied.base and params["state"] == auth.state
    token = proxied.client().post(f"{proxied.base}/token", timeout=10, auth=(
        AGENCY_ONE.client_id, AGENCY_ONE.secret), data={
        "grant_type": "authorization_code", "code": params["code"],
        "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": auth.verifier})
    assert token.status_code == 200, token.text
    from joserfc import jwt
    from joserfc.jwk import KeySet

    keys = KeySet.import_key_set(proxied.client().get(f"{proxied.base}/jwks", timeout=10).json())
    claims = jwt.decode(token.json()["id_token"], keys).claims
    assert claims["iss"] == proxied.base and claims["nonce"] == auth.nonce


# -- straight to a hub that trusts no proxy -----------------------------------------------


@pytest.fixture(scope="module", params=[
    "waitress", "gunicorn"])
def unproxied(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              postgres_url: str, redis_url: str) -> Iterator[tuple[str, Path]]:
    """`civitas serve` with trusted_proxy_hops: 0, one worker (waitress) or two (gunicorn)."""
    tmp = tmp_path_factory.mktemp("unproxied")
    port = servers.free_port()
    workers = 1 if request.param == "waitress" else 2
    with fresh_pg_database(postgres_url, "proxy_") as db_url:
        settings = hub_config("http://127.0.0.1:9", db_url, upstreams=[],
                              issuer=f"http://127.0.0.1:{port}", redis_url=redis_url,
                              trusted_proxy_hops=0, admin_api_token=ADMIN_TOKEN)
        with servers.run_hub(tmp, settings, port, workers=workers) as log:
            yield f"http://127.0.0.1:{port}", log


FORGED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
          "X-Forwarded-For": FORGED_ADDRESS, "X-Forwarded-Ssl": "on",
          "X-Forwarded-Protocol": "ssl", "Forwarded": f"for={FORGED_ADDRESS};proto=https"}


def test_forged_forwarded_headers_are_not_believed_without_a_trusted_proxy(unproxied):
    base, log = unproxied
    r = requests.post(f"{base}/admin/api/agencies", timeout=10, json={
        "name": "Direct Agency", "redirect_uris": ["https://direct.agency.example/cb"],
    }, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **FORGED})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"{base}/admin/api/agencies/{r.json()['client_id']}"
    r = requests.get(f"{base}/admin/api/agencies", timeout=10,
                     headers={"Authorization": "Bearer not-the-token", **FORGED})
    lines = log_lines(log, r.headers["X-Request-Id"])
    assert [line["message"] for line in lines if "refused" in line["message"]] == [
        "admin API: refused a bearer token from 127.0.0.1"], lines
