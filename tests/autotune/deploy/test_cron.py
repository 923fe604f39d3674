"""Cron schedules as a CronJob reads them: next fire times and one-line errors."""

from __future__ import annotations

from datetime import datetime

import pytest

from autotune.deploy.cron import ScheduleError, parse_cron


@pytest.mark.parametrize("expr,after,expected", [
    ("0 2 * * *", "2026-11-20 03:00", "2026-11-21 02:00"),
    ("0 2 * * *", "2026-11-20 01:59", "2026-11-20 02:00"),
    ("0 2 * * *", "2026-11-20 02:00", "2026-11-21 02:00"),  # strictly after
    ("*/15 * * * *", "2026-11-20 10:07", "2026-11-20 10:15"),
    ("30 4 1 JAN *", "2026-11-20 00:00", "2027-01-01 04:30"),
    ("0 9 * * MON-FRI", "2026-11-20 10:00", "2026-11-23 09:00"),  # Friday -> Monday
    ("0 0 13 * 5", "2026-11-01 00:00", "2026-11-06 00:00"),  # the 13th or a Friday
    ("0 0 13 * */2", "2026-11-01 00:00", "2026-11-03 00:00"),  # a stepped '*' restricts too: or a Tuesday
    ("0 0 13 * *", "2026-11-01 00:00", "2026-11-13 00:00"),
    ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),
    ("5/20 1-3 * * ?", "2026-11-20 02:50", "2026-11-20 03:05"),
    ("@hourly", "2026-11-20 10:07", "2026-11-20 11:00"),
    ("@weekly", "2026-11-20 10:07", "2026-11-22 00:00"),  # Sunday
    ("0 0 1,15 * *", "2026-11-02 00:00", "2026-11-15 00:00"),
])
def test_next_fire_time(expr, after, expected):
    fmt = "%Y-%m-%d %H:%M"
    got = parse_cron(expr).next_after(datetime.strptime(after, fmt))
    assert got == datetime.strptime(expected, fmt)


@pytest.mark.parametrize("expr,words", [
    ("", "schedule is empty"),
    ("0 2 * *", "has 4 fields"),
    ("0 2 * * * *", "has 6 fields"),
    ("61 * * * *", "minute field '61': 61 is outside 0-59"),
    ("* 24 * * *", "hour field '24': 24 is outside 0-23"),
    ("* * 0 * *", "day of month field '0': 0 is outside 1-31"),
    ("* * * 13 *", "month field '13'"),
    ("* * * * 7", "7 is outside 0-6 (use 0 for Sunday)"),
    ("* * * FOO *", "'FOO' is not a number from 1 to 12 or a name such as JAN"),
    ("*/0 * * * *", "step '0' must be a whole number of 1 or more"),
    ("5-1 * * * *", "range '5-1' runs backwards"),
    ("1,,2 * * * *", "empty item between commas"),
    ("? * * * *", "'?' is only allowed in the day fields"),
    ("0 0 30 2 *", "never fires"),
    ("TZ=UTC 0 2 * * *", "TZ= or CRON_TZ= prefix is not allowed"),
    ("@every 5m", "is not a known descriptor"),
    ("0 2 * * *; rm -rf /", "has 8 fields"),
])
def test_bad_schedules(expr, words):
    with pytest.raises(ScheduleError) as err:
        parse_cron(expr)
    assert words in str(err.value)
