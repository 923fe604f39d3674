"""Run a command on a cron schedule, one run at a time: the `scheduler` service of docker-compose.yml.

    python scheduler.py --schedule "0 2 * * *" -- autotune submit /config/space.yaml --address http://ray-head:8265

The schedule is the five cron fields (or @daily, @hourly, ...), read in the time zone `--time-zone`
(default: $TZ, else UTC). The command runs without a shell. A run that lasts past the next fire
time is not overlapped: the next run is the first fire time after it ends. `--dry-run N` prints
the next N fire times and exits. `--run-now` (or AUTOTUNE_RUN_NOW=1 in the environment, which
is how compose passes it) also runs once at start: a first study right after `docker compose up`.
SIGTERM (docker stop) stops a running command, then the loop.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from autotune.deploy.cron import ScheduleError, parse_cron

MAX_SLEEP_S = 60.0  # re-read the clock at least this often (suspends, clock changes)
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def log(message: str) -> None:
    print(f"{datetime.now().astimezone().isoformat(timespec='seconds')} scheduler: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scheduler.py", description="Run a command on a cron schedule.")
    p.add_argument("--schedule", required=True, help="cron expression, e.g. '0 2 * * *'")
    p.add_argument("--time-zone", default=os.environ.get("TZ") or "UTC", help="IANA time zone (default $TZ or UTC)")
    p.add_argument("--run-now", action="store_true", help="also run once at start (or AUTOTUNE_RUN_NOW=1)")
    p.add_argument("--dry-run", type=int, default=0, metavar="N", help="print the next N fire times and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    ns = p.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    run_now = os.environ.get("AUTOTUNE_RUN_NOW", "").strip().lower()
    if run_now not in TRUE + FALSE:
        print(f"error: AUTOTUNE_RUN_NOW must be 1 or 0 (true or false), not {run_now!r}; unset it to wait for the "
              "schedule", file=sys.stderr)
        return 2
    try:
        schedule = parse_cron(ns.schedule)
    except ScheduleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        zone = ZoneInfo(ns.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"error: time zone {ns.time_zone!r} is unknown; give an IANA name such as Europe/Paris or UTC",
              file=sys.stderr)
        return 2
    if ns.dry_run:
        moment = datetime.now(zone)
        for _ in range(ns.dry_run):
            moment = schedule.next_after(moment)
            print(moment.isoformat(timespec="minutes"))
        return 0
    if not command:
        print("error: no command; give it after --, e.g. -- autotune submit space.yaml --address URL", file=sys.stderr)
        return 2

    child: subprocess.Popen | None = None

    def stop(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    log(f"schedule {schedule.text!r} ({ns.time_zone}): {' '.join(command)}")
    try:
        due = ns.run_now or run_now in TRUE
        while True:
            if not due:
                when = schedule.next_after(datetime.now(zone))
                log(f"next run at {when.isoformat(timespec='minutes')}")
                while (left := when.timestamp() - time.time()) > 0:  # real seconds, across DST changes
                    time.sleep(min(left, MAX_SLEEP_S))
            due = False
            log("starting")
            started = time.monotonic()
            child = subprocess.Popen(command)
            code = child.wait()
            child = None
            log(f"finished with exit code {code} after {time.monotonic() - started:.0f} s")
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
