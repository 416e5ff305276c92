"""Heatmaps -> regions (gem_model/regions.py, gem_model/masks.py) on synthetic maps with known answers."""
import dataclasses

import numpy as np
import pytest
from skimage import draw
from skimage.draw import polygon2mask

from gem_model.masks import (
    area_in_pixels, component_outline, douglas_peucker_importance, fill_small_holes, mask_to_bbox,
    mask_to_polygons, polygon_is_simple, polygons_to_mask, remove_small_components, simplify_polygon,
)
from gem_model.regions import (
    BACKGROUND, ImageRegions, Region, RegionConfig, assign_semantic, clean_mask, extract_regions, image_score,
    independent_cutoffs, pixel_confidence, presence_probability, region_score,
    suggest_min_similarity, threshold_independent,
)

H, W = 120, 160
LOW, HIGH = 0.08, 0.32  # background and object cosine levels, either side of the default floor 0.20
PLAIN = RegionConfig(min_area=0, fill_holes_area=0)


def softmax_over_labels(sims, scale):
    """Reference: P(label | one of the labels) per pixel, softmax over axis 0 (float64)."""
    logits = scale * np.asarray(sims, dtype=np.float64)
    logits = np.exp(logits - logits.max(axis=0, keepdims=True))
    return logits / logits.sum(axis=0, keepdims=True)


# ------------------------------------------------------------------------------------------ shapes

def disk(h=H, w=W, center=(60, 70), radius=35):
    m = np.zeros((h, w), bool)
    rr, cc = draw.disk(center, radius, shape=m.shape)
    m[rr, cc] = True
    return m


def rectangle(h=H, w=W, y0=20, y1=70, x0=30, x1=110):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def l_shape(h=H, w=W):
    m = np.zeros((h, w), bool)
    m[10:100, 20:50] = True
    m[70:100, 20:130] = True
    return m


def u_shape(h=H, w=W):
    m = disk(h, w, (60, 80), 50)
    m &= ~disk(h, w, (40, 80), 30)  # open at the top: a C/U, not a ring
    m[:40, 55:105] = False
    return m


def star(h=H, w=W):
    angles = np.arange(10) * np.pi / 5 + 0.3
    radii = np.where(np.arange(10) % 2 == 0, 55, 22)
    return polygon2mask((h, w), np.c_[60 + radii * np.sin(angles), 80 + radii * np.cos(angles)])


SHAPES = {"disk": disk, "rectangle": rectangle, "L": l_shape, "U": u_shape, "star": star}


def sims_from(*masks, low=LOW, high=HIGH):
    """Flat maps: `high` on the mask, `low` elsewhere, one per mask -> float32 [L, H, W]."""
    return np.stack([np.where(m, high, low) for m in masks]).astype(np.float32)


def smooth_blob(center, sigma, peak, base=LOW, h=H, w=W):
    yy, xx = np.mgrid[:h, :w]
    return (base + (peak - base) * np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma ** 2))
            ).astype(np.float32)


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def rasterise(polygons, h=H, w=W):
    """Independent of masks.py: skimage's polygon2mask tests pixel centres; ours are at +0.5 in (x, y)."""
    out = np.zeros((h, w), bool)
    for poly in polygons:
        out |= polygon2mask((h, w), poly[:, ::-1] - 0.5)
    return out


# ---------------------------------------------------------------------------------------- polygons

@pytest.mark.parametrize("name", sorted(SHAPES))
def test_polygon_rasterises_back_to_mask(name):
    mask = SHAPES[name]()
    result = extract_regions(sims_from(mask), ["x"])
    (region,) = result.regions
    assert len(region.polygons) == 1
    poly = region.polygons[0]
    assert poly.ndim == 2 and poly.shape[1] == 2 and 3 <= len(poly) <= 100
    assert polygon_is_simple(poly)
    assert iou(rasterise(region.polygons), mask) >= 0.95


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_unsimplified_outline_follows_pixel_edges_exactly(name):
    mask = SHAPES[name]()
    outline = component_outline(mask)
    np.testing.assert_array_equal(rasterise([outline]), mask)
    x, y = outline[:, 0], outline[:, 1]
    shoelace = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert shoelace == pytest.approx(mask.sum(), abs=0.25 * 8)  # only diagonal pinches keep a cut corner


