"""Visual exemplars: example boxes and clicks as Label Studio sends them, one way of building a
label's map (text, learned state, exemplars), PAMR on every path, and regions never repeated."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.label_config import parse_label_config
from backend.pipeline import PredictionPipeline, ProjectLearned
from backend.prompts import exemplars_from_context, plan_prompts
from backend.settings import Settings
from backend_fixtures import FakePredictor, data_uri
from gem_model.exemplars import Exemplar, build_label_maps, exemplar_coverage, exemplar_vectors
from gem_model.learning import Calibration, LearnedMaps

W, H = 120, 80
DISKS = [(8, 8, 28, 28), (50, 40, 70, 60), (90, 10, 110, 30)]       # three like objects (red)
SQUARES = [(10, 50, 26, 66), (60, 8, 76, 24)]                       # unlike (blue)
LOOKALIKE = (92, 50, 108, 66)                                       # orange: near red in colour

SMART_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Disk"/><Label value="Not this" negative="true"/>
  </RectangleLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Disk"/></KeyPointLabels>
  <BrushLabels name="brush" toName="image"><Label value="Disk"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Disk"/></PolygonLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
</View>"""


def scene(lookalike: bool = True) -> Image.Image:
    image = Image.new("RGB", (W, H), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for box in DISKS:
        draw.ellipse(box, fill=(255, 0, 0))
    for box in SQUARES:
        draw.rectangle(box, fill=(0, 0, 255))
    if lookalike:
        draw.rectangle(LOOKALIKE, fill=(255, 160, 0))
    return image


def _png_uri(image: Image.Image) -> str:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def box_item(box, label="Disk", from_name="box"):
    """A smart box as Label Studio 1.23 sends it in context.result (percent of the image)."""
    x0, y0, x1, y1 = box
    return {"id": "ex1", "type": "rectanglelabels", "from_name": from_name, "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0, "origin": "manual",
            "value": {"x": 100 * x0 / W, "y": 100 * y0 / H, "width": 100 * (x1 - x0) / W,
                      "height": 100 * (y1 - y0) / H, "rotation": 0, "rectanglelabels": [label]}}


def point_item(x, y, positive=True, label="Disk"):
    return {"id": "kp1", "type": "keypointlabels", "from_name": "point", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0, "origin": "manual",
            "is_positive": positive,
            "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 0.6, "keypointlabels": [label]}}


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _pipeline(tmp_path, **settings):
    return PredictionPipeline(Settings(model_dir=str(tmp_path), **settings), FakePredictor(),
                              model_version="test-v1")


def _predict(pipeline, context, image=None, learned=None):
    job = pipeline.prepare(SMART_CONFIG, context=context, learned=learned)
    predictions, _ = pipeline.predict([{"id": 1, "data": {"image": _png_uri(image or scene())}}], job)
    return predictions[0]["result"]


def _union(items, kind):
    from backend.decode import item_mask

    masks = [item_mask(i, H, W) for i in items if i["type"] == kind]
    return np.any(masks, axis=0) if masks else np.zeros((H, W), bool)


def _hit(mask, box) -> float:
    """Fraction of the shape's box centre area (inner half) that the mask covers."""
    x0, y0, x1, y1 = box
    qx, qy = (x1 - x0) // 4, (y1 - y0) // 4
    return float(mask[y0 + qy:y1 - qy, x0 + qx:x1 - qx].mean())


# -- gem_model maths --------------------------------------------------------------------------


def test_box_coverage_is_the_fraction_of_each_cell_inside_it():
    cover = exemplar_coverage(Exemplar("a", box=(0.25, 0.0, 0.625, 0.5)), (4, 4))
    assert cover[0].tolist() == [0.0, 1.0, 0.5, 0.0] and cover[2:].sum() == 0
    point = exemplar_coverage(Exemplar("a", point=(0.99, 0.01)), (4, 4))
    assert point[0, 3] == 1 and point.sum() == 1
    with pytest.raises(ValueError):
        Exemplar("a", box=(0.5, 0.5, 0.2, 0.9))


def _grid_features(rng):
    """[6, 6, 8]: three 'A' patches, two 'B', one 'A2' (a look-alike of A), noisy background."""
    base = {k: v / np.linalg.norm(v) for k, v in {"A": rng.normal(size=8), "B": rng.normal(size=8)}.items()}
    base["A2"] = base["A"] + 0.5 * rng.normal(size=8)
    features = rng.normal(size=(6, 6, 8)) * 0.3
    where = {"A": [(0, 0), (3, 3), (5, 1)], "B": [(0, 5), (2, 2)], "A2": [(5, 5)]}
    for kind, cells in where.items():
        for cell in cells:
            features[cell] = base[kind] + 0.05 * rng.normal(size=8)
    features /= np.linalg.norm(features, axis=2, keepdims=True)
    return features.astype(np.float32), where


def test_one_positive_example_lights_every_like_patch_and_a_negative_removes_the_lookalike():
    features, where = _grid_features(np.random.default_rng(0))
    one = Exemplar("A", box=(0, 0, 1 / 6, 1 / 6))                                   # the (0, 0) patch
    maps = build_label_maps(features, ["A"], {}, 0.2, exemplars=exemplar_vectors(features, [one]))[0]
    found = maps > 0.2
    assert all(found[c] for c in where["A"]) and not any(found[c] for c in where["B"])
    assert found[5, 5]                                                            # the look-alike too ...
    negative = Exemplar("A", positive=False, point=(5.5 / 6, 5.5 / 6))
    maps = build_label_maps(features, ["A"], {}, 0.2, exemplars=exemplar_vectors(features, [one, negative]))[0]
    assert not maps[5, 5] > 0.2 and all(maps[c] > 0.2 for c in where["A"])       # ... until it is excluded


def test_text_and_examples_are_blended_by_the_number_of_examples():
    features, _ = _grid_features(np.random.default_rng(1))
    text = np.full((6, 6), 0.5, np.float32)
    boxes = [Exemplar("A", box=(0, 0, 1 / 6, 1 / 6)), Exemplar("A", box=(0.5, 0.5, 4 / 6, 4 / 6))]
    vectors = exemplar_vectors(features, boxes[:1])
    alone = build_label_maps(features, ["A"], {}, 0.2, exemplars=vectors)[0]
    both = build_label_maps(features, ["A"], {"A": text}, 0.2, exemplars=vectors)[0]
    assert np.allclose(both, 0.5 * text + 0.5 * alone, atol=1e-6)                 # one example: half and half
    vectors = exemplar_vectors(features, boxes)
    alone = build_label_maps(features, ["A"], {}, 0.2, exemplars=vectors)[0]
    both = build_label_maps(features, ["A"], {"A": text}, 0.2, exemplars=vectors)[0]
    assert np.allclose(both, text / 3 + 2 * alone / 3, atol=1e-6)                 # two: 2/3 to the examples


def test_learned_state_shapes_the_text_part():
    features, _ = _grid_features(np.random.default_rng(2))
    text = {"A": np.full((6, 6), 0.3, np.float32)}
    learned = LearnedMaps(calibration=Calibration(offsets={"A": -0.05}))
    assert np.allclose(build_label_maps(features, ["A"], text, 0.2, learned)[0], 0.25)


# -- Label Studio bodies ------------------------------------------------------------------------


def test_context_regions_become_exemplars_with_their_sign():
    plan = parse_label_config(SMART_CONFIG)
    assert {e.name for e in plan.exemplar_inputs} == {"box", "point"}
    assert all(label.value != "Not this" for c in plan.controls for label in c.labels)   # never predicted
    context = {"result": [
        box_item(DISKS[0]), box_item(LOOKALIKE, label="Not this"),
        point_item(*_centre(DISKS[1])), point_item(*_centre(SQUARES[0]), positive=False),
        {"type": "keypointlabels", "from_name": "point", "value": {"x": "a lot"}},       # malformed: skipped
        {"type": "rectanglelabels", "from_name": "box", "value": {"x": 1, "y": 1, "width": 0, "height": 5}},
    ]}
    predicted = dict(box_item(SQUARES[1]), origin="prediction")       # a pre-annotation: not an example
    context["result"].append(predicted)
    found = exemplars_from_context(context, plan)["image"]
    assert [(e.label, e.positive, e.box is not None) for e in found] == [
        ("Disk", True, True), (None, False, True), ("Disk", True, False), ("Disk", False, False)]
    assert found[0].box == pytest.approx((8 / W, 8 / H, 28 / W, 28 / H))
    prompts = plan_prompts(plan, context)
    assert {c.control.name: [lp.label for lp in c.labels] for c in prompts.controls} == \
        {"box": ["Disk"], "brush": ["Disk"], "poly": ["Disk"]}
    assert prompts.present == {"box": (context["result"][0], context["result"][1],
                                       context["result"][5], predicted)}


# -- the pipeline, end to end on a transparent fake model -------------------------------------------


def test_one_example_box_returns_every_like_object_in_every_output_control(tmp_path):
    pipeline = _pipeline(tmp_path)
    results = _predict(pipeline, {"result": [box_item(DISKS[0])]}, image=scene(lookalike=False))
    brush, poly = _union(results, "brushlabels"), _union(results, "polygonlabels")
    for mask in (brush, poly):
        assert all(_hit(mask, d) > 0.9 for d in DISKS)                 # the example's own disk included
        assert all(_hit(mask, s) == 0 for s in SQUARES)
    boxes = [r for r in results if r["type"] == "rectanglelabels"]
    assert all(r["value"]["rectanglelabels"] == ["Disk"] for r in results if r["type"] == "rectanglelabels")
    # One box per other disk; the example box is the annotator's own region there, so not repeated.
    assert len(boxes) == 2
    rect = _union(boxes, "rectanglelabels")
    assert _hit(rect, DISKS[0]) == 0 and _hit(rect, DISKS[1]) == 1 and _hit(rect, DISKS[2]) == 1
    assert len([r for r in results if r["type"] == "polygonlabels"]) == 3


def test_a_negative_click_or_negative_box_removes_the_lookalike(tmp_path):
    pipeline = _pipeline(tmp_path)
    positive = box_item(DISKS[0])
    before = _union(_predict(pipeline, {"result": [positive]}), "brushlabels")
    assert _hit(before, LOOKALIKE) > 0.9                                # orange looks like red
    for negative in (point_item(*_centre(LOOKALIKE), positive=False), box_item(LOOKALIKE, label="Not this")):
        after = _union(_predict(pipeline, {"result": [positive, negative]}), "brushlabels")
        assert _hit(after, LOOKALIKE) == 0
        assert all(_hit(after, d) > 0.9 for d in DISKS)


def test_negatives_alone_predict_nothing(tmp_path):
    """What a negative-label box drawn in Label Studio's UI gets: it arrives without the positives
    (docs/INTERACTIVE.md), and with nothing to find the answer is empty, not every label."""
    pipeline = _pipeline(tmp_path)
    for negative in (point_item(*_centre(LOOKALIKE), positive=False), box_item(LOOKALIKE, label="Not this")):
        assert _predict(pipeline, {"result": [negative]}) == []
    # A positive with it still finds the disks: the empty answer comes from the missing positive.
    found = _union(_predict(pipeline, {"result": [box_item(DISKS[0]), box_item(LOOKALIKE, label="Not this")]}),
                   "brushlabels")
    assert all(_hit(found, d) > 0.9 for d in DISKS)


def test_several_positive_clicks_are_combined(tmp_path):
    pipeline = _pipeline(tmp_path)
    clicks = [point_item(*_centre(DISKS[0])), point_item(*_centre(SQUARES[0]))]
    found = _union(_predict(pipeline, {"result": clicks}), "brushlabels")
    assert all(_hit(found, d) > 0.9 for d in DISKS) and all(_hit(found, s) > 0.9 for s in SQUARES)


def test_accepted_regions_in_the_context_are_not_suggested_again(tmp_path):
    pipeline = _pipeline(tmp_path)
    first = _predict(pipeline, {"result": [box_item(DISKS[0])]}, image=scene(lookalike=False))
    # The annotator accepted the brush suggestion covering disks 0 and 1 only (erased the third),
    # then adds a click: the context holds both, and the answer adds only what is missing.
    accepted = next(r for r in first if r["type"] == "brushlabels")
    from backend.decode import item_mask
    from backend.encode import brush_item

    control = parse_label_config(SMART_CONFIG).controls[1]
    keep = item_mask(accepted, H, W).copy()
    keep[:, 80:] = False
    accepted = brush_item(control, "Disk", keep, 0.9)
    context = {"result": [box_item(DISKS[0]), accepted, point_item(*_centre(DISKS[1]))]}
    again = _union(_predict(pipeline, context, image=scene(lookalike=False)), "brushlabels")
    assert _hit(again, DISKS[2]) > 0.9
    assert _hit(again, DISKS[0]) == 0 and _hit(again, DISKS[1]) == 0


def test_typed_text_and_an_example_both_shape_the_map(tmp_path):
    pipeline = _pipeline(tmp_path)
    # The fake's text "left half" lights the left half; the example box lights red disks. Together
    # they average: the left disk (both agree) is found, the right squares (neither) are not.
    context = {"result": [box_item(DISKS[0]),
                          {"type": "textarea", "from_name": "prompt", "to_name": "image",
                           "value": {"text": ["Disk"]}}]}
    results = _predict(pipeline, context, image=scene(lookalike=False))
    assert pipeline.predictor.similarity_calls[-1] == ("Disk",)
    found = _union(results, "brushlabels")
    assert all(_hit(found, d) > 0.9 for d in DISKS)


def test_the_projects_learned_state_applies_to_interactive_calls(tmp_path):
    pipeline = _pipeline(tmp_path)
    context = {"result": [box_item(DISKS[0])]}
    assert _hit(_union(_predict(pipeline, context), "brushlabels"), DISKS[1]) > 0.9
    # A calibrated offset far below the floor: a typed prompt finds nothing any more.
    learned = ProjectLearned(maps=LearnedMaps(calibration=Calibration(offsets={"Disk": -5.0})), version="L1")
    typed = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["Disk"]}}]}
    assert _union(_predict(pipeline, typed), "brushlabels").any()
    assert not _union(_predict(pipeline, typed, learned=learned), "brushlabels").any()


