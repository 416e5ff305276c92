"""End-to-end fixtures: a real Label Studio and our backend, each in its own process group.

Label Studio (from its own venv, see find_label_studio) starts once per session on a free
loopback port with a fresh data dir; a fresh start costs 30-120 s, so every fixture
that owns a server is session-scoped and the main backend boots while Label Studio migrates.
Servers are stopped by process group on teardown, on Ctrl-C, on SIGTERM and at interpreter exit.

Without Label Studio the tests skip, unless GEM_E2E_REQUIRED=1 (CI), where that is a failure.
"""
from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_support import (  # noqa: E402
    LOOPBACK, LS_VERSION, REPO_ROOT, LabelStudioAccount, LabelStudioAPI, ServerFailed, ServerProcess,
    StaticFiles, Timings, artifacts_dir, basic_auth_header, child_env, create_personal_access_token,
    e2e_required, find_chromium, find_label_studio, free_port, http_ok, stop_all_servers)

LS_START_TIMEOUT_S = float(os.environ.get("GEM_E2E_LS_TIMEOUT", "240"))
BACKEND_START_TIMEOUT_S = 120.0

# The tiny random model's cosine similarities on the test images span about -0.5..0.7 with every
# map's peak above 0.19, so the default floor GEM_MIN_SIMILARITY=0.2 (meant for real CLIP weights)
# could leave an image without regions. A floor of 0 keeps regions on every test image while the
# relative threshold still cuts real shapes (a floor below a map's minimum would make
# single-prompt masks cover the whole image). Read by backend/settings.py (RegionConfig fields).
TINY_MODEL_ENV = {
    "GEM_DEVICE": "cpu",
    "GEM_IMAGE_SIZE": "64",
    "GEM_MIN_SIMILARITY": "0",
    # The local web server that serves http-URL tasks is on loopback, which the SSRF guard
    # refuses unless allow-listed (Label Studio's own host is allowed automatically).
    "GEM_ALLOWED_HOSTS": "127.0.0.1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "LOG_LEVEL": "INFO",
    # Below the session's ML_TIMEOUT_PREDICT (see _label_studio_process), as in production.
    "GEM_PREDICT_BUDGET": "20",
}

# Label Studio gives up on a /predict after this many seconds (its default is 100); lowered so the
# whole-project test (test_e2e_whole_project.py) sees the time budget at work without waiting minutes.
LS_ML_TIMEOUT_PREDICT_S = 30

TIMINGS = Timings()
_SERVERS: list[ServerProcess] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs a real Label Studio server (tests/e2e)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


# ---------------------------------------------------------------------------------------
# Interruption safety: whatever happens, the servers die with the test run.


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then runs fixture teardown


atexit.register(stop_all_servers)


@pytest.fixture(scope="session")
def _stop_on_sigterm():
    TIMINGS.started = time.monotonic()   # the first e2e fixture: the suite's clock starts here
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# Label Studio


