"""python -m backend.prelabel against an in-process fake Label Studio and the fake model."""
from __future__ import annotations

import pytest

from backend import prelabel
from backend.claims import ClaimStore
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.pipeline import PredictionPipeline
from backend.settings import Settings
from backend_fixtures import FakePredictor, data_uri, fake_extract_regions, square_image
from fake_label_studio import TOKEN


class CountingPredictor(FakePredictor):
    """Raises KeyboardInterrupt on the `interrupt_at`-th encode call (a Ctrl-C mid-run)."""

    def __init__(self, interrupt_at: int | None = None):
        super().__init__()
        self.interrupt_at = interrupt_at

    def encode(self, images, batch_size=8):
        if self.interrupt_at is not None and len(self.encode_calls) + 1 == self.interrupt_at:
            self.encode_calls.append(-1)
            raise KeyboardInterrupt
        return super().encode(images, batch_size)


def _settings(tmp_path, fake_ls, **kw) -> Settings:
    return Settings(model_dir=str(tmp_path), label_studio_url=fake_ls.url, label_studio_api_key=TOKEN,
                    batch_size=2, model_version="gem-test-v1", **kw)


def _pipeline(settings, predictor=None) -> PredictionPipeline:
    return PredictionPipeline(settings, predictor or FakePredictor(), region_extractor=fake_extract_regions,
                              model_version="gem-test-v1")


def _run(settings, fake_ls, pipeline=None, **kw):
    client = LabelStudioClient(fake_ls.url, TOKEN)
    return prelabel.run_prelabel(settings, 1, client=client, pipeline=pipeline or _pipeline(settings),
                                 progress=False, batch_tasks=4, upload_chunk=3, **kw)


def _images(n: int) -> list[dict]:
    return [{"image": data_uri(square_image(box=(i % 20, 3, i % 20 + 10, 13)))} for i in range(n)]


def test_every_task_gets_one_prediction_and_a_rerun_adds_none(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(11))
    settings = _settings(tmp_path, fake_ls)
    summary = _run(settings, fake_ls)
    assert (summary.seen, summary.done, len(summary.skipped), summary.failed) == (11, 11, 0, {})
    for tid in fake_ls.tasks:
        stored = fake_ls.predictions_of(tid)
        assert len(stored) == 1 and stored[0]["model_version"] == "gem-test-v1" and stored[0]["result"]
    assert fake_ls.count("POST", "/api/projects/1/import/predictions") == 4      # chunks of 3
    again = _run(settings, fake_ls)
    assert again.done == 0 and len(again.skipped) == 11 and again.ok
    assert all(len(fake_ls.predictions_of(t)) == 1 for t in fake_ls.tasks)
    assert "already predicted (this model version)" in "\n".join(again.lines())


def test_tasks_stream_page_by_page(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(7))
    client = LabelStudioClient(fake_ls.url, TOKEN)
    seen = []
    for task in client.iter_tasks(1, page_size=3):
        seen.append(task["id"])
        # one page is fetched before its tasks are handed out, and no more
        assert fake_ls.count("GET", "/api/tasks/") == (len(seen) - 1) // 3 + 1
    assert seen == list(range(1, 8))


def test_filters_only_unlabeled_task_ids_and_limit(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(10), annotated={2, 3})
    settings = _settings(tmp_path, fake_ls)
    summary = _run(settings, fake_ls, only_unlabeled=True, limit=4)
    assert summary.done == 4
    assert {p["task"] for p in fake_ls.predictions} == {1, 4, 5, 6}
    summary = _run(settings, fake_ls, task_ids=[2, 9, 10])
    assert summary.done == 3
    assert {p["task"] for p in fake_ls.predictions} == {1, 2, 4, 5, 6, 9, 10}


def test_dry_run_loads_no_model_and_stores_nothing(tmp_path, fake_ls, monkeypatch):
    fake_ls.add_tasks(_images(5))
    settings = _settings(tmp_path, fake_ls)
    _run(settings, fake_ls, task_ids=[1])
    monkeypatch.setattr(PredictionPipeline, "from_settings", lambda *a, **k: pytest.fail("model loaded"))
    summary = prelabel.run_prelabel(settings, 1, client=LabelStudioClient(fake_ls.url, TOKEN), dry_run=True,
                                    progress=False)
    assert summary.dry_run and summary.done == 4 and list(summary.skipped) == [1]
    assert len(fake_ls.predictions) == 1
    assert "would predict 4, skipped 1" in summary.lines()[0]


def test_a_bad_task_fails_alone_with_its_reason(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(3) + [{"image": "data:image/png;base64,bm90IGFuIGltYWdl"}] + _images(2))
    summary = _run(_settings(tmp_path, fake_ls), fake_ls)
    assert summary.done == 5 and list(summary.failed) == [4]
    assert "decode" in summary.failed[4]
    assert not summary.ok


