"""Label Studio result items -> masks: the reverse of `encode.py`, for learning and evaluation.

Brush RLE, polygons and rectangles (percent coordinates, optional rotation) all become bool
[H, W] masks at the image's original size, in gem_model's pixel-corner frame (a pixel is inside
when its centre is). Items that are not regions of an image (text, choices), that name another
image, or that are malformed are skipped, never raised: one bad item must not lose the others.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from gem_model.masks import polygons_to_mask

logger = logging.getLogger(__name__)

REGION_TYPES = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}


@dataclass
class ResultRegion:
    """One region of an annotation or prediction, as a mask."""
    id: str
    label: str
    kind: str                  # brush | polygon | rectangle
    from_name: str
    to_name: str
    mask: np.ndarray           # bool [H, W]
    score: float | None = None


def item_size(item: Mapping[str, Any]) -> tuple[int, int] | None:
    """(height, width) the item was drawn on, when it says."""
    try:
        width, height = int(item["original_width"]), int(item["original_height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (height, width) if width > 0 and height > 0 else None


def item_mask(item: Mapping[str, Any], height: int, width: int) -> np.ndarray | None:
    """Mask of one brush/polygon/rectangle result item, or None when it is not one or is malformed."""
    kind = REGION_TYPES.get(str(item.get("type", "")).lower())
    value = item.get("value")
    if kind is None or not isinstance(value, Mapping):
        return None
    try:
        if kind == "brush":
            return _brush(value, height, width)
        if kind == "polygon":
            points = np.asarray(value.get("points"), dtype=np.float64).reshape(-1, 2)
            if len(points) < 3 or not np.isfinite(points).all():
                return None
            pixels = points * np.array([width, height]) / 100.0
            return polygons_to_mask([pixels], height, width)
        return _rectangle(value, height, width)
    except (TypeError, ValueError) as exc:
        logger.debug("skipping malformed %s item: %s", kind, exc)
        return None


def _brush(value: Mapping[str, Any], height: int, width: int) -> np.ndarray | None:
    from label_studio_sdk.converter.brush import decode_rle

    rle = value.get("rle")
    if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not rle:
        return None
    flat = np.frombuffer(bytes(decode_rle([int(v) for v in rle])), dtype=np.uint8)
    if flat.size != height * width * 4:   # RGBA bytes of the image the brush was painted on
        raise ValueError(f"RLE holds {flat.size} bytes, expected {height * width * 4} for {width}x{height}")
    return flat.reshape(height, width, 4)[..., 3] > 0


def _rectangle(value: Mapping[str, Any], height: int, width: int) -> np.ndarray | None:
    x, y = float(value["x"]) * width / 100, float(value["y"]) * height / 100
    w, h = float(value["width"]) * width / 100, float(value["height"]) * height / 100
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    angle = math.radians(float(value.get("rotation") or 0.0))
    # Label Studio rotates a rectangle about its top-left corner (x, y), clockwise on screen.
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = corners @ rotation.T + np.array([x, y])
    return polygons_to_mask([points], height, width)


def result_regions(results: Iterable[Any], height: int, width: int, to_name: str | None = None,
                   labels: Iterable[str] | None = None) -> list[ResultRegion]:
    """Regions of a result list on one image (`to_name`, None = any) at height x width.

    Items drawn at another size (original_width/height) are rescaled by their percentages, which is
    what the coordinates mean; brush RLE of another size cannot be and is skipped. `labels` keeps
    only those label values.
    """
    allowed = set(labels) if labels is not None else None
    out = []
    for item in results or ():
        if not isinstance(item, Mapping):
            continue
        kind = REGION_TYPES.get(str(item.get("type", "")).lower())
        if kind is None or (to_name is not None and item.get("to_name") != to_name):
            continue
        value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
        names = value.get(item.get("type")) or value.get("labels") or []
        if not isinstance(names, list) or not names:
            continue
        drawn = item_size(item) if kind == "brush" else None
        mask = item_mask(item, *(drawn or (height, width)))
        if mask is None or not mask.any():
            continue
        if mask.shape != (height, width):
            logger.debug("skipping a brush item drawn at %s on a %sx%s image", mask.shape, width, height)
            continue
        for label in names:
            if isinstance(label, str) and (allowed is None or label in allowed):
                score = item.get("score")
                out.append(ResultRegion(id=str(item.get("id", "")), label=label, kind=kind,
                                        from_name=str(item.get("from_name", "")), to_name=str(item.get("to_name", "")),
                                        mask=mask, score=float(score) if isinstance(score, (int, float)) else None))
    return out


def label_masks(regions: Iterable[ResultRegion], height: int, width: int) -> dict[str, np.ndarray]:
    """Union of the regions' masks per label."""
    out: dict[str, np.ndarray] = {}
    for region in regions:
        if region.label not in out:
            out[region.label] = np.zeros((height, width), dtype=bool)
        out[region.label] |= region.mask
    return out
