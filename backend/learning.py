"""Per-project learning from annotations: the state store, the webhook work queue, and a CLI.

The maths (prototypes, calibration) is in `gem_model/learning.py` and knows nothing of Label
Studio. Here: which annotations to learn from, fetched back from Label Studio with the backend's
own key (a webhook body is only a hint, so a forged call cannot poison the model), turned into
masks (`decode.py`) and GEM features, and kept per Label Studio instance and project in
`MODEL_DIR/learned-state.sqlite3`.

The learned state of a project is DATA for the prediction pipeline (`LearnedMaps` + a version
suffix, a digest of the state's content); the pipeline never calls back here. Predictions use the
last PUBLISHED state, which follows the working state by the policy GEM_LEARN_PUBLISH (see
docs/LEARNING.md, "Versions").

    python -m backend.learning status                  # projects, versions, examples
    python -m backend.learning reset --project 3       # forget what project 3 learned
    python -m backend.learning rebuild --project 3     # relearn project 3 from all its annotations
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import hashlib
import io
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .decode import label_masks, result_regions
from .settings import Settings
from .sqlite_db import connect, transaction

logger = logging.getLogger(__name__)

DB_NAME = "learned-state.sqlite3"   # learning.sqlite3 before versions were content digests
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


# ----------------------------------------------------------------------------------- projects

def instance_of(url: str | None) -> str:
    """The Label Studio instance a learned state belongs to: its URL, normalised."""
    url = (url or "").strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.lower()
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


def created_stamp(value: Any) -> str:
    """Label Studio's `created_at` (ISO text) as the epoch seconds it puts in "<id>.<created>"."""
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value))
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return str(int(moment.timestamp()))


def state_key(instance: str, project_id: Any, created: str = "") -> str:
    """Key of a project's learned state: Label Studio instance + project id + the project's creation
    time, so a new Label Studio (or a project re-created with the same id) starts from nothing."""
    return f"{instance}#{project_id}" + (f".{created}" if created else "")


# --------------------------------------------------------------------------------------- store

