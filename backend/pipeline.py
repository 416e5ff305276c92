"""One prediction pipeline for every caller: task -> image -> heatmaps -> regions -> Label Studio results.

The server (`GemBackendModel.predict`), the background finisher (backend/background.py) and the
`python -m backend.prelabel` command all run tasks through one `PredictionPipeline`. It holds the
loaded predictor, the region extractor and its config, the image fetcher and the model version,
and knows nothing of Flask, of Label Studio's API, of prompt memory or of the feedback log.

Typical use::

    pipeline = PredictionPipeline.from_settings(settings)          # loads the model (seconds)
    job = pipeline.prepare(label_config, project="3")               # what to predict, checked once
    predictions, report = pipeline.predict(tasks, job, deadline=time.monotonic() + 80)

`predictions` has one entry per task, in order, in the shape `/predict` answers. Tasks the
deadline left no time for get an entry without `result` (Label Studio stores nothing for it) and
their indexes are listed in `report.deferred`.

Per-project learned data (prompts or region settings learned from annotations) comes IN as data:
`prepare(..., learned=ProjectLearned(...))`. The pipeline never calls back into learning code.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from .encode import encode_regions
from .images import FetchedImage, ImageFetcher, ImageFetchError
from .label_config import PredictionPlan, parse_label_config
from .prompts import ControlPrompts, LabelPrompts, PromptPlan, plan_prompts, project_key
from .settings import Settings

logger = logging.getLogger(__name__)

UNDEFINED_DATA_KEY = "$undefined$"   # Label Studio's key for data imported before the config named it
DEFERRED = "deferred"                # TaskOutcome.reason of a task the time budget left for later


class RequestLimitError(ValueError):
    """The request asks for more than the configured limits allow (answered 422); says which limit."""


class TaskError(Exception):
    """One task cannot be predicted; the others go on. `reason` is a short metric label."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


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
        "method": settings.method, "pamr": settings.pamr_iters,
        "slide": [settings.slide_crop, settings.slide_stride] if settings.slide_crop else 0,
        # Added only where they differ from what earlier versions did, so that an unchanged
        # configuration keeps its version (and Label Studio its predictions); PAMR's sigma changed
        # on 2026-12-03 (issue 24), so any PAMR run gets a new version.
        **({"pamr_sigma": "unbiased9", "pamr_dilations": list(settings.pamr_dilations)}
           if settings.pamr_iters else {}),
        **({"pos_embed": settings.pos_embed} if settings.pos_embed != "antialias" else {}),
        # The task score stored with each prediction: "regions" alone before 2026-12-03 (issue 22).
        **({"task_score": list(settings.task_score)} if tuple(settings.task_score) != ("regions",) else {}),
        # bf16 on a CPU keeps the streams, norms and text tower in fp32 since 2026-12-03 (issue 24):
        # other maps than the all-bf16 model's, so another version (GPU bf16 is unchanged).
        **({"bf16_road": "cpu-fp32-streams"} if _runs_bf16_on_cpu(settings) else {}),
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"gem-{settings.model_name}-{weights}-{settings.image_size}-{digest}"


def _runs_bf16_on_cpu(settings: Settings) -> bool:
    """Whether this machine builds the model in bf16 on its CPU (GEM_PRECISION bf16, or auto where
    the CPU computes bf16 natively). False where the settings are refused: loading says why."""
    if settings.precision not in ("bf16", "auto"):
        return False
    from gem_model.errors import GemError
    from gem_model.factory import resolve_device, resolve_precision
    try:
        device = resolve_device(settings.device)
        return device.type == "cpu" and resolve_precision(settings.precision, device) == "bf16"
    except GemError:
        return False


def prompts_digest(prompt_plan: PromptPlan) -> str:
    """Short digest of what a stored prediction answers: each control's name, kind, image and its
    labels with their prompts. Adding a label or editing `prompts=` changes it; so must the model
    version, or Label Studio would skip every task already predicted."""
    key = json.dumps([[c.control.name, c.control.kind, c.control.to_name,
                       [[lp.label, list(lp.prompts)] for lp in c.labels]] for c in prompt_plan.controls])
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def versioned(base: str, label_config: str | PredictionPlan | None, settings: Settings,
              remembered: Sequence[str] = (), learned: "ProjectLearned | None" = None) -> str:
    """The model version of a project's stored predictions, as `PredictionPipeline.prepare` gives
    it, without the model (what /setup answers): `<base>+c<prompts digest>[+<learned version>]`.
    A config GEM cannot serve gives the base version (with the learned part); so does a version
    pinned by hand (MODEL_VERSION): whoever pins it decides when it changes."""
    from .label_config import LabelConfigError

    version = base
    if label_config and not settings.model_version:   # MODEL_VERSION pins it by hand
        try:
            plan = label_config if isinstance(label_config, PredictionPlan) else \
                parse_label_config(label_config, settings.outputs)
            prompt_plan = plan_prompts(plan, None, tuple(remembered))
            if learned is not None:
                prompt_plan = _add_learned_prompts(prompt_plan, learned.prompts)
            version = f"{version}+c{prompts_digest(prompt_plan)}"
        except LabelConfigError:
            pass
    if learned is not None and learned.version:
        version = f"{version}+{learned.version}"
    return version


