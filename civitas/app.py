"""The app factory: settings -> storage -> services -> blueprints."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import secrets
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749.errors import InsecureTransportError
from flask import Flask, Request, g, jsonify, render_template, request, session
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.wrappers import Response

from broker.accounts import (
    AccountDirectory,
    account_closed_at,
    account_is_live,
    hold_open_account,
)
from broker.health import HealthPolicy, UpstreamHealth
from broker.models import AccountEvent
from broker.ratelimit import AttemptLimiter
from broker.service import Broker
from broker.session import StoreSessionInterface
from broker.session import cookie_name as session_cookie_name
from broker.views import create_blueprint as broker_blueprint
from config import Settings, settings_from_mapping
from config.schema import LDAPUpstreamSettings, UpstreamSettings
from connectors import PasswordConnector, RedirectConnector
from connectors.oidc import OIDCConfig, OIDCConnector
from consent.ledger.ledger import Ledger, hashed_id
from consent.ledger.sealer import LedgerSealer
from consent.officer_views import create_officer_blueprint
from consent.officer_views import wants_json as officer_wants_json
from consent.officers import OfficerRule, OfficerWorkspace, pseudonym_key
from consent.service import ConsentService
from consent.views import create_blueprint as consent_blueprint
from idp.admin_api import create_blueprint as admin_api_blueprint
from idp.agencies import (
    SERVICE_SCOPES,
    AgencyClient,
    AgencyRegistry,
    RegistrationPolicy,
    shared_sector_notice,
)
from idp.agency_keys import AgencyKeys
from idp.backchannel import AgencyNotifier
from idp.citizen import CitizenReads
from idp.consent_step import make_withdrawal_handler, make_withdrawal_writes
from idp.keys import KeyRing
from idp.logout import LogoutService, SessionParticipants
from idp.logout_views import create_blueprint as logout_blueprint
from idp.pairwise import PairwiseSubjects
from idp.provider import HubAuthorizationServer, ProviderServices
from idp.tokens import ACCOUNT_DELETED, AccessTokens, RefreshTokens, TokenStore
from idp.views import create_blueprint as idp_blueprint
from kernel import timefmt
from kernel.crypto import DecryptionError, FieldCipher
from kernel.db import Database, database_unreachable, startup_lock, utcnow
from kernel.errors import CivitasError, ConfigError
from kernel.ratelimit import Limit, RateLimited, RateLimiter, address_bucket
from kernel.store import ShortLivedStore, open_store, store_unavailable
from kernel.urls import is_loopback_host

from . import observability
from .consent_wiring import (
    HubReceiptSigner,
    agency_authenticator,
    agency_policies,
    receipt_contact_notices,
)
from .envelope import REQUEST_ID, ResponseEnvelope, new_request_id
from .housekeeping import Housekeeper
from .json_provider import FastJSONProvider
from .request import HubRequest

log = logging.getLogger("civitas")


@dataclass
class Hub:
    """Every service of one running hub, for the app, the CLI and tests."""

    settings: Settings
    db: Database
    store: ShortLivedStore
    cipher: FieldCipher
    accounts: AccountDirectory
    agencies: AgencyRegistry
    keys: KeyRing
    tokens: TokenStore
    broker: Broker
    server: HubAuthorizationServer
    logout: LogoutService
    dispatcher: AgencyNotifier
    ledger: Ledger

    @property
    def consent(self) -> ConsentService:
        assert self.server.hub.consent is not None
        return self.server.hub.consent


#: why the hub will not start when its signing keys cannot be decrypted
UNREADABLE_KEYS = (
    "encryption_key: the signing keys stored in the database cannot be decrypted with any "
    "configured key. CIVITAS_ENCRYPTION_KEY must still list the key that encrypted them "
    "(check it for a typo; when rotating keys, remove the old key only after `civitas "
    "secrets reencrypt` ends with every value under key 1: deploy/README.md)")

#: threads per worker process when the caller does not say (`civitas serve --threads`)
DEFAULT_THREADS = 4


def make_connector(upstream: UpstreamSettings, *, threads: int = DEFAULT_THREADS
                   ) -> RedirectConnector | PasswordConnector:
    """One connector per configured upstream, by its ``kind``. ``threads``: the serving
    threads of each worker process, of which one upstream may hold half unless its
    ``max_concurrent_calls`` says otherwise (connectors.base.Bulkhead)."""
    calls = upstream.max_concurrent_calls or max(1, threads // 2)
    if isinstance(upstream, LDAPUpstreamSettings):
        # imported only where an LDAP upstream is configured: ldap3 adds about 5 MB to
        # every worker's RSS (bench/README.md, ninth session)
        from connectors.ldap import LDAPConfig, LDAPConnector

        return LDAPConnector(LDAPConfig(
            id=upstream.id, display_name=upstream.display_name, url=upstream.url,
            start_tls=upstream.start_tls, ca_file=upstream.ca_file, bind_dn=upstream.bind_dn,
            bind_password=(upstream.bind_password.get_secret_value()
                           if upstream.bind_password else None),
            user_dn_template=upstream.user_dn_template, user_base_dn=upstream.user_base_dn,
            user_filter=upstream.user_filter, subject_attribute=upstream.subject_attribute,
            attribute_map=tuple(upstream.attribute_map.items()),
            group_attribute=upstream.group_attribute, group_base_dn=upstream.group_base_dn,
            group_filter=upstream.group_filter,
            group_name_attribute=upstream.group_name_attribute, acr=upstream.acr,
            timeout_seconds=upstream.timeout_seconds, pool_size=upstream.pool_size,
            max_concurrent_calls=calls,
        ))
    assert upstream.client_secret is not None
    return OIDCConnector(OIDCConfig(
        id=upstream.id, display_name=upstream.display_name, issuer=upstream.issuer,
        client_id=upstream.client_id, client_secret=upstream.client_secret.get_secret_value(),
        scopes=tuple(upstream.scopes), acr=upstream.acr,
        id_token_algs=tuple(upstream.id_token_algs), timeout_seconds=upstream.timeout_seconds,
        require_iss_parameter=upstream.require_iss_parameter, max_concurrent_calls=calls,
    ))


def build_hub(settings: Settings, *, migrate: bool = True,
              threads: int = DEFAULT_THREADS) -> Hub:
    """Wire storage and services. ``migrate`` brings the schema to the newest revision;
    ``threads``: the serving threads of each worker process (:func:`make_connector`)."""
    if settings.database_url.startswith("sqlite:///"):
        path = settings.database_url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            # the hub's records (consents, the agencies' decisions, the ledger) for the hub's
            # user alone, as PostgreSQL keeps its files; SQLite gives its journal files the
            # database file's permissions
            file = Path(path.partition("?")[0])
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    db = Database(settings.database_url, pool_size=settings.database_pool_size)
    if migrate:
        # imported here: Alembic (and Mako) is ~11 MB of memory that a gunicorn worker, whose
        # schema `civitas serve` brought up to date before starting it, never loads
        from .migrations import upgrade

        with startup_lock(db.engine):
            upgrade(db.engine)
    store = open_store(settings.redis_url)
    cipher = FieldCipher(settings.encryption_keys)
    ranking = settings.attribute_source_ranking or [u.id for u in settings.upstreams]
    ledger = Ledger(db, cipher, origin=urlsplit(settings.issuer).netloc + "/ledger")
    account_key = pseudonym_key(settings.pairwise_secret.get_secret_value())

    def account_event_to_ledger(event: AccountEvent, session: Any) -> None:
        ledger.append(f"account.{event.kind}", {
            "account": hashed_id(account_key, event.account_id),
            "connector": event.connector_id, "acr": event.acr,
        }, session=session)

    accounts = AccountDirectory(db, cipher, source_ranking=ranking,
                                on_event=account_event_to_ledger)
    keys = KeyRing(db, cipher)
    agencies = AgencyRegistry(db, policy=RegistrationPolicy(
        default_alg=settings.signing_alg, allow_public_subjects=settings.allow_public_subjects,
        allow_insecure_jwks_uri=settings.allow_insecure_jwks_uri,
    ),
        on_signing_alg=keys.ensure,  # an agency's ID token algorithm gets a key when registered
        on_change=lambda kind, data, s: ledger.append(kind, data, session=s))
    tokens = TokenStore(store, code_lifetime=settings.code_lifetime_seconds,
                        access_token_lifetime=settings.access_token_lifetime_seconds)
    connectors = {u.id: make_connector(u, threads=threads) for u in settings.upstreams}
    broker = Broker(issuer=settings.issuer, connectors=connectors, accounts=accounts,
                    flow_lifetime=settings.login_flow_lifetime_seconds,
                    limiter=AttemptLimiter(store), health=UpstreamHealth(store, {
                        u.id: HealthPolicy(
                            failures=u.down_after_failures, down_seconds=u.down_seconds,
                            # the probe's call (a GET retried once, each up to the
                            # timeout and one read's wait: kernel.bounded) and a margin
                            probe_seconds=math.ceil(3 * u.timeout_seconds) + 5)
                        for u in settings.upstreams}))
    services = ProviderServices(
        issuer=settings.issuer, agencies=agencies, tokens=tokens, accounts=accounts, keys=keys,
        access_tokens=AccessTokens(issuer=settings.issuer, keys=keys, tokens=tokens,
                                   cipher=cipher),
        refresh_tokens=RefreshTokens(db, tokens, lifetime=settings.refresh_token_lifetime_seconds),
        subjects=PairwiseSubjects(settings.pairwise_secret.get_secret_value()),
        id_token_lifetime=settings.id_token_lifetime_seconds,
        participants=SessionParticipants(store, ttl=settings.session_lifetime_seconds),
        agency_keys=AgencyKeys(allow_insecure=settings.allow_insecure_jwks_uri),
        limiter=RateLimiter(store, window_seconds=settings.rate_limits.window_seconds),
        agency_limit=settings.rate_limits.token_per_agency,
    )
    server = HubAuthorizationServer(services)
    dispatcher = AgencyNotifier(db, keys, issuer=settings.issuer,
                                timeout=settings.backchannel_timeout_seconds)
    logout = LogoutService(services, services.participants, dispatcher)
    services.consent = ConsentService(db, HubReceiptSigner(keys, settings.signing_alg),
                                      on_withdraw=make_withdrawal_handler(services, dispatcher),
                                      with_withdrawal=make_withdrawal_writes(services,
                                                                             dispatcher),
                                      ledger=ledger, account_open=account_is_live,
                                      account_closed_at=account_closed_at,
                                      hold_open_account=hold_open_account)
    services.citizens = CitizenReads(db, accounts, services.consent)
    services.policies = agency_policies(settings)
    return Hub(settings=settings, db=db, store=store, cipher=cipher, accounts=accounts,
               agencies=agencies, keys=keys, tokens=tokens, broker=broker, server=server,
               logout=logout, dispatcher=dispatcher, ledger=ledger)


def freeze_heap() -> None:
    """Call once the app is built, before serving: collect what start-up left behind, then
    move every object alive to the collector's permanent generation (``gc.freeze``).

    Start-up builds some 150,000 objects that live as long as the process (modules, the app,
    its caches). Without this, every full collection walks them all: 70-110 ms during which
    the worker's threads wait on the interpreter lock, which made the decision API's
    slowest requests (p99.9 185-217 ms, max 198-232 ms at 5,000 decisions/s;
    bench/README.md). Full collections now walk only what was made since."""
    gc.collect()
    gc.freeze()


class HubFlask(Flask):
    """Flask whose ``ensure_sync`` answers from a table. Flask asks it of each hook and of
    the view on every request, and its answer (``inspect.iscoroutinefunction``, which
    unwraps the function and reads its flags) never changes for a function: 0.6% of a
    login's CPU. The hub has no ``async`` view or hook; one added later would still be
    wrapped, once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._synced: dict[Any, Any] = {}

    def ensure_sync(self, func: Any) -> Any:
        try:
            return self._synced[func]
        except KeyError:
            synced = super().ensure_sync(func)
            if len(self._synced) < 1024:  # the app's own functions; never one per request
                self._synced[func] = synced
            return synced
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)

    def log_exception(self, exc_info: Any) -> None:
        """Flask logs an error raised outside the view (opening the session) before handing
        it to the error handlers. A store or database that is down is logged there, once,
        with the request id (``unavailable``): not again here with a traceback; anything
        else is logged with the request's id, as the error page shows it."""
        error = exc_info[1] if exc_info else None
        if error is not None and _is_unavailable(error):
            return
        try:
            _request_id_now()
        except RuntimeError:  # (no request context: nothing to name)
            pass
        super().log_exception(exc_info)


