"""The short-lived store: authorization codes, login-flow state, sessions, counters.

Two implementations behind one small protocol: :class:`MemoryStore` for a single process and
:class:`RedisStore` for any number of workers. Values are JSON objects. ``take`` is an atomic
get-and-delete, which is what makes authorization codes single-use (RFC 6749 section 4.1.2).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

JSON = dict[str, Any]


class ShortLivedStore(Protocol):
    def put(self, key: str, value: JSON, ttl: int) -> None: ...

    def put_new(self, key: str, value: JSON, ttl: int) -> bool:
        """Store only if the key is absent; True when stored."""
        ...

    def put_many(self, items: Sequence[tuple[str, JSON, int]]) -> None:
        """``put`` of several (key, value, ttl) in one round trip."""
        ...

    def add_member(self, key: str, member: str, ttl: int) -> None:
        """Add ``member`` to the set at ``key`` (atomic), renewing its expiry to ``ttl``."""
        ...

    def take_members(self, key: str) -> set[str]:
        """Atomically read and delete the set at ``key`` (empty when absent)."""
        ...

    def get(self, key: str) -> JSON | None: ...

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        """``get`` of several keys in one round trip, in order."""
        ...

    def take(self, key: str) -> JSON | None:
        """Atomically read and delete; exactly one concurrent caller gets the value."""
        ...

    def delete(self, *keys: str) -> None: ...

    def incr(self, key: str, ttl: int) -> int:
        """Increment a counter, starting its expiry at the first increment."""
        ...

    def incr_many(self, keys: Sequence[str], ttl: int) -> list[int]:
        """``incr`` of several counters in one round trip (rate limits)."""
        ...

    def count(self, key: str) -> int:
        """The current value of a counter made by ``incr`` (0 when absent or expired)."""
        ...

    def ping(self) -> bool: ...


class MemoryStore:
    """In-process store for one process (the embedded default). Thread-safe."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._data: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._writes = 0

    def _live(self, key: str) -> Any | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        return value

    def _sweep(self) -> None:
        # Drop expired entries now and then so a long-running process does not grow.
        self._writes += 1
        if self._writes % 1000:
            return
        now = self._clock()
        for key in [k for k, (exp, _) in self._data.items() if exp <= now]:
            del self._data[key]

    def put(self, key: str, value: JSON, ttl: int) -> None:
        with self._lock:
            self._sweep()
            self._data[key] = (self._clock() + ttl, json.dumps(value))

    def put_many(self, items: Sequence[tuple[str, JSON, int]]) -> None:
        for key, value, ttl in items:
            self.put(key, value, ttl)

    def add_member(self, key: str, member: str, ttl: int) -> None:
        with self._lock:
            self._sweep()
            current = self._live(key)
            members = set(current) if isinstance(current, frozenset) else set()
            self._data[key] = (self._clock() + ttl, frozenset(members | {member}))

    def take_members(self, key: str) -> set[str]:
        with self._lock:
            current = self._live(key)
            if current is None:
                return set()
            del self._data[key]
        return set(current) if isinstance(current, frozenset) else set()

    def put_new(self, key: str, value: JSON, ttl: int) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._sweep()
            self._data[key] = (self._clock() + ttl, json.dumps(value))
            return True

    def get(self, key: str) -> JSON | None:
        with self._lock:
            raw = self._live(key)
        return None if raw is None else json.loads(raw)

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        return [self.get(key) for key in keys]

    def take(self, key: str) -> JSON | None:
        with self._lock:
            raw = self._live(key)
            if raw is not None:
                del self._data[key]
        return None if raw is None else json.loads(raw)

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def incr(self, key: str, ttl: int) -> int:
        with self._lock:
            current = self._live(key)
            if current is None:
                self._data[key] = (self._clock() + ttl, 1)
                return 1
            expires, _ = self._data[key]
            self._data[key] = (expires, int(current) + 1)
            return int(current) + 1

    def incr_many(self, keys: Sequence[str], ttl: int) -> list[int]:
        return [self.incr(key, ttl) for key in keys]

    def count(self, key: str) -> int:
        with self._lock:
            value = self._live(key)
        return int(value) if value is not None else 0

    def ping(self) -> bool:
        return True


class RedisStore:
    """Redis-backed store shared by every worker. Needs Redis >= 6.2 (GETDEL)."""

    def __init__(self, url: str, *, prefix: str = "civitas:", timeout: float = 2.0) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix

    def _k(self, key: str) -> str:
        return self._prefix + key

    def put(self, key: str, value: JSON, ttl: int) -> None:
        self._redis.set(self._k(key), json.dumps(value), ex=ttl)

    def put_many(self, items: Sequence[tuple[str, JSON, int]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key, value, ttl in items:
            pipe.set(self._k(key), json.dumps(value), ex=ttl)
        pipe.execute()

    def add_member(self, key: str, member: str, ttl: int) -> None:
        pipe = self._redis.pipeline(transaction=True)  # MULTI: never a set without expiry
        pipe.sadd(self._k(key), member)
        pipe.expire(self._k(key), ttl)
        pipe.execute()

    def take_members(self, key: str) -> set[str]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.smembers(self._k(key))
        pipe.delete(self._k(key))
        members, _ = pipe.execute()
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def put_new(self, key: str, value: JSON, ttl: int) -> bool:
        return bool(self._redis.set(self._k(key), json.dumps(value), ex=ttl, nx=True))

    def get(self, key: str) -> JSON | None:
        raw = self._redis.get(self._k(key))
        return None if raw is None else json.loads(raw)

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        if not keys:
            return []
        raws = self._redis.mget([self._k(k) for k in keys])
        return [None if raw is None else json.loads(raw) for raw in raws]

    def take(self, key: str) -> JSON | None:
        raw = self._redis.getdel(self._k(key))
        return None if raw is None else json.loads(raw)

    def delete(self, *keys: str) -> None:
        if keys:
            self._redis.delete(*(self._k(k) for k in keys))

    def incr(self, key: str, ttl: int) -> int:
        return self.incr_many([key], ttl)[0]

    def incr_many(self, keys: Sequence[str], ttl: int) -> list[int]:
        # INCR then EXPIRE NX: the window starts at the first increment. No MULTI: each
        # counter's two commands need no isolation from other clients' increments.
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.incr(self._k(key))
            pipe.expire(self._k(key), ttl, nx=True)
        values = pipe.execute()
        return [int(v) for v in values[::2]]

    def count(self, key: str) -> int:
        raw = self._redis.get(self._k(key))
        return int(raw) if raw is not None else 0

    def ping(self) -> bool:
        return bool(self._redis.ping())


def open_store(url: str | None) -> ShortLivedStore:
    """``None`` or ``memory://`` gives the in-process store; ``redis://`` a Redis store."""
    if not url or url.startswith("memory:"):
        return MemoryStore()
    return RedisStore(url)
