"""Pre-label a whole Label Studio project from a terminal or a cron job.

    python -m backend.prelabel --project 3 [--only-unlabeled] [--task-ids 1,2,5-9] [--limit N] [--dry-run]

Reads LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and every GEM_* setting from the environment, like
the server. Streams the project's tasks page by page (paged by task id: labelling during the run
neither skips a task nor lists one twice), skips those that already hold a prediction of the
current model version or that someone else is computing (claims in MODEL_DIR, shared with the
server), runs the rest in batches through the server's `PredictionPipeline`, and uploads the
predictions in chunks. Stopping and running it again never stores a task twice.
Exit status: 0 when every task is done or skipped; 1 when some failed, or Label Studio stopped
answering during the run (the summary says what was done); 2 on a usage or setup error (Label
Studio unreachable at the start included); 130 when interrupted.
`--ray [ADDRESS] [--workers N]` runs the same stages on a Ray cluster (backend/prelabel_ray.py,
imported only then; docs/SCALING.md). The stages themselves live in backend/stages.py.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from typing import Any, Iterable, Sequence

from .ls_client import LabelStudioClient, LabelStudioError
from .memory import tune_allocator
from .pipeline import PredictionPipeline, compute_model_version, versioned
from .settings import Settings, SettingsError
# The stages live in backend/stages.py (shared with the Ray runner); they are named here too, so that
# `from backend.prelabel import select_tasks, ...` keeps working.
from .stages import (ALREADY_PREDICTED, HELD_ELSEWHERE, PAGE_SIZE, Payload, PredictionUploader,  # noqa: F401
                     PrelabelSummary, RunClaims, learned_for, predict_tasks, progress_bar, select_tasks,
                     split_done, stopped_reason)

logger = logging.getLogger("backend.prelabel")


# -- the run -------------------------------------------------------------------------------------------


def run_prelabel(settings: Settings, project: int, *, only_unlabeled: bool = False,
                 task_ids: Iterable[int] | None = None, limit: int | None = None, dry_run: bool = False,
                 batch_tasks: int | None = None, upload_chunk: int = 100, progress: bool = True,
                 client: LabelStudioClient | None = None, pipeline: PredictionPipeline | None = None,
                 claims: Any = None, page_size: int | None = None) -> PrelabelSummary:
    """Predict and store every selected task of `project` that lacks a prediction of this model version.

    `client`/`pipeline` default to ones built from `settings` (the pipeline loads the model unless
    `dry_run`); `claims` (a ClaimStore) to MODEL_DIR's claims file. Raises LabelStudioError when
    Label Studio cannot be reached at the start (a setup error); when it stops answering later, the
    run stops and the summary says so (`summary.stopped`, exit status 1), with what was done.
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
    run_claims = None
    if not dry_run:
        if pipeline is None:
            logger.info("loading model %s (%s) on %s", settings.model_name, settings.pretrained, settings.device)
            pipeline = PredictionPipeline.from_settings(settings)
        job = pipeline.prepare(plan, project=project, learned=learned)
        version = job.model_version
        run_claims = (RunClaims(claims, version, project) if claims is not None
                      else RunClaims.from_settings(settings, version, project))
    uploader = PredictionUploader(client, project, chunk=upload_chunk,
                                  on_finished=run_claims.finished if run_claims else None)
    batch_tasks = batch_tasks or max(settings.batch_size * 4, 16)

    bar = progress_bar(total, progress)
    try:
        tasks = select_tasks(client, project, only_unlabeled=only_unlabeled, task_ids=task_ids, limit=limit,
                             page_size=page_size or PAGE_SIZE)
        while True:
            t0 = time.perf_counter()
            try:
                batch = list(itertools.islice(tasks, batch_tasks))
            except LabelStudioError as exc:
                # Past the start this is a failed run with its summary (exit 1), not a setup error.
                summary.stopped = stopped_reason(exc)
                logger.error("project %s: %s", project, summary.stopped)
                break
            finally:
                summary.add_time("ls_read", time.perf_counter() - t0)
            if not batch:
                break
            summary.seen += len(batch)
            todo, done = split_done(batch, version)
            summary.skipped.update({t["id"]: ALREADY_PREDICTED for t in done})
            if dry_run:
                summary.done += len(todo)
                bar.update(len(batch))
                continue
            held = run_claims.take(t["id"] for t in todo)   # type: ignore[union-attr]
            summary.skipped.update({t["id"]: HELD_ELSEWHERE for t in todo if t["id"] not in held})
            todo = [t for t in todo if t["id"] in held]
            try:
                payloads, failures, timings = predict_tasks(pipeline, job, todo)  # type: ignore[arg-type]
            except BaseException:
                run_claims.give_back(t["id"] for t in todo)   # type: ignore[union-attr]
                raise
            for stage, seconds in timings.items():
                summary.add_time(stage, seconds)
            summary.failed.update(failures)
            run_claims.give_back(failures)   # type: ignore[union-attr]   (uploaded ones: once stored)
            summary.count_uploads(*uploader.add(payloads))
            bar.update(len(batch))
            bar.set_postfix(done=summary.done, uploading=len(uploader.in_flight()), skipped=len(summary.skipped),
                            failed=len(summary.failed))
    finally:
        # Computed predictions are stored even when the run stops (Ctrl-C, an error): close() waits for them.
        summary.count_uploads(*uploader.close())
        bar.close()
        if run_claims is not None:
            run_claims.close()
    for stage, seconds in uploader.seconds.items():
        if seconds:
            summary.add_time(stage, seconds)
    summary.seconds = time.monotonic() - started
    return summary


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
    # The same allocator settings as the servers, before the model allocates anything (a run over a
    # whole project is as long as a server's day): see backend/memory.py. The Ray workers get them
    # from the job's environment (backend/prelabel_ray.py).
    tune_allocator()
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
    return summary.exit_status


if __name__ == "__main__":
    sys.exit(main())