def test_rectangle_polygon_is_its_four_corners():
    poly = mask_to_polygons(rectangle(y0=20, y1=70, x0=30, x1=110))[0]
    assert sorted(map(tuple, poly.tolist())) == [(30, 20), (30, 70), (110, 20), (110, 70)]


def test_single_pixel_and_diagonal_pixels():
    mask = np.zeros((10, 10), bool)
    mask[2, 3] = True
    assert sorted(map(tuple, mask_to_polygons(mask, 0)[0].tolist())) == [(3, 2), (3, 3), (4, 2), (4, 3)]
    mask[3, 4] = True  # touches diagonally: one 8-connected component, one simple polygon
    polys = mask_to_polygons(mask, 0)
    assert len(polys) == 1 and polygon_is_simple(polys[0])
    np.testing.assert_array_equal(polygons_to_mask(polys, 10, 10), mask)


@pytest.mark.parametrize("max_points", [4, 6, 12, 40])
def test_max_polygon_points_is_respected(max_points):
    config = dataclasses.replace(PLAIN, max_polygon_points=max_points, polygon_tolerance=0.5)
    for name, make in SHAPES.items():
        for region in extract_regions(sims_from(make()), ["x"], config).regions:
            for poly in region.polygons:
                assert 3 <= len(poly) <= max_points, name
                assert polygon_is_simple(poly), name


def test_random_masks_give_simple_polygons_within_limits():
    rng = np.random.default_rng(0)
    for trial in range(4):
        noise = rng.random((48, 48)) < (0.35 + 0.3 * rng.random())
        for tolerance, max_points in [(0.0, 500), (1.0, 100), (3.0, 12), (2.0, 5)]:
            for poly in mask_to_polygons(noise, tolerance, max_points):
                assert 3 <= len(poly) <= max_points
                assert polygon_is_simple(poly), (trial, tolerance)


def _recursive_douglas_peucker(points, tolerance):
    """Textbook Douglas-Peucker on an open chain (first and last kept), distance to the segment."""
    p, q = points[0], points[-1]
    if len(points) < 3:
        return [p, q]
    pq = q - p
    t = np.clip((points[1:-1] - p) @ pq / max(pq @ pq, 1e-12), 0, 1)
    dist = np.hypot(*(points[1:-1] - p - t[:, None] * pq).T)
    k = int(np.argmax(dist)) + 1
    if dist[k - 1] <= tolerance:
        return [p, q]
    return _recursive_douglas_peucker(points[:k + 1], tolerance)[:-1] + _recursive_douglas_peucker(points[k:], tolerance)


def test_douglas_peucker_importance_matches_textbook_recursion():
    rng = np.random.default_rng(3)
    for _ in range(10):
        ring = rng.random((40, 2)) * 20
        importance = douglas_peucker_importance(ring)
        far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
        closed = np.vstack([ring, ring[:1]])
        for tolerance in (0.5, 2.0, 5.0):
            first = _recursive_douglas_peucker(closed[:far + 1], tolerance)
            second = _recursive_douglas_peucker(closed[far:], tolerance)
            expected = np.array(first[:-1] + second[:-1])
            np.testing.assert_array_equal(ring[importance > tolerance], expected)


def test_polygon_is_simple_detects_crossings_and_touching():
    assert polygon_is_simple(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float))
    assert not polygon_is_simple(np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float))            # bow tie
    assert not polygon_is_simple(np.array([[0, 0], [4, 0], [2, 0], [2, 3]], float))            # folds back
    assert not polygon_is_simple(np.array([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]], float))    # vertex on edge
    assert not polygon_is_simple(np.array([[0, 0], [1, 1]], float))


def test_simplify_falls_back_before_crossing_itself():
    # A thin slit: coarse simplification would join the two sides of the gap and cross itself.
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:55] = True
    mask[5:30, 29:31] = False
    poly = simplify_polygon(component_outline(mask), 4.0, 100)
    assert polygon_is_simple(poly)
    assert iou(rasterise([poly], 40, 60), mask) > 0.9


