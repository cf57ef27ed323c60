"""The ledger's bulk hashing (consent/ledger/hashing.py): the compiled core and its hashlib
fallback give RFC 9162 2.1.1 hashes, the same results and the same errors."""

from __future__ import annotations

import hashlib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consent.ledger import hashing, merkle

IMPLEMENTATIONS = {"hashlib": (hashing.py_leaf_hashes, hashing.py_perfect_root)}
if hashing.COMPILED:
    from consent.ledger import _hashing

    IMPLEMENTATIONS["compiled"] = (_hashing.leaf_hashes, _hashing.perfect_root)


def test_the_compiled_core_is_built_here():
    """scripts/test installs a C compiler and OpenSSL's headers (ensure-system-deps), so the
    suite and the bench run the compiled core; a silent fallback would only be slower."""
    assert hashing.COMPILED, "consent/ledger/_hashing.c was not built: see setup.py"
    assert hashing.leaf_hashes is IMPLEMENTATIONS["compiled"][0]


def rfc9162_mth(hashes: list[bytes]) -> bytes:
    """MTH by its definition (2.1.1), over already hashed leaves."""
    if len(hashes) == 1:
        return hashes[0]
    k = 1 << ((len(hashes) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + rfc9162_mth(hashes[:k]) + rfc9162_mth(hashes[k:])).digest()


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.binary(max_size=600), max_size=150))
def test_leaf_hashes_are_rfc9162_leaves(name, entries):
    leaf_hashes, _ = IMPLEMENTATIONS[name]
    assert leaf_hashes(entries) == [hashlib.sha256(b"\x00" + e).digest() for e in entries]
    assert leaf_hashes(tuple(entries)) == leaf_hashes(entries)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@settings(max_examples=100, deadline=None)
@given(level=st.integers(0, 8), data=st.data())
def test_perfect_root_is_the_mth(name, level, data):
    _, perfect_root = IMPLEMENTATIONS[name]
    hashes = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=1 << level,
                                max_size=1 << level))
    assert perfect_root(hashes) == rfc9162_mth(hashes)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_perfect_root_of_other_lengths_hashes_the_concatenation(name):
    """Hashes read from a damaged database may not be 32 bytes: the root is then that of
    the concatenation (a mismatch for the caller to report), never a crash."""
    _, perfect_root = IMPLEMENTATIONS[name]
    odd = [b"", b"a", b"x" * 31, b"y" * 33]
    assert perfect_root(odd) == rfc9162_mth(odd)
    assert perfect_root([b"abc"]) == b"abc"


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_bad_input_is_refused_with_a_python_error(name):
    leaf_hashes, perfect_root = IMPLEMENTATIONS[name]
    for count in (0, 3, 6, 100):
        with pytest.raises(ValueError, match="power-of-two"):
            perfect_root([bytes(32)] * count)
    for bad in ("text", bytearray(b"x"), memoryview(b"x"), None, 7):
        with pytest.raises(TypeError, match="not bytes"):
            leaf_hashes([b"ok", bad])
        with pytest.raises(TypeError, match="not bytes"):
            perfect_root([bytes(32), bad])
    with pytest.raises(TypeError):
        leaf_hashes(None)


def test_the_same_results_from_many_threads_at_once():
    """Large batches hash without the GIL: threads run them side by side, each getting its
    own answers."""
    batches = [[b"%d-%d" % (t, i) * 20 for i in range(5000)] for t in range(4)]
    expected = [[merkle.leaf_hash(e) for e in batch] for batch in batches]
    roots = [hashing.perfect_root(leaves[:4096]) for leaves in expected]
    results: dict[int, tuple[list[bytes], bytes]] = {}

    def work(t: int) -> None:
        for _ in range(5):
            leaves = hashing.leaf_hashes(batches[t])
            results[t] = (leaves, hashing.perfect_root(leaves[:4096]))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[t] for t in range(4)] == list(zip(expected, roots, strict=True))
