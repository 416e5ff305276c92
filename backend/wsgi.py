"""WSGI entry point: `gunicorn -c backend/gunicorn.conf.py backend.wsgi:app`.

Each worker imports this after the fork (no preload), so every worker builds its own app and
loads its own copy of the model, which CUDA requires.

The model loads in a background thread. If that fails inside a gunicorn worker, the worker
exits with gunicorn's "app failed to load" code (4): the master then stops every worker and
exits non-zero itself, so a container with weights that cannot load stops with the reason as
its last log lines instead of serving a backend that can only answer 503.
"""
import logging
import os
import sys

from .memory import tune_allocator
from .server import configure_logging, create_app
from .settings import Settings

GUNICORN_APP_LOAD_ERROR = 4   # gunicorn.arbiter.Arbiter.APP_LOAD_ERROR: the master halts on it


def _in_gunicorn_worker() -> bool:
    return any(name.startswith("gunicorn.workers.") for name in sys.modules)


def _stop_worker(message: str) -> None:
    first_line = (message.splitlines() or [""])[0][:300]
    logging.getLogger("backend").critical("stopping: the model cannot load (%s); check GEM_MODEL, "
                                          "GEM_PRETRAINED and GEM_MODEL_CONFIG", first_line)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(GUNICORN_APP_LOAD_ERROR)


# Before the model allocates anything: see backend/memory.py (the Docker image sets the same
# through the environment, which covers the master too).
tune_allocator()
settings = Settings.from_env()
configure_logging(settings.log_level, secrets=(settings.label_studio_api_key, settings.basic_auth_pass,
                                               settings.webhook_secret))
app = create_app(settings, on_load_error=_stop_worker if _in_gunicorn_worker() else None)
