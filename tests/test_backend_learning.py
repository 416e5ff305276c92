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
from backend.learning import LearningStore, instance_of, main as learning_main, state_key
from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_learning import LABELS, make_project  # noqa: E402

TOKEN = "0123456789abcdef0123"
# Label Studio names a project "<id>.<created_at as epoch seconds>" in /setup and /predict.
CREATED = {1: "2023-11-14T22:13:20.123456Z", 2: "1970-01-01T00:00:01Z"}
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
        self.tasks, self.annotations, self.images, self.configs = {}, {}, {}, {}
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
                    "projects": {p: {"id": p, "label_config": self.configs.get(p, CONFIG),
                                     "created_at": CREATED[p]} for p in (1, 2)},
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
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN, "GEM_OUTPUTS": "brush",
           # These tests ask for the predictions themselves; the refresh after learning (tests/test_refresh.py)
           # would take the same tasks in the background (one prediction per task) and answer them "busy".
           "GEM_REFRESH_MAX_TASKS": "0"}
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


def key_of(ls, project=1):
    return state_key(instance_of(ls.url), project, {1: "1700000000", 2: "1"}[project])


def learn(client, model, fake, project_images, task_ids, annotation_base=1000, project=1):
    for task_id in task_ids:
        fake.annotate(task_id, annotation_base + task_id, project_images[task_id - 1].masks)
        reply = client.post("/webhook", json=event("ANNOTATION_CREATED", project, task_id, annotation_base + task_id))
        assert reply.get_json()["status"] == "queued"
        assert model.learning.learner.wait_idle(120)
    assert model.learning.learner.failed == 0


def setup_version(client, project="1.1700000000", schema=CONFIG):
    return client.post("/setup", json={"project": project, "schema": schema}).get_json()["model_version"]


def test_annotations_reach_the_state_and_change_the_next_predictions(backend, project_images, monkeypatch, capsys):
    client, model, fake, settings, env = backend
    base = setup_version(client)
    assert base.startswith(model.model_version + "+c") and "+l" not in base
    heldout = [7, 8]
    before = predict(client, heldout, fake)
    assert before["model_version"] == base
    iou_before = np.mean([iou_of(p, project_images[i - 1].masks) for p, i in zip(before["results"], heldout)])

    learn(client, model, fake, project_images, range(1, 7))
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    assert len(store.keys(key)) == 6
    # Start Training publishes what was learned whatever the policy; nothing is recomputed.
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()["status"] \
        == "queued"
    assert model.learning.learner.wait_idle(120)
    learned = store.version(key)
    assert learned.startswith("l") and len(store.published_digests(key)) == 6

    after = predict(client, heldout, fake)
    assert after["model_version"] == f"{base}+{learned}"
    assert all(p["model_version"] == after["model_version"] for p in after["results"])
    iou_after = np.mean([iou_of(p, project_images[i - 1].masks) for p, i in zip(after["results"], heldout)])
    assert iou_after > iou_before + 0.1, (iou_before, iou_after)
    assert setup_version(client, "1.1700000000") == after["model_version"]

    # Another worker (a second model on the same MODEL_DIR) sees the state at its next request.
    other = GemBackendModel(settings, predictor=model._predictor)
    other.setup(project="1.1700000000", schema=CONFIG)
    assert other.version_for("1.1700000000") == after["model_version"]

    # Reset by the documented command: the project predicts as before, under the version of before.
    monkeypatch.setenv("MODEL_DIR", settings.model_dir)
    monkeypatch.setenv("LABEL_STUDIO_URL", fake.server.url)
    assert learning_main(["reset", "--project", "1"]) == 0
    assert "learned state forgotten" in capsys.readouterr().out
    assert store.keys(key) == [] and store.version(key) == ""
    reset = predict(client, heldout, fake)
    assert reset["model_version"] == base

    def regions(reply):
        return [[{k: v for k, v in item.items() if k != "id"} for item in p["result"]] for p in reply["results"]]
    assert regions(reset) == regions(before)
    other.close()


