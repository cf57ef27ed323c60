"""Civitas load benchmarks against a running hub in production mode, with oidc-provider as
the peer where an equivalent request exists.

    .venv/bin/python bench/run.py [--workers 2] [--duration 10] [--scenarios 1,2,3,4,5,6,F]
                                  [--connections 16] [--mint 3000]

Starts (on 127.0.0.1, free ports, in a temporary directory) PostgreSQL, Redis, the upstream
OP the citizen logs in with, the peer (npm oidc-provider, ES256 ID tokens, same grants) and the
hub with ``civitas serve --workers N``; logs in once through the real upstream, mints codes and
refresh-token grants ahead over HTTP, runs every scenario with wrk (bench/wrk.lua) for at most
``--duration`` seconds, prints one table and the RSS of every hub worker, and stops everything.
Run bench/setup first (installs wrk). See bench/README.md for what is comparable.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import html
import json
import os
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
import yaml  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from tests import servers  # noqa: E402
from tests.flows import (  # noqa: E402
    AGENCY_ONE,
    AGENCY_TWO,
    UPSTREAM_CLIENT_ID,
    UPSTREAM_SECRET,
    AuthRequest,
    TestAgency,
    allow_over_http,
    pkce_pair,
    query,
    upstream_login,
)

WRK_LUA = ROOT / "bench" / "wrk.lua"
PEER_MJS = ROOT / "bench" / "peer.mjs"
#: a peer-only client with opaque access tokens: oidc-provider serves userinfo only for those
OPAQUE = TestAgency("agency-opaque", "s3-" + "c" * 40, "https://opaque.agency.example/cb",
                    "Opaque")
#: scenario 4b: only an answer about an active token is a success (RFC 7662 2.2: a token
#: that is not active, or not the agency's, is a 200 {"active": false} too); both sides
#: write it without a space
INTROSPECTION_ENV = {"BENCH_EXPECT": '"active":true'}


@contextlib.contextmanager
def run_peer(tmpdir: Path, clients: list[dict], opaque: list[str]):
    """bench/peer.mjs (oidc-provider) on a free port; yields its issuer and pid."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    log = tmpdir / "peer.log"
    env = dict(os.environ, NODE_ENV="production", CLIENTS=json.dumps(clients),
               OPAQUE_CLIENTS=json.dumps(opaque))
    with servers._process([shutil.which("node") or "node", str(PEER_MJS)], log, env=env,
                          cwd=ROOT / "bench") as proc:
        servers._wait_until("peer", proc, log,
                            lambda: servers.announced_issuer(log) is not None, timeout=20)
        yield str(servers.announced_issuer(log)), proc.pid
