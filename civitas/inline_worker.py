"""A gunicorn worker whose threads each wait on the worker's poller and serve the request
they are woken for themselves (:class:`InlineWorker`)."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Any

from gunicorn import http, util
from gunicorn.http.body import LengthReader
from gunicorn.workers import base
from gunicorn.workers.gthread import ThreadWorker

#: a connection is armed for one readiness event at a time: the thread woken for it owns it
_ARMED = select.EPOLLIN | select.EPOLLONESHOT
#: how long a kept-alive connection is still served after the worker was told to stop
STOP_KEEPALIVE_LINGER = 2.0
#: the longest a stopping worker's threads take to notice it
_POLL_SECONDS = 0.5
#: how long a connection may take to send a whole request head once it began one. Until the
#: head is whole the connection waits in the worker's poller, not in a thread, so that
#: clients sending heads slowly (slowloris) cannot take every thread; then it is closed
REQUEST_HEAD_SECONDS = 10.0
#: how long a thread waits, in all, for what a request has yet to send (the rest of its
#: body) before the request is taken as cut off and its connection closed
REQUEST_BODY_SECONDS = 10.0
#: a head not ended within this many bytes goes to the parser, which refuses it
_HEAD_BYTES = 64 * 1024


def accept_connection(listener: Any) -> tuple[Any, Any] | None:
    """(socket, address) of a new connection on ``listener``, or None when there was none
    after all (another worker or thread took it, or the client gave up)."""
    try:
        sock, client = listener.accept()
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
            raise
        return None
    return sock, client


class _Deadline:
    """A connection's socket as the request parser reads it (gunicorn's ``SocketUnreader``
    calls ``recv`` alone): a read that would wait past ``deadline`` ends the connection
    (an empty read, which the parser takes as a client that went away), and says so in
    ``expired``. A read of bytes already there never waits, nor costs a system call more."""

    __slots__ = ("sock", "deadline", "expired")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.deadline = 0.0
        self.expired = False

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return bytes(self.sock.recv(size, socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                pass
            left = self.deadline - time.monotonic()
            if left > 0:
                waiting = select.poll()
                waiting.register(self.sock, select.POLLIN)
                if waiting.poll(left * 1000):
                    continue
            self.expired = True
            return b""


class _Conn:
    __slots__ = ("sock", "client", "server", "fd", "parser", "deadline", "busy", "reader",
                 "head", "head_deadline")

    def __init__(self, sock: Any, client: Any, server: Any, deadline: float) -> None:
        self.sock = sock
        self.client = client
        self.server = server
        self.fd = sock.fileno()
        self.parser: Any = None
        self.deadline = deadline
        self.busy = False
        self.reader = _Deadline(sock)
        #: the bytes of a request head begun and not yet whole, and when it must be
        self.head = bytearray()
        self.head_deadline: float | None = None


def _head_whole(head: bytearray) -> bool:
    """Whether ``head`` holds a whole request head (RFC 9112 2.1), or more than one may."""
    return b"\r\n\r\n" in head or len(head) > _HEAD_BYTES


class InlineWorker(base.Worker):  # type: ignore[misc]
    """Each of the worker's ``threads`` waits on one epoll instance; the thread the kernel
    wakes for a readable connection reads, runs and answers its request itself, then arms
    the connection again. gunicorn's gthread worker hands every request from its polling
    thread to a pool thread and back (a queue, a pipe, two thread wake-ups and two poller
    changes each time); here a request costs one wake-up and one poller change.

    A request itself is handled by gthread's own code (``handle_request``: the WSGI call,
    the access log, the hooks, ``max_requests``; ``_keepalive_after``: the bounded drain of
    an unread body). Kept from gthread, with the same settings: a new connection waits in
    the poller until
    its first bytes come, and one that sends nothing within ``keepalive`` seconds is closed
    like an idle kept-alive one; at most ``worker_connections`` are held; pipelined
    requests are answered in order; after ``max_requests`` or a stop, kept-alive
    connections are closed after their answer (and idle ones are served for
    ``STOP_KEEPALIVE_LINGER`` seconds more); the main thread tells the master it is alive
    (gunicorn's ``timeout``) and decides whether the worker takes new connections
    (:meth:`accepting_now`, for :class:`~civitas.gunicorn_app.BalancedInlineWorker`).

    Unlike gthread, whose thread reads a request head and body for as long as the client
    takes to send them (a few connections sending slowly took every thread, for good), a
    request head waits in the poller until it is whole (``REQUEST_HEAD_SECONDS`` at most),
    and a thread waits for the rest of a body ``REQUEST_BODY_SECONDS`` at most."""

    RECHECK = 0.02

    def init_process(self) -> None:
        self.worker_connections = self.cfg.worker_connections
        self.poller = select.epoll()
        self.lock = threading.Lock()
        self.conns: dict[int, _Conn] = {}
        # what gthread's handle_request counts: every connection held, as gthread counts
        # its kept-alive ones, against the connections left when each thread serves one
        self.keepalived_conns = self.conns
        self.max_keepalived = self.cfg.worker_connections - self.cfg.threads
        self.nr_conns = 0
        self._accepting = False
        self._listeners: dict[int, Any] = {}
        self._stopped = False
        super().init_process()

    # -- taking new connections ------------------------------------------------------------

    def accepting_now(self) -> bool:
        """Whether the worker should take new connections now (a subclass adds its rule)."""
        return self.alive and self.nr_conns < self.worker_connections

    def set_accept_enabled(self, enabled: bool) -> None:
        with self.lock:
            if enabled == self._accepting:
                return
            for fd in self._listeners:
                if enabled:
                    self.poller.register(fd, select.EPOLLIN)
                else:
                    self.poller.unregister(fd)
            self._accepting = enabled

    def accept(self, listener: Any) -> None:
        if not self.accepting_now():
            self.set_accept_enabled(False)
            return
        accepted = accept_connection(listener)
        if accepted is None:
            return
        sock, client = accepted
        sock.setblocking(True)  # read and written by one thread at a time, blocking
        conn = _Conn(sock, client, listener.getsockname(),
                     time.monotonic() + self.cfg.keepalive)
        with self.lock:
            self.conns[conn.fd] = conn
            self.nr_conns += 1
            self.poller.register(conn.fd, _ARMED)
        self.accepted()

    def accepted(self) -> None:
        """After a connection was taken (a subclass publishes its count)."""

    # -- the threads -----------------------------------------------------------------------

    def serve(self) -> None:
        """One serving thread: wait for a readable connection (or a new one), serve it."""
        while not self._stopped:
            try:
                events = self.poller.poll(_POLL_SECONDS, 1)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # the poller was closed: the worker is done
                return
            for fd, _ in events:
                listener = self._listeners.get(fd)
                if listener is not None:
                    try:
                        self.accept(listener)
                    except OSError:  # out of descriptors, say: gthread's worker exits too
                        self.log.exception("Cannot accept a connection; the worker stops")
                        self.alive = False
                    continue
                with self.lock:
                    conn = self.conns.get(fd)
                    if conn is None or conn.busy:
                        continue
                    conn.busy = True
                try:
                    self.serve_connection(conn)
                except Exception:  # a bug here must not cost the worker a thread
                    self.log.exception("Error serving a connection")
                    self.drop(conn)

    @staticmethod
    def _head_read(conn: _Conn) -> bool:
        """Add what ``conn`` has sent, without waiting, to the request head it began:
        whether the head is whole now (or never will be: the connection ended or failed,
        or sent more than a head holds: the connection closes, or the parser answers what
        it began)."""
        try:
            data = conn.sock.recv(_HEAD_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False  # the event was a closed connection's, whose descriptor it reuses
        except OSError:
            return True
        if not data:
            return True
        conn.head += data
        return _head_whole(conn.head)

    def serve_connection(self, conn: _Conn) -> None:
        keep = False
        try:
            # a thread takes a request only once its head is whole
            if self._head_read(conn):
                if conn.parser is None:
                    conn.parser = http.get_parser(self.cfg, conn.reader, conn.client)
                while conn.head:
                    conn.parser.unreader.unread(bytes(conn.head))
                    conn.head.clear()
                    conn.head_deadline = None
                    keep = self.handle(conn)
                    if keep:
                        # a pipelined request already read: answered at once if whole
                        conn.head += conn.parser.unreader.take_buffered()
                        if not _head_whole(conn.head):
                            break
            else:
                keep = True
        finally:
            if keep:
                with self.lock:
                    conn.busy = False
                    now = time.monotonic()
                    if conn.head:  # a head begun: whole by REQUEST_HEAD_SECONDS after
                        if conn.head_deadline is None:
                            conn.head_deadline = now + REQUEST_HEAD_SECONDS
                        conn.deadline = conn.head_deadline
                    else:
                        conn.deadline = now + self.cfg.keepalive
                    if not self.alive:
                        conn.deadline = min(conn.deadline, self._linger_until)
                    self.poller.modify(conn.fd, _ARMED)
            else:
                self.drop(conn, graceful=True)

    def _forget(self, conn: _Conn) -> bool:
        """Take ``conn`` out of the worker (the lock held); False if it was already out."""
        if self.conns.pop(conn.fd, None) is None:
            return False
        self.nr_conns -= 1
        try:
            self.poller.unregister(conn.fd)  # before its descriptor can be reused
        except (OSError, ValueError):
            pass
        return True

    def drop(self, conn: _Conn, *, graceful: bool = False) -> None:
        with self.lock:
            if not self._forget(conn):
                return
        if graceful:
            util.close_graceful(conn.sock)
        else:
            util.close(conn.sock)
        self.accepted()

    def handle(self, conn: _Conn) -> bool:
        """One request of ``conn``: whether the connection stays open (gthread's
        ``handle``, for HTTP/1)."""
        req = None
        conn.reader.deadline = time.monotonic() + REQUEST_BODY_SECONDS
        try:
            req = next(conn.parser)
            if not req:
                return False
            keep = self._keepalive_after(conn, self.handle_request(req, conn))
            # a request cut off by its deadline: where the next one would start is unknown
            return bool(keep) and not conn.reader.expired
        except http.errors.NoMoreData as exc:
            self.log.debug("Ignored premature client disconnection. %s", exc)
        except StopIteration as exc:
            self.log.debug("Closing connection. %s", exc)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as exc:  # noqa: BLE001 - answered as gunicorn answers it
            self.handle_error(req, conn.sock, conn.client, exc)
        return False

    # gthread's own: the WSGI call, the access log, the hooks, max_requests and keep-alive
    # (it closes a connection when ``keepalived_conns`` reach ``max_keepalived``), and the
    # drain of a body the app did not read, bounded in time
    handle_request = ThreadWorker.handle_request

    def _keepalive_after(self, conn: _Conn, keepalive: bool) -> bool:
        """gthread's, which first drains what is left of the request's body (bounded in
        time and size: two socket timeout changes per request). A body read to its end, or
        a request without one (every GET), has nothing left: it answers as the drain would,
        without touching the socket."""
        if keepalive:
            body = getattr(conn.parser.mesg, "body", None)
            reader = getattr(body, "reader", None)
            if (isinstance(reader, LengthReader) and reader.length == 0
                    and getattr(body, "failed", True) is False):
                return True
        return bool(ThreadWorker._keepalive_after(self, conn, keepalive))

    # -- the main thread -------------------------------------------------------------------

    def close_idle(self, now: float) -> None:
        """Close the connections idle past their deadline (none of them is being served:
        a thread marks one busy under the same lock before it reads from it)."""
        with self.lock:
            idle = [conn for conn in self.conns.values()
                    if not conn.busy and conn.deadline <= now]
            for conn in idle:
                self._forget(conn)
        for conn in idle:
            util.close(conn.sock)
        if idle:
            self.accepted()

    def run(self) -> None:
        self._linger_until = float("inf")
        for listener in self.sockets:
            listener.setblocking(False)
            self._listeners[listener.fileno()] = listener
        threads = [threading.Thread(target=self.serve, name=f"civitas-serve-{n}", daemon=True)
                   for n in range(self.cfg.threads)]
        for thread in threads:
            thread.start()
        next_sweep = 0.0
        while self.alive:
            self.notify()
            self.set_accept_enabled(self.accepting_now())
            now = time.monotonic()
            if now >= next_sweep:
                self.close_idle(now)
                next_sweep = now + 0.25
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            # the serving threads stop taking connections when it is not this worker's
            # turn; it is given back here, so this loop runs often (about 20 µs of CPU)
            time.sleep(self.RECHECK)
        # stopping: no new connections; kept-alive ones are closed after their answer, or
        # when idle past the linger; requests in progress get graceful_timeout
        self.alive = False
        self.set_accept_enabled(False)
        self._linger_until = time.monotonic() + STOP_KEEPALIVE_LINGER
        with self.lock:
            for conn in self.conns.values():
                conn.deadline = min(conn.deadline, self._linger_until)
        give_up = time.monotonic() + self.cfg.graceful_timeout
        while self.nr_conns > 0 and time.monotonic() < give_up:
            self.notify()
            self.close_idle(time.monotonic())
            time.sleep(0.05)
        self._stopped = True
        for conn in list(self.conns.values()):
            self.drop(conn)
        self.poller.close()
        for listener in self.sockets:
            listener.close()
