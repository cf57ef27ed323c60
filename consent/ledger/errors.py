"""The ledger's errors: one subclass of the hub's root (STYLE.md 5)."""

from __future__ import annotations

from kernel.errors import CivitasError


class LedgerError(CivitasError):
    status_code = 500
    public_message = "The audit ledger could not complete this operation."


class PersonalDataRefused(LedgerError):
    """An entry looked like it carried personal data in clear."""

    status_code = 500


class NoteError(LedgerError):
    """A signed note or checkpoint is malformed or its signature does not verify."""


class VerificationFailed(LedgerError):
    """An export failed offline verification; ``line`` is the first line at fault
    (1-based; 0 when the file as a whole is at fault)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.reason = message
