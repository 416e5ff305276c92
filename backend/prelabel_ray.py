"""`python -m backend.prelabel --ray [ADDRESS]`: the pre-labelling job as a Ray Data pipeline.

    driver:  the job (label config, learned state, model version), how many tasks, their id ranges;
             the run's claims (MODEL_DIR), answering the listing tasks' claim requests
      -> list:    one id range, paged by id; mark tasks already predicted,  CPU tasks, GEM_RAY_LIST_TASKS at once
                  claim the rest through the driver, mark those held elsewhere
      -> fetch:   download + decode each task's images                      CPU tasks, GEM_FETCH_WORKERS threads each
      -> predict: GEM + regions -> Label Studio results                     actor pool, the model loaded once per actor
      -> upload:  check + store the predictions, in chunks                  CPU tasks, GEM_RAY_UPLOAD_TASKS at once
    driver:  progress bar, the summary and the exit code of the plain command

Identical results: each actor runs the plain command's own `predict_tasks` (so the very
`PredictionPipeline.predict`) with the same settings on the same tasks; only the downloads moved
out, into the fetch tasks: the actor's pipeline gets a fetcher that hands back the images they
decoded (decoding as it would), or raises the error they met. Tasks already predicted are
marked by the plain command's `split_done` and only counted. The upload tasks use the plain command's
`PredictionUploader`, which asks Label Studio right before writing, so a rerun, or another runner
on the same project, never stores a task twice. The stages come from backend/stages.py, as the
plain command's do; this module never imports backend/prelabel.py.

Ray is imported only here, and this module only by `--ray`: the server and the plain command never
load it (tests/test_prelabel_ray.py checks both).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from .images import FetchedImage, ImageFetcher, ImageFetchError
from .ls_client import LabelStudioError
from .memory import allocator_environment, tune_allocator
from .settings import Settings, SettingsError
from .stages import (ALREADY_PREDICTED, FOUND_BEFORE_UPLOAD, HELD_ELSEWHERE, PAGE_SIZE, PredictionUploader,
                     PrelabelSummary, RunClaims, iter_task_range, learned_for, predict_tasks, progress_bar,
                     select_tasks, split_done, stopped_reason)

logger = logging.getLogger("backend.prelabel")

RAY_MISSING = ("--ray needs Ray Data, which the backend does not install by default: "
               "pip install -r requirements-ray.txt")
MODEL_STAGES = ("model", "postprocess", "encode")


class RayUnavailable(SettingsError):
    """`--ray` was asked for but Ray Data is not installed (a setup error: exit status 2)."""


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and how wide to run."""
    address: str | None = None     # None: start a local Ray; "auto": this machine's cluster; "ray://host:10001"
    workers: int | None = None     # model actors; None: one per GPU of the cluster, or 1 without GPUs
    upload_tasks: int = 2          # upload tasks running at once (Label Studio API calls in flight)
    list_tasks: int = 2            # listing tasks running at once (ranges of the task list being read)
    upload_chunk: int = 100        # predictions per upload call
    object_store_mb: float = 0.0   # local Ray only; 0 = Ray's default (30% of RAM)
    local_cpus: int | None = None  # local Ray only; None: this machine's cores (at least workers + 1)

    @classmethod
    def from_settings(cls, settings: Settings, address: str | None, workers: int | None,
                      upload_chunk: int = 100) -> "RayOptions":
        return cls(address=address or None, workers=workers, upload_chunk=upload_chunk,
                   upload_tasks=settings.ray_upload_tasks, list_tasks=settings.ray_list_tasks,
                   object_store_mb=settings.ray_object_store_mb, local_cpus=settings.ray_local_cpus or None)


# ---------------------------------------------------------------------------------------------
# Stage 0: list the tasks (CPU tasks, one range of task ids each) and claim them


_CLIENTS: dict = {}   # (url, token) -> LabelStudioClient, one per worker process


def _client(url: str, token: str, timeout: float):
    from .ls_client import LabelStudioClient

    client = _CLIENTS.get((url, token))
    if client is None:
        client = _CLIENTS[(url, token)] = LabelStudioClient(url, token, timeout=timeout)
    return client


