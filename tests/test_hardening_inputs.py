"""The bad-input catalogue (docs/RELIABILITY.md, section 1): each input and its expected outcome.

Outcomes are either a 4xx JSON error that says what is wrong, or, for a task that cannot be
predicted, an entry without `result` and with an `error` (GEM_FAILED_TASKS=skip; interactive
calls get `result: []`) while the other tasks are predicted. Never a 500, never a hang.

Request-level cases use the transparent fake predictor; image formats and prompts run through
the real pipeline on the tiny random model.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import bad_inputs as bad
from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, MIXED_CONFIG, FakePredictor, LocalServer, fake_extract_regions

ROOT = Path(__file__).resolve().parents[1]
PNG = bad.png_rgb()


pytestmark = pytest.mark.usefixtures("loopback_only_guard")


def make_client(tmp_path, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path / "model_data"), **env})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    return create_app(settings, model, load=False).test_client()


def body(tasks, config=BRUSH_CONFIG, context=None, **extra):
    return {"tasks": tasks, "label_config": config, "project": "1.1",
            "params": {"login": None, "password": None, "context": context}, **extra}


def task(i=1, image=None, **data):
    return {"id": i, "data": {"image": image if image is not None else bad.data_uri(PNG), **data}}


def post(client, payload=None, **kwargs):
    reply = client.post("/predict", json=payload, **kwargs) if payload is not None else client.post("/predict", **kwargs)
    assert reply.status_code != 500, reply.get_data(as_text=True)
    assert reply.is_json, reply.get_data(as_text=True)[:200]
    return reply


def client_error(client, payload=None, status=400, match="", **kwargs):
    reply = post(client, payload, **kwargs)
    assert reply.status_code == status, reply.get_json()
    error = reply.get_json()["error"]
    assert re.search(match, error), error
    assert "Traceback" not in error
    return error


def failed_entry(client, bad_task, match, **env_payload):
    """One bad task between two good ones: it alone fails, with a reason; order is kept."""
    results = post(client, body([task(1), bad_task, task(3)], **env_payload)).get_json()["results"]
    assert len(results) == 3
    assert results[0]["result"] and results[2]["result"]
    assert "result" not in results[1] and results[1]["score"] == 0
    assert re.search(match, results[1]["error"]), results[1]["error"]
    return results[1]["error"]


# -- request bodies -----------------------------------------------------------------------------


def test_malformed_json_is_400(tmp_path):
    client = make_client(tmp_path)
    client_error(client, data='{"tasks": [', content_type="application/json", match="JSON object")
    client_error(client, data=b"\xff\xfe\x00garbage", content_type="application/json", match="JSON object")


def test_empty_body_is_400(tmp_path):
    client_error(make_client(tmp_path), data=b"", content_type="application/json", match="JSON object")


def test_json_that_is_not_an_object_is_400(tmp_path):
    client = make_client(tmp_path)
    for payload in ([1, 2], "tasks", 42, None):
        client_error(client, data=json.dumps(payload), content_type="application/json", match="JSON object")


def test_deeply_nested_json_is_400_not_500(tmp_path):
    nested = '{"tasks": ' + "[" * 200000 + "]" * 200000 + "}"
    client_error(make_client(tmp_path), data=nested, content_type="application/json", match="nested too deeply")


def test_missing_tasks_is_400(tmp_path):
    client_error(make_client(tmp_path), {"label_config": BRUSH_CONFIG}, match="'tasks' must be a list")


@pytest.mark.parametrize("tasks", ["all", {"id": 1}, 7, True])
def test_tasks_of_the_wrong_type_is_400(tmp_path, tasks):
    client_error(make_client(tmp_path), body(tasks), match="'tasks' must be a list")


@pytest.mark.parametrize("item", [1, "task", None, [1]])
def test_task_that_is_not_an_object_is_400(tmp_path, item):
    client_error(make_client(tmp_path), body([task(1), item]), match=r"tasks\[1\] must be an object")


@pytest.mark.parametrize("field,value,match", [
    ("label_config", 5, "'label_config' must be a string"), ("params", "x", "'params' must be an object"),
    ("params", {"context": [1]}, "context"),
])
def test_wrong_types_of_other_fields_are_400(tmp_path, field, value, match):
    payload = body([task()])
    payload[field] = value
    client_error(make_client(tmp_path), payload, match=match)


def test_body_over_the_request_limit_is_413(tmp_path):
    client = make_client(tmp_path, GEM_MAX_REQUEST_MB="0.05")
    client_error(client, body([task(i) for i in range(200)]), status=413, match="")


# -- prompts ------------------------------------------------------------------------------------


def test_too_many_labels_is_422_with_the_limit(tmp_path):
    client = make_client(tmp_path, GEM_MAX_PROMPTS="20")
    client_error(client, body([task()], bad.many_labels_config(21)), status=422, match="GEM_MAX_PROMPTS=20")
    assert post(client, body([task()], bad.many_labels_config(20))).status_code == 200
    # /setup still connects, and warns.
    reply = client.post("/setup", json={"project": "1.1", "schema": bad.many_labels_config(21)})
    assert reply.status_code == 200 and "GEM_MAX_PROMPTS" in reply.get_json()["warning"]


def test_huge_free_text_prompt_list_is_422(tmp_path):
    client = make_client(tmp_path, GEM_REMEMBER_PROMPTS="true")
    typed = ";".join(f"thing number {k}" for k in range(5000))
    client_error(client, body([task()], MIXED_CONFIG, context=bad.textarea(typed)), status=422,
                 match="5000 distinct prompts.*GEM_MAX_PROMPTS=128")
    many_items = bad.textarea(*[f"item {k}" for k in range(300)])
    client_error(client, body([task()], MIXED_CONFIG, context=many_items), status=422, match="GEM_MAX_PROMPTS")
    # Nothing of it was remembered for later batch predictions.
    assert not (tmp_path / "model_data" / "prompts.json").exists()


def test_prompt_over_the_length_limit_is_422(tmp_path):
    client = make_client(tmp_path)
    client_error(client, body([task()], MIXED_CONFIG, context=bad.textarea("a dog " * 400)), status=422,
                 match="GEM_MAX_PROMPT_CHARS=1000")


@pytest.mark.parametrize("texts", [[], [""], [";;; ;"], [None, 3, {"x": 1}]])
def test_empty_free_text_predicts_nothing(tmp_path, texts):
    client = make_client(tmp_path)
    (prediction,) = post(client, body([task()], MIXED_CONFIG, context=bad.textarea(*texts))).get_json()["results"]
    assert prediction["result"] == [] and "error" not in prediction


def test_label_with_an_empty_prompts_attribute_uses_its_value(tmp_path):
    config = ("<View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'>"
              "<Label value='Bright' prompts=' ; ;; '/></BrushLabels></View>")
    (prediction,) = post(make_client(tmp_path), body([task()], config)).get_json()["results"]
    assert prediction["result"][0]["value"]["brushlabels"] == ["Bright"]


# -- labeling configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("config,match", [
    (None, "labeling config is empty"),
    ("", "labeling config is empty"),
    (bad.BAD_XML, "cannot be parsed"),
    (bad.NO_IMAGE, "nothing to predict"),
    (bad.UNSUPPORTED_ONLY, "nothing to predict.*BrushLabels, PolygonLabels or RectangleLabels"),
    (bad.NO_LABELS, "nothing to predict.*no static <Label>"),
], ids=["none", "empty", "malformed-xml", "no-image", "unsupported-controls-only", "no-labels"])
def test_unusable_labeling_configs_are_422(tmp_path, config, match):
    client_error(make_client(tmp_path), body([task()], config), status=422, match=match)


def test_xml_external_entity_is_not_loaded(tmp_path):
    error = client_error(make_client(tmp_path), body([task()], bad.XXE), status=422, match="cannot be parsed")
    assert "Entity 'x' not defined" in error


def test_xml_entity_expansion_bomb_is_refused_quickly(tmp_path):
    started = time.monotonic()
    client_error(make_client(tmp_path), body([task()], bad.BILLION_LAUGHS), status=422, match="cannot be parsed")
    assert time.monotonic() - started < 5


def test_huge_labeling_config_is_not_kept_in_the_parse_cache(tmp_path):
    from backend.label_config import _parse_cached
    config = BRUSH_CONFIG.replace("<View>", "<View><Header value='" + "x" * 300_000 + "'/>")
    client = make_client(tmp_path)
    before = _parse_cached.cache_info().currsize
    assert post(client, body([task()], config)).status_code == 200
    assert _parse_cached.cache_info().currsize == before


def test_setup_from_many_projects_stays_bounded(tmp_path):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path)})
    model = GemBackendModel(settings, predictor=FakePredictor(), region_extractor=fake_extract_regions)
    client = create_app(settings, model, load=False).test_client()
    for k in range(300):
        assert client.post("/setup", json={"project": f"{k}.1", "schema": BRUSH_CONFIG,
                                           "hostname": "http://ls:8080", "access_token": "t"}).status_code == 200
    assert len(model._schemas) == model.MAX_REMEMBERED_SCHEMAS == 256
    assert len(model.fetcher._setup) == 256 and "299" in model._schemas and "0" not in model._schemas


# -- tasks ----------------------------------------------------------------------------------------


def test_task_without_data_fails_alone(tmp_path):
    failed_entry(make_client(tmp_path), {"id": 2}, "no 'data' object")
    failed_entry(make_client(tmp_path), {"id": 2, "data": "x"}, "no 'data' object")


def test_task_without_the_image_field_fails_alone(tmp_path):
    failed_entry(make_client(tmp_path), {"id": 2, "data": {"picture": "x"}}, "no 'image' image URL")


@pytest.mark.parametrize("value", [17, ["a.png"], {"url": "a.png"}, "", "   ", None])
def test_image_value_of_the_wrong_type_fails_alone(tmp_path, value):
    failed_entry(make_client(tmp_path), {"id": 2, "data": {"image": value}}, "no 'image' image URL")


@pytest.mark.parametrize("task_id", ["abc", [1], None, 1.5])
def test_cloud_uri_with_an_odd_task_id_fails_alone(tmp_path, task_id):
    client = make_client(tmp_path, LABEL_STUDIO_URL="http://127.0.0.1:9")
    failed_entry(client, {"id": task_id, "data": {"image": "s3://bucket/a.png"}}, "task id")


@pytest.mark.parametrize("url,match", [
    ("file:///etc/passwd", "unsupported image URL"), ("ftp://127.0.0.1/a.png", "unsupported image URL"),
    ("gopher://127.0.0.1:70/x", "unsupported image URL"), ("C:\\images\\a.png", "unsupported image URL"),
    ("http://[::1/a.png", "malformed URL"), ("http://127.0.0.1:99999/a.png", "malformed URL"),
    ("http:///a.png", "no host"), ("data:image/png;base64", "malformed data: URI"),
    ("data:image/png;base64,!!!!", "not a readable image"),
])
def test_unusable_urls_fail_alone(tmp_path, url, match):
    failed_entry(make_client(tmp_path), task(2, url), match)


# -- URLs that misbehave -------------------------------------------------------------------------


@pytest.fixture
def web():
    server = bad.MisbehavingServer()
    yield server
    server.close()


def test_url_answering_404_fails_alone(tmp_path, web):
    failed_entry(make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1"), task(2, f"{web.url}/nothing.png"), "HTTP 404")


def test_url_that_never_answers_times_out(tmp_path, web):
    client = make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1", GEM_FETCH_TIMEOUT="1")
    started = time.monotonic()
    failed_entry(client, task(2, f"{web.url}/sleep/10"), "timed out")
    # 1 s allowed; the bound leaves room for a busy machine and is still far below the 10 s wait.
    assert time.monotonic() - started < 6


def test_url_that_drips_bytes_times_out(tmp_path, web):
    """Headers at once, then a byte every 0.2 s: the deadline covers the whole download."""
    client = make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1", GEM_FETCH_TIMEOUT="1")
    started = time.monotonic()
    failed_entry(client, task(2, f"{web.url}/drip/100"), "timed out")
    assert time.monotonic() - started < 6      # the whole drip takes 20 s


def test_url_that_drips_headers_times_out(tmp_path, web):
    """A header line every 0.5 s keeps each read inside a 1 s socket timeout; the deadline still
    covers the wait for the headers as a whole (20 lines would take 10 s)."""
    client = make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1", GEM_FETCH_TIMEOUT="1")
    started = time.monotonic()
    failed_entry(client, task(2, f"{web.url}/drip-headers/20"), "timed out")
    assert time.monotonic() - started < 6


def test_redirect_loop_fails_alone(tmp_path):
    server = LocalServer()
    try:
        server.redirect("/a", "/b")
        server.redirect("/b", "/a")
        client = make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1")
        failed_entry(client, task(2, f"{server.url}/a"), r"too many redirects \(> 5\)")
        assert len(server.seen) == 6
    finally:
        server.close()


def test_url_serving_html_fails_alone(tmp_path, web):
    failed_entry(make_client(tmp_path, GEM_ALLOWED_HOSTS="127.0.0.1"), task(2, f"{web.url}/html"),
                 "HTML page, not an image")


def test_file_over_the_size_limit_fails_alone(tmp_path):
    client = make_client(tmp_path, GEM_FETCH_MAX_MB="0.01")
    failed_entry(client, task(2, bad.data_uri(bad.png_rgb(400, 400, seed=1) * 3)), "GEM_FETCH_MAX_MB")


# -- files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,match", [
    (b"", "empty file"),
    (bad.truncated(bad.png_rgb(64, 64)), "not a readable image"),
    (bad.truncated(bad.jpeg_cmyk(64, 64), 0.3), "not a readable image"),
    (b"GIF89a" + b"\0" * 10, "not a readable image"),
    (b"%PDF-1.7 not an image", "not a readable image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a readable image"),
], ids=["zero-byte", "truncated-png", "truncated-jpeg", "broken-gif-header", "pdf", "svg"])
def test_broken_and_non_image_files_fail_alone(tmp_path, data, match):
    failed_entry(make_client(tmp_path), task(2, bad.data_uri(data)), match)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    client = make_client(tmp_path)
    started = time.monotonic()
    failed_entry(client, task(2, bad.data_uri(bad.png_bomb(8000, 8000))), "8000x8000 = 64 megapixels.*GEM_MAX_IMAGE_MEGAPIXELS")
    failed_entry(client, task(2, bad.data_uri(bad.png_bomb(30000, 30000))), "too large")   # Pillow's own limit
    assert time.monotonic() - started < 5       # nothing was decoded


def test_image_over_the_pixel_limit_fails_alone(tmp_path):
    client = make_client(tmp_path, GEM_MAX_IMAGE_MEGAPIXELS="0.005")   # the good tasks have 0.0017 MP
    failed_entry(client, task(2, bad.data_uri(bad.png_rgb(100, 100))), "100x100 = 0.01 megapixels, over the 0.005 MP")


def test_interactive_call_answers_empty_result_for_a_bad_image(tmp_path):
    client = make_client(tmp_path)
    (prediction,) = post(client, body([task(1, bad.data_uri(b""))], MIXED_CONFIG,
                                      context=bad.textarea("Bright"))).get_json()["results"]
    assert prediction["result"] == [] and prediction["score"] == 0


# -- the real pipeline on the tiny model: odd images and prompts succeed -------------------------------


@pytest.fixture(scope="module")
def tiny_client(tiny_model_files, tmp_path_factory):
    name, config_path, checkpoint_path = tiny_model_files
    settings = Settings.from_env({
        "GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path), "GEM_PRETRAINED": str(checkpoint_path),
        "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "MODEL_DIR": str(tmp_path_factory.mktemp("model_data")),
        "GEM_MIN_SIMILARITY": "-1", "GEM_BACKGROUND_THRESHOLD": "0", "GEM_MIN_AREA": "0"})
    app = create_app(settings)
    app.extensions["gem"].model.wait_until_ready(120)
    yield app.test_client()
    app.extensions["gem"].model.close()


def predict_ok(client, image: bytes, mime="image/png", context=None, config=MIXED_CONFIG):
    reply = post(client, body([task(1, bad.data_uri(image, mime))], config, context=context))
    assert reply.status_code == 200, reply.get_json()
    (prediction,) = reply.get_json()["results"]
    assert "error" not in prediction and isinstance(prediction["result"], list), prediction
    return prediction


@pytest.mark.parametrize("image,size", [
    (bad.png_rgb(1, 1), (1, 1)),
    (bad.png_rgb(20000, 10), (20000, 10)),
    (bad.png_rgb(10, 3000), (10, 3000)),
    (bad.png_16bit_gray(), (48, 36)),
    (bad.jpeg_cmyk(), (48, 36)),
    (bad.png_palette_transparent(), (48, 36)),
    (bad.png_gray(), (48, 36)),
    (bad.png_rgba(), (48, 36)),
    (bad.png_bilevel(), (48, 36)),
    (bad.gif_animated(), (48, 36)),
], ids=["1x1", "20000x10", "10x3000", "16-bit-gray-png", "cmyk-jpeg", "palette-png-transparent", "grayscale",
        "rgba", "1-bit", "animated-gif"])
def test_unusual_images_are_predicted(tiny_client, image, size):
    prediction = predict_ok(tiny_client, image, "image/gif" if image[:3] == b"GIF" else "image/png")
    for item in prediction["result"]:
        assert (item["original_width"], item["original_height"]) == size


def test_16_bit_images_keep_their_contrast():
    """Pillow's plain conversion clips 16-bit values to white; the backend scales them."""
    from backend.images import decode_image
    gray = np.asarray(decode_image(bad.png_16bit_gray()).image.convert("L"), dtype=float)
    assert gray.min() == 0 and gray.max() == 255 and 100 < gray.mean() < 155


