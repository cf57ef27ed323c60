"""Bulk-load citizens and their consent history into a Civitas PostgreSQL database (COPY).

    .venv/bin/python bench/load_data.py --database-url postgresql+psycopg://u:p@host/db \\
        [--accounts 1000000] [--events 10000000] [--decisions N] [--agencies 50] \\
        [--write-config bench-hub.yaml]
    .venv/bin/python bench/load_data.py --config hub.yaml [--accounts ...]

The schema is the project's own: the hub is started once on the database (``create_app``:
migrations to head, agencies synced from the settings). Without ``--config`` the settings are
generated (``bench_settings``: 50 agencies declaring consent for 2 to 5 claims and 1 to 3
purposes each) and written to ``--write-config`` so a hub can be started on the data: the
pairwise ``sub`` values and encrypted attributes only make sense with its secrets.

Values are what the code writes. Consent histories are not invented: every agency's policy is
run through the real :class:`~consent.service.ConsentService` (grants, refusals, complete and
partial withdrawals, re-consent, renewal, expiry) and the real decision point, on a scratch
SQLite database; the rows they write are the templates, and the load varies only ids, times
and subjects (``uuid4`` hex ids, ``ProviderServices.subject_for`` pairwise subjects, receipt
UUIDs). Attribute values are encrypted one by one with the hub's ``FieldCipher``. Not loaded:
receipts (events carry receipt ids; receipts are read by primary key or account only) and the
ledger (the decision path only appends to it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import yaml  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy import select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from broker.models import ConstituentAccount  # noqa: E402
from civitas.app import Hub, create_app  # noqa: E402
from civitas.migrations import upgrade  # noqa: E402
from config import Settings, load_settings, settings_from_mapping  # noqa: E402
from consent.decisions import EvaluationQuery  # noqa: E402
from consent.errors import ConsentError  # noqa: E402
from consent.history import VALID_STATES  # noqa: E402
from consent.models import AgencyDecision, ConsentEvent, ConsentRecord  # noqa: E402
from consent.policy import AgencyPolicy  # noqa: E402
from consent.service import ConsentService  # noqa: E402
from idp.agencies import AgencyClient  # noqa: E402
from kernel.db import Database  # noqa: E402

#: the tables this loader fills, in foreign-key order (the "large" tables of the plans test)
TABLES = ("constituent_accounts", "linked_identities", "account_attributes", "account_events",
          "consent_records", "consent_events", "consent_decisions")
COLUMNS = {
    "constituent_accounts": ("id", "created_at"),
    "linked_identities": ("account_id", "connector_id", "upstream_subject", "acr",
                          "created_at", "last_login_at"),
    "account_attributes": ("account_id", "name", "value_encrypted", "source_connector", "acr",
                           "asserted_at"),
    "account_events": ("account_id", "kind", "connector_id", "acr", "at"),
    "consent_records": ("id", "schema_version", "account_id", "client_id", "subject",
                        "created_at", "expires_at"),
    "consent_events": ("record_id", "seq", "kind", "state", "at", "subject", "claims",
                       "declined", "affected", "method", "notice_version", "notice_language",
                       "policy", "expires_at", "receipt_id"),
    "consent_decisions": ("id", "at", "client_id", "subject", "account_id", "record_id",
                          "action", "claim", "purpose", "decision", "reason", "request_id"),
}
CONNECTORS = (("op", "urn:civitas:acr:ial1:aal1"), ("bank-id", "urn:civitas:acr:ial2:aal2"))
CLAIMS = ("email", "name", "given_name", "family_name", "birthdate")
PURPOSES = ("service-delivery", "notifications", "fraud-prevention", "statistics", "research")
#: one citizen's consent history with one agency: the calls the real service gets, in order
PATTERNS: tuple[tuple[str, ...], ...] = (
    ("allow",), ("allow",), ("allow_required",), ("refuse",), ("allow", "allow"),
    ("allow", "withdraw"), ("allow", "withdraw_optional"), ("allow", "withdraw", "allow"),
    ("refuse", "allow", "withdraw_optional", "allow"),
    ("allow", "withdraw", "allow", "withdraw", "allow", "withdraw_optional", "allow"),
)
STEP = timedelta(days=40)  # between two calls of a pattern (a year's TTL expires in between)
HISTORY = timedelta(days=2 * 365)  # how far back the first event of a record may lie


def bench_agencies(count: int) -> list[dict[str, Any]]:
    """``count`` agencies with consent declarations of varied size (settings entries)."""
    rng = random.Random(7)  # noqa: S311 (test data)
    agencies = []
    for i in range(count):
        claims = [{"claim": "email", "purposes": ["service-delivery"],
                   "lawful_basis": "consent", "required": True,
                   "description": "Your e-mail address, to write to you"}]
        for claim in rng.sample(CLAIMS[1:], rng.randint(1, 4)):
            claims.append({"claim": claim, "purposes": rng.sample(PURPOSES, rng.randint(1, 3)),
                           "lawful_basis": rng.choice(("consent", "consent", "public_task")),
                           "required": rng.random() < 0.4,
                           "description": f"Your {claim.replace('_', ' ')}"})
        agencies.append({
            "client_id": f"bench-agency-{i:03d}", "name": f"Bench Agency {i}",
            "redirect_uris": [f"https://a{i:03d}.agency.example/cb"],
            "client_secret": f"bench-secret-{i:03d}-" + "s" * 32,
            "scopes": ["openid", "profile", "email", "offline_access"],
            "consent": {"notice_url": f"https://a{i:03d}.agency.example/privacy",
                        "notice_version": f"2026-{1 + i % 12:02d}", "claims": claims,
                        "consent_ttl_days": 365 if i % 5 == 0 else None,
                        "contact_email": f"privacy@a{i:03d}.agency.example",
                        "contact_phone": f"+1 555 01{i % 100:02d}",
                        "contact_address": f"{i} Bench Street, Springfield"},
        })
    return agencies


def bench_settings(database_url: str, agencies: int = 50,
                   issuer: str = "http://127.0.0.1:8000") -> dict[str, Any]:
    """A hub settings mapping for the bench data (fresh secrets, no upstream needed)."""
    return {"issuer": issuer, "database_url": database_url,
            "encryption_key": Fernet.generate_key().decode(),
            "pairwise_secret": uuid.uuid4().hex + uuid.uuid4().hex,
            "agencies": bench_agencies(agencies), "ledger_seal_interval_seconds": 0,
            "backchannel_dispatcher": False}


def start_hub(settings: Settings) -> Any:
    """The app on the database, as it starts in production (migrations, agencies synced)."""
    return create_app(settings.model_copy(update={"ledger_seal_interval_seconds": 0,
                                                  "backchannel_dispatcher": False}))


# -- templates: what the real service writes ----------------------------------------------


def _copy_text(value: str) -> str:
    """A value in PostgreSQL's COPY text format."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def _json(value: Any) -> str:
    # what SQLAlchemy's JSON type sends (json.dumps with its defaults)
    return _copy_text(json.dumps(value))


