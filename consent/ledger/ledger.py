"""The audit ledger: appends at write time, a sealer that builds the tree and signs
checkpoints, and the proofs an auditor asks for.

Appending is one INSERT: the entry is canonicalised (RFC 8785) and its leaf hash computed by
the caller's thread, the database hands out ``seq``, and nothing is chained to the previous
entry, so concurrent appends (the decision API's workers, on any number of hosts) never wait
for each other beyond the INSERT itself. Pass ``session=`` to append inside the caller's
transaction, so a consent or decision record and its ledger entry commit or vanish together.

The sealer gives committed, unsealed entries their leaf indices (0, 1, 2, ... with no gaps,
in ``seq`` order), folds their leaf hashes into the tree's right edge (RFC 9162 2.1, O(1)
amortised hashing per entry), stores the roots of large perfect subtrees for proofs, and
signs a checkpoint over the new size, all in one transaction.

Why the leaf index is not ``seq``: ``seq`` comes from an autoincrement/identity, whose numbers
are handed out before commit. A transaction may commit after a higher ``seq`` has committed,
or roll back and leave a hole forever (PostgreSQL never reuses a sequence value). A tree keyed
by ``seq`` would have to wait for a hole that may never fill, or guess when to give up on it.
Instead the sealer selects ``leaf_index IS NULL`` rows, not ``seq > watermark``: an entry that
commits late is simply sealed by the next run, a permanent hole is never looked for, and the
leaf indices are dense by construction. ``settle`` (optional) leaves rows younger than that
for the next run, so entries written together usually keep their ``seq`` order in the tree;
correctness does not depend on it.
"""

from __future__ import annotations

import hmac
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kernel.crypto import FieldCipher
from kernel.db import Database, utcnow

from . import merkle
from .errors import LedgerError, PersonalDataRefused
from .jcs import MAX_SAFE_INTEGER, CanonicalizationError, canonicalize
from .models import LedgerCheckpoint, LedgerEntry, LedgerKey, LedgerNode
from .note import Checkpoint, NoteSigner, NoteVerifier, check_key_name

#: suggested entry kinds (any lowercase dotted name is accepted)
KINDS = (
    "consent.given", "consent.refused", "consent.withdrawn", "consent.expired",
    "decision.query", "account.linked", "account.unlinked", "account.deleted", "account.erased",
    "agency.registered", "agency.changed", "agency.removed",
)
_KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")

#: member names that are personal data in OpenID Connect (Core 5.1) and so never belong in
#: an entry; pass pairwise or hashed ids (``hashed_id``) and claim *names* instead
PERSONAL_DATA_NAMES = frozenset({
    "name", "given_name", "family_name", "middle_name", "nickname", "preferred_username",
    "email", "phone_number", "address", "birthdate", "picture", "profile", "website",
    "street_address", "postal_code", "locality", "national_id", "ssn", "password",
})
#: what looks like an e-mail address (also in the decision API's OpenAPI pattern)
EMAIL_PATTERN = r"[^@\s]+@[^@\s]+\.[^@\s]+"
_EMAIL = re.compile(f"^{EMAIL_PATTERN}$")

#: perfect subtrees of at least 2**NODE_LEVEL leaves are stored (n / 2**(NODE_LEVEL-1) rows
#: for n leaves); smaller ones are recomputed from at most 2**NODE_LEVEL leaf hashes
NODE_LEVEL = 8
_ENTRIES = cast(Table, LedgerEntry.__table__)
_NODES = cast(Table, LedgerNode.__table__)
_INSERT = _ENTRIES.insert()
#: entries read and assigned at a time while sealing
SEAL_CHUNK = 1_000
_ASSIGN = (update(_ENTRIES)
           .where(_ENTRIES.c.seq == bindparam("s"), _ENTRIES.c.leaf_index.is_(None))
           .values(leaf_index=bindparam("li")))
