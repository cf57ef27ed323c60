"""The settings schema. Validated once at start-up; an error names the key that is wrong.

Secrets (client secrets, the encryption key, the pairwise secret) may be written inline for
tests, but operators give them through the environment (``CIVITAS_ENCRYPTION_KEY``...) or a
``*_env`` / ``*_file`` indirection, so the YAML file itself holds none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kernel.urls import check_redirect_uri, check_url

SLUG = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ALLOWED_UPSTREAM_ALGS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                         "ES512", "EdDSA"}


def _resolve_secret(inline: SecretStr | None, env: str | None, file: Path | None,
                    name: str) -> SecretStr | None:
    given = [x for x in (inline, env, file) if x is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {name}, {name}_env, {name}_file")
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"{name}_env names the environment variable {env!r}, which is not set")
        return SecretStr(value)
    if file is not None:
        try:
            return SecretStr(file.read_text().strip())
        except OSError as exc:
            raise ValueError(f"{name}_file {str(file)!r} cannot be read: {exc.strerror}") from exc
    return inline


class _UpstreamAvailability(BaseModel):
    """How the hub copes with an upstream that is slow or down (both kinds)."""

    #: logins through this upstream at once in one worker process: one more waits up to half
    #: a second for a place (not at all once a call in flight has taken a second), then is
    #: refused with a "try again in a minute" page (503), so that a slow upstream cannot hold
    #: every thread of a worker. Unset: half the worker's threads (`civitas serve
    #: --threads`), at least one.
    max_concurrent_calls: Annotated[int, Field(ge=1, le=256)] | None = None
    #: after this many calls in a row failed to reach the upstream (timed out, refused, a 5xx),
    #: within a minute of the first and in any worker, the upstream is taken as down: logins
    #: through it are refused at once for ``down_seconds`` (503, "not answering right now"),
    #: and the sign-in page says so. Then one login tries it; if that call fails too it is
    #: down again, if it answers the upstream is back. 0: never taken as down.
    down_after_failures: Annotated[int, Field(ge=0, le=1000)] = 5
    down_seconds: Annotated[int, Field(ge=1, le=3600)] = 30


class OIDCUpstreamSettings(_UpstreamAvailability):
    """An upstream OpenID provider the citizen can log in with."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["oidc"]
    id: Annotated[str, Field(pattern=SLUG)]
    display_name: Annotated[str, Field(min_length=1, max_length=80)]
    issuer: str
    client_id: Annotated[str, Field(min_length=1)]
    client_secret: SecretStr | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    scopes: list[str] = ["openid", "profile", "email"]
    #: the authentication context this upstream provides (NIST SP 800-63 style URI)
    acr: str = "urn:civitas:acr:ial1:aal1"
    id_token_algs: list[str] = ["RS256", "ES256", "PS256"]
    #: each wait for the upstream; one answer is given up at this plus one read's wait
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    #: demand RFC 9207 ``iss`` on callbacks even if discovery does not announce it
    require_iss_parameter: bool = False

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        return check_url(v, what="issuer")

    @field_validator("id_token_algs")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ALLOWED_UPSTREAM_ALGS]
        if bad:
            raise ValueError(f"unsupported or unsafe algorithm(s) {bad}; allowed: "
                             f"{sorted(ALLOWED_UPSTREAM_ALGS)}")
        if not v:
            raise ValueError("at least one algorithm is needed")
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("must include 'openid'")
        return v

    @model_validator(mode="after")
    def _secret(self) -> OIDCUpstreamSettings:
        self.client_secret = _resolve_secret(
            self.client_secret, self.client_secret_env, self.client_secret_file, "client_secret"
        )
        if self.client_secret is None:
            raise ValueError("client_secret is required (give client_secret_env or "
                             "client_secret_file)")
        self.client_secret_env = None
        self.client_secret_file = None
        return self