def id_ranges(first: int, last: int, total: int, page_size: int = PAGE_SIZE,
              most: int = 4096) -> list[tuple[int, int | None]]:
    """Cut the task ids first..last into (after, upto) ranges of about `page_size` tasks each.

    A project's ids are not dense (Label Studio numbers the tasks of all projects together), so
    the width follows the project's density: `total` tasks over `last - first + 1` ids. The last
    range has no upper end: tasks imported during the run are listed too, as without Ray.
    """
    span = last - first + 1
    width = max(page_size, math.ceil(page_size * span / max(1, total)))
    width = max(width, math.ceil(span / most))
    bounds = list(range(first - 1, last, width))
    return [(after, upto) for after, upto in zip(bounds, bounds[1:])] + [(bounds[-1], None)]


@dataclass(frozen=True)
class TaskRanges:
    """Where the tasks come from: ranges of task ids, each walked page by page (by id) by a listing task.

    Paging by id, not by page number, keeps the listing right while annotators label during the
    run (`--only-unlabeled`): a task that leaves the list shifts no other task, so none is skipped
    or listed twice. Picklable (Label Studio's URL and key, not a client).
    """
    url: str
    token: str = field(repr=False)
    project: int = 0
    ranges: tuple[tuple[int, int | None], ...] = ()
    page_size: int = PAGE_SIZE
    only_unlabeled: bool = False
    task_ids: tuple[int, ...] | None = None
    timeout: float = 60.0

    def read(self, index: int) -> list[dict]:
        """The tasks of range `index` (0-based); raises LabelStudioError when Label Studio stops
        answering (after `stages.LIST_RETRIES` tries)."""
        after, upto = self.ranges[index]
        return list(iter_task_range(_client(self.url, self.token, self.timeout), self.project, after_id=after,
                                    upto_id=upto, page_size=self.page_size, only_unlabeled=self.only_unlabeled,
                                    task_ids=self.task_ids))


class ClaimBroker:
    """A mailbox (a Ray actor) between the pipeline's tasks, which run anywhere in the cluster,
    and the driver, which holds the run's claims in MODEL_DIR (where the server on that machine
    holds its own). A listing task asks to claim its tasks and waits; the driver's claims thread
    takes the requests, claims, and answers."""

    def __init__(self):
        import asyncio

        self._asyncio = asyncio
        self._waiting: dict[int, list] = {}
        self._answers: dict[int, list] = {}
        self._events: dict = {}
        self._new = asyncio.Event()
        self._next = 0

    async def claim(self, task_ids: list, wait_s: float) -> list:
        rid, self._next = self._next, self._next + 1
        event = self._events[rid] = self._asyncio.Event()
        self._waiting[rid] = list(task_ids)
        self._new.set()
        try:
            await self._asyncio.wait_for(event.wait(), wait_s)
        finally:
            self._events.pop(rid, None)
            self._waiting.pop(rid, None)
        return self._answers.pop(rid)

    async def take(self, wait_s: float) -> list:
        if not self._waiting:
            try:
                await self._asyncio.wait_for(self._new.wait(), wait_s)
            except self._asyncio.TimeoutError:
                return []
        self._new.clear()
        requests, self._waiting = list(self._waiting.items()), {}
        return requests

    async def answer(self, rid: int, granted: list) -> None:
        event = self._events.get(rid)
        if event is not None:         # the asker may have given up waiting
            self._answers[rid] = granted
            event.set()


CLAIM_WAIT_S = 120.0   # a listing task waits this long for the driver's answer, then fails the run


@dataclass(frozen=True)
class BrokeredClaims:
    """Picklable `claim(task ids) -> granted ids` for the pipeline's tasks, through a ClaimBroker."""
    broker: Any

    def __call__(self, task_ids: list) -> set:
        import ray

        return set(ray.get(self.broker.claim.remote(list(task_ids), CLAIM_WAIT_S)))


def serve_claims(broker: Any, claims: Any, stop: Any, get: Callable = None) -> None:
    """The driver's claims thread: answer the broker's requests with `claims.take` until `stop` is set."""
    if get is None:
        import ray

        get = ray.get
    while not stop.is_set():
        try:
            for rid, ids in get(broker.take.remote(1.0)):
                get(broker.answer.remote(rid, sorted(claims.take(ids), key=str)))
        except Exception as exc:  # noqa: BLE001 - the askers time out and report it; keep serving
            if stop.is_set():
                return
            logger.warning("answering claim requests failed: %s", exc)
            stop.wait(1.0)


