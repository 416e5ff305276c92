"""`python -m backend.prelabel --ray [ADDRESS]`: the pre-labelling job as a Ray Data pipeline.

    tasks (listed and deduplicated on the driver, as without Ray)
      -> fetch:   download + decode each task's images            CPU tasks, GEM_FETCH_WORKERS threads each
      -> predict: GEM + regions + Label Studio results            actor pool, one model per actor
      -> upload:  create the predictions in Label Studio, chunks  CPU tasks
      -> driver:  progress bar, summary, exit code

Identical results: each actor runs the very `PredictionPipeline.predict` the plain command runs, with
the same settings, on the same tasks; only the image downloads have moved out of it, into the fetch
tasks (the actor's pipeline is given a fetcher that hands back the images they decoded). Whatever
the plain pipeline does with an image, a failure or a batch, it does here too.

Ray is imported only in this module, and this module only by `--ray`: the server and the plain
command never load it (tests/test_prelabel_ray.py checks both).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .images import FetchedImage, ImageFetcher, ImageFetchError
from .settings import Settings

logger = logging.getLogger(__name__)

RAY_MISSING = ("--ray needs Ray Data, which the backend does not install by default: "
               "pip install -r requirements-ray.txt")


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and how wide to run (command-line flags and settings)."""
    address: str | None = None          # None: start a local Ray; "auto"; "ray://host:10001"
    workers: int | None = None          # model actors; None: one per GPU, or 1 without GPUs
    upload_tasks: int = 2               # concurrent upload tasks (Label Studio API calls in flight)
    upload_chunk: int = 100             # predictions per upload call
    object_store_mb: float = 0.0        # local Ray only; 0 = Ray's default (30% of RAM)
    local_cpus: int | None = None       # local Ray only; None: this machine's cores (at least workers + 1)


@dataclass
class StageTimes:
    """Seconds summed over tasks, per stage, as measured inside the workers."""
    fetch: float = 0.0
    model: float = 0.0            # GEM image encoder + text + similarity maps
    postprocess: float = 0.0      # regions
    encode: float = 0.0           # Label Studio result items (RLE, polygons)
    upload: float = 0.0           # Label Studio API calls (per chunk, not per task)

    def add(self, row: Mapping[str, Any]) -> None:
        for name in ("fetch", "model", "postprocess", "encode", "upload"):
            setattr(self, name, getattr(self, name) + float(row.get(f"{name}_s", 0.0) or 0.0))

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


# ---------------------------------------------------------------------------------------------
# Stage 1: fetch (CPU tasks)


class _RecordingFetcher:
    """Wraps the real fetcher; remembers each URL's decoded image or its failure."""

    def __init__(self, fetcher: ImageFetcher):
        self.fetcher = fetcher
        self.images: dict[str, FetchedImage | tuple[str, str]] = {}

    def download(self, url: str, task_id: Any = None, project_key: str | None = None) -> Any:
        try:
            raw = self.fetcher.download(url, task_id=task_id, project_key=project_key)
            image = self.fetcher.decode(raw)
        except ImageFetchError as exc:
            self.images[url] = (str(exc), exc.reason)
            raise
        self.images[url] = image
        return url

    def decode(self, url: str) -> FetchedImage:
        image = self.images[url]
        assert isinstance(image, FetchedImage)
        return image


class _PrefetchedImages:
    """The actor's fetcher: hands back what the fetch tasks decoded, or raises what they met."""

    def __init__(self):
        self.images: dict[str, FetchedImage | tuple[str, str]] = {}

    def download(self, url: str, task_id: Any = None, project_key: str | None = None) -> str:
        found = self.images.get(url)
        if found is None:
            raise ImageFetchError(f"image {url!r} was not fetched", reason="internal")
        if isinstance(found, tuple):
            message, reason = found
            raise ImageFetchError(message, reason=reason)
        return url

    def decode(self, url: str) -> FetchedImage:
        return self.images[url]  # type: ignore[return-value]