#: PostgreSQL: leaf indices ``first``, ``first + 1``, ... to the entries whose ``seq`` values
#: are listed (comma-separated, in that order), unless one is sealed already
_ASSIGN_PG = """
UPDATE ledger_entries AS e SET leaf_index = %(first)s + v.n - 1
FROM unnest(string_to_array(%(seqs)s, ',')::bigint[]) WITH ORDINALITY AS v(seq, n)
WHERE e.seq = v.seq AND e.leaf_index IS NULL
"""
#: PostgreSQL advisory lock key for the sealer (any constant; "CIVLEDGR" as ASCII)
_SEAL_LOCK = 0x4349564C45444752


def hashed_id(key: bytes, value: str) -> str:
    """A keyed pseudonym for an id that has no pairwise form (an account id in an
    ``account.*`` entry): hex HMAC-SHA-256, stable for one key."""
    return hmac.new(key, value.encode(), "sha256").hexdigest()


def looks_like_email(value: str) -> bool:
    """Whether a string value would be refused as an e-mail address (personal data)."""
    return "@" in value and _EMAIL.match(value) is not None


def _check_pseudonymous(data: Any, path: str = "data") -> None:
    """A safety net, not a guarantee: refuse a member named like an OIDC personal claim
    whose value is a scalar (``"email": "a@b.example"``), and string values that look like
    an e-mail address. Claim names are fine as values and as keys of structures
    (``"claims": {"email": {"purposes": [...]}}``)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if (isinstance(key, str) and key.lower() in PERSONAL_DATA_NAMES
                    and isinstance(value, str | int | float) and not isinstance(value, bool)):
                raise PersonalDataRefused(f"ledger entry member {path}.{key} is personal data; "
                                          "pass a pairwise or hashed id instead")
            _check_pseudonymous(value, f"{path}.{key}")
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            _check_pseudonymous(value, f"{path}[{i}]")
    elif isinstance(data, str) and looks_like_email(data):
        raise PersonalDataRefused(f"ledger entry value at {path} looks like an e-mail address")


#: RFC 8785 for what :func:`_flat` accepts: with ASCII member names, code point order is
#: UTF-16 code unit order (3.2.3); strings are escaped as JSON.stringify escapes them (see
#: :mod:`.jcs`); true, false, null and safe integers print the same in both
_FLAT_ENCODER = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                                 allow_nan=False)


def _flat(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is one level of ASCII names and string, boolean, null or safe
    integer values (every decision entry, most others): those need neither the general
    canonical writer nor the recursive check. Also the pseudonymity check for them, with
    the same answers (and messages) as :func:`_check_pseudonymous`."""
    for key, value in data.items():
        if type(key) is not str or not key.isascii():
            return False
        kind = type(value)
        if kind is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return False
        if kind is str or kind is int:
            if key.lower() in PERSONAL_DATA_NAMES:
                raise PersonalDataRefused(f"ledger entry member data.{key} is personal data; "
                                          "pass a pairwise or hashed id instead")
            if kind is str and looks_like_email(value):
                raise PersonalDataRefused(f"ledger entry value at data.{key} looks like an "
                                          "e-mail address")
        elif kind is not bool and value is not None:
            return False
    return True


def entry_text(kind: str, at: datetime, data: Mapping[str, Any]) -> bytes:
    """The canonical entry: ``{"data": ..., "kind": ..., "time": ...}`` (RFC 8785)."""
    return _entry_text(kind, _stamp(at), data)


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _entry_text(kind: str, stamp: str, data: Mapping[str, Any]) -> bytes:
    if not _KIND.match(kind) or len(kind) > 64:
        raise LedgerError(f"ledger entry kind {kind!r} is not a lowercase dotted name")
    entry = {"kind": kind, "time": stamp, "data": data}
    if type(data) is dict and _flat(data):
        try:
            return _FLAT_ENCODER.encode(entry).encode()
        except UnicodeEncodeError as exc:
            raise LedgerError("ledger entry is not I-JSON: string holds a lone surrogate "
                              "(not valid Unicode)") from exc
    _check_pseudonymous(data)
    try:
        return canonicalize(entry)
    except CanonicalizationError as exc:
        raise LedgerError(f"ledger entry is not I-JSON: {exc}") from exc


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root_hash: bytes
    note: str
    created_at: datetime