def task_rows(tasks: Sequence[Mapping[str, Any]], model_version: str,
              claim: Callable[[list], set] | None = None) -> dict[str, list]:
    """Listed tasks -> pipeline rows. A task that holds a prediction of `model_version`, or that
    someone else is computing (`claim` does not grant it), is only passed along to be counted as
    skipped, as the plain command does (`split_done`, then claims)."""
    todo, done = split_done(list(tasks), model_version)
    skip = {t.get("id"): ALREADY_PREDICTED for t in done}
    if claim is not None and todo:
        granted = claim([t.get("id") for t in todo])
        skip.update({t.get("id"): HELD_ELSEWHERE for t in todo if t.get("id") not in granted})
    # Only what the pipeline reads travels: a listed task also carries its annotations and predictions.
    return {"task": [json.dumps({"id": t.get("id"), "data": t.get("data")}) for t in tasks],
            "skip": [skip.get(t.get("id"), "") for t in tasks]}


def list_tasks(batch: dict[str, Any], ranges: TaskRanges, model_version: str,
               claim: Callable[[list], set] | None = None) -> dict[str, list]:
    return task_rows([task for index in batch["range"] for task in ranges.read(int(index))], model_version, claim)


def claim_rows(batch: dict[str, Any], claim: Callable[[list], set]) -> dict[str, list]:
    """Tasks listed by the driver (`--limit`): claim those still to do, right before they are fetched."""
    ids = {json.loads(t)["id"]: i for i, (t, skip) in enumerate(zip(batch["task"], batch["skip"])) if not skip}
    skip = list(batch["skip"])
    if ids:
        granted = claim(list(ids))
        for task_id, i in ids.items():
            if task_id not in granted:
                skip[i] = HELD_ELSEWHERE
    return {"task": batch["task"], "skip": skip}


# ---------------------------------------------------------------------------------------------
# Stage 1: fetch (CPU tasks)


class _RecordingFetcher:
    """The real fetcher; remembers each URL's decoded image, or the error it met."""

    def __init__(self, fetcher: ImageFetcher):
        self.fetcher = fetcher
        self.images: dict[str, FetchedImage | tuple[str, str]] = {}
        self._raw: dict[str, bytes] = {}

    def download(self, url: str, task_id: Any = None, project_key: str | None = None) -> str:
        try:
            self._raw[url] = self.fetcher.download(url, task_id=task_id, project_key=project_key)
        except ImageFetchError as exc:
            self.images[url] = (str(exc), exc.reason)
            raise
        return url

    def decode(self, url: str, **kwargs: Any) -> FetchedImage:
        try:
            image = self.fetcher.decode(self._raw.pop(url), **kwargs)
        except ImageFetchError as exc:
            self.images[url] = (str(exc), exc.reason)
            raise
        self.images[url] = image
        return image


class _PrefetchedImages:
    """The actor's fetcher: hands back what the fetch tasks decoded, or raises what they met."""

    def __init__(self):
        self.images: dict[str, FetchedImage | tuple[str, str]] = {}

    def download(self, url: str, task_id: Any = None, project_key: str | None = None) -> str:
        found = self.images.get(url)
        if found is None:
            raise ImageFetchError("the image was not fetched (internal error)", reason="internal")
        if isinstance(found, tuple):
            raise ImageFetchError(found[0], reason=found[1])
        return url

    def decode(self, url: str, **kwargs: Any) -> FetchedImage:
        return self.images[url]  # type: ignore[return-value]   (decoded with the same arguments)


def fetch_task_images(fetcher: Any, task: Mapping[str, Any], job: Any, min_side: int | None) -> None:
    """Run the plain pipeline's own fetch step (URL lookup, download, decode) for one task."""
    from .pipeline import fetch_task_images as pipeline_fetch

    pipeline_fetch(fetcher, task, job, min_side)