def test_a_prediction_stored_meanwhile_is_not_stored_again(tmp_path, fake_ls, monkeypatch):
    fake_ls.add_tasks(_images(4))
    settings = _settings(tmp_path, fake_ls)
    original = prelabel.predict_tasks

    def predict_and_race(pipeline, job, tasks):
        out = original(pipeline, job, tasks)
        with fake_ls.lock:   # another process stores task 2 while this one computes it
            fake_ls._store({"task": 2, "result": [], "score": 0.1, "model_version": "gem-test-v1"})
        return out

    monkeypatch.setattr(prelabel, "predict_tasks", predict_and_race)
    summary = _run(settings, fake_ls, task_ids=[1, 2, 3])
    assert len(fake_ls.predictions_of(2)) == 1
    assert summary.done == 2 and 2 in summary.skipped


def test_interrupted_run_then_rerun_stores_each_task_once(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(12))
    settings = _settings(tmp_path, fake_ls)
    with pytest.raises(KeyboardInterrupt):
        _run(settings, fake_ls, pipeline=_pipeline(settings, CountingPredictor(interrupt_at=4)))
    stored_before = len(fake_ls.predictions)
    assert 0 < stored_before < 12
    # the interrupted run left no claim behind on the tasks it did not store (those it stored keep a
    # short "just stored" marker), so the rerun can take them at once
    stored = {str(p["task"]) for p in fake_ls.predictions}
    assert ClaimStore(str(tmp_path / "claims.sqlite")).held_by_others(range(1, 13), "gem-test-v1") == stored
    summary = _run(settings, fake_ls)
    assert summary.ok and summary.done == 12 - stored_before
    assert all(len(fake_ls.predictions_of(t)) == 1 for t in fake_ls.tasks)


def test_tasks_another_process_holds_are_left_to_it(tmp_path, fake_ls):
    fake_ls.add_tasks(_images(4))
    settings = _settings(tmp_path, fake_ls)
    other = ClaimStore(str(tmp_path / "claims.sqlite")).holder("elsewhere")   # a live holder that is not the command
    other.claim([3], "gem-test-v1")
    summary = _run(settings, fake_ls)
    assert summary.done == 3 and summary.skipped == {3: "being predicted by another process"}
    assert fake_ls.predictions_of(3) == []


