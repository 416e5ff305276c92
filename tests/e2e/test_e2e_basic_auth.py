"""5. Basic auth: with BASIC_AUTH_USER/PASS set, Label Studio connects only with the credentials."""
import secrets

import pytest
import requests

from e2e_support import check, encode_png, labeling_config, metric_value, pattern_image

CONFIG = labeling_config()
USER = "e2e-ls"


@pytest.fixture(scope="module")
def auth_backend(start_backend):
    # No LABEL_STUDIO_URL and no key: images come with the token /setup sends, from the host that
    # same /setup names (Label Studio calls itself http://localhost:<port>, not 127.0.0.1).
    return start_backend("basic-auth", BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=secrets.token_urlsafe(12),
                         LABEL_STUDIO_URL=None)


@pytest.fixture(scope="module")
def auth_project(ls) -> int:
    project = ls.create_project("e2e basic auth", CONFIG)
    ls.upload_files(project, {"img": ("auth.png", encode_png(pattern_image(64, 64, seed=8)), "image/png")})
    return project


@pytest.mark.parametrize("credentials", [
    pytest.param({}, id="no-credentials"),
    pytest.param({"auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": "wrong"},
                 id="wrong-password"),
])
def test_label_studio_cannot_connect_without_the_right_credentials(ls, auth_backend, auth_project, credentials):
    reply = ls.add_ml_backend(auth_project, auth_backend.url, is_interactive=False, **credentials)
    # /health is open (liveness probes), so Label Studio gets past it and fails on /setup's 401.
    assert reply.status_code == 400, reply.text
    assert "401" in reply.text, reply.text
    assert check(ls.get("/api/ml/", params={"project": auth_project}), 200).json() == []


def test_label_studio_connects_and_predicts_with_the_credentials(ls, auth_backend, auth_project):
    user, password = auth_backend.auth
    reply = check(ls.add_ml_backend(auth_project, auth_backend.url, is_interactive=False, auth_method="BASIC_AUTH",
                                    basic_auth_user=user, basic_auth_pass=password), 201).json()
    assert reply["state"] == "CO", reply
    assert reply["auth_method"] == "BASIC_AUTH" and reply["basic_auth_pass_is_set"] is True

    # /predict goes through the same credentials.
    ls.retrieve_predictions(auth_project)
    task = ls.tasks(auth_project)[0]
    predictions = ls.predictions(task["id"])
    assert len(predictions) == 1 and predictions[0]["result"], predictions

    # Start Training reaches /webhook with the same credentials and is accepted; the same call
    # without them is refused (it would relearn the whole project).
    trainings = metric_value(auth_backend.metrics(), "gem_webhook_events_total", action="START_TRAINING")
    check(ls.post(f"/api/ml/{reply['id']}/train", json={}), 200)
    assert metric_value(auth_backend.metrics(), "gem_webhook_events_total", action="START_TRAINING") > trainings
    anonymous = requests.post(f"{auth_backend.url}/webhook", json={"action": "START_TRAINING",
                                                                   "project": {"id": auth_project}}, timeout=30)
    assert anonymous.status_code == 401, anonymous.text
