"""Batch /predict within a time budget, and a background finisher for what did not fit.

Label Studio's "Retrieve Predictions" sends every selected task in one `/predict` and gives up
after ML_TIMEOUT_PREDICT (100 s), storing nothing. `BudgetedBatch.predict` answers within
GEM_PREDICT_BUDGET instead: tasks done in time are answered as usual (Label Studio stores them),
the rest are answered without `result` (Label Studio stores nothing for them) and handed to the
`BackgroundFinisher`, which predicts them in this process and stores each prediction through
Label Studio's API (task, result, score, model_version).

Exactly one prediction per task:
* `ClaimStore` (backend/claims.py, MODEL_DIR/claims.sqlite) gives each (task, model version) to one
  process at a time, so gunicorn workers and repeated clicks do not compute a task twice; a task
  someone else is finishing is answered without `result`;
* right before storing, the finisher asks Label Studio whether the task already holds a
  prediction of this version (Label Studio is the authority) and stores nothing if so;
* nothing is persisted that would block a retry: claims are released when done, on shutdown, and
  expire or die with their process. A later Retrieve Predictions sends only tasks still lacking
  a prediction of the current version.

The finisher also refreshes a project after learning (docs/LEARNING.md, "Refresh after learning"):
`request_refresh` (called by the learner when a publication changed the project's learned version)
writes a refresh into the outbox, replacing and dropping an older one of the project; the worker
lists the project's unlabeled tasks (`_refresh_next`, backend/refresh.py picks and orders them) and
queues them as rows of the refresh's job, which then go the way of every row: claims, the breaker,
"does Label Studio hold this version already" before storing, after the rows a user asked for.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from .claims import ClaimHolder, ClaimStore, Heartbeat
from .label_config import LabelConfigError
from .ls_client import LabelStudioClient, LabelStudioError, task_prediction_versions
from .model import ModelNotReady
from .outbox import (COMPUTED, PENDING, QUEUED, REFRESH_PREFIX, Breaker, Outbox, Refresh, Row, backoff,
                     unreachable)
from .pipeline import DEFERRED, PredictionJob, PredictionPipeline, PredictReport, TaskOutcome, task_id
from .prompts import project_key
from .refresh import RefreshPicker

logger = logging.getLogger("backend.background")

# TaskOutcome.reason of tasks answered without `result` that are on their way, not failed.
LATER_REASONS = frozenset({DEFERRED, "background", "stored", "busy"})


# Image failures that may only mean "Label Studio (which serves the image) is down": Label Studio is
# asked before such a task is counted as failed.
TRANSIENT_FETCH = frozenset({"connection", "timeout", "http_5xx"})
STORE_ATTEMPTS = 5              # a prediction Label Studio keeps refusing (not unreachable) is given up after this
ADOPT_EVERY_S = 30.0            # how often rows of dead processes are looked for
REFRESH_LOG_EVERY_S = 10.0      # a refresh's progress line at most this often
LEARNED_SUFFIX = re.compile(r"\+l[0-9a-f]{10}$")


def job_key(project: int, version: str, label_config: str) -> str:
    return f"{project}|{version}|{hashlib.sha1(label_config.encode('utf-8', 'replace')).hexdigest()[:16]}"


class BackgroundFinisher:
    """Predicts and stores tasks handed over by /predict, from a durable outbox (backend/outbox.py).

    `pipeline()` returns the loaded pipeline (ModelNotReady while loading: the worker waits);
    `client` stores predictions (None: finishing is unavailable, `unavailable` says why);
    `outbox` is MODEL_DIR's Outbox; `prepare(label_config, project_key)` rebuilds a job that a
    previous process queued. `max_queue` bounds the rows. One worker thread; thread-safe.

    Nothing computed is thrown away: a prediction is written to the outbox before it is stored,
    and a task whose image or store failed because Label Studio is unreachable waits. While Label
    Studio is unreachable (the breaker is open) nothing new is computed; a probe per back-off
    period finds it back, and the worker goes on by itself. Rows left by a dead process (a
    restart, a SIGKILL) are adopted through their claims, whose holder is then dead.
    """

    def __init__(self, pipeline: Callable[[], PredictionPipeline], client: LabelStudioClient | None,
                 claims: ClaimStore, max_queue: int, metrics: Any = None, unavailable: str = "",
                 batch_tasks: int = 16, outbox: Outbox | None = None,
                 prepare: Callable[[str, Any], PredictionJob] | None = None, retry_max_s: float = 30.0,
                 refresh_max_tasks: int = 0):
        self._pipeline = pipeline
        self.client = client
        self.claims = claims
        self.holder = claims.holder("background")   # the queue's claims: handed over by requests
        self.max_queue = max_queue
        self.metrics = metrics
        self.unavailable = unavailable if client is None else ""
        if client is not None and max_queue <= 0:
            self.unavailable = "background finishing is off (GEM_BACKGROUND_QUEUE=0)"
        if outbox is None and self.available:
            path = os.path.join(os.path.dirname(os.path.abspath(claims.path)), "outbox.sqlite")
            try:
                outbox = Outbox(path)
            except (OSError, sqlite3.Error) as exc:
                self.unavailable = f"the background outbox {path} cannot be used: {exc}"
                logger.warning("background finishing is off: %s", self.unavailable)
        self.outbox = outbox
        self._prepare = prepare
        self.batch_tasks = batch_tasks
        self.retry_max_s = retry_max_s
        self.breaker = Breaker("Label Studio", base_s=min(1.0, retry_max_s), max_s=retry_max_s,
                               on_change=self._reachable_changed)
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "dropped": 0}
        self.refresh_max_tasks = refresh_max_tasks    # GEM_REFRESH_MAX_TASKS; 0 = no refresh after learning
        self.refresh_counts = {"queued": 0, "done": 0, "skipped": 0, "failed": 0, "labelled": 0, "cancelled": 0}
        self._refresh_logged: dict[str, float] = {}
        self._mine: set[tuple[str, str]] = set()      # outbox rows (task, version) this process works on
        self._queued_ids = self._mine
        self._jobs: dict[str, PredictionJob] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._beat = Heartbeat(self.holder)
        self._adopted = 0.0
        self._poked = False       # set with every wake-up, so one that comes mid-iteration is not lost
        if metrics is not None and self.available:
            metrics.label_studio_reachable.set(1)
            metrics.before_render.append(self._set_gauge)
            metrics.before_render.append(self._set_refresh_gauge)

    @property
    def available(self) -> bool:
        return not self.unavailable

    def queued(self) -> int:
        """Rows (waiting to be computed or stored) this process works on."""
        with self._cond:
            return len(self._mine)

    def is_queued(self, task: Any, model_version: str) -> bool:
        """Whether the task is in the outbox (this process's or another's, computed or not)."""
        with self._cond:
            if (str(task), model_version) in self._mine:
                return True
        return self.outbox is not None and self.available and self.outbox.contains(task, model_version)

    def queued_among(self, tasks: Sequence[Any], model_version: str) -> set[str]:
        """The ids (as str) of these tasks that are in the outbox (any process's), in one query."""
        with self._cond:
            out = {str(t) for t in tasks if (str(t), model_version) in self._mine}
        if self.outbox is not None and self.available:
            out |= self.outbox.among(tasks, model_version)
        return out

    def resume(self) -> None:
        """Start the worker: it finishes what the outbox holds (a restart after a crash or a shutdown)
        and, idle, looks at the outbox every ADOPT_EVERY_S for rows of dead processes and for
        refreshes written by another process (`python -m backend.learning rebuild|reset`)."""
        if not self.available or self.outbox is None:
            return
        sizes = self.outbox.sizes()
        refreshes = self.outbox.refreshes(PENDING)
        if sum(sizes.values()) or refreshes:
            logger.info("background: resuming what the outbox holds from before: %d tasks to predict, %d predictions "
                        "to store, %d refreshes to list", sizes[QUEUED], sizes[COMPUTED], len(refreshes))
        self._start()
        with self._cond:        # already running and idle: adopt and look now
            self._adopted = 0.0
            self._wake()

    def submit(self, tasks: Sequence[Mapping[str, Any]], job: PredictionJob, project: int,
               label_config: str | None = None) -> list[bool]:
        """Queue these tasks (their claims already handed to `self.holder`); per task, whether taken."""
        with self._cond:
            if self._stopping or not self.available or self.outbox is None:
                return [False] * len(tasks)
        version = job.model_version
        key = job_key(project, version, label_config or "")
        self._jobs[key] = job
        self.outbox.put_job(key, project, job.project, label_config or "", version)
        taken = self.outbox.put_tasks(tasks, version, project, key, self.max_queue)
        with self._cond:
            self._mine.update((str(task_id(t)), version) for t, ok in zip(tasks, taken) if ok)
            self._wake()
        self._set_gauge()
        self._start()
        if any(taken):
            logger.info("background: queued %d tasks of project %s (%d waiting)", sum(taken), project, self.queued())
        return taken

    def _start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._beat.start()
                self._thread = threading.Thread(target=self._run, name="gem-background", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 20.0) -> None:
        """Stop (the batch in progress may finish, up to `timeout`). The outbox keeps the rest for the next
        start of the backend; the claims are released so another worker may take the rows at once."""
        with self._cond:
            self._stopping = True
            left = len(self._mine)
            self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._beat.stop()
        if left:
            logger.info("background: shutting down; %d tasks stay in the outbox and are finished after the next "
                        "start", left)
        self.holder.release_all()
        with self._cond:
            self._mine.clear()
        self._set_gauge()

    # -- worker -------------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            if not self._stopping and not self._poked:
                self._cond.wait(max(0.01, seconds))
            self._poked = False

    def _wake(self) -> None:
        """Wake the worker now; caller holds self._cond. Remembered when the worker is not waiting
        (in the middle of an iteration), so its next sleep returns at once."""
        self._poked = True
        self._cond.notify_all()

    def _stopped(self) -> bool:
        with self._cond:
            return self._stopping

    def _run(self) -> None:
        while not self._stopped():
            try:
                if not self.breaker.ready():
                    self._sleep(self.breaker.wait_s())
                    continue
                if not self.breaker.reachable and not self._probe():
                    continue
                self._adopt()
                worked = self._store_due()
                if self.breaker.reachable and not self._stopped():
                    worked = self._compute_next() or worked
                if not worked and self.breaker.reachable and not self._stopped():
                    worked = self._refresh_next()
                if not worked:
                    self._idle()
            except ModelNotReady:
                self._sleep(1.0)
            except Exception:   # never let one batch end the worker
                logger.exception("background: unexpected error; going on")
                self._sleep(1.0)

    def _idle(self) -> None:
        next_try = self.outbox.next_try() if self._mine else None   # type: ignore[union-attr]
        wait = ADOPT_EVERY_S if next_try is None else min(ADOPT_EVERY_S, next_try - time.time())
        self._sleep(wait)

    def _probe(self, project: int | None = None) -> bool:
        """Ask Label Studio something cheap; True (and the breaker closed) if it answered."""
        try:
            if project is None:
                self.client.request("GET", "api/projects/", params={"page_size": 1})   # type: ignore[union-attr]
            else:
                self.client.get_project(project)                                       # type: ignore[union-attr]
        except LabelStudioError as exc:
            if unreachable(exc):
                self.breaker.failure(str(exc), self._waiting())
                return False
        self.breaker.success(self._waiting())
        return True

    def _waiting(self) -> str:
        sizes = self.outbox.sizes() if self.outbox is not None else {QUEUED: 0, COMPUTED: 0}
        return f"{sizes[COMPUTED]} predictions to store, {sizes[QUEUED]} tasks to predict"

    def _adopt(self) -> None:
        """Take the rows no live holder has: ours after a restart, or a dead worker's."""
        now = time.monotonic()
        if now - self._adopted < ADOPT_EVERY_S and self._adopted:
            return
        self._adopted = now
        by_version: dict[str, list[str]] = {}
        with self._cond:
            mine = set(self._mine)      # read before the keys: a row is in the outbox before it is ours
        keys = self.outbox.keys()       # type: ignore[union-attr]
        gone = mine - set(keys)         # dropped by another process (a newer refresh of the project)
        if gone:
            self._forget(gone)
        for refresh in self.outbox.refreshes(QUEUED):   # type: ignore[union-attr]
            self._refresh_settled({refresh.job}, progress=False)   # last rows settled by a process that died then
        for task, version in keys:
            if (task, version) not in mine:
                by_version.setdefault(version, []).append(task)
        adopted = 0
        for version, tasks in by_version.items():
            granted = self.holder.claim(tasks, version)
            adopted += len(granted)
            with self._cond:
                self._mine.update((t, version) for t in granted)
        if adopted:
            logger.info("background: took over %d tasks of the outbox that no live process was working on", adopted)
            self._set_gauge()

    def _forget(self, keys: set[tuple[str, str]]) -> None:
        """Rows no longer in the outbox: not ours any more, their claims released."""
        by_version: dict[str, list[str]] = {}
        for task, version in keys:
            by_version.setdefault(version, []).append(task)
        for version, tasks in by_version.items():
            self.holder.release(tasks, version)
        with self._cond:
            self._mine.difference_update(keys)
        self._set_gauge()

    def _settle(self, rows: Sequence[Row], stored: bool) -> None:
        keys = [(r.task, r.model_version) for r in rows]
        self.outbox.done(keys)   # type: ignore[union-attr]
        by_version: dict[str, list[str]] = {}
        for task, version in keys:
            by_version.setdefault(version, []).append(task)
        for version, tasks in by_version.items():
            if stored:
                self.holder.mark_stored(tasks, version)
            else:
                self.holder.release(tasks, version)
        with self._cond:
            self._mine.difference_update(keys)
        self._set_gauge()
        self._refresh_settled({r.job for r in rows if r.job.startswith(REFRESH_PREFIX)})

    def _store_due(self) -> bool:
        """Store the computed predictions whose time has come; False when there were none."""
        with self._cond:
            mine = set(self._mine)
        rows = self.outbox.due(self.batch_tasks, keys=mine)   # type: ignore[union-attr]
        for row in rows:
            if self._stopped():
                break
            tid = int(row.task)
            if row.job.startswith(REFRESH_PREFIX) and not self.outbox.contains(row.task, row.model_version):  # type: ignore
                self._forget({(row.task, row.model_version)})   # cancelled by a newer version since it was read
                continue
            try:
                if self.client.has_prediction(tid, row.prediction_version):   # type: ignore[union-attr]
                    self._count("skipped", rows=[row])
                else:
                    self.client.create_prediction(tid, row.result or [], row.score,  # type: ignore[union-attr]
                                                  row.prediction_version)
                    self._count("done", rows=[row])
            except LabelStudioError as exc:
                if unreachable(exc):
                    self.outbox.retry(row.task, row.model_version, str(exc), 0.0, count=False)  # type: ignore
                    self.breaker.failure(str(exc), self._waiting())
                    return True
                attempts = self.outbox.retry(row.task, row.model_version, str(exc),  # type: ignore[union-attr]
                                             backoff(row.attempts + 1, 1.0, self.retry_max_s))
                if attempts >= STORE_ATTEMPTS or exc.status == 404:
                    logger.warning("background: task %s: Label Studio refused the prediction %d times, giving up: %s",
                                   tid, attempts, exc)
                    self._count("failed", rows=[row])
                    self._settle([row], stored=False)
                else:
                    logger.warning("background: task %s: storing failed (attempt %d of %d, retrying): %s",
                                   tid, attempts, STORE_ATTEMPTS, exc)
                continue
            self.breaker.success(self._waiting())
            self._settle([row], stored=True)
        if rows:
            self._log_progress()
        return bool(rows)

    def _job_for(self, key: str) -> PredictionJob:
        job = self._jobs.get(key)
        if job is None:
            saved = self.outbox.job(key)   # type: ignore[union-attr]
            if saved is None:
                raise LabelConfigError("the job of these tasks is not in the outbox")
            label_config = saved["label_config"]
            if not label_config:    # handed over without a config: ask Label Studio for the project's
                label_config = (self.client.get_project(saved["project"]) or {}).get("label_config") or ""  # type: ignore
            if self._prepare is None:
                raise LabelConfigError("this finisher cannot rebuild jobs of an earlier process")
            job = self._prepare(label_config, saved["project_key"] or str(saved["project"]))
            self._jobs[key] = job
        return job

    def _compute_next(self) -> bool:
        """Predict the next batch of queued rows (one job); False when there were none."""
        with self._cond:
            mine = set(self._mine)
        rows = self.outbox.queued(4 * self.batch_tasks, keys=mine)   # type: ignore[union-attr]
        if not rows:
            return False
        rows = [r for r in rows if r.job == rows[0].job][:self.batch_tasks]
        pipeline = self._pipeline()
        if pipeline is None:
            raise ModelNotReady("the model is loading", failed=False)   # _run waits
        if rows[0].job.startswith(REFRESH_PREFIX):
            rows = self._still_unlabeled(rows)
            if not rows:
                return True
        try:
            job = self._job_for(rows[0].job)
        except LabelStudioError as exc:
            if unreachable(exc):
                self.breaker.failure(str(exc), self._waiting())
                return True
            raise
        except (LabelConfigError, ValueError) as exc:
            logger.warning("background: %d tasks cannot be predicted any more: %s", len(rows), exc)
            self._count("failed", len(rows), rows=rows)
            self._settle(rows, stored=False)
            return True
        with self.holder.heartbeat():
            predictions, report = pipeline.predict([r.task_data for r in rows], job)
        transient = []
        failed = []
        for row, prediction, outcome in zip(rows, predictions, report.outcomes):
            if outcome.ok and "result" in prediction:
                self.outbox.put_result(row.task, row.model_version, prediction["result"],  # type: ignore[union-attr]
                                       prediction.get("score", 0.0), prediction["model_version"])
            elif outcome.reason in TRANSIENT_FETCH:
                transient.append((row, outcome))
            else:
                failed.append((row, outcome))
        if transient and not self._probe(rows[0].project):
            # Label Studio (which serves the images) is down: these tasks wait, they did not fail.
            for row, outcome in transient:
                self.outbox.retry(row.task, row.model_version, outcome.message, 0.0, count=False)  # type: ignore
        else:
            failed += transient
        for row, outcome in failed:
            logger.warning("background: task %s failed: %s", row.task, outcome.message)
        if failed:
            self._count("failed", len(failed), rows=[r for r, _ in failed])
            self._settle([r for r, _ in failed], stored=False)
        return True

    # -- refresh after learning --------------------------------------------------------------------

    def request_refresh(self, project: str, learned: str) -> bool:
        """The learner published a new learned version of `project` (as /predict names it, "<id>.<created>"):
        refresh the project's unlabeled tasks in the background. An older refresh of the project is
        cancelled (its rows dropped, computed or not). False when off, unavailable or already asked for."""
        project_id = label_studio_project_id(project)
        if project_id is None or self.outbox is None or not self.available:
            if project_id is not None:
                logger.info("project %s: no refresh after learning: %s", project_id, self.unavailable)
            return False
        if self.refresh_max_tasks <= 0:
            logger.info("project %s: learned version %s; no refresh after learning (GEM_REFRESH_MAX_TASKS=0): "
                        "Retrieve Predictions recomputes the stale predictions", project_id, learned or "none")
            return False
        answer = self.outbox.request_refresh(project_id, str(project), learned)
        if answer is None:
            return False
        old, dropped = answer
        if dropped:
            self._forget(set(dropped))
            self._count_refresh("cancelled", len(dropped))
        if old is not None:
            self._note_refresh("cancelled")
            logger.info("refresh of project %s to learned version %s cancelled by the newer version %s: %d of its tasks "
                        "not predicted", project_id, old.learned or "none", learned or "none", len(dropped))
        self._note_refresh("requested")
        logger.info("refresh of project %s to learned version %s asked for: its unlabeled tasks are predicted again "
                    "in the background, lowest score first, at most %d", project_id, learned or "none",
                    self.refresh_max_tasks)
        self._start()
        with self._cond:
            self._wake()
        return True

    def _note_refresh(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.refreshes.inc(event=event)

    def _refresh_next(self) -> bool:
        """List the next refresh waiting to be listed (one no other process is listing); False when none."""
        if self.outbox is None or self.client is None:
            return False
        for refresh in self.outbox.refreshes(PENDING):
            if self.refresh_max_tasks <= 0:
                logger.info("refresh of project %s dropped: GEM_REFRESH_MAX_TASKS=0", refresh.project)
                self.outbox.drop_refresh(refresh)
                continue
            token = f"{REFRESH_PREFIX}{refresh.project}"
            if not self.holder.claim([token], refresh.learned, project=str(refresh.project)):
                continue            # another process lists it
            try:
                self._list_refresh(refresh)
            finally:
                self.holder.release([token], refresh.learned)
            return True
        return False

    def _superseded(self, refresh: Refresh) -> bool:
        now = self.outbox.refresh(refresh.project)   # type: ignore[union-attr]
        return now is None or now.job != refresh.job

    def _list_refresh(self, refresh: Refresh) -> None:
        project = refresh.project
        started = time.monotonic()
        try:
            config = (self.client.get_project(project) or {}).get("label_config") or ""   # type: ignore[union-attr]
            if self._prepare is None:
                raise LabelConfigError("this finisher cannot prepare jobs")
            job = self._prepare(config, refresh.project_key)
            version = job.model_version
            suffix = LEARNED_SUFFIX.search(version)
            if (suffix.group(0)[1:] if suffix else "") != refresh.learned:
                # Published again since (its refresh replaces this one), or this process predicts without
                # the learned state: nothing to refresh to.
                logger.info("refresh of project %s to learned version %s dropped: the project's predictions are "
                            "of version %s now", project, refresh.learned or "none", version)
                self.outbox.drop_refresh(refresh)   # type: ignore[union-attr]
                return
            self._jobs[refresh.job] = job
            picker = RefreshPicker(self.refresh_max_tasks, version)
            after: int | None = 0
            while after is not None:
                if self._stopped():
                    return          # still pending: listed again after the next start
                if self._superseded(refresh):
                    logger.info("refresh of project %s to learned version %s: listing stopped, a newer version "
                                "replaced it", project, refresh.learned or "none")
                    return
                tasks, after = self.client.tasks_after(project, after, only_unlabeled=True,   # type: ignore[union-attr]
                                                       fields="all")
                picker.offer_all(tasks, self.queued_among([t.get("id") for t in tasks], version))
        except ModelNotReady:
            raise
        except LabelStudioError as exc:
            if unreachable(exc):
                self.breaker.failure(str(exc), self._waiting())   # stays pending: listed when Label Studio is back
                return
            logger.warning("refresh of project %s to learned version %s dropped: %s", project,
                           refresh.learned or "none", exc)
            self.outbox.drop_refresh(refresh)   # type: ignore[union-attr]
            return
        except (LabelConfigError, ValueError) as exc:
            logger.warning("refresh of project %s dropped: %s", project, exc)
            self.outbox.drop_refresh(refresh)   # type: ignore[union-attr]
            return
        picked = picker.picked()
        granted = self.holder.claim([str(t["id"]) for t in picked], version, project=str(project))
        chosen = [t for t in picked if str(t["id"]) in granted]
        taken = self.outbox.queue_refresh(refresh, chosen, version, self.max_queue, config)   # type: ignore[union-attr]
        if taken is None:
            self.holder.release(granted, version)
            logger.info("refresh of project %s to learned version %s: listed, but a newer version replaced it "
                        "meanwhile; nothing queued", project, refresh.learned or "none")
            return
        queued = [(str(t["id"]), version) for t, ok in zip(chosen, taken) if ok]
        self.holder.release([str(t["id"]) for t, ok in zip(chosen, taken) if not ok], version)
        with self._cond:
            self._mine.update(queued)
            self._wake()
        self._count_refresh("queued", len(queued))
        self._note_refresh("started")
        self._set_gauge()
        logger.info("refresh of project %s to version %s: %d unlabeled tasks to predict, lowest score first "
                    "(%d listed in %.1f s: %d without a scored prediction, %d already of this version, %d left out by "
                    "GEM_REFRESH_MAX_TASKS=%d, %d busy elsewhere, %d not taken: background queue full)",
                    project, version, len(queued), picker.listed, time.monotonic() - started, picker.unscored,
                    picker.current, picker.left_out, self.refresh_max_tasks, len(picked) - len(chosen),
                    len(chosen) - len(queued))
        self._refresh_settled({refresh.job})

    def _still_unlabeled(self, rows: list[Row]) -> list[Row]:
        """The refresh rows whose task is still unlabeled (asked in one call); the others are settled."""
        ids = [int(r.task) for r in rows]
        try:
            unlabeled = {str(t.get("id")) for t in self.client.iter_tasks_by_id(   # type: ignore[union-attr]
                rows[0].project, task_ids=ids, only_unlabeled=True, fields="task_only")}
        except LabelStudioError as exc:
            if unreachable(exc):
                self.breaker.failure(str(exc), self._waiting())
                return []
            # Not known: predict them; storing still asks Label Studio whether the version is there.
            logger.warning("refresh: could not ask Label Studio which of %d tasks are still unlabeled: %s",
                           len(rows), exc)
            return rows
        labelled = [r for r in rows if r.task not in unlabeled]
        if labelled:
            logger.info("refresh: %d tasks labelled since they were listed are not predicted again", len(labelled))
            self._count_refresh("labelled", len(labelled))
            self._settle(labelled, stored=False)
        return [r for r in rows if r.task in unlabeled]

    def _refresh_settled(self, jobs: set[str], progress: bool = True) -> None:
        """Progress lines of refreshes whose rows were settled; the done line (once, by whoever settles last)."""
        for job in jobs:
            done = self.outbox.finish_refresh(job)   # type: ignore[union-attr]
            if done is not None:
                self._refresh_logged.pop(job, None)
                self._note_refresh("done")
                logger.info("refresh of project %s to learned version %s done: %d tasks in %.0f s since it was "
                            "asked for", done.project, done.learned or "none", done.total,
                            time.time() - done.requested)
                continue
            now = time.monotonic()
            if not progress or now - self._refresh_logged.get(job, 0.0) < REFRESH_LOG_EVERY_S:
                continue
            self._refresh_logged[job] = now
            refresh = self.outbox.refresh(int(job.split("|")[1]))   # type: ignore[union-attr]
            if refresh is not None and refresh.job == job and refresh.state == QUEUED:
                logger.info("refresh of project %s to learned version %s: %d of %d tasks left", refresh.project,
                            refresh.learned or "none", self.outbox.rows_of(job), refresh.total)   # type: ignore

    def _log_progress(self) -> None:
        logger.info("background: %d done, %d failed, %d skipped so far; %d waiting",
                    self.counts["done"], self.counts["failed"], self.counts["skipped"], self.queued())

    def _reachable_changed(self, reachable: bool) -> None:
        if self.metrics is not None:
            self.metrics.label_studio_reachable.set(1 if reachable else 0)
        if reachable:
            with self._cond:
                self._wake()

    def _count(self, outcome: str, n: int = 1, rows: Sequence[Row] = ()) -> None:
        self.counts[outcome] += n
        if self.metrics is not None and n:
            self.metrics.background_tasks.inc(n, outcome=outcome)
        self._count_refresh(outcome, sum(1 for r in rows if r.job.startswith(REFRESH_PREFIX)))

    def _count_refresh(self, outcome: str, n: int) -> None:
        if n:
            self.refresh_counts[outcome] += n
            if self.metrics is not None:
                self.metrics.refresh_tasks.inc(n, outcome=outcome)

    def _set_refresh_gauge(self) -> None:
        if self.metrics is not None and self.outbox is not None:
            for state, n in self.outbox.refresh_sizes().items():
                self.metrics.refresh_outbox.set(n, state=state)

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            with self._cond:
                self.metrics.background_queued.set(len(self._mine))
            if self.outbox is not None:
                sizes = self.outbox.sizes()
                for state, n in sizes.items():
                    self.metrics.outbox_tasks.set(n, state=state)


def _claim_key(tid: Any) -> str | None:
    if isinstance(tid, int) and not isinstance(tid, bool):
        return str(tid)
    if isinstance(tid, str) and tid.isascii() and tid.isdigit():
        return tid
    return None


def label_studio_project_id(project: Any) -> int | None:
    """Label Studio's project id from what /predict sends ("3.1712345678" or 3)."""
    key = project_key(project)
    try:
        return int(key) if key is not None else None
    except ValueError:
        return None


class BudgetedBatch:
    """A batch /predict within GEM_PREDICT_BUDGET, with the rest left to the finisher.

    `model` is the GemBackendModel (it prepares the job: config, memory, learned data).
    """

    def __init__(self, model: Any, finisher: BackgroundFinisher, claims: ClaimStore, budget_s: float,
                 metrics: Any = None):
        self.model = model
        self.finisher = finisher
        self.claims = claims
        self.budget_s = budget_s
        self.metrics = metrics

    def predict(self, tasks: Sequence[Mapping[str, Any]], *, label_config: str | None = None,
                project: Any = None) -> tuple[list[dict], PredictReport]:
        started = time.monotonic()
        job = self.model.prepare(None, label_config=label_config, project=project)
        version = job.model_version
        n = len(tasks)
        answers: list[dict | None] = [None] * n
        outcomes = [TaskOutcome(task_id=task_id(t)) for t in tasks]

        def leave(i: int, reason: str, message: str) -> None:
            answers[i] = {"model_version": version, "score": 0.0, "error": message}
            outcomes[i].ok, outcomes[i].reason, outcomes[i].message = False, reason, message

        ids = [_claim_key(task_id(t)) for t in tasks]   # None: an odd id, predicted without a claim
        holder = self.claims.holder("predict")           # this request's claims, nobody else's
        try:
            return self._predict(tasks, ids, job, holder, started, answers, outcomes, leave, project, label_config)
        finally:
            holder.release_all()    # whatever is neither answered, handed over nor released yet

    def _predict(self, tasks, ids, job: PredictionJob, holder: ClaimHolder, started: float, answers: list,
                 outcomes: list, leave: Callable, project: Any,
                 label_config: str | None) -> tuple[list[dict], PredictReport]:
        version = job.model_version
        n = len(tasks)
        others = holder.busy([t for t in ids if t is not None], version)
        others |= self.finisher.queued_among([t for t in ids if t is not None], version)
        for i, task in enumerate(tasks):
            if version in task_prediction_versions(task):
                leave(i, "stored", "the task already holds a prediction of this model version")
            elif ids[i] is not None and ids[i] in others:
                leave(i, "background", "being predicted by another request or in the background, or just "
                                       "stored: that one's prediction is the one Label Studio keeps")
        elsewhere = sum(1 for o in outcomes if o.reason == "background")
        if elsewhere:
            logger.info("/predict: %d of %d tasks answered without a result: another request, process or the "
                        "background finisher has them (one prediction per task)", elsewhere, n)
        todo = [i for i in range(n) if answers[i] is None]
        claimable = [ids[i] for i in todo if ids[i] is not None]
        held = holder.claim(claimable, version, project=project_key(project))
        lost = [i for i in todo if ids[i] is not None and ids[i] not in held]
        for i in lost:
            leave(i, "busy", "another request is predicting it right now (or just answered it): Label Studio "
                             "keeps that request's prediction, so this answer carries no result")
            todo.remove(i)
        if lost:
            logger.info("/predict: %d of %d tasks left without a result: another request is predicting them now",
                        len(lost), n)

        deadline = started + self.budget_s if self.budget_s > 0 else None
        with holder.heartbeat():
            predictions, report = self.model.pipeline.predict([tasks[i] for i in todo], job, deadline=deadline)
        deferred = {todo[k] for k in report.deferred}
        for k, i in enumerate(todo):
            answers[i] = predictions[k]
            outcomes[i] = report.outcomes[k]
        # Done (or failed) now: Label Studio stores the answer itself; the claims are no longer needed.
        # (No "just answered" marker: a client may ask for the same task again on purpose, and
        # Label Studio lists a stored prediction in the next body, which is answered "stored".)
        holder.release([ids[i] for i in todo if i not in deferred and ids[i] is not None], version)
        if deferred:
            self._hand_over(sorted(deferred), tasks, ids, job, project, answers, outcomes, holder, label_config)
        report.outcomes = outcomes   # type: ignore[assignment]
        report.deferred = sorted(deferred)
        return answers, report   # type: ignore[return-value]

    def _hand_over(self, deferred: list[int], tasks, ids, job: PredictionJob, project: Any,
                   answers: list, outcomes: list, holder: ClaimHolder, label_config: str | None) -> None:
        version = job.model_version
        project_id = label_studio_project_id(project)
        unclaimed = [i for i in deferred if ids[i] is None]   # odd ids: the finisher cannot store them
        deferred = [i for i in deferred if ids[i] is not None]
        for i in unclaimed:
            answers[i]["error"] = outcomes[i].message = "not predicted: the time budget ran out"
        budget = f"GEM_PREDICT_BUDGET={self.budget_s:g} s"
        if not self.finisher.available or project_id is None:
            why = self.finisher.unavailable or "the request names no Label Studio project"
            message = (f"not predicted: the time budget ({budget}) ran out and the rest cannot be finished in the "
                       f"background: {why}; select fewer tasks or run `python -m backend.prelabel`")
            logger.warning("%d of %d tasks left unpredicted: %s", len(deferred), len(tasks), message)
            holder.release([ids[i] for i in deferred], version)
            self._note("unavailable", len(deferred))
            for i in deferred:
                answers[i]["error"] = outcomes[i].message = message
            return
        holder.transfer([ids[i] for i in deferred], version, self.finisher.holder)
        taken = self.finisher.submit([tasks[i] for i in deferred], job, project_id, label_config=label_config)
        full = [i for i, ok in zip(deferred, taken) if not ok]
        self._note("queued", len(deferred) - len(full))
        for i, ok in zip(deferred, taken):
            if ok:
                answers[i]["error"] = outcomes[i].message = (
                    f"finishing in the background ({budget} ran out): the prediction is stored through "
                    "Label Studio's API in a while")
        if full:
            self.finisher.holder.release([ids[i] for i in full], version)
            self._note("queue_full", len(full))
            message = (f"not predicted: the time budget ({budget}) ran out and the background queue is full "
                       f"(GEM_BACKGROUND_QUEUE={self.finisher.max_queue}); Retrieve Predictions again later")
            logger.warning("%d tasks left for a later Retrieve Predictions: background queue full", len(full))
            for i in full:
                answers[i]["error"] = outcomes[i].message = message
        logger.info("/predict: %d of %d tasks answered within %s, %d queued for the background",
                    len(tasks) - len(deferred), len(tasks), budget, len(deferred) - len(full))

    def _note(self, handling: str, n: int) -> None:
        if self.metrics is not None and n:
            self.metrics.deferred.inc(n, handling=handling)
