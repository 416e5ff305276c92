"""Each method's evaluation protocol (gem_model.protocols) against a float64 transcription of its
authors' procedure, written here from their papers and the protocol description (docs/EVALUATION.md,
"Protocols"), on the tiny random models.

The tiny model's patches are 8 pixels where ViT-B/16's are 16, so the pixel sizes of a preset
(short side, window, stride) are halved in these tests: the windows then hold as many patches as
the authors' do. Every other choice is the preset's own.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gem_model import InvalidInputError, create_gem_model
from gem_model.datasets import DATASETS, protocol_classes
from gem_model.model import resize_patch_positions
from gem_model.protocols import Protocol, protocol
from gem_model.segmentation import Segmenter, authors_resize, centre_padding
from test_gem_core import _layer_norm, _unit, clip_tokenizer, reference_maps

TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]
CLASSES = [("sky", "wall", "road"), ("cat", "kitten"), ("dog",), ("car", "truck")]   # class 0: background
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073), dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711), dtype=torch.float64).view(1, 3, 1, 1)


def make(tiny_model_files, **kwargs):
    name, config_path, checkpoint = tiny_model_files
    return create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path), **kwargs)


def halved(p: Protocol) -> Protocol:
    return p.replace(image_size=p.image_size // 2, slide_crop=p.slide_crop // 2, slide_stride=p.slide_stride // 2)


def blob_image(height, width, seed=0):
    """Smooth colour blobs plus noise: PAMR has edges to follow."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(yy / 7.0 + c) * np.cos(xx / 9.0 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# The reference, float64 throughout.
# ---------------------------------------------------------------------------------------------
def ref_cubic_resize(grid_pos, out_h, out_w, scale_h, scale_w):
    """Bicubic (Keys, a = -0.75) without antialiasing: output i samples source (i + 0.5) / scale - 0.5,
    taps clamped to the border. grid_pos [C, h0, w0] -> [C, out_h, out_w]."""
    def weights(t):
        a = -0.75
        def w(x):
            x = abs(x)
            if x <= 1:
                return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
            if x < 2:
                return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
            return 0.0
        base = math.floor(t)
        return [(base + k, w(t - (base + k))) for k in (-1, 0, 1, 2)]

    _, h0, w0 = grid_pos.shape
    # separable: rows first, then columns, each output a 4-tap weighted sum of clamped inputs
    rows = torch.zeros(out_h, h0, dtype=torch.float64)
    for i in range(out_h):
        for yi, wy in weights((i + 0.5) / scale_h - 0.5):
            rows[i, min(max(yi, 0), h0 - 1)] += wy
    cols = torch.zeros(out_w, w0, dtype=torch.float64)
    for j in range(out_w):
        for xj, wx in weights((j + 0.5) / scale_w - 0.5):
            cols[j, min(max(xj, 0), w0 - 1)] += wx
    return torch.einsum("ia,cab,jb->cij", rows, grid_pos, cols)


_POSITIONS = {}


def ref_authors_positions(clip, h, w):
    key = (id(clip), h, w)
    if key not in _POSITIONS:
        _POSITIONS[key] = (clip, _ref_authors_positions(clip, h, w))
    return _POSITIONS[key][1]


def _ref_authors_positions(clip, h, w):
    """ClearCLIP's and NACLIP's positional embeddings for an h x w grid: the native ones when the
    grid is native, else bicubic by the scale factors (h + 0.1) / h0 and (w + 0.1) / w0."""
    pos = clip.visual.positional_embedding.double()
    h0, w0 = clip.visual.grid_size
    if (h, w) == (h0, w0):
        return pos
    grid = pos[1:].reshape(h0, w0, -1).permute(2, 0, 1)
    grid = ref_cubic_resize(grid, h, w, (h + 0.1) / h0, (w + 0.1) / w0)
    return torch.cat([pos[:1], grid.permute(1, 2, 0).reshape(h * w, -1)])


