"""The audit ledger: RFC 8785 canonical entries, RFC 9162 tree and proofs (Certificate
Transparency vectors and a naive cross-check), C2SP signed checkpoints (Go's example note),
appends and sealing on SQLite and a real PostgreSQL, export and offline verification with
every tamper case named by line."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import struct
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from consent.ledger import Checkpoint, Ledger, LedgerEntry, NoteSigner, NoteVerifier, merkle
from consent.ledger.errors import LedgerError, NoteError, PersonalDataRefused, VerificationFailed
from consent.ledger.export import export_ledger
from consent.ledger.jcs import CanonicalizationError, canonicalize, format_number
from consent.ledger.ledger import hashed_id
from consent.ledger.note import open_note
from consent.ledger.verify import verify_export
from kernel.crypto import FieldCipher
from kernel.db import Base, Database

VECTORS = Path(__file__).parent / "vectors"
LEDGER_TABLES = ["ledger_entries", "ledger_checkpoints", "ledger_nodes", "ledger_keys"]
ORIGIN = "audit.civitas.test/ledger"

# -- RFC 8785 -------------------------------------------------------------------------------


def test_jcs_rfc8785_examples():
    # RFC 8785 3.2.2 (with its numbers) and 3.2.3 (sorting by UTF-16 code units)
    value = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\nA'B\"\\\\\"/",
        "literals": [None, True, False],
    }
    assert canonicalize(value) == (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    names = {"\u20ac": 0, "\r": 0, "\ufb33": 0, "1": 0, "\U0001f600": 0, "\u0080": 0,
             "\u00f6": 0}
    order = list(json.loads(canonicalize(names)))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_jcs_numbers_match_ecmascript():
    """4,500 doubles formatted by Node.js's Number.prototype.toString."""
    count = 0
    for line in (VECTORS / "jcs_numbers.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        bits, expected = line.split()
        assert format_number(struct.unpack(">d", bytes.fromhex(bits))[0]) == expected, bits
        count += 1
    assert count > 4000


@given(st.lists(st.none() | st.text(), max_size=4))
@example(["\u20ac$\u000f\nA'B\"\\\\\"/", None, "\U0001f600\x7f\u2028"])
def test_jcs_of_strings_alone_is_the_same_as_of_any_value(values):
    from consent.ledger.jcs import canonical_strings

    assert canonical_strings(values) == canonicalize(values)
    assert canonical_strings(tuple(values)) == canonicalize(values)


def test_jcs_of_strings_alone_refuses_a_lone_surrogate():
    from consent.ledger.jcs import canonical_strings

    with pytest.raises(CanonicalizationError):
        canonical_strings(["ok", "\ud800"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2**53, "\ud800", {1: "x"},
                                 b"bytes", {"a": {1, 2}}])
def test_jcs_refuses_what_has_no_canonical_form(bad):
    with pytest.raises(CanonicalizationError):
        canonicalize(bad)


# -- RFC 9162 2.1 ---------------------------------------------------------------------------


def naive_mth(leaves):
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return merkle.leaf_hash(leaves[0])
    k = merkle.split_point(len(leaves))
    return merkle.node_hash(naive_mth(leaves[:k]), naive_mth(leaves[k:]))


def naive_path(m, leaves):
    if len(leaves) == 1:
        return []
    k = merkle.split_point(len(leaves))
    if m < k:
        return naive_path(m, leaves[:k]) + [naive_mth(leaves[k:])]
    return naive_path(m - k, leaves[k:]) + [naive_mth(leaves[:k])]


def naive_subproof(m, leaves, complete):
    n = len(leaves)
    if m == n:
        return [] if complete else [naive_mth(leaves)]
    k = merkle.split_point(n)
    if m <= k:
        return naive_subproof(m, leaves[:k], complete) + [naive_mth(leaves[k:])]
    return naive_subproof(m - k, leaves[k:], False) + [naive_mth(leaves[:k])]


def list_subtree(leaves):
    hashes = [merkle.leaf_hash(x) for x in leaves]

    def subtree(lo, hi):
        edge = merkle.CompactRange()
        edge.extend(hashes[lo:hi])
        return edge.root()

    return subtree


def test_certificate_transparency_vectors():
    v = json.loads((VECTORS / "ct_merkle.json").read_text())
    leaves = [bytes.fromhex(x) for x in v["leaves"]]
    subtree = list_subtree(leaves)
    for size, root in v["roots"].items():
        edge = merkle.CompactRange()
        edge.extend(merkle.leaf_hash(x) for x in leaves[: int(size)])
        assert edge.root().hex() == root
    for case in v["inclusion"]:
        i, n, path = case["index"], case["size"], [bytes.fromhex(h) for h in case["path"]]
        assert merkle.inclusion_proof(i, n, subtree) == path
        root = bytes.fromhex(v["roots"][str(n)])
        assert merkle.verify_inclusion(i, n, merkle.leaf_hash(leaves[i]), path, root)
    for case in v["consistency"]:
        m, n, proof = case["first"], case["second"], [bytes.fromhex(h) for h in case["proof"]]
        assert merkle.consistency_proof(m, n, subtree) == proof
        assert merkle.verify_consistency(m, n, bytes.fromhex(v["roots"][str(m)]),
                                         bytes.fromhex(v["roots"][str(n)]), proof)


def test_proofs_match_a_naive_implementation_for_every_size_up_to_64():
    leaves = [bytes([i]) * (i % 5) + b"leaf %d" % i for i in range(64)]
    subtree = list_subtree(leaves)
    for n in range(1, 65):
        root = naive_mth(leaves[:n])
        edge = merkle.CompactRange()
        edge.extend(merkle.leaf_hash(x) for x in leaves[:n])
        assert edge.root() == root == subtree(0, n)
        for i in range(n):
            path = merkle.inclusion_proof(i, n, subtree)
            assert path == naive_path(i, leaves[:n])
            leaf = merkle.leaf_hash(leaves[i])
            assert merkle.verify_inclusion(i, n, leaf, path, root)
            assert not merkle.verify_inclusion(i, n, leaf, path, merkle.leaf_hash(b"x"))
            if n > 1:
                assert not merkle.verify_inclusion((i + 1) % n, n, leaf, path, root)
                assert not merkle.verify_inclusion(i, n, leaf, path[:-1], root)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(m, n, subtree)
            assert proof == (naive_subproof(m, leaves[:n], True) if m < n else [])
            old = naive_mth(leaves[:m])
            assert merkle.verify_consistency(m, n, old, root, proof)
            if m < n:
                assert not merkle.verify_consistency(m, n, merkle.leaf_hash(b"x"), root, proof)
                bent = [proof[0][::-1], *proof[1:]]
                assert not merkle.verify_consistency(m, n, old, root, bent)
                assert not merkle.verify_consistency(m, n, old, root, proof + [root])


def test_compact_range_accepts_aligned_blocks_only():
    hashes = [merkle.leaf_hash(b"%d" % i) for i in range(13)]
    a, b = merkle.CompactRange(), merkle.CompactRange()
    a.extend(hashes)
    for level, start in merkle.aligned_blocks(0, 13):
        b.push(level, merkle.perfect_root(hashes[start:start + (1 << level)]))
    assert a.root() == b.root() and a.hashes() == b.hashes() and b.size == 13
    with pytest.raises(ValueError):
        b.push(2, hashes[0])  # 13 is not a multiple of 4


# -- C2SP signed notes -----------------------------------------------------------------------


def test_signed_note_matches_go_reference():
    v = json.loads((VECTORS / "signed_note.json").read_text())
    seed = base64.b64decode(v["signer_key"].split("+", 4)[4])[1:]
    signer = NoteSigner("PeterNeumann", seed)
    assert str(signer.verifier) == v["verifier_key"]
    assert signer.sign(v["body"]) == v["note"]  # Ed25519 is deterministic
    assert open_note(v["note"], [NoteVerifier.parse(v["verifier_key"])]) == v["body"]


def test_checkpoint_note_format_and_wrong_keys():
    signer = NoteSigner(ORIGIN, NoteSigner.generate_private_key())
    other = NoteSigner(ORIGIN, NoteSigner.generate_private_key())
    cp = Checkpoint(ORIGIN, 8, bytes(range(32)))
    note = signer.sign(cp.body())
    body, sig = note.split("\n\n")
    assert body == f"{ORIGIN}\n8\n{base64.b64encode(bytes(range(32))).decode()}"
    assert sig.startswith(f"\u2014 {ORIGIN} ") and sig.endswith("\n")
    raw = base64.b64decode(sig.split()[-1])
    assert raw[:4] == signer.verifier.key_id and len(raw) == 68
    assert Checkpoint.open(note, [signer.verifier]) == cp
    with pytest.raises(NoteError, match="no signature by a known key"):
        Checkpoint.open(note, [other.verifier])
    with pytest.raises(NoteError, match="does not verify"):
        Checkpoint.open(note.replace("\n8\n", "\n9\n"), [signer.verifier])
    cosigned = note + other.sign(cp.body()).split("\n\n")[1]
    assert Checkpoint.open(cosigned, [other.verifier]) == cp  # unknown signatures ignored
    assert NoteVerifier.parse(str(signer.verifier)) == signer.verifier
    name, hex_id, encoded = str(signer.verifier).split("+", 2)
    wrong_id = bytes(b ^ 0xFF for b in bytes.fromhex(hex_id)).hex()  # valid hex, 8 digits
    with pytest.raises(NoteError, match="id does not match its name and key"):
        NoteVerifier.parse(f"{name}+{wrong_id}+{encoded}")
    with pytest.raises(NoteError, match="not valid hex"):
        NoteVerifier.parse(f"{name}+0{hex_id}+{encoded}")


# -- the ledger on SQLite and PostgreSQL -------------------------------------------------------




def make_db(url):
    db = Database(url)
    Base.metadata.create_all(db.engine, tables=[Base.metadata.tables[t] for t in LEDGER_TABLES])
    return db


@pytest.fixture
def db(database_url):
    db = make_db(database_url)
    yield db
    db.dispose()


@pytest.fixture
def cipher():
    return FieldCipher([Fernet.generate_key().decode()])


@pytest.fixture
def ledger(db, cipher):
    return Ledger(db, cipher, origin=ORIGIN)


def decision(i, **extra):
    return {"sub": f"pairwise-{i:06d}", "agency": "agency-one", "claims": ["email"],
            "purpose": "benefits", "decision": i % 3 != 0, **extra}


def test_migration_matches_models(db):
    """0007 creates exactly what the models declare (run on its own: 0006 may not exist)."""
    from alembic.autogenerate import compare_metadata
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    path = Path(__file__).parents[1] / "civitas/migrations/versions/0007_ledger.py"
    spec = importlib.util.spec_from_file_location("ledger_migration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Base.metadata.drop_all(db.engine, tables=[Base.metadata.tables[t] for t in LEDGER_TABLES])
    with db.engine.begin() as conn:
        ctx = MigrationContext.configure(conn)
        with Operations.context(ctx):
            module.upgrade()
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "include_object": lambda obj, name, kind, reflected, other: (
                kind != "table" or name in LEDGER_TABLES),
        })
        assert compare_metadata(ctx, Base.metadata) == []
    with db.engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        module.downgrade()


