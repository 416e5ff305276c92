"""Pre-labelling on Ray: `python -m backend.prelabel --ray --workers 2` against a real Label Studio.

Two projects hold the same tasks (images of several sizes on a local web server, and one URL
that answers 404). The plain command pre-labels the first, under a `ray` package that fails
on import (so it provably never loads Ray); a local Ray with 2 model workers pre-labels the
second. Every task is stored once, the broken one in neither, the stored predictions are equal
(brush RLE, polygons, rectangles, scores), and a rerun stores nothing more.

Claims: while the Ray run goes, one of its tasks is held in MODEL_DIR's claims file by another
holder (as the server's /predict would hold it): the Ray run leaves it alone, and the rerun, once
it is released, stores it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_support import REPO_ROOT, brush_masks, child_env, labeling_config, pattern_image, without_ids

pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")

CONFIG = labeling_config()
SIZES = [(96, 64), (64, 96), (72, 72), (96, 64), (80, 48), (64, 64), (48, 80)]
COMMAND_TIMEOUT_S = 600
# The e2e backend's tiny-model settings (conftest.TINY_MODEL_ENV): a similarity floor of 0 keeps
# regions on these images, and the web server on 127.0.0.1 must be allow-listed.
TINY_MODEL_ENV = {"GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "GEM_MIN_SIMILARITY": "0",
                  "GEM_ALLOWED_HOSTS": "127.0.0.1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Run:
    code: int
    output: str

    def summary(self) -> dict[str, int]:
        match = re.search(r"(\d+) tasks seen, done (\d+), skipped (\d+), failed (\d+)", self.output)
        assert match, self.output[-3000:]
        return dict(zip(("seen", "done", "skipped", "failed"), map(int, match.groups())))


@pytest.fixture(scope="module")
def prelabel(tiny_model_files, label_studio, tmp_path_factory):
    """prelabel(project, *args, block_ray=False) -> Run of `python -m backend.prelabel`."""
    model_name, config_path, checkpoint_path = tiny_model_files
    blocker = tmp_path_factory.mktemp("no-ray")
    (blocker / "ray").mkdir()
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('the plain command must not import ray')\n")
    model_dir = tmp_path_factory.mktemp("prelabel-model")

    def run(project: int, *args: str, block_ray: bool = False) -> Run:
        env = child_env({
            "GEM_MODEL": model_name, "GEM_MODEL_CONFIG": str(config_path), "GEM_PRETRAINED": str(checkpoint_path),
            **TINY_MODEL_ENV, "GEM_BATCH_SIZE": "2", "LOG_LEVEL": "INFO",
            "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.account.legacy_token,
            "MODEL_DIR": str(model_dir), "RAY_DISABLE_USAGE_STATS": "1",
        })
        if block_ray:
            env["PYTHONPATH"] = str(blocker)
        done = subprocess.run([sys.executable, "-m", "backend.prelabel", "--project", str(project), "--no-progress",
                               *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        return Run(done.returncode, done.stdout + done.stderr)

    run.model_dir = model_dir
    return run


@pytest.fixture(scope="module")
def projects(ls, web_server):
    """(plain project id, ray project id): the same tasks in each, in the same order."""
    urls = []
    for i, (width, height) in enumerate(SIZES):
        name = f"prelabel-ray-{i}.png"
        pattern_image(width, height, seed=20 + i).save(web_server.root / name)
        urls.append(f"{web_server.url}/{name}")
    # A large JPEG is decoded in draft mode (reduced, backend/images.py): the fetch tasks must decode
    # it exactly as the plain pipeline does.
    pattern_image(480, 320, seed=40).save(web_server.root / "prelabel-ray-large.jpg", quality=90)
    urls.append(f"{web_server.url}/prelabel-ray-large.jpg")
    urls.insert(3, f"{web_server.url}/missing.png")          # 404: fails in both runs
    ids = []
    for title in ("e2e prelabel plain", "e2e prelabel ray"):
        project = ls.create_project(title, CONFIG)
        ls.import_tasks(project, [{"image": url} for url in urls])
        ids.append(project)
    return tuple(ids)


@pytest.fixture(scope="module")
def held_task(ls, projects) -> int:
    """A task of the Ray project (a real image) that another holder has during the Ray run."""
    return ls.tasks(projects[1])[1]["id"]


@pytest.fixture(scope="module")
def runs(prelabel, projects, held_task):
    from backend.claims import ClaimStore

    plain_project, ray_project = projects
    plain = prelabel(plain_project, block_ray=True)
    version = re.search(r"model version (\S+):", plain.output).group(1)
    # Another holder in the same MODEL_DIR (as a /predict request of the server would be) computes
    # this task right now: the Ray run must leave it to it.
    other = ClaimStore(str(prelabel.model_dir / "claims.sqlite")).holder("predict")
    assert other.claim([held_task], version) == {str(held_task)}
    with other.heartbeat():
        ray_run = prelabel(ray_project, "--ray", "--workers", "2")
    other.release_all()
    return plain, ray_run


def stored(ls, project: int) -> dict[str, list[dict]]:
    """image URL -> the task's stored predictions."""
    return {task["data"]["image"]: ls.predictions(task["id"]) for task in ls.tasks(project)}