def test_holes_are_kept_in_the_mask_but_not_in_the_polygon():
    ring = disk(radius=40) & ~disk(radius=15)
    result = extract_regions(sims_from(ring), ["x"], dataclasses.replace(PLAIN, fill_holes_area=10))
    (region,) = result.regions
    np.testing.assert_array_equal(region.mask, ring)
    assert region.area == ring.sum()
    assert len(region.polygons) == 1
    assert iou(rasterise(region.polygons), disk(radius=40)) >= 0.95


# --------------------------------------------------------------------------------- boxes and areas

def test_boxes_areas_and_counts_are_exact():
    a = rectangle(y0=10, y1=30, x0=20, x1=60)
    b = rectangle(y0=50, y1=100, x0=100, x1=150)
    sims = sims_from(a | b)
    whole = extract_regions(sims, ["x"], PLAIN)
    (region,) = whole.regions
    assert region.bbox == (20, 10, 150, 100)
    assert region.area == 20 * 40 + 50 * 50
    assert len(region.polygons) == 2
    parts = extract_regions(sims, ["x"], dataclasses.replace(PLAIN, instances=True))
    assert [r.bbox for r in parts.regions] == [(100, 50, 150, 100), (20, 10, 60, 30)]  # largest first
    assert [r.area for r in parts.regions] == [2500, 800]
    assert all(len(r.polygons) == 1 for r in parts.regions)
    assert all(r.mask[r.bbox[1]:r.bbox[3], r.bbox[0]:r.bbox[2]].sum() == r.area for r in parts.regions)


def test_mask_to_bbox_is_exclusive_and_rejects_empty():
    mask = np.zeros((5, 7), bool)
    mask[1, 2] = mask[3, 5] = True
    assert mask_to_bbox(mask) == (2, 1, 6, 4)
    with pytest.raises(ValueError):
        mask_to_bbox(np.zeros((3, 3), bool))


def test_area_rule_pixels_or_fraction():
    assert area_in_pixels(50, 100, 200) == 50
    assert area_in_pixels(0.01, 100, 200) == 200
    assert area_in_pixels(0, 100, 200) == 0
    with pytest.raises(ValueError):
        area_in_pixels(-1, 10, 10)


def test_min_area_drops_small_components_in_pixels_and_fraction():
    big, small = rectangle(y0=10, y1=50, x0=10, x1=50), rectangle(y0=80, y1=85, x0=100, x1=105)  # 1600, 25 px
    sims = sims_from(big | small)
    for min_area in (26, 26 / (H * W)):
        (region,) = extract_regions(sims, ["x"], dataclasses.replace(PLAIN, min_area=min_area)).regions
        np.testing.assert_array_equal(region.mask, big)
    (region,) = extract_regions(sims, ["x"], dataclasses.replace(PLAIN, min_area=25)).regions
    assert region.area == 1625  # "smaller than" drops < 25 only
    assert extract_regions(sims, ["x"], dataclasses.replace(PLAIN, min_area=2000)).regions == []


def test_small_holes_filled_large_holes_kept():
    mask = rectangle(y0=10, y1=90, x0=10, x1=130)
    small_hole, big_hole = rectangle(y0=20, y1=23, x0=20, x1=23), rectangle(y0=40, y1=70, x0=60, x1=100)
    mask &= ~small_hole & ~big_hole
    (region,) = extract_regions(sims_from(mask), ["x"], dataclasses.replace(PLAIN, fill_holes_area=50)).regions
    np.testing.assert_array_equal(region.mask, mask | small_hole)
    # a gap open to the image border is not a hole
    edge = rectangle(y0=0, y1=50, x0=0, x1=50) & ~rectangle(y0=0, y1=3, x0=10, x1=13)
    np.testing.assert_array_equal(fill_small_holes(edge, 1000), edge)


