"""Pre-label a whole Label Studio project from a terminal or a cron job.

    python -m backend.prelabel --project 3 [--only-unlabeled] [--task-ids 1,2,5-9] [--limit N] [--dry-run]

Reads LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and every GEM_* setting from the environment, like
the server. Streams the project's tasks page by page, skips those that already hold a prediction of
the current model version, runs the rest in batches through the server's `PredictionPipeline`, and
uploads the predictions in chunks. Stopping and running it again never stores a task twice.
Exit status: 0 when every task is done or skipped, 1 when some failed, 2 on a usage or setup error.
`--ray [ADDRESS] [--workers N]` runs the same stages on a Ray cluster (backend/prelabel_ray.py,
imported only then; docs/SCALING.md).

The stages are small pieces other runners reuse (e.g. as Ray Data map stages)::

    tasks = select_tasks(client, project, only_unlabeled=True)        # iterator of task dicts
    todo, skipped = split_done(batch, model_version)                  # drop tasks predicted already
    payloads, failures = predict_tasks(pipeline, job, todo)           # task dicts -> prediction payloads
    uploader = PredictionUploader(client, project); uploader.add(payloads); uploader.flush()
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .claims import ClaimStore
from .ls_client import LabelStudioClient, LabelStudioError, task_prediction_versions
from .pipeline import PredictionJob, PredictionPipeline, compute_model_version, versioned
from .settings import Settings, SettingsError

logger = logging.getLogger("backend.prelabel")

# One prediction as Label Studio's API stores it.
Payload = dict   # {"task": int, "result": list, "score": float, "model_version": str}


@dataclass
class PrelabelSummary:
    """What a run did. `failed`: task id -> reason; `skipped`: task id -> why (already predicted, ...)."""
    project: int
    model_version: str
    seen: int = 0
    done: int = 0
    skipped: dict[Any, str] = field(default_factory=dict)
    failed: dict[Any, str] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds summed
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def lines(self) -> list[str]:
        rate = self.done / self.seconds * 60 if self.seconds > 0 else 0.0
        verb = "would predict" if self.dry_run else "done"
        out = [f"project {self.project}, model version {self.model_version}: {self.seen} tasks seen, "
               f"{verb} {self.done}, skipped {len(self.skipped)}, failed {len(self.failed)} "
               f"in {self.seconds:.1f} s ({rate:.1f} tasks/min)"]
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


# -- stages ----------------------------------------------------------------------------------------


def select_tasks(client: LabelStudioClient, project: int, *, only_unlabeled: bool = False,
                 task_ids: Iterable[int] | None = None, limit: int | None = None,
                 page_size: int = 100) -> Iterator[dict]:
    """The project's tasks, streamed page by page, filtered, at most `limit`."""
    tasks = client.iter_tasks(project, page_size=page_size, only_unlabeled=only_unlabeled, task_ids=task_ids)
    return itertools.islice(tasks, limit) if limit is not None else tasks


def split_done(tasks: Sequence[Mapping[str, Any]], model_version: str) -> tuple[list[dict], list[dict]]:
    """(tasks to predict, tasks that already hold a prediction of `model_version`)."""
    todo, done = [], []
    for task in tasks:
        (done if model_version in task_prediction_versions(task) else todo).append(task)
    return todo, done


def predict_tasks(pipeline: PredictionPipeline, job: PredictionJob,
                  tasks: Sequence[Mapping[str, Any]]) -> tuple[list[Payload], dict[Any, str], dict[str, float]]:
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


class PredictionUploader:
    """Collects payloads and stores them `chunk` at a time, in a background thread so the model
    does not wait for Label Studio. Before storing it asks Label Studio whether each task got a
    prediction of this version meanwhile (another run, the server), so none is stored twice.

    `add()` and `flush()` return what finished since the last call: (stored task ids, skipped
    task ids, failures {task id: reason}); `flush()` waits for everything. `on_finished(task ids)`
    is called from the upload thread once a chunk's tasks are stored, skipped or failed.
    """

    def __init__(self, client: LabelStudioClient, project: int, chunk: int = 100, check_existing: bool = True,
                 on_finished: Callable[[list], None] | None = None, check_workers: int = 4):
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

    def close(self) -> None:
        self._uploads.shutdown(wait=True, cancel_futures=True)
        self._checks.shutdown(wait=False, cancel_futures=True)

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
        if self.on_finished is not None:
            self.on_finished([p["task"] for p in part])
        return stored, skipped, failed


