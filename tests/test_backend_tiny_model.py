"""The backend with the real gem_model pipeline on a tiny random open_clip ViT.

Random weights make the regions meaningless, so thresholds are opened up (every pixel goes to
some label) and the tests check what does not depend on the weights: shapes, names, encodings,
agreement with calling gem_model directly, and EXIF handling.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, MIXED_CONFIG, POLYGON_CONFIG, RECTANGLE_CONFIG

EXIF_ORIENTATION = 0x0112


def _env(tiny_model_files, tmp_path, **extra):
    name, config_path, checkpoint_path = tiny_model_files
    return {"GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path), "GEM_PRETRAINED": str(checkpoint_path),
            "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "GEM_BATCH_SIZE": "2", "MODEL_DIR": str(tmp_path),
            # Random weights: let every pixel belong to its best label so regions are never empty.
            "GEM_MIN_SIMILARITY": "-1", "GEM_BACKGROUND_THRESHOLD": "0", "GEM_MIN_AREA": "0", **extra}


@pytest.fixture(scope="module")
def app(tiny_model_files, tmp_path_factory):
    settings = Settings.from_env(_env(tiny_model_files, tmp_path_factory.mktemp("model_data")))
    app = create_app(settings)
    app.extensions["gem"].model.wait_until_ready(120)
    yield app
    app.extensions["gem"].model.close()


def _png(image: Image.Image, exif_orientation: int | None = None) -> str:
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buffer, format="PNG", **kwargs)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image(width=48, height=36, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = (rng.random((height // 6, width // 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(array).resize((width, height), Image.NEAREST)


def _predict(app, tasks, config, context=None):
    reply = app.test_client().post("/predict", json={
        "tasks": tasks, "label_config": config, "project": "1.1", "params": {"context": context}})
    assert reply.status_code == 200, reply.get_json()
    return reply.get_json()["results"]


def _mask(item):
    return decode_rle(item["value"]["rle"]).reshape(item["original_height"], item["original_width"], 4)[..., 3] > 0


def test_health_reports_ready_model(app):
    body = app.test_client().get("/health").get_json()
    assert body["model_ready"] is True and body["model_version"].startswith("gem-gem-test-tiny-")


@pytest.mark.parametrize("config,rtype", [(BRUSH_CONFIG, "brushlabels"), (POLYGON_CONFIG, "polygonlabels"),
                                          (RECTANGLE_CONFIG, "rectanglelabels"), (MIXED_CONFIG, None)])
def test_each_config_gives_valid_predictions(app, config, rtype):
    tasks = [{"id": i, "data": {"image": _png(_image(seed=i))}} for i in range(3)]
    results = _predict(app, tasks, config)
    interface = LabelInterface(config)
    assert len(results) == 3
    for prediction in results:
        assert prediction["result"]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        for item in prediction["result"]:
            assert (item["original_width"], item["original_height"]) == (48, 36)
            assert rtype is None or item["type"] == rtype
    if rtype is None:
        assert {i["type"] for i in results[0]["result"]} == {"brushlabels", "polygonlabels", "rectanglelabels"}


def test_brush_masks_equal_gem_model_regions(app):
    """The HTTP answer decodes to exactly what gem_model gives when called directly."""
    from gem_model.regions import extract_regions

    model = app.extensions["gem"].model
    image = _image(seed=7)
    (prediction,) = _predict(app, [{"id": 1, "data": {"image": _png(image)}}], BRUSH_CONFIG)
    predictor = model._predictor
    encoded = predictor.encode([image])[0]
    sims = predictor.similarity(encoded, ["Bright", "Dark"])
    expected = extract_regions(sims, labels=["Bright", "Dark"], config=model.settings.region_config(),
                               image=np.asarray(image))
    got = {item["value"]["brushlabels"][0]: _mask(item) for item in prediction["result"]}
    assert set(got) == {r.label for r in expected.regions}
    for region in expected.regions:
        assert np.array_equal(got[region.label], region.mask)
    assert model.settings.task_score == ("regions",)     # the task score's default: the regions' confidence
    assert prediction["score"] == pytest.approx(expected.score, abs=1e-3)


def test_exif_rotated_image_gives_the_regions_of_the_rotated_image(app):
    stored = _image(width=48, height=36, seed=3)
    displayed = stored.transpose(Image.Transpose.ROTATE_270)   # what orientation 6 shows: 36 wide, 48 high
    with_exif, rotated = _predict(app, [{"id": 1, "data": {"image": _png(stored, exif_orientation=6)}},
                                        {"id": 2, "data": {"image": _png(displayed)}}], MIXED_CONFIG)
    assert with_exif["result"]
    for a, b in zip(with_exif["result"], rotated["result"]):
        assert (a["original_width"], a["original_height"]) == (36, 48)
        assert (a["type"], a["from_name"]) == (b["type"], b["from_name"])
        value_a = {k: v for k, v in a["value"].items() if k != "rle"}
        value_b = {k: v for k, v in b["value"].items() if k != "rle"}
        assert value_a == value_b
        if a["type"] == "brushlabels":
            assert np.array_equal(_mask(a), _mask(b))


def test_interactive_text_prompt_with_real_model(app):
    (prediction,) = _predict(app, [{"id": 1, "data": {"image": _png(_image())}}], MIXED_CONFIG,
                             context={"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                                  "value": {"text": ["a small dog"]}}]})
    # One prompt, attached to the first label: independent thresholding, one region per control kind.
    assert prediction["result"]
    assert {i["value"][i["type"]][0] for i in prediction["result"]} == {"Bright"}


def test_failed_model_load_is_reported(tiny_model_files, tmp_path):
    settings = Settings.from_env(_env(tiny_model_files, tmp_path, GEM_PRETRAINED=str(tmp_path / "missing.pt")))
    app = create_app(settings)
    model = app.extensions["gem"].model
    with pytest.raises(Exception, match="failed to load"):
        model.wait_until_ready(60)
    client = app.test_client()
    assert "missing.pt" in client.get("/health").get_json()["model_error"]
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": _png(_image())}}],
                                          "label_config": BRUSH_CONFIG})
    assert reply.status_code == 503 and "failed to load" in reply.get_json()["error"]
    model.close()


def test_large_photo_is_answered_at_its_original_size(app):
    """A 1600x1200 JPEG, turned by EXIF: regions come from the working resolution, the answer is in the
    original frame: brush masks decode at full size, boxes and polygons stay inside, one box per part."""
    rng = np.random.default_rng(3)
    array = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    photo = Image.fromarray(array).resize((1600, 1200), Image.NEAREST)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    photo.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    (prediction,) = _predict(app, [{"id": 1, "data": {"image": uri}}], MIXED_CONFIG)
    result = prediction["result"]
    assert result and LabelInterface(MIXED_CONFIG).validate_prediction(prediction, return_errors=True) == []
    by_type: dict = {}
    for item in result:
        assert (item["original_width"], item["original_height"]) == (1200, 1600)
        by_type.setdefault(item["type"], []).append(item)
        if item["type"] == "brushlabels":
            assert _mask(item).shape == (1600, 1200) and _mask(item).any()
        elif item["type"] == "rectanglelabels":
            v = item["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100.0001 and v["y"] + v["height"] <= 100.0001
        else:
            points = np.array(item["value"]["points"])
            assert points.min() >= 0 and points.max() <= 100
    labels = lambda kind: sorted(i["value"][kind][0] for i in by_type[kind])  # noqa: E731
    assert labels("rectanglelabels") == labels("polygonlabels")         # one box per part, as polygons


@pytest.mark.parametrize("method", ["clearclip", "naclip"])
def test_other_methods_with_windows_and_pamr_give_valid_predictions(tiny_model_files, tmp_path, method):
    settings = Settings.from_env(_env(tiny_model_files, tmp_path, GEM_METHOD=method, GEM_SLIDE_CROP="32",
                                      GEM_SLIDE_STRIDE="16", GEM_PAMR_ITERS="2"))
    app = create_app(settings)
    try:
        model = app.extensions["gem"].model
        model.wait_until_ready(120)
        assert model.ready, model.load_error
        tasks = [{"id": i, "data": {"image": _png(_image(width=120, height=72, seed=i))}} for i in range(2)]
        results = _predict(app, tasks, MIXED_CONFIG)
        interface = LabelInterface(MIXED_CONFIG)
        for prediction in results:
            assert prediction["result"] and prediction["model_version"].startswith(model.model_version + "+c")
            assert interface.validate_prediction(prediction, return_errors=True) == []
    finally:
        app.extensions["gem"].model.close()
