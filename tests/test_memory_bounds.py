"""Everything kept per task, image, prompt or project is bounded, and /metrics shows it.

The bounds are checked themselves (a cache never holds more than its bytes), never timings;
the soak benchmark (bench/soak.py) measures the process as a whole.
"""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from backend import memory
from backend.learning import LearnedState, LearnedStates, learned_state_bytes
from backend.server import create_app
from backend.settings import Settings
from backend_fixtures import BRUSH_CONFIG
from gem_model.learning import LabelPrototypes, LearnedMaps, PrototypeBank
from gem_model.model import ImageFeatures
from gem_model.predictor import FeatureCache


def _features(side: int, dim: int = 16) -> ImageFeatures:
    return ImageFeatures(torch.zeros(1, side, side, dim), None, (side * 8, side * 8))


def test_feature_cache_never_holds_more_than_its_bytes():
    rng = np.random.default_rng(0)
    cache = FeatureCache(max_bytes=200_000)
    for i in range(300):
        item = _features(int(rng.integers(1, 40)))
        cache.put(f"image-{i}", item)
        held = sum(f.nbytes() for f in cache._items.values())
        assert cache.nbytes == held <= cache.max_bytes
    assert len(cache) > 1     # it keeps what fits, not nothing
    cache.put("too-big", _features(100))       # 640 kB > the bound: not kept at all
    assert cache.get("too-big") is None and cache.nbytes <= cache.max_bytes


def _state(project_seed: int, vectors: int, dim: int = 64) -> LearnedState:
    rng = np.random.default_rng(project_seed)
    bank = PrototypeBank(labels={"car": LabelPrototypes(rng.random((vectors, dim), dtype=np.float32),
                                                        rng.random((1, dim), dtype=np.float32))},
                         background=rng.random((4, dim), dtype=np.float32))
    return LearnedState(version="l1", maps=LearnedMaps(bank=bank))


class _Store:
    """The two calls LearnedStates makes to decide whether to rebuild."""

    def __init__(self):
        self.builds = 0

    def version(self, key):
        return "l1"


class _States(LearnedStates):
    def _build(self, key):
        self.store.builds += 1
        return _state(int(key), vectors=1 + int(key) % 7)


def test_learned_states_stay_within_their_bytes_and_come_back_after_eviction():
    settings = Settings.from_env({"GEM_LEARNED_CACHE_MB": str(20_000 / 2**20)})
    states = _States(_Store(), settings)
    for project in range(200):                      # a server that meets many projects over weeks
        assert states.get(str(project)) is not None
        held = sum(learned_state_bytes(v[1]) for v in states._cache.values())
        assert states.nbytes == held <= states.max_bytes
    assert 1 < len(states) < 200
    builds = states.store.builds
    states.get("199")                               # the newest is kept: no rebuild
    assert states.store.builds == builds
    states.get("0")                                 # long evicted: rebuilt, not lost
    assert states.store.builds == builds + 1 and states.nbytes <= states.max_bytes


def test_learned_state_bytes_counts_the_vectors():
    state = _state(1, vectors=10, dim=64)
    assert learned_state_bytes(state) == (10 + 1 + 4) * 64 * 4
    assert learned_state_bytes(LearnedState(version="", maps=LearnedMaps(bank=None))) == 0


@pytest.fixture(scope="module")
def gem(tiny_model_files):
    import gem_model
    name, config_path, checkpoint_path = tiny_model_files
    return gem_model.create_gem_model(model_name=name, pretrained=str(checkpoint_path),
                                      model_config=str(config_path), device="cpu")


def test_text_embedding_cache_keeps_at_most_its_size_and_no_batch_behind_a_row(gem):
    gem._text_cache_size = 5
    try:
        for start in range(0, 40, 8):                 # batches of 8 new prompts
            gem.encode_text([f"thing {i}" for i in range(start, start + 8)])
            held, bound = gem.text_cache_bytes()
            assert len(gem._text_cache) <= 8          # at least one call's prompts are always served
            rows = list(gem._text_cache.values())
            # each row owns its storage: evicting a row frees it (a view would pin its batch)
            assert all(r.untyped_storage().nbytes() == r.numel() * r.element_size() for r in rows)
            assert held == sum(r.numel() * r.element_size() for r in rows)
        gem.encode_text(["one more"])
        held, bound = gem.text_cache_bytes()
        assert len(gem._text_cache) == 5 and held <= bound
    finally:
        gem._text_cache_size = 4096


# -- the server -------------------------------------------------------------------------------


def _png(seed: int, width: int = 48, height: int = 36) -> str:
    rng = np.random.default_rng(seed)
    array = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _huge_header_png() -> str:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(raw).decode()