def create_app(config: Settings | Mapping[str, Any] | None = None, *,
               hub: Hub | None = None, migrate: bool = True,
               threads: int = DEFAULT_THREADS) -> Flask:
    """Build the Flask app. ``config`` is a Settings object or a plain mapping (tests).
    ``migrate=False`` when the schema is known to be up to date (see ``build_hub``);
    ``threads``: the threads that will serve it in each process."""
    if hub is None:
        if config is None:
            from config import load_settings

            settings = load_settings()
        elif isinstance(config, Settings):
            settings = config
        else:
            settings = settings_from_mapping(config)
        hub = build_hub(settings, migrate=migrate, threads=threads)
    settings = hub.settings
    _allow_loopback_http(settings.issuer)
    with startup_lock(hub.db.engine):
        hub.agencies.sync_from_config(settings.agencies)
        try:
            hub.keys.ensure(tuple(sorted({settings.signing_alg} | hub.agencies.signing_algs())))
        except DecryptionError as exc:
            raise ConfigError(UNREADABLE_KEYS) from exc
    for host, client_ids in hub.agencies.shared_host_sectors().items():
        log.warning("privacy: %s", shared_sector_notice(host, client_ids))
    for notice in receipt_contact_notices(hub.server.hub.policies):
        log.warning("privacy: %s", notice)
    for client_id, problem in hub.agencies.nonconforming():
        log.warning("agency %r no longer passes registration: %s; see `civitas agency "
                    "check`", client_id, problem)

    app = HubFlask(__name__)
    app.request_class = HubRequest  # the token endpoint's forms, read directly
    app.json = FastJSONProvider(app)  # the decision API's answers (civitas/json_provider.py)
    app.extensions["civitas"] = hub
    app.config.update(
        SESSION_COOKIE_NAME=session_cookie_name(settings.is_https),
        MAX_CONTENT_LENGTH=64 * 1024,
        PREFERRED_URL_SCHEME="https" if settings.is_https else "http",
    )
    app.session_interface = StoreSessionInterface(
        hub.store, lifetime=settings.session_lifetime_seconds, secure=settings.is_https,
        sessionless=_PROGRAM_PATHS, renewed_with=hub.server.hub.participants.renewal)
    app.register_blueprint(broker_blueprint(
        hub.broker, on_logout=hub.logout.end_session,
        on_delete=lambda account_id: end_grants_and_consents(hub, account_id)))
    app.register_blueprint(idp_blueprint(hub.server, hub.broker))
    app.register_blueprint(logout_blueprint(hub.logout))
    app.register_blueprint(consent_blueprint(
        hub.consent, authenticate_agency=agency_authenticator(hub.server, DECISION_SCOPE),
        decision_scope=DECISION_SCOPE, store=hub.store,
        rate_limit=settings.rate_limits.decision_per_agency,
        rate_limit_per_address=settings.rate_limits.decision_per_address,
        rate_window_seconds=settings.rate_limits.window_seconds,
        issuer=settings.issuer, describe_agency=_agency_policy(hub),
        history_days=settings.decision_log_retention_days,
        offline_use=hub.server.hub.refresh_tokens.offline_use,
        subjects_of=subjects_at_every_agency(hub)))
    app.register_blueprint(_officer_blueprint(hub))
    admin_token = settings.admin_api_token
    app.register_blueprint(admin_api_blueprint(
        hub.agencies, admin_token.get_secret_value() if admin_token else None))
    # the background threads stop when the app is collected, or at stop_background(app)
    stops: list[weakref.finalize[Any, Any]] = app.extensions.setdefault(_BACKGROUND, [])
    if settings.ledger_seal_interval_seconds:
        # checkpoints on a schedule; `civitas audit checkpoint` signs one on demand
        sealer = LedgerSealer(hub.ledger, interval=settings.ledger_seal_interval_seconds)
        sealer.start()
        stops.append(weakref.finalize(app, sealer.stop, 0))
    if settings.housekeeping_interval_seconds:
        housekeeper = Housekeeper(hub, interval=settings.housekeeping_interval_seconds)
        housekeeper.start()
        stops.append(weakref.finalize(app, housekeeper.stop, 0))
    if settings.backchannel_dispatcher:
        hub.dispatcher.start()
        # The thread also stops when the hub's database is disposed (see AgencyNotifier).
        stops.append(weakref.finalize(app, hub.dispatcher.stop))
    if settings.trusted_proxy_hops:
        # X-Forwarded-For/-Proto/-Host are believed only from this many proxies in front
        # (and, with trusted_proxy_addresses, only when the peer is one of them)
        from .proxies import believe_forwarded

        app.wsgi_app = believe_forwarded(  # type: ignore[method-assign,assignment]
            app.wsgi_app, settings.trusted_proxy_hops, settings.trusted_proxy_addresses)
    _install_request_hooks(app)
    app.config[timefmt.CONFIG_KEY] = settings.display_timezone  # (kernel.timefmt)
    _install_address_limits(app, hub)
    _install_error_pages(app)
    observability.install(app)
    return app


