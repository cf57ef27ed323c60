"""A real HTTP proxy in front of the real upstream OP that alters its answers.

Used to provoke upstream faults (a tampered ID token, a wrong issuer, a foreign userinfo
``sub``, an unsigned token) that a well-behaved OP never produces. Loopback only.

The proxy plays an OP of its own: its discovery document names the proxy as the issuer and
its own JWKS, and it signs the real OP's ID tokens again, as that issuer, with a key of its
own. In ``pass`` mode a login through it succeeds, so each other mode differs from a good
login by one fault only, and the hub's refusal shows the check named after that fault (a test
of one check that another check stops first proves nothing). The browser still goes to the
real OP's authorization endpoint: :meth:`TamperProxy.as_issuer` gives its way back the
``iss`` (RFC 9207) that the proxy, as the issuer, would give it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests
from joserfc import jws, jwt
from joserfc.jwk import RSAKey

#: the most the hub reads of one answer (connectors.oidc.MAX_RESPONSE_BYTES, kept apart here
#: so that a change there is noticed)
MAX_ANSWER_BYTES = 512 * 1024

#: where the proxy serves its own keys (answered by the proxy, never forwarded)
JWKS_PATH = "/tamper-proxy/jwks"

#: each mode's change to the claims of an ID token signed again by the proxy
CLAIM_FAULTS: dict[str, dict[str, Any]] = {
    "wrong-aud": {"aud": "another-client"},
    "expired": {"exp": -3600, "iat": -7200},  # seconds from now
    "future-iat": {"iat": 3600},
    "wrong-nonce": {"nonce": "not-the-logins-nonce"},
    "no-sub": {"sub": None},
    "long-sub": {"sub": "s" * 256},
    "non-ascii-sub": {"sub": "s\u00fc"},
    "surrogate-sub": {"sub": "s\ud800"},  # valid JSON ("\ud800"), but no Unicode text
    "wrong-azp": {"azp": "another-client"},
}

#: modes whose discovery document lacks one of the fields the hub needs (Discovery 1.0 3)
DISCOVERY_FIELDS = ("authorization_endpoint", "token_endpoint", "jwks_uri")


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
        self.key = RSAKey.generate_key(2048, parameters={"kid": "tamper-proxy-1"}, private=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def as_issuer(self, callback: str) -> str:
        """The real OP's way back to the hub, its RFC 9207 ``iss`` naming the proxy."""
        parts = urlsplit(callback)
        params = dict(parse_qsl(parts.query))
        params["iss"] = self.url
        return parts._replace(query=urlencode(params)).geturl()

    def jwks(self) -> bytes:
        return json.dumps({"keys": [self.key.as_dict(private=False)]}).encode()

    def _id_token(self, original: str) -> str:
        """The real OP's ID token, issued again by the proxy, with this mode's fault."""
        claims = json.loads(_unb64(original.split(".")[1]))
        if self.mode != "foreign-issuer":
            claims["iss"] = self.url
        now = int(time.time())
        for name, value in CLAIM_FAULTS.get(self.mode, {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = now + value if name in ("exp", "iat") else value
        if self.mode == "several-audiences":  # and no azp to say which of them asked for it
            aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
            claims["aud"] = [*aud, "another-client"]
            claims.pop("azp", None)
        if self.mode == "surrogate-sub":  # jwt.encode writes UTF-8, which has no surrogate
            return jws.serialize_compact({"alg": "RS256", "kid": "tamper-proxy-1"},
                                         json.dumps(claims).encode(), self.key)
        token = jwt.encode({"alg": "RS256", "kid": "tamper-proxy-1"}, claims, self.key)
        header, payload, sig = token.split(".")
        if self.mode == "tamper-id-token":
            claims["email"] = "mallory@example.org"
            return ".".join([header, _b64(json.dumps(claims).encode()), sig])
        if self.mode == "alg-none":
            return ".".join([_b64(b'{"alg":"none"}'), payload, ""])
        return token

    def alter(self, path: str, body: bytes) -> bytes:
        if path.startswith("/.well-known/openid-configuration"):
            doc = json.loads(body)
            auth_endpoint = doc["authorization_endpoint"]
            doc = json.loads(json.dumps(doc).replace(self.target, self.url))
            doc["authorization_endpoint"] = auth_endpoint  # the browser talks to the OP
            doc["jwks_uri"] = self.url + JWKS_PATH
            doc["issuer"] = self.url
            if self.mode == "wrong-discovery-issuer":
                doc["issuer"] = self.url + "/elsewhere"
            for name in DISCOVERY_FIELDS:
                if self.mode == f"discovery-no-{name}":
                    doc.pop(name)
            return json.dumps(doc).encode()
        if path.startswith("/token"):
            doc = json.loads(body)
            if "id_token" in doc:
                doc["id_token"] = self._id_token(doc["id_token"])
            if self.mode == "no-id-token":
                doc.pop("id_token", None)
            if self.mode == "token-type":  # a sender-constrained token the hub cannot use
                doc["token_type"] = "DPoP"
            if self.mode == "huge-token":  # one byte more than the hub reads
                doc["padding"] = ""
                doc["padding"] = "x" * (MAX_ANSWER_BYTES + 1 - len(json.dumps(doc)))
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
                if self.path == JWKS_PATH:
                    self._answer(200, {"Content-Type": "application/json"}, proxy.jwks())
                    return
                if proxy.mode == "down":  # an upstream whose server is failing
                    self._answer(503, {"Content-Type": "text/plain"}, b"Service Unavailable")
                    return
                if proxy.hold_path is not None and self.path.startswith(proxy.hold_path):
                    proxy.held.set()
                    proxy.release.wait(30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "accept-encoding")}
                resp = requests.request(self.command, proxy.target + self.path, data=data,
                                        headers=headers, allow_redirects=False, timeout=10)
                body = proxy.alter(self.path, resp.content) if resp.ok else resp.content
                self._answer(resp.status_code, {
                    k: v for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding", "keep-alive")}, body)

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
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
