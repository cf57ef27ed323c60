"""The hot loop of offline verification: entry lines to leaf hashes to subtree roots.

An export's entry lines are nearly all of its bytes, and verifying them costs two SHA-256 per
entry (the leaf, RFC 9162 2.1.1, and on average one interior node). Both are done a list at a
time (:mod:`.hashing`: one C call per block where the compiled core is built), so everything
else done per line has to stay a few C calls too: a block is split once, each step is one
list comprehension over its lines, and the layout of every line is checked by comparing one
joined slice of all the lines with the text the export would have written
(:func:`entry_leaves`). Anything unexpected makes the fast
check fail as a whole; the caller then reruns the lines one by one to name the first bad one
(:meth:`.verify.ExportVerifier.feed`).

Large files are verified in parallel (:func:`scan_chunk`): each worker process reads its own
byte range of the file (whole lines), checks its entries and reduces them to the roots of the
aligned perfect subtrees that cover them (:class:`Span`, RFC 9162 2.1: the tree over
``[0, n)`` is built from exactly such subtrees). The parent folds those roots into the tree's
right edge in file order and handles the few other lines (checkpoints, proofs) itself, so the
result and every error are those of a sequential pass. Memory stays bounded: a worker holds
one block of lines and ``O(log n)`` hashes.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import stat
import threading
from binascii import hexlify
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from multiprocessing.context import BaseContext
from typing import IO

from . import merkle
from .export import ENTRY_PREFIX
from .hashing import leaf_hashes, perfect_root

ENTRY_AT = b',"entry":'
#: an entry line up to its ``seq`` value, as :mod:`.export` writes it
_HEAD = b'{"type":"entry","leaf":"%s","index":%d,"seq":'
_HEAD_SIZE = len(_HEAD) - 4 + 64  # without the index digits
_INDEX_AT = len(ENTRY_PREFIX) + 64 + len(b'","index":')
BLOCK = 1 << 19
#: files smaller than this are verified in the calling process alone
PARALLEL_FROM = 16 << 20
#: the byte range a worker process takes at a time
CHUNK = 8 << 20


def entry_leaves(lines: Sequence[bytes], first: int) -> list[bytes] | None:
    """The leaf hashes of ``lines`` if each is an entry line laid out exactly as the export
    writes it (:func:`.export.export_ledger`), with leaf indices ``first``, ``first + 1``, ...
    and a ``leaf`` that is the hash of its ``entry`` text; ``None`` if any line is not."""
    leaves: list[bytes] = []
    done, count = 0, len(lines)
    while done < count:  # one pass per number of digits of the index
        lo = first + done
        digits = len(str(lo))
        n = min(count - done, 10 ** digits - lo)
        part = lines[done:done + n] if n < count else lines
        r = _HEAD_SIZE + digits
        at = [line.find(ENTRY_AT, r) for line in part]
        if -1 in at:
            return None
        got = leaf_hashes([line[p + 9:-1] for line, p in zip(part, at, strict=True)])
        args: list[object] = [None] * (2 * n)
        args[0::2] = map(hexlify, got)
        args[1::2] = range(lo, lo + n)
        seqs = [line[r:p] for line, p in zip(part, at, strict=True)]
        if (b"".join([line[:r] for line in part]) != (_HEAD * n) % tuple(args)
                or not all(seqs) or not b"".join(seqs).isdigit()
                or bytes([line[-1] for line in part]) != b"}" * n):
            return None
        if n == count:
            return got
        leaves += got
        done += n
    return leaves


def claimed_index(line: bytes) -> int | None:
    """The ``index`` an entry line claims (where a worker's first run starts), if legible."""
    end = line.find(b",", _INDEX_AT)
    digits = line[_INDEX_AT:end]
    return int(digits) if end > 0 and digits.isdigit() else None


class Span:
    """Leaves ``[begin, end)`` as the roots of the maximal aligned perfect subtrees that
    cover them, left to right (:func:`merkle.aligned_blocks` of the range, hashed): a
    :class:`merkle.CompactRange` that need not start at leaf 0. A compact range of size
    ``begin`` reaches ``end`` by pushing these roots in order."""

    __slots__ = ("begin", "end", "nodes")

    def __init__(self, begin: int) -> None:
        self.begin = self.end = begin
        self.nodes: list[tuple[int, bytes]] = []

    def extend(self, leaves: Sequence[bytes]) -> None:
        lo = self.end
        for level, start in merkle.aligned_blocks(lo, lo + len(leaves)):
            self._push(level, perfect_root(leaves[start - lo:start - lo + (1 << level)]))

    def _push(self, level: int, node: bytes) -> None:
        index = self.end >> level
        self.end += 1 << level
        nodes = self.nodes
        while index & 1 and nodes and nodes[-1][0] == level:  # its left sibling is here
            node = hashlib.sha256(b"\x01" + nodes.pop()[1] + node).digest()
            level += 1
            index >>= 1
        nodes.append((level, node))


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive entry lines a worker verified: ``count`` leaves from ``first`` on, as
    aligned subtree roots; ``offset`` is the byte offset of the first line."""

    offset: int
    first: int
    count: int
    nodes: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Chunk:
    """What a worker found in its byte range, in file order: runs of entries and the other
    lines (raw). ``fault`` is the offset of the first line the fast checks did not accept
    (``None`` if they accepted the whole range): the caller verifies from there line by line."""

    events: list[Run | bytes]
    fault: int | None


@dataclass(frozen=True, slots=True)
class ChunkTask:
    fd: int  # the caller's descriptor, inherited by a forked worker
    path: str | None  # else the file's name
    start: int
    end: int
    stops: tuple[int, ...]  # leaf counts at which a run must end (trusted checkpoints)


class _Scanner:
    """The state of one worker over its range; see :func:`scan_chunk`."""

    def __init__(self, stops: tuple[int, ...]) -> None:
        self.stops = stops
        self.events: list[Run | bytes] = []
        self.span: Span | None = None
        self.offset = 0
        self.count = 0
        self.next_index: int | None = None

    def close(self) -> None:
        span = self.span
        if span is not None and self.count:
            self.events.append(Run(self.offset, span.begin, self.count, tuple(span.nodes)))
            self.next_index = span.end
        self.span = None

    def block(self, lines: list[bytes], offset: int) -> int | None:
        """Complete lines from byte ``offset`` on; the offset of a fault, if any. The lines
        are taken for entries first: other lines are rare (a checkpoint every so often)."""
        done = self.entries(lines, offset)
        while done < len(lines):
            offset += sum(map(len, lines[:done])) + done
            lines = lines[done:]
            if lines[0].startswith(ENTRY_PREFIX):  # refused, or cut short by another line
                is_entry = list(map(bytes.startswith, lines, repeat(ENTRY_PREFIX)))
                if all(is_entry):
                    return offset
                n = is_entry.index(False)
                done = self.entries(lines[:n], offset)
                if done < n:
                    return offset + sum(map(len, lines[:done])) + done
            else:
                self.close()
                self.events.append(lines[0])
                done = 1 + self.entries(lines[1:], offset + len(lines[0]) + 1)
        return None

    def entries(self, lines: list[bytes], offset: int) -> int:
        """Take entry lines from the first (at byte ``offset``) until one the fast checks
        refuse; how many were taken."""
        done = 0
        while done < len(lines):
            span = self.span
            if span is None:
                first = self.next_index
                if first is None:
                    first = claimed_index(lines[done])
                    if first is None:
                        return done
                span = self.span = Span(first)
                self.offset = offset + sum(map(len, lines[:done])) + done
                self.count = 0
            take = len(lines) - done
            for stop in self.stops:
                if span.end < stop < span.end + take:
                    take = stop - span.end
                    break
            part = lines[done:done + take] if take < len(lines) else lines
            leaves = entry_leaves(part, span.end)
            if leaves is None:
                self.close()
                return done
            span.extend(leaves)
            self.count += take
            done += take
            if span.end in self.stops:
                self.close()
        return done


def freeze_imports() -> None:
    """A worker's start: the objects it was forked with (or imported) are left out of the
    garbage collector's full passes, which would otherwise walk them again and again; the
    scan itself makes no reference cycles."""
    gc.freeze()


def scan_chunk(task: ChunkTask) -> Chunk:
    """Verify the entry lines in bytes ``[start, end)`` of the export (whole lines), in a
    worker process: the file is read with ``pread`` a block at a time."""
    fd = task.fd if task.path is None else os.open(task.path, os.O_RDONLY)
    try:
        return _scan(fd, task)
    finally:
        if task.path is not None:
            os.close(fd)


def _scan(fd: int, task: ChunkTask) -> Chunk:
    scanner = _Scanner(task.stops)
    pos, end, want = task.start, task.end, BLOCK
    while pos < end:
        data = os.pread(fd, min(want, end - pos), pos)
        if not data:  # the file is shorter than it was: let the sequential pass say so
            scanner.close()
            return Chunk(scanner.events, pos)
        lines = data.split(b"\n")
        size = len(data)
        if pos + size < end:  # the last line continues in the next block
            size -= len(lines.pop())
            if not lines:
                want *= 2  # a line longer than a block
                continue
        elif lines[-1] == b"" and len(lines) > 1:
            lines.pop()  # the range ends with a newline
        fault = scanner.block(lines, pos)
        if fault is not None:
            scanner.close()
            return Chunk(scanner.events, fault)
        pos += size
        want = BLOCK
    scanner.close()
    return Chunk(scanner.events, None)


def plan_chunks(stream: IO[bytes], workers: int, stops: tuple[int, ...]
                ) -> tuple[BaseContext, list[ChunkTask]] | None:
    """How to start the workers and the byte ranges (whole lines) they take, from the
    stream's position to its end; None to verify in this process: a stream that is not a
    regular file, a small file, a single worker."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        start = stream.tell()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None
    size = info.st_size
    if (workers < 2 or not stat.S_ISREG(info.st_mode) or size - start < PARALLEL_FROM
            or not hasattr(os, "pread") or multiprocessing.current_process().daemon):
        return None  # (a daemonic process, a pool's worker, may not start processes)
    context = _context()
    path = None
    if context.get_start_method() != "fork":  # the workers open the file by its name
        name = getattr(stream, "name", None)
        if not isinstance(name, str) or not _same_file(name, info):
            return None
        path = name
    bounds = [start]
    while bounds[-1] < size:  # shorter ranges towards the end: the workers finish together
        at = bounds[-1] + min(CHUNK, max(CHUNK // 16, (size - bounds[-1]) // (2 * workers)))
        while at < size:  # move to the start of the next line
            tail = os.pread(fd, 1 << 16, at - 1)
            newline = tail.find(b"\n")
            if newline >= 0 or not tail:
                at = at + newline if tail else size
                break
            at += len(tail)
        bounds.append(min(at, size))
    pairs = zip(bounds, bounds[1:], strict=False)
    return context, [ChunkTask(fd, path, a, b, stops) for a, b in pairs]


def _same_file(path: str, info: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino)


def _context() -> BaseContext:
    """Forking is the cheapest start (nothing to import again) and safe in a process with one
    thread, like the command line's; with other threads running, workers come from a fork
    server (or are spawned where there is none)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
