"""Per-project learning from annotations: the state store, the webhook work queue, and a CLI.

The maths (prototypes, calibration) is in `gem_model/learning.py` and knows nothing of Label
Studio. Here: which annotations to learn from, fetched back from Label Studio with the backend's
own key (a webhook body is only a hint, so a forged call cannot poison the model), turned into
masks (`decode.py`) and GEM features, and kept per project in `MODEL_DIR/learning.sqlite3`.

The learned state of a project is DATA for the prediction pipeline (`LearnedMaps` + a version
suffix); the pipeline never calls back here.

    python -m backend.learning status                  # projects, versions, examples
    python -m backend.learning reset --project 3       # forget what project 3 learned
    python -m backend.learning rebuild --project 3     # relearn project 3 from all its annotations
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import io
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .decode import label_masks, result_regions
from .settings import Settings

logger = logging.getLogger(__name__)

DB_NAME = "learning.sqlite3"
OVERLAP_KEPT = 0.1     # a predicted region with less of it under the annotation's label was deleted


# ------------------------------------------------------------------------------------- records

@dataclass
class TaskRecord:
    """What one annotated image of a task contributes: examples (small) and a calibration sample."""
    key: str                                  # "<task>" or "<task>/<image name>" with several images
    task: str
    annotation: str
    examples: Any                             # gem_model.learning.TaskExamples
    features: np.ndarray                      # float16 [h, w, D]
    truth: dict[str, np.ndarray]              # label -> float16 coverage [h, w]


def _pack(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def _unpack(blob: bytes) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
        meta = json.loads(bytes(data["__meta__"]).decode())
    return arrays, meta


def pack_examples(examples) -> bytes:
    labels = sorted(examples.labels)
    arrays = {}
    for i, label in enumerate(labels):
        if label in examples.positives:
            arrays[f"p{i}"] = examples.positives[label].astype(np.float32)
        if label in examples.negatives:
            arrays[f"n{i}"] = examples.negatives[label].astype(np.float32)
    if examples.background is not None:
        arrays["bg"] = examples.background.astype(np.float32)
    return _pack(arrays, {"key": examples.key, "labels": labels})


def unpack_examples(blob: bytes):
    from gem_model.learning import TaskExamples

    arrays, meta = _unpack(blob)
    labels = meta["labels"]
    return TaskExamples(key=meta["key"],
                        positives={labels[int(k[1:])]: v for k, v in arrays.items() if k.startswith("p")},
                        negatives={labels[int(k[1:])]: v for k, v in arrays.items() if k.startswith("n")},
                        background=arrays.get("bg"))


def pack_sample(features: np.ndarray, truth: Mapping[str, np.ndarray]) -> bytes:
    labels = sorted(truth)
    arrays = {"features": features.astype(np.float16)}
    arrays.update({f"t{i}": truth[label].astype(np.float16) for i, label in enumerate(labels)})
    return _pack(arrays, {"labels": labels})


def unpack_sample(blob: bytes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    arrays, meta = _unpack(blob)
    labels = meta["labels"]
    return arrays["features"].astype(np.float32), {labels[i]: arrays[f"t{i}"].astype(np.float32)
                                                  for i in range(len(labels))}


# --------------------------------------------------------------------------------------- store

class LearningStore:
    """SQLite in MODEL_DIR, shared by threads and gunicorn workers.

    Every change is one transaction (atomic: a crash leaves the old state or the new one), WAL
    lets readers run while a worker writes, and `projects.version` is a counter bumped with every
    change of a project's learned state: reading it is one indexed SELECT, so each request can
    check it and a worker sees another's update at its next request. The counter never goes back,
    not even on reset, so a version string is never reused for a different state.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, DB_NAME)
        os.makedirs(model_dir, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS projects (
                    project TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 0,
                    calibration TEXT, label_config TEXT, updated REAL);
                CREATE TABLE IF NOT EXISTS records (
                    project TEXT NOT NULL, key TEXT NOT NULL, task TEXT NOT NULL, annotation TEXT,
                    updated REAL NOT NULL, examples BLOB NOT NULL, sample BLOB NOT NULL,
                    PRIMARY KEY (project, key));
            """)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- reading -----------------------------------------------------------------------------

    def version(self, project: str) -> int:
        with self._connect() as db:
            row = db.execute("SELECT version FROM projects WHERE project = ?", (project,)).fetchone()
        return int(row[0]) if row else 0

    def calibration(self, project: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT calibration FROM projects WHERE project = ?", (project,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def label_config(self, project: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT label_config FROM projects WHERE project = ?", (project,)).fetchone()
        return row[0] if row else None

    def examples(self, project: str) -> list:
        """TaskExamples of the project, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT examples FROM records WHERE project = ? ORDER BY updated, key",
                              (project,)).fetchall()
        return [unpack_examples(row[0]) for row in rows]

    def samples(self, project: str) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
        """(key, features, truth) of the project's records, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT key, sample FROM records WHERE project = ? ORDER BY updated, key",
                              (project,)).fetchall()
        return [(row[0], *unpack_sample(row[1])) for row in rows]

    def keys(self, project: str) -> list[tuple[str, str]]:
        """(key, task) of the records, oldest first."""
        with self._connect() as db:
            return [tuple(r) for r in db.execute(
                "SELECT key, task FROM records WHERE project = ? ORDER BY updated, key", (project,))]

    def projects(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("""SELECT p.project, p.version, p.calibration, p.updated,
                                        (SELECT COUNT(*) FROM records r WHERE r.project = p.project)
                                 FROM projects p ORDER BY p.project""").fetchall()
        return [{"project": r[0], "version": r[1], "calibration": json.loads(r[2]) if r[2] else None,
                 "updated": r[3], "records": r[4]} for r in rows]

    def known(self, project: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM projects WHERE project = ?", (project,)).fetchone() is not None

    # -- writing -----------------------------------------------------------------------------

    def remember_project(self, project: str, label_config: str | None = None) -> None:
        """A project this backend serves (seen in /setup); keeps its label config when given."""
        with self._transaction() as db:
            db.execute("INSERT INTO projects (project, updated) VALUES (?, ?) ON CONFLICT(project) DO NOTHING",
                       (project, time.time()))
            if label_config:
                db.execute("UPDATE projects SET label_config = ? WHERE project = ? AND "
                           "(label_config IS NULL OR label_config != ?)", (label_config, project, label_config))

    def put_records(self, project: str, task: str, records: Sequence[TaskRecord]) -> None:
        """Replace everything learned from `task` with `records` (none = forget the task)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO projects (project, updated) VALUES (?, ?) ON CONFLICT(project) DO NOTHING",
                       (project, now))
            db.execute("DELETE FROM records WHERE project = ? AND task = ?", (project, task))
            for record in records:
                db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (project, record.key, record.task, record.annotation, now,
                            pack_examples(record.examples), pack_sample(record.features, record.truth)))

    def drop_keys(self, project: str, keys: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM records WHERE project = ? AND key = ?", [(project, k) for k in keys])

    def commit_state(self, project: str, calibration: dict | None) -> int:
        """Store the fitted calibration and bump the version: the new state is live. Returns it."""
        with self._transaction() as db:
            db.execute("INSERT INTO projects (project, updated) VALUES (?, ?) ON CONFLICT(project) DO NOTHING",
                       (project, time.time()))
            db.execute("UPDATE projects SET calibration = ?, version = version + 1, updated = ? WHERE project = ?",
                       (json.dumps(calibration) if calibration else None, time.time(), project))
            return int(db.execute("SELECT version FROM projects WHERE project = ?", (project,)).fetchone()[0])

    def reset(self, project: str) -> int:
        """Forget what the project learned; the version still moves on. Returns the new version."""
        with self._transaction() as db:
            db.execute("DELETE FROM records WHERE project = ?", (project,))
            db.execute("INSERT INTO projects (project, updated) VALUES (?, ?) ON CONFLICT(project) DO NOTHING",
                       (project, time.time()))
            db.execute("UPDATE projects SET calibration = NULL, version = version + 1, updated = ? WHERE project = ?",
                       (time.time(), project))
            return int(db.execute("SELECT version FROM projects WHERE project = ?", (project,)).fetchone()[0])


def calibration_to_dict(calibration) -> dict:
    return {"offsets": calibration.offsets, "min_area": calibration.min_area, "samples": calibration.samples,
            "iou_before": _finite(calibration.iou_before), "iou_after": _finite(calibration.iou_after)}


def calibration_from_dict(data: Mapping[str, Any] | None):
    from gem_model.learning import Calibration

    if not data:
        return None
    return Calibration(offsets={str(k): float(v) for k, v in (data.get("offsets") or {}).items()},
                       min_area=data.get("min_area"), samples=int(data.get("samples") or 0),
                       iou_before=float(data.get("iou_before") if data.get("iou_before") is not None else "nan"),
                       iou_after=float(data.get("iou_after") if data.get("iou_after") is not None else "nan"))


def _finite(value: float) -> float | None:
    return float(value) if value == value else None


# ------------------------------------------------------------------------------ learned state

@dataclass(frozen=True)
class LearnedState:
    """A project's learned state as the pipeline takes it: `maps` (gem_model.learning.LearnedMaps)
    and the version suffix of its predictions ("" = nothing learned yet)."""
    version: str
    maps: Any


def learned_state_bytes(state: LearnedState) -> int:
    """Bytes of a learned state's arrays (the prototype vectors dominate; the rest is small)."""
    bank = getattr(state.maps, "bank", None)
    if bank is None:
        return 0
    total = int(getattr(bank.background, "nbytes", 0))
    for item in bank.labels.values():
        total += int(item.positives.nbytes) + int(item.negatives.nbytes)
    return total


class LearnedStates:
    """Per-project `LearnedState`, rebuilt from the store when its version counter moves.

    The states of the projects used most recently are kept, up to GEM_LEARNED_CACHE_MB: a server
    that meets many projects over weeks keeps a bounded set; one pushed out is rebuilt from the store."""

    def __init__(self, store: LearningStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.max_bytes = int(settings.learned_cache_mb * 2**20)
        self._cache: "collections.OrderedDict[str, tuple[int, LearnedState, int]]" = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._cache)

    def _keep(self, project: str, version: int, state: LearnedState) -> None:
        size = learned_state_bytes(state)
        with self._lock:
            old = self._cache.pop(project, None)
            if old is not None:
                self._bytes -= old[2]
            if size > self.max_bytes:
                return
            self._cache[project] = (version, state, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, evicted) = self._cache.popitem(last=False)
                self._bytes -= evicted

    def get(self, project: str | None) -> LearnedState | None:
        if not project:
            return None
        try:
            version = self.store.version(project)
        except sqlite3.Error as exc:   # a broken state file must not stop predictions
            logger.warning("learning store unreadable (%s); predicting without learned state", exc)
            return None
        if version == 0:
            return None
        with self._lock:
            cached = self._cache.get(project)
            if cached is not None and cached[0] == version:
                self._cache.move_to_end(project)
                return cached[1]
        state = self._build(project, version)
        self._keep(project, version, state)
        return state

    def project_learned(self, project: str | None):
        """The project's state as `backend.pipeline.ProjectLearned` for `PredictionPipeline.prepare`,
        or None when it has learned nothing (any caller of the pipeline can use this)."""
        from .pipeline import ProjectLearned

        state = self.get(project)
        return None if state is None else ProjectLearned(version=state.version, maps=state.maps)

    def _build(self, project: str, version: int) -> LearnedState:
        from gem_model.learning import LearnedMaps, build_bank

        calibration = calibration_from_dict(self.store.calibration(project))
        bank = None
        if self.settings.learn_prototypes:
            examples = self.store.examples(project)
            if examples:
                bank = build_bank(examples, self.settings.learn_max_examples)
        return LearnedState(version=f"l{version}",
                            maps=LearnedMaps(bank=bank, calibration=calibration, prior=self.settings.learn_prior))


# --------------------------------------------------------------------------------- the learner

@dataclass(frozen=True)
class Job:
    kind: str                  # "task" (learn or forget one task) | "rebuild" (the whole project)
    project: str
    task: str | None = None
    annotation: str | None = None


class LearningError(Exception):
    """An annotation cannot be learned (not found, not this project, no image...)."""


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, Mapping):
        return dict(obj)
    for name in ("model_dump", "dict"):
        method = getattr(obj, name, None)
        if callable(method):
            return method()
    raise TypeError(f"cannot read {type(obj).__name__} as a mapping")