# -- results ----------------------------------------------------------------------------------


@dataclass
class TaskOutcome:
    task_id: Any
    ok: bool = True
    reason: str = ""            # short label when not ok: no_image, decode, model, deferred, ...
    message: str = ""
    results: int = 0
    score: float = 0.0


@dataclass
class PredictReport:
    """What one predict call did, for the request log, metrics and the callers' summaries."""
    outcomes: list[TaskOutcome] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds (summed over work)
    interactive: bool = False                # free text came with the request
    stored: bool = True                      # Label Studio stores the answer (batch, not interactive)
    prompts: tuple[str, ...] = ()
    deferred: list[int] = field(default_factory=list)   # task indexes the deadline left undone
    seconds: float = 0.0                     # wall time of the call

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


# -- what to predict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectLearned:
    """Per-project data learned elsewhere (e.g. from annotations), handed to `prepare`.

    `prompts`: label value -> extra prompts max-pooled into that label's heatmap.
    `region_config`: a `gem_model.regions.RegionConfig` used instead of the server's for this project.
    `version`: a short id of this learned state; when set it is appended to the model version of
    the predictions (`<model version>+<version>`), so predictions made with different learned
    data are not taken for one another.
    `maps`: a `gem_model.learning.LearnedMaps` (visual prototypes and calibrated per-label offsets)
    applied to the label heatmaps on the patch grid; its calibrated minimum area applies too,
    unless `region_config` is given.
    """
    prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    region_config: Any = None
    version: str = ""
    maps: Any = None


@dataclass(frozen=True)
class PredictionJob:
    """Everything that is the same for all tasks of one call: checked once by `prepare`."""
    plan: PredictionPlan
    prompts: PromptPlan
    project: str | None = None              # project key (see backend.prompts.project_key)
    stored: bool = True                     # Label Studio stores the answer; False for interactive calls
    region_config: Any = None               # None: the pipeline's
    model_version: str = ""                 # "" until prepare fills it in
    learned_maps: Any = None                # gem_model.learning.LearnedMaps, or None

    @property
    def all_prompts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for c in self.prompts.controls for lp in c.labels for p in lp.prompts))


def _add_learned_prompts(prompt_plan: PromptPlan, extra: Mapping[str, Sequence[str]]) -> PromptPlan:
    if not extra:
        return prompt_plan
    controls = []
    for control in prompt_plan.controls:
        labels = tuple(LabelPrompts(lp.label, tuple(dict.fromkeys((*lp.prompts, *extra.get(lp.label, ())))))
                       for lp in control.labels)
        controls.append(dataclasses.replace(control, labels=labels))
    return dataclasses.replace(prompt_plan, controls=tuple(controls))


# -- time budget ------------------------------------------------------------------------------------


