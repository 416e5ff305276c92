"""Batch /predict within GEM_PREDICT_BUDGET; the background finisher; task claims."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from backend.claims import ClaimStore
from backend.metrics import BackendMetrics
from backend.model import GemBackendModel
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, SlowPredictor, data_uri, fake_extract_regions, square_image
from fake_label_studio import TOKEN

VERSION = "gem-test-v1"


def _app(tmp_path, predictor=None, **settings):
    s = Settings(model_dir=str(tmp_path), model_version=VERSION, batch_size=2, **settings)
    model = GemBackendModel(s, predictor=predictor or FakePredictor(), region_extractor=fake_extract_regions)
    app = create_app(s, model=model, load=False)
    return app, app.extensions["gem"]


def _tasks(fake_ls, n: int) -> list[dict]:
    ids = fake_ls.add_tasks([{"image": data_uri(square_image())} for _ in range(n)])
    return [{"id": i, "data": fake_ls.tasks[i]["data"], "predictions": []} for i in ids]


def _predict(client, tasks):
    reply = client.post("/predict", json={"tasks": tasks, "project": "1.1712345678", "label_config": BRUSH_CONFIG})
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return reply.get_json()["results"]


def _wait(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


# -- budget + background --------------------------------------------------------------------------


def test_what_the_budget_leaves_is_finished_in_the_background_exactly_once(tmp_path, fake_ls):
    app, gem = _app(tmp_path, SlowPredictor(0.05), predict_budget=1.0, label_studio_url=fake_ls.url,
                    label_studio_api_key=TOKEN)
    client = app.test_client()
    _predict(client, [{"id": 10**6, "data": {"image": data_uri(square_image())}}])   # first-call costs
    tasks = _tasks(fake_ls, 40)
    started = time.monotonic()
    results = _predict(client, tasks)
    assert time.monotonic() - started < 1.8          # answered near the budget, not after 2 s of work
    answered = {t["id"] for t, r in zip(tasks, results) if "result" in r}
    deferred = {t["id"] for t, r in zip(tasks, results) if "result" not in r}
    assert answered and deferred and len(answered) + len(deferred) == 40
    assert all("finishing in the background" in r["error"] for r in results if "result" not in r)

    # Label Studio asks again while the job runs: nothing is computed twice, nothing answered twice.
    again = _predict(client, [t for t in tasks if t["id"] in deferred])
    assert all("result" not in r for r in again)

    _wait(lambda: gem.finisher.queued() == 0 and not gem.finisher._queued_ids)
    stored = {p["task"] for p in fake_ls.predictions}
    assert stored == deferred                                    # LS stores the answered ones itself
    assert all(len(fake_ls.predictions_of(t)) == 1 for t in deferred)
    assert all(p["model_version"] == VERSION and p["result"] for p in fake_ls.predictions)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'gem_background_tasks_total{{outcome="done"}} {len(deferred)}' in metrics
    assert "gem_background_queued_tasks 0" in metrics
    assert f'gem_deferred_tasks_total{{handling="queued"}} {len(deferred)}' in metrics
    gem.finisher.close()


def test_a_task_already_stored_is_not_stored_again(tmp_path, fake_ls):
    app, gem = _app(tmp_path, SlowPredictor(0.05), predict_budget=0.01, label_studio_url=fake_ls.url,
                    label_studio_api_key=TOKEN)
    tasks = _tasks(fake_ls, 6)
    with fake_ls.lock:   # stored meanwhile (e.g. by the prelabel command)
        fake_ls._store({"task": tasks[-1]["id"], "result": [], "score": 0.0, "model_version": VERSION})
    results = _predict(app.test_client(), tasks)
    assert "result" not in results[-1]          # deferred: the first batch at most is answered in time
    _wait(lambda: gem.finisher.queued() == 0 and not gem.finisher._queued_ids)
    for task, result in zip(tasks, results):    # answered ones Label Studio itself stores from the answer
        assert len(fake_ls.predictions_of(task["id"])) == (0 if "result" in result else 1), task["id"]
    assert gem.finisher.counts["skipped"] == 1
    gem.finisher.close()


def test_tasks_listing_a_prediction_of_this_version_are_not_answered_again(tmp_path, fake_ls):
    app, _ = _app(tmp_path)
    tasks = _tasks(fake_ls, 2)
    tasks[0]["predictions"] = [{"id": 5, "model_version": VERSION, "result": []}]
    results = _predict(app.test_client(), tasks)
    assert "result" not in results[0] and "already holds a prediction" in results[0]["error"]
    assert results[1]["result"]


def test_without_label_studio_access_the_answer_says_what_to_set(tmp_path, fake_ls, caplog):
    app, gem = _app(tmp_path, SlowPredictor(0.05), predict_budget=0.01)
    tasks = _tasks(fake_ls, 6)
    results = _predict(app.test_client(), tasks)
    left = [r for r in results if "result" not in r]
    assert left and all("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set" in r["error"] for r in left)
    assert "cannot be finished in the background" in caplog.text
    assert gem.finisher.queued() == 0
    # nothing stays claimed: the next Retrieve Predictions may compute them
    assert ClaimStore(str(tmp_path / "claims.sqlite")).busy([t["id"] for t in tasks], VERSION) == set()


def test_a_full_queue_leaves_the_rest_for_later(tmp_path, fake_ls):
    app, gem = _app(tmp_path, SlowPredictor(0.2), predict_budget=0.01, background_queue=2,
                    label_studio_url=fake_ls.url, label_studio_api_key=TOKEN)
    results = _predict(app.test_client(), _tasks(fake_ls, 8))
    full = [r for r in results if "result" not in r and "GEM_BACKGROUND_QUEUE=2" in r["error"]]
    queued = [r for r in results if "result" not in r and "finishing in the background" in r["error"]]
    answered = [r for r in results if "result" in r]
    assert len(queued) == 2 and full and len(answered) + len(queued) + len(full) == 8
    gem.finisher.close()


def test_shutdown_keeps_the_queue_for_the_next_start(tmp_path, fake_ls):
    app, gem = _app(tmp_path, SlowPredictor(0.1), predict_budget=0.01, label_studio_url=fake_ls.url,
                    label_studio_api_key=TOKEN)
    tasks = _tasks(fake_ls, 20)
    results = _predict(app.test_client(), tasks)
    gem.finisher.close(timeout=10)
    assert not gem.finisher._thread.is_alive()
    left = gem.finisher.outbox.size()
    assert left > 0                                     # not dropped: kept in MODEL_DIR's outbox
    # the closed finisher released its claims: only "just stored" markers remain
    stored_ids = {str(p["task"]) for p in fake_ls.predictions}
    assert ClaimStore(str(tmp_path / "claims.sqlite")).busy([t["id"] for t in tasks], VERSION) <= stored_ids
    assert gem.finisher.submit(tasks[:1], gem.model.prepare(label_config=BRUSH_CONFIG), 1) == [False]
    # the next start (same MODEL_DIR) finishes them by itself, each task stored once
    app2, gem2 = _app(tmp_path, SlowPredictor(0.01), predict_budget=0.01, label_studio_url=fake_ls.url,
                      label_studio_api_key=TOKEN)
    _wait(lambda: gem2.finisher.outbox.size() == 0)
    for task, result in zip(tasks, results):
        assert len(fake_ls.predictions_of(task["id"])) == (0 if "result" in result else 1), task["id"]
    gem2.finisher.close()


def test_interactive_calls_have_no_budget(tmp_path, fake_ls):
    app, _ = _app(tmp_path, SlowPredictor(0.05), predict_budget=0.01)
    tasks = _tasks(fake_ls, 3)
    reply = app.test_client().post("/predict", json={
        "tasks": tasks, "project": "1.1", "label_config": BRUSH_CONFIG,
        "params": {"context": {"result": [{"type": "textarea", "value": {"text": ["left"]}}]}}})
    assert reply.status_code == 200
    assert all("result" in r for r in reply.get_json()["results"])


def test_metrics_names_are_registered():
    text = BackendMetrics().render()
    assert "gem_background_queued_tasks" in text and "gem_background_tasks_total" in text


def test_two_workers_sharing_model_dir_do_not_compute_the_same_task(tmp_path, fake_ls):
    """Worker A is finishing tasks in the background when Label Studio's next /predict lands on B."""
    common = dict(label_studio_url=fake_ls.url, label_studio_api_key=TOKEN)
    app_a, gem_a = _app(tmp_path, SlowPredictor(0.1), predict_budget=0.01, **common)
    predictor_b = FakePredictor()
    app_b, gem_b = _app(tmp_path, predictor_b, predict_budget=60, **common)
    tasks = _tasks(fake_ls, 10)
    first = _predict(app_a.test_client(), tasks)
    deferred = [t for t, r in zip(tasks, first) if "result" not in r]
    assert deferred
    second = _predict(app_b.test_client(), deferred)
    busy = [r for r in second if "result" not in r]
    assert busy and all("background" in r["error"] or "another worker" in r["error"] for r in busy)
    _wait(lambda: gem_a.finisher.queued() == 0 and not gem_a.finisher._queued_ids)
    answered_by_b = {t["id"] for t, r in zip(deferred, second) if "result" in r}
    stored_by_a = {p["task"] for p in fake_ls.predictions}
    assert not answered_by_b & stored_by_a            # never both
    assert all(len(fake_ls.predictions_of(t["id"])) <= 1 for t in tasks)
    gem_a.finisher.close()
    gem_b.finisher.close()