def test_concurrent_appends_get_unique_seqs_and_dense_leaves(ledger):
    seqs, errors = [], []
    barrier = threading.Barrier(8)

    def worker(w):
        barrier.wait()
        try:
            for i in range(40):
                seqs.append(ledger.append("decision.query", decision(w * 1000 + i)).seq)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seqs) == 320 == len(set(seqs))
    cp = ledger.checkpoint()
    assert cp.size == 320 and ledger.unsealed_count() == 0
    rows = sorted(ledger.entries(), key=lambda e: e.seq)
    assert [e.leaf_index for e in rows] == list(range(320))  # seq order, dense
    edge = merkle.CompactRange()
    edge.extend(e.leaf_hash for e in rows)
    assert edge.root() == cp.root_hash


def test_concurrent_sealers_never_fork(db, cipher):
    first = Ledger(db, cipher, origin=ORIGIN)
    first.append_many(("decision.query", decision(i)) for i in range(500))
    sealers = [Ledger(db, cipher, origin=ORIGIN, seal_batch=37) for _ in range(3)]
    errors = []

    def run(ledger):
        try:
            ledger.seal_all()
        except LedgerError as exc:  # a loser of a race may be told so; it must not fork
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in sealers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.seal_all()
    sizes = [cp.size for cp in first.checkpoints()]
    assert sizes[-1] == 500 and sizes == sorted(set(sizes))
    previous = None
    for cp in first.checkpoints():
        if previous is not None and previous.size:
            proof = first.consistency_proof(previous.size, cp.size)
            assert merkle.verify_consistency(previous.size, cp.size, previous.root_hash,
                                             cp.root_hash, proof)
        previous = cp