def test_plain_command_runs_without_ray(runs):
    plain, _ = runs
    assert "must not import ray" not in plain.output
    assert plain.code == 1, plain.output[-3000:]          # 1: the missing image failed
    assert plain.summary() == {"seen": 9, "done": 8, "skipped": 0, "failed": 1}


def test_ray_run_stores_every_task_once_with_two_workers(ls, projects, runs, held_task):
    _, ray_run = runs
    assert ray_run.code == 1, ray_run.output[-5000:]
    assert ray_run.summary() == {"seen": 9, "done": 7, "skipped": 1, "failed": 1}
    assert "skipped: 1 x being predicted by another process" in ray_run.output, ray_run.output[-3000:]
    assert "2 model worker(s)" in ray_run.output, ray_run.output[-3000:]
    assert re.search(r"failed task \d+: http_4xx", ray_run.output) or "404" in ray_run.output, ray_run.output[-3000:]
    for task in ls.tasks(projects[1]):
        expected = 0 if task["data"]["image"].endswith("missing.png") or task["id"] == held_task else 1
        assert len(ls.predictions(task["id"])) == expected, task


def test_ray_predictions_equal_the_plain_commands(ls, projects, runs):
    plain, ray_side = stored(ls, projects[0]), stored(ls, projects[1])
    assert plain.keys() == ray_side.keys()
    compared = 0
    for url, predictions in plain.items():
        if url.endswith("missing.png") or not ray_side[url]:   # not ray_side: the held task (stored by the rerun)
            continue
        (a,), (b,) = predictions, ray_side[url]
        assert a["model_version"] == b["model_version"], url
        assert a["score"] == b["score"], url
        assert a["result"], url
        masks_a, masks_b = brush_masks(a["result"]), brush_masks(b["result"])
        assert [label for label, _ in masks_a] == [label for label, _ in masks_b], url
        for (label, mask_a), (_, mask_b) in zip(masks_a, masks_b):
            assert (mask_a == mask_b).all(), (url, label)
        assert without_ids(a["result"]) == without_ids(b["result"]), f"{url}: RLE, polygons or rectangles differ"
        compared += 1
    assert compared == 7


def test_ray_rerun_stores_the_released_task_and_nothing_more(ls, prelabel, projects, runs):
    again = prelabel(projects[1], "--ray", "--workers", "2")
    assert again.code == 1, again.output[-3000:]           # the missing image is tried again, and fails
    assert again.summary() == {"seen": 9, "done": 1, "skipped": 7, "failed": 1}
    for url, predictions in stored(ls, projects[1]).items():
        assert len(predictions) == (0 if url.endswith("missing.png") else 1), (url, predictions)
