"""Flask app speaking the Label Studio ML backend protocol.

Endpoints: GET /health (and GET /), POST /setup, POST /predict, POST /webhook, GET /versions,
GET /metrics. Label Studio waits 1 s for /health and 3 s for /setup, so neither touches the
model; the model loads in a background thread as soon as the app is created.
"""
from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import re
import sqlite3
import tempfile
import time
import uuid
from types import SimpleNamespace
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .background import LATER_REASONS, BackgroundFinisher, BudgetedBatch
from .claims import ClaimStore
from .label_config import LabelConfigError, parse_label_config, warm_up
from .ls_client import LabelStudioClient, LabelStudioError
from .metrics import BackendMetrics
from .model import (ANNOTATION_EVENTS, TRAINING_EVENTS, GemBackendModel, ModelNotReady, RequestLimitError,
                    check_prompt_limits)
from .settings import Settings

logger = logging.getLogger(__name__)
request_log = logging.getLogger("backend.requests")

# Open even when basic auth is on: liveness probes call /health without credentials, and Label
# Studio sends annotation webhooks without the backend's basic auth. An annotation webhook is only
# a hint (the learner reads the annotation back from Label Studio with the backend's own key);
# START_TRAINING, which runs a rebuild, arrives WITH basic auth and requires it (or the secret).
# With GEM_WEBHOOK_SECRET set, every /webhook call needs the secret or basic auth.
OPEN_ENDPOINTS = frozenset({"health", "index", "webhook"})
WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
WEBHOOK_SECRET_PARAM = "secret"
_LOGGED_TASK_IDS = 50


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


_SECRET_PATTERNS = (
    # Authorization header values: "Basic dTpw", "Bearer <jwt>", "Token <legacy token>"
    (re.compile(r"\b(Basic|Bearer|Token)(\s+)[A-Za-z0-9._~+/=-]{12,}"), r"\1\2<redacted>"),
    # JWTs anywhere (personal access tokens and their access tokens)
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+"), "<redacted-jwt>"),
    # credentials in URLs: scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@"), r"\1<redacted>@"),
    # signed or secret query parameters (X-Amz-Signature, sig, token, secret, key, credential, ...)
    (re.compile(r"([?&][^=&\s\"']*(?:sig|token|secret|key|credential|password|auth)[^=&\s\"']*=)[^&\s\"'#]+",
                re.IGNORECASE), r"\1<redacted>"),
)


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with known secrets and secret-shaped substrings replaced by <redacted>."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "<redacted>")
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """A safety net over the whole formatted line, traceback included: the code never logs a
    token, password or signed query on purpose, and this catches what a library might."""

    def __init__(self, fmt: str, secrets: tuple[str, ...] = ()):
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self.secrets)


