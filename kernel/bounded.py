"""Reading an HTTP answer's body within a size and a total time.

A socket's read timeout bounds each wait for more bytes, not the whole answer: a server
that sends one byte just before each timeout holds the reader for as long as it likes
(a "slow read" attack). :func:`read_bounded` takes what has arrived at each read
(urllib3's ``read1``) and checks the deadline between reads, so the body is given up at the
deadline plus at most one read timeout, whatever the server does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


def read_bounded(raw: Any, *, max_bytes: int, deadline: float,
                 clock: Callable[[], float] = time.monotonic,
                 decode_content: bool = True) -> bytes:
    """The body of ``raw`` (a streamed urllib3 response): :class:`BodyTooLarge` past
    ``max_bytes``, :class:`BodyTooSlow` if it is still arriving at ``deadline`` (on
    ``clock``)."""
    body = bytearray()
    while True:
        if clock() > deadline:
            raise BodyTooSlow()
        chunk = raw.read1(8192, decode_content=decode_content)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge()
