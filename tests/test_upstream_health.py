"""An upstream that fails call after call is taken as down, in every worker, and comes back.

The rules on a fake clock (in-process store) and on the real Redis that workers share; then
end to end, the real upstream OP behind the real proxy (tests/tamper_proxy.py) that answers
503 in its ``down`` mode, a directory whose port is closed, and forged callbacks at the real
OP that must not take it down.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.health import HealthPolicy, UpstreamDown, UpstreamHealth
from kernel.store import MemoryStore, RedisStore
from tests import servers
from tests.conftest import hub_config
from tests.flows import (
    UPSTREAM_CLIENT_ID,
    UPSTREAM_SECRET,
    AuthRequest,
    metric,
    path_of,
    query,
    start_login,
    upstream_login,
)
from tests.tamper_proxy import TamperProxy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = HealthPolicy(failures=3, down_seconds=30, probe_seconds=20)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> UpstreamHealth:
    return UpstreamHealth(MemoryStore(clock=clock), {"op": POLICY})


def test_failures_in_a_row_take_the_upstream_down(health, caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    for _ in range(2):
        health.failed("op")
        assert health.admit("op", "Example ID") is False
    health.failed("op")
    assert health.down(["op", "other"]) == {"op"}
    with pytest.raises(UpstreamDown) as refused:
        health.admit("op", "Example ID")
    assert refused.value.status_code == 503 and refused.value.retry_after == 30
    assert "Example ID is not answering right now" in refused.value.public_message
    with pytest.raises(UpstreamDown):
        health.refuse_if_down("op", "Example ID")
    assert any("upstream op is down: 3 calls in a row failed" in r.getMessage()
               for r in caplog.records)


def test_an_answer_between_failures_starts_the_count_again(health):
    for _ in range(5):
        health.failed("op")
        health.failed("op")
        health.answered("op")
    assert health.down(["op"]) == set()
    assert health.admit("op", "Example ID") is False


def test_failures_spread_over_more_than_the_window_do_not_count_together(health, clock):
    health.failed("op")
    health.failed("op")
    clock.now += 61  # broker.health.WINDOW_SECONDS
    health.failed("op")
    assert health.down(["op"]) == set()


def test_after_down_seconds_one_login_probes_and_a_failed_probe_is_down_again(health, clock,
                                                                              caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    for _ in range(3):
        health.failed("op")
    clock.now += 61  # down for 30 s, and the failures' window (60 s) has run out too
    assert health.down(["op"]) == set()  # the page offers it again
    assert health.admit("op", "Example ID") is True  # the probe
    with pytest.raises(UpstreamDown):  # one at a time
        health.admit("op", "Example ID")
    health.failed("op")  # the probe's call failed: this one failure is enough
    assert health.down(["op"]) == {"op"}
    assert any("the login trying it failed too" in r.getMessage() for r in caplog.records)
    clock.now += 31
    assert health.admit("op", "Example ID") is True  # a new probe, the last one's released
    health.failed("op")
    assert health.down(["op"]) == {"op"}


def test_a_probe_that_answers_brings_the_upstream_back(health, clock, caplog):
    caplog.set_level(logging.WARNING, logger="civitas")
    for _ in range(3):
        health.failed("op")
    clock.now += 31
    assert health.admit("op", "Example ID") is True
    health.answered("op")
    assert any("upstream op answers again" in r.getMessage() for r in caplog.records)
    assert [health.admit("op", "Example ID") for _ in range(3)] == [False] * 3
    health.failed("op")  # one failure after coming back is one of three again
    assert health.down(["op"]) == set()


def test_a_probe_that_never_reports_is_replaced_after_its_lease(health, clock):
    for _ in range(3):
        health.failed("op")
    clock.now += 31
    assert health.admit("op", "Example ID") is True  # its worker dies with it
    clock.now += 21  # POLICY.probe_seconds
    assert health.admit("op", "Example ID") is True


def test_an_answer_while_down_brings_it_back_at_once(health):
    """A callback's call (let through while down) that gets its answer."""
    for _ in range(3):
        health.failed("op")
    health.answered("op")
    assert health.down(["op"]) == set() and health.admit("op", "Example ID") is False


def test_zero_failures_means_never_down(clock):
    health = UpstreamHealth(MemoryStore(clock=clock), {"op": HealthPolicy(failures=0)})
    for _ in range(50):
        health.failed("op")
    assert health.down(["op"]) == set() and health.admit("op", "Example ID") is False