def learned_for(settings: Settings, project: int):
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


# -- the run -------------------------------------------------------------------------------------------




def run_prelabel(settings: Settings, project: int, *, only_unlabeled: bool = False,
                 task_ids: Iterable[int] | None = None, limit: int | None = None, dry_run: bool = False,
                 batch_tasks: int | None = None, upload_chunk: int = 100, progress: bool = True,
                 client: LabelStudioClient | None = None, pipeline: PredictionPipeline | None = None,
                 claims: ClaimStore | None = None) -> PrelabelSummary:
    """Predict and store every selected task of `project` that lacks a prediction of this model version.

    `client`/`pipeline`/`claims` default to ones built from `settings` (the pipeline loads the model
    unless `dry_run`). Raises LabelStudioError when Label Studio cannot be reached at the start;
    failures after that are per task, in the summary.
    """
    started = time.monotonic()
    client = client or LabelStudioClient.from_settings(settings)
    learned = learned_for(settings, project)
    version = pipeline.model_version if pipeline is not None else compute_model_version(settings)
    if learned is not None and learned.version:   # the same version the server gives this project
        version = f"{version}+{learned.version}"
    summary = PrelabelSummary(project=project, model_version=version, dry_run=dry_run)
    t0 = time.perf_counter()
    info = client.get_project(project)
    total = client.count_tasks(project, only_unlabeled) if task_ids is None else len(set(task_ids))
    summary.add_time("ls_read", time.perf_counter() - t0)
    if limit is not None and total is not None:
        total = min(total, limit)
    label_config = info.get("label_config") or ""
    from .label_config import parse_label_config
    plan = parse_label_config(label_config, settings.outputs)      # LabelConfigError: say so before loading
    # What prepare will give (config labels and prompts included), also for a dry run.
    version = summary.model_version = versioned(
        pipeline.model_version if pipeline is not None else compute_model_version(settings), plan, settings,
        learned=learned)
    job = None
    if not dry_run:
        if pipeline is None:
            logger.info("loading model %s (%s) on %s", settings.model_name, settings.pretrained, settings.device)
            pipeline = PredictionPipeline.from_settings(settings)
        job = pipeline.prepare(plan, project=project, learned=learned)
        version = job.model_version
        if claims is None:
            claims = ClaimStore(os.path.join(settings.model_dir, "claims.sqlite"))
    uploader = PredictionUploader(client, project, chunk=upload_chunk,
                                  on_finished=(lambda ids: claims.release(ids, version)) if claims else None)
    batch_tasks = batch_tasks or max(settings.batch_size * 4, 16)

    bar = _progress(total, progress)
    try:
        tasks = select_tasks(client, project, only_unlabeled=only_unlabeled, task_ids=task_ids, limit=limit)
        while True:
            t0 = time.perf_counter()
            batch = list(itertools.islice(tasks, batch_tasks))
            summary.add_time("ls_read", time.perf_counter() - t0)
            if not batch:
                break
            summary.seen += len(batch)
            todo, done = split_done(batch, version)
            summary.skipped.update({t["id"]: "already predicted (this model version)" for t in done})
            if dry_run:
                summary.done += len(todo)
                bar.update(len(batch))
                continue
            held = claims.claim([t["id"] for t in todo], version, project=str(project)) if claims else None
            if held is not None:
                busy = [t for t in todo if str(t["id"]) not in held]
                summary.skipped.update({t["id"]: "being predicted by another process" for t in busy})
                todo = [t for t in todo if str(t["id"]) in held]
            try:
                payloads, failures, timings = predict_tasks(pipeline, job, todo)  # type: ignore[arg-type]
                for stage, seconds in timings.items():
                    summary.add_time(stage, seconds)
                summary.failed.update(failures)
                _count(summary, *uploader.add(payloads))
                if claims is not None:
                    # Failed tasks are free again now; uploaded ones when their chunk is stored.
                    claims.release([t["id"] for t in todo if t["id"] in failures], version)
            except BaseException:
                if claims is not None:
                    claims.release([t["id"] for t in todo if t["id"] not in uploader.in_flight()], version)
                raise
            bar.update(len(batch))
            bar.set_postfix(done=summary.done, uploading=len(uploader.in_flight()), skipped=len(summary.skipped),
                            failed=len(summary.failed))
        if not dry_run:
            _count(summary, *uploader.flush())
    finally:
        uploader.close()
        bar.close()
        if claims is not None and not dry_run:
            claims.release_all()
    for stage, seconds in uploader.seconds.items():
        if seconds:
            summary.add_time(stage, seconds)
    summary.seconds = time.monotonic() - started
    return summary


