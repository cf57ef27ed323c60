"""The hub's pages as a citizen and a privacy officer meet them, in a real headless Chromium:
accessibility (axe-core, WCAG 2.1 A/AA), keyboard use, a narrow screen, no JavaScript, the
browser's Back button, and the officer's exports.

The hub (with an OpenID upstream, the npm oidc-provider, for citizens and an LDAP staff
directory, a real slapd, for officers), and a demo agency site run on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from civitas.app import create_app, stop_background
from tests import servers
from tests.conftest import HUB_ISSUER, HUB_PORT, hub_config
from tests.flows import PUBLIC_TASK
from tests.servers import REPO_ROOT, free_port, serve_wsgi, stop_serving
from tests.test_browser import (
    Agency,
    chromium,
    contexts,
    serve_agency_site,
)

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:  # pragma: no cover - the dev environment installs it (chromium() says so)
    pass

pytestmark = pytest.mark.browser

#: axe-core, an npm package of tests/interop (scripts/ensure-node-deps installs it)
AXE = REPO_ROOT / "tests" / "interop" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]


@dataclass(frozen=True)
class World:
    hub: str
    upstream: str
    agency: Agency
    app: Any


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with servers.run_slapd(tmp_path_factory.mktemp("slapd-probe")) as info:
        yield info


@pytest.fixture(scope="module")
def world(upstream_issuer: str, directory: dict[str, Any],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    agency = Agency("browser-agency-one", "p1-" + "e" * 40, "Department of Examples",
                    free_port())
    db = tmp_path_factory.mktemp("probe-hub") / "civitas.db"
    second = {"client_id": "probe-agency-two", "name": "Office of Samples",
              "redirect_uris": ["https://two.agency.example/cb"],
              "client_secret": "p2-" + "f" * 40, "consent": PUBLIC_TASK}
    cfg = hub_config(upstream_issuer, f"sqlite:///{db}", agencies=[agency.config(), second],
                     backchannel_dispatcher=False,
                     officer_role=[{"upstream": "staff", "attribute": "groups",
                                    "value": "admins"}])
    cfg["upstreams"].append({
        "kind": "ldap", "id": "staff", "display_name": "Staff directory",
        "url": directory["url"], "bind_dn": directory["svc_dn"],
        "bind_password": directory["svc_password"],
        "user_base_dn": f"ou=people,{directory['base_dn']}", "group_attribute": "memberOf",
        "timeout_seconds": 2})
    hub_app = create_app(cfg)
    running = [serve_wsgi(hub_app, HUB_PORT)]
    try:
        running.append(serve_agency_site(agency))
        yield World(hub=HUB_ISSUER, upstream=upstream_issuer, agency=agency, app=hub_app)
    finally:
        stop_serving(running)
        stop_background(hub_app)
        hub_app.extensions["civitas"].db.dispose()


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def new_context(browser: Browser) -> Iterator[Any]:
    # the hub's pages forbid every script (CSP default-src 'none'); axe is injected
    with contexts(browser, bypass_csp=True) as make:
        yield make


# -- helpers ---------------------------------------------------------------------------------


def citizen_signs_in(page: Page, world: World, *, allow: bool = True) -> None:
    """Agency -> Log in -> hub's choice -> upstream form (alice) -> consent (Allow all)."""
    page.goto(world.agency.url + "/")
    page.get_by_role("link", name="Log in").click()
    choice = page.get_by_role("heading", name="Sign in", exact=True)
    consent = page.get_by_role("heading", name=f"{world.agency.name} asks for your information")
    welcome = page.get_by_role("heading", name=re.compile("^Welcome"))
    expect(choice.or_(consent).or_(welcome)).to_be_visible()
    if choice.is_visible():  # not signed in to the hub yet
        page.get_by_role("link", name="Sign in with Example ID").click()
        expect(page.get_by_role("heading", name="Sign in to Demo Upstream")).to_be_visible()
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill("alice-password")
        page.get_by_role("button", name="Sign in", exact=True).click()
    expect(consent.or_(welcome)).to_be_visible()
    if consent.is_visible() and allow:
        for box in page.get_by_role("checkbox").all():
            box.check()
        page.get_by_role("button", name="Allow").click()
        expect(welcome).to_be_visible()


def officer_signs_in(page: Page, world: World) -> None:
    page.goto(world.hub + "/officer/")
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    page.get_by_role("link", name="Sign in with Staff directory").click()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-ldap-pw")
    page.get_by_role("button", name="Sign in", exact=True).click()


