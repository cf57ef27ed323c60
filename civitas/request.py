"""The hub's Flask request: the body of a URL-encoded form read without Werkzeug's layers.

Every call of the token, introspection and revocation endpoints is such a form (RFC 6749
3.2, RFC 7662 2.1, RFC 7009 2.1). Werkzeug reads it through ``get_input_stream``, a
``LimitedStream``, a ``FormDataParser`` and the content type's parameters before the one
``parse_qsl`` that does the work: 12% of a client_credentials request's CPU in a profile;
reading it directly gave 5-7% more of every token endpoint call per CPU-second
(bench/README.md, fifteenth session). This request does the same reading and the same
parsing directly when the request is the plain case, and hands every other case to
Werkzeug: a content type with parameters or of another kind, no or an unusual
Content-Length, chunked transfer, a body over ``max_content_length``
(tests/test_request_forms.py holds both to the same answers).
"""

from __future__ import annotations

import io
from urllib.parse import parse_qsl

from flask import Request
from werkzeug.exceptions import ClientDisconnected

_FORM = "application/x-www-form-urlencoded"


class HubRequest(Request):
    def _load_form_data(self) -> None:
        if "form" in self.__dict__:
            return
        environ = self.environ
        length = environ.get("CONTENT_LENGTH")
        if (environ.get("CONTENT_TYPE") != _FORM or not length or not length.isascii()
                or not length.isdigit() or "HTTP_TRANSFER_ENCODING" in environ):
            super()._load_form_data()
            return
        size = int(length)
        limit = self.max_content_length
        if limit is not None and size > limit:
            super()._load_form_data()  # Werkzeug's 413
            return
        body = environ["wsgi.input"].read(size)
        if len(body) < size and "wsgi.input_terminated" not in environ:
            raise ClientDisconnected()  # as Werkzeug's LimitedStream
        try:
            # Werkzeug's own call (formparser._parse_urlencoded), and like its parser
            # silent on a body that is not UTF-8: an empty form
            items = parse_qsl(body.decode(), keep_blank_values=True,
                              errors="werkzeug.url_quote")
        except ValueError:
            items = []
        storage = self.parameter_storage_class
        self.__dict__.update(stream=io.BytesIO(), form=storage(items), files=storage())
