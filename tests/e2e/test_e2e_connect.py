"""1. Connecting: Label Studio accepts our backend and shows our model version."""
from e2e_support import check, labeling_config


def test_label_studio_connects_backend_and_shows_its_model_version(ls, backend):
    config = labeling_config()
    project = ls.create_project("e2e connect", config)

    reply = check(ls.add_ml_backend(project, backend.url, title="GEM", is_interactive=True), 201)
    created = reply.json()
    record = check(ls.get(f"/api/ml/{created['id']}"), 200).json()

    assert record["state"] == "CO", f"backend not connected: {record}"
    assert record["readable_state"] == "Connected"
    assert record["error_message"] in (None, "")
    assert record["is_interactive"] is True

    # What the backend itself answers to the same /setup call Label Studio makes.
    setup = backend.request("POST", "/setup", json={
        "project": f"{project}.0", "schema": config, "hostname": ls.url, "access_token": "", "extra_params": None})
    assert setup.status_code == 200, setup.text
    ours = setup.json()["model_version"]
    assert ours, "backend /setup answered an empty model_version"
    assert record["model_version"] == ours

    # Label Studio's versions endpoint proxies our GET /versions.
    versions = check(ls.get(f"/api/ml/{created['id']}/versions"), 200).json()
    assert ours in versions["versions"], versions
