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
    from backend.prelabel import predict_tasks
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


def test_task_pages_read_like_the_plain_listing(monkeypatch):
    """Pages read one by one (as the listing tasks do) give the plain command's tasks, `--limit` included."""
    from backend import prelabel_ray

    all_tasks = [{"id": i, "data": {"image": f"/data/{i}.png"}} for i in range(1, 251)]

    class FakeClient:
        def tasks_page(self, project, page, page_size, only_unlabeled, task_ids):
            part = all_tasks[(page - 1) * page_size:page * page_size]
            return part, len(part) >= page_size

    monkeypatch.setitem(prelabel_ray._CLIENTS, ("http://ls", "key"), FakeClient())
    pages = prelabel_ray.TaskPages(url="http://ls", token="key", project=1, pages=4, page_size=100)
    assert [t["id"] for p in range(1, 5) for t in pages.read(p)] == list(range(1, 251))
    limited = prelabel_ray.TaskPages(url="http://ls", token="key", project=1, pages=3, page_size=100, limit=130)
    assert [t["id"] for p in range(1, 4) for t in limited.read(p)] == list(range(1, 131))
    assert "key" not in repr(pages)


def test_workers_without_ray_is_a_usage_error(capsys):
    from backend.prelabel import main

    assert main(["--project", "1", "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert main(["--project", "1", "--ray", "--workers", "0"]) == 2
