"""Regions -> Label Studio result items, checked with label-studio-sdk's own decoder and validator."""
from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from backend.encode import encode_regions, mask_bbox
from backend.label_config import parse_label_config
from backend_fixtures import MIXED_CONFIG, FakeRegion


def _region(label="Bright"):
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:20] = True
    mask[20:25, 30:38] = True        # a second part
    polygons = [np.array([[10, 5], [20, 5], [20, 15], [10, 15]], float),
                np.array([[30, 20], [38, 20], [38, 25], [30, 25]], float)]
    return FakeRegion(label, label, mask, 0.8, mask_bbox(mask), polygons)


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
