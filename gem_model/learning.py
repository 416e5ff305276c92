"""Learning from annotators without training the network: visual prototypes and calibration.

Everything here works on GEM patch embeddings `features [h, w, D]` (L2-normalised, one per ViT
patch), per-label maps on that grid `[L, h, w]` and masks; nothing knows where the masks came
from. Three pieces:

1. Examples. From one annotated image: per label the mean embedding of the patches the annotator
   marked (a positive), the embeddings of regions the annotator deleted from a prediction
   (negatives of their label), and a few k-means centroids of the patches no label claims
   (background).
2. Prototype heatmaps. A label's visual evidence at a patch is its margin
   `max_k cos(x, positive_k) - max_j cos(x, background_j or negative_j)`: positive where the
   patch is closer to an example of the label than to anything known not to be it. It is blended
   with the text map, `(1 - w) * text + w * (floor + margin)`, with `w = n / (n + prior)` for n
   examples: the text decides alone with no examples, and cedes to the examples as they come.
   The margin's zero sits on the similarity floor, so the blend keeps the units of a cosine map
   and `regions.py` treats it like any text map.
3. Calibration. Per label, an offset added to its map (equivalently a per-label similarity
   floor), and the minimum region area, chosen to maximise the IoU of the predicted masks with
   the annotators' masks on the annotated images, each image predicted with prototypes built
   WITHOUT it (leave-one-out, so the fit is not flattered by the image's own examples). With few
   images the choice shrinks to the defaults: among the candidates within a tolerance of the best
   IoU (wider with fewer images) the one closest to the default wins.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import InvalidInputError
from .masks import remove_small_components
from .regions import RegionConfig, assign_semantic, threshold_independent

__all__ = [
    "Calibration", "CalibrationSample", "LabelPrototypes", "LearnedMaps", "PrototypeBank", "TaskExamples",
    "background_vectors", "build_bank", "calibrate", "examples_digest", "grid_coverage", "label_heatmaps",
    "learned_heatmaps", "mean_embedding", "publish_due", "segment_grid", "task_examples",
]

MIN_COVERAGE = 0.5          # a patch belongs to a mask when at least half of it is covered
BACKGROUND_FREE = 0.05      # ... and is background when at most this much of it is claimed
BACKGROUND_CLUSTERS = 4     # background centroids kept per image
MIN_AREA_CANDIDATES = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04)
FLOOR_CANDIDATES = 25       # per-label floors tried (quantiles of the label's map values)


# -------------------------------------------------------------------------------------- masks

def grid_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction (0..1) of each feature-grid cell covered by `mask` (bool [H, W], any size) -> float32 [h, w].

    The grid spans the whole image (the model input is the image resized, never cropped), so cell
    (i, j) covers rows [i*H/h, (i+1)*H/h) and columns [j*W/w, (j+1)*W/w), partially at the edges.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise InvalidInputError(f"mask must be a non-empty [H, W] array, got shape {mask.shape}")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise InvalidInputError(f"grid must be positive, got {grid}")
    rows = _axis_weights(mask.shape[0], h)       # [h, H]: share of pixel row r in cell row i
    cols = _axis_weights(mask.shape[1], w)       # [w, W]
    covered = rows @ mask.astype(np.float32) @ cols.T                    # [h, w] covered pixel area
    area = rows.sum(axis=1)[:, None] * cols.sum(axis=1)[None, :]
    return np.clip(covered / area, 0.0, 1.0).astype(np.float32)


def _axis_weights(size: int, cells: int) -> np.ndarray:
    """[cells, size]: overlap length of pixel k ([k, k+1)) with cell i ([i*size/cells, (i+1)*size/cells))."""
    edges = np.arange(cells + 1, dtype=np.float64) * size / cells
    starts, stops = edges[:-1, None], edges[1:, None]
    pixels = np.arange(size, dtype=np.float64)[None, :]
    return np.clip(np.minimum(stops, pixels + 1) - np.maximum(starts, pixels), 0, None).astype(np.float32)


def _check_features(features) -> np.ndarray:
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise InvalidInputError(f"features must be [h, w, D], got shape {arr.shape}")
    return arr


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------------- examples

def mean_embedding(features: np.ndarray, coverage: np.ndarray,
                   min_coverage: float = MIN_COVERAGE) -> Optional[np.ndarray]:
    """L2-normalised mean of the patches covered at least `min_coverage` (weighted by coverage) -> [D],
    or None when no patch is covered enough. A region smaller than one patch still counts: then its
    best-covered patch is used."""
    features = _check_features(features)
    coverage = np.asarray(coverage, dtype=np.float32)
    if coverage.shape != features.shape[:2]:
        raise InvalidInputError(f"coverage {coverage.shape} does not match the feature grid {features.shape[:2]}")
    weights = np.where(coverage >= min_coverage, coverage, 0.0)
    if not weights.any():
        if coverage.max() <= 0:
            return None
        weights = (coverage == coverage.max()).astype(np.float32)
    total = (features * weights[..., None]).sum(axis=(0, 1))
    return _unit(total)


def background_vectors(features: np.ndarray, claimed: np.ndarray, clusters: int = BACKGROUND_CLUSTERS,
                       seed: int = 0, iterations: int = 10) -> np.ndarray:
    """Centroids [k, D] (k <= clusters) of the patches no label claims (`claimed` coverage <= 5 %).

    Background is many things at once (sky, road, clutter), so it gets a few prototypes, found
    with spherical k-means from a deterministic start (farthest-point seeding)."""
    features = _check_features(features)
    claimed = np.asarray(claimed, dtype=np.float32)
    free = features[claimed <= BACKGROUND_FREE]                          # [n, D]
    if len(free) == 0 or clusters < 1:
        return np.zeros((0, features.shape[2]), dtype=np.float32)
    k = min(clusters, len(free))
    rng = np.random.default_rng(seed)
    centres = [free[rng.integers(len(free))]]
    for _ in range(1, k):                                               # farthest point first
        nearest = np.max(free @ np.stack(centres).T, axis=1)
        centres.append(free[int(np.argmin(nearest))])
    centres = np.stack(centres)
    for _ in range(iterations):
        assign = np.argmax(free @ centres.T, axis=1)
        updated = np.stack([free[assign == j].sum(axis=0) if np.any(assign == j) else centres[j]
                            for j in range(k)])
        updated = _unit(updated)
        if np.allclose(updated, centres, atol=1e-5):
            break
        centres = updated
    return _unit(centres)


@dataclass
class TaskExamples:
    """What one annotated image teaches: per-label positive vectors, negatives, background centroids."""
    key: str                                                          # e.g. the task id
    positives: dict[str, np.ndarray] = field(default_factory=dict)    # label -> [D]
    negatives: dict[str, np.ndarray] = field(default_factory=dict)    # label -> [m, D]
    background: Optional[np.ndarray] = None                           # [k, D]

    @property
    def labels(self) -> set[str]:
        return set(self.positives) | set(self.negatives)


def task_examples(key: str, features: np.ndarray, masks: Mapping[str, np.ndarray],
                  deleted: Mapping[str, Sequence[np.ndarray]] = (), background: bool = True) -> TaskExamples:
    """Examples of one image from its grid coverages.

    masks    label -> coverage [h, w] of everything the annotator marked with that label
    deleted  label -> coverages [h, w] of predicted regions the annotator deleted (negatives)
    """
    features = _check_features(features)
    grid = features.shape[:2]
    claimed = np.zeros(grid, dtype=np.float32)
    positives = {}
    for label, coverage in masks.items():
        coverage = np.asarray(coverage, dtype=np.float32)
        if coverage.shape != grid:
            raise InvalidInputError(f"mask of {label!r} is {coverage.shape} on a {grid} feature grid")
        np.maximum(claimed, coverage, out=claimed)
        vector = mean_embedding(features, coverage)
        if vector is not None:
            positives[label] = vector
    negatives = {}
    for label, coverages in dict(deleted or {}).items():
        vectors = [v for v in (mean_embedding(features, c) for c in coverages) if v is not None]
        if vectors:
            negatives[label] = np.stack(vectors)
    bg = background_vectors(features, claimed) if background else None
    return TaskExamples(key=str(key), positives=positives, negatives=negatives, background=bg)


# ---------------------------------------------------------------------------------- prototypes

@dataclass
class LabelPrototypes:
    positives: np.ndarray      # [n, D]
    negatives: np.ndarray      # [m, D]
    keys: tuple[str, ...] = ()  # the examples the positives came from


@dataclass
class PrototypeBank:
    """Prototype vectors of a project: per label and shared background."""
    labels: dict[str, LabelPrototypes]
    background: np.ndarray     # [k, D]

    def count(self, label: str) -> int:
        item = self.labels.get(label)
        return 0 if item is None else len(item.positives)


def build_bank(examples: Sequence[TaskExamples], max_examples: int = 32,
               exclude: Optional[str] = None) -> PrototypeBank:
    """Bank from examples (oldest first): per label at most `max_examples` of the newest positives
    and of the newest negatives, background from the newest `max_examples` images. `exclude` leaves
    out one image's examples (leave-one-out calibration)."""
    if max_examples < 1:
        raise InvalidInputError(f"max_examples must be >= 1, got {max_examples}")
    examples = [e for e in examples if e.key != exclude]
    positives: dict[str, list[tuple[str, np.ndarray]]] = {}
    negatives: dict[str, list[np.ndarray]] = {}
    for example in examples:
        for label, vector in example.positives.items():
            positives.setdefault(label, []).append((example.key, vector))
        for label, vectors in example.negatives.items():
            negatives.setdefault(label, []).extend(vectors)
    backgrounds = [e.background for e in examples if e.background is not None and len(e.background)]
    dim = _dimension(examples)
    empty = np.zeros((0, dim), dtype=np.float32)
    labels = {}
    for label in set(positives) | set(negatives):
        kept = positives.get(label, [])[-max_examples:]
        labels[label] = LabelPrototypes(
            positives=np.stack([v for _, v in kept]).astype(np.float32) if kept else empty,
            negatives=np.stack(negatives[label][-max_examples:]).astype(np.float32) if label in negatives else empty,
            keys=tuple(k for k, _ in kept))
    background = (np.concatenate(backgrounds[-max_examples:]).astype(np.float32) if backgrounds else empty)
    return PrototypeBank(labels=labels, background=background)


