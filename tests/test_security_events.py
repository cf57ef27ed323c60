"""Security Event Tokens (RFC 8417, OpenID CAEP) pushed to agencies (RFC 8935) when a
citizen withdraws consent: the token, its delivery from the durable queue, retries, permanent
failures, restarts, and what the operator sees. The agency endpoint is a real HTTP server."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from click.testing import CliRunner
from jose import jwt as jose_jwt

from civitas.app import create_app
from civitas.cli import main
from idp.backchannel import (
    SESSION_REVOKED,
    SET_KIND,
    TOKEN_CLAIMS_CHANGE,
    SecurityEventNotice,
)
from kernel.db import utcnow
from tests import servers
from tests.conftest import HUB_ISSUER, hub_config
from tests.flows import AGENCY_ONE, AGENCY_TWO, AuthRequest, metric, query, redeem
from tests.test_consent_flow import CONSENT, answer, to_consent_page


class EventReceiver:
    """An agency's RFC 8935 endpoint on 127.0.0.1: records each push, answers from a script
    of ``(status, json body)`` (then 202)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.script: list[tuple[int, dict | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.received.append({"content_type": self.headers.get("Content-Type"),
                                       "accept": self.headers.get("Accept"),
                                       "body": body.decode()})
                status, answer = outer.script.pop(0) if outer.script else (202, None)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"

    @property
    def tokens(self) -> list[str]:
        return [r["body"] for r in self.received]


@pytest.fixture
def receiver():
    r = EventReceiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def config(upstream_issuer, tmp_path, receiver, name="se.db", **overrides):
    return hub_config(upstream_issuer, f"sqlite:///{tmp_path}/{name}", agencies=[
        AGENCY_ONE.config(consent=CONSENT, event_delivery_uri=receiver.url),
        AGENCY_TWO.config()], backchannel_dispatcher=False, backchannel_timeout_seconds=2,
        **overrides)


@pytest.fixture
def app(upstream_issuer, tmp_path, receiver):
    app = create_app(config(upstream_issuer, tmp_path, receiver))
    yield app
    app.extensions["civitas"].db.dispose()


def sent(kind: str, outcome: str) -> float:
    return metric("civitas_event_deliveries_total", kind=kind, outcome=outcome)


def consent_with_name(client):
    """Log in at agency one, granting the optional "name" too; the agency's sub."""
    auth = AuthRequest()
    _, form = to_consent_page(client, auth)
    r = answer(client, form, "allow", claims=["name"])
    body = redeem(client, auth, query(r.headers["Location"])["code"]).json
    return jose_jwt.get_unverified_claims(body["id_token"])["sub"]


def withdraw(client, claim=None):
    page = client.get("/account/consents").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    data = {"csrf": csrf, "client_id": AGENCY_ONE.client_id}
    if claim:
        data["claim"] = claim
    assert client.post("/account/consents/withdraw", data=data).status_code in (302, 303)


def verified(token, jwks):
    header = jose_jwt.get_unverified_header(token)
    assert header["typ"] == "secevent+jwt" and header["kid"]
    claims = jose_jwt.decode(token, jwks, algorithms=["ES256"], audience=AGENCY_ONE.client_id,
                             issuer=HUB_ISSUER)
    # RFC 8417 2.2; python-jose lets a token without aud through its audience check
    assert claims["aud"] == AGENCY_ONE.client_id and claims["iss"] == HUB_ISSUER
    assert claims["jti"] and isinstance(claims["iat"], int) and "sub" not in claims
    return claims


def test_partial_then_complete_withdrawal_each_push_one_set(app, client, receiver):
    hub = app.extensions["civitas"]
    sub = consent_with_name(client)
    jwks = client.get("/jwks").json
    before = sent(SET_KIND, "delivered")

    withdraw(client, claim="name")
    assert hub.dispatcher.deliver_due().delivered == 1
    [push] = receiver.received
    assert push["content_type"] == "application/secevent+jwt"
    assert push["accept"] == "application/json"
    claims = verified(push["body"], jwks)
    assert claims["sub_id"] == {"format": "iss_sub", "iss": HUB_ISSUER, "sub": sub}
    event = claims["events"][TOKEN_CLAIMS_CHANGE]
    assert list(claims["events"]) == [TOKEN_CLAIMS_CHANGE]
    assert event["claims"] == {"consent_withdrawn": ["name"], "complete": False}
    assert isinstance(event["event_timestamp"], int)

    withdraw(client)
    assert hub.dispatcher.deliver_due().delivered == 1
    assert len(receiver.received) == 2
    claims = verified(receiver.tokens[-1], jwks)
    assert claims["sub_id"]["sub"] == sub
    assert list(claims["events"]) == [SESSION_REVOKED]
    assert isinstance(claims["events"][SESSION_REVOKED]["event_timestamp"], int)
    assert sent(SET_KIND, "delivered") == before + 2
    assert hub.dispatcher.deliver_due().attempted == 0  # nothing left over


def notice(receiver, **kw):
    return SecurityEventNotice(**{
        "client_id": AGENCY_ONE.client_id, "event_uri": receiver.url, "alg": "ES256",
        "sub": "pairwise-sub", "withdrawn": frozenset({"name"}), "complete": False,
        "event_time": 1_700_000_000, **kw})


def only_row(hub):
    [row] = [r for r in hub.dispatcher.deliveries() if r.kind == SET_KIND]
    return row


def test_server_error_is_retried_on_a_later_pass(app, receiver):
    hub = app.extensions["civitas"]
    receiver.script = [(500, None)]
    now = utcnow()
    assert hub.dispatcher.enqueue_events([notice(receiver)], now=now) == 1
    retrying = sent(SET_KIND, "retrying")
    done = hub.dispatcher.deliver_due(now)
    assert (done.retrying, done.delivered) == (1, 0)
    row = only_row(hub)
    assert row.attempts == 1 and row.last_error == "HTTP 500"
    assert row.next_attempt_at > now and row.delivered_at is None
    assert sent(SET_KIND, "retrying") == retrying + 1
    assert hub.dispatcher.deliver_due(now + timedelta(seconds=1)).attempted == 0  # not due
    done = hub.dispatcher.deliver_due(row.next_attempt_at)
    assert done.delivered == 1
    row = only_row(hub)
    assert row.attempts == 2 and row.delivered_at is not None
    assert row.next_attempt_at is None and row.last_error is None
    assert receiver.tokens[0] == receiver.tokens[1]  # the same SET (no exp: never re-signed)


def test_bad_request_is_given_up_at_once(app, receiver):
    hub = app.extensions["civitas"]
    receiver.script = [(400, {"err": "invalid_audience",
                              "description": "not for us"})]
    given_up = sent(SET_KIND, "given_up")
    hub.dispatcher.enqueue_events([notice(receiver)])
    done = hub.dispatcher.deliver_due()
    assert done.given_up == 1
    row = only_row(hub)
    assert row.attempts == 1 and row.next_attempt_at is None and row.delivered_at is None
    assert "invalid_audience" in row.last_error and "HTTP 400" in row.last_error
    assert sent(SET_KIND, "given_up") == given_up + 1
    assert hub.dispatcher.deliver_due(utcnow() + timedelta(days=1)).attempted == 0
    assert len(receiver.received) == 1


def test_a_receiver_that_trickles_its_error_holds_no_worker(app):
    """RFC 8935 2.3's error object read within the delivery's timeout: a receiver that sends
    its 400's body a byte at a time (each within the read timeout) is given up at the
    timeout, the SET given up as refused, and the pass goes on."""
    import time

    hub = app.extensions["civitas"]
    hub.dispatcher.timeout = 0.5
    body = json.dumps({"err": "invalid_request", "description": "x" * 80}).encode()
    with servers.run_trickle_server(body, 0.2, "400 Bad Request") as port:
        hub.dispatcher.enqueue_events([SecurityEventNotice(
            client_id=AGENCY_ONE.client_id, event_uri=f"http://127.0.0.1:{port}/events",
            alg="ES256", sub="pairwise-sub", withdrawn=frozenset({"name"}), complete=False,
            event_time=1_700_000_000)])
        started = time.monotonic()
        done = hub.dispatcher.deliver_due()
        assert time.monotonic() - started < 3  # not the 20 s the whole body would take
    assert done.given_up == 1
    assert only_row(hub).last_error == "refused: HTTP 400: no error object"


def test_queue_survives_a_restart_and_cli_shows_failures(upstream_issuer, tmp_path, receiver):
    cfg = config(upstream_issuer, tmp_path, receiver, name="restart.db")
    first = create_app(cfg)
    first.extensions["civitas"].dispatcher.enqueue_events([notice(receiver, complete=True)])
    first.extensions["civitas"].dispatcher.enqueue_events([notice(receiver)])
    first.extensions["civitas"].db.dispose()  # "crash" before anything was delivered

    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    out = runner.invoke(main, ["--config", str(path), "events", "list", "--pending"],
                        catch_exceptions=False).output
    assert out.count(f"{SET_KIND}\t{AGENCY_ONE.client_id}\t0\t") == 2

    second = create_app(cfg)
    try:
        receiver.script = [(202, None), (400, {"err": "invalid_audience"})]
        assert second.extensions["civitas"].dispatcher.deliver_due().attempted == 2
        jwks = second.test_client().get("/jwks").json
    finally:
        second.extensions["civitas"].db.dispose()
    assert len(receiver.received) == 2
    for token in receiver.tokens:
        assert verified(token, jwks)["sub_id"]["sub"] == "pairwise-sub"

    result = runner.invoke(main, ["--config", str(path), "events", "list", "--failed"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("id\tkind\tagency\tattempts")
    [failed] = lines[1:]
    assert f"{SET_KIND}\t{AGENCY_ONE.client_id}\t1\t-\t-\t" in failed
    assert "invalid_audience" in failed
    everything = runner.invoke(main, ["--config", str(path), "events", "list"])
    assert everything.exit_code == 0 and everything.exception is None, everything.output
    assert len(everything.output.strip().splitlines()) == 3  # header, delivered, failed
    pending = runner.invoke(main, ["--config", str(path), "events", "list", "--pending"])
    assert pending.exit_code == 0 and pending.exception is None, pending.output
    assert pending.output.strip().splitlines() == [lines[0]]  # the header, nothing pending


def test_event_delivery_uri_is_validated_like_the_logout_uri(upstream_issuer, tmp_path):
    from kernel.errors import ConfigError

    cfg = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/reg.db",
                     backchannel_dispatcher=False)
    path = tmp_path / "civitas.yaml"
    path.write_text(yaml.safe_dump(cfg))
    create_app(cfg).extensions["civitas"].db.dispose()
    runner = CliRunner()
    base = ["--config", str(path), "agency", "add", "--client-id", "three", "--name", "Three",
            "--redirect-uri", "https://three.example/cb"]
    result = runner.invoke(main, [*base, "--event-delivery-uri", "http://three.example/ev"])
    assert result.exit_code != 0 and "event_delivery_uri" in result.output
    result = runner.invoke(main, [*base, "--event-delivery-uri", "https://three.example/ev"])
    assert result.exit_code == 0, result.output
    shown = json.loads(runner.invoke(main, ["--config", str(path), "agency", "show",
                                            "three"]).output)
    assert shown["event_delivery_uri"] == "https://three.example/ev"
    bad = dict(cfg, agencies=[AGENCY_ONE.config(event_delivery_uri="http://one.example/ev")])
    with pytest.raises(ConfigError, match="event_delivery_uri"):
        create_app(bad)