_BACKGROUND = "civitas.background"


def stop_background(app: Flask) -> None:
    """Stop the app's background threads (ledger sealer, housekeeper, agency notifier)
    now, as the app's finalizer does when it is collected: for a process that ends an app
    and goes on (tests make many). Each stops once; a second call does nothing."""
    for stop in app.extensions.get(_BACKGROUND, ()):
        stop()


def end_grants_and_consents(hub: Hub, account_id: str) -> None:
    """Right to erasure, once the account is closed: every refresh grant of the account is
    revoked (first, so that its reason says so: any agency's, consent-based or not), then
    every consent withdrawn, then the agencies' questions about it stripped of whom they
    were about: those that resolved to it, and those that named its ``sub`` at an agency
    without resolving (no record there yet). Idempotent (housekeeping repeats it for an
    erasure cut off)."""
    hub.server.hub.refresh_tokens.revoke_account(account_id, reason=ACCOUNT_DELETED)
    hub.consent.withdraw_all(account_id)
    hub.consent.decisions.forget_account(account_id, now=utcnow(),
                                         subjects=subjects_at_every_agency(hub)(account_id))


def subjects_at_every_agency(hub: Hub) -> Callable[[str], list[tuple[str, str]]]:
    """An account's (client_id, ``sub``) at every registered agency, whether or not it has
    signed in there: another agency of the same pairwise sector (or any ``public`` one) can
    ask about it before it does."""
    provider = hub.server.hub

    def subjects(account_id: str) -> list[tuple[str, str]]:
        return [(client.client_id, provider.subject_for(client, account_id))
                for client in map(AgencyClient.from_row, hub.agencies.list())]

    return subjects