def _dimension(examples: Sequence[TaskExamples]) -> int:
    for example in examples:
        for vector in example.positives.values():
            return int(vector.shape[-1])
        for vectors in example.negatives.values():
            return int(vectors.shape[-1])
        if example.background is not None:
            return int(example.background.shape[-1])
    return 0


def label_heatmaps(features: np.ndarray, text_maps: np.ndarray, labels: Sequence[str], bank: Optional[PrototypeBank],
                   floor: float, prior: float = 1.0) -> np.ndarray:
    """Blend each label's text map with its prototype evidence -> [L, h, w] (module docstring, step 2).

    features   [h, w, D] GEM patch embeddings, L2-normalised
    text_maps  [L, h, w] cosine similarity of each patch to the label's text (max over its prompts)
    floor      the similarity floor (RegionConfig.min_similarity) the margin's zero is placed on
    prior      pseudo-count of the text: the examples' weight is n / (n + prior)
    """
    features = _check_features(features)
    text_maps = np.asarray(text_maps, dtype=np.float32)
    labels = list(labels)
    if text_maps.shape != (len(labels),) + features.shape[:2]:
        raise InvalidInputError(f"text maps {text_maps.shape} do not match {len(labels)} labels on a "
                                f"{features.shape[:2]} grid")
    if prior < 0 or not math.isfinite(prior):
        raise InvalidInputError(f"prior must be a finite number >= 0, got {prior}")
    out = text_maps.copy()
    if bank is None:
        return out
    flat = features.reshape(-1, features.shape[2])                     # [h*w, D]
    shared = (flat @ bank.background.T).max(axis=1) if len(bank.background) else None
    for index, label in enumerate(labels):
        item = bank.labels.get(label)
        if item is None or len(item.positives) == 0:
            continue
        positive = (flat @ item.positives.T).max(axis=1)                 # nearest positive example
        against = [shared] if shared is not None else []
        if len(item.negatives):
            against.append((flat @ item.negatives.T).max(axis=1))
        if not against:
            # Nothing known to be "not this label" yet: compare with the label's typical self-similarity.
            against = [np.full_like(positive, float(np.median(positive)))]
        margin = (positive - np.max(np.stack(against), axis=0)).reshape(features.shape[:2])
        n = len(item.positives)
        weight = n / (n + prior) if n + prior > 0 else 1.0
        out[index] = (1.0 - weight) * text_maps[index] + weight * (floor + margin)
    return out


