"""gunicorn settings, taken from the same environment as the app (see backend/settings.py).

Run: gunicorn -c backend/gunicorn.conf.py backend.wsgi:app
"""
import os
import sys

# gunicorn execs this file before it imports the app; make `backend` importable from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backend.settings import Settings, SettingsError, check_model_files, startup_error  # noqa: E402

try:
    _settings = Settings.from_env()
    # Missing or broken weights stop the start here, with one line and a non-zero exit, instead
    # of a worker that serves /health while its model can never load.
    check_model_files(_settings)
except SettingsError as _exc:
    sys.exit(startup_error(_exc))  # SystemExit passes gunicorn's config loader: message + exit 1

bind = f"{_settings.host}:{_settings.port}"
# One worker per GPU: each worker holds a full model; threads overlap image downloads and
# requests while a per-process lock keeps model calls one at a time.
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# Above Label Studio's predict timeout (ML_TIMEOUT_PREDICT, 100 s) so a long batch is not killed
# mid-way by gunicorn before Label Studio gives up on it.
timeout = _settings.worker_timeout
graceful_timeout = 30
# glibc malloc: each worker applies backend/memory.py's settings (mmap/trim thresholds, 2 arenas)
# when it imports backend.wsgi, unless MALLOC_* are set in the environment (the Docker image sets them).
# Never preload: the model (and CUDA) must be created inside each worker, after the fork.
preload_app = False
loglevel = _settings.log_level.lower()
accesslog = None  # the app logs one structured line per request itself
errorlog = "-"
# gunicorn >= 25 opens a control socket under ~/.gunicorn shared by every instance of the user;
# nothing here uses gunicornc, and several backends on one host must not share it.
control_socket_disable = True