def ref_tokens(clip, crop, method, sigma=5.0):
    """L2-normalised patch embeddings [h, w, D] of one normalised window [3, H, W] (H, W multiples
    of the patch): every block as CLIP, the last one out_proj(attention(LN1(x))), no residual, no
    MLP; clearclip attention softmax(q q^T / sqrt(d)) v, naclip softmax(k k^T / sqrt(d) + G) v."""
    visual = clip.visual
    p = visual.patch_size[0]
    h, w = crop.shape[-2] // p, crop.shape[-1] // p
    x = F.conv2d(crop[None], visual.conv1.weight, stride=p).flatten(2).transpose(1, 2)[0]   # [h*w, C]
    x = torch.cat([visual.class_embedding.view(1, -1), x]) + ref_authors_positions(clip, h, w)
    x = _layer_norm(visual.ln_pre, x)
    n = x.shape[0]
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    gauss = torch.zeros(n, n, dtype=torch.float64)
    gauss[1:, 1:] = torch.exp(-((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2) / (2 * sigma ** 2))
    blocks = visual.transformer.resblocks
    for index, block in enumerate(blocks):
        heads = block.attn.num_heads
        qkv = _layer_norm(block.ln_1, x) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
        q, k, v = (t.reshape(n, heads, -1).transpose(0, 1) for t in qkv.chunk(3, dim=-1))   # [H, n, d]
        d = q.shape[-1]
        last = index == len(blocks) - 1
        if not last:
            logits = q @ k.transpose(1, 2) / math.sqrt(d)
        elif method == "clearclip":
            logits = q @ q.transpose(1, 2) / math.sqrt(d)
        else:
            logits = k @ k.transpose(1, 2) / math.sqrt(d) + gauss
        out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(n, -1)
        if last:
            x = block.attn.out_proj(out)
        else:
            x = x + block.attn.out_proj(out)
            x = x + block.mlp(_layer_norm(block.ln_2, x))
    return _unit(_layer_norm(visual.ln_post, x[1:]) @ visual.proj).reshape(h, w, -1)


def ref_text(clip, names):
    """Per name: the mean of the unit text embeddings of every template, made unit again."""
    tokenizer = clip_tokenizer(clip)
    out = []
    for name in names:
        emb = torch.stack([_unit(clip.encode_text(tokenizer([t.format(name)]))[0]) for t in TEMPLATES])
        out.append(_unit(emb.mean(0)))
    return torch.stack(out)


def ref_rescale(image, short, long_max=2048):
    """mmsegmentation's keep-ratio rescale: factor min(long_max / long, short / short side), sides
    int(side * factor + 0.5), bilinear (no antialiasing), rounded to 8-bit values."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64)).permute(2, 0, 1)[None]
    height, width = pixels.shape[-2:]
    factor = min(long_max / max(height, width), short / min(height, width))
    size = (int(height * factor + 0.5), int(width * factor + 0.5))
    if size == (height, width):
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)


def ref_windows(length, crop, stride):
    """mmsegmentation's slide_inference: (start, end) of each window along one side."""
    out = []
    for i in range(max(length - crop + stride - 1, 0) // stride + 1):
        end = min(i * stride + crop, length)
        out.append((max(end - crop, 0), end))
    return out


def ref_window_logits(clip, crop, method, fit, text):
    """Per-name cosine maps [Q, H, W] of one window [3, H, W]."""
    p = clip.visual.patch_size[0]
    height, width = crop.shape[-2:]
    if fit == "pad":      # zeros around the centre up to a multiple of the patch, cut off afterwards
        ph, pw = (-height) % p, (-width) % p
        top, left = ph // 2, pw // 2
        padded = F.pad(crop, (left, pw - left, top, ph - top))
        sims = torch.einsum("hwd,qd->qhw", ref_tokens(clip, padded, method), text)
        sims = F.interpolate(sims[None], size=padded.shape[-2:], mode="bilinear", align_corners=False)[0]
        return sims[:, top:top + height, left:left + width]
    # floor: what a stride-p convolution reads, the map stretched back over the window
    tokens = ref_tokens(clip, crop[:, :height // p * p, :width // p * p], method)
    sims = torch.einsum("hwd,qd->qhw", tokens, text)
    return F.interpolate(sims[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def ref_pamr(image, masks, iterations, dilations):
    """Araslanov and Roth's PAMR: image [C, H, W], masks [K, H, W]; borders replicated."""
    _, height, width = image.shape
    ys, xs = torch.arange(height), torch.arange(width)

    def at(t, dy, dx):
        return t[:, (ys + dy).clamp(0, height - 1)][:, :, (xs + dx).clamp(0, width - 1)]

    window = torch.stack([at(image, dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    m = window.shape[0]
    sigma = (((window - window.sum(0) / m) ** 2).sum(0) / (m - 1)).sqrt()            # [C, H, W]
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    kernel = torch.stack([(-(image - at(image, dy, dx)).abs() / (0.1 * sigma + 1e-8)).mean(0)
                          for dy, dx in offsets])                                      # [M, H, W]
    alpha = torch.softmax(kernel, dim=0)
    for _ in range(iterations):
        masks = sum(alpha[n] * at(masks, dy, dx) for n, (dy, dx) in enumerate(offsets))
    return masks


def ref_authors_probabilities(clip, image, classes, p: Protocol):
    """ClearCLIP / NACLIP: class probabilities [C, H0, W0] at the image's own size."""
    clip = copy.deepcopy(clip).double()
    names = [n for c in classes for n in c]
    owner = [i for i, c in enumerate(classes) for _ in c]
    text = ref_text(clip, names)
    x = (ref_rescale(image, p.image_size) / 255.0 - MEAN) / STD                     # [1, 3, h, w]
    height, width = x.shape[-2:]
    if p.slide_crop:
        total = torch.zeros(len(names), height, width, dtype=torch.float64)
        count = torch.zeros(height, width, dtype=torch.float64)
        for y1, y2 in ref_windows(height, p.slide_crop, p.slide_stride):
            for x1, x2 in ref_windows(width, p.slide_crop, p.slide_stride):
                total[:, y1:y2, x1:x2] += ref_window_logits(clip, x[0, :, y1:y2, x1:x2], p.method, p.crop_fit, text)
                count[y1:y2, x1:x2] += 1
        logits = total / count
    else:
        logits = ref_window_logits(clip, x[0], p.method, p.crop_fit, text)
    size = (image.height, image.width)
    logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    if p.pamr_iters:
        guide = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
        logits = ref_pamr(guide, logits, p.pamr_iters, p.pamr_dilations)
    prob = torch.softmax(p.logit_scale * logits, dim=0)                           # over every name
    return torch.stack([prob[[q for q, o in enumerate(owner) if o == c]].amax(0) for c in range(len(classes))])


def ref_labels(prob, threshold, background=0):
    labels = prob.argmax(0)
    labels[prob.amax(0) < threshold] = background
    return labels


# ---------------------------------------------------------------------------------------------
# Presets: the values the authors' repositories run with.
# ---------------------------------------------------------------------------------------------
def test_presets_hold_the_authors_choices():
    c = {k: protocol("clearclip", k) for k in ("voc", "voc20", "context", "context60", "coco-object", "ade", "cityscapes")}
    assert {k: v.bg_threshold for k, v in c.items()} == {
        "voc": 0.5, "voc20": 0.0, "context": 0.0, "context60": 0.15, "coco-object": 0.4, "ade": 0.0, "cityscapes": 0.0}
    assert {(v.image_size, v.slide_crop, v.slide_stride) for k, v in c.items() if k != "cityscapes"} == {(448, 448, 224)}
    assert (c["cityscapes"].image_size, c["cityscapes"].slide_crop, c["cityscapes"].slide_stride) == (448, 224, 224)
    for v in c.values():
        assert (v.method, v.resize, v.crop_fit, v.logit_scale, v.prob_over, v.pamr_iters, v.pos_embed, v.names) == \
            ("clearclip", "exact", "pad", 50.0, "names", 0, "authors", "clearclip")

    n = {k: protocol("naclip", k) for k in ("voc", "voc20", "context", "context60", "coco-object", "ade", "cityscapes")}
    assert {k: v.bg_threshold for k, v in n.items()} == {
        "voc": 0.1, "voc20": 0.0, "context": 0.0, "context60": 0.1, "coco-object": 0.1, "ade": 0.0, "cityscapes": 0.0}
    assert {k: (v.image_size, v.slide_crop, v.slide_stride) for k, v in n.items()} == {
        "voc": (336, 0, 0), "voc20": (336, 0, 0), "context": (336, 224, 112), "context60": (336, 224, 112),
        "coco-object": (336, 224, 112), "ade": (336, 224, 112), "cityscapes": (560, 224, 112)}
    for v in n.values():
        assert (v.method, v.resize, v.crop_fit, v.logit_scale, v.prob_over, v.pamr_iters, v.pamr_dilations,
                v.pamr_at, v.pos_embed, v.names) == \
            ("naclip", "exact", "floor", 40.0, "names", 10, (8, 16), "original", "authors", "naclip")

    g = protocol("gem", "voc")
    assert (g.method, g.image_size, g.resize, g.slide_crop, g.logit_scale, g.prob_over, g.bg_threshold,
            g.pamr_iters, g.pos_embed, g.names) == ("gem", 448, "patch", 0, 50.0, "classes", 0.0, 0, "antialias", "project")
    with pytest.raises(InvalidInputError, match="protocol"):
        protocol("sclip", "voc")


def test_authors_class_names():
    voc = protocol_classes(DATASETS["voc"], "naclip")
    assert voc[4] == ("ship",) and voc[11] == ("table",) and voc[16] == ("pottedplant",)
    assert voc[15][0] == "person" and len(voc[15]) == 7 and len(voc[20]) == 5 and len(voc[0]) == 26
    clear = protocol_classes(DATASETS["voc"], "clearclip")
    assert clear[0] == ("background",) and clear[20] == ("tvmonitor",) and clear[15] == ("person",)
    assert protocol_classes(DATASETS["context60"], "naclip")[0] == ("background",)
    assert protocol_classes(DATASETS["coco-object"], "naclip")[1][-1] == "body"
    assert protocol_classes(DATASETS["ade"], "clearclip")[44] == ("chestofdrawers",)
    assert protocol_classes(DATASETS["cityscapes"], "naclip")[6:8] == [("trafficlight",), ("trafficsign",)]
    assert protocol_classes(DATASETS["voc"], "project") == DATASETS["voc"].classes


# ---------------------------------------------------------------------------------------------
# Pieces against the reference.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(5, 7), (3, 3), (9, 4)])
def test_authors_positional_embedding_resize(grid):
    torch.manual_seed(0)
    pos = torch.randn(1, 6, 4, 4)
    ours = resize_patch_positions(pos, grid, "authors")
    ref = ref_cubic_resize(pos[0].double(), *grid, (grid[0] + 0.1) / 4, (grid[1] + 0.1) / 4)
    assert ours.shape == (1, 6, *grid)
    assert torch.allclose(ours[0].double(), ref, atol=1e-5), (ours[0].double() - ref).abs().max()
    other = resize_patch_positions(pos, grid, "antialias")
    assert (other - ours).abs().max() > 1e-3     # the option changes something


def test_rescale_and_padding_rules():
    image = blob_image(60, 85)
    ours = authors_resize(image, 168)
    assert tuple(ours.shape) == (3, 168, 238)                 # 85 * 2.8 + 0.5 -> 238
    assert torch.equal(ours.double(), ref_rescale(image, 168)[0])
    assert tuple(authors_resize(blob_image(10, 2000), 336).shape) == (3, 10, 2048)   # long side capped
    assert centre_padding(220, 224, 16) == (0, 0, 2, 2)
    assert centre_padding(33, 35, 16) == (6, 7, 7, 8)


# ---------------------------------------------------------------------------------------------
# Whole presets against the reference.
# ---------------------------------------------------------------------------------------------
def _compare(model, preset, image, background=0):
    seg = Segmenter(model, CLASSES, TEMPLATES, background=background, protocol=preset)
    ours = seg.probabilities(image).double()
    ref = ref_authors_probabilities(model.clip, image, CLASSES, preset)
    assert ours.shape == ref.shape == (len(CLASSES), image.height, image.width)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    labels = torch.from_numpy(seg.predict(image))
    expected = ref_labels(ref, preset.bg_threshold, background)
    # a pixel whose two best classes tie to float precision may go either way
    top2 = ref.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-6) & ((ref.amax(0) - preset.bg_threshold).abs() > 1e-6)
    assert torch.equal(labels[decided], expected[decided])
    assert decided.float().mean() > 0.99
    return ours, ref


@pytest.mark.parametrize("dataset", ["voc", "context60"])
def test_naclip_preset_matches_the_authors_procedure(tiny_model_files, dataset):
    """voc: the whole image with a remainder the patch convolution drops (238 = 29 * 8 + 6 px);
    context60: 112/56 windows. Both: logit scale 40, threshold 0.1 over every name, PAMR (8, 16)
    x 10 at the original resolution on the per-name maps, the authors' positional embeddings."""
    preset = halved(protocol("naclip", dataset))
    model = make(tiny_model_files, mode="naclip", pos_embed_resize="authors")
    image = blob_image(60, 85, seed=1)
    ours, ref = _compare(model, preset, image)
    # PAMR was part of it: without it the maps differ
    no_pamr = Segmenter(model, CLASSES, TEMPLATES, background=0, protocol=preset.replace(pamr_iters=0))
    assert (no_pamr.probabilities(image).double() - ref).abs().max() > 1e-3


@pytest.mark.parametrize("image_size", [224, 220])
def test_clearclip_preset_matches_the_authors_procedure(tiny_model_files, image_size):
    """224: 224/112 windows over a 224 x 317 image; 220: windows of 220 rows, zero-padded to 224
    around the centre and cut back. Logit scale 50, threshold 0.5 over every name, no PAMR."""
    preset = halved(protocol("clearclip", "voc")).replace(image_size=image_size)
    model = make(tiny_model_files, mode="clearclip", pos_embed_resize="authors")
    _compare(model, preset, blob_image(60, 85, seed=2))


def test_gem_preset_matches_the_gem_reference(tiny_model_files):
    """The project's protocol: sides rounded to the patch, GEM maps per name, each class its best
    name, resized to the image, softmax of 50 x cosine over the class maxima."""
    preset = protocol("gem", "voc").replace(image_size=32, bg_threshold=0.5)
    model = make(tiny_model_files)
    image = blob_image(30, 45, seed=3)
    seg = Segmenter(model, CLASSES, ["a photo of a {}."], background=0, protocol=preset)
    x = seg.transform(image).unsqueeze(0)
    names = [n for c in CLASSES for n in c]
    maps = reference_maps(model.clip, x, names, 7, 1, None)[0]                      # [Q, h, w], float64
    owner = [i for i, c in enumerate(CLASSES) for _ in c]
    scores = torch.stack([maps[[q for q, o in enumerate(owner) if o == c]].amax(0) for c in range(len(CLASSES))])
    scores = F.interpolate(scores[None], size=(30, 45), mode="bilinear", align_corners=False)[0]
    ref = torch.softmax(50.0 * scores, dim=0)
    ours = seg.probabilities(image).double()
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert np.array_equal(seg.predict(image), ref_labels(ref, 0.5).numpy())


def test_flags_override_single_choices(tmp_path):
    from gem_model.eval import build_parser, resolve_protocol
    args = build_parser().parse_args(["--dataset", "voc", "--root", str(tmp_path), "--protocol", "naclip",
                                      "--pamr-iters", "0", "--bg-threshold", "0.3", "--crop", "448",
                                      "--stride", "224", "--pamr-dilations", "1,2"])
    p = resolve_protocol(args, "voc")
    assert (p.pamr_iters, p.bg_threshold, p.slide_crop, p.slide_stride, p.pamr_dilations) == (0, 0.3, 448, 224, (1, 2))
    assert (p.method, p.image_size, p.logit_scale, p.prob_over, p.pos_embed) == ("naclip", 336, 40.0, "names", "authors")
    plain = resolve_protocol(build_parser().parse_args(["--dataset", "voc", "--root", "x", "--protocol", "clearclip"]),
                             "voc")
    assert plain == protocol("clearclip", "voc")
    old_style = resolve_protocol(build_parser().parse_args(["--dataset", "ade", "--root", "x", "--slide", "--mode",
                                                            "naclip"]), "ade")
    assert (old_style.method, old_style.slide_crop, old_style.slide_stride, old_style.resize) == ("naclip", 448, 224, "patch")


def test_exact_resize_refuses_a_model_that_windows_itself(tiny_model_files):
    model = make(tiny_model_files, slide_crop=16, slide_stride=8)
    with pytest.raises(InvalidInputError, match="exact"):
        Segmenter(model, CLASSES, TEMPLATES, background=0, protocol=protocol("clearclip", "voc"))


def test_model_rejects_an_unknown_positional_embedding_resize(tiny_model_files):
    with pytest.raises(InvalidInputError, match="pos_embed_resize"):
        make(tiny_model_files, pos_embed_resize="nearest")
    # the option reaches the encoder: a non-native grid changes, the native one does not
    images = torch.randn(1, 3, 40, 56)
    a, b = make(tiny_model_files), make(tiny_model_files, pos_embed_resize="authors")
    assert (a.encode_image(images).gem - b.encode_image(images).gem).abs().max() > 1e-4
    native = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.encode_image(native).gem, b.encode_image(native).gem)
