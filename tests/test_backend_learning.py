"""Learning in the backend: webhook -> verified fetch from Label Studio -> state -> next predictions.

A local server plays Label Studio's API (tasks, annotations, predictions, projects, images);
the model is the tiny random ViT, the project the synthetic shapes of bench/bench_learning.py.
"""
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from backend.decode import item_mask, label_masks, result_regions
from backend.feedback import FeedbackLog
from backend.learning import LearningStore, main as learning_main
from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_learning import LABELS, make_project  # noqa: E402

TOKEN = "0123456789abcdef0123"
CONFIG = ("<View><Image name='image' value='$image'/>"
          "<BrushLabels name='brush' toName='image'>" + "".join(f"<Label value='{v}'/>" for v in LABELS) +
          "</BrushLabels></View>")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def brush_result(masks):
    out = []
    for label, mask in masks.items():
        h, w = mask.shape
        out.append({"id": f"r{label}", "from_name": "brush", "to_name": "image", "type": "brushlabels",
                    "original_width": w, "original_height": h,
                    "value": {"format": "rle", "rle": [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))],
                              "brushlabels": [label]}})
    return out


class FakeLabelStudio:
    """Label Studio's REST API as learning uses it, answering only the right token."""

    def __init__(self, server, project_tasks):
        self.server = server
        self.tasks, self.annotations, self.images = {}, {}, {}
        for project, items in project_tasks.items():
            for task_id, synthetic in items:
                path = f"/data/upload/{project}/{task_id}.png"
                self.images[path] = png(synthetic.image)
                self.tasks[task_id] = {"id": task_id, "project": project, "data": {"image": path},
                                       "annotations": [], "predictions": [], "total_annotations": 0}
        server.routes[("GET", "*")] = self.route

    def annotate(self, task_id, annotation_id, masks, cancelled=False):
        annotation = {"id": annotation_id, "task": task_id, "project": self.tasks[task_id]["project"],
                      "result": brush_result(masks), "was_cancelled": cancelled,
                      "updated_at": f"2026-01-01T00:00:{annotation_id % 60:02d}Z"}
        self.annotations[annotation_id] = annotation
        self.tasks[task_id]["annotations"] = [a for a in self.tasks[task_id]["annotations"]
                                              if a["id"] != annotation_id] + [annotation]
        self.tasks[task_id]["total_annotations"] = len(self.tasks[task_id]["annotations"])
        return annotation

    def route(self, seen):
        if seen.headers.get("Authorization") != f"Token {TOKEN}":
            return 401, {"Content-Type": "application/json"}, b'{"detail": "no"}'
        path = seen.path.split("?")[0]
        query = dict(re.findall(r"[?&]([^=&]+)=([^&]*)", seen.path))
        if path in self.images:
            return 200, {"Content-Type": "image/png"}, self.images[path]
        m = re.fullmatch(r"/api/(tasks|annotations|projects|predictions)/(\d+)/?", path)
        if m:
            kind, ident = m.group(1), int(m.group(2))
            item = {"tasks": self.tasks, "annotations": self.annotations,
                    "projects": {p: {"id": p, "label_config": CONFIG} for p in (1, 2)},
                    "predictions": {}}[kind].get(ident)
            if item is None:
                return 404, {"Content-Type": "application/json"}, b'{"detail": "Not found."}'
            return 200, {"Content-Type": "application/json"}, json.dumps(item).encode()
        if path.rstrip("/") == "/api/tasks":
            project, page, size = int(query["project"]), int(query.get("page", 1)), int(query.get("page_size", 100))
            items = [t for t in self.tasks.values() if t["project"] == project]
            chunk = items[(page - 1) * size: page * size]
            if not chunk and page > 1:
                return 404, {"Content-Type": "application/json"}, b'{"detail": "Invalid page."}'
            return 200, {"Content-Type": "application/json"}, json.dumps({"tasks": chunk, "total": len(items)}).encode()
        return 404, {"Content-Type": "application/json"}, b'{"detail": "Not found."}'


@pytest.fixture(scope="module")
def project_images():
    return make_project(10, seed=7, size=96)


