"""Hostile agency registrations (admin API, CLI and settings): each refused with RFC 7591
3.2.2's answer naming the field, and nothing of it stored (no agency, no ledger entry, no
signing key): ports that are no ports, URIs that are not ASCII or carry credentials,
metadata the audit ledger refuses, JSON that is no JSON, and a post-logout URI whose
``state`` would be sent twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from joserfc.jwk import ECKey

from civitas.app import create_app, stop_background
from config import settings_from_mapping
from idp.agencies import AgencyMetadata
from idp.errors import AgencyRegistrationError
from idp.logout import EndSessionPlan, EndSessionRequest
from kernel import jsonfast
from kernel.errors import ConfigError
from kernel.urls import check_redirect_uri, check_url
from tests.conftest import hub_config
from tests.flows import AGENCY_ONE
from tests.test_admin_api import API, AUTH, TOKEN, assert_refused, registration

URI_FIELDS = ("redirect_uris", "post_logout_redirect_uris", "backchannel_logout_uri",
              "jwks_uri")


@pytest.fixture
def api(upstream_issuer: str, database_url: str) -> Iterator[tuple[Any, Any]]:
    """The admin API's client and the hub, on SQLite and on PostgreSQL."""
    app = create_app(hub_config(upstream_issuer, database_url, admin_api_token=TOKEN))
    yield app.test_client(), app.extensions["civitas"]
    stop_background(app)
    app.extensions["civitas"].db.dispose()


def stored(client: Any, hub: Any) -> dict[str, Any]:
    """What a refused registration must leave as it was."""
    return {
        "agencies": client.get(API, headers=AUTH).json["agencies"],
        "jwks": sorted((k["kid"], k["alg"]) for k in client.get("/jwks").json["keys"]),
        "keys": sorted((k.kid, k.alg) for k in hub.keys.list()),
        "ledger": [e.entry for e in hub.ledger.entries()],
    }


def with_uri(field: str, uri: str, client_id: str = "hostile") -> dict[str, Any]:
    """A registration whose ``field`` is ``uri`` (everything else good)."""
    if field == "redirect_uris":
        return registration(client_id, redirect_uris=[uri])
    if field == "post_logout_redirect_uris":
        return registration(client_id, post_logout_redirect_uris=[uri])
    return registration(client_id, **{field: uri})


def refused_everywhere(client: Any, hub: Any, cases: list[tuple[dict[str, Any], str, str]]
                       ) -> None:
    """Each case refused on POST (a new agency) and on PUT (replacing a registered one),
    nothing stored either way."""
    r = client.post(API, json=registration("victim"), headers=AUTH)
    assert r.status_code == 201, r.json
    before = stored(client, hub)
    for body, field, says in cases:
        error = "invalid_redirect_uri" if field == "redirect_uris" else "invalid_client_metadata"
        assert_refused(client.post(API, json=body, headers=AUTH), field, says, error)
        put = {**body, "client_id": "victim"}
        assert_refused(client.put(f"{API}/victim", json=put, headers=AUTH), field, says, error)
    assert stored(client, hub) == before


# -- 1. ports and hosts ---------------------------------------------------------------------

BAD_AUTHORITIES = [
    ("https://a.example:99999/cb", "port must be a number from 1 to 65535"),
    ("https://a.example:65536/cb", "port must be a number from 1 to 65535"),
    ("https://a.example:0/cb", "port must be a number from 1 to 65535"),
    ("https://a.example:abc/cb", "port must be a number from 1 to 65535"),
    ("https://a.example:+443/cb", "port must be a number from 1 to 65535"),
    ("https://a.example:-1/cb", "port must be a number from 1 to 65535"),
    ("https://:443/cb", "must name a host"),
    ("https://:/cb", "must name a host"),
]


def test_rfc3986_3_2_3_a_port_out_of_range_or_not_a_number_is_refused(api):
    """RFC 3986 3.2.2 / 3.2.3, RFC 9110 4.2.2: a port is a number a connection can use, and
    an http(s) URI names a host. Werkzeug raised 'Port out of range' at /authorize and
    /logout/end-session for such URIs; an empty host made the sector '' for every agency."""
    client, hub = api
    refused_everywhere(client, hub, [(with_uri(field, uri), field, says)
                                     for field in URI_FIELDS
                                     for uri, says in BAD_AUTHORITIES])


def test_good_ports_and_hosts_still_pass():
    for uri in ("https://a.example:443/cb", "https://a.example:8443/cb",
                "https://a.example:/cb", "http://127.0.0.1:65535/cb", "http://[::1]:1/cb",
                "https://xn--r8jz45g.example/out"):
        assert check_redirect_uri(uri) == uri


