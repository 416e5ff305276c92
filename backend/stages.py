"""The pre-labelling stages that `python -m backend.prelabel` and its Ray runner share.

Both runners import from here and neither imports the other's internals, so there is no import
circle (prelabel.py loads prelabel_ray.py only for `--ray`, and prelabel_ray.py never loads
prelabel.py). Each stage is a small piece a runner can call in a loop or map over batches::

    tasks = select_tasks(client, project, only_unlabeled=True)        # iterator of task dicts, paged by id
    todo, skipped = split_done(batch, model_version)                  # drop tasks predicted already
    held = claims.take(ids)                                           # RunClaims: what this run may compute
    payloads, failures, timings = predict_tasks(pipeline, job, todo)  # task dicts -> prediction payloads
    uploader = PredictionUploader(client, project); uploader.add(payloads); uploader.flush()

`PrelabelSummary` is what a run did, with the exit status both runners return.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .ls_client import LabelStudioClient, LabelStudioError, task_prediction_versions

logger = logging.getLogger("backend.prelabel")

# One prediction as Label Studio's API stores it.
Payload = dict   # {"task": int, "result": list, "score": float, "model_version": str}

ALREADY_PREDICTED = "already predicted (this model version)"
FOUND_BEFORE_UPLOAD = "already predicted (found just before upload)"
HELD_ELSEWHERE = "being predicted by another process"
PAGE_SIZE = 100                 # tasks per page of Label Studio's task list
LIST_RETRIES = 3                # a page is asked this many times before the run stops
LIST_RETRY_WAIT_S = 2.0         # then 4 s, ...: rides out a Label Studio restart of a few seconds
TRANSIENT = ("connection", "timeout")   # LabelStudioError reasons (and any 5xx) worth asking again


def transient(exc: LabelStudioError) -> bool:
    """Whether Label Studio may answer if asked again (down, restarting, overloaded)."""
    return exc.reason in TRANSIENT or (exc.status or 0) >= 500


def stopped_reason(exc: LabelStudioError) -> str:
    """The summary's line for a run that Label Studio stopped in mid-run."""
    return (f"Label Studio stopped answering while listing tasks ({exc})" if transient(exc)
            else f"listing tasks failed ({exc})")


@dataclass
class PrelabelSummary:
    """What a run did. `failed`: task id -> reason; `skipped`: task id -> why (already predicted, ...);
    `stopped`: why the run ended before it had listed every task (Label Studio went away)."""
    project: int
    model_version: str
    seen: int = 0
    done: int = 0
    skipped: dict[Any, str] = field(default_factory=dict)
    failed: dict[Any, str] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds summed
    dry_run: bool = False
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    @property
    def exit_status(self) -> int:
        """0: every task done or skipped; 1: some failed, or the run stopped early."""
        return 0 if self.ok else 1

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def lines(self) -> list[str]:
        rate = self.done / self.seconds * 60 if self.seconds > 0 else 0.0
        verb = "would predict" if self.dry_run else "done"
        out = [f"project {self.project}, model version {self.model_version}: {self.seen} tasks seen, "
               f"{verb} {self.done}, skipped {len(self.skipped)}, failed {len(self.failed)} "
               f"in {self.seconds:.1f} s ({rate:.1f} tasks/min)"]
        if self.stopped:
            out.append(f"  stopped early: {self.stopped}; what was stored is kept: run again to continue")
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        out += [f"  skipped: {n} x {why}" for why, n in sorted(reasons.items())]
        for task, why in itertools.islice(self.failed.items(), 20):
            out.append(f"  failed task {task}: {why}")
        if len(self.failed) > 20:
            out.append(f"  ... and {len(self.failed) - 20} more failed tasks")
        if self.timings:
            total = sum(self.timings.values()) or 1.0
            out.append("  time: " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in self.timings.items()))
        return out

    def count_uploads(self, stored: list, skipped: list, failed: dict) -> None:
        """Add what `PredictionUploader.add/flush/close` reported."""
        self.done += len(stored)
        self.skipped.update({t: FOUND_BEFORE_UPLOAD for t in skipped})
        self.failed.update(failed)


# -- listing ---------------------------------------------------------------------------------------------


def tasks_after(client: LabelStudioClient, project: int, after_id: int, *, upto_id: int | None = None,
                page_size: int = PAGE_SIZE, only_unlabeled: bool = False,
                task_ids: Iterable[int] | None = None) -> tuple[list[dict], int | None]:
    """One page of `client.tasks_after`, asked again (with a wait) while Label Studio is unreachable;
    raises LabelStudioError once it has not answered `LIST_RETRIES` times."""
    for attempt in range(LIST_RETRIES):
        try:
            return client.tasks_after(project, after_id, upto_id=upto_id, page_size=page_size,
                                      only_unlabeled=only_unlabeled, task_ids=task_ids)
        except LabelStudioError as exc:
            if not transient(exc) or attempt == LIST_RETRIES - 1:
                raise
            logger.warning("listing tasks after id %d failed (%s); asking again", after_id, exc)
            time.sleep(LIST_RETRY_WAIT_S * (attempt + 1))
    raise AssertionError("unreachable")