def planning_pipeline(settings: Settings):
    """A PredictionPipeline on the model's architecture with random weights (nothing downloaded):
    the driver prepares the job with it and reads how images are decoded (`decode_min_side`,
    which depends on the architecture's patch size), exactly as the actors' pipeline will."""
    import gem_model

    from .pipeline import PredictionPipeline

    s = settings
    model = gem_model.create_gem_model(
        model_name=s.model_name, pretrained=None, device="cpu", gem_depth=s.gem_depth,
        ss_attn_iter=s.ss_attn_iter, ss_attn_temp=s.ss_attn_temp, model_config=s.model_config or None)
    predictor = gem_model.HeatmapPredictor(model, image_size=s.image_size, resize_mode=s.resize_mode,
                                           cache_bytes=0)
    return PredictionPipeline(settings, predictor)


_FETCHER: list = []   # [(settings, ImageFetcher)]: one per worker process, reused across batches


def _fetcher(settings: Settings) -> ImageFetcher:
    if not _FETCHER or _FETCHER[0][0] != settings:
        _FETCHER[:] = [(settings, ImageFetcher(settings))]
    return _FETCHER[0][1]


def fetch_images(batch: dict[str, Any], settings: Settings, job: Any, min_side: int | None) -> dict[str, Any]:
    """Rows of tasks -> the same rows with their decoded images (pickled), downloaded in parallel."""
    fetcher = _fetcher(settings)
    tasks = [json.loads(t) for t in batch["task"]]
    skip = list(batch["skip"])

    def one(i: int) -> tuple[bytes, float]:
        task = tasks[i]
        if skip[i]:
            return b"", 0.0
        started = time.perf_counter()
        recorder = _RecordingFetcher(fetcher)
        try:
            fetch_task_images(recorder, task, job, min_side)
        except Exception:  # noqa: BLE001 - the actor's pipeline meets the same failure and reports it
            pass
        return pickle.dumps(recorder.images, protocol=5), time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(settings.fetch_workers, len(tasks)))) as pool:
        fetched = list(pool.map(one, range(len(tasks))))
    return {"task": batch["task"], "skip": skip, "images": [blob for blob, _ in fetched],
            "fetch_s": [seconds for _, seconds in fetched]}


# ---------------------------------------------------------------------------------------------
# Stage 2: predict (actors, one model each)


class PredictActor:
    """Loads the model once; each batch goes through the plain command's `predict_tasks`."""

    def __init__(self, settings: Settings, job: Any):
        from .pipeline import PredictionPipeline, load_predictor

        # Also here: a cluster started by someone else may run this actor in a worker whose
        # environment lacked them (a no-op for those the environment sets: glibc applied them).
        tune_allocator()
        started = time.perf_counter()
        self.job = job
        self.fetcher = _PrefetchedImages()
        self.pipeline = PredictionPipeline(settings, load_predictor(settings), fetcher=self.fetcher)
        self.load_s = time.perf_counter() - started    # reported with the first batch
        logger.info("model loaded in %.1f s (pid %d)", self.load_s, os.getpid())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        all_tasks = [json.loads(t) for t in batch["task"]]
        ids = [task.get("id") for task in all_tasks]
        tasks = [task for task, skip in zip(all_tasks, batch["skip"]) if not skip]
        try:
            for blob in batch["images"]:
                if blob:
                    self.fetcher.images.update(pickle.loads(blob))
            payloads, failures, timings = predict_tasks(self.pipeline, self.job, tasks) if tasks else ([], {}, {})
        except Exception as exc:  # noqa: BLE001 - a broken batch is reported, the job goes on
            logger.exception("a batch of %d tasks failed", len(tasks))
            payloads, timings = [], {}
            failures = {task.get("id"): f"internal: {type(exc).__name__}: {exc}" for task in tasks}
        finally:
            self.fetcher.images = {}
        by_task = {p["task"]: p for p in payloads}
        n = len(ids)
        load_s, self.load_s = self.load_s, 0.0
        # Stage times are per batch; spread over its tasks so that the driver can sum rows.
        return {
            "task_id": ids,
            "skip": batch["skip"],
            "payload": [json.dumps(by_task[t]) if t in by_task else "" for t in ids],
            "failure": [failures.get(t, "") if t not in by_task else "" for t in ids],
            "fetch_s": batch["fetch_s"],
            **{f"{stage}_s": [timings.get(stage, 0.0) / n] * n for stage in MODEL_STAGES},
            "model_load_s": [load_s] + [0.0] * (n - 1),
        }


