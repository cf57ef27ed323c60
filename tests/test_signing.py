"""idp/keys.py signs JWTs itself with ``cryptography`` (not through joserfc's
``serialize_compact``): each of the hub's algorithms must give a JWS that joserfc and
python-jose (what agency apps use) verify, with joserfc's header bytes (RFC 7515 5.1, RFC 7518
3.3-3.5), and must refuse what joserfc refused. PS256 is checked by joserfc and by
``cryptography`` with the salt length spelt out."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jose import jwt as jose_jwt
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from idp.keys import SUPPORTED_ALGS, ActiveKey


def _segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _key(alg: str) -> ActiveKey:
    key = (ECKey.generate_key("P-256", private=True, auto_kid=True) if alg == "ES256"
           else RSAKey.generate_key(2048, private=True, auto_kid=True))
    return ActiveKey(key.kid, alg, key)


CLAIMS = {"iss": "https://hub.example", "sub": "s-1", "aud": "agency", "iat": 1_700_000_000,
          "exp": 4_000_000_000, "scope": "openid email", "name": "Zoë"}


@pytest.mark.parametrize("alg", SUPPORTED_ALGS)
@pytest.mark.parametrize("typ", [None, "at+jwt", "JWT"])
def test_rfc7515_a_token_joserfc_and_python_jose_verify_with_joserfcs_header(alg, typ):
    key = _key(alg)
    header = {"alg": alg, "kid": key.kid} | ({"typ": typ} if typ else {})
    for _ in range(2):  # the second time from the header's cached segment
        ours = key.sign_jwt(header, CLAIMS)
        theirs = jwt.encode(header, CLAIMS, key.key, algorithms=[alg])
        assert ours.split(".")[0] == theirs.split(".")[0]
        assert json.loads(_segment(ours, 1)) == CLAIMS
        public = key.key.as_dict(private=False)
        assert jwt.decode(ours, ECKey.import_key(public) if alg == "ES256"
                          else RSAKey.import_key(public), algorithms=[alg]).claims == CLAIMS
        assert jose_jwt.get_unverified_header(ours)["typ"] == (typ or "JWT")
        if alg != "PS256":  # python-jose has no PS256 (its JWK lookup refuses the name)
            assert jose_jwt.decode(ours, public, algorithms=[alg], audience="agency") == CLAIMS


def test_rfc7518_3_4_es256_signature_is_r_and_s_of_32_bytes_each():
    """R or S with a leading zero byte must keep their 32 bytes. About one signature in 128
    has one, so the test signs until it has seen such a signature (and verified it as R and
    S of 32 bytes each), not a fixed few that would usually all be without."""
    key = _key("ES256")
    public = key.key.public_key
    short = 0
    for _ in range(6000):  # P(fewer than two such in 6000) is about 2e-19
        token = key.sign_jwt({"alg": "ES256"}, CLAIMS)
        signature = _segment(token, 2)
        assert len(signature) == 64, len(signature)
        if signature[0] == 0 or signature[32] == 0:
            r, s = (int.from_bytes(signature[i:i + 32], "big") for i in (0, 32))
            assert min(r, s) < 2 ** 248
            public.verify(encode_dss_signature(r, s), token.rsplit(".", 1)[0].encode(),
                          ec.ECDSA(hashes.SHA256()))
            short += 1
            if short == 2:
                break
    assert short == 2


def test_rfc7518_3_5_ps256_salt_is_as_long_as_the_hash():
    key = _key("PS256")
    token = key.sign_jwt({"alg": "PS256", "kid": key.kid}, CLAIMS)
    public = key.key.public_key
    signing_input = token.rsplit(".", 1)[0].encode()
    public.verify(_segment(token, 2), signing_input,
                  padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public.verify(_segment(token, 2), signing_input,
                      padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20),
                      hashes.SHA256())


def test_a_header_naming_another_algorithm_is_refused():
    key = _key("ES256")
    for header in ({"alg": "RS256", "kid": key.kid}, {"alg": "none"}, {"kid": key.kid}):
        with pytest.raises(ValueError, match="not the key's ES256"):
            key.sign_jwt(header, CLAIMS)


def test_a_public_key_cannot_be_made_a_signing_key():
    public = ECKey.generate_key("P-256", private=True, auto_kid=True).as_dict(private=False)
    with pytest.raises(ValueError, match="no private part"):
        ActiveKey("k", "ES256", ECKey.import_key(public))


def test_an_algorithm_the_hub_does_not_sign_with_or_a_key_of_another_kind_is_refused():
    p384 = ECKey.generate_key("P-384", private=True, auto_kid=True)
    p256 = ECKey.generate_key("P-256", private=True, auto_kid=True)
    rsa = RSAKey.generate_key(2048, private=True, auto_kid=True)
    for alg, key in (("ES384", p384), ("ES256", p384), ("ES256", rsa), ("RS256", p256),
                     ("PS256", p256), ("HS256", p256)):
        with pytest.raises(ValueError, match="unsupported"):
            ActiveKey("k", alg, key)


def test_many_callers_headers_do_not_grow_the_cache():
    key = _key("ES256")
    for n in range(100):
        token = key.sign_jwt({"alg": "ES256", "kid": f"k{n}"}, CLAIMS)
        assert json.loads(_segment(token, 0))["kid"] == f"k{n}"
    assert len(key._headers) <= 16


def test_a_header_beyond_alg_kid_and_typ_is_refused():
    """RFC 7515 4.1.11: a ``crit`` the verifier must understand is never signed unchecked
    (joserfc refused it too); nor is a header value that is not text."""
    key = _key("ES256")
    for header in ({"alg": "ES256", "kid": key.kid, "crit": ["exp"], "exp": 1},
                   {"alg": "ES256", "jku": "https://attacker.example/jwks"},
                   {"alg": "ES256", "kid": ["a", "b"]}, {"alg": "ES256", "typ": 1}):
        with pytest.raises(ValueError, match="alg', 'kid', 'typ'"):
            key.sign_jwt(header, CLAIMS)  # type: ignore[arg-type]
    assert not key._headers
