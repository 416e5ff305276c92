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
        now = time.time()
        taken = []
        with self._lock, self._connect() as db, transaction(db):
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
                              "ORDER BY seq LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
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
        """Queued rows whose retry time has come, oldest first (only `keys` (task, version), if given)."""
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
