"""The hub's signing keys: generated on first start, stored encrypted, parsed once per process.

The JWKS publishes every key that is not past ``retire_after`` (next, current and retired),
so a rotation never breaks a verifier. The key ring re-reads the table at most every
``reload_seconds`` (a cheap query) so every worker sees a rotation without a restart, and
sooner when asked to verify a token signed with a key it has not loaded
(:meth:`KeyRing.verifying_keyset`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey, KeySet, RSAKey
from joserfc.util import json_b64encode, urlsafe_b64encode
from sqlalchemy import select

from kernel import jsonfast
from kernel.crypto import FieldCipher
from kernel.db import Database, utcnow

from .models import SigningKey

#: PS256 (RSASSA-PSS, RFC 7518 3.5) gets its own RSA key rather than sharing the RS256 one:
#: one key, one algorithm
SUPPORTED_ALGS = ("ES256", "RS256", "PS256")
#: how long a verifier may keep the JWKS it fetched (its ``Cache-Control: max-age``): a new
#: key published for less than this may be unknown to one that does not fetch again on an
#: unknown ``kid``
JWKS_MAX_AGE_SECONDS = 300


def _signer(alg: str, key: ECKey | RSAKey) -> Callable[[bytes], bytes]:
    """The JWS signature (RFC 7518 3.1) of a signing input with ``key``, made by
    ``cryptography`` as joserfc's algorithms make it: ES256 as the 32-byte R and S
    concatenated (3.4), RS256 with PKCS #1 v1.5 (3.3), PS256 with PSS, MGF1 and a salt as
    long as the hash (3.5). tests/test_signing.py verifies each with joserfc and python-jose."""
    private = key.private_key
    if private is None:
        raise ValueError(f"key {key.kid} has no private part")
    if alg == "ES256" and isinstance(private, ec.EllipticCurvePrivateKey) \
            and isinstance(private.curve, ec.SECP256R1):
        ec_key, ecdsa = private, ec.ECDSA(hashes.SHA256())

        def es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return es256
    if alg in ("RS256", "PS256") and isinstance(private, rsa.RSAPrivateKey):
        rsa_key, sha256 = private, hashes.SHA256()
        scheme: padding.AsymmetricPadding = padding.PKCS1v15() if alg == "RS256" else \
            padding.PSS(mgf=padding.MGF1(sha256), salt_length=sha256.digest_size)
        return lambda data: rsa_key.sign(data, scheme, sha256)
    raise ValueError(f"unsupported signing algorithm {alg} for key {key.kid}")


#: the header parameters the hub's JWTs carry (RFC 7515 4.1.1, 4.1.4, 4.1.9)
_HEADER_NAMES = frozenset({"alg", "kid", "typ"})


@dataclass(frozen=True)
class ActiveKey:
    kid: str
    alg: str
    key: ECKey | RSAKey
    _sign: Callable[[bytes], bytes] = field(init=False, repr=False, compare=False)
    #: each header's encoded segment, made once: a key signs with two or three headers
    _headers: dict[tuple[tuple[str, str], ...], bytes] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sign", _signer(self.alg, self.key))

    def sign_jwt(self, header: dict[str, str], claims: dict[str, Any]) -> str:
        """A JWT of ``claims`` signed with this key: what joserfc's ``jwt.encode`` makes (the
        header with ``typ: JWT`` unless it names another type, in the same order, written as
        joserfc writes it), the claims serialised by :mod:`kernel.jsonfast` rather than
        ``json.dumps`` (a tenth of the time; the same value). Claims are given as JSON
        values: times as integers. Signed here rather than through joserfc's
        ``serialize_compact``, whose registry checks, header encoding and key lookups cost
        as much again as the ES256 signature itself (bench/README.md, twentieth session):
        the header's algorithm must be this key's, and it may name only ``alg``, ``kid`` and
        ``typ`` (RFC 7515 4.1), so nothing a verifier must understand (``crit``) is signed
        unchecked."""
        if header.get("alg") != self.alg:
            raise ValueError(f"header alg {header.get('alg')!r} is not the key's {self.alg}")
        if not header.keys() <= _HEADER_NAMES or not all(
                isinstance(value, str) for value in header.values()):
            raise ValueError(f"a JWT header of {sorted(_HEADER_NAMES)} only, as text: {header}")
        cache_key = tuple(header.items())
        segment = self._headers.get(cache_key)
        if segment is None:  # joserfc's own encoding of the header (RFC 7515 5.1)
            segment = json_b64encode({"typ": "JWT", **header})
            if len(self._headers) < 16:  # the hub's own few headers, never a caller's many
                self._headers[cache_key] = segment
        signing_input = segment + b"." + urlsafe_b64encode(jsonfast.dumpb(claims))
        return (signing_input + b"." + urlsafe_b64encode(self._sign(signing_input))).decode("ascii")


@dataclass(frozen=True)
class _Snapshot:
    signing: dict[str, ActiveKey]   # alg -> key that signs now
    jwks: dict[str, Any]
    keyset: KeySet                  # the published public keys, parsed once
    kids: frozenset[str]            # their ids
    fingerprint: tuple[tuple[str, str], ...]
    next_change: float               # epoch seconds when a key activates or retires


def _generate(alg: str) -> ECKey | RSAKey:
    if alg == "ES256":
        return ECKey.generate_key("P-256", private=True, auto_kid=True)
    if alg in ("RS256", "PS256"):
        return RSAKey.generate_key(2048, private=True, auto_kid=True)
    raise ValueError(f"unsupported signing algorithm {alg}")


def _import(alg: str, data: dict[str, Any]) -> ECKey | RSAKey:
    return ECKey.import_key(data) if alg.startswith("ES") else RSAKey.import_key(data)


#: how often, at most, a token signed with a key id not loaded makes a process read the keys
UNKNOWN_KID_RELOAD_SECONDS = 1.0


class KeyRing:
    def __init__(self, db: Database, cipher: FieldCipher, *, reload_seconds: float = 30) -> None:
        self._db = db
        self._cipher = cipher
        self._reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._loaded_at = 0.0
        #: when a token with a key id not loaded last made the ring read the table
        self._unknown_kid_reload = -UNKNOWN_KID_RELOAD_SECONDS

    # -- administration -----------------------------------------------------------------

    def ensure(self, algs: tuple[str, ...] = SUPPORTED_ALGS) -> None:
        """Create a key for each algorithm that has none yet (first start)."""
        with self._db.session() as s:
            have = set(s.scalars(select(SigningKey.alg)))
        for alg in algs:
            if alg not in have:
                self.add(alg, activates_at=utcnow())
        self.reload(force=True)

    def add(self, alg: str, *, activates_at: datetime) -> SigningKey:
        key = _generate(alg)
        public = key.as_dict(private=False)
        public.update(alg=alg, use="sig")
        row = SigningKey(
            kid=key.kid, alg=alg, public_jwk=public,
            private_jwk_encrypted=self._cipher.encrypt(json.dumps(key.as_dict(private=True))),
            created_at=utcnow(), activates_at=activates_at,
        )
        with self._db.session() as s:
            s.add(row)
        return row

    def rotate(self, alg: str, *, lead_time: timedelta, retire_after: timedelta) -> SigningKey:
        """Publish a new key now that signs after ``lead_time``; keys it replaces stay
        published for ``retire_after`` beyond that (longer than any token they signed)."""
        now = utcnow()
        new = self.add(alg, activates_at=now + lead_time)
        with self._db.session() as s:
            for row in s.scalars(select(SigningKey).where(SigningKey.alg == alg,
                                                          SigningKey.kid != new.kid)):
                if row.retire_after is None:
                    row.retire_after = now + lead_time + retire_after
        self.reload(force=True)
        return new

    def list(self) -> list[SigningKey]:
        with self._db.session() as s:
            return list(s.scalars(select(SigningKey).order_by(SigningKey.created_at)))

    # -- use ------------------------------------------------------------------------------

    def reload(self, *, force: bool = False) -> _Snapshot:
        now = time.time()
        snap = self._snapshot
        if (not force and snap is not None and now - self._loaded_at < self._reload_seconds
                and now < snap.next_change):
            return snap
        with self._lock:
            with self._db.session() as s:
                rows = list(s.scalars(select(SigningKey).order_by(SigningKey.activates_at)))
            fingerprint = tuple((r.kid, str(r.retire_after)) for r in rows)
            if snap is not None and snap.fingerprint == fingerprint and now < snap.next_change:
                self._loaded_at = now
                return snap
            current = utcnow()
            published = [r for r in rows if r.retire_after is None or r.retire_after > current]
            signing: dict[str, ActiveKey] = {}
            changes: list[float] = []
            for r in published:
                if r.activates_at <= current:
                    # rows are ordered by activation: the latest active key of an alg wins
                    prev = signing.get(r.alg)
                    if prev is None or prev.kid != r.kid:
                        private = json.loads(self._cipher.decrypt(r.private_jwk_encrypted))
                        signing[r.alg] = ActiveKey(r.kid, r.alg, _import(r.alg, private))
                else:
                    changes.append(r.activates_at.timestamp())
                if r.retire_after is not None:
                    changes.append(r.retire_after.timestamp())
            jwks = {"keys": [dict(r.public_jwk) for r in published]}
            snap = _Snapshot(
                signing=signing,
                jwks=jwks,
                keyset=KeySet.import_key_set(jwks),  # type: ignore[arg-type]
                kids=frozenset(str(k.get("kid")) for k in jwks["keys"]),
                fingerprint=fingerprint,
                next_change=min(changes, default=float("inf")),
            )
            self._snapshot, self._loaded_at = snap, now
            return snap

    def signing_key(self, alg: str) -> ActiveKey:
        key = self.reload().signing.get(alg)
        if key is None:
            # a key made for a newly registered agency's algorithm by another process
            key = self.reload(force=True).signing.get(alg)
        if key is None:
            raise LookupError(f"no active signing key for {alg}")
        return key

    def jwks(self) -> dict[str, Any]:
        return self.reload().jwks

    def public_keyset(self) -> KeySet:
        """The published keys for verifying what the hub signed (tokens, hints)."""
        return self.reload().keyset

    def verifying_keyset(self, token: Any) -> KeySet:
        """:meth:`public_keyset` for joserfc's ``decode`` (``key=``, called with the token):
        when the token names a key id this process has not loaded, the table is read again
        first, at most once per ``UNKNOWN_KID_RELOAD_SECONDS``. Another process may have
        rotated in a key that already signs (``civitas keys rotate --lead-time`` shorter than
        ``reload_seconds``), and its tokens must verify in every worker, not only once this
        one's next reload comes round; a stream of made-up key ids costs one cheap query a
        second at most."""
        snap = self.reload()
        kid = token.headers().get("kid")
        if isinstance(kid, str) and kid not in snap.kids:
            now = time.monotonic()
            if now - self._unknown_kid_reload >= UNKNOWN_KID_RELOAD_SECONDS:
                self._unknown_kid_reload = now
                snap = self.reload(force=True)
        return snap.keyset
