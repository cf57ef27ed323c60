"""The files of prometheus-client's multiprocess mode, their pages allocated before use.

With ``PROMETHEUS_MULTIPROC_DIR`` set, each worker keeps its metric values in files it maps
into memory (``prometheus_client.mmap_dict.MmapedDict``), which the library only sizes: a
sparse file. On a full file system (the container's ``/tmp`` is a tmpfs) the worker's first
write to a page not yet backed by the disk is answered by SIGBUS, which kills it, and every
worker started in its place, so the hub answered no request until room was made.

:class:`AllocatedMmapedDict` allocates the file's blocks (``posix_fallocate``) before the
library maps them, when a file is made and when it grows. Where that fails for want of
room, the process keeps that file's values in memory from then on (missing from
``/metrics``, said once in the log) and serves on.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from typing import Any

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict

try:  # the layout of prometheus-client's files, as 0.20 to 0.26 write them
    from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, _pack_integer
except ImportError:  # another layout: its files are left to the library (install() below)
    _INITIAL_MMAP_SIZE, _pack_integer = 0, None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class AllocatedMmapedDict(MmapedDict):
    """``MmapedDict`` whose mapped pages are always backed by the disk (or by memory)."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if read_mode:
            super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]
            return
        try:
            with open(filename, "a+b") as file:
                size = os.fstat(file.fileno()).st_size or _INITIAL_MMAP_SIZE
                os.posix_fallocate(file.fileno(), 0, size)
        except OSError as exc:
            with contextlib.suppress(OSError):  # an empty file would break /metrics
                if os.stat(filename).st_size == 0:
                    os.unlink(filename)
            self._f: Any = None
            self._fname = filename
            self._capacity = _INITIAL_MMAP_SIZE
            self._m: Any = mmap.mmap(-1, self._capacity)
            self._positions: dict[str, int] = {}
            self._used = 8
            _pack_integer(self._m, 0, self._used)  # type: ignore[no-untyped-call]
            _in_memory(filename, exc)
            return
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        # the size of the entry that MmapedDict._init_value appends (see its layout)
        encoded = len(key.encode("utf-8"))
        entry = 4 + encoded + (8 - (encoded + 4) % 8) + 16
        capacity = self._capacity
        while self._used + entry > capacity:
            capacity *= 2
        if capacity > self._capacity:
            self._grow(capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]

    def _grow(self, capacity: int) -> None:
        if self._f is not None:
            try:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
                return  # the library truncates and maps it
            except OSError as exc:
                _in_memory(self._fname, exc)
                self._f.close()
                self._f = None
        grown = mmap.mmap(-1, capacity)
        grown[:self._used] = self._m[:self._used]
        self._m.close()
        self._m, self._capacity = grown, capacity

    def close(self) -> None:
        if self._f is None and self._m is not None:
            self._m.close()
            self._m = None
            return
        super().close()  # type: ignore[no-untyped-call]


def _in_memory(filename: str, exc: OSError) -> None:
    log.error("metrics of process %d kept in memory only, missing from /metrics: cannot "
              "allocate %s: %s", os.getpid(), filename, exc.strerror or exc)


def install() -> None:
    """Make the multiprocess values use :class:`AllocatedMmapedDict` (before any is made:
    a value opens its file when it is made, and again after a fork). Not where the system
    has no ``posix_fallocate``, nor with a prometheus-client whose files are laid out
    otherwise than this class knows."""
    if (hasattr(os, "posix_fallocate") and _pack_integer is not None
            and getattr(values, "MmapedDict", None) is MmapedDict
            and hasattr(MmapedDict, "_init_value")):
        values.MmapedDict = AllocatedMmapedDict  # type: ignore[attr-defined]
