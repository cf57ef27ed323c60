"""``civitas demo``: the hub, a demo upstream OpenID provider and a demo agency site.

Everything listens on 127.0.0.1. Secrets are generated on first run into the data directory
(mode 0600), never into the repository. The upstream is the npm package ``oidc-provider``
(``demo/upstream``), the same third-party provider the test suite logs in with.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kernel.crypto import FieldCipher

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = REPO_ROOT / "demo" / "upstream"
HOST = "127.0.0.1"


def _secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    values = {
        "encryption_key": FieldCipher.generate_key(),
        "pairwise_secret": secrets.token_urlsafe(48),
        "agency_secret": secrets.token_urlsafe(32),
        "upstream_secret": secrets.token_urlsafe(32),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return values


def demo_settings(hub_port: int, upstream_port: int, agency_port: int,
                  data_dir: Path, values: dict[str, str]) -> dict[str, Any]:
    issuer = f"http://{HOST}:{hub_port}"
    return {
        "issuer": issuer,
        "database_url": f"sqlite:///{(data_dir / 'civitas.db').resolve()}",
        "encryption_key": values["encryption_key"],
        "pairwise_secret": values["pairwise_secret"],
        "upstreams": [{
            "kind": "oidc", "id": "demo-id", "display_name": "Demo ID (example upstream)",
            "issuer": f"http://{HOST}:{upstream_port}", "client_id": "civitas-hub",
            "client_secret": values["upstream_secret"],
        }],
        "agencies": [{
            "client_id": "demo-agency", "name": "Department of Examples",
            "redirect_uris": [f"http://{HOST}:{agency_port}/callback"],
            "client_secret": values["agency_secret"],
            "post_logout_redirect_uris": [f"http://{HOST}:{agency_port}/"],
            "consent": {
                "notice_url": f"http://{HOST}:{agency_port}/privacy",
                "notice_version": "2026-11",
                "contact_name": "Privacy Office, Department of Examples",
                "contact_email": "privacy@examples.example",
                "contact_phone": "+1 555 0100",
                "contact_address": "1 Example Plaza, Springfield",
                "contact_country": "US",
                "contact_url": f"http://{HOST}:{agency_port}/privacy",
                "purpose_labels": {
                    "eligibility": "to check that you can use this service",
                    "letters": "to address letters to you by name",
                },
                "claims": [
                    {"claim": "email", "purposes": ["eligibility"], "required": True,
                     "description": "Your email address"},
                    {"claim": "name", "purposes": ["letters"], "required": False,
                     "description": "Your full name"},
                    {"claim": "given_name", "purposes": ["letters"], "required": False,
                     "description": "Your given name"},
                    {"claim": "family_name", "purposes": ["letters"], "required": False,
                     "description": "Your family name"},
                ],
            },
        }],
    }


def start_upstream(port: int, hub_issuer: str, client_secret: str, log_path: Path
                   ) -> subprocess.Popen[bytes]:
    node = shutil.which("node")
    if node is None or not (UPSTREAM_DIR / "node_modules").is_dir():
        raise SystemExit("The demo upstream needs Node.js and its modules: run "
                         "scripts/ensure-node-deps (the README's first command does this).")
    env = dict(os.environ, PORT=str(port), ISSUER=f"http://{HOST}:{port}", CLIENTS=json.dumps([{
        "client_id": "civitas-hub", "client_secret": client_secret,
        "redirect_uris": [f"{hub_issuer}/login/demo-id/callback"],
        # the upstream says in each ID token when the person authenticated (OpenID Connect
        # Registration 2), which the hub passes on as auth_time
        "require_auth_time": True,
    }]))
    log = log_path.open("ab")
    argv = [node, str(UPSTREAM_DIR / "server.mjs")]  # fixed argv, no shell
    proc = subprocess.Popen(argv, cwd=UPSTREAM_DIR, env=env, stdout=log,  # noqa: S603
                            stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo upstream exited; see {log_path}")
        if b"LISTENING" in log_path.read_bytes():
            return proc
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"the demo upstream did not start in 30 s; see {log_path}")


def run_demo(*, hub_port: int = 8000, data_dir: str = "var/demo") -> int:
    import waitress
    from waitress.server import create_server

    from .app import create_app
    from .demo_agency import create_agency_app

    upstream_port, agency_port = hub_port + 1, hub_port + 2
    directory = Path(data_dir)
    values = _secrets(directory)
    settings = demo_settings(hub_port, upstream_port, agency_port, directory, values)
    upstream = start_upstream(upstream_port, settings["issuer"], values["upstream_secret"],
                              directory / "upstream.log")
    try:
        hub_app = create_app(settings)
        agency_app = create_agency_app(
            issuer=settings["issuer"], client_id="demo-agency",
            client_secret=values["agency_secret"], base_url=f"http://{HOST}:{agency_port}",
        )
        try:
            servers = [create_server(hub_app, host=HOST, port=hub_port, threads=8),
                       create_server(agency_app, host=HOST, port=agency_port, threads=4)]
        except OSError as exc:
            raise SystemExit(f"cannot listen on {HOST}:{hub_port} and {HOST}:{agency_port} "
                             f"({exc.strerror}); is another demo running? Use --port.") from exc
        for server in servers:
            threading.Thread(target=server.run, daemon=True).start()
        print(f"Civitas hub:         http://{HOST}:{hub_port}  (discovery: "
              f"{settings['issuer']}/.well-known/openid-configuration)")
        print(f"Demo upstream (OP):  http://{HOST}:{upstream_port}  users: alice / "
              "alice-password, bob / bob-password")
        print(f"Demo agency site:    http://{HOST}:{agency_port}")
        print(f"\nOpen http://{HOST}:{agency_port}/ and click \"Log in\". Ctrl-C stops.",
              flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set() and upstream.poll() is None:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        for server in servers:
            server.close()
        del waitress
        return 0 if upstream.poll() is None else 1
    finally:
        if upstream.poll() is None:
            upstream.terminate()
            try:
                upstream.wait(5)
            except subprocess.TimeoutExpired:
                upstream.kill()
