"""Refresh after learning (docs/LEARNING.md): a new learned version of a project makes the background
finisher predict its unlabeled tasks again, lowest current score first, bounded, once per task,
cancelled by a newer version, durable across a restart; off with GEM_REFRESH_MAX_TASKS=0.

The learner's side is played by `finisher.request_refresh(project, learned)` (what it calls after
a publication that changed the project's learned version) and by a learned-state provider whose
version the test sets; Label Studio is tests/fake_label_studio.py.
"""
from __future__ import annotations

import logging

from backend.model import GemBackendModel
from backend.outbox import Outbox, refresh_job
from backend.pipeline import ProjectLearned
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG, FakePredictor, SlowPredictor, data_uri, fake_extract_regions, square_image
from fake_label_studio import TOKEN
from test_background import VERSION, _wait

PROJECT = "1.1712345678"          # as /predict and the learner name project 1
L1, L2 = "l" + "1" * 10, "l" + "2" * 10


def _app(tmp_path, fake_ls, predictor=None, learned=None, **settings):
    """An app whose project 1 has the learned version `learned["v"]` (a dict the test changes)."""
    learned = learned if learned is not None else {"v": ""}
    s = Settings(model_dir=str(tmp_path), model_version=VERSION, batch_size=2, label_studio_url=fake_ls.url,
                 label_studio_api_key=TOKEN, **settings)
    model = GemBackendModel(s, predictor=predictor or FakePredictor(), region_extractor=fake_extract_regions,
                            learned_provider=lambda project: ProjectLearned(version=learned["v"]) if learned["v"]
                            else None)
    app = create_app(s, model=model, load=False)
    return app, app.extensions["gem"], learned


def _publish(gem, learned, version):
    """What the learner does after a publication that changed project 1's learned version."""
    learned["v"] = version
    return gem.finisher.request_refresh(PROJECT, version)


def _project(fake_ls, scores, annotated=()):
    """Tasks whose latest prediction (of the old version) has these scores (None: no prediction)."""
    ids = fake_ls.add_tasks([{"image": data_uri(square_image())} for _ in scores], annotated=set())
    with fake_ls.lock:
        for tid, score in zip(ids, scores):
            if score is not None:
                fake_ls._store({"task": tid, "result": [], "score": 1.0, "model_version": "older"})
                fake_ls._store({"task": tid, "result": [], "score": score, "model_version": VERSION})
        fake_ls.annotate([ids[i] for i in annotated])
    return ids


def _new(fake_ls, version):
    with fake_ls.lock:
        return [p for p in fake_ls.predictions if p["model_version"] == version]


def _idle(gem):
    sizes = gem.finisher.outbox.refresh_sizes()
    return not any(sizes.values()) and not gem.finisher.outbox.refreshes()


def test_unlabeled_tasks_are_refreshed_lowest_score_first_within_the_bound(tmp_path, fake_ls, caplog):
    caplog.set_level(logging.INFO, "backend.background")
    #                  0     1    2     3    4     5    6     7     8
    scores = [0.9, 0.1, 0.5, None, 0.3, 0.0, 0.7, 0.05, 0.2]
    ids = _project(fake_ls, scores, annotated=(5, 7))          # the two lowest are labelled
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=4)
    assert _publish(gem, learned, L1)
    version = f"{VERSION}+{L1}"
    _wait(lambda: _idle(gem) and f"refresh of project 1 to learned version {L1} done: 4 tasks" in caplog.text)
    stored = [p["task"] for p in _new(fake_ls, version)]
    # The 4 lowest scores among the unlabeled tasks, stored in that order; labelled ones never.
    assert stored == [ids[1], ids[8], ids[4], ids[2]]
    assert all(len([p for p in fake_ls.predictions_of(t) if p["model_version"] == version]) == 1 for t in stored)
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'gem_refresh_tasks_total{outcome="queued"} 4' in metrics
    assert 'gem_refresh_tasks_total{outcome="done"} 4' in metrics
    assert 'gem_refreshes_total{event="done"} 1' in metrics
    assert 'gem_refresh_tasks{state="queued"} 0' in metrics
    assert "4 unlabeled tasks to predict, lowest score first" in caplog.text
    assert "7 listed" in caplog.text and "3 left out by GEM_REFRESH_MAX_TASKS=4" in caplog.text
    gem.finisher.close()


def test_tasks_without_a_prediction_come_last_and_current_ones_are_left_alone(tmp_path, fake_ls):
    ids = _project(fake_ls, [None, 0.8, None, 0.6])
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=10)
    version = f"{VERSION}+{L1}"
    with fake_ls.lock:   # already predicted under the new version (a Retrieve Predictions got there first)
        fake_ls._store({"task": ids[3], "result": [], "score": 0.1, "model_version": version})
    assert _publish(gem, learned, L1)
    _wait(lambda: _idle(gem))
    assert [p["task"] for p in _new(fake_ls, version)] == [ids[3], ids[1], ids[0], ids[2]]
    assert gem.finisher.refresh_counts["queued"] == 3
    gem.finisher.close()