def configure_logging(level: str, secrets: tuple[str, ...] = ()) -> None:
    """Plain lines on stderr; per-request lines are JSON so they can be parsed. `secrets` (the
    configured tokens and passwords) are masked in every line, as are secret-shaped strings."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        if handler.formatter is None or isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets))
    root.setLevel(level)
    # urllib3 logs full URLs at DEBUG, presigned query strings included.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLevelName(level)))


def create_app(settings: Settings, model: GemBackendModel | None = None, load: bool = True,
               on_load_error=None) -> Flask:
    """App with its own model and metrics. `load=False` leaves loading to the caller (tests);
    `on_load_error(message)` is called if the model fails to load (backend/wsgi.py exits there)."""
    metrics = BackendMetrics()
    if model is None:
        model = GemBackendModel(settings, metrics=metrics, on_load_error=on_load_error)
    elif model.metrics is None:
        model.metrics = metrics
        if model.ready:
            metrics.model_ready.set(1)
            metrics.model_load_seconds.set(model.load_seconds or 0.0)
    metrics = model.metrics

    _watch_caches(metrics, model)
    claims = _claim_store(settings)
    client, why = _label_studio_client(settings)
    finisher = BackgroundFinisher(lambda: model.pipeline, client, claims, settings.background_queue,
                                  metrics=metrics, unavailable=why, batch_tasks=max(2 * settings.batch_size, 8),
                                  prepare=lambda config, project: model.prepare(None, label_config=config,
                                                                                project=project),
                                  retry_max_s=settings.ls_retry_max, refresh_max_tasks=settings.refresh_max_tasks)
    if model.learning is not None and settings.use_learned:
        # A publication that changes a project's learned version makes its stored predictions stale:
        # refresh the unlabeled ones in the background (docs/LEARNING.md, "Refresh after learning").
        model.learning.learner.on_publish.append(finisher.request_refresh)
    batch = BudgetedBatch(model, finisher, claims, settings.predict_budget, metrics=metrics)
    atexit.register(finisher.close)   # gunicorn worker exit, Ctrl-C: the outbox keeps the rest for the next start
    finisher.resume()                 # what a previous process (killed, restarted) left in the outbox

    app = Flask("backend")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_request_mb * 1024 * 1024)
    app.json.sort_keys = False
    app.extensions["gem"] = SimpleNamespace(settings=settings, model=model, metrics=metrics, finisher=finisher,
                                            claims=claims, batch=batch)

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        g.request_id = _request_id()
        g.log = {}
        if settings.basic_auth_enabled and request.endpoint not in OPEN_ENDPOINTS and not _authorized(settings):
            response = _error_response(401, "basic auth required")
            response.headers["WWW-Authenticate"] = 'Basic realm="gem-backend", charset="UTF-8"'
            return response
        if request.endpoint == "webhook" and settings.webhook_secret and not _webhook_authorized(settings):
            return _error_response(401, f"webhook secret required: add ?{WEBHOOK_SECRET_PARAM}=<GEM_WEBHOOK_SECRET> "
                                        f"to the webhook URL or send the {WEBHOOK_SECRET_HEADER} header")
        if request.endpoint == "webhook" and settings.basic_auth_enabled and _action() in TRAINING_EVENTS \
                and not _webhook_authorized(settings):
            response = _error_response(401, "START_TRAINING relearns the whole project: it needs the backend's basic "
                                            "auth (Label Studio sends it) or the webhook secret")
            response.headers["WWW-Authenticate"] = 'Basic realm="gem-backend", charset="UTF-8"'
            return response
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        seconds = time.perf_counter() - getattr(g, "started", time.perf_counter())
        metrics.requests.inc(endpoint=endpoint, method=request.method, status=str(response.status_code))
        metrics.request_seconds.observe(seconds, endpoint=endpoint)
        if response.status_code >= 400:
            kind = "client" if response.status_code < 500 else "server"
            metrics.errors.inc(endpoint=endpoint, kind=kind)
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        record = {"request_id": getattr(g, "request_id", ""), "method": request.method,
                  "path": request.path, "status": response.status_code, "ms": round(seconds * 1000, 1)}
        record.update(getattr(g, "log", {}))
        if response.status_code >= 500:
            level = logging.WARNING
        elif endpoint in ("/health", "/", "/metrics") and response.status_code == 200:
            level = logging.DEBUG  # polled every few seconds by Label Studio, probes and scrapers
        else:
            level = logging.INFO
        request_log.log(level, json.dumps(record, default=str))
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        getattr(g, "log", {})["error"] = exc.message
        response = _error_response(exc.status, exc.message, **exc.extra)
        if exc.status == 503:
            response.headers["Retry-After"] = "10"
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("request %s failed", getattr(g, "request_id", "?"))
        return _error_response(500, "internal error; see the backend log", request_id=getattr(g, "request_id", ""))

    # -- endpoints ----------------------------------------------------------------------------

    @app.get("/health", endpoint="health")
    @app.get("/", endpoint="index")
    def health() -> Response:
        body = {"status": "UP", "model_class": type(model).__name__, "model_ready": model.ready,
                "model_version": model.model_version}
        if model.load_error:
            # The model will not come: say so with a status probes and Label Studio act on.
            body.update(status="ERROR", model_error=model.load_error, error=f"model failed to load: {model.load_error}")
            response = jsonify(body)
            response.status_code = 503
            return response
        return jsonify(body)

    @app.post("/setup")
    def setup() -> Response:
        body = _json_object()
        project = body.get("project")
        schema = _optional_str(body, "schema")
        hostname = _optional_str(body, "hostname")
        access_token = _optional_str(body, "access_token")
        version = model.setup(project=project, schema=schema, hostname=hostname, access_token=access_token,
                              extra_params=body.get("extra_params"))
        g.log.update(project=project)
        answer: dict[str, Any] = {"model_version": version}
        if schema:
            # Connecting must succeed even before the project has a fitting config; say what is wrong.
            try:
                plan = parse_label_config(schema, settings.outputs)
                check_prompt_limits(list(dict.fromkeys(p for c in plan.controls for label in c.labels
                                                       for p in label.prompts)), settings)
            except (LabelConfigError, RequestLimitError) as exc:
                answer["warning"] = str(exc)
                g.log["warning"] = str(exc)
        return jsonify(answer)

    @app.post("/predict")
    def predict() -> Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise ApiError(400, "'tasks' must be a list of Label Studio tasks")
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise ApiError(400, f"tasks[{i}] must be an object, got {type(task).__name__}")
        label_config = _optional_str(body, "label_config")
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            raise ApiError(400, "'params' must be an object")
        # An empty context object is still a context (an interactive call), so no `or` here.
        context = (params or {}).get("context")
        if context is None:
            context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise ApiError(400, "'params.context' must be an object")
        project = body.get("project")
        ids = [t.get("id") for t in tasks]
        g.log.update(project=project, tasks=len(tasks), task_ids=ids[:_LOGGED_TASK_IDS])
        if not tasks:
            return jsonify({"results": [], "model_version": model.version_for(project)})
        try:
            if context is None:   # Retrieve Predictions / opening a task: stored, so within the time budget
                predictions, report = batch.predict(tasks, label_config=label_config, project=project)
            else:
                predictions, report = model.predict_with_report(tasks, context, label_config=label_config,
                                                                project=project)
        except (LabelConfigError, RequestLimitError) as exc:
            raise ApiError(422, str(exc)) from None
        except ModelNotReady as exc:
            raise ApiError(503, str(exc), model_ready=False) from None
        # Tasks left to the background (or to another worker) are not failures: they are on their way.
        later = sum(1 for o in report.outcomes if not o.ok and o.reason in LATER_REASONS)
        failed = [{"task": o.task_id, "reason": o.reason, "message": o.message} for o in report.outcomes
                  if not o.ok and o.reason not in LATER_REASONS]
        g.log.update(interactive=report.interactive, prompts=len(report.prompts),
                     results=sum(o.results for o in report.outcomes),
                     failed=failed[:_LOGGED_TASK_IDS],
                     timings_ms={k: round(v * 1000, 1) for k, v in report.timings.items()},
                     deferred=len(report.deferred), later=later,
                     outcome="ok" if not failed else ("partial" if len(failed) < len(tasks) else "failed"))
        for prediction in predictions:
            for item in prediction.get("result", ()):
                metrics.regions.inc(type=item["type"])
        # Per project: the base version plus the project's learned state (the same in every entry).
        version = predictions[0].get("model_version") if predictions else model.version_for(project)
        return jsonify({"results": predictions, "model_version": version})

    @app.post("/webhook")
    def webhook() -> Response:
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise ApiError(400, "webhook body needs an 'action' string")
        answer = model.webhook(action, body)
        # /webhook is open, so its label values must come from a fixed set, not from the caller.
        known = action in ANNOTATION_EVENTS or action in TRAINING_EVENTS
        metrics.webhooks.inc(action=action if known else "other", handling=answer["status"])
        g.log.update(action=action, handling=answer["status"])
        return jsonify(answer)

    @app.route("/versions", methods=["GET", "POST"])  # POST: clients of label-studio-ml 1.x
    def versions() -> Response:
        return jsonify({"versions": model.known_versions()})

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), mimetype=None, content_type=BackendMetrics.CONTENT_TYPE)

    for warning in settings.warnings():
        logger.warning("%s", warning)
    # Before the server accepts connections: the first /setup must not import the config parser.
    warm_up()
    if load:
        model.start_loading()
    return app


# -- helpers ------------------------------------------------------------------------------------


def _claim_store(settings: Settings) -> ClaimStore:
    """Task claims shared by this MODEL_DIR's processes (backend/claims.py); a private file if unwritable."""
    try:
        return ClaimStore(os.path.join(settings.model_dir, "claims.sqlite"), lease_s=settings.claim_lease)
    except (OSError, sqlite3.Error) as exc:
        path = os.path.join(tempfile.gettempdir(), f"gem-claims-{os.getpid()}.sqlite")
        logger.warning("MODEL_DIR %s is not writable (%s): task claims are kept in %s, so several workers may "
                       "compute the same task", settings.model_dir, exc, path)
        return ClaimStore(path, lease_s=settings.claim_lease)


