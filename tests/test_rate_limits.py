"""Rate limits per client address and per agency (issue 7) on the token, decision and login
endpoints: 429 with Retry-After (RFC 6585 section 4), counted in the shared store."""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import pytest

from kernel.ratelimit import Limit, RateLimited, RateLimiter, batch_for
from kernel.store import MemoryStore, RedisStore
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login, within_one_window

#: a well-formed code exchange with a code that does not exist: invalid_grant
REFRESH = {"grant_type": "authorization_code", "code": "not-a-code",
           "redirect_uri": AGENCY_ONE.redirect_uri, "code_verifier": "v" * 43}


def basic(agency: Any, secret: str | None = None) -> dict[str, str]:
    cred = f"{agency.client_id}:{secret or agency.secret}".encode()
    return {"Authorization": "Basic " + base64.b64encode(cred).decode()}


def limited_hub(make_hub: Any, **limits: int) -> Any:
    base = {"token_per_agency": 0, "token_per_address": 0, "decision_per_agency": 0,
            "decision_per_address": 0, "login_per_address": 0}
    app = make_hub(rate_limits={**base, **limits})
    within_one_window()  # the test's requests all counted in one window
    return app


def from_address(app: Any, address: str) -> Any:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def assert_limited_json(r: Any) -> None:
    assert r.status_code == 429, r.get_data(as_text=True)
    assert r.is_json and r.json["error"] == "rate_limited", r.json
    assert "retry after" in r.json["error_description"].lower() or \
        "wait" in r.json["error_description"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["Cache-Control"] == "no-store"


def test_token_endpoint_limit_per_address_answers_429_and_spares_other_addresses(make_hub):
    app = limited_hub(make_hub, token_per_address=3)
    one = from_address(app, "192.0.2.10")
    for _ in range(3):
        r = one.post("/token", data=REFRESH, headers=basic(AGENCY_ONE))
        assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    assert_limited_json(one.post("/token", data=REFRESH, headers=basic(AGENCY_ONE)))
    # introspection and revocation share the token endpoints' allowance
    assert_limited_json(one.post("/introspect", data={"token": "x"}, headers=basic(AGENCY_ONE)))
    other = from_address(app, "192.0.2.11")
    r = other.post("/token", data=REFRESH, headers=basic(AGENCY_ONE))
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"


def test_token_endpoint_limit_per_agency_counts_only_authenticated_requests(make_hub):
    app = limited_hub(make_hub, token_per_agency=2)
    client = app.test_client()
    # Someone who only knows agency one's client_id cannot spend its allowance.
    for _ in range(5):
        r = client.post("/token", data=REFRESH, headers=basic(AGENCY_ONE, "wrong-secret"))
        assert r.status_code == 401 and r.json["error"] == "invalid_client"
    for _ in range(2):
        r = client.post("/token", data=REFRESH, headers=basic(AGENCY_ONE))
        assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    r = client.post("/token", data=REFRESH, headers=basic(AGENCY_ONE))
    assert_limited_json(r)
    assert "agency" in r.json["error_description"]
    r = client.post("/revoke", data={"token": "x"}, headers=basic(AGENCY_ONE))
    assert_limited_json(r)
    # agency two has its own allowance
    r = client.post("/token", data=REFRESH, headers=basic(AGENCY_TWO))
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"


def test_login_pages_limit_per_address_shows_a_readable_page(make_hub):
    app = limited_hub(make_hub, login_per_address=2)
    client = from_address(app, "198.51.100.7")
    assert client.get("/login").status_code == 302
    assert client.get("/authorize?client_id=agency-one").status_code == 400  # no redirect_uri
    r = client.get("/login")
    assert r.status_code == 429 and r.mimetype == "text/html"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    page = r.get_data(as_text=True)
    assert "Too many requests from your network address" in page
    assert from_address(app, "198.51.100.8").get("/login").status_code == 302


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_authorize_with_a_hub_session_counts_the_login_limit_as_the_session_is_read(
        make_hub, request, where):
    """/authorize and the other login pages of fixed path count their limit per address in
    the round trip that reads the browser session (civitas/app.py): counted once per
    request, the same 429 page when over, and the session is neither lost nor changed."""
    store = {} if where == "memory" else {"redis_url": request.getfixturevalue("redis_url")}
    app = make_hub(rate_limits={"token_per_agency": 0, "token_per_address": 0,
                                "decision_per_agency": 0, "decision_per_address": 0,
                                "login_per_address": 10}, **store)
    client = from_address(app, "198.51.100.20")
    full_login(client, AuthRequest())  # /authorize, /login, the callback: some of the 10
    hub = app.extensions["civitas"]
    assert isinstance(hub.store, MemoryStore if where == "memory" else RedisStore)
    window = int(time.time()) // hub.server.hub.limiter.window
    counted = hub.store.count(f"rl:login:addr:198.51.100.20:{window}")
    auth = AuthRequest()
    r = client.get(auth.url())
    assert r.status_code == 302 and "code=" in r.headers["Location"]  # SSO: the session read
    if int(time.time()) // hub.server.hub.limiter.window != window:
        pytest.skip("the window turned during the test")
    # counted, and once (not again by the hook that counts the other limited endpoints)
    assert hub.store.count(f"rl:login:addr:198.51.100.20:{window}") == counted + 1
    while client.get(auth.url()).status_code == 302:
        pass
    r = client.get(auth.url())
    assert r.status_code == 429 and r.mimetype == "text/html"
    assert "Too many requests from your network address" in r.get_data(as_text=True)
    assert "Set-Cookie" not in r.headers
    # the session is intact: another address (the citizen's other network) still signs in
    client.environ_base["REMOTE_ADDR"] = "198.51.100.21"
    r = client.get(AuthRequest().url())
    assert r.status_code == 302 and "code=" in r.headers["Location"]
    assert client.get("/account").status_code == 200


EVALUATION = {"subject": {"type": "user", "id": "nobody"}, "action": {"name": "use"},
              "resource": {"type": "claim", "id": "email"},
              "context": {"purpose": "service-delivery"}}


def test_decision_api_limits_per_agency_and_per_address(make_hub):
    app = limited_hub(make_hub, decision_per_agency=2, decision_per_address=3)
    client = from_address(app, "203.0.113.5")
    for _ in range(2):
        r = client.post("/access/v1/evaluation", json=EVALUATION, headers=basic(AGENCY_ONE))
        assert r.status_code == 200 and r.json["decision"] is False
    r = client.post("/access/v1/evaluation", json=EVALUATION, headers=basic(AGENCY_ONE))
    assert_limited_json(r)
    assert "this agency" in r.json["error_description"]
    # agency two from the same address: the address allowance (3) is spent by the 4th
    r = client.post("/access/v1/evaluation", json=EVALUATION, headers=basic(AGENCY_TWO))
    assert_limited_json(r)
    assert "this address" in r.json["error_description"]
    other = from_address(app, "203.0.113.6")
    r = other.post("/access/v1/evaluation", json=EVALUATION, headers=basic(AGENCY_TWO))
    assert r.status_code == 200


def test_forwarded_addresses_count_only_behind_a_trusted_proxy(make_hub):
    """X-Forwarded-For picks the counted address only with trusted_proxy_hops (else anyone
    could reset their own counter by inventing addresses)."""
    limits = {"token_per_address": 1}
    direct = limited_hub(make_hub, **limits).test_client()
    direct.post("/token", data=REFRESH, headers={**basic(AGENCY_ONE),
                                                 "X-Forwarded-For": "192.0.2.1"})
    r = direct.post("/token", data=REFRESH, headers={**basic(AGENCY_ONE),
                                                     "X-Forwarded-For": "192.0.2.2"})
    assert_limited_json(r)

    proxied = make_hub(trusted_proxy_hops=1, rate_limits={
        "token_per_address": 1, "token_per_agency": 0}).test_client()
    for address in ("192.0.2.1", "192.0.2.2"):
        r = proxied.post("/token", data=REFRESH, headers={**basic(AGENCY_ONE),
                                                          "X-Forwarded-For": address})
        assert r.status_code == 400, r.get_data(as_text=True)
    r = proxied.post("/token", data=REFRESH, headers={**basic(AGENCY_ONE),
                                                      "X-Forwarded-For": "192.0.2.1"})
    assert_limited_json(r)


def counters_after_traffic(app: Any) -> list[int]:
    """Each limit's counter in the store after 30 token requests, 3 decisions and 3 login
    pages from one address, all in one window (the test is skipped if the window turned)."""
    client = from_address(app, "192.0.2.30")
    hub = app.extensions["civitas"]
    window = int(time.time()) // hub.server.hub.limiter.window
    for _ in range(30):
        assert client.post("/token", data=REFRESH,
                           headers=basic(AGENCY_ONE)).status_code == 400
    for _ in range(3):
        assert client.post("/access/v1/evaluation", json=EVALUATION,
                           headers=basic(AGENCY_ONE)).status_code == 200
        assert client.get("/login").status_code == 302
    if int(time.time()) // hub.server.hub.limiter.window != window:
        pytest.skip("the window turned during the test")
    return [hub.store.count(f"rl:{key}:{window}") for key in (
        "token:addr:192.0.2.30", f"token:agency:{AGENCY_ONE.client_id}",
        f"decision:agency:{AGENCY_ONE.client_id}", "decision:addr:192.0.2.30",
        "login:addr:192.0.2.30")]


def test_zero_means_no_limit(make_hub):
    """0 turns a limit off: nothing is refused, and nothing is counted (the defaults are far
    above what a test sends, so a 0 taken for "the default" shows only in the counters)."""
    on = counters_after_traffic(limited_hub(make_hub, **{
        name: 1000 for name in ("token_per_agency", "token_per_address", "decision_per_agency",
                                "decision_per_address", "login_per_address")}))
    assert all(on), on  # the counters read below are the limits' own
    assert counters_after_traffic(limited_hub(make_hub)) == [0] * 5


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(request.getfixturevalue("redis_url"), prefix="rl-test:")


def test_limiter_windows_are_shared_and_restart(store):
    now = [1_000_020.0]
    first = RateLimiter(store, window_seconds=60, clock=lambda: now[0])
    second = RateLimiter(store, window_seconds=60, clock=lambda: now[0])  # another worker
    first.hit([Limit("k", 2), Limit("j", 0)])
    second.hit([Limit("k", 2)])
    with pytest.raises(RateLimited) as exc:
        first.hit([Limit("k", 2)])
    assert exc.value.key == "k" and exc.value.retry_after == 60 - 1_000_020 % 60
    now[0] += 60  # the next window
    first.hit([Limit("k", 2)])
    assert store.incr_many(["a", "b", "a"], 60) == [1, 1, 2]


def test_store_counters_add_amounts(store):
    prefix = secrets.token_hex(4)
    a, b = f"{prefix}-a", f"{prefix}-b"
    assert store.incr_many([a, b], 60, [5, 2]) == [5, 2]
    assert store.incr_many([a, b], 60) == [6, 3]


class CountingStore:
    """The store, with its counter round trips counted (a spy, not a fake)."""

    def __init__(self, store: Any) -> None:
        self.store, self.round_trips = store, 0

    def incr_many(self, *args: Any) -> list[int]:
        self.round_trips += 1
        return self.store.incr_many(*args)


def test_a_capacity_limit_is_counted_in_batches_and_stops_within_a_batch_per_worker(store):
    """exact=False (the token limit per agency): two workers share the count, each adds its
    hits to it every tenth hit; the window lets through the limit and at most a batch per
    worker more, every hit after that is refused (and still counted), and the next window
    starts again."""
    key = "agency-" + secrets.token_hex(4)
    spy = CountingStore(store)
    now = [2_000_040.0]
    workers = [RateLimiter(spy, window_seconds=60, clock=lambda: now[0])  # type: ignore[arg-type]
               for _ in range(2)]
    limit = [Limit(key, 1000, exact=False)]
    allowed, refused = 0, [0, 0]
    for i in range(1300):
        try:
            workers[i % 2].hit(limit)
            allowed += 1
            # a worker that has refused once admits nothing more in the window
            assert refused[i % 2] == 0
        except RateLimited as exc:
            assert exc.key == key
            refused[i % 2] += 1
    assert 1000 <= allowed <= 1000 + 2 * batch_for(1000), allowed
    assert sum(refused) == 1300 - allowed
    assert spy.round_trips <= 1300 // batch_for(1000) + 2  # about one hit in ten
    assert store.count(f"rl:{key}:{int(now[0]) // 60}") >= 1300 - 2 * batch_for(1000)
    now[0] += 60
    workers[0].hit(limit)  # a new window


def test_small_capacity_limits_and_address_limits_stay_exact(store):
    key = "small-" + secrets.token_hex(4)
    spy = CountingStore(store)
    limiter = RateLimiter(spy, window_seconds=60)  # type: ignore[arg-type]
    assert batch_for(150) == 1
    for _ in range(150):
        limiter.hit([Limit(key, 150, exact=False), Limit(key + "-addr", 10_000)])
    with pytest.raises(RateLimited):
        limiter.hit([Limit(key, 150, exact=False)])
    assert spy.round_trips == 151  # every hit counted in the store


def test_counters_and_a_read_in_one_round_trip(store):
    prefix = secrets.token_hex(4)
    a, b, kept = f"{prefix}-a", f"{prefix}-b", f"{prefix}-session"
    store.put(kept, {"login": {"account_id": "x"}}, 60)
    assert store.incr_many_and_get([a, b], 60, [1, 3], kept) == (
        [1, 3], {"login": {"account_id": "x"}})
    assert store.incr_many_and_get([a], 60, None, f"{prefix}-absent") == ([2], None)
    assert store.incr_many_and_get([], 60, None, kept) == ([], {"login": {"account_id": "x"}})
    assert store.count(a) == 2 and store.count(b) == 3
    with pytest.raises(ValueError):
        store.incr_many_and_get([a, b], 60, [1], kept)


def test_limiter_hit_reads_a_key_with_its_counters(store):
    prefix = secrets.token_hex(4)
    store.put(f"{prefix}-s", {"n": 1}, 60)
    limiter = RateLimiter(store, window_seconds=60, clock=lambda: 1_000_020.0)  # one window
    assert limiter.hit([Limit(f"{prefix}-k", 3)], fetch=f"{prefix}-s") == {"n": 1}
    assert limiter.hit([Limit(f"{prefix}-k", 3)], fetch=f"{prefix}-none") is None
    assert limiter.hit([Limit(f"{prefix}-k", 3)]) is None
    with pytest.raises(RateLimited):  # over: refused, as without a read
        limiter.hit([Limit(f"{prefix}-k", 3)], fetch=f"{prefix}-s")
    # no limit to count (0: off; or a batched one between its batches): still read
    assert limiter.hit([Limit(f"{prefix}-off", 0)], fetch=f"{prefix}-s") == {"n": 1}
    assert limiter.hit([Limit(f"{prefix}-cap", 5000, exact=False)],
                       fetch=f"{prefix}-s") == {"n": 1}
