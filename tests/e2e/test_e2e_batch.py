"""2. Batch: "Retrieve Predictions" in the Data Manager stores our prediction for every task.

Four tasks, one per image source the backend must download from: a Label Studio upload (PNG),
an upload whose JPEG carries EXIF orientation 6 (stored 80x48, shown 48x80), a file served by
Label Studio's local-files storage, and a plain http:// URL on a local web server.
"""
from dataclasses import dataclass

import pytest

from e2e_support import (
    CONTROL_TYPES, LABELS, brush_masks, check, encode_jpeg_with_orientation, encode_png, labeling_config,
    pattern_image, without_ids)

CONFIG = labeling_config()


@dataclass
class BatchProject:
    id: int
    ml_backend: dict
    retrieve_reply: dict
    tasks: list[dict]
    displayed_size: dict[int, tuple[int, int]]   # task id -> (width, height) as Label Studio shows it


@pytest.fixture(scope="module")
def batch(ls, label_studio, backend, web_server) -> BatchProject:
    project = ls.create_project("e2e batch", CONFIG)
    sizes_by_name = {}

    png = pattern_image(96, 64, seed=1)
    jpeg = pattern_image(80, 48, seed=2)       # EXIF 6 = rotate 90° clockwise for display
    ls.upload_files(project, {
        "png": ("upload.png", encode_png(png), "image/png"),
        "jpeg": ("exif6.jpg", encode_jpeg_with_orientation(jpeg, 6), "image/jpeg"),
    })
    sizes_by_name["upload.png"] = (96, 64)
    sizes_by_name["exif6.jpg"] = (48, 80)

    local_dir = label_studio.local_files_root / "batch"
    local_dir.mkdir()
    pattern_image(64, 96, seed=3).save(local_dir / "local.png")
    ls.add_local_storage(project, local_dir)
    pattern_image(72, 72, seed=4).save(web_server.root / "web.png")
    ls.import_tasks(project, [{"image": "/data/local-files/?d=batch/local.png"},
                              {"image": f"{web_server.url}/web.png"}])
    sizes_by_name["local.png"] = (64, 96)
    sizes_by_name["web.png"] = (72, 72)

    ml = check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201).json()
    reply = ls.retrieve_predictions(project)
    tasks = ls.tasks(project)
    displayed = {}
    for task in tasks:
        name = next(n for n in sizes_by_name if task["data"]["image"].endswith(n))
        displayed[task["id"]] = sizes_by_name[name]
    return BatchProject(id=project, ml_backend=ml, retrieve_reply=reply, tasks=tasks, displayed_size=displayed)


def test_every_task_gets_one_prediction_of_our_model_version(ls, batch):
    assert len(batch.tasks) == 4
    assert batch.retrieve_reply.get("processed_items") == 4, batch.retrieve_reply
    for task in batch.tasks:
        predictions = ls.predictions(task["id"])
        assert len(predictions) == 1, f"task {task['id']} ({task['data']['image']}): {predictions}"
        assert predictions[0]["model_version"] == batch.ml_backend["model_version"]
        assert predictions[0]["result"], f"task {task['id']} ({task['data']['image']}): empty result"


def test_results_cover_every_control_with_config_labels_inside_the_image(ls, batch):
    for task in batch.tasks:
        where = f"task {task['id']} ({task['data']['image']})"
        result = ls.predictions(task["id"])[0]["result"]
        assert {item["from_name"] for item in result} == set(CONTROL_TYPES), where
        width, height = batch.displayed_size[task["id"]]
        for item in result:
            assert item["type"] == CONTROL_TYPES[item["from_name"]], (where, item)
            assert item["to_name"] == "image", (where, item)
            assert (item["original_width"], item["original_height"]) == (width, height), (where, item)
            labels = item["value"][item["type"]]
            assert len(labels) == 1 and labels[0] in LABELS, (where, item)
            _assert_inside_image(item, where)


def test_exif_rotated_upload_reports_the_displayed_size(ls, batch):
    task = next(t for t in batch.tasks if t["data"]["image"].endswith("exif6.jpg"))
    result = ls.predictions(task["id"])[0]["result"]
    assert {(i["original_width"], i["original_height"]) for i in result} == {(48, 80)}
    for label, mask in brush_masks(result):
        assert mask.shape == (80, 48), label


def test_stored_brush_masks_equal_the_backends_own_answer(ls, backend, batch):
    """LS stored exactly what the backend computes for that task when asked directly."""
    for task in batch.tasks:
        where = f"task {task['id']} ({task['data']['image']})"
        stored = ls.predictions(task["id"])[0]["result"]
        direct = backend.predict([task], CONFIG, batch.id)[0]["result"]

        stored_masks, direct_masks = brush_masks(stored), brush_masks(direct)
        assert stored_masks, f"{where}: no brush result"
        assert [label for label, _ in stored_masks] == [label for label, _ in direct_masks], where
        for (label, a), (_, b) in zip(stored_masks, direct_masks):
            assert a.shape == b.shape, (where, label)
            assert (a == b).all(), f"{where}: '{label}' masks differ in {(a != b).sum()} of {a.size} pixels"
            assert a.any(), f"{where}: '{label}' brush mask is empty"
        assert without_ids(stored) == without_ids(direct), f"{where}: polygons/rectangles differ"


def _assert_inside_image(item: dict, where: str) -> None:
    value = item["value"]
    if item["type"] == "rectanglelabels":
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100, (where, item)
        assert 0 < value["width"] and value["x"] + value["width"] <= 100 + 1e-6, (where, item)
        assert 0 < value["height"] and value["y"] + value["height"] <= 100 + 1e-6, (where, item)
    elif item["type"] == "polygonlabels":
        assert len(value["points"]) >= 3, (where, item)
        for x, y in value["points"]:
            assert 0 <= x <= 100 and 0 <= y <= 100, (where, item)
    elif item["type"] == "brushlabels":
        assert value["format"] == "rle" and value["rle"], (where, item)