@dataclass(frozen=True)
class EventTemplate:
    seq: int
    offset: timedelta
    #: the columns that do not vary, already in COPY text: kind .. at, subject .. receipt_id
    kind_state: str
    body: str
    expires_offset: timedelta | None
    receipt: bool


@dataclass(frozen=True)
class DecisionTemplate:
    offset: timedelta
    tail: str  # action .. reason, COPY text


@dataclass
class History:
    events: list[EventTemplate]
    decisions: list[DecisionTemplate]
    span: timedelta


@dataclass
class Templates:
    #: client_id -> the histories its policy produced, one per pattern
    histories: dict[str, list[History]]
    clients: dict[str, AgencyClient]
    policies: dict[str, AgencyPolicy]

    @property
    def mean_events(self) -> float:
        lengths = [len(h.events) for hs in self.histories.values() for h in hs]
        return sum(lengths) / len(lengths)


def _run_pattern(service: ConsentService, account_id: str, subject: str,
                 policy: AgencyPolicy, pattern: Sequence[str], t0: datetime) -> None:
    optional = [c.claim for c in policy.claims if not c.required]
    for i, step in enumerate(pattern):
        now = t0 + i * STEP
        try:
            if step == "allow":
                service.record_decision(account_id, policy, subject, optional, now=now)
            elif step == "allow_required":
                service.record_decision(account_id, policy, subject, [], now=now)
            elif step == "refuse":
                service.record_refusal(account_id, policy, subject, now=now)
            elif step == "withdraw":
                service.withdraw(account_id, policy.client_id, now=now)
            elif step == "withdraw_optional" and optional:
                service.withdraw(account_id, policy.client_id, claim=optional[0], now=now)
        except ConsentError:
            continue  # nothing to withdraw at this point of this agency's history


