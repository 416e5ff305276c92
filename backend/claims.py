"""Who is predicting which task right now: one claim per (task, model version), shared through MODEL_DIR.

Several gunicorn workers, a restarted backend and `python -m backend.prelabel` may all be asked
for the same task. Before computing a task each of them claims it here; a task someone else holds
is left to them. The authority on what is *stored* stays Label Studio (the uploader asks it right
before writing); claims only stop two processes from computing and uploading the same task at once.

A claim is never a lasting block: it is released when its task is done or given up, it expires
after `lease_s` unless renewed, and a claim whose owning process has died (same host) is ignored
at once. So after a crash or a kill, asking again simply works.

Storage: one SQLite file (`MODEL_DIR/claims.sqlite`), a unique key on (task, model_version).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
import uuid
from typing import Iterable, Iterator

HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class ClaimStore:
    """Claims on (task id, model version) for one owner (this object), shared by processes via SQLite."""

    def __init__(self, path: str, lease_s: float = 600.0, owner: str | None = None):
        self.path = path
        self.lease_s = lease_s
        self.pid = os.getpid()
        self.owner = owner or f"{HOST}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS claims (task TEXT NOT NULL, model_version TEXT NOT NULL, "
                       "project TEXT, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, "
                       "expires REAL NOT NULL, PRIMARY KEY (task, model_version))")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)   # autocommit; explicit BEGIN
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def _stale(self, host: str, pid: int, expires: float, now: float) -> bool:
        return expires < now or (host == HOST and pid != self.pid and not _pid_alive(pid))

    def claim(self, task_ids: Iterable, model_version: str, project: str | None = None) -> set[str]:
        """Claim these tasks; returns the ids (as str) this owner now holds (newly or already)."""
        keys = [str(t) for t in dict.fromkeys(task_ids)]
        if not keys:
            return set()
        now = time.time()
        held: set[str] = set()
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    row = db.execute("SELECT owner, host, pid, expires FROM claims WHERE task=? AND model_version=?",
                                     (key, model_version)).fetchone()
                    if row is not None and row[0] != self.owner and not self._stale(row[1], row[2], row[3], now):
                        continue
                    db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (key, model_version, project, self.owner, HOST, self.pid, now + self.lease_s))
                    held.add(key)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return held

    def held_by_others(self, task_ids: Iterable, model_version: str) -> set[str]:
        """Ids (as str) of these tasks that another live owner holds now."""
        keys = [str(t) for t in task_ids]
        now = time.time()
        out = set()
        with self._lock, self._connect() as db:
            for key in keys:
                row = db.execute("SELECT owner, host, pid, expires FROM claims WHERE task=? AND model_version=?",
                                 (key, model_version)).fetchone()
                if row is not None and row[0] != self.owner and not self._stale(row[1], row[2], row[3], now):
                    out.add(key)
        return out

    def renew(self, task_ids: Iterable, model_version: str) -> None:
        """Push back the expiry of this owner's claims on these tasks (long queues stay claimed)."""
        keys = [str(t) for t in task_ids]
        with self._lock, self._connect() as db:
            db.executemany("UPDATE claims SET expires=? WHERE task=? AND model_version=? AND owner=?",
                           [(time.time() + self.lease_s, key, model_version, self.owner) for key in keys])

    def release(self, task_ids: Iterable, model_version: str) -> None:
        keys = [str(t) for t in task_ids]
        if not keys:
            return
        with self._lock, self._connect() as db:
            db.executemany("DELETE FROM claims WHERE task=? AND model_version=? AND owner=?",
                           [(key, model_version, self.owner) for key in keys])

    def mark_stored(self, task_ids: Iterable, model_version: str, hold_s: float = 60.0) -> None:
        """Turn this owner's claims into short "just stored" markers that no process owns.

        Label Studio lists the tasks to send before it calls /predict; a task stored by the
        background in between would be computed (and stored by Label Studio) again. For `hold_s`
        the marker makes other requests leave the task alone; then it expires like any claim."""
        keys = [str(t) for t in task_ids]
        if not keys:
            return
        with self._lock, self._connect() as db:
            db.executemany("UPDATE claims SET owner='stored', host='', pid=0, expires=? "
                           "WHERE task=? AND model_version=? AND owner=?",
                           [(time.time() + hold_s, key, model_version, self.owner) for key in keys])

    def release_all(self) -> None:
        """Drop every claim of this owner (shutdown)."""
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM claims WHERE owner=?", (self.owner,))