def test_sealer_handles_gaps_and_late_commits(ledger, db, database_url):
    """A rolled-back insert leaves a permanent hole in seq; an entry whose transaction is
    still open when the sealer runs is sealed by the next run, at the next leaf index."""
    ledger.append("decision.query", decision(1))
    with pytest.raises(RuntimeError):
        with db.session() as s:
            ledger.append("decision.query", decision(2), session=s)
            raise RuntimeError("the decision failed: its entry rolls back with it")
    with db.session() as s:  # explicit holes, as a sequence leaves them
        s.add(LedgerEntry(seq=10, kind="decision.query", entry="{}",
                          leaf_hash=merkle.leaf_hash(b"{}"), created_at=ledger_now()))
    ledger.append("decision.query", decision(3))
    if database_url.startswith("postgresql"):
        with db.session() as s:
            late = ledger.append("decision.query", decision(4), session=s)
            ledger.append("decision.query", decision(5))  # commits while `late` is open
            cp = ledger.seal()
            assert cp is not None and cp.size == 4
        cp = ledger.seal()
        assert cp.size == 5
        assert ledger.entry(late.seq).leaf_index == 4
    else:  # SQLite has one writer: no transaction can be open while the sealer writes
        cp = ledger.seal()
        assert cp.size == 3
    rows = [e for e in ledger.entries() if e.leaf_index is not None]
    assert sorted(e.leaf_index for e in rows) == list(range(cp.size))
    by_index = sorted(rows, key=lambda e: e.leaf_index)
    edge = merkle.CompactRange()
    edge.extend(e.leaf_hash for e in by_index)
    assert edge.root() == cp.root_hash == ledger.root_at(cp.size)
    assert ledger.seal() is None  # nothing new


def ledger_now():
    from kernel.db import utcnow

    return utcnow()


def test_settle_leaves_young_entries_for_the_next_run(ledger):
    ledger.append("decision.query", decision(1))
    assert ledger.seal(settle=timedelta(hours=1)).size == 0  # the empty tree is signed
    assert ledger.seal(settle=timedelta(0)).size == 1


def test_checkpoints_verify_with_the_published_key_only(ledger, db, cipher):
    ledger.append_many(("decision.query", decision(i)) for i in range(10))
    cp = ledger.checkpoint()
    published = NoteVerifier.parse(ledger.public_key())
    assert Checkpoint.open(cp.note, [published]) == Checkpoint(ORIGIN, 10, cp.root_hash)
    stranger = NoteSigner(ORIGIN, NoteSigner.generate_private_key()).verifier
    with pytest.raises(NoteError):
        Checkpoint.open(cp.note, [stranger])
    # the key survives a restart and is encrypted at rest
    again = Ledger(db, cipher, origin=ORIGIN)
    assert again.public_key() == ledger.public_key()
    with db.engine.connect() as conn:
        stored = conn.execute(text("select private_key_encrypted from ledger_keys")).scalar()
    assert stored.startswith("v2.")  # kernel/crypto.py: AES-256-GCM-SIV


def test_proofs_from_the_database(ledger):
    """Stored subtree roots (2**8 leaves and up) plus leaf hashes give the same proofs."""
    ledger.append_many(("decision.query", decision(i)) for i in range(700))
    ledger.seal_all()
    for limit in (1, 250, 300, 149):  # odd batch boundaries
        ledger.append_many(("decision.query", decision(i)) for i in range(limit))
        ledger.seal(limit=limit)
    size = ledger.latest_checkpoint().size
    assert size == 1400
    with ledger.db.session() as s:
        rows = s.execute(select(LedgerEntry.leaf_index, LedgerEntry.leaf_hash)
                         .order_by(LedgerEntry.leaf_index)).all()
    hashes = [h for _, h in rows]

    def subtree(lo, hi):
        edge = merkle.CompactRange()
        edge.extend(hashes[lo:hi])
        return edge.root()

    root = subtree(0, size)
    assert ledger.root_at(size) == root == ledger.latest_checkpoint().root_hash
    for i in (0, 1, 255, 256, 511, 700, 1023, 1024, 1399):
        proof = ledger.inclusion_proof(i, size)
        assert proof == merkle.inclusion_proof(i, size, subtree)
        assert merkle.verify_inclusion(i, size, hashes[i], proof, root)
    for m in (1, 256, 700, 701, 1024, 1250):
        assert ledger.consistency_proof(m, size) == merkle.consistency_proof(m, size, subtree)
    assert ledger.frontier_at(701) == [subtree(s, s + (1 << lv))
                                       for lv, s in merkle.aligned_blocks(0, 701)]
    with pytest.raises(LedgerError):
        ledger.inclusion_proof(0, size + 1)