# ---------------------------------------------------------------------------------------------
# Stage 3: upload (CPU tasks)


class LabelStudioUploader:
    """Stores payloads with the plain command's `PredictionUploader` (checks Label Studio first).

    Picklable: it travels to the upload workers as Label Studio's URL and key, and builds one
    client per worker process. Returns (stored ids, skipped ids, failures {id: reason}).
    """

    def __init__(self, url: str, token: str, project: int, timeout: float = 60.0):
        self.url, self.token, self.project, self.timeout = url, token, int(project), timeout

    def __repr__(self) -> str:   # never the key
        return f"LabelStudioUploader({self.url!r}, project={self.project})"

    def __call__(self, payloads: list[dict]) -> tuple[list, list, dict]:
        uploader = PredictionUploader(_client(self.url, self.token, self.timeout), self.project,
                                      chunk=max(1, len(payloads)))
        try:
            uploader.pending.extend(payloads)   # one chunk: flush() stores it and reports every task
            return uploader.flush()
        finally:
            uploader.close()


def upload_predictions(batch: dict[str, Any], upload: Callable[[list[dict]], tuple[list, list, dict]]
                       ) -> dict[str, Any]:
    """Store the chunk's predictions; one outcome row per task: stored, skipped or failed (+ why)."""
    ids = [_plain(t) for t in batch["task_id"]]
    payloads = [json.loads(p) if p else None for p in batch["payload"]]
    status = ["skipped" if skip else "stored" if p is not None else "failed"
              for p, skip in zip(payloads, batch["skip"])]
    why = [str(skip or failure) for skip, failure in zip(batch["skip"], batch["failure"])]
    ready = [p for p in payloads if p is not None]
    started = time.perf_counter()
    try:
        stored, skipped, failed = upload(ready) if ready else ([], [], {})
    except Exception as exc:  # noqa: BLE001 - the chunk is reported failed; the job goes on
        logger.error("storing %d predictions failed: %s: %s", len(ready), type(exc).__name__, exc)
        stored, skipped, failed = [], [], {p["task"]: f"upload: {type(exc).__name__}: {exc}" for p in ready}
    seconds = time.perf_counter() - started
    skipped, failed = set(skipped), {_plain(k): v for k, v in failed.items()}
    for i, task_id in enumerate(ids):
        if payloads[i] is None:
            continue
        if task_id in skipped:
            status[i], why[i] = "skipped", FOUND_BEFORE_UPLOAD
        elif task_id in failed:
            status[i], why[i] = "failed", str(failed[task_id])
    n = len(ids)
    return {"task_id": ids, "status": status, "why": why,
            **{f"{stage}_s": batch[f"{stage}_s"] for stage in ("fetch", *MODEL_STAGES, "model_load")},
            "upload_s": [seconds / max(n, 1)] * n}


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class RayRun:
    """What the Ray part of a run did."""
    outcomes: list[dict[str, Any]] = field(default_factory=list)   # one row per task, completion order
    timings: dict[str, float] = field(default_factory=dict)        # stage -> seconds summed in the workers
    workers: int = 0
    gpus_per_worker: float = 0.0
    startup_s: float = 0.0        # starting or joining Ray
    run_s: float = 0.0            # first task in to last outcome out, model loading included
    first_s: float = 0.0          # first task in to first outcome out (process start, model load, one batch)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailable(f"{RAY_MISSING} ({exc})") from None
    return ray


def connect(options: RayOptions) -> None:
    """Start a local Ray (no address) or join a cluster ("auto", "ray://host:port").

    The backend's code travels with the job (`py_modules`), so cluster nodes need the
    dependencies (requirements-ray.txt) but not a checkout of this repository.
    """
    ray = import_ray()
    import backend
    import gem_model

    runtime_env = {"py_modules": [os.path.dirname(backend.__file__), os.path.dirname(gem_model.__file__)],
                   "excludes": ["__pycache__", "*.pyc"],
                   # The servers' allocator settings (backend/memory.py), in the environment each worker
                   # process starts with, so that glibc applies them before its first malloc; a value
                   # the driver's environment sets travels instead.
                   "env_vars": allocator_environment()}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
    if options.address:
        ray.init(address=options.address, **kwargs)
        return
    cpus = options.local_cpus or os.cpu_count() or 1
    # Each model actor holds one CPU; keep at least one for the fetch and upload tasks.
    cpus = max(cpus, (options.workers or 1) + 1)
    if options.object_store_mb:
        kwargs["object_store_memory"] = int(options.object_store_mb * 2**20)
    # "local": a new Ray of our own even when this machine runs another one.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)