@pytest.fixture
def backend(tmp_path, ls, tiny_model_files, project_images):
    name, config_path, checkpoint = tiny_model_files
    fake = FakeLabelStudio(ls, {1: [(i + 1, t) for i, t in enumerate(project_images[:8])],
                                2: [(100, project_images[8])]})
    env = {"MODEL_DIR": str(tmp_path / "model_data"), "GEM_MODEL": name, "GEM_PRETRAINED": str(checkpoint),
           "GEM_MODEL_CONFIG": str(config_path), "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "96",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN, "GEM_OUTPUTS": "brush"}
    settings = Settings.from_env(env)
    model = GemBackendModel(settings)
    model.load()
    app = create_app(settings, model, load=False)
    yield app.test_client(), model, fake, settings, env
    model.close()


def predict(client, task_ids, fake, project="1.1700000000"):
    tasks = [dict(fake.tasks[i], annotations=[], predictions=[]) for i in task_ids]
    reply = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": CONFIG})
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply.get_json()


def iou_of(prediction, truth):
    shape = next(iter(truth.values())).shape
    masks = label_masks(result_regions(prediction["result"], *shape), *shape)
    values = []
    for label in LABELS:
        p, t = masks.get(label, np.zeros(shape, bool)), truth.get(label, np.zeros(shape, bool))
        if (p | t).any():
            values.append((p & t).sum() / (p | t).sum())
    return float(np.mean(values))


def event(action, project, task_id, annotation_id, result=None):
    return {"action": action, "project": {"id": project}, "task": {"id": task_id, "project": project},
            "annotation": {"id": annotation_id, "task": task_id, "result": result or []}}


def test_annotations_reach_the_state_and_change_the_next_predictions(backend, project_images, monkeypatch, capsys):
    client, model, fake, settings, env = backend
    assert client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG}).get_json()["model_version"] \
        == model.model_version
    heldout = [7, 8]
    before = predict(client, heldout, fake)
    assert before["model_version"] == model.model_version
    iou_before = np.mean([iou_of(p, project_images[i - 1].masks) for p, i in zip(before["results"], heldout)])

    for task_id in range(1, 7):
        fake.annotate(task_id, 1000 + task_id, project_images[task_id - 1].masks)
        reply = client.post("/webhook", json=event("ANNOTATION_CREATED", 1, task_id, 1000 + task_id))
        assert reply.get_json()["status"] == "queued"
    assert model.learning.learner.wait_idle(120)
    assert model.learning.learner.failed == 0
    store = LearningStore(settings.model_dir)
    assert store.version(1 and "1") == 6 and len(store.keys("1")) == 6

    after = predict(client, heldout, fake)
    assert after["model_version"] == f"{model.model_version}+l6"
    assert all(p["model_version"] == after["model_version"] for p in after["results"])
    iou_after = np.mean([iou_of(p, project_images[i - 1].masks) for p, i in zip(after["results"], heldout)])
    assert iou_after > iou_before + 0.1, (iou_before, iou_after)
    assert client.post("/setup", json={"project": "1.1700000001", "schema": CONFIG}).get_json()["model_version"] \
        == after["model_version"]

    # Another worker (a second model on the same MODEL_DIR) sees the state at its next request.
    other = GemBackendModel(settings, predictor=model._predictor)
    assert other.version_for("1") == after["model_version"]

    # Reset by the documented command: the project predicts as before, under a new version.
    monkeypatch.setenv("MODEL_DIR", settings.model_dir)
    assert learning_main(["reset", "--project", "1"]) == 0
    assert "version suffix l7" in capsys.readouterr().out
    assert store.keys("1") == [] and store.version("1") == 7
    reset = predict(client, heldout, fake)
    assert reset["model_version"] == f"{model.model_version}+l7"

    def regions(reply):
        return [[{k: v for k, v in item.items() if k != "id"} for item in p["result"]] for p in reply["results"]]
    assert regions(reset) == regions(before)
    other.close()


def test_the_webhook_body_is_only_a_hint(backend, project_images):
    client, model, fake, settings, _ = backend
    client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG})
    store = LearningStore(settings.model_dir)
    # A forged result in the body is never read: the annotation does not exist in Label Studio,
    # and the task has none, so nothing is learned.
    forged = brush_result({"Disc": np.ones((96, 96), bool)})
    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 555, forged)).get_json()["status"] == "queued"
    assert model.learning.learner.wait_idle(60)
    assert store.keys("1") == []
    # A real annotation claimed for another project is refused (task 1 is project 1's).
    fake.annotate(1, 1001, project_images[0].masks)
    client.post("/setup", json={"project": "2.1", "schema": CONFIG})
    client.post("/webhook", json=event("ANNOTATION_CREATED", 2, 1, 1001))
    assert model.learning.learner.wait_idle(60)
    assert store.keys("2") == [] and model.learning.learner.failed == 1
    # Unknown project (never sent /setup): recorded in the feedback log, not learned.
    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 9, 1, 1001)).get_json()["status"] == "recorded"
    # The real annotation of the right project is learned; deleting it forgets the task.
    client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 1001))
    assert model.learning.learner.wait_idle(60)
    assert [k for k, _ in store.keys("1")] == ["1"]
    fake.tasks[1]["annotations"] = []
    del fake.annotations[1001]
    client.post("/webhook", json=event("ANNOTATION_DELETED", 1, 1, 1001))
    assert model.learning.learner.wait_idle(60)
    assert store.keys("1") == []


