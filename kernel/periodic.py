"""A job run every ``interval`` seconds in a daemon thread of this process (the ledger
sealer, housekeeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class PeriodicThread:
    """Calls ``job`` every ``interval`` seconds, first after one interval, until stopped.
    The job handles its own failures: one that raises ends the thread."""

    def __init__(self, name: str, interval: float, job: Callable[[], object]) -> None:
        if interval <= 0:
            raise ValueError(f"the {name} interval must be positive")
        self.name = name
        self.interval = interval
        self._job = job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread, waiting up to ``timeout`` for it. Safe from the thread itself:
        the app's finalizer calls this, and a garbage collection run by the job may run it
        there."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._job()
