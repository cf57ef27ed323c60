"""The ``civitas`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from typing import Any

import click

from config import Settings, load_settings
from consent.ledger.cli import make_audit_cli
from idp.agencies import shared_host_sectors, shared_sector_notice
from idp.keys import JWKS_MAX_AGE_SECONDS
from kernel.crypto import DecryptionError, FieldCipher
from kernel.errors import ConfigError
from kernel.reencrypt import BATCH, EncryptedColumn


def _settings(ctx: click.Context) -> Settings:
    try:
        return load_settings(ctx.obj.get("config"))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _hub(ctx: click.Context) -> Any:
    from .app import build_hub

    try:
        return build_hub(_settings(ctx))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


#: names the metrics directory `civitas serve --workers` made for itself (removed at the end)
_OWN_METRICS_DIR = "CIVITAS_OWN_METRICS_DIR"


def _skip_db_upgrade() -> bool:
    """``CIVITAS_SKIP_DB_UPGRADE=1``: migrations run as a release step of their own, never
    as the hub starts (deploy/README.md); the container's entry point honours it too."""
    return os.environ.get("CIVITAS_SKIP_DB_UPGRADE", "0") == "1"


def _schema_ready(ctx: click.Context, json_logs: bool) -> None:
    """Before the hub serves: bring the schema up to date, or with
    ``CIVITAS_SKIP_DB_UPGRADE=1`` only check that it is (in a child process either way:
    this one never imports Alembic, see ``upgrade_schema``)."""
    from .gunicorn_app import SchemaUpgradeFailed, check_schema, upgrade_schema

    try:
        if _skip_db_upgrade():
            _announce(f"schema: {check_schema(ctx.obj.get('config'))}", json_logs)
        else:
            _announce(f"schema: {upgrade_schema(ctx.obj.get('config'))}", json_logs)
    except SchemaUpgradeFailed as exc:
        what = "is not ready" if _skip_db_upgrade() else "could not be upgraded"
        raise click.ClickException(f"the database schema {what}:\n{exc}") from exc


#: the longest duration an option takes: ten years
_LONGEST_DURATION = 10 * 366 * 86400


def _duration(value: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1] in units:
            seconds = float(value[:-1]) * units[value[-1]]
        else:
            seconds = float(value)
        # a negative duration would, for `keys rotate`, make the new key sign before it was
        # published and take the keys it replaces out of the JWKS at once (and one past
        # the calendar's end is no date at all)
        if not 0 <= seconds <= _LONGEST_DURATION:
            raise ValueError(value)
        return timedelta(seconds=seconds)
    except (ValueError, IndexError, OverflowError) as exc:
        raise click.BadParameter(f"{value!r} is not a duration like 30s, 10m, 2h or 7d "
                                 "(zero or more)") from exc


class _CivitasGroup(click.Group):
    """The command group: a database or Redis that cannot be reached is said in one line
    (what failed, and where to look), not as a Python traceback, by every command."""

    def invoke(self, ctx: click.Context) -> Any:
        import redis
        from sqlalchemy import exc as sa_exc

        try:
            return super().invoke(ctx)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            said = (str(exc.orig or exc).strip().splitlines() or [repr(exc)])[0]
            raise click.ClickException(
                f"the database failed: {said}. (Is PostgreSQL running, and reachable at "
                "database_url?)") from exc
        except DecryptionError as exc:
            from .app import UNREADABLE_KEYS

            raise click.ClickException(UNREADABLE_KEYS) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise click.ClickException(
                f"Redis could not be reached: {exc}. Check redis_url and that Redis is "
                "running.") from exc


@click.group(cls=_CivitasGroup)
@click.option("--config", "config_path", envvar="CIVITAS_CONFIG", type=click.Path(),
              help="Settings file (YAML). Default: $CIVITAS_CONFIG.")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Civitas: federated sign-in, consent and audit for government services."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


