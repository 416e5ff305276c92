"""`--ray` pre-labelling without a Label Studio: the Ray pipeline's stages, and that only `--ray` loads Ray.

The end-to-end proof (a real Label Studio, 2 workers, results equal to the plain command's) is
tests/e2e/test_e2e_prelabel_ray.py.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter that runs `code`."""
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split())


def test_server_never_imports_ray(tmp_path):
    loaded = _modules_after(f"""
        import backend.server, backend.model, backend.pipeline, backend.ls_client
        from backend.settings import Settings
        app = backend.server.create_app(Settings(model_dir={str(tmp_path)!r}), load=False)
        assert app.test_client().get("/health").status_code == 200
    """)
    assert "backend" in loaded and "ray" not in loaded


def test_plain_prelabel_command_never_imports_ray():
    loaded = _modules_after("""
        import runpy, sys
        import backend.prelabel
        sys.argv = ["prelabel", "--help"]
        try:
            runpy.run_module("backend.prelabel", run_name="__main__")
        except SystemExit:
            pass
    """)
    assert "ray" not in loaded


# ---------------------------------------------------------------------------------------------
# The stages, called directly (no Ray): the same predictions as the plain pipeline, failures included


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_files, tmp_path_factory):
    from backend.pipeline import PredictionPipeline, load_predictor
    from backend.settings import Settings

    name, config, checkpoint = tiny_model_files
    settings = Settings(model_name=name, model_config=str(config), pretrained=str(checkpoint), device="cpu",
                        image_size=64, batch_size=3, model_dir=str(tmp_path_factory.mktemp("model")),
                        region_overrides=(("min_similarity", 0.0),))
    return settings, PredictionPipeline(settings, load_predictor(settings))


def _noise_png(seed: int, width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _tasks() -> list[dict]:
    from backend_fixtures import data_uri

    # Three image sizes, so the model batches hold different images than the plain pipeline's.
    tasks = [{"id": 10 + i, "data": {"image": data_uri(_noise_png(i, 64 + 8 * (i % 3), 48))}} for i in range(7)]
    tasks.insert(2, {"id": 3, "data": {"image": "data:image/png;base64,AAAA"}})   # not an image
    tasks.insert(5, {"id": 4, "data": {}})                                         # no image URL
    return tasks


def _batch(rows: list[dict]) -> dict:
    import numpy as np

    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}


def test_stages_store_what_the_plain_command_predicts(tiny_pipeline):
    import json

    from backend import prelabel_ray
    from backend.stages import predict_tasks
    from backend_fixtures import MIXED_CONFIG

    settings, plain = tiny_pipeline
    job = plain.prepare(MIXED_CONFIG, project="7")
    tasks = _tasks()
    expected, expected_failures, _ = predict_tasks(plain, job, tasks)
    expected = {p["task"]: p for p in expected}
    assert set(expected_failures) == {3, 4} and len(expected) == 7

    stored: dict = {}

    def upload(payloads):
        ids = [p["task"] for p in payloads]
        if 16 in ids:
            raise ConnectionError("Label Studio went away")
        skipped = [t for t in ids if t == 11]                 # found stored just before upload
        failed = {12: "HTTP 400"} if 12 in ids else {}
        for p in payloads:
            if p["task"] not in skipped and p["task"] not in failed:
                assert p["task"] not in stored
                stored[p["task"]] = p
        return [t for t in ids if t not in skipped and t not in failed], skipped, failed

    actor = prelabel_ray.PredictActor(settings, job)
    # Task 20 already holds a prediction of this version: passed along, counted as skipped.
    tasks.append({"id": 20, "data": tasks[0]["data"], "predictions": [{"model_version": job.model_version}]})
    columns = prelabel_ray.task_rows(tasks, job.model_version)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    outcomes = []
    for start in range(0, len(rows), 4):       # batches of another size than the plain command's
        fetched = prelabel_ray.fetch_images(_batch(rows[start:start + 4]), settings, job, plain.decode_min_side)
        uploaded = prelabel_ray.upload_predictions(actor(fetched), upload)
        outcomes += [dict(zip(uploaded, values)) for values in zip(*uploaded.values())]

    by_task = {o["task_id"]: o for o in outcomes}
    assert sorted(by_task) == sorted(t["id"] for t in tasks)
    assert by_task[3]["status"] == "failed" and by_task[3]["why"] == expected_failures[3]
    assert by_task[3]["why"].startswith("decode:")
    assert by_task[4]["status"] == "failed" and by_task[4]["why"].startswith("no_image:")
    assert by_task[11]["status"] == "skipped"
    assert by_task[20]["status"] == "skipped" and by_task[20]["why"] == prelabel_ray.ALREADY_PREDICTED
    assert by_task[12]["status"] == "failed" and by_task[12]["why"] == "HTTP 400"
    assert by_task[16]["status"] == "failed" and "went away" in by_task[16]["why"]   # its chunk failed
    assert {t for t, o in by_task.items() if o["status"] == "stored"} == set(stored) == {10, 13, 14, 15}
    for task_id, payload in stored.items():
        assert payload["result"], task_id
        assert _without_ids(payload) == _without_ids(expected[task_id]), task_id
    assert all(o["fetch_s"] > 0 for o in outcomes if o["task_id"] != 20)