SCOPES = ["openid", "profile", "email", "offline_access"]


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def exchange_code(token_url: str, code: str, verifier: str, agency) -> dict:
    """An authorization-code exchange with PKCE, client_secret_basic (hub and peer alike)."""
    r = requests.post(token_url, timeout=15, headers={
        "Authorization": basic(agency.client_id, agency.secret)}, data={
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": agency.redirect_uri, "code_verifier": verifier})
    r.raise_for_status()
    return r.json()


def follow(browser: requests.Session, url: str, stop_prefix: str, hops: int = 12) -> dict:
    """GET url and follow redirects until one points at `stop_prefix`; its query."""
    r = browser.get(url, allow_redirects=False, timeout=15)
    for _ in range(hops):
        if r.status_code not in (301, 302, 303, 307):
            raise RuntimeError(f"{r.url}: {r.status_code} {r.text[:300]}")
        location = urljoin(r.url, r.headers["Location"])
        if location.startswith(stop_prefix):
            return query(location)
        r = browser.get(location, allow_redirects=False, timeout=15)
    raise RuntimeError("too many redirects")


# -- the hub ---------------------------------------------------------------------------------

class Hub:
    def __init__(self, base: str) -> None:
        self.base = base
        self.browser = requests.Session()

    def login(self) -> None:
        """A full brokered login over real HTTP (like a browser): leaves a hub session."""
        auth = AuthRequest(AGENCY_ONE)
        r = self.browser.get(self.base + auth.url(), timeout=15)
        link = html.unescape(re.search(r'href="(/login/op/start\?flow=[^"]+)"', r.text).group(1))
        r = self.browser.get(self.base + link, allow_redirects=False, timeout=15)
        callback = upstream_login(r.headers["Location"], "alice")
        r = self.browser.get(callback, allow_redirects=False, timeout=15)
        follow_from = urljoin(r.url, r.headers["Location"])
        params = follow(self.browser, follow_from, AGENCY_ONE.redirect_uri)
        assert "code" in params, params
        self.allow_offline(AGENCY_ONE)

    def allow_offline(self, agency) -> None:
        """Answer agency one's consent page once, offline access ticked (OpenID Connect Core
        11: no refresh token without it), as the peer is asked with prompt=consent: the
        refresh tokens minted ahead come of that grant, unasked."""
        auth = AuthRequest(agency, scope=" ".join(SCOPES))
        r = allow_over_http(self.browser, self.browser.get(
            self.base + auth.url(), allow_redirects=False, timeout=15))
        if r.status_code != 302 or "code=" not in r.headers.get("Location", ""):
            raise RuntimeError(f"consent to offline access: {r.status_code} {r.text[:300]}")

    def code(self, agency=AGENCY_ONE, scope: str = "openid profile email") -> tuple[str, str]:
        auth = AuthRequest(agency, scope=scope)
        params = follow(self.browser, self.base + auth.url(), agency.redirect_uri)
        return params["code"], auth.verifier

    def exchange(self, code: str, verifier: str, agency=AGENCY_ONE) -> dict:
        return exchange_code(self.base + "/token", code, verifier, agency)

    def cookie(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.browser.cookies)


# -- the peer (oidc-provider) ----------------------------------------------------------------

class Peer:
    def __init__(self, issuer: str) -> None:
        self.base = issuer
        self.browser = requests.Session()
        self.meta = requests.get(issuer + "/.well-known/openid-configuration", timeout=10).json()

    def path(self, key: str) -> str:
        return self.meta[key][len(self.base):]

    def auth_url(self, agency, scope: str, prompt: str | None = None) -> tuple[str, str]:
        verifier, challenge = pkce_pair()
        p = {"response_type": "code", "client_id": agency.client_id,
             "redirect_uri": agency.redirect_uri, "scope": scope,
             "state": secrets.token_urlsafe(8), "nonce": secrets.token_urlsafe(8),
             "code_challenge": challenge, "code_challenge_method": "S256"}
        if prompt:
            p["prompt"] = prompt
        return self.meta["authorization_endpoint"] + "?" + urlencode(p), verifier

    def login(self) -> None:
        """peer.mjs signs alice in at any interaction; then the second agency's grant, so
        that later authorizations need no interaction."""
        self.code(AGENCY_ONE)
        self.code(AGENCY_TWO)

    def code(self, agency=AGENCY_ONE, scope: str = "openid profile email") -> tuple[str, str]:
        # oidc-provider keeps offline_access only with prompt=consent (Core 11.)
        prompt = "consent" if "offline_access" in scope else None
        url, verifier = self.auth_url(agency, scope, prompt)
        return follow(self.browser, url, agency.redirect_uri)["code"], verifier

    def exchange(self, code: str, verifier: str, agency=AGENCY_ONE) -> dict:
        return exchange_code(self.meta["token_endpoint"], code, verifier, agency)

    def cookie(self) -> str:
        # only the session cookies (path /), not the per-interaction ones
        return "; ".join(f"{c.name}={c.value}" for c in self.browser.cookies
                         if c.path == "/" and c.name.startswith("_session"))


# -- minting ahead and running wrk -----------------------------------------------------------

def mint(fn, count: int, budget: float, pool: int = 16) -> list:
    """Call fn() up to `count` times from `pool` threads within `budget` seconds."""
    deadline = time.monotonic() + budget
    out: list = []

    def one(_: int):
        if time.monotonic() > deadline:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            return exc

    with ThreadPoolExecutor(pool) as ex:
        results = list(ex.map(one, range(count)))
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        print(f"  (minting: {len(errors)} failures, first: {errors[0]!r})", flush=True)
    out = [r for r in results if r is not None and not isinstance(r, Exception)]
    print(f"  minted {len(out)} in {time.monotonic() - deadline + budget:.1f}s", flush=True)
    return out


def write_lists(workdir: Path, name: str, bodies: list[str], threads: int) -> str:
    prefix = workdir / name
    for i in range(threads):
        (Path(f"{prefix}.{i}")).write_text("\n".join(bodies[i::threads]) + "\n")
    return str(prefix)


def live_grants(prefix: str) -> int:
    """How many refresh tokens a chain run's files hold (wrk.lua writes them back)."""
    return sum(len(Path(name).read_text().split()) for name in glob.glob(prefix + ".*"))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def wait_for_no_connections(base: str, within: float = 5.0) -> None:
    """Until the hub holds no connection from this bench's own setup (sessions kept alive
    until the hub's keep-alive time runs out): a worker takes new connections while it holds
    no more than the others, so a setup connection still open in one worker when wrk
    connects would leave that worker one wrk connection short for the whole run."""
    port = base.rsplit(":", 1)[1]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        listing = subprocess.run(["ss", "-Htn", "state", "established", f"sport = :{port}"],
                                 capture_output=True, text=True, timeout=10, check=False)
        if listing.returncode != 0 or not listing.stdout.strip():
            return
        time.sleep(0.05)


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        #: base URL -> pid of a process (with its children) whose CPU a run measures
        self.cpu_of: dict[str, int] = {}
        #: every wrk run: (its environment, its command), for --hold
        self.sent: list[tuple[dict[str, str], list[str]]] = []

    hub_base = ""
    hub_pid = 0

    def wrk(self, base: str, env: dict[str, str], duration: float | None = None) -> dict:
        duration = duration or self.args.duration
        cpu_pid = self.hub_pid if base == self.hub_base else self.cpu_of.get(base)
        if base == self.hub_base:
            wait_for_no_connections(base)
        cpu0 = hub_cpu_seconds(cpu_pid) if cpu_pid else None
        storage0 = storage_cpu_seconds()
        cmd = ["wrk", "-t", str(self.args.threads), "-c", str(self.args.connections),
               "-d", f"{max(1, int(duration))}s", "--timeout", "5s", "-s", str(WRK_LUA), base]
        if (env, cmd) not in self.sent:  # a repeated run (--repeat) is listed once
            self.sent.append((env, cmd))
        proc = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True,
                              timeout=duration + 60)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed: {proc.stdout[-800:]} {proc.stderr[-800:]}")
        r = json.loads(line[6:])
        err = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_ERROR ")), None)
        if err:
            r["first_error"] = err[12:]
            print(f"  first error response: {err[12:]}", flush=True)
        if r.get("exhausted_after_us"):  # every thread used up its list before the end
            r["duration_us"] = min(r["duration_us"], r["exhausted_after_us"])
        if cpu0 is not None:
            cpu1 = hub_cpu_seconds(cpu_pid)
            seconds = max(r["duration_us"] / 1e6, 1e-9)
            r["hub_cpu_s"] = sum(cpu1.values()) - sum(cpu0.values())
            r["hub_cores_busy"] = r["hub_cpu_s"] / seconds
            # how evenly the workers shared the load: keep-alive connections stay with the
            # worker that accepted them
            r["worker_cores_busy"] = [round((cpu1[p] - cpu0.get(p, 0.0)) / seconds, 2)
                                      for p in sorted(cpu1) if p != cpu_pid]
            # PostgreSQL (postmaster and backends) and Redis: the machine's other tenant
            r["storage_cores_busy"] = (storage_cpu_seconds() - storage0) / seconds
        secs = r["duration_us"] / 1e6
        r["rps"] = r["requests"] / secs if secs else 0.0
        r["good_rps"] = r["good"] / secs if secs else 0.0
        return r


def hold(runner: Runner, workdir: Path, hub_pid: int) -> None:
    """``--hold``: one shell script per wrk run of this bench, to send that load again."""
    print(f"\nholding (Ctrl-C or SIGTERM to stop); hub master pid {hub_pid}, workers "
          f"{' '.join(str(pid) for pid, _ in rss_of_children(hub_pid))}", flush=True)
    for number, (env, cmd) in enumerate(runner.sent, 1):
        script = workdir / f"wrk-{number}.sh"
        script.write_text("#!/bin/sh\n" + "".join(
            f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
            + "exec " + " ".join(shlex.quote(c) for c in cmd) + ' "$@"\n')
        print(f"  sh {script}    # {env.get('BENCH_PATH', env.get('BENCH_MODE', ''))}",
              flush=True)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)


def soak(runner: Runner, minutes: float, hub_pid: int) -> None:
    """``--soak``: the hub's repeatable loads sent again in turn for ``minutes``, each
    worker's RSS after every run: does memory stay flat under a long load, and under the
    120 MB target? Not scenario 2 (its single-use codes are spent); scenario 5 goes on with
    the grants' newest refresh tokens."""
    scenario_runs = list(runner.sent)  # what --hold offers afterwards: not the soak's runs
    repeatable = [env for env, cmd in scenario_runs
                  if cmd[-1] == runner.hub_base and env.get("BENCH_MODE") != "list"]
    if not repeatable:
        print("--soak: no repeatable scenario ran (0, 1, 3, 4, 5 and 6 are; 2 spends a list)")
        return
    before = rss_of_children(hub_pid)
    print(f"\nsoak: {len(repeatable)} loads in turn for {minutes:g} min; worker RSS in MB "
          f"(pids {' '.join(str(pid) for pid, _ in before)}) before: "
          + " ".join(f"{mb:.1f}" for _, mb in before), flush=True)
    print(f"{'at s':>6}  {'load':<24} {'req/s':>8} {'errors':>6}  worker RSS MB")
    started, sent, rounds = time.monotonic(), 0, []
    while time.monotonic() - started < minutes * 60:
        env = repeatable[len(rounds) % len(repeatable)]
        r = runner.wrk(runner.hub_base, env)
        rss = rss_of_children(hub_pid)
        sent += r["requests"]
        rounds.append(rss)
        pids = "" if [p for p, _ in rss] == [p for p, _ in before] else "  (worker pids changed)"
        if env.get("BENCH_MODE") == "chain":
            pids += f"  ({live_grants(env['BENCH_LIST'])} grants live)"
        label = env.get("BENCH_PATH", env.get("BENCH_MODE", "")) + (
            " refresh" if env.get("BENCH_MODE") == "chain" else "")
        print(f"{time.monotonic() - started:6.0f}  "
              f"{label:<24} "
              f"{r['good_rps']:8.0f} {r['non2xx']:6d}  "
              + " ".join(f"{mb:6.1f}" for _, mb in rss) + pids, flush=True)
    runner.sent = scenario_runs
    first, last = rounds[min(len(repeatable), len(rounds)) - 1], rounds[-1]
    peak = max(mb for rss in rounds for _, mb in rss)
    print(f"soak: {sent:,} requests in {len(rounds)} runs; worker RSS after the first turn "
          + " ".join(f"{mb:.1f}" for _, mb in first) + ", at the end "
          + " ".join(f"{mb:.1f}" for _, mb in last) + f", peak {peak:.1f} MB"
          + ("" if peak < 120 else " (over the 120 MB target)"), flush=True)


def fmt_row(name: str, r: dict | None, peer: dict | None, workers: int, unit: float = 1,
            note: str = "") -> str:
    if r is None:
        return (f"{name:<44} {'-':>8} {'-':>9} {'-':>7} {'-':>7} {'-':>9} {'-':>6} {'-':>8} "
                f"{'-':>7} {'-':>6} {'-':>7}  {note}")
    rps = r["good_rps"] * unit
    peer_rps = peer["good_rps"] * unit if peer else None
    ratio = f"{rps / peer_rps:.2f}" if peer_rps else "-"
    per_core = f"{(rps / workers) / peer_rps:.2f}" if peer_rps else "-"
    extra = f" ({r['non2xx']} errors)" if r["non2xx"] else ""
    if r.get("exhausted_after_us"):
        extra += f" [list used up after {r['exhausted_after_us'] / 1e6:.1f}s]"
    if peer and peer.get("exhausted_after_us"):
        extra += f" [peer list used up after {peer['exhausted_after_us'] / 1e6:.1f}s]"
    cores = f"{r['hub_cores_busy']:.2f}" if "hub_cores_busy" in r else "-"
    peer_cores = f"{peer['hub_cores_busy']:.2f}" if peer and "hub_cores_busy" in peer else "-"
    # requests per CPU-second at each side, from the CPU each really used (node uses more
    # than one core: its garbage collector and libuv run on threads of their own)
    per_cpu = "-"
    if peer_rps and r.get("hub_cores_busy") and peer.get("hub_cores_busy"):
        per_cpu = f"{(rps / r['hub_cores_busy']) / (peer_rps / peer['hub_cores_busy']):.2f}"
    note = r.get("runs_note", "") + (peer.get("runs_note", "") if peer else "") + note
    if r.get("worker_cores_busy"):
        note = (f"workers {'+'.join(f'{c:.2f}' for c in r['worker_cores_busy'])}, "
                f"storage {r.get('storage_cores_busy', 0):.2f}; {note}")
    return (f"{name:<44} {r['requests']:>8} {rps:>9.0f} {r['p50_us'] / 1000:>7.2f} "
            f"{r['p99_us'] / 1000:>7.2f} {(f'{peer_rps:.0f}' if peer_rps else '-'):>9} "
            f"{ratio:>6} {per_core:>8} {per_cpu:>7} {cores:>6} {peer_cores:>7}  {note}{extra}")


def median_run(runs: list[dict], key: str, side: str = "") -> dict:
    """The run with the median ``key`` (``good_rps``: throughput; ``p99_us``: latency) of
    ``runs`` (``--repeat``; of an even number, the upper of the middle two), every run's
    value in its ``runs_note`` (in the order they ran), so a reader sees the spread beside
    the figure."""
    middle = dict(sorted(runs, key=lambda r: r[key])[len(runs) // 2])
    if len(runs) > 1:
        if key == "p99_us":
            by, values = "p99; p99s", ", ".join(f"{r['p99_us'] / 1000:.1f}" for r in runs) + " ms"
        else:
            by, values = "req/s; req/s", ", ".join(f"{r['good_rps']:.0f}" for r in runs)
        cores = ", ".join(f"{r.get('hub_cores_busy', 0):.2f}" for r in runs)
        middle["runs_note"] = (f"{side}median of {len(runs)} runs by {by} {values}, "
                               f"{'cores' if side else 'hub cores'} {cores}; ")
    return middle


def rss_of_children(pid: int) -> list[tuple[int, float]]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            rss = next(int(x.split()[1]) for x in (d / "status").read_text().splitlines()
                       if x.startswith("VmRSS:"))
            out.append((int(d.name), rss / 1024))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return sorted(out)


def hub_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time (user + system) so far of the gunicorn master and of each worker, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d.name) == pid or int(fields[1]) == pid:
            found[int(d.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def storage_cpu_seconds() -> float:
    """CPU time so far of this run's PostgreSQL (runuser, postmaster, backends) and Redis:
    the processes this script started for them, and all their descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, bytes]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        procs[int(d.name)] = (int(fields[1]),
                              (int(fields[11]) + int(fields[12])) / tick, cmdline)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid in children.get(os.getpid(), [])
            if b"postgres" in procs[pid][2] or b"redis-server" in procs[pid][2]]
    total = 0.0
    while todo:
        pid = todo.pop()
        total += procs[pid][1]
        todo.extend(children.get(pid, []))
    return total


def rss_of(pid: int) -> float:
    for x in Path(f"/proc/{pid}/status").read_text().splitlines():
        if x.startswith("VmRSS:"):
            return int(x.split()[1]) / 1024
    return 0.0


def floor_servers() -> list[str]:
    """The hub's own server, and granian (a Rust HTTP server) when it is installed."""
    import importlib.util
    return ["gunicorn"] + (["granian"] if importlib.util.find_spec("granian") else [])


@contextlib.contextmanager
def run_floor(server: str, workdir: Path, redis_url: str, workers: int, threads: int):
    """bench/floor_app.py under `server` with the hub's worker and thread counts."""
    port = servers.free_port()
    if server == "gunicorn":  # the settings civitas/gunicorn_app.py gives the hub
        cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers),
               "--worker-class", "gthread", "--threads", str(threads), "--reuse-port",
               "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "floor_app:app"]
    else:
        cmd = [sys.executable, "-m", "granian", "--interface", "wsgi", "--workers",
               str(workers), "--blocking-threads", str(threads), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "floor_app:app"]
    env = dict(os.environ, FLOOR_CLIENT_ID=AGENCY_ONE.client_id,
               FLOOR_CLIENT_SECRET=AGENCY_ONE.secret, FLOOR_REDIS_URL=redis_url,
               MALLOC_ARENA_MAX="2", PYTHONPATH=str(ROOT / "bench"))
    log = (workdir / f"floor-{server}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT / "bench", env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = requests.post(base + "/", data={"grant_type": "client_credentials"},
                                  auth=(AGENCY_ONE.client_id, AGENCY_ONE.secret), timeout=1)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start: "
                                   + (workdir / f"floor-{server}.log").read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(1)  # every worker up, not only the first to answer
        yield base, proc.pid
    finally:
        servers.stop_process(proc)
        log.close()


# -- main ------------------------------------------------------------------------------------

def load_citizens(config: dict, accounts: int, events: int) -> list[tuple[str, str]]:
    """Scenario 6 on a populated database: add bench/load_data.py's 50 agencies to the
    hub's settings, load the citizens (COPY, rows the real code writes), VACUUM ANALYZE,
    and return (client_id, subject) pairs of loaded records to ask about."""
    from bench.load_data import analyze, bench_agencies, load, start_hub
    from config import settings_from_mapping

    config["agencies"] = config["agencies"] + bench_agencies(50)
    app = start_hub(settings_from_mapping(config))
    hub = app.extensions["civitas"]
    print(f"loading {accounts:,} citizens and ~{events:,} consent events ...", flush=True)
    result = load(hub, accounts=accounts, events=events, seed=7,
                  progress=lambda line: print(line, flush=True))
    analyze(hub)
    print(result.report(), flush=True)
    hub.db.dispose()
    return result.sample


def bench_rate_limits(mode: str) -> dict[str, int]:
    """The hub's ``rate_limits``: a load generator on one address would meet the production
    limits per address at once, so they are raised to the settings' maximum (counted, never
    reached) or switched off (0: nothing counted)."""
    from config.schema import RateLimitSettings

    per_window = 10_000_000 if mode == "counted" else 0
    return {name: per_window for name in RateLimitSettings.model_fields
            if name != "window_seconds"}


class HungCitizens:
    """``count`` citizens who each choose the upstream that does not answer (``--hung-
    upstream``), over and over: each waits for the hub's answer (a 502 when the upstream's
    call times out, a 503 when the bulkhead refuses it or the upstream is taken as down),
    then 0.2 s, then clicks again (a chooser page without the link, while it is down, is
    counted as its status, 200)."""

    def __init__(self, base: str, count: int) -> None:
        self.base = base
        self.answers: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._citizen, daemon=True)
                         for _ in range(count)]

    def _citizen(self) -> None:
        browser = requests.Session()
        link = None
        while link is None and not self._stop.is_set():
            try:  # the chooser page, with its link to the hung upstream
                r = browser.get(self.base + AuthRequest(AGENCY_ONE).url(), timeout=30)
            except requests.RequestException:
                self._count(0)
                continue
            found = re.search(r'href="(/login/hung/start\?flow=[^"]+)"', r.text)
            if found is None:
                self._count(r.status_code)
                self._stop.wait(0.2)
                continue
            link = html.unescape(found.group(1))
        while not self._stop.is_set():
            try:
                r = browser.get(self.base + link, allow_redirects=False, timeout=30)
            except requests.RequestException:
                self._count(0)
            else:
                self._count(r.status_code, "down" if "not answering right now" in r.text
                            else "busy" if "Too many people" in r.text else "")
            self._stop.wait(0.2)

    def _count(self, status: int, why: str = "") -> None:
        """``why``: a 503's reason, ``busy`` (the bulkhead) or ``down`` (broker.health)."""
        key = f"{status} {why}".strip() if status else "no answer"
        with self._lock:
            self.answers[key] = self.answers.get(key, 0) + 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)


