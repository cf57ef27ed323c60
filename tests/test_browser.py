"""Brokered logins in a real headless Chromium: agency site -> Civitas -> upstream OP -> back.

Everything runs on 127.0.0.1: the hub and two demo agency sites (civitas.demo_agency) as real
waitress servers, the upstream OP (npm oidc-provider) from the session fixture. The tests act
as a person would: they read headings, links, labels and table rows, and click and type.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from civitas.app import create_app
from civitas.demo_agency import create_agency_app
from tests.conftest import HUB_ISSUER, HUB_PORT, hub_config
from tests.flows import PUBLIC_TASK
from tests.servers import REPO_ROOT, free_port, serve_wsgi, stop_serving

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev environment installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
STEP_TIMEOUT_MS = 10_000
SCREENSHOT = REPO_ROOT / "test-results" / "browser-login.png"
UPSTREAM_NAME = "Example ID"  # display_name of the upstream in tests.conftest.hub_config
CALLBACK = re.compile(r"/login/op/callback\?")


@dataclass(frozen=True)
class Agency:
    client_id: str
    secret: str
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        # Both sites share the host 127.0.0.1, which is also the default pairwise sector
        # (OpenID Connect Core 8.1): give each its own sector, as two real agencies would have.
        # Agency one asks for consent (email required, name optional); agency two relies on
        # its public task, so the single-sign-on test goes straight through.
        return {"client_id": self.client_id, "name": self.name,
                "redirect_uris": [f"{self.url}/callback"], "client_secret": self.secret,
                "sector_identifier": f"{self.client_id}.agency.example",
                "consent": BROWSER_CONSENT if self.client_id.endswith("one") else PUBLIC_TASK}


BROWSER_CONSENT: dict[str, Any] = {
    "notice_url": "https://agency.example/privacy", "notice_version": "1",
    "purpose_labels": {"service": "to run your account"},
    "claims": [
        {"claim": "email", "purposes": ["service"], "required": True,
         "description": "Your email address"},
        {"claim": "name", "purposes": ["service"], "required": False,
         "description": "Your full name"},
        {"claim": "given_name", "purposes": ["service"], "required": False,
         "description": "Your given name"},
        {"claim": "family_name", "purposes": ["service"], "required": False,
         "description": "Your family name"},
    ],
}


@dataclass(frozen=True)
class Sites:
    hub: str
    upstream: str
    one: Agency
    two: Agency


def serve_agency_site(agency: Agency) -> tuple[Any, threading.Thread]:
    """The demo agency site (civitas.demo_agency) for ``agency``, served at its port."""
    app = create_agency_app(issuer=HUB_ISSUER, client_id=agency.client_id,
                            client_secret=agency.secret, base_url=agency.url,
                            agency_name=agency.name)
    # Cookies are not isolated by port: without distinct names two sites on 127.0.0.1
    # would overwrite each other's session cookie.
    app.config["SESSION_COOKIE_NAME"] = f"{agency.client_id}_session"
    return serve_wsgi(app, agency.port)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (never a downloaded browser)."""
    if sync_playwright is None:
        pytest.fail("the playwright Python package is missing: install the dev dependencies")
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run scripts/ensure-system-deps")
    expect.set_options(timeout=STEP_TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS, timeout=STEP_TIMEOUT_MS * 2)
        yield browser
        browser.close()


@contextlib.contextmanager
def contexts(browser: Browser, **defaults: Any) -> Iterator[Callable[..., BrowserContext]]:
    """Makes fresh browser contexts (no cookies; ``defaults`` and the call's options), each
    closed at the end."""
    made: list[BrowserContext] = []

    def make(**options: Any) -> BrowserContext:
        context = browser.new_context(**{**defaults, **options})
        context.set_default_timeout(STEP_TIMEOUT_MS)
        context.set_default_navigation_timeout(STEP_TIMEOUT_MS)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


