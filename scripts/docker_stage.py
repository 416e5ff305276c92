#!/usr/bin/env python3
"""The Docker stage of `bash scripts/test.sh`: an engine, the base images, the backend image.

    python3 scripts/docker_stage.py prepare   # engine up, bases present, backend image built
    python3 scripts/docker_stage.py stop      # stops the dockerd that `prepare` started, if any

`prepare` uses a running Docker engine when there is one and otherwise starts `dockerd` (root
only); it remembers that in STATE_DIR so that `stop` ends only what it started. The images the
compose file names are pulled when a registry answers. Where none does (these machines), they
are stood in for, once, and kept by the engine between runs:

* python:3.11.14-slim-bookworm: `debootstrap --variant=minbase bookworm` with Debian's
  python3 and python3-venv, `docker import`ed. It trusts this machine's local certificate
  authorities and carries this machine's pip configuration (indexes, find-links, constraints,
  certificate, timeout), with every local folder that configuration names served over HTTP on
  the docker0 gateway while images build, so pip inside a build resolves what pip here does.
* heartexlabs/label-studio:1.23.2: label-studio==1.23.2 from that index on that base, with the
  real image's data path (/label-studio/data), user (uid 999), working directory, entrypoint
  path and command (`label-studio`); tests/e2e/docker/label-studio/Dockerfile.

Then docker/Dockerfile is built as it is, tagged as docker/docker-compose.yml names it. The
engine's layer cache (/var/lib/docker) keeps every layer, so a second run rebuilds nothing.
Each step prints its time. Exit status: 0 ready, 3 no engine can be had (the caller skips the
Docker tests or, under GEM_E2E_REQUIRED=1, fails), 1 anything else.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse, unquote

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("GEM_DOCKER_STATE_DIR", "/tmp/gem-docker-stage"))
PYTHON_IMAGE = "python:3.11.14-slim-bookworm"
LS_IMAGE = "heartexlabs/label-studio:1.23.2"
BACKEND_IMAGE = "gem-label-studio-backend:cuda"      # docker-compose.yml with TORCH_VARIANT unset
LS_STANDIN_DIR = ROOT / "tests" / "e2e" / "docker" / "label-studio"
STANDIN_LABEL = "gem.e2e.stand-in"                  # its value: what the stand-in was built from
# The gateway address of Docker's default bridge, where build containers find the package server.
INDEX_HOST = os.environ.get("GEM_DOCKER_INDEX_HOST", "172.17.0.1")
INDEX_PORT = int(os.environ.get("GEM_DOCKER_INDEX_PORT", "18741"))
DEBIAN_MIRROR = os.environ.get("GEM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_DIR = Path("/usr/local/share/ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# A cold backend build (torch with its CUDA libraries, ~6.6 GB) took 257 s on a quiet machine.
BUILD_TIMEOUT_S = float(os.environ.get("GEM_DOCKER_BUILD_TIMEOUT", "2400"))
NO_ENGINE = 3


def log(message: str) -> None:
    print(f"[docker stage] {message}", flush=True)


@contextlib.contextmanager
def timed(step: str):
    started = time.monotonic()
    log(f"{step} ...")
    try:
        yield
    finally:
        log(f"{step}: {time.monotonic() - started:.1f} s")


def run(argv: list[str], timeout: float | None = None, check: bool = True, quiet: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}   # the classic builder: build steps on the default bridge
    if quiet:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
    result = subprocess.run(argv, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if quiet else ""
        raise SystemExit(f"[docker stage] failed ({result.returncode}): {' '.join(argv)}\n{detail}")
    return result


def engine_up() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


# ---------------------------------------------------------------------------------------------
# The engine


def start_engine() -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    pid_file = STATE_DIR / "dockerd.pid"
    if engine_up():
        log("a Docker engine is running: using it (and leaving it running)")
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or shutil.which("docker") is None or os.geteuid() != 0:
        log("no Docker engine: needs root and `apt-get install docker.io debootstrap docker-compose`")
        raise SystemExit(NO_ENGINE)
    logfile = open(STATE_DIR / "dockerd.log", "ab")
    process = subprocess.Popen([dockerd], stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"[docker stage] dockerd exited ({process.returncode}); see {STATE_DIR}/dockerd.log")
        if engine_up():
            log(f"started dockerd (pid {process.pid}; stopped again at the end of the run)")
            return
        time.sleep(0.5)
    raise SystemExit(f"[docker stage] dockerd did not answer within 60 s; see {STATE_DIR}/dockerd.log")


def stop_engine() -> None:
    pid_file = STATE_DIR / "dockerd.pid"
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return                                   # already gone
    if not cmdline.endswith(b"dockerd"):
        return                                   # the pid was reused by something else
    running = subprocess.run(["docker", "ps", "-q"], capture_output=True, text=True).stdout.split()
    if running:
        # Another run (or a user) started containers on this engine meanwhile: leave it to them.
        log(f"leaving dockerd (pid {pid}) running: {len(running)} container(s) still run on it")
        return
    os.kill(pid, 15)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    log(f"stopped the dockerd this run started (pid {pid})")


# ---------------------------------------------------------------------------------------------
# pip as configured on this machine, reproduced inside a build


def pip_settings(python: str) -> dict[str, str]:
    """The effective pip options here: environment (PIP_*) over configuration files."""
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    from_env, from_files = {}, {}
    for line in listing.splitlines():
        scoped, _, value = line.partition("=")
        scope, _, key = scoped.rpartition(".")
        value = value.strip().strip("'\"")
        (from_env if scope == ":env:" else from_files)[key] = value
    return {**from_files, **from_env}


class LocalIndexes:
    """Maps the local folders pip reads (file:// indexes, find-links folders) to HTTP URLs."""

    def __init__(self) -> None:
        self.folders: dict[str, Path] = {}

    def url_for(self, location: str) -> str | None:
        parsed = urlparse(location)
        if parsed.scheme in ("http", "https"):
            return location
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else location)
        if not path.exists():
            return None
        # An index's parent is served too (/opt/pypi for /opt/pypi/simple), so that its relative
        # links (simple/<name>/ -> ../../files/x.whl) resolve as they do on disk.
        top = path.parent if path.name == "simple" else path
        name = f"{len(self.folders)}-{top.name}"
        for existing, folder in self.folders.items():
            if folder == top:
                name = existing
        self.folders[name] = top
        rest = path.relative_to(top).as_posix()
        return f"http://{INDEX_HOST}:{INDEX_PORT}/{name}/" + ("" if rest == "." else rest + "/")