def test_entries_refuse_personal_data_and_are_canonical(ledger):
    # each check on its own: a member named like a personal claim, an e-mail address as a
    # value; on one-level entries (the shortcut every decision takes) and on nested ones
    with pytest.raises(PersonalDataRefused, match=r"member data\.email is personal data"):
        ledger.append("decision.query", {"email": "a@b.example"})
    with pytest.raises(PersonalDataRefused, match=r"member data\.name is personal data"):
        ledger.append("decision.query", {"sub": "pairwise-1", "name": "Alice Example"})
    with pytest.raises(PersonalDataRefused, match=r"at data\.who looks like an e-mail"):
        ledger.append("account.linked", {"who": "alice@example.org"})
    with pytest.raises(PersonalDataRefused, match=r"member data\.name is personal data"):
        ledger.append("consent.given", {"claims": ["email"], "name": "Alice Example"})
    with pytest.raises(PersonalDataRefused, match=r"at data\.who\[0\] looks like an e-mail"):
        ledger.append("account.linked", {"who": ["alice@example.org"]})
    assert list(ledger.entries()) == []
    with pytest.raises(LedgerError, match="is not a lowercase dotted name"):
        ledger.append("Bad Kind", {})
    # claim names as values and as keys of claim structures are not personal data
    ledger.append("consent.withdrawn", {"claims": {"email": {"purposes": ["benefits"]},
                                                  "name": {"required": True}}})
    key = b"k" * 32
    row = ledger.append("account.deleted", {"account": hashed_id(key, "acct-1"), "n": 1.5})
    parsed = json.loads(row.entry)
    assert parsed["kind"] == "account.deleted" and parsed["data"]["n"] == 1.5
    assert row.entry.encode() == canonicalize(parsed)
    assert row.leaf_hash == merkle.leaf_hash(row.entry.encode())
    ledger.append("consent.given", decision(7, claims=["email", "name"]))
    assert [e.kind for e in ledger.entries(kind="consent.given")] == ["consent.given"]
    now = ledger_now()
    assert len(list(ledger.entries(since=now - timedelta(minutes=1), until=now))) == 3
    assert list(ledger.entries(since=now)) == []


# -- export and offline verification -----------------------------------------------------------


@pytest.fixture
def sqlite_ledger(tmp_path, cipher):
    db = make_db(f"sqlite:///{tmp_path}/export.db")
    yield Ledger(db, cipher, origin=ORIGIN)
    db.dispose()


def sealed_in_batches(ledger, batches=(40, 1, 88, 300, 71)):
    n = 0
    for size in batches:
        ledger.append_many(("decision.query", decision(n + i)) for i in range(size))
        n += size
        ledger.seal()
    return n


def exported(ledger, **kwargs):
    out = io.BytesIO()
    export_ledger(ledger, out, **kwargs)
    return out.getvalue().split(b"\n")


def failure(lines, key, **kwargs):
    with pytest.raises(VerificationFailed) as info:
        verify_export(io.BytesIO(b"\n".join(lines)), key, **kwargs)
    return info.value


def line_of(lines, marker):
    return next(i for i, line in enumerate(lines) if marker in line)


def test_export_round_trip(sqlite_ledger):
    total = sealed_in_batches(sqlite_ledger)
    lines = exported(sqlite_ledger)
    seen = []
    report = verify_export(io.BytesIO(b"\n".join(lines)), sqlite_ledger.public_key(),
                           progress=seen.append)
    assert report.entries == total == report.end and report.start == 0
    assert report.checkpoints == 5 and report.consistency_proofs == 4 and seen
    header = json.loads(lines[0])
    assert header["public_key"] == sqlite_ledger.public_key() and header["frontier"] == []
    entry = json.loads(lines[1])
    assert entry["index"] == 0 and entry["entry"]["kind"] == "decision.query"


