"""Settings validation and the ``civitas`` command line."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
import yaml
from click.testing import CliRunner
from cryptography.fernet import Fernet

from civitas.cli import main
from config import load_settings
from kernel.errors import ConfigError

ENV = {"CIVITAS_ENCRYPTION_KEY": Fernet.generate_key().decode(),
       "CIVITAS_PAIRWISE_SECRET": "p" * 40}


def write(tmp_path, data, name="civitas.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(tmp_path, **extra):
    data = {"issuer": "http://127.0.0.1:8000", "database_url": f"sqlite:///{tmp_path}/c.db"}
    data.update(extra)
    return data


def test_example_file_validates_with_secrets_from_env_and_files(tmp_path, monkeypatch):
    secret = tmp_path / "dmv"
    secret.write_text("d" * 40 + "\n")
    text = open("config/examples/civitas.yaml").read().replace(
        "/run/secrets/dmv-portal-client-secret", str(secret))
    path = tmp_path / "example.yaml"
    path.write_text(text)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STATE_ID_CLIENT_SECRET", "state-secret")
    monkeypatch.setenv("STAFF_LDAP_PASSWORD", "ldap-secret")
    settings = load_settings(path)
    assert settings.issuer == "https://login.example.gov"
    assert settings.upstreams[0].client_secret.get_secret_value() == "state-secret"
    assert settings.agencies[0].client_secret.get_secret_value() == "d" * 40
    assert settings.upstreams[1].bind_password.get_secret_value() == "ldap-secret"
    assert settings.agencies[0].consent.claims[1].required is False


def test_environment_overrides_file(tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CIVITAS_DATABASE_URL", "sqlite:///from-env.db")
    settings = load_settings(write(tmp_path, minimal(tmp_path)))
    assert settings.database_url == "sqlite:///from-env.db"


@pytest.mark.parametrize("change, key, words", [
    ({"issuer": "http://gov.example"}, "issuer", "https"),
    ({"issuer": "https://gov.example/"}, "issuer", "must not end with '/'"),
    ({"database_url": "mysql://x"}, "database_url", "sqlite:// or postgresql://"),
    ({"upstreams": [{"kind": "oidc", "id": "x", "display_name": "X",
                     "issuer": "https://x.example", "client_id": "c"}]},
     "upstreams[0]", "client_secret is required"),
    ({"upstreams": [{"kind": "oidc", "id": "x", "display_name": "X", "client_secret": "s",
                     "issuer": "https://x.example", "client_id": "c",
                     "id_token_algs": ["none"]}]},
     "upstreams[0].id_token_algs", "unsafe"),
    ({"upstreams": [{"kind": "saml", "id": "x"}]}, "upstreams[0]", "kind"),
    ({"agencies": [{"client_id": "agency", "name": "A", "client_secret": "s" * 40,
                    "redirect_uris": ["https://a.example/cb#frag"]}]},
     "agencies[0].redirect_uris", "fragment"),
    ({"agencies": [{"client_id": "agency", "name": "A", "client_secret": "short",
                    "redirect_uris": ["https://a.example/cb"]}]},
     "agencies[0]", "at least 32"),
    ({"agencies": [{"client_id": "agency", "name": "A", "client_secret": "s" * 40,
                    "redirect_uris": ["https://a.example/cb"], "consent": {
                        "notice_url": "https://a.example/privacy", "notice_version": "1",
                        "contact_country": "USA", "claims": [
                            {"claim": "email", "purposes": ["p"], "description": "E"}]}}]},
     "agencies[0].consent.contact_country", "[A-Z]{2}"),
    ({"agencies": [{"client_id": "agency", "name": "A", "client_secret": "s" * 40,
                    "redirect_uris": ["https://a.example/cb"], "consent": {
                        "notice_url": "https://a.example/privacy", "notice_version": "1",
                        "contact_url": "mailto:privacy@a.example", "claims": [
                            {"claim": "email", "purposes": ["p"], "description": "E"}]}}]},
     "agencies[0].consent.contact_url", "contact_url"),
    ({"display_timezone": "Mars/Olympus_Mons"}, "display_timezone", "IANA name"),
    ({"session_lifetime_seconds": 5}, "session_lifetime_seconds", "greater than or equal"),
    ({"unknown_key": 1}, "unknown_key", "Extra inputs"),
])
def test_invalid_settings_name_the_key(tmp_path, monkeypatch, change, key, words):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, minimal(tmp_path, **change)))
    message = str(info.value)
    assert f"  {key}" in message and words in message, message


def test_missing_secrets_named(tmp_path, monkeypatch):
    monkeypatch.delenv("CIVITAS_ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("CIVITAS_PAIRWISE_SECRET", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, minimal(tmp_path)))
    assert "encryption_key: Field required" in str(info.value)
    assert "pairwise_secret: Field required" in str(info.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    path = write(tmp_path, minimal(tmp_path))
    runner = CliRunner()

    def run(*args, ok=True):
        result = runner.invoke(main, ["--config", str(path), *args], catch_exceptions=False)
        assert (result.exit_code == 0) is ok, result.output
        return result

    return run


def test_cli_config_check(cli, tmp_path):
    assert "valid" in cli("config", "check", str(tmp_path / "civitas.yaml")).output
    bad = write(tmp_path, {"issuer": "ftp://x"}, "bad.yaml")
    out = cli("config", "check", str(bad), ok=False).output
    assert "issuer" in out and "https" in out


def test_cli_db_upgrade(cli):
    from alembic.script import ScriptDirectory

    from civitas.migrations import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert f"database at revision {head}" in cli("db", "upgrade").output


def test_cli_agency_lifecycle_prints_secret_once_and_stores_hash(cli, tmp_path):
    out = cli("agency", "add", "--client-id", "tax-portal", "--name", "Tax Office",
              "--redirect-uri", "https://tax.example.gov/cb").output
    secret = out.split("client_secret: ")[1].split()[0]
    assert len(secret) >= 40
    shown = json.loads(cli("agency", "show", "tax-portal").output)
    assert shown["redirect_uris"] == ["https://tax.example.gov/cb"]
    assert shown["sector_identifier"] == "tax.example.gov"
    assert secret not in json.dumps(shown)
    # the database and its write-ahead log (SQLite WAL: fresh writes sit in c.db-wal) hold
    # no plaintext; the row holds the secret's hash
    files = [p for p in tmp_path.iterdir() if p.name.startswith("c.db")]
    assert "c.db" in {p.name for p in files}
    assert all(secret.encode() not in p.read_bytes() for p in files), files
    with sqlite3.connect(tmp_path / "c.db") as conn:
        [(stored,)] = conn.execute(
            "select secret_hash from agencies where client_id = 'tax-portal'").fetchall()
    assert stored == "sha256$" + hashlib.sha256(secret.encode()).hexdigest()
    assert "tax-portal" in cli("agency", "list").output
    out = cli("agency", "add", "--client-id", "tax-portal", "--name", "Again",
              "--redirect-uri", "https://tax.example.gov/cb", ok=False).output
    assert "already registered" in out
    assert "removed" in cli("agency", "remove", "tax-portal").output
    assert "no agency" in cli("agency", "show", "tax-portal", ok=False).output


@pytest.mark.parametrize("uri", ["javascript:alert(1)", "data:text/html,x",
                                 "http://agency.example/cb", "https://a.example/cb#x",
                                 "/relative"])
def test_cli_agency_add_refuses_bad_redirect_uris(cli, uri):
    out = cli("agency", "add", "--client-id", "bad-agency", "--name", "Bad",
              "--redirect-uri", uri, ok=False).output
    assert "redirect_uris" in out


def test_cli_keys_list_and_rotate(cli):
    first = cli("keys", "list").output.strip().splitlines()
    assert len(first) == 1 and "ES256" in first[0]
    out = cli("keys", "rotate", "--lead-time", "0s")
    assert "new key" in out.stdout
    # signing before verifiers' cached JWKS can hold the key is said, not refused
    assert "warning: the new key signs before every verifier has seen it" in out.stderr
    listed = cli("keys", "list").output.strip().splitlines()
    assert len(listed) == 2
    assert "retire after 20" in listed[0]  # the old key gets a retirement date
    assert "not a duration" in cli("keys", "rotate", "--lead-time", "soon", ok=False).output
    for bad in ("-5m", "nan", "inf"):
        assert "not a duration" in cli("keys", "rotate", "--lead-time", bad, ok=False).output
    assert len(cli("keys", "list").output.strip().splitlines()) == 2  # none made
    assert "warning" not in cli("keys", "rotate", "--lead-time", "1h").stderr


def test_cli_secrets_generate(cli):
    out = cli("secrets", "generate").output
    key = out.split("CIVITAS_ENCRYPTION_KEY=")[1].split()[0]
    Fernet(key.encode())
    assert "CIVITAS_PAIRWISE_SECRET=" in out


def test_cli_audit_seal_is_a_sealer_process_that_stops_on_sigterm(cli, tmp_path):
    """`civitas audit seal --every S` signs checkpoints of what workers append (they run with
    ledger_seal_interval_seconds: 0) until SIGTERM, then exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from civitas.app import create_app

    cli("db", "upgrade")
    path = write(tmp_path, minimal(tmp_path, ledger_seal_interval_seconds=0))
    app = create_app(load_settings(path))
    ledger = app.extensions["civitas"].ledger
    ledger.append_many(("decision.query", {"n": i}) for i in range(7))
    proc = subprocess.Popen(
        [sys.executable, "-m", "civitas.cli", "--config", str(path), "audit", "seal",
         "--every", "0.1", "--settle", "0", "--heartbeat", str(tmp_path / "alive")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 60
        while ledger.latest_checkpoint() is None or ledger.latest_checkpoint().size < 7:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        ledger.append("decision.query", {"n": 7})
        while ledger.latest_checkpoint().size < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        app.extensions["civitas"].db.dispose()
    assert proc.returncode == 0, out
    assert time.time() - (tmp_path / "alive").stat().st_mtime < 30
    assert "checkpoint signed at size 7" in out and "checkpoint signed at size 8" in out
    assert out.rstrip().endswith("sealer stopped")
    # a heartbeat that cannot be written is refused at once, with the reason
    refused = subprocess.run(
        [sys.executable, "-m", "civitas.cli", "--config", str(path), "audit", "seal",
         "--every", "1", "--heartbeat", str(tmp_path / "no-such-dir" / "alive")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Invalid value for --heartbeat: cannot write" in refused.stderr
    assert "Traceback" not in refused.stderr


# -- pairwise sectors (OpenID Connect Core 8.1, NIST SP 800-63C 6.3.2) -----------------------


def test_agencies_sharing_a_host_sector_are_reported():
    from idp.agencies import shared_host_sectors

    portal = ["https://portal.gov.example/tax/cb"], ["https://portal.gov.example/dmv/cb"]
    assert shared_host_sectors([
        ("tax", portal[0], None, "pairwise"), ("dmv", portal[1], None, "pairwise"),
        ("health", ["https://health.example/cb"], None, "pairwise"),
    ]) == {"portal.gov.example": ["dmv", "tax"]}
    # an explicit sector other than the host is a deliberate grouping or separation
    assert shared_host_sectors([
        ("tax", portal[0], "urn:sector:tax", "pairwise"),
        ("dmv", portal[1], "urn:sector:dmv", "pairwise"),
        ("tax-batch", portal[0], "urn:sector:tax", "pairwise"),
    ]) == {}
    # registered agencies carry the host as their sector: the same finding
    assert shared_host_sectors([
        ("tax", portal[0], "portal.gov.example", "pairwise"),
        ("dmv", portal[1], None, "pairwise"),
        ("open-data", portal[1], None, "public"),  # public subjects are shared anyway
    ]) == {"portal.gov.example": ["dmv", "tax"]}


def agency_on(host: str, client_id: str, **extra):
    return {"client_id": client_id, "name": client_id.upper(), "client_secret": "s" * 40,
            "redirect_uris": [f"https://{host}/{client_id}/cb"], **extra}


def test_config_check_and_start_up_give_the_shared_sector_notice(tmp_path, monkeypatch, caplog):
    from civitas.app import create_app

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    path = write(tmp_path, minimal(tmp_path, ledger_seal_interval_seconds=0, agencies=[
        agency_on("portal.gov.example", "tax"), agency_on("portal.gov.example", "dmv"),
        agency_on("portal.gov.example", "stats", sector_identifier="urn:sector:stats")]))
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output  # a notice, not an error
    assert "valid (0 upstream(s), 3 agency(ies)" in result.stdout
    assert "privacy notice: agencies dmv, tax share the pairwise sector 'portal.gov.example'" \
        in result.stderr and "stats" not in result.stderr
    with caplog.at_level("WARNING", logger="civitas"):
        app = create_app(load_settings(path))
    app.extensions["civitas"].db.dispose()
    assert [r.getMessage() for r in caplog.records if "pairwise sector" in r.getMessage()] == [
        "privacy: agencies dmv, tax share the pairwise sector 'portal.gov.example' (their "
        "redirect URIs' host): each citizen has the same `sub` at all of them, so they can "
        "link their records. If they are different organisations, give each its own "
        "`sector_identifier`."]


def test_config_check_names_agencies_whose_receipts_lack_a_privacy_contact(tmp_path, monkeypatch):
    """Kantara Consent Receipt 1.1: a receipt names how to reach the PII controller (email,
    phone, address); an agency that declares consent without them gets a notice."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    consent = {"notice_url": "https://x.example/privacy", "notice_version": "1", "claims": [
        {"claim": "email", "purposes": ["contact"], "description": "Your email"}]}
    path = write(tmp_path, minimal(tmp_path, agencies=[
        agency_on("tax.example", "tax", consent={**consent, "contact_email": "p@tax.example"}),
        agency_on("dmv.example", "dmv", consent={
            **consent, "contact_name": "DMV Privacy Office", "contact_email": "p@dmv.example",
            "contact_phone": "+1 555 0101", "contact_address": "1 Road"}),
        agency_on("parks.example", "parks")]))  # no consent declaration: no receipts
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "privacy notice: agency 'tax': its consent receipts give no contact, phone, address "
        "for its privacy office (Kantara Consent Receipt 1.1 asks for them): set "
        "consent.contact_name, consent.contact_phone, consent.contact_address"]


def test_the_example_settings_give_no_privacy_notice(tmp_path, monkeypatch):
    secret = tmp_path / "dmv"
    secret.write_text("d" * 40 + "\n")
    path = tmp_path / "example.yaml"
    path.write_text(open("config/examples/civitas.yaml").read().replace(
        "/run/secrets/dmv-portal-client-secret", str(secret)))
    for k, v in {**ENV, "STATE_ID_CLIENT_SECRET": "s", "STAFF_LDAP_PASSWORD": "l"}.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 0 and result.stderr == "", result.output


def test_cli_agency_check_names_stored_agencies_that_todays_rules_refuse(cli, tmp_path, caplog):
    """Registration rules grow (a redirect URI holding an authorization response member,
    RFC 6749 4.1.2; a post-logout URI with a state, RP-Initiated Logout 3); agencies stored
    before keep working and are named, by `agency check` and in the start-up log, and left
    as they are."""
    from civitas.app import create_app

    for client_id in ("fine-portal", "old-code", "old-logout"):
        cli("agency", "add", "--client-id", client_id, "--name", client_id,
            "--redirect-uri", f"https://{client_id}.example.gov/cb",
            "--post-logout-redirect-uri", f"https://{client_id}.example.gov/bye")
    assert "3 of 3 agencies pass" in cli("agency", "check").stderr
    with sqlite3.connect(tmp_path / "c.db") as conn:  # as an older version stored them
        conn.execute("update agencies set redirect_uris = ? where client_id = 'old-code'",
                     (json.dumps(["https://old-code.example.gov/cb?code=1"]),))
        conn.execute("update agencies set post_logout_redirect_uris = ? "
                     "where client_id = 'old-logout'",
                     (json.dumps(["https://old-logout.example.gov/bye?state=x"]),))
    before = {c: json.loads(cli("agency", "show", c).output)
              for c in ("fine-portal", "old-code", "old-logout")}
    result = cli("agency", "check", ok=False)
    assert result.stdout.splitlines() == [
        "old-code\tredirect_uris: 'https://old-code.example.gov/cb?code=1' must not have a "
        "'code' query member: the hub adds it to the authorization response (RFC 6749 4.1.2)",
        "old-logout\tpost_logout_redirect_uris: 'https://old-logout.example.gov/bye?state=x' "
        "must not have a 'state' query member: the hub adds the state the agency sends "
        "(RP-Initiated Logout 1.0 section 3)"]
    assert "1 of 3 agencies pass" in result.stderr
    with caplog.at_level("WARNING", logger="civitas"):
        app = create_app(load_settings(tmp_path / "civitas.yaml"))
    app.extensions["civitas"].db.dispose()
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if "no longer passes" in r.getMessage()] == [
        "agency 'old-code' no longer passes registration",
        "agency 'old-logout' no longer passes registration"]
    assert {c: json.loads(cli("agency", "show", c).output) for c in before} == before