def iter_task_range(client: LabelStudioClient, project: int, *, after_id: int = 0, upto_id: int | None = None,
                    page_size: int = PAGE_SIZE, only_unlabeled: bool = False,
                    task_ids: Iterable[int] | None = None) -> Iterator[dict]:
    """The tasks with `after_id < id <= upto_id` (no upper end when None), in id order, page by page."""
    ids = None if task_ids is None else sorted({int(t) for t in task_ids})
    after: int | None = after_id
    while after is not None:
        tasks, after = tasks_after(client, project, after, upto_id=upto_id, page_size=page_size,
                                   only_unlabeled=only_unlabeled, task_ids=ids)
        yield from tasks


def select_tasks(client: LabelStudioClient, project: int, *, only_unlabeled: bool = False,
                 task_ids: Iterable[int] | None = None, limit: int | None = None,
                 page_size: int = PAGE_SIZE) -> Iterator[dict]:
    """The project's tasks in id order, streamed page by page, filtered, at most `limit`.

    Paged by task id, so labelling or importing during the run neither skips a task nor lists one
    twice; tasks imported meanwhile are listed too (they have higher ids).
    """
    tasks = iter_task_range(client, project, page_size=page_size, only_unlabeled=only_unlabeled, task_ids=task_ids)
    return itertools.islice(tasks, limit) if limit is not None else tasks


def split_done(tasks: Sequence[Mapping[str, Any]], model_version: str) -> tuple[list[dict], list[dict]]:
    """(tasks to predict, tasks that already hold a prediction of `model_version`)."""
    todo, done = [], []
    for task in tasks:
        (done if model_version in task_prediction_versions(task) else todo).append(task)
    return todo, done


# -- claims -------------------------------------------------------------------------------------------------


class RunClaims:
    """The claims of one run: a holder of MODEL_DIR's claims file (backend/claims.py), its own
    token, renewed by a heartbeat while the run works. Says what this run may compute now.

    The server's requests, its background finisher and other runs claim the tasks they compute in
    the same file; a task another holder has is left to them. A stored task's claim becomes a
    short "just stored" marker (so a /predict that Label Studio prepared before the store does not
    answer it again); a skipped or failed task's claim is released; `close()` releases the rest.
    Thread-safe.
    """

    def __init__(self, store: Any, model_version: str, project: Any, command: str = "prelabel"):
        from .claims import Heartbeat

        self.version = model_version
        self.project = str(project)
        self.holder = store.holder(f"{command}:{project}")   # the name other holders' logs show
        self._beat = Heartbeat(self.holder)
        self._beat.start()

    @classmethod
    def from_settings(cls, settings: Any, model_version: str, project: Any, command: str = "prelabel") -> "RunClaims":
        """In MODEL_DIR's claims file, with the server's lease (GEM_CLAIM_LEASE)."""
        from .claims import ClaimStore

        return cls(ClaimStore(os.path.join(settings.model_dir, "claims.sqlite"), lease_s=settings.claim_lease),
                   model_version, project, command)

    def take(self, task_ids: Iterable) -> set:
        """Claim these tasks; returns those this run now holds (in the ids' own type)."""
        ids = list(task_ids)
        granted = self.holder.claim(ids, self.version, project=self.project)
        return {t for t in ids if str(t) in granted}

    def stored(self, task_ids: Iterable) -> None:
        self.holder.mark_stored(list(task_ids), self.version)

    def give_back(self, task_ids: Iterable) -> None:
        self.holder.release(list(task_ids), self.version)

    def finished(self, stored: Iterable, others: Iterable) -> None:
        """`PredictionUploader`'s on_finished: stored tasks get markers, the others are free again."""
        self.stored(stored)
        self.give_back(others)

    def held(self) -> set[str]:
        return {task for task, version in self.holder.held() if version == self.version}

    def close(self) -> None:
        self._beat.stop()
        self.holder.release_all()


# -- predicting ---------------------------------------------------------------------------------------------


def predict_tasks(pipeline: Any, job: Any, tasks: Sequence[Mapping[str, Any]]
                  ) -> tuple[list[Payload], dict[Any, str], dict[str, float]]:
    """Task dicts -> (prediction payloads, failures {task id: reason}, stage timings in seconds).

    One bad task fails alone. Payloads are ready for `PredictionUploader` / `POST /api/predictions`.
    """
    predictions, report = pipeline.predict(list(tasks), job)
    payloads, failures = [], {}
    for task, prediction, outcome in zip(tasks, predictions, report.outcomes):
        if outcome.ok and "result" in prediction:
            payloads.append({"task": task["id"], "result": prediction["result"], "score": prediction["score"],
                             "model_version": prediction["model_version"]})
        else:
            failures[task.get("id")] = f"{outcome.reason or 'failed'}: {outcome.message}"
    return payloads, failures, dict(report.timings)