class Budget:
    """Whether the next batch still fits before a deadline, from the seconds per task measured so far.

    `deadline` is a `clock()` time (time.monotonic by default) or None for no limit. Before any
    measurement the estimate is `prior_seconds_per_task` (the pipeline's running average of earlier
    calls); with neither, the first batch is always allowed, so a call makes progress.
    """

    def __init__(self, deadline: float | None, prior_seconds_per_task: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.deadline = deadline
        self.clock = clock
        self.started = clock()
        self.prior = prior_seconds_per_task
        self.tasks_done = 0

    def record(self, tasks: int) -> None:
        """`tasks` more tasks finished (the time is measured from the start of the call)."""
        self.tasks_done += tasks

    def seconds_per_task(self) -> float | None:
        if self.tasks_done:
            return (self.clock() - self.started) / self.tasks_done
        return self.prior

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def allows(self, tasks: int) -> bool:
        """True when `tasks` more tasks are expected to finish before the deadline."""
        if self.deadline is None:
            return True
        remaining = self.remaining()
        if remaining <= 0:
            return False
        per_task = self.seconds_per_task()
        return per_task is None or per_task * tasks <= remaining


# -- the annotator first ------------------------------------------------------------------------------


class ModelGate:
    """The model lock, with interactive calls first.

    One forward pass at a time, as before, but not first come first served: an interactive call
    (the annotator waiting on the labeling page) takes the model before any bulk work that waits
    for it, and while one is in flight anywhere in its call (fetching, post-processing), bulk work
    pauses at its next model call or image. Bulk work holds the model for one small call at a time
    (`GEM_BULK_MODEL_IMAGES`), so an annotator waits at most for the call already running.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._interactive = 0        # interactive calls in flight
        self.yields = 0              # times bulk work waited for an interactive call (for tests, metrics)
        self.waiting_interactive = 0  # interactive model calls waiting for the model

    @contextlib.contextmanager
    def interactive_call(self):
        with self._cond:
            self._interactive += 1
        try:
            yield
        finally:
            with self._cond:
                self._interactive -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def model(self, interactive: bool):
        with self._cond:
            if interactive:
                self.waiting_interactive += 1
                try:
                    while self._busy:
                        self._cond.wait()
                finally:
                    self.waiting_interactive -= 1
            else:
                if self._interactive or self.waiting_interactive:
                    self.yields += 1
                while self._busy or self._interactive or self.waiting_interactive:
                    self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def pause_for_interactive(self) -> None:
        """Bulk work's checkpoint between images: wait while an interactive call is in flight."""
        with self._cond:
            if self._interactive:
                self.yields += 1
            while self._interactive:
                self._cond.wait()


# -- the pipeline ---------------------------------------------------------------------------------------


def load_predictor(settings: Settings):
    """Build the GEM model and its `HeatmapPredictor` from settings, warmed up. Slow (seconds)."""
    import gem_model

    s = settings
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    from gem_model.attention import set_cpu_chunking

    set_cpu_chunking(s.bf16_chunks)
    pretrained = None if s.pretrained.lower() in ("", "none") else s.pretrained
    model = gem_model.create_gem_model(
        model_name=s.model_name, pretrained=pretrained, device=s.device, gem_depth=s.gem_depth,
        ss_attn_iter=s.ss_attn_iter, ss_attn_temp=s.ss_attn_temp, precision=s.precision,
        model_config=s.model_config or None, cache_dir=s.weights_dir, mode=s.method,
        slide_crop=s.slide_crop, slide_stride=s.slide_stride if s.slide_crop else 0,
        pamr_iters=s.pamr_iters, pamr_dilations=s.pamr_dilations, pos_embed_resize=s.pos_embed)
    predictor = gem_model.HeatmapPredictor(model, image_size=s.image_size, resize_mode=s.resize_mode,
                                           cache_bytes=int(s.feature_cache_mb * 2**20))
    # One tiny pass moves first-request costs (CUDA context, kernels) into load time.
    from PIL import Image
    warm = predictor.encode([Image.new("RGB", (s.image_size, s.image_size))], batch_size=1)[0]
    predictor.similarity(warm, ["object"])
    if hasattr(predictor, "cache"):
        predictor.cache.clear()
    return predictor


class PredictionPipeline:
    """Tasks -> Label Studio predictions with a loaded model. Thread-safe; one forward pass at a time.

    predictor: `gem_model.HeatmapPredictor` (or anything with `encode(images, batch_size)` and
    `similarity(encoded, prompts) -> [P, H, W]`); region_extractor: `gem_model.regions.extract_regions`
    or a stand-in; fetcher: the `ImageFetcher` that downloads task images; metrics: optional
    `BackendMetrics` (stage timings).
    """

    def __init__(self, settings: Settings, predictor: Any, region_extractor: Callable[..., Any] | None = None,
                 region_config: Any = None, fetcher: ImageFetcher | None = None,
                 model_version: str | None = None, metrics: Any = None):
        if region_extractor is None:
            from gem_model.regions import extract_regions as region_extractor
        self.settings = settings
        self.predictor = predictor
        self.extract = region_extractor
        self.region_config = region_config if region_config is not None else settings.region_config()
        self.fetcher = fetcher or ImageFetcher(settings)
        self.model_version = model_version or compute_model_version(settings)
        self.metrics = metrics
        self.seconds_per_task: float | None = None   # running average over calls, for budgets
        self.decode_min_side = _decode_min_side(settings, predictor, self.region_config)
        self.gate = ModelGate()
        self.bulk_model_images = settings.bulk_model_images or \
            (settings.batch_size if _on_gpu(settings, predictor) else 1)
        self._report_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.fetch_workers,
                                                           thread_name_prefix="gem-fetch")

    @classmethod
    def from_settings(cls, settings: Settings, fetcher: ImageFetcher | None = None,
                      metrics: Any = None) -> "PredictionPipeline":
        """Load the model the settings name and wrap it (what the command and workers use)."""
        return cls(settings, load_predictor(settings), fetcher=fetcher, metrics=metrics)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what to predict ---------------------------------------------------------------------

    def prepare(self, label_config: str | PredictionPlan, context: Any = None, project: Any = None,
                remembered: Sequence[str] = (), learned: ProjectLearned | None = None) -> PredictionJob:
        """Parse and check what to predict, once per call.

        Raises `backend.label_config.LabelConfigError` (a config GEM cannot serve) or
        `RequestLimitError` (too many or too long prompts): both are the caller's 4xx.
        `context` is the interactive context (free-text prompts); with it the answer is not stored.
        `remembered`: free-text prompts to add in batch calls (the server's prompt memory).
        """
        plan = label_config if isinstance(label_config, PredictionPlan) else \
            parse_label_config(label_config or "", self.settings.outputs)
        prompt_plan = plan_prompts(plan, context, tuple(remembered))
        region_config = None
        if learned is not None:
            prompt_plan = _add_learned_prompts(prompt_plan, learned.prompts)
            region_config = learned.region_config
            if learned.maps is not None and region_config is None:
                region_config = learned.maps.region_config(self.region_config)
        # Stored predictions carry the config's labels and prompts and the learned state in their
        # version (`versioned` gives /setup the same string); interactive answers are not stored.
        version = self.model_version
        if context is None and not self.settings.model_version:   # MODEL_VERSION pins it by hand
            version = f"{version}+c{prompts_digest(prompt_plan)}"
        if learned is not None and learned.version:
            version = f"{version}+{learned.version}"
        job = PredictionJob(plan=plan, prompts=prompt_plan, project=project_key(project),
                            stored=context is None, region_config=region_config, model_version=version,
                            learned_maps=learned.maps if learned is not None else None)
        check_prompt_limits(list(job.all_prompts), self.settings)
        return job

    # -- predicting ---------------------------------------------------------------------------

    def predict(self, tasks: Sequence[Mapping[str, Any]], job: PredictionJob | str, *,
                deadline: float | None = None) -> tuple[list[dict], PredictReport]:
        """One prediction entry per task, in order, and a report of what happened.

        `job`: from `prepare` (or a label config string, prepared here). `deadline`: a
        `time.monotonic()` time; no new batch starts when the measured pace says it would not
        finish before it, and the tasks left get a `skip` entry (reason `deferred`, indexes in
        `report.deferred`). A task that fails gets `{"model_version", "score": 0, "error"}` (or,
        with GEM_FAILED_TASKS=empty and in interactive calls, `"result": []`); one bad task never
        fails the others.
        """
        if not isinstance(job, PredictionJob):
            job = self.prepare(job)
        if not job.stored:
            with self.gate.interactive_call():
                return self._predict(tasks, job, deadline)
        return self._predict(tasks, job, deadline)

    def _predict(self, tasks: Sequence[Mapping[str, Any]], job: PredictionJob,
                 deadline: float | None) -> tuple[list[dict], PredictReport]:
        started = time.monotonic()
        report = PredictReport(interactive=job.prompts.interactive, stored=job.stored, prompts=job.all_prompts)
        predictions: list[dict | None] = [None] * len(tasks)
        report.outcomes = [TaskOutcome(task_id=task_id(t)) for t in tasks]
        if job.prompts.interactive and not job.prompts.controls:
            # Nothing typed (the UI's call on Submit): no regions, and no image is downloaded.
            self._record(report)
            return [{"model_version": job.model_version or self.model_version, "score": 0.0, "result": []}
                    for _ in tasks], report
        budget = Budget(deadline, prior_seconds_per_task=self.seconds_per_task)
        batch = self.settings.batch_size

        # Downloads run up to two batches ahead of the model, in task order; a model batch is
        # filled with images that arrived, so failed downloads do not shrink it, and at most
        # about three batches of images are held at once.
        futures: collections.deque = collections.deque()
        submitted = 0
        stopped = False

        def top_up() -> None:
            nonlocal submitted
            while not stopped and submitted < len(tasks) and len(futures) < 2 * batch:
                futures.append((submitted, self._pool.submit(self._fetch_task, tasks[submitted], job, report)))
                submitted += 1

        fetched: dict[int, dict[str, FetchedImage]] = {}
        images_waiting = 0
        top_up()
        while futures:
            i, future = futures.popleft()
            if not budget.allows(len(fetched) + 1):
                stopped = True          # no time left even to finish what is fetched: leave it all
                future.cancel()
                fetched.setdefault(i, {})
                break
            top_up()
            # A download never holds the batch (the background queue included) longer than its own
            # limit allows: GEM_FETCH_TIMEOUT per image plus time to decode it. With a deadline, a
            # slow download is not waited for past the deadline either.
            wait_s = fetch_wait_s(self.settings.fetch_timeout, len(job.plan.images))
            if deadline is not None:
                wait_s = min(wait_s, max(0.0, budget.remaining()))
            try:
                fetched[i] = future.result(timeout=wait_s)
                images_waiting += len(fetched[i])
            except concurrent.futures.TimeoutError:
                if deadline is not None and budget.remaining() <= wait_s:
                    stopped = True
                    fetched.setdefault(i, {})
                    break
                future.cancel()
                self._fail(job, report, predictions, i, "timeout",
                           f"its images took more than {wait_s:g} s to download and decode "
                           f"(GEM_FETCH_TIMEOUT={self.settings.fetch_timeout:g} s per image)")
            except TaskError as exc:
                self._fail(job, report, predictions, i, exc.reason, str(exc))
            except Exception as exc:  # a bug while fetching one task must not fail the others
                logger.exception("task %s: fetching failed", report.outcomes[i].task_id)
                self._fail(job, report, predictions, i, "internal", f"{type(exc).__name__}: {exc}")
            if images_waiting >= batch or not futures:
                if not budget.allows(len(fetched)):
                    stopped = True
                    break
                self._predict_chunk(fetched, job, predictions, report)
                budget.record(len(fetched))
                fetched, images_waiting = {}, 0

        if stopped:
            for _, future in futures:
                future.cancel()
            left = sorted(set(fetched) | {i for i, _ in futures} | set(range(submitted, len(tasks))))
            for i in left:
                if predictions[i] is None:
                    self._defer(job, report, predictions, i)
        for i, prediction in enumerate(predictions):
            if prediction is None:  # defensive: every task must get an entry, in order
                self._fail(job, report, predictions, i, "internal", "no prediction produced")
        report.seconds = time.monotonic() - started
        done = sum(1 for o in report.outcomes if o.reason != DEFERRED)
        if budget.tasks_done and done:
            measured = report.seconds / done
            self.seconds_per_task = measured if self.seconds_per_task is None else \
                0.5 * self.seconds_per_task + 0.5 * measured
        self._record(report)
        return predictions, report  # type: ignore[return-value]

    def embed_task(self, task: Mapping[str, Any], job: PredictionJob, pooling: str = "mean") -> np.ndarray:
        """One unit vector [D] for the task: each image's GEM patch embeddings (what the encoder's
        feature cache holds) pooled by `gem_model.selection.image_embedding`, averaged over the
        images. For `python -m backend.select`'s diversity. Bulk work: waits for interactive calls.
        Raises TaskError (with a reason) for an image that cannot be fetched or encoded."""
        from gem_model.selection import image_embedding

        report = PredictReport()
        images = self._fetch_task(task, job, report)
        vectors = []
        for name, image in images.items():
            self.gate.pause_for_interactive()
            encoded, error = self._encode([image.image], report)[0]
            if error is not None:
                raise TaskError(f"image '{name}': {error}", reason=error.reason)
            with self.gate.model(False):
                features = np.asarray(self.predictor.patch_embeddings(encoded), dtype=np.float32)   # [h, w, D]
            vectors.append(image_embedding(features, pooling))
        if not vectors:
            raise TaskError("the task has no image to embed", reason="no_image")
        out = np.mean(vectors, axis=0)
        return (out / max(float(np.linalg.norm(out)), 1e-12)).astype(np.float32)

    # -- stages ---------------------------------------------------------------------------------

    def _fetch_task(self, task: Mapping[str, Any], job: PredictionJob,
                    report: PredictReport) -> dict[str, FetchedImage]:
        return fetch_task_images(self.fetcher, task, job, self.decode_min_side,
                                 timer=lambda stage, seconds: self._time(report, stage, seconds))

    def _predict_chunk(self, fetched: dict[int, dict[str, FetchedImage]], job: PredictionJob,
                       predictions: list, report: PredictReport) -> None:
        if not fetched:
            return
        order = [(i, name) for i in fetched for name in fetched[i]]
        interactive = not job.stored
        images = [fetched[i][name].image for i, name in order]
        if interactive:
            encoded = self._encode(images, report, interactive=True)
        else:
            # Bulk work holds the model one small call at a time, so the annotator never waits long.
            step = self.bulk_model_images
            encoded = [e for k in range(0, len(images), step)
                       for e in self._encode(images[k:k + step], report, interactive=False)]
        per_task: dict[int, list[tuple[list[dict], list[float]]]] = {}
        for (i, name), (enc, error) in zip(order, encoded):
            if isinstance(predictions[i], dict):
                continue
            if not interactive:
                self.gate.pause_for_interactive()
            if error is not None:
                self._fail(job, report, predictions, i, error.reason, str(error))
                continue
            try:
                per_task.setdefault(i, []).append(
                    self._predict_image(enc, fetched[i][name], job.prompts.for_image(name), job, report,
                                        job.prompts.exemplars.get(name, ())))
            except TaskError as exc:
                self._fail(job, report, predictions, i, exc.reason, str(exc))
            except Exception as exc:  # a bug or bad region must not take down the whole batch
                logger.exception("task %s: prediction failed", report.outcomes[i].task_id)
                self._fail(job, report, predictions, i, "internal", f"{type(exc).__name__}: {exc}")
        for i, parts in per_task.items():
            if isinstance(predictions[i], dict):
                continue
            results = [item for items, _ in parts for item in items]
            scores = [s for _, group_scores in parts for s in group_scores]
            score = float(np.clip(np.mean(scores), 0.0, 1.0)) if scores else 0.0
            predictions[i] = {"model_version": job.model_version or self.model_version,
                              "score": round(score, 4), "result": results}
            outcome = report.outcomes[i]
            outcome.results, outcome.score = len(results), score

    def _encode(self, images: list, report: PredictReport,
                interactive: bool = False) -> list[tuple[Any, TaskError | None]]:
        """(encoded, None) or (None, error) per image. A failed batch is retried one image at a
        time, so one image the model cannot take fails alone."""
        started = time.perf_counter()
        try:
            with self.gate.model(interactive):
                encoded = list(self.predictor.encode(images, batch_size=self.settings.batch_size))
            return [(e, None) for e in encoded]
        except Exception as exc:
            if len(images) == 1:
                return [(None, TaskError(f"model could not encode the image: {type(exc).__name__}: {exc}",
                                         reason="model"))]
            logger.warning("batch encode failed (%s: %s); retrying images one by one", type(exc).__name__, exc)
        finally:
            self._time(report, "model", time.perf_counter() - started)
        return [self._encode([image], report, interactive)[0] for image in images]

    def _predict_image(self, encoded: Any, image: FetchedImage, controls: Sequence[ControlPrompts],
                       job: PredictionJob, report: PredictReport,
                       exemplars: Sequence[Any] = ()) -> tuple[list[dict], list[float]]:
        """Regions of one image for its controls. The one way a label's map is made, whatever shapes
        it (typed or configured text, the project's learned state, example boxes and clicks):
        `gem_model.exemplars.build_label_maps` on the patch grid, then the predictor's `upsample`
        (PAMR when enabled, bilinear to the working size), then region extraction."""
        from gem_model.exemplars import build_label_maps, exemplar_vectors

        keys = list(dict.fromkeys((lp.label, lp.prompts) for c in controls for lp in c.labels))
        if not keys:
            return [], []
        prompts = list(dict.fromkeys(p for _, label_prompts in keys for p in label_prompts))
        region_config = job.region_config if job.region_config is not None else self.region_config
        floor = region_config.min_similarity
        visual = bool(exemplars) or job.learned_maps is not None
        started = time.perf_counter()
        with self.gate.model(not job.stored):
            sims = np.asarray(self.predictor.grid_similarity(encoded, prompts), dtype=np.float32) \
                if prompts else None                                                          # [P, h, w]
            features = np.asarray(self.predictor.patch_embeddings(encoded), dtype=np.float32) \
                if visual else None                                                           # [h, w, D]
        self._time(report, "model", time.perf_counter() - started)
        started = time.perf_counter()
        index = {p: k for k, p in enumerate(prompts)}
        vectors = exemplar_vectors(features, exemplars) if exemplars else None
        grid_maps = []
        text_grid = {}                    # key -> its text map on the grid (the task score's committee)
        for label, label_prompts in keys:
            # A key is (label, prompts): one label may carry different prompts in two controls.
            text_maps = {label: sims[[index[p] for p in label_prompts]].max(axis=0)} if label_prompts else {}
            if text_maps:
                text_grid[(label, label_prompts)] = text_maps[label]
            grid_maps.append(build_label_maps(features, [label], text_maps, floor, job.learned_maps, vectors)[0])
        self._time(report, "postprocess", time.perf_counter() - started)
        work = _working_size(self.predictor, encoded, image, region_config)
        started = time.perf_counter()
        with self.gate.model(not job.stored):
            maps = np.asarray(self.predictor.upsample(np.stack(grid_maps), encoded, output_size=work),
                              dtype=np.float32)                                               # [K, h, w]
        self._time(report, "model", time.perf_counter() - started)
        if maps.shape[1:] != work:
            raise TaskError(f"label maps are {maps.shape[1:]}, expected the working size {work} "
                            f"for an image of {(image.height, image.width)}", reason="model")
        slot = {key: k for k, key in enumerate(keys)}
        rgb = None
        results: list[dict] = []
        scores: list[float] = []
        extracted: dict[tuple, Any] = {}   # controls with the same labels, prompts and present regions share
        for control in controls:
            present = job.prompts.present.get(control.control.name, ())
            group = (tuple((lp.label, lp.prompts) for lp in control.labels), id(present) if present else None)
            if group not in extracted:
                started = time.perf_counter()
                heatmaps = maps[[slot[key] for key in group[0]]]                                 # [L, h, w]
                if present:
                    heatmaps = _without_present(heatmaps, present, work, floor)
                if rgb is None:
                    rgb = _guide(image, work)
                extracted[group] = self.extract(heatmaps, labels=[lp.label for lp in control.labels],
                                                config=region_config, image=rgb,
                                                prompts={lp.label: "; ".join(lp.prompts) or "example"
                                                         for lp in control.labels},
                                                size=(image.height, image.width))
                scores.append(self._task_score(extracted[group], heatmaps, region_config, job, features,
                                               text_grid, [lp.label for lp in control.labels], group[0]))
                self._time(report, "postprocess", time.perf_counter() - started)
            started = time.perf_counter()
            results.extend(encode_regions(control.control, extracted[group].regions, image.width, image.height))
            self._time(report, "encode", time.perf_counter() - started)
        return results, scores

    def _task_score(self, regions: Any, heatmaps: np.ndarray, region_config: Any, job: PredictionJob,
                    features: Any, text_grid: Mapping, labels: Sequence[str], keys: Sequence) -> float:
        """The task score of one control's regions (GEM_TASK_SCORE; gem_model/uncertainty.py)."""
        from gem_model.uncertainty import combine_scores, committee_agreement, margin_score

        use = self.settings.task_score
        parts: dict[str, float | None] = {"regions": float(regions.score)}
        if "margin" in use:
            parts["margin"] = margin_score(heatmaps, region_config)
        if "agreement" in use and job.learned_maps is not None and features is not None \
                and all(key in text_grid for key in keys):
            parts["agreement"] = committee_agreement(features, np.stack([text_grid[key] for key in keys]),
                                                     labels, job.learned_maps, region_config)
        return combine_scores(parts, use)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _fail(self, job: PredictionJob, report: PredictReport, predictions: list, i: int, reason: str,
              message: str) -> None:
        outcome = report.outcomes[i]
        outcome.ok, outcome.reason, outcome.message, outcome.results, outcome.score = False, reason, message, 0, 0.0
        version = job.model_version or self.model_version
        if report.stored and self.settings.failed_tasks == "skip":
            # Label Studio skips an entry without "result" (logging it, our message included) and
            # stores nothing, so the task is predicted again next time instead of keeping an empty
            # prediction of this model version forever.
            predictions[i] = {"model_version": version, "score": 0.0, "error": message}
        else:
            predictions[i] = {"model_version": version, "score": 0.0, "result": []}
        logger.warning("task %s not predicted: %s", outcome.task_id, message)

    def _defer(self, job: PredictionJob, report: PredictReport, predictions: list, i: int) -> None:
        outcome = report.outcomes[i]
        outcome.ok, outcome.reason, outcome.message = False, DEFERRED, "not started: the time budget ran out"
        predictions[i] = {"model_version": job.model_version or self.model_version, "score": 0.0,
                          "error": outcome.message}
        report.deferred.append(i)

    def _time(self, report: PredictReport, stage: str, seconds: float) -> None:
        with self._report_lock:  # report.timings is shared with the fetch threads
            report.add_time(stage, seconds)
        if self.metrics is not None:
            self.metrics.observe_stage(stage, seconds)

    def _record(self, report: PredictReport) -> None:
        if self.metrics is None:
            return
        for outcome in report.outcomes:
            if outcome.reason == DEFERRED:
                continue
            self.metrics.tasks.inc(outcome="ok" if outcome.ok else "failed")
            if not outcome.ok:
                self.metrics.task_errors.inc(reason=outcome.reason or "unknown")