_FETCHER: list = []   # [(settings, ImageFetcher)]: one per worker process, reused across batches


def _fetcher(settings: Settings) -> ImageFetcher:
    if not _FETCHER or _FETCHER[0][0] != settings:
        _FETCHER[:] = [(settings, ImageFetcher(settings))]
    return _FETCHER[0][1]


def _pipeline(settings: Settings, fetcher: Any, predictor: Any = None):
    """The plain command's pipeline; without a predictor only its fetch stage may be used."""
    from .pipeline import PredictionPipeline

    extract = None if predictor is not None else _no_regions
    return PredictionPipeline(settings, predictor, region_extractor=extract, fetcher=fetcher)


def _no_regions(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the fetch stage predicts nothing")


def fetch_task_images(fetcher: Any, task: Mapping[str, Any], job: Any) -> None:
    """The plain pipeline's own fetch step for one task (URL lookup, download, decode) with `fetcher`,
    without building a pipeline (that would load torch in every fetch worker)."""
    from .pipeline import PredictionPipeline, PredictReport

    class _FetchOnly:
        def __init__(self):
            self.fetcher = fetcher

        def _time(self, report: Any, stage: str, seconds: float) -> None:
            pass

    PredictionPipeline._fetch_task(_FetchOnly(), task, job, PredictReport())


def fetch_images(batch: dict[str, Any], settings: Settings, job: Any) -> dict[str, Any]:
    """tasks -> tasks + their decoded images (pickled), downloads in parallel threads."""
    fetcher = _fetcher(settings)
    tasks = [json.loads(t) for t in batch["task"]]

    def one(task: Mapping[str, Any]) -> tuple[bytes, float]:
        started = time.perf_counter()
        recorder = _RecordingFetcher(fetcher)
        try:
            fetch_task_images(recorder, task, job)
        except Exception:  # noqa: BLE001 - the actor meets the same failure again and reports it
            pass
        return pickle.dumps(recorder.images, protocol=5), time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(settings.fetch_workers, len(tasks)))) as pool:
        fetched = list(pool.map(one, tasks))
    return {"index": batch["index"], "task": batch["task"],
            "images": [blob for blob, _ in fetched], "fetch_s": [seconds for _, seconds in fetched]}


# ---------------------------------------------------------------------------------------------
# Stage 2: predict (actors, one model each)


class PredictActor:
    """Loads the model once; each batch runs `PredictionPipeline.predict` on prefetched images."""

    def __init__(self, settings: Settings, job: Any):
        from .pipeline import load_predictor

        self.settings = settings
        self.job = job
        self.fetcher = _PrefetchedImages()
        started = time.perf_counter()
        self.pipeline = _pipeline(settings, self.fetcher, load_predictor(settings))
        logger.info("model loaded in %.1f s (pid %d)", time.perf_counter() - started, os.getpid())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tasks = [json.loads(t) for t in batch["task"]]
        n = len(tasks)
        try:
            for blob in batch["images"]:
                self.fetcher.images.update(pickle.loads(blob))
            predictions, report = self.pipeline.predict(tasks, self.job)
        except Exception as exc:  # noqa: BLE001 - a broken batch is reported, the job goes on
            logger.exception("a batch of %d tasks failed", n)
            return _failed_batch(batch, tasks, f"{type(exc).__name__}: {exc}")
        finally:
            self.fetcher.images = {}
        # Stage times are per batch; spread them over its tasks so the driver can sum rows.
        share = {stage: report.timings.get(stage, 0.0) / max(n, 1) for stage in ("model", "postprocess", "encode")}
        return {
            "index": batch["index"],
            "task_id": [o.task_id for o in report.outcomes],
            "prediction": [json.dumps(p) for p in predictions],
            "ok": [o.ok for o in report.outcomes],
            "reason": [o.reason for o in report.outcomes],
            "message": [o.message for o in report.outcomes],
            "results": [o.results for o in report.outcomes],
            "fetch_s": batch["fetch_s"],
            **{f"{stage}_s": [seconds] * n for stage, seconds in share.items()},
        }


