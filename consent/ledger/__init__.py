"""The audit ledger: canonical JSON entries (RFC 8785) as leaves of an RFC 9162 Merkle tree,
signed checkpoints (C2SP signed-note), inclusion and consistency proofs, offline export and
verification. See :mod:`consent.ledger.ledger` for the write path and the sealer."""

from __future__ import annotations

from . import merkle
from .errors import LedgerError, NoteError, PersonalDataRefused, VerificationFailed
from .ledger import KINDS, Ledger, SignedCheckpoint, hashed_id
from .models import LedgerCheckpoint, LedgerEntry, LedgerKey, LedgerNode
from .note import Checkpoint, NoteSigner, NoteVerifier
from .sealer import LedgerSealer

__all__ = [
    "KINDS", "Checkpoint", "Ledger", "LedgerCheckpoint", "LedgerEntry", "LedgerError",
    "LedgerKey", "LedgerNode", "LedgerSealer", "NoteError", "NoteSigner", "NoteVerifier",
    "PersonalDataRefused", "SignedCheckpoint", "VerificationFailed", "hashed_id", "merkle",
]
