"""Token lifecycle: JWT access tokens (RFC 9068), rotating refresh tokens (RFC 6749 6,
RFC 9700 4.14), revocation (RFC 7009) and introspection (RFC 7662)."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import pytest
from jose import jwt as jose_jwt
from sqlalchemy import select

from idp.models import RefreshGrantRecord, RefreshToken
from idp.tokens import GrantEnded, ScopeWidened, TokenStore, digest
from tests.conftest import HUB_ISSUER
from tests.flows import (
    AGENCY_ONE,
    AGENCY_TWO,
    AuthRequest,
    allow_consent,
    citizen,
    full_login,
    metric,
    query,
    redeem,
)

OFFLINE = ["openid", "profile", "email", "offline_access"]


@pytest.fixture
def app(make_hub):
    return make_hub(agencies=[AGENCY_ONE.config(scopes=OFFLINE), AGENCY_TWO.config(scopes=OFFLINE)])


@pytest.fixture
def hub(app):
    return app.extensions["civitas"]


def basic(agency):
    return {"Authorization": "Basic " + base64.b64encode(
        f"{agency.client_id}:{agency.secret}".encode()).decode()}


def tokens(client, agency=AGENCY_ONE, scope="openid email offline_access"):
    auth = AuthRequest(agency=agency, scope=scope)
    r = allow_consent(client, client.get(auth.url()))  # offline access ticked with the rest
    if r.status_code == 303:
        params = full_login(client, auth)
    else:
        params = query(r.headers["Location"])
    r = redeem(client, auth, params["code"])
    assert r.status_code == 200, r.json
    return r.json


def refresh_grant(hub, subject):
    """What RefreshTokens.issue needs for a grant of agency one to a new citizen."""
    return dict(client_id=AGENCY_ONE.client_id, account_id=citizen(hub, subject),
                scope="openid email", sid="s", acr="a", amr=("pwd",), auth_time=0)


def refresh(client, token, agency=AGENCY_ONE, **extra):
    return client.post("/token", data={"grant_type": "refresh_token", "refresh_token": token,
                                       **extra}, headers=basic(agency))


def introspect(client, token, agency=AGENCY_ONE, **extra):
    return client.post("/introspect", data={"token": token, **extra}, headers=basic(agency))


def userinfo(client, access):
    return client.get("/userinfo", headers={"Authorization": f"Bearer {access}"})


def test_rfc9068_access_token_is_a_verifiable_jwt(client):
    body = tokens(client)
    jwks = client.get("/jwks").json
    header = jose_jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt" and header["kid"]
    claims = jose_jwt.decode(body["access_token"], jwks, algorithms=["ES256"],
                             audience=AGENCY_ONE.client_id, issuer=HUB_ISSUER)
    assert claims["client_id"] == AGENCY_ONE.client_id and claims["jti"]
    id_claims = jose_jwt.get_unverified_claims(body["id_token"])
    assert claims["sub"] == id_claims["sub"]  # the agency's pairwise sub
    assert claims["scope"] == "openid email offline_access"


def test_refresh_token_only_with_offline_access(client):
    assert "refresh_token" in tokens(client)
    assert "refresh_token" not in tokens(client, scope="openid email")


def test_rfc9700_4_14_rotation_and_reuse_revokes_the_grant(client, hub):
    first = tokens(client)
    r = refresh(client, first["refresh_token"])
    assert r.status_code == 200, r.json
    second = r.json
    assert second["refresh_token"] != first["refresh_token"]
    assert userinfo(client, second["access_token"]).status_code == 200
    # the old refresh token is presented again: an attacker may hold a copy
    r = refresh(client, first["refresh_token"])
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    # ... so the whole grant is revoked: the rotated token and its access tokens too. The
    # grant's row says so (introspection reads only the row; a refresh of the rotated token
    # would also be refused by the access-token revocation mark alone, after using it).
    assert introspect(client, second["refresh_token"],
                      token_type_hint="refresh_token").json == {"active": False}
    with hub.db.session() as s:
        assert s.scalars(select(RefreshGrantRecord.revoked_reason)).all() == ["reuse"]
    r = refresh(client, second["refresh_token"])
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    assert userinfo(client, second["access_token"]).status_code == 401
    assert userinfo(client, first["access_token"]).status_code == 401
    assert introspect(client, second["access_token"]).json == {"active": False}


def test_rfc6749_6_wider_scope_refused_without_consuming_token(client):
    body = tokens(client, scope="openid email offline_access")
    r = refresh(client, body["refresh_token"], scope="openid email profile offline_access")
    assert r.status_code == 400 and r.json["error"] == "invalid_scope"
    r = refresh(client, body["refresh_token"], scope="openid offline_access")
    assert r.status_code == 200 and r.json["scope"] == "openid offline_access"


def test_rfc6749_6_a_narrower_refresh_keeps_the_grant_s_scope(client, hub):
    """RFC 6749 6: "the refresh token scope MUST be identical to that of the refresh token
    included by the client in the request". Asking for less narrows the access token
    only: the grant keeps what the citizen granted, offline access included, so a request
    without ``offline_access`` still gets the rotated refresh token (it was used up), and a
    later refresh may ask for the whole scope again."""
    body = tokens(client, scope="openid email offline_access")
    r = refresh(client, body["refresh_token"], scope="openid offline_access")
    assert r.status_code == 200 and r.json["scope"] == "openid offline_access"
    assert "email" not in userinfo(client, r.json["access_token"]).json
    r = refresh(client, r.json["refresh_token"], scope="openid email")
    assert r.status_code == 200, r.json
    assert r.json["scope"] == "openid email" and "refresh_token" in r.json
    r = refresh(client, r.json["refresh_token"])  # no scope: the grant's whole scope
    assert r.status_code == 200 and r.json["scope"] == "openid email offline_access"
    with hub.db.session() as s:
        assert s.scalars(select(RefreshGrantRecord.scope)).all() == [
            "openid email offline_access"]


def test_refresh_token_bound_to_its_client(client):
    body = tokens(client)
    r = refresh(client, body["refresh_token"], agency=AGENCY_TWO)
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    assert refresh(client, body["refresh_token"]).status_code == 200


def test_rotation_keeps_absolute_lifetime_in_one_row(client, hub):
    """A grant is one row, whatever its history: each refresh rewrites its live token's
    hash in place, and never moves its end."""
    body = tokens(client)
    with hub.db.session() as s:
        [before] = s.scalars(select(RefreshGrantRecord)).all()
        s.expunge(before)
    rotated = refresh(client, body["refresh_token"]).json["refresh_token"]
    rotated = refresh(client, rotated).json["refresh_token"]
    with hub.db.session() as s:
        [after] = s.scalars(select(RefreshGrantRecord)).all()
        assert s.scalars(select(RefreshToken)).all() == []
    assert after.grant_id == before.grant_id and after.expires_at == before.expires_at
    assert (before.rotations, after.rotations) == (0, 2) and after.rotated_at is not None
    # only hashes are stored; the token carries its grant's id
    assert after.token_hash == digest(rotated) and len(after.token_hash) == 64
    assert rotated.startswith(after.grant_id + ".") and before.token_hash != after.token_hash


def test_concurrent_refresh_has_one_winner(app):
    client = app.test_client()
    body = tokens(client)
    barrier = threading.Barrier(2)
    results = []

    def go():
        c = app.test_client()
        barrier.wait()
        results.append(refresh(c, body["refresh_token"]))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses in ([200, 400], [400, 400]), statuses  # never two winners
    # the loser presented a used token: the grant is revoked, the winner's tokens with it
    # (its refresh token inactive at introspection, which reads only the grant's row)
    for r in results:
        if r.status_code == 200:
            assert introspect(client, r.json["refresh_token"]).json == {"active": False}
            assert refresh(client, r.json["refresh_token"]).status_code == 400
            assert userinfo(client, r.json["access_token"]).status_code == 401


def test_rfc9700_4_14_2_racing_uses_of_one_token_have_one_winner_at_most(sql_hub):
    """Eight threads present the same refresh token at once, twenty times over, on SQLite
    and on PostgreSQL: never more than one use wins, and every race revokes the grant (the
    losers presented a used token), so even the winner's new token is then refused."""
    hub = sql_hub
    refresh_tokens = hub.server.hub.refresh_tokens
    grant = refresh_grant(hub, "racing")
    for round_ in range(20):
        token = refresh_tokens.issue(grant_id=f"race-{round_}", **grant)
        barrier = threading.Barrier(8)
        won = []

        def use(token=token, barrier=barrier, won=won):
            barrier.wait()
            if refresh_tokens.use(token, AGENCY_ONE.client_id) is not None:
                won.append(1)

        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) <= 1, f"round {round_}: {len(won)} winners"
        # the winner's rotated token cannot be written: the grant is revoked
        with pytest.raises(GrantEnded):
            refresh_tokens.issue(grant_id=f"race-{round_}", **grant,
                                 family_expires_at=int(time.time()) + 3600)
        assert refresh_tokens.find(token) is None, round_
        assert hub.tokens.is_marked_revoked("grant", f"race-{round_}")


