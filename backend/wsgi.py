"""WSGI entry point: `gunicorn -c backend/gunicorn.conf.py backend.wsgi:app`.

Each worker imports this after the fork (no preload), so every worker builds its own app and
loads its own copy of the model, which CUDA requires.
"""
from .server import configure_logging, create_app
from .settings import Settings

settings = Settings.from_env()
configure_logging(settings.log_level)
app = create_app(settings)