@pytest.fixture(scope="module")
def sites(upstream_issuer: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    one = Agency("browser-agency-one", "b1-" + "c" * 40, "Department of Examples",
                 free_port())
    two = Agency("browser-agency-two", "b2-" + "d" * 40, "Office of Samples", free_port())
    db = tmp_path_factory.mktemp("browser-hub") / "civitas.db"
    hub_app = create_app(hub_config(upstream_issuer, f"sqlite:///{db}",
                                    agencies=[one.config(), two.config()]))
    running = [serve_wsgi(hub_app, HUB_PORT)]  # first: the agency sites discover it lazily
    try:
        running += [serve_agency_site(one), serve_agency_site(two)]
        yield Sites(hub=HUB_ISSUER, upstream=upstream_issuer, one=one, two=two)
    finally:
        stop_serving(running)
        hub_app.extensions["civitas"].db.dispose()


@pytest.fixture(scope="module")
def browser(sites: Sites) -> Iterator[Browser]:
    """Depends on `sites` so that it closes (and drops its connections) before them."""
    with chromium() as browser:
        yield browser


@pytest.fixture
def new_context(browser: Browser) -> Iterator[Any]:
    """Fresh browser contexts (no cookies), closed after the test."""
    with contexts(browser) as make:
        yield make


def _record_requests(page: Page) -> list[str]:
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    return urls


def _go_to_upstream(page: Page, agency: Agency) -> None:
    """Agency home -> "Log in" -> the hub's "Sign in" page -> the upstream's login form."""
    page.goto(agency.url + "/")
    page.get_by_role("link", name="Log in").click()
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    page.get_by_role("link", name=re.compile(re.escape(UPSTREAM_NAME))).click()
    expect(page.get_by_role("heading", name="Sign in to Demo Upstream")).to_be_visible()


def _submit_credentials(page: Page, username: str, password: str) -> None:
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()


def _claim(page: Page, name: str) -> str:
    """The value in the claims table's row headed `name`."""
    table = page.get_by_role("table")
    row = table.get_by_role("row").filter(
        has=page.get_by_role("rowheader", name=name, exact=True))
    expect(row).to_have_count(1)
    return row.get_by_role("cell").inner_text().strip()


def _allow_if_asked(page: Page, agency: Agency) -> None:
    """The consent page, when the agency asks for consent: tick every option, Allow."""
    heading = page.get_by_role("heading", name=f"{agency.name} asks for your information")
    welcome = page.get_by_role("heading", name=re.compile("^Welcome"))
    expect(heading.or_(welcome)).to_be_visible()
    if heading.is_visible():
        for box in page.get_by_role("checkbox").all():
            box.check()
        page.get_by_role("button", name="Allow").click()


def _log_in_as_alice(page: Page, agency: Agency) -> None:
    _go_to_upstream(page, agency)
    _submit_credentials(page, "alice", "alice-password")
    _allow_if_asked(page, agency)
    expect(page.get_by_role("heading", name="Welcome, Alice Example")).to_be_visible()
    assert page.url == agency.url + "/"


def test_full_brokered_login(sites: Sites, new_context: Any) -> None:
    context = new_context()
    page = context.new_page()

    page.goto(sites.one.url + "/")
    expect(page.get_by_role("heading", name="Online services")).to_be_visible()
    page.get_by_role("link", name="Log in").click()

    # the hub: choose how to prove who you are
    expect(page).to_have_url(re.compile("^" + re.escape(sites.hub + "/login?")))
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    page.get_by_role("link", name=re.compile(re.escape(UPSTREAM_NAME))).click()

    # the upstream's own login form
    expect(page).to_have_url(re.compile("^" + re.escape(sites.upstream + "/interaction/")))
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Sign in", exact=True).click()

    # the hub asks for consent: email is required, the name is optional and unticked
    expect(page.get_by_role("heading", name=f"{sites.one.name} asks for your information")
           ).to_be_visible()
    expect(page.get_by_role("link", name="privacy notice")).to_have_attribute(
        "href", "https://agency.example/privacy")
    name_box = page.get_by_role("checkbox", name=re.compile("Your full name"))
    expect(name_box).not_to_be_checked()
    name_box.check()
    page.get_by_role("button", name="Allow").click()

    # back at the agency, signed in
    expect(page.get_by_role("heading", name="Welcome, Alice Example")).to_be_visible()
    assert page.url == sites.one.url + "/"
    expect(page.get_by_role("table")).to_contain_text("alice@example.org")
    assert _claim(page, "email") == "alice@example.org"
    assert _claim(page, "acr") == "urn:civitas:acr:ial1:aal1"
    assert _claim(page, "iss") == sites.hub
    assert _claim(page, "sub") not in ("", "alice-0001")
    # what she ticked reaches the agency, and what she left unticked does not
    assert _claim(page, "name") == "Alice Example"
    for unticked in ("given_name", "family_name"):
        expect(page.get_by_role("rowheader", name=unticked, exact=True)).to_have_count(0)

    cookies = {c["name"]: c for c in context.cookies(sites.hub)}
    hub_cookie = cookies.get("civitas_session")
    assert hub_cookie is not None, sorted(cookies)
    assert hub_cookie["httpOnly"] is True
    assert hub_cookie["sameSite"] == "Lax"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_wrong_password_is_refused_at_the_upstream(sites: Sites, new_context: Any) -> None:
    page = new_context().new_page()
    requests = _record_requests(page)
    _go_to_upstream(page, sites.one)
    _submit_credentials(page, "alice", "not-her-password")

    expect(page.get_by_role("alert")).to_have_text("Wrong username or password")
    assert page.url.startswith(sites.upstream + "/interaction/")
    assert not [u for u in requests if u.startswith(sites.one.url + "/callback")]
    assert not [u for u in requests if CALLBACK.search(u)]

    # the agency knows nothing about the person, and the hub holds no login either
    page.goto(sites.one.url + "/")
    expect(page.get_by_role("heading", name="Online services")).to_be_visible()
    expect(page.get_by_role("table")).to_have_count(0)
    page.goto(sites.hub + "/account")
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()


def _hold_back_callback(page: Page, upstream: str) -> list[str]:
    """Stop `page` where the upstream would send it back to the hub, and note that URL.

    Playwright does not route a redirect's target, so the login form's post (the first
    request of the upstream's redirect chain) is routed instead: its redirects within the
    upstream are followed here, with the browser context's cookies, and the one that points
    at the hub's callback is noted and answered with a blank page instead of followed."""
    held: list[str] = []

    def hold(route: Any) -> None:
        response = route.fetch(max_redirects=0)
        location = urljoin(route.request.url, response.headers.get("location", ""))
        while response.status in (302, 303) and location.startswith(upstream):
            response = page.context.request.get(location, max_redirects=0)
            location = urljoin(location, response.headers.get("location", ""))
        if response.status in (302, 303) and CALLBACK.search(location):
            held.append(location)
            route.fulfill(status=200, content_type="text/html",
                          body="<!doctype html><title>Held</title><h1>Held back</h1>")
        else:
            route.fulfill(response=response)

    page.route(re.compile("^" + re.escape(upstream) + r"/interaction/[^/?]+/login$"), hold)
    return held


def test_unused_callback_opened_in_another_browser_is_refused(sites: Sites,
                                                             new_context: Any) -> None:
    """Login CSRF: the upstream's answer for browser A, never used there, is refused in
    browser B (the flow is bound to the browser that started it), while A can still use it."""
    page_a = new_context().new_page()
    held = _hold_back_callback(page_a, sites.upstream)
    _go_to_upstream(page_a, sites.one)
    _submit_credentials(page_a, "alice", "alice-password")
    expect(page_a.get_by_role("heading", name="Held back")).to_be_visible()
    assert len(held) == 1, held
    callback_url = held[0]
    assert callback_url.startswith(sites.hub + "/login/op/callback?")
    assert "code=" in callback_url and "state=" in callback_url

    # Browser B opens it first: the hub must refuse, readably, and send nothing to the agency.
    page_b = new_context().new_page()
    requests_b = _record_requests(page_b)
    response = page_b.goto(callback_url)
    assert response is not None and response.status == 400
    assert page_b.url == callback_url
    expect(page_b.get_by_role("heading", name="We could not do that")).to_be_visible()
    expect(page_b.get_by_text(re.compile("expired or was started in a different browser"))
           ).to_be_visible()
    assert not [u for u in requests_b if u.startswith(sites.one.url)], requests_b
    assert not [u for u in requests_b if "code=" in u and u != callback_url], requests_b

    # the callback was unused: browser A, whose login it is, still completes with it
    page_a.goto(callback_url)
    _allow_if_asked(page_a, sites.one)
    expect(page_a.get_by_role("heading", name="Welcome, Alice Example")).to_be_visible()
    assert page_a.url == sites.one.url + "/"


def test_single_sign_on_across_agencies_with_pairwise_sub(sites: Sites,
                                                          new_context: Any) -> None:
    page = new_context().new_page()
    _log_in_as_alice(page, sites.one)
    sub_one = _claim(page, "sub")

    requests = _record_requests(page)
    page.goto(sites.two.url + "/")
    expect(page.get_by_role("heading", name="Online services")).to_be_visible()
    page.get_by_role("link", name="Log in").click()
    expect(page.get_by_role("heading", name="Welcome, Alice Example")).to_be_visible()
    assert page.url == sites.two.url + "/"
    expect(page.get_by_role("banner")).to_contain_text(sites.two.name)
    sub_two = _claim(page, "sub")

    # straight through the hub: neither its "Sign in" page nor the upstream was shown
    assert not [u for u in requests if u.startswith(sites.upstream)], requests
    assert not [u for u in requests if u.startswith(sites.hub + "/login")], requests
    assert [u for u in requests if u.startswith(sites.hub + "/authorize?")]

    assert sub_one and sub_two and sub_one != sub_two
    assert _claim(page, "email") == "alice@example.org"
