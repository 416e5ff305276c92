"""Regions -> Label Studio result items, checked with label-studio-sdk's own decoder and validator."""
from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from backend.encode import brush_rle, encode_regions
from backend.label_config import parse_label_config
from backend_fixtures import MIXED_CONFIG, FakeRegion
from gem_model.masks import mask_to_bbox


def _region(label="Bright"):
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:20] = True
    mask[20:25, 30:38] = True        # a second part
    polygons = [np.array([[10, 5], [20, 5], [20, 15], [10, 15]], float),
                np.array([[30, 20], [38, 20], [38, 25], [30, 25]], float)]
    return FakeRegion(label, label, mask, 0.8, mask_to_bbox(mask), polygons)


def _controls():
    return {c.kind: c for c in parse_label_config(MIXED_CONFIG).controls}


def test_brush_rle_decodes_to_the_region_mask():
    region = _region()
    (item,) = encode_regions(_controls()["brush"], [region], 40, 30)
    assert item["type"] == "brushlabels" and item["value"]["format"] == "rle"
    assert item["value"]["brushlabels"] == ["Bright"]
    decoded = decode_rle(item["value"]["rle"]).reshape(30, 40, 4)
    assert np.array_equal(decoded[..., 3] > 0, region.mask)
    assert set(np.unique(decoded)) <= {0, 255}


def test_polygon_items_one_per_part_in_percent():
    items = encode_regions(_controls()["polygon"], [_region()], 40, 30)
    assert len(items) == 2
    assert items[0]["value"]["points"] == [[25.0, 16.6667], [50.0, 16.6667], [50.0, 50.0], [25.0, 50.0]]
    assert items[0]["value"]["closed"] is True and items[0]["value"]["polygonlabels"] == ["Bright"]
    assert items[0]["id"] != items[1]["id"]


def test_rectangle_item_in_percent():
    (item,) = encode_regions(_controls()["rectangle"], [_region()], 40, 30)
    assert item["value"] == {"x": 25.0, "y": 16.6667, "width": 70.0, "height": 66.6666, "rotation": 0,
                             "rectanglelabels": ["Bright"]}


def test_items_carry_config_names_and_validate_with_the_sdk():
    controls = _controls()
    result = [item for c in controls.values() for item in encode_regions(c, [_region(), _region("Dark")], 40, 30)]
    for item in result:
        assert {"id", "from_name", "to_name", "type", "original_width", "original_height", "image_rotation",
                "value", "score"} <= set(item)
        assert (item["original_width"], item["original_height"], item["image_rotation"]) == (40, 30, 0)
        assert item["to_name"] == "image" and item["from_name"] in ("brush", "poly", "rect")
    interface = LabelInterface(MIXED_CONFIG)
    assert interface.validate_prediction({"result": result, "score": 0.5}, return_errors=True) == []
    # The validator is not a rubber stamp: a label or name the config lacks fails it.
    wrong = [dict(result[0], value=dict(result[0]["value"], brushlabels=["Cat"]))]
    assert interface.validate_prediction({"result": wrong}, return_errors=True)
    assert interface.validate_prediction({"result": [dict(result[0], from_name="nope")]}, return_errors=True)


def test_labels_missing_from_the_config_are_dropped():
    assert encode_regions(_controls()["brush"], [_region("Cat")], 40, 30) == []


def test_brush_rle_of_a_working_mask_decodes_to_the_enlarged_mask():
    """Brush RLE made from a small mask equals the mask enlarged to the image size (any ratio)."""
    from gem_model.masks import upsample_mask

    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 16, 2)
        height, width = h * rng.integers(1, 4) + rng.integers(0, 5), w * rng.integers(1, 4) + rng.integers(0, 5)
        mask = rng.random((h, w)) < rng.random()
        decoded = decode_rle(brush_rle(mask, height, width)).reshape(height, width, 4)
        assert np.array_equal(decoded[..., 3] > 0, upsample_mask(mask, height, width))
        assert set(np.unique(decoded)) <= {0, 255}


def test_brush_rle_long_runs_and_agreement_with_the_sdk_encoder():
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((300, 500), bool)
    mask[20:280, 10:490] = True                      # runs far longer than one 65536-byte field
    ours = brush_rle(mask, 300, 500)
    sdk = [int(v) for v in mask2rle(np.where(mask, np.uint8(255), np.uint8(0)))]
    assert ours == sdk[:len(ours)] and not any(sdk[len(ours):])   # the SDK only pads more zeros
    assert np.array_equal(decode_rle(brush_rle(np.ones((2, 2), bool), 3000, 4000)).reshape(3000, 4000, 4)[..., 3],
                          np.full((3000, 4000), 255))


def test_rectangles_one_per_object_from_gem_model_regions():
    import dataclasses

    from gem_model.regions import RegionConfig, extract_regions

    sims = np.full((1, 30, 40), 0.1, np.float32)
    sims[0, 3:10, 2:12] = 0.6
    sims[0, 15:28, 20:38] = 0.6
    config = RegionConfig(min_area=0)
    controls = _controls()
    for rectangles, expected in [("object", 2), ("label", 1)]:
        (region,) = extract_regions(sims, ["Bright"], dataclasses.replace(config, rectangles=rectangles),
                                    size=(300, 400)).regions
        items = encode_regions(controls["rectangle"], [region], 400, 300)
        assert len(items) == expected
        boxes = [(i["value"]["x"], i["value"]["y"], i["value"]["width"], i["value"]["height"]) for i in items]
        if rectangles == "object":
            assert boxes == [(50.0, 50.0, 45.0, 43.3333), (5.0, 10.0, 25.0, 23.3333)]
        else:
            assert boxes == [(5.0, 10.0, 90.0, 83.3333)]
        assert len(encode_regions(controls["polygon"], [region], 400, 300)) == 2   # polygons: one per part
        (brush,) = encode_regions(controls["brush"], [region], 400, 300)
        assert np.array_equal(decode_rle(brush["value"]["rle"]).reshape(300, 400, 4)[..., 3] > 0, region.mask)