def test_tamper_cases_are_named_by_line(sqlite_ledger, either_hashing):
    sealed_in_batches(sqlite_ledger)
    key = sqlite_ledger.public_key()
    lines = exported(sqlite_ledger)
    target = line_of(lines, b"pairwise-000100")  # 0-based; reported lines are 1-based

    changed = list(lines)
    changed[target] = changed[target].replace(b"pairwise-000100", b"pairwise-000101")
    err = failure(changed, key)
    assert err.line == target + 1 and "entry 100 was altered" in str(err)

    one_byte = list(lines)
    at = one_byte[target].index(b'"purpose":"') + 11
    one_byte[target] = one_byte[target][:at] + b"B" + one_byte[target][at + 1:]
    err = failure(one_byte, key)
    assert err.line == target + 1 and "entry 100 was altered" in str(err)

    removed = lines[:target] + lines[target + 1:]
    err = failure(removed, key)
    assert err.line == target + 1 and "index 101 where 100" in str(err)

    swapped = list(lines)
    swapped[target], swapped[target + 1] = swapped[target + 1], swapped[target]
    err = failure(swapped, key)
    assert err.line == target + 1 and "index 101 where 100" in str(err)

    cp_line = line_of(lines, b'"type":"checkpoint","size":129')
    note = json.loads(lines[cp_line])["note"]
    body, sig = note.split("\n\n")
    origin, size, root = body.split("\n")
    forged_root = base64.b64encode(bytes(32)).decode()
    rerooted = list(lines)
    rerooted[cp_line] = json.dumps({"type": "checkpoint", "size": 129,
                                    "note": f"{origin}\n{size}\n{forged_root}\n\n{sig}"}).encode()
    err = failure(rerooted, key)
    assert err.line == cp_line + 1 and "does not verify" in str(err)

    impostor = NoteSigner(ORIGIN, NoteSigner.generate_private_key())
    forged = list(lines)
    forged[cp_line] = json.dumps({"type": "checkpoint", "size": 129, "note": impostor.sign(
        Checkpoint(ORIGIN, 129, bytes(32)).body())}).encode()
    err = failure(forged, key)
    assert err.line == cp_line + 1 and "no signature by a known key" in str(err)

    # an editor who also recomputes the leaf hash is caught by the signed root
    deep = list(lines)
    text_ = deep[target][deep[target].index(b',"entry":') + 9:-1].replace(b"000100", b"000999")
    deep[target] = b'{"type":"entry","leaf":"%s","index":100,"seq":101,"entry":%s}' % (
        merkle.leaf_hash(text_).hex().encode(), text_)
    err = failure(deep, key)
    assert err.line == cp_line + 1 and "entries 41..128" in str(err)

    # the last entry before a checkpoint dropped: no later index shows it, the signed size does
    dropped = lines[:cp_line - 1] + lines[cp_line:]
    err = failure(dropped, key)
    assert err.line == cp_line and "follows 128 leaves: entries are missing" in str(err)

    # a genuine, older checkpoint put on this checkpoint's line (replayed)
    older = json.loads(lines[line_of(lines, b'"type":"checkpoint","size":41')])["note"]
    replayed = list(lines)
    replayed[cp_line] = json.dumps({"type": "checkpoint", "size": 129, "note": older}).encode()
    err = failure(replayed, key)
    assert err.line == cp_line + 1 and "signed origin or size differ" in str(err)

    # the last checkpoint (and its proof) taken away: the last entries are signed by none
    last_cp = line_of(lines, b'"type":"checkpoint","size":500')
    assert b'"type":"consistency","from":429,"to":500' in lines[last_cp + 1]
    unsigned = lines[:last_cp] + lines[last_cp + 2:]
    err = failure(unsigned, key)
    assert err.line == last_cp + 1 and "no checkpoint covers the last entries" in str(err)

    # cut after an earlier checkpoint, the end line kept: the later entries are missed
    assert b'"type":"end"' in lines[-2]
    cut = lines[:cp_line + 2] + lines[-2:]
    err = failure(cut, key)
    assert err.line == cp_line + 3 and "ends after leaf 129, not at 500" in str(err)

    truncated = lines[:cp_line]
    assert "truncated" in str(failure(truncated, key))
    stranger = str(NoteSigner(ORIGIN, NoteSigner.generate_private_key()).verifier)
    assert "no signature by a known key" in str(failure(lines, stranger))


def test_rewritten_history_fails_against_an_older_checkpoint(tmp_path, sqlite_ledger):
    honest = sqlite_ledger
    honest.append_many(("decision.query", decision(i)) for i in range(3))
    kept = honest.seal()  # the auditor keeps this checkpoint (size 3)
    honest.append_many(("decision.query", decision(i)) for i in range(3, 8))
    honest.seal()
    assert verify_export(io.BytesIO(b"\n".join(exported(honest))), honest.public_key(),
                         trusted=[kept.note]).trusted_checked == [3]

    # the same hub (same key) rebuilds its ledger with entry 1 changed
    db2 = make_db(f"sqlite:///{tmp_path}/rewritten.db")
    with honest.db.session() as s, db2.session() as s2:
        for row in s.execute(text("select * from ledger_keys")).mappings():
            s2.execute(text("insert into ledger_keys values (:name, :public_key, "
                            ":private_key_encrypted, :created_at)"), dict(row))
    forger = Ledger(db2, honest._cipher, origin=ORIGIN)
    forger.append_many(("decision.query", decision(i, purpose="fraud" if i == 1 else "benefits"))
                       for i in range(4))
    forger.seal()
    forger.append_many(("decision.query", decision(i)) for i in range(4, 8))
    forger.seal()
    key = forger.public_key()
    assert key == honest.public_key()

    proof = forger.consistency_proof(3, 8)
    assert not merkle.verify_consistency(3, 8, kept.root_hash, forger.root_at(8), proof)
    assert merkle.verify_consistency(3, 8, forger.root_at(3), forger.root_at(8), proof)

    full = exported(forger)
    err = failure(full, key, trusted=[kept.note])
    assert err.line == 4 and "do not match the trusted checkpoint" in str(err)

    # an export of the later part only, carrying a proof from the auditor's size
    later = exported(forger, since=ledger_now() - timedelta(seconds=0.0), prove_from=[3])
    assert json.loads(later[0])["start"] == 8
    window = exported(forger, prove_from=[3], since=entry_time(forger, 5))
    header = json.loads(window[0])
    assert header["start"] == 4 and header["end"] == 8
    consistency = line_of(window, b'"type":"consistency","from":3')
    err = failure(window, key, trusted=[kept.note])
    assert err.line == consistency + 1 and "history before size 3 was rewritten" in str(err)
    report = verify_export(io.BytesIO(b"\n".join(window)), key)
    assert report.entries == 4 and any("not checked" in n for n in report.notes)
    db2.dispose()


def test_a_rolled_back_tree_fails_against_a_later_trusted_checkpoint(sqlite_ledger):
    """The auditor kept the checkpoint of size 8; a hub that shows its tree as it stood at
    size 5 (rolled back: the last entries dropped, every remaining line and signature
    genuine) is refused for that checkpoint, not accepted as a shorter history."""
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(5))
    sqlite_ledger.seal()
    key = sqlite_ledger.public_key()
    rolled_back = exported(sqlite_ledger)
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(5, 8))
    kept = sqlite_ledger.seal()
    assert kept.size == 8
    assert verify_export(io.BytesIO(b"\n".join(rolled_back)), key).entries == 5
    err = failure(rolled_back, key, trusted=[kept.note])
    assert err.line == len(rolled_back) - 1
    assert "trusted checkpoint of size 8 could not be checked" in str(err)
    assert verify_export(io.BytesIO(b"\n".join(exported(sqlite_ledger))), key,
                         trusted=[kept.note]).trusted_checked == [8]


def entry_time(ledger, leaf_index):
    with ledger.db.session() as s:
        return s.scalar(select(LedgerEntry.created_at)
                        .where(LedgerEntry.leaf_index == leaf_index))