def test_model_prepare_passes_the_learned_state_to_interactive_calls(tmp_path):
    from backend.model import GemBackendModel

    learned = ProjectLearned(maps=LearnedMaps(), version="L9")
    model = GemBackendModel(Settings(model_dir=str(tmp_path)), predictor=FakePredictor(),
                            learned_provider=lambda key: learned)
    job = model.prepare({"result": [box_item(DISKS[0])]}, label_config=SMART_CONFIG, project="4.1")
    assert job.learned_maps is learned.maps and not job.stored


# -- one map path: PAMR applies to every map ------------------------------------------------------


@pytest.fixture(scope="module")
def pamr_predictor(tiny_model_files):
    from gem_model import HeatmapPredictor, create_gem_model

    name, config_path, checkpoint = tiny_model_files
    model = create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), pamr_iters=3)
    return HeatmapPredictor(model, image_size=64, cache_bytes=0)


def test_maps_built_on_the_grid_get_pamr_like_text_maps(pamr_predictor):
    predictor = pamr_predictor
    encoded = predictor.encode([scene()])[0]
    grid = predictor.grid_similarity(encoded, ["cat", "dog"])
    expected = predictor.similarity(encoded, ["cat", "dog"], output_size=(40, 60))
    refined = predictor.upsample(grid, encoded, output_size=(40, 60))
    assert np.allclose(refined, expected, atol=1e-5)
    plain = torch_bilinear(grid, (40, 60))
    assert np.abs(refined - plain).max() > 1e-3        # PAMR really changed the maps


