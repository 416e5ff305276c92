"""What the backend owes Label Studio, kept on disk: tasks to predict and predictions to store.

The background finisher (backend/background.py) works from this SQLite file (`MODEL_DIR/outbox.sqlite`)
rather than from memory, so nothing it has been given is lost when Label Studio is down or the
backend is killed:

* a *queued* row is a task to predict (only its id and `data`: what prediction needs) with the
  job it belongs to (project, label config) so that a restarted process can rebuild the job;
* a *computed* row holds a finished prediction (result, score, model version) until Label Studio
  has stored it. Storing asks Label Studio first whether the task already holds a prediction of
  that version, so a crash between "stored" and "row deleted" stores nothing twice.

Rows are keyed by (task, model version): the same task handed over twice is kept once.

A *refresh* (docs/LEARNING.md, "Refresh after learning") is a row of `refreshes`, one per project:
the project's new learned version, waiting to be listed (`pending`) or listed into rows of its job
(`queued`, with how many). Its rows are ordinary rows whose job key starts with `refresh|`; they
come after every other row (what a user asked for goes first). A newer refresh of the project
replaces the row and drops the older one's rows, computed or not, in the same transaction.

`Breaker` is the circuit breaker for "Label Studio is unreachable": after a failure it lets one
probe through per back-off period (doubling up to a maximum) and says so once in the log when it
opens and once when it closes. Both are independent of the finisher, so another writer (the
prelabel command's uploader, for example) can keep its computed predictions the same way:
`put_job` + `put_tasks` + `put_result` to keep them, `due` to list what to store now,
`done` / `retry(delay_s=backoff(...))` after each try, `unreachable(exc)` to tell an outage from a
refusal, and a `Breaker` to pause while Label Studio is down.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .sqlite_db import connect, transaction

logger = logging.getLogger("backend.outbox")

QUEUED, COMPUTED = "queued", "computed"
PENDING = "pending"              # a refresh whose tasks are not listed yet (its rows are QUEUED ones)
REFRESH_PREFIX = "refresh|"      # job keys of refresh rows


def refresh_job(project: int, learned: str) -> str:
    """The job key of a project's refresh to the learned version `learned` ("" = nothing learned)."""
    return f"{REFRESH_PREFIX}{int(project)}|{learned}"


@dataclass
class Refresh:
    project: int
    project_key: str            # the project as /predict names it ("<id>.<created>"): its learned state
    learned: str                # the learned version suffix it refreshes to
    job: str
    state: str                  # PENDING or QUEUED
    total: int                  # rows queued (QUEUED)
    requested: float

# HTTP answers that mean "Label Studio is not there right now" (a proxy in front, a restart).
UNREACHABLE_STATUS = frozenset({502, 503, 504})
UNREACHABLE_REASONS = frozenset({"connection", "timeout"})


def unreachable(exc: BaseException) -> bool:
    """Whether a LabelStudioError (or an image fetch error) says Label Studio is unreachable, not wrong."""
    status = getattr(exc, "status", None)
    return getattr(exc, "reason", None) in UNREACHABLE_REASONS or status in UNREACHABLE_STATUS