def test_audit_cli(tmp_path, sqlite_ledger):
    from consent.ledger.cli import make_audit_cli

    cli = make_audit_cli(lambda ctx: sqlite_ledger)
    runner = CliRunner()
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(25))
    r = runner.invoke(cli, ["checkpoint"])
    assert r.exit_code == 0 and r.output.startswith(f"{ORIGIN}\n25\n")
    r = runner.invoke(cli, ["pubkey"])
    key = r.output.strip()
    assert key == sqlite_ledger.public_key()
    (tmp_path / "key.txt").write_text(key + "\n")
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(25, 30))
    out = tmp_path / "audit.jsonl"
    r = runner.invoke(cli, ["export", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["verify", str(out), "--public-key", f"@{tmp_path / 'key.txt'}"])
    assert r.exit_code == 0 and "OK" in r.output and "30 entries" in r.output
    lines = out.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"pairwise-000002", b"pairwise-000003")
    out.write_bytes(b"\n".join(lines))
    r = runner.invoke(cli, ["verify", str(out), "--public-key", key, "--quiet"])
    assert r.exit_code == 1 and "line 4: entry 2 was altered" in r.output


def test_background_sealer_signs_on_a_schedule(sqlite_ledger):
    import time

    from consent.ledger import LedgerSealer

    sealer = LedgerSealer(sqlite_ledger, interval=0.02, settle=timedelta(0))
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(5))
    sealer.start()
    try:
        deadline = time.monotonic() + 20
        while (sealer.last is None or sealer.last.size < 5) and time.monotonic() < deadline:
            time.sleep(0.01)
        sqlite_ledger.append("decision.query", decision(5))
        while sealer.last.size < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sealer.stop()
    assert sealer.last.size == 6 == sqlite_ledger.latest_checkpoint().size


# -- the fast path and the parallel verifier ----------------------------------------------------


def test_span_is_a_compact_range_that_starts_anywhere(either_hashing):
    import random

    from consent.ledger.scan import Span

    rng = random.Random(9162)
    hashes = [merkle.leaf_hash(b"%d" % i) for i in range(300)]
    for _ in range(200):
        begin = rng.randrange(0, 200)
        end = rng.randrange(begin, 300)
        span = Span(begin)
        at = begin
        while at < end:  # in pieces of any size, as blocks of lines arrive
            step = rng.randrange(1, 40)
            span.extend(hashes[at:min(end, at + step)])
            at = min(end, at + step)
        assert span.end == end
        assert span.nodes == [(level, merkle.perfect_root(hashes[s:s + (1 << level)]))
                              for level, s in merkle.aligned_blocks(begin, end)]
        whole, joined = merkle.CompactRange(), merkle.CompactRange()
        joined.extend(hashes[:begin])
        for level, node in span.nodes:
            joined.push(level, node)
        whole.extend(hashes[:end])
        assert joined.root() == whole.root()


def entry_line(index, seq, text, leaf=None):
    leaf = merkle.leaf_hash(text).hex().encode() if leaf is None else leaf
    return b'{"type":"entry","leaf":"%s","index":%d,"seq":%d,"entry":%s}' % (leaf, index, seq,
                                                                              text)


def test_entry_leaves_accepts_exactly_the_export_layout(either_hashing):
    from consent.ledger.scan import entry_leaves

    texts = [b'{"data":{"n":%d},"kind":"decision.query"}' % i for i in range(95, 105)]
    lines = [entry_line(95 + i, 7 * i + 1, t) for i, t in enumerate(texts)]  # 99 -> 100
    assert entry_leaves(lines, 95) == [merkle.leaf_hash(t) for t in texts]
    assert entry_leaves(lines, 94) is None
    line = lines[6]  # index 101
    for bad in [line.replace(b'"index":101', b'"index":0101'),
                line.replace(b'"seq":43', b'"seq":-43'),
                line.replace(b'"seq":43', b'"seq":'),
                line.replace(b'"seq":43', b'"seq":4a'),
                line[:-1] + b" ",
                line.replace(b'"leaf":"', b'"leaf":"A', 1)[:-1],
                line.replace(b'"leaf":"%s' % line[24:26], b'"leaf":"%s' % line[24:26].upper()),
                line.replace(b'{"type":"entry"', b'{"type": "entry"'),
                line.replace(b',"entry":', b',"entry": '),
                line.replace(b'"n":101', b'"n":102')]:
        assert bad != line
        assert entry_leaves(lines[:6] + [bad] + lines[7:], 95) is None, bad


@pytest.fixture(params=["default", "hashlib"])
def either_hashing(request, monkeypatch):
    """Run the scan on the compiled hashing core (where built) and on its hashlib fallback."""
    from consent.ledger import hashing, scan

    if request.param == "hashlib":
        monkeypatch.setattr(scan, "leaf_hashes", hashing.py_leaf_hashes)
        monkeypatch.setattr(scan, "perfect_root", hashing.py_perfect_root)
        monkeypatch.setattr(hashing, "perfect_root", hashing.py_perfect_root)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Send even a small file through the worker processes, in chunks of a few lines."""
    from consent.ledger import scan

    monkeypatch.setattr(scan, "PARALLEL_FROM", 0)
    monkeypatch.setattr(scan, "CHUNK", 1500)
    monkeypatch.setattr(scan, "BLOCK", 700)


def verdicts(tmp_path, lines, key, **kwargs):
    """Verify ``lines`` in this process and with two workers; both outcomes, which must be
    the same report or the same failure."""
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"\n".join(lines))
    outcomes = []
    for workers in (1, 2):
        try:
            with open(path, "rb") as f:
                report = verify_export(f, key, workers=workers, **kwargs)
            assert report.workers == workers
            report.workers = 1
            outcomes.append(report)
        except VerificationFailed as exc:
            outcomes.append((exc.line, str(exc)))
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_workers_hash_every_entry_of_a_sound_file(tmp_path, sqlite_ledger, small_chunks,
                                                  monkeypatch, start):
    import multiprocessing

    from consent.ledger import scan
    from consent.ledger.verify import ExportVerifier

    monkeypatch.setattr(scan, "_context", lambda: multiprocessing.get_context(start))
    in_parent = []
    monkeypatch.setattr(ExportVerifier, "_run", lambda self, lines: in_parent.append(lines))
    total = sealed_in_batches(sqlite_ledger)
    path = tmp_path / "whole.jsonl"
    path.write_bytes(b"\n".join(exported(sqlite_ledger)))
    seen = []
    with open(path, "rb") as f:
        report = verify_export(f, sqlite_ledger.public_key(), workers=2, progress=seen.append)
    assert report.entries == total and report.workers == 2 and report.checkpoints == 5
    assert in_parent == []  # no fallback to this process
    assert seen == sorted(seen) and seen[-1] == path.stat().st_size and len(seen) > 20


def other_leaf(line):
    """``line`` with its leaf hash's last hex digit changed: still 64 hex digits."""
    end = line.index(b'"leaf":"') + len(b'"leaf":"') + 64
    return line[:end - 1] + (b"1" if line[end - 1:end] == b"0" else b"0") + line[end:]