def test_main_exit_codes(tmp_path, fake_ls, monkeypatch, capsys):
    fake_ls.add_tasks(_images(2))
    monkeypatch.setenv("LABEL_STUDIO_URL", fake_ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL_VERSION", "gem-test-v1")
    monkeypatch.setattr(PredictionPipeline, "from_settings",
                        classmethod(lambda cls, s, **k: _pipeline(s)))
    assert prelabel.main(["--project", "1", "--no-progress"]) == 0
    assert "done 2" in capsys.readouterr().out
    fake_ls.add_tasks([{"image": "data:image/png;base64,bm90IGFuIGltYWdl"}])
    assert prelabel.main(["--project", "1", "--no-progress"]) == 1
    assert "failed task 3" in capsys.readouterr().out
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong")
    assert prelabel.main(["--project", "1", "--no-progress"]) == 2
    assert "LABEL_STUDIO_API_KEY" in capsys.readouterr().err
    monkeypatch.delenv("LABEL_STUDIO_URL")
    assert prelabel.main(["--project", "1", "--no-progress"]) == 2
    assert "set LABEL_STUDIO_URL" in capsys.readouterr().err


def test_parse_task_ids():
    assert prelabel.parse_task_ids("1, 2,5-7") == [1, 2, 5, 6, 7]
    with pytest.raises(Exception):
        prelabel.parse_task_ids("3-1")


def test_client_errors_say_what_to_fix(fake_ls):
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient(fake_ls.url, "")
    with pytest.raises(LabelStudioError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        LabelStudioClient(fake_ls.url, "nope").get_project(1)


def test_client_refreshes_a_personal_access_token_once_and_again_after_a_401(fake_ls):
    from backend_fixtures import make_jwt

    fake_ls.refresh_token = make_jwt({"token_type": "refresh", "exp": 4102444800})
    fake_ls.add_tasks(_images(2))
    client = LabelStudioClient(fake_ls.url, fake_ls.refresh_token)
    assert [t["id"] for t in client.iter_tasks(1)] == [1, 2]
    assert client.get_project(1)["task_number"] == 2
    assert fake_ls.count("POST", "/api/token/refresh/") == 1          # cached between calls
    fake_ls.access_tokens.clear()                                      # revoked: the next call renews once
    assert client.get_project(1)["id"] == 1
    assert fake_ls.count("POST", "/api/token/refresh/") == 2


# -- paging, outages, the uploader (issue 20 item 6) --------------------------------------------------------


def test_labelling_during_an_only_unlabeled_run_skips_no_task_and_lists_none_twice(tmp_path, fake_ls):
    """Annotators label tasks between two pages: paging by task id still lists every task that was
    unlabeled when its page was read, once. (Paging by page number skipped tasks 4 and 5 here: the
    two labelled tasks of page 1 left the list, and page 2 began two tasks later.)"""
    fake_ls.add_tasks(_images(12), annotated={9})
    listed_pages: list[list[int]] = []

    def annotator(ls):
        if len(listed_pages) == 0:
            ls.annotate([1, 2, 7])        # two of page 1 (listed already) and one further on
            ls.tasks[9]["annotations"] = []   # and an annotation of task 9 deleted
        listed_pages.append([])

    fake_ls.after_list.append(annotator)
    summary = _run(_settings(tmp_path, fake_ls), fake_ls, only_unlabeled=True, page_size=3)
    predicted = sorted(p["task"] for p in fake_ls.predictions)
    assert predicted == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]      # 7 was labelled before its page: left alone
    assert summary.seen == 11 and summary.done == 11 and summary.ok


def test_client_pages_by_task_id_within_a_range(fake_ls):
    fake_ls.add_tasks(_images(9), annotated={4})
    client = LabelStudioClient(fake_ls.url, TOKEN)
    assert [t["id"] for t in client.iter_tasks_by_id(1, page_size=2)] == list(range(1, 10))
    assert [t["id"] for t in client.iter_tasks_by_id(1, after_id=2, upto_id=6, page_size=2,
                                                      only_unlabeled=True)] == [3, 5, 6]
    assert client.task_id_range(1, only_unlabeled=True, task_ids=[4, 5, 8]) == (5, 8)
    assert client.task_id_range(1, task_ids=[]) is None
    fake_ls.ignore_id_filter = True     # a Label Studio without the id filter: a clear error, not a loop
    with pytest.raises(LabelStudioError, match="ignored the task id filter"):
        list(client.iter_tasks_by_id(1, page_size=2))


def test_label_studio_outage_mid_run_is_a_failed_run_with_a_summary(tmp_path, fake_ls, monkeypatch, capsys):
    from backend import stages

    fake_ls.add_tasks(_images(8))
    monkeypatch.setenv("LABEL_STUDIO_URL", fake_ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL_VERSION", "gem-test-v1")
    monkeypatch.setattr(PredictionPipeline, "from_settings", classmethod(lambda cls, s, **k: _pipeline(s)))
    monkeypatch.setattr(stages, "LIST_RETRY_WAIT_S", 0.01)
    monkeypatch.setattr(prelabel, "PAGE_SIZE", 4)
    original = stages.split_done

    def split_then_outage(tasks, version):   # Label Studio goes down once the first page is in the model
        out = original(tasks, version)
        fake_ls.unavailable = True
        return out

    monkeypatch.setattr(prelabel, "split_done", split_then_outage)
    code = prelabel.main(["--project", "1", "--no-progress", "--batch-tasks", "4"])
    out = capsys.readouterr()
    assert code == 1, out.err[-2000:]
    assert "4 tasks seen" in out.out and "stopped early: Label Studio stopped answering" in out.out
    assert "HTTP 503" in out.out and "run again to continue" in out.out
    assert fake_ls.predictions == []          # the store failed too: those tasks are failed, not lost silently
    assert "failed 4" in out.out
    fake_ls.unavailable = False
    monkeypatch.setattr(prelabel, "split_done", original)
    assert prelabel.main(["--project", "1", "--no-progress"]) == 0      # the rerun does the rest
    assert sorted(p["task"] for p in fake_ls.predictions) == list(range(1, 9))


def test_label_studio_unreachable_at_the_start_is_a_setup_error(tmp_path, fake_ls, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_URL", fake_ls.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    fake_ls.unavailable = True
    assert prelabel.main(["--project", "1", "--no-progress"]) == 2
    assert "HTTP 503" in capsys.readouterr().err


def test_uploader_close_stores_every_waiting_chunk(fake_ls):
    import threading

    fake_ls.add_tasks(_images(7))
    client = LabelStudioClient(fake_ls.url, TOKEN)
    first_chunk = threading.Event()
    store = client.create_predictions

    def slow_store(project, predictions, chunk=100):
        first_chunk.wait(5)              # chunk 1 is still storing when close() is called
        return store(project, predictions, chunk=chunk)

    client.create_predictions = slow_store
    uploader = prelabel.PredictionUploader(client, 1, chunk=3)
    payloads = [{"task": t, "result": [], "score": 0.5, "model_version": "v"} for t in range(1, 8)]
    uploader.add(payloads)          # chunks 1-3 and 4-6 queued, task 7 waits for a full chunk
    threading.Timer(0.3, first_chunk.set).start()
    stored, skipped, failed = uploader.close()
    assert sorted(stored) == list(range(1, 8)) and not skipped and not failed
    assert sorted(p["task"] for p in fake_ls.predictions) == list(range(1, 8))
    assert uploader.close() == ([], [], {})