def build_templates(hub: Hub, scratch: Path) -> Templates:
    """Run every pattern of every agency's policy through the real consent service and
    decision point on a scratch SQLite database, and keep the rows they wrote."""
    policies = dict(hub.server.hub.policies)
    db = Database(f"sqlite:///{scratch / 'templates.db'}")
    upgrade(db.engine)
    service = ConsentService(db, hub.consent.signer)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    histories: dict[str, list[History]] = {}
    clients: dict[str, AgencyClient] = {}
    for client_id, policy in sorted(policies.items()):
        client = hub.agencies.client(client_id)
        if client is None:
            continue
        clients[client_id] = client
        histories[client_id] = []
        for pattern in PATTERNS:
            with db.session() as s:
                account = ConstituentAccount(created_at=t0)
                s.add(account)
            subject = f"template-{account.id}"  # replaced by the citizen's pairwise sub
            _run_pattern(service, account.id, subject, policy, pattern, t0)
            end = t0 + len(pattern) * STEP
            with db.session() as s:
                record = s.scalars(select(ConsentRecord).where(
                    ConsentRecord.account_id == account.id)).one()
                events = list(s.scalars(select(ConsentEvent).where(
                    ConsentEvent.record_id == record.id).order_by(ConsentEvent.seq)))
            queries = [EvaluationQuery("user", subject, "use", "claim", c.claim, p)
                       for c in policy.claims for p in c.purposes[:1]]
            queries.append(EvaluationQuery("user", subject, "use", "claim", "email",
                                           "marketing"))
            service.decisions.decide(client_id, queries, now=end)
            with db.session() as s:
                decided = list(s.scalars(select(AgencyDecision).where(
                    AgencyDecision.record_id == record.id)))
            histories[client_id].append(History(
                events=[EventTemplate(
                    seq=e.seq, offset=e.at - t0, kind_state=f"{e.kind}\t{e.state}",
                    body="\t".join((_json(e.claims), _json(e.declined), _json(e.affected),
                                    _copy_text(e.method), _copy_text(e.notice_version),
                                    _copy_text(e.notice_language), _json(e.policy))),
                    expires_offset=None if e.expires_at is None else e.expires_at - e.at,
                    receipt=e.receipt_id is not None) for e in events],
                decisions=[DecisionTemplate(offset=d.at - t0, tail="\t".join((
                    d.action, d.claim, d.purpose, "t" if d.decision else "f", d.reason)))
                    for d in decided],
                span=end - t0))
    db.dispose()
    return Templates(histories=histories, clients=clients, policies=policies)


# -- generating rows -----------------------------------------------------------------------


def _ts(at: datetime) -> str:
    return at.isoformat()