def test_settings_agencies_go_through_the_same_url_checks(upstream_issuer, tmp_path):
    for extra in ({"redirect_uris": ["https://one.agency.example:99999/cb"]},
                  {"post_logout_redirect_uris": ["https://one.agency.example/\x01"]},
                  {"backchannel_logout_uri": "https://u:p@one.agency.example/bc"}):
        config = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/s.db",
                            agencies=[AGENCY_ONE.config(**extra)])
        with pytest.raises(ConfigError, match=r"agencies\[0\]\.") as caught:
            settings_from_mapping(config)
        assert "Port out of range" not in str(caught.value)


# -- 2. control characters and non-ASCII ---------------------------------------------------

def test_rfc3986_2_control_characters_and_non_ascii_are_refused(api):
    client, hub = api
    cases = []
    for field in URI_FIELDS:
        for uri in ("https://a.example/\x00", "https://a.example/c\x01b", "https://a.example/\x7f"):
            cases.append((with_uri(field, uri), field, "must not contain control characters"))
        for uri in ("https://例え.example/out", "https://a.example/café"):
            cases.append((with_uri(field, uri), field, "must be ASCII"))
    refused_everywhere(client, hub, cases)
    # the registrant is told what to send instead
    r = client.post(API, json=with_uri("redirect_uris", "https://例え.example/out"), headers=AUTH)
    assert "IDNA A-label" in r.json["error_description"]
    assert "xn--" in r.json["error_description"]


# -- 3. credentials in a URI ---------------------------------------------------------------

def test_rfc9700_user_information_in_a_uri_is_refused(api):
    """RFC 6749 3.1.2, RFC 9700: no credentials in URIs (these reached the ledger's e-mail
    refusal: a 500)."""
    client, hub = api
    refused_everywhere(client, hub, [
        (with_uri(field, uri), field, "must not contain user information")
        for field in URI_FIELDS
        for uri in ("https://u:p@a.example/cb", "https://u@a.example/cb",
                    "https://@a.example/cb")])


# -- 4. what the audit ledger refuses ------------------------------------------------------

def _jwks(**member: Any) -> dict[str, Any]:
    key = ECKey.generate_key("P-256", private=False, auto_kid=True).as_dict(private=False)
    return {"keys": [{**key, **member}]}


def test_metadata_the_ledger_refuses_is_invalid_client_metadata(api):
    """Every registration is an audit ledger entry, and the ledger takes no e-mail address
    and no number outside I-JSON: such metadata is the registrant's error (400), not the
    hub's (500), and names the field."""
    client, hub = api
    jwks = {"token_endpoint_auth_method": "private_key_jwt"}
    refused_everywhere(client, hub, [
        (registration("hostile", name="help@agency.example"), "name", "e-mail"),
        (registration("hostile", sector_identifier="privacy@agency.example"),
         "sector_identifier", "e-mail"),
        (registration("hostile", **jwks, jwks=_jwks(kid="me@x.example")), "jwks", "e-mail"),
        (registration("hostile", redirect_uris=["https://rp.example/x@y.example"]),
         "redirect_uris", "e-mail"),
        (registration("hostile", redirect_uris=["https://rp.example/cb?x=a@b.example"]),
         "redirect_uris", "e-mail"),
        (registration("hostile", post_logout_redirect_uris=["https://rp.example/x@y.example"]),
         "post_logout_redirect_uris", "e-mail"),
        (registration("hostile", backchannel_logout_uri="https://rp.example/x@y.example"),
         "backchannel_logout_uri", "e-mail"),
        # a member named as a personal claim (the ledger's other refusal), inside jwks
        (registration("hostile", **jwks, jwks=_jwks(name="Agency key")), "jwks",
         "personal data"),
        (registration("hostile", **jwks, jwks=_jwks(x_exp=2**60)), "jwks",
         "outside I-JSON's exact range"),
        (registration("hostile", **jwks, jwks=_jwks(x_exp=-(2**53))), "jwks",
         "outside I-JSON's exact range"),
        (registration("hostile", **jwks, jwks={"keys": _jwks()["keys"], "n": 2**63}), "jwks",
         "outside I-JSON's exact range"),
    ])


def test_the_registry_itself_refuses_them_too(api):
    """The CLI and the settings reach the same refusal: AgencyRegistrationError (CLI) or
    ConfigError (settings), and nothing stored."""
    client, hub = api
    before = stored(client, hub)
    with pytest.raises(AgencyRegistrationError) as caught:
        hub.agencies.add(client_id="cli-agency", name="help@agency.example",
                         redirect_uris=["https://cli.agency.example/cb"])
    assert caught.value.field == "name"
    with pytest.raises(AgencyRegistrationError) as caught:
        hub.agencies.add(client_id="cli-agency", name="CLI", auth_method="private_key_jwt",
                         redirect_uris=["https://cli.agency.example/cb"],
                         jwks=_jwks(x_exp=float("nan")))
    assert caught.value.field == "jwks" and "not a finite number" in caught.value.problem
    with pytest.raises(AgencyRegistrationError) as caught:
        hub.agencies.replace(AgencyMetadata(client_id=AGENCY_ONE.client_id,
                                            name="help@agency.example",
                                            redirect_uris=(AGENCY_ONE.redirect_uri,)))
    assert caught.value.field == "name"
    assert stored(client, hub) == before


