"""Whether each upstream answers, shared by every worker and host through the store.

A circuit breaker per upstream. Calls that fail to reach an upstream (it timed out, refused
the connection, answered with a 5xx: ``UpstreamUnavailable``) are counted; after
``failures`` of them in a row, within ``window`` seconds of the first, the upstream is
*down* for ``down_seconds``: a login through it is refused at once (:class:`UpstreamDown`,
503 with ``Retry-After``) instead of holding a thread until its own call times out, and the
sign-in page says it is not answering. When that time is up one login, the *probe*, is let
through (the others are still refused while it is out) and calls the upstream at once (an
OIDC upstream's discovery document, fetched afresh; a directory's bind); if that call fails
the upstream is down again, if it answers (or any call in flight before does) it is back.

Only calls that the hub made and that did not reach the upstream count as failures. An
answer that fails a check, a refused password and a forged callback do not: whoever can send
the hub a callback cannot take an upstream down. A callback is never refused here: the
citizen's login started before the upstream went down, and its answer may well arrive.

Store keys (``upstream:<id>:``): ``failures`` (a counter), ``down`` (present while down),
``tripped`` (present from going down until a call answers: after ``down`` expires, the
upstream is on probation), ``probe`` (the login trying it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from connectors import UpstreamUnavailable
from kernel.metrics import UPSTREAM_DOWN
from kernel.store import ShortLivedStore

log = logging.getLogger("civitas.broker")

#: failures count in a window of this many seconds from the first since the last answer
WINDOW_SECONDS = 60
#: how long the upstream stays on probation after going down, unless a call answers first
TRIPPED_SECONDS = 3600


class UpstreamDown(UpstreamUnavailable):
    """The upstream failed the last calls made to it; refused without calling it."""

    status_code = 503


@dataclass(frozen=True)
class HealthPolicy:
    #: failures in a row that take the upstream down; 0: never
    failures: int = 5
    down_seconds: int = 30
    #: how long the probe login may take before another login may try: the longest a
    #: login's calls to the upstream may take (its timeout, a retried GET, a margin)
    probe_seconds: int = 30


class UpstreamHealth:
    def __init__(self, store: ShortLivedStore, policies: Mapping[str, HealthPolicy]) -> None:
        self._store = store
        self._policies = dict(policies)

    @staticmethod
    def _key(upstream_id: str, part: str) -> str:
        return f"upstream:{upstream_id}:{part}"

    def _policy(self, upstream_id: str) -> HealthPolicy | None:
        policy = self._policies.get(upstream_id)
        return policy if policy is not None and policy.failures > 0 else None

    def down(self, upstream_ids: Iterable[str]) -> set[str]:
        """Those of ``upstream_ids`` that are down now (one store round trip)."""
        watched = [u for u in upstream_ids if self._policy(u) is not None]
        if not watched:
            return set()
        marks = self._store.get_many([self._key(u, "down") for u in watched])
        return {u for u, mark in zip(watched, marks, strict=True) if mark is not None}

    def refuse_if_down(self, upstream_id: str, display_name: str) -> None:
        """Before showing a form for the upstream: refuse while it is down."""
        if self.down([upstream_id]):
            raise self._refusal(upstream_id, display_name)

    def admit(self, upstream_id: str, display_name: str) -> bool:
        """Before a login calls the upstream: refuse while it is down; while on probation let
        one login through at a time, and return True to it (the probe: it should call the
        upstream now, so that the answer, or its absence, settles whether it is back)."""
        policy = self._policy(upstream_id)
        if policy is None:
            return False
        down, tripped = self._store.get_many([self._key(upstream_id, "down"),
                                              self._key(upstream_id, "tripped")])
        if down is not None:
            raise self._refusal(upstream_id, display_name)
        if tripped is None:
            return False
        if not self._store.put_new(self._key(upstream_id, "probe"), {"at": int(time.time())},
                                  policy.probe_seconds):
            raise self._refusal(upstream_id, display_name)
        return True

    def failed(self, upstream_id: str) -> None:
        """A call did not reach the upstream."""
        policy = self._policy(upstream_id)
        if policy is None:
            return
        failures = self._store.incr(self._key(upstream_id, "failures"), WINDOW_SECONDS)
        on_probation = self._store.get(self._key(upstream_id, "tripped")) is not None
        if failures < policy.failures and not on_probation:
            return
        mark = {"at": int(time.time()), "failures": failures}
        self._store.put_many([(self._key(upstream_id, "down"), mark, policy.down_seconds),
                              (self._key(upstream_id, "tripped"), mark, TRIPPED_SECONDS)])
        self._store.delete(self._key(upstream_id, "probe"))
        UPSTREAM_DOWN.labels(upstream_id).inc()
        log.warning("upstream %s is down: %s; logins through it are refused for %d s, then "
                    "one login tries it", upstream_id,
                    "the login trying it failed too" if on_probation
                    else f"{failures} call{'s' if failures != 1 else ''} in a row failed",
                    policy.down_seconds)

    def answered(self, upstream_id: str) -> None:
        """A call reached the upstream and it answered: it is not down."""
        if self._policy(upstream_id) is None:
            return
        # one round trip: the mark that it had been down, and the rest of its state
        if self._store.take(self._key(upstream_id, "tripped"),
                            *(self._key(upstream_id, part)
                              for part in ("failures", "down", "probe"))) is not None:
            log.warning("upstream %s answers again; logins through it are let through",
                        upstream_id)

    def _refusal(self, upstream_id: str, display_name: str) -> UpstreamDown:
        policy = self._policies[upstream_id]
        error = UpstreamDown(
            f"{display_name} is not answering right now. Please try again in a minute, or "
            "choose another way to sign in.", detail=f"upstream {upstream_id} is down")
        error.retry_after = policy.down_seconds
        return error
