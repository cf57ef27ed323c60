"""Activity per agency over time for privacy officers: grants, withdrawals and decisions per
day, counted in SQL and drawn as plain server-side SVG (no script, no external library)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html import escape

from sqlalchemy import func, select

from kernel.db import Database

from .models import AgencyDecision, ConsentEvent, ConsentRecord

SERIES = (("granted", "#1a4480"), ("withdrawn", "#b50909"), ("decisions", "#5c5c5c"))


@dataclass(frozen=True)
class DailyActivity:
    day: date
    granted: int
    withdrawn: int
    decisions: int


def _day(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def activity(db: Database, client_id: str, *, days: int = 30,
             now: datetime | None = None) -> list[DailyActivity]:
    """One row per day (oldest first) for the last ``days`` days."""
    end = (now or datetime.now(UTC)).date()
    start = end - timedelta(days=days - 1)
    since = datetime.combine(start, datetime.min.time(), UTC)
    counts: dict[date, dict[str, int]] = {
        start + timedelta(n): {"granted": 0, "withdrawn": 0, "decisions": 0}
        for n in range(days)}
    with db.session() as s:
        events = s.execute(
            select(func.date(ConsentEvent.at), ConsentEvent.kind, func.count())
            .join(ConsentRecord, ConsentRecord.id == ConsentEvent.record_id)
            .where(ConsentRecord.client_id == client_id, ConsentEvent.at >= since)
            .group_by(func.date(ConsentEvent.at), ConsentEvent.kind))
        for day, kind, n in events:
            series = {"given": "granted", "renewed": "granted", "withdrawn": "withdrawn"}
            if kind in series and _day(day) in counts:
                counts[_day(day)][series[kind]] += int(n)
        decisions = s.execute(
            select(func.date(AgencyDecision.at), func.count())
            .where(AgencyDecision.client_id == client_id, AgencyDecision.at >= since)
            .group_by(func.date(AgencyDecision.at)))
        for day, n in decisions:
            if _day(day) in counts:
                counts[_day(day)]["decisions"] += int(n)
    return [DailyActivity(day=d, **c) for d, c in sorted(counts.items())]


def svg_chart(rows: list[DailyActivity], *, title: str, width: int = 640,
              height: int = 200, chart_id: str = "chart") -> str:
    """Grouped bars per day; an accessible SVG with a title and a text alternative.
    ``chart_id`` names the title's element: one per chart on a page (an id twice would give
    every chart the first one's name). It scales down to a narrow screen (``viewBox``)."""
    pad, axis = 30, 20
    peak = max((max(r.granted, r.withdrawn, r.decisions) for r in rows), default=0) or 1
    slot = (width - pad) / max(len(rows), 1)
    bar = max(slot / 4, 1)
    title_id = f"{chart_id}-title"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="max-width: 100%; height: auto" '
             f'role="img" aria-labelledby="{title_id}"><title id="{title_id}">'
             f'{escape(title)}</title>',
             f'<text x="0" y="12" font-size="11">{peak}</text>',
             f'<line x1="{pad}" y1="{height - axis}" x2="{width}" y2="{height - axis}" '
             'stroke="#999"/>']
    usable = height - axis - 16
    for i, row in enumerate(rows):
        x0 = pad + i * slot
        for j, (name, colour) in enumerate(SERIES):
            value = getattr(row, name)
            h = usable * value / peak
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{height - axis - h:.1f}" '
                         f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                         f'<title>{row.day}: {value} {name}</title></rect>')
        if i % 7 == 0:
            parts.append(f'<text x="{x0:.1f}" y="{height - 5}" font-size="10">'
                         f'{row.day.strftime("%m-%d")}</text>')
    parts.append("</svg>")
    return "".join(parts)