def test_workers_share_the_state_through_redis(redis_url):
    """Two workers (two stores on the real Redis): what one sees fail, the other refuses."""
    prefix = f"t-{secrets.token_hex(4)}:"
    one = UpstreamHealth(RedisStore(redis_url, prefix=prefix), {"op": POLICY})
    two = UpstreamHealth(RedisStore(redis_url, prefix=prefix), {"op": POLICY})
    one.failed("op")
    two.failed("op")
    one.failed("op")
    with pytest.raises(UpstreamDown):
        two.admit("op", "Example ID")
    assert two.down(["op"]) == {"op"}
    two.answered("op")
    assert one.down(["op"]) == set() and one.admit("op", "Example ID") is False


# -- end to end ---------------------------------------------------------------------------


@pytest.fixture
def proxy(upstream_issuer) -> Iterator[TamperProxy]:
    with TamperProxy(upstream_issuer).running() as p:
        yield p


def _choice_page(client) -> str:
    r = client.get(AuthRequest().url())
    r = client.get(path_of(r.headers["Location"]))
    assert r.status_code == 200
    return str(r.get_data(as_text=True))


def _start(client, upstream_id: str) -> Any:
    r = client.get(AuthRequest().url())
    flow = query(r.headers["Location"])["flow"]
    return client.get(f"/login/{upstream_id}/start?flow={flow}")


def _logins(outcome: str, upstream: str = "op-proxy") -> float:
    return metric("civitas_logins_total", upstream=upstream, outcome=outcome)


def test_a_failing_upstream_is_down_for_every_citizen_until_a_probe_finds_it_back(
        proxy, upstream_issuer, tmp_path, caplog):
    from civitas.app import create_app

    caplog.set_level(logging.WARNING, logger="civitas")
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/h.db", upstreams=[
        {"kind": "oidc", "id": "op-proxy", "display_name": "Proxied ID", "issuer": proxy.url,
         "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
         "down_after_failures": 2, "down_seconds": 1},
        {"kind": "oidc", "id": "op", "display_name": "Example ID", "issuer": upstream_issuer,
         "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET},
    ]))
    downs = metric("civitas_upstream_down_total", upstream="op-proxy")

    # two citizens are at the upstream (its discovery document is cached by then) when its
    # server starts failing: their callbacks find it out, each with the usual 502 page
    citizens = [app.test_client() for _ in range(2)]
    callbacks = [path_of(proxy.as_issuer(upstream_login(start_login(c, AuthRequest(),
                                                                    "op-proxy"))))
                 for c in citizens]
    proxy.mode = "down"
    for citizen, callback in zip(citizens, callbacks, strict=True):
        r = citizen.get(callback)
        assert r.status_code == 502 and "could not be reached" in r.get_data(as_text=True)
    assert metric("civitas_upstream_down_total", upstream="op-proxy") == downs + 1
    calls = len(proxy.seen)

    # now every citizen is told at once, without the upstream being called
    page = _choice_page(app.test_client())
    assert "Proxied ID is not answering right now" in page and "or choose another way" in page
    assert "/login/op-proxy/start" not in page and "/login/op/start" in page
    refused_before = _logins("down")
    r = _start(app.test_client(), "op-proxy")
    body = r.get_data(as_text=True)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "Proxied ID is not answering right now" in body
    assert r.headers["X-Request-Id"] in body and "Traceback" not in body
    assert _logins("down") == refused_before + 1
    assert len(proxy.seen) == calls
    # the other upstream is not affected
    assert _start(app.test_client(), "op").status_code == 303

    # after down_seconds one login tries it: afresh, not from the cached document (which
    # would let it through and take the upstream as back); it still fails, so it is down
    # again at once
    time.sleep(1.1)
    assert _start(app.test_client(), "op-proxy").status_code == 502
    assert proxy.seen[calls:] == ["/.well-known/openid-configuration"]
    assert _start(app.test_client(), "op-proxy").status_code == 503
    assert any("upstream op-proxy is down: the login trying it failed too" in r.getMessage()
               for r in caplog.records)

    # the upstream recovers: the next probe finds it back, and every login goes through
    proxy.mode = "pass"
    time.sleep(1.1)
    for _ in range(3):
        r = _start(app.test_client(), "op-proxy")
        assert r.status_code == 303 and r.headers["Location"].startswith(upstream_issuer)
    assert any("upstream op-proxy answers again" in r.getMessage() for r in caplog.records)
    assert "/login/op-proxy/start" in _choice_page(app.test_client())


