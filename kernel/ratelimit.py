"""Fixed-window rate limits counted in the short-lived store, so every worker (and every
host) shares one count per key and window.

A fixed window lets through at most twice the limit across a window boundary; that is the
accepted price of one round trip per request (several limits are counted together).

A limit that only protects capacity (``exact=False``: per authenticated agency, who cannot
guess anything by retrying) is counted in batches: each process counts up to
:func:`batch_for` hits itself and adds them to the shared count in one increment, so most
requests make no round trip for it. A process refuses once the shared count it last saw plus
its own uncounted hits is over the limit; every process sees the shared count at least once
per batch, so a window lets through at most one batch per process beyond the limit (and,
at its end, the hits a process had not added yet are not carried into the next). Limits
that stop one source (per address, exact) are counted in the store at every hit, as before.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import CivitasError
from .store import JSON, ShortLivedStore


def address_bucket(address: str | None) -> str:
    """What a limit per client address counts: an IPv4 address itself, an IPv6 address
    by its /64. One subscriber holds a whole /64 (RFC 6177), and counted address by address
    could send each request from a fresh one: no limit per address at all. An IPv4 address
    written in IPv6 (``::ffff:192.0.2.1``) counts as the IPv4 address."""
    if not address or ":" not in address:
        return address or "unknown"
    # a proxy that writes the client's port too (``198.51.100.7:40001``,
    # ``[2001:db8::1]:40001``, as some load balancers do in X-Forwarded-For): the address
    # without it, or each connection from a new source port would be a fresh bucket
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit() and (host.count(".") == 3 and ":" not in host
                                     or host.startswith("[") and host.endswith("]")):
        address = host.strip("[]")
        if ":" not in address:
            return address
    elif address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


@dataclass(frozen=True)
class Limit:
    """At most ``count`` requests per window for ``key`` (a count of 0 means no limit)."""

    key: str
    count: int
    #: False for a limit that protects capacity only: counted in batches (see the module)
    exact: bool = True


def batch_for(count: int) -> int:
    """Hits a process may count itself before adding them to the shared count: at most 10,
    and 1 (every hit, as an exact limit) under 200, so a small limit stays exact."""
    return max(1, min(10, count // 100))


class RateLimited(CivitasError):
    """A limit was reached; ``retry_after`` seconds until its window ends (RFC 6585 4)."""

    status_code = 429
    retry_after: int

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
        self._lock = threading.Lock()
        #: batched limits of this process: store key -> [shared count last seen, own hits
        #: not added yet]; only the current window's keys are kept
        self._batched: dict[str, list[int]] = {}
        self._batched_window = -1

    def hit(self, limits: Sequence[Limit], *, fetch: str | None = None) -> JSON | None:
        """Count one request against every limit; raise :class:`RateLimited` when one of
        them is over (the request is still counted: hammering does not reopen the window).

        With ``fetch``, the store's value at that key is read in the same round trip and
        returned (None when absent)."""
        active = [limit for limit in limits if limit.count > 0]
        if not active:
            return self._store.get(fetch) if fetch is not None else None
        now = int(self._clock())
        window = now // self.window
        keys: list[str] = []
        amounts: list[int] = []
        over: Limit | None = None
        with self._lock:
            if window != self._batched_window:
                self._batched.clear()
                self._batched_window = window
            for limit in active:
                key = f"rl:{limit.key}:{window}"
                if limit.exact or batch_for(limit.count) == 1:
                    keys.append(key)
                    amounts.append(1)
                    continue
                seen = self._batched.setdefault(key, [0, 0])
                seen[1] += 1
                if seen[1] >= batch_for(limit.count):
                    keys.append(key)  # this hit adds the batch to the shared count
                    amounts.append(seen[1])
                    seen[1] = 0
                elif seen[0] + seen[1] > limit.count and over is None:
                    over = limit
        fetched: JSON | None = None
        counts: list[int] = []
        if keys and fetch is not None:
            counts, fetched = self._store.incr_many_and_get(keys, self.window, amounts, fetch)
        elif keys:
            counts = self._store.incr_many(keys, self.window, amounts)
        elif fetch is not None:
            fetched = self._store.get(fetch)
        if keys:
            by_key = dict(zip(keys, counts, strict=True))
            with self._lock:
                for key, shared in by_key.items():
                    if key in self._batched:
                        seen = self._batched[key]
                        seen[0] = max(seen[0], shared)
            for limit in active:
                counted = by_key.get(f"rl:{limit.key}:{window}")
                if counted is not None and counted > limit.count:
                    over = over or limit
        if over is not None:
            raise RateLimited(over.key, self.window - now % self.window)
        return fetched