def test_a_task_labelled_after_listing_is_not_predicted(tmp_path, fake_ls):
    ids = _project(fake_ls, [0.1, 0.2, 0.3])
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=10)
    listed = []

    def annotator(ls):       # labels task 1 right after the refresh listed the project
        if not listed:
            listed.append(1)
            ls.annotate([ids[0]])
    fake_ls.after_list.append(annotator)
    assert _publish(gem, learned, L1)
    _wait(lambda: _idle(gem))
    version = f"{VERSION}+{L1}"
    assert sorted(p["task"] for p in _new(fake_ls, version)) == ids[1:]
    assert gem.finisher.refresh_counts["labelled"] == 1
    gem.finisher.close()


def test_a_newer_version_cancels_the_refresh_of_the_older(tmp_path, fake_ls, caplog):
    caplog.set_level(logging.INFO, "backend.background")
    ids = _project(fake_ls, [i / 40 for i in range(24)])
    app, gem, learned = _app(tmp_path, fake_ls, SlowPredictor(0.05), refresh_max_tasks=100)
    first, second = f"{VERSION}+{L1}", f"{VERSION}+{L2}"
    assert _publish(gem, learned, L1)
    _wait(lambda: _new(fake_ls, first))                 # under way
    assert _publish(gem, learned, L2)
    at_cancel = len(_new(fake_ls, first))
    _wait(lambda: _idle(gem), timeout=60)
    # The older refresh stopped (at most the one prediction being stored at that moment went on),
    # and every task got exactly one prediction of the newer version.
    assert len(_new(fake_ls, first)) <= at_cancel + 1 < len(ids)
    for tid in ids:
        assert len([p for p in fake_ls.predictions_of(tid) if p["model_version"] == second]) == 1, tid
    assert gem.finisher.refresh_counts["cancelled"] > 0
    assert f"refresh of project 1 to learned version {L1} cancelled by the newer version {L2}" in caplog.text
    assert not gem.finisher.queued()
    gem.finisher.close()


def test_one_refresh_per_version_across_workers(tmp_path, fake_ls):
    ids = _project(fake_ls, [0.3, 0.2, 0.1, 0.4, 0.5, 0.6])
    learned = {"v": ""}
    app_a, gem_a, _ = _app(tmp_path, fake_ls, SlowPredictor(0.02), learned=learned, refresh_max_tasks=10)
    app_b, gem_b, _ = _app(tmp_path, fake_ls, FakePredictor(), learned=learned, refresh_max_tasks=10)
    assert _publish(gem_a, learned, L1)
    assert not gem_b.finisher.request_refresh(PROJECT, L1)     # the same version again: nothing new
    gem_b.finisher._start()                                     # B's worker runs too, and may take rows
    _wait(lambda: _idle(gem_a))
    version = f"{VERSION}+{L1}"
    for tid in ids:
        assert len([p for p in fake_ls.predictions_of(tid) if p["model_version"] == version]) == 1, tid
    gem_a.finisher.close()
    gem_b.finisher.close()


def test_a_refresh_asked_for_before_a_restart_is_done_after_it(tmp_path, fake_ls):
    ids = _project(fake_ls, [0.5, 0.4])
    box = Outbox(str(tmp_path / "outbox.sqlite"))        # what a process killed after publishing left
    assert box.request_refresh(1, PROJECT, L1) == (None, [])
    assert box.refresh(1).job == refresh_job(1, L1)
    app, gem, learned = _app(tmp_path, fake_ls, learned={"v": L1}, refresh_max_tasks=10)   # resumes by itself
    _wait(lambda: _idle(gem))
    assert [p["task"] for p in _new(fake_ls, f"{VERSION}+{L1}")] == [ids[1], ids[0]]
    gem.finisher.close()


def test_off_switch(tmp_path, fake_ls, caplog):
    caplog.set_level(logging.INFO, "backend.background")
    _project(fake_ls, [0.5, 0.4])
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=0)
    assert not _publish(gem, learned, L1)
    assert gem.finisher.outbox.refreshes() == [] and not gem.finisher._refresh_next()
    assert "no refresh after learning (GEM_REFRESH_MAX_TASKS=0)" in caplog.text
    assert _new(fake_ls, f"{VERSION}+{L1}") == []
    gem.finisher.close()