def axe(page: Page) -> list[dict[str, Any]]:
    """axe-core's WCAG 2.1 A/AA violations on the page as it is."""
    if not AXE.is_file():
        pytest.fail(f"axe-core is missing at {AXE}: run scripts/ensure-node-deps")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_TAGS)
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"]][:5]} for v in result["violations"]]


def agency_asks(world: World, sub: str, claim: str, purpose: str) -> None:
    """The agency asks the decision API whether it may use ``claim`` for ``purpose``."""
    response = requests.post(world.hub + "/access/v1/evaluation",
                         auth=(world.agency.client_id, world.agency.secret), timeout=5,
                         json={"subject": {"type": "user", "id": sub},
                               "action": {"name": "use"},
                               "resource": {"type": "claim", "id": claim},
                               "context": {"purpose": purpose}})
    assert response.status_code == 200, response.text


def sub_at_agency(page: Page) -> str:
    """The citizen's pairwise ``sub``, from the agency site's claims table."""
    row = page.get_by_role("table").get_by_role("row").filter(
        has=page.get_by_role("rowheader", name="sub", exact=True))
    return row.get_by_role("cell").inner_text().strip()


def consents_afresh(page: Page, world: World) -> str:
    """Alice, with a fresh consent to the agency that grants every item; returns her sub."""
    citizen_signs_in(page, world)
    page.goto(world.hub + "/account/consents")
    withdraw_all = page.get_by_role("button", name=re.compile("^Withdraw all consent"))
    if withdraw_all.count():
        withdraw_all.click()
        expect(page.get_by_text("Your consent was withdrawn")).to_be_visible()
        page.goto(world.agency.url + "/logout")
        citizen_signs_in(page, world)
    return sub_at_agency(page)


def fits_width(page: Page) -> list[str]:
    """What sticks out of the viewport sideways (empty when the page reflows)."""
    return page.evaluate("""() => {
      const width = document.documentElement.clientWidth;
      if (document.documentElement.scrollWidth <= width) return [];
      return [...document.querySelectorAll('main *')]
        .filter(e => e.getBoundingClientRect().right > width + 1
                     && !e.closest('.scroll'))
        .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + ' ends at '
                  + Math.round(e.getBoundingClientRect().right) + 'px')
        .slice(0, 8);
    }""")


NARROW = {"viewport": {"width": 320, "height": 640}}


# -- accessibility (axe-core, WCAG 2.1 A and AA) --------------------------------------------


def test_every_page_passes_axe_wcag21_aa(world: World, new_context: Any) -> None:
    page = new_context().new_page()
    found: dict[str, Any] = {}

    def check(name: str) -> None:
        violations = axe(page)
        if violations:
            found[f"{name} ({page.url})"] = violations

    page.goto(world.agency.url + "/")
    page.get_by_role("link", name="Log in").click()
    check("sign-in choice")
    sub = consents_afresh(page, world)
    agency_asks(world, sub, "email", "service")
    agency_asks(world, sub, "name", "marketing")
    for path in ("/account", "/account/consents", "/account/history",
                 "/logout/end-session", "/no-such-page", "/officer/"):
        page.goto(world.hub + path)
        check(path)
    page.goto(world.hub + "/account/consents")
    page.get_by_role("link", name="View").first.click()
    check("receipt")
    page.goto(world.hub + "/logout/end-session")
    page.get_by_role("button", name="Sign out").click()
    check("signed out")

    officer = new_context().new_page()
    officer.goto(world.hub + "/login")
    officer.get_by_role("link", name="Sign in with Staff directory").click()
    page = officer
    check("password form")
    officer.get_by_label("Username").fill("alice")
    officer.get_by_label("Password").fill("not-the-password")
    officer.get_by_role("button", name="Sign in", exact=True).click()
    check("password form, wrong password")
    officer.get_by_label("Password").fill("alice-ldap-pw")
    officer.get_by_role("button", name="Sign in", exact=True).click()
    for path in ("/officer/", "/officer/?decision=deny", "/officer/activity",
                 "/officer/agencies/browser-agency-one/art30"):
        officer.goto(world.hub + path)
        check(path)
    assert not found, json.dumps(found, indent=1)