def test_fetch_tasks_decode_as_the_actors_pipeline_does(tiny_pipeline):
    """The driver's planning pipeline (random weights, nothing loaded) decodes like the real one."""
    from backend import prelabel_ray

    settings, plain = tiny_pipeline
    planner = prelabel_ray.planning_pipeline(settings)
    assert planner.decode_min_side == plain.decode_min_side is not None
    assert planner.model_version == plain.model_version


def _without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in item.items() if k != "id"} for item in prediction["result"]]}


@pytest.mark.parametrize("resources, device, workers, expected", [
    ({"CPU": 64, "GPU": 4}, "auto", None, (4, 1.0)),     # one worker per GPU
    ({"CPU": 64, "GPU": 4}, "auto", 8, (8, 0.5)),        # more workers share the GPUs
    ({"CPU": 64, "GPU": 4}, "auto", 2, (2, 1.0)),
    ({"CPU": 64, "GPU": 4}, "cpu", None, (1, 0.0)),      # GEM_DEVICE=cpu: GPUs are not asked for
    ({"CPU": 16}, "auto", None, (1, 0.0)),               # no GPU: one CPU worker
    ({"CPU": 16}, "auto", 3, (3, 0.0)),
])
def test_workers_default_to_one_per_gpu(monkeypatch, resources, device, workers, expected):
    from backend import prelabel_ray
    from backend.settings import Settings

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return resources

    monkeypatch.setattr(prelabel_ray, "import_ray", lambda: FakeRay)
    options = prelabel_ray.RayOptions(workers=workers)
    assert prelabel_ray.plan_workers(options, Settings(device=device)) == expected


def test_id_ranges_follow_the_projects_density():
    from backend.prelabel_ray import id_ranges

    assert id_ranges(1, 250, 250) == [(0, 100), (100, 200), (200, None)]
    # A project holding every 10th id (Label Studio numbers all projects' tasks together): ~100 tasks a range.
    assert id_ranges(5, 10_000, 1000) == [(4 + i * 1000, 4 + (i + 1) * 1000) for i in range(9)] + [(9004, None)]
    assert id_ranges(7, 7, 1) == [(6, None)]
    assert len(id_ranges(1, 10**9, 10**9)) <= 4096


def _ranges(fake_ls, **kw):
    from backend import prelabel_ray
    from backend.ls_client import LabelStudioClient
    from fake_label_studio import TOKEN

    client = LabelStudioClient(fake_ls.url, TOKEN)
    first, last = client.task_id_range(1, only_unlabeled=kw.get("only_unlabeled", False))
    return prelabel_ray.TaskRanges(url=fake_ls.url, token=TOKEN, project=1, page_size=3,
                                   ranges=tuple(prelabel_ray.id_ranges(first, last, len(fake_ls.tasks), page_size=5)),
                                   **kw)


def test_task_ranges_list_every_task_once_while_tasks_are_labelled(fake_ls):
    """The listing tasks read id ranges in any order, paged by id; annotators label tasks between
    pages, and a task is imported meanwhile: every task unlabeled when read is listed once."""
    fake_ls.add_tasks([{"image": f"/data/{i}.png"} for i in range(23)])
    reads = []

    def annotator(ls):
        reads.append(1)
        if len(reads) == 2:
            ls.annotate([1, 2, 3, 12, 13])          # listed (range 0) and not yet listed (range 2)
            ls.add_tasks([{"image": "/data/new.png"}])   # task 24: the open last range lists it

    ranges = _ranges(fake_ls, only_unlabeled=True)
    fake_ls.after_list.append(annotator)
    assert ranges.ranges == ((0, 5), (5, 10), (10, 15), (15, 20), (20, None))
    listed = [t["id"] for i in (0, 2, 1, 4, 3) for t in ranges.read(i)]   # any order, as Ray runs them
    assert sorted(listed) == [i for i in range(1, 25) if i not in (12, 13)]
    assert len(listed) == len(set(listed))
    assert "legacy-token" not in repr(ranges)