def _label_studio_client(settings: Settings) -> tuple[LabelStudioClient | None, str]:
    """The client the background finisher stores predictions with, or (None, why not)."""
    missing = [name for name, value in (("LABEL_STUDIO_URL", settings.label_studio_url),
                                        ("LABEL_STUDIO_API_KEY", settings.label_studio_api_key)) if not value]
    if missing:
        why = (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the backend cannot "
               "store predictions itself")
        logger.info("tasks a /predict has no time for (GEM_PREDICT_BUDGET=%g s) will not be finished in the "
                    "background: %s", settings.predict_budget, why)
        return None, why
    try:
        return LabelStudioClient.from_settings(settings), ""
    except LabelStudioError as exc:
        return None, str(exc)


def _watch_caches(metrics: BackendMetrics, model: GemBackendModel) -> None:
    """Each in-memory cache's bytes and bound on /metrics (read at scrape time; 0 before the model loads)."""
    def predictor():
        pipeline = model.pipeline if model.ready else None
        return getattr(pipeline, "predictor", None)

    def features() -> tuple[int, int]:
        cache = getattr(predictor(), "cache", None)
        return (cache.nbytes, cache.max_bytes) if cache is not None else (0, 0)

    def text() -> tuple[int, int]:
        gem = getattr(predictor(), "model", None)
        return gem.text_cache_bytes() if hasattr(gem, "text_cache_bytes") else (0, 0)

    def learned() -> tuple[int, int]:
        states = getattr(model.learning, "states", None)
        return (states.nbytes, states.max_bytes) if states is not None else (0, 0)

    metrics.watch_cache("features", features)
    metrics.watch_cache("text_embeddings", text)
    metrics.watch_cache("learned_states", learned)