def _failed_batch(batch: dict[str, Any], tasks: list, message: str) -> dict[str, Any]:
    n = len(tasks)
    ids = [t.get("id") if isinstance(t, Mapping) else None for t in tasks]
    return {"index": batch["index"], "task_id": ids,
            "prediction": [json.dumps({"score": 0.0, "error": message})] * n,
            "ok": [False] * n, "reason": ["internal"] * n, "message": [message] * n, "results": [0] * n,
            "fetch_s": batch["fetch_s"], **{f"{stage}_s": [0.0] * n for stage in ("model", "postprocess", "encode")}}


# ---------------------------------------------------------------------------------------------
# Stage 3: upload (CPU tasks)


def upload_predictions(batch: dict[str, Any], upload: Callable[[list[tuple[Any, dict]]], list[tuple[Any, str]]]
                       ) -> dict[str, Any]:
    """Create the chunk's predictions in Label Studio; one outcome row per task.

    A task the model could not predict is `failed` and nothing is stored for it (as without Ray);
    a prediction Label Studio refused, or a chunk whose call failed, is `upload_failed`.
    """
    n = len(batch["index"])
    task_ids = [_plain(t) for t in batch["task_id"]]
    predictions = [json.loads(p) for p in batch["prediction"]]
    status = ["stored" if ok else "failed" for ok in batch["ok"]]
    reasons = [str(r) for r in batch["reason"]]
    messages = [str(m) for m in batch["message"]]
    to_store = [i for i in range(n) if "result" in predictions[i]]
    started = time.perf_counter()
    try:
        refused = dict(upload([(task_ids[i], predictions[i]) for i in to_store])) if to_store else {}
    except Exception as exc:  # noqa: BLE001 - the chunk is reported failed; the job goes on
        logger.error("storing %d predictions failed: %s: %s", len(to_store), type(exc).__name__, exc)
        refused = {task_ids[i]: f"{type(exc).__name__}: {exc}" for i in to_store}
    seconds = time.perf_counter() - started
    for i in to_store:
        error = refused.get(task_ids[i])
        if error is not None:
            status[i], reasons[i], messages[i] = "upload_failed", "upload", str(error)
        elif not batch["ok"][i]:
            status[i] = "stored_empty"   # GEM_FAILED_TASKS=empty: an empty prediction was stored
    return {"index": batch["index"], "task_id": task_ids, "status": status, "reason": reasons,
            "message": messages, "results": batch["results"],
            **{k: batch[k] for k in ("fetch_s", "model_s", "postprocess_s", "encode_s")},
            "upload_s": [seconds / max(n, 1)] * n}


class LabelStudioUploader:
    """Picklable: rebuilt in each upload worker from Label Studio's URL and key (one client per process)."""

    _clients: dict = {}

    def __init__(self, url: str, token: str, project: int, timeout: float = 60.0):
        self.url, self.token, self.project, self.timeout = url, token, int(project), timeout

    def __repr__(self) -> str:   # never the key
        return f"LabelStudioUploader({self.url!r}, project={self.project})"

    def __call__(self, items: list[tuple[Any, dict]]) -> list[tuple[Any, str]]:
        from .ls_client import LabelStudioClient

        key = (self.url, self.token)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = LabelStudioClient(self.url, self.token, timeout=self.timeout)
        client.create_predictions(self.project, [{"task": task, **prediction} for task, prediction in items],
                                  chunk=max(1, len(items)))
        return []


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class RayRun:
    """What the Ray job did: one outcome row per task (in completion order) and where time went."""
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)
    workers: int = 0
    gpus_per_worker: float = 0.0
    startup_s: float = 0.0        # connecting to / starting Ray
    run_s: float = 0.0            # first task in to last outcome out (model loading included)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"{RAY_MISSING} ({exc})") from None
    return ray


