"""Weights and the network: random weights by name, cached tags without a network, and a quick,
quiet failure when a tag must be downloaded and the network is not there.

The network is cut by pointing the proxy variables at a loopback port where nothing listens:
every request the code makes fails at once, and nothing leaves the machine.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import gem_model
from gem_model.errors import WeightsNotFoundError
from gem_model.weights import cached_tag_file, looks_like_checkpoint_path, parse_pretrained

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_BOUND_S = 10.0   # the promise: no network -> the failure within 10 s, in one line


@pytest.fixture
def no_network(monkeypatch):
    """Proxy variables pointing at a loopback port that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))          # bound, never listening: connections are refused
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
               "ALL_PROXY": proxy, "NO_PROXY": "", "no_proxy": ""}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        yield env


def test_pretrained_none_and_path_rules():
    assert parse_pretrained(None) is None and parse_pretrained("") is None and parse_pretrained(" None ") is None
    assert parse_pretrained("openai") == "openai"
    for path in ("weights.pt", "dir/w", "./w", "w.safetensors", "W.NPZ"):
        assert looks_like_checkpoint_path(path), path
    for tag in ("openai", "laion2b_s34b_b88k", "none", "", None):
        assert not looks_like_checkpoint_path(tag), tag


def test_create_gem_model_takes_none_as_random_weights(tiny_model_files):
    name, config, _ = tiny_model_files
    model = gem_model.create_gem_model(name, "none", device="cpu", model_config=config)
    assert model.pretrained is None


def test_missing_tag_fails_fast_in_one_line_without_retries(tmp_path, no_network, caplog):
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as raised:
        gem_model.create_gem_model("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path))
    seconds = time.monotonic() - started
    message = str(raised.value)
    assert seconds < OFFLINE_BOUND_S, seconds
    assert "\n" not in message and "unreachable" in message and "prefetch" in message and ".." not in message
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []                                   # no hub retry warnings


def test_offline_variable_fails_without_any_request(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import requests

    def no_request(*args, **kwargs):
        raise AssertionError("a request was made although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(requests, "head", no_request)
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
        gem_model.create_gem_model("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path))


def _fake_hub_cache(cache_dir: Path, repo_id: str, filename: str) -> Path:
    """A file where huggingface_hub's cache layout keeps `filename` of `repo_id`."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_cached_tag_loads_from_the_file_without_any_request(tmp_path, no_network, monkeypatch):
    import open_clip
    import requests

    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    repo_id = tag_cfg["hf_hub"].rstrip("/")
    cached = _fake_hub_cache(tmp_path, repo_id, "open_clip_model.safetensors")
    assert cached_tag_file(tag_cfg, str(tmp_path)) == str(cached)
    assert cached_tag_file(tag_cfg, str(tmp_path / "empty")) is None

    calls = []

    def create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        raise RuntimeError("stop here")      # building ViT-B-16 is not what this test is about

    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(requests, "head", lambda *a, **k: pytest.fail("no request may be made"))
    with pytest.raises(WeightsNotFoundError):
        gem_model.create_gem_model("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path))
    ((name, weights, kwargs),) = calls
    assert weights == str(cached)                                  # the file, not the tag
    assert kwargs["force_quick_gelu"] is True                      # as the tag was trained
    assert kwargs["force_preprocess_cfg"]["mean"] == tag_cfg["mean"]


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "gem_model", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_runs_with_pretrained_none(tmp_path, tiny_model_files):
    name, config, _ = tiny_model_files
    Image.new("RGB", (48, 32), "white").save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    done = _cli([str(tmp_path / "in.png"), "--prompt", "cat", "--pretrained", "none", "--model", name,
                 "--model-config", str(config), "--image-size", "32", "--out", str(out), "--device", "cpu"], {})
    assert done.returncode == 0, done.stderr
    assert out.is_file() and Image.open(out).width > 0


def test_cli_offline_is_one_line(tmp_path, no_network):
    Image.new("RGB", (48, 32), "white").save(tmp_path / "in.png")
    done = _cli([str(tmp_path / "in.png"), "--prompt", "cat", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out.png")], no_network)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download weights ViT-B-16 / openai"), lines
    assert not (tmp_path / "out.png").exists()


def test_server_load_fails_fast_in_one_line(tmp_path, no_network, caplog):
    from backend.model import GemBackendModel
    from backend.settings import Settings

    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "GEM_DEVICE": "cpu"})   # default: ViT-B-16 / openai
    model = GemBackendModel(settings)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    model.load()
    assert time.monotonic() - started < OFFLINE_BOUND_S
    assert model.load_error and "unreachable" in model.load_error
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and not problems[0].exc_info and "\n" not in problems[0].getMessage()


def test_a_hanging_probe_is_given_up(monkeypatch):
    """Name resolution has no timeout of its own: the whole check is bounded."""
    import threading

    import gem_model.weights as weights

    release = threading.Event()
    monkeypatch.setattr(weights, "_probe", lambda url: release.wait(30) and None)
    monkeypatch.setattr(weights, "PROBE_TOTAL_S", 0.2)
    started = time.monotonic()
    assert weights._unreachable("https://hub.example") == "no answer within 0.2 s"
    assert time.monotonic() - started < 5
    release.set()