class LearningStore:
    """SQLite in MODEL_DIR, shared by threads and gunicorn workers.

    Two layers per project. `records` is the working state: what each annotated image teaches,
    updated by every event. `published` is the state predictions use, with `projects.version`,
    a digest of its content: it is replaced only when the publishing policy says so (see
    `Learner.publish`), so a no-op event changes nothing and a stream of annotations does not
    make the project's stored predictions stale every time. Every change is one transaction
    (a crash leaves the old state or the new one); WAL lets readers run while a worker writes,
    and reading the version is one indexed SELECT, so each request can check it.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, DB_NAME)
        os.makedirs(model_dir, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript("""
                CREATE TABLE IF NOT EXISTS projects (
                    key TEXT PRIMARY KEY, instance TEXT NOT NULL, project TEXT NOT NULL, created TEXT NOT NULL,
                    version TEXT NOT NULL DEFAULT '', calibration TEXT, label_config TEXT, updated REAL,
                    published_at REAL, training_started REAL);
                CREATE INDEX IF NOT EXISTS projects_by_id ON projects (instance, project);
                CREATE TABLE IF NOT EXISTS records (
                    key TEXT NOT NULL, rkey TEXT NOT NULL, task TEXT NOT NULL, annotation TEXT,
                    source TEXT NOT NULL, digest TEXT NOT NULL, labels TEXT NOT NULL, updated REAL NOT NULL,
                    examples BLOB NOT NULL, sample BLOB NOT NULL, PRIMARY KEY (key, rkey));
                CREATE TABLE IF NOT EXISTS published (
                    key TEXT NOT NULL, rkey TEXT NOT NULL, task TEXT NOT NULL, annotation TEXT,
                    digest TEXT NOT NULL, labels TEXT NOT NULL, updated REAL NOT NULL, examples BLOB NOT NULL,
                    PRIMARY KEY (key, rkey));
                CREATE TABLE IF NOT EXISTS forgotten (
                    key TEXT NOT NULL, task TEXT NOT NULL, PRIMARY KEY (key, task));
            """)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        # WAL is set once, when the file is created (it is a property of the database file).
        return connect(self.path, wal=False)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db, transaction(db):
            yield db

    # -- projects ----------------------------------------------------------------------------

    def remember_project(self, instance: str, project_id: str, created: str = "",
                         label_config: str | None = None) -> str:
        """A project this backend serves (seen in /setup or learned from); returns its key."""
        key = state_key(instance, project_id, created)
        with self._transaction() as db:
            db.execute("INSERT INTO projects (key, instance, project, created, updated) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(key) DO NOTHING", (key, instance, str(project_id), created, time.time()))
            if label_config:
                db.execute("UPDATE projects SET label_config = ? WHERE key = ? AND "
                           "(label_config IS NULL OR label_config != ?)", (label_config, key, label_config))
        return key

    def resolve(self, instance: str, project_id: str, created: str = "") -> str:
        """The key for a project named by id (and creation time when known): with the time, exact;
        without it (a command given `--project 3`), the newest state of that id on this instance."""
        if created:
            return state_key(instance, project_id, created)
        with self._connect() as db:
            row = db.execute("SELECT key FROM projects WHERE instance = ? AND project = ? "
                             "ORDER BY (version != '') DESC, published_at DESC, updated DESC LIMIT 1",
                             (instance, str(project_id))).fetchone()
        return row[0] if row else state_key(instance, project_id)

    def known(self, instance: str, project_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM projects WHERE instance = ? AND project = ?",
                              (instance, str(project_id))).fetchone() is not None

    def projects(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("""SELECT p.key, p.project, p.version, p.calibration, p.published_at,
                                        (SELECT COUNT(*) FROM records r WHERE r.key = p.key),
                                        (SELECT COUNT(*) FROM published u WHERE u.key = p.key)
                                 FROM projects p ORDER BY p.key""").fetchall()
        return [{"key": r[0], "project": r[1], "version": r[2], "calibration": json.loads(r[3]) if r[3] else None,
                 "published_at": r[4], "records": r[5], "published": r[6]} for r in rows]

    # -- the published state (what predictions use) ------------------------------------------

    def version(self, key: str) -> str:
        """Version suffix of the published state; "" = nothing learned (predictions as without learning)."""
        with self._connect() as db:
            row = db.execute("SELECT version FROM projects WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""

    def calibration(self, key: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT calibration FROM projects WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def published_examples(self, key: str) -> list:
        """TaskExamples of the published state, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT examples FROM published WHERE key = ? ORDER BY updated, rkey", (key,)).fetchall()
        return [unpack_examples(row[0]) for row in rows]

    def published_digests(self, key: str) -> dict[str, tuple[str, str, list[str]]]:
        """rkey -> (task, digest, labels) of the published state."""
        with self._connect() as db:
            rows = db.execute("SELECT rkey, task, digest, labels FROM published WHERE key = ?", (key,)).fetchall()
        return {r[0]: (r[1], r[2], json.loads(r[3])) for r in rows}

    def publish(self, key: str, version: str, calibration: dict | None) -> bool:
        """Make the working records the published state under `version`. False (and nothing
        written) when that version is already published: the content is the same."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT version FROM projects WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] == version:
                return False
            db.execute("DELETE FROM published WHERE key = ?", (key,))
            db.execute("DELETE FROM forgotten WHERE key = ?", (key,))
            db.execute("INSERT INTO published SELECT key, rkey, task, annotation, digest, labels, updated, examples "
                       "FROM records WHERE key = ?", (key,))
            db.execute("UPDATE projects SET version = ?, calibration = ?, published_at = ? WHERE key = ?",
                       (version, json.dumps(calibration) if calibration else None, now, key))
            return True

    # -- the working state -------------------------------------------------------------------

    def label_config(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT label_config FROM projects WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def examples(self, key: str) -> list:
        """TaskExamples of the working records, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT examples FROM records WHERE key = ? ORDER BY updated, rkey", (key,)).fetchall()
        return [unpack_examples(row[0]) for row in rows]

    def samples(self, key: str) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
        """(rkey, features, truth) of the working records, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT rkey, sample FROM records WHERE key = ? ORDER BY updated, rkey", (key,)).fetchall()
        return [(row[0], *unpack_sample(row[1])) for row in rows]

    def keys(self, key: str) -> list[tuple[str, str]]:
        """(rkey, task) of the working records, oldest first."""
        with self._connect() as db:
            return [tuple(r) for r in db.execute(
                "SELECT rkey, task FROM records WHERE key = ? ORDER BY updated, rkey", (key,))]

    def digests(self, key: str) -> dict[str, tuple[str, str, list[str]]]:
        """rkey -> (task, digest, labels) of the working records."""
        with self._connect() as db:
            rows = db.execute("SELECT rkey, task, digest, labels FROM records WHERE key = ?", (key,)).fetchall()
        return {r[0]: (r[1], r[2], json.loads(r[3])) for r in rows}

    def task_source(self, key: str, task: str) -> str | None:
        """Digest of what the task's records were computed from (None: nothing learned from it)."""
        with self._connect() as db:
            row = db.execute("SELECT source FROM records WHERE key = ? AND task = ? LIMIT 1", (key, task)).fetchone()
        return row[0] if row else None

    def tasks_of_annotations(self, key: str, annotations: Iterable[str]) -> list[str]:
        """Tasks whose learned (working or published) records came from these annotations."""
        ids = sorted({str(a) for a in annotations})
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._connect() as db:
            rows = db.execute(f"SELECT task FROM records WHERE key = ? AND annotation IN ({marks}) UNION "
                              f"SELECT task FROM published WHERE key = ? AND annotation IN ({marks})",
                              (key, *ids, key, *ids)).fetchall()
        return sorted({r[0] for r in rows}, key=lambda t: (len(t), t))

    def put_records(self, key: str, task: str, records: Sequence[TaskRecord], source: str = "") -> bool:
        """Replace everything learned from `task` with `records` (none = forget the task).
        Returns whether the task's content changed."""
        from gem_model.learning import examples_digest

        now = time.time()
        new = {r.key: examples_digest(r.examples) for r in records}
        with self._transaction() as db:
            old = {r[0]: (r[1], r[2]) for r in db.execute(
                "SELECT rkey, digest, updated FROM records WHERE key = ? AND task = ?", (key, task))}
            db.execute("DELETE FROM records WHERE key = ? AND task = ?", (key, task))
            for record in records:
                # A record whose content did not change keeps its age (its place in the per-label cap).
                digest, updated = old.get(record.key, (None, now))
                db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (key, record.key, record.task, record.annotation, source, new[record.key],
                            json.dumps(sorted(record.examples.labels)),
                            updated if digest == new[record.key] else now,
                            pack_examples(record.examples), pack_sample(record.features, record.truth)))
            if old and not records:   # forgotten (not merely dropped by the per-label cap)
                db.execute("INSERT OR IGNORE INTO forgotten VALUES (?, ?)", (key, task))
            db.execute("UPDATE projects SET updated = ? WHERE key = ?", (now, key))
        return {k: v[0] for k, v in old.items()} != new

    def forgotten_tasks(self, key: str) -> set[str]:
        """Tasks forgotten (annotations deleted) since the last publication."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT task FROM forgotten WHERE key = ?", (key,))}

    def drop_keys(self, key: str, rkeys: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM records WHERE key = ? AND rkey = ?", [(key, k) for k in rkeys])

    def start_training(self, key: str, requested: float) -> bool:
        """Claim a rebuild asked for at `requested`: False when one started after that (the request
        is merged into it), else records this start and returns True."""
        with self._transaction() as db:
            row = db.execute("SELECT training_started FROM projects WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] is not None and row[0] >= requested:
                return False
            db.execute("UPDATE projects SET training_started = ? WHERE key = ?", (time.time(), key))
            return True

    def reset(self, key: str) -> None:
        """Forget what the project learned: predictions are again those of the unlearned model."""
        with self._transaction() as db:
            db.execute("DELETE FROM records WHERE key = ?", (key,))
            db.execute("DELETE FROM published WHERE key = ?", (key,))
            db.execute("DELETE FROM forgotten WHERE key = ?", (key,))
            db.execute("UPDATE projects SET calibration = NULL, version = '', published_at = ? WHERE key = ?",
                       (time.time(), key))


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
    """Per-project `LearnedState` of the published state, rebuilt when its version moves.

    The states of the projects used most recently are kept, up to GEM_LEARNED_CACHE_MB: a server
    that meets many projects over weeks keeps a bounded set; one pushed out is rebuilt from the store."""

    def __init__(self, store: LearningStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.instance = instance_of(settings.label_studio_url)
        self.max_bytes = int(settings.learned_cache_mb * 2**20)
        # key -> (version, state, bytes), least recently used first
        self._cache: "collections.OrderedDict[str, tuple[str, LearnedState, int]]" = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._cache)

    def key_for(self, project: Any) -> str | None:
        """State key of a project as Label Studio names it in /setup and /predict ("<id>.<created>"),
        or by id alone (a command's `--project`)."""
        if project is None or project == "":
            return None
        project_id, _, created = str(project).strip().partition(".")
        if not project_id:
            return None
        return self.store.resolve(self.instance, project_id, created)

    def _keep(self, key: str, version: str, state: LearnedState) -> None:
        size = learned_state_bytes(state)
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            if size > self.max_bytes:
                return
            self._cache[key] = (version, state, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, evicted) = self._cache.popitem(last=False)
                self._bytes -= evicted

    def get(self, key: str | None) -> LearnedState | None:
        if not key:
            return None
        try:
            version = self.store.version(key)
            if not version:
                return None
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None and cached[0] == version:
                    self._cache.move_to_end(key)
                    return cached[1]
            state = self._build(key)
            if self.store.version(key) != version:   # published again while we read: read the new one
                state = self._build(key)
                version = self.store.version(key)
        except sqlite3.Error as exc:   # a broken state file must not stop predictions
            logger.warning("learning store unreadable (%s); predicting without learned state", exc)
            return None
        state = LearnedState(version=version, maps=state.maps)
        self._keep(key, version, state)
        return state

    def project_learned(self, project: Any):
        """The project's state as `backend.pipeline.ProjectLearned` for `PredictionPipeline.prepare`,
        or None when it has learned nothing (any caller of the pipeline can use this)."""
        from .pipeline import ProjectLearned

        try:
            state = self.get(self.key_for(project))
        except sqlite3.Error as exc:
            logger.warning("learning store unreadable (%s); predicting without learned state", exc)
            return None
        return None if state is None else ProjectLearned(version=state.version, maps=state.maps)

    def _build(self, key: str) -> LearnedState:
        from gem_model.learning import LearnedMaps, build_bank

        calibration = calibration_from_dict(self.store.calibration(key))
        bank = None
        if self.settings.learn_prototypes:
            examples = self.store.published_examples(key)
            if examples:
                bank = build_bank(examples, self.settings.learn_max_examples)
        return LearnedState(version=self.store.version(key),
                            maps=LearnedMaps(bank=bank, calibration=calibration, prior=self.settings.learn_prior))


def state_version(digests: Mapping[str, str], calibration: Mapping[str, Any] | None, settings: Settings) -> str:
    """Version suffix of a learned state from its content: the examples (by digest), the calibration
    and the settings that shape how they are applied. "" for an empty state."""
    if not digests and not calibration:
        return ""
    cal = dict(calibration or {})
    content = {
        "records": sorted(digests.items()),
        "offsets": {k: round(float(v), 4) for k, v in sorted((cal.get("offsets") or {}).items())},
        "min_area": cal.get("min_area"),
        "prototypes": settings.learn_prototypes, "prior": settings.learn_prior,
        "max_examples": settings.learn_max_examples,
    }
    return "l" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------- the learner

@dataclass(frozen=True)
class Job:
    kind: str                  # "task" (learn or forget one task) | "deleted" (annotations gone) | "rebuild"
    project: str               # Label Studio project id
    task: str | None = None
    annotation: str | None = None
    annotations: tuple[str, ...] = ()     # "deleted": the ids Label Studio sent
    requested: float = 0.0                # "rebuild": when it was asked for (time.time())


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

    def project(self, project: str) -> dict:
        return self.client.get_project(int(project)) or {}

    def label_config(self, project: str) -> str:
        return self.project(project).get("label_config") or ""

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
        self._waiting_rebuilds: set[str] = set()   # projects with a rebuild in the queue, not started
        self.instance = instance_of(settings.label_studio_url)
        self.rebuilds = 0                      # rebuilds run (merged requests do not count)
        # Called with (project as /predict names it, new learned version) after a publication changed
        # a project's learned state (the server refreshes the project's tasks: backend/background.py).
        self.on_publish: list[Callable[[str, str], Any]] = []

    # -- intake ------------------------------------------------------------------------------

    def submit(self, job: Job) -> bool:
        """Queue a job; False (and a warning) when the queue is full. Never blocks. A rebuild of a
        project that already waits in the queue is merged into it (True)."""
        self._ensure_thread()
        if job.kind == "rebuild":
            with self._thread_lock:
                if job.project in self._waiting_rebuilds:
                    logger.info("START_TRAINING for project %s merged into the rebuild already queued", job.project)
                    return True
                self._waiting_rebuilds.add(job.project)
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            if job.kind == "rebuild":
                with self._thread_lock:
                    self._waiting_rebuilds.discard(job.project)
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
        if job.kind == "rebuild":
            with self._thread_lock:
                self._waiting_rebuilds.discard(job.project)
        with self._work_lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if job.kind == "rebuild":
                self.rebuild(job.project, requested=job.requested or time.time())
            elif job.kind == "deleted":
                self.unlearn(job.project, job.annotations)
            else:
                self.learn_task(job.project, job.task, job.annotation)

    def project_state(self, source: LabelStudioSource, project: str) -> tuple[str, Any]:
        """(state key, prediction plan) of a project as its Label Studio has it now. The key comes
        from Label Studio (id + creation time), never from the webhook body."""
        from .label_config import parse_label_config

        info = _as_dict(source.project(project))
        key = self.store.remember_project(self.instance, str(project), created_stamp(info.get("created_at")),
                                          info.get("label_config") or None)
        return key, parse_label_config(info.get("label_config") or "", self.settings.outputs)

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
                   key: str | None = None, publish: bool = True) -> int:
        """Learn from the task's annotation as Label Studio has it now (or forget the task when it
        has none left), then publish if the policy says so. Returns the number of image records
        learned (0 when the task's records did not change)."""
        source = source or self._source(project)
        if key is None or plan is None:
            key, plan = self.project_state(source, project)
        if task is None:
            if task_id is None and annotation_id is not None:
                task_id = str(_as_dict(source.annotation(annotation_id)).get("task"))
            task = source.task(str(task_id))
        if str(task.get("project")) != str(project):
            raise LearningError(f"task {task.get('id')} belongs to project {task.get('project')}, "
                                f"not {project}: ignored")
        task_id = str(task.get("id"))
        annotation = self._current_annotation(source, task, annotation_id)
        origin = _source_digest(task, annotation, plan)
        if self.store.task_source(key, task_id) == origin or (annotation is None and
                                                              self.store.task_source(key, task_id) is None):
            logger.info("project %s: task %s: nothing new to learn (%s)", project, task_id,
                        "no annotation" if annotation is None else f"annotation {annotation.get('id')} as learned")
            return 0
        records = [] if annotation is None else self._records(source, project, task, annotation, plan)
        changed = self.store.put_records(key, task_id, records, source=origin)
        if annotation is None:
            logger.info("project %s: task %s has no annotation to learn from; forgotten", project, task_id)
        if changed and publish:
            self.publish(key, plan)
        return len(records) if changed else 0

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

    def publish(self, key: str, plan: Any, force: bool = False) -> str:
        """Apply the publishing policy (GEM_LEARN_PUBLISH) and, when due, refit the calibration and
        make the working records the state predictions use. Returns the published version suffix.

        `force` (a rebuild): publish whatever the policy says. A deleted example the published
        state holds is always published at once; the version is a digest of the content, so
        publishing what is already published changes nothing.
        """
        from gem_model.learning import publish_due

        examples = self.store.examples(key)
        keep = self._kept_keys(examples)
        dropped = [e.key for e in examples if e.key not in keep]
        if dropped:
            self.store.drop_keys(key, dropped)
        working = self.store.digests(key)
        published = self.store.published_digests(key)
        # An example the predictions use whose task was forgotten (annotation deleted or cancelled);
        # one only dropped by the per-label cap is replaced by a newer one and waits for the policy.
        forgotten = self.store.forgotten_tasks(key)
        removed = any(task in forgotten for task, _, _ in published.values())
        pending: dict[str, int] = {}
        for rkey, (_, digest, labels) in working.items():
            if rkey not in published or published[rkey][1] != digest:
                for label in labels or [""]:
                    pending[label] = pending.get(label, 0) + 1
        counts: dict[str, int] = {}
        for _, _, labels in published.values():
            for label in labels or [""]:
                counts[label] = counts.get(label, 0) + 1
        current = self.store.version(key)
        if {k: v[1] for k, v in working.items()} == {k: v[1] for k, v in published.items()} and \
                (current or not working):
            return current
        policy = self.settings.learn_publish
        if not (force or policy == "every" or publish_due(counts, pending, removed)):
            logger.info("project %s: learned state kept at %s: %s pending against %s published "
                        "(GEM_LEARN_PUBLISH=%s publishes when a label's pending examples reach its published ones)",
                        key, current or "none", dict(sorted(pending.items())), dict(sorted(counts.items())), policy)
            return current
        calibration = self._calibrate(key, plan) if working else None
        version = state_version({k: v[1] for k, v in working.items()}, calibration, self.settings)
        if self.store.publish(key, version, calibration):
            logger.info("project %s: learned state %s published from %d annotated images (was %s)",
                        key, version or "none", len(working), current or "none")
            self._announce(key, version)
        return version

    def _announce(self, key: str, version: str) -> None:
        project = key.rpartition("#")[2]     # "<id>.<created>": how /predict names the project
        for callback in self.on_publish:
            try:
                callback(project, version)
            except Exception as exc:   # what follows a publication must not undo or fail it
                logger.warning("project %s: after publishing %s: %s: %s", key, version or "none",
                               type(exc).__name__, exc)

    def _calibrate(self, key: str, plan: Any) -> dict | None:
        from gem_model.learning import CalibrationSample, calibrate

        labels = list(dict.fromkeys(label.value for control in plan.controls for label in control.labels))
        prompts = {}
        for control in plan.controls:
            for label in control.labels:
                prompts.setdefault(label.value, tuple(label.prompts))
        samples = self.store.samples(key)
        if not samples or not labels:
            return None
        predictor = self._predictor()
        text = {label: predictor.text_embeddings(list(prompts[label])) for label in labels}   # [P, D] each
        items = []
        for rkey, features, truth in samples:
            text_maps = np.stack([np.einsum("hwd,pd->phw", features, text[label]).max(axis=0) for label in labels])
            cover = np.stack([truth.get(label, np.zeros(features.shape[:2], np.float32)) for label in labels])
            items.append(CalibrationSample(rkey, features, text_maps, cover))
        started = time.perf_counter()
        fit = calibrate(items, labels, self.region_config(), self.store.examples(key),
                        use_prototypes=self.settings.learn_prototypes, prior=self.settings.learn_prior,
                        max_examples=self.settings.learn_max_examples)
        logger.info("project %s: calibrated on %d images in %.1f s: IoU %.3f -> %.3f, offsets %s, min_area %s",
                    key, fit.samples, time.perf_counter() - started, fit.iou_before, fit.iou_after,
                    {k: round(v, 4) for k, v in fit.offsets.items()}, fit.min_area)
        return calibration_to_dict(fit)

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

    def unlearn(self, project: str, annotations: Sequence[str], source: LabelStudioSource | None = None) -> int:
        """ANNOTATIONS_DELETED: Label Studio sends only the ids of the deleted annotations. The tasks
        are found in what was learned; each is relearned from the annotations it has left (or
        forgotten). Ids never learned change nothing. Returns the number of tasks relearned."""
        source = source or self._source(project)
        key, plan = self.project_state(source, project)
        tasks = self.store.tasks_of_annotations(key, annotations)
        if not tasks:
            logger.info("project %s: deleted annotation(s) %s were never learned; nothing to unlearn",
                        project, ", ".join(annotations[:20]))
            return 0
        changed = 0
        for task_id in tasks:
            try:
                self.learn_task(project, task_id, source=source, plan=plan, key=key, publish=False)
                changed += 1
            except Exception as exc:   # the task itself was deleted too: forget it
                logger.info("project %s: task %s not readable (%s: %s); forgetting what it taught",
                            project, task_id, type(exc).__name__, exc)
                self.store.put_records(key, task_id, [], source="")
                changed += 1
        self.publish(key, plan)
        return changed

    def rebuild(self, project: str, source: LabelStudioSource | None = None, requested: float | None = None) -> str:
        """Relearn the project from all its annotations (START_TRAINING), with progress in the log.
        Requests made before a rebuild started are merged into it (across workers too: the start
        time is in the store). Returns the published version suffix."""
        source = source or self._source(project)
        key, plan = self.project_state(source, project)
        if not self.store.start_training(key, requested if requested is not None else time.time()):
            logger.info("project %s: START_TRAINING merged into the rebuild that started after it", project)
            return self.store.version(key)
        self.rebuilds += 1
        started = time.perf_counter()
        logger.info("project %s: rebuilding the learned state from all annotations", project)
        # Task by task in place, one publication at the end: predictions meanwhile keep the old state.
        learned = failed = seen = 0
        tasks_seen: set[str] = set()
        for task in source.annotated_tasks(project):
            seen += 1
            tasks_seen.add(str(task.get("id")))
            try:
                learned += self.learn_task(project, str(task.get("id")), source=source, plan=plan, key=key,
                                           task=task if isinstance(task.get("annotations"), list) else None,
                                           publish=False)
            except Exception as exc:   # one bad task must not sink the rebuild
                failed += 1
                logger.warning("project %s: task %s not learned: %s: %s", project, task.get("id"),
                               type(exc).__name__, exc)
            if seen % 10 == 0:
                logger.info("project %s: rebuild progress: %d annotated tasks read, %d images learned, %d failed "
                            "(%.0f s)", project, seen, learned, failed, time.perf_counter() - started)
        gone = [rkey for rkey, task in self.store.keys(key) if task not in tasks_seen]
        if gone:   # annotations deleted while no webhook reached us
            self.store.drop_keys(key, gone)
        version = self.publish(key, plan, force=True)
        logger.info("project %s: rebuild done: %d annotated tasks, %d images learned anew, %d failed, version %s, "
                    "%.1f s", project, seen, learned, failed, version or "none", time.perf_counter() - started)
        return version


