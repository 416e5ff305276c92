"""Which tasks a human should label next: uncertain ones, and not near-duplicates of each other.

"Least confident first" alone picks the same hard case again and again (ten photos of one dim
corner teach little more than one). `select_diverse` combines the task score with diversity, in
the spirit of two published batch active-learning methods:

- Zhdanov 2019, "Diverse mini-batch Active Learning" (arXiv:1901.05954): pre-filter the
  `pool_factor * count` most uncertain candidates, cluster them into `count` clusters, take one
  per cluster.
- Sener & Savarese 2018, "Active Learning for Convolutional Neural Networks: A Core-Set
  Approach" (ICLR): greedy k-center (farthest-first traversal, Gonzalez 1985) on the network's
  embeddings covers the data with few points.

Here: (1) the pool is the `pool_factor * count` lowest-scored candidates; (2) greedy k-center on
their embeddings (cosine distance), starting from the lowest-scored one, gives `count` centres in
the order a farthest-first traversal finds them, so every well-separated group gets a centre
before any group gets a second; (3) every pool member joins its nearest centre; (4) each centre
is replaced by the lowest-scored member of its group. The picks come in traversal order.

Pure numpy; no Label Studio, no model.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = ["POOLINGS", "image_embedding", "k_center_order", "select_diverse"]

POOLINGS = ("mean", "distinct")


def _unit_rows(embeddings) -> np.ndarray:
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise InvalidInputError(f"embeddings must be [N, D], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError("embeddings contain NaN or infinite values")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


def image_embedding(features, pooling: str = "mean", share: float = 0.25) -> np.ndarray:
    """One unit vector [D] for an image from its GEM patch embeddings `features` [h, w, D].

    mean      the mean patch embedding (the whole image; large uniform areas dominate)
    distinct  the mean of the `share` of patches least like that mean: what stands out from the
              image's background (objects), so two photos of one kind of object on different
              backgrounds come out close
    """
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InvalidInputError(f"features must be [h, w, D], got shape {arr.shape}")
    if pooling not in POOLINGS:
        raise InvalidInputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    flat = _unit_rows(arr.reshape(-1, arr.shape[-1]))                 # [N, D]
    mean = flat.mean(axis=0)
    if pooling == "distinct":
        keep = max(1, int(round(share * len(flat))))
        likeness = flat @ (mean / max(float(np.linalg.norm(mean)), 1e-12))
        mean = flat[np.argsort(likeness, kind="stable")[:keep]].mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def k_center_order(embeddings, count: int, start: int = 0) -> list[int]:
    """Greedy k-center: `count` row indexes of `embeddings` [N, D], each the farthest (cosine
    distance) from those already chosen, beginning with `start`. Ties go to the lower index."""
    unit = _unit_rows(embeddings)
    n = len(unit)
    count = min(int(count), n)
    if count <= 0:
        return []
    if not 0 <= start < n:
        raise InvalidInputError(f"start {start} is not a row of {n} embeddings")
    chosen = [int(start)]
    nearest = 1.0 - unit @ unit[start]                                 # [N] distance to the chosen set
    nearest[start] = -np.inf
    while len(chosen) < count:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        np.minimum(nearest, 1.0 - unit @ unit[pick], out=nearest)
        nearest[chosen] = -np.inf
    return chosen


def select_diverse(scores: Sequence[float], embeddings, count: int, pool_factor: float = 4.0) -> list[int]:
    """Indexes of `count` candidates to label next, most useful first (module docstring).

    scores       [N] task scores, 0..1, lower = needs a human more
    embeddings   [N, D] one image embedding per candidate (e.g. its mean GEM patch embedding)
    pool_factor  how many times `count` of the lowest-scored candidates are considered (>= 1;
                 1 = lowest score first, large = diversity alone)
    """
    scores = np.asarray(scores, dtype=np.float64)
    unit = _unit_rows(embeddings)
    if scores.ndim != 1 or len(scores) != len(unit):
        raise InvalidInputError(f"{scores.shape} scores for {len(unit)} embeddings")
    if not np.isfinite(scores).all():
        raise InvalidInputError("scores contain NaN or infinite values")
    if not (isinstance(pool_factor, (int, float)) and math.isfinite(pool_factor) and pool_factor >= 1):
        raise InvalidInputError(f"pool_factor must be a number >= 1, got {pool_factor!r}")
    count = min(int(count), len(scores))
    if count <= 0:
        return []
    by_score = np.argsort(scores, kind="stable")                      # lowest first, ties by index
    pool = by_score[:min(len(scores), max(count, int(math.ceil(pool_factor * count))))]
    centres = k_center_order(unit[pool], count, start=0)              # pool[0] is the lowest-scored
    group = np.argmax(unit[pool] @ unit[pool][centres].T, axis=1)     # [P] nearest centre of each member
    group[centres] = np.arange(len(centres))    # a centre leads its own group, even with a duplicate
    picks = []
    for g in range(len(centres)):
        members = np.flatnonzero(group == g)
        best = members[np.argmin(scores[pool][members])]          # the first of equal scores
        picks.append(int(pool[best]))
    return picks
