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


def test_stages_store_what_the_plain_pipeline_predicts(tiny_pipeline):
    import json

    from backend import prelabel_ray
    from backend_fixtures import MIXED_CONFIG

    settings, plain = tiny_pipeline
    job = plain.prepare(MIXED_CONFIG, project="7")
    tasks = _tasks()
    expected, _ = plain.predict(tasks, job)

    stored: dict = {}

    def upload(items):
        ids = [task_id for task_id, _ in items]
        if 16 in ids:
            raise ConnectionError("Label Studio went away")
        for task_id, prediction in items:
            assert task_id not in stored
            stored[task_id] = prediction
        return [(12, "refused by Label Studio")] if 12 in ids else []

    actor = prelabel_ray.PredictActor(settings, job)
    rows = [{"index": i, "task": json.dumps(t)} for i, t in enumerate(tasks)]
    outcomes = []
    for start in range(0, len(rows), 4):       # batches of another size than the pipeline's
        fetched = prelabel_ray.fetch_images(_batch(rows[start:start + 4]), settings, job)
        predicted = actor(fetched)
        uploaded = prelabel_ray.upload_predictions(predicted, upload)
        outcomes += [dict(zip(uploaded, values)) for values in zip(*uploaded.values())]

    by_task = {o["task_id"]: o for o in outcomes}
    assert sorted(by_task) == sorted(t["id"] for t in tasks)
    assert by_task[3]["status"] == "failed" and by_task[3]["reason"] == "decode"
    assert by_task[4]["status"] == "failed" and by_task[4]["reason"] == "no_image"
    assert by_task[12]["status"] == "upload_failed" and "refused" in by_task[12]["message"]
    chunk_that_failed = {o["task_id"] for o in outcomes[8:]}   # the last chunk: task 16 alone
    assert chunk_that_failed == {16}
    for task_id in chunk_that_failed:
        assert by_task[task_id]["status"] == "upload_failed" and "went away" in by_task[task_id]["message"]
    for task, prediction in zip(tasks, expected):
        if "result" not in prediction or task["id"] in chunk_that_failed:
            assert task["id"] not in stored
            continue
        assert prediction["result"], task["id"]
        assert _without_ids(stored[task["id"]]) == _without_ids(prediction), task["id"]
        if task["id"] != 12:
            assert by_task[task["id"]]["status"] == "stored"


def _without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in item.items() if k != "id"} for item in prediction["result"]]}
