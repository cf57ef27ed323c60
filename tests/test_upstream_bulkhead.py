"""An upstream that stops answering holds at most a share of a worker's threads (a bulkhead).

The real upstream OP behind a real proxy that holds its token endpoint's answers, and a real
TCP server that takes an LDAP connection and never answers: while one login waits on such an
upstream, the next through it is refused at once with a page that says to try again (503,
``Retry-After``), without the upstream being called, and the rest of the hub answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from civitas.app import make_connector
from config import settings_from_mapping
from connectors.base import Bulkhead, UpstreamBusy, UpstreamUnavailable
from connectors.ldap import LDAPConfig, LDAPConnector
from kernel.errors import ConfigError
from tests import servers
from tests.conftest import hub_config
from tests.flows import (
    UPSTREAM_CLIENT_ID,
    UPSTREAM_SECRET,
    AuthRequest,
    path_of,
    query,
    start_login,
    upstream_login,
)
from tests.tamper_proxy import TamperProxy


def test_bulkhead_refuses_the_call_past_its_size_and_gives_places_back():
    bulkhead = Bulkhead(2, wait=0)
    with bulkhead.call("busy"), bulkhead.call("busy"):
        with pytest.raises(UpstreamBusy) as refused, bulkhead.call("try later"):
            pass
        assert refused.value.public_message == "try later"
        assert refused.value.status_code == 503 and refused.value.retry_after == 60
    with pytest.raises(RuntimeError), bulkhead.call("busy"):  # a failed call gives it back
        raise RuntimeError("the upstream broke")
    with bulkhead.call("busy"), bulkhead.call("busy"):
        pass
    with pytest.raises(ValueError):
        Bulkhead(0)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hold(bulkhead: Bulkhead) -> tuple[threading.Thread, threading.Event]:
    """A call that holds a place in another thread until the returned event is set."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with bulkhead.call("busy"):
            holding.set()
            done.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread, done


def _try(bulkhead: Bulkhead, outcome: list[str]) -> threading.Thread:
    def call() -> None:
        try:
            with bulkhead.call("busy"):
                outcome.append("served")
        except UpstreamBusy:
            outcome.append("refused")

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def test_bulkhead_call_waits_for_a_place_while_the_upstream_answers_in_time():
    clock = _Clock()
    bulkhead = Bulkhead(1, wait=30, slow=1.0, clock=clock)
    holder, done = _hold(bulkhead)
    clock.now += 0.5  # the call in flight is not slow yet
    outcome: list[str] = []
    waiter = _try(bulkhead, outcome)
    waiter.join(0.2)
    assert outcome == []  # waiting for the place ...
    done.set()
    waiter.join(30)
    holder.join(30)
    assert outcome == ["served"]  # ... and served once it was given back


def test_bulkhead_refuses_at_once_while_a_call_in_flight_is_slow():
    clock = _Clock()
    bulkhead = Bulkhead(1, wait=30, slow=1.0, clock=clock)
    holder, done = _hold(bulkhead)
    clock.now += 1.0  # the call in flight has taken a second: the upstream is slow
    outcome: list[str] = []
    refused = _try(bulkhead, outcome)
    refused.join(10)  # refused without waiting for the place (30 s) to free up
    assert outcome == ["refused"]
    done.set()
    holder.join(30)
    # the slow call is gone: the next call is served at once
    served = _try(bulkhead, outcome)
    served.join(10)
    assert outcome == ["refused", "served"]


def test_bulkhead_refuses_at_once_while_any_call_in_flight_is_slow():
    """One old call among newer ones is enough: the upstream is slow for someone."""
    clock = _Clock()
    bulkhead = Bulkhead(2, wait=30, slow=1.0, clock=clock)
    old_holder, old_done = _hold(bulkhead)
    clock.now += 1.0  # the first call has taken a second ...
    new_holder, new_done = _hold(bulkhead)  # ... the second has only just begun
    outcome: list[str] = []
    refused = _try(bulkhead, outcome)
    refused.join(10)
    assert outcome == ["refused"]
    for done, holder in ((old_done, old_holder), (new_done, new_holder)):
        done.set()
        holder.join(30)