def plan_workers(options: RayOptions, settings: Settings) -> tuple[int, float]:
    """(model actors, GPUs per actor): by default one actor per GPU of the cluster, or 1 on CPU.

    More workers than GPUs share them (e.g. 8 workers on 4 GPUs: half a GPU each), which pays
    when the CPU part of each task (regions, result encoding) keeps a GPU actor waiting.
    """
    ray = import_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.device != "cpu"
    workers = options.workers or (gpus if use_gpu else 1)
    return workers, (min(1.0, gpus / workers) if use_gpu else 0.0)


def run(source: TaskRanges | Sequence[Mapping[str, Any]], job: Any, settings: Settings, upload: Callable,
        options: RayOptions, on_outcome: Callable[[dict[str, Any]], None] | None = None,
        min_side: int | None = None, claims: RunClaims | None = None) -> RayRun:
    """Predict the tasks of `source` on Ray and store the predictions through `upload`.

    `source`: `TaskRanges` (the listing tasks read the ranges, in parallel) or tasks already listed.
    `claims`: the run's claims (held by this process, in MODEL_DIR): each task is claimed right
    after it is listed, through a `ClaimBroker`, and one someone else holds is skipped; the caller
    gives claims back as outcomes arrive. None: no claims.
    `upload` is picklable (it runs in the upload tasks): called with a chunk of payloads, it
    returns (stored ids, skipped ids, failures {id: reason}), like `PredictionUploader.flush`.
    `min_side`: how the fetch tasks decode images, the actors' pipeline's `decode_min_side`
    (`planning_pipeline(settings).decode_min_side`). `on_outcome` sees each task's outcome row
    (`task_id`, `status`: stored / skipped / failed, `why`, stage seconds) as it arrives.
    """
    ray = import_ray()
    if not isinstance(source, TaskRanges) and not source:
        return RayRun()    # nothing to predict: no cluster to start or join
    started = time.perf_counter()
    connected_here = not ray.is_initialized()
    if connected_here:
        connect(options)
    result = RayRun(startup_s=time.perf_counter() - started)
    stop = threading.Event()
    server = None
    try:
        claim = None
        if claims is not None:
            broker = ray.remote(num_cpus=0)(ClaimBroker).remote()
            claim = BrokeredClaims(broker)
            server = threading.Thread(target=serve_claims, args=(broker, claims, stop), name="prelabel-claims-broker",
                                      daemon=True)
            server.start()
        result.workers, result.gpus_per_worker = plan_workers(options, settings)
        # Ray shows each GPU actor only its own device, as cuda:0.
        actor_settings = settings.replace(device="cuda") if result.gpus_per_worker else settings
        ray.data.DataContext.get_current().enable_progress_bars = False   # the command draws its own
        logger.info("Ray: %d model worker(s)%s, %s", result.workers,
                    f" with {result.gpus_per_worker:g} GPU each" if result.gpus_per_worker else " on CPU",
                    ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                              if k in ("CPU", "GPU")))
        started = time.perf_counter()
        args = (source, job, settings, actor_settings, upload, options, result.workers, result.gpus_per_worker,
                min_side, claim)
        if ray.util.client.ray.is_connected():
            rows = _outcomes_from_cluster(ray, args)   # Ray Client: the pipeline runs on the cluster
        else:
            rows = _outcomes(ray, *args)
        for row in rows:
            result.outcomes.append(row)
            if not result.outcomes[1:]:
                result.first_s = time.perf_counter() - started
            for stage in ("fetch", "model_load", *MODEL_STAGES, "upload"):
                result.timings[stage] = result.timings.get(stage, 0.0) + float(row.get(f"{stage}_s") or 0.0)
            if on_outcome is not None:
                on_outcome(row)
        result.run_s = time.perf_counter() - started
    finally:
        stop.set()
        if server is not None:
            server.join(timeout=5.0)
        if connected_here:
            ray.shutdown()
    return result


