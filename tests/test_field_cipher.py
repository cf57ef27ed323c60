"""Encryption at rest (kernel/crypto.py): AES-256-GCM-SIV (RFC 8452) values, the Fernet
values written before them still read, key rotation, and refusal of anything altered."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.fernet import Fernet, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st
from jose import jwt as jose_jwt
from sqlalchemy import select, update

from kernel.crypto import DecryptionError, FieldCipher
from tests.flows import AGENCY_TWO, AuthRequest, full_login, query, redeem

OLD, NEW = FieldCipher.generate_key(), FieldCipher.generate_key()


def fernet_token(key: str, plaintext: str) -> str:
    """A value as the hub wrote it before AES-GCM-SIV (a Fernet token)."""
    return MultiFernet([Fernet(key.encode())]).encrypt(plaintext.encode()).decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_value_is_written_as_aes_gcm_siv_in_the_documented_layout():
    """The layout of the module's docstring, opened here with nothing of the hub's: an
    operator's own tool can read the values with the key and RFC 5869 + RFC 8452."""
    token = FieldCipher([OLD]).encrypt("alice@example.org")
    assert token.startswith("v2.") and "alice" not in token
    blob = unb64(token[3:])
    raw = base64.urlsafe_b64decode(OLD)

    def derive(label: bytes, length: int) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                    info=b"civitas/field-cipher/v2/" + label).derive(raw)

    key_id, nonce, sealed = blob[:4], blob[4:16], blob[16:]
    assert key_id == derive(b"key-id", 4)
    plain = AESGCMSIV(derive(b"aes-256-gcm-siv", 32)).decrypt(
        nonce, sealed, b"civitas/field/v2/" + key_id)
    assert plain == b"alice@example.org"


def test_values_written_before_as_fernet_are_still_read():
    cipher = FieldCipher([OLD])
    assert cipher.decrypt(fernet_token(OLD, '"alice"')) == '"alice"'


def test_rotation_reads_with_any_key_and_writes_with_the_first():
    before = FieldCipher([OLD])
    old_v2, old_fernet = before.encrypt("one"), fernet_token(OLD, "two")
    after = FieldCipher([NEW, OLD])
    assert after.decrypt(old_v2) == "one" and after.decrypt(old_fernet) == "two"
    fresh = after.encrypt("three")
    assert unb64(fresh[3:])[:4] != unb64(old_v2[3:])[:4]  # another key id
    with pytest.raises(DecryptionError):
        before.decrypt(fresh)  # written with the new key, which the old set lacks
    with pytest.raises(DecryptionError):
        FieldCipher([NEW]).decrypt(old_v2)  # the old key retired: refused, not garbled
    with pytest.raises(DecryptionError):
        FieldCipher([NEW]).decrypt(old_fernet)


def test_the_same_value_encrypts_differently_each_time():
    cipher = FieldCipher([OLD])
    tokens = {cipher.encrypt("same") for _ in range(50)}
    assert len(tokens) == 50 and {cipher.decrypt(t) for t in tokens} == {"same"}


@pytest.mark.parametrize("spoil", [
    "a bit flipped in the ciphertext", "a bit flipped in the nonce", "another key id",
    "cut short", "cut to the header", "not base64", "empty", "only the prefix",
    "a Fernet token of another key",
])
def test_an_altered_value_is_refused(spoil):
    cipher = FieldCipher([OLD])
    token = cipher.encrypt("alice@example.org")
    blob = bytearray(unb64(token[3:]))
    if spoil == "a bit flipped in the ciphertext":
        blob[-1] ^= 1
    elif spoil == "a bit flipped in the nonce":
        blob[5] ^= 1
    elif spoil == "another key id":
        blob[0] ^= 1
    elif spoil == "cut short":
        blob = blob[:-1]
    elif spoil == "cut to the header":
        blob = blob[:16]
    spoilt = "v2." + base64.urlsafe_b64encode(bytes(blob)).decode().rstrip("=")
    spoilt = {"not base64": "v2.a", "empty": "", "only the prefix": "v2.",
              "a Fernet token of another key": fernet_token(NEW, "x")}.get(spoil, spoilt)
    with pytest.raises(DecryptionError):
        cipher.decrypt(spoilt)


@given(st.text())
def test_any_text_survives_the_round_trip(text):
    cipher = FieldCipher([OLD])
    assert cipher.decrypt(cipher.encrypt(text)) == text


def test_an_account_written_before_the_upgrade_is_served_and_rewritten_at_next_login(
        client, hub):
    """Attributes stored as Fernet tokens (before AES-GCM-SIV) still give the agency its
    claims, and the citizen's next upstream login rewrites them as ``v2.`` values."""
    from broker.models import AccountAttribute

    key = hub.settings.encryption_keys[0]
    full_login(client, AuthRequest())
    with hub.db.session() as s:
        rows = {r.id: hub.accounts._cipher.decrypt(r.value_encrypted)  # noqa: SLF001
                for r in s.scalars(select(AccountAttribute))}
        for row_id, plain in rows.items():
            s.execute(update(AccountAttribute).where(AccountAttribute.id == row_id)
                      .values(value_encrypted=fernet_token(key, plain)))
    auth = AuthRequest(agency=AGENCY_TWO, scope="openid email")
    r = client.get(auth.url())
    params = full_login(client, auth) if r.status_code == 303 else query(r.headers["Location"])
    body = redeem(client, auth, params["code"]).json
    assert jose_jwt.get_unverified_claims(body["id_token"])["email"] == "alice@example.org"
    with hub.db.session() as s:
        stored = list(s.scalars(select(AccountAttribute.value_encrypted)))
    assert stored and all(not v.startswith("v2.") for v in stored)  # reads change nothing
    full_login(client.application.test_client(), AuthRequest())  # alice signs in again
    with hub.db.session() as s:
        after = {r.id: r.value_encrypted for r in s.scalars(select(AccountAttribute))}
    assert all(v.startswith("v2.") for v in after.values())
    assert {i: json.loads(hub.accounts._cipher.decrypt(v))  # noqa: SLF001
            for i, v in after.items()} == {i: json.loads(p) for i, p in rows.items()}