@pytest.mark.parametrize(("threads", "setting", "places"), [
    (4, None, 2), (8, None, 4), (1, None, 1), (3, None, 1), (4, 3, 3),
])
def test_places_default_to_half_the_worker_threads(upstream_issuer, threads, setting, places):
    upstream = {"kind": "oidc", "id": "op", "display_name": "Example ID",
                "issuer": upstream_issuer, "client_id": "x", "client_secret": "y"}
    if setting is not None:
        upstream["max_concurrent_calls"] = setting
    settings = settings_from_mapping(hub_config(upstream_issuer, "sqlite://",
                                                upstreams=[upstream]))
    connector = make_connector(settings.upstreams[0], threads=threads)
    assert connector.config.max_concurrent_calls == places  # type: ignore[union-attr]
    assert connector._bulkhead.size == places  # type: ignore[union-attr]  # what it enforces


def test_max_concurrent_calls_out_of_range_is_refused_by_the_settings(upstream_issuer):
    for bad in (0, 257):
        with pytest.raises(ConfigError, match=r"upstreams\[0\]\.max_concurrent_calls"):
            settings_from_mapping(hub_config(upstream_issuer, "sqlite://", upstreams=[{
                "kind": "oidc", "id": "op", "display_name": "Example ID",
                "issuer": upstream_issuer, "client_id": "x", "client_secret": "y",
                "max_concurrent_calls": bad}]))


def _busy_logins() -> float:
    return REGISTRY.get_sample_value(
        "civitas_logins_total", {"upstream": "op-proxy", "outcome": "busy"}) or 0.0


@pytest.fixture
def held_proxy(upstream_issuer) -> Iterator[TamperProxy]:
    """The real OP behind the proxy, which passes its answers on (tests/tamper_proxy.py)."""
    with TamperProxy(upstream_issuer).running() as proxy:
        yield proxy
        proxy.release.set()


def _callback(client, proxy: TamperProxy) -> str:
    """A citizen's way back from the upstream, as the hub's path."""
    return path_of(proxy.as_issuer(upstream_login(start_login(client, AuthRequest(),
                                                              "op-proxy"))))


def _signed_in(answer) -> bool:
    """The callback answered with the way on to the agency: the upstream's answer held."""
    return answer.status_code == 303 and "/login/" not in answer.headers["Location"]


def _held_then_refused(proxy: TamperProxy, path: str, first: Any, first_path: str,
                       second: Any, second_path: str) -> tuple[threading.Thread, dict, Any]:
    """The upstream holds its answers to ``path``; ``first`` waits on one in a thread (its
    answer lands in the dict once released), and ``second``, refused, gets a 503 saying
    when to try again: the thread, the dict and that refusal."""
    proxy.hold_path = path
    answers: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: answers.update(first=first.get(first_path)))
    waiting.start()
    assert proxy.held.wait(20), "the first login never reached the upstream"
    refused = second.get(second_path)
    assert refused.status_code == 503, refused.get_data(as_text=True)[:600]
    assert refused.headers["Retry-After"] == "60"
    assert "Too many people are signing in with Held ID right now" in refused.get_data(
        as_text=True)
    return waiting, answers, refused


