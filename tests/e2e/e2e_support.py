"""Processes, HTTP clients and test images for the end-to-end tests.

Nothing here imports the backend: the tests talk to Label Studio and to the backend only over
HTTP, as a deployment does. Label Studio runs from its own virtual environment because it pins
its own Django, numpy and label-studio-sdk.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LOOPBACK = "127.0.0.1"
EXIF_ORIENTATION = 0x0112

# Variables that must not leak from the test runner into Label Studio's interpreter.
_PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


# ---------------------------------------------------------------------------------------
# Finding Label Studio


def find_label_studio() -> Path | None:
    """`label-studio` of $LS_VENV, else of the repository's `.e2e/ls-venv`; None if neither."""
    candidates = []
    if os.environ.get("LS_VENV"):
        candidates.append(Path(os.environ["LS_VENV"]).expanduser().absolute())
    candidates.append(REPO_ROOT / ".e2e" / "ls-venv")
    for venv in candidates:
        executable = venv / "bin" / "label-studio"
        if executable.is_file() and os.access(executable, os.X_OK):
            return executable
    return None


def e2e_required() -> bool:
    return os.environ.get("GEM_E2E_REQUIRED", "").strip().lower() in ("1", "true", "yes", "on")


def find_chromium() -> Path | None:
    """$GEM_CHROMIUM when set (None if it is not an executable), else Debian's `chromium` package."""
    chosen = os.environ.get("GEM_CHROMIUM")
    for candidate in ((chosen,) if chosen else ("/usr/bin/chromium", shutil.which("chromium"))):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def artifacts_dir() -> Path:
    """Where CI keeps what tests leave for people: $GEM_ARTIFACTS_DIR, else <repo>/artifacts."""
    return Path(os.environ.get("GEM_ARTIFACTS_DIR") or REPO_ROOT / "artifacts").expanduser().absolute()


# ---------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A loopback port nobody listens on right now (the caller still verifies who answers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def child_env(extra: Mapping[str, str], drop_python: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if drop_python:
        for name in _PYTHON_ENV:
            env.pop(name, None)
    # A proxy configured for the runner must never see loopback traffic.
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), LOOPBACK, "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ServerFailed(RuntimeError):
    """A server process exited or never became ready; the message carries its log tail."""


@dataclass
class ServerProcess:
    """One server started in its own process group, so stopping it also stops its children."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    url: str
    cwd: Path = REPO_ROOT
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after: float | None = None    # seconds from spawn to ready

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        try:
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        _REGISTRY.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> float:
        """Poll `ready()` until it is true; raise ServerFailed if the process dies or time runs out."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerFailed(f"{self.name} exited with code {self.process.returncode} before it was ready"
                                   f"\n--- {self.log_path} (tail) ---\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if ready():
                    self.ready_after = time.monotonic() - self.started_at
                    return self.ready_after
            time.sleep(0.25)
        raise ServerFailed(f"{self.name} not ready after {timeout:.0f} s"
                           f"\n--- {self.log_path} (tail) ---\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace` seconds."""
        _REGISTRY.discard(self)
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; make sure no child of it survived in the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class _Registry:
    """Every started server, so an interrupted run can still stop them (see conftest)."""

    def __init__(self):
        self._servers: list[ServerProcess] = []
        self._lock = threading.Lock()

    def add(self, server: ServerProcess) -> None:
        with self._lock:
            self._servers.append(server)

    def discard(self, server: ServerProcess) -> None:
        with self._lock:
            if server in self._servers:
                self._servers.remove(server)

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._servers)
        for server in reversed(servers):
            server.stop(grace=5.0)


_REGISTRY = _Registry()
stop_all_servers = _REGISTRY.stop_all


def http_ok(url: str, timeout: float = 2.0, **kwargs: Any) -> bool:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=timeout, **kwargs).status_code == 200


# ---------------------------------------------------------------------------------------
# Label Studio


@dataclass
class LabelStudioAccount:
    email: str
    password: str
    legacy_token: str