def _agency_policy(hub: Hub) -> Any:
    def describe(client_id: str) -> Any:
        client = hub.agencies.client(client_id)
        return hub.server.hub.policy_for(client) if client is not None else None

    return describe


def _officer_blueprint(hub: Hub) -> Any:
    """The privacy officer's workspace (/officer/), for holders of ``officer_role``."""
    settings = hub.settings
    provider = hub.server.hub

    def policy_of(client_id: str) -> tuple[Any, bool] | None:
        client = hub.agencies.client(client_id)
        if client is None:
            return None
        return provider.policy_for(client), client_id in provider.policies

    key = pseudonym_key(settings.pairwise_secret.get_secret_value())
    workspace = OfficerWorkspace(hub.db, hub.ledger, pseudonym_key=key,
                                 account_for_credential=hub.accounts.account_for_credential,
                                 decision_log_days=settings.decision_log_retention_days,
                                 subjects_of=subjects_at_every_agency(hub))
    return create_officer_blueprint(
        workspace, rules=[OfficerRule(r.upstream, r.attribute, r.value)
                          for r in settings.officer_role],
        attributes_of=hub.accounts.attribute_records, account_exists=hub.accounts.exists,
        agencies=lambda: [(a.client_id, a.name) for a in hub.agencies.list()],
        policy_of=policy_of)