def _source_digest(task: Mapping[str, Any], annotation: Mapping[str, Any] | None, plan: Any) -> str:
    """What a task's records are computed from: the annotation's result and parent prediction,
    the task's data and the config's labels and images. Equal digests: nothing to recompute."""
    if annotation is None:
        return ""
    content = {
        "annotation": annotation.get("id"), "result": annotation.get("result"),
        "parent": annotation.get("parent_prediction") or annotation.get("prediction"),
        "data": task.get("data"),
        "labels": sorted({label.value for control in plan.controls for label in control.labels}),
        "images": [[spec.name, spec.data_key, spec.value] for spec in plan.images],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.learning",
                                     description="Inspect, reset or rebuild what projects learned from annotations "
                                                 "(MODEL_DIR/learning.sqlite3).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="projects, state versions, records and calibration")
    reset = sub.add_parser("reset", help="forget what a project learned (its predictions are those of the "
                                         "unlearned model again)")
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
            print(f"project {p['key']}: version {p['version'] or 'none'}, {p['published']} annotated images in "
                  f"predictions, {p['records']} learned, offsets {cal.get('offsets', {})}, "
                  f"min_area {cal.get('min_area')}, calibration IoU {cal.get('iou_before')} -> {cal.get('iou_after')}")
        return 0
    project = project_key(args.project)
    if args.command == "reset":
        key = store.resolve(instance_of(settings.label_studio_url), project)
        was = store.version(key)
        store.reset(key)
        print(f"project {key}: learned state forgotten; predictions are again those of the unlearned model")
        if was:
            print(_refresh_from_command(settings, key.rpartition("#")[2], ""))
        return 0
    from .images import ImageFetcher

    fetcher = ImageFetcher(settings)
    from .pipeline import load_predictor

    predictor = load_predictor(settings)   # the same model, method and windows as the server
    learner = Learner(settings, store, lambda: predictor, lambda p: source_for(settings, p),
                      lambda url, task_id, p: fetcher.decode(fetcher.download(url, task_id=task_id, project_key=p)),
                      settings.region_config)
    refreshed: list[str] = []
    learner.on_publish.append(lambda name, learned: refreshed.append(_refresh_from_command(settings, name, learned)))
    version = learner.rebuild(project)
    print(f"project {project}: rebuilt, version {version or 'none (nothing learned)'}")
    for line in refreshed:
        print(line)
    return 0


def _refresh_from_command(settings: Settings, project: str, learned: str) -> str:
    """After `reset` or `rebuild` changed a project's learned version: ask for the refresh the server
    asks for after a publication, by writing it into MODEL_DIR/outbox.sqlite. A running backend on
    this MODEL_DIR lists and predicts it (its idle finisher looks at the outbox every 30 s,
    backend/background.py ADOPT_EVERY_S); one started later does. Returns the line to print."""
    from .background import label_studio_project_id
    from .outbox import Outbox

    project_id = label_studio_project_id(project)
    if project_id is None:
        return f"project {project}: no refresh (not a Label Studio project id)"
    if settings.refresh_max_tasks <= 0:
        return (f"project {project_id}: no refresh (GEM_REFRESH_MAX_TASKS=0): Retrieve Predictions "
                f"recomputes the stale predictions")
    outbox = Outbox(os.path.join(settings.model_dir, "outbox.sqlite"))
    answer = outbox.request_refresh(project_id, project, learned)
    if answer is None:
        return f"project {project_id}: a refresh to learned version {learned or 'none'} was already asked for"
    old, dropped = answer
    cancelled = (f"; the refresh to {old.learned or 'none'} it replaces is cancelled ({len(dropped)} of its tasks "
                 f"not predicted)" if old is not None else "")
    return (f"project {project_id}: refresh to learned version {learned or 'none'} asked for: the backend "
            f"running on {settings.model_dir} predicts its unlabeled tasks again, lowest score first, at most "
            f"{settings.refresh_max_tasks}{cancelled}")


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
