"""Learning from annotations: coverage, prototypes, blended heatmaps, calibration, predictor API."""
import numpy as np
import pytest
from PIL import Image

from gem_model import HeatmapPredictor, InvalidInputError, create_gem_model
from gem_model.learning import (
    Calibration, CalibrationSample, background_vectors, build_bank, calibrate, grid_coverage, label_heatmaps,
    learned_heatmaps, mean_embedding, segment_grid, task_examples,
)
from gem_model.regions import RegionConfig


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def two_colour_features(h=8, w=8, dim=6, seed=0):
    """Patch features: an object (direction e0) in the top-left quarter, background (e1) elsewhere, plus noise."""
    rng = np.random.default_rng(seed)
    feats = np.zeros((h, w, dim), np.float32)
    feats[..., 1] = 1
    feats[: h // 2, : w // 2] = 0
    feats[: h // 2, : w // 2, 0] = 1
    feats += rng.normal(0, 0.05, feats.shape).astype(np.float32)
    truth = np.zeros((h, w), np.float32)
    truth[: h // 2, : w // 2] = 1
    return unit(feats), truth


def test_grid_coverage_is_the_covered_fraction_of_each_cell():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    cov = grid_coverage(mask, (2, 2))
    assert np.allclose(cov, [[1, 0], [0, 0]])
    # cells straddling pixel edges: 3x3 grid over 10 px -> 3.33 px cells
    cov = grid_coverage(mask, (3, 3))
    assert cov[0, 0] == pytest.approx(1.0)
    assert cov[1, 1] == pytest.approx((5 - 10 / 3) ** 2 / (10 / 3) ** 2, rel=1e-4)
    assert cov[2, 2] == 0
    # mask area is preserved: mean coverage = mask fraction
    rng = np.random.default_rng(0)
    noisy = rng.random((37, 23)) > 0.6
    assert grid_coverage(noisy, (5, 4)).mean() == pytest.approx(noisy.mean(), abs=0.02)
    with pytest.raises(InvalidInputError):
        grid_coverage(np.zeros((0, 3), bool), (2, 2))


def test_mean_embedding_and_background_centroids():
    feats, truth = two_colour_features()
    vector = mean_embedding(feats, truth)
    assert vector is not None and np.argmax(vector) == 0 and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
    assert mean_embedding(feats, np.zeros_like(truth)) is None
    tiny = np.zeros_like(truth)
    tiny[0, 0] = 0.2           # a region smaller than a patch still gives its best patch
    assert np.argmax(mean_embedding(feats, tiny)) == 0
    bg = background_vectors(feats, truth, clusters=3)
    assert 1 <= len(bg) <= 3
    assert np.all(np.argmax(bg, axis=1) == 1)      # no centroid from the claimed object
    assert len(background_vectors(feats, np.ones_like(truth))) == 0


def test_no_examples_leaves_the_text_maps_alone():
    feats, _ = two_colour_features()
    text = np.random.default_rng(1).normal(0.2, 0.05, (2, 8, 8)).astype(np.float32)
    assert np.array_equal(label_heatmaps(feats, text, ["a", "b"], None, floor=0.2), text)
    empty = build_bank([], 4)
    assert np.array_equal(label_heatmaps(feats, text, ["a", "b"], empty, floor=0.2), text)


def test_prototypes_find_the_object_the_text_misses():
    feats, truth = two_colour_features(seed=0)
    example = task_examples("t1", feats, {"obj": truth})
    bank = build_bank([example], max_examples=4)
    other, other_truth = two_colour_features(seed=5)
    text = np.full((1, 8, 8), 0.1, np.float32)     # the text knows nothing: flat and below the floor
    maps = label_heatmaps(other, text, ["obj"], bank, floor=0.2, prior=1.0)
    inside, outside = maps[0][other_truth > 0], maps[0][other_truth == 0]
    assert inside.min() > 0.2 > outside.max()       # margin > 0 exactly on the object
    masks = segment_grid(maps, RegionConfig(mode="independent", relative_threshold=0))
    assert np.array_equal(masks[0], other_truth > 0)
    # more examples weigh more against the text: n / (n + prior)
    bank2 = build_bank([example, task_examples("t2", other, {"obj": other_truth})], 4)
    maps2 = label_heatmaps(other, text, ["obj"], bank2, floor=0.2, prior=1.0)
    assert maps2[0][other_truth > 0].mean() > inside.mean()


def test_negatives_push_a_deleted_look_alike_down():
    feats, truth = two_colour_features()
    lookalike = np.zeros_like(truth)
    lookalike[4:, 4:] = 1
    feats2 = feats.copy()
    feats2[4:, 4:] = unit(np.array([0.8, 0, 0.6, 0, 0, 0]))   # close to the object, but not it
    text = np.zeros((1, 8, 8), np.float32)
    plain = build_bank([task_examples("a", feats2, {"obj": truth}, background=False)], 4)
    with_negative = build_bank([task_examples("a", feats2, {"obj": truth}, {"obj": [lookalike]}, background=False)], 4)
    before = label_heatmaps(feats2, text, ["obj"], plain, floor=0.2)[0]
    after = label_heatmaps(feats2, text, ["obj"], with_negative, floor=0.2)[0]
    assert before[4:, 4:].min() > 0.2 > after[4:, 4:].max()     # kept before, dropped after
    assert after[:4, :4].mean() > after[4:, 4:].mean()


def test_bank_caps_examples_per_label_and_leaves_one_out():
    feats, truth = two_colour_features()
    examples = [task_examples(str(i), feats, {"obj": truth}) for i in range(6)]
    bank = build_bank(examples, max_examples=3)
    assert bank.count("obj") == 3 and bank.labels["obj"].keys == ("3", "4", "5")
    assert len(bank.background) <= 3 * 4
    assert "5" not in build_bank(examples, 3, exclude="5").labels["obj"].keys
    with pytest.raises(InvalidInputError):
        build_bank(examples, 0)


def shifted_samples(count, shift, seed=0):
    """Text maps that are right in shape but sit `shift` too low: the floor must come down by `shift`."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        truth = np.zeros((1, 12, 12), np.float32)
        r, c = rng.integers(0, 6, 2)
        truth[0, r:r + 5, c:c + 5] = 1
        text = (0.2 + 0.1 * truth - shift + rng.normal(0, 0.01, truth.shape)).astype(np.float32)
        samples.append(CalibrationSample(str(i), np.ones((12, 12, 4), np.float32) / 2, text, truth))
    return samples


def test_calibration_recovers_a_shifted_floor():
    config = RegionConfig(mode="independent", relative_threshold=0.0, min_area=0.0)
    samples = shifted_samples(6, shift=0.15)
    before = [segment_grid(s.text_maps, config)[0].sum() for s in samples]
    assert sum(before) < 10                          # the default floor misses everything
    fit = calibrate(samples, ["obj"], config, use_prototypes=False)
    assert fit.offsets["obj"] > 0.02 and fit.iou_after > 0.9 > fit.iou_before
    for s in samples:
        assert np.array_equal(segment_grid(fit.apply(s.text_maps, ["obj"]), config)[0], s.truth[0] > 0)


def test_calibration_keeps_the_defaults_when_they_are_as_good():
    config = RegionConfig(mode="independent", relative_threshold=0.0, min_area=0.0)
    fit = calibrate(shifted_samples(3, shift=0.05), ["obj"], config, use_prototypes=False)
    assert fit.offsets == {} and fit.min_area is None
    assert calibrate([], ["obj"], config) == Calibration()


def test_learned_heatmaps_apply_offsets_after_the_blend():
    feats, truth = two_colour_features()
    text = np.zeros((1, 8, 8), np.float32)
    cal = Calibration(offsets={"obj": 0.05})
    assert np.allclose(learned_heatmaps(feats, text, ["obj"], None, cal, floor=0.2), 0.05)
    assert cal.region_config(RegionConfig()).min_area == RegionConfig().min_area
    assert Calibration(min_area=0.02).region_config(RegionConfig()).min_area == 0.02


# -- predictor API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor(tiny_model_files):
    name, config_path, checkpoint = tiny_model_files
    model = create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path))
    return HeatmapPredictor(model, image_size=64)


def test_patch_embeddings_give_the_same_maps_as_similarity(predictor):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    encoded = predictor.encode([image])[0]
    feats = predictor.patch_embeddings(encoded)
    assert feats.ndim == 3 and np.allclose(np.linalg.norm(feats, axis=-1), 1, atol=1e-4)
    text = predictor.text_embeddings(["cat", "dog"])
    expected = predictor.similarity(encoded, ["cat", "dog"])
    assert np.allclose(predictor.similarity_to(encoded, text * 3.0), expected, atol=1e-5)   # normalised
    grid = np.einsum("hwd,pd->phw", feats, text)
    assert np.allclose(predictor.upsample(grid, encoded), expected, atol=1e-5)
    with pytest.raises(InvalidInputError):
        predictor.similarity_to(encoded, np.ones((2, 3)))


def test_publish_policy_doubles_per_label():
    from gem_model.learning import publish_due

    assert publish_due({}, {"A": 1})                         # the first example of a label
    assert publish_due({"A": 1}, {"A": 1})                   # 2
    assert not publish_due({"A": 2}, {"A": 1})               # 3 waits ...
    assert publish_due({"A": 2}, {"A": 2})                   # ... for 4
    assert not publish_due({"A": 4}, {"A": 3})
    assert publish_due({"A": 4, "B": 1}, {"B": 1})           # each label doubles on its own
    assert publish_due({"A": 4}, {"C": 1})                   # a new label at once
    assert not publish_due({"A": 4}, {})                     # nothing pending: nothing to do
    assert publish_due({"A": 4}, {}, removed=True)           # a deletion at once
    # At the per-label cap (32) a label changes again once all its examples are new.
    assert not publish_due({"A": 32}, {"A": 31}) and publish_due({"A": 32}, {"A": 32})


def test_examples_digest_is_content_and_ignores_float_noise():
    from gem_model.learning import TaskExamples, examples_digest

    rng = np.random.default_rng(0)
    vector = rng.standard_normal(8).astype(np.float32)
    a = TaskExamples("1", positives={"A": vector}, background=np.ones((2, 8), np.float32))
    b = TaskExamples("1", positives={"A": vector + 1e-7}, background=np.ones((2, 8), np.float32))
    c = TaskExamples("1", positives={"B": vector}, background=np.ones((2, 8), np.float32))
    d = TaskExamples("1", positives={"A": vector * 0.5}, background=np.ones((2, 8), np.float32))
    assert examples_digest(a) == examples_digest(b)
    assert len({examples_digest(a), examples_digest(c), examples_digest(d)}) == 3