@pytest.mark.parametrize("prompt", [
    "a " + "very " * 150 + "long description of a small red car parked on the left",   # ~900 characters
    "🐶🐱 a dog and a cat 🚗", "猫と犬", "一辆红色的汽车", "قطة على الأريكة", "\u202eright-to-left override\u202c",
    "כלב", "zero\u200bwidth\u200djoiner", "tab\tand\nnewline", "\x00nul and \x07bell", "e\u0301 combining",
], ids=["900-chars", "emoji", "japanese", "chinese", "arabic", "rtl-override", "hebrew", "zero-width",
        "whitespace", "control-chars", "combining"])
def test_long_and_non_ascii_prompts_are_predicted(tiny_client, prompt):
    prediction = predict_ok(tiny_client, bad.png_rgb(), context=bad.textarea(prompt))
    assert prediction["result"]


def test_many_labels_within_the_limit_are_predicted(tiny_client):
    prediction = predict_ok(tiny_client, bad.png_rgb(), config=bad.many_labels_config(100))
    assert prediction["result"]


# -- the catalogue is documented ------------------------------------------------------------------------


def test_catalogue_is_documented():
    """docs/RELIABILITY.md lists every test of this catalogue (input -> outcome -> test)."""
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    catalogue = doc.split("<!-- catalogue:start -->", 1)[1].split("<!-- catalogue:end -->", 1)[0]
    rows = [line for line in catalogue.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 25
    here = {name for name in globals() if name.startswith("test_") and name != "test_catalogue_is_documented"}
    documented = set(re.findall(r"`(test_[a-z0-9_]+)`", catalogue))
    assert here <= documented, f"not in docs/RELIABILITY.md: {sorted(here - documented)}"
