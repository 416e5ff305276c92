"""Similarity maps -> regions an annotator can correct: mask, outer polygons, box, score.

Input is what the GEM core hands over per image: raw cosine similarities `sims [L, h, w]`
(one map per label, several prompts of a label already max-combined) at a working resolution
(a few times the model's patch grid, `RegionConfig.work_scale`; the original size works too),
the original image size, and optionally the RGB image for edge refinement. Output is one
`ImageRegions` in original pixel coordinates.

Everything below runs at the working resolution; only the results are scaled: polygons and boxes to
original pixels, and a region's full-size mask is made on demand (`Region.mask`, nearest neighbour),
so a 50-megapixel photo costs what its working-size copy costs.

Pipeline (each step a small pure function below):

1. calibrate   raw cosine -> probabilities with a fixed meaning (not per-image min-max, which
               always finds *something*, even when the object is absent)
2. assign      semantic: one label per pixel, or independent: one mask per label, overlaps allowed
3. refine      optional, image-guided edge refinement (`refine.py`)
4. clean       drop small components, fill small holes
5. describe    components -> `Region` (mask, box, polygons, score); image score

Coordinates: pixel (r, c) covers x in [c, c+1], y in [r, r+1]; boxes and polygons use that frame
(see `masks.py`) at both resolutions, so a working-resolution vertex x becomes x * W / w.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from .errors import InvalidInputError
from .masks import (
    area_in_pixels, cell_starts, fill_small_holes, label_components, mask_bounds, mask_to_bbox,
    mask_to_polygons, remove_small_components, component_polygon, component_polygons, upsample_mask,
)
from .refine import guide_from_image, refine_label_map, refine_masks, resize_image

__all__ = [
    "ImageRegions", "Region", "RegionConfig", "assign_semantic", "clean_mask", "extract_regions",
    "working_size",
    "image_score", "independent_cutoffs", "mask_to_bbox", "mask_to_polygons", "pixel_confidence",
    "presence_probability", "region_score",
    "suggest_min_similarity", "threshold_independent", "validate_similarities",
]

MODES = ("auto", "semantic", "independent")
REFINE_METHODS = ("none", "guided")
RECTANGLES = ("object", "label")
BACKGROUND = -1  # label-map value of pixels no label claims


def _setting(default, unit: str, doc: str):
    return field(default=default, metadata={"unit": unit, "doc": doc})


@dataclass(frozen=True)
class RegionConfig:
    """Every knob of the post-processing, with its unit and meaning in the field metadata.

    The backend exposes each field as the environment variable GEM_<FIELD> (backend/settings.py).
    """

    mode: str = _setting(
        "auto", "-",
        '"semantic": every pixel goes to its best label or to background; "independent": each label '
        'is thresholded on its own, overlaps allowed; "auto": semantic when there is more than one label')
    softmax_scale: float = _setting(
        100.0, "1/cosine",
        "temperature applied to cosine similarities before a softmax or sigmoid (CLIP's logit scale is 100); "
        "larger = more decisive probabilities")
    background_threshold: float = _setting(
        0.5, "probability",
        "semantic: a pixel is background when its winning label's softmax probability over the labels is "
        "below this; 1/L is a coin toss among L labels (see 'Choosing thresholds')")
    min_similarity: float = _setting(
        0.20, "cosine",
        "absolute floor on the raw similarity, the calibrated zero point: a label scoring below it is absent "
        "there. Model- and prompt-specific; calibrate with `suggest_min_similarity`")
    independent_threshold: float = _setting(
        0.5, "probability",
        "independent: keep pixels whose presence probability sigmoid(softmax_scale * (sim - min_similarity)) "
        "is at least this; 0.5 means exactly sim >= min_similarity")
    relative_threshold: float = _setting(
        0.5, "fraction",
        "independent: also require sim >= lo + relative_threshold * (peak - lo), lo = min(map minimum, "
        "min_similarity); shapes the mask once the label is known present (0 = off)")
    min_area: float = _setting(
        0.001, "px, or fraction of image if < 1",
        "connected components smaller than this are dropped")
    fill_holes_area: float = _setting(
        0.001, "px, or fraction of image if < 1",
        "holes smaller than this are filled (semantic: only holes no other label claims)")
    instances: bool = _setting(
        False, "-",
        "true: one region per connected component; false: one region per label (mask may have several parts)")
    rectangles: str = _setting(
        "object", "-",
        '"object": one box per connected component (two dogs, two boxes); "label": one box around all '
        "parts of a label")
    work_scale: float = _setting(
        8.0, "x patch grid",
        "regions are computed at this many times the model's patch grid per side (8: a 28-patch side "
        "becomes 224 px; with refine=guided at least refine_max_side on the long side), never above "
        "the image size, then scaled to original pixels")
    polygon_tolerance: float = _setting(
        2.0, "working px", "Douglas-Peucker simplification tolerance of polygon outlines, in pixels of the "
        "working resolution (work_scale), where outlines are traced")
    max_polygon_points: int = _setting(
        100, "points", "at most this many vertices per polygon (the tolerance is raised until it fits)")
    refine: str = _setting(
        "none", "-", '"none", or "guided": move mask edges to colour edges with a guided filter (needs the image)')
    refine_radius: float = _setting(
        0.035, "px, or fraction of short side if < 1",
        "guided filter window radius; about one ViT patch (16 px at 448 px input = 0.036 of the short side)")
    refine_eps: float = _setting(
        1e-3, "(colour 0..1)^2",
        "guided filter regularisation; larger = smoother edges that follow the image less")
    refine_max_side: int = _setting(
        512, "px", "the guided filter's coefficients are computed at most this large (speed); with refine=guided "
        "the working resolution's long side is raised to this")

    def __post_init__(self):
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise InvalidInputError(f"RegionConfig.{name} {rule}, got {getattr(self, name)!r}")

        def finite(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        check(self.mode in MODES, "mode", f"must be one of {MODES}")
        check(self.refine in REFINE_METHODS, "refine", f"must be one of {REFINE_METHODS}")
        check(self.rectangles in RECTANGLES, "rectangles", f"must be one of {RECTANGLES}")
        check(finite("work_scale") and 1 <= self.work_scale <= 64, "work_scale", "must be in [1, 64]")
        check(finite("softmax_scale") and self.softmax_scale > 0, "softmax_scale", "must be > 0")
        check(finite("min_similarity"), "min_similarity", "must be a finite number")
        for name in ("background_threshold", "independent_threshold", "relative_threshold"):
            check(finite(name) and 0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        for name in ("min_area", "fill_holes_area", "polygon_tolerance", "refine_radius", "refine_eps"):
            check(finite(name) and getattr(self, name) >= 0, name, "must be >= 0")
        check(isinstance(self.instances, bool), "instances", "must be true or false")
        check(isinstance(self.max_polygon_points, (int, np.integer)) and self.max_polygon_points >= 3,
              "max_polygon_points", "must be an integer >= 3")
        check(isinstance(self.refine_max_side, (int, np.integer)) and self.refine_max_side >= 16,
              "refine_max_side", "must be an integer >= 16")

    def resolved_mode(self, num_labels: int) -> str:
        """The mode actually used: "auto" is semantic for two or more labels, independent for one."""
        if self.mode != "auto":
            return self.mode
        return "semantic" if num_labels > 1 else "independent"


@dataclass(eq=False)
class Region:
    """One thing to show the annotator. Coordinates are pixels of the original image (H x W)."""
    label: str
    prompt: Optional[str]
    work_mask: np.ndarray            # bool [h, w] at the working resolution; keeps holes
    score: float                     # 0..1, mean pixel confidence inside the mask
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive: mask[y0:y1, x0:x1] holds it all
    polygons: list[np.ndarray]       # [N, 2] float (x, y), outer contours only, one per component
    area: int                        # pixels of the full-size mask
    boxes: list[tuple[int, int, int, int]]  # one per component (rectangles="object") or [bbox]
    size: tuple[int, int]            # (H, W) of the original image

    @property
    def mask(self) -> np.ndarray:
        """bool [H, W] at the original size: `work_mask` enlarged by nearest neighbour (made on each call)."""
        return upsample_mask(self.work_mask, *self.size)


@dataclass(eq=False)
class ImageRegions:
    regions: list[Region]
    score: float                     # 0..1, area-weighted mean of region scores; 0 when nothing found
    height: int
    width: int


# --------------------------------------------------------------------------------------------- input

def validate_similarities(sims, labels: Sequence[str]) -> np.ndarray:
    """Check maps against labels; returns float32 [L, H, W]. A [H, W] map is accepted for one label."""
    labels = list(labels)
    if any(not isinstance(label, str) for label in labels):
        raise InvalidInputError(f"labels must be strings, got {labels!r}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise InvalidInputError(f"labels must be unique; repeated: {duplicates} (combine their prompts upstream)")
    try:
        arr = np.asarray(sims)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"similarity maps are not an array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"similarity maps must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 2 and len(labels) == 1:
        arr = arr[None]
    if arr.ndim != 3:
        raise InvalidInputError(f"similarity maps must be [L, H, W], got shape {arr.shape}")
    if arr.shape[0] != len(labels):
        raise InvalidInputError(f"{arr.shape[0]} similarity maps for {len(labels)} labels {labels}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InvalidInputError(f"similarity maps are empty: shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = (~finite).reshape(len(labels), -1).sum(axis=1)
        where = ", ".join(f"{labels[i]!r}: {int(n)} px" for i, n in enumerate(bad) if n)
        raise InvalidInputError(f"similarity maps contain NaN or infinite values ({where})")
    return arr


def _prompt_for(prompts, labels: Sequence[str]) -> list[Optional[str]]:
    if prompts is None:
        return [None] * len(labels)
    if isinstance(prompts, Mapping):
        return [prompts.get(label) for label in labels]
    prompts = list(prompts)
    if len(prompts) != len(labels):
        raise InvalidInputError(f"{len(prompts)} prompts for {len(labels)} labels; give one per label or a dict")
    return prompts


# --------------------------------------------------------------------------------------- calibration

def presence_probability(sims: np.ndarray, min_similarity: float, softmax_scale: float) -> np.ndarray:
    """P(label rather than background) per pixel: CLIP's two-way softmax against a background prompt
    that scores `min_similarity` everywhere, i.e. sigmoid(scale * (sim - min_similarity))."""
    x = softmax_scale * (np.asarray(sims, dtype=np.float32) - np.float32(min_similarity))
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # overflow-free sigmoid


def pixel_confidence(sims_at_pixels: np.ndarray, label_index: int, mode: str,
                     config: RegionConfig) -> np.ndarray:
    """Calibrated confidence (0..1) that pixels show label `label_index`, from their sims [L, n].

    independent: presence probability of the label.
    semantic:    softmax probability of the label among the labels x its presence probability
                 (which label, times whether any label at all).
    """
    own = sims_at_pixels[label_index]
    presence = presence_probability(own, config.min_similarity, config.softmax_scale)
    if mode == "independent":
        return presence
    # 1 / sum_j exp(s*(x_j - x_own)) is the softmax of the own label without forming all of it.
    # Exponents are capped: a pixel given to a label far below another (refinement, hole filling)
    # then has confidence ~0 instead of an overflow warning.
    exponent = np.minimum(config.softmax_scale * (sims_at_pixels - own), 80.0)
    denom = np.exp(exponent).sum(axis=0)
    return presence / denom


def suggest_min_similarity(absent_peaks: Sequence[float], present_peaks: Sequence[float]) -> float:
    """Calibrate `min_similarity` from per-image peak similarities (map maximum) of one model and prompt
    style: images known to lack the label vs. images known to show it. Returns the threshold that best
    separates them (highest balanced accuracy; the middle of the best gap)."""
    absent = np.sort(np.asarray(absent_peaks, dtype=np.float64))
    present = np.sort(np.asarray(present_peaks, dtype=np.float64))
    if absent.size == 0 or present.size == 0:
        raise InvalidInputError("need at least one absent and one present peak to calibrate")
    values = np.unique(np.concatenate([absent, present]))
    candidates = np.concatenate([[values[0] - 1e-3], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    tpr = 1.0 - np.searchsorted(present, candidates, side="left") / present.size   # present peak >= t
    tnr = np.searchsorted(absent, candidates, side="left") / absent.size           # absent peak < t
    balanced = (tpr + tnr) / 2
    best = np.flatnonzero(balanced == balanced.max())
    return float((candidates[best[0]] + candidates[best[-1]]) / 2)


# ---------------------------------------------------------------------------------------- assignment

def assign_semantic(sims: np.ndarray, config: RegionConfig) -> np.ndarray:
    """Label map int32 [H, W]: index of the best label, or BACKGROUND (-1) where the winner's softmax
    probability < background_threshold or its raw similarity < min_similarity."""
    num_labels = len(sims)
    # Plane by plane instead of argmax(axis=0): strided reductions over L are several times slower.
    best = sims[0].copy()                                               # [H, W]
    second = np.full_like(best, -np.inf)                                # runner-up similarity
    winner = np.zeros(best.shape, dtype=np.int32)
    for index in range(1, num_labels):
        plane = sims[index]
        np.maximum(second, np.minimum(plane, best), out=second)
        np.copyto(winner, index, where=plane > best)
        np.maximum(best, plane, out=best)
    confident = best >= config.min_similarity
    if num_labels == 1 or config.background_threshold <= 0:
        winner[~confident] = BACKGROUND
        return winner
    # p_win = 1 / sum_j exp(s * (x_j - x_win)) >= t  <=>  that sum <= 1/t. The runner-up alone
    # bounds the sum: 1 + e <= sum <= 1 + (L - 1) e with e = exp(-s * gap), which settles most
    # pixels with one exp; only the rest (close calls above the floor) need every label.
    limit = 1.0 / config.background_threshold
    runner_up = np.exp(config.softmax_scale * (second - best))
    surely_in = 1.0 + (num_labels - 1) * runner_up <= limit
    surely_out = 1.0 + runner_up > limit
    undecided = confident & ~surely_in & ~surely_out
    confident &= ~surely_out
    pixels = np.flatnonzero(undecided)
    if pixels.size:
        at = sims.reshape(num_labels, -1)[:, pixels]                    # [L, n]
        total = np.exp(config.softmax_scale * (at - best.ravel()[pixels])).sum(axis=0)
        confident.ravel()[pixels] = total <= limit
    winner[~confident] = BACKGROUND
    return winner


def independent_cutoffs(sims: np.ndarray, config: RegionConfig) -> np.ndarray:
    """Per-label similarity cut-off [L] of independent mode (a pixel is kept when sim >= cut-off)."""
    t = config.independent_threshold
    logit = -math.inf if t <= 0 else math.inf if t >= 1 else math.log(t / (1 - t))
    absolute = config.min_similarity + logit / config.softmax_scale
    flat = sims.reshape(len(sims), -1)
    peak = flat.max(axis=1).astype(np.float64)
    low = np.minimum(flat.min(axis=1), config.min_similarity)
    relative = low + config.relative_threshold * (peak - low)
    return np.maximum(absolute, relative)


def threshold_independent(sims: np.ndarray, config: RegionConfig) -> np.ndarray:
    """Masks bool [L, H, W], one per label, thresholded on their own (overlaps allowed)."""
    cut = independent_cutoffs(sims, config).astype(np.float32)
    return sims >= cut[:, None, None]


def clean_mask(mask: np.ndarray, min_pixels: float, hole_pixels: float,
               fillable: Optional[np.ndarray] = None) -> np.ndarray:
    """Drop components < min_pixels, then fill holes < hole_pixels (only over `fillable` pixels if given)."""
    return fill_small_holes(remove_small_components(mask, min_pixels), hole_pixels, fillable)


# ------------------------------------------------------------------------------------------- scoring

def region_score(confidences: np.ndarray) -> float:
    """Mean pixel confidence inside a region, 0..1."""
    confidences = np.asarray(confidences)
    return float(np.clip(confidences.mean(), 0.0, 1.0)) if confidences.size else 0.0


def image_score(regions: Sequence[Region]) -> float:
    """Area-weighted mean of region scores (= mean confidence over every labelled pixel); 0 when no regions."""
    area = sum(r.area for r in regions)
    if area == 0:
        return 0.0
    return float(sum(r.score * r.area for r in regions) / area)


# ---------------------------------------------------------------------------------------------- main

def working_size(original_size: tuple[int, int], grid_size: tuple[int, int],
                 config: RegionConfig = RegionConfig()) -> tuple[int, int]:
    """(h, w) at which regions are made for an image of `original_size` whose maps come from a patch
    grid of `grid_size`: `work_scale` x the grid per side; with refine="guided" at least
    `refine_max_side` on the long side (edges follow the image's pixels, not the grid's); never
    above the original size (per side)."""
    height, width = (int(v) for v in original_size)
    h, w = config.work_scale * grid_size[0], config.work_scale * grid_size[1]
    if config.refine == "guided":
        grow = max(1.0, config.refine_max_side / max(h, w))
        h, w = h * grow, w * grow
    return max(1, min(height, int(round(h)))), max(1, min(width, int(round(w))))


def extract_regions(sims, labels: Sequence[str], config: RegionConfig = RegionConfig(),
                    image: Optional[np.ndarray] = None,
                    prompts: Union[Sequence[Optional[str]], Mapping[str, str], None] = None,
                    size: Optional[tuple[int, int]] = None) -> ImageRegions:
    """Regions of one image from its raw cosine-similarity maps.

    sims    float [L, h, w], one map per label at the working resolution (or at the original size);
            [h, w] allowed for one label
    labels  L unique label names
    config  RegionConfig
    image   optional RGB uint8 image, [h, w, 3] or [H, W, 3] (grey and RGBA accepted); required for
            refine="guided"; an original-size image is reduced to the working size
    prompts optional prompt text per label (list aligned with labels, or {label: prompt}); copied to Region.prompt
    size    (H, W) of the original image, at least the maps' size; default: the maps' size.
            Boxes, polygons, areas and `Region.mask` are in this frame; pixel settings (min_area,
            fill_holes_area and refine_radius when >= 1) are original pixels, polygon_tolerance is
            working pixels (the grid the outlines are traced on)
    """
    labels = list(labels)
    if not labels:
        arr = np.asarray(sims)
        if arr.ndim == 3 and arr.shape[0] > 0:
            raise InvalidInputError(f"{arr.shape[0]} similarity maps for 0 labels")
        height, width = (size if size is not None else arr.shape[-2:] if arr.ndim >= 2 else
                         np.asarray(image).shape[:2] if image is not None else (0, 0))
        return ImageRegions(regions=[], score=0.0, height=int(height), width=int(width))

    sims = validate_similarities(sims, labels)
    num_labels, h, w = sims.shape
    height, width = _original_size(size, h, w)
    prompt_of = _prompt_for(prompts, labels)
    if image is not None:
        image = np.asarray(image)
        if image.shape[:2] not in ((h, w), (height, width)):
            raise InvalidInputError(f"image shape {image.shape} does not match the similarity maps' "
                                    f"{h}x{w} or the original size {height}x{width} (H x W)")
    guide = None
    if config.refine == "guided":
        if image is None:
            raise InvalidInputError('refine="guided" needs the RGB image (pass image=...)')
        guide = guide_from_image(resize_image(image, h, w), h, w)
    mode = config.resolved_mode(num_labels)
    to_work = (h * w) / (height * width)                 # original pixels -> working pixels (area)
    min_pixels = _area_setting(config.min_area, h, w, to_work)
    hole_pixels = _area_setting(config.fill_holes_area, h, w, to_work)
    radius = (config.refine_radius * min(h, w) / min(height, width) if config.refine_radius >= 1
              else config.refine_radius * min(h, w))

    if mode == "semantic":
        label_map = assign_semantic(sims, config)
        if config.refine == "guided":
            label_map = refine_label_map(label_map, num_labels, guide, radius, config.refine_eps,
                                         config.refine_max_side)
        masks = _clean_label_map(label_map, num_labels, min_pixels, hole_pixels)
    else:
        raw = threshold_independent(sims, config)
        if config.refine == "guided":
            raw = refine_masks(raw, guide, radius, config.refine_eps, config.refine_max_side)
        masks = [clean_mask(m, min_pixels, hole_pixels) for m in raw]

    frame = _Frame(height, width, cell_starts(h, height), cell_starts(w, width))
    flat_sims = sims.reshape(num_labels, -1)
    regions: list[Region] = []
    for index, mask in enumerate(masks):
        bounds = mask_bounds(mask)
        if bounds is None:
            continue
        pixels = np.flatnonzero(mask)  # row-major, the same order as mask[bounds][crop]
        at_pixels = flat_sims[index:index + 1, pixels] if mode == "independent" else flat_sims[:, pixels]
        confidence = pixel_confidence(at_pixels, 0 if mode == "independent" else index, mode, config)
        regions.extend(_describe(mask, bounds, confidence, labels[index], prompt_of[index], config, frame))
    return ImageRegions(regions=regions, score=image_score(regions), height=height, width=width)


def _original_size(size, h: int, w: int) -> tuple[int, int]:
    if size is None:
        return h, w
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidInputError(f"size must be (height, width), got {size!r}") from None
    if height < h or width < w:
        raise InvalidInputError(f"the original size {height}x{width} is smaller than the similarity maps' "
                                f"{h}x{w}; give maps at most at the image's size")
    return height, width


def _area_setting(value: float, h: int, w: int, to_work: float) -> float:
    """An area knob in working pixels: a fraction of the image, or original pixels scaled down."""
    pixels = area_in_pixels(value, h, w)
    return pixels * to_work if value >= 1 else pixels


@dataclass(frozen=True)
class _Frame:
    """The original image's frame and where every working row and column starts in it."""
    height: int
    width: int
    row_starts: np.ndarray    # int64 [h + 1] (masks.cell_starts)
    col_starts: np.ndarray    # int64 [w + 1]

    def box(self, rows: slice, cols: slice) -> tuple[int, int, int, int]:
        """Working (rows, cols) extent -> exact (x0, y0, x1, y1) extent of the enlarged mask."""
        return (int(self.col_starts[cols.start]), int(self.row_starts[rows.start]),
                int(self.col_starts[cols.stop]), int(self.row_starts[rows.stop]))

    def polygon(self, poly: np.ndarray, h: int, w: int) -> np.ndarray:
        """Working-pixel-corner vertices -> original-pixel-corner vertices (x * W / w, y * H / h)."""
        # multiply first: a vertex on the far edge (x = w) lands exactly on W
        return np.clip(poly * (self.width, self.height) / (w, h), 0, (self.width, self.height))

    def pixel_areas(self, rows: slice, cols: slice) -> np.ndarray:
        """Original pixels covered by each working pixel of the crop: int64 [rows, cols]."""
        return np.outer(np.diff(self.row_starts[rows.start:rows.stop + 1]),
                        np.diff(self.col_starts[cols.start:cols.stop + 1]))