def _count(summary: PrelabelSummary, stored: list, skipped: list, failed: dict) -> None:
    summary.done += len(stored)
    summary.skipped.update({t: "already predicted (found just before upload)" for t in skipped})
    summary.failed.update(failed)


def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="task", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, desc="prelabel")


# -- command line ----------------------------------------------------------------------------------------


def parse_task_ids(text: str) -> list[int]:
    """'1,2,5-9' -> [1, 2, 5, 6, 7, 8, 9]."""
    ids: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            if dash:
                if int(high) < int(low):
                    raise ValueError
                ids.extend(range(int(low), int(high) + 1))
            else:
                ids.append(int(low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad task id or range {part!r} (expected e.g. 1,2,5-9)") from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend.prelabel",
        description="Store a GEM prediction for every task of a Label Studio project that lacks one of the current "
                    "model version. Settings come from the environment (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
                    "GEM_*), as for the server.")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--only-unlabeled", action="store_true", help="only tasks without annotations")
    parser.add_argument("--task-ids", type=parse_task_ids, help="only these tasks: comma list and ranges, e.g. 1,2,5-9")
    parser.add_argument("--limit", type=int, help="at most this many tasks (after the filters)")
    parser.add_argument("--batch-tasks", type=int, help="tasks per pipeline call (default 4 x GEM_BATCH_SIZE)")
    parser.add_argument("--upload-chunk", type=int, default=100, help="predictions per upload call (default 100)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be predicted and skipped; load no model, store nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (cron jobs)")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run on Ray (pip install -r requirements-ray.txt): no ADDRESS starts a local Ray, "
                             "'auto' joins this machine's cluster, ray://host:10001 a remote one (docs/SCALING.md)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="with --ray: model workers (default: one per GPU of the cluster, 1 without GPUs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.limit is not None and args.limit < 0:
        print("error: --limit must be >= 0", file=sys.stderr)
        return 2
    if args.workers is not None and (args.workers < 1 or args.ray is None):
        print("error: --workers needs --ray and must be >= 1", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        if args.ray is not None and not args.dry_run:
            # Imported here only: the plain command and the server never load Ray.
            from .prelabel_ray import RayOptions, run_prelabel_on_ray
            options = RayOptions.from_settings(settings, args.ray, args.workers, upload_chunk=args.upload_chunk)
            summary = run_prelabel_on_ray(settings, args.project, options, only_unlabeled=args.only_unlabeled,
                                          task_ids=args.task_ids, limit=args.limit, progress=not args.no_progress)
        else:
            summary = run_prelabel(settings, args.project, only_unlabeled=args.only_unlabeled,
                                   task_ids=args.task_ids, limit=args.limit, dry_run=args.dry_run,
                                   batch_tasks=args.batch_tasks, upload_chunk=args.upload_chunk,
                                   progress=not args.no_progress)
    except (SettingsError, LabelStudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: predictions uploaded so far are kept; run again to continue", file=sys.stderr)
        return 130
    except Exception as exc:   # a config GEM cannot serve, a model that does not load: one clear line
        from .label_config import LabelConfigError
        from .pipeline import RequestLimitError
        if isinstance(exc, (LabelConfigError, RequestLimitError)):
            print(f"error: project {args.project}: {exc}", file=sys.stderr)
            return 2
        raise
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