def revocations(reason):
    return metric("civitas_refresh_grants_revoked_total", reason=reason)


def test_rfc9700_4_14_2_a_replayed_token_revokes_its_grant_and_says_why(hub, caplog):
    tokens = hub.server.hub.refresh_tokens
    grant = refresh_grant(hub, "replay")
    first = tokens.issue(grant_id="g-replayed", **grant)
    assert tokens.use(first, AGENCY_ONE.client_id) is not None
    second = tokens.issue(grant_id="g-replayed", **grant,
                          family_expires_at=int(time.time()) + 3600)
    reused, revoked = revocations("reuse"), revocations("revoked")
    assert tokens.use(first, AGENCY_ONE.client_id) is None  # the replay
    assert tokens.find(second) is None and tokens.use(second, AGENCY_ONE.client_id) is None
    assert not tokens.revoke_grant("g-replayed")  # a later one keeps the first one's reason
    with hub.db.session() as s:
        assert s.get(RefreshGrantRecord, "g-replayed").revoked_reason == "reuse"
    # a security event for the operator: counted once, and logged
    assert (revocations("reuse"), revocations("revoked")) == (reused + 1, revoked)
    assert "refresh token reuse by agency agency-one: grant g-replayed revoked" in caplog.text
    # a token that carries a known grant's id but is not its live one is a used one (or a
    # forgery by someone who knows the id): the grant is revoked all the same
    forged = tokens.issue(grant_id="g-forged", **grant)
    assert tokens.use("g-forged.not-its-secret", AGENCY_ONE.client_id) is None
    assert tokens.use(forged, AGENCY_ONE.client_id) is None
    # a token of another agency's grant revokes nothing; garbage finds nothing
    other = tokens.issue(grant_id="g-other", **grant)
    assert tokens.use(other, AGENCY_TWO.client_id) is None
    assert tokens.use("g-other.x", AGENCY_TWO.client_id) is None
    assert tokens.use(other, AGENCY_ONE.client_id) is not None
    for garbage in ("", ".", "no-dot", "a.b.c", "x" * 40 + ".y", "unknown.secret"):
        assert tokens.find(garbage) is None and tokens.use(garbage, AGENCY_ONE.client_id) is None


