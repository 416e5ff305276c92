"""ClearCLIP / NACLIP modes, sliding windows and PAMR against plain float64 implementations of
their papers' equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from gem_model import InvalidInputError, create_gem_model
from gem_model.model import window_starts
from gem_model.pamr import pamr
from test_gem_core import PROMPTS, _layer_norm, _unit, clip_tokenizer, reference_input_tokens


def make(tiny_model_files, **kwargs):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), **kwargs)


# ---------------------------------------------------------------------------------------------
# Reference: loops, float64. Every block but the last as in CLIP; the last block's output is
# out_proj(attention(LN1(x))) with no residual and no MLP, the attention per head being
#   clearclip: softmax(q q^T / sqrt(d)) v
#   naclip:    softmax(k k^T / sqrt(d) + G) v, G_ij = exp(-|p_i - p_j|^2 / (2 sigma^2)) between
#              patches (grid coordinates), 0 wherever the class token is involved
# ---------------------------------------------------------------------------------------------
def reference_variant(clip, images, prompts, mode, sigma=5.0):
    clip, x, (b, h, w) = reference_input_tokens(clip, images)
    visual = clip.visual
    blocks = visual.transformer.resblocks
    n_tokens = x.shape[1]
    gauss = torch.zeros(n_tokens, n_tokens, dtype=torch.float64)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            gauss[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * sigma ** 2))
    for index, block in enumerate(blocks):
        heads = block.attn.num_heads
        y = _layer_norm(block.ln_1, x)
        qkv = y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
        q, k, v = qkv.chunk(3, dim=-1)
        d = q.shape[-1] // heads
        last = index == len(blocks) - 1
        out = torch.zeros_like(q)
        for n in range(b):
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                qh, kh, vh = q[n, :, sl], k[n, :, sl], v[n, :, sl]
                if not last:
                    logits = qh @ kh.T / math.sqrt(d)
                elif mode == "clearclip":
                    logits = qh @ qh.T / math.sqrt(d)
                else:
                    logits = kh @ kh.T / math.sqrt(d) + gauss
                out[n, :, sl] = torch.softmax(logits, dim=-1) @ vh
        if last:
            x = block.attn.out_proj(out)
        else:
            x = x + block.attn.out_proj(out)
            x = x + block.mlp(_layer_norm(block.ln_2, x))
    tokens = _unit(_layer_norm(visual.ln_post, x[:, 1:]) @ visual.proj).reshape(b, h, w, -1)
    text = _unit(torch.stack([
        clip.encode_text(clip_tokenizer(clip)([f"a photo of a {pr}."]))[0] for pr in prompts]))
    sims = torch.einsum("bhwd,pd->bphw", tokens, text)
    return F.interpolate(sims, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("mode,sigma,size", [
    ("clearclip", 5.0, (32, 32)),
    ("clearclip", 5.0, (40, 56)),
    ("naclip", 5.0, (32, 48)),
    ("naclip", 1.5, (48, 40)),
])
def test_modes_match_float64_reference(tiny_model_files, mode, sigma, size):
    model = make(tiny_model_files, mode=mode, naclip_sigma=sigma)
    torch.manual_seed(3)
    images = torch.randn(2, 3, *size)
    ours = model(images, PROMPTS, normalize=False)
    ref = reference_variant(model.clip, images, PROMPTS, mode, sigma)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0), (ours.double() - ref).abs().max()


def test_modes_differ_from_gem_and_each_other(tiny_model_files):
    images = torch.randn(1, 3, 32, 40)
    maps = {m: make(tiny_model_files, mode=m)(images, PROMPTS, normalize=False)
            for m in ("gem", "clearclip", "naclip")}
    assert (maps["gem"] - maps["clearclip"]).abs().max() > 1e-3
    assert (maps["clearclip"] - maps["naclip"]).abs().max() > 1e-3
    # The plain CLIP path is the same whatever the mode.
    ori = [make(tiny_model_files, mode=m)(images, PROMPTS, normalize=False, return_ori=True)
           for m in ("gem", "naclip")]
    assert torch.allclose(ori[0], ori[1], atol=1e-5)


def test_unknown_mode_is_rejected(tiny_model_files):
    with pytest.raises(InvalidInputError, match="mode"):
        make(tiny_model_files, mode="sclip")


# -- sliding windows ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gem", "naclip"])
def test_one_window_covering_the_image_equals_the_plain_path(tiny_model_files, mode):
    images = torch.randn(2, 3, 32, 48)
    plain = make(tiny_model_files, mode=mode)
    slid = make(tiny_model_files, mode=mode, slide_crop=48, slide_stride=16)
    assert torch.equal(plain.encode_image(images).gem, slid.encode_image(images).gem)
    assert torch.equal(plain(images, PROMPTS), slid(images, PROMPTS))


def test_windows_are_averaged_token_by_token(tiny_model_files):
    """Reference: every window encoded on its own, normalised tokens summed per patch and divided
    by the number of windows covering it (= the mean of the windows' similarity maps)."""
    model = make(tiny_model_files)
    images = torch.randn(2, 3, 40, 56)
    crop, stride, p = 24, 16, 8
    total = torch.zeros(2, 5, 7, model.clip.visual.proj.shape[1], dtype=torch.float64)
    count = torch.zeros(5, 7, dtype=torch.float64)
    for y in (0, 16):                # 40 = 16 + 24: the last window flush with the border
        for x in (0, 16, 32):        # 56 = 32 + 24
            tokens = model.encode_image(images[:, :, y:y + crop, x:x + crop]).gem.double()
            total[:, y // p:(y + crop) // p, x // p:(x + crop) // p] += tokens
            count[y // p:(y + crop) // p, x // p:(x + crop) // p] += 1
    expected = total / count[None, :, :, None]
    model.set_sliding_window(crop, stride)
    ours = model.encode_image(images).gem.double()
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-6)
    maps = model(images, PROMPTS, normalize=False)
    assert maps.shape == (2, len(PROMPTS), 40, 56)


def test_window_starts():
    assert window_starts(448, 448, 224) == [0]
    assert window_starts(300, 448, 224) == [0]
    assert window_starts(896, 448, 224) == [0, 224, 448]
    assert window_starts(600, 448, 224) == [0, 152]
    assert window_starts(1000, 448, 224) == [0, 224, 448, 552]


@pytest.mark.parametrize("crop,stride", [(20, 8), (24, 12), (16, 24), (0, 8)])
def test_bad_window_settings(tiny_model_files, crop, stride):
    with pytest.raises(InvalidInputError, match="slide"):
        make(tiny_model_files, slide_crop=crop, slide_stride=stride)


# -- PAMR --------------------------------------------------------------------------------------
def reference_pamr(image, masks, iterations, dilations, lam):
    """Per pixel: neighbours are the 8 pixels at each dilation (clamped into the image);
    k = -mean_c |I_c(i) - I_c(j)| / (lam * sigma_c), sigma_c the unbiased std of channel c over the
    3x3 window at every dilation, centre included (9 values per dilation), as Araslanov and Roth's
    code computes it; alpha = softmax over the neighbours; m(i) <- sum_j alpha m(j), `iterations` times."""
    image, masks = image.double(), masks.double()
    _, chans, height, width = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

    def at(t, y, x):
        return t[0, :, min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    alpha = torch.zeros(height, width, len(offsets), dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            nb = torch.stack([at(image, y + dy, x + dx) for dy, dx in offsets])      # [M, C]
            window = torch.cat([torch.stack([at(image, y + dy * d, x + dx * d)
                                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
                                for d in dilations])                                  # [9D, C]
            n = window.shape[0]
            mean = window.sum(dim=0) / n
            sigma = (((window - mean) ** 2).sum(dim=0) / (n - 1)).sqrt()
            k = (-(image[0, :, y, x] - nb).abs() / (lam * sigma + 1e-8)).mean(dim=1)
            alpha[y, x] = torch.softmax(k, dim=0)
    for _ in range(iterations):
        new = torch.zeros_like(masks)
        for y in range(height):
            for x in range(width):
                new[0, :, y, x] = sum(alpha[y, x, n] * at(masks, y + dy, x + dx)
                                      for n, (dy, dx) in enumerate(offsets))
        masks = new
    return masks


@pytest.mark.parametrize("dilations", [(1, 2, 4), (8, 16), (3,)])
def test_pamr_matches_reference(dilations):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 9, 11)
    masks = torch.rand(1, 2, 9, 11)
    ours = pamr(image, masks, iterations=3, dilations=dilations, lam=0.1)
    ref = reference_pamr(image, masks, 3, dilations, 0.1)
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours.double() - ref).abs().max()


def test_pamr_sigma_is_the_authors_not_the_neighbours_biased_std():
    """The old sigma (biased, 8 neighbours) gives visibly different maps: the reference would catch
    a silent return to it."""
    torch.manual_seed(1)
    image, masks = torch.rand(1, 3, 9, 11), torch.rand(1, 2, 9, 11)
    ours = pamr(image, masks, iterations=3, dilations=(1, 2))
    nb = torch.stack([F.pad(image, (2, 2, 2, 2), mode="replicate")[..., 2 + dy:11 + dy, 2 + dx:13 + dx]
                      for d in (1, 2) for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx], dim=2)
    old_sigma = nb.std(dim=2, unbiased=False, keepdim=True)
    new_window = torch.cat([nb, image.unsqueeze(2).expand(-1, -1, 2, -1, -1)], dim=2)
    assert not torch.allclose(old_sigma, new_window.std(dim=2, keepdim=True), atol=1e-3)
    assert (ours - reference_pamr(image, masks, 3, (1, 2), 0.1).float()).abs().max() < 1e-5


def test_pamr_dilations_are_parsed_and_checked():
    from gem_model.pamr import parse_dilations
    assert parse_dilations("8,16") == (8, 16) == parse_dilations("8 16") == parse_dilations([8, 16])
    for bad in ("", "0,2", "a", (), (-1,)):
        with pytest.raises(InvalidInputError, match="dilations"):
            parse_dilations(bad)


def test_pamr_follows_colour_edges():
    """A mask blurred across a sharp colour edge is pulled back to the edge."""
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0
    image += 0.01 * torch.randn_like(image)
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    masks = torch.cat([1 - ramp, ramp], dim=1)
    out = pamr(image, masks, iterations=10)
    decided = out.argmax(dim=1)[0]
    assert (decided[:, :8] == 0).all() and (decided[:, 8:] == 1).all()
    left = out[0, 1, :, :8].mean()
    assert left < masks[0, 1, :, :8].mean()   # the wrong class faded on the left side


def test_pamr_zero_iterations_and_bad_shapes():
    masks = torch.rand(1, 2, 5, 5)
    assert pamr(torch.rand(1, 3, 5, 5), masks, iterations=0) is masks
    with pytest.raises(InvalidInputError):
        pamr(torch.rand(1, 3, 4, 5), masks)


def test_model_pamr_option_refines_the_similarity_maps(tiny_model_files):
    images = torch.randn(2, 3, 32, 40)
    plain = make(tiny_model_files)
    refined = make(tiny_model_files, pamr_iters=3, pamr_dilations=(1, 3))
    sims = plain(images, PROMPTS, normalize=False)                  # at the input size
    expected = pamr(images, sims, iterations=3, dilations=(1, 3))
    ours = refined(images, PROMPTS, normalize=False)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours - sims).abs().max() > 1e-3
    # Maps requested at another size are refined first, then resized.
    features = refined.encode_image(images)
    small = refined.similarity(features, PROMPTS, output_size=(16, 20))
    assert torch.allclose(small, F.interpolate(expected, size=(16, 20), mode="bilinear",
                                               align_corners=False), atol=1e-5)


def test_predictor_keeps_the_pamr_guide_through_its_cache(tiny_model_files):
    import numpy as np
    from gem_model import HeatmapPredictor
    image = np.random.default_rng(0).integers(0, 255, (30, 44, 3), dtype=np.uint8)
    predictor = HeatmapPredictor(make(tiny_model_files, pamr_iters=2), image_size=32)
    first = predictor.similarity(predictor.encode([image])[0], ["cat"])
    again = predictor.encode([image])[0]
    assert again.cached and again.features.guide is not None
    assert np.array_equal(first, predictor.similarity(again, ["cat"]))
    plain = HeatmapPredictor(make(tiny_model_files), image_size=32)
    assert np.abs(plain.similarity(plain.encode([image])[0], ["cat"]) - first).max() > 1e-4