def _on_gpu(settings: Settings, predictor: Any) -> bool:
    """Whether the model runs on an accelerator: its own device when it says, else the setting."""
    device = getattr(getattr(predictor, "model", None), "device", None)
    if device is not None:
        return str(device) != "cpu"
    if settings.device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return settings.device != "cpu"


def task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, Mapping) else None


def _decode_min_side(settings: Settings, predictor: Any, region_config: Any) -> int | None:
    """Smallest short side an image must keep when decoded: GEM's input and the regions' working
    resolution (backend/images.py decodes large JPEGs in draft mode down to it). None: decode fully."""
    patch = getattr(predictor, "patch", None)
    scale = getattr(region_config, "work_scale", None)
    if not patch or not scale:
        return None
    guided = getattr(region_config, "refine", "none") != "none"
    return max(math.ceil(settings.image_size * scale / patch), settings.image_size,
               region_config.refine_max_side if guided else 0)


def _working_size(predictor: Any, encoded: Any, image: FetchedImage, region_config: Any) -> tuple[int, int]:
    """(h, w) for the maps and regions of this image (gem_model.regions.working_size)."""
    from gem_model.regions import working_size

    return working_size((image.height, image.width), predictor.grid_size(encoded), region_config)


def _without_present(heatmaps: np.ndarray, present: Sequence[Mapping[str, Any]], size: tuple[int, int],
                     floor: float) -> np.ndarray:
    """The maps with every label pushed below the floor where a region already in the context lies,
    so a suggestion never repeats what the annotator has (accepted regions, their own example box)."""
    from .decode import item_mask, item_size

    covered = np.zeros(size, dtype=bool)
    for item in present:
        if str(item.get("type", "")).lower() == "brushlabels":
            # A brush RLE only decodes at the size it was drawn on.
            drawn = item_size(item)
            mask = item_mask(item, *drawn) if drawn else None
            if mask is not None and mask.shape != size:
                mask = np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))
        else:
            mask = item_mask(item, size[0], size[1])
        if mask is not None:
            covered |= mask
    if not covered.any():
        return heatmaps
    out = heatmaps.copy()
    out[:, covered] = np.minimum(out[:, covered], floor - 1.0)
    return out


