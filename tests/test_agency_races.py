"""Agency registrations racing each other on the real PostgreSQL (READ COMMITTED): requests
to /admin/api/agencies lined up on one Barrier, many times over; each test states the
invariant it checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from joserfc.jwk import ECKey

from civitas.app import create_app, stop_background
from idp.admin_api import metadata_from_json
from idp.agencies import metadata_of
from tests.conftest import hub_config
from tests.races import together

TOKEN = "admin-" + "t" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
API = "/admin/api/agencies"
#: how many times each race is run: enough to fail every time while the defect is there
REPS = 25


@pytest.fixture
def pg_app(upstream_issuer: str, pg_database_url: str) -> Iterator[Any]:
    app = create_app(hub_config(upstream_issuer, pg_database_url, database_pool_size=10,
                                housekeeping_interval_seconds=0,
                                backchannel_dispatcher=False, admin_api_token=TOKEN))
    yield app
    stop_background(app)
    app.extensions["civitas"].db.dispose()


def ledger_data(hub: Any, kind: str, client_id: str) -> list[dict[str, Any]]:
    """The data of the ledger's ``kind`` entries about ``client_id``, in ``seq`` order."""
    found = (json.loads(e.entry)["data"] for e in hub.ledger.entries(kind))
    return [d for d in found if d.get("client_id") == client_id]


def test_rfc7592_concurrent_replacements_store_one_of_the_bodies_sent(pg_app):
    """RFC 7592 2.2: a PUT replaces the whole registration. After two PUTs at once (one
    moving the agency to inline ``jwks``, the other to a ``jwks_uri``, with different names),
    the stored agency is exactly one of the two bodies, passes registration's own checks
    (never both ``jwks`` and ``jwks_uri``), and the ledger's last ``agency.changed`` entry
    for it is what is stored."""
    hub = pg_app.extensions["civitas"]
    broken = []
    for i in range(REPS):
        cid = f"put-race-{i}"
        base = {"client_id": cid, "name": "Before",
                "redirect_uris": [f"https://put-race-{i}.agency.example/cb"]}
        r = pg_app.test_client().post(API, json=base, headers=AUTH)  # client_secret_basic
        assert r.status_code == 201, r.get_data(as_text=True)
        key = ECKey.generate_key("P-256", private=True, auto_kid=True).as_dict(private=False)
        with_jwks = {**base, "name": "Inline keys", "token_endpoint_auth_method":
                     "private_key_jwt", "jwks": {"keys": [key]}}
        with_uri = {**base, "name": "Published keys", "token_endpoint_auth_method":
                    "private_key_jwt", "jwks_uri": f"https://put-race-{i}.agency.example/jwks"}
        ra, rb = together(*(partial(pg_app.test_client().put, f"{API}/{cid}", json=body,
                                    headers=AUTH) for body in (with_jwks, with_uri)))
        assert (ra.status_code, rb.status_code) == (200, 200), (ra.json, rb.json)
        row = hub.agencies.get(cid)
        stored = metadata_of(row)
        sent = [hub.agencies.check(metadata_from_json(body, cid))
                for body in (with_jwks, with_uri)]
        nonconforming = [str(exc) for c, exc in hub.agencies.nonconforming() if c == cid]
        last_change = ledger_data(hub, "agency.changed", cid)[-1]
        if stored not in sent or nonconforming or row.secret_hash \
                or last_change["agency_name"] != row.name \
                or last_change["jwks"] != row.jwks or last_change["jwks_uri"] != row.jwks_uri:
            broken.append((i, row.name, row.jwks is not None, row.jwks_uri, nonconforming))
    assert not broken, (f"{len(broken)}/{REPS} stored a registration neither PUT sent "
                        f"(rep, name, has jwks, jwks_uri, refused for): {broken[:3]}")


def test_concurrent_registrations_of_one_client_id_are_one_201_and_400s(pg_app):
    """RFC 7591 3.2.2: of four registrations of one client_id at once, one is stored (201)
    and the others are refused as already registered (400 invalid_client_metadata naming
    ``client_id``), never a server error; the ledger holds one ``agency.registered`` entry
    for it, the refused ones' entries having rolled back with their transactions."""
    hub = pg_app.extensions["civitas"]
    broken = []
    for i in range(REPS):
        cid = f"post-race-{i}"
        body = {"client_id": cid, "name": "Registered once",
                "redirect_uris": [f"https://post-race-{i}.agency.example/cb"]}
        results = together(*(partial(pg_app.test_client().post, API, json=body, headers=AUTH)
                             for _ in range(4)))
        statuses = sorted(r.status_code for r in results)
        refusals = {r.json["error_description"] for r in results if r.status_code == 400}
        entries = ledger_data(hub, "agency.registered", cid)
        if statuses != [201, 400, 400, 400] or len(entries) != 1 \
                or refusals != {f"client_id: {cid!r} is already registered"}:
            broken.append((i, statuses, len(entries), refusals))
    assert not broken, (f"{len(broken)}/{REPS} not one 201 and three 400s "
                        f"(rep, statuses, ledger entries, refusals): {broken[:3]}")
