"""`GemBackendModel`: Label Studio tasks in, pre-annotations out.

The shape Label Studio ML backend users know: `predict(tasks, context) -> predictions`,
`setup(...)`, and `fit`/`webhook(event, data)`. It wires the one-way pipeline
label_config -> prompts -> images -> gem_model (heatmaps, regions) -> encode.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .encode import encode_regions
from .images import FetchedImage, ImageFetcher, ImageFetchError
from .label_config import PredictionPlan, parse_label_config
from .prompts import ControlPrompts, PromptMemory, plan_prompts, project_key
from .settings import Settings

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                               "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"})
TRAINING_EVENTS = frozenset({"START_TRAINING"})
UNDEFINED_DATA_KEY = "$undefined$"   # Label Studio's key for data imported before the config named it


class ModelNotReady(Exception):
    """The model is still loading (`failed` False) or could not be loaded (`failed` True)."""

    def __init__(self, message: str, failed: bool):
        super().__init__(message)
        self.failed = failed


class RequestLimitError(ValueError):
    """The request asks for more than the configured limits allow (answered 422); says which limit."""


def check_prompt_limits(prompts: Sequence[str], settings: Settings) -> None:
    """Raise RequestLimitError when there are too many prompts or one is too long."""
    if len(prompts) > settings.max_prompts:
        raise RequestLimitError(
            f"{len(prompts)} distinct prompts in this request, more than GEM_MAX_PROMPTS={settings.max_prompts} "
            "(labels, their prompts attributes and free text together); use fewer labels or prompts, "
            "or raise the limit")
    longest = max(prompts, key=len, default="")
    if len(longest) > settings.max_prompt_chars:
        raise RequestLimitError(
            f"a prompt of {len(longest)} characters is longer than GEM_MAX_PROMPT_CHARS="
            f"{settings.max_prompt_chars} (CLIP reads only the first 77 tokens): {longest[:40]!r}...")


class TaskError(Exception):
    """One task cannot be predicted; the others go on. `reason` is a short metric label."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TaskOutcome:
    task_id: Any
    ok: bool = True
    reason: str = ""
    message: str = ""
    results: int = 0
    score: float = 0.0