class Ledger:
    """Appends, seals, signs and proves.

    ``origin`` names the log in its checkpoints (e.g. ``audit.civitas.example.gov/ledger``);
    ``key_name`` names the signing key in its notes (default: the origin). The key is made on
    first use and stored encrypted with ``cipher``.
    """

    def __init__(self, db: Database, cipher: FieldCipher, *, origin: str,
                 key_name: str | None = None, seal_batch: int = 50_000) -> None:
        if not origin or "\n" in origin:
            raise LedgerError("the ledger origin is one non-empty line")
        self._db = db
        self._cipher = cipher
        self.origin = origin
        self.key_name = check_key_name(key_name or origin)
        #: entries per seal at most (one checkpoint each); read and assigned in chunks of
        #: ``SEAL_CHUNK``, so that what the sealing worker holds stays small (reading 50,000
        #: at once grew it by ~40 MB of RSS that it never gave back)
        self.seal_batch = seal_batch
        self._signer: NoteSigner | None = None
        self._lock = threading.Lock()

    @property
    def db(self) -> Database:
        return self._db

    # -- writing -------------------------------------------------------------------------

    def append(self, kind: str, data: Mapping[str, Any], *,
               session: Session | None = None) -> LedgerEntry:
        """Append one entry; ``data`` holds pseudonymous ids only (pairwise ``sub``,
        :func:`hashed_id`), agency, claim names, purpose, decision. With ``session`` the
        entry joins the caller's transaction (inserted at once, so ``seq`` is set). The row
        returned is detached: a record of what was written."""
        at = utcnow()
        text_ = entry_text(kind, at, data)
        values = {"kind": kind, "entry": text_.decode(), "leaf_hash": merkle.leaf_hash(text_),
                  "created_at": at}
        # a Core INSERT: a third of the ORM unit of work's cost on this hot path
        if session is not None:
            key = session.connection().execute(_INSERT, values).inserted_primary_key
        else:
            with self._db.session() as s:
                key = s.connection().execute(_INSERT, values).inserted_primary_key
        if key is None:  # pragma: no cover (every supported dialect reports it)
            raise LedgerError("the database did not report the entry's seq")
        return LedgerEntry(seq=key[0], **values)

    @staticmethod
    def entry_rows(items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """The rows :meth:`append_many` inserts (``kind``, ``entry``, ``leaf_hash``,
        ``created_at``), for a caller that writes them in a statement of its own (the
        decision API, together with its decision rows)."""
        rows = []
        at = utcnow()  # written together, so one time for all (and one clock read)
        stamp = _stamp(at)
        for kind, data in items:
            text_ = _entry_text(kind, stamp, data)
            rows.append({"kind": kind, "entry": text_.decode(),
                         "leaf_hash": merkle.leaf_hash(text_), "created_at": at})
        return rows

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any]]], *,
                    session: Session | Connection | None = None) -> int:
        """Append several entries in one multi-row INSERT, inside the caller's transaction
        (an ORM session or a Core connection) when given, else in one of its own."""
        rows = self.entry_rows(items)
        if not rows:
            return 0
        if session is not None:
            session.execute(_ENTRIES.insert(), rows)
        else:
            with self._db.session() as s:
                s.execute(_ENTRIES.insert(), rows)
        return len(rows)

    # -- reading -------------------------------------------------------------------------

    def entries(self, kind: str | None = None, since: datetime | None = None,
                until: datetime | None = None, *, batch: int = 1000) -> Iterator[LedgerEntry]:
        """Entries written in ``[since, until)`` (of ``kind`` if given), in ``seq`` order,
        sealed or not; read in pages, so any window can be walked in constant memory."""
        after = 0
        while True:
            query = select(LedgerEntry).where(LedgerEntry.seq > after)
            if kind is not None:
                query = query.where(LedgerEntry.kind == kind)
            if since is not None:
                query = query.where(LedgerEntry.created_at >= since)
            if until is not None:
                query = query.where(LedgerEntry.created_at < until)
            with self._db.session() as s:
                rows = list(s.scalars(query.order_by(LedgerEntry.seq).limit(batch)))
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def entry(self, seq: int) -> LedgerEntry | None:
        with self._db.session() as s:
            return s.get(LedgerEntry, seq)

    def unsealed_count(self) -> int:
        with self._db.session() as s:
            return s.scalar(select(func.count()).select_from(LedgerEntry)
                            .where(LedgerEntry.leaf_index.is_(None))) or 0

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        with self._db.session() as s:
            row = s.scalars(select(LedgerCheckpoint)
                            .order_by(LedgerCheckpoint.size.desc()).limit(1)).first()
        return _signed(row) if row is not None else None

    def checkpoint_at(self, size: int) -> SignedCheckpoint | None:
        with self._db.session() as s:
            row = s.get(LedgerCheckpoint, size)
        return _signed(row) if row is not None else None

    def checkpoints(self, first: int = 0, last: int | None = None, *,
                    batch: int = 1000) -> Iterator[SignedCheckpoint]:
        """Checkpoints with ``first <= size <= last``, smallest first, in pages."""
        after = first - 1
        while True:
            query = select(LedgerCheckpoint).where(LedgerCheckpoint.size > after)
            if last is not None:
                query = query.where(LedgerCheckpoint.size <= last)
            with self._db.session() as s:
                rows = list(s.scalars(query.order_by(LedgerCheckpoint.size).limit(batch)))
            yield from (_signed(r) for r in rows)
            if len(rows) < batch:
                return
            after = rows[-1].size

    def frontier_at(self, size: int) -> list[bytes]:
        """The right edge of the tree of ``size`` leaves (perfect-subtree roots)."""
        with self._db.session() as s:
            row = s.get(LedgerCheckpoint, size)
            if row is not None:
                return _split_hashes(row.frontier)
            return [self._subtree(s, start, start + (1 << level))
                    for level, start in merkle.aligned_blocks(0, size)]

    # -- the key ---------------------------------------------------------------------------

    def signer(self) -> NoteSigner:
        """The checkpoint signer; the key is generated and stored on first use."""
        if self._signer is not None:
            return self._signer
        with self._db.session() as s:
            row = s.get(LedgerKey, self.key_name)
        if row is None:
            private = NoteSigner.generate_private_key()
            candidate = NoteSigner(self.key_name, private)
            try:
                with self._db.session() as s:
                    s.add(LedgerKey(
                        name=self.key_name, public_key=candidate.verifier.public_key,
                        private_key_encrypted=self._cipher.encrypt(private.hex()),
                        created_at=utcnow()))
            except IntegrityError:
                pass  # another worker made it first: use theirs
            with self._db.session() as s:
                row = s.get(LedgerKey, self.key_name)
            if row is None:  # pragma: no cover
                raise LedgerError("the ledger key could not be stored")
        signer = NoteSigner(self.key_name, bytes.fromhex(self._cipher.decrypt(
            row.private_key_encrypted)))
        if signer.verifier.public_key != row.public_key:
            raise LedgerError("the stored ledger key's halves do not match")
        self._signer = signer
        return signer

    def verifier(self) -> NoteVerifier:
        return self.signer().verifier

    def public_key(self) -> str:
        """The verifier key string to publish (``name+keyid+base64``)."""
        return str(self.verifier())

    # -- sealing ---------------------------------------------------------------------------

    def seal(self, *, settle: timedelta = timedelta(0), limit: int | None = None,
             pace: float = 0.0, pace_until: float | None = None) -> SignedCheckpoint | None:
        """Seal up to ``limit`` (default ``seal_batch``) committed entries older than
        ``settle`` and sign a checkpoint over them. Returns it, or None if there was
        nothing to seal (the first call on an empty ledger signs the empty tree).

        ``pace``: after each chunk, wait ``pace`` times as long as the chunk took, until
        ``pace_until`` (a ``time.monotonic()`` time; None: always). The background sealer
        shares a worker (its interpreter lock) and the machine with the requests; unpaced,
        a round of 300,000 entries kept both busy for seconds at a time."""
        signer = self.signer()
        limit = limit or self.seal_batch
        with self._lock, self._db.session() as s:
            self._take_seal_lock(s)
            last = s.scalars(select(LedgerCheckpoint)
                             .order_by(LedgerCheckpoint.size.desc()).limit(1)).first()
            query = select(LedgerEntry.seq, LedgerEntry.leaf_hash).where(
                LedgerEntry.leaf_index.is_(None))
            if settle:
                query = query.where(LedgerEntry.created_at <= utcnow() - settle)
            size = last.size if last is not None else 0
            nodes: list[dict[str, Any]] = []

            def keep(level: int, index: int, digest: bytes) -> None:
                if level >= NODE_LEVEL:
                    nodes.append({"level": level, "index": index, "hash": digest})

            edge = merkle.CompactRange(size, _split_hashes(last.frontier) if last else [],
                                       on_node=keep)
            conn = s.connection()
            postgresql = conn.dialect.name == "postgresql"
            sealed = 0
            while sealed < limit:
                started = time.monotonic()
                # the transaction sees its own assignments: each chunk is the next one
                rows = conn.execute(query.order_by(LedgerEntry.seq)
                                    .limit(min(SEAL_CHUNK, limit - sealed))).all()
                if not rows:
                    break
                first = edge.size
                for _, leaf in rows:
                    edge.append(leaf)
                # the chunk's entries, in seq order, get the next leaf indices
                if postgresql:
                    # one statement, not one UPDATE per entry: a third of the CPU per entry
                    # sealed, in a thread that shares its worker with requests
                    updated = conn.exec_driver_sql(_ASSIGN_PG, {
                        "first": first, "seqs": ",".join(str(seq) for seq, _ in rows),
                    }).rowcount
                else:
                    updated = conn.execute(_ASSIGN, [
                        {"s": seq, "li": first + i} for i, (seq, _) in enumerate(rows)
                    ]).rowcount
                if (updated != len(rows) and (
                        postgresql or conn.dialect.supports_sane_multi_rowcount)):
                    raise LedgerError("entries were sealed concurrently; nothing was changed")
                if nodes:
                    s.execute(_NODES.insert(), nodes)
                    nodes.clear()
                sealed += len(rows)
                if pace and (pace_until is None or time.monotonic() < pace_until):
                    time.sleep(pace * (time.monotonic() - started))
            if not sealed and last is not None:
                return None
            root = edge.root()
            note = signer.sign(Checkpoint(self.origin, edge.size, root).body())
            row = LedgerCheckpoint(size=edge.size, root_hash=root, note=note,
                                   frontier=b"".join(edge.hashes()), created_at=utcnow())
            s.add(row)
        return _signed(row)

    def seal_all(self, *, settle: timedelta = timedelta(0), pace: float = 0.0,
                 pace_until: float | None = None) -> SignedCheckpoint | None:
        """Seal in batches until nothing is left; the last checkpoint signed, if any."""
        latest = None
        while (made := self.seal(settle=settle, pace=pace, pace_until=pace_until)) is not None:
            latest = made
        return latest

    def checkpoint(self) -> SignedCheckpoint:
        """Seal everything committed now and return the newest checkpoint (on demand)."""
        self.seal_all()
        latest = self.latest_checkpoint()
        if latest is None:  # pragma: no cover (seal signs the empty tree)
            raise LedgerError("no checkpoint could be made")
        return latest

    def _take_seal_lock(self, s: Session) -> None:
        """One sealer at a time across processes and hosts. Even without it the unique
        leaf index and checkpoint size would make a racing sealer fail, not fork."""
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEAL_LOCK})
        else:  # SQLite: a write takes the database's write lock until commit
            s.execute(delete(LedgerCheckpoint).where(LedgerCheckpoint.size < 0))

    # -- proofs (RFC 9162 2.1.3 and 2.1.4) ---------------------------------------------------

    def inclusion_proof(self, leaf_index: int, size: int) -> list[bytes]:
        with self._db.session() as s:
            return merkle.inclusion_proof(leaf_index, size, self._prefetched(s, size))

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        with self._db.session() as s:
            return merkle.consistency_proof(first, second, self._prefetched(s, second))

    def root_at(self, size: int) -> bytes:
        if size == 0:
            return merkle.EMPTY_ROOT
        with self._db.session() as s:
            return self._subtree(s, 0, size)

    def _prefetched(self, s: Session, size: int) -> merkle.Subtree:
        sealed = s.scalar(select(func.max(LedgerCheckpoint.size))) or 0
        if size > sealed:
            raise LedgerError(f"the tree has {sealed} sealed entries, not {size}")
        return lambda lo, hi: self._subtree(s, lo, hi)

    def _subtree(self, s: Session, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi) from stored nodes and at most a few small leaf ranges."""
        parts = _perfect_parts(lo, hi)
        big = [(lv, st) for lv, st in parts if lv >= NODE_LEVEL]
        small = [(lv, st) for lv, st in parts if lv < NODE_LEVEL]
        known: dict[tuple[int, int], bytes] = {}
        for level in {lv for lv, _ in big}:
            wanted = [st >> level for lv, st in big if lv == level]
            for index, digest in s.execute(select(LedgerNode.index, LedgerNode.hash).where(
                    LedgerNode.level == level, LedgerNode.index.in_(wanted))):
                known[(level, index << level)] = digest
        if small:
            first = min(st for _, st in small)
            end = max(st + (1 << lv) for lv, st in small)
            leaves = dict(s.execute(select(LedgerEntry.leaf_index, LedgerEntry.leaf_hash).where(
                LedgerEntry.leaf_index >= first, LedgerEntry.leaf_index < end)).all())
            for lv, st in small:
                try:
                    known[(lv, st)] = merkle.perfect_root(
                        [leaves[i] for i in range(st, st + (1 << lv))])
                except KeyError as exc:
                    raise LedgerError(f"leaf {exc.args[0]} is not sealed") from exc
        missing = [p for p in parts if p not in known]
        if missing:
            raise LedgerError(f"tree node {missing[0]} is missing from ledger_nodes")
        return _fold(lo, hi, known)


def _perfect_parts(lo: int, hi: int) -> list[tuple[int, int]]:
    """The aligned perfect subtrees MTH(D[lo:hi]) is built from, as (level, start)."""
    n = hi - lo
    if n & (n - 1) == 0 and lo % n == 0:
        return [(n.bit_length() - 1, lo)]
    k = merkle.split_point(n)
    return _perfect_parts(lo, lo + k) + _perfect_parts(lo + k, hi)


def _fold(lo: int, hi: int, known: Mapping[tuple[int, int], bytes]) -> bytes:
    n = hi - lo
    if n & (n - 1) == 0 and lo % n == 0:
        return known[(n.bit_length() - 1, lo)]
    k = merkle.split_point(n)
    return merkle.node_hash(_fold(lo, lo + k, known), _fold(lo + k, hi, known))


def _split_hashes(blob: bytes) -> list[bytes]:
    return [blob[i:i + 32] for i in range(0, len(blob), 32)]


def _signed(row: LedgerCheckpoint) -> SignedCheckpoint:
    return SignedCheckpoint(row.size, row.root_hash, row.note, row.created_at)