def test_deleting_the_account_revokes_its_refresh_grants_and_says_why(app, hub):
    client = app.test_client()
    one, two = tokens(client), tokens(client, agency=AGENCY_TWO)
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post("/account/delete", data={"csrf": csrf, "confirm": "delete"})
    assert r.status_code == 303
    for body, agency in ((one, AGENCY_ONE), (two, AGENCY_TWO)):
        r = refresh(client, body["refresh_token"], agency=agency)
        assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    with hub.db.session() as s:
        reasons = s.scalars(select(RefreshGrantRecord.revoked_reason)).all()
    assert reasons == ["account_deleted", "account_deleted"]


def test_a_grant_outliving_its_account_is_refused_and_inactive(app, hub):
    """The refresh grant is read with whether its citizen's account still exists, in one
    statement. An account deleted without its grants revoked (as if deletion's revocation
    had not run) makes its refresh token invalid_grant (RFC 6749 5.2) and inactive at
    introspection (RFC 7662 2.2), while the grant's row still says it is live."""
    from sqlalchemy import update

    from broker.models import ConstituentAccount
    from kernel.db import utcnow

    client = app.test_client()
    body = tokens(client)
    assert introspect(client, body["refresh_token"]).json["active"] is True
    with hub.db.session() as s:
        s.execute(update(ConstituentAccount).values(deleted_at=utcnow()))
    assert introspect(client, body["refresh_token"]).json == {"active": False}
    r = refresh(client, body["refresh_token"])
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"
    with hub.db.session() as s:
        assert s.scalars(select(RefreshGrantRecord.revoked_at)).all() == [None]


