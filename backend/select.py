"""Pick the next tasks worth a human, and open them in Label Studio as one tab.

    python -m backend.select --project 3 --count 20 [--pool-factor 4] [--no-view | --dry-run]

Reads the project's unlabeled tasks through the backend's Label Studio client (paged by task
id), takes each task's score from its newest prediction of the current model version, else its
newest prediction (an older version's score, counted as stale), else computes it with the
server's pipeline. A computed prediction is stored in Label Studio (unless `--no-view`), under the
claims the server and the other commands use, so the tab can order it by score and the next
Retrieve Predictions skips it. The `--pool-factor x count` lowest-scored tasks
are embedded (the mean GEM patch embedding of their images) and `gem_model.selection.select_diverse`
picks `count` of them: uncertain, and not near-duplicates of one another (docs/LEARNING.md).

The picks become one Data Manager tab of the project, "GEM: next to label" (created, or updated
when it exists; other tabs are left alone), that shows exactly those tasks (a filter `ID = a OR
ID = b ...`), lowest prediction score first; its URL is printed. With `--no-view` (or
`--dry-run`) nothing is written to Label Studio: the ids are printed only.

A task whose image cannot be fetched or encoded is left out (logged, listed in the summary) and
the next one takes its place. Exit status: 0 picks made (fewer than asked when the project has
fewer unlabeled tasks); 1 some tasks failed, or the tab could not be saved; 2 a usage or setup
error (Label Studio unreachable, a config GEM cannot serve).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .ls_client import LabelStudioClient, LabelStudioError
from .pipeline import PredictionPipeline, TaskError
from .settings import Settings, SettingsError
from .stages import PAGE_SIZE, PredictionUploader, RunClaims, learned_for, predict_tasks, select_tasks, stopped_reason

logger = logging.getLogger("backend.select")

VIEW_TITLE = "GEM: next to label"
SCORE_BATCH = 16              # tasks per pipeline call when scores must be computed


@dataclass
class Candidate:
    task: dict
    score: float
    source: str               # "current" (a prediction of this model version), "stale" or "computed"


@dataclass
class SelectSummary:
    """What a run did: the picks (task ids, most useful first) with their scores, and why tasks were left out."""
    project: int
    model_version: str
    requested: int
    picks: list[int] = field(default_factory=list)
    scores: dict[int, float] = field(default_factory=dict)
    unlabeled: int = 0
    sources: dict[str, int] = field(default_factory=dict)     # current / stale / computed -> tasks
    embedded: int = 0
    stored: int = 0           # computed predictions stored in Label Studio
    failed: dict[Any, str] = field(default_factory=dict)
    store_failed: dict[Any, str] = field(default_factory=dict)   # computed, scored, but not stored
    view_id: int | None = None
    view_url: str = ""
    view_error: str = ""
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def exit_status(self) -> int:
        return 0 if not (self.failed or self.store_failed or self.view_error or self.stopped) else 1

    def lines(self) -> list[str]:
        sources = ", ".join(f"{n} {k}" for k, n in sorted(self.sources.items())) or "none"
        out = [f"project {self.project}, model version {self.model_version}: {self.unlabeled} unlabeled tasks "
               f"(scores: {sources}), {self.embedded} embedded, {len(self.picks)} of {self.requested} picked, "
               f"{len(self.failed)} failed, in {self.seconds:.1f} s"]
        if self.stopped:
            out.append(f"  stopped early: {self.stopped}; the picks are from the tasks read before")
        if self.sources.get("computed"):
            out.append(f"  {self.stored} of the {self.sources['computed']} computed predictions stored in Label Studio"
                       + (f"; {len(self.store_failed)} not stored: " + "; ".join(
                           f"task {t}: {why}" for t, why in list(self.store_failed.items())[:5])
                          if self.store_failed else ""))
        if self.sources.get("stale"):
            out.append(f"  {self.sources['stale']} scores are of an older model version: "
                       "`python -m backend.prelabel --only-unlabeled` refreshes them")
        for task, why in list(self.failed.items())[:20]:
            out.append(f"  failed task {task}: {why}")
        if len(self.failed) > 20:
            out.append(f"  ... and {len(self.failed) - 20} more failed tasks")
        out.append("selected task ids (most useful first): " + ",".join(str(t) for t in self.picks))
        for rank, task in enumerate(self.picks, 1):
            out.append(f"  {rank:>3}. task {task}  score {self.scores[task]:.4f}")
        if self.view_url:
            out.append(f"Label Studio tab {VIEW_TITLE!r}: {self.view_url}")
        if self.view_error:
            out.append(f"  the tab was not saved: {self.view_error}")
        return out


def newest_prediction_score(task: Mapping[str, Any], version: str) -> tuple[float, str] | None:
    """(score, "current" | "stale") of the task's newest prediction of `version`, else of its newest
    prediction of any version; None when it has no prediction with a score."""
    scored = [p for p in task.get("predictions") or () if isinstance(p, Mapping)
              and isinstance(p.get("score"), (int, float)) and math.isfinite(p["score"])]
    if not scored:
        return None

    def newest(predictions):
        return max(predictions, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0))

    current = [p for p in scored if p.get("model_version") == version]
    if current:
        return float(newest(current)["score"]), "current"
    return float(newest(scored)["score"]), "stale"


def view_data(task_ids: Sequence[int], existing: Mapping[str, Any] | None = None) -> dict:
    """The tab's `data`: exactly these tasks (an OR of `ID = id` filters, the only filter on a list
    of ids the Data Manager's UI shows in 1.23), lowest prediction score first. What the user
    changed in an existing tab (hidden columns, widths) is kept."""
    data = {k: v for k, v in dict(existing or {}).items() if k not in ("selectedItems",)}
    data.update({
        "title": VIEW_TITLE,
        "filters": {"conjunction": "or", "items": [
            {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": int(t)}
            for t in task_ids]},
        "ordering": ["tasks:predictions_score"],
    })
    return data


def save_view(client: LabelStudioClient, project: int, task_ids: Sequence[int]) -> tuple[int, str]:
    """Create or update the project's "GEM: next to label" tab; (its id, its URL)."""
    existing = [v for v in client.list_views(project)
                if isinstance(v.get("data"), Mapping) and v["data"].get("title") == VIEW_TITLE]
    view = existing[0] if existing else None
    saved = client.save_view(project, view_data(task_ids, view["data"] if view else None),
                             view_id=view["id"] if view else None)
    view_id = int((saved or {}).get("id") or (view or {}).get("id"))
    return view_id, f"{client.url}/projects/{int(project)}/data?tab={view_id}"