def test_no_op_and_forged_events_keep_the_version(backend, project_images):
    client, model, fake, settings, _ = backend
    setup_version(client)
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    learn(client, model, fake, project_images, [1])
    version = store.version(key)
    assert version.startswith("l")
    before = setup_version(client)
    # An update that changes nothing, a forged event naming an annotation that does not exist,
    # and a delete of annotations never learned: the version /setup reports does not move.
    client.post("/webhook", json=event("ANNOTATION_UPDATED", 1, 1, 1001))
    client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 555,
                                       brush_result({"Disc": np.ones((96, 96), bool)})))
    client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 3, 556))          # task 3 has no annotation
    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 1},
                                  "annotations": [{"id": 777}, {"id": 778}]})
    assert model.learning.learner.wait_idle(60) and model.learning.learner.failed == 0
    assert store.version(key) == version and setup_version(client) == before
    assert [k for k, _ in store.keys(key)] == ["1"]


def test_deleted_annotations_are_found_by_id_and_unlearned(backend, project_images):
    client, model, fake, settings, _ = backend
    setup_version(client)
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    learn(client, model, fake, project_images, [1, 2])
    version = store.version(key)
    assert sorted(t for t, _, _ in store.published_digests(key).values()) == ["1", "2"]
    # As Label Studio 1.23 sends it: plural, ids only, no task; the annotation is already gone.
    fake.tasks[1]["annotations"], fake.tasks[1]["total_annotations"] = [], 0
    del fake.annotations[1001]
    reply = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 1},
                                          "annotations": [{"id": 1001}]})
    assert reply.get_json()["status"] == "queued"
    assert model.learning.learner.wait_idle(60) and model.learning.learner.failed == 0
    # Forgotten at once (a deletion is published whatever the policy), under a new version.
    assert [t for _, t in store.keys(key)] == ["2"]
    assert sorted(t for t, _, _ in store.published_digests(key).values()) == ["2"]
    assert store.version(key) not in ("", version)
    # The singular form Label Studio never sends is not an annotation event.
    assert client.post("/webhook", json={"action": "ANNOTATION_DELETED", "project": {"id": 1},
                                         "annotation": {"id": 1002}}).get_json()["status"] == "ignored"


def test_bulk_created_annotations_are_learned_per_task(backend, project_images):
    client, model, fake, settings, _ = backend
    setup_version(client)
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    made = [fake.annotate(t, 4000 + t, project_images[t - 1].masks) for t in (2, 3)]
    # As Label Studio sends ANNOTATIONS_CREATED: a list under the singular key, tasks alike.
    reply = client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": {"id": 1},
                                          "annotation": made, "task": [fake.tasks[2], fake.tasks[3]]})
    assert reply.get_json()["status"] == "queued"
    assert model.learning.learner.wait_idle(120) and model.learning.learner.failed == 0
    assert sorted(t for _, t in store.keys(key)) == ["2", "3"]


def test_doubling_policy_publishes_at_powers_of_two(backend, project_images):
    from gem_model.learning import publish_due

    client, model, fake, settings, _ = backend
    setup_version(client)
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    versions, published_labels = [], []
    for task_id in range(1, 8):
        learn(client, model, fake, project_images, [task_id])
        versions.append(store.version(key))
        published_labels.append(sorted(sum((labels for _, _, labels in store.published_digests(key).values()), [])))
    # Replay the policy on the label counts the learner saw: it published exactly when due.
    counts: dict = {}
    expected, pending = [], {}
    for task_id in range(1, 8):
        for label in project_images[task_id - 1].masks:
            pending[label] = pending.get(label, 0) + 1
        if publish_due(counts, pending):
            for label, n in pending.items():
                counts[label] = counts.get(label, 0) + n
            pending = {}
        expected.append(sorted(label for label, n in counts.items() for _ in range(n)))
    assert published_labels == expected
    assert len(set(versions)) < len(versions)             # fewer versions than annotations
    assert all(v.startswith("l") for v in versions)


