"""Image-guided edge refinement of coarse masks (training-free).

GEM's maps come from a patch grid (16 px patches of a 448 px input: one value per ~1/28 of the
short side), so mask edges are blurred over about a patch. The guided filter (He, Sun and Tang,
"Guided Image Filtering", ECCV 2010 / TPAMI 2013) fits, in every window, the mask as a linear
function of the RGB colour, q = a^T I + b (Eq. 1 of the TPAMI paper); edges in the output follow
colour edges in the image. We filter the soft (0/1) decision maps and decide again, which moves
each boundary to the nearest strong colour edge within about `radius` pixels.

The coefficients are computed on a reduced copy and applied at full resolution ("Fast Guided
Filter", He and Sun, 2015), so the cost barely depends on the image size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from .errors import InvalidInputError


def _box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window on the last two axes; mirrored borders keep it unbiased there."""
    size = (1,) * (x.ndim - 2) + (2 * radius + 1, 2 * radius + 1)
    return ndimage.uniform_filter(x, size=size, mode="reflect")


def _resize(x: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize [..., h, w] float32 planes one by one (PIL's float mode is fast and pixel-centre aligned)."""
    if x.shape[-2:] == (height, width):
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    out = np.empty((flat.shape[0], height, width), dtype=np.float32)
    for i, plane in enumerate(flat):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
                            .resize((width, height), resample))
    return out.reshape(*x.shape[:-2], height, width)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An image array [H, W] or [H, W, C] reduced (area average) to [height, width]; unchanged if it fits."""
    img = np.asarray(image)
    if img.shape[:2] == (height, width) or img.ndim not in (2, 3):
        return img   # guide_from_image names a wrong shape
    if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] in (3, 4)):
        return np.asarray(Image.fromarray(img).resize((width, height), Image.BOX))
    planes = img.astype(np.float32)
    planes = planes[None] if planes.ndim == 2 else np.moveaxis(planes, -1, 0)
    out = _resize(np.ascontiguousarray(planes), height, width, Image.BOX)
    return out[0] if img.ndim == 2 else np.moveaxis(out, 0, -1)


def guide_from_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """RGB guide float32 [3, H, W] in 0..1 from uint8/float RGB, RGBA or grey images."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise InvalidInputError(f"image must be [H, W], [H, W, 3] or [H, W, 4], got shape {img.shape}")
    if img.shape[:2] != (height, width):
        raise InvalidInputError(
            f"image is {img.shape[0]}x{img.shape[1]} (HxW) but the similarity maps are {height}x{width}")
    img = img[..., :3]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if img.dtype == np.uint8:
        guide = img.astype(np.float32) / 255.0
    else:
        guide = img.astype(np.float32)
        if not np.all(np.isfinite(guide)):
            raise InvalidInputError("image contains NaN or infinite values")
        if guide.size and guide.max() > 1.0:
            guide = guide / 255.0
    return np.ascontiguousarray(np.moveaxis(guide, -1, 0))


@dataclass
class _Guide:
    """Everything about the guide the filter needs, computed once for all sources."""
    full: np.ndarray      # [3, H, W] guide at full size, 0..1
    small: np.ndarray     # [3, h, w] reduced copy
    mean: np.ndarray      # [3, h, w] window means of `small`
    inverse: np.ndarray   # [6, h, w] (Sigma + eps U)^-1 per window: i11 i12 i13 i22 i23 i33
    radius: int           # window radius at reduced size


def _prepare_guide(guide: np.ndarray, radius: float, eps: float, max_side: Optional[int]) -> _Guide:
    _, height, width = guide.shape
    scale = 1.0 if not max_side else max(1.0, max(height, width) / float(max_side))
    h, w = max(1, round(height / scale)), max(1, round(width / scale))
    small = _resize(guide, h, w, Image.BOX)
    r = max(1, int(round(radius / scale)))
    mean = _box_mean(small, r)
    # Per-window 3x3 colour covariance + eps*U (TPAMI Eq. 14), inverted in closed form (adjugate / det).
    cov = {}
    for i in range(3):
        for j in range(i, 3):
            cov[i, j] = _box_mean(small[i] * small[j], r) - mean[i] * mean[j]
    a11, a12, a13 = cov[0, 0] + eps, cov[0, 1], cov[0, 2]
    a22, a23, a33 = cov[1, 1] + eps, cov[1, 2], cov[2, 2] + eps
    inverse = np.stack([a22 * a33 - a23 * a23, a13 * a23 - a12 * a33, a12 * a23 - a13 * a22,
                        a11 * a33 - a13 * a13, a13 * a12 - a11 * a23, a11 * a22 - a12 * a12])
    inverse /= a11 * inverse[0] + a12 * inverse[1] + a13 * inverse[2]  # determinant
    return _Guide(full=guide, small=small, mean=mean, inverse=inverse, radius=r)


def _coefficients(g: _Guide, source: np.ndarray) -> Optional[tuple[tuple[slice, slice], np.ndarray]]:
    """Window-averaged coefficients (a_r, a_g, a_b, b) of one full-size source plane.

    Returns (crop, coef [4, ch, cw]) at reduced size: outside `crop` every coefficient is exactly 0,
    or None for an all-zero source. The output at full size is bilinear(a) . I + bilinear(b).
    """
    _, h, w = g.small.shape
    small = _resize(np.asarray(source, dtype=np.float32), h, w, Image.BOX)
    rows, cols = np.flatnonzero(small.any(axis=1)), np.flatnonzero(small.any(axis=0))
    if rows.size == 0:
        return None
    # a, b are non-zero within r of the source and their window mean within 2r; one more pixel of
    # zeros lets mirrored borders of the crop see only zeros, so the crop equals the full computation.
    m = 2 * g.radius + 1
    crop = (slice(max(0, rows[0] - m), min(h, rows[-1] + 1 + m)),
            slice(max(0, cols[0] - m), min(w, cols[-1] + 1 + m)))
    p, guide, mean_i = small[crop], g.small[(slice(None),) + crop], g.mean[(slice(None),) + crop]
    i11, i12, i13, i22, i23, i33 = g.inverse[(slice(None),) + crop]
    r = g.radius
    mean_p = _box_mean(p, r)
    cov_ip = [_box_mean(guide[k] * p, r) - mean_i[k] * mean_p for k in range(3)]
    a = np.stack([i11 * cov_ip[0] + i12 * cov_ip[1] + i13 * cov_ip[2],
                  i12 * cov_ip[0] + i22 * cov_ip[1] + i23 * cov_ip[2],
                  i13 * cov_ip[0] + i23 * cov_ip[1] + i33 * cov_ip[2]])   # TPAMI Eq. 14
    b = mean_p - (a * mean_i).sum(axis=0)                                  # TPAMI Eq. 15
    # Average the coefficients of all windows covering a pixel (TPAMI Eq. 8).
    return crop, _box_mean(np.concatenate([a, b[None]]), r).astype(np.float32)


def _interp_axis(full: int, small: int, sl: slice, crop: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (into the crop) for full-size indices in `sl`, pixel centres aligned as in PIL."""
    src = (np.arange(sl.start, sl.stop, dtype=np.float64) + 0.5) * (small / full) - 0.5
    src = np.clip(src, 0, small - 1)
    lo = np.floor(src).astype(np.intp)
    weight = (src - lo).astype(np.float32)
    hi = np.minimum(lo + 1, small - 1)
    # Taps outside the crop read its edge, which is zero unless the crop edge is the image edge.
    last = crop.stop - crop.start - 1
    return np.clip(lo - crop.start, 0, last), np.clip(hi - crop.start, 0, last), weight


def _full_box(full: int, small: int, crop: slice) -> slice:
    """Full-size indices whose bilinear taps can reach inside `crop` (all others interpolate zeros)."""
    ratio = full / small
    start = 0 if crop.start == 0 else max(0, math.floor((crop.start - 0.5) * ratio))
    stop = full if crop.stop == small else min(full, math.ceil((crop.stop + 0.5) * ratio))
    return slice(start, stop)


def _apply(g: _Guide, crop: tuple[slice, slice], coef: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray]:
    """Full-size output a . I + b over the box where it can be non-zero: (box, plane)."""
    _, height, width = g.full.shape
    _, h, w = g.small.shape
    rows, cols = _full_box(height, h, crop[0]), _full_box(width, w, crop[1])
    y0, y1, wy = _interp_axis(height, h, rows, crop[0])
    x0, x1, wx = _interp_axis(width, w, cols, crop[1])
    # Separable bilinear upsampling: rows first while the planes are still narrow.
    tall = coef[:, y0] * (1 - wy)[None, :, None] + coef[:, y1] * wy[None, :, None]   # [4, ny, cw]
    up = tall[:, :, x0] * (1 - wx) + tall[:, :, x1] * wx                            # [4, ny, nx]
    sub = g.full[:, rows, cols]
    return (rows, cols), up[0] * sub[0] + up[1] * sub[1] + up[2] * sub[2] + up[3]


def guided_filter(guide: np.ndarray, sources: np.ndarray, radius: float, eps: float,
                  max_side: Optional[int] = 512) -> np.ndarray:
    """Colour guided filter of several maps at once.

    guide   float32 [3, H, W], values 0..1
    sources float32 [C, H, W]
    radius  window radius in full-resolution pixels
    eps     regularisation on the guide's colour variance (0..1 units squared); larger = smoother,
            less edge-following
    max_side the coefficients are computed on a copy whose longer side is at most this (None: full size)
    Returns float32 [C, H, W]. The filter is linear in `sources` and maps a constant to itself, so
    maps that sum to 1 per pixel still do after filtering.
    """
    g = _prepare_guide(guide, radius, eps, max_side)
    out = np.zeros((len(sources),) + guide.shape[1:], dtype=np.float32)
    for index, source in enumerate(sources):
        found = _coefficients(g, source)
        if found is not None:
            box, plane = _apply(g, *found)
            out[index][box] = plane
    return out


def refine_label_map(label_map: np.ndarray, num_labels: int, guide: np.ndarray, radius: float,
                     eps: float, max_side: Optional[int] = 512) -> np.ndarray:
    """Semantic refinement: filter the one-hot maps of background and every label, re-take the argmax.

    label_map int [H, W] with -1 = background, 0..num_labels-1 = label. The background's filtered
    map is 1 minus the sum of the others (the filter is linear and keeps constants), so it is never
    computed, and each label is only evaluated near its own pixels.
    """
    out = np.full_like(label_map, -1)
    g = None
    total = np.zeros(label_map.shape, dtype=np.float32)
    best = np.full(label_map.shape, -np.inf, dtype=np.float32)
    for index in range(num_labels):
        one_hot = label_map == index
        if not one_hot.any():
            continue
        g = g or _prepare_guide(guide, radius, eps, max_side)
        found = _coefficients(g, one_hot)
        if found is None:
            continue
        box, plane = _apply(g, *found)
        total[box] += plane
        better = plane > best[box]
        best[box][better] = plane[better]
        out[box][better] = index
    out[best <= 1.0 - total] = -1  # background wins ties, as it comes first in argmax order
    return out


def refine_masks(masks: np.ndarray, guide: np.ndarray, radius: float, eps: float,
                 max_side: Optional[int] = 512) -> np.ndarray:
    """Independent refinement: filter each bool mask [L, H, W] on its own and keep values >= 0.5."""
    out = np.zeros_like(masks, dtype=bool)
    g = None
    for index, mask in enumerate(masks):
        if not mask.any():
            continue
        g = g or _prepare_guide(guide, radius, eps, max_side)
        found = _coefficients(g, mask)
        if found is not None:
            box, plane = _apply(g, *found)
            out[index][box] = plane >= 0.5
    return out
