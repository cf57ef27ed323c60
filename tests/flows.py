"""Drive full logins: an agency's authorization request, the hub's pages (Flask test client),
the real upstream's login form (requests, its own cookie jar), and back."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests

from connectors import UpstreamIdentity

UPSTREAM_CLIENT_ID = "civitas-test-hub"
UPSTREAM_SECRET = "upstream-secret-" + "x" * 24


@dataclass(frozen=True)
class TestAgency:
    client_id: str
    secret: str
    redirect_uri: str
    name: str

    def config(self, **extra: Any) -> dict[str, Any]:
        """Settings for this agency. Its claims rest on the agency's public task, so logins
        are not interrupted by a consent page; tests of consent declare consent agencies."""
        return {"client_id": self.client_id, "name": self.name,
                "redirect_uris": [self.redirect_uri], "client_secret": self.secret,
                "consent": PUBLIC_TASK, **extra}


PUBLIC_TASK: dict[str, Any] = {
    "notice_url": "https://agency.example/privacy", "notice_version": "2026-01",
    "contact_name": "Privacy Office", "contact_email": "privacy@agency.example",
    "contact_phone": "+1 555 0100", "contact_address": "1 Example Plaza, Springfield",
    "contact_country": "US", "contact_url": "https://agency.example/privacy-office",
    "claims": [
        {"claim": c, "purposes": ["service-delivery"], "lawful_basis": "public_task",
         "required": True, "description": f"Your {c.replace('_', ' ')}"}
        for c in ("name", "given_name", "family_name", "email")
    ],
}


AGENCY_ONE = TestAgency("agency-one", "s1-" + "a" * 40, "https://one.agency.example/cb",
                        "Agency One")
AGENCY_TWO = TestAgency("agency-two", "s2-" + "b" * 40, "https://two.agency.example/cb",
                        "Agency Two")


def citizen(hub: Any, subject: str) -> str:
    """The account of upstream ``op``'s ``subject``, resolved as a login would (no login)."""
    return str(hub.accounts.resolve(UpstreamIdentity(
        connector_id="op", subject=subject, acr="urn:civitas:acr:ial1:aal1",
        attributes={})).account_id)


def within_one_window(window: int = 60, needed: float = 5) -> None:
    """Rate limits count in fixed windows that turn on the clock's minute
    (kernel.ratelimit): wait, if need be, until the next ``needed`` seconds lie in one
    window, so that a test's requests are all counted in it."""
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.05)


def metric(name: str, **labels: str) -> float:
    """A Prometheus series of this process as it stands (0 before its first count)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


@dataclass
class AuthRequest:
    agency: TestAgency = AGENCY_ONE
    scope: str = "openid profile email"
    state: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    verifier: str = ""
    challenge: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.verifier:
            self.verifier, self.challenge = pkce_pair()

    def params(self) -> dict[str, str]:
        p = {"response_type": "code", "client_id": self.agency.client_id,
             "redirect_uri": self.agency.redirect_uri, "scope": self.scope,
             "state": self.state, "nonce": self.nonce, "code_challenge": self.challenge,
             "code_challenge_method": "S256"}
        p.update(self.extra)
        return {k: v for k, v in p.items() if v is not None}

    def url(self) -> str:
        return "/authorize?" + urlencode(self.params())


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def upstream_login(start_url: str, username: str = "alice",
                   password: str | None = None,
                   browser: requests.Session | None = None) -> str:
    """Log in at the real upstream; return the URL it sends the browser back to."""
    browser = browser or requests.Session()
    password = password or f"{username}-password"
    r = browser.get(start_url, timeout=10)
    assert r.status_code == 200, r.text[:500]
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    assert action, r.text[:500]
    r = browser.post(urljoin(r.url, html.unescape(action.group(1))),
                     data={"username": username, "password": password},
                     allow_redirects=False, timeout=10)
    # follow the upstream's own redirects until it points back at the hub
    upstream_origin = "{0.scheme}://{0.netloc}".format(urlsplit(start_url))
    for _ in range(10):
        assert r.status_code in (302, 303), (r.status_code, r.text[:500])
        location = urljoin(r.url, r.headers["Location"])
        if not location.startswith(upstream_origin):
            return location
        r = browser.get(location, allow_redirects=False, timeout=10)
    raise AssertionError("upstream never redirected back")


def start_login(client: Any, auth: AuthRequest, upstream_id: str = "op") -> str:
    """From the agency's request to the upstream's authorization URL."""
    r = client.get(auth.url())
    assert r.status_code == 303, r.data[:500]
    r = client.get(path_of(r.headers["Location"]))
    assert r.status_code == 200
    links = re.findall(r'href="(/login/[^"]+/start\?flow=[^"]+)"', r.get_data(as_text=True))
    link = next(html.unescape(x) for x in links if f"/login/{upstream_id}/" in x)
    r = client.get(link)
    assert r.status_code == 303, r.data[:500]
    return str(r.headers["Location"])


def consent_answer(page: str, *, decision: str = "allow",
                   optional: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The form a citizen sends back from the consent page ``page``: its hidden fields,
    ``decision``, and the optional claims ticked (every one unless ``optional`` is given,
    offline access too)."""
    form: dict[str, Any] = {
        name: html.unescape(value) for name, value in
        re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)}
    ticks = re.findall(r'<input type="checkbox" name="claim" value="([^"]+)"', page)
    form["claim"] = list(ticks if optional is None else optional)
    form["decision"] = decision
    return form


