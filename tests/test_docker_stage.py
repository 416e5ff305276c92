"""scripts/docker_stage.py without an engine: pip inside a stand-in build resolves what pip here does.

The stand-in base image carries a pip.conf made from this machine's effective pip options, with
each local folder (file:// index, find-links folder) served over HTTP while images build. These
tests serve such a folder the same way and let a real pip resolve through the generated config.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("docker_stage", ROOT / "scripts" / "docker_stage.py")
docker_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docker_stage)


def _wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        whl.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path):
    """A PEP 503 index laid out as this machine's (simple/<name>/index.html -> ../../files/<wheel>)."""
    top = tmp_path / "opt" / "pypi"
    (top / "files").mkdir(parents=True)
    (top / "simple" / "gemprobe").mkdir(parents=True)
    links = []
    for version in ("1.0", "2.0"):
        wheel = _wheel(top / "files", "gemprobe", version)
        links.append(f'<a href="../../files/{wheel.name}">{wheel.name}</a>')
    (top / "simple" / "gemprobe" / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
    return top


def test_pip_conf_reproduces_indexes_constraints_certificate_and_timeout(local_index, tmp_path, monkeypatch):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("gemprobe<=1.0\n")
    indexes = docker_stage.LocalIndexes()
    conf, constraint_text = docker_stage.standin_pip_conf({
        "extra-index-url": f"file://{local_index}/simple https://example.org/simple",
        "find-links": str(tmp_path / "does-not-exist"),
        "constraint": str(constraints), "default-timeout": "180", "cert": "/somewhere/on/the/host.pem",
    }, indexes)
    host = f"{docker_stage.INDEX_HOST}:{docker_stage.INDEX_PORT}"
    assert f"extra-index-url = http://{host}/0-pypi/simple/ https://example.org/simple" in conf
    assert "find-links" not in conf                     # a folder that does not exist is left out
    assert f"trusted-host = {host}" in conf
    assert "default-timeout = 180" in conf
    assert "constraint = /etc/pip-constraints.txt" in conf and constraint_text == "gemprobe<=1.0\n"
    assert f"cert = {docker_stage.CA_BUNDLE}" in conf     # the image's bundle, not the host's path
    assert indexes.folders == {"0-pypi": local_index}


def test_pip_resolves_through_the_served_index(local_index, tmp_path, monkeypatch):
    """A real pip, given only the generated config, finds the wheel behind the index's relative link."""
    monkeypatch.setattr(docker_stage, "INDEX_HOST", "127.0.0.1")
    monkeypatch.setattr(docker_stage, "INDEX_PORT", _free_port())
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("gemprobe<=1.0\n")
    indexes = docker_stage.LocalIndexes()
    conf, constraint_text = docker_stage.standin_pip_conf(
        {"index-url": f"file://{local_index}/simple", "constraint": str(constraints)}, indexes)
    image_constraints = tmp_path / "image-constraints.txt"
    image_constraints.write_text(constraint_text)
    conf = conf.replace("/etc/pip-constraints.txt", str(image_constraints)).replace(
        f"cert = {docker_stage.CA_BUNDLE}\n", "")
    (tmp_path / "pip.conf").write_text(conf)
    env = {"PIP_CONFIG_FILE": str(tmp_path / "pip.conf"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    with docker_stage.IndexServer(indexes):
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp_path / "out"),
                                 "gemprobe"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gemprobe-1.0-py3-none-any.whl"]  # the constraint held


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_build_inputs_change_with_what_the_image_copies_only(tmp_path, monkeypatch):
    """The stage skips `docker build` when this hash matches the image's label: it must move with
    every file the Dockerfile copies and with the base image, and ignore what .dockerignore drops."""
    for name in ("requirements.txt", "docker/healthcheck.py", "docker/Dockerfile", ".dockerignore",
                 "backend/server.py", "gem_model/model.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(docker_stage, "ROOT", tmp_path)
    base = {"id": "sha256:aaa"}
    monkeypatch.setattr(docker_stage, "image_id", lambda image: base["id"])
    first = docker_stage.backend_inputs()

    (tmp_path / "backend" / "__pycache__").mkdir()
    (tmp_path / "backend" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / "gem_model" / "weights.pt").write_bytes(b"x")
    (tmp_path / "README.md").write_text("not in the build context")
    assert docker_stage.backend_inputs() == first

    (tmp_path / "backend" / "server.py").write_text("changed")
    second = docker_stage.backend_inputs()
    assert second != first
    (tmp_path / "gem_model" / "new.py").write_text("new file")
    third = docker_stage.backend_inputs()
    assert third != second
    base["id"] = "sha256:bbb"
    assert docker_stage.backend_inputs() != third
