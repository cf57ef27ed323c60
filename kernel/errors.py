"""One exception root for the whole hub.

Each package derives its own subclass (``ConnectorError``, ``BrokerError``, ``IdpError``, ...).
Errors carry the HTTP status and a message that is safe to show to a person; the composition
root turns them into responses in one place.
"""

from __future__ import annotations


class CivitasError(Exception):
    """Root of every error the hub raises on purpose."""

    status_code: int = 500
    #: short, human sentence safe to show on an error page (no internals)
    public_message: str = "Something went wrong."
    #: seconds after which trying again makes sense, sent as ``Retry-After`` (RFC 9110
    #: 10.2.3) with a 503 or 429; None: no such header
    retry_after: int | None = None
    #: what exactly failed, for the operator's log only (never shown): which check refused
    #: an upstream's answer, say. Fixed words and names; never a token, secret or password
    detail: str | None = None

    def __init__(self, message: str | None = None, *, status_code: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message or self.public_message)
        if message is not None:
            self.public_message = message
        if status_code is not None:
            self.status_code = status_code
        if detail is not None:
            self.detail = detail


class ConfigError(CivitasError):
    """Invalid configuration; the message names the offending key."""

    status_code = 500
