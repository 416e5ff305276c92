"""Binary-mask utilities: components, small parts and holes, boxes, polygons.

Conventions shared with `regions.py`:

- a mask is `bool [H, W]`, indexed `[row, col]` = `[y, x]`;
- pixel `(r, c)` covers the square `x in [c, c+1]`, `y in [r, r+1]` (the "pixel-corner" frame),
  so box edges and polygon vertices are on the scale Label Studio's percentages refer to
  (`x_percent = 100 * x / W`);
- foreground is 8-connected and background 4-connected, the pairing under which every
  component has exactly one outer boundary and marching squares (`fully_connected="high"`)
  traces the same components that `label_components` finds.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours

from .errors import InvalidInputError

_FOREGROUND_STRUCTURE = np.ones((3, 3), dtype=bool)                  # 8-connected
_BACKGROUND_STRUCTURE = ndimage.generate_binary_structure(2, 1)     # 4-connected

BBox = tuple[int, int, int, int]


def area_in_pixels(value: float, height: int, width: int) -> float:
    """Area setting -> pixels: `value >= 1` is already pixels, `0 <= value < 1` a fraction of H*W."""
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"an area setting must be a finite number >= 0, got {value!r}")
    return float(value) if value >= 1 else float(value) * height * width


def mask_bounds(mask: np.ndarray) -> Optional[tuple[slice, slice]]:
    """Smallest (rows, cols) slices holding every True pixel, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def mask_to_bbox(mask: np.ndarray) -> BBox:
    """Exact pixel extent `(x0, y0, x1, y1)`; x1/y1 are exclusive (= right/bottom edge in the corner frame)."""
    bounds = mask_bounds(mask)
    if bounds is None:
        raise InvalidInputError("an empty mask has no bounding box")
    rows, cols = bounds
    return cols.start, rows.start, cols.stop, rows.stop