def standin_pip_conf(settings: dict[str, str], indexes: LocalIndexes) -> tuple[str, str]:
    """(pip.conf for the image, constraints file text) reproducing `settings`."""
    lines = ["[global]"]
    hosts = {f"{INDEX_HOST}:{INDEX_PORT}"}
    for key in ("index-url", "extra-index-url", "find-links"):
        if not settings.get(key):
            continue
        urls = [u for u in (indexes.url_for(v) for v in settings[key].split()) if u]
        if urls:
            lines.append(f"{key} = " + " ".join(urls))
        hosts.update(urlparse(u).netloc for u in urls if u.startswith("http://"))
    lines.append("trusted-host = " + " ".join(sorted(hosts)))
    for key in ("default-timeout", "timeout", "retries"):
        if settings.get(key):
            lines.append(f"{key} = {settings[key]}")
    constraints = ""
    if settings.get("constraint") and Path(settings["constraint"]).is_file():
        constraints = Path(settings["constraint"]).read_text()
        lines.append("constraint = /etc/pip-constraints.txt")
    lines.append(f"cert = {CA_BUNDLE}")
    return "\n".join(lines) + "\n", constraints


class IndexServer:
    """Serves LocalIndexes' folders read-only on the docker0 gateway while images build."""

    def __init__(self, indexes: LocalIndexes) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gem-index-"))
        for name, folder in indexes.folders.items():
            (self.root / name).symlink_to(folder)
        handler = functools.partial(_QuietHandler, directory=str(self.root))
        self.server = http.server.ThreadingHTTPServer((INDEX_HOST, INDEX_PORT), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "IndexServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


# ---------------------------------------------------------------------------------------------
# Images


def image_label(image: str, label: str) -> str | None:
    """The label's value; "" when the image has no such label; None when there is no image."""
    result = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout.strip() or "null") or {}).get(label, "")


def image_id(image: str) -> str:
    return run(["docker", "image", "inspect", "--format", "{{.Id}}", image], quiet=True).stdout.strip()


def pull(image: str) -> bool:
    result = run(["docker", "pull", "-q", image], timeout=900, check=False, quiet=True)
    if result.returncode == 0:
        log(f"pulled {image}")
        return True
    log(f"cannot pull {image}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '?'}")
    return False


def need_image(image: str, fingerprint: str) -> bool:
    """True when `image` must be (re)built as a stand-in for this fingerprint."""
    label = image_label(image, STANDIN_LABEL)
    if label == fingerprint:
        log(f"{image}: stand-in present (cached)")
        return False
    if label == "":
        log(f"{image}: present")
        return False
    return not pull(image)


def python_fingerprint(pip_conf: str, constraints: str) -> str:
    digest = hashlib.sha256(b"python-standin-v1\0" + pip_conf.encode() + b"\0" + constraints.encode())
    for crt in sorted(CA_DIR.glob("*.crt")):
        digest.update(crt.read_bytes())
    return digest.hexdigest()[:16]


