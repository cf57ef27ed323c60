"""Storage conformance: the short-lived store (in-process and a real Redis) and the SQL
storage (SQLite and a real PostgreSQL) behave the same."""

from __future__ import annotations

import functools
import gc
import re
import secrets
import threading
import time

import pytest
from sqlalchemy import text

from civitas.app import create_app, stop_background
from connectors import UpstreamIdentity
from kernel.store import MemoryStore, RedisStore
from tests.conftest import hub_config, in_forked_child
from tests.flows import AuthRequest, full_login, query, redeem

# -- the short-lived store ------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"t{secrets.token_hex(4)}:")


def test_store_put_get_delete(store):
    store.put("a", {"x": 1, "y": [1, "two"]}, 30)
    assert store.get("a") == {"x": 1, "y": [1, "two"]}
    store.delete("a")
    assert store.get("a") is None
    assert store.ping()


def test_redis_replies_are_parsed_by_hiredis(redis_url):
    """The compiled parser the dependency pins (redis[hiredis]) is the one in use."""
    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("a", {"x": 1}, 30)
    assert store.get("a") == {"x": 1}
    connection = store._redis.connection_pool.get_connection()  # noqa: SLF001
    try:
        assert "Hiredis" in type(connection._parser).__name__  # noqa: SLF001
    finally:
        store._redis.connection_pool.release(connection)  # noqa: SLF001


def test_redis_pool_asks_for_the_process_id_only_after_a_fork(redis_url, monkeypatch):
    """redis-py's own pool calls os.getpid() twice per command to notice a fork; the
    store's pool is told of forks (os.register_at_fork) and asks nothing until one."""
    import os

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("warm", {}, 30)  # the pool's first check is a real one
    calls = []
    real = os.getpid
    # earlier tests' connections, collected meanwhile, would ask it as they close
    gc.collect()
    gc.disable()
    try:
        monkeypatch.setattr(os, "getpid", lambda: calls.append(1) or real())
        for n in range(10):
            store.put(f"k{n}", {"n": n}, 30)
            assert store.get(f"k{n}") == {"n": n}
    finally:
        gc.enable()
    assert calls == []


def test_redis_store_in_a_forked_child_opens_its_own_connections(redis_url):
    """A worker forked after the store was used (gunicorn's master, preloading) must not
    share its parent's sockets: in the child the store opens its own connections (Redis
    gives each its own CLIENT ID), and both processes' commands get their own replies."""
    import os

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("parent", {"who": "parent"}, 60)
    parent_id = store._command("CLIENT", "ID")  # noqa: SLF001
    pool = store._redis.connection_pool  # noqa: SLF001
    store.take_members("warm")  # redis-py's own pool (pipelines) has a connection too
    parent_connections = list(pool._available_connections)  # noqa: SLF001
    assert parent_connections

    def child() -> bool:
        store.put("child", {"who": "child"}, 60)
        store.take_members("warm")
        return (store.get("parent") == {"who": "parent"}
                and store._command("CLIENT", "ID") != parent_id  # noqa: SLF001
                and pool.pid == os.getpid()
                and not any(c in pool._available_connections  # noqa: SLF001
                            for c in parent_connections))

    assert in_forked_child(child)
    assert store.get("child") == {"who": "child"}
    assert store._command("CLIENT", "ID") == parent_id  # noqa: SLF001  (still its own)
    assert pool.pid == os.getpid() and parent_connections[0] in pool._available_connections  # noqa: SLF001


def test_redis_reply_that_comes_too_late_never_answers_a_later_command(redis_url):
    """A command that timed out may still get its reply; the connection it was sent on is
    closed, never handed to the next command, which would read that reply as its own."""
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:", timeout=0.3)
    store.put("mine", {"v": 1}, 60)
    with pytest.raises(redis.exceptions.TimeoutError):
        store._command("BLPOP", store._k("empty"), "1")  # noqa: SLF001  (Redis answers in 1 s)
    # at once: on that connection Redis would answer only after the BLPOP's nil
    assert store.get("mine") == {"v": 1}
    time.sleep(1.2)  # the nil has been sent by now, to a closed socket
    for _ in range(3):
        assert store.get("mine") == {"v": 1}


