"""Aspect-preserving preprocessing, cached encoding and maps at the original resolution."""
import numpy as np
import pytest
import torch
from PIL import Image

from gem_model import (EncodedImage, HeatmapPredictor, ImageFeatures, InvalidInputError,
                       create_gem_model, get_gem_img_transform, target_size)


@pytest.fixture(scope="module")
def model(tiny_model_files):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path))


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,mode,expected", [
    ((1080, 1920), "short", (448, 800)),
    ((1080, 1920), "long", (256, 448)),
    ((1920, 1080), "short", (800, 448)),
    ((500, 500), "square", (448, 448)),
    ((100, 30000), "short", (16, 1792)),   # capped at 4 x image_size on the long side
    ((1, 1), "short", (448, 448)),
])
def test_target_size_keeps_aspect_and_patch_multiples(size, mode, expected):
    assert target_size(*size, image_size=448, patch_size=16, resize_mode=mode) == expected


def test_target_size_rejects_bad_arguments():
    with pytest.raises(InvalidInputError):
        target_size(10, 10, resize_mode="stretch")
    with pytest.raises(InvalidInputError):
        target_size(0, 10)


def test_transform_keeps_left_things_on_the_left():
    image = np.zeros((120, 360, 3), np.uint8)
    image[40:80, 10:60] = (255, 0, 0)      # red blob at the left of a wide image
    tensor = get_gem_img_transform(64, "short", patch_size=8)(Image.fromarray(image))
    assert tensor.shape == (3, 64, 192)
    red = tensor[0] - tensor[1]
    ys, xs = np.nonzero(red.numpy() > 2.0)
    assert xs.min() >= 3 and xs.max() <= 33       # 10..60 px of 360 -> 5.3..32 of 192
    assert ys.min() >= 19 and ys.max() <= 44      # 40..80 px of 120 -> 21..43 of 64


def test_similarity_maps_patches_back_onto_the_original_frame(model):
    """A patch that matches the prompt lights up the same place of the original image."""
    predictor = HeatmapPredictor(model, image_size=64)
    original = (120, 360)
    size = predictor.input_size(random_image(*original))
    h, w = size[0] // 8, size[1] // 8
    text = model.encode_text(["cat"])[0]
    for r, c in [(1, 2), (6, 20), (4, 12)]:
        gem = torch.zeros(1, h, w, text.shape[0])
        gem[0, r, c] = text
        encoded = EncodedImage(ImageFeatures(gem, None, size), original, size, key="test")
        maps = predictor.similarity(encoded, ["cat"])
        assert maps.shape == (1, *original)
        y, x = np.unravel_index(maps[0].argmax(), original)
        assert abs(y - (r + 0.5) * original[0] / h) <= original[0] / h / 2
        assert abs(x - (c + 0.5) * original[1] / w) <= original[1] / w / 2


def test_predictor_matches_the_model_on_the_same_input(model):
    predictor = HeatmapPredictor(model, image_size=64)
    image = random_image(64, 96)          # already at the input size: no resampling involved
    maps = predictor.similarity(predictor.encode([image])[0], ["cat", "dog"])
    direct = model(predictor.transform(image)[None], ["cat", "dog"], normalize=False)[0].numpy()
    assert np.allclose(maps, direct, atol=1e-6)


def test_batch_of_mixed_sizes_equals_one_by_one(model):
    images = [random_image(60, 90, 1), random_image(90, 60, 2), random_image(60, 90, 3),
              np.asarray(random_image(50, 50, 4))]
    batched = HeatmapPredictor(model, image_size=48, cache_bytes=0)
    single = HeatmapPredictor(model, image_size=48, cache_bytes=0)
    encoded = batched.encode(images, batch_size=2)
    for image, enc in zip(images, encoded):
        alone = single.encode([image])[0]
        assert enc.original_size == alone.original_size
        assert np.allclose(batched.similarity(enc, ["cat"]), single.similarity(alone, ["cat"]),
                           atol=1e-5)


def test_feature_cache_hits_and_stays_bounded(model):
    predictor = HeatmapPredictor(model, image_size=32)
    image = random_image(40, 40)
    first = predictor.encode([image])[0]
    second = predictor.encode([image.copy()])[0]
    assert not first.cached and second.cached
    assert np.array_equal(predictor.similarity(first, ["cat"]), predictor.similarity(second, ["cat"]))
    one_item = predictor.cache.nbytes
    predictor.cache.max_bytes = 3 * one_item
    predictor.encode([random_image(40, 40, seed) for seed in range(1, 10)])
    assert len(predictor.cache) == 3 and predictor.cache.nbytes <= 3 * one_item


def test_set_image_then_predict(model):
    predictor = HeatmapPredictor(model, image_size=32)
    with pytest.raises(InvalidInputError):
        predictor.predict(["cat"])
    image = random_image(30, 50)
    predictor.set_image(image)
    assert np.array_equal(predictor.predict(["cat"]),
                          predictor.similarity(predictor.encode([image])[0], ["cat"]))


@pytest.mark.parametrize("image", [
    np.zeros((0, 5, 3), np.uint8), np.zeros((5, 5, 2), np.uint8),
    np.full((5, 5, 3), np.nan, np.float32), "not an image"])
def test_bad_images_get_clear_errors(model, image):
    with pytest.raises(InvalidInputError):
        HeatmapPredictor(model, image_size=32).encode([image])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_any_pil_mode_is_accepted(model, mode):
    image = random_image(24, 40).convert(mode) if mode != "I;16" else Image.new("I;16", (40, 24), 300)
    predictor = HeatmapPredictor(model, image_size=32)
    predictor.set_image(image)
    assert predictor.predict(["cat"]).shape == (1, 24, 40)


def test_similarity_at_a_working_size(model):
    """Maps can be asked at any size, e.g. the regions' working size, a multiple of the patch grid."""
    from gem_model.regions import RegionConfig, working_size

    predictor = HeatmapPredictor(model, image_size=64)
    image = random_image(300, 400)
    encoded = predictor.encode([image])[0]
    grid = predictor.grid_size(encoded)
    assert grid == (encoded.input_size[0] // predictor.patch, encoded.input_size[1] // predictor.patch)
    work = working_size((300, 400), grid, RegionConfig(work_scale=2))
    assert work == (2 * grid[0], 2 * grid[1])
    small = predictor.similarity(encoded, ["cat"], output_size=work)
    assert small.shape == (1, *work) and small.dtype == np.float32
    full = predictor.similarity(encoded, ["cat"])
    assert full.shape == (1, 300, 400)
    # both are bilinear views of the same grid: the reduced full map is close to the working map
    reduced = np.asarray(Image.fromarray(full[0]).resize(work[::-1], Image.BOX))
    assert np.abs(reduced - small[0]).max() < 0.1 * (np.ptp(full) + 1e-6)
    with pytest.raises(InvalidInputError):
        predictor.similarity(encoded, ["cat"], output_size=(0, 5))
