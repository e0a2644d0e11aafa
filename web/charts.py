"""Inline SVG charts (no script, no image files): flagged and reviewed per day."""

from __future__ import annotations

from datetime import date

from markupsafe import Markup, escape


def daily_chart_svg(days: list[tuple[date, int, int]], width: int = 640, height: int = 180) -> Markup:
    """Two bars per day (flagged, reviewed), as an SVG element safe to put in a page."""
    if not days:
        return Markup("<p class='muted'>No flagged images or reviews in this period.</p>")
    top = max(max(f, r) for _, f, r in days) or 1
    slot = (width - 40) / len(days)
    bar = max(1.0, slot / 2 - 1)
    parts = [f"<svg role='img' aria-label='flagged and reviewed per day' viewBox='0 0 {width} {height + 30}' "
             f"class='chart' xmlns='http://www.w3.org/2000/svg'>",
             f"<text x='26' y='25' class='axis-label' text-anchor='end'>{top}</text>",
             f"<text x='26' y='{height + 5}' class='axis-label' text-anchor='end'>0</text>",
             f"<line x1='30' y1='{height}' x2='{width}' y2='{height}' class='axis'/>"]
    for index, (day, flagged, reviewed) in enumerate(days):
        x = 35 + index * slot
        for offset, value, kind in ((0.0, flagged, "flagged"), (bar, reviewed, "reviewed")):
            h = (height - 20) * value / top
            parts.append(f"<rect x='{x + offset:.1f}' y='{height - h:.1f}' width='{bar:.1f}' "
                         f"height='{h:.1f}' class='{kind}'><title>{escape(day.isoformat())}: "
                         f"{value} {kind}</title></rect>")
        if len(days) <= 10 or index % max(1, len(days) // 8) == 0:
            parts.append(f"<text x='{x:.1f}' y='{height + 20}' class='axis-label'>{day:%m-%d}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