def backoff(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after `attempts` failed attempts: base, 2 base, 4 base, ... up to max."""
    return min(max_s, base_s * (2 ** max(0, min(attempts - 1, 30))))


@dataclass
class Row:
    task: str
    model_version: str          # the claim key the row was handed over under
    project: int
    job: str                    # key of the job row: project + label config + version
    state: str
    task_data: dict             # {"id", "data"}: what prediction needs
    result: list | None
    score: float
    prediction_version: str     # the model version the stored prediction carries
    attempts: int
    next_try: float
    error: str


class Outbox:
    """The durable queue + outbox of one MODEL_DIR. Thread-safe; several processes may share the file."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS jobs (key TEXT PRIMARY KEY, project INTEGER NOT NULL, "
                       "project_key TEXT, label_config TEXT NOT NULL, model_version TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS items (task TEXT NOT NULL, model_version TEXT NOT NULL, "
                       "project INTEGER NOT NULL, job TEXT NOT NULL, state TEXT NOT NULL, task_data TEXT NOT NULL, "
                       "result TEXT, score REAL NOT NULL DEFAULT 0, prediction_version TEXT NOT NULL DEFAULT '', "
                       "attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, "
                       "error TEXT NOT NULL DEFAULT '', created REAL NOT NULL, seq INTEGER NOT NULL DEFAULT 0, "
                       "PRIMARY KEY (task, model_version))")
            db.execute("CREATE INDEX IF NOT EXISTS items_state ON items (state, next_try)")
            db.execute("CREATE INDEX IF NOT EXISTS items_job ON items (job)")
            db.execute("CREATE TABLE IF NOT EXISTS refreshes (project INTEGER PRIMARY KEY, project_key TEXT NOT NULL, "
                       "learned TEXT NOT NULL, job TEXT NOT NULL, state TEXT NOT NULL, total INTEGER NOT NULL "
                       "DEFAULT 0, requested REAL NOT NULL)")

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path, synchronous_full=True)   # a row we said is kept survives a power cut too

    # -- putting in --------------------------------------------------------------------------------

    def put_job(self, key: str, project: int, project_key: str | None, label_config: str, model_version: str) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?)",
                       (key, int(project), project_key, label_config, model_version))

    def job(self, key: str) -> dict | None:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT project, project_key, label_config, model_version FROM jobs WHERE key=?",
                             (key,)).fetchone()
        return None if row is None else dict(zip(("project", "project_key", "label_config", "model_version"), row))

    def put_tasks(self, tasks: Sequence[Mapping[str, Any]], model_version: str, project: int, job: str,
                  limit: int) -> list[bool]:
        """Queue tasks (id + data only); per task whether it is in the outbox now (False: `limit` reached)."""
        with self._lock, self._connect() as db, transaction(db):
            return self._insert(db, tasks, model_version, project, job, limit)

    @staticmethod
    def _insert(db: sqlite3.Connection, tasks: Sequence[Mapping[str, Any]], model_version: str, project: int,
                job: str, limit: int) -> list[bool]:
        now = time.time()
        taken = []
        size = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
        for task in tasks:
            key = str(task["id"])
            if db.execute("SELECT 1 FROM items WHERE task=? AND model_version=?",
                          (key, model_version)).fetchone():
                taken.append(True)
                continue
            if size >= limit:
                taken.append(False)
                continue
            seq += 1
            db.execute("INSERT INTO items (task, model_version, project, job, state, task_data, created, seq) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, model_version, int(project), job, QUEUED,
                        json.dumps({"id": task["id"], "data": task.get("data")}), now, seq))
            size += 1
            taken.append(True)
        return taken

    def put_result(self, task: Any, model_version: str, result: list, score: float, prediction_version: str) -> None:
        """A computed prediction: kept until Label Studio has it."""
        with self._lock, self._connect() as db:
            db.execute("UPDATE items SET state=?, result=?, score=?, prediction_version=?, attempts=0, next_try=0, "
                       "error='', task_data='{}' WHERE task=? AND model_version=?",
                       (COMPUTED, json.dumps(result), float(score), prediction_version, str(task), model_version))

    # -- taking out ----------------------------------------------------------------------------------

    def _rows(self, where: str, args: tuple, limit: int, offset: int = 0) -> list[Row]:
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT task, model_version, project, job, state, task_data, result, score, "
                              f"prediction_version, attempts, next_try, error FROM items WHERE {where} "
                              "ORDER BY substr(job, 1, ?) = ?, seq LIMIT ? OFFSET ?",   # refresh rows last
                              (*args, len(REFRESH_PREFIX), REFRESH_PREFIX, limit, offset)).fetchall()
        return [Row(r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"),
                    json.loads(r[6]) if r[6] is not None else None, r[7], r[8], r[9], r[10], r[11]) for r in rows]

    def _first(self, state: str, limit: int, keys: Iterable[tuple[str, str]] | None, now: float | None) -> list[Row]:
        """The oldest `limit` rows of `state` that are due (and among `keys`), read a page at a time so
        that a long outbox is not decoded whole for each batch."""
        wanted = set(keys) if keys is not None else None
        now = time.time() if now is None else now
        out: list[Row] = []
        offset, page = 0, max(64, 4 * limit)
        while len(out) < limit:
            rows = self._rows("state=? AND next_try<=?", (state, now), page, offset)
            out += [r for r in rows if wanted is None or (r.task, r.model_version) in wanted]
            if len(rows) < page:
                break
            offset += page
        return out[:limit]

    def queued(self, limit: int, keys: Iterable[tuple[str, str]] | None = None, now: float | None = None) -> list[Row]:
        """Queued rows whose retry time has come, oldest first, refresh rows after all others (only `keys`
        (task, version), if given)."""
        return self._first(QUEUED, limit, keys, now)

    def due(self, limit: int, keys: Iterable[tuple[str, str]] | None = None, now: float | None = None) -> list[Row]:
        """Computed rows whose (re)try time has come, oldest first."""
        return self._first(COMPUTED, limit, keys, now)

    def keys(self) -> list[tuple[str, str]]:
        with self._lock, self._connect() as db:
            return db.execute("SELECT task, model_version FROM items ORDER BY seq").fetchall()

    def contains(self, task: Any, model_version: str) -> bool:
        with self._lock, self._connect() as db:
            return db.execute("SELECT 1 FROM items WHERE task=? AND model_version=?",
                              (str(task), model_version)).fetchone() is not None

    def among(self, tasks: Iterable[Any], model_version: str) -> set[str]:
        """Which of these task ids (as str) have a row of `model_version`."""
        keys = [str(t) for t in tasks]
        out: set[str] = set()
        with self._lock, self._connect() as db:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                out.update(r[0] for r in db.execute(
                    f"SELECT task FROM items WHERE model_version=? AND task IN ({marks})", (model_version, *part)))
        return out

    def next_try(self) -> float | None:
        """The earliest time a row becomes due (None: empty)."""
        with self._lock, self._connect() as db:
            value = db.execute("SELECT MIN(next_try) FROM items").fetchone()[0]
        return value

    def sizes(self) -> dict[str, int]:
        with self._lock, self._connect() as db:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        return {QUEUED: counts.get(QUEUED, 0), COMPUTED: counts.get(COMPUTED, 0)}

    def size(self) -> int:
        return sum(self.sizes().values())

    # -- settling ---------------------------------------------------------------------------------

    def done(self, rows: Iterable[tuple[str, str]]) -> None:
        """Stored (or given up): the rows go, and jobs no row needs any more with them."""
        with self._lock, self._connect() as db, transaction(db):
            db.executemany("DELETE FROM items WHERE task=? AND model_version=?", [(str(t), v) for t, v in rows])
            db.execute("DELETE FROM jobs WHERE key NOT IN (SELECT DISTINCT job FROM items)")

    def retry(self, task: Any, model_version: str, error: str, delay_s: float, count: bool = True) -> int:
        """Try this row again in `delay_s`; returns its attempts so far (not counted when `count` is False)."""
        with self._lock, self._connect() as db:
            db.execute("UPDATE items SET attempts=attempts+?, next_try=?, error=? WHERE task=? AND model_version=?",
                       (1 if count else 0, time.time() + delay_s, error[:500], str(task), model_version))
            row = db.execute("SELECT attempts FROM items WHERE task=? AND model_version=?",
                             (str(task), model_version)).fetchone()
        return row[0] if row else 0


    # -- refreshes after learning -----------------------------------------------------------------

    def request_refresh(self, project: int, project_key: str, learned: str) -> tuple[Refresh | None, list[tuple[str, str]]] | None:
        """Ask for a refresh of `project` to the learned version `learned`. None when that refresh is
        already asked for (another worker, a repeated call): nothing changes. Else (the refresh it
        replaces or None, the (task, version) rows of older refreshes of the project it dropped)."""
        job = refresh_job(project, learned)
        with self._lock, self._connect() as db, transaction(db):
            old = self._refresh(db, project)
            if old is not None and old.job == job:
                return None
            dropped = db.execute("SELECT task, model_version FROM items WHERE project=? AND substr(job, 1, ?) = ? "
                                 "AND job != ?", (int(project), len(REFRESH_PREFIX), REFRESH_PREFIX, job)).fetchall()
            db.execute("DELETE FROM items WHERE project=? AND substr(job, 1, ?) = ? AND job != ?",
                       (int(project), len(REFRESH_PREFIX), REFRESH_PREFIX, job))
            db.execute("DELETE FROM jobs WHERE key NOT IN (SELECT DISTINCT job FROM items)")
            db.execute("INSERT OR REPLACE INTO refreshes VALUES (?, ?, ?, ?, ?, 0, ?)",
                       (int(project), project_key, learned, job, PENDING, time.time()))
        return old, [tuple(r) for r in dropped]

    @staticmethod
    def _refresh(db: sqlite3.Connection, project: int) -> Refresh | None:
        row = db.execute("SELECT project, project_key, learned, job, state, total, requested FROM refreshes "
                         "WHERE project=?", (int(project),)).fetchone()
        return Refresh(*row) if row else None

    def refresh(self, project: int) -> Refresh | None:
        with self._lock, self._connect() as db:
            return self._refresh(db, project)

    def refreshes(self, state: str | None = None) -> list[Refresh]:
        """The refreshes asked for (of `state`), oldest request first."""
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT project, project_key, learned, job, state, total, requested FROM refreshes "
                              "WHERE ? IS NULL OR state=? ORDER BY requested", (state, state)).fetchall()
        return [Refresh(*r) for r in rows]

    def queue_refresh(self, refresh: Refresh, tasks: Sequence[Mapping[str, Any]], model_version: str,
                      limit: int, label_config: str) -> list[bool] | None:
        """Queue a pending refresh's tasks in the given order (its job with them) and mark it queued, in
        one transaction; None (nothing queued) when a newer refresh replaced it meanwhile."""
        with self._lock, self._connect() as db, transaction(db):
            now = self._refresh(db, refresh.project)
            if now is None or now.job != refresh.job or now.state != PENDING:
                return None
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                       (refresh.job, refresh.project, refresh.project_key, label_config, model_version))
            taken = self._insert(db, tasks, model_version, refresh.project, refresh.job, limit)
            db.execute("UPDATE refreshes SET state=?, total=? WHERE project=?",
                       (QUEUED, sum(taken), refresh.project))
        return taken

    def drop_refresh(self, refresh: Refresh) -> bool:
        """Forget this refresh (only if it is still the project's): True if it was."""
        with self._lock, self._connect() as db:
            return db.execute("DELETE FROM refreshes WHERE project=? AND job=?",
                              (refresh.project, refresh.job)).rowcount > 0

    def finish_refresh(self, job: str) -> Refresh | None:
        """When the queued refresh of `job` has no rows left, forget it and return it, once (to whichever
        process asks first); else None."""
        with self._lock, self._connect() as db, transaction(db):
            row = db.execute("SELECT project FROM refreshes WHERE job=? AND state=?", (job, QUEUED)).fetchone()
            if row is None:
                return None
            left = db.execute("SELECT COUNT(*) FROM items WHERE job=?", (job,)).fetchone()[0]
            if left:
                return None
            refresh = self._refresh(db, row[0])
            db.execute("DELETE FROM refreshes WHERE project=?", (row[0],))
            db.execute("DELETE FROM jobs WHERE key=?", (job,))
        return refresh

    def rows_of(self, job: str) -> int:
        with self._lock, self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM items WHERE job=?", (job,)).fetchone()[0]

    def refresh_sizes(self) -> dict[str, int]:
        """Rows of refreshes by state (queued, computed) and refreshes waiting to be listed (pending)."""
        with self._lock, self._connect() as db:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM items WHERE substr(job, 1, ?) = ? GROUP BY state",
                                     (len(REFRESH_PREFIX), REFRESH_PREFIX)).fetchall())
            pending = db.execute("SELECT COUNT(*) FROM refreshes WHERE state=?", (PENDING,)).fetchone()[0]
        return {QUEUED: counts.get(QUEUED, 0), COMPUTED: counts.get(COMPUTED, 0), PENDING: pending}


