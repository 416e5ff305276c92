"""`GemBackendModel`: Label Studio tasks in, pre-annotations out.

The shape Label Studio ML backend users know: `predict(tasks, context) -> predictions`,
`setup(...)`, and `fit`/`webhook(event, data)`. It loads the model, keeps what /setup sent, the
prompt memory and the feedback log, and hands the predicting itself to `PredictionPipeline`
(backend/pipeline.py), which the background finisher and `python -m backend.prelabel` share.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from .feedback import FeedbackLog
from .images import ImageFetcher
from .label_config import parse_label_config
from .pipeline import (DEFERRED, UNDEFINED_DATA_KEY, PredictionJob, PredictionPipeline, PredictReport,  # noqa: F401
                       ProjectLearned, RequestLimitError, TaskError, TaskOutcome, check_prompt_limits,
                       compute_model_version, load_predictor, versioned)
from .prompts import PromptMemory, project_key
from .settings import Settings

logger = logging.getLogger(__name__)

# As Label Studio 1.23 sends them (webhooks/models.py): deletions only in bulk, as ids.
ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                               "ANNOTATIONS_DELETED"})
TRAINING_EVENTS = frozenset({"START_TRAINING"})


class ModelNotReady(Exception):
    """The model is still loading (`failed` False) or could not be loaded (`failed` True)."""

    def __init__(self, message: str, failed: bool):
        super().__init__(message)
        self.failed = failed


class GemBackendModel:
    """One per process: loading, /setup memory, the prompt memory and the webhook feedback log.

    Predictions themselves run in `self.pipeline` (backend/pipeline.py), created once the model
    has loaded. `learned_provider(project_key) -> ProjectLearned | None`, when given, supplies
    per-project learned data for each batch call (the seam for the learning loop).
    """

    MAX_REMEMBERED_SCHEMAS = 256   # /setup configs kept per process (bounded: /setup may be open)

    def __init__(self, settings: Settings, predictor: Any = None,
                 region_extractor: Callable[..., Any] | None = None, region_config: Any = None,
                 fetcher: ImageFetcher | None = None, metrics: Any = None,
                 on_load_error: Callable[[str], None] | None = None,
                 learned_provider: Callable[[str | None], ProjectLearned | None] | None = None):
        self.settings = settings
        self._metrics = metrics
        # Called with the message when loading fails; the production entry point exits there
        # (backend/wsgi.py), the development server and tests keep reporting it on /health.
        self.on_load_error = on_load_error
        self.fetcher = fetcher or ImageFetcher(settings)
        self.memory = PromptMemory(os.path.join(settings.model_dir, "prompts.json"))
        self.feedback = FeedbackLog(os.path.join(settings.model_dir, "feedback.jsonl"),
                                    max_bytes=int(settings.feedback_max_mb * 2**20), backups=settings.feedback_backups)
        self.feedback_path = self.feedback.path
        self.model_version = compute_model_version(settings)
        self.learning: ProjectLearning | None = None
        if settings.learn or settings.use_learned:
            try:
                self.learning = ProjectLearning(self)
            except Exception as exc:   # e.g. MODEL_DIR not writable: predict without learning
                logger.error("learning from annotations is off: cannot open its state in %s: %s",
                             settings.model_dir, exc)
        if learned_provider is None and self.learning is not None and settings.use_learned:
            learned_provider = self.learning.learned
        self.learned_provider = learned_provider
        self.pipeline: PredictionPipeline | None = None
        self._extract = region_extractor
        self._region_config = region_config
        self._schemas_lock = threading.Lock()
        self._schemas: collections.OrderedDict[str, str] = collections.OrderedDict()  # project -> config
        self._ready = threading.Event()
        self._load_done = threading.Event()      # set on success and on failure
        self._load_started = False
        self._load_lock = threading.Lock()
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        if predictor is not None:
            self._make_pipeline(predictor)
            self._finish_load(0.0)

    @property
    def metrics(self) -> Any:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:
        self._metrics = metrics
        if self.pipeline is not None:
            self.pipeline.metrics = metrics

    @property
    def _predictor(self) -> Any:
        return self.pipeline.predictor if self.pipeline is not None else None

    def _make_pipeline(self, predictor: Any) -> None:
        self.pipeline = PredictionPipeline(
            self.settings, predictor, region_extractor=self._extract,
            region_config=self._region_config if self._region_config is not None else self.settings.region_config(),
            fetcher=self.fetcher, model_version=self.model_version, metrics=self._metrics)

    # -- loading -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start_loading(self) -> None:
        """Load in a background thread so the server answers /health at once."""
        with self._load_lock:
            if self._load_started or self.ready:
                return
            self._load_started = True
        # Importing torch loads large extension modules while holding the GIL (seconds). Done in
        # a background thread it would stall /health past Label Studio's 1 s timeout, so it runs
        # here, before the server accepts connections; only the weights load in the background.
        try:
            import gem_model  # noqa: F401
            import gem_model.regions  # noqa: F401
        except Exception:  # reported by load() below, where it is caught and kept as load_error
            pass
        threading.Thread(target=self.load, name="gem-model-load", daemon=True).start()

    def load(self) -> None:
        started = time.perf_counter()
        s = self.settings
        try:
            from .settings import precision_report
            logger.info("loading model %s (%s) on %s; %s", s.model_name, s.pretrained or "random weights",
                        s.device, precision_report(s)[0])
            predictor = load_predictor(s)
            self._make_pipeline(predictor)
        except Exception as exc:  # any failure must reach /health and /predict as a message
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("model failed to load: %s", self.load_error,
                         exc_info=not _is_user_error(exc))
            if self.metrics is not None:
                self.metrics.model_ready.set(0)
            self._load_done.set()
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self._finish_load(time.perf_counter() - started)

    def _finish_load(self, seconds: float) -> None:
        self.load_seconds = seconds
        self._ready.set()
        self._load_done.set()
        if self.metrics is not None:
            self.metrics.model_ready.set(1)
            self.metrics.model_load_seconds.set(seconds)
        logger.info("model ready (version %s) after %.1f s", self.model_version, seconds)
        if self.learning is not None:
            self.learning.preload()

    def wait_until_ready(self, timeout: float) -> None:
        """Return when ready; raise ModelNotReady when loading failed or takes longer than `timeout`."""
        if self.load_error is None and not self.ready:
            self._load_done.wait(timeout)
        if self.load_error is not None:
            raise ModelNotReady(f"model failed to load: {self.load_error}", failed=True)
        if not self.ready:
            raise ModelNotReady("model is still loading; retry shortly", failed=False)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    # -- Label Studio API ------------------------------------------------------------------

    def setup(self, project: Any = None, schema: str | None = None, hostname: str | None = None,
              access_token: str | None = None, extra_params: Any = None, **kwargs: Any) -> str:
        """Remember what /setup sends; never loads the model (Label Studio waits only 3 s)."""
        key = project_key(project)
        if key and isinstance(schema, str) and schema.strip():
            with self._schemas_lock:
                self._schemas[key] = schema
                self._schemas.move_to_end(key)
                while len(self._schemas) > self.MAX_REMEMBERED_SCHEMAS:
                    self._schemas.popitem(last=False)
        self.fetcher.remember_setup(key, hostname, access_token)
        if self.learning is not None and key:
            self.learning.remember_project(project, schema)
        return self.version_for(project)

    def version_for(self, project: Any) -> str:
        """Model version of this project's stored predictions, as `prepare` gives them: the base
        version, the label config's labels and prompts, and the learned state's."""
        key = project_key(project)
        learned = self.learned_provider(project) if self.learned_provider is not None and key else None
        remembered = self.memory.get(key) if self.settings.remember_prompts and key else ()
        return versioned(self.model_version, self.schema(key), self.settings, remembered, learned)

    def known_versions(self, limit: int = 50) -> list[str]:
        """The versions this process answers for the projects it heard of in /setup (newest first),
        then the base version: Label Studio's GET /versions names no project."""
        with self._schemas_lock:
            projects = list(reversed(self._schemas))[:limit]
        return list(dict.fromkeys([*(self.version_for(p) for p in projects), self.model_version]))

    def predict(self, tasks: Sequence[Mapping[str, Any]], context: Any = None, **kwargs: Any) -> list[dict]:
        """One entry per task, in order: `{"model_version", "score", "result"}`.

        A task that cannot be predicted gets `{"model_version", "score": 0, "error"}` (no
        `result`, so Label Studio stores nothing and retries it later), or with
        GEM_FAILED_TASKS=empty, or in interactive calls (`context` given), `"result": []`.
        kwargs: `label_config` (else the one /setup sent for `project`), `project`.
        """
        return self.predict_with_report(tasks, context, **kwargs)[0]

    def predict_with_report(self, tasks: Sequence[Mapping[str, Any]], context: Any = None, *,
                            label_config: str | None = None, project: Any = None,
                            deadline: float | None = None, **kwargs: Any) -> tuple[list[dict], PredictReport]:
        """`predict` with the pipeline's report. `deadline` (time.monotonic()): see PredictionPipeline.predict."""
        job = self.prepare(context, label_config=label_config, project=project)
        return self.pipeline.predict(tasks, job, deadline=deadline)  # type: ignore[union-attr]

    def prepare(self, context: Any = None, *, label_config: str | None = None,
                project: Any = None) -> PredictionJob:
        """What to predict for this call: config (given or from /setup), remembered and learned prompts."""
        key = project_key(project)
        config = label_config or self.schema(key)
        plan = parse_label_config(config or "", self.settings.outputs)   # LabelConfigError: caller's 4xx
        self.wait_until_ready(self.settings.load_wait)
        remembered = self.memory.get(key) if self.settings.remember_prompts else ()
        # Interactive calls too: a typed prompt is shaped by what the project learned, like Retrieve.
        learned = self.learned_provider(project) if self.learned_provider is not None else None
        job = self.pipeline.prepare(plan, context, project=project, remembered=remembered,  # type: ignore[union-attr]
                                    learned=learned)
        typed = tuple(dict.fromkeys(p for prompts in job.prompts.free_text.values() for p in prompts))
        if job.prompts.interactive and typed and self.settings.remember_prompts and key:
            self.memory.set(key, typed)
        return job

    def schema(self, key: str | None) -> str | None:
        """The label config /setup sent for this project, if any."""
        with self._schemas_lock:
            return self._schemas.get(key or "")

    def fit(self, event: str, data: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
        return self.webhook(event, data or {})

    def webhook(self, event: str, data: Mapping[str, Any]) -> dict:
        """Record annotation events in the feedback log and queue them for learning (answers at once).

        status: "queued" (will be learned), "recorded" (logged only: learning off, or a project or
        Label Studio this backend does not know), "dropped" (learning queue full), "ok" / "ignored".
        """
        if event in ANNOTATION_EVENTS:
            self._append_feedback(event, data)
            if self.learning is not None:
                queued, detail = self.learning.on_annotation_event(event, data)
                if queued is not None:
                    return {"status": queued, "action": event, **({"detail": detail} if detail else {})}
            return {"status": "recorded", "action": event}
        if event in TRAINING_EVENTS:
            if self.learning is not None:
                queued, detail = self.learning.on_start_training(data)
                if queued is not None:
                    return {"status": queued, "action": event, "detail": detail}
            return {"status": "ok", "action": event,
                    "detail": "nothing to learn: learning is off (GEM_LEARN), or the project or its Label Studio "
                              "is unknown to this backend; corrections are recorded in MODEL_DIR/feedback.jsonl"}
        return {"status": "ignored", "action": event}

    # -- feedback --------------------------------------------------------------------------

    def _append_feedback(self, event: str, data: Mapping[str, Any]) -> None:
        annotation = data.get("annotation") if isinstance(data.get("annotation"), Mapping) else {}
        task = data.get("task") if isinstance(data.get("task"), Mapping) else {}
        project = data.get("project")
        parent = _parent_prediction(annotation, task)
        record = {
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": event,
            "project": project.get("id") if isinstance(project, Mapping) else project,
            "task": task.get("id", annotation.get("task")),
            "task_data": task.get("data"),
            "annotation": annotation.get("id"),
            # Bulk events: ids under "annotations" (deleted), a list under "annotation" (created).
            "annotations": (data.get("annotations") or (data.get("annotation") if isinstance(data.get("annotation"), list)
                                                        else None)) if event.startswith("ANNOTATIONS_") else None,
            "result": annotation.get("result"),
            "prediction": parent[0],
            "prediction_model_version": parent[1],
            "model_version": self.model_version,
        }
        self.feedback.append(json.dumps(record, ensure_ascii=False, default=str))


class ProjectLearning:
    """The model's side of learning: what each project learned (for `prepare`, with
    GEM_USE_LEARNED), and the webhook events that feed it (with GEM_LEARN), queued for
    `backend.learning.Learner`."""

    def __init__(self, model: "GemBackendModel"):
        from .learning import DB_NAME, LearnedStates, Learner, LearningStore, instance_of, source_for

        settings = model.settings
        self.model = model
        self.store = LearningStore(settings.model_dir)
        self.instance = instance_of(settings.label_studio_url)
        if os.path.exists(os.path.join(settings.model_dir, "learning.sqlite3")):
            logger.info("MODEL_DIR/learning.sqlite3 is the learned state of an older version (counter versions, "
                        "keyed by project id alone) and is not read; %s starts empty: press Start Training in "
                        "each project to relearn it", DB_NAME)
        self.states = LearnedStates(self.store, settings)
        self.learner = Learner(
            settings, self.store, predictor=lambda: model._predictor if model.ready else None,
            source=lambda project: source_for(settings, project),
            fetch=lambda url, task_id, project: model.fetcher.decode(
                model.fetcher.download(url, task_id=task_id, project_key=project)),
            region_config=lambda: (model.pipeline.region_config if model.pipeline is not None
                                   else settings.region_config()))

    def learned(self, project: Any) -> ProjectLearned | None:
        return self.states.project_learned(project)

    def preload(self) -> None:
        """Load every project's learned state from MODEL_DIR now, so first predictions do not wait."""
        if not self.model.settings.use_learned:
            return
        try:
            loaded = [(p["key"], p["version"]) for p in self.store.projects()
                      if self.states.get(p["key"]) is not None]
        except Exception as exc:   # a broken state file must not stop the backend
            logger.warning("learned state in %s not loaded: %s", self.store.path, exc)
            return
        if loaded:
            logger.info("learned state loaded for %d project(s): %s", len(loaded),
                        ", ".join(f"{k} ({v})" for k, v in loaded[:20]))

    def remember_project(self, project: Any, schema: str | None) -> None:
        """A project /setup named ("<id>.<created>"): known from now on, for this Label Studio."""
        project_id, _, created = str(project).strip().partition(".")
        try:
            self.store.remember_project(self.instance, project_id, created, schema)
        except Exception as exc:   # /setup must answer even when the state file is unwritable
            logger.warning("could not record project %s in the learning store: %s", project, exc)

    def _verifiable(self, project_id: str | None) -> str | None:
        """Why events of this project cannot be learned, or None when they can."""
        settings = self.model.settings
        if not settings.learn:
            return "this process does not learn (GEM_LEARN=false)"
        if not project_id:
            return "no project id"
        if not (self.store.known(self.instance, project_id) or self.model.schema(project_id)):
            return f"project {project_id} has not connected to this backend (/setup)"
        if not settings.label_studio_url or not settings.label_studio_api_key:
            return "no Label Studio URL and key of its own to verify annotations with (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)"
        return None

    def on_annotation_event(self, event: str, data: Mapping[str, Any]) -> tuple[str | None, str]:
        from .learning import Job

        project = project_key(_project_id(data))
        problem = self._verifiable(project)
        if problem:
            logger.info("%s not learned: %s", event, problem)
            return None, ""
        jobs = []
        if event == "ANNOTATIONS_DELETED":
            # Label Studio sends ids only ({"annotations": [{"id": N}, ...]}): the learner finds the
            # tasks in what it learned; ids it never learned change nothing.
            ids = tuple(dict.fromkeys(i for i in (_plain_id(item.get("id")) if isinstance(item, Mapping)
                                                  else _plain_id(item) for item in _items(data, "annotations"))
                                      if i))
            if ids:
                jobs.append(Job("deleted", project, annotations=ids))
        elif event == "ANNOTATIONS_CREATED":
            # Bulk: a LIST under "annotation" (and the tasks under "task"), each naming its task.
            tasks = []
            for item in (*_items(data, "annotation"), *_items(data, "annotations")):
                if isinstance(item, Mapping):
                    task = item.get("task")
                    tasks.append(_plain_id(task.get("id") if isinstance(task, Mapping) else task))
            for task_id in dict.fromkeys(t for t in tasks if t):
                jobs.append(Job("task", project, task=task_id))
        else:
            annotation = data.get("annotation") if isinstance(data.get("annotation"), Mapping) else {}
            task = data.get("task") if isinstance(data.get("task"), Mapping) else {}
            task_id = _plain_id(task.get("id")) or _plain_id(annotation.get("task"))
            annotation_id = _plain_id(annotation.get("id"))
            if task_id or annotation_id:
                jobs.append(Job("task", project, task=task_id, annotation=annotation_id))
        if not jobs:
            return None, ""
        accepted = [self.learner.submit(job) for job in jobs[:self.model.settings.learn_queue]]
        if not all(accepted):
            return "dropped", "learning queue full; run Start Training to catch up"
        return "queued", ""

    def on_start_training(self, data: Mapping[str, Any]) -> tuple[str | None, str]:
        from .learning import Job

        project = project_key(_project_id(data))
        problem = self._verifiable(project)
        if problem:
            logger.info("START_TRAINING not run: %s", problem)
            return None, ""
        if not self.learner.submit(Job("rebuild", project, requested=time.time())):
            return "dropped", "learning queue full; try again later"
        return "queued", (f"relearning project {project} from all its annotations in the background (requests "
                          "made before it starts are merged into it); progress is in the backend log")


def _items(data: Mapping[str, Any], name: str) -> list:
    value = data.get(name)
    return value if isinstance(value, list) else []


def _plain_id(value: Any) -> str | None:
    """An id from a webhook body: an int or digit string, else None (never trust other shapes)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.strip().isdigit():
        return value.strip()
    return None


def _project_id(data: Mapping[str, Any]) -> Any:
    project = data.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None:
        for name in ("task", "annotation"):
            item = data.get(name)
            if isinstance(item, Mapping) and item.get("project") is not None:
                project = item.get("project")
                break
    return _plain_id(project) if not isinstance(project, str) or "." not in project else project


def _parent_prediction(annotation: Mapping[str, Any], task: Mapping[str, Any]) -> tuple[Any, Any]:
    """(id, model version) of the prediction the annotator started from, when Label Studio says.

    Label Studio 1.23 names it `parent_prediction` (an id, or an object); older versions
    `prediction`. With an id alone the version is looked up in the task's predictions, if sent.
    """
    for field_name in ("parent_prediction", "prediction"):
        prediction = annotation.get(field_name)
        if isinstance(prediction, Mapping):
            return prediction.get("id"), prediction.get("model_version")
        if isinstance(prediction, (int, str)) and not isinstance(prediction, bool) and prediction != "":
            known = task.get("predictions") if isinstance(task.get("predictions"), list) else []
            version = next((p.get("model_version") for p in known
                            if isinstance(p, Mapping) and str(p.get("id")) == str(prediction)), None)
            return prediction, version
    return None, None


def _is_user_error(exc: Exception) -> bool:
    try:
        from gem_model.errors import GemError
    except ImportError:
        return False
    return isinstance(exc, GemError)
