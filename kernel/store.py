"""The short-lived store: authorization codes, login-flow state, sessions, counters.

Two implementations behind one small protocol: :class:`MemoryStore` for a single process and
:class:`RedisStore` for any number of workers. Values are JSON objects. ``take`` is an atomic
get-and-delete, which is what makes authorization codes single-use (RFC 6749 section 4.1.2).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import forks, jsonfast

if TYPE_CHECKING:
    import redis

JSON = dict[str, Any]


@functools.cache
def _pool_class() -> type[redis.ConnectionPool]:
    """redis-py's connection pool, told of forks instead of asking for them.

    redis-py's pool calls ``os.getpid()`` on every checkout and every return of a
    connection, to notice that it now runs in a forked child (whose sockets it must not
    share with its parent). This pool runs the same check only when a fork has happened
    since it last looked (:mod:`kernel.forks`). Built on first use, so that a hub on the
    in-process store never imports redis."""
    import redis

    class ForkCountingPool(redis.ConnectionPool):
        _seen_forks = -1  # the first check is a real one

        def _checkpid(self) -> None:
            if self._seen_forks != forks.count():
                seen = forks.count()
                super()._checkpid()
                self._seen_forks = seen

    return ForkCountingPool


class ShortLivedStore(Protocol):
    def put(self, key: str, value: JSON, ttl: int) -> None: ...

    def put_new(self, key: str, value: JSON, ttl: int) -> bool:
        """Store only if the key is absent; True when stored."""
        ...

    def put_many(self, items: Sequence[tuple[str, JSON, int]], *,
                 members: Sequence[tuple[str, str, int]] = (),
                 new: tuple[str, JSON, int] | None = None) -> bool:
        """``put`` of several (key, value, ttl), and each (key, member, ttl) of ``members``
        added to the set at key (renewing its expiry to ttl), atomically and in one round
        trip. With ``new`` (key, value, ttl), all of it happens only if that key is absent,
        and it is stored too: False when it was there (nothing written), else True."""
        ...

    def take_members(self, key: str) -> set[str]:
        """Atomically read and delete the set at ``key`` (empty when absent)."""
        ...

    def get(self, key: str) -> JSON | None: ...

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        """``get`` of several keys in one round trip, in order."""
        ...

    def take(self, key: str, *also: str) -> JSON | None:
        """Atomically read and delete; exactly one concurrent caller gets the value. The
        keys ``also`` are deleted with it, in the same round trip."""
        ...

    def take_marked(self, key: str, *, field: str, mark_prefix: str, otherwise: str
                    ) -> tuple[JSON | None, bool]:
        """``take`` of ``key`` and a look at one more key, in one atomic round trip.

        Taken: (the value, whether the key ``mark_prefix + value[field]`` exists; False when
        the field is absent or empty). Not there: (None, whether the key ``otherwise``
        exists). An authorization code and whether its hub session has ended, or whether a
        code no longer there was ever issued (idp/tokens.py)."""
        ...

    def delete(self, *keys: str) -> None: ...

    def incr(self, key: str, ttl: int) -> int:
        """Increment a counter, starting its expiry at the first increment."""
        ...

    def incr_many(self, keys: Sequence[str], ttl: int,
                  amounts: Sequence[int] | None = None) -> list[int]:
        """``incr`` of several counters in one round trip (rate limits), each by its
        ``amounts`` entry (1 each when not given); the new values, in order."""
        ...

    def incr_many_and_get(self, keys: Sequence[str], ttl: int, amounts: Sequence[int] | None,
                          read: str) -> tuple[list[int], JSON | None]:
        """``incr_many`` and ``get(read)`` in one round trip: rate limits counted as a
        browser session is read (civitas/app.py)."""
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
            self._data[key] = (self._clock() + ttl, jsonfast.dumpb(value))

    def put_many(self, items: Sequence[tuple[str, JSON, int]], *,
                 members: Sequence[tuple[str, str, int]] = (),
                 new: tuple[str, JSON, int] | None = None) -> bool:
        with self._lock:
            if new is not None and self._live(new[0]) is not None:
                return False
            self._sweep()
            now = self._clock()
            for key, value, ttl in ([new] if new is not None else []) + list(items):
                self._data[key] = (now + ttl, jsonfast.dumpb(value))
            for key, member, ttl in members:
                current = self._live(key)
                kept = set(current) if isinstance(current, frozenset) else set()
                self._data[key] = (now + ttl, frozenset(kept | {member}))
            return True

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
            self._data[key] = (self._clock() + ttl, jsonfast.dumpb(value))
            return True

    def get(self, key: str) -> JSON | None:
        with self._lock:
            raw = self._live(key)
        return None if raw is None else jsonfast.loads(raw)

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        return [self.get(key) for key in keys]

    def take(self, key: str, *also: str) -> JSON | None:
        with self._lock:
            raw = self._live(key)
            if raw is not None:
                del self._data[key]
            for other in also:
                self._data.pop(other, None)
        return None if raw is None else jsonfast.loads(raw)

    def take_marked(self, key: str, *, field: str, mark_prefix: str, otherwise: str
                    ) -> tuple[JSON | None, bool]:
        with self._lock:
            raw = self._live(key)
            if raw is None:
                return None, self._live(otherwise) is not None
            del self._data[key]
            value = jsonfast.loads(raw)
            ref = value.get(field) if isinstance(value, dict) else None
            marked = (isinstance(ref, str) and ref != ""
                      and self._live(mark_prefix + ref) is not None)
        return value, marked

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def incr(self, key: str, ttl: int, amount: int = 1) -> int:
        with self._lock:
            current = self._live(key)
            if current is None:
                self._data[key] = (self._clock() + ttl, amount)
                return amount
            expires, _ = self._data[key]
            self._data[key] = (expires, int(current) + amount)
            return int(current) + amount

    def incr_many(self, keys: Sequence[str], ttl: int,
                  amounts: Sequence[int] | None = None) -> list[int]:
        return [self.incr(key, ttl, amount)
                for key, amount in zip(keys, amounts or [1] * len(keys), strict=True)]

    def incr_many_and_get(self, keys: Sequence[str], ttl: int, amounts: Sequence[int] | None,
                          read: str) -> tuple[list[int], JSON | None]:
        return self.incr_many(keys, ttl, amounts), self.get(read)

    def count(self, key: str) -> int:
        with self._lock:
            value = self._live(key)
        return int(value) if value is not None else 0

    def ping(self) -> bool:
        return True


#: KEYS: the guard (when ARGV[1] is 1), the values' keys (ARGV[2] of them), the sets' keys;
#: ARGV from the third on: (value, ttl) for the guard and each value, (member, ttl) for each
#: set. A script runs atomically: no other client sees half of it.
_PUT_MANY = """
local k, a = 1, 3
if ARGV[1] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[4]) then return 0 end
  k, a = 2, 5
