"""Regions at the working resolution (gem_model/regions.py): a large image gives the regions of the
same scene at a lower resolution, scaled; geometry stays inside the image; one box per object."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from gem_model.masks import cell_starts, polygons_to_mask, upsample_mask
from gem_model.regions import RegionConfig, extract_regions, working_size
from test_refine import iou, make_scene, make_two_label_scene

PLAIN = RegionConfig()
GUIDED = dataclasses.replace(PLAIN, refine="guided")


def enlarge(image: np.ndarray, factor: int) -> np.ndarray:
    """The same scene photographed with `factor` times more pixels per side."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


@pytest.mark.parametrize("config", [PLAIN, GUIDED, dataclasses.replace(GUIDED, mode="independent")],
                         ids=["plain", "guided", "guided-independent"])
@pytest.mark.parametrize("seed", [0, 3])
def test_large_image_gives_the_small_scenes_regions_scaled(config, seed):
    image, sims, _ = make_two_label_scene(seed)                       # 224 px, maps on a 28-patch grid
    small = extract_regions(sims, ["a", "b"], config, image=image)
    factor = 5                                                        # 1120 x 1120 "photo"
    big_image = enlarge(image, factor)
    big = extract_regions(sims, ["a", "b"], config, image=big_image, size=big_image.shape[:2])
    assert (big.height, big.width) == (224 * factor, 224 * factor)
    assert [r.label for r in big.regions] == [r.label for r in small.regions] and small.regions
    for s, b in zip(small.regions, big.regions):
        assert b.bbox == tuple(factor * v for v in s.bbox)
        assert b.boxes == [tuple(factor * v for v in box) for box in s.boxes]
        assert b.area == factor ** 2 * s.area
        assert len(b.polygons) == len(s.polygons)
        for ps, pb in zip(s.polygons, b.polygons):
            np.testing.assert_allclose(pb, factor * ps)
        assert np.array_equal(b.mask, enlarge(s.mask, factor))
        assert b.score == pytest.approx(s.score)
    assert big.score == pytest.approx(small.score)


def test_working_resolution_agrees_with_full_resolution_processing():
    """Regions made at 224 px and scaled match those made from maps upsampled to the full 896 px."""
    ious = []
    for seed in range(6):
        image, sims, truth = make_scene(seed)
        big_image = enlarge(image, 4)
        full_sims = np.stack([np.asarray(Image.fromarray(m).resize((896, 896), Image.BILINEAR)) for m in sims])
        for config in (PLAIN, GUIDED):
            work = extract_regions(sims, ["x"], config, image=big_image, size=(896, 896))
            full = extract_regions(full_sims, ["x"], config, image=big_image)
            ious.append(iou(work.regions[0].mask, full.regions[0].mask))
            # and both are as good against the truth as the small scene
            assert iou(work.regions[0].mask, enlarge(truth, 4)) > 0.9
    assert min(ious) > 0.95, ious


@pytest.mark.parametrize("size", [(1001, 777), (333, 1500), (225, 224), (3000, 4000)])
def test_polygons_and_boxes_stay_inside_the_image(size):
    height, width = size
    rng = np.random.default_rng(height)
    grid = rng.normal(0.15, 0.08, (3, 14, 18)).astype(np.float32)
    grid[:, 0, :] = grid[:, :, -1] = 0.4                               # labels touching the borders
    h, w = working_size((height, width), (14, 18))
    sims = np.stack([np.asarray(Image.fromarray(g).resize((w, h), Image.BILINEAR)) for g in grid])
    for config in (PLAIN, dataclasses.replace(PLAIN, instances=True), dataclasses.replace(PLAIN, mode="independent")):
        result = extract_regions(sims, ["a", "b", "c"], config, size=size)
        assert result.regions
        for region in result.regions:
            mask = region.mask
            assert mask.shape == size and mask.sum() == region.area
            x0, y0, x1, y1 = region.bbox
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert mask[y0:y1, x0:x1].sum() == region.area                 # the box holds the mask
            assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
            for bx0, by0, bx1, by1 in region.boxes:
                assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
            for polygon in region.polygons:
                assert polygon.min() >= 0
                assert polygon[:, 0].max() <= width and polygon[:, 1].max() <= height


