"""Development server: `python -m backend` (production: gunicorn, see backend/gunicorn.conf.py)."""
from __future__ import annotations

import argparse
import sys

from .settings import Settings, SettingsError, check_model_files, settings_text, startup_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="GEM Label Studio ML backend, development server (Flask, threaded). "
                    "Production: gunicorn -c backend/gunicorn.conf.py backend.wsgi:app",
        epilog="Settings come from these environment variables:\n" + settings_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="overrides HOST")
    parser.add_argument("--port", type=int, help="overrides PORT")
    parser.add_argument("--check", action="store_true",
                        help="validate the settings against this machine (files, precision), print them and exit")
    args = parser.parse_args(argv)
    if args.check:
        from .settings import main as settings_main
        return settings_main(["--check"])

    try:
        settings = Settings.from_env()
        check_model_files(settings)
    except SettingsError as exc:
        print(startup_error(exc), file=sys.stderr)
        return 2
    if args.host:
        settings = settings.replace(host=args.host)
    if args.port:
        settings = settings.replace(port=args.port)

    from .memory import tune_allocator
    from .server import configure_logging, create_app
    tune_allocator()   # before the model allocates anything: see backend/memory.py
    configure_logging(settings.log_level, secrets=(settings.label_studio_api_key, settings.basic_auth_pass,
                                                   settings.webhook_secret))
    app = create_app(settings)
    app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