def test_listing_rows_leave_tasks_claimed_by_someone_else(tmp_path):
    """The Ray path's claims: a task another holder (the server, another run) has is skipped with
    the plain command's reason and never reaches the model; the rest are claimed for this run."""
    import json

    from backend import prelabel_ray
    from backend.claims import ClaimStore
    from backend.stages import HELD_ELSEWHERE, RunClaims

    server = ClaimStore(str(tmp_path / "claims.sqlite")).holder("predict")   # a live holder that is not this run
    server.claim([2], "v1")
    run_claims = RunClaims(ClaimStore(str(tmp_path / "claims.sqlite")), "v1", 1)
    try:
        tasks = [{"id": i, "data": {"image": f"/data/{i}.png"}} for i in (1, 2, 3)]
        tasks.append({"id": 4, "data": {}, "predictions": [{"model_version": "v1"}]})
        rows = prelabel_ray.task_rows(tasks, "v1", claim=run_claims.take)
        assert rows["skip"] == ["", HELD_ELSEWHERE, "", prelabel_ray.ALREADY_PREDICTED]
        assert run_claims.held() == {"1", "3"}
        assert server.held_by_others([1, 3], "v1") == {"1", "3"}    # the server now leaves them to the run
        # Tasks the driver listed (--limit) are claimed batch by batch in their own stage.
        listed = prelabel_ray.task_rows([{"id": 5, "data": {}}, {"id": 2, "data": {}}], "v1")
        claimed = prelabel_ray.claim_rows(listed, run_claims.take)
        assert claimed["skip"] == ["", HELD_ELSEWHERE] and [json.loads(t)["id"] for t in claimed["task"]] == [5, 2]
        run_claims.give_back([1])
        run_claims.stored([3])                 # stored: a short marker keeps others off it a while longer
        assert server.held_by_others([1, 3, 5], "v1") == {"3", "5"}
    finally:
        run_claims.close()
    assert server.held_by_others([1, 3, 5], "v1") == {"3"}   # only the marker is left


def test_claims_broker_answers_through_the_drivers_thread(tmp_path):
    """ClaimBroker's protocol without Ray: an asker waits until the driver's thread answers."""
    import asyncio
    import threading

    from backend import prelabel_ray
    from backend.claims import ClaimStore
    from backend.stages import RunClaims

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    class Call:            # stands in for an actor method's .remote(): runs it on the actor's loop
        def __init__(self, method):
            self.method = method

        def remote(self, *args):
            return asyncio.run_coroutine_threadsafe(self.method(*args), loop)

    class Handle:
        def __init__(self, broker):
            self.claim, self.take, self.answer = Call(broker.claim), Call(broker.take), Call(broker.answer)

    broker = asyncio.run_coroutine_threadsafe(_make_broker(prelabel_ray), loop).result()
    handle = Handle(broker)
    run_claims = RunClaims(ClaimStore(str(tmp_path / "claims.sqlite")), "v1", 1)
    other = ClaimStore(str(tmp_path / "claims.sqlite")).holder("predict")
    other.claim([8], "v1")
    stop = threading.Event()
    server = threading.Thread(target=prelabel_ray.serve_claims,
                              args=(handle, run_claims, stop, lambda future: future.result(10)), daemon=True)
    server.start()
    try:
        asks = [handle.claim.remote([7, 8], 10.0), handle.claim.remote([9], 10.0)]
        assert sorted(asks[0].result(10)) == [7] and asks[1].result(10) == [9]
        assert run_claims.held() == {"7", "9"}
    finally:
        stop.set()
        server.join(5)
        run_claims.close()
        loop.call_soon_threadsafe(loop.stop)


async def _make_broker(prelabel_ray):
    return prelabel_ray.ClaimBroker()   # its asyncio objects belong to the running loop


def test_workers_without_ray_is_a_usage_error(capsys):
    from backend.prelabel import main

    assert main(["--project", "1", "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert main(["--project", "1", "--ray", "--workers", "0"]) == 2


def test_label_studio_lost_in_mid_run_is_a_failed_ray_run_with_a_summary(tiny_pipeline, fake_ls, monkeypatch,
                                                                        tmp_path):
    """A listing task that finds Label Studio gone fails the Ray job; the command reports a failed
    run with what was done (exit 1), not a setup error, and gives its claims back."""
    from backend import prelabel_ray
    from backend.claims import ClaimStore
    from backend_fixtures import MIXED_CONFIG
    from fake_label_studio import TOKEN

    settings, _ = tiny_pipeline
    settings = settings.replace(label_studio_url=fake_ls.url, label_studio_api_key=TOKEN, model_dir=str(tmp_path))
    fake_ls.label_config = MIXED_CONFIG
    fake_ls.add_tasks([{"image": f"/data/{i}.png"} for i in range(3)])

    def run_until_label_studio_goes(source, job, settings, upload, options, on_outcome=None, min_side=None,
                                    claims=None):
        assert isinstance(source, prelabel_ray.TaskRanges) and source.ranges == ((0, None),)
        assert claims.take([1, 2]) == {1, 2}
        on_outcome({"task_id": 1, "status": "stored", "why": ""})
        raise RuntimeError("ray.exceptions.RayTaskError(LabelStudioError): GET /api/tasks/: HTTP 503")

    monkeypatch.setattr(prelabel_ray, "run", run_until_label_studio_goes)
    summary = prelabel_ray.run_prelabel_on_ray(settings, 1, prelabel_ray.RayOptions(), progress=False)
    assert summary.exit_status == 1 and summary.done == 1 and summary.seen == 1
    assert "HTTP 503" in summary.stopped and "stopped early" in "\n".join(summary.lines())
    # Task 1 was stored: a short marker keeps the server off it; task 2 is free again.
    assert ClaimStore(str(tmp_path / "claims.sqlite")).held_by_others([1, 2], summary.model_version) == {"1"}
