"""The Docker path as a user starts it: docker/docker-compose.yml, up --build, in a real engine.

`bash scripts/test.sh` runs scripts/docker_stage.py first (engine, base images or their
stand-ins, the backend image built from docker/Dockerfile); this module then plays the README:

* `compose up -d` on the image the stage built (the build half of `up --build`), with the tiny
  random checkpoint copied into the gem-models volume the way docs/DOCKER.md tells an
  air-gapped site (`compose run --rm --no-deps -v ...:/import:ro`);
* through Label Studio's API: a project with the README's labeling config, uploaded images, the
  model connected at http://gem-backend:9090 (the compose network), Retrieve Predictions, and
  every task holds brush, polygon and rectangle results;
* the backend container recreated on the same volume: MODEL_DIR's files are still there, the
  model version is the same, and a second Retrieve Predictions predicts nothing again;
* `docker stop` while the background finisher works through a project, then `docker start`:
  what it had not stored is not held by claims of the stopped process, and one more Retrieve
  Predictions leaves every task with exactly one prediction.

Everything the module creates (containers, network, volumes) is removed at the end. Without an
engine or the images it skips, unless GEM_E2E_REQUIRED=1, where that is a failure.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import TIMINGS
from e2e_support import (REPO_ROOT, LabelStudioAPI, check, e2e_required, encode_png, free_port, metric_value,
                         pattern_image, wait_until)

COMPOSE_FILE = REPO_ROOT / "docker" / "docker-compose.yml"
LS_IMAGE = "heartexlabs/label-studio:1.23.2"
BACKEND_IMAGE = "gem-label-studio-backend:cuda"
RESULT_TYPES = {"brushlabels", "polygonlabels", "rectanglelabels"}
FIRST_TASKS = 3
BACKGROUND_TASKS = 32
START_TIMEOUT_S = float(os.environ.get("GEM_DOCKER_START_TIMEOUT", "300"))
STAGE_COMMAND = "python3 scripts/docker_stage.py prepare"

# Compose resolves ${VAR} from the caller's environment: the runner's own settings must not leak in.
_LEAKY_PREFIXES = ("GEM_", "LABEL_STUDIO_", "BASIC_AUTH_", "ML_", "HF_", "TORCH_", "COMPOSE_")
_LEAKY_NAMES = ("WORKERS", "THREADS", "LOG_LEVEL", "PORT", "HOST", "MODEL_DIR")

TIMES = TIMINGS.docker_steps   # printed in the e2e terminal summary (conftest)


def _unavailable(reason: str) -> None:
    if e2e_required():
        pytest.fail(f"GEM_E2E_REQUIRED is set but {reason}", pytrace=False)
    pytest.skip(reason)


def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def readme_label_config() -> str:
    """The labeling config the README tells users to paste (its first <View> block with BrushLabels)."""
    text = (REPO_ROOT / "README.md").read_text()
    for block in re.findall(r"```xml\n(.*?)```", text, re.S):
        if "<BrushLabels" in block and "<PolygonLabels" in block and "<RectangleLabels" in block:
            return block.strip()
    raise AssertionError("README.md has no ```xml block with Brush-, Polygon- and RectangleLabels")


@dataclass
class Stack:
    compose: list[str]
    project: str
    env: dict[str, str]
    workdir: Path
    ls: LabelStudioAPI
    ls_url: str
    backend_url: str
    email: str

    def run(self, *args: str, timeout: float = 600, check_rc: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE),
                "-f", str(self.workdir / "docker-compose.test.yml"), *args]
        result = subprocess.run(argv, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check_rc and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {result.returncode}\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}")
        return result

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def backend_get(self, path: str, timeout: float = 5) -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False
            return session.get(self.backend_url + path, timeout=timeout)

    def wait_backend(self) -> float:
        started = time.monotonic()

        def ready() -> bool:
            try:
                reply = self.backend_get("/health")
            except requests.RequestException:
                return False
            health = reply.json() if reply.status_code == 200 else {}
            if health.get("model_error"):
                raise AssertionError(f"the backend could not load the model: {health['model_error']}")
            return health.get("model_ready") is True

        if not wait_until(ready, timeout=START_TIMEOUT_S, interval=1.0):
            raise AssertionError(f"backend not ready within {START_TIMEOUT_S:.0f} s\n{self.logs('gem-backend')}")
        return time.monotonic() - started

    def wait_label_studio(self) -> float:
        started = time.monotonic()

        def ready() -> bool:
            try:
                reply = self.ls.get("/api/current-user/whoami", timeout=5)
            except requests.RequestException:
                return False
            return reply.status_code == 200 and reply.json().get("email") == self.email

        if not wait_until(ready, timeout=START_TIMEOUT_S, interval=1.0):
            raise AssertionError(f"Label Studio not ready within {START_TIMEOUT_S:.0f} s\n{self.logs('label-studio')}")
        return time.monotonic() - started

    def logs(self, service: str, tail: int = 60) -> str:
        return self.run("logs", "--no-color", "--tail", str(tail), service, check_rc=False).stdout

    def model_dir(self) -> dict[str, int]:
        """Files under /data/models in the running backend -> size."""
        listing = subprocess.run(["docker", "exec", self.container("gem-backend"), "python", "-c",
                                  "import os, json; print(json.dumps({os.path.relpath(os.path.join(d, f), '/data/models'):"
                                  " os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk('/data/models') for f in fs}))"],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        return json.loads(listing.stdout)


def _timed(name: str):
    class _Timer:
        def __enter__(self):
            self.started = time.monotonic()

        def __exit__(self, *exc):
            TIMES[name] = time.monotonic() - self.started
    return _Timer()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_files) -> Stack:
    compose = _compose_command()
    if compose is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        _unavailable(f"no Docker engine or compose: run `bash scripts/test.sh` as root (it installs and starts "
                     f"them) or `{STAGE_COMMAND}`")
    for image in (LS_IMAGE, BACKEND_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            _unavailable(f"image {image} is missing: run `{STAGE_COMMAND}` (bash scripts/test.sh does)")

    workdir = tmp_path_factory.mktemp("docker-stack")
    # The model files go into the volume through a read-only bind mount, read by the image's uid 10001.
    model_src = workdir / "tiny"
    model_src.mkdir()
    name, config_path, checkpoint_path = tiny_model_files
    for source in (config_path, checkpoint_path):
        shutil.copy(source, model_src / source.name)
        (model_src / source.name).chmod(0o644)
    model_src.chmod(0o755)
    # Only what the tiny random model needs, and what the compose file does not pass through;
    # everything else comes from docker/docker-compose.yml as a user gets it.
    (workdir / "docker-compose.test.yml").write_text(json.dumps({"services": {"gem-backend": {"environment": {
        # Answer Retrieve Predictions after the first batch; the rest goes to the background finisher.
        "GEM_PREDICT_BUDGET": "0.3",
        # A random model's label scores lie close together: threshold each label on its own.
        "GEM_MODE": "independent",
        # Two shared cores: torch's own threads would only fight the other containers for them.
        "OMP_NUM_THREADS": "1",
    }}}}))

    token, password, email = secrets.token_hex(20), secrets.token_urlsafe(12), "docker-e2e@example.com"
    ls_port, backend_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES) and k not in _LEAKY_NAMES}
    env.update({
        "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0",
        "LABEL_STUDIO_PORT": str(ls_port), "GEM_BACKEND_PORT": str(backend_port),
        "LABEL_STUDIO_USERNAME": email, "LABEL_STUDIO_PASSWORD": password, "LABEL_STUDIO_API_KEY": token,
        "ML_TIMEOUT_PREDICT": "60",
        "GEM_MODEL": name, "GEM_MODEL_CONFIG": f"/data/models/tiny/{config_path.name}",
        "GEM_PRETRAINED": f"/data/models/tiny/{checkpoint_path.name}",
        "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "GEM_BATCH_SIZE": "2", "GEM_MIN_SIMILARITY": "0",
        "HF_HUB_OFFLINE": "1",
    })
    stack = Stack(compose=compose, project=f"gem-e2e-{secrets.token_hex(3)}", env=env, workdir=workdir,
                  ls=LabelStudioAPI.with_legacy_token(f"http://127.0.0.1:{ls_port}", token),
                  ls_url=f"http://127.0.0.1:{ls_port}", backend_url=f"http://127.0.0.1:{backend_port}", email=email)
    try:
        with _timed("checkpoint into the gem-models volume (compose run)"):
            stack.run("run", "--rm", "--no-deps", "-v", f"{model_src}:/import:ro", "gem-backend",
                      "sh", "-c", "mkdir -p /data/models/tiny && cp -R /import/. /data/models/tiny/")
        # The README's `up --build`, with the build already done by scripts/docker_stage.py
        # (`docker build` of the same Dockerfile, context and tag): compose's own rebuild would
        # only re-check the cache, which hashes the 6 GB venv again (minutes here).
        with _timed("compose up -d"):
            stack.run("up", "-d", "--no-build")
        with _timed("backend ready (model loaded)"):
            stack.wait_backend()
        with _timed("Label Studio ready (migrations, first start)"):
            stack.wait_label_studio()
        yield stack
    finally:
        with _timed("compose down -v (containers, network, volumes)"):
            stack.run("down", "-v", "--remove-orphans", "-t", "5", check_rc=False, timeout=300)
        for line in _leftovers(stack.project):
            print(f"left behind: {line}")


def _leftovers(project: str) -> list[str]:
    found = []
    for kind in ("container ls -a", "volume ls", "network ls"):
        out = subprocess.run(["docker", *kind.split(), "-q", "--filter", f"label=com.docker.compose.project={project}"],
                             capture_output=True, text=True).stdout.split()
        found += [f"{kind.split()[0]} {x}" for x in out]
    return found


def _project_with_uploads(stack: Stack, title: str, n: int, size: tuple[int, int], seed: int) -> tuple[int, list[int]]:
    ls = stack.ls
    project = ls.create_project(title, readme_label_config())
    for start in range(0, n, 20):   # a few files per request, as the UI's uploader does
        files = {f"file{i}": (f"{i:03d}.png", encode_png(pattern_image(*size, seed=seed + i)), "image/png")
                 for i in range(start, min(n, start + 20))}
        ls.upload_files(project, files)
    ids = [t["id"] for t in ls.tasks(project)]
    assert len(ids) == n, ids
    return project, ids


def _counts(stack: Stack, ids: list[int]) -> dict[int, int]:
    return {t: len(stack.ls.predictions(t)) for t in ids}


def _stored(stack: Stack, project: int) -> int:
    return check(stack.ls.get(f"/api/projects/{project}/"), 200).json().get("total_predictions_number") or 0


def _connect(stack: Stack, project: int) -> dict:
    # The backend's address on the compose network, as docs/DOCKER.md tells users to type it.
    reply = stack.ls.add_ml_backend(project, "http://gem-backend:9090", is_interactive=False)
    return check(reply, 201).json()


def test_compose_stack_predicts_survives_a_restart_and_a_stop(stack: Stack):
    ls = stack.ls
    # -- 1. Retrieve Predictions: every task gets brush, polygon and rectangle results ----------
    project, ids = _project_with_uploads(stack, "docker e2e", FIRST_TASKS, (320, 240), seed=1)
    ml = _connect(stack, project)
    with _timed("Retrieve Predictions, 3 tasks"):
        ls.retrieve_predictions(project)
        counts = wait_until(lambda: (c := _counts(stack, ids)) and all(c.values()) and c, timeout=120, interval=0.5)
    assert counts, f"not every task got a prediction: {_counts(stack, ids)}\n{stack.logs('gem-backend')}"
    assert set(counts.values()) == {1}, counts
    for task in ids:
        prediction = ls.predictions(task)[0]
        types = {item["type"] for item in prediction["result"]}
        assert types == RESULT_TYPES, (task, types)
        assert prediction["model_version"] == ml["model_version"]

    # -- 2. A new backend container on the same volume keeps MODEL_DIR and predicts nothing twice --
    before = stack.model_dir()
    assert "claims.sqlite" in before and f"tiny/{Path(stack.env['GEM_PRETRAINED']).name}" in before, before
    old_container = stack.container("gem-backend")
    with _timed("backend container recreated, ready again"):
        stack.run("up", "-d", "--no-deps", "--force-recreate", "gem-backend")
        stack.wait_backend()
    assert stack.container("gem-backend") != old_container
    after = stack.model_dir()
    assert set(before) <= set(after), f"lost from MODEL_DIR: {set(before) - set(after)}"
    setup = check(ls.get(f"/api/ml/{ml['id']}"), 200).json()
    ls.retrieve_predictions(project)
    metrics = stack.backend_get("/metrics").text
    assert metric_value(metrics, "gem_tasks_total") == 0, "the restarted backend predicted stored tasks again"
    assert set(_counts(stack, ids).values()) == {1}
    assert setup["model_version"] == ml["model_version"]

    # -- 3. docker stop while the background finisher works; start; it all ends exactly once ------
    project2, ids2 = _project_with_uploads(stack, "docker e2e background", BACKGROUND_TASKS, (320, 240), seed=100)
    _connect(stack, project2)
    ls.retrieve_predictions(project2)
    answered = _stored(stack, project2)
    assert answered < BACKGROUND_TASKS, "the budget should have left tasks to the background"
    # Stop as soon as the finisher has stored something of its own.
    begun = wait_until(lambda: _stored(stack, project2) > answered, timeout=120, interval=0.1)
    assert begun, f"the background finisher stored nothing\n{stack.logs('gem-backend')}"
    container = stack.container("gem-backend")
    with _timed("docker stop mid-background"):
        subprocess.run(["docker", "stop", container], check=True, capture_output=True, timeout=120)
    stopped = _counts(stack, ids2)
    stored_at_stop = sum(stopped.values())
    assert max(stopped.values()) == 1, f"duplicates before the stop: {stopped}"
    assert stored_at_stop < BACKGROUND_TASKS, "the finisher was done before the stop: nothing was interrupted"
    exit_code = subprocess.run(["docker", "inspect", "--format", "{{.State.ExitCode}}", container],
                               capture_output=True, text=True).stdout.strip()

    with _timed("docker start, ready again"):
        subprocess.run(["docker", "start", container], check=True, capture_output=True, timeout=120)
        stack.wait_backend()
    # Claims of the stopped process must not hold anything: asking again finishes every task,
    # long before any claim lease (10 min) could have run out.
    with _timed(f"the rest of {BACKGROUND_TASKS} tasks done after the start"):
        ls.retrieve_predictions(project2)
        final = wait_until(lambda: (c := _counts(stack, ids2)) and all(c.values()) and c, timeout=480, interval=2.0)
    assert final, (f"tasks left without a prediction after the restart (claims not handed back?): "
                   f"{[t for t, c in _counts(stack, ids2).items() if not c]}\n{stack.logs('gem-backend', 80)}")
    assert set(final.values()) == {1}, f"duplicates: {[t for t, c in final.items() if c > 1]}"
    for task in ids2[:3] + ids2[-3:]:
        assert {item["type"] for item in ls.predictions(task)[0]["result"]} == RESULT_TYPES
    metrics = stack.backend_get("/metrics").text
    assert metric_value(metrics, "gem_tasks_total") <= BACKGROUND_TASKS - stored_at_stop, \
        "the restarted backend predicted tasks that were already stored"
    # 137: the engine's grace period ran out and the backend was SIGKILLed mid-shutdown
    # (docker-compose.yml's stop_grace_period covers gunicorn's graceful_timeout).
    assert exit_code == "0", f"docker stop ended the backend with exit status {exit_code}"