def _uuid4() -> str:
    """``str(uuid.uuid4())`` (what receipts use) at a third of its cost."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _uuid4_hex() -> str:
    """``uuid.uuid4().hex`` (``new_id``, ``new_account_id``) at a third of its cost."""
    h = os.urandom(16).hex()
    return f"{h[:12]}4{h[13:16]}{'89ab'[int(h[16], 16) & 3]}{h[17:]}"


def _uuid7_hex(at: datetime) -> str:
    """The id ``consent.models.new_time_ordered_id`` gives a decision made at ``at``."""
    ms = int(at.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80 | 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64 | 0b10 << 62
             | rand & 0x3FFF_FFFF_FFFF_FFFF)
    return f"{value:032x}"


@dataclass
class Batch:
    rows: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TABLES})
    #: (client_id, subject) of some records, for benchmarks to ask about
    sample: list[tuple[str, str]] = field(default_factory=list)


def generate(hub: Hub, templates: Templates, accounts: int, records: float,
             decision_ratio: float, rng: random.Random, now: datetime) -> Batch:
    """Rows for ``accounts`` citizens with about ``records`` consent records among them."""
    batch = Batch()
    rows = batch.rows
    cipher = hub.cipher
    subject_for = hub.server.hub.subject_for
    client_ids = sorted(templates.histories)
    per_account = records / accounts
    spread = max(1, min(len(client_ids), round(2 * per_account) - 1))
    for n in range(accounts):
        account_id = _uuid4_hex()
        created = now - HISTORY - timedelta(days=30) - timedelta(seconds=rng.randrange(
            365 * 86400))
        created_s = _ts(created)
        rows["constituent_accounts"].append(f"{account_id}\t{created_s}\n")
        links = CONNECTORS if rng.random() < 0.2 else CONNECTORS[:1]
        for connector, acr in links:
            rows["linked_identities"].append(
                f"{account_id}\t{connector}\t{_uuid4()}\t{acr}\t{created_s}\t{created_s}\n")
            rows["account_events"].append(
                f"{account_id}\t{'created' if connector == 'op' else 'linked'}\t{connector}\t"
                f"{acr}\t{created_s}\n")
        given, family = f"Given{n % 997}", f"Family{rng.randrange(100_000)}"
        attributes = {"name": f"{given} {family}", "given_name": given, "family_name": family,
                      "email": f"{given}.{family}.{account_id[:6]}@mail.example".lower(),
                      "email_verified": True}
        connector, acr = CONNECTORS[0]
        for name, value in attributes.items():
            rows["account_attributes"].append(
                f"{account_id}\t{name}\t{cipher.encrypt(json.dumps(value))}\t{connector}\t"
                f"{acr}\t{created_s}\n")
        # about per_account records: 1 .. 2 * per_account - 1 agencies, uniformly
        count = rng.randint(1, spread) if per_account >= 1 else int(rng.random() < per_account)
        for client_id in rng.sample(client_ids, count):
            history = rng.choice(templates.histories[client_id])
            if not history.events:
                continue
            record_id = _uuid4_hex()
            subject = subject_for(templates.clients[client_id], account_id)
            start = now - history.span - timedelta(seconds=rng.randrange(
                int((HISTORY - history.span).total_seconds())))
            last = history.events[-1]  # the record's validity: consent.history.expiry_of
            valid_until = ("\\N" if last.expires_offset is None
                           or last.kind_state.split("\t")[1] not in VALID_STATES
                           else _ts(start + last.offset + last.expires_offset))
            rows["consent_records"].append(
                f"{record_id}\tcivitas-consent-record/1 (ISO/IEC TS 27560:2023)\t{account_id}\t"
                f"{client_id}\t{subject}\t{_ts(start)}\t{valid_until}\n")
            for e in history.events:
                at = start + e.offset
                expires = "\\N" if e.expires_offset is None else _ts(at + e.expires_offset)
                receipt = _uuid4() if e.receipt else "\\N"
                rows["consent_events"].append(
                    f"{record_id}\t{e.seq}\t{e.kind_state}\t{_ts(at)}\t{subject}\t{e.body}\t"
                    f"{expires}\t{receipt}\n")
            if rng.random() < decision_ratio:
                d = rng.choice(history.decisions)
                rows["consent_decisions"].append(
                    f"{_uuid7_hex(start + d.offset)}\t{_ts(start + d.offset)}\t{client_id}\t"
                    f"{subject}\t"
                    f"{account_id}\t{record_id}\t{d.tail}\t\\N\n")
            if rng.random() < 0.01:
                batch.sample.append((client_id, subject))
    return batch


# -- COPY ----------------------------------------------------------------------------------


def conninfo(database_url: str) -> str:
    """A libpq URL from the hub's SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)


def _writer(conn: psycopg.Connection[Any], batches: queue.Queue[Batch | None],
            counts: dict[str, int], failed: list[BaseException]) -> None:
    try:
        while (batch := batches.get()) is not None:
            with conn.cursor() as cur:
                for table in TABLES:
                    lines = batch.rows[table]
                    if not lines:
                        continue
                    with cur.copy(f"COPY {table} ({', '.join(COLUMNS[table])}) "
                                  "FROM STDIN") as copy:
                        for i in range(0, len(lines), 5000):
                            copy.write("".join(lines[i:i + 5000]).encode())
                    counts[table] += len(lines)
            conn.commit()
    except BaseException as exc:  # handed to the producer, which re-raises it
        failed.append(exc)
        while batches.get() is not None:  # let the producer finish
            pass


@dataclass
class LoadResult:
    counts: dict[str, int]
    seconds: float
    sample: list[tuple[str, str]]

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        lines = [f"  {table:<22} {count:>12,}" for table, count in self.counts.items()]
        lines.append(f"  {'total':<22} {self.rows:>12,} rows in {self.seconds:.1f} s = "
                     f"{self.rows / max(self.seconds, 1e-9):,.0f} rows/s")
        return "\n".join(lines)