end
for _ = 1, tonumber(ARGV[2]) do
  redis.call('SET', KEYS[k], ARGV[a], 'EX', ARGV[a + 1])
  k, a = k + 1, a + 2
end
while KEYS[k] do
  redis.call('SADD', KEYS[k], ARGV[a])
  redis.call('EXPIRE', KEYS[k], ARGV[a + 1])
  k, a = k + 1, a + 2
end
return 1
"""


#: KEYS[1]: the key to take, KEYS[2]: the key looked at when it is not there; ARGV[1]: the
#: taken value's field naming the mark, ARGV[2]: the mark's key without that name. The
#: mark's key is only known once the value is read, so it is not among KEYS: fine for one
#: Redis (or a primary with replicas), which is what the hub runs on, not for a cluster.
_TAKE_MARKED = """
local v = redis.call('GETDEL', KEYS[1])
if not v then return {false, redis.call('EXISTS', KEYS[2])} end
local ok, value = pcall(cjson.decode, v)
local ref = ok and type(value) == 'table' and value[ARGV[1]] or nil
if type(ref) == 'string' and ref ~= '' then
  return {v, redis.call('EXISTS', ARGV[2] .. ref)}
end
return {v, 0}
"""


#: KEYS[1]: the key to take; the others are deleted with it
_TAKE_ALSO = """
local v = redis.call('GETDEL', KEYS[1])
redis.call('DEL', unpack(KEYS, 2))
return v
"""


#: KEYS: the counters, then the key to read when ARGV[2] is 1; ARGV[1]: the window's
#: seconds, then each counter's amount. The window starts at a counter's first increment:
#: only a counter without an expiry gets one. The replies: each counter's new value, then
#: the value read (nil when absent).
_INCR_MANY = """
local out, counters = {}, #KEYS
if ARGV[2] == '1' then counters = counters - 1 end
for i = 1, counters do
  local key = KEYS[i]
  out[i] = redis.call('INCRBY', key, ARGV[i + 2])
  if redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ARGV[1]) end
