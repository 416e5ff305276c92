"""7. Bad images through the real path: failed tasks get no prediction, the others do.

Label Studio answers a missing upload with 500 (not 404) and a missing local file with 404; a
corrupt file is garbage bytes named .png, once uploaded and once on a plain web server.
"""
import os

from e2e_support import check, encode_png, labeling_config, metric_value, pattern_image

CONFIG = labeling_config()


def test_missing_and_corrupt_images_get_no_prediction_and_the_rest_do(ls, label_studio, backend, web_server):
    project = ls.create_project("e2e bad data", CONFIG)
    garbage = os.urandom(2048)
    ls.upload_files(project, {
        "good": ("good-upload.png", encode_png(pattern_image(64, 48, seed=9)), "image/png"),
        "corrupt": ("corrupt-upload.png", garbage, "image/png"),
    })
    local_dir = label_studio.local_files_root / "bad"
    local_dir.mkdir()
    pattern_image(48, 64, seed=10).save(local_dir / "good-local.png")
    ls.add_local_storage(project, local_dir)
    pattern_image(56, 56, seed=11).save(web_server.root / "good-web.png")
    (web_server.root / "corrupt-web.png").write_bytes(garbage)
    ls.import_tasks(project, [
        {"image": "/data/local-files/?d=bad/good-local.png"},
        {"image": "/data/local-files/?d=bad/missing-local.png"},       # LS: 404
        {"image": f"/data/upload/{project}/missing-upload.png"},       # LS: 500
        {"image": f"{web_server.url}/good-web.png"},
        {"image": f"{web_server.url}/corrupt-web.png"},
        {"image": f"{web_server.url}/missing-web.png"},                 # web server: 404
    ])
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)
    failed_before = metric_value(backend.metrics(), "gem_tasks_total", outcome="failed")

    ls.retrieve_predictions(project)

    stored = {t["data"]["image"].rsplit("/", 1)[-1]: ls.predictions(t["id"]) for t in ls.tasks(project)}
    assert len(stored) == 8
    good = {name: preds for name, preds in stored.items() if "good" in name}
    bad = {name: preds for name, preds in stored.items() if "good" not in name}
    assert len(good) == 3 and len(bad) == 5
    # The backend itself saw exactly the five bad images fail (backend/metrics.py)...
    assert metric_value(backend.metrics(), "gem_tasks_total", outcome="failed") - failed_before == 5
    # ...the good ones got regions...
    missing = {name: predictions for name, predictions in good.items()
               if len(predictions) != 1 or not predictions[0]["result"]}
    assert not missing, f"good images without a prediction with regions: {missing}"
    # ...and Label Studio stored nothing for the bad ones, so a later "Retrieve Predictions"
    # retries them (LS skips tasks that hold a prediction of the current model version).
    stored_for_bad = {name: [p["result"] for p in predictions] for name, predictions in bad.items() if predictions}
    assert not stored_for_bad, f"bad images should get no prediction, Label Studio stored: {stored_for_bad}"