def test_migration_0012_moves_each_grant_to_its_own_row(database_url):
    """Until 0012 a grant was revoked when any of its tokens was; the grant's row says so
    from the first such time. Tokens issued before still work, or revoke their grant when
    used ones come back; their grant's next token is of the new kind. Downgrading puts each
    grant's live token back and marks every token of a revoked grant again."""
    from datetime import UTC, datetime, timedelta

    from alembic import command
    from sqlalchemy import text

    from civitas.migrations import alembic_config, upgrade
    from idp.tokens import RefreshTokens
    from kernel.db import Database
    from kernel.store import MemoryStore

    db = Database(database_url)
    try:
        upgrade(db.engine, "0011")
        t0 = datetime(2026, 11, 1, tzinfo=UTC)
        end = datetime.now(UTC) + timedelta(days=10)
        rows = [("revoked", "r1", t0, t0 + timedelta(hours=2)), ("revoked", "r2", t0, None),
                ("revoked", "r3", t0, t0 + timedelta(hours=1)), ("live", "l1", t0, None),
                ("live", "l2", None, None), ("quiet", "q1", None, None)]
        with db.engine.begin() as conn:
            for grant_id, token, used_at, revoked_at in rows:
                conn.execute(text(
                    "INSERT INTO refresh_tokens (token_hash, grant_id, client_id, account_id,"
                    " scope, sid, acr, amr, auth_time, created_at, expires_at, used_at,"
                    " revoked_at) VALUES (:h, :g, 'agency-one', 'acct', 'openid', 's', 'a',"
                    " '[\"pwd\"]', 0, :t0, :end, :used, :revoked)"),
                    {"h": digest(token), "g": grant_id, "t0": t0, "end": end,
                     "used": used_at, "revoked": revoked_at})
        upgrade(db.engine)
        tokens = RefreshTokens(db, TokenStore(MemoryStore(), code_lifetime=60,
                                              access_token_lifetime=600), lifetime=3600)
        with db.session() as s:
            revoked, live = s.get(RefreshGrantRecord, "revoked"), s.get(RefreshGrantRecord, "live")
            assert (revoked.revoked_at, revoked.revoked_reason) == (t0 + timedelta(hours=1),
                                                                    "legacy")
            assert (live.revoked_at, live.client_id, live.account_id) == (None, "agency-one",
                                                                         "acct")
            assert abs((live.expires_at - end).total_seconds()) < 1
        assert tokens.find("r2") is None and tokens.find("l1") is None
        assert tokens.find("q1") is not None and tokens.find("l2") is not None
        grant = dict(client_id="agency-one", account_id="acct", scope="openid", sid="s",
                     acr="a", amr=("pwd",), auth_time=0)
        # a legacy token's use rotates its grant to a token of the new kind
        assert tokens.use("l2", "agency-one") is not None
        rotated = tokens.issue(grant_id="live", family_expires_at=int(end.timestamp()),
                               **grant)
        assert tokens.find(rotated) is not None
        again = tokens.use(rotated, "agency-one")
        assert again is not None and again.expires_at == int(end.timestamp())
        kept = tokens.issue(grant_id="live", family_expires_at=again.expires_at, **grant)
        command.downgrade(alembic_config(db.engine), "0011")
        with db.engine.connect() as conn:
            marked = dict(conn.execute(text(
                "SELECT token_hash, revoked_at IS NOT NULL FROM refresh_tokens")).all())
        assert marked == {digest(t): m for t, m in [
            ("r1", True), ("r2", True), ("r3", True), ("l1", False), ("l2", False),
            ("q1", False), (kept, False)]}
        # and up again: a used legacy token presented once more revokes its grant
        upgrade(db.engine)
        assert tokens.find(kept) is not None
        assert tokens.use("l1", "agency-one") is None and tokens.find(kept) is None
        with db.session() as s:
            assert s.get(RefreshGrantRecord, "live").revoked_reason == "reuse"
    finally:
        db.dispose()


