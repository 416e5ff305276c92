"""Regions -> Label Studio result items (brush RLE, polygons, rectangles).

Geometry follows gem_model's pixel-corner frame: pixel (r, c) covers x in [c, c+1], y in
[r, r+1], so a vertex or box edge at x maps to 100 * x / W percent, which is how Label Studio
measures. Label Studio does not check labels or names of predictions it stores, so every item
carries exactly the control's from_name, the image's to_name and a label value from the config.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable, Sequence

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from .label_config import ControlSpec

# Percent coordinates rounded to 1e-4 % (well under a pixel even at 100k px) to keep replies small.
_DECIMALS = 4


def new_id() -> str:
    """Short unique region id, the length Label Studio's editor uses."""
    return uuid.uuid4().hex[:10]


def _pct(value: float, size: int) -> float:
    return round(min(100.0, max(0.0, 100.0 * float(value) / size)), _DECIMALS)


def _base(control: ControlSpec, width: int, height: int, score: float) -> dict[str, Any]:
    return {
        "id": new_id(),
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(score), 4),
    }


def brush_item(control: ControlSpec, label: str, mask: np.ndarray, score: float) -> dict[str, Any]:
    """`mask` bool [H, W] at the original image size."""
    height, width = mask.shape
    rle = mask2rle(np.where(mask, np.uint8(255), np.uint8(0)))
    item = _base(control, width, height, score)
    item["value"] = {"format": "rle", "rle": [int(v) for v in rle], control.result_type: [label]}
    return item


def polygon_items(control: ControlSpec, label: str, polygons: Iterable[np.ndarray], width: int, height: int,
                  score: float) -> list[dict[str, Any]]:
    """One polygon item per part: Label Studio polygons have a single ring and no holes."""
    items = []
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)   # [N, 2] (x, y) px
        if len(points) < 3:
            continue
        item = _base(control, width, height, score)
        item["value"] = {
            "points": [[_pct(x, width), _pct(y, height)] for x, y in points],
            "closed": True,
            control.result_type: [label],
        }
        items.append(item)
    return items


def rectangle_item(control: ControlSpec, label: str, bbox: Sequence[float], width: int, height: int,
                   score: float) -> dict[str, Any]:
    """`bbox` = (x0, y0, x1, y1) in pixels with exclusive x1/y1 (the right/bottom edges)."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    left, top = _pct(x0, width), _pct(y0, height)
    item = _base(control, width, height, score)
    item["value"] = {
        "x": left,
        "y": top,
        "width": round(max(0.0, _pct(x1, width) - left), _DECIMALS),
        "height": round(max(0.0, _pct(y1, height) - top), _DECIMALS),
        "rotation": 0,
        control.result_type: [label],
    }
    return item


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def region_items(control: ControlSpec, region: Any, width: int, height: int) -> list[dict[str, Any]]:
    """Result items of one gem_model Region for one control (none when the region is empty)."""
    mask = np.asarray(region.mask, dtype=bool)
    if mask.shape != (height, width):
        raise ValueError(f"region mask is {mask.shape[::-1]} but the image is {(width, height)}")
    if not mask.any():
        return []
    label, score = region.label, float(region.score)
    if control.kind == "brush":
        return [brush_item(control, label, mask, score)]
    if control.kind == "polygon":
        polygons = getattr(region, "polygons", None)
        return polygon_items(control, label, polygons if polygons is not None else (), width, height, score)
    if control.kind == "rectangle":
        bbox = getattr(region, "bbox", None)
        return [rectangle_item(control, label, bbox if bbox is not None else mask_bbox(mask), width, height, score)]
    raise ValueError(f"unknown control kind {control.kind!r}")


def encode_regions(control: ControlSpec, regions: Iterable[Any], width: int, height: int) -> list[dict[str, Any]]:
    allowed = {label.value for label in control.labels}
    items: list[dict[str, Any]] = []
    for region in regions:
        if region.label not in allowed:  # never store a label the config does not have
            continue
        items.extend(region_items(control, region, width, height))
    return items