def test_semantic_hole_held_by_another_label_is_not_filled():
    outer = rectangle(y0=10, y1=90, x0=10, x1=130)
    inner = rectangle(y0=40, y1=50, x0=60, x1=70)  # 100 px, another label inside
    sims = sims_from(outer & ~inner, inner)
    config = dataclasses.replace(PLAIN, mode="semantic", fill_holes_area=500)
    result = extract_regions(sims, ["outer", "inner"], config)
    masks = {r.label: r.mask for r in result.regions}
    np.testing.assert_array_equal(masks["inner"], inner)
    assert not (masks["outer"] & masks["inner"]).any()
    # ...but when the inner label's part is too small to keep, its place becomes a filled hole
    result = extract_regions(sims, ["outer", "inner"], dataclasses.replace(config, min_area=200))
    assert [r.label for r in result.regions] == ["outer"]
    np.testing.assert_array_equal(result.regions[0].mask, outer)


def test_clean_mask_helper():
    mask = rectangle(y0=10, y1=50, x0=10, x1=50) | rectangle(y0=80, y1=82, x0=100, x1=102)
    mask[20, 20] = False
    out = clean_mask(mask, min_pixels=10, hole_pixels=5)
    np.testing.assert_array_equal(out, rectangle(y0=10, y1=50, x0=10, x1=50))
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)


# ------------------------------------------------------------------------------ assignment modes

def test_semantic_vs_independent_on_overlapping_blobs():
    a, b = disk(center=(60, 60), radius=35), disk(center=(60, 100), radius=35)
    sims = np.stack([np.where(a, 0.30, LOW), np.where(b, 0.27, LOW)]).astype(np.float32)
    independent = extract_regions(sims, ["a", "b"], dataclasses.replace(PLAIN, mode="independent"))
    masks = {r.label: r.mask for r in independent.regions}
    np.testing.assert_array_equal(masks["a"], a)
    np.testing.assert_array_equal(masks["b"], b)
    assert (masks["a"] & masks["b"]).sum() == (a & b).sum() > 0  # overlaps allowed
    semantic = extract_regions(sims, ["a", "b"], dataclasses.replace(PLAIN, mode="semantic"))
    masks = {r.label: r.mask for r in semantic.regions}
    np.testing.assert_array_equal(masks["a"], a)           # a wins the overlap (0.30 > 0.27)
    np.testing.assert_array_equal(masks["b"], b & ~a)
    assert not (masks["a"] & masks["b"]).any()


def test_auto_mode_is_semantic_for_several_labels():
    assert RegionConfig().resolved_mode(1) == "independent"
    assert RegionConfig().resolved_mode(3) == "semantic"
    assert RegionConfig(mode="independent").resolved_mode(3) == "independent"


def test_semantic_background_threshold_uses_softmax_over_labels():
    # Both labels present and nearly tied on the right half: p_win = sigmoid(100 * 0.005) = 0.62.
    sims = np.full((2, 20, 40), 0.30, np.float32)
    sims[1, :, :20] = 0.10
    sims[1, :, 20:] = 0.295
    config = RegionConfig(mode="semantic", background_threshold=0.7)
    label_map = assign_semantic(sims, config)
    assert (label_map[:, :20] == 0).all() and (label_map[:, 20:] == BACKGROUND).all()
    assert (assign_semantic(sims, dataclasses.replace(config, background_threshold=0.6))[:, 20:] == 0).all()
    probs = softmax_over_labels(sims, 100.0)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-6)
    assert probs[0, 0, 30] == pytest.approx(1 / (1 + np.exp(-0.5)), rel=1e-4)


def test_semantic_assignment_matches_reference_softmax():
    rng = np.random.default_rng(1)
    sims = (0.2 + 0.03 * rng.standard_normal((5, 30, 30))).astype(np.float32)
    for threshold in (0.0, 0.3, 0.5, 0.8):
        config = RegionConfig(background_threshold=threshold, min_similarity=0.19)
        probs = softmax_over_labels(sims, config.softmax_scale)
        expected = np.where((probs.max(0) >= threshold) & (sims.max(0) >= 0.19), probs.argmax(0), BACKGROUND)
        np.testing.assert_array_equal(assign_semantic(sims, config), expected)