def test_only_the_attributes_a_scope_can_release_are_decrypted(client, hub, monkeypatch):
    """OpenID Connect Core 5.4: the code exchange (for the ID token) and userinfo decrypt the
    attributes their scope can release and no other: "openid email" needs two of alice's."""
    from broker.models import AccountAttribute

    cipher = hub.accounts._cipher  # noqa: SLF001 - the spy watches what is decrypted
    original = cipher.decrypt
    decrypted = []

    def spy(token, **context):
        plain = original(token, **context)
        if not context:  # an attribute (the access token's own private claim is not one)
            decrypted.append(json.loads(plain))
        return plain

    tokens(client, scope="openid profile email")  # signs alice in
    with hub.db.session() as s:
        assert len(set(s.scalars(select(AccountAttribute.name)))) > 2  # more than email
    monkeypatch.setattr(cipher, "decrypt", spy)
    body = tokens(client, scope="openid email")
    info = userinfo(client, body["access_token"]).json
    id_token = jose_jwt.get_unverified_claims(body["id_token"])
    assert id_token["email"] == info["email"] == "alice@example.org"
    assert info["email_verified"] is True and "name" not in info and "name" not in id_token
    # email and email_verified, once for the ID token and once for userinfo: nothing else
    assert sorted(map(str, decrypted)) == sorted(["alice@example.org", "True"] * 2)


def test_rfc7662_introspection_of_own_tokens(client):
    body = tokens(client)
    info = introspect(client, body["access_token"]).json
    assert info["active"] is True and info["client_id"] == AGENCY_ONE.client_id
    assert info["sub"] == jose_jwt.get_unverified_claims(body["id_token"])["sub"]
    # RFC 7662 2.2: an RFC 6749 5.1 token type, as the token response said; none for a
    # refresh token
    assert info["token_type"] == "Bearer" and info["exp"] > info["iat"]
    info = introspect(client, body["refresh_token"], token_type_hint="refresh_token").json
    assert info["active"] is True and "token_type" not in info
    assert introspect(client, "garbage").json == {"active": False}


def test_rfc7662_another_agency_learns_nothing(client):
    body = tokens(client)
    for token in (body["access_token"], body["refresh_token"]):
        r = introspect(client, token, agency=AGENCY_TWO)
        assert r.status_code == 200 and r.json == {"active": False}


def test_rfc7662_requires_client_authentication(client):
    body = tokens(client)
    r = client.post("/introspect", data={"token": body["access_token"]})
    assert r.status_code == 401 and r.json["error"] == "invalid_client"
    r = client.post("/introspect", data={"token": body["access_token"]},
                    headers={"Authorization": "Basic " + base64.b64encode(
                        f"{AGENCY_ONE.client_id}:wrong".encode()).decode()})
    assert r.status_code == 401


def test_rfc7009_revoke_access_token(client):
    body = tokens(client)
    r = client.post("/revoke", data={"token": body["access_token"],
                                     "token_type_hint": "access_token"}, headers=basic(AGENCY_ONE))
    assert r.status_code == 200
    assert userinfo(client, body["access_token"]).status_code == 401
    assert introspect(client, body["access_token"]).json == {"active": False}
    # the refresh token is a separate credential and still works
    assert refresh(client, body["refresh_token"]).status_code == 200