def _guide(image: FetchedImage, size: tuple[int, int]) -> np.ndarray:
    """The (possibly reduced) decoded image at the working size [h, w, 3]: refinement's guide."""
    picture = image.image
    if picture.size != (size[1], size[0]):
        picture = picture.resize((size[1], size[0]), Image.BOX)
    return np.asarray(picture)


FETCH_DECODE_ALLOWANCE_S = 10.0     # per image, on top of GEM_FETCH_TIMEOUT: decoding a large photo


def fetch_wait_s(fetch_timeout: float, images: int) -> float:
    """The longest a task's downloads are waited for: its images one after the other, each bounded."""
    return max(1, images) * (fetch_timeout + FETCH_DECODE_ALLOWANCE_S)


def fetch_task_images(fetcher: Any, task: Mapping[str, Any], job: PredictionJob, min_side: int | None = None,
                      timer: Callable[[str, float], None] | None = None) -> dict[str, FetchedImage]:
    """Download and decode every image `job` predicts for `task`: Image name -> FetchedImage.

    The pipeline's own fetch step, public so that other executors (the Ray fetch tasks) fetch
    exactly as it does. `fetcher` has ImageFetcher's `download` and `decode`; `min_side` is the
    pipeline's `decode_min_side`; `timer(stage, seconds)` receives the fetch and decode times.
    Raises TaskError (with a metric reason) for a missing URL or an image that cannot be had."""
    images: dict[str, FetchedImage] = {}
    plan = job.plan
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
            raw = fetcher.download(url, task_id=task_id(task), project_key=job.project)
            if timer is not None:
                timer("fetch", time.perf_counter() - started)
            started = time.perf_counter()
            images[spec.name] = fetcher.decode(raw, min_side=min_side)
            if timer is not None:
                timer("preprocess", time.perf_counter() - started)
        except ImageFetchError as exc:
            raise TaskError(f"image '{spec.name}': {exc}", reason=exc.reason) from None
    return images