def test_redis_connection_closed_by_the_server_is_opened_again(redis_url):
    """Redis restarted, or closed an idle client (``timeout`` in redis.conf): the next
    command reconnects instead of failing, as redis-py's pool does at checkout."""
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("k", {"v": 1}, 60)
    first = store._command("CLIENT", "ID")  # noqa: SLF001
    assert redis.Redis.from_url(redis_url).client_kill_filter(_id=first) == 1
    assert store.get("k") == {"v": 1}
    assert store._command("CLIENT", "ID") != first  # noqa: SLF001


def test_redis_error_reply_leaves_the_connection_in_use(redis_url):
    """An error reply (here INCR of a JSON value) is a whole reply: it is raised as
    redis-py raises it, and the connection stays open for the next command."""
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("json", {"v": 1}, 60)
    before = store._command("CLIENT", "ID")  # noqa: SLF001
    with pytest.raises(redis.exceptions.ResponseError):
        store._command("INCR", store._k("json"))  # noqa: SLF001
    assert store.get("json") == {"v": 1}
    assert store._command("CLIENT", "ID") == before  # noqa: SLF001


def test_redis_store_threads_each_get_their_own_replies(redis_url):
    """Threads share the store's connections, one command at a time on each: every
    thread reads back its own values, never another's."""
    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    wrong: list[tuple[int, int]] = []

    def work(t: int) -> None:
        for n in range(150):
            store.put(f"{t}-{n}", {"t": t, "n": n}, 60)
            if store.get(f"{t}-{n}") != {"t": t, "n": n}:
                wrong.append((t, n))
            if store.incr_many([f"c{t}"], 60) != [n + 1]:
                wrong.append((t, -n))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_redis_put_many_survives_a_flushed_script_cache(redis_url):
    """A Redis restart or failover forgets loaded scripts (NOSCRIPT): the store's script is
    loaded again and the write goes through, once, with nothing lost or doubled."""
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    assert store.put_many([("before", {"n": 1}, 60)], new=("guard-1", {}, 60))
    redis.Redis.from_url(redis_url).script_flush()
    assert store.put_many([("after", {"n": 2}, 60)], members=[("set", "a", 60)],
                          new=("guard-2", {}, 60))
    assert store.get_many(["before", "after"]) == [{"n": 1}, {"n": 2}]
    assert store.take_members("set") == {"a"}
    assert not store.put_many([("again", {"n": 3}, 60)], new=("guard-2", {}, 60))


def test_store_expiry(store):
    store.put("short", {"v": 1}, 1)
    assert store.get("short") == {"v": 1}
    time.sleep(1.2)
    assert store.get("short") is None
    assert store.take("short") is None


def test_store_put_new_only_once(store):
    assert store.put_new("once", {"n": 1}, 30) is True
    assert store.put_new("once", {"n": 2}, 30) is False
    assert store.get("once") == {"n": 1}


