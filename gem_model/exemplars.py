"""A label's map on the patch grid, from text, learned prototypes and visual exemplars.

Every prediction path builds a label's map here, on the model's patch grid, before the map is
upsampled (and PAMR-refined) to the working resolution by `HeatmapPredictor.upsample`:

1. Text. The label's text map is the max over its prompts' cosine maps (none when the label has
   no text in this call, e.g. an exemplar-only interactive call).
2. Learned state. With a project's `LearnedMaps`, the text maps are blended with the project's
   prototypes and shifted by the calibrated offsets (gem_model/learning.py).
3. Exemplars. An example box or click of the label on THIS image gives positive vectors (the mean
   GEM embedding of the half of a box's patches least like the background, which drops the
   ground at the corners of a box around a round object; the embedding of a clicked patch). The exemplar evidence at a
   patch is the margin `max_k cos(x, positive_k) - max(cos(x, background), max_j cos(x, negative_j))`
   where background is the mean embedding of the patches no exemplar touches: positive where the
   patch looks more like an example than like the rest of the image or any negative example.
   Like learned prototypes it sits on the similarity floor, `floor + margin`, so it keeps the
   units of a cosine map, and blends with the text part as `(1 - w) * text + w * exemplar`,
   `w = n / (n + TEXT_WEIGHT)` for n positive exemplars: one example box and a typed prompt weigh
   one half each; three boxes outweigh the text 3:1.
4. Negatives (an Alt-click, or a box of a label configured as negative) suppress: where a patch
   is nearer a negative than any positive and the background, its map is pushed below the floor
   by that distance, so look-alikes of the negative drop out of every label they concern.

Nothing here knows where the exemplars came from: boxes and points are fractions of the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import InvalidInputError
from .learning import mean_embedding

__all__ = ["TEXT_WEIGHT", "Exemplar", "ExemplarVectors", "build_label_maps", "exemplar_coverage",
           "exemplar_vectors"]

TEXT_WEIGHT = 1.0      # the text counts as this many exemplars when both shape a label's map
MIN_COVERAGE = 0.5     # a patch is inside an example box when at least half of it is


@dataclass(frozen=True)
class Exemplar:
    """One example on an image: a box (x0, y0, x1, y1) or a point (x, y), as fractions 0..1 of the
    image's width and height. `label` None: a negative for every label of the call."""
    label: Optional[str]
    positive: bool = True
    box: Optional[tuple[float, float, float, float]] = None
    point: Optional[tuple[float, float]] = None

    def __post_init__(self):
        if (self.box is None) == (self.point is None):
            raise InvalidInputError("an exemplar is either a box or a point")
        values = self.box if self.box is not None else self.point
        if not all(np.isfinite(v) for v in values):
            raise InvalidInputError(f"exemplar coordinates must be finite, got {values}")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (x1 > x0 and y1 > y0):
                raise InvalidInputError(f"an exemplar box needs x1 > x0 and y1 > y0, got {self.box}")


def _overlap(start: float, stop: float, cells: int) -> np.ndarray:
    """[cells] fraction of each unit cell i ([i, i+1)) that [start, stop) covers."""
    edges = np.arange(cells, dtype=np.float64)
    return np.clip(np.minimum(stop, edges + 1) - np.maximum(start, edges), 0.0, 1.0)


def exemplar_coverage(exemplar: Exemplar, grid: tuple[int, int]) -> np.ndarray:
    """float32 [h, w]: the fraction of each grid cell inside the box, or 1 on the clicked cell."""
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise InvalidInputError(f"grid must be positive, got {grid}")
    if exemplar.point is not None:
        x, y = exemplar.point
        out = np.zeros((h, w), dtype=np.float32)
        out[min(h - 1, max(0, int(y * h))), min(w - 1, max(0, int(x * w)))] = 1.0
        return out
    x0, y0, x1, y1 = exemplar.box
    return np.outer(_overlap(y0 * h, y1 * h, h), _overlap(x0 * w, x1 * w, w)).astype(np.float32)


@dataclass
class ExemplarVectors:
    """The vectors the exemplars of one image give: per label positives and negatives [n, D],
    negatives for every label [m, D], and the background (mean of untouched patches) [D]."""
    positives: dict[str, np.ndarray]
    negatives: dict[str, np.ndarray]
    shared_negatives: np.ndarray
    background: Optional[np.ndarray]

    def count(self, label: str) -> int:
        return len(self.positives.get(label, ()))