class LDAPUpstreamSettings(_UpstreamAvailability):
    """An LDAP directory (typically an agency's staff directory): a password-style upstream.

    Either search-then-bind with a service account (``bind_dn`` + ``bind_password`` +
    ``user_base_dn``) or a direct bind with ``user_dn_template``. The server certificate is
    always verified (``ca_file``); plain ``ldap://`` without ``start_tls`` only to loopback.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ldap"]
    id: Annotated[str, Field(pattern=SLUG)]
    display_name: Annotated[str, Field(min_length=1, max_length=80)]
    url: Annotated[str, Field(pattern=r"^ldaps?://")]
    start_tls: bool = False
    ca_file: str | None = None
    bind_dn: str | None = None
    bind_password: SecretStr | None = None
    bind_password_env: str | None = None
    bind_password_file: Path | None = None
    user_dn_template: str | None = None
    user_base_dn: str | None = None
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={username}))"
    subject_attribute: str = "entryUUID"
    #: claim name -> LDAP attribute
    attribute_map: dict[str, str] = {"name": "cn", "given_name": "givenName",
                                     "family_name": "sn", "email": "mail",
                                     "preferred_username": "uid"}
    group_attribute: str | None = None
    group_base_dn: str | None = None
    group_filter: str = "(&(objectClass=groupOfNames)(member={dn}))"
    group_name_attribute: str = "cn"
    acr: str = "urn:civitas:acr:ial1:aal1"
    #: each wait for the directory; one exchange (a bind, a search) is cut off after twice
    #: this, however its answer trickles in
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0
    pool_size: Annotated[int, Field(ge=1, le=64)] = 4

    @model_validator(mode="after")
    def _secret(self) -> LDAPUpstreamSettings:
        self.bind_password = _resolve_secret(
            self.bind_password, self.bind_password_env, self.bind_password_file, "bind_password"
        )
        self.bind_password_env = None
        self.bind_password_file = None
        return self


# A discriminated union on ``kind``; SAML upstreams join it later.
UpstreamSettings = Annotated[OIDCUpstreamSettings | LDAPUpstreamSettings,
                             Field(discriminator="kind")]


class ClaimDeclaration(BaseModel):
    """One claim an agency asks for: why (purposes) and on what lawful basis."""

    model_config = ConfigDict(extra="forbid")

    claim: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]
    purposes: Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]],
                        Field(min_length=1)]
    lawful_basis: Literal["consent", "contract", "legal_obligation", "vital_interests",
                          "public_task", "legitimate_interests"] = "consent"
    required: bool = True
    #: plain words shown to the citizen
    description: Annotated[str, Field(min_length=1, max_length=300)]


class ConsentDeclaration(BaseModel):
    """What an agency declares for consent: its notice and the claims it asks for."""

    model_config = ConfigDict(extra="forbid")

    notice_url: str
    notice_version: Annotated[str, Field(min_length=1, max_length=40)]
    notice_language: str = "en"
    consent_ttl_days: Annotated[int, Field(ge=1, le=3650)] | None = None
    jurisdiction: str = "US"
    purpose_labels: dict[str, str] = {}
    claims: Annotated[list[ClaimDeclaration], Field(min_length=1)]
    #: the privacy office as consent receipts name it (Kantara Consent Receipt 1.1
    #: ``piiControllers[]``): who to contact, and how (email, phone, postal address)
    contact_name: Annotated[str, Field(max_length=120)] = ""
    contact_email: str = ""
    contact_phone: str = ""
    contact_address: str = ""
    #: the postal address's country, ISO 3166-1 alpha-2 (``addressCountry``)
    contact_country: Annotated[str, Field(pattern=r"^([A-Z]{2})?$")] = ""
    #: the privacy office's web page (``piiControllerUrl``)
    contact_url: str = ""

    @field_validator("notice_url")
    @classmethod
    def _notice(cls, v: str) -> str:
        return check_url(v, what="notice_url")

    @field_validator("contact_url")
    @classmethod
    def _contact_url(cls, v: str) -> str:
        return check_url(v, what="contact_url") if v else v


class AgencySettings(BaseModel):
    """An agency site (OpenID Connect client) declared in configuration."""

    model_config = ConfigDict(extra="forbid")

    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._~-]{3,128}$")]
    name: Annotated[str, Field(min_length=1, max_length=120)]
    redirect_uris: Annotated[list[str], Field(min_length=1)]
    client_secret: SecretStr | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    sector_identifier: str | None = None
    scopes: list[str] = ["openid", "profile", "email"]
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post",
                                        "private_key_jwt"] = (
        "client_secret_basic"  # noqa: S105 (a method name, not a secret)
    )
    #: public keys for private_key_jwt (RFC 7523 3): an inline JWK set, or where to fetch it
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    #: default: the hub's ``signing_alg``
    id_token_signed_response_alg: Literal["ES256", "RS256", "PS256"] | None = None
    #: ``public`` needs ``allow_public_subjects`` (OpenID Connect Core 8)
    subject_type: Literal["pairwise", "public"] = "pairwise"
    #: the agency's consent declaration; without one each claim of its scopes is asked for
    #: as required, for "service-delivery", on the basis of consent
    consent: ConsentDeclaration | None = None
    #: RP-Initiated Logout 1.0: where the agency may ask to be sent after logout (exact match)
    post_logout_redirect_uris: list[str] = []
    #: Back-Channel Logout 1.0: where the hub POSTs logout tokens (https, or loopback http)
    backchannel_logout_uri: str | None = None
    #: Back-Channel Logout 1.0 2.2: taken as the agency's developers hand it over; every
    #: logout token carries ``sid`` whatever it says
    backchannel_logout_session_required: bool = True
    #: RFC 8935: where the hub pushes Security Event Tokens (https, or loopback http)
    event_delivery_uri: str | None = None

    @field_validator("redirect_uris", "post_logout_redirect_uris")
    @classmethod
    def _uris(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("duplicate redirect URI")
        return [check_redirect_uri(u) for u in v]

    @field_validator("backchannel_logout_uri")
    @classmethod
    def _backchannel(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v, what="backchannel_logout_uri")

    @field_validator("event_delivery_uri")
    @classmethod
    def _event_delivery(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v, what="event_delivery_uri")

    @model_validator(mode="after")
    def _secret(self) -> AgencySettings:
        self.client_secret = _resolve_secret(
            self.client_secret, self.client_secret_env, self.client_secret_file, "client_secret"
        )
        self.client_secret_env = None
        self.client_secret_file = None
        if self.token_endpoint_auth_method == "private_key_jwt":  # noqa: S105 (a method name)
            if self.client_secret is not None:
                raise ValueError("client_secret: not used with private_key_jwt")
            if self.jwks is None and self.jwks_uri is None:
                raise ValueError("private_key_jwt needs jwks or jwks_uri")
            return self
        if self.client_secret is None:
            raise ValueError("client_secret is required (give client_secret_env or "
                             "client_secret_file)")
        if len(self.client_secret.get_secret_value()) < 32:
            raise ValueError("client_secret must be at least 32 characters of random data")
        return self


class OfficerRoleSettings(BaseModel):
    """Who is a privacy officer: holders of ``value`` in ``attribute`` as asserted by the
    upstream ``upstream``, while their hub login came through that upstream."""

    model_config = ConfigDict(extra="forbid")

    upstream: Annotated[str, Field(pattern=SLUG)]
    attribute: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")] = "groups"
    value: Annotated[str, Field(min_length=1, max_length=255)]


_PerWindow = Annotated[int, Field(ge=0, le=10_000_000)]


class RateLimitSettings(BaseModel):
    """Requests per window (0: no limit), counted in the short-lived store so that every
    worker and host shares one count. Agency limits count authenticated requests only, so no
    one can spend an agency's budget by naming its client_id."""

    model_config = ConfigDict(extra="forbid")

    window_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    #: /token, /introspect and /revoke, per authenticated agency. A limit of capacity, so
    #: from 200 up each process adds its hits to the shared count in batches of up to 10
    #: (kernel/ratelimit.py): a window may let through 10 per process beyond it
    token_per_agency: _PerWindow = 12_000
    #: /token, /introspect and /revoke, per client address (counted before authentication)
    token_per_address: _PerWindow = 3_000
    #: the consent decision API, per authenticated agency
    decision_per_agency: _PerWindow = 30_000
    #: the consent decision API, per client address (those that fail to authenticate too)
    decision_per_address: _PerWindow = 30_000
    #: /authorize and the login pages, per client address (failed passwords have their own,
    #: much lower limits per username and address)
    login_per_address: _PerWindow = 600