def test_store_take_is_atomic_under_contention(store):
    for round_ in range(5):
        key = f"code-{round_}"
        store.put(key, {"round": round_}, 30)
        barrier = threading.Barrier(16)
        results = []

        def taker(barrier=barrier, results=results, key=key):
            barrier.wait()
            results.append(store.take(key))

        threads = [threading.Thread(target=taker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert winners == [{"round": round_}]


def test_store_take_marked_reads_the_mark_the_value_names(store):
    store.put("code:a", {"sid": "s1", "n": 1}, 30)
    store.put("code:b", {"sid": "s2", "n": 2}, 30)
    store.put("code:c", {"sid": "", "n": 3}, 30)
    store.put("code:d", {"n": 4}, 30)
    store.put("code:e", {"sid": 7, "n": 5}, 30)
    store.put("ended:s1", {}, 30)
    store.put("issued:x", {}, 30)
    take = functools.partial(store.take_marked, field="sid", mark_prefix="ended:",
                             otherwise="issued:x")
    assert take("code:a") == ({"sid": "s1", "n": 1}, True)
    assert take("code:b") == ({"sid": "s2", "n": 2}, False)
    assert take("code:c") == ({"sid": "", "n": 3}, False)  # no name: no mark to look at
    assert take("code:d") == ({"n": 4}, False)
    assert take("code:e") == ({"sid": 7, "n": 5}, False)  # not a string: none either
    # taken: gone, and then it tells whether ``otherwise`` exists
    assert take("code:a") == (None, True)
    assert store.take_marked("code:a", field="sid", mark_prefix="ended:",
                             otherwise="issued:never") == (None, False)
    assert store.get("ended:s1") == {} and store.get("issued:x") == {}  # only read


def test_store_take_marked_gives_a_value_to_one_taker_only(store):
    store.put("code:race", {"sid": "s"}, 30)
    barrier = threading.Barrier(16)
    results = []

    def taker():
        barrier.wait()
        results.append(store.take_marked("code:race", field="sid", mark_prefix="ended:",
                                         otherwise="code:race"))

    threads = [threading.Thread(target=taker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=repr) == sorted(
        [({"sid": "s"}, False)] + [(None, False)] * 15, key=repr)


def test_store_take_deletes_the_other_keys_with_it(store):
    """``take(key, *also)``: the value, and the other keys gone, whether the taken key was
    there or not."""
    for there in (True, False):
        if there:
            store.put("mark", {"v": 1}, 60)
        store.put("a", 1, 60)
        store.incr("b", 60)
        assert store.take("mark", "a", "b", "absent") == ({"v": 1} if there else None)
        assert (store.get("mark"), store.get("a"), store.count("b")) == (None, None, 0)


def test_redis_take_with_others_is_one_round_trip_and_survives_a_flushed_script_cache(
        redis_url, monkeypatch):
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("mark", {"v": 1}, 60)
    store.put("a", 1, 60)
    redis.Redis.from_url(redis_url).script_flush()
    assert store.take("mark", "a") == {"v": 1}  # the script loaded again
    store.put("mark", {"v": 2}, 60)
    store.put("a", 1, 60)
    sent: list[str] = []
    real = store._command

    def counting(*args):
        sent.append(args[0])
        return real(*args)

    monkeypatch.setattr(store, "_command", counting)
    assert store.take("mark", "a") == {"v": 2}
    assert sent == ["EVALSHA"]
    monkeypatch.undo()
    assert store.get("a") is None


def test_redis_take_marked_survives_a_flushed_script_cache(redis_url):
    import redis

    store = RedisStore(redis_url, prefix=f"t{secrets.token_hex(4)}:")
    store.put("code", {"sid": "s"}, 60)
    store.put("ended:s", {}, 60)
    redis.Redis.from_url(redis_url).script_flush()
    assert store.take_marked("code", field="sid", mark_prefix="ended:",
                             otherwise="x") == ({"sid": "s"}, True)
    assert store.get("code") is None


def test_store_incr_counts_and_expires(store):
    assert [store.incr("ctr", 1) for _ in range(3)] == [1, 2, 3]
    time.sleep(1.2)
    assert store.incr("ctr", 1) == 1


def test_store_incr_window_starts_at_the_first_increment(store):
    """A fixed window: later increments do not push its end back."""
    assert store.incr_many(["w", "v"], 2, [1, 5]) == [1, 5]
    time.sleep(1.1)
    assert store.incr_many(["w", "v"], 2, [1, 5]) == [2, 10]
    time.sleep(1.1)
    assert store.incr_many(["w", "v"], 2, [1, 5]) == [1, 5]
    with pytest.raises(ValueError):
        store.incr_many(["w", "v"], 2, [1])


def test_redis_incr_survives_a_flushed_script_cache_and_mends_a_counter_without_expiry(
        redis_url):
    """The counters' script is loaded again after a Redis restart or failover (NOSCRIPT),
    and a counter left without an expiry (written by hand, say) gets the window's."""
    import redis

    prefix = f"t{secrets.token_hex(4)}:"
    store = RedisStore(redis_url, prefix=prefix)
    assert store.incr("c", 60) == 1
    raw = redis.Redis.from_url(redis_url)
    raw.script_flush()
    assert store.incr("c", 60) == 2
    raw.set(prefix + "bare", 7)
    assert store.incr("bare", 60) == 8
    assert 0 < raw.ttl(prefix + "bare") <= 60 and 0 < raw.ttl(prefix + "c") <= 60


# -- SQL storage ------------------------------------------------------------------------------




def test_migrations_match_models(sql_hub):
    """Alembic's head equals the models: autogenerate finds nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from kernel.db import Base

    with sql_hub.db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_concurrent_first_logins_create_one_account(sql_hub):
    identity = UpstreamIdentity(connector_id="op", subject="race-1",
                                attributes={"email": "r@example.org"}, acr="a")
    barrier = threading.Barrier(8)
    results = []

    def login():
        barrier.wait()
        results.append(sql_hub.accounts.resolve(identity))

    threads = [threading.Thread(target=login) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.account_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert sql_hub.accounts.attributes(results[0].account_id) == {"email": "r@example.org"}


def test_agency_registry_round_trip(sql_hub):
    from idp.errors import AgencyRegistrationError

    row, secret = sql_hub.agencies.add(client_id="new-agency", name="New",
                                        redirect_uris=["https://new.example/cb"])
    assert len(secret) >= 40 and secret not in row.secret_hash
    client = sql_hub.agencies.client("new-agency")
    assert client.check_client_secret(secret) and not client.check_client_secret("x" * 43)
    assert client.sector_identifier == "new.example"
    with pytest.raises(AgencyRegistrationError, match="already registered"):
        sql_hub.agencies.add(client_id="new-agency", name="Again",
                             redirect_uris=["https://new.example/cb"])
    assert "new-agency" in {a.client_id for a in sql_hub.agencies.list()}
    assert sql_hub.agencies.remove("new-agency") and sql_hub.agencies.get("new-agency") is None


def test_keys_survive_restart_and_rotation_keeps_old_key_published(sql_hub, upstream_issuer,
                                                                    database_url):
    from datetime import timedelta

    before = {k["kid"] for k in sql_hub.keys.jwks()["keys"]}
    signing_before = sql_hub.keys.signing_key("ES256").kid
    new = sql_hub.keys.rotate("ES256", lead_time=timedelta(0), retire_after=timedelta(hours=1))
    after = {k["kid"] for k in sql_hub.keys.jwks()["keys"]}
    assert before < after and new.kid in after
    assert sql_hub.keys.signing_key("ES256").kid == new.kid != signing_before
    # private parts are encrypted at rest
    with sql_hub.db.engine.connect() as conn:
        stored = conn.execute(text("select private_jwk_encrypted from signing_keys")).scalars()
        assert all('"d"' not in s for s in stored)
    # a restart: a new hub on the same database (and encryption key) publishes the same
    # keys, the rotated-out one included, and signs with the key it signed with before
    key = sql_hub.settings.encryption_key.get_secret_value()
    restarted = create_app(hub_config(upstream_issuer, database_url, encryption_key=key))
    try:
        keys = restarted.extensions["civitas"].keys
        assert {k["kid"] for k in keys.jwks()["keys"]} == after
        assert keys.signing_key("ES256").kid == new.kid
    finally:
        stop_background(restarted)
        restarted.extensions["civitas"].db.dispose()


def test_full_login_on_this_database_with_redis(upstream_issuer, database_url, redis_url):
    import hashlib

    import redis

    app = create_app(hub_config(upstream_issuer, database_url, redis_url=redis_url))
    try:
        # the short-lived state is on the Redis, not in the process: the store is a
        # RedisStore, and the browser session is a key there
        assert isinstance(app.extensions["civitas"].store, RedisStore)
        raw = redis.Redis.from_url(redis_url)
        client = app.test_client()
        auth = AuthRequest()
        params = full_login(client, auth)
        sid = client.get_cookie("civitas_session").value
        session_key = "civitas:session:" + hashlib.sha256(sid.encode()).hexdigest()
        assert raw.exists(session_key) == 1
        r = redeem(client, auth, params["code"])
        assert r.status_code == 200 and r.json["id_token"]
        bearer = {"Authorization": "Bearer " + r.json["access_token"]}
        assert client.get("/userinfo", headers=bearer).json["email"] == "alice@example.org"
        assert redeem(client, auth, params["code"]).json["error"] == "invalid_grant"
        # the reuse revoked the access token issued from that code (RFC 6749 4.1.2)
        r = client.get("/userinfo", headers=bearer)
        assert r.status_code == 401 and r.json["error"] == "invalid_token"
        # a code whose hub session ended before it was redeemed gets no tokens (the code
        # and its session's mark are read in one script)
        auth = AuthRequest()
        code = query(client.get(auth.url()).headers["Location"])["code"]
        page = client.get("/account").get_data(as_text=True)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        # the session ended in Redis, not only in the browser: its cookie, sent again,
        # is no login
        assert raw.exists(session_key) == 0
        client.set_cookie("civitas_session", sid, domain="localhost")
        assert client.get("/account").status_code == 302
        r = redeem(client, auth, code)
        assert r.status_code == 400 and r.json["error"] == "invalid_grant"
        assert redeem(client, auth, code).json["error"] == "invalid_grant"  # and it is gone
    finally:
        app.extensions["civitas"].db.dispose()


def test_store_count_reads_counters(store):
    assert store.count("nothing") == 0
    store.incr("c", 30)
    store.incr("c", 30)
    assert store.count("c") == 2


def test_store_put_many_and_member_sets(store):
    store.put_many([("pm-a", {"v": 1}, 60), ("pm-b", {"v": 2}, 60)])
    assert store.get_many(["pm-a", "pm-b", "pm-none"]) == [{"v": 1}, {"v": 2}, None]
    store.put_many([], members=[("set-x", "one", 60)])
    store.put_many([], members=[("set-x", "two", 60)])
    store.put_many([], members=[("set-x", "one", 60)])
    assert store.take_members("set-x") == {"one", "two"}
    assert store.take_members("set-x") == set()
    store.put_many([], members=[("set-y", "gone", 1)])
    time.sleep(1.2)
    assert store.take_members("set-y") == set()


def test_store_put_many_writes_values_and_sets_together_behind_a_guard(store):
    """The authorization code's one round trip: its values, the session's participants and
    its nonce as a guard. A guard that is there already means nothing is written at all."""
    assert store.put_many([("g-code", {"c": 1}, 60)], members=[("g-set", "agency-a", 60)],
                          new=("g-nonce", {}, 60)) is True
    assert store.get_many(["g-code", "g-nonce"]) == [{"c": 1}, {}]
    again = store.put_many([("g-code-2", {"c": 2}, 60)], members=[("g-set", "agency-b", 60)],
                           new=("g-nonce", {}, 60))
    assert again is False
    assert store.get("g-code-2") is None
    assert store.take_members("g-set") == {"agency-a"}
    # no guard: always written; several sets at once
    assert store.put_many([], members=[("g-s1", "x", 60), ("g-s2", "y", 60)]) is True
    assert (store.take_members("g-s1"), store.take_members("g-s2")) == ({"x"}, {"y"})
    # the guard's expiry is its own: once it has gone, the next write goes through
    store.put_many([], new=("g-short", {}, 1))
    time.sleep(1.2)
    assert store.put_many([("g-after", {"c": 3}, 60)], new=("g-short", {}, 60)) is True
    assert store.get("g-after") == {"c": 3}


def test_store_put_many_guard_lets_one_of_many_racing_writers_through(store):
    """Two authorization requests with one nonce at the same moment: exactly one code."""
    import threading

    barrier = threading.Barrier(8)
    won: list[int] = []

    def write(i: int) -> None:
        barrier.wait()
        if store.put_many([(f"race-code-{i}", {"i": i}, 60)], new=("race-nonce", {}, 60)):
            won.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert [store.get(f"race-code-{i}") is not None for i in range(8)].count(True) == 1