def _outcomes_from_cluster(ray, args: tuple) -> Iterator[dict[str, Any]]:
    """Run the pipeline in a task on the cluster and relay its outcome rows as they come.

    Ray Data's streaming execution needs a driver inside the cluster, which a Ray Client
    connection (`ray://`) is not; so a task there drives it and passes the outcomes through a
    small actor that this side polls (Ray Client cannot stream a generator's results).
    """
    @ray.remote(num_cpus=0)
    class Outbox:
        def __init__(self):
            self.rows: list = []

        def put(self, rows: list) -> None:
            self.rows.extend(rows)

        def take(self) -> list:
            rows, self.rows = self.rows, []
            return rows

    @ray.remote(num_cpus=0)
    def drive(outbox, args: tuple) -> None:
        import ray as cluster_ray

        cluster_ray.data.DataContext.get_current().enable_progress_bars = False
        rows: list = []
        for row in _outcomes(cluster_ray, *args):
            rows.append(row)
            if len(rows) >= 64:
                cluster_ray.get(outbox.put.remote(rows))
                rows = []
        cluster_ray.get(outbox.put.remote(rows))

    outbox = Outbox.remote()
    done = drive.remote(outbox, args)
    while True:
        finished = bool(ray.wait([done], timeout=1.0)[0])
        yield from ray.get(outbox.take.remote())
        if finished:
            ray.get(done)    # raises what failed on the cluster
            yield from ray.get(outbox.take.remote())
            return