def test_start_training_rebuilds_from_all_annotations(backend, project_images, caplog):
    client, model, fake, settings, _ = backend
    client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG})
    store = LearningStore(settings.model_dir)
    fake.annotate(6, 2006, project_images[5].masks)
    client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 6, 2006))
    assert model.learning.learner.wait_idle(60) and store.version("1") == 1
    fake.tasks[6]["annotations"], fake.tasks[6]["total_annotations"] = [], 0   # deleted, no webhook came
    for task_id in (2, 3, 4):
        fake.annotate(task_id, 2000 + task_id, project_images[task_id - 1].masks)
    fake.annotate(5, 2005, project_images[4].masks, cancelled=True)     # skipped tasks teach nothing
    with caplog.at_level("INFO", logger="backend.learning"):
        reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        assert reply.get_json()["status"] == "queued"
        assert model.learning.learner.wait_idle(120)
    assert sorted(k for k, _ in store.keys("1")) == ["2", "3", "4"]
    assert store.version("1") == 2          # one new version for the whole rebuild
    assert "rebuild done: 4 annotated tasks, 3 images learned" in caplog.text
    assert store.calibration("1")["samples"] == 3


def test_learning_store_is_shared_and_atomic(tmp_path):
    first, second = LearningStore(str(tmp_path)), LearningStore(str(tmp_path))
    assert first.version("5") == 0
    assert first.commit_state("5", {"offsets": {"a": 0.1}}) == 1
    assert second.version("5") == 1 and second.calibration("5") == {"offsets": {"a": 0.1}}
    assert second.reset("5") == 2 and first.calibration("5") is None


def test_feedback_log_rotates(tmp_path):
    log = FeedbackLog(str(tmp_path / "feedback.jsonl"), max_bytes=100, backups=2)
    for i in range(12):
        log.append(json.dumps({"i": i, "pad": "x" * 20}))
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("feedback.jsonl") and not p.name.endswith("lock"))
    assert names == ["feedback.jsonl", "feedback.jsonl.1", "feedback.jsonl.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.glob("feedback.jsonl*"))
    newest = [json.loads(x)["i"] for x in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert newest[-1] == 11
    FeedbackLog(str(tmp_path / "off.jsonl"), max_bytes=0, backups=1).append("{}")
    assert not (tmp_path / "off.jsonl").exists()


def test_results_decode_to_masks():
    mask = np.zeros((20, 40), bool)
    mask[5:10, 10:30] = True
    (brush,) = brush_result({"A": mask})
    assert np.array_equal(item_mask(brush, 20, 40), mask)
    rect = {"type": "rectanglelabels", "to_name": "image", "value": {"x": 25, "y": 25, "width": 50, "height": 50,
                                                                       "rotation": 0, "rectanglelabels": ["B"]}}
    poly = {"type": "polygonlabels", "to_name": "image",
            "value": {"points": [[25, 25], [75, 25], [75, 75], [25, 75]], "polygonlabels": ["C"]}}
    regions = result_regions([brush, rect, poly, {"type": "textarea", "value": {"text": ["x"]}},
                              {"type": "rectanglelabels", "value": {"x": "bad"}}], 20, 40)
    masks = label_masks(regions, 20, 40)
    expected = np.zeros((20, 40), bool)
    expected[5:15, 10:30] = True
    assert set(masks) == {"A", "B", "C"}
    assert np.array_equal(masks["B"], expected) and np.array_equal(masks["C"], expected)
    assert result_regions([brush], 20, 40, to_name="other") == []


def test_the_learning_queue_is_bounded_and_never_blocks(tmp_path, monkeypatch):
    import threading

    from backend.learning import Job, Learner

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "GEM_LEARN_QUEUE": "1"})
    learner = Learner(settings, LearningStore(str(tmp_path)), lambda: None, lambda p: None, None, None)
    release, started = threading.Event(), threading.Event()

    def slow(job):
        started.set()
        release.wait(10)
    monkeypatch.setattr(learner, "run_job", slow)
    assert learner.submit(Job("task", "1", task="1"))          # taken by the worker thread ...
    assert started.wait(5)
    t0 = time.perf_counter()
    assert learner.submit(Job("task", "1", task="2"))          # ... one waits in the queue ...
    assert not learner.submit(Job("task", "1", task="3"))      # ... and the next is dropped at once
    assert time.perf_counter() - t0 < 0.5
    release.set()
    assert learner.wait_idle(5)


def test_without_its_own_label_studio_key_the_backend_only_logs(tmp_path):
    from backend_fixtures import FakePredictor, fake_extract_regions

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "m"), "LABEL_STUDIO_URL": "http://127.0.0.1:9"})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    # /setup may name a host and a token, but learning never uses them: only the backend's own key.
    client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": "http://127.0.0.1:9",
                                "access_token": "setup-token"})
    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 1)).get_json()["status"] == "recorded"
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()["status"] == "ok"
    off = Settings.from_env({"MODEL_DIR": str(tmp_path / "off"), "GEM_LEARN": "false"})
    assert GemBackendModel(off, predictor=FakePredictor()).learning is None
    model.close()
