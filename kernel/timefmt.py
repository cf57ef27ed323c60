"""Times on the pages people read, in the time zone the hub's operator chose.

Stored times are UTC. A citizen reads them in the zone of the jurisdiction the hub serves
(``display_timezone`` in the settings, an IANA name such as ``Europe/Tallinn``), with the
zone's abbreviation beside them, so that "10:30 EET" cannot be taken for another zone's. The
zone is read from the app's config at render time (``DISPLAY_TIMEZONE``; UTC when unset), so
any blueprint's templates can use the filter however the app was put together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from flask import current_app

#: the app's config key naming the zone
CONFIG_KEY = "DISPLAY_TIMEZONE"


@lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def local_time(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M %Z") -> str:
    """``value`` (aware, or naive UTC as the database gives it) in the display zone."""
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(_zone(current_app.config.get(CONFIG_KEY) or "UTC")).strftime(fmt)