class LabelStudioSource:
    """The Label Studio API calls learning needs, through the backend's one client (backend/ls_client.py)."""

    def __init__(self, client: Any):
        self.client = client              # backend.ls_client.LabelStudioClient
        self.url = client.url

    def task(self, task_id: str) -> dict:
        return self.client.get_task(int(task_id))

    def annotation(self, annotation_id: str) -> dict:
        return self.client.get_annotation(int(annotation_id))

    def annotations(self, task_id: str) -> list[dict]:
        return self.client.list_annotations(int(task_id))

    def prediction(self, prediction_id: str) -> dict:
        return self.client.get_prediction(int(prediction_id))

    def label_config(self, project: str) -> str:
        return (self.client.get_project(int(project)) or {}).get("label_config") or ""

    def annotated_tasks(self, project: str) -> Iterator[dict]:
        """Every task of the project that has annotations, page by page."""
        for task in self.client.iter_tasks(int(project)):
            if task.get("total_annotations") or task.get("annotations"):
                yield task


class Learner:
    """Takes annotation events off the webhook, learns from them in one background thread.

    `predictor()` returns the loaded HeatmapPredictor (None while loading); `source(project)`
    returns a `LabelStudioSource` for the project's Label Studio (None when none is configured);
    `fetch(url, task_id, project)` returns a FetchedImage.
    """

    def __init__(self, settings: Settings, store: LearningStore, predictor: Callable[[], Any],
                 source: Callable[[str], LabelStudioSource | None], fetch: Callable[..., Any],
                 region_config: Callable[[], Any]):
        self.settings = settings
        self.store = store
        self.predictor = predictor
        self.source = source
        self.fetch = fetch
        self.region_config = region_config
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=settings.learn_queue)
        self.processed = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._work_lock = threading.Lock()     # one job at a time per process

    # -- intake ------------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job; False (and a warning) when the queue is full. Never blocks."""
        self._ensure_thread()
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            logger.warning("learning queue full (%d events, GEM_LEARN_QUEUE): dropped %s of project %s; "
                           "run Start Training to catch up", self.queue.maxsize, job.kind, job.project)
            return False

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gem-learner", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            try:
                self.run_job(job)
                self.processed += 1
            except Exception as exc:  # one bad event must not stop learning from the next
                self.failed += 1
                logger.warning("learning %s of project %s (task %s) failed: %s: %s", job.kind, job.project,
                               job.task, type(exc).__name__, exc, exc_info=not isinstance(exc, LearningError))
            finally:
                self.queue.task_done()

    def wait_idle(self, timeout: float) -> bool:
        """True when every queued job is done (tests, the CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.unfinished_tasks == 0:
                return True
            time.sleep(0.05)
        return False

    # -- work --------------------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        # One job at a time across the gunicorn workers too (a file lock beside the state): two
        # workers refitting one project at once would each miss the other's newest record.
        lock_path = os.path.join(os.path.dirname(self.store.path), "learning.lock")
        with self._work_lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if job.kind == "rebuild":
                self.rebuild(job.project)
            else:
                self.learn_task(job.project, job.task, job.annotation)

    def _source(self, project: str) -> LabelStudioSource:
        source = self.source(project)
        if source is None:
            raise LearningError("no Label Studio to verify annotations with: set LABEL_STUDIO_URL and "
                                "LABEL_STUDIO_API_KEY (the backend's own key)")
        return source

    def _predictor(self):
        predictor = self.predictor()
        if predictor is None:
            raise LearningError("the model is not loaded yet")
        return predictor

    def learn_task(self, project: str, task_id: str | None, annotation_id: str | None = None,
                   source: LabelStudioSource | None = None, plan: Any = None, task: dict | None = None,
                   commit: bool = True) -> int:
        """Learn from the task's annotation as Label Studio has it now (or forget the task when it
        has none left). Returns the number of image records stored."""
        from .label_config import parse_label_config

        source = source or self._source(project)
        if task is None:
            if task_id is None and annotation_id is not None:
                task_id = str(_as_dict(source.annotation(annotation_id)).get("task"))
            task = source.task(str(task_id))
        if str(task.get("project")) != str(project):
            raise LearningError(f"task {task.get('id')} belongs to project {task.get('project')}, "
                                f"not {project}: ignored")
        task_id = str(task.get("id"))
        annotation = self._current_annotation(source, task, annotation_id)
        if plan is None:
            plan = parse_label_config(source.label_config(project), self.settings.outputs)
        records = [] if annotation is None else self._records(source, project, task, annotation, plan)
        self.store.put_records(project, task_id, records)
        if annotation is None:
            logger.info("project %s: task %s has no annotation to learn from; forgotten", project, task_id)
        if commit:
            self.recalibrate(project, plan)
        return len(records)

    def _current_annotation(self, source: LabelStudioSource, task: Mapping[str, Any],
                            annotation_id: str | None) -> dict | None:
        """The annotation to learn from: the one named (when it is the task's and not cancelled),
        else the task's newest submitted one."""
        if annotation_id is not None:
            try:
                annotation = source.annotation(annotation_id)
            except Exception as exc:   # deleted since the webhook, or never existed
                logger.info("annotation %s not found (%s); using the task's current annotations",
                            annotation_id, type(exc).__name__)
            else:
                if str(annotation.get("task")) != str(task.get("id")):
                    raise LearningError(f"annotation {annotation_id} is not of task {task.get('id')}: ignored")
                if not annotation.get("was_cancelled"):
                    return annotation
        annotations = task.get("annotations")
        if not isinstance(annotations, list):
            annotations = source.annotations(str(task.get("id")))
        annotations = [_as_dict(a) for a in annotations if not _as_dict(a).get("was_cancelled")]
        if not annotations:
            return None
        return max(annotations, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))

    def _records(self, source: LabelStudioSource, project: str, task: Mapping[str, Any],
                 annotation: Mapping[str, Any], plan: Any) -> list[TaskRecord]:
        from gem_model.learning import grid_coverage, task_examples

        predictor = self._predictor()
        labels = {label.value for control in plan.controls for label in control.labels}
        data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
        parent = self._parent_prediction(source, annotation)
        records = []
        for spec in plan.images:
            url = spec.value if spec.data_key is None else data.get(spec.data_key)
            if url is None and len(plan.images) == 1:
                url = data.get("$undefined$")
            if not isinstance(url, str) or not url:
                raise LearningError(f"task {task.get('id')} has no image for <Image name='{spec.name}'>")
            image = self.fetch(url, task.get("id"), project)
            height, width = image.height, image.width
            regions = result_regions(annotation.get("result"), height, width, to_name=spec.name, labels=labels)
            masks = label_masks(regions, height, width)
            deleted: dict[str, list[np.ndarray]] = {}
            if parent is not None:
                for region in result_regions(parent.get("result"), height, width, to_name=spec.name, labels=labels):
                    kept = masks.get(region.label)
                    area = region.mask.sum()
                    if kept is None or (region.mask & kept).sum() < OVERLAP_KEPT * area:
                        deleted.setdefault(region.label, []).append(region.mask)
            encoded = predictor.encode([image.image])[0]
            features = predictor.patch_embeddings(encoded)
            grid = features.shape[:2]
            coverage = {label: grid_coverage(mask, grid) for label, mask in masks.items()}
            key = str(task.get("id")) if len(plan.images) == 1 else f"{task.get('id')}/{spec.name}"
            examples = task_examples(key, features, coverage,
                                     {label: [grid_coverage(m, grid) for m in ms] for label, ms in deleted.items()})
            records.append(TaskRecord(key=key, task=str(task.get("id")), annotation=str(annotation.get("id")),
                                      examples=examples, features=features.astype(np.float16), truth=coverage))
            logger.info("project %s: learned task %s (%s): %s%s", project, task.get("id"), spec.name,
                        ", ".join(f"{label} {int(m.sum())} px" for label, m in masks.items()) or "no regions",
                        f"; deleted predictions: {', '.join(f'{k} x{len(v)}' for k, v in deleted.items())}"
                        if deleted else "")
        return records

    def _parent_prediction(self, source: LabelStudioSource, annotation: Mapping[str, Any]) -> dict | None:
        parent = annotation.get("parent_prediction") or annotation.get("prediction")
        if isinstance(parent, Mapping):
            return dict(parent) if "result" in parent else None
        if parent is None:
            return None
        try:
            return source.prediction(str(parent))
        except Exception as exc:
            logger.info("prediction %s of annotation %s not readable (%s); no negatives from it",
                        parent, annotation.get("id"), type(exc).__name__)
            return None

    def recalibrate(self, project: str, plan: Any) -> int:
        """Drop records beyond the per-label cap, refit the calibration, bump the version."""
        from gem_model.learning import CalibrationSample, calibrate

        examples = self.store.examples(project)
        keep = self._kept_keys(examples)
        dropped = [e.key for e in examples if e.key not in keep]
        if dropped:
            self.store.drop_keys(project, dropped)
            examples = [e for e in examples if e.key in keep]
        labels = list(dict.fromkeys(label.value for control in plan.controls for label in control.labels))
        prompts = {}
        for control in plan.controls:
            for label in control.labels:
                prompts.setdefault(label.value, tuple(label.prompts))
        calibration = None
        samples = self.store.samples(project)
        if samples and labels:
            predictor = self._predictor()
            text = {label: predictor.text_embeddings(list(prompts[label])) for label in labels}   # [P, D] each
            items = []
            for key, features, truth in samples:
                text_maps = np.stack([np.einsum("hwd,pd->phw", features, text[label]).max(axis=0)
                                      for label in labels])
                cover = np.stack([truth.get(label, np.zeros(features.shape[:2], np.float32)) for label in labels])
                items.append(CalibrationSample(key, features, text_maps, cover))
            started = time.perf_counter()
            fit = calibrate(items, labels, self.region_config(), examples,
                            use_prototypes=self.settings.learn_prototypes, prior=self.settings.learn_prior,
                            max_examples=self.settings.learn_max_examples)
            calibration = calibration_to_dict(fit)
            logger.info("project %s: calibrated on %d images in %.1f s: IoU %.3f -> %.3f, offsets %s, min_area %s",
                        project, fit.samples, time.perf_counter() - started, fit.iou_before, fit.iou_after,
                        {k: round(v, 4) for k, v in fit.offsets.items()}, fit.min_area)
        version = self.store.commit_state(project, calibration)
        logger.info("project %s: learned state l%d from %d annotated images", project, version, len(examples))
        return version

    def _kept_keys(self, examples: Sequence[Any]) -> set[str]:
        """Keys among the newest `learn_max_examples` records of at least one of their labels."""
        cap = self.settings.learn_max_examples
        newest: dict[str, list[str]] = {}
        for example in reversed(examples):
            for label in example.labels or {""}:
                kept = newest.setdefault(label, [])
                if len(kept) < cap:
                    kept.append(example.key)
        return {key for keys in newest.values() for key in keys}

    def rebuild(self, project: str, source: LabelStudioSource | None = None) -> int:
        """Relearn the project from all its annotations (START_TRAINING), with progress in the log."""
        from .label_config import parse_label_config

        source = source or self._source(project)
        plan = parse_label_config(source.label_config(project), self.settings.outputs)
        started = time.perf_counter()
        logger.info("project %s: rebuilding the learned state from all annotations", project)
        # Task by task in place, one version bump at the end: predictions meanwhile keep the old state.
        learned = failed = seen = 0
        tasks_seen: set[str] = set()
        for task in source.annotated_tasks(project):
            seen += 1
            tasks_seen.add(str(task.get("id")))
            try:
                learned += self.learn_task(project, str(task.get("id")), source=source, plan=plan,
                                           task=task if isinstance(task.get("annotations"), list) else None,
                                           commit=False)
            except Exception as exc:   # one bad task must not sink the rebuild
                failed += 1
                logger.warning("project %s: task %s not learned: %s: %s", project, task.get("id"),
                               type(exc).__name__, exc)
            if seen % 10 == 0:
                logger.info("project %s: rebuild progress: %d annotated tasks read, %d images learned, %d failed "
                            "(%.0f s)", project, seen, learned, failed, time.perf_counter() - started)
        gone = [key for key, task in self.store.keys(project) if task not in tasks_seen]
        if gone:   # annotations deleted while no webhook reached us
            self.store.drop_keys(project, gone)
        version = self.recalibrate(project, plan)
        logger.info("project %s: rebuild done: %d annotated tasks, %d images learned, %d failed, version l%d, "
                    "%.1f s", project, seen, learned, failed, version, time.perf_counter() - started)
        return version


