"""Fixed-window rate limits counted in the short-lived store, so every worker (and every
host) shares one count per key and window.

A fixed window lets through at most twice the limit across a window boundary; that is the
accepted price of one round trip per request (several limits are counted together).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import CivitasError
from .store import ShortLivedStore


@dataclass(frozen=True)
class Limit:
    """At most ``count`` requests per window for ``key`` (a count of 0 means no limit)."""

    key: str
    count: int


class RateLimited(CivitasError):
    """A limit was reached; ``retry_after`` seconds until its window ends (RFC 6585 4)."""

    status_code = 429

    def __init__(self, key: str, retry_after: int) -> None:
        super().__init__(f"Too many requests; retry after {retry_after} seconds.",
                         status_code=429)
        self.key = key
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, store: ShortLivedStore, *, window_seconds: int = 60,
                 clock: Callable[[], float] = time.time) -> None:
        if window_seconds < 1:
            raise ValueError("window_seconds must be at least 1")
        self._store = store
        self.window = window_seconds
        self._clock = clock

    def hit(self, limits: Sequence[Limit]) -> None:
        """Count one request against every limit; raise :class:`RateLimited` when one of
        them is over (the request is still counted: hammering does not reopen the window)."""
        active = [limit for limit in limits if limit.count > 0]
        if not active:
            return
        now = int(self._clock())
        window = now // self.window
        counts = self._store.incr_many([f"rl:{lim.key}:{window}" for lim in active],
                                       self.window)
        for limit, count in zip(active, counts, strict=True):
            if count > limit.count:
                raise RateLimited(limit.key, self.window - now % self.window)
