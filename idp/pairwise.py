"""Pairwise subject identifiers (OpenID Connect Core 1.0 section 8.1, NIST SP 800-63C 6.3.1).

``sub`` = base64url(HMAC-SHA256(secret, sector_identifier || 0x00 || account_id)). Agencies in
different sectors never see the same value for one person, and cannot reverse it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


class PairwiseSubjects:
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def subject(self, sector_identifier: str, account_id: str) -> str:
        msg = sector_identifier.encode() + b"\x00" + account_id.encode()
        digest = hmac.new(self._secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