def load(hub: Hub, *, accounts: int, events: int, decisions: int | None = None,
         batch_accounts: int = 20_000, seed: int | None = None,
         templates: Templates | None = None,
         progress: Callable[[str], None] | None = None) -> LoadResult:
    """Append ``accounts`` citizens and about ``events`` consent events (and ``decisions``
    past decisions, default events / 10) to the hub's PostgreSQL database, in batches of
    ``batch_accounts`` citizens; one COPY per table and batch, committed per batch while the
    next batch is generated."""
    started = time.perf_counter()
    if templates is None:
        with tempfile.TemporaryDirectory(prefix="civitas-templates-") as scratch:
            templates = build_templates(hub, Path(scratch))
    records = events / templates.mean_events
    decision_ratio = min(1.0, (events // 10 if decisions is None else decisions) / max(
        records, 1))
    rng = random.Random(seed)  # noqa: S311 (test data)
    now = datetime.now(UTC)
    counts = dict.fromkeys(TABLES, 0)
    sample: list[tuple[str, str]] = []
    failed: list[BaseException] = []
    batches: queue.Queue[Batch | None] = queue.Queue(maxsize=2)
    with psycopg.connect(conninfo(hub.settings.database_url)) as conn:
        conn.execute("SET synchronous_commit = off")
        writer = threading.Thread(target=_writer, args=(conn, batches, counts, failed),
                                  daemon=True)
        writer.start()
        try:
            done = 0
            while done < accounts and not failed:
                size = min(batch_accounts, accounts - done)
                batch = generate(hub, templates, size, records * size / accounts,
                                 decision_ratio, rng, now)
                sample.extend(batch.sample)
                batches.put(batch)
                done += size
                if progress is not None:
                    elapsed = time.perf_counter() - started
                    progress(f"  {done:,}/{accounts:,} accounts, "
                             f"{counts['consent_events']:,} events written, {elapsed:.0f} s")
        finally:
            batches.put(None)
            writer.join()
        if failed:
            raise failed[0]
    return LoadResult(counts=counts, seconds=time.perf_counter() - started, sample=sample)


def add_load_arguments(ap: argparse.ArgumentParser, *, agencies: int) -> None:
    """``--accounts``, ``--events``, ``--decisions`` and ``--agencies``, for a script that
    measures something on :func:`loaded_hub`."""
    ap.add_argument("--accounts", type=int, default=200_000)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--decisions", type=int, default=None,
                    help="past decisions to load (default: events / 10)")
    ap.add_argument("--agencies", type=int, default=agencies)


@dataclass
class LoadedHub:
    app: Any
    hub: Hub
    settings: dict[str, Any]
    templates: Templates
    loaded: LoadResult


@contextlib.contextmanager
def loaded_hub(args: argparse.Namespace, prefix: str) -> Iterator[LoadedHub]:
    """A fresh PostgreSQL in a temporary directory, the hub on it with ``args.agencies``
    bench agencies, and the data of :func:`add_load_arguments`'s arguments loaded and
    analysed; everything stopped and removed afterwards."""
    from tests import servers

    with tempfile.TemporaryDirectory(prefix=prefix) as workdir, \
            servers.run_postgres(Path(workdir) / "pg") as url:
        mapping = bench_settings(url, args.agencies)
        app = start_hub(settings_from_mapping(mapping))
        hub = app.extensions["civitas"]
        try:
            templates = build_templates(hub, Path(workdir))
            print(f"loading {args.accounts:,} accounts, ~{args.events:,} events ...",
                  flush=True)
            loaded = load(hub, accounts=args.accounts, events=args.events,
                          decisions=args.decisions, templates=templates)
            print(loaded.report(), flush=True)
            analyze(hub)
            yield LoadedHub(app, hub, mapping, templates, loaded)
        finally:
            hub.db.dispose()


def analyze(hub: Hub) -> None:
    """Statistics for the planner after a bulk load (autovacuum would get there later)."""
    with psycopg.connect(conninfo(hub.settings.database_url), autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f"VACUUM (ANALYZE) {table}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--database-url", help="postgresql+psycopg://... (bench settings)")
    where.add_argument("--config", help="the hub's settings file (its agencies and secrets)")
    ap.add_argument("--write-config", default="bench-hub.yaml",
                    help="with --database-url: where to write the generated settings")
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--decisions", type=int, default=None, help="default: events / 10")
    ap.add_argument("--agencies", type=int, default=50)
    ap.add_argument("--batch", type=int, default=20_000, help="accounts per COPY batch")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    if args.config:
        settings = load_settings(args.config)
    else:
        mapping = bench_settings(args.database_url, args.agencies)
        Path(args.write_config).write_text(yaml.safe_dump(mapping, sort_keys=False))
        print(f"settings written to {args.write_config} (start the hub with --config)")
        settings = settings_from_mapping(mapping)
    if not settings.database_url.startswith("postgresql"):
        ap.error("COPY needs PostgreSQL")
    app = start_hub(settings)
    hub: Hub = app.extensions["civitas"]
    print(f"loading {args.accounts:,} accounts and ~{args.events:,} consent events ...")
    result = load(hub, accounts=args.accounts, events=args.events, decisions=args.decisions,
                  batch_accounts=args.batch, seed=args.seed, progress=print)
    started = time.perf_counter()
    analyze(hub)
    print(result.report())
    print(f"  VACUUM ANALYZE {time.perf_counter() - started:.1f} s")
    hub.db.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
