"""Cron schedules as Kubernetes CronJob reads them (five fields, or an @descriptor): checked before a
manifest is written, and read by the docker-compose deployment's scheduler loop."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime

from cronsim import CronSim, CronSimError


class ScheduleError(ValueError):
    """A schedule that cannot run, as one line saying what to change."""


_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# name, low, high, names
_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}), ("month", 1, 12, _MONTHS),
           ("day of week", 0, 6, _DAYS))
_EXAMPLE = "e.g. '0 2 * * *' for 02:00 every day"


@dataclass(frozen=True)
class CronSchedule:
    """A checked schedule: `text` as the user wrote it (what the CronJob gets), `expr` the same
    schedule in the five numeric fields the iterator reads."""

    text: str
    expr: str

    def next_after(self, moment: datetime) -> datetime | None:
        """The first fire time after `moment`, in its time zone; None if there is none.

        Fire times come from cronsim, which follows Debian cron across DST changes: a time the
        clock skips fires at the jump, a fixed time in a repeated hour fires once. Given a
        moment inside the repeated hour's second pass it answers the first pass, which is in
        the past; a fire time is taken only if it is later in real time than `moment`."""
        after = moment.timestamp() if moment.tzinfo is not None else None
        for n, candidate in enumerate(CronSim(self.expr, moment)):
            if after is None or candidate.timestamp() > after:
                return candidate
            if n >= 60:  # a repeated hour holds at most 60 earlier answers
                break
        return None


def _field(text: str, index: int) -> str:
    """One field checked as Kubernetes reads it (robfig/cron), written out for cronsim: '*' where
    Kubernetes sees a star, else the explicit list of values (so a stepped '*' in a day field
    restricts that field, as it does in Kubernetes, where Debian cron would treat it as a star)."""
    name, low, high, names = _FIELDS[index]
    where = f"schedule {name} field {text!r}"

    def value(token: str) -> int:
        key = token.lower()
        if key in names:
            return names[key]
        if not re.fullmatch(r"\d+", token):
            choices = f" or a name such as {next(iter(names)).upper()}" if names else ""
            raise ScheduleError(f"{where}: {token!r} is not a number from {low} to {high}{choices}; {_EXAMPLE}")
        number = int(token)
        if not low <= number <= high:
            hint = " (use 0 for Sunday)" if index == 4 and number == 7 else ""
            raise ScheduleError(f"{where}: {number} is outside {low}-{high}{hint}; {_EXAMPLE}")
        return number

    allowed: set[int] = set()
    star = False  # '*' or '?' without a step: the day fields then combine as in Kubernetes (robfig/cron)
    for item in text.split(","):
        if not item:
            raise ScheduleError(f"{where}: an empty item between commas; remove the extra comma")
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not re.fullmatch(r"\d+", step_text) or int(step_text) == 0:
                raise ScheduleError(f"{where}: step {step_text!r} must be a whole number of 1 or more; {_EXAMPLE}")
            step = int(step_text)
        if body in ("*", "?"):
            if body == "?" and index not in (2, 4):
                raise ScheduleError(f"{where}: '?' is only allowed in the day fields; use '*'")
            first, last = low, high
            star = star or step == 1
        elif "-" in body:
            a, _dash, b = body.partition("-")
            first, last = value(a), value(b)
            if first > last:
                raise ScheduleError(f"{where}: range {body!r} runs backwards; write it low-high")
        else:
            first = value(body)
            last = high if slash else first  # 'a/n' means from a to the end, every n
        allowed.update(range(first, last + 1, step))
    return "*" if star else ",".join(str(v) for v in sorted(allowed))


def parse_cron(expr: str) -> CronSchedule:
    """Five fields (minute hour day-of-month month day-of-week) or an @descriptor; ScheduleError if invalid."""
    if not isinstance(expr, str) or not expr.strip():
        raise ScheduleError(f"schedule is empty; give a cron expression, {_EXAMPLE}")
    text = " ".join(expr.split())
    if re.match(r"(CRON_)?TZ=", text):
        raise ScheduleError("schedule: a TZ= or CRON_TZ= prefix is not allowed in a CronJob schedule; give the time "
                       "zone separately (time_zone, e.g. 'Europe/Paris')")
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise ScheduleError(f"schedule {expr!r} is not a known descriptor; use one of {', '.join(_MACROS)} or five "
                           f"fields, {_EXAMPLE}")
        fields = _MACROS[text.lower()].split()
    else:
        fields = text.split(" ")
    if len(fields) != 5:
        raise ScheduleError(f"schedule {expr!r} has {len(fields)} fields; a cron schedule has 5 (minute hour "
                       f"day-of-month month day-of-week), {_EXAMPLE}")
    schedule = CronSchedule(text, " ".join(_field(f, i) for i, f in enumerate(fields)))
    try:
        first = schedule.next_after(datetime(2000, 1, 1))
    except CronSimError:
        first = None
    if first is None:
        raise ScheduleError(f"schedule {expr!r} never fires (no such day, e.g. 30 February); fix the day and month")
    return schedule
