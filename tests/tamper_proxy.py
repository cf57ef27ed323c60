"""A real HTTP proxy in front of the real upstream OP that alters its answers.

Used to provoke upstream faults (a tampered ID token, a wrong issuer, a foreign userinfo
``sub``, an unsigned token) that a well-behaved OP never produces. Loopback only.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class TamperProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.mode = "pass"
        self.server: ThreadingHTTPServer | None = None
        #: requests whose path starts with ``hold_path`` wait for ``release`` before they are
        #: forwarded (an upstream that has stopped answering); ``held`` is set as one waits
        self.hold_path: str | None = None
        self.release = threading.Event()
        self.held = threading.Event()
        #: paths of the requests received, in order
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def alter(self, path: str, body: bytes) -> bytes:
        if path.startswith("/.well-known/openid-configuration"):
            doc = json.loads(body)
            auth_endpoint = doc["authorization_endpoint"]
            doc = json.loads(json.dumps(doc).replace(self.target, self.url))
            doc["authorization_endpoint"] = auth_endpoint  # the browser talks to the OP
            if self.mode == "wrong-discovery-issuer":
                doc["issuer"] = self.url + "/elsewhere"
            else:
                doc["issuer"] = self.target if self.mode == "pass" else self.url
            if self.mode == "foreign-issuer":
                doc["authorization_response_iss_parameter_supported"] = False
            return json.dumps(doc).encode()
        if path.startswith("/token"):
            doc = json.loads(body)
            if "id_token" in doc:
                header, payload, sig = doc["id_token"].split(".")
                if self.mode == "tamper-id-token":
                    claims = json.loads(_unb64(payload))
                    claims["email"] = "mallory@example.org"
                    doc["id_token"] = ".".join([header, _b64(json.dumps(claims).encode()), sig])
                elif self.mode == "alg-none":
                    doc["id_token"] = ".".join([_b64(b'{"alg":"none"}'), payload, ""])
            return json.dumps(doc).encode()
        if path.startswith("/me") and self.mode == "userinfo-sub":
            doc = json.loads(body)
            doc["sub"] = "someone-else"
            return json.dumps(doc).encode()
        return body

    def handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                proxy.seen.append(self.path)
                if proxy.hold_path is not None and self.path.startswith(proxy.hold_path):
                    proxy.held.set()
                    proxy.release.wait(30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "accept-encoding")}
                resp = requests.request(self.command, proxy.target + self.path, data=data,
                                        headers=headers, allow_redirects=False, timeout=10)
                body = proxy.alter(self.path, resp.content) if resp.ok else resp.content
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    @contextmanager
    def running(self) -> Iterator[TamperProxy]:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
