"""Who is predicting which task right now: one claim per (task, model version), shared through MODEL_DIR.

Several gunicorn workers, several requests of one worker, the background finisher, a restarted
backend and `python -m backend.prelabel` may all be asked for the same task. Each unit of work
(one /predict request, one command run, the finisher's queue) takes a *holder* and claims its tasks
through it; a task another holder has is left alone. The authority on what is *stored* stays Label
Studio (whoever stores asks it right before writing); claims stop two holders from computing and
answering the same task at once.

Usage::

    store = ClaimStore(os.path.join(model_dir, "claims.sqlite"))   # one per process is enough
    holder = store.holder("predict")          # a fresh token: one per request or job, never shared
    granted = holder.claim(task_ids, version, project="3")   # ids (str) granted to THIS holder only
    with holder.heartbeat():                  # renews the holder's leases while the work runs
        ...compute the granted tasks...
    holder.mark_stored(stored_ids, version)   # short "just stored" markers (see mark_stored)
    holder.release(other_ids, version)        # release touches this holder's rows only
    holder.release_all()                      # end of the job: whatever it still holds
    holder.transfer(ids, version, other)      # hand claims to another holder (request -> finisher)

A claim is never a lasting block: it is released when its task is done or given up, it expires
after `lease_s` unless its holder renews it (the heartbeat renews every `lease_s / 4`), and a claim
whose process is dead is ignored at once. A process is named by boot id + pid + the process's start
time (plus the host name), so a restarted container, which keeps its host name and often its pid,
does not inherit its predecessor's claims. Expired rows and old "stored" markers are deleted as claims
are taken, so `claims.sqlite` stays bounded by the tasks being worked on.

Storage: one SQLite file (`MODEL_DIR/claims.sqlite`), a unique key on (task, model_version).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from typing import Iterable, Iterator

from .sqlite_db import connect, transaction

logger = logging.getLogger("backend.claims")

HOST = socket.gethostname()
STORED = "stored"                   # the holder of "just stored" markers: no process owns them
PRUNE_EVERY_S = 30.0


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def boot_id() -> str:
    """This kernel boot's id ("" where /proc does not say: then the pid check alone is used)."""
    return _read("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), None if there is no such process.

    0 where /proc is missing but the process exists (then only "is the pid alive" can be checked)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        try:
            # the command name (field 2) may hold spaces and parentheses: count from the last ')'
            return int(stat[stat.rindex(")") + 2:].split()[19])
        except (ValueError, IndexError):
            return 0
    if os.path.exists("/proc/self/stat"):
        return None                     # /proc works and has no such pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return 0


BOOT = boot_id()


class ClaimStore:
    """The claims file of one MODEL_DIR; hands out holders. Thread-safe; cheap to share in a process."""

    def __init__(self, path: str, lease_s: float = 120.0, stored_hold_s: float = 60.0):
        self.path = path
        self.lease_s = lease_s
        self.stored_hold_s = stored_hold_s
        self.pid = os.getpid()
        self.start = process_start(self.pid) or 0
        self._lock = threading.Lock()
        self._pruned = 0.0
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with self._connect() as db:
            columns = [row[1] for row in db.execute("PRAGMA table_info(claims)")]
            if columns and "holder" not in columns:       # the file of an older version: claims are short-lived
                db.execute("DROP TABLE claims")
            db.execute("CREATE TABLE IF NOT EXISTS claims (task TEXT NOT NULL, model_version TEXT NOT NULL, "
                       "project TEXT, holder TEXT NOT NULL, host TEXT NOT NULL, boot TEXT NOT NULL, "
                       "pid INTEGER NOT NULL, start INTEGER NOT NULL, expires REAL NOT NULL, "
                       "PRIMARY KEY (task, model_version))")
            db.execute("CREATE INDEX IF NOT EXISTS claims_holder ON claims (holder)")
            db.execute("CREATE INDEX IF NOT EXISTS claims_expires ON claims (expires)")

    def holder(self, label: str = "job") -> "ClaimHolder":
        """A new holder (a unique token) for one request or job; its claims are its own."""
        return ClaimHolder(self, f"{label}:{HOST}:{self.pid}:{uuid.uuid4().hex[:12]}")

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    def _alive(self, holder: str, host: str, boot: str, pid: int, start: int, expires: float, now: float) -> bool:
        """Whether a row still counts: not expired, and (if its process can be checked here) that process lives."""
        if expires < now:
            return False
        if holder == STORED or host != HOST:
            return True                          # another machine or container: only its lease tells
        if boot and BOOT and boot != BOOT:
            return False                         # same host name, another boot: that process is gone
        if pid == self.pid:
            return start == self.start or not start
        seen = process_start(pid)
        if seen is None:
            return False                         # no such process
        return not (seen and start and seen != start)   # a new process that reuses the pid

    def _live_row(self, db: sqlite3.Connection, key: str, version: str, now: float) -> tuple | None:
        row = db.execute("SELECT holder, host, boot, pid, start, expires FROM claims WHERE task=? AND model_version=?",
                         (key, version)).fetchone()
        return row if row is not None and self._alive(*row, now) else None

    def _prune(self, db: sqlite3.Connection, now: float, force: bool = False) -> None:
        """Delete expired rows (old "stored" markers included) and rows of dead processes on this host."""
        if not force and now - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = now
        db.execute("DELETE FROM claims WHERE expires < ?", (now,))
        dead = [(holder, boot, pid, start) for holder, host, boot, pid, start in
                db.execute("SELECT DISTINCT holder, host, boot, pid, start FROM claims WHERE holder != ? AND host = ?",
                           (STORED, HOST)).fetchall()
                if not self._alive(holder, host, boot, pid, start, now + 1, now)]
        db.executemany("DELETE FROM claims WHERE holder=? AND boot=? AND pid=? AND start=?", dead)

    def prune(self) -> int:
        """Delete every row that no longer counts now; returns the rows left."""
        with self._lock, self._connect() as db:
            self._prune(db, time.time(), force=True)
            return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]

    def busy(self, task_ids: Iterable, model_version: str, exclude: str | None = None) -> set[str]:
        """Ids (as str) of these tasks a live holder other than `exclude` has, or that were just stored."""
        keys = [str(t) for t in task_ids]
        now = time.time()
        out = set()
        with self._lock, self._connect() as db:
            for key in keys:
                row = self._live_row(db, key, model_version, now)
                if row is not None and row[0] != exclude:
                    out.add(key)
        return out

    held_by_others = busy   # from the store's own view every holder is another

    def count(self) -> int:
        with self._lock, self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]

    # -- used through ClaimHolder ----------------------------------------------------------------

    def _claim(self, token: str, task_ids: Iterable, model_version: str, project: str | None) -> set[str]:
        keys = [str(t) for t in dict.fromkeys(task_ids)]
        if not keys:
            return set()
        now = time.time()
        granted: set[str] = set()
        with self._lock, self._connect() as db, transaction(db):
            self._prune(db, now)
            for key in keys:
                row = self._live_row(db, key, model_version, now)
                if row is not None and row[0] != token:
                    continue
                db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (key, model_version, project, token, HOST, BOOT, self.pid, self.start,
                            now + self.lease_s))
                granted.add(key)
        return granted

    def _update(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock, self._connect() as db, transaction(db):
            db.executemany(sql, rows)

    def _held(self, token: str) -> list[tuple[str, str]]:
        with self._lock, self._connect() as db:
            return db.execute("SELECT task, model_version FROM claims WHERE holder=?", (token,)).fetchall()


class ClaimHolder:
    """One request's or job's claims. Everything it does touches its own rows only."""

    def __init__(self, store: ClaimStore, token: str):
        self.store = store
        self.token = token

    def __repr__(self) -> str:
        return f"ClaimHolder({self.token})"

    def claim(self, task_ids: Iterable, model_version: str, project: str | None = None) -> set[str]:
        """Claim these tasks; the ids (as str) this holder now has (newly, or already its own)."""
        return self.store._claim(self.token, task_ids, model_version, project)

    def busy(self, task_ids: Iterable, model_version: str) -> set[str]:
        """Ids (as str) another live holder has or that were just stored."""
        return self.store.busy(task_ids, model_version, exclude=self.token)

    held_by_others = busy

    def held(self) -> list[tuple[str, str]]:
        """(task id, model version) of every claim this holder has."""
        return self.store._held(self.token)

    def renew(self, task_ids: Iterable | None = None, model_version: str | None = None) -> None:
        """Push back the lease of this holder's claims (all of them when `task_ids` is None)."""
        expires = time.time() + self.store.lease_s
        if task_ids is None:
            self.store._update("UPDATE claims SET expires=? WHERE holder=?", [(expires, self.token)])
        else:
            self.store._update("UPDATE claims SET expires=? WHERE task=? AND model_version=? AND holder=?",
                               [(expires, str(t), model_version, self.token) for t in task_ids])

    @contextlib.contextmanager
    def heartbeat(self, interval_s: float | None = None) -> Iterator[None]:
        """Renew all of this holder's claims every `interval_s` (lease / 4) while the block runs."""
        beat = Heartbeat(self, interval_s)
        beat.start()
        try:
            yield
        finally:
            beat.stop()

    def release(self, task_ids: Iterable, model_version: str) -> None:
        self.store._update("DELETE FROM claims WHERE task=? AND model_version=? AND holder=?",
                           [(str(t), model_version, self.token) for t in task_ids])

    def release_all(self) -> None:
        self.store._update("DELETE FROM claims WHERE holder=?", [(self.token,)])

    def transfer(self, task_ids: Iterable, model_version: str, to: "ClaimHolder") -> None:
        """Give these claims of this holder to `to` (a request handing tasks to the finisher)."""
        expires = time.time() + self.store.lease_s
        self.store._update("UPDATE claims SET holder=?, expires=? WHERE task=? AND model_version=? AND holder=?",
                           [(to.token, expires, str(t), model_version, self.token) for t in task_ids])

    def mark_stored(self, task_ids: Iterable, model_version: str, hold_s: float | None = None) -> None:
        """Turn this holder's claims into short "just stored" markers that no process owns.

        Label Studio lists the tasks to send before it calls /predict; a task stored (or answered
        with a result) in between would be computed and stored again. For `hold_s` (the store's
        `stored_hold_s`) the marker makes other holders leave the task alone; then it is pruned."""
        expires = time.time() + (self.store.stored_hold_s if hold_s is None else hold_s)
        self.store._update("UPDATE claims SET holder=?, host='', boot='', pid=0, start=0, expires=? "
                           "WHERE task=? AND model_version=? AND holder=?",
                           [(STORED, expires, str(t), model_version, self.token) for t in task_ids])


class Heartbeat:
    """A daemon thread renewing a holder's claims; `start()` / `stop()` (or ClaimHolder.heartbeat)."""

    def __init__(self, holder: ClaimHolder, interval_s: float | None = None):
        self.holder = holder
        self.interval_s = interval_s if interval_s is not None else max(0.05, holder.store.lease_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gem-claims-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.holder.renew()
            except sqlite3.Error as exc:     # a busy file: the next beat tries again, the lease is long
                logger.warning("claims heartbeat of %s failed: %s", self.holder.token, exc)