end
if counters < #KEYS then out[#KEYS] = redis.call('GET', KEYS[#KEYS]) end
return out
"""


class RedisStore:
    """Redis-backed store shared by every worker. Needs Redis >= 6.2 (GETDEL)."""

    def __init__(self, url: str, *, prefix: str = "civitas:", timeout: float = 2.0) -> None:
        import redis

        self._redis = redis.Redis(connection_pool=_pool_class().from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout))
        self._redis.auto_close_connection_pool = True  # as Redis.from_url leaves it
        self._prefix = prefix
        self._put_many = self._redis.register_script(_PUT_MANY)
        self._incr_many = self._redis.register_script(_INCR_MANY)
        self._take_marked = self._redis.register_script(_TAKE_MARKED)
        self._take_also = self._redis.register_script(_TAKE_ALSO)
        self._no_script = redis.exceptions.NoScriptError
        self._reply_errors = redis.exceptions.ResponseError
        self._stale = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        #: idle connections of the straight path (:meth:`_command`), and the forks seen
        self._idle: list[Any] = []  # redis.Connection, whose methods are not typed
        self._idle_forks = forks.count()

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _command(self, *args: Any) -> Any:
        """One command, sent straight on a connection of the store's own and its reply read:
        what ``Redis.execute_command`` does, without its per-command bookkeeping (the
        pool's locks and counters, the decorators and the observability hooks of redis-py 8:
        9-16 µs of a 27-42 µs command; bench/README.md, fifteenth session).

        The safety of redis-py's pool is kept: a connection is used by one thread at a
        time (``list.pop`` and ``append`` are atomic); one that has anything to read before
        a command is sent (a reply never read, or the server gone: its check at checkout)
        is reconnected first; one whose command failed in any way but an error reply (a
        timeout, a broken connection, an interruption) is closed, never reused, so no reply
        can reach the wrong command; and after a fork the child opens its own connections.
        Errors are redis-py's (``ConnectionError``, ``TimeoutError``, ``ResponseError``),
        raised as ``Redis.execute_command`` raises them: the pool has no retries either."""
        if self._idle_forks != forks.count():  # a forked child: not the parent's sockets
            self._idle, self._idle_forks = [], forks.count()
        connection: Any
        try:
            connection = self._idle.pop()
        except IndexError:
            pool = self._redis.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
        try:
            connection.connect()
            try:  # as redis-py's pool checks a connection it hands out
                stale = connection.can_read()
            except self._stale:
                stale = True
            if stale:
                connection.disconnect()
                connection.connect()
            connection.send_packed_command(connection.pack_command(*args), check_health=False)
            reply = connection.read_response()
        except self._reply_errors:  # the whole reply was read: the connection is sound
            self._idle.append(connection)
            raise
        except BaseException:
            connection.disconnect()
            raise
        self._idle.append(connection)
        return reply

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """A registered script by its SHA on the straight path; one that Redis no longer
        holds (a restart or failover forgets scripts: NOSCRIPT) through redis-py's
        ``Script``, which loads it again and runs it."""
        try:
            return self._command("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._no_script:
            return script(keys=keys, args=args)

    def put(self, key: str, value: JSON, ttl: int) -> None:
        self._command("SET", self._k(key), jsonfast.dumpb(value), "EX", ttl)

    def put_many(self, items: Sequence[tuple[str, JSON, int]], *,
                 members: Sequence[tuple[str, str, int]] = (),
                 new: tuple[str, JSON, int] | None = None) -> bool:
        # One script (atomic in Redis, one round trip): the guard, the values, the sets.
        keys: list[str] = []
        args: list[Any] = [1 if new is not None else 0, len(items)]
        for key, value, ttl in ([new] if new is not None else []) + list(items):
            keys.append(self._k(key))
            args += [jsonfast.dumpb(value), ttl]
        for key, member, ttl in members:
            keys.append(self._k(key))
            args += [member, ttl]
        return bool(self._run(self._put_many, keys, args))

    def take_members(self, key: str) -> set[str]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.smembers(self._k(key))
        pipe.delete(self._k(key))
        members, _ = pipe.execute()
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def put_new(self, key: str, value: JSON, ttl: int) -> bool:
        written = self._command("SET", self._k(key), jsonfast.dumpb(value), "EX", ttl, "NX")
        return written is not None

    def get(self, key: str) -> JSON | None:
        raw = self._command("GET", self._k(key))
        return None if raw is None else jsonfast.loads(raw)

    def get_many(self, keys: Sequence[str]) -> list[JSON | None]:
        if not keys:
            return []
        raws = self._command("MGET", *(self._k(k) for k in keys))
        return [None if raw is None else jsonfast.loads(raw) for raw in raws]

    def take(self, key: str, *also: str) -> JSON | None:
        if also:
            raw = self._run(self._take_also, [self._k(k) for k in (key, *also)], [])
        else:
            raw = self._command("GETDEL", self._k(key))
        return None if raw is None else jsonfast.loads(raw)

    def take_marked(self, key: str, *, field: str, mark_prefix: str, otherwise: str
                    ) -> tuple[JSON | None, bool]:
        raw, marked = self._run(self._take_marked, [self._k(key), self._k(otherwise)],
                                [field, self._k(mark_prefix)])
        return (None if raw is None else jsonfast.loads(raw)), bool(marked)

    def delete(self, *keys: str) -> None:
        if keys:
            self._command("DEL", *(self._k(k) for k in keys))

    def incr(self, key: str, ttl: int) -> int:
        return self.incr_many([key], ttl)[0]

    def incr_many(self, keys: Sequence[str], ttl: int,
                  amounts: Sequence[int] | None = None) -> list[int]:
        # One script (_INCR_MANY), not a pipeline of INCRBY and EXPIRE NX: each counter and
        # its expiry are written atomically, and without EXPIRE NX, which needs Redis 7 (the
        # hub asks for 6.2). In-process it costs 40-44 µs of CPU against 44-48 µs for the
        # pipeline: no difference that the bench can see (bench/README.md, thirteenth session).
        values, _ = self._counted(keys, ttl, amounts, None)
        return values

    def incr_many_and_get(self, keys: Sequence[str], ttl: int, amounts: Sequence[int] | None,
                          read: str) -> tuple[list[int], JSON | None]:
        return self._counted(keys, ttl, amounts, read)

    def _counted(self, keys: Sequence[str], ttl: int, amounts: Sequence[int] | None,
                 read: str | None) -> tuple[list[int], JSON | None]:
        """_INCR_MANY on ``keys``, and ``read`` got in the same script when given."""
        if amounts is not None and len(amounts) != len(keys):
            raise ValueError("one amount per key")
        script_keys = [self._k(k) for k in keys]
        if read is not None:
            script_keys.append(self._k(read))
        replies = self._run(self._incr_many, script_keys,
                            [ttl, 0 if read is None else 1, *(amounts or [1] * len(keys))])
        raw = replies.pop() if read is not None else None
        return [int(v) for v in replies], (None if raw is None else jsonfast.loads(raw))

    def count(self, key: str) -> int:
        raw = self._command("GET", self._k(key))
        return int(raw) if raw is not None else 0

    def ping(self) -> bool:
        return bool(self._redis.ping())


def store_unavailable(error: BaseException) -> bool:
    """Redis lost or refused (answered 503: try again), or up but refusing writes for a
    while: out of memory (``maxmemory`` with ``noeviction``), a replica after a failover
    (``READONLY``) or a snapshot that failed with ``stop-writes-on-bgsave-error``
    (``MISCONF``). Not a bug in a command."""
    import redis

    if isinstance(error, redis.ConnectionError | redis.TimeoutError
                  | redis.exceptions.OutOfMemoryError | redis.exceptions.ReadOnlyError):
        return True
    return isinstance(error, redis.ResponseError) and str(error).startswith("MISCONF")


def open_store(url: str | None) -> ShortLivedStore:
    """``None`` or ``memory://`` gives the in-process store; ``redis://`` a Redis store."""
    if not url or url.startswith("memory:"):
        return MemoryStore()
    return RedisStore(url)
