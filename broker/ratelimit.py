"""Failed password attempts, limited per username and per client address (OWASP ASVS 2.2.1).

Counters live in the short-lived store so every worker shares them. Usernames are hashed
(case-folded) before they become keys; the same answer is given whether or not the user
exists, so the limiter reveals nothing about accounts.
"""

from __future__ import annotations

import hashlib

from kernel.store import ShortLivedStore

from .errors import TooManyAttempts


class AttemptLimiter:
    def __init__(self, store: ShortLivedStore, *, per_username: int = 5,
                 per_address: int = 20, window_seconds: int = 900) -> None:
        self._store = store
        self.per_username = per_username
        self.per_address = per_address
        self.window = window_seconds

    def _keys(self, upstream_id: str, username: str, address: str) -> tuple[str, str]:
        user = hashlib.sha256(username.strip().casefold().encode()).hexdigest()
        return f"pwfail:{upstream_id}:u:{user}", f"pwfail:a:{address}"

    def check(self, upstream_id: str, username: str, address: str) -> None:
        user_key, addr_key = self._keys(upstream_id, username, address)
        if (self._store.count(user_key) >= self.per_username
                or self._store.count(addr_key) >= self.per_address):
            raise TooManyAttempts()

    def failed(self, upstream_id: str, username: str, address: str) -> None:
        for key in self._keys(upstream_id, username, address):
            self._store.incr(key, self.window)