def torch_bilinear(grid, size):
    import torch

    return torch.nn.functional.interpolate(torch.as_tensor(grid)[None], size=size, mode="bilinear",
                                           align_corners=False)[0].numpy()


def test_learned_and_text_paths_give_the_same_maps_without_prototypes(tmp_path, pamr_predictor):
    """The learned path used to skip PAMR; with no prototypes and no offsets it must equal text."""
    from gem_model.regions import extract_regions

    captured = []

    def capture(heatmaps, **kwargs):
        captured.append(np.array(heatmaps))
        return extract_regions(heatmaps, **kwargs)

    pipeline = PredictionPipeline(Settings(model_dir=str(tmp_path), image_size=64), pamr_predictor,
                                  region_extractor=capture, model_version="v")
    tasks = [{"id": 1, "data": {"image": _png_uri(scene())}}]
    config = SMART_CONFIG.replace('<Label value="Disk"/></BrushLabels>', '<Label value="Disk"/><Label value="Sky"/></BrushLabels>')
    pipeline.predict(tasks, pipeline.prepare(config))
    pipeline.predict(tasks, pipeline.prepare(config, learned=ProjectLearned(maps=LearnedMaps())))
    assert len(captured) == 4          # per call: (Disk) for box and poly, (Disk, Sky) for brush
    assert np.allclose(captured[0], captured[2], atol=1e-6) and np.allclose(captured[1], captured[3], atol=1e-6)


