"""Offline verification of an audit export (see :mod:`.export` for the format).

Needs the file and the hub's published verifier key, nothing else. It streams: the file is
read in blocks, entries are hashed and folded into the tree's right edge (RFC 9162 2.1) a run
at a time, so memory stays constant whatever the export's length. It stops at the first
fault and names its line:

* an entry whose text no longer matches its leaf hash (a changed byte): that entry's line;
* a leaf index out of sequence (an entry removed, inserted or moved): the first line off;
* a checkpoint whose signature does not verify with the key (a changed root, a forged
  signature): the checkpoint's line;
* a signed root that the entries before it do not produce (entries altered together with
  their leaf hashes): the checkpoint's line, with the range of entries it covers;
* a consistency proof that fails, or a tree that disagrees with a checkpoint the auditor
  kept from before (``trusted``): history rewritten after that checkpoint.

The hot loop (:mod:`.scan`) works on runs of entry lines with one list comprehension per step
(slice, hash, compare) and falls back to a line-by-line parse only to explain a fault. A large
file is verified by several processes at once, each taking a range of its bytes
(:func:`.scan.scan_chunk`); this process folds their subtree roots into the tree in file order
and checks the other lines itself, and when a worker's fast checks fail it verifies from that
line on by itself, so a fault is named exactly as a sequential pass names it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from multiprocessing.pool import AsyncResult, Pool
from typing import IO, Any

from . import merkle
from .errors import NoteError, VerificationFailed
from .export import ENTRY_PREFIX, FORMAT
from .note import Checkpoint, NoteVerifier
from .scan import (
    BLOCK,
    ENTRY_AT,
    Chunk,
    ChunkTask,
    Run,
    Span,
    entry_leaves,
    freeze_imports,
    plan_chunks,
    scan_chunk,
)


@dataclass
class VerifyReport:
    origin: str = ""
    start: int = 0
    end: int = 0
    entries: int = 0
    checkpoints: int = 0
    consistency_proofs: int = 0
    trusted_checked: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    workers: int = 1  # processes that hashed the entries


@dataclass
class _Signed:
    size: int
    root: bytes
    line: int


class ExportVerifier:
    """Feed it lines in order (:meth:`feed`), then :meth:`finish`; or call
    :func:`verify_export`."""

    def __init__(self, key: NoteVerifier, trusted: Sequence[str] = ()) -> None:
        self.key = key
        self.report = VerifyReport()
        self._trusted: dict[int, bytes] = {}
        self._trusted_origins: set[str] = set()
        for note in trusted:
            try:
                cp = Checkpoint.open(note, [key])
            except NoteError as exc:
                raise VerificationFailed(0, f"trusted checkpoint: {exc}") from exc
            self._trusted[cp.size] = cp.root_hash
            self._trusted_origins.add(cp.origin)
        self._stops: list[int] = []
        self._line = 0
        self._edge = merkle.CompactRange()
        self._header: dict[str, Any] | None = None
        self._last: _Signed | None = None
        self._before_last: _Signed | None = None
        self._ended = False

    @property
    def trusted_sizes(self) -> tuple[int, ...]:
        """Tree sizes the entries must be checked at (the trusted checkpoints')."""
        return tuple(sorted(self._trusted))

    # -- driving -----------------------------------------------------------------------------

    def feed(self, lines: list[bytes]) -> None:
        """Verify complete lines (without their newlines)."""
        is_entry = list(map(bytes.startswith, lines, repeat(ENTRY_PREFIX)))
        i, n = 0, len(lines)
        while i < n:
            if is_entry[i]:
                try:
                    j = is_entry.index(False, i)
                except ValueError:
                    j = n
                self._entries(lines[i:j] if j - i < n else lines)
                i = j
            else:
                self._other(lines[i])
                i += 1

    def absorb(self, run: Run) -> bool:
        """Take a run of entries a worker verified (:func:`.scan.scan_chunk`); False, and
        nothing done, if it does not continue the tree here: the caller then feeds the lines
        from ``run.offset`` on to name the fault."""
        size = self._edge.size
        if (self._header is None or self._ended or run.first != size
                or (self._stops and self._stops[0] < size + run.count)):
            return False
        for level, node in run.nodes:
            self._edge.push(level, node)
        self._line += run.count
        self.report.entries += run.count
        if self._stops and self._stops[0] == self._edge.size:
            self._check_trusted_inside(self._stops.pop(0))
        return True

    def finish(self) -> VerifyReport:
        if self._header is None:
            raise VerificationFailed(0, "the file is empty or has no header line")
        if not self._ended:
            raise VerificationFailed(self._line, "the export is truncated: no end line")
        return self.report

    # -- entries -----------------------------------------------------------------------------

    def _entries(self, lines: list[bytes]) -> None:
        if self._header is None or self._ended:
            raise VerificationFailed(self._line + 1, "entry outside the header..end lines")
        while lines:
            lo = self._edge.size
            stop = self._stops[0] if self._stops else None
            if stop is not None and stop - lo <= len(lines):
                self._run(lines[:stop - lo])
                lines = lines[stop - lo:]
                self._stops.pop(0)
                self._check_trusted_inside(stop)
            else:
                self._run(lines)
                lines = []

    def _run(self, lines: list[bytes]) -> None:
        """A run of entry lines: the fast path, or the slow one to name a fault."""
        first_line = self._line + 1
        lo = self._edge.size
        count = len(lines)
        leaves = entry_leaves(lines, lo)
        if leaves is None:
            self._explain(lines, first_line)
            raise AssertionError("unreachable")  # pragma: no cover
        span = Span(lo)
        span.extend(leaves)
        for level, node in span.nodes:
            self._edge.push(level, node)
        self._line += count
        self.report.entries += count

    def _explain(self, lines: list[bytes], first_line: int) -> None:
        """Find and report the first bad line of a run that failed the fast checks."""
        index = self._edge.size
        for offset, line in enumerate(lines):
            where = first_line + offset
            try:
                obj = json.loads(line)
                leaf, idx, seq, entry = obj["leaf"], obj["index"], obj["seq"], obj["entry"]
            except (ValueError, KeyError, TypeError):
                raise VerificationFailed(where, "not a well-formed entry line") from None
            if not isinstance(idx, int) or idx != index + offset:
                raise VerificationFailed(where, f"entry index {idx} where {index + offset} was "
                                         "expected: an entry was removed, inserted or moved")
            p = line.find(ENTRY_AT, 98)
            text = line[p + 9:-1] if p > 0 else b""
            if not isinstance(leaf, str) or hashlib.sha256(b"\x00" + text).hexdigest() != leaf:
                raise VerificationFailed(where, f"entry {idx} was altered: its text does not "
                                         "match its leaf hash")
            expected = b'%s%s","index":%d,"seq":%d,"entry":%s}' % (
                ENTRY_PREFIX, leaf.encode(), idx, seq if isinstance(seq, int) else -1, text)
            if line != expected or json.loads(text) != entry:
                raise VerificationFailed(where, f"entry {idx} is not laid out as an export "
                                         "line (edited by hand?)")
        raise VerificationFailed(first_line, "entry run failed verification")  # pragma: no cover

    # -- the other lines -------------------------------------------------------------------

    def _other(self, raw: bytes) -> None:
        self._line += 1
        where = self._line
        try:
            obj = json.loads(raw)
            kind = obj["type"] if isinstance(obj, dict) else None
        except (ValueError, KeyError):
            if not raw.strip() and self._ended:
                return
            raise VerificationFailed(where, "not a JSON object with a type") from None
        if self._header is None and kind != "header":
            raise VerificationFailed(where, "the export does not start with a header line")
        if self._ended:
            raise VerificationFailed(where, "line after the end line")
        try:
            if kind == "header":
                self._on_header(obj, where)
            elif kind == "checkpoint":
                self._on_checkpoint(obj, where)
            elif kind == "consistency":
                self._on_consistency(obj, where)
            elif kind == "end":
                self._on_end(obj, where)
            elif kind == "entry":
                self._explain([raw], where)
            else:
                raise VerificationFailed(where, f"unknown line type {kind!r}")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise VerificationFailed(where, f"malformed {kind} line ({exc})") from None

    def _on_header(self, obj: dict[str, Any], where: int) -> None:
        if self._header is not None:
            raise VerificationFailed(where, "a second header line")
        if obj["format"] != FORMAT:
            raise VerificationFailed(where, f"unknown export format {obj['format']!r}")
        start, end = int(obj["start"]), int(obj["end"])
        frontier = [base64.b64decode(h, validate=True) for h in obj["frontier"]]
        try:
            self._edge = merkle.CompactRange(start, frontier)
        except ValueError as exc:
            raise VerificationFailed(where, f"header frontier: {exc}") from None
        self._header = obj
        self.report.origin, self.report.start, self.report.end = obj["origin"], start, end
        if obj.get("public_key") != str(self.key):
            self.report.notes.append("the header names another public key than the one "
                                     "given; only the given key is trusted")
        if self._trusted_origins - {obj["origin"]}:
            raise VerificationFailed(where, "a trusted checkpoint is for another log origin")
        self._stops = sorted(s for s in self._trusted if start < s <= end)
        if start in self._trusted and self._edge.root() != self._trusted[start]:
            raise VerificationFailed(where, f"the tree at the export's start ({start}) "
                                     "disagrees with the trusted checkpoint of that size")
        if start in self._trusted:
            self.report.trusted_checked.append(start)
        if start == 0:
            self._last = _Signed(0, merkle.EMPTY_ROOT, where)

    def _on_checkpoint(self, obj: dict[str, Any], where: int) -> None:
        size = int(obj["size"])
        try:
            cp = Checkpoint.open(obj["note"], [self.key])
        except NoteError as exc:
            raise VerificationFailed(where, f"checkpoint at size {size}: {exc}") from None
        assert self._header is not None
        if cp.origin != self._header["origin"] or cp.size != size:
            raise VerificationFailed(where, "checkpoint's signed origin or size differ from "
                                     "the line's")
        if cp.size != self._edge.size:
            raise VerificationFailed(where, f"checkpoint at size {cp.size} follows "
                                     f"{self._edge.size} leaves: entries are missing or extra")
        if cp.root_hash != self._edge.root():
            if self._last is None:
                raise VerificationFailed(where, "the header's frontier does not match the "
                                         "start checkpoint")
            raise VerificationFailed(where, f"checkpoint at size {cp.size} does not match "
                                     f"entries {self._last.size}..{cp.size - 1} (lines "
                                     f"{self._last.line + 1}..{where - 1}): one of them was "
                                     "altered, removed, reordered or inserted")
        trusted = self._trusted.get(cp.size)
        if trusted is not None and trusted != cp.root_hash:
            raise VerificationFailed(where, f"the hub signed two different trees of size "
                                     f"{cp.size} (this one and the trusted checkpoint): "
                                     "history was rewritten")
        self._before_last, self._last = self._last, _Signed(cp.size, cp.root_hash, where)
        self.report.checkpoints += 1

    def _on_consistency(self, obj: dict[str, Any], where: int) -> None:
        first, second = int(obj["from"]), int(obj["to"])
        proof = [base64.b64decode(h, validate=True) for h in obj["proof"]]
        if self._last is None or second != self._last.size:
            raise VerificationFailed(where, f"consistency proof to size {second} does not "
                                     "follow that checkpoint")
        first_root = self._trusted.get(first)
        what = "the trusted checkpoint"
        if first_root is None:
            first_root = self._previous_root(first)
            what = "the previous checkpoint"
        if first_root is None:
            self.report.notes.append(f"line {where}: consistency proof from size {first} not "
                                     "checked (no trusted checkpoint of that size given)")
            return
        if not merkle.verify_consistency(first, second, first_root, self._last.root, proof):
            raise VerificationFailed(where, f"consistency proof from size {first} to {second} "
                                     f"fails against {what}: the log's history before size "
                                     f"{first} was rewritten")
        if first in self._trusted and first not in self.report.trusted_checked:
            self.report.trusted_checked.append(first)
        self.report.consistency_proofs += 1

    def _previous_root(self, size: int) -> bytes | None:
        prev = self._before_last
        return prev.root if prev is not None and prev.size == size else None

    def _on_end(self, obj: dict[str, Any], where: int) -> None:
        assert self._header is not None
        end = int(self._header["end"])
        if self._edge.size != end or int(obj["entries"]) != end - self.report.start:
            raise VerificationFailed(where, f"the export ends after leaf {self._edge.size}, "
                                     f"not at {end}: entries are missing or extra")
        if self._last is None or self._last.size != end:
            raise VerificationFailed(where, f"no checkpoint covers the last entries "
                                     f"(up to {end})")
        missing = [s for s in self._trusted if s not in self.report.trusted_checked]
        if missing:
            raise VerificationFailed(where, f"the trusted checkpoint of size {missing[0]} "
                                     "could not be checked: it is outside the export and no "
                                     "consistency proof from it is included (export with "
                                     "--prove-from)")
        self._ended = True

    def _check_trusted_inside(self, size: int) -> None:
        if self._edge.root() != self._trusted[size]:
            raise VerificationFailed(self._line, f"the first {size} entries (up to this line) "
                                     "do not match the trusted checkpoint of that size: "
                                     "history was rewritten")
        self.report.trusted_checked.append(size)


def verify_export(stream: IO[bytes], public_key: str, *, trusted: Sequence[str] = (),
                  progress: Callable[[int], None] | None = None,
                  workers: int | None = None) -> VerifyReport:
    """Verify an export read from ``stream``; raises :class:`VerificationFailed`.
    ``progress(bytes_read)`` is called after each block. A regular file of
    :data:`.scan.PARALLEL_FROM` bytes or more is verified by ``workers`` processes (default:
    one per CPU this process may use); ``workers=1`` keeps to this process."""
    try:
        key = NoteVerifier.parse(public_key)
    except NoteError as exc:
        raise VerificationFailed(0, f"public key: {exc}") from None
    verifier = ExportVerifier(key, trusted)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    plan = plan_chunks(stream, workers, verifier.trusted_sizes)
    if plan is None:
        _feed(verifier, stream, progress, 0)
        return verifier.finish()
    context, tasks = plan
    base = tasks[0].start
    verifier.report.workers = workers
    # The pool is closed and joined, never terminated, even when a fault or an error ends the
    # loop early: Pool.terminate kills workers, and one killed while it hands back a result
    # keeps the result queue's lock, so terminate then waits for it forever (CPython issues
    # 78178 and 96995; it hung a verification of a tampered export). The chunks already
    # handed out, at most ``2 * workers``, are scanned to their end and dropped.
    pool = context.Pool(workers, initializer=freeze_imports)
    try:
        for task, chunk in _in_order(pool, tasks, 2 * workers):
            fault = chunk.fault
            for event in chunk.events:
                if isinstance(event, Run):
                    if not verifier.absorb(event):
                        fault = event.offset
                        break
                else:
                    verifier.feed([event])
            if fault is not None:
                stream.seek(fault)
                _feed(verifier, stream, progress, fault - base)
                return verifier.finish()
            if progress is not None:
                progress(task.end - base)
    finally:
        pool.close()
        pool.join()
    return verifier.finish()


def _in_order(pool: Pool, tasks: list[ChunkTask], ahead: int
              ) -> Iterator[tuple[ChunkTask, Chunk]]:
    """The workers' results in file order, with at most ``ahead`` chunks handed out before
    their turn: memory stays bounded even when this process is the slower one."""
    queue: deque[tuple[ChunkTask, AsyncResult[Chunk]]] = deque()
    for task in tasks:
        queue.append((task, pool.apply_async(scan_chunk, (task,))))
        if len(queue) >= ahead:
            first, result = queue.popleft()
            yield first, result.get()
    while queue:
        first, result = queue.popleft()
        yield first, result.get()


def _feed(verifier: ExportVerifier, stream: IO[bytes], progress: Callable[[int], None] | None,
          done: int) -> None:
    """Verify the rest of ``stream`` in this process, a block at a time."""
    rest = b""
    while block := stream.read(BLOCK):
        done += len(block)
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        verifier.feed(lines)
        if progress is not None:
            progress(done)
    if rest:
        verifier.feed([rest])