def test_the_learner_announces_publications_to_the_finisher(tmp_path, fake_ls):
    """The server wires the learner's publications to the refresh (project named as /predict names it)."""
    _project(fake_ls, [0.5])
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=10)
    learner = gem.model.learning.learner
    assert learner.on_publish == [gem.finisher.request_refresh]
    learned["v"] = L1
    learner._announce(f"{fake_ls.url}#{PROJECT}", L1)
    refresh = gem.finisher.outbox.refresh(1)
    assert refresh is not None and (refresh.project_key, refresh.learned) == (PROJECT, L1) or _idle(gem)
    _wait(lambda: _idle(gem))
    assert len(_new(fake_ls, f"{VERSION}+{L1}")) == 1
    gem.finisher.close()


def test_a_newer_version_published_by_another_worker_cancels_this_ones_rows(tmp_path, fake_ls, monkeypatch):
    import backend.background as background
    monkeypatch.setattr(background, "ADOPT_EVERY_S", 0.2)    # how soon a worker notices rows dropped elsewhere
    ids = _project(fake_ls, [i / 40 for i in range(20)])
    learned = {"v": ""}
    app_a, gem_a, _ = _app(tmp_path, fake_ls, SlowPredictor(0.05), learned=learned, refresh_max_tasks=100)
    app_b, gem_b, _ = _app(tmp_path, fake_ls, FakePredictor(), learned=learned, refresh_max_tasks=100)
    first, second = f"{VERSION}+{L1}", f"{VERSION}+{L2}"
    assert _publish(gem_a, learned, L1)
    _wait(lambda: _new(fake_ls, first))                 # worker A is refreshing
    assert _publish(gem_b, learned, L2)                 # worker B learned more
    at_cancel = len(_new(fake_ls, first))
    _wait(lambda: _idle(gem_a) and not gem_a.finisher.queued() and not gem_b.finisher.queued(), timeout=60)
    assert len(_new(fake_ls, first)) <= at_cancel + 1 < len(ids)
    for tid in ids:
        assert len([p for p in fake_ls.predictions_of(tid) if p["model_version"] == second]) == 1, tid
    gem_a.finisher.close()
    gem_b.finisher.close()


def test_an_interactive_call_goes_before_the_refresh(tmp_path, fake_ls):
    ids = _project(fake_ls, [i / 20 for i in range(12)])
    predictor = SlowPredictor(0.1)
    app, gem, learned = _app(tmp_path, fake_ls, predictor, refresh_max_tasks=100)
    version = f"{VERSION}+{L1}"
    assert _publish(gem, learned, L1)
    _wait(lambda: predictor.encode_calls)                   # the refresh is computing
    reply = app.test_client().post("/predict", json={
        "tasks": [{"id": 10**6, "data": {"image": data_uri(square_image())}}], "project": PROJECT,
        "label_config": BRUSH_CONFIG, "params": {"context": {"result": [
            {"type": "textarea", "value": {"text": ["left"]}}]}}})
    assert reply.status_code == 200 and "result" in reply.get_json()["results"][0]
    # Answered while the refresh still had most of its tasks to do: the model gate let it in first.
    assert len(_new(fake_ls, version)) < len(ids) // 2, len(_new(fake_ls, version))
    _wait(lambda: _idle(gem), timeout=60)
    assert len(_new(fake_ls, version)) == len(ids)
    gem.finisher.close()


def test_the_learning_command_asks_a_running_backend_for_its_refresh(tmp_path, fake_ls, monkeypatch, capsys):
    """`python -m backend.learning reset|rebuild` runs in its own process: its new learned version
    reaches a running backend on the same MODEL_DIR through the outbox, which the idle finisher
    looks at every ADOPT_EVERY_S; nobody clicks."""
    import backend.background as background
    from backend.learning import _refresh_from_command

    monkeypatch.setattr(background, "ADOPT_EVERY_S", 0.2)
    ids = _project(fake_ls, [0.3, 0.1, 0.2])
    app, gem, learned = _app(tmp_path, fake_ls, refresh_max_tasks=100)
    assert gem.finisher._thread is not None, "the finisher runs from the start, idle"
    learned["v"] = L1           # what the command's rebuild published in learning.sqlite3
    settings = Settings(model_dir=str(tmp_path), refresh_max_tasks=100)
    line = _refresh_from_command(settings, PROJECT, L1)
    assert f"refresh to learned version {L1} asked for" in line
    version = f"{VERSION}+{L1}"
    _wait(lambda: _idle(gem) and len(_new(fake_ls, version)) == len(ids), timeout=30)
    assert [p["task"] for p in _new(fake_ls, version)] == [ids[1], ids[2], ids[0]]
    assert "GEM_REFRESH_MAX_TASKS=0" in _refresh_from_command(Settings(model_dir=str(tmp_path), refresh_max_tasks=0),
                                                              PROJECT, L2)
    gem.finisher.close()
