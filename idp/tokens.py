"""Authorization codes and access tokens in the short-lived store.

Codes (RFC 6749 4.1.2): single use by an atomic take, bound to client, redirect URI and PKCE
challenge, 60 s by default. A second redemption of a code is refused and revokes every token
issued from it (RFC 6749 10.5): tokens carry the hash of their code, and a reuse marks that
hash revoked. The marker that a code was issued is written with the code, so a reuse that
races the first redemption is still recognised. Only hashes of codes and tokens are used as
keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kernel.store import ShortLivedStore


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class AuthorizationCode:
    """Authlib's AuthorizationCodeMixin, as an immutable record."""

    code_hash: str
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str
    code_challenge_method: str
    account_id: str
    auth_time: int
    acr: str
    amr: tuple[str, ...]
    sid: str

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> str:
        return self.acr

    def get_amr(self) -> list[str]:
        return list(self.amr)


@dataclass(frozen=True)
class AccessToken:
    client_id: str
    account_id: str
    scope: str
    expires_at: int
    code_hash: str | None


class TokenStore:
    def __init__(self, store: ShortLivedStore, *, code_lifetime: int,
                 access_token_lifetime: int) -> None:
        self._store = store
        self.code_lifetime = code_lifetime
        self.access_token_lifetime = access_token_lifetime

    # -- codes ----------------------------------------------------------------------------

    def save_code(self, code: str, record: dict[str, Any]) -> None:
        code_hash = digest(code)
        # Written first and kept as long as any token from the code can live.
        self._store.put("code-issued:" + code_hash, {"at": int(time.time())},
                        max(self.code_lifetime, self.access_token_lifetime))
        self._store.put("code:" + code_hash, record, self.code_lifetime)

    def take_code(self, code: str) -> AuthorizationCode | None:
        """Atomically take a code. A second take of a known code revokes its tokens."""
        code_hash = digest(code)
        record = self._store.take("code:" + code_hash)
        if record is None:
            if self._store.get("code-issued:" + code_hash) is not None:
                # A code we issued, presented again (or after expiry): whatever was issued
                # from it is revoked.
                self._store.put("code-revoked:" + code_hash, {"at": int(time.time())},
                                self.access_token_lifetime)
            return None
        record["amr"] = tuple(record.get("amr", ()))
        return AuthorizationCode(code_hash=code_hash, **record)

    # -- access tokens --------------------------------------------------------------------

    def issue_access_token(self, *, client_id: str, account_id: str, scope: str,
                           code_hash: str | None) -> str:
        token = secrets.token_urlsafe(32)
        expires_at = int(time.time()) + self.access_token_lifetime
        self._store.put("at:" + digest(token), {
            "client_id": client_id, "account_id": account_id, "scope": scope,
            "expires_at": expires_at, "code_hash": code_hash,
        }, self.access_token_lifetime)
        return token

    def access_token(self, token: str) -> AccessToken | None:
        record = self._store.get("at:" + digest(token))
        if record is None or record["expires_at"] <= time.time():
            return None
        code_hash = record.get("code_hash")
        if code_hash and self._store.get("code-revoked:" + code_hash) is not None:
            return None
        return AccessToken(**record)

    # -- nonces ---------------------------------------------------------------------------

    def nonce_seen(self, client_id: str, nonce: str) -> bool:
        return self._store.get(f"nonce:{client_id}:{digest(nonce)}") is not None

    def remember_nonce(self, client_id: str, nonce: str, ttl: int) -> None:
        self._store.put(f"nonce:{client_id}:{digest(nonce)}", {}, ttl)