BROKEN = [
    "data:image/png;base64,",                                   # zero bytes
    _png(1)[:60],                                               # truncated
    _huge_header_png(),                                         # 40,000 x 40,000 header
]


@pytest.fixture(scope="module")
def app(tiny_model_files, tmp_path_factory):
    name, config_path, checkpoint_path = tiny_model_files
    settings = Settings.from_env({
        "GEM_MODEL": name, "GEM_MODEL_CONFIG": str(config_path), "GEM_PRETRAINED": str(checkpoint_path),
        "GEM_DEVICE": "cpu", "GEM_IMAGE_SIZE": "64", "MODEL_DIR": str(tmp_path_factory.mktemp("mem")),
        "GEM_MIN_SIMILARITY": "-1", "GEM_FEATURE_CACHE_MB": str(40_000 / 2**20)})
    app = create_app(settings)
    app.extensions["gem"].model.wait_until_ready(120)
    yield app
    app.extensions["gem"].model.close()


def _predict(app, images, start=0):
    tasks = [{"id": start + i, "data": {"image": image}} for i, image in enumerate(images)]
    reply = app.test_client().post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG,
                                                     "project": "7.1", "params": {"context": None}})
    assert reply.status_code == 200, reply.get_json()
    return reply.get_json()["results"]


def _gauge(text: str, name: str, **labels) -> float:
    want = "".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} {labels} missing from /metrics"
    return float(match.group(1))


def test_metrics_show_resident_memory_and_each_cache_within_its_bound(app):
    for round_ in range(4):
        _predict(app, [_png(100 + 3 * round_ + k, 48 + 8 * k, 36) for k in range(3)], start=10 * round_)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert _gauge(text, "gem_process_resident_bytes") > 10 * 2**20
    for cache in ("features", "text_embeddings", "learned_states"):
        held = _gauge(text, "gem_cache_bytes", cache=cache)
        assert 0 <= held <= _gauge(text, "gem_cache_limit_bytes", cache=cache)
    assert _gauge(text, "gem_cache_bytes", cache="features") > 0
    predictor = app.extensions["gem"].model.pipeline.predictor
    assert predictor.cache.nbytes <= predictor.cache.max_bytes
    if memory.malloc_stats() is not None:
        assert _gauge(text, "gem_malloc_bytes", kind="in_use") > 0


def test_broken_images_keep_nothing(app):
    predictor = app.extensions["gem"].model.pipeline.predictor
    client = app.test_client()
    predictor.cache.clear()
    _predict(app, BROKEN, start=100)
    series_before = len(client.get("/metrics").get_data(as_text=True).splitlines())
    for round_ in range(5):
        results = _predict(app, BROKEN, start=200 + 10 * round_)
        assert all(not r.get("result") for r in results)     # each answered, empty
    assert len(predictor.cache) == 0 and predictor.cache.nbytes == 0
    # no series per task or per image: the same lines after 5 more rounds of broken images
    series_after = len(client.get("/metrics").get_data(as_text=True).splitlines())
    assert series_after == series_before


@pytest.mark.skipif(memory.malloc_stats() is None, reason="glibc >= 2.33 only")
def test_tune_allocator_leaves_what_the_environment_sets():
    applied = memory.tune_allocator({"MALLOC_ARENA_MAX": "4"})
    assert "MALLOC_ARENA_MAX" not in applied
    assert applied == {k: v for k, v in memory.ALLOCATOR_DEFAULTS.items() if k != "MALLOC_ARENA_MAX"}


def test_malloc_stats_and_resident_bytes_read_this_process():
    resident = memory.resident_bytes()
    assert resident is None or resident > 2**20
    stats = memory.malloc_stats()
    if stats is not None:
        block = bytearray(8 << 20)        # counted somewhere: in use, or mmapped
        after = memory.malloc_stats()
        assert after["in_use"] + after["mmapped"] >= stats["in_use"] + stats["mmapped"] + (4 << 20)
        del block


def test_soak_samples_where_the_issue_asks_and_mixes_the_broken_kinds():
    from bench.soak import BROKEN_KINDS, checkpoints, image_bytes
    assert checkpoints(2000) == [1, 50] + list(range(200, 2001, 200))
    kinds = [image_bytes(i, 80, 60, broken_every=10)[1] for i in range(60)]
    assert kinds.count("ok") == 54 and set(kinds) - {"ok"} == set(BROKEN_KINDS)
    assert image_bytes(0, 80, 60, 10)[0] != image_bytes(1, 80, 60, 10)[0]     # distinct images


