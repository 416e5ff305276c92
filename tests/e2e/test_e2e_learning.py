"""Learning loop: annotations submitted through Label Studio's API reach the backend by Label
Studio's own webhook; the next predictions for other tasks are closer to the truth and carry a
new model version, and Retrieve Predictions recomputes the stale ones.

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
from backend.learning import LearningStore  # noqa: E402
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


def test_annotations_through_label_studio_improve_the_next_predictions(ls, backend, label_studio, tmp_path):
    synthetic = make_project(TRAIN + HELDOUT, seed=21, size=SIZE)
    project = ls.create_project("e2e learning", CONFIG)
    ls.upload_files(project, {f"f{i}": (f"shape{i}.png", encode_png(t.image), "image/png")
                              for i, t in enumerate(synthetic)})
    tasks = ls.tasks(project)
    assert len(tasks) == len(synthetic)
    # Uploads keep their order: map tasks to the synthetic truth by the file name.
    truth = {t["id"]: synthetic[int(t["data"]["image"].rsplit("shape", 1)[1].split(".")[0])] for t in tasks}
    train, heldout = [t["id"] for t in tasks[:TRAIN]], [t["id"] for t in tasks[TRAIN:]]
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)

    ls.retrieve_predictions(project)
    before = latest_predictions(ls, heldout)
    base_version = before[0]["model_version"]
    iou_before = mean_iou(before, [truth[i].masks for i in heldout])

    store = LearningStore(str(backend.model_dir))
    for task_id in train:
        check(ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": brush_items(truth[task_id].masks)}), 201)
    # Label Studio's webhook -> /webhook -> queue -> fetched back from LS -> learned, one version per annotation.
    assert wait_until(lambda: store.version(str(project)) >= TRAIN and len(store.keys(str(project))) == TRAIN,
                      timeout=180), (store.version(str(project)), store.keys(str(project)), backend.process.log_tail())

    ls.retrieve_predictions(project)   # the held-out predictions are stale now: recomputed
    after = latest_predictions(ls, heldout)
    new_version = after[0]["model_version"]
    assert new_version != base_version and new_version.startswith(base_version + "+l"), (base_version, new_version)
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

    # Start Training relearns the project from all its annotations page by page.
    backends = check(ls.get("/api/ml/", params={"project": project}), 200).json()
    version = store.version(str(project))
    check(ls.post(f"/api/ml/{backends[0]['id']}/train", json={}), 200)
    assert wait_until(lambda: store.version(str(project)) > version, timeout=180), backend.process.log_tail()
    assert len(store.keys(str(project))) == TRAIN
    assert "rebuild done" in backend.process.log_tail(200)