def test_start_training_rebuilds_from_all_annotations(backend, project_images, caplog):
    client, model, fake, settings, _ = backend
    setup_version(client)
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    learn(client, model, fake, project_images, [6], annotation_base=2000)
    first = store.version(key)
    assert first.startswith("l")
    fake.tasks[6]["annotations"], fake.tasks[6]["total_annotations"] = [], 0   # deleted, no webhook came
    for task_id in (2, 3, 4):
        fake.annotate(task_id, 2000 + task_id, project_images[task_id - 1].masks)
    fake.annotate(5, 2005, project_images[4].masks, cancelled=True)     # skipped tasks teach nothing
    with caplog.at_level("INFO", logger="backend.learning"):
        reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        assert reply.get_json()["status"] == "queued"
        assert model.learning.learner.wait_idle(120)
    assert sorted(k for k, _ in store.keys(key)) == ["2", "3", "4"]
    assert store.version(key) not in ("", first)          # one new version for the whole rebuild
    assert "rebuild done: 4 annotated tasks, 3 images learned anew" in caplog.text
    assert store.calibration(key)["samples"] == 3
    # A second rebuild of the same annotations recomputes nothing and keeps the version.
    again = store.version(key)
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert model.learning.learner.wait_idle(120) and store.version(key) == again


def test_repeated_start_training_merges_into_one_rebuild(backend, project_images):
    client, model, fake, settings, _ = backend
    setup_version(client)
    fake.annotate(2, 3002, project_images[1].masks)
    learner = model.learning.learner
    with learner._work_lock:   # the learner is busy: requests pile up meanwhile
        for _ in range(5):
            assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}) \
                .get_json()["status"] == "queued"
        assert learner.queue.qsize() <= 1
    assert learner.wait_idle(120) and learner.failed == 0
    assert learner.rebuilds == 1
    # Asked again after it ran: a new rebuild.
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert learner.wait_idle(120) and learner.rebuilds == 2


def test_start_training_needs_basic_auth_or_the_secret(tmp_path):
    from backend_fixtures import FakePredictor, fake_extract_regions

    training = {"action": "START_TRAINING", "project": {"id": 1}}
    annotation = event("ANNOTATION_CREATED", 1, 1, 1)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "a"), "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    assert client.post("/webhook", json=training).status_code == 401
    assert client.post("/webhook", json=training, auth=("u", "wrong")).status_code == 401
    assert client.post("/webhook", json=training, auth=("u", "p")).status_code == 200
    assert client.post("/webhook", json=annotation).status_code == 200     # Label Studio sends these without
    model.close()
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "b"), "GEM_WEBHOOK_SECRET": "s3cret-value"})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    assert client.post("/webhook", json=training).status_code == 401
    assert client.post("/webhook?secret=s3cret-value", json=training).status_code == 200
    model.close()


def test_replicas_predict_with_the_state_and_it_is_keyed_by_instance(backend, project_images):
    client, model, fake, settings, env = backend
    setup_version(client)
    learn(client, model, fake, project_images, [1])
    learned_version = setup_version(client)
    assert "+l" in learned_version

    def replica(**extra):
        other = GemBackendModel(Settings.from_env({**env, **extra}), predictor=model._predictor)
        other.setup(project="1.1700000000", schema=CONFIG)
        return other
    # A replica that does not learn (GEM_LEARN=false) still predicts with the learned state ...
    follower = replica(GEM_LEARN="false")
    assert follower.version_for("1.1700000000") == learned_version
    assert follower.webhook("ANNOTATION_CREATED", event("ANNOTATION_CREATED", 1, 2, 1002))["status"] == "recorded"
    # ... unless told not to use it.
    plain = replica(GEM_USE_LEARNED="false")
    assert plain.learning is None or plain.learned_provider is None
    assert "+l" not in plain.version_for("1.1700000000")
    # Another Label Studio (or a project re-created under the same id) starts from nothing.
    elsewhere = replica(LABEL_STUDIO_URL="http://127.0.0.1:1")
    assert "+l" not in elsewhere.version_for("1.1700000000")
    assert "+l" not in model.version_for("1.1700000999")
    for other in (follower, plain, elsewhere):
        other.close()


