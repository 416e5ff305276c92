"""The HTTP protocol, with a transparent fake predictor (tests/backend_fixtures.py).

The fake maps a prompt to the image brightness (or to an image half for "left"/"right"/...), so
every assertion about where a region lands can be checked exactly.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from backend.model import GemBackendModel, compute_model_version
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import (BRUSH_CONFIG, MIXED_CONFIG, POLYGON_CONFIG, RECTANGLE_CONFIG, FakePredictor,
                              data_uri, fake_extract_regions, square_image)

PNG = square_image()                     # 40x30, white box x 10..20, y 5..15
BOX_MASK = np.zeros((30, 40), bool)
BOX_MASK[5:15, 10:20] = True


def make_app(tmp_path, predictor=None, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "model_data"), **env})
    model = GemBackendModel(settings, predictor=predictor or FakePredictor(),
                            region_extractor=fake_extract_regions)
    return create_app(settings, model, load=False), model


def predict(client, tasks, config=BRUSH_CONFIG, context=None, project="1.1700000000", **kwargs):
    body = {"tasks": tasks, "label_config": config, "project": project,
            "params": {"login": None, "password": None, "context": context}}
    return client.post("/predict", json=body, **kwargs)


def task(i=1, url=None, **data):
    return {"id": i, "data": {"image": url or data_uri(PNG), **data}, "annotations": [], "predictions": []}


def brush_mask(item):
    h, w = item["original_height"], item["original_width"]
    return decode_rle(item["value"]["rle"]).reshape(h, w, 4)[..., 3] > 0


def labelled(result, label="Bright"):
    """The single item of `result` carrying `label` (the fake finds Dark = everything else too)."""
    (item,) = [i for i in result if i["value"][i["type"]] == [label]]
    return item


def textarea(*texts):
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": list(texts)}}]}


# -- predictions ------------------------------------------------------------------------------


def test_brush_prediction_matches_the_bright_box(tmp_path):
    app, model = make_app(tmp_path)
    reply = predict(app.test_client(), [task()])
    assert reply.status_code == 200
    (prediction,) = reply.get_json()["results"]
    assert prediction["model_version"].startswith(model.model_version + "+c") and 0 < prediction["score"] <= 1
    assert len(prediction["result"]) == 2
    item = labelled(prediction["result"])
    assert (item["from_name"], item["to_name"], item["type"]) == ("brush", "image", "brushlabels")
    assert item["value"]["brushlabels"] == ["Bright"]
    assert np.array_equal(brush_mask(item), BOX_MASK)


def test_polygon_and_rectangle_predictions(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    poly = labelled(predict(client, [task()], POLYGON_CONFIG).get_json()["results"][0]["result"])
    assert poly["type"] == "polygonlabels" and poly["value"]["closed"] is True
    assert poly["value"]["points"] == [[25.0, 16.6667], [50.0, 16.6667], [50.0, 50.0], [25.0, 50.0]]
    rect = labelled(predict(client, [task()], RECTANGLE_CONFIG).get_json()["results"][0]["result"])
    assert rect["value"] == {"x": 25.0, "y": 16.6667, "width": 25.0, "height": 33.3333, "rotation": 0,
                             "rectanglelabels": ["Bright"]}


def test_mixed_config_validates_with_the_sdk(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    (prediction,) = predict(client, [task()], MIXED_CONFIG).get_json()["results"]
    assert sorted(i["from_name"] for i in prediction["result"]) == ["brush", "brush", "poly", "poly", "rect", "rect"]
    assert LabelInterface(MIXED_CONFIG).validate_prediction(prediction, return_errors=True) == []


def test_each_control_predicts_on_its_own_image(tmp_path):
    config = """<View><Image name="first" value="$a"/><Image name="second" value="$b"/>
      <BrushLabels name="b1" toName="first"><Label value="Bright"/></BrushLabels>
      <RectangleLabels name="r2" toName="second"><Label value="Left side" prompts="left"/></RectangleLabels>
    </View>"""
    client = make_app(tmp_path)[0].test_client()
    other = square_image(width=20, height=10, box=(0, 0, 1, 1))
    reply = predict(client, [{"id": 7, "data": {"a": data_uri(PNG), "b": data_uri(other)}}], config)
    result = reply.get_json()["results"][0]["result"]
    by_name = {i["from_name"]: i for i in result}
    assert by_name["b1"]["to_name"] == "first" and by_name["b1"]["original_width"] == 40
    assert by_name["r2"]["to_name"] == "second" and by_name["r2"]["original_width"] == 20
    assert by_name["r2"]["value"]["x"] == 0 and by_name["r2"]["value"]["width"] == 50.0
    assert LabelInterface(config).validate_prediction({"result": result}, return_errors=True) == []


def test_nothing_to_predict_is_a_clear_4xx(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    config = "<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>"
    reply = predict(client, [task()], config)
    assert reply.status_code == 422
    assert "BrushLabels, PolygonLabels or RectangleLabels" in reply.get_json()["error"]
    assert predict(client, [task()], None).status_code == 422     # no config at all, no /setup either


def test_label_prompts_attribute_max_pools_its_prompts(tmp_path):
    config = """<View><Image name="image" value="$image"/>
      <BrushLabels name="brush" toName="image"><Label value="Sides" prompts="left half; right half"/></BrushLabels>
    </View>"""
    predictor = FakePredictor()
    client = make_app(tmp_path, predictor)[0].test_client()
    (item,) = predict(client, [task()], config).get_json()["results"][0]["result"]
    assert brush_mask(item).all()               # max(left, right) covers the whole image
    assert predictor.similarity_calls == [("left half", "right half")]


def test_textarea_prompt_interactive_then_remembered_for_batch(tmp_path):
    predictor = FakePredictor()
    app, model = make_app(tmp_path, predictor, GEM_REMEMBER_PROMPTS="true")
    client = app.test_client()
    # A typed prompt equal to a label (ignoring case) predicts that label.
    reply = predict(client, [task()], MIXED_CONFIG, context=textarea("DARK"), project="5.123")
    labels = {i["value"][i["type"]][0] for i in reply.get_json()["results"][0]["result"]}
    assert labels == {"Dark"}

    # Interactive: only the typed prompt; no label matches it, so it goes to the first label.
    reply = predict(client, [task()], MIXED_CONFIG, context=textarea("the left part"), project="5.123")
    result = reply.get_json()["results"][0]["result"]
    assert predictor.similarity_calls[-1] == ("the left part",)
    brush = next(i for i in result if i["type"] == "brushlabels")
    assert brush["value"]["brushlabels"] == ["Bright"]
    assert brush_mask(brush)[:, :20].all() and not brush_mask(brush)[:, 20:].any()
    assert json.loads((tmp_path / "model_data" / "prompts.json").read_text())["projects"]["5"]["prompts"] == \
        ["the left part"]

    # Batch for the same project: the config's labels plus the last remembered prompt.
    predict(client, [task()], MIXED_CONFIG, project="5.999")
    assert set(predictor.similarity_calls[-1]) == {"Bright", "Dark", "the left part"}
    # Another project remembers nothing.
    predict(client, [task()], MIXED_CONFIG, project="6.1")
    assert set(predictor.similarity_calls[-1]) == {"Bright", "Dark"}

    # The UI's empty call on Submit neither predicts nor forgets the remembered prompt.
    calls = len(predictor.similarity_calls)
    assert predict(client, [task()], MIXED_CONFIG, context={"result": []}, project="5.1").get_json()[
        "results"][0]["result"] == []
    assert len(predictor.similarity_calls) == calls
    predict(client, [task()], MIXED_CONFIG, project="5.2")
    assert set(predictor.similarity_calls[-1]) == {"Bright", "Dark", "the left part"}


def test_typed_prompt_is_not_remembered_by_default(tmp_path):
    predictor = FakePredictor()
    client = make_app(tmp_path, predictor)[0].test_client()
    predict(client, [task()], MIXED_CONFIG, context=textarea("the left part"), project="5.123")
    assert predictor.similarity_calls[-1] == ("the left part",)
    predict(client, [task()], MIXED_CONFIG, project="5.124")
    assert set(predictor.similarity_calls[-1]) == {"Bright", "Dark"}
    assert not (tmp_path / "model_data" / "prompts.json").exists()


@pytest.mark.parametrize("context", [{"result": []}, {}, {"result": [{"type": "textarea", "value": {"text": [""]}}]},
                                     {"result": [{"type": "brushlabels", "from_name": "brush", "to_name": "image",
                                                  "value": {"format": "rle", "rle": [0], "brushlabels": ["Bright"]}}]}])
def test_interactive_call_without_a_prompt_answers_no_regions(tmp_path, context):
    """What the UI sends on Submit with Auto-Annotation on: no suggestions may come back."""
    predictor = FakePredictor()
    client = make_app(tmp_path, predictor, GEM_REMEMBER_PROMPTS="true")[0].test_client()
    predict(client, [task()], MIXED_CONFIG, context=textarea("the left part"), project="5.1")  # remembered
    encoded = list(predictor.encode_calls)
    results = predict(client, [task(1), task(2, "/data/upload/5/never-fetched.png")], MIXED_CONFIG,
                      context=context, project="5.1").get_json()["results"]
    assert [r["result"] for r in results] == [[], []]
    assert predictor.encode_calls == encoded      # no image was encoded (nor downloaded: task 2 would fail)
    assert all("error" not in r for r in results)


def test_one_failing_task_gets_an_empty_prediction_in_order(tmp_path, ls):
    ls.image("/data/upload/1/good.png", PNG, require="Token secret-token")
    ls.image("/data/upload/1/corrupt.png", b"not an image at all", require="Token secret-token")
    predictor = FakePredictor()
    client = make_app(tmp_path, predictor, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="secret-token",
                      GEM_BATCH_SIZE="2", GEM_BULK_MODEL_IMAGES="2")[0].test_client()
    tasks = [task(1, "/data/upload/1/good.png"), task(2, "/data/upload/1/missing.png"),
             task(3, "/data/upload/1/good.png"), {"id": 4, "data": {"other": "x"}},
             task(5, "/data/upload/1/corrupt.png"), task(6, "/data/upload/1/good.png"), {"id": 7}]
    results = predict(client, tasks).get_json()["results"]
    assert len(results) == 7
    # Failed tasks get no "result", so Label Studio stores nothing and retries them next time.
    assert [bool(r.get("result")) for r in results] == [True, False, True, False, False, True, False]
    assert ["result" in r for r in results] == [True, False, True, False, False, True, False]
    assert "HTTP 404" in results[1]["error"] and results[1]["score"] == 0
    assert "'image'" in results[3]["error"] and "not a readable image" in results[4]["error"]
    assert predictor.encode_calls == [2, 1]        # batches fill with fetched images: (1, 3), (6)


@pytest.mark.parametrize("mode,context", [("empty", None), ("skip", textarea("Bright"))])
def test_failed_tasks_as_empty_predictions(tmp_path, mode, context):
    """GEM_FAILED_TASKS=empty, and interactive calls (never stored), answer result [] with score 0."""
    client = make_app(tmp_path, GEM_FAILED_TASKS=mode)[0].test_client()
    results = predict(client, [task(1), task(2, "ftp://x/y.png")], context=context).get_json()["results"]
    assert results[0]["result"] and results[1]["result"] == [] and results[1]["score"] == 0


def test_a_bad_image_in_a_batch_fails_alone(tmp_path):
    predictor = FakePredictor(fail_on_size=(20, 10))
    client = make_app(tmp_path, predictor)[0].test_client()
    odd = data_uri(square_image(width=20, height=10, box=(0, 0, 5, 5)))
    results = predict(client, [task(1), task(2, odd), task(3)]).get_json()["results"]
    assert [bool(r.get("result")) for r in results] == [True, False, True]


def test_exif_rotated_jpeg_regions_align_with_the_displayed_image(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    jpeg = square_image(fmt="JPEG", exif_orientation=6)   # shows as 30x40 with the box at x 15..25, y 10..20
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    item = labelled(predict(client, [task(1, url)]).get_json()["results"][0]["result"])
    assert (item["original_width"], item["original_height"]) == (30, 40)
    rows, cols = np.nonzero(brush_mask(item))
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (15, 25, 10, 20)


def test_model_calls_never_overlap(tmp_path):
    predictor = FakePredictor()
    app, _ = make_app(tmp_path, predictor)
    statuses = []

    def run():
        statuses.append(predict(app.test_client(), [task(i) for i in range(3)]).status_code)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 4 and predictor.max_active == 1


# -- protocol ---------------------------------------------------------------------------------


def test_setup_is_fast_and_its_hostname_token_and_schema_are_used(tmp_path, ls):
    ls.image("/data/upload/3/a.png", PNG, require="Token setup-token")
    client = make_app(tmp_path)[0].test_client()
    reply = client.post("/setup", json={"project": "3.1700", "schema": BRUSH_CONFIG, "hostname": ls.url,
                                        "access_token": "setup-token", "extra_params": {}})
    assert reply.status_code == 200 and reply.get_json()["model_version"]
    reply = client.post("/predict", json={"tasks": [task(1, "/data/upload/3/a.png")], "project": "3.1700"})
    assert reply.get_json()["results"][0]["result"]     # config and credentials came from /setup


def test_setup_warns_about_an_unusable_config_but_connects(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    reply = client.post("/setup", json={"project": "1.1", "schema": "<View></View>"})
    assert reply.status_code == 200 and "nothing to predict" in reply.get_json()["warning"]


@pytest.mark.parametrize("kwargs,message", [
    ({"data": "not json", "content_type": "application/json"}, "JSON object"),
    ({"json": [1, 2]}, "JSON object"),
    ({"json": {"tasks": "x"}}, "'tasks' must be a list"),
    ({"json": {"tasks": [1]}}, "tasks[0] must be an object"),
    ({"json": {"tasks": [], "label_config": 5}}, "'label_config' must be a string"),
    ({"json": {"tasks": [{"id": 1}], "params": {"context": "x"}}}, "context"),
])
def test_bad_requests_get_json_4xx(tmp_path, kwargs, message):
    client = make_app(tmp_path)[0].test_client()
    reply = client.post("/predict", **kwargs)
    assert reply.status_code == 400 and message in reply.get_json()["error"]


def test_oversized_body_is_413(tmp_path):
    client = make_app(tmp_path, GEM_MAX_REQUEST_MB="0.01")[0].test_client()
    reply = client.post("/predict", json={"tasks": [task(i) for i in range(100)], "label_config": BRUSH_CONFIG})
    assert reply.status_code == 413 and "error" in reply.get_json()


def test_unknown_routes_and_methods_are_json(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").get_json()
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").get_json()
    assert predict(client, []).get_json()["results"] == []


def test_health_answers_at_once_and_never_loads_the_model(tmp_path, monkeypatch):
    started = threading.Event()

    def slow_load(self):
        started.set()
        time.sleep(3)
    monkeypatch.setattr(GemBackendModel, "load", slow_load)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "GEM_LOAD_WAIT": "0.2"})
    app = create_app(settings)               # starts loading in the background
    client = app.test_client()
    t0 = time.perf_counter()
    body = client.get("/health").get_json()
    assert time.perf_counter() - t0 < 0.5
    assert body == {"status": "UP", "model_class": "GemBackendModel", "model_ready": False,
                    "model_version": body["model_version"]}
    assert client.get("/").get_json()["status"] == "UP"
    assert client.post("/setup", json={"project": "1.1", "schema": BRUSH_CONFIG}).status_code == 200
    assert time.perf_counter() - t0 < 1.0
    reply = predict(client, [task()])
    assert reply.status_code == 503 and "loading" in reply.get_json()["error"]
    assert reply.headers["Retry-After"]
    assert started.wait(2)


def test_versions_and_webhooks(tmp_path):
    app, model = make_app(tmp_path)
    client = app.test_client()
    assert client.get("/versions").get_json() == {"versions": [model.model_version]}
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 3},
             "task": {"id": 11, "data": {"image": "/data/upload/3/a.png"}},
             "annotation": {"id": 99, "result": [{"type": "brushlabels", "value": {}}]}}
    assert client.post("/webhook", json=event).get_json()["status"] == "recorded"
    (line,) = (tmp_path / "model_data" / "feedback.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["action"], record["project"], record["task"], record["annotation"]) == \
        ("ANNOTATION_CREATED", 3, 11, 99)
    # Label Studio 1.23 names the source prediction `parent_prediction`: an id, or an object.
    client.post("/webhook", json={**event, "annotation": {"id": 100, "parent_prediction": 7},
                                  "task": {"id": 11, "predictions": [{"id": 6, "model_version": "old"},
                                                                     {"id": 7, "model_version": "gem-x"}]}})
    client.post("/webhook", json={**event, "annotation": {"id": 101, "parent_prediction": 8}})
    client.post("/webhook", json={**event, "annotation": {"id": 102, "parent_prediction": {
        "id": 9, "model_version": "gem-y"}}})
    client.post("/webhook", json={**event, "annotation": {"id": 103, "prediction": {"model_version": "gem-z"}}})
    records = [json.loads(x) for x in (tmp_path / "model_data" / "feedback.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["prediction_model_version"]) for r in records] == [
        (None, None), (7, "gem-x"), (8, None), (9, "gem-y"), (None, "gem-z")]
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert reply.status_code == 200 and reply.get_json()["status"] == "ok"
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).get_json()["status"] == "ignored"
    assert client.post("/webhook", json={"project": 1}).status_code == 400


def test_basic_auth(tmp_path):
    open_client = make_app(tmp_path)[0].test_client()
    assert predict(open_client, [task()]).status_code == 200

    client = make_app(tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret")[0].test_client()
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    reply = predict(client, [task()])
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Basic")
    assert predict(client, [task()], headers=bad).status_code == 401
    assert predict(client, [task()], headers=good).status_code == 200
    for path in ("/versions", "/metrics"):
        assert client.get(path).status_code == 401 and client.get(path, headers=good).status_code == 200
    assert client.post("/setup", json={}).status_code == 401
    # Open by design: probes and Label Studio's annotation webhooks carry no basic auth.
    assert client.get("/health").status_code == 200
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 200


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def test_metrics_in_prometheus_text_format(tmp_path):
    client = make_app(tmp_path)[0].test_client()
    predict(client, [task(), task(2, "ftp://nowhere/x.png")])
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.content_type.startswith("text/plain; version=0.0.4")
    text = reply.get_data(as_text=True)
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert 'gem_http_requests_total{endpoint="/predict",method="POST",status="200"} 1' in text
    assert "# TYPE gem_stage_duration_seconds histogram" in text
    for stage in ("fetch", "preprocess", "model", "postprocess", "encode"):
        assert f'gem_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'gem_task_errors_total{reason="no_image"} 1' in text
    assert 'gem_tasks_total{outcome="ok"} 1' in text
    assert "gem_model_ready 1" in text and "gem_model_load_seconds" in text


def test_one_log_line_per_request_without_secrets(tmp_path, ls, caplog):
    ls.image("/data/upload/1/a.png", PNG)
    client = make_app(tmp_path, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="tok-SECRET",
                      BASIC_AUTH_USER="u", BASIC_AUTH_PASS="pw-SECRET")[0].test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:pw-SECRET").decode()}
    with caplog.at_level(logging.DEBUG):
        predict(client, [task(1, "/data/upload/1/a.png"), task(2, "/data/upload/1/gone.png")], headers=auth)
        client.post("/setup", json={"project": "1.1", "access_token": "setup-SECRET", "hostname": ls.url},
                    headers=auth)
        client.get("/health")
    records = [r for r in caplog.records if r.name == "backend.requests"]
    lines = [json.loads(r.getMessage()) for r in records]
    assert [line["path"] for line in lines] == ["/predict", "/setup", "/health"]
    assert records[-1].levelno == logging.DEBUG     # polled endpoints stay out of INFO logs
    first = lines[0]
    assert first["task_ids"] == [1, 2] and first["outcome"] == "partial" and first["status"] == 200
    assert first["failed"][0]["task"] == 2 and "HTTP 404" in first["failed"][0]["message"]
    assert set(first["timings_ms"]) >= {"fetch", "preprocess", "model", "postprocess", "encode"}
    assert "SECRET" not in caplog.text


def test_model_version_is_stable_and_tracks_settings(tmp_path):
    a = Settings.from_env({"GEM_IMAGE_SIZE": "448"})
    assert compute_model_version(a) == compute_model_version(Settings.from_env({}))
    assert compute_model_version(a) != compute_model_version(Settings.from_env({"GEM_IMAGE_SIZE": "336"}))
    assert compute_model_version(a) != compute_model_version(Settings.from_env({"GEM_MIN_SIMILARITY": "0.3"}))
    assert compute_model_version(Settings.from_env({"MODEL_VERSION": "mine"})) == "mine"
    assert compute_model_version(Settings.from_env({"GEM_PRETRAINED": "/w/ckpt.pt"})).startswith(
        "gem-ViT-B-16-ckpt.pt-")
