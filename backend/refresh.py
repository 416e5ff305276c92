"""Which tasks a refresh after learning predicts again, and in what order (docs/LEARNING.md).

When a project's learned version changes, every stored prediction of the project is stale, and
so is its score, by which the Data Manager sorts. The background finisher (backend/background.py)
then lists the project's unlabeled tasks page by page and keeps, in bounded memory, the
GEM_REFRESH_MAX_TASKS with the lowest current score: the score of the task's latest prediction
(highest id) as Label Studio holds it. Tasks without a scored prediction come after every scored
one: a refresh renews the pre-annotations that exist; a task never predicted is not stale, and
is predicted only when the bound leaves room. Tasks already holding a prediction of the new
version, or already in the outbox for it, are left out.
"""
from __future__ import annotations

import heapq
import math
from typing import Any, Iterable, Mapping

from .ls_client import task_prediction_versions


def latest_score(task: Mapping[str, Any]) -> float | None:
    """The score of the task's latest prediction (highest id), None when it has none or no score."""
    predictions = [p for p in task.get("predictions") or () if isinstance(p, Mapping)]
    if not predictions:
        return None
    latest = max(predictions, key=lambda p: p.get("id") if isinstance(p.get("id"), int) else -1)
    score = latest.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return float(score)


class RefreshPicker:
    """Keeps the `limit` tasks that come first in refresh order among the tasks offered to it.

    Memory: `limit` tasks (id and data only), however many are listed."""

    def __init__(self, limit: int, model_version: str):
        self.limit = max(0, int(limit))
        self.model_version = model_version
        self._heap: list[tuple[tuple, dict]] = []   # (negated order key, task): the worst kept on top
        self.listed = 0
        self.labelled = 0          # listed although labelled (Label Studio's filter missed them)
        self.current = 0           # already hold a prediction of the new version, or are queued for it
        self.unscored = 0          # candidates without a scored prediction
        self.candidates = 0

    def offer(self, task: Mapping[str, Any], queued: bool = False) -> None:
        """Consider a task as Label Studio lists it (fields=all); `queued`: already in the outbox for the version."""
        self.listed += 1
        tid = task.get("id")
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if task.get("total_annotations") or task.get("annotations"):
            self.labelled += 1
            return
        if queued or self.model_version in task_prediction_versions(task):
            self.current += 1
            return
        self.candidates += 1
        score = latest_score(task)
        if score is None:
            self.unscored += 1
        key = (1, 0.0, tid) if score is None else (0, score, tid)
        entry = (tuple(-k for k in key), {"id": tid, "data": task.get("data")})
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, entry)
        elif self._heap and entry[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def offer_all(self, tasks: Iterable[Mapping[str, Any]], queued: set[str] = frozenset()) -> None:
        for task in tasks:
            self.offer(task, str(task.get("id")) in queued)

    def picked(self) -> list[dict]:
        """The kept tasks ({"id", "data"}), lowest score first, unscored last, then by id."""
        return [task for _, task in sorted(self._heap, reverse=True)]

    @property
    def left_out(self) -> int:
        """Candidates beyond the bound."""
        return self.candidates - len(self._heap)