def test_rfc7009_revoke_refresh_token_revokes_grant(client, hub):
    body = tokens(client)
    r = client.post("/revoke", data={"token": body["refresh_token"]}, headers=basic(AGENCY_ONE))
    assert r.status_code == 200
    # the grant itself is revoked (its row; introspection reads only that), not merely its
    # access tokens: that mark alone would also get the refresh below refused, after using it
    with hub.db.session() as s:
        assert s.scalars(select(RefreshGrantRecord.revoked_reason)).all() == ["revoked"]
    assert introspect(client, body["refresh_token"]).json == {"active": False}
    assert refresh(client, body["refresh_token"]).json["error"] == "invalid_grant"
    assert userinfo(client, body["access_token"]).status_code == 401


def test_rfc7009_unknown_token_is_200_and_foreign_token_untouched(client):
    r = client.post("/revoke", data={"token": "no-such-token"}, headers=basic(AGENCY_ONE))
    assert r.status_code == 200
    body = tokens(client)
    r = client.post("/revoke", data={"token": body["access_token"]}, headers=basic(AGENCY_TWO))
    assert r.status_code == 400
    assert userinfo(client, body["access_token"]).status_code == 200
    r = client.post("/revoke", data={}, headers=basic(AGENCY_ONE))
    assert r.status_code == 400 and r.json["error"] == "invalid_request"


