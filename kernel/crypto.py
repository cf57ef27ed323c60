"""Encryption of personal attributes and private keys at rest.

The keys come from settings (``encryption_key``): Fernet keys (32 random bytes, url-safe
base64), newest first, so the operator can rotate: data is decrypted with any of them and
written with the first.

Values are written as AES-256-GCM-SIV (RFC 8452), ``v2.`` followed by the url-safe base64 of a
key id (4 bytes), a random nonce (12 bytes) and the ciphertext with its 16-byte tag. The
AES key and the key id are derived from each configured key with HKDF-SHA256 (RFC 5869), under
labels of their own. GCM-SIV is chosen over plain GCM because its nonces are random here, from
many processes and hosts with no shared counter: a repeated nonce under GCM gives away the
authentication key, under GCM-SIV only whether the same value was written twice (RFC 8452
section 9). Values written before (Fernet tokens: AES-128-CBC + HMAC-SHA256, which cost
about two and a half times as much CPU to decrypt) are still read, with the same keys; they are
rewritten as ``v2.`` the next time their owner's upstream sends them, or all at once by
``civitas secrets reencrypt`` (:mod:`kernel.reencrypt`), after which only the first key is
needed.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import CivitasError

PREFIX = "v2."
_KEY_ID = 4
_NONCE = 12
_TAG = 16
#: bound to every value as associated data, with its key id: a value cannot be taken for
#: one written by another scheme or key
_AAD = b"civitas/field/v2/"


class DecryptionError(CivitasError):
    public_message = "Stored data could not be decrypted."


def _aad(context: bytes, key_id: bytes) -> bytes:
    """The associated data of a value: the scheme, what it is for (nothing for a stored
    attribute, as before contexts existed) and its key id."""
    return _AAD + (context + b"/" if context else b"") + key_id


def _derive(key: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=b"civitas/field-cipher/v2/" + label).derive(key)


def _aead(key: bytes) -> tuple[bytes, AESGCMSIV]:
    """A configured key's id and its AES-256-GCM-SIV cipher."""
    try:
        aead = AESGCMSIV(_derive(key, b"aes-256-gcm-siv", 32))
    except UnsupportedAlgorithm as exc:  # OpenSSL before 3.2
        raise RuntimeError(
            "this build of 'cryptography' has no AES-GCM-SIV (it needs OpenSSL 3.2 or later); "
            "install the wheel from PyPI, which bundles one") from exc
    return _derive(key, b"key-id", _KEY_ID), aead


@dataclass(frozen=True)
class WrittenWith:
    """How a stored value was written: ``scheme`` ``"v2"`` (AES-256-GCM-SIV) or ``"fernet"``
    (before it), under the configured key at index ``key`` (0: the first, which writes)."""

    scheme: str
    key: int

    @property
    def current(self) -> bool:
        """Written as the hub writes values now: nothing to rewrite."""
        return self.scheme == "v2" and self.key == 0


class FieldCipher:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self._fernets = [Fernet(k.encode()) for k in keys]
        self._fernet = MultiFernet(self._fernets)
        derived = [_aead(base64.urlsafe_b64decode(k.encode())) for k in keys]
        #: values are written with the first key and read with any
        self._write = derived[0]
        self._by_id: dict[bytes, AESGCMSIV] = {}
        #: a key id's index among the configured keys (the first, if a key is listed twice)
        self._index: dict[bytes, int] = {}
        for index, (key_id, aead) in enumerate(derived):
            self._by_id.setdefault(key_id, aead)
            self._index.setdefault(key_id, index)

    def encrypt(self, plaintext: str, *, context: bytes = b"") -> str:
        """``context``: what the value is for, bound to it (as associated data), so that a
        value written for one use is refused for another (a stored attribute's is empty)."""
        key_id, aead = self._write
        nonce = os.urandom(_NONCE)
        sealed = aead.encrypt(nonce, plaintext.encode(), _aad(context, key_id))
        return PREFIX + base64.urlsafe_b64encode(key_id + nonce + sealed).rstrip(b"=").decode()

    def decrypt(self, token: str, *, context: bytes = b"") -> str:
        if not token.startswith(PREFIX):
            if context:
                raise DecryptionError()  # only stored attributes were ever Fernet tokens
            try:  # written before the second version: a Fernet token
                return self._fernet.decrypt(token.encode()).decode()
            except InvalidToken as exc:
                raise DecryptionError() from exc
        return self._open(token, context)[1]

    def _open(self, token: str, context: bytes = b"") -> tuple[bytes, str]:
        """A ``v2.`` value's key id and plaintext; :class:`DecryptionError` if no configured
        key opens it (or it was written for another ``context``)."""
        body = token[len(PREFIX):]
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError) as exc:
            raise DecryptionError() from exc
        key_id = blob[:_KEY_ID]
        aead = self._by_id.get(key_id)
        if aead is None or len(blob) < _KEY_ID + _NONCE + _TAG:
            raise DecryptionError()  # a key no longer configured, or a cut value
        nonce = blob[_KEY_ID:_KEY_ID + _NONCE]
        try:
            return key_id, aead.decrypt(nonce, blob[_KEY_ID + _NONCE:],
                                        _aad(context, key_id)).decode()
        except (InvalidTag, UnicodeDecodeError) as exc:
            raise DecryptionError() from exc

    def inspect(self, token: str) -> tuple[str, WrittenWith]:
        """The plaintext of a stored value and how it was written. Raises
        :class:`DecryptionError` as :meth:`decrypt` does. Slower than :meth:`decrypt` for
        Fernet values (each key is tried in turn): for maintenance, not for requests."""
        if token.startswith(PREFIX):
            key_id, plaintext = self._open(token)
            return plaintext, WrittenWith("v2", self._index[key_id])
        for index, fernet in enumerate(self._fernets):
            try:
                return fernet.decrypt(token.encode()).decode(), WrittenWith("fernet", index)
            except InvalidToken:
                continue
        raise DecryptionError()

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode()