# -- the annotator first ----------------------------------------------------------------------------


def test_the_gate_serves_a_waiting_interactive_call_before_waiting_bulk_work():
    import threading

    from backend.pipeline import ModelGate

    gate = ModelGate()
    order = []
    holding = threading.Event()
    release = threading.Event()

    def bulk_holder():
        with gate.model(interactive=False):
            holding.set()
            release.wait(5)

    def caller(name, interactive):
        with gate.model(interactive=interactive):
            order.append(name)

    threads = [threading.Thread(target=bulk_holder)]
    threads[0].start()
    holding.wait(5)
    threads.append(threading.Thread(target=caller, args=("bulk", False)))
    threads[1].start()
    time.sleep(0.2)                      # the bulk caller queues first ...
    threads.append(threading.Thread(target=caller, args=("interactive", True)))
    threads[2].start()
    assert _wait(lambda: gate.waiting_interactive == 1)
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["interactive", "bulk"]   # ... the annotator still goes first


def test_bulk_work_yields_to_a_typed_prompt_between_images(tmp_path):
    import threading

    from backend_fixtures import BRUSH_CONFIG, SlowPredictor, square_image

    predictor = SlowPredictor(0.15)
    pipeline = PredictionPipeline(Settings(model_dir=str(tmp_path), batch_size=8), predictor, model_version="v")
    assert pipeline.bulk_model_images == 1                                   # CPU: one image per model call
    tasks = [{"id": i, "data": {"image": data_uri(square_image(width=40 + i))}} for i in range(12)]
    bulk = threading.Thread(target=pipeline.predict, args=(tasks, pipeline.prepare(BRUSH_CONFIG)))
    bulk.start()
    assert _wait(lambda: predictor.encode_calls)
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["Bright"]}}]}
    job = pipeline.prepare(BRUSH_CONFIG, context=context)
    new_image = [{"id": 99, "data": {"image": data_uri(square_image(width=33))}}]
    predictions, _ = pipeline.predict(new_image, job)
    bulk_images_before = sum(predictor.encode_calls[:-1])
    bulk.join(30)
    assert predictions[0]["result"]
    # Answered after at most the bulk call already running (plus what was queued before we came),
    # not after a whole 8-image batch; the bulk job still finished all 12.
    assert bulk_images_before <= 3
    assert sum(predictor.encode_calls) == 13 and set(predictor.encode_calls[:-1]) | set(predictor.encode_calls) == {1}
    assert pipeline.gate.yields >= 1


def _wait(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
