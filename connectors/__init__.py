"""Upstream connectors: one module per upstream kind, each behind one small protocol."""

from .base import (
    ConnectorError,
    PasswordConnector,
    PendingLogin,
    RedirectConnector,
    UpstreamBusy,
    UpstreamIdentity,
    UpstreamRejected,
    UpstreamResponseInvalid,
    UpstreamUnavailable,
)

__all__ = [
    "ConnectorError",
    "PasswordConnector",
    "PendingLogin",
    "RedirectConnector",
    "UpstreamBusy",
    "UpstreamIdentity",
    "UpstreamRejected",
    "UpstreamResponseInvalid",
    "UpstreamUnavailable",
]
