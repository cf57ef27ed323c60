"""Typed settings for Civitas: one YAML file plus environment overrides for secrets."""

from .schema import AgencySettings, OIDCUpstreamSettings, Settings, UpstreamSettings
from .loading import load_settings, settings_from_mapping

__all__ = [
    "AgencySettings",
    "OIDCUpstreamSettings",
    "Settings",
    "UpstreamSettings",
    "load_settings",
    "settings_from_mapping",
]
