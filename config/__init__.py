"""Typed settings for Civitas: one YAML file plus environment overrides for secrets."""

from .loading import load_settings, settings_from_mapping
from .schema import AgencySettings, OIDCUpstreamSettings, Settings, UpstreamSettings

__all__ = [
    "AgencySettings",
    "OIDCUpstreamSettings",
    "Settings",
    "UpstreamSettings",
    "load_settings",
    "settings_from_mapping",
]