class Breaker:
    """A circuit breaker for one remote (Label Studio): open after a failure, one probe per back-off.

    `ready()` says whether a call may go now; `failure(why)` opens it (or lengthens the wait after a
    failed probe); `success()` closes it. The log says once that the remote is down and once that it
    is back (`on_change(reachable)` is called at each of those moments, e.g. to set a gauge)."""

    def __init__(self, name: str = "Label Studio", base_s: float = 1.0, max_s: float = 30.0,
                 on_change: Callable[[bool], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.base_s = base_s
        self.max_s = max_s
        self.on_change = on_change
        self.clock = clock
        self.reachable = True
        self.down_since: float | None = None
        self.failures = 0
        self.next_probe = 0.0
        self.last_outage_s: float | None = None
        self._lock = threading.Lock()

    def ready(self) -> bool:
        with self._lock:
            return self.reachable or self.clock() >= self.next_probe

    def wait_s(self) -> float:
        """Seconds until the next call may go (0 when closed)."""
        with self._lock:
            return 0.0 if self.reachable else max(0.0, self.next_probe - self.clock())

    def failure(self, why: str, waiting: str = "") -> None:
        with self._lock:
            now = self.clock()
            self.failures += 1
            self.next_probe = now + backoff(self.failures, self.base_s, self.max_s)
            if not self.reachable:
                return
            self.reachable = False
            self.down_since = now
        logger.warning("%s is unreachable (%s): computing paused, computed predictions are kept in the outbox%s; "
                       "trying again every %g-%g s", self.name, why, f" ({waiting})" if waiting else "",
                       self.base_s, self.max_s)
        if self.on_change is not None:
            self.on_change(False)

    def success(self, waiting: str = "") -> None:
        with self._lock:
            self.failures = 0
            if self.reachable:
                return
            self.reachable = True
            now = self.clock()
            self.last_outage_s = now - (self.down_since if self.down_since is not None else now)
            self.down_since = None
        logger.warning("%s is reachable again after %.1f s: resuming%s", self.name, self.last_outage_s,
                       f" ({waiting})" if waiting else "")
        if self.on_change is not None:
            self.on_change(True)