def test_activity_charts_each_carry_their_own_agency_name(world: World,
                                                          new_context: Any) -> None:
    """Every chart is an image named by its title (aria-labelledby); with two agencies both
    charts pointed at the first one's title (one id twice), so a screen reader announced the
    first agency for both (WCAG 1.1.1, 4.1.1, 4.1.2)."""
    officer = new_context().new_page()
    officer_signs_in(officer, world)
    officer.goto(world.hub + "/officer/activity")
    for name in ("Department of Examples", "Office of Samples"):
        expect(officer.get_by_role("img", name=f"{name}: activity, last 30 days")
               ).to_have_count(1)
    ids = officer.evaluate("() => [...document.querySelectorAll('[id]')].map(e => e.id)")
    assert len(ids) == len(set(ids)), ids


# -- a narrow screen: 320 CSS pixels (WCAG 1.4.10 Reflow; also 1280 px at 400% zoom) --------


def test_citizen_pages_reflow_at_320_css_pixels(world: World, new_context: Any) -> None:
    page = new_context(**NARROW).new_page()
    sub = consents_afresh(page, world)
    agency_asks(world, sub, "email", "service")
    wide: dict[str, list[str]] = {}
    page.goto(world.agency.url + "/logout")
    page.goto(world.agency.url + "/")
    page.get_by_role("link", name="Log in").click()
    for path in ("/account", "/account/consents", "/account/history"):
        page.goto(world.hub + path)
        wide[path] = fits_width(page)
    page.goto(world.hub + "/account/consents")
    page.get_by_role("link", name="View").first.click()
    wide["receipt"] = fits_width(page)
    assert not any(wide.values()), wide


def test_officer_pages_reflow_at_320_css_pixels(world: World, new_context: Any) -> None:
    officer = new_context(**NARROW).new_page()
    officer_signs_in(officer, world)
    wide: dict[str, list[str]] = {}
    for path in ("/officer/", "/officer/activity",
                 "/officer/agencies/browser-agency-one/art30"):
        officer.goto(world.hub + path)
        wide[path] = fits_width(officer)
    assert not any(wide.values()), wide


# -- where a sign-in leads -------------------------------------------------------------------


def test_officer_sign_in_lands_on_the_officer_page(world: World, new_context: Any) -> None:
    """An officer who opens /officer/ signs in and is back at /officer/, not at the account
    page (from which no link leads to the officer pages)."""
    officer = new_context().new_page()
    officer_signs_in(officer, world)
    expect(officer.get_by_role("heading", name="Agency decisions")).to_be_visible()
    assert officer.url == world.hub + "/officer/"


def test_citizen_link_to_history_survives_sign_in(world: World, new_context: Any) -> None:
    page = new_context().new_page()
    page.goto(world.hub + "/account/history")
    page.get_by_role("link", name="Sign in with Example ID").click()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Who used your information")).to_be_visible()


def test_sign_in_does_not_lead_off_site(world: World, new_context: Any) -> None:
    """Where a sign-in leads afterwards is a page of the hub's own, never another site."""
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example/",
                   "/officer/../../evil"):
        response = requests.get(world.hub + "/login", params={"next": target},
                                allow_redirects=False, timeout=5)
        assert response.status_code in (302, 303), response.status_code
        page = requests.get(world.hub + response.headers["Location"],
                            cookies=response.cookies, timeout=5)
        assert "evil" not in page.text


# -- Back, double submits, stale pages ------------------------------------------------------


def test_withdrawing_from_a_stale_tab_is_not_a_page_not_found(world: World,
                                                               new_context: Any) -> None:
    """Two tabs (or a double click without JavaScript): the second Withdraw finds the consent
    gone. The citizen must see their consents and that it is withdrawn, not "Page not
    found"."""
    context = new_context()
    page = context.new_page()
    consents_afresh(page, world)
    first = context.new_page()
    first.goto(world.hub + "/account/consents")
    stale = context.new_page()
    stale.goto(world.hub + "/account/consents")
    first.get_by_role("button", name=re.compile("^Withdraw all consent")).click()
    expect(first.get_by_text("Your consent was withdrawn")).to_be_visible()

    stale.get_by_role("button", name=re.compile("^Withdraw all consent")).click()
    expect(stale.get_by_role("heading", name="Information you share with agencies")
           ).to_be_visible()
    expect(stale.get_by_role("status")).to_contain_text("already withdrawn")
    expect(stale.get_by_text("Page not found")).to_have_count(0)