def _clean_label_map(label_map: np.ndarray, num_labels: int, min_pixels: float,
                     hole_pixels: float) -> list[np.ndarray]:
    """Semantic clean-up in place: small parts go to background first, then holes are filled where
    nothing else claims them (so a removed speck inside a label becomes that label's filled hole)."""
    boxes = ndimage.find_objects(label_map + 1, max_label=num_labels)  # boxes[l]: value l + 1 = label l
    crops: list = [None] * num_labels
    for index, box in enumerate(boxes):
        if box is None:
            continue
        own = label_map[box] == index
        kept = remove_small_components(own, min_pixels)
        label_map[box][own & ~kept] = BACKGROUND
        crops[index] = kept
    masks = []
    for index, box in enumerate(boxes):
        mask = np.zeros(label_map.shape, dtype=bool)
        if box is not None:
            fillable = (label_map[box] == BACKGROUND) | crops[index]
            filled = fill_small_holes(crops[index], hole_pixels, fillable)
            label_map[box][filled] = index
            mask[box] = filled
        masks.append(mask)
    return masks


def _describe(mask: np.ndarray, bounds, confidence: np.ndarray, label: str, prompt: Optional[str],
              config: RegionConfig, frame: _Frame) -> list[Region]:
    """Regions of one label's cleaned working-resolution mask: the whole label, or one per component."""
    rows, cols = bounds
    h, w = mask.shape
    origin = (rows.start, cols.start)
    components, count = label_components(mask[bounds])
    tolerance, max_points = config.polygon_tolerance, config.max_polygon_points
    inside = mask[bounds]
    ids = components[inside]                                             # component of each mask pixel
    sizes = np.bincount(ids, minlength=count + 1)
    areas = np.bincount(ids, weights=frame.pixel_areas(rows, cols)[inside], minlength=count + 1)
    objects = ndimage.find_objects(components)
    order = [int(i) + 1 for i in np.argsort(-sizes[1:], kind="stable")]  # largest first
    size = (frame.height, frame.width)

    def box_of(component_id: int) -> tuple[int, int, int, int]:
        r, c = objects[component_id - 1]
        return frame.box(slice(rows.start + r.start, rows.start + r.stop),
                         slice(cols.start + c.start, cols.start + c.stop))

    def polygon_of(component_id: int) -> Optional[np.ndarray]:
        poly = component_polygon(components, objects, component_id, origin, tolerance, max_points)
        return None if poly is None else frame.polygon(poly, h, w)

    if not config.instances:
        bbox = frame.box(rows, cols)
        polygons = [p for p in map(polygon_of, order) if p is not None]
        boxes = [box_of(i) for i in order] if config.rectangles == "object" else [bbox]
        return [Region(label=label, prompt=prompt, work_mask=mask, score=region_score(confidence),
                       bbox=bbox, polygons=polygons, area=int(round(areas.sum())), boxes=boxes, size=size)]
    totals = np.bincount(ids, weights=confidence, minlength=count + 1)
    regions = []
    for component_id in order:
        r, c = objects[component_id - 1]
        part = np.zeros_like(mask)
        part[rows.start + r.start:rows.start + r.stop, cols.start + c.start:cols.start + c.stop] = \
            components[r, c] == component_id
        polygon = polygon_of(component_id)
        bbox = box_of(component_id)
        regions.append(Region(label=label, prompt=prompt, work_mask=part,
                              score=float(np.clip(totals[component_id] / sizes[component_id], 0, 1)),
                              bbox=bbox, polygons=[polygon] if polygon is not None else [],
                              area=int(round(areas[component_id])), boxes=[bbox], size=size))
    return regions