def test_independent_cutoff_meaning():
    config = RegionConfig(min_similarity=0.2, independent_threshold=0.9, relative_threshold=0.0)
    sims = np.linspace(0, 0.4, 101, dtype=np.float32).reshape(1, 1, -1)
    (cut,) = independent_cutoffs(sims, config)
    assert cut == pytest.approx(0.2 + np.log(9) / 100)
    probability = presence_probability(sims, 0.2, 100.0)
    np.testing.assert_array_equal(threshold_independent(sims, config), probability >= 0.9 - 1e-6)
    # the relative part: half-way between the map's low level (0, below the floor) and its peak (0.4)
    (cut,) = independent_cutoffs(sims, dataclasses.replace(config, independent_threshold=0.5, relative_threshold=0.5))
    assert cut == pytest.approx(0.2)


# ----------------------------------------------------------------------------------- absent objects

def test_absent_object_single_label_gives_no_region():
    blob = disk()
    # Same shape, but its similarity never reaches the floor: per-image min-max would still find
    # it; the calibrated threshold does not.
    assert extract_regions(sims_from(blob, low=0.05, high=0.15), ["cat"]).regions == []
    assert extract_regions(smooth_blob((60, 70), 20, peak=0.18)[None], ["cat"]).regions == []
    (region,) = extract_regions(sims_from(blob, low=0.05, high=0.30), ["cat"]).regions
    np.testing.assert_array_equal(region.mask, blob)
    assert len(extract_regions(smooth_blob((60, 70), 20, peak=0.30)[None], ["cat"]).regions) == 1


@pytest.mark.parametrize("level", [0.0, 0.1, 0.19])
def test_flat_low_map_gives_no_region(level):
    result = extract_regions(np.full((2, H, W), level, np.float32), ["a", "b"])
    assert result.regions == [] and result.score == 0.0
    assert extract_regions(np.full((1, H, W), level, np.float32), ["a"]).regions == []


def test_flat_high_map_is_the_whole_image():
    (region,) = extract_regions(np.full((1, H, W), 0.3, np.float32), ["sky"]).regions
    assert region.area == H * W and region.bbox == (0, 0, W, H)


def test_absent_label_among_several_is_not_reported():
    present = disk()
    sims = np.stack([np.where(present, HIGH, LOW), np.full((H, W), 0.12)]).astype(np.float32)
    result = extract_regions(sims, ["cat", "dog"])
    assert [r.label for r in result.regions] == ["cat"]


def test_suggest_min_similarity_separates_peaks():
    assert suggest_min_similarity([0.12, 0.15, 0.17], [0.22, 0.25, 0.31]) == pytest.approx(0.195)
    t = suggest_min_similarity([0.12, 0.15, 0.21], [0.19, 0.25, 0.31])  # overlapping: best balanced split
    assert 0.15 < t < 0.25
    with pytest.raises(ValueError):
        suggest_min_similarity([], [0.3])


# ------------------------------------------------------------------------------------------ scores

def test_stronger_blob_scores_higher():
    scores = []
    for peak in (0.21, 0.23, 0.26, 0.32):
        sims = smooth_blob((60, 70), 20, peak=peak)[None]
        (region,) = extract_regions(sims, ["x"], dataclasses.replace(PLAIN, relative_threshold=0.0)).regions
        scores.append(region.score)
    assert all(0 <= s <= 1 for s in scores)
    assert scores == sorted(scores) and scores[0] < scores[-1]


def test_ambiguous_semantic_region_scores_lower_than_clean_one():
    blob = disk()
    clean = extract_regions(np.stack([np.where(blob, 0.30, LOW), np.where(blob, 0.15, LOW)]).astype(np.float32),
                            ["a", "b"], PLAIN)
    ambiguous = extract_regions(np.stack([np.where(blob, 0.30, LOW), np.where(blob, 0.293, LOW)]).astype(np.float32),
                                ["a", "b"], PLAIN)
    assert [r.label for r in clean.regions] == [r.label for r in ambiguous.regions] == ["a"]
    assert clean.regions[0].score > 0.99
    assert ambiguous.regions[0].score < clean.regions[0].score - 0.2
    assert ambiguous.score < clean.score