def learned_for(settings: Any, project: int):
    """The project's learned state (backend/learning.py) in MODEL_DIR, as the server would use it;
    None when it is not used (GEM_USE_LEARNED) or nothing was learned. Never fails the run: a broken
    store is logged."""
    if not settings.use_learned:
        return None
    try:
        from .learning import DB_NAME, LearnedStates, LearningStore

        if not os.path.exists(os.path.join(settings.model_dir, DB_NAME)):
            return None
        return LearnedStates(LearningStore(settings.model_dir), settings).project_learned(str(project))
    except Exception as exc:   # predict without it, as the server does
        logger.warning("project %s: learned state unreadable, predicting without it: %s", project, exc)
        return None


# -- storing ------------------------------------------------------------------------------------------------


class PredictionUploader:
    """Collects payloads and stores them `chunk` at a time, in a background thread so the model
    does not wait for Label Studio. Before storing it asks Label Studio whether each task got a
    prediction of this version meanwhile (another run, the server), so none is stored twice.

    `add()`, `flush()` and `close()` return what finished since the last call: (stored task ids,
    skipped task ids, failures {task id: reason}); `flush()` and `close()` wait for everything, and
    `close()` stores what is still waiting before it lets the thread go (computed predictions are
    never dropped). `on_finished(stored task ids, other task ids)` is called from the upload thread
    once a chunk's tasks are stored, skipped or failed.
    """

    def __init__(self, client: LabelStudioClient, project: int, chunk: int = 100, check_existing: bool = True,
                 on_finished: Callable[[list, list], None] | None = None, check_workers: int = 4):
        self.client = client
        self.project = project
        self.chunk = chunk
        self.check_existing = check_existing
        self.on_finished = on_finished
        self.pending: list[Payload] = []
        self.seconds = {"ls_check": 0.0, "upload": 0.0}
        self._uploads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prelabel-upload")
        self._checks = concurrent.futures.ThreadPoolExecutor(check_workers, thread_name_prefix="prelabel-check")
        self._futures: list[concurrent.futures.Future] = []
        self._closed = False

    def add(self, payloads: Iterable[Payload]) -> tuple[list, list, dict]:
        """Queue payloads; full chunks start uploading now, the rest waits for more or for flush()."""
        self.pending.extend(payloads)
        while len(self.pending) >= self.chunk:
            part, self.pending = self.pending[:self.chunk], self.pending[self.chunk:]
            self._submit(part)
        return self._collect(wait=False)

    def flush(self) -> tuple[list, list, dict]:
        if self.pending:
            part, self.pending = self.pending, []
            self._submit(part)
        return self._collect(wait=True)

    def _submit(self, part: list[Payload]) -> None:
        future = self._uploads.submit(self._store, part)
        future.task_ids = [p["task"] for p in part]   # type: ignore[attr-defined]
        self._futures.append(future)

    def in_flight(self) -> set:
        """Task ids added but not yet stored, skipped or failed."""
        return {p["task"] for p in self.pending} | {t for f in self._futures if not f.done()
                                                    for t in getattr(f, "task_ids", ())}

    def close(self) -> tuple[list, list, dict]:
        """Store every chunk still waiting (queued or not yet full), then stop the threads."""
        if self._closed:
            return [], [], {}
        try:
            return self.flush()
        finally:
            self._closed = True
            self._uploads.shutdown(wait=True)
            self._checks.shutdown(wait=True)

    def _collect(self, wait: bool) -> tuple[list, list, dict]:
        stored, skipped, failed = [], [], {}
        keep = []
        for future in self._futures:
            if wait or future.done():
                s, k, f = future.result()
                stored += s
                skipped += k
                failed.update(f)
            else:
                keep.append(future)
        self._futures = keep
        return stored, skipped, failed

    def _exists(self, payload: Payload) -> bool | str:
        try:
            return self.client.has_prediction(payload["task"], payload["model_version"])
        except LabelStudioError as exc:
            return f"checking existing predictions: {exc}"

    def _store(self, part: list[Payload]) -> tuple[list, list, dict]:
        stored, skipped, failed, fresh = [], [], {}, []
        try:
            started = time.perf_counter()
            answers = self._checks.map(self._exists, part) if self.check_existing else [False] * len(part)
            for payload, exists in zip(part, answers):
                if isinstance(exists, str):
                    failed[payload["task"]] = exists
                elif exists:
                    skipped.append(payload["task"])
                else:
                    fresh.append(payload)
            self.seconds["ls_check"] += time.perf_counter() - started
            if fresh:
                started = time.perf_counter()
                try:
                    self.client.create_predictions(self.project, fresh, chunk=self.chunk)
                    stored.extend(p["task"] for p in fresh)
                except LabelStudioError as exc:
                    failed.update({p["task"]: f"upload: {exc}" for p in fresh})
                self.seconds["upload"] += time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - the chunk fails, with its reason; the run goes on
            done = set(stored) | set(skipped) | set(failed)
            failed.update({p["task"]: f"upload: {type(exc).__name__}: {exc}" for p in part if p["task"] not in done})
        finally:
            if self.on_finished is not None:
                done = set(stored)
                self.on_finished(list(stored), [p["task"] for p in part if p["task"] not in done])
        return stored, skipped, failed


def progress_bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="task", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, desc="prelabel")
