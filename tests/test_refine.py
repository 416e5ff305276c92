"""Image-guided edge refinement (gem_model/refine.py) on synthetic scenes with known shapes.

`make_scene` is also used by bench/make_refine_figure.py, so the figures in docs/REGIONS.md show
exactly the scenes these tests check.
"""
import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import draw

from gem_model.errors import InvalidInputError
from gem_model.refine import guide_from_image, guided_filter, refine_label_map, refine_masks
from gem_model.regions import RegionConfig, assign_semantic, extract_regions, threshold_independent

SHAPES = ("disk", "ellipse", "star", "L", "rectangle")


def shape_mask(kind: str, height: int, width: int, rng: np.random.Generator,
               center=None, size=None) -> np.ndarray:
    """A filled shape of about 45-65 % of the short side, at a random place unless given."""
    cy, cx = center if center is not None else rng.uniform(0.35, 0.65, 2) * (height, width)
    s = size if size is not None else rng.uniform(0.22, 0.32) * min(height, width)
    mask = np.zeros((height, width), dtype=bool)
    if kind == "disk":
        rr, cc = draw.disk((cy, cx), s, shape=mask.shape)
    elif kind == "ellipse":
        rr, cc = draw.ellipse(cy, cx, 0.6 * s, 1.2 * s, shape=mask.shape, rotation=rng.uniform(0, np.pi))
    elif kind == "star":
        angles = np.arange(10) * np.pi / 5 + rng.uniform(0, np.pi)
        radii = np.where(np.arange(10) % 2 == 0, 1.2 * s, 0.55 * s)
        rr, cc = draw.polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=mask.shape)
    elif kind == "L":
        y0, x0, side, bar = int(cy - s), int(cx - s), int(2 * s), int(0.7 * s)
        mask[y0:y0 + side, x0:x0 + bar] = True
        mask[y0 + side - bar:y0 + side, x0:x0 + side] = True
        return mask
    elif kind == "rectangle":
        angle = rng.uniform(0, np.pi)
        corners = np.array([[-1.2, -0.6], [1.2, -0.6], [1.2, 0.6], [-1.2, 0.6]]) * s
        rot = corners @ np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]).T
        rr, cc = draw.polygon(cy + rot[:, 0], cx + rot[:, 1], shape=mask.shape)
    else:
        raise ValueError(kind)
    mask[rr, cc] = True
    return mask


