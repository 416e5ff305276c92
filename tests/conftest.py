import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import TINY_MODEL_NAME, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory):
    """(model_name, config_path, checkpoint_path) of a tiny random open_clip ViT."""
    directory = tmp_path_factory.mktemp("tiny_model")
    config_path, checkpoint_path = write_tiny_model(directory)
    return TINY_MODEL_NAME, config_path, checkpoint_path


@pytest.fixture
def ls():
    """A local HTTP server playing Label Studio (backend_fixtures.LocalServer)."""
    from backend_fixtures import LocalServer

    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def other():
    """A second local HTTP server: a host that is not Label Studio."""
    from backend_fixtures import LocalServer

    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def loopback_only_guard():
    """Fail the test if it tries to connect anywhere but loopback."""
    from bad_inputs import loopback_only

    with loopback_only() as attempts:
        yield
    assert not attempts


@pytest.fixture
def fake_ls():
    """An in-process fake Label Studio API (fake_label_studio.py) with a brush project config."""
    from backend_fixtures import BRUSH_CONFIG
    from fake_label_studio import FakeLabelStudio

    server = FakeLabelStudio(label_config=BRUSH_CONFIG)
    yield server
    server.close()
