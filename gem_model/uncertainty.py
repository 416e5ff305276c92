"""How much a prediction needs a human: the task score's parts, from the maps regions are made of.

The task score ranks tasks for review (lowest first). `regions.image_score` is one part: how
confident the regions found are. It is blind to what was not found (a missed object scores
nothing) and to how the image's pixels were decided. Active-learning practice adds:

- **margin** (Scheffer et al. 2001, "margin sampling"; Settles 2009, section 3.1): per pixel the
  probability of the best class minus the second best, the classes being the labels and the
  background (a background prompt scoring the similarity floor everywhere, the same model as
  `regions.presence_probability`). Averaged over every pixel of the image, so a close call in
  what was left as background counts as much as one inside a region.
- **agreement** between two committee members (query by committee, Seung et al. 1992): the
  label's text map alone and its learned prototypes alone. The fraction of the pixels either
  of them assigns to a label on which both assign the same one (1 when neither claims anything).
  Only a label with learned examples has a second member.

`combine_scores` turns the parts into one number in 0..1, lower = needs a human more. Which
parts help is measured on bench/bench_learning.py's generated project (docs/LEARNING.md).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import InvalidInputError
from .regions import RegionConfig

__all__ = ["SCORE_PARTS", "agreement", "combine_scores", "committee_agreement", "pixel_margin", "margin_score"]

SCORE_PARTS = ("regions", "margin", "agreement")


def pixel_margin(sims: np.ndarray, config: RegionConfig) -> np.ndarray:
    """Best minus second-best class probability per pixel, float32 [H, W] in 0..1.

    sims  [L, H, W] raw cosine maps (what `regions.extract_regions` is given)

    semantic: the classes are the L labels plus background, whose similarity is the floor
              (`min_similarity`), under one softmax at `softmax_scale`.
    independent: each label is its own two-class question (present or not, the presence
              probability p); its margin is |2p - 1|, and the pixel's margin is the smallest
              over the labels (the closest call decides how sure the pixel is).
    """
    sims = np.asarray(sims, dtype=np.float32)
    if sims.ndim == 2:
        sims = sims[None]
    if sims.ndim != 3 or sims.shape[0] < 1:
        raise InvalidInputError(f"similarity maps must be [L, H, W], got shape {sims.shape}")
    scale = np.float32(config.softmax_scale)
    floor = np.float32(config.min_similarity)
    if config.resolved_mode(len(sims)) == "independent":
        presence = 0.5 * (1.0 + np.tanh(0.5 * scale * (sims - floor)))
        return np.abs(2.0 * presence - 1.0).min(axis=0).astype(np.float32)
    # Top two of the L + 1 logits, plane by plane (no [L + 1, H, W] copy).
    best = np.full(sims.shape[1:], floor, dtype=np.float32)          # background starts as the best
    second = np.full(sims.shape[1:], -np.inf, dtype=np.float32)
    for plane in sims:
        np.maximum(second, np.minimum(plane, best), out=second)
        np.maximum(best, plane, out=best)
    # softmax p_k = exp(s (x_k - best)) / Z; Z over all L + 1 classes.
    total = np.exp(np.minimum(scale * (floor - best), 0.0))
    for plane in sims:
        total += np.exp(np.minimum(scale * (plane - best), 0.0))
    runner_up = np.exp(np.minimum(scale * (second - best), 0.0))
    return ((1.0 - runner_up) / total).astype(np.float32)


def margin_score(sims: np.ndarray, config: RegionConfig) -> float:
    """Mean pixel margin over the whole image, 0..1 (1: every pixel clearly decided)."""
    return float(np.clip(pixel_margin(sims, config).mean(), 0.0, 1.0))


def agreement(text_maps: np.ndarray, prototype_maps: np.ndarray, config: RegionConfig) -> float:
    """Agreement (0..1) of two committee members' label assignments, on the same grid [L, h, w].

    Each member's maps go through the semantic/independent assignment of `regions.py` (as the
    prediction would); the score is |pixels where both give the same label| / |pixels either
    labels|, over the labels; 1 when neither labels anything.
    """
    from .learning import segment_grid

    a = np.asarray(text_maps, dtype=np.float32)
    b = np.asarray(prototype_maps, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise InvalidInputError(f"committee maps must be two [L, h, w] arrays of one shape, got {a.shape} and {b.shape}")
    first = segment_grid(a, config, min_area=0.0)                     # bool [L, h, w]
    other = segment_grid(b, config, min_area=0.0)
    claimed = (first | other).sum()
    if claimed == 0:
        return 1.0
    return float((first & other).sum() / claimed)


def committee_agreement(features: np.ndarray, text_maps: np.ndarray, labels: Sequence[str], learned,
                        config: RegionConfig) -> Optional[float]:
    """`agreement` of a label's text map alone and its learned prototypes alone (the prototype
    weight at 1), both with the learned calibration, on the patch grid; None when `learned` (a
    `learning.LearnedMaps`) has no prototype for any of `labels` (no second committee member).

    features   [h, w, D] GEM patch embeddings; text_maps [L, h, w] for `labels`, in order
    """
    from .learning import learned_heatmaps

    bank = getattr(learned, "bank", None)
    if bank is None or not any(bank.count(label) for label in labels):
        return None
    floor = config.min_similarity
    text_only = learned_heatmaps(features, text_maps, labels, None, learned.calibration, floor)
    examples_only = learned_heatmaps(features, text_maps, labels, bank, learned.calibration, floor, prior=0.0)
    return agreement(text_only, examples_only, config)


def combine_scores(parts: Mapping[str, Optional[float]], use: Sequence[str]) -> float:
    """The task score: the mean of the parts named in `use` that are known (None = not available,
    e.g. agreement before anything was learned), clipped to 0..1. Lower = needs a human more.
    An unknown part name is an error; with no part known the score is 0 (nothing to trust)."""
    unknown = [name for name in use if name not in SCORE_PARTS]
    if unknown or not use:
        raise InvalidInputError(f"task score parts must be a non-empty subset of {SCORE_PARTS}, got {list(use)}")
    values = [float(parts[name]) for name in use if parts.get(name) is not None]
    if not values:
        return 0.0
    return float(np.clip(np.mean(values), 0.0, 1.0))
