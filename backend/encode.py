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

from gem_model.masks import mask_to_bbox

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


# Label Studio's brush RLE (the rle-pack format of thi.ng/umbrella, which its editor decodes): a
# header of 32 bits value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1; then
# per chunk a flag bit (1 = one value repeated), 2 bits choosing a field size, the run length - 1
# in that many bits and the 8-bit value. The values are the RGBA bytes of every pixel in row-major
# order (a mask pixel is 255 in all four channels).
_RLE_FIELD_BITS = (3, 4, 8, 16)
_RLE_MAX_RUN = 1 << 16


def mask_runs(mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major runs (lengths int64, values bool) of `mask` (bool [h, w], h <= height, w <= width)
    enlarged by nearest neighbour to [height, width], without making the enlarged mask."""
    from gem_model.masks import cell_starts  # same enlargement rule as gem_model's Region.mask

    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    row_starts, col_starts = cell_starts(h, height), cell_starts(w, width)
    repeats = np.diff(row_starts)                                      # full rows per mask row
    lengths, values = [], []
    for i in np.flatnonzero(repeats):
        row = mask[i]
        change = np.flatnonzero(row[1:] != row[:-1]) + 1
        starts = col_starts[np.concatenate(([0], change))]
        seg = np.diff(np.concatenate((starts, [width])))
        keep = seg > 0
        lengths.append(np.tile(seg[keep], repeats[i]))
        values.append(np.tile(row[np.concatenate(([0], change))][keep], repeats[i]))
    lengths, values = np.concatenate(lengths), np.concatenate(values)
    # Merge equal neighbours (across row ends, and rows that repeat an all-equal row).
    first = np.concatenate(([True], values[1:] != values[:-1]))
    return np.add.reduceat(lengths, np.flatnonzero(first)), values[first]


def brush_rle(mask: np.ndarray, height: int, width: int) -> list[int]:
    """Label Studio brush RLE bytes of `mask` shown at height x width (nearest neighbour if smaller)."""
    lengths, values = mask_runs(mask, height, width)
    lengths = lengths * 4                                              # RGBA bytes per pixel
    # Runs longer than one field can hold are split into 65536-byte chunks plus a remainder.
    chunks = -(-lengths // _RLE_MAX_RUN)
    chunk_len = np.full(int(chunks.sum()), _RLE_MAX_RUN, dtype=np.int64)
    last = np.cumsum(chunks) - 1
    chunk_len[last] = lengths - (chunks - 1) * _RLE_MAX_RUN
    chunk_val = np.repeat(np.where(values, 255, 0), chunks)
    field = np.searchsorted(np.array([1 << b for b in _RLE_FIELD_BITS]), chunk_len)   # smallest that fits
    field_bits = np.array(_RLE_FIELD_BITS)[field]
    width_bits = 1 + 2 + field_bits + 8
    code = (((1 << 2 | field) << field_bits | (chunk_len - 1)) << 8) | chunk_val
    header_bits = 32 + 5 + 4 * len(_RLE_FIELD_BITS)
    header = (int(lengths.sum()) << 21) | (7 << 16)
    for k, bits in enumerate(_RLE_FIELD_BITS):
        header |= (bits - 1) << (12 - 4 * k)
    codes = np.concatenate(([header], code)).astype(np.uint64)
    widths = np.concatenate(([header_bits], width_bits))
    # Every code's bits, most significant first, concatenated; then packed into bytes (zero padded).
    ends = np.cumsum(widths)
    position = np.arange(int(ends[-1])) - np.repeat(ends - widths, widths)
    shift = (np.repeat(widths, widths) - 1 - position).astype(np.uint64)
    bits = (np.repeat(codes, widths) >> shift) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8)).tolist()


def brush_item(control: ControlSpec, label: str, mask: np.ndarray, score: float,
               width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """`mask` bool [h, w] at the original image size (width x height, default the mask's) or smaller."""
    height = mask.shape[0] if height is None else height
    width = mask.shape[1] if width is None else width
    item = _base(control, width, height, score)
    item["value"] = {"format": "rle", "rle": brush_rle(mask, height, width), control.result_type: [label]}
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


def region_items(control: ControlSpec, region: Any, width: int, height: int) -> list[dict[str, Any]]:
    """Result items of one gem_model Region for one control (none when the region is empty).

    The region's mask may be at a working resolution (`work_mask`, gem_model's Region) or at the
    original size (`mask`); the brush RLE is at the original size either way. Rectangles: one per
    entry of `boxes` (gem_model gives one per object unless RegionConfig.rectangles = "label"),
    else the single `bbox`."""
    work_mask = getattr(region, "work_mask", None)
    mask = np.asarray(work_mask if work_mask is not None else region.mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] > height or mask.shape[1] > width \
            or (work_mask is None and mask.shape != (height, width)):
        raise ValueError(f"region mask is {mask.shape[::-1]} but the image is {(width, height)}")
    if not mask.any():
        return []
    label, score = region.label, float(region.score)
    if control.kind == "brush":
        return [brush_item(control, label, mask, score, width, height)]
    if control.kind == "polygon":
        polygons = getattr(region, "polygons", None)
        return polygon_items(control, label, polygons if polygons is not None else (), width, height, score)
    if control.kind == "rectangle":
        boxes = getattr(region, "boxes", None)
        if not boxes:
            bbox = getattr(region, "bbox", None)
            boxes = [bbox if bbox is not None else mask_to_bbox(mask)]
        return [rectangle_item(control, label, box, width, height, score) for box in boxes]
    raise ValueError(f"unknown control kind {control.kind!r}")


def encode_regions(control: ControlSpec, regions: Iterable[Any], width: int, height: int) -> list[dict[str, Any]]:
    allowed = {label.value for label in control.labels}
    items: list[dict[str, Any]] = []
    for region in regions:
        if region.label not in allowed:  # never store a label the config does not have
            continue
        items.extend(region_items(control, region, width, height))
    return items