@dataclass
class PredictReport:
    """What one predict call did, for the request log and metrics."""
    outcomes: list[TaskOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds (summed over work)
    interactive: bool = False                # free text came with the request
    stored: bool = True                      # Label Studio stores the answer (batch, not interactive)
    prompts: tuple[str, ...] = ()

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


def compute_model_version(settings: Settings) -> str:
    """Stable id of model + weights + the settings that change predictions.

    Label Studio skips tasks that already hold a prediction of the current version, so any
    change that alters results must change this string, and nothing else may.
    """
    if settings.model_version:
        return settings.model_version
    region = dataclasses.asdict(settings.region_config())
    weights = settings.pretrained or "none"
    if os.sep in weights or os.path.isfile(weights):
        weights = os.path.basename(weights)
    key = json.dumps({
        "model": settings.model_name, "pretrained": weights,
        "config": os.path.basename(settings.model_config) if settings.model_config else "",
        "precision": settings.precision, "image_size": settings.image_size, "resize": settings.resize_mode,
        "depth": settings.gem_depth, "ss_iter": settings.ss_attn_iter, "ss_temp": settings.ss_attn_temp,
        "outputs": list(settings.outputs), "regions": region,
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"gem-{settings.model_name}-{weights}-{settings.image_size}-{digest}"


class GemBackendModel:
    """One per process. The model loads once (`start_loading`); predictions serialise on it."""

    MAX_REMEMBERED_SCHEMAS = 256   # /setup configs kept per process (bounded: /setup may be open)

    def __init__(self, settings: Settings, predictor: Any = None,
                 region_extractor: Callable[..., Any] | None = None, region_config: Any = None,
                 fetcher: ImageFetcher | None = None, metrics: Any = None,
                 on_load_error: Callable[[str], None] | None = None):
        self.settings = settings
        self.metrics = metrics
        # Called with the message when loading fails; the production entry point exits there
        # (backend/wsgi.py), the development server and tests keep reporting it on /health.
        self.on_load_error = on_load_error
        self.fetcher = fetcher or ImageFetcher(settings)
        self.memory = PromptMemory(os.path.join(settings.model_dir, "prompts.json"))
        self.feedback_path = os.path.join(settings.model_dir, "feedback.jsonl")
        self.model_version = compute_model_version(settings)
        self._predictor = predictor
        self._extract = region_extractor
        self._region_config = region_config
        self._model_lock = threading.Lock()        # one forward pass at a time per process
        self._feedback_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._schemas: collections.OrderedDict[str, str] = collections.OrderedDict()  # project -> config
        self._ready = threading.Event()
        self._load_done = threading.Event()      # set on success and on failure
        self._load_started = False
        self._load_lock = threading.Lock()
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.fetch_workers,
                                                           thread_name_prefix="gem-fetch")
        if predictor is not None:
            self._finish_load(0.0)

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
            import gem_model
            from gem_model.regions import extract_regions

            logger.info("loading model %s (%s) on %s", s.model_name, s.pretrained or "random weights", s.device)
            if s.torch_threads:
                import torch

                torch.set_num_threads(s.torch_threads)
            pretrained = None if s.pretrained.lower() in ("", "none") else s.pretrained
            model = gem_model.create_gem_model(
                model_name=s.model_name, pretrained=pretrained, device=s.device, gem_depth=s.gem_depth,
                ss_attn_iter=s.ss_attn_iter, ss_attn_temp=s.ss_attn_temp, precision=s.precision,
                model_config=s.model_config or None, cache_dir=s.weights_dir)
            predictor = gem_model.HeatmapPredictor(model, image_size=s.image_size, resize_mode=s.resize_mode,
                                                   cache_bytes=int(s.feature_cache_mb * 2**20))
            region_config = self._region_config or s.region_config()
            # One tiny pass moves first-request costs (CUDA context, kernels) into load time.
            from PIL import Image
            warm = predictor.encode([Image.new("RGB", (s.image_size, s.image_size))], batch_size=1)[0]
            predictor.similarity(warm, ["object"])
            if hasattr(predictor, "cache"):
                predictor.cache.clear()
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
        self._predictor = predictor
        self._extract = self._extract or extract_regions
        self._region_config = region_config
        self._finish_load(time.perf_counter() - started)

    def _finish_load(self, seconds: float) -> None:
        self.load_seconds = seconds
        self._ready.set()
        self._load_done.set()
        if self.metrics is not None:
            self.metrics.model_ready.set(1)
            self.metrics.model_load_seconds.set(seconds)
        logger.info("model ready (version %s) after %.1f s", self.model_version, seconds)

    def wait_until_ready(self, timeout: float) -> None:
        """Return when ready; raise ModelNotReady when loading failed or takes longer than `timeout`."""
        if self.load_error is None and not self.ready:
            self._load_done.wait(timeout)
        if self.load_error is not None:
            raise ModelNotReady(f"model failed to load: {self.load_error}", failed=True)
        if not self.ready:
            raise ModelNotReady("model is still loading; retry shortly", failed=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- Label Studio API ------------------------------------------------------------------

    def setup(self, project: Any = None, schema: str | None = None, hostname: str | None = None,
              access_token: str | None = None, extra_params: Any = None, **kwargs: Any) -> str:
        """Remember what /setup sends; never loads the model (Label Studio waits only 3 s)."""
        key = project_key(project)
        if key and isinstance(schema, str) and schema.strip():
            with self._report_lock:
                self._schemas[key] = schema
                self._schemas.move_to_end(key)
                while len(self._schemas) > self.MAX_REMEMBERED_SCHEMAS:
                    self._schemas.popitem(last=False)
        self.fetcher.remember_setup(key, hostname, access_token)
        return self.model_version

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
                            **kwargs: Any) -> tuple[list[dict], PredictReport]:
        key = project_key(project)
        config = label_config or self._schemas.get(key or "")
        plan = parse_label_config(config or "", self.settings.outputs)   # LabelConfigError: caller's 4xx
        self.wait_until_ready(self.settings.load_wait)
        remembered = self.memory.get(key) if self.settings.remember_prompts else ()
        prompt_plan = plan_prompts(plan, context, remembered)
        check_prompt_limits(list(dict.fromkeys(p for c in prompt_plan.controls for lp in c.labels
                                               for p in lp.prompts)), self.settings)
        typed = tuple(dict.fromkeys(p for prompts in prompt_plan.free_text.values() for p in prompts))
        if prompt_plan.interactive and typed and self.settings.remember_prompts and key:
            self.memory.set(key, typed)

        # Label Studio sends context only from the labeling UI, whose answer it shows but does not store.
        report = PredictReport(interactive=prompt_plan.interactive, stored=context is None,
                               prompts=tuple(dict.fromkeys(p for c in prompt_plan.controls
                                                           for lp in c.labels for p in lp.prompts)))
        predictions: list[dict | None] = [None] * len(tasks)
        report.outcomes = [TaskOutcome(task_id=_task_id(t)) for t in tasks]
        if prompt_plan.interactive and not prompt_plan.controls:
            # Nothing typed (the UI's call on Submit): no regions, and no image is downloaded.
            self._record(report)
            return [{"model_version": self.model_version, "score": 0.0, "result": []} for _ in tasks], report
        batch = self.settings.batch_size

        # Downloads run up to two batches ahead of the model, in task order; a model batch is
        # filled with images that arrived, so failed downloads do not shrink it, and at most
        # about three batches of images are held at once.
        futures: collections.deque = collections.deque()
        submitted = 0

        def top_up() -> None:
            nonlocal submitted
            while submitted < len(tasks) and len(futures) < 2 * batch:
                futures.append((submitted, self._pool.submit(self._fetch_task, tasks[submitted], plan, key, report)))
                submitted += 1

        fetched: dict[int, dict[str, FetchedImage]] = {}
        images_waiting = 0
        top_up()
        while futures:
            i, future = futures.popleft()
            top_up()
            try:
                fetched[i] = future.result()
                images_waiting += len(fetched[i])
            except TaskError as exc:
                self._fail(report, predictions, i, exc.reason, str(exc))
            except Exception as exc:  # a bug while fetching one task must not fail the others
                logger.exception("task %s: fetching failed", report.outcomes[i].task_id)
                self._fail(report, predictions, i, "internal", f"{type(exc).__name__}: {exc}")
            if images_waiting >= batch or not futures:
                self._predict_chunk(fetched, plan, prompt_plan, predictions, report)
                fetched, images_waiting = {}, 0

        for i, prediction in enumerate(predictions):
            if prediction is None:  # defensive: every task must get an entry, in order
                self._fail(report, predictions, i, "internal", "no prediction produced")
        self._record(report)
        return predictions, report  # type: ignore[return-value]

    def fit(self, event: str, data: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
        return self.webhook(event, data or {})

    def webhook(self, event: str, data: Mapping[str, Any]) -> dict:
        """Record annotation events for an active-learning loop; GEM itself has nothing to train."""
        if event in ANNOTATION_EVENTS:
            self._append_feedback(event, data)
            return {"status": "recorded", "action": event}
        if event in TRAINING_EVENTS:
            return {"status": "ok", "action": event,
                    "detail": "GEM is training-free; corrections are recorded in MODEL_DIR/feedback.jsonl"}
        return {"status": "ignored", "action": event}

    # -- pipeline ----------------------------------------------------------------------------

    def _fetch_task(self, task: Mapping[str, Any], plan: PredictionPlan, key: str | None,
                    report: PredictReport) -> dict[str, FetchedImage]:
        images: dict[str, FetchedImage] = {}
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping):
            raise TaskError("task has no 'data' object", reason="no_image")
        for spec in plan.images:
            if spec.data_key is None:
                url = spec.value
            else:
                url = data.get(spec.data_key)
                if url is None and len(plan.images) == 1:
                    url = data.get(UNDEFINED_DATA_KEY)
            if not isinstance(url, str) or not url.strip():
                raise TaskError(f"task data has no '{spec.data_key}' image URL (needed by <Image name='{spec.name}' "
                                f"value='{spec.value}'>)", reason="no_image")
            try:
                started = time.perf_counter()
                raw = self.fetcher.download(url, task_id=_task_id(task), project_key=key)
                self._time(report, "fetch", time.perf_counter() - started)
                started = time.perf_counter()
                images[spec.name] = self.fetcher.decode(raw)
                self._time(report, "preprocess", time.perf_counter() - started)
            except ImageFetchError as exc:
                raise TaskError(f"image '{spec.name}': {exc}", reason=exc.reason) from None
        return images

    def _predict_chunk(self, fetched: dict[int, dict[str, FetchedImage]], plan: PredictionPlan,
                       prompt_plan, predictions: list, report: PredictReport) -> None:
        if not fetched:
            return
        order = [(i, name) for i in fetched for name in fetched[i]]
        encoded = self._encode([fetched[i][name].image for i, name in order], report)
        per_task: dict[int, list[tuple[list[dict], list[float]]]] = {}
        for (i, name), (enc, error) in zip(order, encoded):
            if isinstance(predictions[i], dict):
                continue
            if error is not None:
                self._fail(report, predictions, i, error.reason, str(error))
                continue
            try:
                per_task.setdefault(i, []).append(
                    self._predict_image(enc, fetched[i][name], prompt_plan.for_image(name), report))
            except TaskError as exc:
                self._fail(report, predictions, i, exc.reason, str(exc))
            except Exception as exc:  # a bug or bad region must not take down the whole batch
                logger.exception("task %s: prediction failed", report.outcomes[i].task_id)
                self._fail(report, predictions, i, "internal", f"{type(exc).__name__}: {exc}")
        for i, parts in per_task.items():
            if isinstance(predictions[i], dict):
                continue
            results = [item for items, _ in parts for item in items]
            scores = [s for _, group_scores in parts for s in group_scores]
            score = float(np.clip(np.mean(scores), 0.0, 1.0)) if scores else 0.0
            predictions[i] = {"model_version": self.model_version, "score": round(score, 4), "result": results}
            outcome = report.outcomes[i]
            outcome.results, outcome.score = len(results), score

    def _encode(self, images: list, report: PredictReport) -> list[tuple[Any, TaskError | None]]:
        """(encoded, None) or (None, error) per image. A failed batch is retried one image at a
        time, so one image the model cannot take fails alone."""
        started = time.perf_counter()
        try:
            with self._model_lock:
                encoded = list(self._predictor.encode(images, batch_size=self.settings.batch_size))
            return [(e, None) for e in encoded]
        except Exception as exc:
            if len(images) == 1:
                return [(None, TaskError(f"model could not encode the image: {type(exc).__name__}: {exc}",
                                         reason="model"))]
            logger.warning("batch encode failed (%s: %s); retrying images one by one", type(exc).__name__, exc)
        finally:
            self._time(report, "model", time.perf_counter() - started)
        return [self._encode([image], report)[0] for image in images]

    def _predict_image(self, encoded: Any, image: FetchedImage, controls: Sequence[ControlPrompts],
                       report: PredictReport) -> tuple[list[dict], list[float]]:
        prompts = list(dict.fromkeys(p for c in controls for lp in c.labels for p in lp.prompts))
        if not prompts:
            return [], []
        started = time.perf_counter()
        with self._model_lock:
            similarity = np.asarray(self._predictor.similarity(encoded, prompts), dtype=np.float32)  # [P, H0, W0]
        self._time(report, "model", time.perf_counter() - started)
        if similarity.shape[1:] != (image.height, image.width):
            raise TaskError(f"similarity maps are {similarity.shape[1:]} for an image of "
                            f"{(image.height, image.width)}", reason="model")
        index = {p: k for k, p in enumerate(prompts)}
        rgb = None
        results: list[dict] = []
        scores: list[float] = []
        extracted: dict[tuple, Any] = {}   # controls with the same labels and prompts share regions
        for control in controls:
            group = tuple((lp.label, lp.prompts) for lp in control.labels)
            if group not in extracted:
                started = time.perf_counter()
                # A label's heatmap is the max over its prompts' maps.
                heatmaps = np.stack([similarity[[index[p] for p in lp.prompts]].max(axis=0)
                                     for lp in control.labels])                               # [L, H0, W0]
                if rgb is None:
                    rgb = np.asarray(image.image)
                extracted[group] = self._extract(heatmaps, labels=[lp.label for lp in control.labels],
                                                 config=self._region_config, image=rgb,
                                                 prompts={lp.label: "; ".join(lp.prompts) for lp in control.labels})
                scores.append(float(extracted[group].score))
                self._time(report, "postprocess", time.perf_counter() - started)
            started = time.perf_counter()
            items = encode_regions(control.control, extracted[group].regions, image.width, image.height)
            self._time(report, "encode", time.perf_counter() - started)
            results.extend(items)
        return results, scores

    # -- bookkeeping -----------------------------------------------------------------------------

    def _fail(self, report: PredictReport, predictions: list, i: int, reason: str, message: str) -> None:
        outcome = report.outcomes[i]
        outcome.ok, outcome.reason, outcome.message, outcome.results, outcome.score = False, reason, message, 0, 0.0
        if report.stored and self.settings.failed_tasks == "skip":
            # Label Studio skips an entry without "result" (logging it, our message included) and
            # stores nothing, so the task is predicted again next time instead of keeping an empty
            # prediction of this model version forever.
            predictions[i] = {"model_version": self.model_version, "score": 0.0, "error": message}
        else:
            predictions[i] = {"model_version": self.model_version, "score": 0.0, "result": []}
        logger.warning("task %s not predicted: %s", outcome.task_id, message)

    def _time(self, report: PredictReport, stage: str, seconds: float) -> None:
        with self._report_lock:  # report.timings is shared with the fetch threads
            report.add_time(stage, seconds)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)

    def _record(self, report: PredictReport) -> None:
        if self.metrics is None:
            return
        for outcome in report.outcomes:
            self.metrics.tasks.inc(outcome="ok" if outcome.ok else "failed")
            if not outcome.ok:
                self.metrics.task_errors.inc(reason=outcome.reason or "unknown")

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
            "annotations": data.get("annotations") if event.startswith("ANNOTATIONS_") else None,
            "result": annotation.get("result"),
            "prediction": parent[0],
            "prediction_model_version": parent[1],
            "model_version": self.model_version,
        }
        os.makedirs(self.settings.model_dir, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._feedback_lock, open(self.feedback_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, Mapping) else None


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