def test_a_task_just_stored_in_the_background_is_not_computed_again(tmp_path, fake_ls):
    """Label Studio listed the task before the background stored it; the /predict comes after."""
    app, gem = _app(tmp_path, SlowPredictor(0.05), predict_budget=0.01, label_studio_url=fake_ls.url,
                    label_studio_api_key=TOKEN)
    tasks = _tasks(fake_ls, 4)
    client = app.test_client()
    first = _predict(client, tasks)
    _wait(lambda: gem.finisher.queued() == 0 and not gem.finisher._queued_ids)
    stale = [t for t, r in zip(tasks, first) if "result" not in r]      # their bodies still list no prediction
    assert stale and all(fake_ls.predictions_of(t["id"]) for t in stale)
    again = _predict(client, stale)
    assert all("result" not in r for r in again)
    gem.finisher.close()


def test_a_stalled_download_does_not_stall_the_background_queue(tmp_path, monkeypatch):
    """Without a deadline (the finisher's case) a task's downloads are waited for a bounded time."""
    import threading

    import backend.pipeline as pipeline_module
    from backend.pipeline import PredictionPipeline

    monkeypatch.setattr(pipeline_module, "FETCH_DECODE_ALLOWANCE_S", 0.0)
    settings = Settings(model_dir=str(tmp_path), model_version=VERSION, batch_size=2, fetch_timeout=0.3)
    pipeline = PredictionPipeline(settings, FakePredictor(), region_extractor=fake_extract_regions)
    release = threading.Event()
    real_download = pipeline.fetcher.download

    def download(url, **kwargs):
        if url == "http://stalled.example/x.png":
            release.wait(30)        # a server that never finishes (the fetcher's own limit broken)
        return real_download(url, **kwargs)

    monkeypatch.setattr(pipeline.fetcher, "download", download)
    from backend.label_config import parse_label_config
    job = pipeline.prepare(parse_label_config(BRUSH_CONFIG, settings.outputs))
    tasks = [{"id": 1, "data": {"image": "http://stalled.example/x.png"}},
             {"id": 2, "data": {"image": data_uri(square_image())}}]
    try:
        started = time.monotonic()
        predictions, report = pipeline.predict(tasks, job)
        took = time.monotonic() - started
    finally:
        release.set()
    assert report.outcomes[0].reason == "timeout" and "GEM_FETCH_TIMEOUT=0.3" in report.outcomes[0].message
    assert report.outcomes[1].ok and predictions[1]["result"]
    assert took < 10        # not the 30 s the download hangs for
    pipeline.close()


def test_two_requests_at_once_answer_each_task_with_a_result_once(tmp_path, fake_ls, caplog):
    """Same worker process, two threads: the claims are per request, not per process."""
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="backend.background")
    app, gem = _app(tmp_path, SlowPredictor(0.2))
    tasks = _tasks(fake_ls, 6)
    barrier = threading.Barrier(2)
    answers = []

    def call():
        client = app.test_client()
        barrier.wait()
        answers.append(_predict(client, tasks))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 2
    per_task = [sum("result" in answer[i] for answer in answers) for i in range(len(tasks))]
    assert per_task == [1] * len(tasks)
    assert "without a result: another request" in caplog.text   # claimed by the other, or handed to the finisher
    # and the first request's end did not free what the other holds: nothing is left claimed
    assert ClaimStore(str(tmp_path / "claims.sqlite")).busy([t["id"] for t in tasks], VERSION) == set()
