"""Learning loop: annotations submitted through Label Studio's API reach the backend by Label
Studio's own webhook; the next predictions for other tasks are closer to the truth and carry a
new model version, and Retrieve Predictions recomputes the stale ones. The version moves when,
and only when, the predictions would: not on a forged webhook, but on a label added to the config.

The project is the synthetic shapes of bench/bench_learning.py; the model is the tiny random ViT,
whose text knows nothing, so any gain comes from what was learned.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from e2e_support import check, encode_png, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from backend.decode import label_masks, result_regions  # noqa: E402
from backend.learning import LearningStore, created_stamp, instance_of, state_key  # noqa: E402
from backend.outbox import Outbox  # noqa: E402
from bench.bench_learning import LABELS, make_project  # noqa: E402

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
          + "".join(f'<Label value="{label}"/>' for label in LABELS) + "</BrushLabels></View>")
SIZE = 128
TRAIN, HELDOUT = 6, 4


def brush_items(masks):
    return [{"from_name": "brush", "to_name": "image", "type": "brushlabels",
             "original_width": SIZE, "original_height": SIZE,
             "value": {"format": "rle", "rle": [int(v) for v in mask2rle(np.where(m, 255, 0).astype(np.uint8))],
                       "brushlabels": [label]}}
            for label, m in masks.items()]


def mean_iou(predictions, truths):
    values = []
    for prediction, truth in zip(predictions, truths):
        masks = label_masks(result_regions(prediction["result"], SIZE, SIZE), SIZE, SIZE)
        for label in LABELS:
            p, t = masks.get(label, np.zeros((SIZE, SIZE), bool)), truth.get(label, np.zeros((SIZE, SIZE), bool))
            if (p | t).any():
                values.append((p & t).sum() / (p | t).sum())
    return float(np.mean(values))


def latest_predictions(ls, task_ids):
    out = []
    for task_id in task_ids:
        predictions = ls.predictions(task_id)
        assert predictions, f"task {task_id} has no prediction"
        out.append(max(predictions, key=lambda p: p["id"]))
    return out


def refresh_settled(backend, project):
    """No refresh after learning (docs/LEARNING.md) of the project waits or runs in the backend."""
    return Outbox(str(backend.model_dir / "outbox.sqlite")).refresh(project) is None


def state_key_of(ls, label_studio, project):
    """The backend's key of the project's learned state: Label Studio instance + id + creation time."""
    created = check(ls.get(f"/api/projects/{project}/"), 200).json()["created_at"]
    return state_key(instance_of(label_studio.url), project, created_stamp(created))


def upload_synthetic(ls, name: str, synthetic) -> tuple[int, list[dict], dict]:
    """A project of these generated images, uploaded as PNGs: (project id, its tasks in upload
    order, {task id: the synthetic image with its truth})."""
    project = ls.create_project(name, CONFIG)
    ls.upload_files(project, {f"f{i}": (f"shape{i}.png", encode_png(t.image), "image/png")
                              for i, t in enumerate(synthetic)})
    tasks = ls.tasks(project)
    assert len(tasks) == len(synthetic)
    # Uploads keep their order: map tasks to the synthetic truth by the file name.
    truth = {t["id"]: synthetic[int(t["data"]["image"].rsplit("shape", 1)[1].split(".")[0])] for t in tasks}
    return project, tasks, truth


def test_annotations_through_label_studio_improve_the_next_predictions(ls, backend, label_studio, tmp_path):
    synthetic = make_project(TRAIN + HELDOUT, seed=21, size=SIZE)
    project, tasks, truth = upload_synthetic(ls, "e2e learning", synthetic)
    train, heldout = [t["id"] for t in tasks[:TRAIN]], [t["id"] for t in tasks[TRAIN:]]
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)

    ls.retrieve_predictions(project)
    before = latest_predictions(ls, heldout)
    base_version = before[0]["model_version"]
    iou_before = mean_iou(before, [truth[i].masks for i in heldout])

    store, key = LearningStore(str(backend.model_dir)), state_key_of(ls, label_studio, project)
    for task_id in train:
        check(ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": brush_items(truth[task_id].masks)}), 201)
    # Label Studio's webhook -> /webhook -> queue -> fetched back from LS -> learned; published by
    # the doubling policy (GEM_LEARN_PUBLISH), so some annotations wait for a later version.
    assert wait_until(lambda: store.version(key) and len(store.keys(key)) == TRAIN, timeout=180), (
        store.version(key), store.keys(key), backend.process.log_tail())

    # Start Training relearns the project from all its annotations page by page (nothing changed:
    # nothing is recomputed) and publishes all of them.
    backends = check(ls.get("/api/ml/", params={"project": project}), 200).json()
    check(ls.post(f"/api/ml/{backends[0]['id']}/train", json={}), 200)
    assert wait_until(lambda: "rebuild done: " in backend.process.log_tail(400) and
                      len(store.published_digests(key)) == TRAIN, timeout=180), backend.process.log_tail()

    # The held-out predictions are stale now. The backend refreshes them by itself (a Retrieve
    # Predictions meanwhile would be answered "in the background" for them); once it is done,
    # Retrieve Predictions recomputes whatever is still stale.
    assert wait_until(lambda: refresh_settled(backend, project), timeout=180), backend.process.log_tail()
    ls.retrieve_predictions(project)
    after = latest_predictions(ls, heldout)
    new_version = after[0]["model_version"]
    assert new_version == f"{base_version}+{store.version(key)}", (base_version, new_version)
    assert all(p["model_version"] == new_version for p in after)
    iou_after = mean_iou(after, [truth[i].masks for i in heldout])
    assert iou_after > iou_before + 0.05, (iou_before, iou_after)

    # python -m backend.evaluate reads the project back and compares predictions with annotations.
    report = tmp_path / "evaluation.json"
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.account.legacy_token, "MODEL_DIR": str(tmp_path / "eval-model")}
    run = subprocess.run([sys.executable, "-m", "backend.evaluate", "--project", str(project), "--json", str(report)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| Control | Label |" in run.stdout
    figures = json.loads(report.read_text())
    assert figures["compared"] == TRAIN and figures["labels"]
    for row in figures["labels"]:
        assert row["kept"] + row["changed"] + row["deleted"] == row["predicted"]
        assert row["annotated"] > 0 or row["predicted"] > 0


def _ml_version(ls, ml_id):
    """The model version Label Studio holds for the backend (a GET makes it call /setup again)."""
    return check(ls.get(f"/api/ml/{ml_id}"), 200).json()["model_version"]


def test_forged_webhooks_keep_the_version_and_a_new_label_gives_one(ls, label_studio, start_backend, tmp_path):
    # Its own backend: independent thresholding, so with the tiny model every label finds a region
    # on every image (its maps peak above the floor 0), and a label added is a label predicted.
    backend = start_backend("versions", LABEL_STUDIO_API_KEY=label_studio.account.legacy_token,
                            GEM_MODE="independent")
    synthetic = make_project(3, seed=33, size=SIZE)
    labels = LABELS[:2]
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
              + "".join(f'<Label value="{label}"/>' for label in labels) + "</BrushLabels></View>")
    project = ls.create_project("e2e versions", config)
    ls.upload_files(project, {f"f{i}": (f"v{i}.png", encode_png(t.image), "image/png") for i, t in enumerate(synthetic)})
    tasks = [t["id"] for t in ls.tasks(project)]
    ml_id = check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201).json()["id"]
    ls.retrieve_predictions(project)
    first = _ml_version(ls, ml_id)
    assert all(max(ls.predictions(t), key=lambda p: p["id"])["model_version"] == first for t in tasks)

    # One real annotation: learned and published (the first example of its labels).
    store, key = LearningStore(str(backend.model_dir)), state_key_of(ls, label_studio, project)
    masks = {k: v for k, v in synthetic[0].masks.items() if k in labels} or \
        {labels[0]: np.pad(np.ones((SIZE // 2, SIZE // 2), bool), ((0, SIZE // 2), (0, SIZE // 2)))}
    check(ls.post(f"/api/tasks/{tasks[0]}/annotations/", json={"result": brush_items(masks)}), 201)
    assert wait_until(lambda: store.version(key), timeout=120), backend.process.log_tail()
    learned = _ml_version(ls, ml_id)
    assert learned == f"{first}+{store.version(key)}", (first, learned)

    # Forged webhooks: an annotation that does not exist (with a result in the body that is never
    # read), on a task of the project, and a delete of annotations nobody learned. Nothing moves.
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": project},
              "task": {"id": tasks[1], "project": project},
              "annotation": {"id": 987654, "task": tasks[1],
                             "result": brush_items({labels[0]: np.ones((SIZE, SIZE), bool)})}}
    check(backend.request("POST", "/webhook", json=forged), 200)
    check(backend.request("POST", "/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": project},
                                                    "annotations": [{"id": 987655}]}), 200)
    assert wait_until(lambda: "task %s: nothing new to learn" % tasks[1] in backend.process.log_tail(400)
                      and "987655 were never learned" in backend.process.log_tail(400), timeout=60), \
        backend.process.log_tail()
    assert _ml_version(ls, ml_id) == learned and store.version(key) == learned.rsplit("+", 1)[1]

    # A label added to the config: a new version, and the next Retrieve recomputes every task with it
    # (after the refresh that followed the annotation, which stores predictions of the learned version).
    assert wait_until(lambda: refresh_settled(backend, project), timeout=180), backend.process.log_tail()
    added = config.replace("</BrushLabels>", f'<Label value="{LABELS[2]}"/></BrushLabels>')
    check(ls.request("PATCH", f"/api/projects/{project}/", json={"label_config": added}), 200)
    newer = _ml_version(ls, ml_id)
    assert newer != learned and newer.endswith("+" + store.version(key)), (learned, newer)
    ls.retrieve_predictions(project)
    latest = [max(ls.predictions(t), key=lambda p: p["id"]) for t in tasks]
    assert all(p["model_version"] == newer for p in latest), [p["model_version"] for p in latest]
    predicted = {label for p in latest for item in p["result"] for label in item["value"].get("brushlabels", [])}
    assert LABELS[2] in predicted, predicted