def _outcomes(ray, source, job, settings, actor_settings, upload, options, workers, gpus_per_worker,
              min_side, claim=None) -> Iterator[dict[str, Any]]:
    batch = settings.batch_size
    if isinstance(source, TaskRanges):
        # One listing task per id range, several at once: listing overlaps with the model work.
        n = len(source.ranges)
        ds = ray.data.from_items([{"range": i} for i in range(n)], override_num_blocks=max(1, min(n, 4096)))
        ds = ds.map_batches(list_tasks, fn_kwargs={"ranges": source, "model_version": job.model_version,
                                                   "claim": claim},
                            batch_size=1, batch_format="numpy", num_cpus=0.25,
                            compute=ray.data.TaskPoolStrategy(size=max(1, options.list_tasks)))
        # A range comes out as one block, and a block goes to one actor: cut it into model batches
        # (streaming) so that every worker gets work.
        ds = ds.repartition(target_num_rows_per_block=batch)
    else:
        columns = task_rows(source, job.model_version)
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        # One block per model batch (bounded), so that every actor gets work from the start.
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(math.ceil(len(rows) / batch), 4096)))
        if claim is not None:   # claimed batch by batch as they go to the fetch tasks, not all at the start
            ds = ds.map_batches(claim_rows, fn_kwargs={"claim": claim}, batch_size=batch, batch_format="numpy",
                                num_cpus=0.25)
    # Fetch tasks hold a quarter CPU: they mostly wait on the network, and must run beside the actors.
    ds = ds.map_batches(fetch_images, fn_kwargs={"settings": settings, "job": job, "min_side": min_side},
                        batch_size=batch,
                        batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(PredictActor, fn_constructor_kwargs={"settings": actor_settings, "job": job},
                        batch_size=batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=1, num_gpus=gpus_per_worker or None)
    ds = ds.map_batches(upload_predictions, fn_kwargs={"upload": upload}, batch_size=options.upload_chunk,
                        batch_format="numpy", num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=max(1, options.upload_tasks)))
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(out["task_id"])):
            yield {key: _plain(values[i]) for key, values in out.items()}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values."""
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------------------------------------
# The command's Ray branch


def run_prelabel_on_ray(settings: Settings, project: int, options: RayOptions, *, only_unlabeled: bool = False,
                        task_ids: Any = None, limit: int | None = None, progress: bool = True, client: Any = None):
    """`run_prelabel` on Ray: the same selection, skipping, summary and exit code (a PrelabelSummary,
    which also carries the Ray figures as `.ray`, a RayRun)."""
    from .label_config import parse_label_config
    from .ls_client import LabelStudioClient

    started = time.monotonic()
    import_ray()   # before any work: a missing Ray is a setup error
    client = client or LabelStudioClient.from_settings(settings)
    t0 = time.perf_counter()
    info = client.get_project(project)
    plan = parse_label_config(info.get("label_config") or "", settings.outputs)
    # The job (what to predict, the project's learned state, the model version) is prepared once,
    # here, as the plain command prepares it, and sent to the actors as it is.
    planner = planning_pipeline(settings)
    job = planner.prepare(plan, project=project, learned=learned_for(settings, project))
    min_side = planner.decode_min_side
    planner.close()
    summary = PrelabelSummary(project=project, model_version=job.model_version)
    ids = None if task_ids is None else tuple(sorted({int(t) for t in task_ids}))
    total = client.count_tasks(project, only_unlabeled) if ids is None else len(ids)
    if limit is not None and total is not None:
        total = min(total, limit)
    source: TaskRanges | list[dict] = []
    try:
        if total is None or limit is not None:
            # The first `limit` tasks of the list (or Label Studio does not say how many): list them here.
            source = list(select_tasks(client, project, only_unlabeled=only_unlabeled, task_ids=ids, limit=limit))
            total = len(source)
        else:
            bounds = client.task_id_range(project, only_unlabeled=only_unlabeled, task_ids=ids)
            if bounds is not None:
                source = TaskRanges(url=client.url, token=client.access.token, project=project,
                                    ranges=tuple(id_ranges(bounds[0], bounds[1], total)), page_size=PAGE_SIZE,
                                    only_unlabeled=only_unlabeled, task_ids=ids, timeout=client.timeout)
    except LabelStudioError as exc:
        summary.stopped = stopped_reason(exc)
    summary.add_time("ls_read", time.perf_counter() - t0)
    if summary.stopped:
        summary.seconds = time.monotonic() - started
        return summary

    bar = progress_bar(total, progress)
    # Claimed in MODEL_DIR, as the plain command does: the server on this machine leaves the
    # run's tasks alone, and the run leaves alone those the server is computing.
    claims = RunClaims.from_settings(settings, job.model_version, project)

    def on_outcome(row: dict[str, Any]) -> None:
        summary.seen += 1
        if row["status"] == "stored":
            summary.done += 1
        elif row["status"] == "skipped":
            summary.skipped[row["task_id"]] = row["why"]
        else:
            summary.failed[row["task_id"]] = row["why"]
        (claims.stored if row["status"] == "stored" else claims.give_back)([row["task_id"]])
        bar.update(1)
        bar.set_postfix(done=summary.done, skipped=len(summary.skipped), failed=len(summary.failed), refresh=False)

    uploader = LabelStudioUploader(client.url, client.access.token, project, timeout=client.timeout)
    ray_run = RayRun()
    try:
        ray_run = run(source, job, settings, uploader, options, on_outcome=on_outcome, min_side=min_side,
                      claims=claims)
    except LabelStudioError as exc:
        summary.stopped = stopped_reason(exc)
    except Exception as exc:
        if "LabelStudioError" not in f"{type(exc).__name__}: {exc}":
            raise
        # Listing a range failed in a Ray task (after retries): a failed run with its summary, as without Ray.
        summary.stopped = f"listing tasks failed in a Ray task: {str(exc)[-300:]}"
    finally:
        bar.close()
        claims.close()
    if summary.stopped:
        logger.error("project %s: %s", project, summary.stopped)
    if ray_run.startup_s:
        summary.add_time("ray_start", ray_run.startup_s)
    for stage, seconds in ray_run.timings.items():
        summary.add_time(stage, seconds)
    summary.seconds = time.monotonic() - started
    work = summary.done + len(summary.failed)
    steady = (work - 1) / (ray_run.run_s - ray_run.first_s) if work > 1 and ray_run.run_s > ray_run.first_s else 0.0
    logger.info("Ray: started in %.1f s; %d worker(s) went through %d tasks in %.1f s: first result after %.1f s "
                "(worker start, model load, one batch), then %.2f tasks/s", ray_run.startup_s, ray_run.workers,
                summary.seen, ray_run.run_s, ray_run.first_s, steady)
    summary.ray = ray_run
    return summary