def test_tampered_access_token_is_refused(client):
    """A well-formed token whose payload was changed after signing (here: its scope widened)
    keeps its issuer, jti and client_id, so only the signature check can refuse it."""
    body = tokens(client)
    header, payload, sig = body["access_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scope"] += " profile"
    forged_payload = base64.urlsafe_b64encode(
        json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = ".".join([header, forged_payload, sig])
    assert forged_payload != payload
    assert userinfo(client, body["access_token"]).status_code == 200  # the original is good
    assert userinfo(client, forged).status_code == 401
    assert introspect(client, forged).json == {"active": False}


def test_hub_logout_ends_session_tokens_but_not_offline_access(client):
    import re

    body = tokens(client)
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert userinfo(client, body["access_token"]).status_code == 401
    r = refresh(client, body["refresh_token"])  # offline access (OIDC Core 11) survives
    assert r.status_code == 200 and userinfo(client, r.json["access_token"]).status_code == 200


def test_code_redeemed_after_logout_is_refused(client):
    import re

    full_login(client, AuthRequest())
    auth = AuthRequest()
    code = query(client.get(auth.url()).headers["Location"])["code"]
    page = client.get("/account").get_data(as_text=True)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    client.post("/logout", data={"csrf": csrf})
    r = redeem(client, auth, code)
    assert r.status_code == 400 and r.json["error"] == "invalid_grant"


def test_key_rotation_publishes_before_signing_and_old_tokens_still_verify(client, hub):
    from datetime import timedelta

    before = tokens(client)
    old_kid = jose_jwt.get_unverified_header(before["id_token"])["kid"]
    # with a lead time the new key is published at once but does not sign yet
    upcoming = hub.keys.rotate("ES256", lead_time=timedelta(hours=1),
                               retire_after=timedelta(days=1))
    kids = {k["kid"] for k in client.get("/jwks").json["keys"]}
    assert {old_kid, upcoming.kid} <= kids
    during = tokens(client)
    assert jose_jwt.get_unverified_header(during["id_token"])["kid"] == old_kid
    # a rotation that takes effect now: new tokens use the new key, old ones still verify
    current = hub.keys.rotate("ES256", lead_time=timedelta(0), retire_after=timedelta(days=1))
    after = tokens(client)
    assert jose_jwt.get_unverified_header(after["id_token"])["kid"] == current.kid
    jwks = client.get("/jwks").json
    for body in (before, after):
        jose_jwt.decode(body["id_token"], jwks, algorithms=["ES256"],
                        audience=AGENCY_ONE.client_id, issuer=HUB_ISSUER,
                        access_token=body["access_token"])
    assert userinfo(client, before["access_token"]).status_code == 200


def test_rfc9700_4_14_no_token_is_rotated_in_after_its_grant_was_revoked(hub):
    """A grant revoked between a use and the rotated token's issue (a rotation racing a
    replay or a revocation) gets no new token, and a wider scope leaves a live token unused
    (RFC 6749 6)."""
    tokens = hub.server.hub.refresh_tokens
    grant = refresh_grant(hub, "rotation-race")
    live = tokens.issue(grant_id="g-live", **grant)
    with pytest.raises(ScopeWidened):
        tokens.use(live, AGENCY_ONE.client_id, scope_within={"openid", "email", "profile"})
    assert tokens.use(live, AGENCY_TWO.client_id) is None  # another agency's: nothing used
    assert tokens.use(live, AGENCY_ONE.client_id, scope_within={"openid"}) is not None

    first = tokens.issue(grant_id="g-raced", **grant)
    used = tokens.use(first, AGENCY_ONE.client_id)
    assert used is not None
    tokens.revoke_grant("g-raced")  # between the use and the rotated token's issue
    with pytest.raises(GrantEnded):
        tokens.issue(grant_id="g-raced", **grant, family_expires_at=used.expires_at)
    assert tokens.use(first, AGENCY_ONE.client_id) is None
    with hub.db.session() as s:
        record = s.get(RefreshGrantRecord, "g-raced")
    # one row says the grant is revoked, and why (the replay above kept the first reason)
    assert record.revoked_at is not None and record.revoked_reason == "revoked"
    assert record.token_hash is None and record.rotations == 0


# -- access tokens carry their own record ----------------------------------------------


def test_issuing_access_tokens_stores_nothing_per_token(make_hub, redis_url):
    """What the hub needs of an access token travels in it (encrypted), so the short-lived
    store does not grow with the tokens issued: a real Redis holds as many keys after 30
    more tokens (client_credentials, and a code exchange's) as after the first; and each
    still works, and is still revoked on its own (RFC 7009)."""
    import redis

    from tests.flows import within_one_window

    own = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: no other test's keys
    server = redis.Redis.from_url(own)
    server.flushdb()
    app = make_hub(redis_url=own)
    client = app.test_client()
    issue = {"grant_type": "client_credentials", "scope": "consent.decisions"}
    within_one_window(needed=10)  # the rate limits' counters: one key each per window
    # the first ten: the counters appear (the agency's is counted in batches)
    first = [client.post("/token", data=issue, headers=basic(AGENCY_ONE)).json["access_token"]
             for _ in range(10)]
    keys = sorted(server.keys())
    more = [client.post("/token", data=issue, headers=basic(AGENCY_ONE)).json["access_token"]
            for _ in range(30)]
    # the two counters, and since when the store holds the revocation marks (one key)
    assert sorted(server.keys()) == keys and len(keys) == 3, keys
    assert all(introspect(client, t).json["active"] is True for t in [*first, *more])
    client.post("/revoke", data={"token": more[0]}, headers=basic(AGENCY_ONE))
    assert introspect(client, more[0]).json == {"active": False}
    assert introspect(client, more[1]).json["active"] is True


def test_an_access_tokens_private_claim_names_no_account_and_only_the_hub_reads_it(client,
                                                                                  hub):
    """The account id would let agencies link a citizen across pairwise sectors: the token
    carries it (and its grant and code) encrypted, readable by no agency; a token the hub
    signed whose private claim it did not write (or wrote for another use) is no token."""
    from kernel.ids import new_id

    body = tokens(client)
    claims = jose_jwt.get_unverified_claims(body["access_token"])
    with hub.db.session() as s:
        grant = s.scalars(select(RefreshGrantRecord)).one()
    assert isinstance(claims["civitas"], str)
    for secret in (grant.account_id, grant.grant_id):
        assert secret not in body["access_token"] and secret not in json.dumps(claims)
    assert userinfo(client, body["access_token"]).status_code == 200
    key = hub.keys.signing_key("ES256")
    for private in (hub.cipher.encrypt(json.dumps([grant.account_id, grant.grant_id, None])),
                    "v2.AAAA", 7, None):
        forged = dict(claims, civitas=private, jti=new_id())
        if private is None:
            del forged["civitas"]  # and no record in the store either
        token = key.sign_jwt({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}, forged)
        assert userinfo(client, token).status_code == 401, private
        assert introspect(client, token).json == {"active": False}


def test_an_access_token_issued_with_a_record_still_works_until_it_is_revoked(client, hub):
    """Tokens issued before they carried their own record have one in the store: they are
    read as before until they expire, and revoked as before."""
    from idp.tokens import AccessToken

    body = tokens(client)
    claims = jose_jwt.get_unverified_claims(body["access_token"])
    with hub.db.session() as s:
        grant = s.scalars(select(RefreshGrantRecord)).one()
    from kernel.ids import new_id

    old = {k: v for k, v in claims.items() if k != "civitas"} | {"jti": new_id()}
    hub.tokens.save_access_token(AccessToken(
        jti=old["jti"], client_id=old["client_id"], account_id=grant.account_id,
        sub=old["sub"], scope=old["scope"], issued_at=old["iat"], expires_at=old["exp"],
        grant_id=grant.grant_id, sid=old["sid"]))
    key = hub.keys.signing_key("ES256")
    token = key.sign_jwt({"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}, old)
    assert userinfo(client, token).json["sub"] == claims["sub"]
    assert introspect(client, token).json["active"] is True
    assert client.post("/revoke", data={"token": token},
                       headers=basic(AGENCY_ONE)).status_code == 200
    assert userinfo(client, token).status_code == 401
    assert userinfo(client, body["access_token"]).status_code == 200  # a jti of its own


def test_a_key_another_worker_rotated_in_verifies_in_every_worker_at_once(config, redis_url):
    """`civitas keys rotate --lead-time` shorter than a worker's key reload (30 s): the
    worker that reloaded first signed with the new key, and every other worker refused its
    tokens (userinfo and introspection 401 / inactive) until its own reload came round. A
    token naming a key id a worker has not loaded now makes it read the keys first, at most
    once a second, so made-up key ids cost one cheap query a second."""
    from datetime import timedelta

    from sqlalchemy import event

    from civitas.app import create_app, stop_background
    from idp.keys import UNKNOWN_KID_RELOAD_SECONDS
    from tests.test_client_credentials import basic, client_token

    config = {**config, "redis_url": redis_url}  # two workers: one database, one store
    first, second = create_app(config), create_app(config)
    try:
        other = second.extensions["civitas"]
        other.keys.reload(force=True)
        current = first.extensions["civitas"].keys.rotate("ES256", lead_time=timedelta(0),
                                  retire_after=timedelta(days=1))
        token = client_token(first.test_client()).json["access_token"]
        assert jose_jwt.get_unverified_header(token)["kid"] == current.kid
        r = second.test_client().post("/introspect", data={"token": token},
                                      headers=basic(AGENCY_ONE))
        assert r.status_code == 200 and r.json["active"] is True, r.json

        reads: list[str] = []
        event.listen(other.db.engine, "before_cursor_execute",
                     lambda *a: reads.append(a[2]) if "signing_keys" in a[2] else None)
        head, _, rest = token.partition(".")
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        time.sleep(UNKNOWN_KID_RELOAD_SECONDS)
        for n in range(5):
            forged = base64.urlsafe_b64encode(json.dumps(
                {**header, "kid": f"made-up-{n}"}).encode()).rstrip(b"=").decode()
            r = second.test_client().post("/introspect", data={"token": f"{forged}.{rest}"},
                                          headers=basic(AGENCY_ONE))
            assert r.status_code == 200 and r.json == {"active": False}
        assert len(reads) == 1, reads
    finally:
        for made in (first, second):
            stop_background(made)
            made.extensions["civitas"].db.dispose()