def test_a_directory_that_cannot_be_reached_is_down_before_the_password_form(upstream_issuer,
                                                                            tmp_path):
    from civitas.app import create_app

    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/l.db", upstreams=[
        {"kind": "ldap", "id": "staff", "display_name": "Staff Directory",
         "url": f"ldap://127.0.0.1:{servers.free_port()}",  # nothing listens there
         "user_dn_template": "uid={username},ou=people,dc=example,dc=org",
         "timeout_seconds": 1, "down_after_failures": 2, "down_seconds": 60},
    ]))
    for _ in range(2):
        client = app.test_client()
        r = _start(client, "staff")
        assert r.status_code == 200  # the form
        fields = dict(re.findall(r'name="(csrf|flow)" value="([^"]*)"', r.get_data(as_text=True)))
        r = client.post("/login/staff/password",
                        data={**fields, "username": "alice", "password": "pw"})
        assert r.status_code == 502 and "could not be reached" in r.get_data(as_text=True)
    page = _choice_page(app.test_client())
    assert "Staff Directory is not answering right now. Please try again in a minute." in page
    assert "/login/staff/start" not in page
    r = _start(app.test_client(), "staff")  # before anyone types a password
    assert r.status_code == 503 and r.headers["Retry-After"] == "60"
    assert 'type="password"' not in r.get_data(as_text=True)


@pytest.mark.parametrize(("forged", "status", "outcome"), [
    # a made-up code: the upstream answers (invalid_grant); refused there, the citizen is
    # back at the choice (303 to /login) to try another way or cancel
    ({"code": "forged"}, 303, "rejected"),
    # an iss of another issuer (RFC 9207): refused by the hub's own check, nothing is called
    ({"code": "forged", "iss": "http://127.0.0.1:1/evil"}, 502, "invalid"),
    # an error said to come from the upstream
    ({"error": "temporarily_unavailable"}, 303, "rejected"),
])
def test_forged_callbacks_cannot_take_an_upstream_down(client, upstream_issuer, forged, status,
                                                       outcome):
    """Callbacks with a state of the forger's own login and a made-up answer: none is a call
    that failed to reach the upstream, so none counts towards taking it down."""
    counted = _logins(outcome, "op")
    for _ in range(8):  # more than the default down_after_failures (5)
        url = start_login(client, AuthRequest(), "op")
        r = client.get("/login/op/callback?" + urlencode({
            "state": query(url)["state"], "iss": upstream_issuer, **forged}))
        assert r.status_code == status, r.get_data(as_text=True)[:600]
    assert _logins(outcome, "op") == counted + 8  # each refused for what it is
    page = _choice_page(client.application.test_client())
    assert "/login/op/start" in page and "not answering" not in page


def test_a_callback_is_let_through_while_its_upstream_is_down(proxy, upstream_issuer, tmp_path,
                                                             caplog):
    """A citizen who went to the upstream before it was taken as down comes back while it is:
    the callback is not refused (its answer may well come), and when it comes the upstream is
    back for everyone."""
    from civitas.app import create_app

    caplog.set_level(logging.WARNING, logger="civitas")
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/cb.db", upstreams=[
        {"kind": "oidc", "id": "op-proxy", "display_name": "Proxied ID", "issuer": proxy.url,
         "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
         "down_after_failures": 2, "down_seconds": 600},
    ]))
    citizens = [app.test_client() for _ in range(3)]
    callbacks = [path_of(proxy.as_issuer(upstream_login(start_login(c, AuthRequest(),
                                                                    "op-proxy"))))
                 for c in citizens]
    proxy.mode = "down"
    for citizen, callback in zip(citizens[:2], callbacks[:2], strict=True):
        assert citizen.get(callback).status_code == 502
    assert _start(app.test_client(), "op-proxy").status_code == 503  # down, for 600 s

    proxy.mode = "pass"
    r = citizens[2].get(callbacks[2])
    assert r.status_code == 303 and "/login/" not in r.headers["Location"], r.status_code
    assert any("upstream op-proxy answers again" in r.getMessage() for r in caplog.records)
    r = _start(app.test_client(), "op-proxy")
    assert r.status_code == 303 and r.headers["Location"].startswith(upstream_issuer)
