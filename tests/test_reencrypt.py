"""``civitas secrets reencrypt`` (kernel/reencrypt.py): every value encrypted at rest
rewritten under the first configured key, so that an old key can be taken out of
``encryption_key`` without losing what it encrypted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from jose import jwt as jose_jwt
from sqlalchemy import MetaData, select, update

from broker.models import AccountAttribute, ConstituentAccount
from civitas.app import create_app, stop_background
from civitas.cli import encrypted_columns, main
from idp.models import SigningKey
from kernel.crypto import FieldCipher, WrittenWith
from kernel.db import Base, Database
from kernel.reencrypt import EncryptedColumn, reencrypt_column
from tests.conftest import hub_config
from tests.flows import AGENCY_TWO, AuthRequest, full_login, query, redeem
from tests.test_field_cipher import fernet_token

OLD, NEW, LOST = (FieldCipher.generate_key() for _ in range(3))
ATTRIBUTES = EncryptedColumn("account attributes", AccountAttribute, "value_encrypted")


def attributes(db: Database) -> dict[int, tuple[str, str, Any, Any]]:
    """Each attribute row: (stored value, acr, asserted_at, account) by id."""
    with db.session() as s:
        return {r.id: (r.value_encrypted, r.acr, r.asserted_at, r.account_id)
                for r in s.scalars(select(AccountAttribute))}


def store(db: Database, values: dict[int, str]) -> None:
    with db.session() as s:
        for row_id, value in values.items():
            s.execute(update(AccountAttribute).where(AccountAttribute.id == row_id)
                      .values(value_encrypted=value))


def test_every_column_encrypted_at_rest_is_reencrypted():
    """A new encrypted column must join ``encrypted_columns``, or rotating the key would
    strand its values: every ``*_encrypted`` column of the schema is listed."""
    listed = {(c.value.table.name, c.value.name) for c in encrypted_columns()}
    metadata: MetaData = Base.metadata
    found = {(t.name, c.name) for t in metadata.tables.values() for c in t.columns
             if c.name.endswith("_encrypted")}
    assert listed == found


def test_values_under_every_old_key_and_scheme_are_rewritten_and_read_the_same(sql_hub):
    """On SQLite and PostgreSQL: Fernet values and v2 values under the second key are
    rewritten under the first, nothing else of the row changes, a value no configured key
    opens is left byte for byte and named, and a second run has nothing to do."""
    hub = sql_hub
    db = hub.db
    old = FieldCipher([OLD])
    ids = []
    with db.session() as s:
        account = ConstituentAccount()
        s.add(account)
        s.flush()
        for index in range(7):
            row = AccountAttribute(account_id=account.id, name=f"claim{index}",
                                   value_encrypted="-", source_connector="op",
                                   acr="urn:civitas:acr:ial1:aal1")
            s.add(row)
            s.flush()
            ids.append(row.id)
    plain = {row_id: json.dumps(f"value {row_id} ✓") for row_id in ids}
    cipher = FieldCipher([NEW, OLD])
    written = {
        ids[0]: fernet_token(OLD, plain[ids[0]]),      # before v2, second key
        ids[1]: fernet_token(NEW, plain[ids[1]]),      # before v2, first key
        ids[2]: old.encrypt(plain[ids[2]]),            # v2, second key
        ids[3]: old.encrypt(plain[ids[3]]),
        ids[4]: cipher.encrypt(plain[ids[4]]),         # v2, first key: as it should be
        ids[5]: FieldCipher([LOST]).encrypt(plain[ids[5]]),  # a key nobody configured
        ids[6]: fernet_token(LOST, plain[ids[6]]),
    }
    store(db, written)
    before = attributes(db)

    dry = reencrypt_column(db, cipher, ATTRIBUTES, dry_run=True, batch=2)
    assert attributes(db) == before  # a dry run writes nothing
    assert dry.to_rewrite == 4 and dry.rewritten == 0

    census = reencrypt_column(db, cipher, ATTRIBUTES, batch=2)  # several batches
    assert census.found == {WrittenWith("fernet", 1): 1, WrittenWith("fernet", 0): 1,
                             WrittenWith("v2", 1): 2, WrittenWith("v2", 0): 1}
    assert (census.rewritten, census.changed_meanwhile) == (4, 0)
    assert census.unreadable == 2 and census.unreadable_rows == [ids[5], ids[6]]
    after = attributes(db)
    for row_id in ids[:5]:
        stored, acr, asserted_at, account_id = after[row_id]
        assert FieldCipher([NEW]).decrypt(stored) == plain[row_id]  # the first key alone
        assert cipher.inspect(stored)[1] == WrittenWith("v2", 0)
        assert (acr, asserted_at, account_id) == before[row_id][1:]  # not a new assertion
    assert after[ids[4]] == before[ids[4]]  # already current: untouched
    assert after[ids[5]] == before[ids[5]] and after[ids[6]] == before[ids[6]]

    again = reencrypt_column(db, cipher, ATTRIBUTES)
    assert again.rewritten == 0 and again.to_rewrite == 0 and again.unreadable == 2
    assert attributes(db) == after


class _SignsInMeanwhile(FieldCipher):
    """A cipher whose first re-encryption lets a hub rewrite the value first, as a login of
    the attribute's owner would between the run's read and its write."""

    def __init__(self, keys: list[str], db: Database, row_id: int, fresh: str) -> None:
        super().__init__(keys)
        self.db, self.row_id, self.fresh, self.done = db, row_id, fresh, False

    def encrypt(self, plaintext: str) -> str:
        if not self.done:
            self.done = True
            store(self.db, {self.row_id: self.fresh})
        return super().encrypt(plaintext)


def test_a_value_a_hub_rewrites_meanwhile_is_left_as_the_hub_wrote_it(hub, client):
    full_login(client, AuthRequest())
    rows = attributes(hub.db)
    first = min(rows)
    old_cipher = hub.cipher  # the hub's own key, as its logins wrote them
    store(hub.db, {row_id: fernet_token(hub.settings.encryption_keys[0],
                                        old_cipher.decrypt(value))
                   for row_id, (value, *_rest) in rows.items()})
    newer = old_cipher.encrypt(json.dumps("written by a login meanwhile"))
    cipher = _SignsInMeanwhile(hub.settings.encryption_keys, hub.db, first, newer)
    census = reencrypt_column(hub.db, cipher, ATTRIBUTES)
    assert census.changed_meanwhile == 1 and census.rewritten == len(rows) - 1
    assert attributes(hub.db)[first][0] == newer  # the login's value, not the old one


class _Garbles(FieldCipher):
    """A cipher whose new values do not read back as what was encrypted (a broken build):
    writing them would lose the values they replace."""

    def encrypt(self, plaintext: str) -> str:
        return super().encrypt(plaintext + " ")


def test_a_rewritten_value_that_would_not_read_back_is_never_written(hub, client):
    full_login(client, AuthRequest())
    key = hub.settings.encryption_keys[0]
    store(hub.db, {row_id: fernet_token(key, hub.cipher.decrypt(value))
                   for row_id, (value, *_rest) in attributes(hub.db).items()})
    before = attributes(hub.db)
    assert before
    with pytest.raises(RuntimeError, match="account attributes: a rewritten value did not "
                                           "read back"):
        reencrypt_column(hub.db, _Garbles([key]), ATTRIBUTES)
    assert attributes(hub.db) == before  # every value as it was, and still readable
    assert all(hub.cipher.decrypt(value) for value, *_rest in before.values())


def _settings_file(tmp_path: Any, config: dict[str, Any], name: str) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_after_reencrypt_the_old_key_can_be_removed(upstream_issuer, pg_database_url,
                                                      redis_url, tmp_path):
    """The operator's rotation end to end, on PostgreSQL and Redis: a hub ran with OLD
    (attributes, signing key and ledger key under it, one attribute still a Fernet value from
    before v2); the operator puts NEW first and runs ``civitas secrets reencrypt``; a hub
    with NEW alone then serves the citizen's next single sign-on with her claims, signs its
    tokens and seals the ledger."""
    config = hub_config(upstream_issuer, pg_database_url, redis_url=redis_url,
                        encryption_key=OLD, housekeeping_interval_seconds=0)
    first = create_app(config)
    try:
        client = first.test_client()
        full_login(client, AuthRequest())
        hub = first.extensions["civitas"]
        hub.ledger.signer()  # the ledger's key, as the first seal makes it
        some = min(attributes(hub.db))
        store(hub.db, {some: fernet_token(OLD, hub.cipher.decrypt(attributes(hub.db)[some][0]))})
        cookie = client.get_cookie("civitas_session").value
    finally:
        stop_background(first)
        first.extensions["civitas"].db.dispose()

    runner = CliRunner()
    rotated = _settings_file(tmp_path, {**config, "encryption_key": f"{NEW},{OLD}"}, "r.yaml")
    dry = runner.invoke(main, ["--config", rotated, "secrets", "reencrypt", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "values would be rewritten; nothing was written" in dry.output
    result = runner.invoke(main, ["--config", rotated, "secrets", "reencrypt"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("account attributes:") and "(Fernet, before v2)" in line
               and "under key 2" in line for line in lines), result.output
    assert any(line.startswith("signing keys:") and "rewritten 1" in line for line in lines)
    assert any(line.startswith("ledger keys:") and "rewritten 1" in line for line in lines)
    assert "the other 1 keys of encryption_key can be removed" in result.output
    again = runner.invoke(main, ["--config", rotated, "secrets", "reencrypt"])
    assert again.exit_code == 0 and "rewritten 0" in again.output

    second = create_app({**config, "encryption_key": NEW})  # the old key removed
    try:
        client = second.test_client()
        client.set_cookie("civitas_session", cookie, domain="localhost")
        auth = AuthRequest(agency=AGENCY_TWO, scope="openid email")
        r = client.get(auth.url())
        params = query(r.headers["Location"]) if r.status_code == 302 else None
        assert params and "code" in params, r.get_data(as_text=True)[:400]  # SSO, no login
        body = redeem(client, auth, params["code"]).json
        assert jose_jwt.get_unverified_claims(body["id_token"])["email"] == "alice@example.org"
        hub = second.extensions["civitas"]
        with hub.db.session() as s:
            keys = list(s.scalars(select(SigningKey.private_jwk_encrypted)))
        assert keys and all(FieldCipher([NEW]).decrypt(k) for k in keys)
        hub.ledger.seal()
        assert hub.ledger.checkpoint().size > 0
    finally:
        stop_background(second)
        second.extensions["civitas"].db.dispose()


def test_an_unreadable_value_fails_the_command_and_names_its_row(upstream_issuer,
                                                                tmp_path):
    config = hub_config(upstream_issuer, f"sqlite:///{tmp_path}/c.db", encryption_key=OLD)
    app = create_app(config)
    try:
        client = app.test_client()
        full_login(client, AuthRequest())
        db = app.extensions["civitas"].db
        some = min(attributes(db))
        store(db, {some: FieldCipher([LOST]).encrypt('"x"')})
    finally:
        stop_background(app)
        app.extensions["civitas"].db.dispose()
    path = _settings_file(tmp_path, {**config, "encryption_key": f"{NEW},{OLD}"}, "r.yaml")
    result = CliRunner().invoke(main, ["--config", path, "secrets", "reencrypt"])
    assert result.exit_code == 1
    assert f"account attributes: rows {some}" in result.stderr
    assert "do not remove any key" in result.stderr
    assert "1 unreadable (left)" in result.stdout


@pytest.mark.parametrize("batch", ["0", "x"])
def test_a_bad_batch_size_is_refused(batch, tmp_path, upstream_issuer):
    path = _settings_file(tmp_path, hub_config(upstream_issuer, f"sqlite:///{tmp_path}/c.db"),
                          "c.yaml")
    result = CliRunner().invoke(main, ["--config", path, "secrets", "reencrypt",
                                       "--batch", batch])
    assert result.exit_code == 2 and "--batch" in result.output


def test_a_database_without_the_schema_gets_a_plain_error_and_nothing_else(tmp_path,
                                                                           upstream_issuer):
    path = _settings_file(tmp_path, hub_config(upstream_issuer, f"sqlite:///{tmp_path}/e.db"),
                          "c.yaml")
    result = CliRunner().invoke(main, ["--config", path, "secrets", "reencrypt"])
    assert result.exit_code == 1
    assert "no such table: account_attributes" in result.output
    assert "civitas db upgrade" in result.output and "Traceback" not in result.output
