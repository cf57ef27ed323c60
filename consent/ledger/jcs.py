"""JSON Canonicalization Scheme (RFC 8785).

``canonicalize(value)`` returns the one byte string RFC 8785 assigns to a JSON value:
object members sorted by the UTF-16 code units of their names (3.2.3), no whitespace,
strings escaped as ECMAScript's ``JSON.stringify`` does (3.2.2.2), numbers in ECMAScript's
shortest round-trip form (3.2.2.3, ECMA-262 7.1.12.1), UTF-8 output (3.2.4).

The input is the Python image of JSON: ``dict`` with ``str`` keys, ``list``/``tuple``, ``str``,
``int``, ``float``, ``bool`` and ``None``. Following I-JSON (RFC 7493), which RFC 8785 builds
on, integers outside +-(2**53 - 1) are refused rather than silently rounded to a double, and
so are NaN, infinities and strings that are not valid Unicode (lone surrogates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: the largest integer a double holds exactly (I-JSON, RFC 7493 section 2.2)
MAX_SAFE_INTEGER = 2**53 - 1


class CanonicalizationError(ValueError):
    """The value has no RFC 8785 form (not JSON, or outside I-JSON)."""


# json's C encoder escapes exactly what JSON.stringify escapes when ensure_ascii is off:
# '"', '\\', \b \f \n \r \t, and the other controls below U+0020 as lowercase \u00xx.
_encode_string = json.JSONEncoder(ensure_ascii=False).encode


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value``."""
    parts: list[str] = []
    _write(value, parts)
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalizationError("string holds a lone surrogate (not valid Unicode)") from exc


def canonical_strings(values: Sequence[str | None]) -> bytes:
    """``canonicalize(list(values))`` for an array of strings and nulls only, without its
    walk over the value: a hot path's (a decision's subject commitment) at a tenth of the
    cost. The same bytes (tests/test_ledger.py holds them equal for any such array)."""
    try:
        return ("[" + ",".join("null" if value is None else _encode_string(value)
                               for value in values) + "]").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalizationError("string holds a lone surrogate (not valid Unicode)") from exc


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_encode_string(value))
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise CanonicalizationError(f"integer {value} is outside I-JSON's exact range")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(format_number(value))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalizationError(f"object member name {key!r} is not a string")
        out.append("{")
        first = True
        for key in sorted(value, key=_utf16_key):
            if not first:
                out.append(",")
            first = False
            out.append(_encode_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise CanonicalizationError(f"{type(value).__name__} is not a JSON value")


def _utf16_key(name: str) -> bytes:
    """Sort key: the name's UTF-16 code units (RFC 8785 3.2.3); big-endian bytes compare
    in code-unit order. Lone surrogates are caught when the output is encoded."""
    return name.encode("utf-16-be", "surrogatepass")


def format_number(x: float) -> str:
    """ECMAScript Number::toString (ECMA-262 7.1.12.1) as RFC 8785 3.2.2.3 requires.

    Python's ``repr`` yields the shortest digit string that round-trips (closest to the
    value when several do), which is the digit string the ECMAScript algorithm asks for;
    only the layout differs.
    """
    if math.isnan(x) or math.isinf(x):
        raise CanonicalizationError(f"{x} is not a JSON number")
    if x == 0:
        return "0"  # also -0
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    # value = 0.d1d2...dk x 10**n  (ECMA-262's k and n)
    if whole == "0":
        n = -(len(frac) - len(frac.lstrip("0")))
    else:
        n = len(whole)
    n += int(exp) if exp else 0
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        fraction = "." + digits[1:] if k > 1 else ""
        text = f"{digits[0]}{fraction}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text