def shared_storage_problems(settings: Settings) -> list[str]:
    """Why these settings cannot serve from several processes (empty when they can)."""
    problems = []
    if settings.database_url.startswith("sqlite"):
        problems.append("database_url is SQLite; use PostgreSQL (postgresql+psycopg://...)")
    if not settings.redis_url or settings.redis_url.startswith("memory:"):
        problems.append("redis_url is not set, so short-lived state (sessions, codes) would "
                        "stay inside one process; set redis_url to a Redis server")
    return problems


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Threads per worker process.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes (gunicorn); more than 1 needs PostgreSQL and Redis.")
@click.option("--json-logs/--plain-logs", default=True, show_default=True)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, threads: int, workers: int,
          json_logs: bool) -> None:
    """Run the hub: waitress for one process, gunicorn for several."""
    settings = _settings(ctx)
    if workers > 1:
        from .gunicorn_app import UnknownWorker, worker_class

        try:
            worker_class()
        except UnknownWorker as exc:
            raise click.ClickException(str(exc)) from exc
        problems = shared_storage_problems(settings)
        if problems:
            raise click.ClickException(
                f"--workers {workers} needs storage shared by every process:\n  - "
                + "\n  - ".join(problems))
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # prometheus-client chooses where metrics live when it is first imported, which
            # importing this package has already done: start again with the directory set,
            # so that every worker writes there and /metrics adds them all up
            import tempfile

            made = tempfile.mkdtemp(prefix="civitas-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWN_METRICS_DIR] = made
            os.execv(sys.executable, [sys.executable, "-m", "civitas.cli", *sys.argv[1:]])  # noqa: S606 (this program again)
    from .app import create_app, freeze_heap
    from .observability import configure_json_logging

    if json_logs:
        configure_json_logging()
    from .gunicorn_app import KEEPALIVE_SECONDS, address_in_use

    problem = address_in_use(host, port)  # waitress, too, would only raise OSError
    if problem is not None:
        raise click.ClickException(f"cannot listen on {host}:{port}: {problem}")
    if workers > 1:
        from .gunicorn_app import run_gunicorn

        _schema_ready(ctx, json_logs)
        _announce(f"Civitas listening on http://{host}:{port} with {workers} workers "
                  f"(issuer {settings.issuer})", json_logs)
        master = os.getpid()
        try:
            run_gunicorn(ctx.obj.get("config"), host=host, port=port, workers=workers,
                         threads=threads, json_logs=json_logs)
        finally:
            # the metrics directory this command made is this run's alone: gone with it
            # (one chosen by the operator is theirs to keep). Only the master: a worker is
            # forked inside run_gunicorn and leaves through here too (SystemExit), while
            # the master and the other workers still write there
            own = os.environ.get(_OWN_METRICS_DIR)
            if os.getpid() == master and own and own == os.environ.get(
                    "PROMETHEUS_MULTIPROC_DIR"):
                import shutil

                shutil.rmtree(own, ignore_errors=True)
        return
    import waitress

    if _skip_db_upgrade():
        _schema_ready(ctx, json_logs)
    try:
        app = create_app(settings, threads=threads, migrate=not _skip_db_upgrade())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    issuer = app.extensions["civitas"].settings.issuer
    freeze_heap()
    _announce(f"Civitas listening on http://{host}:{port} (issuer {issuer})", json_logs)
    # Only `trusted_proxy_hops` (ProxyFix in the app) decides which X-Forwarded-* to
    # believe, as under gunicorn: waitress must pass them on, not drop them itself (its
    # default, without a `trusted_proxy` of its own), or behind a proxy the hub would see
    # every request as plain http from the proxy's address.
    # Connections idle (or stalled mid-request) are closed after KEEPALIVE_SECONDS, looked
    # for every second, as gunicorn's workers close idle ones: waitress's own 120 s (looked
    # for every 30 s) let 100 connections that sent nothing (its connection limit) stop the
    # hub for two minutes at a time.
    waitress.serve(app, host=host, port=port, threads=threads, ident="civitas",
                   clear_untrusted_proxy_headers=False, channel_timeout=KEEPALIVE_SECONDS,
                   cleanup_interval=1)


def _announce(message: str, json_logs: bool) -> None:
    """Where the hub listens: a log line (JSON, like every other) or, with plain logs, text."""
    if json_logs:
        logging.getLogger("civitas").info(message)
    else:
        click.echo(message)


# -- config ---------------------------------------------------------------------------------

@main.group("config")
def config_group() -> None:
    """Settings files."""


@config_group.command("check")
@click.argument("file", type=click.Path())
def config_check(file: str) -> None:
    """Validate a settings file (with the environment applied); exit 1 if invalid."""
    try:
        settings = load_settings(file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{file}: valid ({len(settings.upstreams)} upstream(s), "
               f"{len(settings.agencies)} agency(ies), issuer {settings.issuer})")
    from .consent_wiring import agency_policies, receipt_contact_notices

    _privacy_notices(shared_host_sectors(
        (a.client_id, a.redirect_uris, a.sector_identifier, a.subject_type)
        for a in settings.agencies), receipt_contact_notices(agency_policies(settings)))


def _privacy_notices(shared: dict[str, list[str]], others: list[str] | None = None) -> None:
    notices = [shared_sector_notice(host, ids) for host, ids in shared.items()]
    for notice in notices + (others or []):
        click.echo(f"privacy notice: {notice}", err=True)


# -- secrets --------------------------------------------------------------------------------

@main.group("secrets")
def secrets_group() -> None:
    """Secrets: new ones for an installation, values encrypted under a new key."""


@secrets_group.command("generate")
def secrets_generate() -> None:
    """Print a fresh encryption key and pairwise secret as environment assignments."""
    import secrets

    click.echo(f"CIVITAS_ENCRYPTION_KEY={FieldCipher.generate_key()}")
    click.echo(f"CIVITAS_PAIRWISE_SECRET={secrets.token_urlsafe(48)}")


def encrypted_columns() -> list[EncryptedColumn]:
    """Every column whose values the hub encrypts at rest (kernel/crypto.py)."""
    from broker.models import AccountAttribute
    from consent.ledger.models import LedgerKey
    from idp.models import SigningKey

    return [EncryptedColumn("account attributes", AccountAttribute, "value_encrypted"),
            EncryptedColumn("signing keys", SigningKey, "private_jwk_encrypted"),
            EncryptedColumn("ledger keys", LedgerKey, "private_key_encrypted")]


def _found(census: Any) -> str:
    if not census.found:
        return "none"
    return ", ".join(
        f"{n} under key {s.key + 1}" + (" (Fernet, before v2)" if s.scheme == "fernet" else "")
        for s, n in sorted(census.found.items(), key=lambda kv: (kv[0].key, kv[0].scheme)))


def _progress(every: float = 10.0) -> Any:
    """A line on standard error at most every ``every`` seconds while a column is walked."""
    import time

    shown = time.monotonic()

    def show(census: Any) -> None:
        nonlocal shown
        now = time.monotonic()
        if now - shown >= every:
            shown = now
            click.echo(f"  {census.label}: {census.scanned} values so far, "
                       f"{census.rewritten} rewritten", err=True)

    return show


@secrets_group.command("reencrypt")
@click.option("--dry-run", is_flag=True, help="Only count what would be rewritten.")
@click.option("--batch", default=BATCH, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows read and rewritten per transaction.")
@click.pass_context
def secrets_reencrypt(ctx: click.Context, dry_run: bool, batch: int) -> None:
    """Rewrite every value encrypted at rest under the first key of encryption_key.

    Values are read with any configured key and written with the first; a value is
    otherwise rewritten only when its owner signs in again. After a run that rewrote or
    found everything under key 1, the other keys can be removed. Safe while hubs serve, and
    to run again. Exit 1 if a value could not be read with any configured key (it is left
    as it is)."""
    from sqlalchemy.exc import SQLAlchemyError

    from kernel.db import Database
    from kernel.reencrypt import reencrypt_column

    settings = _settings(ctx)
    keys = settings.encryption_keys
    db = Database(settings.database_url, pool_size=1)
    cipher = FieldCipher(keys)
    censuses = []
    try:
        for column in encrypted_columns():
            census = reencrypt_column(db, cipher, column, dry_run=dry_run, batch=batch,
                                      progress=_progress())
            censuses.append(census)
            done = (f"would rewrite {census.to_rewrite}" if dry_run
                    else f"rewritten {census.rewritten}")
            if census.changed_meanwhile:
                done += f", {census.changed_meanwhile} changed meanwhile by a hub (left)"
            if census.unreadable:
                done += f", {census.unreadable} unreadable (left)"
            click.echo(f"{census.label}: {census.scanned} values: {_found(census)}; {done}")
    except SQLAlchemyError as exc:
        said = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [repr(exc)])[0]
        raise click.ClickException(
            f"the database could not be read or written: {said}. "
            "(Is it reachable, and is its schema up to date: `civitas db upgrade`?) Values "
            "rewritten so far stay rewritten; run this again.") from exc
    finally:
        db.dispose()
    unreadable = [c for c in censuses if c.unreadable]
    if unreadable:
        rows = "; ".join(f"{c.label}: rows {', '.join(map(str, c.unreadable_rows))}"
                         + (" and more" if c.unreadable > len(c.unreadable_rows) else "")
                         for c in unreadable)
        click.echo(f"{sum(c.unreadable for c in unreadable)} values could not be read with "
                   f"any of the {len(keys)} configured keys and were left as they are ({rows}). "
                   "Put back the key that wrote them, then run this again; until then do "
                   "not remove any key.", err=True)
        sys.exit(1)
    pending = sum(c.to_rewrite for c in censuses) if dry_run else 0
    if pending:
        click.echo(f"dry run: {pending} values would be rewritten; nothing was written.")
    elif any(c.changed_meanwhile for c in censuses):
        click.echo("values changed while this ran: run it again before removing a key.")
    elif len(keys) > 1:
        click.echo(f"every value is under key 1: the other {len(keys) - 1} keys of "
                   "encryption_key can be removed once every hub runs with key 1 first.")
    else:
        click.echo("every value is under the only configured key.")


# -- db -------------------------------------------------------------------------------------

@main.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Apply Alembic migrations."""
    from kernel.db import Database, startup_lock

    from .migrations import current_revision, upgrade

    db = Database(_settings(ctx).database_url)
    # the lock every start-up takes: hosts (or containers) that start together, each running
    # this before `civitas serve`, migrate one after the other, not at the same time
    from alembic.util import CommandError

    try:
        with startup_lock(db.engine):
            upgrade(db.engine, revision)
    except CommandError as exc:  # a revision that does not exist, say
        raise click.ClickException(f"--revision {revision}: {exc}") from exc
    click.echo(f"database at revision {current_revision(db.engine)}")


@db_group.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit 0 if the schema is the one this release needs, else 1 saying what to run."""
    from kernel.db import Database

    from .migrations import current_revision, head_revision

    db = Database(_settings(ctx).database_url)
    try:
        current, head = current_revision(db.engine), head_revision()
    finally:
        db.dispose()
    if current != head:
        raise click.ClickException(
            f"the database schema is at {current or 'no revision (an empty database)'}; this "
            f"release needs {head}: run `civitas db upgrade`")
    click.echo(f"database at revision {current}, as this release needs")


# -- housekeeping ---------------------------------------------------------------------------

@main.command("housekeeping")
@click.pass_context
def housekeeping(ctx: click.Context) -> None:
    """Run the hub's housekeeping once: consent grants past their validity get their
    `expired` event, the tokens of refresh grants that ended are deleted, and the erasure
    of an account closed by its citizen but cut off part-way is finished. Workers do it
    every `housekeeping_interval_seconds`; set that to 0 and run this from cron instead.
    Exit 1 if a job failed (the log says why)."""
    from .housekeeping import run_once

    hub = _hub(ctx)
    try:
        done = run_once(hub)
    finally:
        hub.db.dispose()

    def shown(count: int | None) -> str:
        return "(failed)" if count is None else str(count)

    click.echo(f"consent grants expired: {shown(done.consents_expired)}; "
               f"refresh grants purged: {shown(done.refresh_grants_purged)}; "
               f"erasures finished: {shown(done.erasures_finished)}; "
               f"decisions past retention deleted: {shown(done.decisions_purged)}")
    if not done.ok:
        sys.exit(1)


# -- agencies -------------------------------------------------------------------------------

@main.group("agency")
def agency_group() -> None:
    """Agency sites (OpenID Connect clients)."""


@agency_group.command("add")
@click.option("--client-id", required=True)
@click.option("--name", required=True)
@click.option("--redirect-uri", "redirect_uris", multiple=True, required=True,
              help="Exact redirect URI; repeat for several.")
@click.option("--scope", "scopes", multiple=True, help="Allowed scope; repeat. Default: "
              "openid profile email.")
@click.option("--sector-identifier", default=None,
              help="Pairwise sector (default: the redirect URIs' host).")
@click.option("--auth-method", default="client_secret_basic", show_default=True,
              type=click.Choice(["client_secret_basic", "client_secret_post", "private_key_jwt"]))
@click.option("--jwks-file", type=click.File("r"), default=None,
              help="The agency's public keys (JWK set, JSON) for private_key_jwt.")
@click.option("--jwks-uri", default=None,
              help="Where the hub fetches the agency's public keys (https) for private_key_jwt.")
@click.option("--signing-alg", type=click.Choice(["ES256", "RS256", "PS256"]), default=None,
              help="ID token signing algorithm (id_token_signed_response_alg). Default: the "
                   "hub's signing_alg.")
@click.option("--subject-type", type=click.Choice(["pairwise", "public"]), default="pairwise",
              show_default=True, help="'public' needs allow_public_subjects in the settings.")
@click.option("--post-logout-redirect-uri", "post_logout_redirect_uris", multiple=True,
              help="Exact URI the agency may ask to return to after logout; repeat for several.")
@click.option("--backchannel-logout-uri", default=None,
              help="Where the hub POSTs logout tokens (OpenID Connect Back-Channel Logout).")
@click.option("--event-delivery-uri", default=None,
              help="Where the hub pushes Security Event Tokens (RFC 8935), e.g. on consent "
                   "withdrawal.")
@click.pass_context
def agency_add(ctx: click.Context, client_id: str, name: str, redirect_uris: tuple[str, ...],
               scopes: tuple[str, ...], sector_identifier: str | None, auth_method: str,
               jwks_file: Any, jwks_uri: str | None, signing_alg: str | None,
               subject_type: str, post_logout_redirect_uris: tuple[str, ...],
               backchannel_logout_uri: str | None, event_delivery_uri: str | None) -> None:
    """Register an agency. Prints its client secret once (only a hash is stored); a
    private_key_jwt agency has no secret."""
    from idp.errors import AgencyRegistrationError

    jwks = None
    if jwks_file is not None:
        try:
            jwks = json.load(jwks_file)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--jwks-file") from exc
    hub = _hub(ctx)
    try:
        row, secret = hub.agencies.add(
            client_id=client_id, name=name, redirect_uris=list(redirect_uris),
            scopes=list(scopes) or None, sector_identifier=sector_identifier,
            auth_method=auth_method, post_logout_redirect_uris=list(post_logout_redirect_uris),
            backchannel_logout_uri=backchannel_logout_uri, jwks=jwks, jwks_uri=jwks_uri,
            id_token_signed_response_alg=signing_alg, subject_type=subject_type,
            event_delivery_uri=event_delivery_uri,
        )
    except AgencyRegistrationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"registered agency {row.client_id}")
    if secret is not None:
        click.echo(f"client_secret: {secret}")
        click.echo("Store this secret now: it is not shown again.", err=True)


@agency_group.command("list")
@click.pass_context
def agency_list(ctx: click.Context) -> None:
    """List registered agencies."""
    agencies = _hub(ctx).agencies
    for row in agencies.list():
        click.echo(f"{row.client_id}\t{row.name}\t{' '.join(row.redirect_uris)}")
    _privacy_notices(agencies.shared_host_sectors())


@agency_group.command("check")
@click.pass_context
def agency_check(ctx: click.Context) -> None:
    """Check every stored agency against today's registration rules (the rules grow;
    agencies registered before are not refused at start-up, only named in the log). Prints
    each one that fails, with the first field at fault; exit 1 if any does. Fix one by
    replacing its registration (PUT /admin/agencies/<client_id>), or in the settings file
    for an agency declared there."""
    agencies = _hub(ctx).agencies
    stored = agencies.list()
    found = agencies.nonconforming()
    for client_id, problem in found:
        click.echo(f"{client_id}\t{problem}")
    click.echo(f"{len(stored) - len(found)} of {len(stored)} agencies pass today's "
               "registration rules", err=True)
    if found:
        sys.exit(1)


@agency_group.command("show")
@click.argument("client_id")
@click.pass_context
def agency_show(ctx: click.Context, client_id: str) -> None:
    """Show one agency as JSON (never its secret)."""
    row = _hub(ctx).agencies.get(client_id)
    if row is None:
        raise click.ClickException(f"no agency with client_id {client_id!r}")
    click.echo(json.dumps(row.describe(), indent=2))


@agency_group.command("remove")
@click.argument("client_id")
@click.pass_context
def agency_remove(ctx: click.Context, client_id: str) -> None:
    """Remove an agency."""
    if not _hub(ctx).agencies.remove(client_id):
        raise click.ClickException(f"no agency with client_id {client_id!r}")
    click.echo(f"removed agency {client_id}")


# -- logout ---------------------------------------------------------------------------------

@main.group("logout")
def logout_group() -> None:
    """Back-channel logout deliveries to agencies."""


@logout_group.command("deliver")
@click.pass_context
def logout_deliver(ctx: click.Context) -> None:
    """Run one delivery pass of queued logout tokens (for cron, or when the in-process
    dispatcher is off); exit 1 if any delivery failed."""
    hub = _hub(ctx)
    try:
        done = hub.dispatcher.deliver_due()
    finally:
        hub.db.dispose()
    click.echo(f"{done.delivered} delivered, {done.retrying} to retry, "
               f"{done.given_up} given up")
    if done.retrying or done.given_up:
        sys.exit(1)


# -- events ---------------------------------------------------------------------------------

@main.group("events")
def events_group() -> None:
    """Deliveries to agencies: back-channel logout tokens and Security Event Tokens."""


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


@events_group.command("list")
@click.option("--pending", "state", flag_value="pending",
              help="Only deliveries still to be attempted.")
@click.option("--failed", "state", flag_value="failed",
              help="Only deliveries given up, or whose last attempt failed.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1))
@click.pass_context
def events_list(ctx: click.Context, state: str | None, limit: int) -> None:
    """List queued and past deliveries, oldest first (tab-separated)."""
    hub = _hub(ctx)
    try:
        rows = hub.dispatcher.deliveries(state or "all", limit=limit)
    finally:
        hub.db.dispose()
    click.echo("id\tkind\tagency\tattempts\tnext attempt\tdelivered at\tlast error")
    for r in rows:
        click.echo(f"{r.id}\t{r.kind}\t{r.client_id}\t{r.attempts}\t"
                   f"{_when(r.next_attempt_at)}\t{_when(r.delivered_at)}\t"
                   f"{r.last_error or '-'}")


# -- tokens ---------------------------------------------------------------------------------

@main.group("tokens")
def tokens_group() -> None:
    """Refresh grants."""


@tokens_group.command("revoke-unconsented")
@click.option("--dry-run", is_flag=True, help="Count them; revoke nothing.")
@click.pass_context
def tokens_revoke_unconsented(ctx: click.Context, dry_run: bool) -> None:
    """Revoke the refresh grants whose citizen has not granted the agency offline access
    (OpenID Connect Core 11): those issued before this version asked for it. The agency's
    next refresh gets invalid_grant and its next sign-in asks the citizen."""
    from idp.consent_step import OFFLINE_ACCESS
    from idp.tokens import NO_OFFLINE_CONSENT

    hub = _hub(ctx)
    grants = hub.server.hub.refresh_tokens
    checked = unconsented = 0
    try:
        for grant_id, account_id, client_id in grants.live_grants():
            checked += 1
            state = hub.consent.latest(account_id, client_id)
            if state is not None and OFFLINE_ACCESS in state.granted:
                continue
            unconsented += 1
            if not dry_run:
                grants.revoke_grant(grant_id, reason=NO_OFFLINE_CONSENT)
    finally:
        hub.db.dispose()
    verb = "would revoke" if dry_run else "revoked"
    click.echo(f"{checked} live refresh grant(s); {verb} {unconsented} without the "
               "citizen's consent to offline access")


# -- keys -----------------------------------------------------------------------------------

@main.group("keys")
def keys_group() -> None:
    """The hub's signing keys."""


@keys_group.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List signing keys with their life cycle."""
    hub = _hub(ctx)
    hub.keys.ensure((hub.settings.signing_alg,))
    for k in hub.keys.list():
        retire = k.retire_after.isoformat() if k.retire_after else "-"
        click.echo(f"{k.kid}\t{k.alg}\tcreated {k.created_at.isoformat()}\t"
                   f"signs from {k.activates_at.isoformat()}\tretire after {retire}")


@keys_group.command("rotate")
@click.option("--alg", type=click.Choice(["ES256", "RS256", "PS256"]), default=None,
              help="Default: the configured signing algorithm.")
@click.option("--lead-time", default="1h", show_default=True,
              help="How long the new key is published before it signs.")
@click.option("--retire-after", default="1d", show_default=True,
              help="How long replaced keys stay published after the switch.")
@click.pass_context
def keys_rotate(ctx: click.Context, alg: str | None, lead_time: str, retire_after: str) -> None:
    """Create a new signing key (published now, signing after the lead time)."""
    lead, retire = _duration(lead_time), _duration(retire_after)  # before any change
    hub = _hub(ctx)
    hub.keys.ensure((hub.settings.signing_alg,))
    row = hub.keys.rotate(alg or hub.settings.signing_alg, lead_time=lead,
                          retire_after=retire)
    click.echo(f"new key {row.kid} ({row.alg}) signs from {row.activates_at.isoformat()}")
    if lead.total_seconds() < JWKS_MAX_AGE_SECONDS:
        click.echo(f"warning: the new key signs before every verifier has seen it: agencies may "
                   f"keep the JWKS for {JWKS_MAX_AGE_SECONDS} s, and one that does not fetch "
                   "it again on an unknown kid refuses the new key's tokens until then. A "
                   f"lead time of {JWKS_MAX_AGE_SECONDS // 60} minutes or more avoids this; a "
                   "shorter one is for a key that must stop signing now (compromised).",
                   err=True)


@main.command()
@click.option("--port", default=8000, show_default=True, type=int, help="Hub port.")
@click.option("--data-dir", default="var/demo", show_default=True, type=click.Path())
def demo(port: int, data_dir: str) -> None:
    """Run the hub with a demo upstream OpenID provider and a demo agency site."""
    from .demo import run_demo

    sys.exit(run_demo(hub_port=port, data_dir=data_dir))


def _ledger(ctx: click.Context) -> Any:
    return _hub(ctx).ledger


audit_group = make_audit_cli(_ledger)
main.add_command(audit_group)


@audit_group.command("reconcile")
@click.option("--from", "since", type=click.DateTime(), default=None)
@click.option("--to", "until", type=click.DateTime(), default=None)
@click.pass_context
def audit_reconcile(ctx: click.Context, since: Any, until: Any) -> None:
    """Check that consent events and decisions match ledger entries one to one, and that
    each record still says what its entry says (decisions past the decision log's
    retention excepted: their answers are deleted)."""
    from datetime import UTC, datetime, timedelta

    from consent.reconcile import reconcile

    hub = _hub(ctx)
    days = hub.settings.decision_log_retention_days
    report = reconcile(hub.db, hub.ledger, since and since.replace(tzinfo=UTC),
                       until and until.replace(tzinfo=UTC),
                       decisions_kept_since=(datetime.now(UTC) - timedelta(days=days)
                                             if days else None))
    click.echo(f"{report.records} record(s), {report.entries} ledger entr(y/ies)")
    if report.past_retention:
        click.echo(f"{report.past_retention} decision entr(y/ies) older than the decision "
                   f"log's retention ({days} days): their answers were deleted, as they "
                   "should be")
    if report.erased:
        click.echo(f"{report.erased} decision(s) about an erased account: compared with "
                   "their entries apart from whom they were about")
    for item in report.missing_in_ledger:
        click.echo(f"missing in ledger: {item}")
    for item in report.unmatched_entries:
        click.echo(f"ledger entry without its record: {item}")
    for item in report.altered:
        click.echo(f"record differs from its ledger entry: {item}")
    if not report.ok:
        raise SystemExit(1)
    click.echo("one to one, each record as its entry says: ok")


if __name__ == "__main__":  # pragma: no cover
    main()
