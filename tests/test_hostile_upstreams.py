"""Hostile or careless parties on the hub's outbound and password paths, each against a real
server: usernames the directory (a real slapd) takes for someone else's, an agency's jwks_uri
that serves a JSON bomb, and an event receiver whose error answer is one."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from broker.errors import TooManyAttempts
from broker.ratelimit import AttemptLimiter
from civitas.app import create_app, stop_background
from idp.backchannel import LOGOUT_KIND, SET_KIND, SecurityEventNotice
from idp.models import LogoutDelivery
from kernel.db import utcnow
from kernel.store import MemoryStore
from tests import servers
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, full_login
from tests.test_client_auth import (
    EC_KEY,
    JWKSServer,
    assertion,
    new_code,
    public_set,
    redeem,
    register_remote,
    serving,
)
from tests.test_ldap_login import (
    TOO_MANY,
    ldap_hub,
    password_page,
    submit,
)

# -- 1. the per-username limit and the directory's idea of "the same name" ------------------

#: "alice" in every mix of ASCII and full-width letters (U+FF41...): 31 spellings, each one
#: the same uid to the directory (RFC 4518 2.3: NFKC)
FULL_WIDTH = ["".join(c if plain else chr(ord(c) + 0xFEE0)
                      for c, plain in zip("alice", mix, strict=True))
              for mix in itertools.product((True, False), repeat=5) if not all(mix)]
#: other spellings of alice the directory compares as alice (RFC 4518 section 2: NFKC, case
#: folding, spaces) or that RFC 4518 2.2 maps to alice (characters mapped to nothing)
OTHER_SPELLINGS = [
    "ＡＬＩＣＥ", "ＡｌＩｃＥ", "aＬiＣe",   # full-width capitals
    "al\u2170ce",                              # SMALL ROMAN NUMERAL ONE
    "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e",  # MATHEMATICAL BOLD
    "AL\u0130CE",                              # I WITH DOT ABOVE: the directory lower-cases it to i
    "\u3000alice\u3000", "alice\u00a0", " \tAlice\u2003",  # ideographic, no-break, em space
    "a\u00adlice", "al\u200bice", "\ufeffalice", "ali\u200dce", "alic\u034fe",  # to nothing
    "ali\ufe0fce", "\u2060ALICE",
]
#: spellings slapd itself signs alice in with (checked, so the premise holds)
DIRECTORY_TAKES = ["ａｌｉｃｅ", "ａlｉcｅ", "ＡＬＩＣＥ", "al\u2170ce",
                   "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e", "AL\u0130CE",
                   "\u3000alice\u3000", "alice\u00a0"]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    with servers.run_slapd(tmp_path_factory.mktemp("slapd")) as info:
        yield info


@pytest.fixture
def ldap_app(upstream_issuer, directory, tmp_path):
    with ldap_hub(upstream_issuer, directory, tmp_path) as app:
        yield app


def test_full_width_and_compatibility_spellings_sign_alice_in(ldap_app):
    """The premise: the directory takes these for alice, so they must count as alice."""
    for i, name in enumerate(DIRECTORY_TAKES):
        client = ldap_app.test_client()
        form = password_page(client)
        r = submit(client, form, name, "alice-ldap-pw",
                   environ_base={"REMOTE_ADDR": f"10.8.0.{i}"})
        assert r.status_code == 303, (name, r.status_code)


def test_full_width_spellings_share_alice_s_attempt_limit(ldap_app):
    """31 full-width mixes and capitals, each from another address: the 6th guess on is a
    429 with Retry-After, and so is the right password, in any spelling."""
    client = ldap_app.test_client()
    form = password_page(client)
    guesses = FULL_WIDTH + ["ＡＬＩＣＥ", "ＡｌＩｃＥ", "aＬiＣe"]
    assert len(set(guesses)) == 34
    for i, name in enumerate(guesses):
        r = submit(client, form, name, "wrong", environ_base={"REMOTE_ADDR": f"10.6.0.{i}"})
        if i < 5:
            assert r.status_code == 401, (i, name, r.status_code)
            assert "Wrong username or password." in r.get_data(as_text=True)
        else:
            assert r.status_code == 429, (i, name, r.status_code)
            assert r.headers["Retry-After"] == "900"
            assert TOO_MANY in r.get_data(as_text=True)
    for i, name in enumerate(["alice", "ａｌｉｃｅ", " ALICE "]):
        r = submit(client, form, name, "alice-ldap-pw",
                   environ_base={"REMOTE_ADDR": f"10.6.1.{i}"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "900"
        assert TOO_MANY in r.get_data(as_text=True)
    # bob, whom none of these spell, still signs in (from one of the same addresses)
    other = ldap_app.test_client()
    r = submit(other, password_page(other), "bob", "bob-ldap-pw",
               environ_base={"REMOTE_ADDR": "10.6.0.7"})
    assert r.status_code == 303


@pytest.mark.parametrize("spelling", FULL_WIDTH + OTHER_SPELLINGS)
def test_each_spelling_counts_as_alice_both_ways(spelling):
    """Five failures under a spelling lock alice; five under alice lock the spelling."""
    for failing, checked in ((spelling, "alice"), ("alice", spelling)):
        limiter = AttemptLimiter(MemoryStore())
        for i in range(5):
            limiter.check("staff", failing, f"10.5.0.{i}")
            limiter.failed("staff", failing, f"10.5.0.{i}")
        with pytest.raises(TooManyAttempts) as refused:
            limiter.check("staff", checked, "10.5.1.1")
        assert refused.value.retry_after == 900
        limiter.check("other-upstream", checked, "10.5.1.1")  # per upstream, as before


@pytest.mark.parametrize("name", ["alicia", "alice2", "al ice", "bob", "a\u0301lice",
                                  "\u0430lice"])  # a + combining acute, Cyrillic a
def test_names_the_directory_tells_apart_keep_their_own_counter(name):
    limiter = AttemptLimiter(MemoryStore())
    for i in range(5):
        limiter.failed("staff", "alice", f"10.4.0.{i}")
    limiter.check("staff", name, "10.4.1.1")


# -- 2. an agency's jwks_uri that serves a JSON bomb ----------------------------------------

@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    yield from serving()


@pytest.mark.parametrize("body", [b"[" * 60000, b'{"keys": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                  b"<html>"], ids=["unterminated", "balanced", "not-json"])
def test_deeply_nested_jwks_is_invalid_client_and_cached(make_hub, jwks_server, body):
    app = make_hub(allow_insecure_jwks_uri=True)
    hub = app.extensions["civitas"]
    client = app.test_client()
    full_login(client, AuthRequest())
    url = jwks_server.serve("/deep", body)
    agency = register_remote(hub, "pk-deep", url)
    for _ in range(2):
        auth = AuthRequest(agency=agency)
        r = client.post("/token", data={
            "grant_type": "authorization_code", "code": new_code(client, auth),
            "redirect_uri": agency.redirect_uri, "code_verifier": auth.verifier,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion(agency.client_id, EC_KEY, "ES256")})
        assert r.status_code == 400, r.get_data(as_text=True)[:300]  # as for invalid JSON
        assert r.json == {"error": "invalid_client", "error_description":
                          "The client's public keys could not be obtained."}
        assert r.headers["Cache-Control"] == "no-store"
    assert jwks_server.hits["/deep"] == 1  # the failure is remembered, like invalid JSON
    # once the agency serves a usable set (and the failure has aged out), it works
    jwks_server.serve("/deep", public_set(EC_KEY))
    hub.server.hub.agency_keys.failure_ttl = 0
    auth = AuthRequest(agency=agency)
    r = redeem(client, auth, new_code(client, auth), assertion(agency.client_id, EC_KEY, "ES256"))
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert jwks_server.hits["/deep"] == 2


# -- 3. an event receiver whose 400 is a JSON bomb ----------------------------------------

@pytest.fixture
def receivers() -> Iterator[JWKSServer]:
    """The agencies' event receivers: ``/hostile`` and ``/good``, each answering what the
    test serves there (test_client_auth's scripted server, POSTs counted in ``hits``)."""
    server = JWKSServer()
    server.serve("/good", b"", status=202)
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def events_hub(upstream_issuer, tmp_path, receivers):
    app = create_app(hub_config(upstream_issuer, f"sqlite:///{tmp_path}/events.db", agencies=[
        AGENCY_ONE.config(event_delivery_uri=receivers.base + "/hostile"),
        AGENCY_TWO.config(event_delivery_uri=receivers.base + "/good")],
        backchannel_dispatcher=False, backchannel_timeout_seconds=2))
    yield app.extensions["civitas"]
    stop_background(app)
    app.extensions["civitas"].db.dispose()


def event(receivers: JWKSServer, agency: Any, name: str) -> SecurityEventNotice:
    return SecurityEventNotice(client_id=agency.client_id, event_uri=f"{receivers.base}/{name}",
                               alg="ES256", sub="pairwise-sub", withdrawn=frozenset({"name"}),
                               complete=False, event_time=1_700_000_000)


def rows(hub: Any) -> dict[str, LogoutDelivery]:
    return {r.client_id: r for r in hub.dispatcher.deliveries()}


def test_a_deeply_nested_400_is_refused_and_the_other_agency_delivered(events_hub, receivers):
    hub = events_hub
    receivers.serve("/hostile", b"[" * 4000, status=400)
    now = utcnow()
    assert hub.dispatcher.enqueue_events([event(receivers, AGENCY_ONE, "hostile"),
                                          event(receivers, AGENCY_TWO, "good")], now=now) == 2
    done = hub.dispatcher.deliver_due(now)
    assert (done.delivered, done.retrying, done.given_up) == (1, 0, 1)
    assert receivers.hits == {"/good": 1, "/hostile": 1}
    hostile, good = rows(hub)[AGENCY_ONE.client_id], rows(hub)[AGENCY_TWO.client_id]
    assert hostile.kind == good.kind == SET_KIND
    # a 400 is final (RFC 8935 2.3); its unreadable body is "no error object"
    assert hostile.last_error == "refused: HTTP 400: no error object"
    assert hostile.attempts == 1 and hostile.next_attempt_at is None
    assert hostile.delivered_at is None and hostile.claimed_until is None
    assert good.attempts == 1 and good.delivered_at is not None
    assert good.next_attempt_at is None and good.last_error is None
    assert good.claimed_until is None
    # nothing is left to deliver, now or when the leases would have run out
    assert hub.dispatcher.deliver_due(now + timedelta(hours=2)).attempted == 0
    assert receivers.hits == {"/good": 1, "/hostile": 1}


def test_an_item_that_fails_unexpectedly_is_retried_and_the_others_recorded(
        events_hub, receivers, caplog):
    """A queued logout token whose payload is a JSON array naming "exp" (a damaged row)
    makes its attempt raise: that item is a failed attempt, retried with the backoff and
    logged; the other agency's delivery in the same pass is recorded."""
    hub = events_hub
    now = utcnow()
    hub.dispatcher.enqueue_events([event(receivers, AGENCY_TWO, "good")], now=now)
    damaged = ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode()
                       for part in (b'{"alg":"ES256"}', b'["exp"]', b"sig"))
    with hub.db.session() as s:
        s.add(LogoutDelivery(kind=LOGOUT_KIND, client_id=AGENCY_ONE.client_id,
                             logout_uri=receivers.base + "/logout", token=damaged, attempts=0,
                             next_attempt_at=now, created_at=now))
    with caplog.at_level(logging.ERROR, logger="civitas.backchannel"):
        done = hub.dispatcher.deliver_due(now)
    assert (done.delivered, done.retrying, done.given_up) == (1, 1, 0)
    assert receivers.hits == {"/good": 1}
    damaged_row, good = rows(hub)[AGENCY_ONE.client_id], rows(hub)[AGENCY_TWO.client_id]
    assert damaged_row.attempts == 1 and damaged_row.delivered_at is None
    assert damaged_row.last_error == "unexpected error: TypeError"
    assert damaged_row.next_attempt_at == now + timedelta(seconds=10)
    assert damaged_row.claimed_until is None and damaged_row.token == damaged
    assert good.delivered_at is not None and good.attempts == 1 and good.last_error is None
    assert any("TypeError" in (r.exc_text or "") and AGENCY_ONE.client_id in r.getMessage()
               for r in caplog.records)


def test_bodies_are_really_too_deep_for_json():
    """The bodies above do make the stdlib parser give up (else the tests prove nothing)."""
    for body in (b"[" * 60000, b"[" * 4000):
        with pytest.raises(RecursionError):
            json.loads(body)
