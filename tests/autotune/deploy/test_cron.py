"""Cron schedules as a CronJob reads them: next fire times and one-line errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

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


PARIS = ZoneInfo("Europe/Paris")  # 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET


def test_a_night_ending_in_the_repeated_hour_next_fires_tomorrow_not_in_the_past():
    # 02:30 CEST fired and the study ran 40 minutes, into the hour's second pass (02:10 CET).
    ended = datetime(2026, 10, 25, 2, 10, tzinfo=PARIS, fold=1)
    nxt = parse_cron("30 2 * * *").next_after(ended)
    assert nxt > ended and nxt.timestamp() > ended.timestamp()
    assert (nxt.date().isoformat(), nxt.hour, nxt.minute, nxt.utcoffset()) == ("2026-10-26", 2, 30, timedelta(hours=1))
    # From inside the first pass, after the fire time: once a day, not again in the second pass.
    assert parse_cron("30 2 * * *").next_after(datetime(2026, 10, 25, 2, 40, tzinfo=PARIS)).day == 26


def test_a_frequent_schedule_fires_through_both_passes_of_the_repeated_hour_in_real_time_order():
    moment, fired = datetime(2026, 10, 25, 1, 50, tzinfo=PARIS), []
    for _ in range(8):
        moment = parse_cron("*/20 * * * *").next_after(moment)
        fired.append(moment.astimezone(timezone.utc).strftime("%H:%M"))
    # 02:00-02:40 CEST, then 02:00-02:40 CET, then 03:00 CET: every 20 real minutes
    assert fired == ["00:00", "00:20", "00:40", "01:00", "01:20", "01:40", "02:00", "02:20"]


def test_a_time_the_clock_skips_fires_at_the_jump_once():
    before = datetime(2026, 3, 29, 1, 50, tzinfo=PARIS)
    at_jump = parse_cron("30 2 * * *").next_after(before)
    assert (at_jump.hour, at_jump.minute, at_jump.utcoffset()) == (3, 0, timedelta(hours=2))
    after = parse_cron("30 2 * * *").next_after(at_jump)
    assert (after.day, after.hour, after.minute) == (30, 2, 30)
