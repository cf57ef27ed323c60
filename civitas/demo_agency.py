"""A small agency site (OpenID Connect relying party) for the demo and the browser tests.

It uses Authlib's Flask client the way an agency developer would: discovery, authorization
code with PKCE (S256), state and nonce, ID token validation against the hub's JWKS.
"""

from __future__ import annotations

import secrets
from typing import Any

from authlib.integrations.flask_client import OAuth, OAuthError
from flask import Flask, redirect, render_template_string, session, url_for
from werkzeug.wrappers import Response

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font:1.05rem/1.5 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}
header{background:#2e6b30;color:#fff;padding:.6rem 1rem;border-radius:4px}
a.button{display:inline-block;background:#2e6b30;color:#fff;padding:.6rem 1.1rem;border-radius:4px;
text-decoration:none}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left}</style></head>
<body><header><strong>{{ agency_name }}</strong> — a demo agency site</header>
<main>
{% if notice %}<h1>Privacy notice (version 2026-11)</h1>
<p>We use your email address to check that you can use this service, and, if you allow it,
your name to address letters to you. We keep them while you use the service. You can
withdraw your consent at any time from your Civitas account.</p>
<p><a href="{{ url_for('home') }}">Back</a></p>
{% elif error %}<h1>Sign-in failed</h1><p role="alert">{{ error }}</p>
<p><a class="button" href="{{ url_for('login') }}">Try again</a></p>
{% elif claims %}<h1>Welcome, {{ claims.get('name') or 'citizen' }}</h1>
<p>Civitas told this agency the following about you:</p>
<table id="claims"><tbody>
{% for k, v in claims.items() %}<tr><th scope="row">{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</tbody></table>
<p><a href="{{ url_for('logout') }}">Log out of this site</a></p>
{% else %}<h1>Online services</h1><p>To continue, sign in through Civitas.</p>
<p><a class="button" href="{{ url_for('login') }}">Log in</a></p>{% endif %}
</main></body></html>"""

SHOWN_CLAIMS = ("sub", "name", "given_name", "family_name", "email", "email_verified", "acr",
                "amr", "auth_time", "iss")


def create_agency_app(*, issuer: str, client_id: str, client_secret: str, base_url: str,
                      agency_name: str = "Department of Examples",
                      http_timeout: float = 5.0) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_hex(32),
        SESSION_COOKIE_NAME="agency_session",
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_HTTPONLY=True,
    )
    oauth = OAuth(app)
    oauth.register(
        "civitas",
        client_id=client_id,
        client_secret=client_secret,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256",
                       "timeout": http_timeout},
    )
    redirect_uri = f"{base_url}/callback"

    def page(**kwargs: Any) -> str:
        return render_template_string(PAGE, title=agency_name, agency_name=agency_name,
                                      **kwargs)

    @app.get("/")
    def home() -> str:
        return page(claims=session.get("claims"), error=None, notice=False)

    @app.get("/privacy")
    def privacy() -> str:
        return page(claims=None, error=None, notice=True)

    @app.get("/login")
    def login() -> Response:
        return oauth.civitas.authorize_redirect(redirect_uri)  # type: ignore[no-any-return]

    @app.get("/callback")
    def callback() -> str | Response:
        try:
            token = oauth.civitas.authorize_access_token()
        except OAuthError as exc:
            return page(claims=None, error=f"{exc.error}: {exc.description or ''}", notice=False)
        userinfo = token.get("userinfo") or {}
        claims = {k: userinfo[k] for k in SHOWN_CLAIMS if k in userinfo}
        session["claims"] = claims
        return redirect(url_for("home"))

    @app.get("/logout")
    def logout() -> Response:
        session.clear()
        return redirect(url_for("home"))

    return app
