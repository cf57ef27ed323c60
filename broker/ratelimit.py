"""Failed password attempts, limited per username and per client address (OWASP ASVS 2.2.1).

Counters live in the short-lived store so every worker shares them. Usernames are hashed
before they become keys; the same answer is given whether or not the user exists, so the
limiter reveals nothing about accounts.

A username is keyed the way a directory compares it (:func:`username_key`): ``uid`` and the
like match with RFC 4518 string preparation (NFKC, case folding, insignificant spaces), so
"ａｌｉｃｅ", "ALICE" and " alice " are all alice to the directory and share alice's counter.
Otherwise every full-width spelling would be a fresh five guesses at the same account.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from kernel.store import ShortLivedStore

from .errors import TooManyAttempts


def _ranges(*spans: tuple[int, int]) -> list[int]:
    return [c for first, last in spans for c in range(first, last + 1)]


#: RFC 4518 2.2: code points mapped to nothing (soft hyphens, joiners, variation selectors,
#: the object replacement character, zero width space, BOM, other controls and format marks)
_TO_NOTHING = _ranges(
    (0x00AD, 0x00AD), (0x1806, 0x1806), (0x034F, 0x034F), (0x180B, 0x180D),
    (0xFE00, 0xFE0F), (0xFFFC, 0xFFFC), (0x200B, 0x200B),
    (0x0000, 0x0008), (0x000E, 0x001F), (0x007F, 0x0084), (0x0086, 0x009F),
    (0x06DD, 0x06DD), (0x070F, 0x070F), (0x180E, 0x180E), (0x200C, 0x200F),
    (0x202A, 0x202E), (0x2060, 0x2063), (0x206A, 0x206F), (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F))
#: RFC 4518 2.2: mapped to SPACE: TAB, LF, VT, FF, CR, NEL and every other separator (Zs,
#: Zl, Zp of Unicode 15; none has been added since 6.0)
_TO_SPACE = _ranges(
    (0x0009, 0x000D), (0x0085, 0x0085), (0x00A0, 0x00A0), (0x1680, 0x1680),
    (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
    (0x3000, 0x3000))
_MAP: dict[int, str | None] = {**dict.fromkeys(_TO_NOTHING), **dict.fromkeys(_TO_SPACE, " ")}
#: LATIN CAPITAL LETTER I WITH DOT ABOVE: case folding (RFC 3454 B.2) makes it "i" and a
#: combining dot; OpenLDAP lower-cases it to a plain "i", so "ALİCE" signs alice in
_MAP[0x0130] = "i"
_SPACES = re.compile(" +")


def username_key(username: str) -> str:
    """The username as a directory compares it (RFC 4518 section 2, caseIgnoreMatch):
    mapped (characters to nothing or to a space), NFKC, case folded, repeated until stable
    (folding and normalising can each expose work for the other), then runs of spaces
    squeezed and the ends stripped (2.6.1). Names the directory treats as one share a key."""
    text = username
    for _ in range(4):
        before = text
        text = unicodedata.normalize("NFKC", text.translate(_MAP))
        text = unicodedata.normalize("NFKC", text.translate(_MAP).casefold())
        if text == before:
            break
    return _SPACES.sub(" ", text).strip(" ")


class AttemptLimiter:
    def __init__(self, store: ShortLivedStore, *, per_username: int = 5,
                 per_address: int = 20, window_seconds: int = 900) -> None:
        self._store = store
        self.per_username = per_username
        self.per_address = per_address
        self.window = window_seconds

    def _keys(self, upstream_id: str, username: str, address: str) -> tuple[str, str]:
        user = hashlib.sha256(username_key(username).encode("utf-8", "surrogatepass"))
        return f"pwfail:{upstream_id}:u:{user.hexdigest()}", f"pwfail:a:{address}"

    def check(self, upstream_id: str, username: str, address: str) -> None:
        user_key, addr_key = self._keys(upstream_id, username, address)
        if (self._store.count(user_key) >= self.per_username
                or self._store.count(addr_key) >= self.per_address):
            refused = TooManyAttempts()
            refused.retry_after = self.window  # a counter lives at most this long
            raise refused

    def failed(self, upstream_id: str, username: str, address: str) -> None:
        for key in self._keys(upstream_id, username, address):
            self._store.incr(key, self.window)