def _allow_loopback_http(issuer: str) -> None:
    # Authlib refuses http:// requests unless told otherwise; settings validation already
    # limits http issuers to loopback addresses (development and tests).
    parts = urlsplit(issuer)
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"


def _request_id_now() -> str:
    """``g.request_id``, from the envelope: also for errors raised before the request's own
    hooks ran (a session store that is down fails while the request is being opened). The
    request's ``g`` is looked up once: each use of Flask's proxy is a lookup, and this runs
    on every request (about 1% of a login's CPU for four of them)."""
    state = g._get_current_object()
    if "request_id" not in state:
        state.request_id = request.environ.get(REQUEST_ID) or new_request_id()
    return str(state.request_id)


def _install_request_hooks(app: Flask) -> None:
    # the id, the start time and the headers of every response come from the envelope
    app.wsgi_app = ResponseEnvelope(app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def _request_id() -> None:
        _request_id_now()

    @app.context_processor
    def _csrf() -> dict[str, Any]:
        def csrf_token() -> str:
            token = session.get("csrf")
            if not token:
                token = secrets.token_urlsafe(24)
                session["csrf"] = token
            return str(token)

        return {"csrf_token": csrf_token}


#: endpoint -> (limit group, answer in JSON); the decision API counts its own (with the agency)
_ADDRESS_LIMITED = {
    "idp.token": ("token", True), "idp.revoke": ("token", True),
    "idp.introspect": ("token", True),
    "idp.authorize": ("login", False), "idp.resume": ("login", False),
    "broker.login_page": ("login", False), "broker.start": ("login", False),
    "broker.password": ("login", False), "broker.callback": ("login", False),
}


DECISION_SCOPE = SERVICE_SCOPES[0]

#: environ key: (the endpoint whose limit per address was counted as the session was read,
#: the RateLimited it raised or None)
_ADDRESS_COUNTED = "civitas.address_limit_counted"


def _install_address_limits(app: Flask, hub: Hub) -> None:
    """Per client address limits, counted before any other work (RFC 6585 section 4). The
    address is the peer's, or the one the trusted proxies give (``trusted_proxy_hops``)."""
    limits = hub.settings.rate_limits
    per_group = {"token": limits.token_per_address, "login": limits.login_per_address}
    limiter = hub.server.hub.limiter  # the provider's: one window setting, one store
    assert limiter is not None

    def limit_of(group: str, address: str | None) -> list[Limit]:
        return [Limit(f"{group}:addr:{address_bucket(address)}", per_group[group])]

    # A browser endpoint's limit is counted as its session is read, in one round trip to
    # the store: the session is opened before the request's endpoint is known, so this
    # holds for the limited endpoints whose path is fixed (/authorize, /login, ...),
    # matched here as the URL map would match them. The others, and the program endpoints
    # (no browser session), are counted by ``_per_address`` alone.
    fixed = {(rule.rule, method): rule.endpoint
             for rule in app.url_map.iter_rules()
             if rule.endpoint in _ADDRESS_LIMITED and not rule.arguments
             for method in rule.methods or ()}
    sessions = app.session_interface
    assert isinstance(sessions, StoreSessionInterface)
    read_only = sessions.reader

    def read_and_count(req: Request, key: str | None) -> dict[str, Any] | None:
        endpoint = fixed.get((req.path, req.method))
        if endpoint is None:
            return read_only(req, key)
        group = _ADDRESS_LIMITED[endpoint][0]
        try:
            data = limiter.hit(limit_of(group, req.remote_addr), fetch=key)
        except RateLimited as exc:
            req.environ[_ADDRESS_COUNTED] = (endpoint, exc)
            return None  # the request is answered 429 below; its session is left as it is
        req.environ[_ADDRESS_COUNTED] = (endpoint, None)
        return data

    sessions.reader = read_and_count

    @app.before_request
    def _per_address() -> Response | tuple[str, int, dict[str, str]] | None:
        endpoint = request.endpoint or ""
        if endpoint not in _ADDRESS_LIMITED:
            return None
        group, as_json = _ADDRESS_LIMITED[endpoint]
        counted, reached = request.environ.get(_ADDRESS_COUNTED, ("", None))
        try:
            if counted != endpoint:
                limiter.hit(limit_of(group, request.remote_addr))
            elif reached is not None:
                raise reached
        except RateLimited as exc:
            message = ("Too many requests from your network address; please wait "
                       f"{exc.retry_after} seconds and try again.")
            headers = {"Retry-After": str(exc.retry_after)}
            log.warning("request %s: %s limit per address reached for %s", _request_id_now(),
                        group, request.remote_addr)
            if as_json:
                response = jsonify(error="rate_limited", error_description=message)
                response.status_code = 429
                response.headers.update(headers)
                response.headers["Cache-Control"] = "no-store"
                return response
            return render_template("error.html", status=429, message=message), 429, headers
        return None


def _install_error_pages(app: Flask) -> None:
    """The one place that turns errors into pages for people."""

    def page(status: int, message: str) -> tuple[str, int]:
        _request_id_now()  # the page quotes it
        return render_template("error.html", status=status, message=message), status

    @app.errorhandler(CivitasError)
    def _civitas_error(error: CivitasError) -> Any:
        level = logging.ERROR if error.status_code >= 500 else logging.WARNING
        # a refusal that says when to try again (a busy upstream) is a known state, not a
        # fault: no traceback
        log.log(level, "request %s failed: %s: %s%s", _request_id_now(),
                type(error).__name__, error, f" ({error.detail})" if error.detail else "",
                exc_info=error.status_code >= 500 and error.retry_after is None)
        status = error.status_code
        code = _HTTP_ERROR_CODES.get(status, "server_error" if status >= 500 else
                                     "invalid_request")
        return refuse(status, code, error.public_message,
                      None if error.retry_after is None else
                      {"Retry-After": str(error.retry_after)})

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Any:
        original = getattr(error, "original_exception", None)
        if original is not None and _is_unavailable(original):
            # raised while the request was being opened (the session store is down): Flask
            # hands it over as a 500, but it is the same "try again" as in a view
            return unavailable(original)
        status = error.code or 500
        # Werkzeug's headers but its HTML type: the Allow of a 405 (RFC 9110 15.5.6), ...
        headers = {name: value for name, value in error.get_headers()
                   if name.lower() != "content-type"}
        # (an address under /.well-known/ that the hub does not serve keeps the page: that
        # namespace also holds addresses for people and browsers, RFC 8615)
        if _for_programs() and not (status == 404 and request.path.startswith("/.well-known/")):
            code = _HTTP_ERROR_CODES.get(status,
                                         "server_error" if status >= 500 else "invalid_request")
            return refuse(status, code, _program_message(error, status), headers)
        messages = {
            400: "The request was not understood.",
            404: "There is no page at this address.",
            405: "This page cannot be used that way.",
            413: "The request is too large.",
        }
        body, _ = page(status, messages.get(status, error.description or "Request failed."))
        return body, status, headers

    def refuse(status: int, error: str, message: str,
               headers: Mapping[str, str] | None = None) -> Any:
        """Programs (:func:`_for_programs`) get ``{"error", "error_description"}`` (RFC 6749
        5.2), people the error page; both with ``headers``."""
        if _for_programs():
            response = jsonify(error=error, error_description=message)
            response.status_code = status
            response.headers.update(headers or {})
            return response
        body, _ = page(status, message)
        return body, status, dict(headers or {})

    @app.errorhandler(InsecureTransportError)
    def _insecure_transport(_error: InsecureTransportError) -> Any:
        # RFC 6749 3.1 and 3.2: the authorization and token endpoints require TLS. Authlib
        # refuses a request that reached the hub over plain http (no TLS in front of it, or
        # a proxy whose X-Forwarded-Proto is not believed: trusted_proxy_hops) before any
        # OAuth processing, with an error that no endpoint turns into a response
        log.warning("request %s: refused over plain http (%s); if a proxy terminates TLS "
                    "in front of the hub, check trusted_proxy_hops", _request_id_now(),
                    request.host_url)
        return refuse(400, "invalid_request", "This service must be reached over HTTPS.",
                      {"Cache-Control": "no-store"})

    def unavailable(error: BaseException) -> Any:
        # the database or Redis is unreachable (or just restarted): nothing was done that
        # could be half done (each unit of work is one transaction), so say "try again"
        # (RFC 9110 15.6.4), to machines in JSON and to people in a page
        log.error("request %s: storage unavailable: %s: %s", _request_id_now(),
                  type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return refuse(503, "temporarily_unavailable",
                      "The service is briefly unavailable. Please try again in a moment.",
                      {"Retry-After": "5", "Cache-Control": "no-store"})

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Any:
        if _is_unavailable(error):
            return unavailable(error)
        if _holds_nul(error):
            # the views refuse NUL where they read input (client ids, AuthZEN fields); this
            # is the net under them: a NUL can only have come from the request, and the
            # transaction it was in has rolled back
            log.warning("request %s: a NUL character reached the database", _request_id_now())
            return refuse(400, "invalid_request",
                          "The request contains a NUL character, which no field may hold.")
        log.exception("request %s failed with an unexpected error", _request_id_now())
        return refuse(500, "server_error",
                      "Something went wrong on our side. Please try again later.")


def _for_programs() -> bool:
    """Whether this request's errors are answered in JSON: on the program endpoints
    (``_JSON_PATHS``) and the officer's exports (``consent.officer_views.wants_json``)."""
    path = request.path
    return path.startswith(_JSON_PATHS) or (path.startswith("/officer/") and
                                            officer_wants_json())


#: the error codes of HTTP errors answered in JSON, by status (else ``invalid_request``,
#: or ``server_error`` from 500 on)
_HTTP_ERROR_CODES = {404: "not_found", 429: "rate_limited", 503: "temporarily_unavailable"}


def _program_message(error: HTTPException, status: int) -> str:
    """What a program is told of an HTTP error: the methods it may use instead, say."""
    if isinstance(error, MethodNotAllowed):
        methods = sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"})
        if methods:
            return f"The method {request.method} is not allowed here; use {', '.join(methods)}."
    if status >= 500:
        return "Something went wrong on our side. Please try again later."
    messages = {
        400: "The request was not understood.",
        404: "There is nothing at this address.",
        405: "This method is not allowed here.",
        413: "The request is too large.",
    }
    return messages.get(status, error.description or "The request failed.")


#: endpoints whose clients are programs: errors in JSON
_JSON_PATHS = ("/token", "/introspect", "/revoke", "/userinfo", "/access/", "/admin/api",
               "/jwks", "/.well-known/")
#: endpoints no browser session takes part in (they authenticate clients or bearer tokens)
_PROGRAM_PATHS = (*_JSON_PATHS, "/healthz", "/readyz", "/metrics")


def _holds_nul(error: BaseException) -> bool:
    """PostgreSQL text cannot hold U+0000, and psycopg refuses to send it (a DataError)."""
    from sqlalchemy import exc as sa_exc

    return isinstance(error, sa_exc.DataError) and "NUL (0x00)" in str(error.orig)


def _is_unavailable(error: BaseException) -> bool:
    """A lost or refused connection to PostgreSQL or Redis, or a Redis refusing writes for
    a while (not a bug in a query)."""
    return database_unreachable(error) or store_unavailable(error)