@dataclass
class LabelStudio:
    url: str
    account: LabelStudioAccount
    api: LabelStudioAPI                 # authenticated with the legacy token
    local_files_root: Path              # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    process: ServerProcess


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def label_studio_executable() -> Path:
    executable = find_label_studio()
    if executable is None:
        reason = (f"no Label Studio {LS_VERSION} venv: set LS_VENV=<venv with label-studio=={LS_VERSION}> "
                  "or run scripts/e2e.sh (installs it into .e2e/ls-venv)")
        if e2e_required():
            pytest.fail(f"GEM_E2E_REQUIRED is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="session")
def _label_studio_process(label_studio_executable, e2e_dir, _stop_on_sigterm):
    """Spawned, not yet ready: the backend can boot while Label Studio runs its migrations."""
    port = free_port()
    data_dir = e2e_dir / "ls-data"
    files_root = e2e_dir / "ls-files"
    data_dir.mkdir()
    files_root.mkdir()
    account = LabelStudioAccount(email="e2e@example.com", password=secrets.token_urlsafe(12),
                                 legacy_token=secrets.token_hex(20))
    env = child_env({
        "LABEL_STUDIO_BASE_DATA_DIR": data_dir,
        "LABEL_STUDIO_USERNAME": account.email,
        "LABEL_STUDIO_PASSWORD": account.password,
        "LABEL_STUDIO_USER_TOKEN": account.legacy_token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Our backend listens on 127.0.0.1: without these two, LS answers 403 to connecting it.
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # LS reports server errors to Sentry by default; a test run must not call out.
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": files_root,
        "ML_TIMEOUT_PREDICT": str(LS_ML_TIMEOUT_PREDICT_S),
    }, drop_python=True)
    url = f"http://{LOOPBACK}:{port}"
    process = ServerProcess(
        name="Label Studio", env=env, url=url, log_path=e2e_dir / "logs" / "label-studio.log", cwd=e2e_dir,
        argv=[str(label_studio_executable), "start", "--no-browser", "--internal-host", LOOPBACK,
              "--port", str(port)])
    _SERVERS.append(process)
    process.start()
    try:
        yield process, account, files_root
    finally:
        process.stop()


@pytest.fixture(scope="session")
def label_studio(_label_studio_process, backend) -> LabelStudio:
    """A ready Label Studio. Depends on `backend` only so both boot in parallel."""
    process, account, files_root = _label_studio_process
    api = LabelStudioAPI.with_legacy_token(process.url, account.legacy_token)

    def ready() -> bool:
        # LS silently moves to the next port when its port is taken: make sure the server that
        # answers is ours by asking it who owns our freshly generated token.
        if not http_ok(f"{process.url}/health/"):
            return False
        me = api.get("/api/current-user/whoami", timeout=5)
        if me.status_code != 200:
            return False  # a stranger refuses our token: wait_ready times out with LS's log
        if me.json().get("email") == account.email:
            return True
        raise ServerFailed(f"another server answers on {process.url}: {me.text[:200]}")

    try:
        TIMINGS.label_studio_start = process.wait_ready(ready, LS_START_TIMEOUT_S)
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    return LabelStudio(url=process.url, account=account, api=api, local_files_root=files_root,
                       process=process)


@pytest.fixture(scope="session")
def ls(label_studio) -> LabelStudioAPI:
    """Label Studio API client (legacy token)."""
    return label_studio.api


@pytest.fixture(scope="session")
def personal_access_token(label_studio) -> str:
    return create_personal_access_token(label_studio.url, label_studio.account.email,
                                        label_studio.account.password)


# ---------------------------------------------------------------------------------------
# Backend


@dataclass
class Backend:
    name: str
    url: str
    process: ServerProcess
    model_dir: Path
    auth: tuple[str, str] | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False
            if self.auth:
                session.headers["Authorization"] = basic_auth_header(*self.auth)
            kwargs.setdefault("timeout", 120)
            return session.request(method, self.url + path, **kwargs)

    def predict(self, tasks: list[dict], label_config: str, project: int | str, context: Any = None
                ) -> list[dict]:
        """The backend's own answer, asked directly with the body shape Label Studio sends."""
        body = {"tasks": tasks, "project": str(project), "label_config": label_config,
                "params": {"login": None, "password": None, "context": context}}
        reply = self.request("POST", "/predict", json=body)
        assert reply.status_code == 200, f"/predict -> {reply.status_code}: {reply.text[:2000]}"
        return reply.json()["results"]

    def metrics(self) -> str:
        reply = self.request("GET", "/metrics")
        assert reply.status_code == 200, f"/metrics -> {reply.status_code}: {reply.text[:500]}"
        return reply.text


def backend_command() -> list[str]:
    """Production command (gunicorn) when the backend ships its config, else the dev server."""
    if (REPO_ROOT / "backend" / "gunicorn.conf.py").is_file() and (REPO_ROOT / "backend" / "wsgi.py").is_file():
        return [sys.executable, "-m", "gunicorn", "-c", "backend/gunicorn.conf.py", "backend.wsgi:app"]
    return [sys.executable, "-m", "backend"]


@pytest.fixture(scope="session")
def start_backend(tiny_model_files, e2e_dir, _label_studio_process) -> Callable[..., Backend]:
    """start_backend(name, **env) -> a ready Backend with the tiny random model; stopped at session end."""
    model_name, config_path, checkpoint_path = tiny_model_files
    ls_process = _label_studio_process[0]
    started: list[Backend] = []

    def start(name: str, wait: bool = True, **env: str) -> Backend:
        if not (REPO_ROOT / "backend" / "__main__.py").is_file() and not (REPO_ROOT / "backend" / "wsgi.py").is_file():
            pytest.fail("backend/ has neither __main__.py nor wsgi.py: nothing to start", pytrace=False)
        port = free_port()
        settings = {
            "GEM_MODEL": model_name,
            "GEM_MODEL_CONFIG": str(config_path),
            "GEM_PRETRAINED": str(checkpoint_path),
            **TINY_MODEL_ENV,
            "HOST": LOOPBACK,
            "PORT": str(port),
            "LABEL_STUDIO_URL": ls_process.url,
            "MODEL_DIR": str(e2e_dir / f"model-{name}"),
            **env,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        argv = backend_command()
        TIMINGS.backend_command = " ".join(a if a != sys.executable else "python" for a in argv)
        process = ServerProcess(name=f"backend {name}", argv=argv, url=f"http://{LOOPBACK}:{port}",
                                log_path=e2e_dir / "logs" / f"backend-{name}.log",
                                env=child_env(settings))
        _SERVERS.append(process)
        process.start()
        auth = (env["BASIC_AUTH_USER"], env["BASIC_AUTH_PASS"]) if env.get("BASIC_AUTH_USER") else None
        backend = Backend(name=name, url=process.url, process=process, model_dir=Path(settings["MODEL_DIR"]),
                          auth=auth)
        started.append(backend)
        if wait:
            wait_for_backend(backend)
        return backend

    try:
        yield start
    finally:
        for backend in reversed(started):
            backend.process.stop()


def wait_for_backend(backend: Backend) -> None:
    def ready() -> bool:
        # The model loads in the background after the server listens; wait for it so that
        # /setup and /predict timings do not depend on the load.
        reply = backend.request("GET", "/health", timeout=2)
        if reply.status_code != 200:
            return False
        health = reply.json()
        if health.get("model_error"):
            raise ServerFailed(f"backend {backend.name}: model failed to load: {health['model_error']}")
        return health.get("model_ready", True) is True

    try:
        TIMINGS.backend_starts[backend.name] = backend.process.wait_ready(ready, BACKEND_START_TIMEOUT_S)
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def backend(start_backend, _label_studio_process) -> Backend:
    """The main backend: no basic auth, Label Studio's legacy token from its environment."""
    account = _label_studio_process[1]
    return start_backend("main", LABEL_STUDIO_API_KEY=account.legacy_token)


# ---------------------------------------------------------------------------------------
# Other fixtures


@pytest.fixture(scope="session")
def web_server(e2e_dir):
    """Plain http:// images on 127.0.0.1 (files go into .root)."""
    root = e2e_dir / "web"
    root.mkdir()
    with StaticFiles(root) as server:
        yield server


# ---------------------------------------------------------------------------------------
# Browser: headless Chromium from Debian's `chromium` package, driven by Playwright


@pytest.fixture(scope="session")
def chromium(_stop_on_sigterm):
    """A headless Chromium (Playwright `Browser`); skipped without one, failed under GEM_E2E_REQUIRED."""
    executable = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing = f"Playwright for Python is not installed ({exc}): pip install -r requirements-dev.txt"
    else:
        missing = None if executable else ("no Chromium (GEM_CHROMIUM, /usr/bin/chromium): apt-get install chromium (Debian), "
                                           "or set GEM_CHROMIUM=<path to a chromium binary>")
    if missing:
        if e2e_required():
            pytest.fail(f"GEM_E2E_REQUIRED is set but {missing}", pytrace=False)
        pytest.skip(missing)
    started = time.monotonic()
    with sync_playwright() as playwright:
        # Playwright's own browser download is not used: the system's Chromium, sandbox off
        # (containers run as root) and /dev/shm left alone (small in containers).
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        TIMINGS.browser_start = time.monotonic() - started
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def browser_artifacts() -> Path:
    """Screenshots and recorded calls of the browser tests (CI keeps this folder)."""
    directory = artifacts_dir() / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def browser_timing(request):
    """Times a browser test, for the terminal summary."""
    started = time.monotonic()
    yield
    TIMINGS.browser_tests[request.node.name] = time.monotonic() - started


# ---------------------------------------------------------------------------------------
# Reporting


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _SERVERS and TIMINGS.label_studio_start is None and not TIMINGS.docker_steps:
        return
    write = terminalreporter.write_line
    terminalreporter.section("GEM end-to-end")
    for step, seconds in TIMINGS.docker_steps.items():
        write(f"docker stack: {step}: {seconds:.1f} s")
    if TIMINGS.label_studio_start is not None:
        write(f"Label Studio {LS_VERSION} ready after {TIMINGS.label_studio_start:.1f} s (fresh data dir)")
    for name, seconds in TIMINGS.backend_starts.items():
        write(f"backend '{name}' ready after {seconds:.1f} s  ({TIMINGS.backend_command})")
    if TIMINGS.browser_start is not None:
        write(f"Chromium started in {TIMINGS.browser_start:.1f} s ({find_chromium()}, headless, Playwright)")
    if TIMINGS.browser_tests:
        total = sum(TIMINGS.browser_tests.values())
        write(f"browser tests took {total:.1f} s: " + ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in TIMINGS.browser_tests.items())
            + f"; screenshots in {artifacts_dir() / 'browser'}")
    if TIMINGS.started is not None:
        write(f"e2e suite took {time.monotonic() - TIMINGS.started:.1f} s (servers spawned to stopped)")
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if failed:
        for server in _SERVERS:
            write(f"--- {server.name}: {server.log_path} (last 30 lines) ---")
            for line in server.log_tail(30).splitlines():
                write(line)