class Settings(BaseSettings):
    """Everything the hub needs to start. Environment variables ``CIVITAS_<KEY>`` override the
    file for top-level keys (``CIVITAS_DATABASE_URL``, ``CIVITAS_ENCRYPTION_KEY``...)."""

    model_config = SettingsConfigDict(env_prefix="CIVITAS_", extra="forbid")

    issuer: str
    database_url: str = "sqlite:///var/civitas.db"
    #: PostgreSQL connections each process keeps open in its pool (as many again on
    #: bursts), at least the threads per worker of `civitas serve`; single statements have
    #: connections of their own beside it, one per thread at most (kernel.db)
    database_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    #: ``None`` (or ``memory://``) keeps short-lived state in this process
    redis_url: str | None = None
    #: Fernet-format keys (32 random bytes, url-safe base64), newest first, comma-separated
    #: in the environment; values are encrypted with AES-256-GCM-SIV (kernel/crypto.py)
    encryption_key: SecretStr
    #: keyed-hash secret for pairwise subject identifiers (OpenID Connect Core 8.1)
    pairwise_secret: SecretStr
    signing_alg: Literal["ES256", "RS256"] = "ES256"
    session_lifetime_seconds: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 8 * 3600
    code_lifetime_seconds: Annotated[int, Field(ge=5, le=600)] = 60
    access_token_lifetime_seconds: Annotated[int, Field(ge=60, le=24 * 3600)] = 600
    id_token_lifetime_seconds: Annotated[int, Field(ge=60, le=24 * 3600)] = 600
    #: absolute lifetime of a refresh-token grant; rotation never extends it
    refresh_token_lifetime_seconds: Annotated[int, Field(ge=300, le=365 * 86400)] = 30 * 86400
    #: how long the login page and an upstream round trip may take
    login_flow_lifetime_seconds: Annotated[int, Field(ge=60, le=3600)] = 900
    upstreams: list[UpstreamSettings] = []
    agencies: list[AgencySettings] = []
    #: how often the audit ledger is sealed into a signed checkpoint (0: only on demand)
    ledger_seal_interval_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    #: how often each worker runs housekeeping (civitas/housekeeping.py: consent grants past
    #: their validity get their ``expired`` event, tokens of ended refresh grants are
    #: deleted); 0: only `civitas housekeeping` (cron)
    housekeeping_interval_seconds: Annotated[float, Field(ge=0, le=86400)] = 3600.0
    #: days the decision log (every answer of the consent decision API: the citizens'
    #: data-access history) is kept; housekeeping deletes older answers. Their ledger
    #: entries stay (they hold no personal data), and `audit reconcile` counts them as past
    #: retention. 0: kept for ever
    decision_log_retention_days: Annotated[int, Field(ge=0, le=36500)] = 0
    rate_limits: RateLimitSettings = RateLimitSettings()
    #: reverse proxies in front of the hub whose X-Forwarded-* headers are believed (0: none)
    trusted_proxy_hops: Annotated[int, Field(ge=0, le=5)] = 0
    #: the addresses (or networks) the nearest of those proxies connects from: when given,
    #: a request from any other peer has its X-Forwarded-* ignored (empty: any peer's count)
    trusted_proxy_addresses: list[IPvAnyNetwork] = []
    #: upstream ids, most trusted first: when upstreams disagree about an attribute, agencies
    #: get the value from the first one here (default: the order of ``upstreams``)
    attribute_source_ranking: list[str] | None = None
    #: run the back-channel logout delivery thread in this process (Back-Channel Logout 1.0);
    #: off when deliveries are left to `civitas logout deliver` (cron) or another worker
    backchannel_dispatcher: bool = True
    #: how long one POST of a logout token to an agency may take
    backchannel_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 5.0
    #: bearer token of the agency registration API (/admin/api); unset = the API is off
    admin_api_token: SecretStr | None = None
    #: let agencies register ``subject_type: public`` (one ``sub`` per person for all of them)
    allow_public_subjects: bool = False
    #: fetch agencies' ``jwks_uri`` over http and from private addresses (development, tests)
    allow_insecure_jwks_uri: bool = False
    #: who may use the privacy-officer workspace (/officer/); any rule that matches grants it
    officer_role: list[OfficerRoleSettings] = []
    #: the time zone (IANA name) of the times on the citizens' pages, the jurisdiction's
    #: own; stored times, exports and the officers' pages stay in UTC
    display_timezone: str = "UTC"

    @field_validator("display_timezone")
    @classmethod
    def _display_timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{v!r} is not a time zone this machine knows (an IANA name "
                             "such as Europe/Tallinn or America/New_York)") from exc
        return v

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        check_url(v, what="issuer")
        parts = urlsplit(v)
        if parts.query:
            raise ValueError("issuer must not contain a query")
        if v.endswith("/"):
            raise ValueError("issuer must not end with '/' (it is compared as an exact string)")
        return v

    @field_validator("encryption_key")
    @classmethod
    def _enc_key(cls, v: SecretStr) -> SecretStr:
        from cryptography.fernet import Fernet

        for part in v.get_secret_value().split(","):
            try:
                Fernet(part.strip().encode())
            except (ValueError, TypeError) as exc:
                raise ValueError("must be one or more Fernet keys (32 url-safe base64-encoded "
                                 "bytes), comma-separated; make one with "
                                 "`civitas secrets generate`") from exc
        return v

    @field_validator("admin_api_token")
    @classmethod
    def _admin_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters of random data")
        return v

    @field_validator("pairwise_secret")
    @classmethod
    def _pairwise(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters of random data")
        return v

    @field_validator("database_url")
    @classmethod
    def _db(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str | None) -> str | None:
        if v and not re.match(r"^(redis|rediss|unix|memory)://", v):
            raise ValueError("must be a redis://, rediss://, unix:// or memory:// URL")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        ids = [u.id for u in self.upstreams]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"upstreams: duplicate id(s) {sorted(dup)}")
        unknown = set(self.attribute_source_ranking or []) - set(ids)
        if unknown:
            raise ValueError(f"attribute_source_ranking: unknown upstream id(s) {sorted(unknown)}")
        unknown = {r.upstream for r in self.officer_role} - set(ids)
        if unknown:
            raise ValueError(f"officer_role: unknown upstream id(s) {sorted(unknown)}")
        cids = [a.client_id for a in self.agencies]
        dup = {i for i in cids if cids.count(i) > 1}
        if dup:
            raise ValueError(f"agencies: duplicate client_id(s) {sorted(dup)}")
        if self.trusted_proxy_addresses and not self.trusted_proxy_hops:
            raise ValueError("trusted_proxy_addresses: needs trusted_proxy_hops (how many "
                             "proxies to believe)")
        public = [a.client_id for a in self.agencies if a.subject_type == "public"]
        if public and not self.allow_public_subjects:
            raise ValueError(f"agencies: subject_type 'public' for {public} needs "
                             "allow_public_subjects: true")
        return self

    @property
    def encryption_keys(self) -> list[str]:
        return [k.strip() for k in self.encryption_key.get_secret_value().split(",") if k.strip()]

    @property
    def is_https(self) -> bool:
        return self.issuer.startswith("https://")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file: secrets and per-host values come from there.
        return (env_settings, init_settings)