def test_workers_verify_like_one_process(tmp_path, sqlite_ledger, small_chunks,
                                        either_hashing):
    sealed_in_batches(sqlite_ledger)
    key = sqlite_ledger.public_key()
    lines = exported(sqlite_ledger)
    report = verify_export(io.BytesIO(b"\n".join(lines)), key)
    assert verdicts(tmp_path, lines, key) == report

    target = line_of(lines, b"pairwise-000100")
    cp_line = line_of(lines, b'"type":"checkpoint","size":129')
    text_ = lines[target][lines[target].index(b',"entry":') + 9:-1].replace(b"000100", b"000999")
    impostor = NoteSigner(ORIGIN, NoteSigner.generate_private_key())
    cases = {
        "changed": lambda ls: ls[target].replace(b"pairwise-000100", b"pairwise-000101"),
        "leaf": lambda ls: other_leaf(ls[target]),
        "index": lambda ls: ls[target].replace(b'"index":100', b'"index":1000'),
        "deep": lambda ls: entry_line(100, 101, text_),
        "forged": lambda ls: json.dumps({"type": "checkpoint", "size": 129, "note":
            impostor.sign(Checkpoint(ORIGIN, 129, bytes(32)).body())}).encode(),
        "garbage": lambda ls: b"not json",
    }
    said = {
        "changed": "entry 100 was altered: its text does not match its leaf hash",
        "leaf": "entry 100 was altered: its text does not match its leaf hash",
        "index": "entry index 1000 where 100 was expected",
        "deep": "checkpoint at size 129 does not match entries 41..128",
        "forged": "checkpoint at size 129: no signature by a known key",
        "garbage": "not a JSON object with a type",
    }
    for name, change in cases.items():
        at = cp_line if name == "forged" else target
        changed = list(lines)
        changed[at] = change(changed)
        line, message = verdicts(tmp_path, changed, key)
        assert line == at + 1 or (name == "deep" and line == cp_line + 1), (name, message)
        assert said[name] in message, (name, message)
    assert verdicts(tmp_path, lines[:target] + lines[target + 1:], key)[0] == target + 1
    swapped = list(lines)
    swapped[target], swapped[target + 1] = swapped[target + 1], swapped[target]
    assert verdicts(tmp_path, swapped, key)[0] == target + 1
    assert "truncated" in verdicts(tmp_path, lines[:cp_line], key)[1]
    blank = lines[:target] + [b""] + lines[target:]
    assert verdicts(tmp_path, blank, key)[0] == target + 1


def test_a_fault_found_early_never_terminates_the_workers(tmp_path, sqlite_ledger, small_chunks,
                                                          monkeypatch):
    """A tampered export found out in its first chunk, with many chunks still handed out:
    the workers are closed and joined, never killed (Pool.terminate can hang for good when
    it kills a worker that holds the result queue's lock: CPython issues 78178, 96995),
    both when the fault is met in a chunk and when an error ends the verification; and no
    worker is left behind."""
    import multiprocessing
    from multiprocessing.pool import Pool

    def refuse(self):
        raise AssertionError("Pool.terminate called")

    monkeypatch.setattr(Pool, "terminate", refuse)
    sealed_in_batches(sqlite_ledger)
    key = sqlite_ledger.public_key()
    lines = exported(sqlite_ledger)
    first = line_of(lines, b"pairwise-000001")
    changed = list(lines)
    changed[first] = changed[first].replace(b"pairwise-000001", b"pairwise-000002")
    garbled = list(lines)
    garbled[first] = b"not json"
    for tampered in (changed, garbled):
        path = tmp_path / "early.jsonl"
        path.write_bytes(b"\n".join(tampered))
        with open(path, "rb") as f, pytest.raises(VerificationFailed) as failed:
            verify_export(f, key, workers=2)
        assert failed.value.line == first + 1
        assert multiprocessing.active_children() == []


def test_workers_check_trusted_checkpoints_inside_their_range(tmp_path, sqlite_ledger,
                                                              small_chunks):
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(77))
    kept = sqlite_ledger.seal()
    sqlite_ledger.append_many(("decision.query", decision(i)) for i in range(77, 300))
    sqlite_ledger.seal()
    key = sqlite_ledger.public_key()
    lines = exported(sqlite_ledger)
    report = verdicts(tmp_path, lines, key, trusted=[kept.note])
    assert report.trusted_checked == [77] and report.entries == 300
    # the hub's key signed another tree of 77 leaves: the roots must be checked at 77
    fork = sqlite_ledger.signer().sign(Checkpoint(ORIGIN, 77, bytes(32)).body())
    line, message = verdicts(tmp_path, lines, key, trusted=[fork])
    assert line == line_of(lines, b'"index":76,') + 1
    assert "do not match the trusted checkpoint" in message


