"""One writer per study: a lease held in the study's own storage, renewed by a heartbeat.

Two runs of one study at once (a slow night overlapping the next, a person running
`autotune run --continue` by hand) would each close the other's running trials and corrupt
the study. So a run takes the study's lease before it touches anything, and gives it back at
the end. A second run waits up to `study.lease_wait_s`, then stops with exit code 3 and the
holder's host, pid and start time, having changed nothing. A holder that stopped renewing (no
heartbeat for `study.lease_timeout_s`: it was killed, its machine died), or whose process is
gone from this very host, is dead: its lease is
taken over, and the new holder closes the trials it left RUNNING (`--resume`'s reconciliation).

Where the lease lives, beside the study it guards:

* a journal file: `<journal>.<study>.lease`, a small JSON file, changed only under an `flock`
  of `<journal>.<study>.lease.lock` (held for milliseconds, never for the run);
* a database URL (PostgreSQL, SQLite): a row in the table `autotune_lease` of that database,
  taken by INSERT and taken over by a conditional UPDATE, so the database decides every race.

Clocks: heartbeats are wall-clock seconds of the writer; the nodes of one cluster are assumed
to agree within a small part of `lease_timeout_s` (NTP).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from autotune.redaction import redact_url

TABLE = "autotune_lease"


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    started: float  # epoch seconds
    heartbeat: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))
        return f"host {self.host} pid {self.pid}, started {when}"


class LeaseBusy(RuntimeError):
    """Another live run holds the study; nothing was changed."""

    def __init__(self, study: str, holder: Holder, where: str, waited_s: float) -> None:
        super().__init__(f"study {study!r} is being run by {holder.describe()} (lease in {where}, last heartbeat "
                         f"{max(0.0, time.time() - holder.heartbeat):.0f} s ago); waited {waited_s:.0f} s and changed "
                         f"nothing; let that run finish, or raise study.lease_wait_s to wait for it")
        self.holder = holder


def host_identity() -> str:
    """This process's host as the lease names it: the hostname, and what tells apart containers
    that share one (each has its own pid namespace; hosts cloned from one image, their boot id).
    Only a holder with the same identity is checked by its pid; any other by its heartbeat."""
    name = socket.gethostname()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the hostname is all there is
        return name
    return f"{name} (boot {boot}, pid ns {pid_ns})"


def _gone(holder: Holder) -> bool:
    """A holder on this host whose process no longer exists is dead now, not after the timeout
    (`autotune run --resume` right after a crash). Holders on other hosts, or in other
    containers of this one, are judged by heartbeat."""
    if holder.host != host_identity():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (owned by another user)
        return False
    return False


def _me(now: float) -> Holder:
    return Holder(uuid.uuid4().hex, host_identity(), os.getpid(), now, now)


class _FileBackend:
    """`<journal>.<study>.lease`, read and written under an flock of `<journal>.<study>.lease.lock`."""

    def __init__(self, journal: str, study: str) -> None:
        self.path = Path(f"{journal}.{study}.lease")
        self.guard = Path(f"{journal}.{study}.lease.lock")
        self.where = str(self.path)

    def _locked(self, action: Callable[[Holder | None], tuple[bool, Holder | None]]) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read()
            ok, new = action(current)
            if ok:
                if new is None:
                    self.path.unlink(missing_ok=True)
                else:
                    tmp = self.path.with_name(self.path.name + ".tmp")
                    tmp.write_text(json.dumps(asdict(new)))
                    os.replace(tmp, self.path)
            return ok
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def claim(self, me: Holder, timeout_s: float) -> tuple[bool, Holder | None]:
        """Take the lease if it is free or its holder is dead; (taken, holder found)."""
        found: list[Holder | None] = []

        def act(current: Holder | None) -> tuple[bool, Holder | None]:
            found.append(current)
            return (current is None or current.heartbeat < me.heartbeat - timeout_s or _gone(current)), me
        return self._locked(act), found[0]

    def renew(self, me: Holder, now: float) -> bool:
        return self._locked(lambda cur: (cur is not None and cur.token == me.token,
                                         Holder(me.token, me.host, me.pid, me.started, now)))

    def release(self, me: Holder) -> None:
        self._locked(lambda cur: (cur is not None and cur.token == me.token, None))


class _SqlBackend:
    """A row per study in `autotune_lease`, in the study's own database."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        meta = sa.MetaData()
        self.table = sa.Table(TABLE, meta, sa.Column("study", sa.String(200), primary_key=True),
                              sa.Column("token", sa.String(64), nullable=False),
                              sa.Column("host", sa.String(255), nullable=False),
                              sa.Column("pid", sa.Integer, nullable=False),
                              sa.Column("started", sa.Float, nullable=False),
                              sa.Column("heartbeat", sa.Float, nullable=False))
        try:
            meta.create_all(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError:  # two first runs racing to create it: one of them did
            if not sa.inspect(self.engine).has_table(TABLE):
                raise
        self.where = f"table {TABLE} of {redact_url(url)}"
        self.study = ""

    def read(self) -> Holder | None:
        with self.engine.connect() as conn:
            row = conn.execute(self.sa.select(self.table).where(self.table.c.study == self.study)).mappings().first()
        return None if row is None else Holder(row["token"], row["host"], row["pid"], row["started"], row["heartbeat"])

    def _clock(self, now: float):
        """The time a heartbeat is stamped with and judged by: the database's own clock on
        PostgreSQL, so that hosts whose clocks differ agree on who is stale; elsewhere (SQLite,
        one host) this process's."""
        if self.engine.dialect.name == "postgresql":
            return self.sa.func.extract("epoch", self.sa.func.clock_timestamp())
        return now

    def claim(self, me: Holder, timeout_s: float) -> tuple[bool, Holder | None]:
        t = self.table
        now = self._clock(me.heartbeat)
        values = {"token": me.token, "host": me.host, "pid": me.pid, "started": now, "heartbeat": now}
        try:
            with self.engine.begin() as conn:
                conn.execute(t.insert().values(study=self.study, **values))
            return True, None
        except self.sa.exc.IntegrityError:
            pass
        current = self.read()
        stale = t.c.heartbeat < now - timeout_s  # by the clock above
        if current is not None and _gone(current):
            stale = t.c.token == current.token
        with self.engine.begin() as conn:  # only one of two racing takeovers matches the old holder
            taken = conn.execute(t.update().where(t.c.study == self.study, stale).values(**values)).rowcount == 1
        return taken, current

    def renew(self, me: Holder, now: float) -> bool:
        t = self.table
        with self.engine.begin() as conn:
            return conn.execute(t.update().where(t.c.study == self.study, t.c.token == me.token)
                                .values(heartbeat=self._clock(now))).rowcount == 1

    def release(self, me: Holder) -> None:
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.study == self.study, t.c.token == me.token))