def build_python_standin(fingerprint: str, pip_conf: str, constraints: str) -> None:
    if shutil.which("debootstrap") is None:
        raise SystemExit("[docker stage] debootstrap is missing: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="gem-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        with timed(f"debootstrap --variant=minbase bookworm (stand-in for {PYTHON_IMAGE})"):
            run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python-is-python3,ca-certificates",
                 "bookworm", str(rootfs), DEBIAN_MIRROR], quiet=True, timeout=900)
        target = rootfs / CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for crt in CA_DIR.glob("*.crt"):
            shutil.copy(crt, target / crt.name)
        run(["chroot", str(rootfs), "update-ca-certificates"], quiet=True)
        (rootfs / "etc" / "pip.conf").write_text(pip_conf)
        if constraints:
            (rootfs / "etc" / "pip-constraints.txt").write_text(constraints)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            f"ENV SSL_CERT_FILE={CA_BUNDLE}",
            f"ENV REQUESTS_CA_BUNDLE={CA_BUNDLE}",
            f"ENV PIP_CERT={CA_BUNDLE}",
            f"LABEL {STANDIN_LABEL}={fingerprint}",
            'CMD ["python3"]',
        ]
        with timed(f"docker import -> {PYTHON_IMAGE}"):
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            argv = ["docker", "import"] + [a for c in changes for a in ("--change", c)] + ["-", PYTHON_IMAGE]
            run(argv, stdin=tar.stdout, quiet=True)
            tar.wait()


def build_ls_standin(python_id: str) -> None:
    fingerprint = hashlib.sha256(b"ls-standin-v1\0" + python_id.encode() + b"".join(
        p.read_bytes() for p in sorted(LS_STANDIN_DIR.iterdir()))).hexdigest()[:16]
    if not need_image(LS_IMAGE, fingerprint):
        return
    with timed(f"build the stand-in {LS_IMAGE} (label-studio==1.23.2 from the package index)"):
        run(["docker", "build", "-q", "--build-arg", f"BASE={PYTHON_IMAGE}", "--label",
             f"{STANDIN_LABEL}={fingerprint}", "-t", LS_IMAGE, str(LS_STANDIN_DIR)], timeout=BUILD_TIMEOUT_S)


# What docker/Dockerfile copies (.dockerignore's allowlist) and what shapes the build.
CONTEXT = ("requirements.txt", "backend", "gem_model", "docker/healthcheck.py", "docker/Dockerfile", ".dockerignore")
CONTEXT_EXCLUDED = ("__pycache__", ".pyc", ".pyo", ".pyd", ".pt", ".pth", ".bin", ".safetensors")
CONTEXT_LABEL = "gem.e2e.build-inputs"


def backend_inputs() -> str:
    digest = hashlib.sha256(image_id(PYTHON_IMAGE).encode())
    for entry in CONTEXT:
        path = ROOT / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if any(part == "__pycache__" for part in file.parts) or relative.endswith(CONTEXT_EXCLUDED):
                continue
            digest.update(relative.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_backend() -> None:
    """docker build of docker/Dockerfile, unless the image was built from exactly these inputs.

    The classic builder's cache check of `COPY --from=build /opt/venv` hashes the whole 6 GB
    venv (minutes on a busy machine); comparing the inputs instead makes an unchanged tree free.
    """
    inputs = backend_inputs()
    if image_label(BACKEND_IMAGE, CONTEXT_LABEL) == inputs:
        log(f"{BACKEND_IMAGE}: built from these exact inputs already (cached)")
        return
    run(["docker", "build", "-f", "docker/Dockerfile", "--label", f"{CONTEXT_LABEL}={inputs}",
         "-t", BACKEND_IMAGE, "."], cwd=ROOT, timeout=BUILD_TIMEOUT_S, stdout=subprocess.DEVNULL)


def prepare(python: str) -> None:
    started = time.monotonic()
    with timed("Docker engine"):
        start_engine()
    indexes = LocalIndexes()
    pip_conf, constraints = standin_pip_conf(pip_settings(python), indexes)
    with IndexServer(indexes):
        fingerprint = python_fingerprint(pip_conf, constraints)
        with timed(f"base image {PYTHON_IMAGE}"):
            if need_image(PYTHON_IMAGE, fingerprint):
                build_python_standin(fingerprint, pip_conf, constraints)
        with timed(f"Label Studio image {LS_IMAGE}"):
            build_ls_standin(image_id(PYTHON_IMAGE) if image_label(PYTHON_IMAGE, STANDIN_LABEL) else "real")
        with timed(f"backend image {BACKEND_IMAGE} from docker/Dockerfile"):
            build_backend()
    sizes = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"], quiet=True).stdout
    for line in sizes.splitlines():
        if line.split()[0] in (PYTHON_IMAGE, LS_IMAGE, BACKEND_IMAGE):
            log(f"image size {line}")
    log(f"ready in {time.monotonic() - started:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["prepare", "stop"])
    parser.add_argument("--python", default=sys.executable, help="the Python whose pip configuration to reproduce")
    args = parser.parse_args()
    if args.action == "stop":
        stop_engine()
        return 0
    try:
        prepare(args.python)
    except subprocess.TimeoutExpired as exc:
        log(f"timed out: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
