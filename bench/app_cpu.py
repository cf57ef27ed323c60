"""The hub's own CPU per operation: its WSGI app called in one thread, with no HTTP server.

    .venv/bin/python bench/app_cpu.py                        # every scenario, 3 rounds
    .venv/bin/python bench/app_cpu.py --scenarios 1,3 --count 2000 --rounds 5

Starts PostgreSQL, Redis and the upstream OP (tests/servers.py) and builds the hub's app in
this process, on PostgreSQL + Redis with the bench's settings (bench/run.py: rate limits
counted). The app is served over HTTP only to sign alice in through the real upstream and to
register agencies; every measured operation is a direct call of the WSGI app, in this
thread, timed with ``time.thread_time()``: the CPU the app itself takes (Flask, Authlib,
SQLAlchemy, psycopg, redis-py, the signatures and the hub's code, plus the few µs this
script takes to build each request and read its answer), without an HTTP server, a load
generator, other threads or waiting for PostgreSQL and Redis (their CPU is theirs).

Scenarios as in bench/run.py: 0 JWKS, 1 client_credentials, 2 code exchange (codes minted
ahead, untimed), 3 SSO of a second agency (authorize + token: one login), 4a userinfo,
4b introspection, 5 refresh (rotation, each grant refreshed in turn), 6a a consent decision,
6b a batch of 20. Rounds alternate the scenarios, so a drift of the machine is spread over
all of them. For each: µs of CPU per operation (median of the rounds, and the range),
operations per CPU-second, and ``2-core ceiling``: what two cores could do if the app were
all that ran on them, an upper bound that no server can pass on this machine.

Runs close in time differ by a few per cent (wrk runs differ by 10-25% here); runs an hour
apart can differ by 5-10%, as this machine's speed drifts (the JWKS row shows it). So this
is the tool for before/after of a change to the app, alternated: ``bench/compare.py BEFORE
AFTER --tool app_cpu -- ...``. The req/s column of the table is the operations per
CPU-second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import run as bench  # noqa: E402  (the same settings and login as run.py)
from tests import servers  # noqa: E402
from tests.flows import (  # noqa: E402
    AGENCY_ONE,
    AGENCY_TWO,
    UPSTREAM_CLIENT_ID,
    UPSTREAM_SECRET,
    AuthRequest,
    TestAgency,
)

SCENARIOS = ["0", "1", "2", "3", "4a", "4b", "5", "6a", "6b"]
NAMES = {
    "0": "0 JWKS document",
    "1": "1 token endpoint, client_credentials",
    "2": "2 token endpoint, code exchange + PKCE",
    "3": "3 SSO 2nd agency: logins (authorize+token)",
    "4a": "4a userinfo",
    "4b": "4b introspection",
    "5": "5 token endpoint, refresh_token grant",
    "6a": "6a consent decision, single",
    "6b": "6b consent decisions, batch of 20",
}
FORM = "application/x-www-form-urlencoded"


class Direct:
    """The WSGI app called as a server would call it, in this thread."""

    def __init__(self, app: Callable, base: str) -> None:
        self.app = app
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", str(parts.port or 80)

    def __call__(self, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        path, _, query_string = path.partition("?")
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query_string,
            "SERVER_NAME": self.host, "SERVER_PORT": self.port, "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": f"{self.host}:{self.port}", "REMOTE_ADDR": "127.0.0.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
            "wsgi.run_once": False, "wsgi.input_terminated": True,
            "CONTENT_LENGTH": str(len(body)),
        }
        for name, value in (headers or {}).items():
            key = name.upper().replace("-", "_")
            environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
        answer: dict = {}

        def start_response(status: str, response_headers: list, exc_info=None) -> None:
            answer["status"], answer["headers"] = int(status[:3]), dict(response_headers)

        chunks = self.app(environ, start_response)
        try:
            content = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return answer["status"], answer["headers"], content


def expect(status: int, content: bytes, wanted: int, what: str) -> None:
    if status != wanted:
        raise SystemExit(f"{what}: {status} {content[:300]!r}")


class Scenarios:
    """Each scenario as (prepare, operation): ``prepare(n)`` mints what n operations use,
    untimed; ``operation(i)`` is the i-th timed operation."""

    def __init__(self, call: Direct, cookie: str, deciders: list[tuple[TestAgency, str]]
                 ) -> None:
        self.call = call
        self.cookie = cookie
        self.deciders = deciders
        self.auth_one = bench.basic(AGENCY_ONE.client_id, AGENCY_ONE.secret)
        self.auth_two = bench.basic(AGENCY_TWO.client_id, AGENCY_TWO.secret)
        self.items: list = []

    # -- helpers ------------------------------------------------------------------------------

    def code(self, agency: TestAgency, scope: str = "openid profile email") -> tuple[str, str]:
        auth = AuthRequest(agency, scope=scope)
        status, headers, content = self.call("GET", auth.url(), {"Cookie": self.cookie})
        expect(status, content, 302, "authorize")
        return parse_qs(urlsplit(headers["Location"]).query)["code"][0], auth.verifier

    def exchange(self, agency: TestAgency, code: str, verifier: str) -> dict:
        body = (f"grant_type=authorization_code&code={quote(code, safe='')}&redirect_uri="
                f"{quote(agency.redirect_uri, safe='')}&code_verifier={verifier}").encode()
        status, _, content = self.call("POST", "/token", {
            "Authorization": bench.basic(agency.client_id, agency.secret),
            "Content-Type": FORM}, body)
        expect(status, content, 200, "code exchange")
        return json.loads(content)

    # -- the scenarios ------------------------------------------------------------------------

    def prepare(self, scenario: str, n: int) -> None:
        if scenario == "2":
            self.items = [self.code(AGENCY_ONE) for _ in range(n)]
        elif scenario in ("4a", "4b"):  # a fresh token each round: it cannot expire meanwhile
            self.items = self.exchange(AGENCY_ONE, *self.code(AGENCY_ONE))["access_token"]
        elif scenario == "5":
            grants = min(n, 64)
            self.items = [self.exchange(AGENCY_ONE, *self.code(
                AGENCY_ONE, " ".join(bench.SCOPES)))["refresh_token"] for _ in range(grants)]
        else:
            self.items = []

    def operation(self, scenario: str, i: int) -> None:
        call = self.call
        if scenario == "0":
            status, _, content = call("GET", "/jwks")
        elif scenario == "1":
            status, _, content = call("POST", "/token", {
                "Authorization": self.auth_one, "Content-Type": FORM},
                b"grant_type=client_credentials&scope=consent.decisions")
        elif scenario == "2":
            self.exchange(AGENCY_ONE, *self.items[i])
            return
        elif scenario == "3":
            self.exchange(AGENCY_TWO, *self.code(AGENCY_TWO))
            return
        elif scenario == "4a":
            status, _, content = call("GET", "/userinfo",
                                      {"Authorization": f"Bearer {self.items}"})
        elif scenario == "4b":
            status, _, content = call("POST", "/introspect", {
                "Authorization": self.auth_one, "Content-Type": FORM},
                b"token=" + quote(self.items, safe="").encode())
            if not json.loads(content).get("active"):
                raise SystemExit(f"introspection: inactive {content[:200]!r}")
        elif scenario == "5":
            slot = i % len(self.items)
            status, _, content = call("POST", "/token", {
                "Authorization": self.auth_one, "Content-Type": FORM},
                b"grant_type=refresh_token&refresh_token="
                + quote(self.items[slot], safe="").encode())
            expect(status, content, 200, "refresh")
            self.items[slot] = json.loads(content)["refresh_token"]
            return
        else:
            agency, sub = self.deciders[i % len(self.deciders)]
            subject = {"type": "user", "id": sub}
            context = {"purpose": "service-delivery"}
            if scenario == "6a":
                path, request = "/access/v1/evaluation", {
                    "subject": subject, "action": {"name": "use"},
                    "resource": {"type": "claim", "id": "email"}, "context": context}
            else:
                path, request = "/access/v1/evaluations", {
                    "subject": subject, "action": {"name": "use"}, "context": context,
                    "evaluations": [{"resource": {"type": "claim", "id": claim}} for claim in
                                    ["name", "given_name", "family_name", "email"] * 5]}
            status, _, content = call("POST", path, {
                "Authorization": bench.basic(agency.client_id, agency.secret),
                "Content-Type": "application/json"}, json.dumps(request).encode())
        expect(status, content, 200, NAMES[scenario])


def fmt_row(name: str, ops: int, per_op: list[float]) -> str:
    """A scenario's row: its name, operations timed, operations per CPU-second (the column
    bench/compare.py compares), µs per operation (median of the rounds, and their range) and
    the 2-core ceiling."""
    median = statistics.median(per_op)
    spread = f"{min(per_op):.0f}-{max(per_op):.0f}"
    return (f"{name:<44} {ops:>8} {1e6 / median:>9.0f} {median:>7.0f} {spread:>13} "
            f"{2e6 / median:>16.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated, of " + " ".join(SCENARIOS) + " (4: 4a and 4b, "
                         "6: 6a and 6b)")
    ap.add_argument("--count", type=bench.positive_int, default=1000,
                    help="timed operations per scenario and round")
    ap.add_argument("--rounds", type=bench.positive_int, default=3)
    ap.add_argument("--warmup", type=int, default=200, help="untimed operations first")
    args = ap.parse_args(argv)
    wanted: list[str] = []
    for name in (s.strip() for s in args.scenarios.split(",") if s.strip()):
        expanded = {"4": ["4a", "4b"], "6": ["6a", "6b"]}.get(name, [name])
        if any(s not in SCENARIOS for s in expanded):
            ap.error(f"unknown scenario {name!r}")
        wanted += [s for s in expanded if s not in wanted]

    import logging

    from werkzeug.serving import make_server

    from civitas.app import create_app
    from config.loading import settings_from_mapping

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="civitas-appcpu-")))
        print("starting PostgreSQL, Redis, upstream OP ...", flush=True)
        pg = stack.enter_context(servers.run_postgres(work / "pg"))
        redis = stack.enter_context(servers.run_redis(work / "redis"))
        port = servers.free_port()
        base = f"http://127.0.0.1:{port}"
        upstream = stack.enter_context(servers.run_upstream_op(work / "op", [{
            "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
            "redirect_uris": [f"{base}/login/op/callback"]}]))
        deciders = [TestAgency(f"bench-{i:03d}", secrets.token_urlsafe(24),
                               f"https://bench-{i:03d}.agency.example/cb", f"Bench agency {i}")
                    for i in range(4)]
        settings = settings_from_mapping({
            **bench.hub_settings(base, pg, redis, upstream, [AGENCY_ONE, AGENCY_TWO, *deciders],
                                 "counted"),
            # no background work in this process while it is measured
            "ledger_seal_interval_seconds": 0, "housekeeping_interval_seconds": 0,
        }, source="bench/app_cpu.py")
        app = create_app(settings)
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stack.callback(server.shutdown)

        hub = bench.Hub(base)
        hub.login()
        hub.code(AGENCY_TWO)  # agency two's first use (its notice) is not what is measured
        call = Direct(app, base)
        scenarios = Scenarios(call, hub.cookie(), [])
        for agency in deciders:
            tokens = scenarios.exchange(agency, *scenarios.code(agency))
            _, _, content = call("GET", "/userinfo",
                                 {"Authorization": f"Bearer {tokens['access_token']}"})
            scenarios.deciders.append((agency, json.loads(content)["sub"]))
        print("signed in; measuring " + ", ".join(wanted) + f": {args.rounds} rounds of "
              f"{args.count} operations each", flush=True)

        per_op: dict[str, list[float]] = {s: [] for s in wanted}
        for scenario in wanted:  # warm every path (caches, compiled statements) once
            scenarios.prepare(scenario, args.warmup)
            for i in range(args.warmup):
                scenarios.operation(scenario, i)
        for number in range(args.rounds):
            for scenario in wanted:
                scenarios.prepare(scenario, args.count)
                started = time.thread_time()
                for i in range(args.count):
                    scenarios.operation(scenario, i)
                per_op[scenario].append((time.thread_time() - started) / args.count * 1e6)
            print(f"  round {number + 1}/{args.rounds}: " + ", ".join(
                f"{s} {per_op[s][-1]:.0f} µs" for s in wanted), flush=True)

    print()
    print(f"Civitas app alone: one thread, no HTTP server, PostgreSQL + Redis, rate limits "
          f"counted; {args.rounds} rounds of {args.count} operations")
    print(f"{'scenario':<44} {'ops':>8} {'per CPU-s':>9} {'µs/op':>7} {'range µs':>13} "
          f"{'2-core ceiling/s':>16}")
    for scenario in wanted:
        print(fmt_row(NAMES[scenario], args.count * args.rounds, per_op[scenario]))
    print("(per CPU-s: operations per second of one core's CPU time in the app, median of the "
          "rounds; 2-core ceiling: twice that, what 2 cores could do if nothing else ran)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