# ---------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.learning",
                                     description="Inspect, reset or rebuild what projects learned from annotations "
                                                 "(MODEL_DIR/learning.sqlite3).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="projects, state versions, records and calibration")
    reset = sub.add_parser("reset", help="forget what a project learned (its predictions get a new version)")
    reset.add_argument("--project", required=True, help="Label Studio project id")
    rebuild = sub.add_parser("rebuild", help="relearn a project from all its annotations (loads the model)")
    rebuild.add_argument("--project", required=True, help="Label Studio project id")
    args = parser.parse_args(argv)

    from .prompts import project_key
    from .settings import command_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = command_settings()
    if settings is None:
        return 2
    store = LearningStore(settings.model_dir)
    if args.command == "status":
        projects = store.projects()
        if not projects:
            print(f"no learned state in {store.path}")
        for p in projects:
            cal = p["calibration"] or {}
            print(f"project {p['project']}: version l{p['version']}, {p['records']} annotated images, "
                  f"offsets {cal.get('offsets', {})}, min_area {cal.get('min_area')}, "
                  f"calibration IoU {cal.get('iou_before')} -> {cal.get('iou_after')}")
        return 0
    project = project_key(args.project)
    if args.command == "reset":
        version = store.reset(project)
        print(f"project {project}: learned state forgotten; predictions now carry version suffix l{version}")
        return 0
    from .images import ImageFetcher

    fetcher = ImageFetcher(settings)
    from .pipeline import load_predictor

    predictor = load_predictor(settings)   # the same model, method and windows as the server
    learner = Learner(settings, store, lambda: predictor, lambda p: source_for(settings, p),
                      lambda url, task_id, p: fetcher.decode(fetcher.download(url, task_id=task_id, project_key=p)),
                      settings.region_config)
    version = learner.rebuild(project)
    print(f"project {project}: rebuilt, version l{version}")
    return 0


def source_for(settings: Settings, project: str | None = None) -> LabelStudioSource | None:
    """Label Studio with the backend's OWN key (LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY), or None.

    Never /setup's hostname and token: /setup is open, and a caller who could name the host the
    annotations are read from could feed the learner anything."""
    from .ls_client import LabelStudioClient

    if not settings.label_studio_url or not settings.label_studio_api_key:
        return None
    return LabelStudioSource(LabelStudioClient.from_settings(settings))


if __name__ == "__main__":
    raise SystemExit(main())
