"""JSON on the hot paths: orjson where it gives the standard library's answer, the standard
library wherever orjson refuses.

orjson (a compiled, widely used library) encodes a small record in 0.2 µs against 2.2-2.9 µs
for ``json.dumps``, and decodes one in 0.5 µs against 1.9 µs; a login encodes and decodes
about twenty (short-lived records, JWT claims, consent states, attribute values, the token
response).

It is stricter than ``json``: it refuses strings with a lone surrogate (which JSON from an
upstream can carry as an escape, ``"\\ud800"``), integers beyond 64 bits (to write) and keys
that are not strings. Whatever it refuses goes to ``json`` instead, which answers as it
always did, value or error. It reads an integer beyond 64 bits as a float, silently: text
that may hold one (a run of 19 digits) is read by ``json`` (:func:`loads`). Values of the
kinds ``json`` refuses (datetimes, dataclasses) are refused here too rather than encoded,
and subclasses of ``str``, ``int``, ``dict`` and ``list`` are
left to ``json``. Text that orjson writes differs from ``json.dumps``'s only in spelling, not
in value: no spaces after separators, characters outside ASCII as UTF-8 rather than ``\\u``
escapes (RFC 8259 sections 7 and 8.1), and floats in their shortest form. (One value
differs: a float NaN or infinity, which ``json`` writes as the non-JSON ``NaN``, orjson writes
as ``null``; the hub stores no such number.)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

_SURROGATE = re.compile("[\ud800-\udfff]")

#: what ``json`` would refuse, orjson must not encode (it hands them to ``default``, None:
#: TypeError); subclasses go to ``json``, which encodes them its own way
STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
           | orjson.OPT_PASSTHROUGH_SUBCLASS)


def dumpb(value: Any) -> bytes:
    """``value`` as JSON, UTF-8 encoded (``json.dumps(value).encode()`` in value)."""
    try:
        return orjson.dumps(value, option=STRICT)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value).encode()


def dumps(value: Any) -> str:
    """``value`` as JSON text (``json.dumps(value)`` in value)."""
    return dumpb(value).decode()


#: each byte to b"0" if it is an ASCII digit, else to b" "
_DIGITS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
#: the fewest digits an integer beyond 64 bits is written with (2**63 has 19)
_LONG_RUN = b"0" * 19


def _may_hold_a_long_integer(text: str | bytes) -> bool:
    """Whether ``text`` has a run of 19 ASCII digits, which every integer orjson would
    read as a float has (a string may have one too: then ``json`` reads it, no harm).
    0.5 µs for a 400-byte record, where a regular expression took 3.2."""
    if len(text) < len(_LONG_RUN):
        return False
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    return _LONG_RUN in raw.translate(_DIGITS)


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``; JSON nested too deeply for it (orjson refuses beyond 1024
    levels; ``json`` then runs out of stack, RecursionError) is a ValueError like any other
    text it cannot read, so callers that expect "not JSON" to be one (Flask's
    ``get_json(silent=True)``) answer it as such rather than fail.

    orjson reads an integer beyond 64 bits (above 2**64 - 1, below -2**63) as a float, so
    123456789012345678901 came back as 1.2345678901234568e+20: an upstream's claim, stored
    exactly, altered on its way back out. Text that may hold one goes to ``json``."""
    if _may_hold_a_long_integer(text):
        return _standard(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # a ValueError, as json's is
        return _standard(text)


def _standard(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where a decoded JSON value holds a lone surrogate (``"\\ud800"`` is valid JSON, but
    its string is not Unicode text: no database column or RFC 8785 form takes it), as a
    path like ``redirect_uris[0]`` or ``(a key in) jwks.keys[0]``; None when nowhere. For a
    request body, to refuse it with a clear answer before it goes anywhere."""
    if isinstance(value, str):
        if value.isascii() or _SURROGATE.search(value) is None:
            return None
        return path or "(the value)"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return f"(a key in) {path or 'the object'}"
            found = lone_surrogate_at(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


#: the largest integer a double holds exactly (I-JSON, RFC 7493 section 2.2)
MAX_SAFE_INTEGER = 2**53 - 1


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value has arrays or objects more than ``limit`` levels deep
    (``[]`` is one level). Without recursion: what orjson reads (up to 1024 levels) is
    deeper than what a recursive walk over it, ``json.dumps`` or Flask's ``jsonify`` can
    take (RecursionError), so a request body is measured with this before anything walks
    it."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def number_outside_i_json_at(value: Any, path: str = "", *, integers: bool = True
                             ) -> tuple[str, str] | None:
    """Where a decoded JSON value holds a number I-JSON (RFC 7493 2.2) does not allow, and
    why, as (a path like ``jwks.keys[0].e``, the reason); None when nowhere (the first in
    document order, found without recursion). A float NaN or infinity is no JSON at all
    (RFC 8259 section 6; ``json`` reads ``NaN``, ``Infinity`` and ``1e400`` as one); with
    ``integers``, so is an integer beyond +-(2**53 - 1), which a double (every JavaScript
    reader, the audit ledger's RFC 8785 form) cannot hold exactly."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return (where or "(the value)",
                        "is not a finite number (NaN, an infinity or beyond a double's range)")
        elif isinstance(item, int) and not isinstance(item, bool):
            if integers and not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                return (where or "(the value)",
                        "holds an integer outside I-JSON's exact range (RFC 7493 2.2: at "
                        "most 2**53 - 1 in magnitude)")
        elif isinstance(item, dict):
            stack.extend((member, f"{where}.{key}" if where else str(key))
                         for key, member in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((member, f"{where}[{index}]")
                         for index, member in reversed(list(enumerate(item))))
    return None


def repeated_name(text: str | bytes) -> str | None:
    """The first member name an object of the JSON ``text`` repeats, or None (I-JSON, RFC
    7493 section 2.3: names MUST be unique; ``json`` and orjson keep the last value and say
    nothing). For input read once and not on a hot path (it parses with ``json``); call it
    on text already known to be JSON, not nested too deeply."""
    found: list[str] = []

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for name, _ in members:
            if name in seen and not found:
                found.append(name)
            seen.add(name)
        return dict(members)

    json.loads(text, object_pairs_hook=pairs)
    return found[0] if found else None


class RepeatedName(ValueError):
    """JSON text whose object repeats a member name (I-JSON, RFC 7493 section 2.3)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"it repeats the member name {name!r} (RFC 7493 section 2.3)")
        self.name = name


def members_in(value: Any) -> int:
    """How many members the objects of a decoded JSON value hold, nested ones included
    (without recursion)."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def loads_unique(text: bytes) -> Any:
    """:func:`loads`, refusing text that repeats a member name of an object
    (:class:`RepeatedName`, a ValueError), for a hot path. Each member of the text has its
    own name separator, a ``:`` outside any string; one that repeats a name is lost in the
    decoded value. So when the text has no more colons than the value has members, no name
    was repeated, and only text with colons in its strings (or a repeated name) pays for
    :func:`repeated_name`'s exact parse: a few µs against its 10-60."""
    value = loads(text)
    if text.count(b":") != members_in(value):
        try:
            name = repeated_name(text)
        except RecursionError:  # read by orjson, but deeper than json's stack
            raise ValueError("JSON nested too deeply") from None
        if name is not None:
            raise RepeatedName(name)
    return value
