"""A relay between the hub and the real PostgreSQL that can lose the answer to a COMMIT.

The one fault the other outage tests cannot provoke: the server commits, and the hub never
hears it (the connection drops after COMMIT reached the server and before its reply came
back). ``pg_terminate_backend`` cuts a transaction before it commits; this relay lets the
COMMIT through, waits for the server's whole answer (CommandComplete, then ReadyForQuery:
the transaction is durable), drops that answer and closes both sides.

It reads the PostgreSQL frontend/backend protocol (version 3.0, "Message Flow" and "Message
Formats" of the PostgreSQL manual) only as far as needed: after the untyped startup packet,
every message is a type byte and a 4-byte length that counts itself. Each connection's
backend process id is taken from BackendKeyData ('K'), so a test that saw a statement run on
backend ``pid`` (``dbapi_connection.info.backend_pid``) can call
:meth:`PgProxy.lose_commit_reply` with it. The hub must not ask for TLS or GSS encryption
(``sslmode=disable&gssencmode=disable``): the relay reads the bytes.
"""

from __future__ import annotations

import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """One typed message: its type byte and the whole message (type, length, body)."""
    head = _read_exactly(sock, 5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], head + _read_exactly(sock, length - 4)


class PgProxy:
    """Listens on 127.0.0.1 and relays every connection to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        #: backend pids whose next COMMIT's answer is to be lost
        self._armed: set[int] = set()
        #: backend pids whose COMMIT's answer was lost (the server had committed)
        self.lost: list[int] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        #: cleared while the server is to seem stopped (:meth:`freeze`)
        self._flowing = threading.Event()
        self._flowing.set()
        threading.Thread(target=self._accept, daemon=True, name="pg-proxy").start()

    def url(self, database_url: str) -> str:
        """``database_url`` through the relay, without TLS or GSS encryption."""
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        query = "&".join(q for q in (parts.query, "sslmode=disable&gssencmode=disable") if q)
        return urlunsplit(parts._replace(
            netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host, query=query))

    def lose_commit_reply(self, pid: int) -> None:
        """The next COMMIT on backend ``pid`` reaches the server; its answer never returns."""
        with self._lock:
            self._armed.add(pid)

    def freeze(self) -> None:
        """From now on the server's answers are held back, on every connection, open or
        new: a server that was stopped (SIGSTOP) or a network path that went half-open.
        The connections stay open; :meth:`thaw` lets the held answers through."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):  # one message at a time: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            _Relay(self, client, server).start()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Relay:
    """One connection: the frontend's messages to the server, the backend's back."""

    def __init__(self, proxy: PgProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.pid: int | None = None
        #: a COMMIT whose answer is to be lost has been sent to the server
        self.commit_sent = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._frontend, daemon=True, name="pg-proxy-f").start()
        threading.Thread(target=self._backend, daemon=True, name="pg-proxy-b").start()

    def _frontend(self) -> None:
        try:
            (length,) = struct.unpack("!i", _read_exactly(self.client, 4))
            startup = _read_exactly(self.client, length - 4)
            self.server.sendall(struct.pack("!i", length) + startup)
            while True:
                kind, message = _read_message(self.client)
                if kind == b"Q" and message[5:].rstrip(b"\0").strip().upper() == b"COMMIT":
                    with self.proxy._lock:
                        armed = self.pid in self.proxy._armed
                        self.proxy._armed.discard(self.pid)  # type: ignore[arg-type]
                    if armed:
                        self.commit_sent.set()
                self.server.sendall(message)
        except (ConnectionError, OSError):
            _close(self.server)

    def _backend(self) -> None:
        try:
            while True:
                kind, message = _read_message(self.server)
                if kind == b"K":
                    (self.pid,) = struct.unpack("!i", message[5:9])
                if self.commit_sent.is_set():
                    # the COMMIT's answer: read it all, so that the server has committed,
                    # and give none of it to the hub
                    if kind == b"Z":
                        with self.proxy._lock:
                            self.proxy.lost.append(self.pid or 0)
                        break
                    continue
                self.proxy._flowing.wait()
                self.client.sendall(message)
        except (ConnectionError, OSError):
            pass
        _close(self.client)
        _close(self.server)