def test_scores_follow_their_definitions():
    sims = np.stack([np.where(disk(), 0.23, LOW), np.where(rectangle(y0=0, y1=10), 0.30, LOW)]).astype(np.float32)
    config = dataclasses.replace(PLAIN, mode="independent")
    result = extract_regions(sims, ["a", "b"], config)
    for index, region in enumerate(result.regions):
        expected = presence_probability(sims[index][region.mask], config.min_similarity, config.softmax_scale).mean()
        assert region.score == pytest.approx(expected, rel=1e-5)
    weights = np.array([r.area for r in result.regions])
    assert result.score == pytest.approx(np.average([r.score for r in result.regions], weights=weights))
    assert image_score([]) == 0.0
    assert region_score(np.array([])) == 0.0
    # semantic confidence = softmax over labels x presence
    at = np.array([[0.30, 0.25], [0.28, 0.10]], np.float32)
    expected = 1 / (1 + np.exp(-2.0)) * 1 / (1 + np.exp(-10.0))
    assert pixel_confidence(at, 0, "semantic", RegionConfig())[0] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------- input checks

def test_nan_and_inf_raise_clear_error():
    sims = sims_from(disk(), disk())
    sims[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite.*'dog': 1 px"):
        extract_regions(sims, ["cat", "dog"])
    sims[1, 3, 4] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        extract_regions(sims, ["cat", "dog"])


@pytest.mark.parametrize("sims, labels, match", [
    (np.zeros((2, 10, 10)), ["a"], "2 similarity maps for 1 labels"),
    (np.zeros((10, 10)), ["a", "b"], r"\[L, H, W\]"),
    (np.zeros((1, 0, 10)), ["a"], "empty"),
    (np.zeros((2, 10, 10)), ["a", "a"], "unique"),
    (np.zeros((1, 10, 10), dtype=object), ["a"], "numeric"),
    (np.zeros((1, 10, 10)), [1], "strings"),
])
def test_bad_inputs_raise_clear_errors(sims, labels, match):
    with pytest.raises(ValueError, match=match):
        extract_regions(sims, labels)


def test_image_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"image shape \(10, 12, 3\) does not match .* 10x10"):
        extract_regions(np.zeros((1, 10, 10), np.float32), ["a"], image=np.zeros((10, 12, 3), np.uint8))


def test_empty_label_list_gives_no_regions():
    result = extract_regions(np.zeros((0, 10, 12), np.float32), [])
    assert isinstance(result, ImageRegions)
    assert result.regions == [] and result.score == 0.0 and (result.height, result.width) == (10, 12)
    with pytest.raises(ValueError):
        extract_regions(np.zeros((1, 10, 12), np.float32), [])


def test_two_dimensional_map_accepted_for_one_label():
    (region,) = extract_regions(np.where(disk(), HIGH, LOW).astype(np.float32), ["a"]).regions
    assert region.label == "a"


def test_prompts_are_attached():
    sims = sims_from(disk(center=(60, 40), radius=20), disk(center=(60, 120), radius=20))
    by_list = extract_regions(sims, ["a", "b"], prompts=["a photo of a", None])
    assert [(r.label, r.prompt) for r in by_list.regions] == [("a", "a photo of a"), ("b", None)]
    by_dict = extract_regions(sims, ["a", "b"], prompts={"b": "bee"})
    assert [r.prompt for r in by_dict.regions] == [None, "bee"]
    with pytest.raises(ValueError, match="prompts"):
        extract_regions(sims, ["a", "b"], prompts=["only one"])


def test_result_types():
    result = extract_regions(sims_from(disk()), ["a"])
    assert isinstance(result, ImageRegions) and (result.height, result.width) == (H, W)
    region = result.regions[0]
    assert isinstance(region, Region)
    assert region.mask.dtype == bool and region.mask.shape == (H, W)
    assert all(isinstance(v, int) for v in region.bbox) and isinstance(region.area, int)
    assert isinstance(region.score, float) and 0 <= result.score <= 1


# ---------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("changes", [
    {"mode": "both"}, {"refine": "crf"}, {"background_threshold": 1.5}, {"softmax_scale": 0},
    {"min_area": -1}, {"max_polygon_points": 2}, {"min_similarity": float("nan")}, {"instances": "yes"},
])
def test_invalid_settings_rejected(changes):
    with pytest.raises(ValueError):
        RegionConfig(**changes)
