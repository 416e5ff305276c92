"""GEM on an open_clip ViT: a parallel self-self attention path in the last blocks.

For a ViT with L blocks and gem_depth D, blocks L-D+1 .. L-1 (the last D-1) keep their original
computation and, beside it, feed a GEM stream g that starts as the tokens entering the first
modified block and accumulates only attention outputs (no MLP):

    y = LN1(x);  q, k, v = in_proj(y)              (x: tokens of the ORIGINAL path)
    x <- x + Attn(y);  x <- x + MLP(LN2(x))         original path, unchanged
    g <- g + out_proj((o_q + o_k + o_v) / 3)        GEM path (see attention.py)

Patch tokens of LN_post(g) @ proj, L2-normalised, against L2-normalised text embeddings give the
per-prompt cosine-similarity maps.

Other training-free modes change only the LAST block (all earlier blocks run unchanged), with no
residual connection and no MLP, so the block's output is out_proj(attention(LN1(x))):

    clearclip (Lan et al., ECCV 2024):     softmax(q q^T / sqrt(d)) v
    naclip (Hajimiri et al., WACV 2025):   softmax(k k^T / sqrt(d) + G) v,
        G_ij = exp(-|p_i - p_j|^2 / (2 sigma^2)) for patch positions p (in patches), 0 for the class token

Sliding windows (`slide_crop`, `slide_stride`, in pixels): the image is covered by crop x crop windows
every `stride` pixels (the last one flush with the border); each window is encoded on its own and the
L2-normalised tokens of overlapping windows are averaged, which equals averaging their similarity maps.

PAMR (`pamr_iters` > 0, gem_model.pamr, at `pamr_dilations`): the similarity maps are refined at
the model input's resolution, guided by the input image, before they are resized to the requested size.

Positional embeddings on another patch grid (`pos_embed_resize`): "antialias" resamples them bicubic,
antialiased, to the grid size (the GEM package's way, the default); "authors" is ClearCLIP's and
NACLIP's way: bicubic without antialiasing, by the scale factor (grid + 0.1) / native grid, so the
sample positions are those of a grid 0.1 patch larger (docs/GEM.md, "Positional embeddings").
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (adaptive_temperature, gaussian_neighbourhood_bias, lowp_cpu, multi_head_attention,
                        neighbourhood_attention, query_query_attention, self_self_attention)
from .errors import InvalidInputError, UnsupportedModelError
from .pamr import DEFAULT_DILATIONS, parse_dilations, pamr


@dataclass
class ImageFeatures:
    """What the image path gives; it does not depend on the prompts.

    gem:  [B, h, w, D] L2-normalised GEM patch embeddings (float32; with sliding windows, the mean
          of the overlapping windows' normalised embeddings)
    ori:  [B, h, w, D] L2-normalised plain CLIP patch embeddings, or None when not computed
    input_size: (H, W) of the image tensor that produced them
    guide: [B, 3, H, W] that image tensor, kept only when the model refines maps with PAMR
    """
    gem: torch.Tensor
    ori: Optional[torch.Tensor]
    input_size: tuple[int, int]
    guide: Optional[torch.Tensor] = None

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.gem.shape[1], self.gem.shape[2]

    def __len__(self) -> int:
        return self.gem.shape[0]

    def __getitem__(self, index) -> "ImageFeatures":
        index = slice(index, index + 1) if isinstance(index, int) else index
        return ImageFeatures(self.gem[index], None if self.ori is None else self.ori[index],
                             self.input_size, None if self.guide is None else self.guide[index])

    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.gem, self.ori, self.guide) if t is not None)


# On CPU a batch runs in slices of at most this many tokens (two 448x448 images). Larger slices
# do not make the matrix products faster (785 tokens already fill them), but their activations
# outgrow glibc's 32 MiB mmap threshold and are page-faulted afresh by every op: ViT-B/16 at 448,
# batch 8 in one pass took 2-10% longer per image and 2.7x the peak memory (746 vs 274 MiB;
# docs/PERFORMANCE.md, "Batching").
CPU_TOKENS_PER_PASS = 2048

# Resampled positional embeddings kept per patch-grid size (oldest dropped first).
_POS_CACHE_SIZE = 64

MODES = ("gem", "clearclip", "naclip")
POS_EMBED_RESIZES = ("antialias", "authors")


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of `crop` every `stride` along `length`, the last one flush with the
    end; one window at 0 when the crop covers the length."""
    if crop >= length:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def _check_block(block: nn.Module, index: int) -> None:
    attn = getattr(block, "attn", None)
    if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim
            and all(hasattr(block, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))):
        raise UnsupportedModelError(
            f"block {index} of the image tower is a {type(block).__name__}; GEM needs open_clip's "
            f"ResidualAttentionBlock with nn.MultiheadAttention (standard CLIP ViTs)")


