"""The real-server helpers in tests/servers.py start, answer, and stop."""

from __future__ import annotations

import socket

import pytest
import requests

try:  # works whether or not tests/ is (made) a package
    from tests import servers
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    import servers


def _port_closed(url_port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", url_port), timeout=1).close()
    except OSError:
        return True
    return False


def test_free_port_is_bindable():
    port = servers.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.skipif(not servers.find_redis_server(), reason="redis-server is not installed")
def test_run_redis(tmp_path):
    import redis

    with servers.run_redis(tmp_path) as url:
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        client = redis.Redis.from_url(url)
        client.set("civitas:probe", "ok")
        assert client.get("civitas:probe") == b"ok"
        client.close()
        port = client.connection_pool.connection_kwargs["port"]
    assert _port_closed(port)


@pytest.mark.skipif(
    not servers.find_postgres_bindir(), reason="PostgreSQL server binaries are not installed"
)
def test_run_postgres(tmp_path):
    import sqlalchemy as sa

    with servers.run_postgres(tmp_path) as url:
        assert url.startswith("postgresql+psycopg://civitas:")
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
            assert conn.execute(sa.text("select current_user")).scalar_one() == "civitas"
        # Leave the pooled connection open: shutdown must not wait for it.
        port = engine.url.port
    engine.dispose()
    assert _port_closed(port)


CLIENTS = [
    {
        "client_id": "civitas-test",
        "client_secret": "civitas-test-secret",
        "redirect_uris": ["http://127.0.0.1:9/callback"],
    }
]


@pytest.mark.skipif(not servers.find_node(), reason="node is not installed")
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_run_upstream_op(tmp_path, alg):
    with servers.run_upstream_op(tmp_path, CLIENTS, alg=alg) as issuer:
        disc = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=5).json()
        assert disc["issuer"] == issuer
        assert disc["id_token_signing_alg_values_supported"] == [alg]
        assert disc["authorization_response_iss_parameter_supported"] is True
        assert disc["code_challenge_methods_supported"] == ["S256"]
        port = int(issuer.rsplit(":", 1)[1])
    assert _port_closed(port)


@pytest.mark.skipif(not servers.find_node(), reason="node is not installed")
def test_run_upstream_op_start_failure_reports_log(tmp_path):
    with pytest.raises(RuntimeError, match="ID_TOKEN_ALG must be RS256 or ES256"):
        with servers.run_upstream_op(tmp_path, CLIENTS, alg="HS256"):
            pass  # pragma: no cover