def test_a_settings_agency_the_ledger_refuses_is_a_config_error(make_hub):
    with pytest.raises(ConfigError, match=r"agencies\[0\]\.name: .*e-mail"):
        make_hub(agencies=[AGENCY_ONE.config(name="help@agency.example")])


def test_nan_and_infinity_are_not_json(api):
    """RFC 8259 section 6: NaN and Infinity are no JSON numbers (Python's json reads them),
    and 1e400 is no double (I-JSON, RFC 7493 2.2)."""
    client, hub = api
    before = stored(client, hub)
    base = registration("hostile", token_endpoint_auth_method="private_key_jwt", jwks=_jwks())
    text = json.dumps(base)
    for literal, where in (("NaN", "jwks.keys[0].x_exp"), ("Infinity", "jwks.keys[0].x_exp"),
                           ("-Infinity", "jwks.keys[0].x_exp"), ("1e400", "jwks.keys[0].x_exp")):
        data = text.replace('"kid":', f'"x_exp": {literal}, "kid":', 1)
        assert literal in data
        r = client.post(API, data=data, content_type="application/json", headers=AUTH)
        assert r.status_code == 400, (literal, r.status_code, r.get_data(as_text=True)[:300])
        assert r.json == {"error": "invalid_request", "error_description":
                          f"The body must be JSON: {where} is not a finite number "
                          "(NaN, an infinity or beyond a double's range)."}, r.json
    assert stored(client, hub) == before


# -- 5. deeply nested JSON -----------------------------------------------------------------

def test_deeply_nested_json_is_not_json_here(api):
    """orjson refuses nesting beyond 1024; the standard library's fallback raised
    RecursionError, which Flask's silent JSON reading does not catch (a 500)."""
    client, hub = api
    before = stored(client, hub)
    for depth in (5000, 20_000):
        body = json.dumps(registration("deep"))[:-1] + ', "jwks": ' + "[" * depth + "]" * depth
        r = client.post(API, data=body + "}", content_type="application/json", headers=AUTH)
        assert r.status_code == 400 and r.json == {
            "error": "invalid_request",
            "error_description": "The body must be a JSON object."}, r.get_data(as_text=True)
    # what orjson reads (up to 1024 levels) is still deeper than the checks that walk a
    # body, json.dumps and jsonify can take (RecursionError: a 500 too)
    for depth in (32, 990, 1020):
        inner = "[" * depth + "]" * depth
        body = json.dumps(registration("deep"))[:-1] + f', "jwks": {{"keys": {inner}}}}}'
        r = client.post(API, data=body, content_type="application/json", headers=AUTH)
        assert r.status_code == 400 and r.json == {
            "error": "invalid_request", "error_description":
            "The body must not be nested more than 32 levels deep."}, r.get_data(as_text=True)
    assert stored(client, hub) == before
    # and the registry (CLI, settings), whose size check is json.dumps
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(AgencyRegistrationError, match="nested more than 16 levels deep"):
        hub.agencies.add(client_id="deep-agency", name="Deep", auth_method="private_key_jwt",
                         redirect_uris=["https://deep.agency.example/cb"],
                         jwks={"keys": deep})
    assert stored(client, hub) == before


def test_jsonfast_loads_turns_recursion_into_value_error():
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(ValueError, match="nested too deeply"):
            jsonfast.loads(text)
        with pytest.raises(ValueError, match="nested too deeply"):
            jsonfast.loads(text.encode())
    assert jsonfast.loads("[" * 900 + "]" * 900) is not None  # orjson's own limit is 1024


# -- 6. a refused registration adds no signing key -------------------------------------------

