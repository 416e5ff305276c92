"""GEM core against an independent float64 implementation of the method's equations."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gem_model
from gem_model import (GemError, InvalidInputError, UnsupportedModelError, WeightsNotFoundError,
                       create_gem_model)


@pytest.fixture(scope="module")
def tiny(tiny_model_files):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path))


def make(tiny_model_files, **kwargs):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), **kwargs)


# ---------------------------------------------------------------------------------------------
# Reference: plain loops, float64, written from the description of the method.
# ---------------------------------------------------------------------------------------------
def _layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def reference_input_tokens(clip, images):
    """A float64 copy of `clip` and the tokens entering its first block: patch embedding, class
    token, positional embedding (bicubic-resampled for another grid), ln_pre. x: [B, 1+h*w, D]."""
    clip = copy.deepcopy(clip).double()
    visual = clip.visual
    images = images.double()
    b, _, height, width = images.shape
    p = visual.patch_size[0]
    h, w = height // p, width // p
    x = F.conv2d(images, visual.conv1.weight, stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(b, 1, -1), x], 1)
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if (h, w) != (gh, gw):
        grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])
    return clip, _layer_norm(visual.ln_pre, x + pos), (b, h, w)


def reference_maps(clip, images, prompts, depth, iters, temp, ori=False):
    clip, x, (b, h, w) = reference_input_tokens(clip, images)
    visual = clip.visual

    blocks = visual.transformer.resblocks
    first = len(blocks) - (depth - 1)
    g = None
    for index, block in enumerate(blocks):
        heads = block.attn.num_heads
        y = _layer_norm(block.ln_1, x)
        qkv = y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
        q, k, v = qkv.chunk(3, dim=-1)
        d = q.shape[-1] // heads
        attn_out = torch.zeros_like(q)
        gem_out = torch.zeros_like(q)
        for n in range(b):
            t = temp if temp is not None else y[n].norm(dim=-1).mean() / math.sqrt(d)
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                qh, kh, vh = q[n, :, sl], k[n, :, sl], v[n, :, sl]
                attn_out[n, :, sl] = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1) @ vh
                outs = []
                for z in (qh, kh, vh):
                    for _ in range(iters):
                        z = torch.softmax(t * _unit(z) @ _unit(z).T, dim=-1) @ _unit(z)
                    outs.append(torch.softmax(t * _unit(z) @ _unit(z).T, dim=-1) @ vh)
                gem_out[n, :, sl] = sum(outs) / 3
        if index == first:
            g = x.clone()
        if index >= first:
            g = g + block.ls_1(block.attn.out_proj(gem_out))
        x = x + block.ls_1(block.attn.out_proj(attn_out))
        x = x + block.ls_2(block.mlp(_layer_norm(block.ln_2, x)))

    tokens = _layer_norm(visual.ln_post, (x if ori else g)[:, 1:]) @ visual.proj
    tokens = _unit(tokens).reshape(b, h, w, -1)
    text = _unit(torch.stack([
        clip.encode_text(clip_tokenizer(clip)([f"a photo of a {pr}."]))[0] for pr in prompts]))
    sims = torch.einsum("bhwd,pd->bphw", tokens, text)
    return F.interpolate(sims, size=images.shape[-2:], mode="bilinear", align_corners=False)


def clip_tokenizer(clip):
    import open_clip
    return open_clip.get_tokenizer("gem-test-tiny")


PROMPTS = ["cat", "remote control", "a red car"]


@pytest.mark.parametrize("depth,iters,temp,size", [
    (7, 1, None, (32, 32)),      # defaults, native grid
    (7, 1, None, (48, 80)),      # non-square, resampled positional embeddings
    (3, 2, None, (40, 24)),
    (9, 0, 0.7, (32, 48)),       # every block modified, no iteration, fixed temperature
])
def test_matches_float64_reference(tiny_model_files, depth, iters, temp, size):
    model = make(tiny_model_files, gem_depth=depth, ss_attn_iter=iters, ss_attn_temp=temp)
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    ours = model(images, PROMPTS, normalize=False)
    ref = reference_maps(model.clip, images, PROMPTS, depth, iters, temp)
    assert ours.shape == (2, len(PROMPTS), *size)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0), (ours.double() - ref).abs().max()


def test_plain_clip_map_matches_reference(tiny):
    images = torch.randn(1, 3, 32, 40)
    ours = tiny(images, PROMPTS, normalize=False, return_ori=True)
    ref = reference_maps(tiny.clip, images, PROMPTS, 7, 1, None, ori=True)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0)
    gem = tiny(images, PROMPTS, normalize=False)
    assert not torch.allclose(gem, ours, atol=1e-3)


def test_original_path_equals_open_clip_tokens(tiny):
    visual = tiny.clip.visual
    images = torch.randn(3, 3, 32, 32)  # native size: open_clip itself cannot resample
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    _, ori = tiny.encode_tokens(images, return_ori=True)
    assert torch.allclose(ori, tokens @ visual.proj, atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(tiny):
    images = torch.randn(4, 3, 48, 32)
    batched = tiny(images, PROMPTS, normalize=False)
    singles = torch.cat([tiny(images[i:i + 1], PROMPTS, normalize=False) for i in range(4)])
    assert torch.allclose(batched, singles, atol=1e-5, rtol=0)


def test_split_path_equals_one_shot(tiny):
    images = torch.randn(2, 3, 32, 56)
    for normalize in (True, False):
        one_shot = tiny(images, PROMPTS, normalize=normalize)
        features = tiny.encode_image(images)
        assert torch.equal(one_shot, tiny.similarity(features, PROMPTS, normalize=normalize))
        # Prompts matched in separate calls: same values up to matmul rounding.
        split = torch.cat([tiny.similarity(features, PROMPTS[:1], normalize=normalize),
                           tiny.similarity(features, PROMPTS[1:], normalize=normalize)], dim=1)
        assert torch.allclose(one_shot, split, atol=1e-6, rtol=0)


def test_batched_forward_different_prompts(tiny):
    images = torch.randn(2, 3, 32, 32)
    maps = tiny.batched_forward(images, [["cat"], ["dog", "car"]], normalize=False)
    assert [m.shape for m in maps] == [(1, 32, 32), (2, 32, 32)]
    assert torch.allclose(maps[1], tiny(images[1:], ["dog", "car"], normalize=False)[0], atol=1e-6)
    with pytest.raises(InvalidInputError):
        tiny.batched_forward(images, [["cat"]])


def test_normalize_scales_each_map_to_unit_range(tiny):
    maps = tiny(torch.randn(2, 3, 32, 32), PROMPTS, normalize=True)
    flat = maps.flatten(2)
    assert torch.allclose(flat.min(-1).values, torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(flat.max(-1).values, torch.ones(2, 3), atol=1e-6)


@pytest.mark.parametrize("change", [{"gem_depth": 3}, {"ss_attn_iter": 3}, {"ss_attn_temp": 0.2}])
def test_each_setting_changes_the_output(tiny_model_files, tiny, change):
    images = torch.randn(1, 3, 32, 32)
    base = tiny(images, PROMPTS, normalize=False)
    other = make(tiny_model_files, **change)(images, PROMPTS, normalize=False)
    assert (base - other).abs().max() > 1e-3


def test_text_embeddings_are_cached(tiny_model_files):
    model = make(tiny_model_files, text_cache_size=2)
    calls = []
    original = model.clip.encode_text
    model.clip.encode_text = lambda tokens, **kw: calls.append(tokens.shape[0]) or original(tokens, **kw)
    first = model.encode_text(["cat", "dog"])
    again = model.encode_text(["dog", "cat"])
    assert calls == [2]
    assert torch.equal(first, again.flip(0))
    model.encode_text(["car"])   # evicts the least recently used ("dog" was used before "cat")
    model.encode_text(["cat"])
    assert calls == [2, 1]
    model.encode_text(["dog"])
    assert calls == [2, 1, 1]


def test_checkpoint_path_loads_the_saved_weights(tiny_model_files, tiny):
    saved = torch.load(tiny_model_files[2], weights_only=True)["state_dict"]
    for name, value in tiny.clip.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("bad_input", [
    torch.randn(3, 32, 32), torch.randn(1, 1, 32, 32), torch.randn(1, 3, 30, 32)])
def test_bad_image_tensors_get_clear_errors(tiny, bad_input):
    with pytest.raises(InvalidInputError, match="images must be|multiples of the patch"):
        tiny(bad_input, ["cat"])


@pytest.mark.parametrize("prompts", [[], "cat", [""], ["ok", None]])
def test_bad_prompts_get_clear_errors(tiny, prompts):
    with pytest.raises(InvalidInputError):
        tiny(torch.randn(1, 3, 32, 32), prompts)


def test_missing_checkpoint_file(tiny_model_files, tmp_path):
    name, config_path, _ = tiny_model_files
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_gem_model(name, str(tmp_path / "nope.pt"), device="cpu", model_config=str(config_path))


def test_corrupt_checkpoint_file(tiny_model_files, tmp_path):
    name, config_path, checkpoint = tiny_model_files
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(WeightsNotFoundError, match="broken.pt"):
        create_gem_model(name, str(broken), device="cpu", model_config=str(config_path))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(WeightsNotFoundError, match="openai"):
        create_gem_model("ViT-B-16", "no-such-tag", device="cpu")


def test_unknown_model_name():
    with pytest.raises(GemError, match="unknown model"):
        create_gem_model("ViT-Z-99", None, device="cpu")


@pytest.mark.parametrize("name,what", [("RN50", "ResNet"), ("convnext_base", "timm"),
                                       ("coca_ViT-B-32", "attentional pooler")])
def test_non_vit_towers_are_rejected_with_the_supported_list(name, what):
    with pytest.raises(UnsupportedModelError, match=what) as info:
        create_gem_model(name, None, device="cpu")
    assert "VisionTransformer" in str(info.value)


def test_original_clip_spelling_is_accepted():
    assert gem_model.normalize_model_name("ViT-B/16") == "ViT-B-16"
    assert gem_model.normalize_model_name("ViT-L/14-336") == "ViT-L-14-336"
    assert gem_model.normalize_model_name("hf-hub:org/repo") == "hf-hub:org/repo"


def test_real_architecture_builds_from_the_slash_spelling():
    model = create_gem_model("ViT-B/32", None, device="cpu")
    assert model.patch_size == (32, 32)
    maps = model(torch.randn(1, 3, 64, 96), ["cat"])
    assert maps.shape == (1, 1, 64, 96)


def test_available_models_lists_vit_towers_only():
    pairs = gem_model.available_models()
    assert ("ViT-B-16", "openai") in pairs
    assert not any(name.startswith(("RN", "convnext", "coca")) for name, _ in pairs)


def test_custom_config_as_dict(tiny_model_files):
    from tiny_model import TINY_CONFIG
    _, _, checkpoint = tiny_model_files
    model = create_gem_model("gem-test-dict", str(checkpoint), device="cpu", model_config=TINY_CONFIG)
    assert model.patch_size == (8, 8)


def test_gem_depth_out_of_range(tiny_model_files):
    with pytest.raises(InvalidInputError, match="gem_depth"):
        make(tiny_model_files, gem_depth=20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(tiny_model_files):
    cpu = make(tiny_model_files)
    gpu = make(tiny_model_files).to("cuda")
    images = torch.randn(2, 3, 48, 64)
    assert torch.allclose(cpu(images, PROMPTS, normalize=False),
                          gpu(images, PROMPTS, normalize=False).cpu(), atol=1e-4)


def test_documented_model_table_is_known_to_open_clip():
    """The (model, tag) pairs docs/GEM.md lists ("Models and weights") load through this code path."""
    documented = [("ViT-B-16", "openai"), ("ViT-B-32", "openai"), ("ViT-L-14", "openai"),
                  ("ViT-L-14-336", "openai"), ("ViT-B-16", "laion2b_s34b_b88k"),
                  ("ViT-B-16-quickgelu", "metaclip_400m"), ("ViT-L-14", "laion2b_s32b_b82k")]
    text = (Path(__file__).resolve().parents[1] / "docs" / "GEM.md").read_text()
    assert all(f"`{name}`" in text and f"`{tag}`" in text for name, tag in documented)
    assert set(documented) <= set(gem_model.available_models())


def test_openai_tag_selects_quickgelu(monkeypatch):
    """The OpenAI weights need QuickGELU even under the plain name; check what we ask open_clip."""
    import open_clip
    seen = {}

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr("gem_model.factory.check_download_possible", lambda *args: None)
    with pytest.raises(WeightsNotFoundError):
        create_gem_model("ViT-B/16", "openai", device="cpu")
    assert seen["name"] == "ViT-B-16" and seen["force_quick_gelu"] is True


def test_quick_gelu_for_checkpoint_files(tiny_model_files):
    from open_clip.transformer import QuickGELU
    default = make(tiny_model_files)
    forced = make(tiny_model_files, quick_gelu=True)
    assert not isinstance(default.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(forced.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_resampled_positional_embeddings_cache_is_bounded(tiny, monkeypatch):
    import gem_model.model as gem_model_module
    monkeypatch.setattr(gem_model_module, "_POS_CACHE_SIZE", 3)
    tiny._pos_cache.clear()
    for width in (16, 24, 40, 48, 56):
        tiny.encode_image(torch.randn(1, 3, 16, width))
    assert len(tiny._pos_cache) == 3
