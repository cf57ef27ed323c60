"""Encryption of personal attributes and private keys at rest (Fernet: AES-128-CBC + HMAC).

The key comes from settings (``encryption_key``); several keys may be given, newest first, so
the operator can rotate: data is decrypted with any of them and written with the first.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import CivitasError


class DecryptionError(CivitasError):
    public_message = "Stored data could not be decrypted."


class FieldCipher:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise DecryptionError() from exc

    @staticmethod
    def generate_key() -> str:
        return Fernet.generate_key().decode()