def test_back_to_the_consent_page_after_allow_says_it_was_answered(world: World,
                                                                    new_context: Any) -> None:
    """Back after Allow (or a second click on Allow) must not say the sign-in "was started
    in a different browser": it was answered, here."""
    page = new_context().new_page()
    consents_afresh(page, world)
    page.goto(world.hub + "/account/consents")
    page.get_by_role("button", name=re.compile("^Withdraw all consent")).click()
    page.goto(world.agency.url + "/logout")
    citizen_signs_in(page, world, allow=False)
    expect(page.get_by_role("button", name="Allow")).to_be_visible()
    page.get_by_role("button", name="Allow").click()
    expect(page.get_by_role("heading", name=re.compile("^Welcome"))).to_be_visible()
    page.go_back()
    expect(page.get_by_text("different browser")).to_have_count(0)
    expect(page.get_by_text(re.compile("already answered"))).to_be_visible()


def test_sign_out_after_the_session_ended_is_not_an_error(world: World,
                                                         new_context: Any) -> None:
    """The account page left open while the session expired (or the hub restarted with its
    in-process store): Sign out must end at "You are signed out", not "This form has
    expired"."""
    context = new_context()
    page = context.new_page()
    citizen_signs_in(page, world)
    page.goto(world.hub + "/account")
    context.clear_cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="You are signed out")).to_be_visible()


def test_sign_out_still_needs_the_form_token_while_signed_in(world: World,
                                                             new_context: Any) -> None:
    context = new_context()
    page = context.new_page()
    citizen_signs_in(page, world)
    response = context.request.post(world.hub + "/logout", form={"csrf": "forged"},
                                    max_redirects=0)
    assert response.status == 400
    page.goto(world.hub + "/account")
    expect(page.get_by_role("heading", name="Your account", exact=True)).to_be_visible()


# -- forms and wording ----------------------------------------------------------------------


def test_wrong_password_error_is_tied_to_the_fields(world: World, new_context: Any) -> None:
    """WCAG 3.3.1 / 1.3.1: a screen reader on the Password field hears that it is wrong."""
    page = new_context().new_page()
    page.goto(world.hub + "/login")
    page.get_by_role("link", name="Sign in with Staff directory").click()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in", exact=True).click()
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    alert_id = alert.get_attribute("id")
    assert alert_id
    for label in ("Username", "Password"):
        field = page.get_by_label(label)
        expect(field).to_have_attribute("aria-invalid", "true")
        assert alert_id in (field.get_attribute("aria-describedby") or "").split()


def test_receipt_list_names_what_a_partial_withdrawal_withdrew(world: World,
                                                               new_context: Any) -> None:
    """Withdrawing one optional item must not be listed as "Consent withdrawn: <agency>",
    which reads as if everything was withdrawn while the agency still gets the rest."""
    page = new_context().new_page()
    consents_afresh(page, world)
    page.goto(world.hub + "/account/consents")
    page.get_by_role("button", name=re.compile("^Stop sharing Your full name")).click()
    expect(page.get_by_role("status")).to_be_visible()
    latest = page.locator("#receipts tbody tr").first
    expect(latest).to_contain_text("Your full name")
    expect(latest).not_to_contain_text(re.compile(r"Consent withdrawn: Department of Examples$"))
    latest.get_by_role("link", name="View").click()
    expect(page.locator("#receipt")).to_contain_text("Your full name")


def test_officer_search_mistake_keeps_the_form_and_marks_the_field(world: World,
                                                                   new_context: Any) -> None:
    """A pairwise sub without its agency: the search form again, as typed, with the problem
    beside the field to fix (WCAG 3.3.1, 3.3.3), not an error page that loses the search."""
    officer = new_context().new_page()
    officer_signs_in(officer, world)
    officer.goto(world.hub + "/officer/")
    officer.get_by_label("Purpose").fill("service")
    officer.get_by_label("or the agency's pairwise sub").fill("some-sub")
    with officer.expect_navigation() as navigation:
        officer.get_by_role("button", name="Search").click()
    assert navigation.value is not None and navigation.value.status == 400
    expect(officer.get_by_role("heading", name="Agency decisions")).to_be_visible()
    expect(officer.get_by_role("alert")).to_contain_text("only meaningful with its agency")
    expect(officer.get_by_label("Purpose")).to_have_value("service")
    expect(officer.get_by_label("or the agency's pairwise sub")).to_have_value("some-sub")
    agency = officer.get_by_role("combobox", name=re.compile("^Agency"))
    expect(agency).to_have_attribute("aria-invalid", "true")
    expect(agency).to_have_attribute("aria-describedby", "search-error")
    assert axe(officer) == []
