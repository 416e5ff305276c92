"""The optimised GEM model gives the same maps as the straightforward implementation.

bench/plain_gem.py computes GEM the plain way (explicit softmax(QK^T), one path at a time, the
original path in full through open_clip's blocks); every speed-up in gem_model must leave the
fp32 results within 1e-4 of it, on the tiny test model and on a real-size ViT-B/16.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from bench.plain_gem import plain_gem_maps
from gem_model import HeatmapPredictor, create_gem_model

PROMPTS = ["cat", "remote control", "a red car"]
ATOL = 1e-4


def make_tiny(tiny_model_files, **kwargs):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), **kwargs)


def assert_close(ours, plain):
    assert ours.shape == plain.shape
    err = (ours.float() - plain.float()).abs().max().item()
    assert err <= ATOL, err


@pytest.mark.parametrize("settings,size,batch", [
    ({}, (32, 32), 1),
    ({}, (48, 80), 3),                                            # resampled positional embedding
    ({"gem_depth": 3, "ss_attn_iter": 2}, (40, 24), 2),
    ({"gem_depth": 9, "ss_attn_iter": 0, "ss_attn_temp": 0.7}, (32, 48), 2),   # every block GEM
])
@pytest.mark.parametrize("return_ori", [False, True])
def test_tiny_model_matches_plain(tiny_model_files, settings, size, batch, return_ori):
    model = make_tiny(tiny_model_files, **settings)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, *size)
    ours = model(images, PROMPTS, normalize=False, return_ori=return_ori)
    plain = plain_gem_maps(model.clip, model.tokenizer, images, PROMPTS, gem_depth=model.gem_depth,
                           ss_attn_iter=model.ss_attn_iter, ss_attn_temp=model.ss_attn_temp,
                           return_ori=return_ori)
    assert_close(ours, plain)


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return create_gem_model("ViT-B-16", None, device="cpu")


def test_vit_b16_matches_plain(vit_b16):
    torch.manual_seed(1)
    images = torch.randn(1, 3, 224, 224)
    ours = vit_b16(images, PROMPTS, normalize=False)
    assert_close(ours, plain_gem_maps(vit_b16.clip, vit_b16.tokenizer, images, PROMPTS))


def test_vit_b16_non_square_original_path_matches_plain(vit_b16):
    """return_ori runs the original attention as extra heads of the GEM attention call."""
    torch.manual_seed(2)
    images = torch.randn(1, 3, 160, 224)
    ours = vit_b16(images, PROMPTS[:1], normalize=False, return_ori=True)
    plain = plain_gem_maps(vit_b16.clip, vit_b16.tokenizer, images, PROMPTS[:1], return_ori=True)
    assert_close(ours, plain)


def test_identical_images_in_one_call_are_encoded_once(tiny_model_files):
    model = make_tiny(tiny_model_files)
    predictor = HeatmapPredictor(model, image_size=32, cache_bytes=0)   # no cache: dedupe alone
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    batches = []
    original = model.encode_image
    model.encode_image = lambda images, **kw: batches.append(images.shape[0]) or original(images, **kw)
    encoded = predictor.encode([a, b, a.copy(), np.asarray(a)], batch_size=8)
    assert batches == [2]
    assert encoded[0].key == encoded[2].key == encoded[3].key != encoded[1].key
    for enc in encoded[2:]:
        assert np.array_equal(predictor.similarity(enc, ["cat"]), predictor.similarity(encoded[0], ["cat"]))


@pytest.mark.parametrize("return_ori", [False, True])
def test_cpu_batch_slices_equal_one_pass(tiny_model_files, monkeypatch, return_ori):
    import gem_model.model

    model = make_tiny(tiny_model_files)
    images = torch.randn(5, 3, 32, 40)               # 21 tokens per image
    whole = model.encode_image(images, return_ori=return_ori)
    monkeypatch.setattr(gem_model.model, "CPU_TOKENS_PER_PASS", 50)   # slices of 2 images
    sliced = model.encode_image(images, return_ori=return_ori)
    assert torch.allclose(whole.gem, sliced.gem, atol=1e-6, rtol=0)
    if return_ori:
        assert torch.allclose(whole.ori, sliced.ori, atol=1e-6, rtol=0)


def test_text_on_a_token_prefix_equals_full_context(tiny_model_files, vit_b16):
    """Text is encoded on the tokens up to the longest prompt's end-of-text token only."""
    prompts = ["cat", "a red, rusty car parked beside a tall building at night", "x"]
    for model in (make_tiny(tiny_model_files), vit_b16):
        assert model._truncate_text
        tokens = model.tokenizer([model.prompt_template.format(p) for p in prompts])
        with torch.inference_mode():
            full = torch.nn.functional.normalize(model.clip.encode_text(tokens), dim=-1)
        assert torch.allclose(model.encode_text(prompts), full, atol=1e-5, rtol=0)
