"""Cron expressions read in an IANA time zone: validation and tick times.

Parsing and evaluation are cronsim's (5 fields, or 6 with a leading seconds field; Debian
cron's rules for day-of-month/day-of-week and for DST gaps and repeats); zones are the
standard library's zoneinfo. Schedules are validated in taskproc and ticked in
dataplatform, so both use this module.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

MAX_CRON_CHARS = 200
MAX_ZONE_CHARS = 64


def zone(name: str) -> ZoneInfo:
    """The zone `name` ("" is UTC). Raises ValueError for an unknown or malformed name."""
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown IANA time zone {name[:MAX_ZONE_CHARS]!r}") from exc


def problems(expr: str, zone_name: str) -> list[tuple[str, str]]:
    """(field, description) for each thing wrong with a cron and its zone, for the request
    fields `cron` and `time_zone`; empty when both are usable."""
    out: list[tuple[str, str]] = []
    if not expr.strip():
        out.append(("cron", "must not be empty"))
    elif len(expr) > MAX_CRON_CHARS:
        out.append(("cron", f"must be at most {MAX_CRON_CHARS} characters"))
    else:
        try:
            CronSim(expr, datetime.now(UTC))
        except CronSimError as exc:
            out.append(("cron", f"not a valid cron expression: {exc}"))
    if len(zone_name) > MAX_ZONE_CHARS:
        out.append(("time_zone", f"must be at most {MAX_ZONE_CHARS} characters"))
    else:
        try:
            zone(zone_name)
        except ValueError as exc:
            out.append(("time_zone", str(exc)))
    return out


def next_after(expr: str, zone_name: str, after: datetime) -> datetime:
    """The first tick strictly after `after`, in UTC."""
    return next(CronSim(expr, after.astimezone(zone(zone_name)))).astimezone(UTC)


def due(
    expr: str, zone_name: str, first: datetime, now: datetime, limit: int
) -> tuple[list[datetime], bool]:
    """The latest `limit` ticks from `first` (itself a tick) to `now` inclusive, oldest
    first, and whether older ones were left out."""
    if first > now:
        return [], False
    # Ticks fall on whole seconds, so "<= now" is "< now's second + 1" (cronsim's reverse
    # iteration yields times strictly before its start).
    start = now.replace(microsecond=0) + timedelta(seconds=1)
    latest: list[datetime] = []
    for tick in CronSim(expr, start.astimezone(zone(zone_name)), reverse=True):
        tick = tick.astimezone(UTC)
        if tick < first:
            return latest[::-1], False
        if len(latest) == limit:
            return latest[::-1], True
        latest.append(tick)
    return latest[::-1], False