# ---------------------------------------------------------------------------------------------
# The pre-labelling command and its Ray workers run with the servers' allocator settings


def _fresh_python(code: str, env: dict | None = None) -> str:
    """stdout of `code` in a new interpreter whose environment sets no MALLOC_* (unless `env` does)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=Path(__file__).resolve().parents[1],
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


PROBE_ONLY = "from backend import memory\nprint('fixed', memory.mmap_threshold_is_fixed())\n"


@pytest.mark.skipif(memory.malloc_stats() is None, reason="glibc >= 2.33 only")
def test_the_probe_tells_glibcs_dynamic_threshold_from_the_fixed_one():
    assert "fixed False" in _fresh_python(PROBE_ONLY)          # glibc as it starts
    assert "fixed True" in _fresh_python(PROBE_ONLY, memory.allocator_environment({}))


def test_child_processes_get_the_defaults_and_keep_what_the_environment_sets():
    env = memory.allocator_environment({"MALLOC_ARENA_MAX": "8", "MALLOC_TRIM_THRESHOLD_": " "})
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(256 << 10), "MALLOC_TRIM_THRESHOLD_": str(4 << 20),
                   "MALLOC_ARENA_MAX": "8"}


@pytest.mark.skipif(memory.malloc_stats() is None, reason="glibc >= 2.33 only")
def test_prelabel_command_tunes_the_allocator_before_the_run_allocates():
    out = _fresh_python("""
        import backend.prelabel as prelabel
        from backend import memory

        def probe(*args, **kwargs):          # where the model would load and the run begin
            print("fixed", memory.mmap_threshold_is_fixed())
            raise KeyboardInterrupt
        prelabel.run_prelabel = probe
        print("exit", prelabel.main(["--project", "1", "--no-progress"]))
    """)
    assert "fixed True" in out and "exit 130" in out


@pytest.mark.skipif(memory.malloc_stats() is None, reason="glibc >= 2.33 only")
def test_ray_model_actor_tunes_the_allocator_before_loading_the_model():
    out = _fresh_python("""
        import backend.pipeline
        from backend import memory
        from backend.prelabel_ray import PredictActor
        from backend.settings import Settings

        def probe(settings):                 # where the actor would load its model
            print("fixed", memory.mmap_threshold_is_fixed())
            raise RuntimeError("probed")
        backend.pipeline.load_predictor = probe
        try:
            PredictActor(Settings(), job=None)
        except RuntimeError as exc:
            print(exc)
    """)
    assert "fixed True" in out and "probed" in out


def test_ray_workers_start_with_the_allocator_settings_in_their_environment(monkeypatch):
    import sys
    import types

    from backend import prelabel_ray

    calls = []
    fake_ray = types.ModuleType("ray")
    fake_ray.init = lambda **kwargs: calls.append(kwargs)
    fake_ray.data = types.ModuleType("ray.data")
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.data", fake_ray.data)
    for name in memory.ALLOCATOR_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")          # the user's value travels instead of the default

    prelabel_ray.connect(prelabel_ray.RayOptions(local_cpus=2))
    prelabel_ray.connect(prelabel_ray.RayOptions(address="ray://cluster:10001"))
    for kwargs in calls:
        assert kwargs["runtime_env"]["env_vars"] == {"MALLOC_MMAP_THRESHOLD_": str(256 << 10),
                                                     "MALLOC_TRIM_THRESHOLD_": str(4 << 20),
                                                     "MALLOC_ARENA_MAX": "4"}
    assert len(calls) == 2


def test_a_soak_stopped_early_keeps_its_samples_and_reports_the_half_it_reached(tmp_path):
    import argparse

    from bench.soak import Sample, SoakResult, load_results, plot, save_partial
    result = SoakResult("dev", "vit-b-16", 224, "800x600", 2000, 0, [])
    for request, rss in [(1, 1.40), (50, 1.44), (200, 1.52), (400, 1.61), (600, 1.63)]:
        result.samples.append(Sample(request, rss))
        result.request_s.extend([1.0] * 10)
        save_partial(argparse.Namespace(json=tmp_path / "soak.json"), result)
    (loaded,) = load_results([tmp_path / "soak.dev.partial.json"])
    summary = loaded.summary()
    assert summary["n"] == 2000 and summary["n_reached"] == 600
    assert summary["growth_second_half_gib"] == 0.02          # 600 vs 400, the first sample past 300
    plot([loaded], tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_the_docker_image_sets_what_the_servers_apply():
    from pathlib import Path
    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile").read_text()
    image = dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\d+)", dockerfile))
    assert image == {name: str(value) for name, value in memory.ALLOCATOR_DEFAULTS.items()}
