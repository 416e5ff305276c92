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
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .claims import ClaimHolder, ClaimStore
from .ls_client import LabelStudioClient, LabelStudioError, task_prediction_versions
from .pipeline import DEFERRED, PredictionJob, PredictionPipeline, PredictReport, TaskOutcome, task_id
from .prompts import project_key

logger = logging.getLogger("backend.background")

# TaskOutcome.reason of tasks answered without `result` that are on their way, not failed.
LATER_REASONS = frozenset({DEFERRED, "background", "stored", "busy"})


@dataclass
class _Item:
    task: dict
    job: PredictionJob
    project: int


class BackgroundFinisher:
    """A bounded queue of tasks and one worker thread that predicts and stores them.

    `pipeline()` returns the loaded pipeline; `client` stores predictions (None: finishing is
    unavailable, `unavailable` says why). `max_queue` bounds the tasks waiting. Thread-safe.
    """

    def __init__(self, pipeline: Callable[[], PredictionPipeline], client: LabelStudioClient | None,
                 claims: ClaimStore, max_queue: int, metrics: Any = None, unavailable: str = "",
                 batch_tasks: int = 16):
        self._pipeline = pipeline
        self.client = client
        self.claims = claims
        self.holder = claims.holder("background")   # the queue's claims: handed over by requests
        self.max_queue = max_queue
        self.metrics = metrics
        self.unavailable = unavailable if client is None else ""
        if client is not None and max_queue <= 0:
            self.unavailable = "background finishing is off (GEM_BACKGROUND_QUEUE=0)"
        self.batch_tasks = batch_tasks
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "dropped": 0}
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_ids: set[tuple[str, str]] = set()    # (task id, model version) waiting or in work
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return not self.unavailable

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def is_queued(self, task: Any, model_version: str) -> bool:
        with self._cond:
            return (str(task), model_version) in self._queued_ids

    def submit(self, tasks: Sequence[Mapping[str, Any]], job: PredictionJob, project: int) -> list[bool]:
        """Queue these tasks (already claimed by this process); per task, whether it was taken."""
        taken = []
        with self._cond:
            if self._stopping or not self.available:
                return [False] * len(tasks)
            for task in tasks:
                if len(self._queue) >= self.max_queue:
                    taken.append(False)
                    continue
                self._queue.append(_Item(dict(task), job, project))
                self._queued_ids.add((str(task_id(task)), job.model_version))
                taken.append(True)
            self._set_gauge()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gem-background", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if any(taken):
            logger.info("background: queued %d tasks of project %s (%d waiting)", sum(taken), project, self.queued())
        return taken

    def close(self, timeout: float = 20.0) -> None:
        """Stop taking work, let the batch in progress finish (up to `timeout`), drop the rest.

        Dropped tasks lose their claims, so the next Retrieve Predictions asks for them again."""
        with self._cond:
            self._stopping = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if dropped:
            logger.info("background: shutting down, %d queued tasks left for the next Retrieve Predictions",
                        len(dropped))
            for item in dropped:
                self.holder.release([task_id(item.task)], item.job.model_version)
            self._count("dropped", len(dropped))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            self._queued_ids.clear()
            self._set_gauge()

    # -- worker -------------------------------------------------------------------------------

    def _take(self) -> list[_Item]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            first = self._queue.popleft()
            batch = [first]
            while self._queue and len(batch) < self.batch_tasks and self._queue[0].job is first.job:
                batch.append(self._queue.popleft())
            self._set_gauge()
            waiting = [(task_id(i.task), i.job.model_version) for i in self._queue]
        # Long queues stay claimed: push back the lease of everything still waiting.
        by_version: dict[str, list] = {}
        for tid, version in waiting:
            by_version.setdefault(version, []).append(tid)
        for version, ids in by_version.items():
            self.holder.renew(ids, version)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._finish(batch)
            except Exception:   # never let one batch end the worker
                logger.exception("background: a batch of %d tasks failed", len(batch))
                self._count("failed", len(batch))
            finally:
                version = batch[0].job.model_version
                ids = [task_id(i.task) for i in batch]
                self.holder.release(ids, version)
                with self._cond:
                    self._queued_ids.difference_update((str(t), version) for t in ids)
            logger.info("background: %d done, %d failed, %d skipped so far; %d waiting",
                        self.counts["done"], self.counts["failed"], self.counts["skipped"], self.queued())

    def _finish(self, batch: list[_Item]) -> None:
        job = batch[0].job
        stored: list = []
        try:
            self._predict_and_store(batch, job, stored)
        finally:
            # Stored tasks keep a short marker so a /predict that Label Studio prepared before they
            # were stored does not compute them again; the rest are released by _run.
            self.holder.mark_stored(stored, job.model_version)

    def _predict_and_store(self, batch: list[_Item], job: PredictionJob, stored: list) -> None:
        predictions, report = self._pipeline().predict([i.task for i in batch], job)
        for item, prediction, outcome in zip(batch, predictions, report.outcomes):
            tid = task_id(item.task)
            if not outcome.ok or "result" not in prediction:
                logger.warning("background: task %s failed: %s", tid, outcome.message)
                self._count("failed")
                continue
            try:
                if self.client.has_prediction(tid, prediction["model_version"]):   # type: ignore[union-attr]
                    self._count("skipped")
                    stored.append(tid)
                    continue
                self.client.create_prediction(tid, prediction["result"], prediction["score"],  # type: ignore
                                              prediction["model_version"])
                stored.append(tid)
                self._count("done")
            except LabelStudioError as exc:
                logger.warning("background: task %s: storing the prediction failed: %s", tid, exc)
                self._count("failed")

    def _count(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n
        if self.metrics is not None:
            self.metrics.background_tasks.inc(n, outcome=outcome)

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.background_queued.set(len(self._queue))


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
            return self._predict(tasks, ids, job, holder, started, answers, outcomes, leave, project)
        finally:
            holder.release_all()    # whatever is neither answered, handed over nor released yet

    def _predict(self, tasks, ids, job: PredictionJob, holder: ClaimHolder, started: float, answers: list,
                 outcomes: list, leave: Callable, project: Any) -> tuple[list[dict], PredictReport]:
        version = job.model_version
        n = len(tasks)
        others = holder.busy([t for t in ids if t is not None], version)
        for i, task in enumerate(tasks):
            if version in task_prediction_versions(task):
                leave(i, "stored", "the task already holds a prediction of this model version")
            elif ids[i] is not None and (self.finisher.is_queued(ids[i], version) or ids[i] in others):
                leave(i, "background", "being predicted by another request or in the background, or just "
                                       "answered: that one's prediction is the one Label Studio keeps")
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
        # Answered with a result: Label Studio stores it as it reads this answer; until then (and a
        # little after) another request must not compute the task again, so the claim becomes a
        # short "just stored" marker. Failed tasks are free at once.
        answered = [ids[i] for i in todo if i not in deferred and ids[i] is not None and "result" in answers[i]]
        holder.mark_stored(answered, version)
        holder.release([ids[i] for i in todo if i not in deferred and ids[i] is not None], version)
        if deferred:
            self._hand_over(sorted(deferred), tasks, ids, job, project, answers, outcomes, holder)
        report.outcomes = outcomes   # type: ignore[assignment]
        report.deferred = sorted(deferred)
        return answers, report   # type: ignore[return-value]

    def _hand_over(self, deferred: list[int], tasks, ids, job: PredictionJob, project: Any,
                   answers: list, outcomes: list, holder: ClaimHolder) -> None:
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
        taken = self.finisher.submit([tasks[i] for i in deferred], job, project_id)
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