class LabelStudioAPI:
    """Thin requests wrapper; `check` turns an unexpected status into an error showing the body."""

    def __init__(self, url: str, authorization: str | None = None):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False
        if authorization:
            self.session.headers["Authorization"] = authorization

    @classmethod
    def with_legacy_token(cls, url: str, token: str) -> "LabelStudioAPI":
        return cls(url, f"Token {token}")

    @classmethod
    def with_personal_token(cls, url: str, refresh_token: str) -> "LabelStudioAPI":
        """Personal access tokens are JWT refresh tokens: exchange for a short-lived access token."""
        with requests.Session() as session:
            session.trust_env = False
            reply = session.post(f"{url}/api/token/refresh/", json={"refresh": refresh_token}, timeout=10)
        check(reply, 200)
        return cls(url, f"Bearer {reply.json()['access']}")

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    # -- calls the tests share ---------------------------------------------------------

    def create_project(self, title: str, label_config: str) -> int:
        reply = check(self.post("/api/projects/", json={"title": title, "label_config": label_config}), 201)
        return reply.json()["id"]

    def upload_files(self, project: int, files: Mapping[str, tuple[str, bytes, str]]) -> dict:
        """files: form field -> (filename, bytes, mime). Distinct field names, one task per file."""
        return check(self.post(f"/api/projects/{project}/import", files=dict(files)), 201).json()

    def import_tasks(self, project: int, data: list[dict]) -> dict:
        return check(self.post(f"/api/projects/{project}/import", json=data), 201).json()

    def tasks(self, project: int) -> list[dict]:
        reply = check(self.get("/api/tasks/", params={"project": project, "page_size": 1000}), 200)
        return sorted(reply.json()["tasks"], key=lambda t: t["id"])

    def task(self, task_id: int) -> dict:
        """Careful: like opening the task in the UI, this makes Label Studio ask the project's ML
        backend for a prediction and store it when the task has none."""
        return check(self.get(f"/api/tasks/{task_id}/"), 200).json()

    def add_local_storage(self, project: int, path: Path) -> dict:
        body = {"project": project, "path": str(path), "title": "e2e local files", "use_blob_urls": True}
        return check(self.post("/api/storages/localfiles/", json=body), 201).json()

    def add_ml_backend(self, project: int, url: str, **fields: Any) -> requests.Response:
        body = {"url": url, "project": project, "title": fields.pop("title", "GEM e2e"),
                "is_interactive": fields.pop("is_interactive", True), **fields}
        return self.post("/api/ml/", json=body)

    def retrieve_predictions(self, project: int) -> dict:
        reply = self.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                          json={"selectedItems": {"all": True, "excluded": []}})
        return check(reply, 200).json()

    def predictions(self, task_id: int) -> list[dict]:
        reply = check(self.get("/api/predictions/", params={"task": task_id}), 200)
        # Filter again: the list must hold this task's predictions only, whatever the filter does.
        return [p for p in reply.json() if p["task"] == task_id]

    def jwt_settings(self, **changes: bool) -> dict:
        if changes:
            return check(self.post("/api/jwt/settings", json=changes), 200).json()
        return check(self.get("/api/jwt/settings"), 200).json()


def check(reply: requests.Response, *expected: int) -> requests.Response:
    if reply.status_code not in expected:
        raise AssertionError(f"{reply.request.method} {reply.url} -> {reply.status_code} "
                             f"(expected {', '.join(map(str, expected))}): {reply.text[:2000]}")
    return reply


