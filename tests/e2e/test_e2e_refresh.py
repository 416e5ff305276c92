"""Refresh after learning (docs/LEARNING.md): corrections submitted through Label Studio's API reach
the backend by Label Studio's own webhook; once learning publishes a new model version, the other
(unlabeled) tasks get a prediction of that version with no further click, exactly one each, and
the annotated tasks get none. The backend runs two gunicorn workers sharing MODEL_DIR, so the
webhooks (and the publications) land on either.

The project is the synthetic shapes of bench/bench_learning.py, as in test_e2e_learning.py.
"""
import sys
import time
from collections import Counter
from pathlib import Path

from e2e_support import check, metric_value, wait_until
from test_e2e_learning import SIZE, brush_items, refresh_settled, state_key_of, upload_synthetic

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from backend.learning import LearningStore  # noqa: E402
from backend.outbox import Outbox  # noqa: E402
from bench.bench_learning import make_project  # noqa: E402

ANNOTATED, UNLABELED = 3, 7


def test_learning_refreshes_the_unlabeled_tasks_by_itself(ls, label_studio, start_backend):
    backend = start_backend("refresh", LABEL_STUDIO_API_KEY=label_studio.account.legacy_token, WORKERS="2")
    synthetic = make_project(ANNOTATED + UNLABELED, seed=41, size=SIZE)
    project, tasks, truth = upload_synthetic(ls, "e2e refresh", synthetic)
    annotated, unlabeled = [t["id"] for t in tasks[:ANNOTATED]], [t["id"] for t in tasks[ANNOTATED:]]
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)

    ls.retrieve_predictions(project)          # the pre-annotations (and scores) the team works from
    base = {t: [p["model_version"] for p in ls.predictions(t)] for t in annotated + unlabeled}
    assert all(len(v) == 1 for v in base.values()), base
    base_version = base[unlabeled[0]][0]
    assert "+l" not in base_version

    store, key = LearningStore(str(backend.model_dir)), state_key_of(ls, label_studio, project)
    started = time.monotonic()
    for task_id in annotated:
        check(ls.post(f"/api/tasks/{task_id}/annotations/", json={"result": brush_items(truth[task_id].masks)}), 201)
    # Label Studio's webhook -> /webhook -> learned (fetched back from LS) -> published (doubling policy).
    assert wait_until(lambda: store.version(key) and len(store.keys(key)) == ANNOTATED, timeout=180), (
        store.version(key), store.keys(key), backend.process.log_tail(80))

    # No click: the refresh predicts every unlabeled task under the newest version by itself.
    def refreshed():
        version = f"{base_version}+{store.version(key)}"
        latest = {t: [p["model_version"] for p in ls.predictions(t)] for t in unlabeled}
        return version if all(version in v for v in latest.values()) else None

    new_version = wait_until(refreshed, timeout=300, interval=2.0)
    elapsed = time.monotonic() - started
    assert new_version, backend.process.log_tail(120)
    outbox = Outbox(str(backend.model_dir / "outbox.sqlite"))
    assert wait_until(lambda: refresh_settled(backend, project) and not any(outbox.refresh_sizes().values()),
                      timeout=120), (outbox.refresh_sizes(), outbox.refreshes(), backend.process.log_tail(80))
    assert new_version == f"{base_version}+{store.version(key)}"   # still the newest

    for task_id in unlabeled:
        versions = Counter(p["model_version"] for p in ls.predictions(task_id))
        assert versions[new_version] == 1, (task_id, versions)                 # exactly one of the new version
        assert all(n == 1 for n in versions.values()), (task_id, versions)     # and none twice of any version
    for task_id in annotated:
        versions = [p["model_version"] for p in ls.predictions(task_id)]
        assert versions == [base_version], (task_id, versions)                 # labelled: never re-predicted

    log = backend.process.log_tail(2000)
    assert "unlabeled tasks to predict, lowest score first" in log and "to learned version " in log
    assert "done: " in log, log[-3000:]
    metrics = backend.metrics()        # one worker's counters; the outbox gauge covers both
    assert metric_value(metrics, "gem_refresh_tasks", state="queued") == 0
    print(f"\nrefresh e2e: {UNLABELED} unlabeled tasks refreshed to {new_version} "
          f"{elapsed:.0f} s after the first annotation was submitted")
