"""backend/pipeline.py on its own: no Flask, no Label Studio; the time budget; learned data."""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from backend.pipeline import (DEFERRED, Budget, PredictionPipeline, ProjectLearned, RequestLimitError)
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, SlowPredictor, data_uri, fake_extract_regions, square_image

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now



def _pipeline(tmp_path, predictor=None, **settings) -> PredictionPipeline:
    s = Settings(model_dir=str(tmp_path), **settings)
    return PredictionPipeline(s, predictor or FakePredictor(), region_extractor=fake_extract_regions,
                              model_version="test-v1")


def _tasks(n: int) -> list[dict]:
    image = data_uri(square_image())
    return [{"id": i + 1, "data": {"image": image}} for i in range(n)]


# -- Budget: pure logic on a fake clock -------------------------------------------------------


def test_budget_without_deadline_always_allows():
    clock = FakeClock()
    budget = Budget(None, clock=clock)
    clock.now += 1e9
    assert budget.allows(10**6)


def test_budget_allows_the_first_batch_when_nothing_is_measured():
    clock = FakeClock()
    budget = Budget(clock.now + 5, clock=clock)
    assert budget.seconds_per_task() is None
    assert budget.allows(1000)            # no estimate yet: make progress


def test_budget_refuses_a_batch_the_measured_pace_cannot_finish():
    clock = FakeClock()
    budget = Budget(clock.now + 100, clock=clock)
    clock.now += 40
    budget.record(8)                      # 5 s per task
    assert budget.seconds_per_task() == pytest.approx(5.0)
    assert budget.allows(12)              # 60 s needed, 60 s left
    assert not budget.allows(13)          # 65 s needed


def test_budget_uses_the_prior_pace_before_measuring():
    clock = FakeClock()
    budget = Budget(clock.now + 10, prior_seconds_per_task=3.0, clock=clock)
    assert budget.allows(3)
    assert not budget.allows(4)


def test_budget_past_the_deadline_allows_nothing():
    clock = FakeClock()
    budget = Budget(clock.now + 1, clock=clock)
    clock.now += 2
    assert budget.remaining() < 0
    assert not budget.allows(1)


# -- the pipeline ---------------------------------------------------------------------------------


def test_pipeline_predicts_every_task_in_order(tmp_path):
    pipeline = _pipeline(tmp_path)
    predictions, report = pipeline.predict(_tasks(5), pipeline.prepare(BRUSH_CONFIG))
    assert len(predictions) == 5
    # the config's labels and prompts are part of a stored prediction's version
    assert all(p["model_version"].startswith("test-v1+c") and p["result"] for p in predictions)
    assert [o.task_id for o in report.outcomes] == [1, 2, 3, 4, 5]
    assert report.deferred == []


def test_deadline_defers_the_tasks_it_has_no_time_for(tmp_path):
    pipeline = _pipeline(tmp_path, SlowPredictor(0.1), batch_size=2, fetch_workers=1)
    tasks = _tasks(20)
    predictions, report = pipeline.predict(tasks, pipeline.prepare(BRUSH_CONFIG),
                                           deadline=time.monotonic() + 0.7)
    done = [i for i, p in enumerate(predictions) if "result" in p]
    assert 2 <= len(done) < 20
    assert report.deferred == list(range(len(done), 20))     # a prefix is done, the rest deferred
    for i in report.deferred:
        assert "result" not in predictions[i]                  # Label Studio stores nothing for it
        assert "time budget" in predictions[i]["error"]
        assert report.outcomes[i].reason == DEFERRED
    assert report.seconds < 1.5                                # stopped near the deadline, not after 2 s of work
    assert pipeline.seconds_per_task and pipeline.seconds_per_task > 0.05


def test_the_pace_of_earlier_calls_is_used_at_once(tmp_path):
    pipeline = _pipeline(tmp_path, SlowPredictor(0.05), batch_size=4)
    pipeline.predict(_tasks(4), pipeline.prepare(BRUSH_CONFIG))
    assert pipeline.seconds_per_task >= 0.05
    predictions, report = pipeline.predict(_tasks(8), pipeline.prepare(BRUSH_CONFIG),
                                           deadline=time.monotonic() + 0.01)
    assert report.deferred == list(range(8))                  # not even the first batch fits
    assert pipeline.predictor.encode_calls == [1, 1, 1, 1]    # the first call's 4 images, one per model call


def test_learned_prompts_and_version_come_in_as_data(tmp_path):
    pipeline = _pipeline(tmp_path)
    learned = ProjectLearned(prompts={"Bright": ("left half",)}, version="L7")
    job = pipeline.prepare(BRUSH_CONFIG, project="3", learned=learned)
    assert "left half" in job.all_prompts and re.fullmatch(r"test-v1\+c[0-9a-f]{8}\+L7", job.model_version)
    predictions, _ = pipeline.predict(_tasks(1), job)
    assert predictions[0]["model_version"] == job.model_version
    assert "left half" in pipeline.predictor.similarity_calls[0]


def test_prepare_checks_prompt_limits(tmp_path):
    pipeline = _pipeline(tmp_path, max_prompts=1)
    with pytest.raises(RequestLimitError):
        pipeline.prepare(BRUSH_CONFIG)


def test_pipeline_module_has_no_flask_and_no_label_studio_api():
    tree = ast.parse((ROOT / "backend" / "pipeline.py").read_text())
    imported = {(node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not any(name.split(".")[0] in ("flask", "label_studio_sdk") for name in imported)
    assert not imported & {"server", "model", "ls_client", "background", "backend.server", "backend.model"}
