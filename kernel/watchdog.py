"""Deadlines for blocking exchanges, kept by one thread per process.

An exchange that blocks in a read (an LDAP directory that answers a byte at a time) is
bounded by arming an alarm that cuts it (shuts its socket) at the deadline, and disarming it
when the exchange is done. ``threading.Timer`` would start a thread per exchange (about
0.1 ms, and a thread to spare under load); here one daemon thread holds every armed alarm
in a heap and sleeps until the nearest.

:meth:`Alarm.disarm` is exact: once it returns, the action has either run to its end
(disarm says True: the caller must treat the exchange as cut) or will never run (False).
So a connection whose alarm was disarmed in time can be handed to the next user with no
cut still on its way.

After a fork (gunicorn's workers), the child has no copy of the parent's thread: its first
alarm starts a thread of its own, and the parent's alarms are not the child's to fire.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PENDING, _FIRING, _FIRED, _DISARMED = range(4)


class Alarm:
    """One armed deadline; see :meth:`Watchdog.arm`."""

    __slots__ = ("_action", "_done", "_state", "_watchdog", "at")

    def __init__(self, watchdog: Watchdog, at: float, action: Callable[[], None]) -> None:
        self._watchdog = watchdog
        self.at = at
        self._action = action
        self._state = _PENDING
        self._done = threading.Event()

    def disarm(self) -> bool:
        """Stop the alarm; True if its action ran (or is running: then wait for its end),
        False if it never will."""
        with self._watchdog._lock:
            if self._state == _PENDING:
                self._state = _DISARMED
                return False
            if self._state == _DISARMED:
                return False
        self._done.wait()
        return True

    @property
    def fired(self) -> bool:
        return self._state in (_FIRING, _FIRED)


class Watchdog:
    """Runs each armed action at its deadline, in one daemon thread, unless disarmed first.
    An action must be short; one that raises is logged, and the others still run."""

    def __init__(self, name: str = "civitas-watchdog",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._clock = clock
        self._order = itertools.count()
        self._reset()
        # a child forked while another thread held the lock would inherit it held for ever
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A fresh lock, no alarm and no thread: at start, and in a forked child (whose
        parent's thread is not there, and whose parent's alarms are not its own)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Alarm]] = []
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], None]) -> Alarm:
        """An alarm that runs ``action`` in ``seconds`` unless disarmed before."""
        alarm = Alarm(self, self._clock() + seconds, action)
        with self._lock:
            heapq.heappush(self._heap, (alarm.at, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name,
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:  # sooner than the one it sleeps for
                self._wake.notify()
        return alarm

    def pending(self) -> int:
        """Alarms armed and neither fired nor disarmed (for tests and metrics)."""
        with self._lock:
            return sum(1 for _, _, alarm in self._heap if alarm._state == _PENDING)

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._heap and self._heap[0][2]._state == _DISARMED:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._wake.wait()
                        continue
                    wait = self._heap[0][0] - self._clock()
                    if wait <= 0:
                        alarm = heapq.heappop(self._heap)[2]
                        alarm._state = _FIRING
                        break
                    self._wake.wait(wait)
            try:
                alarm._action()
            except Exception:  # an action's failure must not stop the others
                log.exception("watchdog: an alarm's action failed")
            finally:
                with self._lock:
                    alarm._state = _FIRED
                alarm._done.set()


#: the process's watchdog (its thread starts with the first alarm)
WATCHDOG = Watchdog()
