"""Whole projects: more tasks than one /predict can finish in time, and the prelabel command.

Label Studio runs with ML_TIMEOUT_PREDICT lowered (conftest); the backend here has a 0.3 s
GEM_PREDICT_BUDGET, so a Retrieve Predictions on 40 tasks of 640x480 is answered in part and the
rest is finished in the background and stored through Label Studio's API. Every task must end
with exactly one prediction, also when the user clicks again while the job runs, and a later
Retrieve Predictions sends nothing more to predict. The command, killed mid-run and started
again, adds no duplicates either.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import TINY_MODEL_ENV
from e2e_support import REPO_ROOT, check, child_env, local_files_project, metric_value, wait_until

CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="rect" toName="image"><Label value="circle"/><Label value="square"/>'
          '</RectangleLabels></View>')
TASKS = 40


def _stored_in_project(ls, project: int) -> int:
    """One cheap call: how many predictions the project holds."""
    return check(ls.get(f"/api/projects/{project}/"), 200).json().get("total_predictions_number") or 0


def _prediction_counts(ls, ids: list[int]) -> dict[int, int]:
    return {t: len(ls.predictions(t)) for t in ids}


@pytest.fixture(scope="module")
def budget_backend(start_backend, label_studio):
    # 40 tasks at the tiny model's usual 64 px input take about 0.8 s on a quiet 2-core machine,
    # inside a 1 s budget. A larger input and a shorter budget leave work to the background on
    # fast and slow machines alike (the first batch is always predicted, so never all of it).
    return start_backend("budget", LABEL_STUDIO_API_KEY=label_studio.account.legacy_token,
                         GEM_PREDICT_BUDGET="0.3", GEM_BATCH_SIZE="2", GEM_IMAGE_SIZE="192")


def test_retrieve_predictions_past_the_budget_stores_one_prediction_per_task(ls, label_studio, budget_backend):
    project, ids = local_files_project(ls, label_studio, "budget", CONFIG, TASKS)
    ml = check(ls.add_ml_backend(project, budget_backend.url, is_interactive=False), 201).json()

    ls.retrieve_predictions(project)
    metrics = budget_backend.metrics()
    queued = metric_value(metrics, "gem_deferred_tasks_total", handling="queued")
    assert 0 < queued < TASKS, "the budget should have left part of the tasks to the background"
    stored_by_ls = sum(1 for c in _prediction_counts(ls, ids).values() if c)
    assert stored_by_ls >= TASKS - queued - 1        # what was answered in time, Label Studio stored

    ls.retrieve_predictions(project)                  # the user clicks again while the job runs

    counts = wait_until(lambda: (c := _prediction_counts(ls, ids)) and all(c.values()) and c, timeout=180,
                        interval=1.0)
    assert counts, f"not every task got a prediction: {_prediction_counts(ls, ids)}"
    assert set(counts.values()) == {1}, f"duplicates: {[t for t, c in counts.items() if c > 1]}"
    for task in ids:
        prediction = ls.predictions(task)[0]
        assert prediction["model_version"] == ml["model_version"]
        assert prediction["result"] and all(item["from_name"] == "rect" for item in prediction["result"])
    metrics = budget_backend.metrics()
    assert metric_value(metrics, "gem_background_tasks_total", outcome="done") >= 1
    assert metric_value(metrics, "gem_background_queued_tasks") == 0

    predicted_before = metric_value(metrics, "gem_tasks_total")
    ls.retrieve_predictions(project)                  # everything is stored: nothing left to predict
    assert metric_value(budget_backend.metrics(), "gem_tasks_total") == predicted_before
    assert set(_prediction_counts(ls, ids).values()) == {1}


def test_prelabel_command_killed_and_restarted_adds_no_duplicates(ls, label_studio, tiny_model_files, e2e_dir):
    project, ids = local_files_project(ls, label_studio, "prelabel", CONFIG, 40)
    name, config_path, checkpoint_path = tiny_model_files
    env = child_env({**TINY_MODEL_ENV, "GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path),
                     "GEM_PRETRAINED": str(checkpoint_path), "GEM_BATCH_SIZE": "2",
                     "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.account.legacy_token,
                     "MODEL_DIR": str(e2e_dir / "model-prelabel")})
    command = [sys.executable, "-m", "backend.prelabel", "--project", str(project), "--batch-tasks", "2",
               "--upload-chunk", "2"]
    log = open(e2e_dir / "logs" / "prelabel-1.log", "w")
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        started = wait_until(lambda: first.poll() is not None or _stored_in_project(ls, project) >= 2,
                             timeout=180, interval=0.05)
        assert started and first.poll() is None, "the command ended before it could be killed mid-run"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    stored = sum(_prediction_counts(ls, ids).values())
    assert 0 < stored < len(ids), stored

    second = subprocess.run(command + ["--no-progress"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"skipped {stored}" in second.stdout, second.stdout
    counts = _prediction_counts(ls, ids)
    assert set(counts.values()) == {1}, f"duplicates or gaps: {counts}"

    dry = subprocess.run(command + ["--dry-run", "--no-progress"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0 and "would predict 0" in dry.stdout, dry.stdout + dry.stderr