def _request_id() -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given) else uuid.uuid4().hex[:12]


def _authorized(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    # Compare both fields every time so timing does not reveal which one was wrong, and compare
    # digests so it does not reveal their lengths either.
    user_ok = _same(auth.username or "", settings.basic_auth_user)
    pass_ok = _same(auth.password or "", settings.basic_auth_pass)
    return user_ok & pass_ok


def _action() -> Any:
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:   # answered by the endpoint's own parsing
        return None
    return body.get("action") if isinstance(body, dict) else None


def _webhook_authorized(settings: Settings) -> bool:
    given = request.headers.get(WEBHOOK_SECRET_HEADER) or request.args.get(WEBHOOK_SECRET_PARAM) or ""
    if settings.webhook_secret and _same(given, settings.webhook_secret):
        return True
    # START_TRAINING arrives with the backend's basic auth: that is enough as well.
    return settings.basic_auth_enabled and _authorized(settings)


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of two strings (digests first: equal length, any input)."""
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
                               hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest())


def _json_object() -> dict:
    try:
        body = request.get_json(force=True, silent=True)
    except RecursionError:   # absurdly nested JSON: json.loads gives up with RecursionError, not ValueError
        raise ApiError(400, "request body is nested too deeply to be a Label Studio request") from None
    if body is None:
        raise ApiError(400, "request body must be a JSON object (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _optional_str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string")
    return value


def _error_response(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, "status": status, **extra})
    response.status_code = status
    return response