def test_the_webhook_body_is_only_a_hint(backend, project_images):
    client, model, fake, settings, _ = backend
    client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG})
    store, key = LearningStore(settings.model_dir), key_of(fake.server)
    # A forged result in the body is never read: the annotation does not exist in Label Studio,
    # and the task has none, so nothing is learned.
    forged = brush_result({"Disc": np.ones((96, 96), bool)})
    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 555, forged)).get_json()["status"] == "queued"
    assert model.learning.learner.wait_idle(60)
    assert store.keys(key) == []
    # A real annotation claimed for another project is refused (task 1 is project 1's).
    fake.annotate(1, 1001, project_images[0].masks)
    client.post("/setup", json={"project": "2.1", "schema": CONFIG})
    client.post("/webhook", json=event("ANNOTATION_CREATED", 2, 1, 1001))
    assert model.learning.learner.wait_idle(60)
    assert store.keys(key_of(fake.server, 2)) == [] and model.learning.learner.failed == 1
    # Unknown project (never sent /setup): recorded in the feedback log, not learned.
    assert client.post("/webhook", json=event("ANNOTATION_CREATED", 9, 1, 1001)).get_json()["status"] == "recorded"
    # The real annotation of the right project is learned.
    client.post("/webhook", json=event("ANNOTATION_CREATED", 1, 1, 1001))
    assert model.learning.learner.wait_idle(60)
    assert [k for k, _ in store.keys(key)] == ["1"]


def test_learning_store_versions_are_content_digests(tmp_path):
    from backend.learning import state_version

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    first, second = LearningStore(str(tmp_path)), LearningStore(str(tmp_path))
    key = first.remember_project("http://ls", "5", "1700000000")
    assert first.version(key) == "" and state_version({}, None, settings) == ""
    version = state_version({"5": "abc"}, {"offsets": {"a": 0.1}}, settings)
    assert version == state_version({"5": "abc"}, {"offsets": {"a": 0.10000001}}, settings)   # same content
    assert version != state_version({"5": "abd"}, {"offsets": {"a": 0.1}}, settings)
    assert version != state_version({"5": "abc"}, {"offsets": {"a": 0.2}}, settings)
    assert first.publish(key, version, {"offsets": {"a": 0.1}})
    assert not second.publish(key, version, {"offsets": {"a": 0.1}})     # already published: no change
    assert second.version(key) == version and second.calibration(key) == {"offsets": {"a": 0.1}}
    second.reset(key)
    assert first.version(key) == "" and first.calibration(key) is None
    # Keys: instance + id + creation time; by id alone, the newest state of that id on the instance.
    assert first.resolve("http://ls", "5") == key and first.resolve("http://other", "5") != key


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
    off = Settings.from_env({"MODEL_DIR": str(tmp_path / "off"), "GEM_LEARN": "false", "GEM_USE_LEARNED": "false"})
    assert GemBackendModel(off, predictor=FakePredictor()).learning is None
    model.close()


def test_the_version_follows_the_label_config(tmp_path):
    """Adding a label or editing prompts= gives a new version (Label Studio recomputes); the same
    config gives the same one, and stored predictions carry what /setup answered."""
    from backend_fixtures import FakePredictor, fake_extract_regions

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    two = "<View><Image name='image' value='$image'/><BrushLabels name='brush' toName='image'>{}</BrushLabels></View>"
    configs = [two.format("<Label value='Disc'/><Label value='Square'/>"),
               two.format("<Label value='Disc'/><Label value='Square'/><Label value='Triangle'/>"),
               two.format("<Label value='Disc' prompts='round thing'/><Label value='Square'/>"),
               two.format("<Label value='Disc' prompts='round thing, circle'/><Label value='Square'/>")]
    versions = [setup_version(client, "4.1", config) for config in configs]
    assert len(set(versions)) == len(configs) and all(v.startswith(model.model_version + "+c") for v in versions)
    assert setup_version(client, "4.1", configs[0]) == versions[0]
    # Whitespace and attribute order are not the labels or prompts: no new version.
    assert setup_version(client, "4.1", configs[0].replace("<Label value='Disc'/>", "<Label  value='Disc' />")) \
        == versions[0]
    task = {"id": 1, "data": {"image": "data:image/png;base64," + __import__("base64").b64encode(
        png(__import__("PIL.Image").Image.new("RGB", (32, 32)))).decode()}}
    reply = client.post("/predict", json={"tasks": [task], "project": "4.1", "label_config": configs[1]}).get_json()
    assert reply["model_version"] == versions[1] and reply["results"][0]["model_version"] == versions[1]
    # GET /versions (Label Studio names no project there) lists the project's version, then the base.
    latest = setup_version(client, "4.1", configs[1])
    assert client.get("/versions").get_json()["versions"] == [latest, model.model_version]
    model.close()