def test_a_refused_registration_publishes_no_new_signing_key(api):
    client, hub = api
    before = stored(client, hub)
    assert "PS256" not in {alg for _, alg in before["keys"]}
    r = client.post(API, json=registration(AGENCY_ONE.client_id,
                                           id_token_signed_response_alg="PS256"), headers=AUTH)
    assert_refused(r, "client_id", "already registered")
    # and a replacement refused (by the ledger) inside its transaction
    r = client.post(API, json=registration("victim"), headers=AUTH)
    assert r.status_code == 201
    before = stored(client, hub)
    r = client.put(f"{API}/victim", headers=AUTH, json=registration(
        "victim", name="help@agency.example", id_token_signed_response_alg="PS256"))
    assert_refused(r, "name", "e-mail")
    assert stored(client, hub) == before
    assert "PS256" not in {k.alg for k in hub.keys.list()} | {
        k["alg"] for k in client.get("/jwks").json["keys"]}
    # a registration that is stored does get its key
    r = client.post(API, json=registration("ps-agency", id_token_signed_response_alg="PS256"),
                    headers=AUTH)
    assert r.status_code == 201
    assert "PS256" in {k["alg"] for k in client.get("/jwks").json["keys"]}


# -- 7. state in a registered post-logout redirect URI ---------------------------------------

def test_a_post_logout_uri_with_a_state_member_is_refused(api):
    """RP-Initiated Logout 1.0 section 3 adds the agency's ``state``: a registered URI that
    already has one would be sent back with two."""
    client, hub = api
    refused_everywhere(client, hub, [
        (registration("hostile", post_logout_redirect_uris=[uri]),
         "post_logout_redirect_uris", "must not have a 'state' query member")
        for uri in ("https://rp.example/out?state=fixed", "https://rp.example/out?a=1&state=",
                    "https://rp.example/out?state", "https://rp.example/out?x=1;state=2")])
    # another query member is fine
    r = client.post(API, headers=AUTH, json=registration(
        "fine", post_logout_redirect_uris=["https://fine.agency.example/out?lang=en"]))
    assert r.status_code == 201, r.json


def test_rfc6749_4_1_2_a_redirect_uri_holding_a_response_member_is_refused(api):
    """The hub adds code, state and iss (or error and its description) to the redirect
    URI's query: a registered URI that already has one of them would be sent back with two,
    and the agency could not tell which is the hub's."""
    client, hub = api
    refused_everywhere(client, hub, [
        (registration("hostile", redirect_uris=[uri]), "redirect_uris",
         f"must not have a '{member}' query member")
        for uri, member in (("https://rp.example/cb?code=1", "code"),
                            ("https://rp.example/cb?a=1&state=", "state"),
                            ("https://rp.example/cb?iss=https://evil.example", "iss"),
                            ("https://rp.example/cb?x=1;error=x", "error"))])
    # another query member is fine
    r = client.post(API, headers=AUTH, json=registration(
        "fine", redirect_uris=["https://fine.agency.example/cb?lang=en"]))
    assert r.status_code == 201, r.json


def test_rfc7493_2_3_a_body_repeating_a_member_name_is_refused(api):
    """json and orjson keep a repeated name's last value and say nothing: a registration
    whose client_id (or a nested member) comes twice is refused, naming it, nothing
    stored."""
    client, hub = api
    before = stored(client, hub)
    cases = [('{"client_id":"dup-one","client_id":"dup-two","name":"x",'
              '"redirect_uris":["https://dup.agency.example/cb"]}', "client_id"),
             ('{"client_id":"dup-three","name":"x","redirect_uris":'
              '["https://dup.agency.example/cb"],"jwks":{"keys":[],"keys":[]}}', "keys")]
    for text, name in cases:
        r = client.post(API, data=text, content_type="application/json", headers=AUTH)
        assert r.status_code == 400 and r.json == {
            "error": "invalid_request", "error_description":
            f"The body must not repeat a member name: {name!r} (RFC 7493 section 2.3)."}, r.json
    assert stored(client, hub) == before
    # the same body with the name once is registered
    r = client.post(API, data='{"client_id":"dup-two","name":"x","redirect_uris":'
                    '["https://dup.agency.example/cb"]}', content_type="application/json",
                    headers=AUTH)
    assert r.status_code == 201, r.json


def test_a_stored_post_logout_uri_with_state_gets_the_request_s_state_only():
    """Rows stored before the refusal: the request's ``state`` replaces the registered one."""
    plan = EndSessionPlan(request=EndSessionRequest(state="mine"), client=None,
                          redirect_uri="https://rp.example/out?state=fixed&lang=en",
                          hint_sid=None)
    assert plan.redirect_location() == "https://rp.example/out?lang=en&state=mine"
    plan = EndSessionPlan(request=EndSessionRequest(state="mine"), client=None,
                          redirect_uri="https://rp.example/out?lang=en", hint_sid=None)
    assert plan.redirect_location() == "https://rp.example/out?lang=en&state=mine"


def test_check_url_messages_name_the_uri():
    with pytest.raises(ValueError, match=r"^issuer port must be a number from 1 to 65535"):
        check_url("https://hub.example:70000", what="issuer")
    with pytest.raises(ValueError, match=r"IDNA A-label .*xn--"):
        check_url("https://bücher.example/", what="issuer")
