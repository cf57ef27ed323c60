"""Signed notes and checkpoints (C2SP signed-note and tlog-checkpoint).

A *signed note* (https://c2sp.org/signed-note) is UTF-8 text: a body whose lines each end in
a newline, a blank line, then one line per signature::

    — <key name> <base64(4-byte key id || signature)>

With Ed25519 (signature type 0x01) the key id is the first four bytes of
``SHA-256(key name || 0x0A || 0x01 || 32-byte public key)`` and the signature covers the body,
final newline included. The public key is published as a *verifier key*::

    <key name>+<key id as 8 hex digits>+<base64(0x01 || public key)>

A *checkpoint* (https://c2sp.org/tlog-checkpoint) is a note whose body is the log's origin,
the tree size in decimal and the RFC 9162 root hash in base64, each on its own line, then
optional extension lines. This is the format Go's ``golang.org/x/mod/sumdb/note`` and the
transparency-log witnesses read, so a Civitas checkpoint can be checked and cosigned by them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import NoteError

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # em dash, space
MAX_SIGNATURES = 100
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def check_key_name(name: str) -> str:
    """A key name is non-empty and holds no whitespace and no ``+`` (signed-note)."""
    if not name or "+" in name or any(c.isspace() for c in name) or _CONTROL.search(name):
        raise NoteError(f"{name!r} is not a valid note key name (no spaces, no '+')")
    return name


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


@dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 note verifier: the published half of a :class:`NoteSigner`."""

    name: str
    public_key: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.public_key) != 32:
            raise NoteError("an Ed25519 public key is 32 bytes")
        object.__setattr__(self, "key_id", key_id(self.name, self.public_key))

    @classmethod
    def parse(cls, text: str) -> NoteVerifier:
        """Read a verifier key string ``name+hexid+base64key``."""
        parts = text.strip().split("+", 2)  # base64 may itself hold "+"
        if len(parts) != 3:
            raise NoteError("a verifier key reads <name>+<key id>+<base64 key>")
        name, hex_id, b64 = parts
        try:
            raw = base64.b64decode(b64, validate=True)
            want_id = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError) as exc:
            raise NoteError("the verifier key is not valid hex and base64") from exc
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("the verifier key is not an Ed25519 (type 0x01) key")
        verifier = cls(name, raw[1:])
        if verifier.key_id != want_id or len(hex_id) != 8:
            raise NoteError("the verifier key's id does not match its name and key")
        return verifier

    def __str__(self) -> str:
        encoded = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """An Ed25519 note signer (the private key stays in memory, see :mod:`.ledger`)."""

    def __init__(self, name: str, private_key: bytes) -> None:
        self.name = check_key_name(name)
        self._key = Ed25519PrivateKey.from_private_bytes(private_key)
        self.verifier = NoteVerifier(name, self._key.public_key().public_bytes_raw())

    @staticmethod
    def generate_private_key() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes_raw()

    def sign(self, body: str) -> str:
        """The signed note: ``body``, a blank line, this key's signature line."""
        _check_body(body)
        signature = self._key.sign(body.encode())
        encoded = base64.b64encode(self.verifier.key_id + signature).decode()
        return f"{body}\n{SIGNATURE_PREFIX}{self.name} {encoded}\n"


def _check_body(body: str) -> None:
    if not body.endswith("\n") or "\n\n" in body or _CONTROL.search(body):
        raise NoteError("a note body is lines of text, each ending in a newline, none empty")


def open_note(note: str, verifiers: list[NoteVerifier]) -> str:
    """Check ``note`` and return its body: a signature by one of ``verifiers`` must verify.

    Signatures by unknown keys are ignored (signed-note); a signature by a known key that
    does not verify is an error, not merely an absent signature.
    """
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise NoteError("malformed note: no blank line before the signatures")
    body, signatures = note[: split + 1], note[split + 2 :]
    _check_body(body)
    lines = signatures.splitlines()
    if not lines or len(lines) > MAX_SIGNATURES:
        raise NoteError("malformed note: no signature lines")
    known = {(v.name, v.key_id): v for v in verifiers}
    verified = False
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"malformed signature line {line!r}")
        name, _, encoded = line[len(SIGNATURE_PREFIX):].rpartition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise NoteError(f"signature by {name!r} is not base64") from exc
        if len(raw) < 5:
            raise NoteError(f"signature by {name!r} is too short")
        verifier = known.get((name, raw[:4]))
        if verifier is None:
            continue
        if not verifier.verify(body.encode(), raw[4:]):
            raise NoteError(f"the signature by {name} does not verify: the note was altered "
                            "or signed by another key")
        verified = True
    if not verified:
        names = ", ".join(sorted({v.name for v in verifiers})) or "none"
        raise NoteError(f"no signature by a known key ({names}) on this note")
    return body


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: ``origin``, ``size`` and ``root_hash`` (tlog-checkpoint)."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode(),
                 *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has an origin, a size and a root hash line")
        origin, size, root = lines[0], lines[1], lines[2]
        if not origin:
            raise NoteError("checkpoint origin is empty")
        if not size.isdigit() or not size.isascii() or (size != "0" and size[0] == "0"):
            raise NoteError(f"checkpoint size {size!r} is not a decimal number")
        try:
            root_hash = base64.b64decode(root, validate=True)
        except binascii.Error as exc:
            raise NoteError("checkpoint root hash is not base64") from exc
        if len(root_hash) != 32:
            raise NoteError("checkpoint root hash is not 32 bytes")
        return cls(origin, int(size), root_hash, tuple(lines[3:-1]))

    @classmethod
    def open(cls, note: str, verifiers: list[NoteVerifier]) -> Checkpoint:
        """Verify a signed checkpoint note and read it."""
        return cls.parse(open_note(note, verifiers))
