"""The finisher's durable outbox and circuit breaker (backend/outbox.py, backend/background.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from backend.outbox import COMPUTED, QUEUED, Breaker, Outbox, backoff
from backend_fixtures import SlowPredictor
from fake_label_studio import TOKEN
from test_background import VERSION, _app, _predict, _tasks, _wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_outbox_survives_a_new_process(tmp_path):
    path = str(tmp_path / "outbox.sqlite")
    code = ("from backend.outbox import Outbox; o = Outbox(%r); o.put_job('j', 3, '3.1', '<View/>', 'v'); "
            "o.put_tasks([{'id': 1, 'data': {'image': 'x'}, 'annotations': [{'big': 1}]}, {'id': 2, 'data': {}}], "
            "'v', 3, 'j', 100); o.put_result(2, 'v', [{'r': 1}], 0.5, 'v')" % path)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    box = Outbox(path)
    assert box.sizes() == {QUEUED: 1, COMPUTED: 1}
    (queued,) = box.queued(10)
    assert queued.task_data == {"id": 1, "data": {"image": "x"}}     # only what prediction needs
    (due,) = box.due(10)
    assert (due.task, due.result, due.score, due.prediction_version) == ("2", [{"r": 1}], 0.5, "v")
    assert box.job("j") == {"project": 3, "project_key": "3.1", "label_config": "<View/>", "model_version": "v"}
    box.done([("1", "v"), ("2", "v")])
    assert box.size() == 0 and box.job("j") is None                 # the job goes with its last row


def test_a_task_is_kept_once_and_the_outbox_is_bounded(tmp_path):
    box = Outbox(str(tmp_path / "o.sqlite"))
    assert box.put_tasks([{"id": 1}, {"id": 2}], "v", 1, "j", limit=3) == [True, True]
    assert box.put_tasks([{"id": 2}, {"id": 3}, {"id": 4}], "v", 1, "j", limit=3) == [True, True, False]
    assert box.put_tasks([{"id": 1}], "v2", 1, "j", limit=10) == [True]   # another model version: another row
    assert sorted(box.keys()) == [("1", "v"), ("1", "v2"), ("2", "v"), ("3", "v")]


def test_retries_back_off(tmp_path):
    assert [backoff(n, 1.0, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    box = Outbox(str(tmp_path / "o.sqlite"))
    box.put_tasks([{"id": 1}], "v", 1, "j", limit=10)
    box.put_result(1, "v", [], 0.0, "v")
    assert box.retry(1, "v", "boom", delay_s=0.3) == 1
    assert box.due(10) == []                       # not before its time
    time.sleep(0.35)
    assert [r.task for r in box.due(10)] == ["1"] and box.due(10)[0].error == "boom"


def test_the_breaker_probes_once_per_back_off_and_logs_once(caplog):
    now = [0.0]
    changes = []
    breaker = Breaker("LS", base_s=1.0, max_s=4.0, on_change=changes.append, clock=lambda: now[0])
    assert breaker.ready()
    breaker.failure("refused")
    assert not breaker.ready() and breaker.wait_s() == 1.0
    now[0] = 1.0
    assert breaker.ready()                          # one probe
    breaker.failure("refused")                      # the probe failed: wait longer
    assert breaker.wait_s() == 2.0
    now[0] = 3.0
    breaker.failure("refused")
    now[0] = 7.0
    breaker.failure("refused")
    assert breaker.wait_s() == 4.0                  # up to the maximum
    now[0] = 12.0
    breaker.success()
    breaker.success()
    assert breaker.ready() and breaker.last_outage_s == 12.0
    assert changes == [False, True]
    assert caplog.text.count("LS is unreachable") == 1 and caplog.text.count("LS is reachable again") == 1


def test_predictions_wait_in_the_outbox_while_label_studio_is_down(tmp_path, fake_ls, caplog):
    app, gem = _app(tmp_path, SlowPredictor(0.02), predict_budget=0.01, label_studio_url=fake_ls.url,
                    label_studio_api_key=TOKEN, ls_retry_max=0.5)
    fake_ls.unavailable = True
    tasks = _tasks(fake_ls, 20)
    results = _predict(app.test_client(), tasks)
    queued = [t for t, r in zip(tasks, results) if "result" not in r]
    assert len(queued) > gem.finisher.batch_tasks
    _wait(lambda: not gem.finisher.breaker.reachable)
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "gem_label_studio_reachable 0" in metrics
    time.sleep(1.5)                                 # several probes fail meanwhile
    sizes = gem.finisher.outbox.sizes()
    assert sizes[COMPUTED] >= 1 and sizes[QUEUED] >= 1  # computing paused: the rest is not computed
    assert sizes[COMPUTED] <= gem.finisher.batch_tasks
    assert gem.finisher.counts["failed"] == 0 and fake_ls.predictions == []
    fake_ls.unavailable = False
    _wait(lambda: gem.finisher.outbox.size() == 0)
    assert all(len(fake_ls.predictions_of(t["id"])) == 1 for t in queued)
    assert gem.finisher.counts["failed"] == 0
    assert caplog.text.count("Label Studio is unreachable") == 1
    assert caplog.text.count("Label Studio is reachable again") == 1
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "gem_label_studio_reachable 1" in metrics, [l for l in metrics.splitlines() if "outbox" in l or "reach" in l]
    assert 'gem_outbox_tasks{state="computed"} 0' in metrics
    gem.finisher.close()


def test_a_prediction_found_stored_is_not_stored_again(tmp_path, fake_ls):
    """A crash between storing and deleting the row: the next try finds it in Label Studio."""
    app, gem = _app(tmp_path, label_studio_url=fake_ls.url, label_studio_api_key=TOKEN)
    (tid,) = fake_ls.add_tasks([{"image": "x"}])
    fake_ls.predictions.append({"id": 1, "task": tid, "model_version": VERSION, "result": []})
    box = gem.finisher.outbox
    box.put_job("j", 1, "1", "", VERSION)
    box.put_tasks([{"id": tid, "data": {}}], VERSION, 1, "j", 10)
    box.put_result(tid, VERSION, [{"x": 1}], 0.9, VERSION)
    gem.finisher.resume()
    _wait(lambda: box.size() == 0)
    assert len(fake_ls.predictions_of(tid)) == 1 and gem.finisher.counts["skipped"] == 1
    gem.finisher.close()