def exemplar_vectors(features: np.ndarray, exemplars: Sequence[Exemplar]) -> ExemplarVectors:
    """Vectors of the exemplars on a feature grid [h, w, D] (L2-normalised patch embeddings)."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise InvalidInputError(f"features must be [h, w, D], got shape {features.shape}")
    grid = features.shape[:2]
    touched = np.zeros(grid, dtype=np.float32)
    positives: dict[str, list[np.ndarray]] = {}
    negatives: dict[str, list[np.ndarray]] = {}
    shared: list[np.ndarray] = []
    coverages = [exemplar_coverage(exemplar, grid) for exemplar in exemplars]
    for coverage in coverages:
        np.maximum(touched, coverage, out=touched)
    free = touched <= 0.0
    if not free.any():
        free = touched < MIN_COVERAGE
    background = mean_embedding(features, free.astype(np.float32), MIN_COVERAGE) if free.any() else None
    for exemplar, coverage in zip(exemplars, coverages):
        if exemplar.box is not None and background is not None:
            coverage = _foreground(features, coverage, background)
        vector = mean_embedding(features, coverage, MIN_COVERAGE)
        if vector is None:      # a box outside the image
            continue
        if exemplar.positive and exemplar.label is not None:
            positives.setdefault(exemplar.label, []).append(vector)
        elif exemplar.label is None:
            shared.append(vector)
        else:
            negatives.setdefault(exemplar.label, []).append(vector)
    dim = features.shape[2]
    return ExemplarVectors(
        positives={k: np.stack(v) for k, v in positives.items()},
        negatives={k: np.stack(v) for k, v in negatives.items()},
        shared_negatives=np.stack(shared) if shared else np.zeros((0, dim), np.float32),
        background=background)


def _foreground(features: np.ndarray, coverage: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The box's coverage without its patches most like the background: a box around a disc also
    holds the ground at its corners, which would pull the example towards everything else. Of the
    patches inside, the half least similar to the background mean is kept (boxes of 4+ patches)."""
    inside = coverage >= MIN_COVERAGE
    if inside.sum() < 4:
        return coverage
    likeness = features[inside] @ background
    keep = np.zeros_like(inside)
    keep[inside] = likeness <= np.median(likeness)
    return np.where(keep, coverage, 0.0).astype(np.float32)


def build_label_maps(features: Optional[np.ndarray], labels: Sequence[str],
                     text_maps: Mapping[str, np.ndarray], floor: float, learned=None,
                     exemplars: Optional[ExemplarVectors] = None) -> np.ndarray:
    """[L, h, w] maps on the patch grid for `labels`, in order (module docstring, steps 1-4).

    features   [h, w, D] GEM patch embeddings (None: text only)
    text_maps  label -> [h, w] text map (max over its prompts); labels without text are absent
    floor      the similarity floor (RegionConfig.min_similarity): the zero of the visual margins
    learned    a `gem_model.learning.LearnedMaps` applied to the labels that have text, or None
    exemplars  `exemplar_vectors(...)` of this image, or None
    A label with neither text nor a positive exemplar gets a map just below the floor (nothing).
    """
    labels = list(labels)
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        grid = features.shape[:2]
    elif text_maps:
        grid = np.shape(next(iter(text_maps.values())))
    else:
        raise InvalidInputError("a label map needs text maps or the image's features")
    if features is None and (learned is not None or exemplars is not None):
        raise InvalidInputError("learned maps and exemplars need the image's features")
    out = np.full((len(labels),) + grid, floor - 1.0, dtype=np.float32)
    with_text = [label for label in labels if label in text_maps]
    if with_text:
        stacked = np.stack([np.asarray(text_maps[label], dtype=np.float32) for label in with_text])
        if stacked.shape[1:] != grid:
            raise InvalidInputError(f"text maps are {stacked.shape[1:]} on a {grid} feature grid")
        if learned is not None:
            stacked = learned.heatmaps(features, stacked, with_text, floor)
        for label, plane in zip(with_text, stacked):
            out[labels.index(label)] = plane
    if exemplars is None:
        return out
    flat = features.reshape(-1, features.shape[2])
    background = flat @ exemplars.background if exemplars.background is not None else None
    shared = (flat @ exemplars.shared_negatives.T).max(axis=1) if len(exemplars.shared_negatives) else None
    for index, label in enumerate(labels):
        positive = exemplars.positives.get(label)
        near_positive = (flat @ positive.T).max(axis=1) if positive is not None else None
        against = [v for v in (background, shared) if v is not None]
        own = exemplars.negatives.get(label)
        near_negative = shared
        if own is not None:
            own_sim = (flat @ own.T).max(axis=1)
            against.append(own_sim)
            near_negative = own_sim if shared is None else np.maximum(shared, own_sim)
        if near_positive is not None:
            if not against:     # the examples cover the whole image: nothing to compare with
                against = [np.full_like(near_positive, float(np.median(near_positive)))]
            margin = (near_positive - np.max(np.stack(against), axis=0)).reshape(grid)
            n = len(positive)
            weight = n / (n + TEXT_WEIGHT) if label in text_maps else 1.0
            out[index] = (1.0 - weight) * out[index] + weight * (floor + margin)
        if near_negative is not None:
            rivals = [v for v in (near_positive, background) if v is not None]
            rival = np.max(np.stack(rivals), axis=0) if rivals else np.full_like(near_negative, -1.0)
            lead = (near_negative - rival).reshape(grid)
            out[index] = np.where(lead > 0, np.minimum(out[index], floor - lead), out[index])
    return out