def test_a_held_upstream_refuses_the_next_login_and_the_hub_answers(held_proxy, upstream_issuer,
                                                                    tmp_path):
    from civitas.app import create_app

    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/held.db", upstreams=[{
        "kind": "oidc", "id": "op-proxy", "display_name": "Held ID", "issuer": held_proxy.url,
        "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
        "max_concurrent_calls": 1, "timeout_seconds": 30,
    }]))
    first, second, third = app.test_client(), app.test_client(), app.test_client()
    back_first, back_second = _callback(first, held_proxy), _callback(second, held_proxy)
    busy_before = _busy_logins()

    waiting, answers, refused = _held_then_refused(held_proxy, "/token", first, back_first,
                                                   second, back_second)
    body = refused.get_data(as_text=True)
    assert "go back to the site you were using and sign in again" in body
    assert refused.headers["X-Request-Id"] in body and "Traceback" not in body
    assert "Location" not in refused.headers
    assert [p for p in held_proxy.seen if p.startswith("/token")] == ["/token"]  # not called
    assert _busy_logins() == busy_before + 1

    # the rest of the hub answers while the upstream holds a thread
    assert second.get("/healthz").status_code == 200
    assert third.get("/.well-known/openid-configuration").json["issuer"]

    held_proxy.release.set()
    waiting.join(30)
    assert not waiting.is_alive()
    assert _signed_in(answers["first"])  # the held citizen's login went through

    # the place was given back: the next login calls the upstream again
    held_proxy.hold_path = None
    later = third.get(_callback(third, held_proxy))
    assert _signed_in(later), later.get_data(as_text=True)[:600]
    assert [p for p in held_proxy.seen if p.startswith("/token")] == ["/token", "/token"]


def test_a_silent_directory_refuses_the_next_password_login():
    """A directory that takes the connection and never answers (servers.run_silent_server)."""
    with servers.run_silent_server() as (port, connected):
        connector = LDAPConnector(LDAPConfig(
            id="agency-ldap", display_name="Agency Directory", url=f"ldap://127.0.0.1:{port}",
            user_dn_template="uid={username},ou=people,dc=example,dc=org", timeout_seconds=3,
            max_concurrent_calls=1))
        outcome: list[BaseException] = []

        def first() -> None:
            try:
                connector.login("alice", "alice-password")
            except BaseException as exc:  # noqa: BLE001 - kept for the assertion below
                outcome.append(exc)

        waiting = threading.Thread(target=first)
        waiting.start()
        assert connected.wait(10)
        with pytest.raises(UpstreamBusy) as refused:
            connector.login("bob", "bob-password")
        assert "Agency Directory" in refused.value.public_message
        assert "try again" in refused.value.public_message
        waiting.join(30)
        # the first login was the one that waited, and it ended with the directory's timeout
        assert len(outcome) == 1 and isinstance(outcome[0], UpstreamUnavailable)
        assert not isinstance(outcome[0], UpstreamBusy)
        # its place was given back: the next login reaches the directory (and times out too)
        with pytest.raises(UpstreamUnavailable) as again:
            connector.login("carol", "carol-password")
        assert not isinstance(again.value, UpstreamBusy)


def test_a_held_discovery_refuses_the_next_login_start(held_proxy, upstream_issuer, tmp_path):
    """The first login fetches the upstream's discovery document (nothing cached yet) and
    the upstream holds it: the next login's start is refused at once, without a second
    fetch, and the held one goes on to the upstream once the answer comes."""
    from civitas.app import create_app

    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/disc.db", upstreams=[{
        "kind": "oidc", "id": "op-proxy", "display_name": "Held ID", "issuer": held_proxy.url,
        "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
        "max_concurrent_calls": 1, "timeout_seconds": 30,
    }]))

    def start_path(client) -> str:
        flow = query(client.get(AuthRequest().url()).headers["Location"])["flow"]
        return f"/login/op-proxy/start?flow={flow}"

    first, second = app.test_client(), app.test_client()
    first_start, second_start = start_path(first), start_path(second)
    discovery = "/.well-known/openid-configuration"
    assert discovery not in held_proxy.seen
    waiting, answers, _ = _held_then_refused(held_proxy, discovery, first, first_start,
                                             second, second_start)
    assert held_proxy.seen.count(discovery) == 1  # not called for the refused one

    held_proxy.release.set()
    waiting.join(30)
    assert not waiting.is_alive()
    assert answers["first"].status_code == 303
    assert answers["first"].headers["Location"].startswith(upstream_issuer)