def test_workers_take_long_lines_and_a_file_without_its_last_newline(tmp_path, sqlite_ledger,
                                                                    small_chunks):
    sqlite_ledger.append_many(("decision.query", decision(i, request="r" * (i % 5) * 900))
                              for i in range(60))
    sqlite_ledger.seal()
    key = sqlite_ledger.public_key()
    lines = exported(sqlite_ledger)
    assert max(map(len, lines)) > 3600 and lines[-1] == b""
    assert verdicts(tmp_path, lines, key).entries == 60
    assert verdicts(tmp_path, lines[:-1], key).entries == 60
    long_one = max(range(len(lines)), key=lambda i: len(lines[i]))
    changed = list(lines)
    changed[long_one] = changed[long_one].replace(b"rrrr", b"rrrR", 1)
    assert "was altered" in verdicts(tmp_path, changed, key)[1]


def test_sealer_reports_a_failed_round_as_unhealthy(tmp_path, cipher):
    """A round that cannot reach its tables is logged and retried, and `healthy` says so
    (what `civitas audit seal --heartbeat` reports to a health check), and so does
    civitas_background_jobs_total, for an alert."""
    from consent.ledger import LedgerSealer
    from tests.flows import metric

    def rounds(outcome):
        return metric("civitas_background_jobs_total", job="ledger_seal", outcome=outcome)

    db = make_db(f"sqlite:///{tmp_path}/sealer.db")
    try:
        sealer = LedgerSealer(Ledger(db, cipher, origin=ORIGIN), interval=1)
        assert sealer.healthy is None
        ok, failed = rounds("ok"), rounds("failed")
        assert sealer.run_once() is not None and sealer.healthy  # the empty tree is signed
        assert (rounds("ok"), rounds("failed")) == (ok + 1, failed)
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE ledger_checkpoints")
        assert sealer.run_once() is None and sealer.healthy is False
        assert (rounds("ok"), rounds("failed")) == (ok + 1, failed + 1)
    finally:
        db.dispose()


_NAMES = st.text(st.characters(max_codepoint=127), max_size=12)
_VALUES = st.one_of(st.text(), st.booleans(), st.none(),
                    st.integers(-(2**53 - 1), 2**53 - 1), st.emails(),
                    st.sampled_from(["\ud800", "a\udfff", "\u2028\u2029", "\x7f", "\x00\x1f\"\\",
                                     "\U0001f600\ue000"]))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_NAMES, _VALUES, max_size=10))
@example({"name": "Alice Example"})
@example({"sub": "pairwise-1", "Family_Name": "Example", "n": 3})
@example({"phone_number": 5550100})
def test_flat_entries_take_a_shortcut_to_the_same_bytes_and_answers(data):
    """entry_text writes one-level entries with json's C encoder: the bytes, and what is
    refused (personal data, lone surrogates), must be those of the general path."""
    from consent.ledger import ledger as ledger_module

    at = ledger_now()

    def general():
        ledger_module._check_pseudonymous(data)
        try:
            return canonicalize({"kind": "decision.query", "data": data,
                                 "time": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        except CanonicalizationError as exc:
            raise LedgerError(str(exc)) from exc

    def outcome(run):
        try:
            return run()
        except PersonalDataRefused as exc:
            return ("refused", str(exc))
        except LedgerError:
            return "not I-JSON"

    if not isinstance(outcome(general), tuple):  # not refused: the shortcut is taken
        assert ledger_module._flat(data)
    assert outcome(lambda: ledger_module.entry_text("decision.query", at, data)) == outcome(
        general)


def test_a_paced_seal_rests_after_each_chunk_and_seals_the_same(ledger, monkeypatch):
    """The background sealer rests between chunks (as long as each took), so that the
    requests of the worker it shares get the interpreter and the cores; what it seals and
    signs is the same."""
    from consent.ledger import ledger as ledger_module

    rests: list[float] = []
    monkeypatch.setattr(ledger_module.time, "sleep", rests.append)
    count = 2 * ledger_module.SEAL_CHUNK + 5
    ledger.append_many(("decision.query", decision(i)) for i in range(count))
    cp = ledger.seal_all(pace=1.0)
    assert cp.size == count
    assert len(rests) == 3 and all(r > 0 for r in rests)
    edge = merkle.CompactRange()
    edge.extend(e.leaf_hash for e in sorted(ledger.entries(), key=lambda e: e.leaf_index))
    assert edge.root() == cp.root_hash
    assert ledger.seal_all(pace=1.0) is None and len(rests) == 3  # nothing left: no rest


def test_a_paced_seal_stops_resting_once_its_time_is_up(ledger, monkeypatch):
    """The background sealer rests between chunks only for part of its interval: a round
    that has not finished by then goes on at full speed, so that sealing keeps up with the
    rate entries come in at, and the backlog does not grow from round to round."""
    from consent.ledger import ledger as ledger_module
    from consent.ledger.sealer import LedgerSealer

    rests: list[float] = []
    monkeypatch.setattr(ledger_module.time, "sleep", rests.append)
    count = 3 * ledger_module.SEAL_CHUNK
    ledger.append_many(("decision.query", decision(i)) for i in range(count))
    cp = ledger.seal_all(pace=3.0, pace_until=time.monotonic() - 1)  # time already up
    assert cp.size == count and rests == []
    ledger.append_many(("decision.query", decision(i)) for i in range(count))
    cp = ledger.seal_all(pace=3.0, pace_until=time.monotonic() + 3600)
    assert cp.size == 2 * count and len(rests) == 3

    # the sealer rests for the first three quarters of its interval, then no more
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(ledger, "seal_all", lambda **kwargs: calls.append(kwargs))
    sealer = LedgerSealer(ledger, interval=60)
    before = time.monotonic()
    sealer.run_once()
    [kwargs] = calls
    assert kwargs["pace"] == 3.0
    assert before + 45 <= kwargs["pace_until"] <= time.monotonic() + 45