def hub_settings(issuer: str, database_url: str, redis_url: str, upstream: str,
                 agencies: list, rate_limits: str) -> dict:
    """The bench hub's settings (also bench/app_cpu.py's): fresh keys, the upstream OP the
    citizen signs in with, ``agencies`` with every scope, rate limits ``counted`` or
    ``off`` (:func:`bench_rate_limits`)."""
    return {
        "issuer": issuer, "database_url": database_url, "redis_url": redis_url,
        "encryption_key": Fernet.generate_key().decode(),
        "pairwise_secret": secrets.token_urlsafe(32),
        "upstreams": [{"kind": "oidc", "id": "op", "display_name": "Example ID",
                       "issuer": upstream, "client_id": UPSTREAM_CLIENT_ID,
                       "client_secret": UPSTREAM_SECRET, "acr": "urn:civitas:acr:ial1:aal1"}],
        "agencies": [a.config(scopes=SCOPES) for a in agencies],
        "rate_limits": bench_rate_limits(rate_limits),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hub-threads", type=int, default=4, help="threads per hub worker")
    ap.add_argument("--duration", type=float, default=10, help="seconds per scenario (max)")
    ap.add_argument("--scenarios", default="1,2,3,4,5,6",
                    help="comma-separated: 0 1 2 3 4 5 6 F (6a or 6b: one half of 6)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--mint", type=int, default=20000,
                    help="scenario 2: single-use codes minted ahead")
    ap.add_argument("--refresh-grants", type=positive_int, default=512,
                    help="scenario 5: grants minted ahead, each refreshed again and again "
                         "(a token in flight when a run ends is lost: up to --connections "
                         "grants per run)")
    ap.add_argument("--mint-budget", type=float, default=None,
                    help="seconds allowed for minting one list")
    ap.add_argument("--consent-agencies", type=int, default=8,
                    help="agencies the decision load is spread over")
    ap.add_argument("--load-accounts", type=int, default=0,
                    help="scenario 6: load this many citizens first (bench/load_data.py), "
                         "e.g. 1000000, and spread the decisions over them")
    ap.add_argument("--load-events", type=int, default=None,
                    help="consent events to load with them (default: 10 per citizen)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--decision-rate", type=float, default=0,
                    help="scenario 6: send decisions at this rate (decisions/s: single "
                         "evaluations at this many requests/s, batches of 20 at 1/20 of it) "
                         "instead of as fast as the hub answers; the latency at that load")
    ap.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                    help="run scenarios 0, 1, 3, 4 and 6 N times each against the same hub "
                         "(0-4: the hub and the peer in turn) and report the run with the "
                         "median req/s (6: the median p99), every run's figure in its note: "
                         "runs minutes apart differ by 10-25%% here, and one run's p99 by up "
                         "to a factor of two. Scenarios 2, 5 and F run once (2 spends its "
                         "list of codes; 5's grants age with every run; F is not the hub)")
    ap.add_argument("--server", choices=["gunicorn", "granian"], default="gunicorn",
                    help="the hub's HTTP server: `civitas serve` (gunicorn, production) or, "
                         "as an experiment, the same app under granian (bench/setup installs it)")
    ap.add_argument("--sealer", choices=["workers", "process"], default="workers",
                    help="who seals the audit ledger: the hub's workers (the default "
                         "settings), or one `civitas audit seal --every 60` process beside "
                         "them, as compose.yaml runs it (its CPU is counted in neither column)")
    ap.add_argument("--rate-limits", choices=["counted", "off"], default="counted",
                    help="counted (the default): every rate limit on, as in production, but "
                         "at the most the settings allow (10,000,000 per minute), so every "
                         "request pays for its counters and none is refused; off: no "
                         "counting (the bench's setting before the twelfth session)")
    ap.add_argument("--hung-upstream", type=int, default=0, metavar="N",
                    help="add an upstream that never answers (a TCP server that takes "
                         "connections and stays silent; timeout_seconds 5) and keep N "
                         "citizens choosing it over and over during the scenarios "
                         "(HungCitizens): what a slow upstream costs everyone else")
    ap.add_argument("--hung-places", type=int, default=None, metavar="P",
                    help="that upstream's max_concurrent_calls (default: the hub's default, "
                         "half of --hub-threads; --hub-threads or more: no bulkhead)")
    ap.add_argument("--hung-down-after", type=int, default=None, metavar="F",
                    help="that upstream's down_after_failures (default: the hub's, 5; 0: "
                         "never taken as down, as before the twenty-second session)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--hold", action="store_true",
                    help="after the scenarios, keep everything running (and print how to send "
                         "each scenario's load again with wrk) until interrupted: for "
                         "profiling and experiments")
    ap.add_argument("--soak", type=float, default=0, metavar="MINUTES",
                    help="after the scenarios, send the hub's repeatable loads (scenarios "
                         "0, 1, 3, 4, 5, 6) again in turn for MINUTES (at most 600) and print "
                         "each worker's RSS after every run; access tokens then live 24 h")
    args = ap.parse_args()
    if not 0 <= args.soak <= 600:
        ap.error("--soak: 0 to 600 minutes")
    if args.mint_budget is None:
        args.mint_budget = min(40.0, 2.5 * args.duration)
    wanted = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if wanted & {"6a", "6b"}:  # one half of scenario 6 only
        wanted.add("6")
    halves = wanted & {"6a", "6b"} or {"6a", "6b"}
    if not shutil.which("wrk"):
        print("wrk is not installed: run bench/setup", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="civitas-bench-"))
    runner = Runner(args, workdir)
    hub_port = servers.free_port()
    base = f"http://127.0.0.1:{hub_port}"
    agencies = [AGENCY_ONE, AGENCY_TWO]
    # The decision load is spread over this many agencies, as many agencies would send it.
    deciders = [TestAgency(f"bench-{i:03d}", secrets.token_urlsafe(24),
                           f"https://bench-{i:03d}.agency.example/cb", f"Bench agency {i}")
                for i in range(args.consent_agencies if "6" in wanted else 0)]
    with contextlib.ExitStack() as stack:
        print("starting PostgreSQL, Redis, upstream OP, peer ...", flush=True)
        pg = stack.enter_context(servers.run_postgres(workdir / "pg"))
        redis = stack.enter_context(servers.run_redis(workdir / "redis"))
        os.environ.setdefault("NODE_ENV", "production")
        upstream = stack.enter_context(servers.run_upstream_op(workdir / "op", [{
            "client_id": UPSTREAM_CLIENT_ID, "client_secret": UPSTREAM_SECRET,
            "redirect_uris": [f"{base}/login/op/callback"]}]))
        peer_issuer = None
        if not args.no_peer:
            peer_issuer, peer_pid = stack.enter_context(run_peer(workdir / "peer", [{
                "client_id": a.client_id, "client_secret": a.secret,
                "redirect_uris": [a.redirect_uri]} for a in agencies + [OPAQUE]],
                [OPAQUE.client_id]))
            runner.cpu_of[peer_issuer] = peer_pid
        config = hub_settings(base, pg, redis, upstream, agencies + deciders,
                              args.rate_limits)
        if args.hung_upstream:
            silent_port, _ = stack.enter_context(servers.run_silent_server())
            hung: dict = {"kind": "oidc", "id": "hung", "display_name": "Hung ID",
                          "issuer": f"http://127.0.0.1:{silent_port}", "client_id": "x",
                          "client_secret": "y", "timeout_seconds": 5}
            if args.hung_places is not None:
                hung["max_concurrent_calls"] = args.hung_places
            if args.hung_down_after is not None:
                hung["down_after_failures"] = args.hung_down_after
            config["upstreams"].append(hung)
        if args.soak:  # scenario 4's access token is sent again for the whole soak
            config["access_token_lifetime_seconds"] = 24 * 3600
        loaded_sample: list[tuple[str, str]] = []
        if args.load_accounts and "6" in wanted:
            loaded_sample = load_citizens(config, args.load_accounts,
                                          args.load_events or 10 * args.load_accounts)
        cfg_path = workdir / "civitas.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        cfg_path.chmod(0o600)
        log = (workdir / "hub.log").open("wb")
        hub_env = dict(os.environ)
        if args.server == "gunicorn":
            print(f"starting the hub: civitas serve --workers {args.workers} "
                  f"--threads {args.hub_threads} on {base}", flush=True)
            hub_cmd = [sys.executable, "-m", "civitas.cli", "--config", str(cfg_path), "serve",
                       "--workers", str(args.workers), "--threads", str(args.hub_threads),
                       "--port", str(hub_port)]
        else:  # an experiment: the same app under granian (bench/README.md, fifth session)
            print(f"starting the hub under granian: {args.workers} workers x "
                  f"{args.hub_threads} blocking threads on {base}", flush=True)
            subprocess.run([sys.executable, "-m", "civitas.cli", "--config", str(cfg_path),
                            "db", "upgrade"], check=True, cwd=ROOT, capture_output=True)
            hub_cmd = [sys.executable, "-m", "granian", "--interface", "wsgi",
                       "--workers", str(args.workers), "--blocking-threads",
                       str(args.hub_threads), "--host", "127.0.0.1", "--port", str(hub_port),
                       "--log-level", "warning", "--working-dir", str(ROOT / "bench"),
                       "granian_hub:app"]
            metrics_dir = workdir / "metrics"
            metrics_dir.mkdir()
            hub_env.update(CIVITAS_CONFIG=str(cfg_path), MALLOC_ARENA_MAX="2",
                           PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench")]),
                           PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        if args.sealer == "process":
            hub_env["CIVITAS_LEDGER_SEAL_INTERVAL_SECONDS"] = "0"
        hub_proc = subprocess.Popen(hub_cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=hub_env, start_new_session=True)
        stack.callback(log.close)
        stack.callback(servers.stop_process, hub_proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if hub_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hub did not start:\n"
                                   + (workdir / "hub.log").read_text()[-3000:])
            time.sleep(0.2)
        if args.sealer == "process":  # the schema is up to date now: the hub is ready
            sealer_log = (workdir / "sealer.log").open("wb")
            sealer = subprocess.Popen(
                [sys.executable, "-m", "civitas.cli", "--config", str(cfg_path), "audit",
                 "seal", "--every", "60"], stdout=sealer_log, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            stack.callback(sealer_log.close)
            stack.callback(servers.stop_process, sealer)

        runner.hub_base, runner.hub_pid = base, hub_proc.pid
        hub = Hub(base)
        hub.login()
        hub.code(AGENCY_TWO)  # first use by agency two: its notice is recorded once
        peer = Peer(peer_issuer) if peer_issuer else None
        if peer:
            peer.login()
        # Concurrent interactions (prompt=consent) on one oidc-provider session spoil it, so
        # the peer's lists are minted through 16 sessions, each used by one thread at a time.
        peer_sessions: queue.Queue = queue.Queue()
        if peer:
            peer_sessions.put(peer)
            for _ in range(15):
                extra = Peer(peer_issuer)
                extra.login()
                peer_sessions.put(extra)

        @contextlib.contextmanager
        def borrowed(side):
            if side is hub:
                yield hub
                return
            s = peer_sessions.get()
            try:
                yield s
            finally:
                peer_sessions.put(s)

        print("logged in at the hub" + (" and at the peer" if peer else ""), flush=True)
        hung_citizens = None
        if args.hung_upstream:
            hung_citizens = HungCitizens(base, args.hung_upstream)
            hung_citizens.start()
            stack.callback(hung_citizens.stop)
            print(f"{args.hung_upstream} citizens keep choosing an upstream that never "
                  "answers", flush=True)

        rows: list[str] = []
        results: dict = {}
        auth_one = basic(AGENCY_ONE.client_id, AGENCY_ONE.secret)
        auth_two = basic(AGENCY_TWO.client_id, AGENCY_TWO.secret)
        form = "application/x-www-form-urlencoded"

        def list_run(target, name, bodies, path, auth):
            prefix = write_lists(workdir, f"{name}-{target}", bodies, args.threads)
            return runner.wrk(target_base[target], {
                "BENCH_MODE": "list", "BENCH_METHOD": "POST", "BENCH_PATH": path,
                "BENCH_CTYPE": form, "BENCH_AUTH": auth, "BENCH_LIST": prefix})

        target_base = {"hub": base, "peer": peer_issuer}
        peer_token = peer.path("token_endpoint") if peer else ""

        def both(hub_env: dict[str, str], peer_env: dict[str, str] | None = None
                 ) -> tuple[dict, dict | None]:
            """A load that can be sent again (scenarios 0, 1, 3 and 4), ``--repeat`` times at
            each side, the hub and the peer in turn (a drift of the machine falls on both):
            each side's run with the median rate, every run's rate in the row's note."""
            hub_runs, peer_runs = [], []
            for _ in range(args.repeat):
                hub_runs.append(runner.wrk(base, hub_env))
                if peer and peer_env is not None:
                    peer_runs.append(runner.wrk(peer_issuer, peer_env))
            return (median_run(hub_runs, "good_rps"),
                    median_run(peer_runs, "good_rps", "peer: ") if peer_runs else None)

        # 0: the floor: the cheapest request each server answers (its JWKS document, no
        # storage, no signature): what the web stack alone costs per request
        if "0" in wanted:
            print("scenario 0: JWKS document (the web stack's floor) ...", flush=True)
            results["0"], results["0p"] = both(
                {"BENCH_MODE": "static", "BENCH_METHOD": "GET", "BENCH_PATH": "/jwks"},
                {"BENCH_MODE": "static", "BENCH_METHOD": "GET",
                 "BENCH_PATH": peer.path("jwks_uri")} if peer else None)
            rows.append(fmt_row("0 JWKS document (floor)", results["0"], results.get("0p"),
                                args.workers, note="no storage, no signing"))

        # 1: client_credentials (nothing minted: every request is the same)
        if "1" in wanted:
            print("scenario 1: client_credentials ...", flush=True)
            results["1"], results["1p"] = both({
                "BENCH_MODE": "static", "BENCH_METHOD": "POST", "BENCH_PATH": "/token",
                "BENCH_CTYPE": form, "BENCH_AUTH": auth_one,
                "BENCH_BODY": "grant_type=client_credentials&scope=consent.decisions"}, {
                "BENCH_MODE": "static", "BENCH_METHOD": "POST", "BENCH_PATH": peer_token,
                "BENCH_CTYPE": form, "BENCH_AUTH": auth_one,
                "BENCH_BODY": "grant_type=client_credentials&scope=api"})
            rows.append(fmt_row("1 token endpoint, client_credentials", results["1"],
                                results.get("1p"), args.workers, note="JWT access token"))

        # F: the ceiling for Python: bench/floor_app.py, a bare WSGI client_credentials endpoint
        # (no framework, no OAuth library), under the hub's server and, if installed, granian
        if "F" in wanted:
            for server in floor_servers():
                print(f"scenario F: the floor token endpoint under {server} ...", flush=True)
                with run_floor(server, workdir, redis, args.workers, args.hub_threads) as (
                        floor_base, floor_pid):
                    runner.cpu_of[floor_base] = floor_pid
                    results["F" + server] = runner.wrk(floor_base, {
                        "BENCH_MODE": "static", "BENCH_METHOD": "POST", "BENCH_PATH": "/",
                        "BENCH_CTYPE": form, "BENCH_AUTH": auth_one,
                        "BENCH_BODY": "grant_type=client_credentials&scope=consent.decisions"})
                    rss = [mb for _, mb in rss_of_children(floor_pid)]
                peer_row = results.get("1p")  # row 1's peer, whose runs row 1 notes
                rows.append(fmt_row(f"F floor token endpoint ({server})", results["F" + server],
                                    peer_row and {**peer_row, "runs_note": ""}, args.workers,
                                    note="bench/floor_app.py, not the hub; worker RSS "
                                         + "/".join(f"{mb:.0f}" for mb in rss) + " MB"))

        # 5: refresh_token grant with rotation: a pool of grants, each answer's new refresh
        # token sent again later (wrk.lua's chain mode), so the run is as long as the others
        # and the grants' histories grow as a client's do
        if "5" in wanted:
            def refresh_grants(side):
                def one():
                    with borrowed(side) as s:
                        code, verifier = s.code(AGENCY_ONE, " ".join(SCOPES))
                    return side.exchange(code, verifier)["refresh_token"]
                return mint(one, args.refresh_grants, args.mint_budget)

            def chain_run(target, grants, path):
                if len(grants) < 2 * args.connections:
                    raise SystemExit(f"scenario 5: only {len(grants)} grants minted, fewer "
                                     f"than 2 per connection")
                prefix = write_lists(workdir, f"refresh-{target}", grants, args.threads)
                result = runner.wrk(target_base[target], {
                    "BENCH_MODE": "chain", "BENCH_METHOD": "POST", "BENCH_PATH": path,
                    "BENCH_CTYPE": form, "BENCH_AUTH": auth_one,
                    "BENCH_CHAIN_BODY": "grant_type=refresh_token&refresh_token={TOKEN}",
                    "BENCH_LIST": prefix})
                result["grants"] = f"{len(grants)}->{live_grants(prefix)}"
                return result
            print("scenario 5: minting refresh tokens ...", flush=True)
            results["5"] = chain_run("hub", refresh_grants(hub), "/token")
            if peer:
                results["5p"] = chain_run("peer", refresh_grants(peer), peer_token)

        # 2: authorization-code exchange with PKCE, codes minted ahead (they live 60 s)
        if "2" in wanted:
            def code_list(side):
                def one():
                    with borrowed(side) as s:
                        code, verifier = s.code(AGENCY_ONE)
                    return (f"grant_type=authorization_code&code={quote(code, safe='')}"
                            f"&redirect_uri={quote(AGENCY_ONE.redirect_uri, safe='')}"
                            f"&code_verifier={verifier}")
                return mint(one, args.mint, min(args.mint_budget, 40))
            print("scenario 2: minting codes ...", flush=True)
            results["2"] = list_run("hub", "code", code_list(hub), "/token", auth_one)
            if peer:
                results["2p"] = list_run("peer", "code", code_list(peer), peer_token, auth_one)
            rows.append(fmt_row("2 token endpoint, code exchange + PKCE", results["2"],
                                results.get("2p"), args.workers))

        # 3: SSO login of a second agency with a hub session: authorize + token
        if "3" in wanted:
            print("scenario 3: SSO of a second agency ...", flush=True)
            verifier, challenge = pkce_pair()

            def sso_env(side, authz_path, token_path):
                q = urlencode({"response_type": "code", "client_id": AGENCY_TWO.client_id,
                               "redirect_uri": AGENCY_TWO.redirect_uri,
                               "scope": "openid profile email", "code_challenge": challenge,
                               "code_challenge_method": "S256"})
                return {"BENCH_MODE": "sso", "BENCH_COOKIE": side.cookie(),
                        "BENCH_AUTHZ": f"{authz_path}?{q}&state=s{{N}}&nonce=n{{N}}",
                        "BENCH_TOKEN": token_path, "BENCH_TOKEN_AUTH": auth_two,
                        "BENCH_TOKEN_BODY": (
                            "grant_type=authorization_code&code={CODE}&redirect_uri="
                            f"{quote(AGENCY_TWO.redirect_uri, safe='')}&code_verifier={verifier}")}
            results["3"], results["3p"] = both(
                sso_env(hub, "/authorize", "/token"),
                sso_env(peer, peer.path("authorization_endpoint"), peer_token) if peer
                else None)
            rows.append(fmt_row("3 SSO 2nd agency: logins/s (authorize+token)",
                                results["3"], results.get("3p"), args.workers,
                                note="latency per request"))

        # 4: userinfo and introspection
        if "4" in wanted:
            print("scenario 4: userinfo, introspection ...", flush=True)
            at = hub.exchange(*hub.code(AGENCY_ONE))["access_token"]
            pat = peer.exchange(*peer.code(OPAQUE), agency=OPAQUE)["access_token"] if peer \
                else ""
            results["4u"], results["4up"] = both(
                {"BENCH_MODE": "static", "BENCH_PATH": "/userinfo",
                 "BENCH_AUTH": f"Bearer {at}"},
                {"BENCH_MODE": "static", "BENCH_PATH": peer.path("userinfo_endpoint"),
                 "BENCH_AUTH": f"Bearer {pat}"} if peer else None)
            results["4i"], results["4ip"] = both({
                "BENCH_MODE": "static", "BENCH_METHOD": "POST", "BENCH_PATH": "/introspect",
                "BENCH_CTYPE": form, "BENCH_AUTH": auth_one, **INTROSPECTION_ENV,
                "BENCH_BODY": "token=" + quote(at, safe="")}, {
                "BENCH_MODE": "static", "BENCH_METHOD": "POST",
                "BENCH_PATH": peer.path("introspection_endpoint"), "BENCH_CTYPE": form,
                "BENCH_AUTH": basic(OPAQUE.client_id, OPAQUE.secret), **INTROSPECTION_ENV,
                "BENCH_BODY": "token=" + quote(pat, safe="")} if peer else None)
            rows.append(fmt_row("4a userinfo", results["4u"], results.get("4up"), args.workers,
                                note="peer: opaque access token"))
            rows.append(fmt_row("4b introspection", results["4i"], results.get("4ip"),
                                args.workers, note="peer: opaque access token"))

        if "5" in wanted:
            rows.append(fmt_row("5 token endpoint, refresh_token grant", results["5"],
                                results.get("5p"), args.workers, note=(
                                    f"grants refreshed in turn (minted->live after): hub "
                                    f"{results['5']['grants']}" + (
                                        f", peer {results['5p']['grants']}"
                                        if "5p" in results else ""))))

        # 6: consent decision API, single and batch
        if "6" in wanted:
            print(f"scenario 6: consent decisions (spread over {len(deciders)} agencies) ...",
                  flush=True)

            def subject_of(agency):
                tokens = hub.exchange(*hub.code(agency), agency=agency)
                return agency, requests.get(base + "/userinfo", timeout=10, headers={
                    "Authorization": f"Bearer {tokens['access_token']}"}).json()["sub"]

            with ThreadPoolExecutor(8) as ex:
                subjects = list(ex.map(subject_of, deciders))
            if loaded_sample:
                # the loaded citizens: many agencies, records of every shape, and as many
                # subjects that no agency knows (deny without a record)
                secrets_of = {a["client_id"]: a["client_secret"] for a in config["agencies"]
                              if "client_secret" in a}
                rng = random.Random(11)
                picked = rng.sample(loaded_sample, min(2000, len(loaded_sample)))
                subjects = [(TestAgency(cid, secrets_of[cid], "", cid), sub)
                            for cid, sub in picked]
                subjects += [(agency, secrets.token_urlsafe(32)) for agency, _ in
                             subjects[:len(subjects)]]
            claims = ["name", "given_name", "family_name", "email"]
            singles, batches = [], []
            for agency, sub in subjects:
                auth = basic(agency.client_id, agency.secret)
                one = {"subject": {"type": "user", "id": sub}, "action": {"name": "use"},
                       "resource": {"type": "claim", "id": "email"},
                       "context": {"purpose": "service-delivery"}}
                batch = {"subject": one["subject"], "action": one["action"],
                         "context": one["context"],
                         "evaluations": [{"resource": {"type": "claim", "id": c}}
                                         for c in claims * 5]}
                singles.append(f"{auth}\t{json.dumps(one)}")
                batches.append(f"{auth}\t{json.dumps(batch)}")
            agency, _ = subjects[0]
            for path, line in (("/access/v1/evaluation", singles[0]),
                               ("/access/v1/evaluations", batches[0])):
                auth, body = line.split("\t", 1)
                check = requests.post(base + path, data=body, timeout=10, headers={
                    "Authorization": auth, "Content-Type": "application/json"})
                print(f"  {path}: {check.status_code} {check.text[:90]}")
            env = {"BENCH_MODE": "cycle", "BENCH_METHOD": "POST",
                   "BENCH_CTYPE": "application/json"}

            def paced(requests_per_second: float) -> dict[str, str]:
                if not args.decision_rate:
                    return {}
                return {"BENCH_THREAD_RATE": f"{requests_per_second / args.threads:.3f}"}

            def repeated(run_env: dict[str, str]) -> dict:
                """The run with the median p99 of ``--repeat`` runs, every p99 noted."""
                runs = []
                for number in range(1, args.repeat + 1):
                    runs.append(runner.wrk(base, run_env))
                    if args.repeat > 1:  # in order, to set beside what else ran meanwhile
                        print(f"  run {number}/{args.repeat} ended {time.strftime('%H:%M:%S')}"
                              f": p99 {runs[-1]['p99_us'] / 1000:.1f} ms, hub cores "
                              f"{runs[-1].get('hub_cores_busy', 0):.2f}", flush=True)
                return median_run(runs, "p99_us")

            if "6a" in halves:
                results["6s"] = repeated(dict(
                    env, BENCH_PATH="/access/v1/evaluation",
                    BENCH_LIST=write_lists(workdir, "single", singles, args.threads),
                    **paced(args.decision_rate)))
            if "6b" in halves:
                results["6b"] = repeated(dict(
                    env, BENCH_PATH="/access/v1/evaluations",
                    BENCH_LIST=write_lists(workdir, "batch", batches, args.threads),
                    **paced(args.decision_rate / 20)))
            pace = (f"; paced at {args.decision_rate:g} requests/s (batches: "
                    f"{args.decision_rate / 20:g})" if args.decision_rate else "")
            if "6a" in halves:
                rows.append(fmt_row("6a consent decision, single", results["6s"], None,
                                    args.workers, note="no peer" + pace))
            if "6b" in halves:
                tail = results["6b"]
                rows.append(fmt_row("6b consent decisions, batch of 20: requests",
                                    results["6b"], None, args.workers, note=(
                                        f"p90 {tail['p90_us'] / 1000:.1f} ms, p99.9 "
                                        f"{tail['p999_us'] / 1000:.1f}, max "
                                        f"{tail['max_us'] / 1000:.1f}{pace}")))
                rows.append(fmt_row("6b   same, as decisions/s",
                                    {**results["6b"], "runs_note": ""}, None,
                                    args.workers, unit=20, note="req/s x 20"))

        workers_rss = rss_of_children(hub_proc.pid)
        print()
        print(f"Civitas hub: {args.workers} workers x {args.hub_threads} threads "
              f"({args.server}), "
              f"PostgreSQL + Redis, rate limits {args.rate_limits}; "
              f"wrk -t{args.threads} -c{args.connections}, "
              f"{args.duration:g}s per scenario; peer: oidc-provider (1 node process), ES256")
        print(f"{'scenario':<44} {'requests':>8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'peer r/s':>9} {'ratio':>6} {'per-core':>8} {'per-CPU':>7} {'hubCPU':>6} "
              f"{'peerCPU':>7}")
        for row in rows:
            print(row)
        print("(req/s counts successful responses only; 'per-core' = (hub req/s / workers) / "
              "peer req/s, the peer being one node process; 'per-CPU' = (hub req/s / hubCPU) / "
              "(peer req/s / peerCPU); hubCPU = cores the hub's processes kept busy, peerCPU "
              "the peer's, from /proc; PostgreSQL's and Redis's CPU is in neither)")
        if hung_citizens is not None:
            hung_citizens.stop()
            places = (args.hung_places if args.hung_places is not None
                      else max(1, args.hub_threads // 2))
            down_after = 5 if args.hung_down_after is None else args.hung_down_after
            print(f"hung upstream: {args.hung_upstream} citizens, {places} of "
                  f"{args.hub_threads} threads per worker for it, down after "
                  f"{down_after or 'never'} failures; the hub's answers to them: "
                  + ", ".join(f"{answer}: {n}"
                              for answer, n in sorted(hung_citizens.answers.items())))
        print()
        print(f"hub master pid {hub_proc.pid}: RSS {rss_of(hub_proc.pid):.1f} MB")
        for pid, mb in workers_rss:
            print(f"hub worker pid {pid}: RSS {mb:.1f} MB"
                  + ("" if mb < 120 else "  (over the 120 MB target)"))
        (workdir / "results.json").write_text(json.dumps(results, indent=1))
        if args.soak:
            soak(runner, args.soak, hub_proc.pid)
        if args.hold:
            hold(runner, workdir, hub_proc.pid)
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
