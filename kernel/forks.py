"""Forks noticed without asking: a counter that ``os.register_at_fork`` raises in every
forked child that runs Python.

Connection holders (kernel/store.py, kernel/db.py) must not use their parent's sockets
after a fork. Asking ``os.getpid()`` at every use is a system call each time (redis-py's
pool asked twice per command: about 4% of a worker's time under SSO logins, bench/README.md,
thirteenth session); comparing this counter with the one seen last costs nothing."""

from __future__ import annotations

import os

_count = 0


def _forked() -> None:
    global _count
    _count += 1


os.register_at_fork(after_in_child=_forked)


def count() -> int:
    """Forks of this process's ancestry so far (0 in the first process)."""
    return _count
