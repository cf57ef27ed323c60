"""RFC 9162 (2.1.1) hashing in bulk: the leaf hashes of many entries, the root of a perfect
subtree. Offline verification spends nearly all its time here (:mod:`.scan`).

The compiled core (``_hashing.c``, built by ``pip install`` where a C compiler, OpenSSL's
headers and Python's are present) loops over a whole list in C with one OpenSSL context;
without it the same functions run on :mod:`hashlib`, with the same results and errors, about
1.5 times slower per entry (bench/README.md). ``COMPILED`` tells which one is in use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: SHA-256 with the leaf and node prefixes absorbed: a copy of one of these costs less than
#: a new hash object (no algorithm lookup) and saves a concatenation
_LEAF = hashlib.sha256(b"\x00")
_NODE = hashlib.sha256(b"\x01")


def py_leaf_hashes(entries: Sequence[bytes]) -> list[bytes]:
    """``[SHA-256(0x00 || e) for e in entries]``."""
    leaf = _LEAF.copy
    for i, entry in enumerate(entries):
        if not isinstance(entry, bytes):
            raise TypeError(f"entry {i} is {type(entry).__name__}, not bytes")
    return [(h := leaf()).update(e) or h.digest()  # type: ignore[func-returns-value]
            for e in entries]


def py_perfect_root(hashes: Sequence[bytes]) -> bytes:
    """MTH of a perfect subtree (``len`` a power of two), one level at a time."""
    level = list(hashes)
    if not level or len(level) & (len(level) - 1):
        raise ValueError("a perfect subtree has a power-of-two number of leaves")
    for i, digest in enumerate(level):
        if not isinstance(digest, bytes):
            raise TypeError(f"hash {i} is {type(digest).__name__}, not bytes")
    node = _NODE.copy
    while len(level) > 1:
        pairs = iter(level)
        level = [(h := node()).update(a + b) or h.digest()  # type: ignore[func-returns-value]
                 for a, b in zip(pairs, pairs, strict=True)]
    return level[0]


try:
    from ._hashing import leaf_hashes, perfect_root
    COMPILED = True
except ImportError:  # not built here: no compiler, or no OpenSSL headers, at install time
    leaf_hashes, perfect_root = py_leaf_hashes, py_perfect_root
    COMPILED = False

__all__ = ["COMPILED", "leaf_hashes", "perfect_root", "py_leaf_hashes", "py_perfect_root"]