def _is_standard_block(block: nn.Module) -> bool:
    """open_clip's ResidualAttentionBlock with plain self-attention (what `_block_forward` computes)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn
            and all(hasattr(block, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))


def _norm(layer: nn.Module, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """A LayerNorm of x in x's precision (its weights cast to it), the result in `compute`.

    On the CPU bf16 road the residual streams stay fp32 and the norms run in fp32; only what
    feeds a matrix product is bf16 (see `GemModel.stream_dtype`). With equal dtypes this is the
    layer itself.
    """
    if layer.weight is None or layer.weight.dtype == x.dtype:
        return layer(x).to(compute)
    weight = layer.weight.to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps).to(compute)


def _block_forward(block: nn.Module, x: torch.Tensor, compute: Optional[torch.dtype] = None) -> torch.Tensor:
    """open_clip ResidualAttentionBlock.forward for batch-first self-attention, x [B, N, C].

    The same sums as nn.MultiheadAttention, but its inference fast path computes the attention
    with explicit matmuls; SDPA's fused kernel is faster on CPU and GPU (docs/PERFORMANCE.md).
    compute: the weights' dtype when it differs from x's (the fp32 stream of the CPU bf16 road).
    """
    compute = compute or x.dtype
    attn: nn.MultiheadAttention = block.attn
    qkv = F.linear(_norm(block.ln_1, x, compute), attn.in_proj_weight, attn.in_proj_bias)    # [B, N, 3C]
    x = x + block.ls_1(attn.out_proj(multi_head_attention(qkv, attn.num_heads)))
    return x + block.ls_2(block.mlp(_norm(block.ln_2, x, compute)))


def _causal_argmax_text_tower(clip: nn.Module) -> bool:
    """True for open_clip's CLIP with a causal text mask and EOT (argmax) pooling: the towers whose
    text embedding ignores every token after the end-of-text token."""
    from open_clip.model import CLIP

    mask = getattr(clip, "attn_mask", None)
    pos = getattr(clip, "positional_embedding", None)
    if not (isinstance(clip, CLIP) and getattr(clip, "text_pool_type", None) == "argmax"
            and isinstance(mask, torch.Tensor) and isinstance(pos, torch.Tensor)
            and mask.dim() == 2 and mask.shape[0] == mask.shape[1] == pos.shape[0]):
        return False
    future = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[future]).all() and (mask[~future] == 0).all())


class GemModel(nn.Module):
    """A CLIP ViT with GEM's self-self attention path. Inference only.

    Call it as `model(images, prompts)`, or split the work: `encode_image` once, then
    `similarity` for any number of prompts.
    """

    def __init__(self, clip: nn.Module, tokenizer, gem_depth: int = 7, ss_attn_iter: int = 1,
                 ss_attn_temp: Optional[float] = None, prompt_template: str = "a photo of a {}.",
                 text_cache_size: int = 4096, mode: str = "gem", naclip_sigma: float = 5.0,
                 slide_crop: int = 0, slide_stride: int = 0, pamr_iters: int = 0,
                 pamr_dilations: Sequence[int] = DEFAULT_DILATIONS, pos_embed_resize: str = "antialias"):
        super().__init__()
        visual = getattr(clip, "visual", None)
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"GEM needs a ViT image tower; this model's is {type(visual).__name__}. "
                f"Supported: open_clip VisionTransformer towers (ViT-B-16, ViT-L-14, ...)")
        if visual.attn_pool is not None:
            raise UnsupportedModelError("image towers with an attentional pooler (CoCa) are not supported")
        blocks = visual.transformer.resblocks
        if not 2 <= gem_depth <= len(blocks) + 1:
            raise InvalidInputError(f"gem_depth must be between 2 and {len(blocks) + 1} "
                                    f"for this {len(blocks)}-block model, got {gem_depth}")
        if ss_attn_iter < 0:
            raise InvalidInputError(f"ss_attn_iter must be >= 0, got {ss_attn_iter}")
        if ss_attn_temp is not None and not ss_attn_temp > 0:
            raise InvalidInputError(f"ss_attn_temp must be positive or None (adaptive), got {ss_attn_temp}")
        self.first_gem_block = len(blocks) - (gem_depth - 1)
        for i in range(self.first_gem_block, len(blocks)):
            _check_block(blocks[i], i)
        if "{}" not in prompt_template:
            raise InvalidInputError("prompt_template must contain '{}' where the prompt goes")
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if pamr_iters < 0:
            raise InvalidInputError(f"pamr_iters must be >= 0, got {pamr_iters}")
        if pos_embed_resize not in POS_EMBED_RESIZES:
            raise InvalidInputError(f"pos_embed_resize must be one of {', '.join(POS_EMBED_RESIZES)}, "
                                    f"got {pos_embed_resize!r}")
        if not naclip_sigma > 0:
            raise InvalidInputError(f"naclip_sigma must be positive, got {naclip_sigma}")
        if mode != "gem":
            _check_block(blocks[-1], len(blocks) - 1)

        self.clip = clip
        self.tokenizer = tokenizer
        self.gem_depth = gem_depth
        self.ss_attn_iter = ss_attn_iter
        self.ss_attn_temp = ss_attn_temp
        self.prompt_template = prompt_template
        self.mode = mode
        self.naclip_sigma = float(naclip_sigma)
        self.pamr_iters = int(pamr_iters)
        self.pamr_dilations = parse_dilations(pamr_dilations)
        self.pos_embed_resize = pos_embed_resize
        self.slide_crop = 0
        self.slide_stride = 0
        self.set_sliding_window(slide_crop, slide_stride)
        self.model_name = ""
        self.pretrained = None
        self._text_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._text_cache_size = text_cache_size
        self._text_lock = threading.Lock()
        self._pos_cache: dict = {}
        self._truncate_text = _causal_argmax_text_tower(clip)

    # -- properties -----------------------------------------------------------------------------
    @property
    def visual(self):
        return self.clip.visual

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def stream_dtype(self) -> torch.dtype:
        """dtype of the residual streams (x, GEM's g) and of the norms.

        The weights' dtype, except bf16 on CPU: there the streams and LayerNorms stay fp32 and
        only the matrix products and attention run in bf16 (their weight matrices stored in bf16,
        the rest fp32: `_fp32_kept`). Rounding
        the residual stream to bf16 at every block moved the best prompt of ~1.7% of pixels;
        the fp32 stream costs a cast per product input (docs/PERFORMANCE.md, "bf16 on CPU").
        """
        weights = self.dtype
        return torch.float32 if lowp_cpu(self.visual.conv1.weight) else weights

    @property
    def preprocess_cfg(self) -> dict:
        from open_clip.model import get_model_preprocess_cfg

        return get_model_preprocess_cfg(self.clip)

    def _apply(self, fn, *args, **kwargs):
        # Cached tensors live on the old device/dtype; drop them when the model moves.
        self._pos_cache = {}
        with self._text_lock:
            self._text_cache.clear()
        before = {name: t.detach() for name, t in self._fp32_kept() if t.dtype == torch.float32}
        out = super()._apply(fn, *args, **kwargs)
        if lowp_cpu(self.visual.conv1.weight):
            for name, t in self._fp32_kept():
                if name in before and t.dtype != torch.float32:
                    t.data = before[name].to(t.device)
        return out

    def _fp32_kept(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters and buffers that stay fp32 when the model is made bf16 on CPU: the whole
        text tower, and the image tower's LayerNorms, class and positional embeddings and final
        projection. Only the matrices of the image tower's products (and their biases) are bf16.

        Rounding the stored weights, not the bf16 arithmetic, is what moves the maps: an fp32
        model holding bf16-rounded copies of all weights changed the masks as much as the bf16
        model (per-mask IoU 0.962 mean, min 0.766 on the benchmark scenes), and the text tower's
        and the small tensors' rounding were most of it; with these kept the masks' IoU is 0.99+
        (docs/PERFORMANCE.md, "bf16 on CPU"). They cost ~126 MB more than bf16 on ViT-B/16 (the
        text tower), and save the widening copy of the text tower that each new prompt paid.
        """
        visual = self.visual
        norms = {f"visual.{name}" for name, m in visual.named_modules() if isinstance(m, nn.LayerNorm)}
        small = {"visual.positional_embedding", "visual.class_embedding", "visual.proj"}
        named = list(self.clip.named_parameters()) + list(self.clip.named_buffers())
        return [(name, t) for name, t in named if t.is_floating_point()
                and (not name.startswith("visual.") or name in small or name.rpartition(".")[0] in norms)]

    def set_sliding_window(self, crop: int = 0, stride: int = 0) -> None:
        """Encode images in crop x crop windows every `stride` pixels (0 = off; stride 0 = crop)."""
        crop, stride = int(crop or 0), int(stride or 0)
        if crop < 0 or stride < 0:
            raise InvalidInputError(f"slide crop and stride must be >= 0, got {crop} and {stride}")
        if crop:
            stride = stride or crop
            p = max(self.patch_size)
            if crop % p or stride % p:
                raise InvalidInputError(f"slide crop and stride must be multiples of the patch size {p}, "
                                        f"got {crop} and {stride}")
            if stride > crop:
                raise InvalidInputError(f"slide stride {stride} is larger than the crop {crop}: "
                                        f"parts of the image would be skipped")
        elif stride:
            raise InvalidInputError("a slide stride needs a slide crop")
        self.slide_crop, self.slide_stride = crop, stride

    # -- image path -----------------------------------------------------------------------------
    def _positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1 + h*w, C] positional embedding resampled to the patch grid (`pos_embed_resize`)."""
        pos = self.visual.positional_embedding
        native = tuple(self.visual.grid_size)
        if grid == native:
            return pos
        key = (grid, pos.dtype, pos.device, self.pos_embed_resize)
        cached = self._pos_cache.get(key)
        if cached is None:
            cls_pos, patch_pos = pos[:1], pos[1:]
            patch_pos = patch_pos.reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
            patch_pos = resize_patch_positions(patch_pos.float(), grid, self.pos_embed_resize)
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
            cached = torch.cat([cls_pos, patch_pos])
            if len(self._pos_cache) >= _POS_CACHE_SIZE:   # one entry per grid size seen: bound it
                self._pos_cache.pop(next(iter(self._pos_cache)))
            self._pos_cache[key] = cached
        return cached

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidInputError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        ph, pw = self.patch_size
        h, w = images.shape[-2:]
        if h % ph or w % pw or h == 0 or w == 0:
            raise InvalidInputError(f"image height and width must be positive multiples of the patch "
                                    f"size {ph}x{pw}, got {h}x{w} (use get_gem_img_transform)")

    def encode_tokens(self, images: torch.Tensor, return_ori: bool = False):
        """Projected patch tokens (not normalised), [B, h*w, D] each: (gem, ori or None)."""
        self._check_images(images)
        visual = self.visual
        batch = images.shape[0]
        compute, stream = self.dtype, self.stream_dtype
        x = visual.conv1(images.to(device=self.device, dtype=compute))     # [B, C, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2).to(stream)                         # [B, h*w, C]
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        x = _norm(visual.ln_pre, x, stream)                                 # [B, N, C], N = 1 + h*w

        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        first_special = self.first_gem_block if self.mode == "gem" else len(blocks) - 1
        for block in blocks[:first_special]:
            if _is_standard_block(block):
                x = _block_forward(block, x, compute)
            else:
                y = x.to(compute)
                y = block(y) if batch_first else block(y.transpose(0, 1)).transpose(0, 1)
                x = y.to(stream)

        if self.mode != "gem":
            return self._encode_last_block_variant(x, grid, return_ori)

        g = x
        last = len(blocks) - 1
        for i in range(self.first_gem_block, len(blocks)):
            block = blocks[i]
            attn: nn.MultiheadAttention = block.attn
            y = _norm(block.ln_1, x, stream)
            qkv = F.linear(y.to(compute), attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3C]
            head_dim = qkv.shape[-1] // (3 * attn.num_heads)
            temperature = (adaptive_temperature(y, head_dim) if self.ss_attn_temp is None
                           else self.ss_attn_temp)
            # The original path after the last block is only needed for the plain CLIP map.
            original = i < last or return_ori
            o, a = self_self_attention(qkv, attn.num_heads, temperature, self.ss_attn_iter,
                                       original=original)
            g = g + block.ls_1(attn.out_proj(o))
            if original:
                x = x + block.ls_1(attn.out_proj(a))
                x = x + block.ls_2(block.mlp(_norm(block.ln_2, x, compute)))

        return self._project(g), (self._project(x) if return_ori else None)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post and the projection of the patch tokens, in the stream's precision (fp32 on the
        CPU bf16 road: one small product, and the maps' last rounding stays out)."""
        visual = self.visual
        tokens = _norm(visual.ln_post, tokens[:, 1:], tokens.dtype)
        return tokens @ visual.proj.to(tokens.dtype) if visual.proj is not None else tokens

    def _encode_last_block_variant(self, x: torch.Tensor, grid: tuple[int, int], return_ori: bool):
        """ClearCLIP / NACLIP: x [B, N, C] entering the last block -> projected tokens (method, ori)."""
        blocks = self.visual.transformer.resblocks
        block = blocks[-1]
        attn: nn.MultiheadAttention = block.attn
        compute = self.dtype
        qkv = F.linear(_norm(block.ln_1, x, compute), attn.in_proj_weight, attn.in_proj_bias)
        if self.mode == "clearclip":
            out = query_query_attention(qkv, attn.num_heads)
        else:
            bias = gaussian_neighbourhood_bias(grid, self.naclip_sigma, device=x.device, dtype=x.dtype)
            out = neighbourhood_attention(qkv, attn.num_heads, bias)
        tokens = block.ls_1(attn.out_proj(out))        # no residual, no MLP
        ori = None
        if return_ori:
            ori = x + block.ls_1(attn.out_proj(multi_head_attention(qkv, attn.num_heads)))
            ori = self._project(ori + block.ls_2(block.mlp(_norm(block.ln_2, ori, compute))))
        return self._project(tokens.to(x.dtype)), ori

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor, return_ori: bool = False) -> ImageFeatures:
        """[B, 3, H, W] preprocessed images -> ImageFeatures (text independent).

        With a sliding window set (`set_sliding_window`) and an image larger than the crop, the
        windows are encoded (as one batch) and their tokens averaged where they overlap.
        """
        features = self._encode_windows(images, return_ori)
        if self.pamr_iters:
            features.guide = images.to(device=features.gem.device, dtype=torch.float32)
        return features

    def _encode_windows(self, images: torch.Tensor, return_ori: bool) -> ImageFeatures:
        self._check_images(images)
        crop, stride = self.slide_crop, self.slide_stride
        height, width = images.shape[-2:]
        if not crop or (height <= crop and width <= crop):
            return self._encode_plain(images, return_ori)
        ph, pw = self.patch_size
        ch, cw = min(crop, height), min(crop, width)
        windows = [(y, x) for y in window_starts(height, ch, stride) for x in window_starts(width, cw, stride)]
        crops = torch.cat([images[:, :, y:y + ch, x:x + cw] for y, x in windows])   # window-major
        parts = self._encode_plain(crops, return_ori)
        batch = images.shape[0]

        def blend(tokens: torch.Tensor) -> torch.Tensor:
            total = tokens.new_zeros(batch, height // ph, width // pw, tokens.shape[-1])
            count = tokens.new_zeros(1, height // ph, width // pw, 1)
            for j, (y, x) in enumerate(windows):
                rows, cols = slice(y // ph, (y + ch) // ph), slice(x // pw, (x + cw) // pw)
                total[:, rows, cols] += tokens[j * batch:(j + 1) * batch]
                count[:, rows, cols] += 1
            return total / count

        return ImageFeatures(blend(parts.gem), None if parts.ori is None else blend(parts.ori),
                             (height, width))

    def _encode_plain(self, images: torch.Tensor, return_ori: bool = False) -> ImageFeatures:
        ph, pw = self.patch_size
        h, w = images.shape[-2] // ph, images.shape[-1] // pw
        step = images.shape[0]
        if self.device.type == "cpu":
            step = max(1, CPU_TOKENS_PER_PASS // (1 + h * w))
        parts = [self.encode_tokens(images[i:i + step], return_ori=return_ori)
                 for i in range(0, images.shape[0], step)]
        gem = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        ori = (torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]) if return_ori else None

        def to_grid(tokens):
            return F.normalize(tokens.float(), dim=-1).reshape(tokens.shape[0], h, w, -1)

        return ImageFeatures(to_grid(gem), None if ori is None else to_grid(ori),
                             (images.shape[-2], images.shape[-1]))

    # -- text path ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """[P, D] L2-normalised float32 embeddings of `prompt_template.format(prompt)`, cached."""
        prompts = _check_prompts(prompts)
        # One lock for lookup, encoding and eviction: text encoding is cheap next to the image
        # path, and holding it keeps the LRU consistent under concurrent requests.
        with self._text_lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
            if missing:
                tokens = self.tokenizer([self.prompt_template.format(p) for p in missing])
                embeddings = F.normalize(self._text_features(tokens).float(), dim=-1)
                # clone: a row of `embeddings` is a view that would keep the whole batch alive
                self._text_cache.update((p, e.clone()) for p, e in zip(missing, embeddings))
            for p in prompts:
                self._text_cache.move_to_end(p)
            out = torch.stack([self._text_cache[p] for p in prompts])
            while len(self._text_cache) > max(self._text_cache_size, len(prompts)):
                self._text_cache.popitem(last=False)
        return out

    def text_cache_bytes(self) -> tuple[int, int]:
        """(bytes held, bound in bytes) of the prompt-embedding cache: `text_cache_size` prompts."""
        with self._text_lock:
            held = sum(e.numel() * e.element_size() for e in self._text_cache.values())
            dim = next(iter(self._text_cache.values())).numel() if self._text_cache else 0
        return held, self._text_cache_size * dim * 4   # float32 rows

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """clip.encode_text(tokens) [P, D] for tokenizer output [P, 77], computed on the shortest
        token prefix that gives the same result.

        CLIP's text tower is causal and reads its output at the end-of-text token, so the padding
        after the longest prompt's EOT cannot change it: "a photo of a cat." is 8 of the 77
        positions, and the tower runs ~8x fewer tokens. open_clip's encode_text adds the full
        77-long positional embedding and mask, so it runs with those two cut to the prefix
        (torch.func.functional_call swaps them for this one call, under the text lock).
        """
        length = int(tokens.argmax(dim=-1).max()) + 1      # tokens still on the CPU: no GPU sync
        clip = self.clip
        swap = self._text_weights_fp32()
        if self._truncate_text and length < tokens.shape[1]:
            swap["positional_embedding"] = swap.get("positional_embedding", clip.positional_embedding)[:length]
            swap["attn_mask"] = swap.get("attn_mask", clip.attn_mask)[:length, :length]
            tokens = tokens[:, :length]
        if not swap:
            return clip.encode_text(tokens.to(self.device))
        out = torch.func.functional_call(clip, swap, args=(), kwargs={"text": tokens.to(self.device)})
        return out["text_features"] if isinstance(out, dict) else out[1]

    def _text_weights_fp32(self) -> dict:
        """{name: fp32 copy} of the text tower's weights when they are stored in lower precision.

        The text embeddings are part of the similarity, which stays fp32: with the text tower in
        bf16 (cosine 0.99992 to fp32) the best prompt of 0.6-1.9% of pixels changed on the
        benchmark scenes, against 0.1-0.3% for the bf16 image path alone. On the CPU bf16 road
        the text tower is stored in fp32 (`_fp32_kept`) and this is empty; on a GPU in bf16 or
        fp16 the weights are widened for the call (a new prompt is rare: embeddings are cached),
        which computes in fp32 but cannot undo their rounding.
        """
        if self.dtype == torch.float32:
            return {}
        named = list(self.clip.named_parameters()) + list(self.clip.named_buffers())
        return {name: t.float() for name, t in named
                if not name.startswith("visual.") and t.is_floating_point() and t.dtype != torch.float32}

    # -- matching -------------------------------------------------------------------------------
    @torch.inference_mode()
    def similarity(self, features: ImageFeatures, prompts: Sequence[str], normalize: bool = False,
                   return_ori: bool = False, output_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Cosine similarity maps [B, P, H, W], bilinearly upsampled to `output_size`
        (default: the input tensor's size). `normalize` min-max scales each map to [0, 1]."""
        tokens = features.ori if return_ori else features.gem
        if tokens is None:
            raise InvalidInputError("these features were encoded without return_ori=True")
        text = self.encode_text(prompts).to(tokens.device)                     # [P, D]
        sims = torch.einsum("bhwd,pd->bphw", tokens, text)                      # [B, P, h, w]
        sims = self.grid_to_image(features, sims, output_size)
        return minmax_normalize(sims) if normalize else sims

    @torch.inference_mode()
    def grid_to_image(self, features: ImageFeatures, maps: torch.Tensor,
                      output_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Maps on the patch grid [B, K, h, w] -> [B, K, H, W] at `output_size` (default: the input's
        size): PAMR when enabled, then bilinear. Every map (text, prototype, exemplar) goes through
        here, so refinement is the same whatever the map came from."""
        size = tuple(output_size or features.input_size)
        maps = maps.to(features.gem.device)
        if self.pamr_iters and features.guide is not None:
            # PAMR at the model input's resolution, guided by that image (its per-channel
            # normalisation cancels in PAMR's affinities).
            maps = F.interpolate(maps, size=features.input_size, mode="bilinear", align_corners=False)
            maps = pamr(features.guide, maps, iterations=self.pamr_iters, dilations=self.pamr_dilations)
        if maps.shape[-2:] != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return maps

    @torch.inference_mode()
    def embedding_similarity(self, features: ImageFeatures, embeddings: torch.Tensor,
                             output_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Cosine similarity maps [B, K, H, W] of the GEM patch embeddings against arbitrary vectors
        [K, D] (L2-normalised here, as text embeddings are), upsampled like `similarity`."""
        tokens = features.gem
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32, device=tokens.device)
        if embeddings.dim() != 2 or embeddings.shape[1] != tokens.shape[-1]:
            raise InvalidInputError(f"embeddings must be [K, {tokens.shape[-1]}], got {tuple(embeddings.shape)}")
        sims = torch.einsum("bhwd,kd->bkhw", tokens, F.normalize(embeddings, dim=-1))
        return self.grid_to_image(features, sims, output_size)

    def forward(self, images: torch.Tensor, prompts: Sequence[str], normalize: bool = True,
                return_ori: bool = False) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images, P prompts -> [B, P, H, W] heatmaps.

        With return_ori=True the maps come from the plain CLIP tokens instead of GEM's.
        """
        features = self.encode_image(images, return_ori=return_ori)
        return self.similarity(features, prompts, normalize=normalize, return_ori=return_ori)

    def batched_forward(self, images: torch.Tensor, prompts: Sequence[Sequence[str]],
                        normalize: bool = True, return_ori: bool = False) -> list[torch.Tensor]:
        """Different prompts per image: one [P_i, H, W] tensor per image."""
        if len(prompts) != images.shape[0]:
            raise InvalidInputError(f"got {images.shape[0]} images but {len(prompts)} prompt lists")
        features = self.encode_image(images, return_ori=return_ori)
        return [self.similarity(features[i], image_prompts, normalize=normalize,
                                return_ori=return_ori)[0]
                for i, image_prompts in enumerate(prompts)]


def resize_patch_positions(grid_pos: torch.Tensor, grid: tuple[int, int], how: str = "antialias") -> torch.Tensor:
    """Patch positional embeddings [1, C, h0, w0] -> [1, C, *grid], bicubic.

    antialias: sampled for the output size, antialiased when shrinking.
    authors:   ClearCLIP's and NACLIP's resize, by the scale factors (g + 0.1) / g0 with no
               antialiasing; the output still has g positions per side, but each sits where the
               (g + 0.1)-grid would put it ((i + 0.5) g0 / (g + 0.1) - 0.5 in source positions).
    """
    if how == "antialias":
        return F.interpolate(grid_pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
    if how != "authors":
        raise InvalidInputError(f"pos_embed_resize must be one of {', '.join(POS_EMBED_RESIZES)}, got {how!r}")
    h0, w0 = grid_pos.shape[-2:]
    factors = ((grid[0] + 0.1) / h0, (grid[1] + 0.1) / w0)
    out = F.interpolate(grid_pos, scale_factor=factors, mode="bicubic", align_corners=False,
                        recompute_scale_factor=False)
    if tuple(out.shape[-2:]) != tuple(grid):     # floor(g0 * (g + 0.1) / g0) is g unless rounding bites
        raise InvalidInputError(f"positional embedding resize gave {tuple(out.shape[-2:])} for grid {grid}")
    return out


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale each [..., H, W] map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values.unsqueeze(-1)
    high = flat.max(dim=-1, keepdim=True).values.unsqueeze(-1)
    return (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise InvalidInputError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("at least one prompt is needed")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InvalidInputError(f"every prompt must be a non-empty string, got {p!r}")
    return prompts
