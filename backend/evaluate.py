"""How much do the pre-annotations save? Compare a project's stored predictions with its annotations.

    python -m backend.evaluate --project 3 [--model-version gem-...] [--json report.json]

Reads every annotated task of the project from Label Studio (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY;
paginated), takes each task's newest submitted annotation and the prediction it started from (else
the task's newest prediction, of `--model-version` when given), and reports per control and label:

- IoU of the predicted and annotated masks (sums over the tasks: intersection / union);
- region precision and recall: a predicted region is correct when an annotated region of its label
  overlaps it with IoU >= 0.5 (one-to-one, greedy by IoU);
- what the annotators did with the predicted regions: kept (IoU >= 0.95 with an annotated region),
  changed (0.1 <= IoU < 0.95), deleted (IoU < 0.1 with every annotated region of the label), and how
  many regions they added (annotated regions no prediction overlaps with IoU >= 0.1).

No image is downloaded: result items carry the size they were drawn at.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .decode import REGION_TYPES, ResultRegion, item_size, result_regions

logger = logging.getLogger(__name__)

MATCH_IOU = 0.5
KEPT_IOU = 0.95
TOUCH_IOU = 0.1


@dataclass
class LabelStats:
    control: str
    label: str
    tasks: int = 0
    intersection: int = 0
    union: int = 0
    predicted: int = 0        # predicted regions
    annotated: int = 0        # annotated regions
    matched: int = 0          # pairs with IoU >= MATCH_IOU
    kept: int = 0
    changed: int = 0
    deleted: int = 0
    added: int = 0

    @property
    def iou(self) -> float | None:
        return self.intersection / self.union if self.union else None

    @property
    def precision(self) -> float | None:
        return self.matched / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.annotated if self.annotated else None

    def as_dict(self) -> dict:
        return {**asdict(self), "iou": self.iou, "precision": self.precision, "recall": self.recall}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _size(results: Iterable[Any]) -> tuple[int, int] | None:
    for item in results or ():
        if isinstance(item, Mapping) and REGION_TYPES.get(str(item.get("type", "")).lower()):
            size = item_size(item)
            if size:
                return size
    return None


def compare_task(predicted_results: Sequence[Any], annotated_results: Sequence[Any],
                 stats: dict[tuple[str, str], LabelStats]) -> None:
    """Add one task's comparison to `stats` ((control, label) -> LabelStats)."""
    size = _size(annotated_results) or _size(predicted_results)
    if size is None:
        return
    height, width = size
    predicted = result_regions(predicted_results, height, width)
    annotated = result_regions(annotated_results, height, width)
    groups: dict[tuple[str, str], tuple[list[ResultRegion], list[ResultRegion]]] = {}
    for region in predicted:
        groups.setdefault((region.from_name, region.label), ([], []))[0].append(region)
    for region in annotated:
        groups.setdefault((region.from_name, region.label), ([], []))[1].append(region)
    for key, (preds, truths) in groups.items():
        s = stats.setdefault(key, LabelStats(control=key[0], label=key[1]))
        s.tasks += 1
        pred_mask = np.zeros((height, width), bool)
        true_mask = np.zeros((height, width), bool)
        for r in preds:
            pred_mask |= r.mask
        for r in truths:
            true_mask |= r.mask
        s.intersection += int(np.logical_and(pred_mask, true_mask).sum())
        s.union += int(np.logical_or(pred_mask, true_mask).sum())
        s.predicted += len(preds)
        s.annotated += len(truths)
        ious = np.array([[_iou(p.mask, t.mask) for t in truths] for p in preds]).reshape(len(preds), len(truths))
        # one-to-one matching, greedy by IoU
        used_p, used_t = set(), set()
        for flat in np.argsort(-ious, axis=None):
            i, j = np.unravel_index(flat, ious.shape)
            if ious[i, j] < MATCH_IOU:
                break
            if i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
        s.matched += len(used_p)
        best_for_pred = ious.max(axis=1) if truths else np.zeros(len(preds))
        s.kept += int((best_for_pred >= KEPT_IOU).sum())
        s.changed += int(((best_for_pred >= TOUCH_IOU) & (best_for_pred < KEPT_IOU)).sum())
        s.deleted += int((best_for_pred < TOUCH_IOU).sum())
        best_for_true = ious.max(axis=0) if preds else np.zeros(len(truths))
        s.added += int((best_for_true < TOUCH_IOU).sum())


def pick_pair(task: Mapping[str, Any], model_version: str | None = None) -> tuple[dict | None, dict | None]:
    """(prediction, annotation) to compare for a task: the newest submitted annotation and the
    prediction it started from, else the newest prediction (of `model_version` when given)."""
    annotations = [a for a in task.get("annotations") or () if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not annotations:
        return None, None
    annotation = max(annotations, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))
    predictions = [p for p in task.get("predictions") or () if isinstance(p, Mapping)
                   and (model_version is None or p.get("model_version") == model_version)]
    parent = annotation.get("parent_prediction")
    parent_id = parent.get("id") if isinstance(parent, Mapping) else parent
    chosen = next((p for p in predictions if parent_id is not None and p.get("id") == parent_id), None)
    if chosen is None and predictions:
        chosen = max(predictions, key=lambda p: (str(p.get("created_at") or ""), int(p.get("id") or 0)))
    return chosen, annotation


def evaluate_tasks(tasks: Iterable[Mapping[str, Any]], model_version: str | None = None,
                   progress_every: int = 50) -> tuple[list[LabelStats], dict]:
    stats: dict[tuple[str, str], LabelStats] = {}
    counts = {"tasks": 0, "annotated": 0, "compared": 0, "without_prediction": 0}
    for task in tasks:
        counts["tasks"] += 1
        prediction, annotation = pick_pair(task, model_version)
        if annotation is None:
            continue
        counts["annotated"] += 1
        if prediction is None:
            counts["without_prediction"] += 1
            continue
        counts["compared"] += 1
        compare_task(prediction.get("result") or [], annotation.get("result") or [], stats)
        if progress_every and counts["tasks"] % progress_every == 0:
            logger.info("evaluated %d tasks (%d compared)", counts["tasks"], counts["compared"])
    return sorted(stats.values(), key=lambda s: (s.control, s.label)), counts


def markdown(rows: Sequence[LabelStats], counts: Mapping[str, int]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}"
    lines = [f"{counts['compared']} tasks compared ({counts['annotated']} annotated, "
             f"{counts['without_prediction']} of them without a prediction to compare)", "",
             "| Control | Label | Tasks | IoU | Region precision | Region recall | Predicted | Kept | Changed "
             "| Deleted | Added |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s.control} | {s.label} | {s.tasks} | {f(s.iou)} | {f(s.precision)} | {f(s.recall)} | "
                     f"{s.predicted} | {s.kept} | {s.changed} | {s.deleted} | {s.added} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="Label Studio project id")
    parser.add_argument("--model-version", default=None, help="only predictions of this model version")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from .learning import source_for
    from .prompts import project_key
    from .settings import command_settings

    settings = command_settings()
    if settings is None:
        return 2
    source = source_for(settings)
    if source is None:
        print("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read the project", file=sys.stderr)
        return 2
    project = project_key(args.project)
    tasks = source.client.iter_tasks(int(project))          # page by page, annotations and predictions included
    rows, counts = evaluate_tasks(tasks, args.model_version)
    print(markdown(rows, counts))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"project": project, "model_version": args.model_version, **counts,
                       "labels": [s.as_dict() for s in rows]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