class Fence:
    """`fence()` is true once the lease is lost: what the search, the recorder and Tune's stop
    condition ask before they launch or write. Picklable (Tune pickles its configuration), as a
    fence that never closes: the lease lives only in the driver."""

    def __init__(self, lease: "Lease | None") -> None:
        self._lease = lease

    def __call__(self) -> bool:
        return self._lease is not None and self._lease.lost

    def __getstate__(self) -> dict:
        return {"_lease": None}


class Lease:
    """`with Lease(storage, study, wait_s, timeout_s) as lease:`; `lease.took_over` names a dead holder."""

    def __init__(self, storage: str, study: str, wait_s: float = 0, timeout_s: float = 60,
                 poll_s: float = 1.0) -> None:
        if "://" in storage:
            self.backend: _FileBackend | _SqlBackend = _SqlBackend(storage)
            self.backend.study = study
        else:
            self.backend = _FileBackend(storage, study)
        self.study, self.wait_s, self.timeout_s, self.poll_s = study, wait_s, timeout_s, poll_s
        self.me: Holder | None = None
        self.took_over: Holder | None = None
        self.lost = False
        self.fence = Fence(self)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "Lease":
        started = time.monotonic()
        while True:
            now = time.time()
            me = _me(now)
            taken, found = self.backend.claim(me, self.timeout_s)
            if taken:
                self.me, self.took_over = me, found
                break
            waited = time.monotonic() - started
            if waited >= self.wait_s:
                raise LeaseBusy(self.study, found or self.backend.read() or me, self.backend.where, waited)
            time.sleep(min(self.poll_s, max(0.05, self.wait_s - waited)))
        self._thread = threading.Thread(target=self._beat, name="autotune-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        interval = max(0.5, self.timeout_s / 4)
        while not self._stop.wait(interval):
            try:
                if not self.backend.renew(self.me, time.time()):
                    self.lost = True  # taken over: this run was thought dead
                    return
            except Exception:  # the storage is briefly unreachable: try again next beat
                continue

    def taker(self) -> str:
        """Who holds the lease now (after `lost`), as a person reads it."""
        try:
            holder = self.backend.read()
        except Exception:  # the storage is unreachable: say what is known
            holder = None
        return holder.describe() if holder is not None else "another run"

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.me is not None and not self.lost:
            try:
                self.backend.release(self.me)
            except Exception:  # the storage is gone: the lease expires by itself
                pass
        self.me = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