def test_unsimplified_polygon_rasterises_to_the_full_size_mask():
    """Scaling is exact in the pixel-corner frame: the scaled outline filled by pixel centres is the mask."""
    sims = np.full((1, 20, 30), 0.1, np.float32)
    sims[0, 4:15, 6:20] = 0.5
    sims[0, 8:11, 9:13] = 0.1                                          # a hole (kept in the mask only)
    config = dataclasses.replace(PLAIN, polygon_tolerance=0, fill_holes_area=0, min_area=0)
    for size in [(60, 90), (47, 71)]:
        (region,) = extract_regions(sims, ["x"], config, size=size).regions
        filled = polygons_to_mask(region.polygons, *size)
        outer = upsample_mask(np.pad(np.ones((11, 14), bool), ((4, 5), (6, 10))), *size)
        assert np.array_equal(filled, outer)
        assert region.bbox == (int(cell_starts(30, size[1])[6]), int(cell_starts(20, size[0])[4]),
                               int(cell_starts(30, size[1])[20]), int(cell_starts(20, size[0])[15]))


def test_one_box_per_object_by_default_one_per_label_on_request():
    sims = np.full((1, 40, 60), 0.1, np.float32)
    sims[0, 5:15, 5:20] = 0.5                                          # dog one
    sims[0, 20:35, 30:55] = 0.5                                        # dog two, larger
    config = dataclasses.replace(PLAIN, min_area=0)
    (region,) = extract_regions(sims, ["dog"], config, size=(400, 600)).regions
    assert region.boxes == [(300, 200, 550, 350), (50, 50, 200, 150)]   # largest first, like polygons
    assert region.bbox == (50, 50, 550, 350)
    assert len(region.polygons) == 2
    (one,) = extract_regions(sims, ["dog"], dataclasses.replace(config, rectangles="label"), size=(400, 600)).regions
    assert one.boxes == [one.bbox] == [(50, 50, 550, 350)]
    parts = extract_regions(sims, ["dog"], dataclasses.replace(config, instances=True), size=(400, 600)).regions
    assert [p.boxes for p in parts] == [[(300, 200, 550, 350)], [(50, 50, 200, 150)]]


def test_size_and_image_checks():
    sims = np.zeros((1, 20, 30), np.float32)
    with pytest.raises(ValueError, match="smaller than the similarity maps"):
        extract_regions(sims, ["x"], size=(10, 30))
    with pytest.raises(ValueError, match="does not match"):
        extract_regions(sims, ["x"], GUIDED, image=np.zeros((41, 60, 3), np.uint8), size=(40, 60))
    extract_regions(sims, ["x"], GUIDED, image=np.zeros((40, 60, 3), np.uint8), size=(40, 60))
    extract_regions(sims, ["x"], GUIDED, image=np.zeros((20, 30, 3), np.uint8), size=(40, 60))
    with pytest.raises(ValueError, match="rectangles"):
        RegionConfig(rectangles="one")
    with pytest.raises(ValueError, match="work_scale"):
        RegionConfig(work_scale=0)


def test_working_size_follows_the_patch_grid_and_never_exceeds_the_image():
    assert working_size((3000, 4000), (28, 37)) == (224, 296)
    assert working_size((600, 800), (28, 37)) == (224, 296)              # same model input, same work
    assert working_size((100, 120), (28, 34)) == (100, 120)              # small images stay as they are
    assert working_size((3000, 4000), (28, 37), RegionConfig(work_scale=16)) == (448, 592)
    # guided refinement follows image edges: at least refine_max_side pixels on the long side
    assert working_size((3000, 4000), (28, 37), GUIDED) == (387, 512)
    assert working_size((300, 400), (28, 37), GUIDED) == (300, 400)


def test_area_settings_in_pixels_mean_original_pixels():
    sims = np.full((1, 40, 40), 0.1, np.float32)
    sims[0, 2:6, 2:6] = 0.5                                            # 16 working px = 1600 original px
    config = dataclasses.replace(PLAIN, fill_holes_area=0)
    assert extract_regions(sims, ["x"], dataclasses.replace(config, min_area=1500), size=(400, 400)).regions
    assert not extract_regions(sims, ["x"], dataclasses.replace(config, min_area=1700), size=(400, 400)).regions
