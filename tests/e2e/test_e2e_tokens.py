"""4. Tokens: the backend downloads task images with a legacy token, and with only a personal
access token once legacy tokens are off.

Legacy tokens are switched off on the running server through the organization's JWT settings
(`POST /api/jwt/settings {"legacy_api_tokens_enabled": false}`): from then on every
`Authorization: Token ...` request answers 401, exactly as on a server started without
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN, which saves a second Label Studio start (~30 s).
"""
import pytest

from e2e_support import LabelStudioAPI, check, encode_png, labeling_config, pattern_image

CONFIG = labeling_config()


def _project_with_protected_images(api, label_studio, name: str) -> int:
    """A project whose two images both need Label Studio credentials: an upload and a local file."""
    project = api.create_project(f"e2e tokens {name}", CONFIG)
    api.upload_files(project, {"img": (f"{name}.png", encode_png(pattern_image(80, 60, seed=6)), "image/png")})
    local_dir = label_studio.local_files_root / f"tokens-{name}"
    local_dir.mkdir()
    pattern_image(60, 80, seed=7).save(local_dir / "local.png")
    api.add_local_storage(project, local_dir)
    api.import_tasks(project, [{"image": f"/data/local-files/?d=tokens-{name}/local.png"}])
    return project


def _predicted_tasks(api, project: int) -> dict[str, bool]:
    """image URL -> whether a stored prediction holds regions (a failed download yields none)."""
    return {t["data"]["image"]: any(p["result"] for p in api.predictions(t["id"])) for t in api.tasks(project)}


def test_backend_downloads_images_with_a_legacy_token(ls, label_studio, backend):
    assert ls.jwt_settings()["legacy_api_tokens_enabled"] is True
    project = _project_with_protected_images(ls, label_studio, "legacy")
    check(ls.add_ml_backend(project, backend.url, is_interactive=False), 201)
    ls.retrieve_predictions(project)
    predicted = _predicted_tasks(ls, project)
    assert len(predicted) == 2 and all(predicted.values()), predicted


@pytest.fixture
def legacy_tokens_disabled(ls, label_studio, personal_access_token):
    """Legacy tokens off for the organization for one test; back on afterwards, whatever happens."""
    pat_api = LabelStudioAPI.with_personal_token(label_studio.url, personal_access_token)
    pat_api.jwt_settings(legacy_api_tokens_enabled=False)
    try:
        yield pat_api
    finally:
        # The legacy client can no longer change it back; a fresh access token can.
        LabelStudioAPI.with_personal_token(label_studio.url, personal_access_token).jwt_settings(
            legacy_api_tokens_enabled=True)


def test_backend_downloads_images_with_only_a_personal_access_token(
        label_studio, start_backend, backend, personal_access_token, legacy_tokens_disabled):
    pat_api = legacy_tokens_disabled
    legacy = LabelStudioAPI.with_legacy_token(label_studio.url, label_studio.account.legacy_token)
    assert legacy.get("/api/projects/").status_code == 401, "legacy token still accepted"

    pat_backend = start_backend("pat", LABEL_STUDIO_API_KEY=personal_access_token)
    project = _project_with_protected_images(pat_api, label_studio, "pat")
    check(pat_api.add_ml_backend(project, pat_backend.url, is_interactive=False), 201)
    pat_api.retrieve_predictions(project)
    predicted = _predicted_tasks(pat_api, project)
    assert len(predicted) == 2 and all(predicted.values()), predicted

    # Control: the same images through a backend that holds only the (now refused) legacy token
    # get no prediction, so the PAT above is what made the downloads work.
    control = _project_with_protected_images(pat_api, label_studio, "legacy-refused")
    check(pat_api.add_ml_backend(control, backend.url, is_interactive=False), 201)
    pat_api.retrieve_predictions(control)
    predicted = _predicted_tasks(pat_api, control)
    assert len(predicted) == 2 and not any(predicted.values()), predicted