def create_personal_access_token(url: str, email: str, password: str) -> str:
    """Log in like a browser and create the user's personal access token (a JWT refresh token).

    GET /user/login/ sets the csrftoken cookie; the form POST answers 302 and sets sessionid;
    POST /api/token/ with the session and X-CSRFToken answers 201 {"token": ...}. A user holds
    one token at a time (a second POST answers 409); GET /api/token/ lists it without signature.
    """
    with requests.Session() as browser:
        browser.trust_env = False
        check(browser.get(f"{url}/user/login/", timeout=30), 200)
        reply = browser.post(f"{url}/user/login/", allow_redirects=False, timeout=30,
                             data={"email": email, "password": password,
                                   "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                             headers={"Referer": f"{url}/user/login/"})
        check(reply, 302)
        assert "sessionid" in browser.cookies, "login set no session cookie"
        reply = browser.post(f"{url}/api/token/", json={}, timeout=30,
                             headers={"X-CSRFToken": browser.cookies["csrftoken"], "Referer": f"{url}/"})
        return check(reply, 201).json()["token"]


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------------------------------
# A plain web server for http:// task images


class StaticFiles:
    """Serves a directory on 127.0.0.1 from a thread of the test process."""

    def __init__(self, root: Path):
        self.root = Path(root)
        handler = partial(_QuietHandler, directory=str(self.root))
        self.server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="e2e-static", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def __enter__(self) -> "StaticFiles":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


class RecordingProxy:
    """A loopback HTTP proxy in front of the backend that keeps every request Label Studio sends.

    Label Studio is connected to `url`; each call is forwarded unchanged to `target` and kept
    as an `Exchange` (method, path, JSON body, status, JSON answer), so a test can assert what
    the labeling UI made Label Studio send, and when.
    """

    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((LOOPBACK, 0), partial(_ProxyHandler, self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="e2e-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def __enter__(self) -> "RecordingProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, exchange: "Exchange") -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def calls(self, path: str = "/predict") -> list["Exchange"]:
        with self._lock:
            return [e for e in self.exchanges if e.path.split("?", 1)[0] == path]


@dataclass
class Exchange:
    method: str
    path: str
    body: Any            # parsed JSON, or None
    status: int
    answer: Any          # parsed JSON, or None
    at: float            # time.monotonic() when the request arrived
    seconds: float       # until the backend answered


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length",
                   "proxy-connection", "te", "trailer", "upgrade", "content-encoding"}

    def __init__(self, proxy: RecordingProxy, *args: Any, **kwargs: Any):
        self.proxy = proxy
        super().__init__(*args, **kwargs)

    def _forward(self) -> None:
        started = time.monotonic()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP_BY_HOP}
        with requests.Session() as session:
            session.trust_env = False
            try:
                reply = session.request(self.command, self.proxy.target + self.path, data=raw or None,
                                        headers=headers, timeout=300)
                status, content = reply.status_code, reply.content
                content_type = reply.headers.get("Content-Type", "application/json")
            except requests.RequestException as exc:
                status, content, content_type = 502, str(exc).encode(), "text/plain"
        self.proxy.record(Exchange(method=self.command, path=self.path, body=_json_or_none(raw), status=status,
                                   answer=_json_or_none(content), at=started,
                                   seconds=time.monotonic() - started))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# Test images: strong, deterministic structure so even a random model yields regions.


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    """A bright disc on a dark ground next to a stripe block: large areas with sharp edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[...] = rng.integers(0, 60, size=3)
    cx, cy, r = width * 0.3, height * 0.5, min(width, height) * 0.28
    rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(180, 256, size=3)
    stripes = (xx > width * 0.6) & (((xx // 4) % 2) == 0)
    rgb[stripes] = rng.integers(120, 256, size=3)
    return Image.fromarray(rgb, "RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def encode_jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG of `image` as stored pixels plus an EXIF Orientation tag viewers must apply."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@dataclass
class Timings:
    """What the terminal summary prints."""

    started: float | None = None            # time.monotonic() when the first e2e fixture ran
    label_studio_start: float | None = None
    backend_starts: dict[str, float] = field(default_factory=dict)
    backend_command: str = ""
    browser_start: float | None = None      # Chromium launch, seconds
    browser_tests: dict[str, float] = field(default_factory=dict)   # browser test -> seconds
    docker_steps: dict[str, float] = field(default_factory=dict)    # test_docker_stack step -> seconds


# ---------------------------------------------------------------------------------------
# Projects and results


LABELS = ("disc", "stripes")


def labeling_config(labels: tuple[str, ...] = LABELS) -> str:
    """Brush, Polygon and Rectangle controls on one image, plus the free-text prompt box."""
    label_tags = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        '<View>'
        '<Image name="image" value="$image"/>'
        f'<BrushLabels name="brush" toName="image">{label_tags}</BrushLabels>'
        f'<PolygonLabels name="poly" toName="image">{label_tags}</PolygonLabels>'
        f'<RectangleLabels name="rect" toName="image">{label_tags}</RectangleLabels>'
        '<TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" '
        'showSubmitButton="true"/>'
        '</View>'
    )


# from_name -> result type, as in labeling_config()
CONTROL_TYPES = {"brush": "brushlabels", "poly": "polygonlabels", "rect": "rectanglelabels"}


def without_ids(result: list[dict]) -> list[dict]:
    """Result items minus their random region ids, in a stable order, for comparisons."""
    items = [{k: v for k, v in item.items() if k != "id"} for item in result]
    return sorted(items, key=lambda item: repr(sorted(item.items())))


def brush_masks(result: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(label, bool mask [H, W]) for every brush item, decoded with Label Studio's own converter."""
    from label_studio_sdk.converter.brush import decode_rle

    masks = []
    for item in result:
        if item.get("type") != "brushlabels":
            continue
        width, height = item["original_width"], item["original_height"]
        flat = np.asarray(decode_rle(item["value"]["rle"]), dtype=np.uint8)
        assert flat.size == width * height * 4, (
            f"brush RLE decodes to {flat.size} bytes, expected {width}x{height}x4 = {width * height * 4}")
        # RGBA layout; the alpha channel carries the mask.
        masks.append((item["value"]["brushlabels"][0], flat.reshape(height, width, 4)[:, :, 3] > 0))
    return sorted(masks, key=lambda pair: (pair[0], pair[1].tobytes()))


def local_files_project(ls: "LabelStudioAPI", label_studio: Any, name: str, label_config: str, n: int,
                        size: tuple[int, int] = (640, 480), seed: int = 100) -> tuple[int, list[int]]:
    """A project of `n` generated PNGs in Label Studio's local-files storage (folder `name`):
    (project id, task ids in order)."""
    project = ls.create_project(f"e2e {name}", label_config)
    folder = label_studio.local_files_root / name
    folder.mkdir()
    for i in range(n):
        pattern_image(*size, seed=seed + i).save(folder / f"{i:03d}.png")
    ls.add_local_storage(project, folder)
    ls.import_tasks(project, [{"image": f"/data/local-files/?d={name}/{i:03d}.png"} for i in range(n)])
    ids = [t["id"] for t in ls.tasks(project)]
    assert len(ids) == n
    return project, ids


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus text-format series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        found = dict(pair.split("=", 1) for pair in label_text.rstrip("}").split(",") if "=" in pair)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll until `condition()` is truthy; return its value, or the last falsy one on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