def cell_starts(small: int, full: int) -> np.ndarray:
    """Where each of `small` cells of a coarse axis starts on a `full`-pixel axis: int64 [small + 1],
    the last entry `full`.

    Nearest neighbour by pixel centres: full pixel i belongs to cell floor((i + 0.5) * small / full),
    the rule `upsample_mask` uses, so cell j spans [starts[j], starts[j + 1]). In the pixel-corner
    frame a cell edge at j sits at j * full / small; starts[j] is that edge rounded to a pixel edge.
    """
    j = np.arange(small + 1, dtype=np.int64)
    # smallest i with (2i + 1) * small >= 2 j full, in integers: ceil((2 j full - small) / (2 small))
    return np.clip(-((small - 2 * j * full) // (2 * small)), 0, full)


def cell_of(full: int, small: int) -> np.ndarray:
    """Coarse cell of every full-size pixel: int64 [full] (the inverse view of `cell_starts`)."""
    return ((2 * np.arange(full, dtype=np.int64) + 1) * small) // (2 * full)


def upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour enlargement of a bool [h, w] mask to [height, width] (pixel centres)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (height, width):
        return mask.copy()
    h, w = mask.shape
    return mask[cell_of(height, h)[:, None], cell_of(width, w)[None, :]]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: (int32 labels [H, W] with 0 = background, count)."""
    labels, count = ndimage.label(mask, structure=_FOREGROUND_STRUCTURE)
    return labels, int(count)


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than `min_pixels` pixels."""
    out = np.zeros_like(mask, dtype=bool)
    bounds = mask_bounds(mask)
    if bounds is None:
        return out
    crop = mask[bounds]
    if min_pixels <= 1:
        out[bounds] = crop
        return out
    labels, count = label_components(crop)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    out[bounds] = keep[labels]
    return out


def fill_small_holes(mask: np.ndarray, max_pixels: float,
                     fillable: Optional[np.ndarray] = None) -> np.ndarray:
    """Fill holes (background not connected to the outside) with fewer than `max_pixels` pixels.

    `fillable` (bool [H, W]) marks pixels a hole may be filled over; a hole with any other
    pixel in it is left open. Semantic assignment uses it so that a label never swallows a
    region another label won (a phone held in a hand stays a phone).
    """
    out = mask.astype(bool, copy=True)
    bounds = mask_bounds(mask)
    if bounds is None or max_pixels <= 0:
        return out
    # One pixel of padding joins every background run that reaches the crop's edge (and so the
    # image's edge or the outside of the bounding box) into one "outside" component.
    padded = np.pad(mask[bounds], 1)
    background, count = ndimage.label(~padded, structure=_BACKGROUND_STRUCTURE)
    sizes = np.bincount(background.ravel(), minlength=count + 1)
    small = sizes < max_pixels
    small[0] = False
    small[background[0, 0]] = False
    if fillable is not None:
        blocked_pixels = ~np.pad(fillable[bounds], 1, constant_values=True)
        blocked = np.bincount(background.ravel(), weights=blocked_pixels.ravel(),
                              minlength=count + 1) > 0
        small &= ~blocked
    out[bounds] |= small[background][1:-1, 1:-1]
    return out


def fill_all_holes(mask: np.ndarray) -> np.ndarray:
    """Mask with every hole filled (the area inside its outer boundaries)."""
    return fill_small_holes(mask, math.inf)


def polygon_is_simple(points: np.ndarray) -> bool:
    """True when the closed polygon `points [N, 2]` has >= 3 vertices and no two edges meet
    except consecutive ones at their shared vertex (touching and overlapping count as meeting)."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n < 3 or not np.all(np.isfinite(pts)):
        return False
    a = pts
    b = np.roll(pts, -1, axis=0)
    if np.any(np.all(a == b, axis=1)):
        return False  # zero-length edge

    def orient(p, q, r):  # sign of the cross product (q - p) x (r - p), broadcast over pairs
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1])
                       - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    def on_segment(p, q, r):  # r collinear with p-q: does it lie within the segment's box?
        return ((np.minimum(p[..., 0], q[..., 0]) <= r[..., 0]) & (r[..., 0] <= np.maximum(p[..., 0], q[..., 0]))
                & (np.minimum(p[..., 1], q[..., 1]) <= r[..., 1]) & (r[..., 1] <= np.maximum(p[..., 1], q[..., 1])))

    ai, bi = a[:, None, :], b[:, None, :]
    aj, bj = a[None, :, :], b[None, :, :]
    o1, o2 = orient(ai, bi, aj), orient(ai, bi, bj)
    o3, o4 = orient(aj, bj, ai), orient(aj, bj, bi)
    meet = (o1 * o2 < 0) & (o3 * o4 < 0)
    meet |= (o1 == 0) & on_segment(ai, bi, aj)
    meet |= (o2 == 0) & on_segment(ai, bi, bj)
    meet |= (o3 == 0) & on_segment(aj, bj, ai)
    meet |= (o4 == 0) & on_segment(aj, bj, bi)
    i, j = np.triu_indices(n, k=2)
    non_adjacent = ~((i == 0) & (j == n - 1))
    if np.any(meet[i[non_adjacent], j[non_adjacent]]):
        return False
    # Consecutive edges may only share their vertex; folding back onto each other is a spike.
    d_in, d_out = b - a, np.roll(b - a, -1, axis=0)
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    dot = (d_in * d_out).sum(axis=1)
    return not np.any((cross == 0) & (dot < 0))


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line through their neighbours (open ring in, open ring out)."""
    if len(points) < 4:
        return points
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    d_in, d_out = points - prev, nxt - points
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    dot = (d_in * d_out).sum(axis=1)
    keep = ~((cross == 0) & (dot > 0))
    return points[keep] if keep.sum() >= 3 else points


def douglas_peucker_importance(ring: np.ndarray) -> np.ndarray:
    """For each vertex of a closed ring [N, 2], the largest tolerance at which Douglas-Peucker keeps it.

    One full Douglas-Peucker pass records the distance at which every vertex is split off, capped by
    its parent's (a vertex is only examined if its parent was kept). Simplifying at tolerance t is
    then `ring[importance > t]`, so searching for a tolerance costs no further passes. The ring is
    anchored at vertex 0 and the vertex farthest from it, which are always kept. All segments of one
    recursion depth are split together, so Python loops over depths, not vertices.
    """
    n = len(ring)
    importance = np.zeros(n)
    if n < 3:
        importance[:] = np.inf
        return importance
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    importance[0] = importance[far] = np.inf
    closed = np.vstack([ring, ring[:1]])              # index n is vertex 0 again
    start, stop, cap = np.array([0, far]), np.array([far, n]), np.array([np.inf, np.inf])
    while True:
        open_ = stop - start >= 2
        start, stop, cap = start[open_], stop[open_], cap[open_]
        if start.size == 0:
            return importance
        counts = stop - start - 1                      # interior vertices of each segment
        segment = np.repeat(np.arange(start.size), counts)
        offsets = np.cumsum(counts) - counts
        vertex = start[segment] + 1 + np.arange(segment.size) - offsets[segment]
        p, q = closed[start][segment], closed[stop][segment]
        pq = q - p
        length2 = (pq * pq).sum(axis=1)
        t = np.clip(((closed[vertex] - p) * pq).sum(axis=1) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
        dist = np.hypot(*(closed[vertex] - p - t[:, None] * pq).T)  # distance to the segment p-q
        best = np.maximum.reduceat(dist, offsets)
        # first vertex reaching its segment's maximum
        hits = np.flatnonzero(dist == best[segment])
        _, first = np.unique(segment[hits], return_index=True)
        split = vertex[hits[first]]
        kept = np.minimum(best, cap)
        importance[split] = kept
        start, stop, cap = np.concatenate([start, split]), np.concatenate([split, stop]), np.concatenate([kept, kept])


def _keep_most_important(ring: np.ndarray, importance: np.ndarray, count: int) -> np.ndarray:
    order = np.sort(np.argsort(-importance, kind="stable")[:count])
    return ring[order]


def simplify_polygon(ring: np.ndarray, tolerance: float, max_points: int) -> np.ndarray:
    """Simplified closed polygon with 3..`max_points` vertices and no self-intersections.

    `ring` is `[N, 2]` without the closing point. Douglas-Peucker at `tolerance` (px), raised just
    enough to fit `max_points`; if that crosses itself, smaller tolerances (while they still fit),
    then larger ones (x1.5 each step); the convex hull is the last resort. Returns an empty `[0, 2]`
    array for a degenerate ring.
    """
    if max_points < 3:
        raise InvalidInputError(f"max_points must be >= 3, got {max_points}")
    ring = _drop_collinear(np.asarray(ring, dtype=np.float64))
    if len(ring) < 3:
        return np.empty((0, 2))
    importance = douglas_peucker_importance(ring)
    # Smallest tolerance keeping at most max_points vertices: the (max_points + 1)-th largest importance.
    fit = np.sort(importance)[::-1][max_points] if len(ring) > max_points else 0.0
    start = max(tolerance, fit)
    tolerances = [start] + [t for t in (tolerance / 2, tolerance / 4, 0.0) if fit <= t < start]
    step = max(start, 0.5)
    extent = float(np.ptp(ring, axis=0).max())
    while step < extent:
        step *= 1.5
        tolerances.append(step)
    for tol in tolerances:
        candidate = _drop_collinear(ring[importance > tol])
        if 3 <= len(candidate) <= max_points and polygon_is_simple(candidate):
            return candidate
    try:
        hull = ring[ConvexHull(ring).vertices]
    except (QhullError, ValueError):
        return np.empty((0, 2))
    # Douglas-Peucker keeps a subset of vertices in order, so a convex ring stays convex (simple).
    return _keep_most_important(hull, douglas_peucker_importance(hull), max_points)


def _insert_pixel_corners(ring: np.ndarray) -> np.ndarray:
    """Turn a marching-squares ring (edge midpoints, corner frame) into the pixel-edge boundary.

    Consecutive points on a vertical and a horizontal pixel edge are joined through the pixel
    corner the two edges share. At a diagonal pinch (two pixels touching at a corner) two steps
    would share that corner and the ring would touch itself, so the half-pixel cut stays there.
    """
    nxt = np.roll(ring, -1, axis=0)
    on_vertical_edge = ring[:, 0] % 1 == 0
    turns = np.flatnonzero(on_vertical_edge != np.roll(on_vertical_edge, -1))
    corners = np.where(on_vertical_edge[turns, None],
                       np.stack([ring[turns, 0], nxt[turns, 1]], axis=1),
                       np.stack([nxt[turns, 0], ring[turns, 1]], axis=1))
    _, inverse, counts = np.unique(corners, axis=0, return_inverse=True, return_counts=True)
    unique = counts[inverse.ravel()] == 1
    return np.insert(ring, turns[unique] + 1, corners[unique], axis=0)


def component_outline(component: np.ndarray) -> np.ndarray:
    """Outer boundary `[N, 2]` (x, y) of one 8-connected component along pixel edges (corner frame).

    Marching squares at level 0.5 separates every foreground pixel centre from every background
    one; adding the pixel corners at its turns makes the ring follow pixel edges, so its area is
    the pixel count (of the hole-filled component) and rasterising it by pixel centres gives the
    component back exactly.
    """
    padded = np.pad(fill_all_holes(component), 1).astype(np.float32)
    contours = find_contours(padded, 0.5, fully_connected="high")
    if not contours:
        return np.empty((0, 2))
    rows_cols = max(contours, key=len)[:-1]  # closed: the last point repeats the first
    # padded index -> array index is -1; pixel centre -> corner frame is +0.5.
    ring = rows_cols[:, ::-1] - 0.5
    return _drop_collinear(_insert_pixel_corners(ring))


def mask_to_polygons(mask: np.ndarray, tolerance: float = 2.0, max_points: int = 100) -> list[np.ndarray]:
    """One simplified outer polygon per 8-connected component, largest component first.

    Holes are not represented (a polygon has no holes in Label Studio); the mask keeps them.
    """
    bounds = mask_bounds(mask)
    if bounds is None:
        return []
    labels, _ = label_components(mask[bounds])
    return component_polygons(labels, (bounds[0].start, bounds[1].start), tolerance, max_points)


def component_polygons(labels: np.ndarray, origin: tuple[int, int], tolerance: float,
                        max_points: int, order: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Polygons of the components `order` (1-based ids; default: all, largest first) of `labels`
    (an int array whose [0, 0] sits at image pixel `origin` = (row, col))."""
    objects = ndimage.find_objects(labels)
    if order is None:
        sizes = np.bincount(labels.ravel())[1:]
        order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] > 0]
    polygons = []
    for component_id in order:
        poly = component_polygon(labels, objects, component_id, origin, tolerance, max_points)
        if poly is not None:
            polygons.append(poly)
    return polygons


def component_polygon(labels: np.ndarray, objects: Sequence, component_id: int, origin: tuple[int, int],
                      tolerance: float, max_points: int) -> Optional[np.ndarray]:
    """Simplified outer polygon of one component (`objects` from `ndimage.find_objects(labels)`)."""
    rows, cols = objects[component_id - 1]
    outline = component_outline(labels[rows, cols] == component_id)
    poly = simplify_polygon(outline, tolerance, max_points) if len(outline) else outline
    if len(poly) < 3:
        return None
    return poly + (origin[1] + cols.start, origin[0] + rows.start)


def polygons_to_mask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise (x, y) pixel-corner polygons: a pixel is inside when its centre is (union of polygons)."""
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        poly = np.asarray(poly, dtype=np.float64)
        rr, cc = draw_polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=(height, width))
        mask[rr, cc] = True
    return mask