# --------------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    """Fitted per-label offsets (added to the label's heatmap) and minimum area; empty = defaults."""
    offsets: dict[str, float] = field(default_factory=dict)
    min_area: Optional[float] = None          # fraction of the image; None = keep the configured one
    samples: int = 0                          # images it was fitted on
    iou_before: float = float("nan")          # mean IoU on those images with the defaults ...
    iou_after: float = float("nan")           # ... and with the fit (leave-one-out prototypes both times)

    def apply(self, maps: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """maps [L, ...] with each label's offset added (labels without one unchanged)."""
        offsets = np.array([self.offsets.get(label, 0.0) for label in labels], dtype=np.float32)
        if not offsets.any():
            return maps
        shape = (len(offsets),) + (1,) * (np.ndim(maps) - 1)
        return np.asarray(maps, dtype=np.float32) + offsets.reshape(shape)

    def region_config(self, config: RegionConfig) -> RegionConfig:
        import dataclasses

        return config if self.min_area is None else dataclasses.replace(config, min_area=self.min_area)


def learned_heatmaps(features: np.ndarray, text_maps: np.ndarray, labels: Sequence[str],
                     bank: Optional[PrototypeBank], calibration: Optional[Calibration], floor: float,
                     prior: float = 1.0) -> np.ndarray:
    """Prototype blend then calibration offsets: the maps a learned project predicts from, [L, h, w]."""
    maps = label_heatmaps(features, text_maps, labels, bank, floor, prior)
    return calibration.apply(maps, labels) if calibration is not None else maps


def segment_grid(maps: np.ndarray, config: RegionConfig, min_area: Optional[float] = None) -> np.ndarray:
    """bool [L, h, w]: the regions.py assignment (semantic or independent) and small-part removal on
    grid-resolution maps, without polygons: cheap enough to try many thresholds."""
    maps = np.asarray(maps, dtype=np.float32)
    num_labels, h, w = maps.shape
    mode = config.resolved_mode(num_labels)
    if mode == "semantic":
        winner = assign_semantic(maps, config)
        masks = winner[None] == np.arange(num_labels)[:, None, None]
    else:
        masks = threshold_independent(maps, config)
    area = config.min_area if min_area is None else min_area
    pixels = area if area >= 1 else area * h * w
    if pixels > 1:
        masks = np.stack([remove_small_components(m, pixels) for m in masks])
    return masks


@dataclass
class CalibrationSample:
    """One annotated image as calibration sees it: features, text maps and the annotators' masks, on the grid."""
    key: str
    features: np.ndarray            # [h, w, D]
    text_maps: np.ndarray           # [L, h, w] for the labels given to `calibrate`, same order
    truth: np.ndarray               # [L, h, w] coverage (0..1) of the annotators' masks


def _dataset_iou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> np.ndarray:
    """Per label IoU over all images together (sum of intersections / sum of unions) -> [L];
    NaN for a label neither predicted nor annotated anywhere."""
    inter = sum(np.logical_and(p, t).sum(axis=(1, 2)) for p, t in zip(predicted, truth))
    union = sum(np.logical_or(p, t).sum(axis=(1, 2)) for p, t in zip(predicted, truth))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _mean_iou(predicted, truth) -> float:
    values = _dataset_iou(predicted, truth)
    return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0


def _pick(scores: Sequence[float], distances: Sequence[float], tolerance: float) -> int:
    """Index of the candidate closest to the default (smallest distance) among those within
    `tolerance` of the best score: the shrinkage rule."""
    scores = np.asarray(scores, dtype=np.float64)
    good = np.flatnonzero(scores >= scores.max() - tolerance)
    return int(good[np.argmin(np.asarray(distances)[good])])


def calibrate(samples: Sequence[CalibrationSample], labels: Sequence[str], config: RegionConfig,
              examples: Sequence[TaskExamples] = (), use_prototypes: bool = True, prior: float = 1.0,
              max_examples: int = 32, tolerance: float = 0.05, passes: int = 2) -> Calibration:
    """Fit per-label offsets and the minimum area that maximise the IoU with the annotators' masks.

    samples    annotated images (grid features, text maps, true coverage for `labels`)
    examples   the prototype examples (their keys match the samples'); each sample is predicted with a
               bank built without its own examples
    tolerance  IoU within which a candidate nearer the default is preferred, divided by sqrt(#samples)
    """
    labels = list(labels)
    if not samples or not labels:
        return Calibration()
    truth = [np.asarray(s.truth) >= MIN_COVERAGE for s in samples]
    for sample in samples:
        if np.shape(sample.text_maps) != (len(labels),) + np.shape(sample.features)[:2]:
            raise InvalidInputError(f"sample {sample.key}: text maps {np.shape(sample.text_maps)} do not match "
                                    f"{len(labels)} labels on its grid")
    floor = config.min_similarity
    maps = []
    for sample in samples:
        bank = build_bank(examples, max_examples, exclude=sample.key) if use_prototypes and examples else None
        maps.append(label_heatmaps(sample.features, sample.text_maps, labels, bank, floor, prior))
    tol = tolerance / math.sqrt(len(samples))
    offsets = np.zeros(len(labels), dtype=np.float32)

    def score(offs: np.ndarray, min_area: Optional[float] = None) -> float:
        shift = offs[:, None, None]
        return _mean_iou([segment_grid(m + shift, config, min_area) for m in maps], truth)

    # The offsets are searched without the small-part clean-up (fitted after them): semantic
    # assignment is then per pixel, so all images go through it at once as one [L, 1, N] map,
    # which makes the few hundred trials cheap (10 labels x 32 images: seconds, not minutes).
    semantic = config.resolved_mode(len(labels)) == "semantic"
    if semantic:
        flat_maps = np.concatenate([m.reshape(len(labels), 1, -1) for m in maps], axis=2)      # [L, 1, N]
        flat_truth = np.concatenate([t.reshape(len(labels), 1, -1) for t in truth], axis=2)

    def search_score(offs: np.ndarray) -> float:
        if not semantic:
            return score(offs, 0.0)
        winner = assign_semantic(flat_maps + offs[:, None, None], config)                        # [1, N]
        predicted = winner[None] == np.arange(len(labels))[:, None, None]
        return _mean_iou([predicted], [flat_truth])

    default_area = config.min_area if config.min_area < 1 else None   # a pixel count means nothing on the grid
    base_area = default_area if default_area is not None else 0.0
    before = score(offsets, base_area)
    for _ in range(passes if len(labels) > 1 else 1):
        for index in range(len(labels)):
            values = np.concatenate([m[index].ravel() for m in maps])
            floors = np.unique(np.quantile(values, np.linspace(0.01, 0.99, FLOOR_CANDIDATES)))
            candidates = np.concatenate([[0.0], floor - floors])          # offset = floor - learned floor
            results = []
            for candidate in candidates:
                trial = offsets.copy()
                trial[index] = candidate
                results.append(search_score(trial))
            offsets[index] = candidates[_pick(results, np.abs(candidates), tol)]
    areas = list(MIN_AREA_CANDIDATES)
    area_scores = [score(offsets, a) for a in areas]
    reference = default_area if default_area is not None else 0.001
    distances = [abs(math.log((a + 1e-4) / (reference + 1e-4))) for a in areas]
    best_area = areas[_pick(area_scores, distances, tol)]
    after = score(offsets, best_area)
    if best_area == default_area:
        best_area = None
    return Calibration(offsets={label: float(o) for label, o in zip(labels, offsets) if o != 0.0},
                       min_area=best_area, samples=len(samples), iou_before=before, iou_after=after)


@dataclass(frozen=True)
class LearnedMaps:
    """What a project learned, as the prediction pipeline applies it: prototypes, calibration, prior."""
    bank: Optional[PrototypeBank] = None
    calibration: Optional[Calibration] = None
    prior: float = 0.25

    def heatmaps(self, features: np.ndarray, text_maps: np.ndarray, labels: Sequence[str],
                 floor: float) -> np.ndarray:
        """[L, h, w] learned maps from grid features and text maps (see `learned_heatmaps`)."""
        return learned_heatmaps(features, text_maps, labels, self.bank, self.calibration, floor, self.prior)

    def region_config(self, config: RegionConfig) -> RegionConfig:
        return self.calibration.region_config(config) if self.calibration is not None else config


# ------------------------------------------------------------------------------ publishing

def examples_digest(examples: TaskExamples) -> str:
    """Hex digest of what one image teaches, stable across recomputation.

    The vectors are rounded to float16 first: the same annotation encoded again gives the same
    digest even if the last float32 bits move, so a no-op update is recognised as one.
    """
    digest = hashlib.sha256()

    def add(name: str, array: Optional[np.ndarray]) -> None:
        digest.update(name.encode() + b"\0")
        if array is not None:
            values = np.ascontiguousarray(np.asarray(array, dtype=np.float16))
            digest.update(str(values.shape).encode() + values.tobytes())

    for label in sorted(examples.positives):
        add("p:" + label, examples.positives[label])
    for label in sorted(examples.negatives):
        add("n:" + label, examples.negatives[label])
    add("bg", examples.background)
    return digest.hexdigest()


def publish_due(published: Mapping[str, int], pending: Mapping[str, int], removed: bool = False) -> bool:
    """The doubling policy: is it time to put the learned state into predictions?

    published  label -> examples of that label in the state predictions use now
    pending    label -> examples of that label learned since (new or changed), not yet used
    removed    an example the predictions use was deleted (always published: a deleted annotation
               must stop shaping predictions)

    Due when, for some label, the pending examples are at least as many as the published ones,
    so a label's state changes at 1, 2, 4, 8, ... examples (and every `cap` examples once the
    per-label cap is reached): O(log n) new model versions, each of which makes the project's
    stored predictions stale, instead of one per annotation.
    """
    if removed:
        return True
    return any(count > 0 and count >= max(1, published.get(label, 0)) for label, count in pending.items())
