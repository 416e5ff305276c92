"""GEM_PRECISION=bf16 as a CPU mode: the bf16 path agrees with fp32, the similarity stays fp32,
and the machine's bf16 support is detected and reported (docs/PERFORMANCE.md, "bf16 on CPU").

The bf16 models here are built with GemModel(...).to(bfloat16) directly, so the tests run on any
CPU (the factory refuses bf16 on a CPU without native bf16, which is tested separately).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gem_model
from gem_model import factory
from gem_model.attention import _chunked_attention, lowp_cpu, self_self_attention
from gem_model.errors import GemError
from gem_model.model import GemModel

PROMPTS = ["cat", "remote control", "a red car", "tree"]

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_AVX512_ONLY = "flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"


def _models(tiny_model_files, **kwargs):
    name, config_path, checkpoint = tiny_model_files
    fp32 = gem_model.create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), **kwargs)
    bf16 = GemModel(copy.deepcopy(fp32.clip), fp32.tokenizer, **kwargs).to(torch.bfloat16).eval()
    return fp32, bf16


def _images(seed=0, batch=2, size=(64, 96)):
    torch.manual_seed(seed)
    # Smooth images (a few colour blobs), so that maps have structure rather than pixel noise.
    return F.interpolate(torch.randn(batch, 3, 4, 6), size=size, mode="bilinear", align_corners=False)


# -- the attention maths -----------------------------------------------------------------------

@pytest.mark.parametrize("heads,n", [(3, 17), (8, 50)])
def test_chunked_attention_matches_float64_softmax(heads, n, monkeypatch):
    # Tiny budget: several chunks, so that chunk boundaries are exercised too (at any thread count).
    monkeypatch.setattr("gem_model.attention.CPU_SCORE_BYTES", 2 * n * n * 2)
    monkeypatch.setattr("gem_model.attention.CPU_SCORE_BYTES_THREADED", 2 * n * n * 2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, heads, 16) for _ in range(3))
    reference = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q.double() * 0.25, k.double()), -1)
    reference = torch.einsum("bhnm,bmhd->bnhd", reference, v.double())
    out = _chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25)
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    assert (out.double() - reference).abs().max() < 0.03      # bf16 inputs: 2^-8 relative


def test_chunks_are_cache_sized_by_default_and_whole_calls_on_a_busy_host(monkeypatch):
    from gem_model import attention
    from gem_model.attention import CPU_SCORE_BYTES, _heads_per_chunk, set_cpu_chunking

    monkeypatch.setattr(attention, "_cpu_chunking", "cache")      # restored after the test
    per_head = 785 * 785 * 2                      # one 448x448 image's scores in bf16
    one = _heads_per_chunk(1, 785, 785, 2, 36, threads=1)
    assert one == CPU_SCORE_BYTES // per_head and 1 <= one < 36
    assert _heads_per_chunk(1, 785, 785, 2, 36, threads=2) == one      # default: cache-sized at any count
    set_cpu_chunking("whole")
    assert _heads_per_chunk(1, 785, 785, 2, 36, threads=1) == one      # one thread: always cache-sized
    assert _heads_per_chunk(1, 785, 785, 2, 36, threads=2) == 36      # one chunk: fewer operators
    assert _heads_per_chunk(1, 785, 785, 2, 36, threads=4) == 36
    assert _heads_per_chunk(4, 2000, 2000, 2, 36, threads=2) < 36      # still bounded in memory
    assert _heads_per_chunk(1, 5000, 5000, 2, 36, threads=1) == 1      # never zero
    with pytest.raises(ValueError):
        set_cpu_chunking("fast")


def test_the_chunking_setting_reaches_the_model(monkeypatch, tmp_path):
    from backend.pipeline import load_predictor
    from backend.settings import Settings
    from gem_model import attention

    monkeypatch.setattr(attention, "_cpu_chunking", "cache")
    seen = []
    monkeypatch.setattr(attention, "set_cpu_chunking", lambda mode: seen.append(mode))
    monkeypatch.setattr("gem_model.create_gem_model", lambda **kw: (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setenv("GEM_BF16_CHUNKS", "whole")
    with pytest.raises(RuntimeError, match="stop"):
        load_predictor(Settings.from_env())
    assert seen == ["whole"]


@pytest.mark.parametrize("threads_budget", ["small", "large"])
def test_unnormalised_road_with_shared_values_matches_float64(threads_budget, monkeypatch):
    """GEM's final product: 3 paths x H heads of scores share the H heads of v; the row sums come
    out of the value product (a column of ones)."""
    n, heads, d = 23, 4, 16
    if threads_budget == "small":
        monkeypatch.setattr("gem_model.attention.CPU_SCORE_BYTES", 2 * n * n * 2)
        monkeypatch.setattr("gem_model.attention.CPU_SCORE_BYTES_THREADED", 2 * n * n * 2)
    torch.manual_seed(3)
    zn = F.normalize(torch.randn(1, n, 3 * heads, d), dim=-1)
    v = torch.randn(1, n, heads, d)
    t = 6.0
    scores = torch.einsum("bnhd,bmhd->bhnm", zn.double() * t, zn.double())
    reference = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(scores, -1), v.double().repeat(1, 1, 3, 1))
    out = _chunked_attention(zn.bfloat16(), zn.bfloat16(), v.bfloat16(), t, score_bound=t)
    assert out.shape == (1, n, 3 * heads, d) and out.dtype == torch.bfloat16
    assert (out.double() - reference).abs().max() < 0.03
    with pytest.raises(ValueError):
        _chunked_attention(zn.bfloat16(), zn.bfloat16(), torch.randn(1, n, 5, d).bfloat16(), t)


def test_unnormalised_softmax_equals_softmax_under_the_bound():
    torch.manual_seed(1)
    zn = F.normalize(torch.randn(1, 40, 6, 16), dim=-1).bfloat16()
    t = 7.0
    plain = _chunked_attention(zn, zn, zn, t)
    bounded = _chunked_attention(zn, zn, zn, t, score_bound=t)
    assert (plain.float() - bounded.float()).abs().max() < 0.02
    # Past the safe bound the plain softmax is used (exp(200) would overflow).
    huge = _chunked_attention(zn, zn, zn, 200.0, score_bound=200.0)
    assert torch.isfinite(huge.float()).all()


def test_self_self_attention_bf16_road_matches_fp32():
    torch.manual_seed(2)
    qkv = torch.randn(2, 30, 3 * 4 * 8)
    t = torch.tensor([1.5, 3.0])
    ref_gem, ref_ori = self_self_attention(qkv, 4, t, iterations=1, original=True)
    assert not lowp_cpu(qkv) and lowp_cpu(qkv.bfloat16())
    gem, ori = self_self_attention(qkv.bfloat16(), 4, t, iterations=1, original=True)
    assert gem.dtype == torch.bfloat16
    cos = F.cosine_similarity(gem.float(), ref_gem, dim=-1)
    assert cos.min() > 0.999
    assert F.cosine_similarity(ori.float(), ref_ori, dim=-1).min() > 0.999


# -- the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"mode": "clearclip"}, {"mode": "naclip"}])
def test_bf16_maps_agree_with_fp32(tiny_model_files, kwargs):
    fp32, bf16 = _models(tiny_model_files, **kwargs)
    images = _images()
    ref = fp32(images, PROMPTS, normalize=False)
    out = bf16(images, PROMPTS, normalize=False)
    assert out.dtype == torch.float32
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.97, agree
    # Masks: each prompt's pixels above its own median, fp32 vs bf16.
    cut = ref.flatten(2).median(-1).values[..., None, None]
    a, b = ref > cut, out > cut
    iou = ((a & b).sum() / (a | b).sum()).item()
    assert iou >= 0.95, iou


def test_bf16_keeps_streams_similarity_and_text_in_fp32(tiny_model_files):
    fp32, bf16 = _models(tiny_model_files)
    assert bf16.dtype == torch.bfloat16 and bf16.stream_dtype == torch.float32
    assert fp32.stream_dtype == torch.float32
    features = bf16.encode_image(_images(batch=1))
    assert features.gem.dtype == torch.float32
    text = bf16.encode_text(PROMPTS)
    assert text.dtype == torch.float32
    assert bf16.similarity(features, PROMPTS).dtype == torch.float32
    # The text tower is stored in fp32, untouched: the same embeddings as the fp32 model's.
    assert (text - fp32.encode_text(PROMPTS)).abs().max() < 1e-6


def test_bf16_on_cpu_stores_only_the_image_products_in_bf16(tiny_model_files):
    """The matrices of the image tower's products (and their biases) are bf16; the text tower,
    the LayerNorms, the class and positional embeddings and the projection keep their fp32
    values exactly (their rounding, not the arithmetic, was what moved the masks)."""
    fp32, bf16 = _models(tiny_model_files)
    reference = dict(fp32.clip.named_parameters())
    low = {name for name, p in bf16.clip.named_parameters() if p.dtype == torch.bfloat16}
    assert "visual.conv1.weight" in low
    assert any(name.endswith("attn.in_proj_weight") for name in low)
    assert any(name.endswith("mlp.c_fc.weight") for name in low)
    assert all(name.startswith("visual.") and "ln_" not in name for name in low)
    for name, p in bf16.clip.named_parameters():
        if name not in low:
            assert p.dtype == torch.float32 and torch.equal(p, reference[name]), name
    for name in ("visual.proj", "visual.positional_embedding", "visual.class_embedding", "visual.ln_post.weight",
                 "token_embedding.weight", "text_projection"):
        assert name not in low, name
    # Back to fp32 and to bf16 again: the kept tensors were never rounded.
    again = bf16.float().to(torch.bfloat16)
    assert torch.equal(dict(again.clip.named_parameters())["visual.proj"], reference["visual.proj"])
    # GemModel's own tensors follow the road: an fp32 model stays all fp32.
    assert all(p.dtype == torch.float32 for p in fp32.clip.parameters())


def test_fp32_path_is_untouched_by_the_bf16_road(tiny_model_files, monkeypatch):
    """The fp32 model never takes the chunked road (its equivalence with bench/plain_gem.py is
    tests/test_perf_equivalence.py), the bf16 one always does; the predictor's maps come back
    float32 in both."""
    import gem_model.attention as attention

    calls = []
    real = attention._chunked_attention
    monkeypatch.setattr(attention, "_chunked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    fp32, bf16 = _models(tiny_model_files)
    image = (np.random.default_rng(0).uniform(0, 255, (50, 70, 3))).astype(np.uint8)
    for model, chunked in ((fp32, False), (bf16, True)):
        calls.clear()
        predictor = gem_model.HeatmapPredictor(model, image_size=64, cache_bytes=0)
        maps = predictor.similarity(predictor.encode([image])[0], PROMPTS)
        assert maps.dtype == np.float32 and maps.shape == (4, 50, 70)
        assert bool(calls) is chunked


# -- detection and settings --------------------------------------------------------------------

@pytest.mark.parametrize("text,fast,flags", [
    (X86_BF16, True, ("avx512_bf16",)),
    (X86_AMX, True, ("amx_bf16",)),
    (ARM_BF16, True, ("bf16",)),
    (X86_AVX2, False, ()),
    (X86_AVX512_ONLY, False, ()),          # AVX-512 without the bf16 instructions: emulated
    ("", False, ()),
])
def test_cpu_bf16_detection_from_cpuinfo(text, fast, flags):
    found = factory.cpu_bf16_support(text)
    assert found.fast is fast and found.flags == flags
    assert ("native" in found.message) and (("not native" in found.message) is not fast)


def test_precision_resolution_and_refusal():
    cpu = torch.device("cpu")
    native, none = factory.cpu_bf16_support(X86_BF16), factory.cpu_bf16_support(X86_AVX2)
    assert factory.resolve_precision("auto", cpu, native) == "bf16"
    assert factory.resolve_precision("auto", cpu, none) == "fp32"
    assert factory.resolve_precision("bf16", cpu, native) == "bf16"
    assert factory.resolve_precision("fp32", cpu, none) == "fp32"
    with pytest.raises(GemError, match="slower than fp32.*GEM_PRECISION=fp32"):
        factory.resolve_precision("bf16", cpu, none)
    with pytest.raises(GemError, match="precision must be one of"):
        factory.resolve_precision("int4", cpu, native)


_REAL_DETECT = factory.cpu_bf16_support


def _fixed(text):
    return _REAL_DETECT(text)


def test_factory_builds_bf16_only_where_native(tiny_model_files, monkeypatch):
    name, config_path, checkpoint = tiny_model_files
    build = dict(model_name=name, pretrained=str(checkpoint), device="cpu", model_config=str(config_path))
    monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(X86_AVX2))
    with pytest.raises(GemError, match="bf16 would be emulated"):
        gem_model.create_gem_model(precision="bf16", **build)
    assert gem_model.create_gem_model(precision="auto", **build).dtype == torch.float32
    monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(X86_BF16))
    assert gem_model.create_gem_model(precision="auto", **build).dtype == torch.bfloat16


def _clean_env(monkeypatch, tmp_path):
    import os

    for key in [k for k in os.environ if k.startswith(("GEM_", "LABEL_STUDIO_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("GEM_PRETRAINED", "none")
    monkeypatch.setenv("GEM_DEVICE", "cpu")


def test_check_reports_cpu_bf16_and_refuses_it_where_not_native(monkeypatch, tmp_path, capsys):
    from backend.__main__ import main as backend_main
    from backend.settings import Settings

    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("GEM_PRECISION", "auto")
    assert Settings.from_env().precision == "auto"
    monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(X86_BF16))
    assert backend_main(["--check"]) == 0
    err = capsys.readouterr().err
    assert "precision: auto -> bf16 on cpu" in err and "CPU bf16: native (avx512_bf16" in err

    monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(X86_AVX2))
    assert backend_main(["--check"]) == 0
    assert "precision: auto -> fp32 on cpu" in capsys.readouterr().err
    monkeypatch.setenv("GEM_PRECISION", "bf16")
    assert backend_main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "GEM_PRECISION='bf16'" in err and "slower than fp32" in err and "not native" in err


def test_start_log_says_precision(tiny_model_files, monkeypatch, tmp_path, caplog):
    """The model loader's first log line names the precision it resolved and the CPU's bf16 support."""
    import logging

    from backend.model import GemBackendModel
    from backend.settings import Settings

    name, config_path, checkpoint = tiny_model_files
    _clean_env(monkeypatch, tmp_path)
    for key, value in {"GEM_MODEL": name, "GEM_PRETRAINED": str(checkpoint), "GEM_MODEL_CONFIG": str(config_path),
                       "GEM_PRECISION": "auto", "GEM_IMAGE_SIZE": "32", "GEM_LEARN": "false"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(X86_BF16))
    backend = GemBackendModel(Settings.from_env())
    with caplog.at_level(logging.INFO, logger="backend"):
        backend.load()
    assert backend.ready and backend.load_error is None
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loading model"))
    assert "precision: auto -> bf16 on cpu; CPU bf16: native (avx512_bf16" in line
    assert backend.pipeline.predictor.model.dtype == torch.bfloat16


def test_the_cpu_bf16_road_has_its_own_model_version(monkeypatch):
    """The CPU bf16 road's maps changed (fp32 streams, norms and text tower): Label Studio must see
    another model version, or it would keep predictions of the all-bf16 model as current."""
    from backend.pipeline import compute_model_version
    from backend.settings import Settings

    def version(precision: str, cpu_text: str) -> str:
        monkeypatch.setattr(factory, "cpu_bf16_support", lambda: _fixed(cpu_text))
        return compute_model_version(Settings.from_env({"GEM_PRECISION": precision, "GEM_DEVICE": "cpu"}))

    fp32 = version("fp32", X86_BF16)
    assert version("fp32", X86_AVX2) == fp32                   # fp32 keeps its version on any CPU
    # auto: bf16 where native, fp32 elsewhere; the two must not share a version
    assert version("auto", X86_BF16) != version("auto", X86_AVX2)
    native = version("bf16", X86_BF16)
    assert native != fp32
    # bf16 refused on this CPU: the version is the plain key (loading fails with the reason)
    assert version("bf16", X86_AVX2) != native