def connect(options: RayOptions, settings: Settings) -> None:
    """Start a local Ray (no address) or join a cluster ("auto", "ray://host:port").

    The backend's code travels with the job (`py_modules`), so cluster nodes need only the
    dependencies (requirements-ray.txt), not a checkout.
    """
    ray = import_ray()
    import backend
    import gem_model

    runtime_env = {"py_modules": [os.path.dirname(backend.__file__), os.path.dirname(gem_model.__file__)],
                   "excludes": ["__pycache__", "*.pyc"]}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if options.address:
        ray.init(address=options.address, **kwargs)
        return
    cpus = options.local_cpus or os.cpu_count() or 1
    # The model actors take one CPU each; keep at least one for the fetch and upload tasks.
    cpus = max(cpus, (options.workers or 1) + 1)
    if options.object_store_mb:
        kwargs["object_store_memory"] = int(options.object_store_mb * 2**20)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **kwargs)


def plan_workers(options: RayOptions, settings: Settings) -> tuple[int, float]:
    """(model actors, GPUs per actor): one actor per GPU of the cluster, or 1 on CPU."""
    ray = import_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and settings.device != "cpu"
    workers = options.workers or (gpus if use_gpu else 1)
    return workers, (1.0 if use_gpu else 0.0)


def run(tasks: Sequence[Mapping[str, Any]], job: Any, settings: Settings, upload: Callable,
        options: RayOptions, on_outcome: Callable[[dict[str, Any]], None] | None = None) -> RayRun:
    """Predict `tasks` on Ray and store the predictions through `upload` (picklable: it runs in
    the upload tasks; called with [(task id, prediction)], returns [(task id, error)] for the
    ones Label Studio refused). `on_outcome` sees each task's outcome row as it completes."""
    ray = import_ray()
    started = time.perf_counter()
    connected_here = not ray.is_initialized()
    if connected_here:
        connect(options, settings)
    result = RayRun(startup_s=time.perf_counter() - started)
    try:
        result.workers, result.gpus_per_worker = plan_workers(options, settings)
        actor_settings = settings
        if result.gpus_per_worker:
            # Ray gives each actor its own GPU as device 0 (CUDA_VISIBLE_DEVICES).
            actor_settings = settings.replace(device="cuda")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False        # the command draws its own
        started = time.perf_counter()
        for row in _outcomes(ray, tasks, job, settings, actor_settings, upload, options, result):
            result.outcomes.append(row)
            result.times.add(row)
            if on_outcome is not None:
                on_outcome(row)
        result.run_s = time.perf_counter() - started
    finally:
        if connected_here:
            ray.shutdown()
    return result


def _outcomes(ray, tasks, job, settings, actor_settings, upload, options, result) -> Iterator[dict[str, Any]]:
    if not tasks:
        return
    rows = [{"index": i, "task": json.dumps(task)} for i, task in enumerate(tasks)]
    batch = settings.batch_size
    # One block per model batch (bounded), so every actor and upload task gets work from the start.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(-(-len(rows) // batch), 4096)))
    # Fetch tasks take a quarter CPU: they wait on the network, and several must run beside the actors.
    ds = ds.map_batches(fetch_images, fn_kwargs={"settings": settings, "job": job}, batch_size=batch,
                        batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(PredictActor, fn_constructor_kwargs={"settings": actor_settings, "job": job},
                        batch_size=batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=result.workers),
                        num_cpus=1, num_gpus=result.gpus_per_worker or None)
    ds = ds.map_batches(upload_predictions, fn_kwargs={"upload": upload}, batch_size=options.upload_chunk,
                        batch_format="numpy", num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=options.upload_tasks))
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keys = list(out)
        for i in range(len(out["index"])):
            yield {k: _plain(out[k][i]) for k in keys}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values, for summaries and JSON."""
    return value.item() if hasattr(value, "item") else value