def run_select(settings: Settings, project: int, count: int, *, pool_factor: float | None = None,
               write_view: bool = True, client: LabelStudioClient | None = None,
               pipeline: PredictionPipeline | None = None, page_size: int | None = None,
               store: bool | None = None) -> SelectSummary:
    """Pick `count` unlabeled tasks of `project` (module docstring). `client` / `pipeline` default to
    ones built from `settings` (the pipeline loads the model). `store` (default: `write_view`)
    stores the predictions computed for tasks without a score. Raises LabelStudioError when Label
    Studio cannot be reached at the start, LabelConfigError for a config GEM cannot serve."""
    from gem_model.selection import select_diverse

    from .label_config import parse_label_config

    started = time.monotonic()
    pool_factor = settings.select_pool_factor if pool_factor is None else pool_factor
    client = client or LabelStudioClient.from_settings(settings)
    info = client.get_project(project)
    plan = parse_label_config(info.get("label_config") or "", settings.outputs)
    learned = learned_for(settings, project)
    if pipeline is None:
        logger.info("loading model %s (%s) on %s", settings.model_name, settings.pretrained, settings.device)
        pipeline = PredictionPipeline.from_settings(settings)
    job = pipeline.prepare(plan, project=project, learned=learned)
    version = job.model_version            # what the server stores for this project now
    summary = SelectSummary(project=project, model_version=version, requested=count)

    # 1. Scores of every unlabeled task (labelled ones are never listed).
    candidates: list[Candidate] = []
    unscored: list[dict] = []
    store = write_view if store is None else store
    # What is computed is stored, as a Retrieve would: only the tasks this run claims (another
    # holder computing a task stores it), and the uploader checks Label Studio right before storing.
    claims = RunClaims.from_settings(settings, version, project, "select") if store else None
    uploader = (PredictionUploader(client, project, on_finished=claims.finished) if claims is not None else None)

    def collect(finished: tuple[list, list, dict]) -> None:
        stored, _skipped, failures = finished
        summary.stored += len(stored)
        summary.store_failed.update(failures)

    def score_missing() -> None:
        mine = claims.take([t["id"] for t in unscored]) if claims is not None else set()
        payloads, failures, _ = predict_tasks(pipeline, job, unscored)
        by_id = {t["id"]: t for t in unscored}
        for payload in payloads:
            candidates.append(Candidate(by_id[payload["task"]], float(payload["score"]), "computed"))
        summary.failed.update(failures)
        if claims is not None:
            claims.give_back([t for t in failures if t in mine])
            collect(uploader.add([p for p in payloads if p["task"] in mine]))
        unscored.clear()

    try:
        try:
            for listed in select_tasks(client, project, only_unlabeled=True, page_size=page_size or PAGE_SIZE):
                summary.unlabeled += 1
                known = newest_prediction_score(listed, version)
                # Only what predicting and embedding need is kept: a listed task carries its predictions
                # (brush RLE and all), which over a project of 40k tasks would be gigabytes.
                task = {k: listed[k] for k in ("id", "data", "project") if k in listed}
                if known is None:
                    unscored.append(task)
                    if len(unscored) >= SCORE_BATCH:
                        score_missing()
                else:
                    candidates.append(Candidate(task, known[0], known[1]))
                if summary.unlabeled % 500 == 0:
                    logger.info("project %s: %d unlabeled tasks read, %d scored", project, summary.unlabeled,
                                len(candidates))
        except LabelStudioError as exc:
            summary.stopped = stopped_reason(exc)
            logger.error("project %s: %s", project, summary.stopped)
        if unscored:
            score_missing()
    finally:
        if uploader is not None:
            collect(uploader.close())       # everything computed is stored (or its failure said) first
            claims.close()
    if summary.stored:
        logger.info("project %s: %d computed predictions stored", project, summary.stored)
    for candidate in candidates:
        summary.sources[candidate.source] = summary.sources.get(candidate.source, 0) + 1
    logger.info("project %s: %d unlabeled tasks, %d scored (%s), %d failed", project, summary.unlabeled,
                len(candidates), summary.sources, len(summary.failed))

    # 2. Embed the lowest-scored pool; a task that cannot be embedded gives its place to the next.
    candidates.sort(key=lambda c: (c.score, c.task["id"]))
    wanted = min(len(candidates), max(count, math.ceil(pool_factor * count))) if count > 0 else 0
    pool: list[Candidate] = []
    vectors = []
    for candidate in candidates:
        if len(pool) >= wanted:
            break
        try:
            vectors.append(pipeline.embed_task(candidate.task, job))
            pool.append(candidate)
        except TaskError as exc:
            summary.failed[candidate.task["id"]] = f"{exc.reason}: {exc}"
            logger.warning("task %s left out: %s", candidate.task["id"], exc)
        except Exception as exc:   # one bad task never sinks the run
            logger.exception("task %s left out", candidate.task["id"])
            summary.failed[candidate.task["id"]] = f"internal: {type(exc).__name__}: {exc}"
        if len(pool) and len(pool) % 50 == 0:
            logger.info("project %s: %d of %d pool tasks embedded", project, len(pool), wanted)
    summary.embedded = len(pool)

    # 3. Uncertain and diverse.
    if pool:
        import numpy as np

        order = select_diverse([c.score for c in pool], np.stack(vectors), count, pool_factor)
        summary.picks = [int(pool[i].task["id"]) for i in order]
        summary.scores = {int(pool[i].task["id"]): pool[i].score for i in order}

    # 4. The tab.
    if write_view and summary.picks:
        try:
            summary.view_id, summary.view_url = save_view(client, project, summary.picks)
        except LabelStudioError as exc:
            summary.view_error = str(exc)
            logger.error("project %s: saving the tab failed: %s", project, exc)
    summary.seconds = time.monotonic() - started
    return summary


# -- command line ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend.select",
        description="Pick the unlabeled tasks of a Label Studio project most worth a human next (low task "
                    "score, and diverse), and show them in a Data Manager tab named "
                    f"{VIEW_TITLE!r}. Settings come from the environment, as for the server.")
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--count", type=int, required=True, help="how many tasks to pick")
    parser.add_argument("--pool-factor", type=float,
                        help="choose among this many times --count of the lowest-scored tasks "
                             "(default GEM_SELECT_POOL_FACTOR; 1 = lowest score first)")
    parser.add_argument("--no-view", action="store_true", help="print the ids only; write nothing to Label Studio")
    parser.add_argument("--dry-run", action="store_true", help="the same as --no-view")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.count < 1:
        print("error: --count must be >= 1", file=sys.stderr)
        return 2
    if args.pool_factor is not None and not (math.isfinite(args.pool_factor) and args.pool_factor >= 1):
        print("error: --pool-factor must be a number >= 1", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
        summary = run_select(settings, args.project, args.count, pool_factor=args.pool_factor,
                             write_view=not (args.no_view or args.dry_run))
    except (SettingsError, LabelStudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no tab written (predictions computed before stay stored)", file=sys.stderr)
        return 130
    except Exception as exc:
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
