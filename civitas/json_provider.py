"""Flask's JSON with :mod:`kernel.jsonfast`'s encoder and decoder.

The consent decision API, userinfo, introspection and the hub's JSON errors answer through
``jsonify``; a batch of twenty decisions spent 15% of its CPU in ``json.dumps`` (py-spy on
``bench/app_cpu.py --scenarios 6b``). Answers keep Flask's form out of debug mode: keys
sorted, no spaces. They differ from it only in that characters outside ASCII are sent as
UTF-8 rather than ``\\u`` escapes (the same JSON value, RFC 8259 section 8.1). Anything
else (indented output in debug mode, values orjson does not take, such as dates, which
Flask writes as HTTP dates) goes Flask's own way."""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

from kernel import jsonfast

_COMPACT = {"separators": (",", ":")}  # what Flask's response() asks for out of debug mode
_OPTIONS = jsonfast.STRICT | orjson.OPT_SORT_KEYS


class FastJSONProvider(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if not kwargs or kwargs == _COMPACT:
            try:
                return orjson.dumps(obj, option=_OPTIONS).decode()
            except TypeError:
                pass
        return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return jsonfast.loads(s) if not kwargs else super().loads(s, **kwargs)
