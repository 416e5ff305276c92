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
