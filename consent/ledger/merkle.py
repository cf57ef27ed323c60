"""Merkle tree hashing, inclusion and consistency proofs (RFC 9162 section 2.1).

Leaves are hashed ``SHA-256(0x00 || entry)`` and interior nodes ``SHA-256(0x01 || left ||
right)`` (2.1.1), so a leaf can never pass for a node. The tree over ``n`` leaves splits at
``k``, the largest power of two below ``n``; every left subtree is therefore *perfect* and
*aligned* (its size is a power of two, ``2**level``, and it starts at a multiple of its size).

Proof generation (2.1.3.1 PATH, 2.1.4.1 SUBPROOF) needs the hashes of subtrees; it asks a
``subtree(lo, hi)`` callable for them, so the same code serves a list in memory and the
database (which keeps the hashes of large perfect subtrees, see :mod:`.ledger`). Verification
(2.1.3.2, 2.1.4.2) needs nothing but the proof.

:class:`CompactRange` is the tree's right edge: the roots of the perfect subtrees that cover
``[0, size)``, at most one per level. Appending a leaf costs one hash on average, and the root
of the whole tree is a fold of at most 64 hashes, so sealing ``N`` new entries costs ``O(N)``
and verifying an export of any length takes constant memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from . import hashing

HASH_SIZE = 32
#: MTH({}): the hash of an empty string (2.1.1)
EMPTY_ROOT = hashlib.sha256(b"").digest()

Subtree = Callable[[int, int], bytes]
"""``subtree(lo, hi)`` returns MTH of the leaves ``lo .. hi-1`` (``lo < hi``)."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """``k``: the largest power of two smaller than ``n`` (``n > 1``)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a perfect subtree (``len`` a power of two); ValueError otherwise."""
    return hashing.perfect_root(leaf_hashes)


def aligned_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into maximal aligned perfect subtrees, left to right, as
    ``(level, start)``: what a :class:`CompactRange` at ``lo`` absorbs to reach ``hi``."""
    blocks = []
    while lo < hi:
        level = (lo & -lo).bit_length() - 1 if lo else 64
        while (1 << level) > hi - lo:
            level -= 1
        blocks.append((level, lo))
        lo += 1 << level
    return blocks


class CompactRange:
    """The right edge of a tree of ``size`` leaves: one perfect-subtree root per set bit of
    ``size``, largest first. ``on_node(level, index, hash)``, when given, sees every perfect
    subtree root the range creates (index = start // 2**level)."""

    __slots__ = ("size", "_hashes", "_on_node")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = (),
                 on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError(f"a range of size {size} has {size.bit_count()} hashes, "
                             f"not {len(hashes)}")
        self.size = size
        self._hashes = list(hashes)
        self._on_node = on_node

    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self._hashes, self._on_node)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash."""
        self.push(0, leaf)

    def push(self, level: int, root: bytes) -> None:
        """Add the root of a perfect subtree of ``2**level`` leaves starting at ``size``."""
        size = self.size
        if size & ((1 << level) - 1):
            raise ValueError(f"a subtree of 2**{level} leaves cannot start at {size}")
        self.size = size + (1 << level)
        hashes = self._hashes
        on_node = self._on_node
        node = root
        index = size >> level
        if on_node is not None and level:
            on_node(level, index, node)
        while index & 1:  # the left sibling is the last hash on the edge
            node = hashlib.sha256(b"\x01" + hashes.pop() + node).digest()
            level += 1
            index >>= 1
            if on_node is not None:
                on_node(level, index, node)
        hashes.append(node)

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.push(0, leaf)

    def root(self) -> bytes:
        """MTH of the whole range ``[0, size)``."""
        hashes = self._hashes
        if not hashes:
            return EMPTY_ROOT
        node = hashes[-1]
        for left in reversed(hashes[:-1]):
            node = hashlib.sha256(b"\x01" + left + node).digest()
        return node


# -- proofs (RFC 9162 2.1.3.1 and 2.1.4.1) -----------------------------------------------------

def inclusion_proof(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(index, D[size]): the sibling subtree hashes from the leaf up to the root."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(first: int, second: int, subtree: Subtree) -> list[bytes]:
    """PROOF(first, D[second]) = SUBPROOF(first, D[second], true)."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    lo, hi, m, complete = 0, second, first, True
    while m != hi - lo:
        k = split_point(hi - lo)
        if m <= k:
            proof.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree(lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(subtree(lo, hi))
    proof.reverse()
    return proof


# -- verification (RFC 9162 2.1.3.2 and 2.1.4.2) ----------------------------------------------

def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` yields for ``leaf`` at ``index``; ValueError if the proof
    has the wrong shape for that position."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ValueError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes],
                     root: bytes) -> bool:
    try:
        return root_from_inclusion(index, size, leaf, proof) == root
    except ValueError:
        return False


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """True if the tree of ``second`` leaves with ``second_root`` extends the tree of
    ``first`` leaves with ``first_root`` (2.1.4.2)."""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
