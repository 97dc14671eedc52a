"""aiwfe.runtime.cron: cron expressions in an IANA zone, as schedules tick them (DST gaps
and repeats, catch-up windows, validation messages)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aiwfe.runtime import cron


def _forward(expr: str, zone: str, first: datetime, now: datetime) -> list[datetime]:
    out = [first]
    while (t := cron.next_after(expr, zone, out[-1])) <= now:
        out.append(t)
    return out


def test_a_daily_tick_in_the_spring_gap_runs_right_after_it() -> None:
    """02:30 Paris does not exist on 29 March 2026: the tick is 03:00 CEST (01:00 UTC), and
    the next day's is 02:30 CEST again."""
    first = cron.next_after("30 2 * * *", "Europe/Paris", datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert first == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert cron.next_after("30 2 * * *", "Europe/Paris", first) == datetime(
        2026, 3, 30, 0, 30, tzinfo=UTC
    )


def test_a_daily_tick_in_the_autumn_repeat_runs_once() -> None:
    """02:30 Paris happens twice on 25 October 2026; the daily tick runs at the first."""
    ticks, _ = cron.due(
        "30 2 * * *",
        "Europe/Paris",
        datetime(2026, 10, 24, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 12, tzinfo=UTC),
        10,
    )
    assert ticks == [
        datetime(2026, 10, 24, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]


@pytest.mark.parametrize("expr", ["30 2 * * *", "*/20 * * * *", "0 */3 * * 1-5", "15 1,2,3 * * *"])
@pytest.mark.parametrize(
    "start", [datetime(2026, 3, 27, tzinfo=UTC), datetime(2026, 10, 23, tzinfo=UTC)]
)
def test_due_lists_the_ticks_forward_iteration_finds(expr: str, start: datetime) -> None:
    """Across both DST changes, `due` (which walks back from now) lists exactly the ticks
    that walking forward from the first one finds, and caps them at the latest `limit`."""
    first = cron.next_after(expr, "Europe/Paris", start)
    now = start + timedelta(days=4, seconds=7)
    forward = _forward(expr, "Europe/Paris", first, now)
    assert cron.due(expr, "Europe/Paris", first, now, 10_000) == (forward, False)
    assert cron.due(expr, "Europe/Paris", first, now, 3) == (forward[-3:], True)


def test_due_includes_a_tick_at_now_and_nothing_before_first() -> None:
    """A tick exactly at `now` is due; a `first` after `now` has none due."""
    now = datetime(2026, 11, 30, 12, 0, 0, 250_000, tzinfo=UTC)
    ticks, more = cron.due("*/10 * * * * *", "", now - timedelta(seconds=20.25), now, 10)
    assert ticks == [now.replace(microsecond=0) - timedelta(seconds=s) for s in (20, 10, 0)]
    assert not more
    assert cron.due("* * * * *", "", now + timedelta(minutes=1), now, 10) == ([], False)


def test_problems_name_the_field_of_each_mistake() -> None:
    """A bad cron and an unknown or malformed zone are each reported on their field."""
    assert cron.problems("0 3 * * *", "Europe/Paris") == []
    assert cron.problems("*/5 * * * * *", "") == []
    found = dict(cron.problems("61 * * * *", "Mars/Olympus_Mons"))
    assert "minute" in found["cron"].lower() and "Mars/Olympus_Mons" in found["time_zone"]
    assert dict(cron.problems("* * *", "../../etc/passwd")).keys() == {"cron", "time_zone"}
    assert dict(cron.problems("", "")) == {"cron": "must not be empty"}