def textured_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour gradients, distracting flat-coloured blobs (edges that are not the object), noise."""
    smooth = np.stack([ndimage.zoom(rng.uniform(0, 1, (5, 5)), (height / 5, width / 5), order=3)[:height, :width]
                       for _ in range(3)], axis=-1)
    background = 0.25 + 0.5 * smooth
    for _ in range(6):
        rr, cc = draw.ellipse(rng.uniform(0, height), rng.uniform(0, width),
                              rng.uniform(5, height / 6), rng.uniform(5, width / 6), shape=(height, width))
        background[rr, cc] = rng.uniform(0.1, 0.9, 3)
    return background + rng.normal(0, 0.08, (height, width, 3))


def coarse_heatmap(mask: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
    """What GEM sees of a shape: per-patch coverage, spilling into neighbouring patches, noisy,
    bilinearly upsampled back (like a 28 x 28 patch grid for a 448 px input), in cosine units."""
    height, width = mask.shape
    coverage = mask.reshape(height // patch, patch, width // patch, patch).mean(axis=(1, 3))
    coverage = 0.6 * coverage + 0.4 * ndimage.uniform_filter(coverage, 2)
    coverage = coverage + rng.normal(0, 0.06, coverage.shape)
    up = Image.fromarray(coverage.astype(np.float32)).resize((width, height), Image.BILINEAR)
    return (0.10 + 0.20 * np.asarray(up)).astype(np.float32)


def make_scene(seed: int, size: int = 224, patch: int = 8, kind=None):
    """(image uint8 [H, W, 3], sims float32 [1, H, W], true mask bool [H, W]) of one coloured,
    textured shape on a busy background."""
    rng = np.random.default_rng(seed)
    mask = shape_mask(kind or SHAPES[seed % len(SHAPES)], size, size, rng)
    background = textured_background(size, size, rng)
    stripes = 0.12 * np.sin(np.arange(size)[None, :] / rng.uniform(2, 6) + np.arange(size)[:, None] / rng.uniform(2, 6))
    foreground = rng.uniform(0.15, 0.85, 3) + stripes[..., None] + rng.normal(0, 0.08, (size, size, 3))
    image = (np.clip(np.where(mask[..., None], foreground, background), 0, 1) * 255).astype(np.uint8)
    return image, coarse_heatmap(mask, patch, rng)[None], mask


def make_two_label_scene(seed: int, size: int = 224, patch: int = 8):
    """Two touching shapes of different colours, one label each: (image, sims [2, H, W], masks [2, H, W])."""
    rng = np.random.default_rng(1000 + seed)
    left = shape_mask(SHAPES[seed % len(SHAPES)], size, size, rng, center=(size * 0.5, size * 0.33), size=size * 0.2)
    right = shape_mask(SHAPES[(seed + 2) % len(SHAPES)], size, size, rng,
                       center=(size * 0.5, size * 0.67), size=size * 0.2) & ~left
    image = textured_background(size, size, rng)
    for mask in (left, right):
        image[mask] = rng.uniform(0.1, 0.9, 3) + rng.normal(0, 0.06, (mask.sum(), 3))
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    sims = np.stack([coarse_heatmap(left, patch, rng), coarse_heatmap(right, patch, rng)])
    return image, sims, np.stack([left, right])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def label_mask(result, label: str, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for region in result.regions:
        if region.label == label:
            out |= region.mask
    return out


BASE = RegionConfig()  # default clean-up, as users get it
GUIDED = dataclasses.replace(BASE, refine="guided")


def test_guided_refinement_raises_mean_iou_independent():
    before, after = [], []
    for seed in range(10):
        image, sims, truth = make_scene(seed)
        before.append(iou(label_mask(extract_regions(sims, ["x"], BASE, image=image), "x", truth.shape), truth))
        after.append(iou(label_mask(extract_regions(sims, ["x"], GUIDED, image=image), "x", truth.shape), truth))
    before, after = np.array(before), np.array(after)
    assert after.mean() > before.mean() + 0.02, (before.mean(), after.mean())
    assert (after > before).sum() >= 8


def test_guided_refinement_raises_mean_iou_semantic():
    before, after = [], []
    for seed in range(6):
        image, sims, truth = make_two_label_scene(seed)
        plain = extract_regions(sims, ["a", "b"], BASE, image=image)
        refined = extract_regions(sims, ["a", "b"], GUIDED, image=image)
        for index, label in enumerate(["a", "b"]):
            before.append(iou(label_mask(plain, label, truth[0].shape), truth[index]))
            after.append(iou(label_mask(refined, label, truth[0].shape), truth[index]))
        # semantic stays one label per pixel after refinement
        assert not (label_mask(refined, "a", truth[0].shape) & label_mask(refined, "b", truth[0].shape)).any()
    assert np.mean(after) > np.mean(before) + 0.02, (np.mean(before), np.mean(after))


def test_guided_filter_keeps_constants_and_partition_of_unity():
    image, _, truth = make_scene(3, size=96, patch=8)
    guide = guide_from_image(image, 96, 96)
    parts = np.stack([truth, ~truth]).astype(np.float32)
    out = guided_filter(guide, np.concatenate([parts, np.full((1, 96, 96), 0.3, np.float32)]), 6, 1e-3)
    np.testing.assert_allclose(out[0] + out[1], 1.0, atol=1e-4)
    np.testing.assert_allclose(out[2], 0.3, atol=1e-4)


def test_windowed_evaluation_matches_full_filter():
    """refine_* only evaluate each label near its own pixels; that must equal filtering everything."""
    image, sims, _ = make_two_label_scene(1, size=160)
    guide = guide_from_image(image, 160, 160)
    config = RegionConfig(mode="semantic")
    label_map = assign_semantic(sims, config)
    classes = np.array([-1, 0, 1])
    filtered = guided_filter(guide, (label_map[None] == classes[:, None, None]).astype(np.float32), 6, 1e-3, 64)
    np.testing.assert_array_equal(refine_label_map(label_map, 2, guide, 6, 1e-3, 64), classes[filtered.argmax(0)])
    masks = threshold_independent(sims, RegionConfig(mode="independent"))
    filtered = guided_filter(guide, masks.astype(np.float32), 6, 1e-3, 64)
    np.testing.assert_array_equal(refine_masks(masks, guide, 6, 1e-3, 64), filtered >= 0.5)


def test_refinement_of_nothing_is_nothing():
    guide = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    assert not refine_masks(np.zeros((2, 40, 50), bool), guide, 4, 1e-3).any()
    assert (refine_label_map(np.full((40, 50), -1, np.int32), 3, guide, 4, 1e-3) == -1).all()


def test_guided_refine_needs_the_image():
    _, sims, _ = make_scene(0, size=64)
    with pytest.raises(InvalidInputError, match="image"):
        extract_regions(sims, ["x"], GUIDED)


@pytest.mark.parametrize("image", [
    np.zeros((30, 40), np.uint8), np.zeros((30, 40, 4), np.uint8), np.zeros((30, 40, 3), np.float32),
])
def test_guide_accepts_grey_rgba_and_float(image):
    guide = guide_from_image(image, 30, 40)
    assert guide.shape == (3, 30, 40) and guide.dtype == np.float32


@pytest.mark.parametrize("image", [np.zeros((30, 41, 3), np.uint8), np.zeros((30, 40, 2), np.uint8)])
def test_guide_rejects_wrong_shapes(image):
    with pytest.raises(ValueError, match="image"):
        guide_from_image(image, 30, 40)