def allow_consent(client: Any, response: Any, *, decision: str = "allow",
                  optional: tuple[str, ...] | None = None) -> Any:
    """If the hub asks for consent, answer it (all optional claims ticked unless given)."""
    if response.status_code != 303 or not response.headers["Location"].startswith(
            "/authorize/consent"):
        return response
    page = client.get(path_of(response.headers["Location"])).get_data(as_text=True)
    return client.post("/authorize/consent",
                       data=consent_answer(page, decision=decision, optional=optional))


def allow_over_http(browser: requests.Session, response: requests.Response
                    ) -> requests.Response:
    """:func:`allow_consent` for a browser over real HTTP: if ``response`` sends it to the
    consent page, Allow with every box ticked; the hub's answer (not followed)."""
    location = urljoin(response.url, response.headers.get("Location", ""))
    if response.status_code != 303 or urlsplit(location).path != "/authorize/consent":
        return response
    page = browser.get(location, timeout=10).text
    return browser.post(urljoin(location, "/authorize/consent"), data=consent_answer(page),
                        allow_redirects=False, timeout=10)


def finish_login(client: Any, callback_url: str, *, consent: bool = True) -> Any:
    """Hand the upstream's callback to the hub and follow to the agency redirect (answering
    the consent page with Allow unless ``consent`` is False)."""
    r = client.get(path_of(callback_url))
    if r.status_code != 303:
        return r
    r = client.get(path_of(r.headers["Location"]))
    return allow_consent(client, r) if consent else r


def full_login(client: Any, auth: AuthRequest | None = None, username: str = "alice",
               upstream_id: str = "op") -> dict[str, str]:
    """A whole brokered login; returns the parameters the agency receives."""
    auth = auth or AuthRequest()
    upstream_url = start_login(client, auth, upstream_id)
    callback = upstream_login(upstream_url, username)
    r = finish_login(client, callback)
    assert r.status_code == 302, r.get_data(as_text=True)[:800]
    location = r.headers["Location"]
    assert location.startswith(auth.agency.redirect_uri + "?"), location
    return query(location)


def redeem(client: Any, auth: AuthRequest, code: str, *, method: str = "basic",
           **overrides: str) -> Any:
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": auth.agency.redirect_uri, "code_verifier": auth.verifier}
    form.update(overrides)
    form = {k: v for k, v in form.items() if v is not None}
    headers = {}
    if method == "basic":
        cred = base64.b64encode(f"{auth.agency.client_id}:{auth.agency.secret}".encode())
        headers["Authorization"] = "Basic " + cred.decode()
    else:
        form.update(client_id=auth.agency.client_id, client_secret=auth.agency.secret)
    return client.post("/token", data=form, headers=headers)
