"""The single door to a GEM model: open_clip name + weights -> `GemModel`.

Weights are an open_clip pretrained tag (downloaded once into `cache_dir`) or a local
checkpoint file, which is how offline and air-gapped sites run.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .errors import GemError, UnsupportedModelError, WeightsNotFoundError
from .model import GemModel
from .weights import cached_tag_file, check_download_possible, looks_like_checkpoint_path, parse_pretrained

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# "auto": bf16 where the hardware computes it natively (see `resolve_precision`), else fp32.
PRECISION_CHOICES = tuple(PRECISIONS) + ("auto",)

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 (Cooper Lake, Zen 4 and later),
# x86 AMX-BF16 (Sapphire Rapids and later), Arm's BF16 extension (Graviton 3, Neoverse V1/N2).
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively, and the one line that says so."""
    fast: bool
    flags: tuple[str, ...]       # the bf16 flags found
    capability: str              # torch.backends.cpu.get_cpu_capability()

    @property
    def message(self) -> str:
        if self.fast:
            return (f"CPU bf16: native ({', '.join(self.flags)}; torch {self.capability}): GEM_PRECISION=bf16 "
                    f"runs the image path in ~0.35x the fp32 time at 1 or 2 torch threads on a quiet machine (docs/PERFORMANCE.md, 'bf16 on CPU')")
        return (f"CPU bf16: not native on this CPU (no avx512_bf16, amx_bf16 or Arm bf16 flag; torch "
                f"{self.capability}): bf16 would be emulated and slower than fp32; use fp32")


def cpu_bf16_support(cpuinfo: Optional[str] = None) -> CpuBf16:
    """Native bf16 on this CPU, from /proc/cpuinfo's flags (`cpuinfo`: that file's text, for tests).

    torch's own `torch.ops.mkldnn._is_mkldnn_bf16_supported()` answers yes on any AVX-512 CPU,
    where oneDNN emulates bf16 with fp32 instructions and gains nothing; the flags say whether
    the dot-product instructions that make bf16 fast are there.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    words = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):     # x86 and arm64 spellings
            words.update(value.split())
    found = tuple(f for f in _BF16_FLAGS if f in words)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: the flags alone decide
        capability = "unknown"
    return CpuBf16(bool(found), found, capability)


def resolve_precision(precision: str, device: torch.device, cpu: Optional[CpuBf16] = None) -> str:
    """The precision a model is built in: `auto` resolved, and bf16 on a CPU without native bf16
    refused with the reason (it would be a slower path, not a faster one)."""
    if precision not in PRECISION_CHOICES:
        raise GemError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return precision
    if device.type != "cpu":
        return "fp32" if precision == "auto" else precision
    if precision in ("auto", "bf16"):
        cpu = cpu or cpu_bf16_support()
        if precision == "auto":
            return "bf16" if cpu.fast else "fp32"
        if not cpu.fast:
            raise GemError(f"precision bf16 on this CPU would be slower than fp32, not faster: {cpu.message}. "
                           f"Set GEM_PRECISION=fp32 (or auto, which picks bf16 only where it is native)")
    return precision

SUPPORTED_TOWERS = (
    "open_clip VisionTransformer image towers (ViT-*, e.g. ViT-B-16, ViT-B-32, ViT-L-14, "
    "ViT-H-14, ViT-B-16-quickgelu) built from standard residual attention blocks"
)

def normalize_model_name(model_name: str) -> str:
    """Accept the `ViT-B/16` spelling of the original CLIP release."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name
    return model_name.replace("/", "-")


def _is_supported_vision_cfg(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """None when the config describes a tower GEM supports, else the reason it does not."""
    vision = model_cfg.get("vision_cfg", {})
    if "timm_model_name" in vision:
        return f"its image tower is a timm model ({vision['timm_model_name']})"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "its image tower is a ResNet (ModifiedResNet)"
    if vision.get("attentional_pool"):
        return "its image tower ends in an attentional pooler (CoCa)"
    if any(vision.get(k) for k in ("qk_norm", "scaled_cosine_attn", "scale_heads",
                                   "scale_attn_inner", "scale_attn", "scale_fc")):
        return "its image tower uses custom attention blocks"
    return None


def available_models() -> list[tuple[str, str]]:
    """(model_name, pretrained_tag) pairs open_clip knows whose image tower GEM supports."""
    import open_clip

    pairs = []
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_model_config(name)
        if cfg is not None and _is_supported_vision_cfg(cfg) is None:
            pairs.append((name, tag))
    return pairs


def _register_config(model_name: str, model_config: Union[str, os.PathLike, Mapping[str, Any]]) -> None:
    import open_clip

    if isinstance(model_config, Mapping):
        config = dict(model_config)
    else:
        path = Path(model_config)
        if not path.is_file():
            raise GemError(f"model config file not found: {path}")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GemError(f"model config {path} is not valid JSON: {exc}") from exc
    config = config.get("model_cfg", config)
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise GemError("a model config needs 'embed_dim', 'vision_cfg' and 'text_cfg' "
                       "(the open_clip model_configs/*.json format)")
    # open_clip registers configs from files named after the model; it reads them at once
    # (add_model_config rescans), so the file is not needed afterwards.
    with tempfile.TemporaryDirectory(prefix="gem_model_cfg_") as directory:
        (Path(directory) / f"{model_name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(directory)


def load_clip(model_name: str, pretrained: Optional[str],
              model_config: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
              cache_dir: Optional[str] = None, quick_gelu: Optional[bool] = None):
    """Build the open_clip model (on the CPU) with its weights, or raise a GemError that says what to do.

    pretrained: a tag, a checkpoint file, or None / "none" for random weights.
    quick_gelu: None = as the pretrained tag was trained (OpenAI weights: QuickGELU) or as the
    architecture name says (`-quickgelu`) for checkpoint files; True/False forces it.
    """
    import open_clip

    model_name = normalize_model_name(model_name)
    pretrained = parse_pretrained(pretrained)
    if model_config is not None:
        _register_config(model_name, model_config)
    schema = model_name.split(":", 1)[0] if model_name.startswith(("hf-hub:", "local-dir:")) else None
    config = None if schema else open_clip.get_model_config(model_name)
    if schema is None and config is None:
        raise GemError(f"unknown model '{model_name}'. Use an open_clip name such as ViT-B-16 "
                       f"(see gem_model.available_models()) or pass model_config for a custom architecture")
    if config is not None:
        reason = _is_supported_vision_cfg(config)
        if reason:
            raise UnsupportedModelError(f"GEM cannot use '{model_name}': {reason}. "
                                        f"Supported: {SUPPORTED_TOWERS}.")

    kwargs: dict[str, Any] = {"device": "cpu", "cache_dir": cache_dir}
    weights = pretrained   # what open_clip is given: the tag, or the file it resolves to
    if pretrained:
        tag_cfg = None if schema else open_clip.get_pretrained_cfg(model_name, pretrained)
        if tag_cfg:
            # The OpenAI weights were trained with QuickGELU: build the matching activation even
            # when the plain name (ViT-B-16) is used, as the GEM paper does.
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            cached = cached_tag_file(tag_cfg, cache_dir)
            if cached:
                # Load the cached file directly: asking open_clip for the tag would first ask the
                # hub whether the file changed, and retry for a minute without a network. The
                # tag's preprocessing (mean, std, interpolation) is applied as the tag would.
                weights = cached
                kwargs["force_preprocess_cfg"] = dict(tag_cfg)
            else:
                check_download_possible(model_name, pretrained, tag_cfg, cache_dir)
        elif os.path.isfile(pretrained) and quick_gelu is None and config is not None \
                and not config.get("quick_gelu", False):
            # A file does not say which activation it was trained with; a wrong guess loads
            # without error and silently degrades the maps, so say it loudly.
            log.warning("loading %s with GELU. If these are OpenAI CLIP weights, use the "
                        "'%s-quickgelu' architecture (or quick_gelu=True).", pretrained, model_name)
        elif not os.path.isfile(pretrained):
            if looks_like_checkpoint_path(pretrained):
                raise WeightsNotFoundError(f"checkpoint file not found: {pretrained}")
            tags = open_clip.list_pretrained_tags_by_model(model_name) if config else []
            tags = tags or open_clip.list_pretrained_tags_by_model(model_name.removesuffix("-quickgelu"))
            raise WeightsNotFoundError(
                f"'{pretrained}' is neither a pretrained tag of {model_name} nor a checkpoint file. "
                f"Known tags: {', '.join(tags) or 'none'}")
    if quick_gelu is not None:
        kwargs["force_quick_gelu"] = bool(quick_gelu)
    try:
        clip = open_clip.create_model(model_name, pretrained=weights, **kwargs)
    except RuntimeError as exc:
        text = " ".join(str(exc).split()).rstrip(".")
        if "download" in text.lower() or "hub" in text.lower():
            raise WeightsNotFoundError(
                f"could not download weights for {model_name} / {pretrained}: {text}. "
                f"Offline? Download them once on a connected machine (python -m gem_model.prefetch "
                f"--model {model_name} --pretrained {pretrained}) and set pretrained to the file path "
                f"(it prints the architecture name to use with that file)."
            ) from exc
        raise WeightsNotFoundError(f"could not load weights {pretrained!r} for {model_name}: {text}") from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        # torch.load on a truncated or foreign file raises any of these.
        raise WeightsNotFoundError(f"could not read checkpoint {pretrained!r} for {model_name}: "
                                   f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. pickle errors from a corrupt file
        if type(exc).__module__.startswith(("pickle", "_pickle", "zipfile", "safetensors")):
            raise WeightsNotFoundError(f"checkpoint {pretrained!r} is corrupt: {exc}") from exc
        raise
    return clip, open_clip.get_tokenizer(model_name, cache_dir=cache_dir)


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GemError("device 'cuda' requested but torch sees no CUDA GPU; use device='cpu'")
    return device


def create_gem_model(model_name: str = "ViT-B-16", pretrained: Optional[str] = "openai",
                     device: Union[None, str, torch.device] = "auto", gem_depth: int = 7,
                     ss_attn_iter: int = 1, ss_attn_temp: Optional[float] = None,
                     precision: str = "fp32",
                     model_config: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
                     cache_dir: Optional[str] = None,
                     prompt_template: str = "a photo of a {}.",
                     text_cache_size: int = 4096, quick_gelu: Optional[bool] = None,
                     mode: str = "gem", naclip_sigma: float = 5.0,
                     slide_crop: int = 0, slide_stride: int = 0, pamr_iters: int = 0,
                     pamr_dilations=None, pos_embed_resize: str = "antialias") -> GemModel:
    """Load an open_clip ViT and wrap it as a GEM model, in eval mode, on `device`.

    `pretrained` is an open_clip tag (e.g. "openai", "laion2b_s34b_b88k") or a path to a local
    checkpoint; None or "none" gives random weights (tests, benchmarks). OpenAI weights need QuickGELU:
    chosen automatically for the `openai` tag; for a local file of them use the `-quickgelu`
    name (e.g. ViT-B-16-quickgelu) or quick_gelu=True.

    mode: "gem" (default), "clearclip" or "naclip" (training-free variants of the last block; see
    gem_model.model). slide_crop/slide_stride: sliding-window encoding in pixels (0 = off).
    pamr_iters: PAMR refinement of the similarity maps (gem_model.pamr; 0 = off), at pamr_dilations
    (None = gem_model.pamr.DEFAULT_DILATIONS). pos_embed_resize: "antialias" or "authors" (ClearCLIP's
    and NACLIP's positional-embedding resize; gem_model.model.resize_patch_positions).
    precision: fp32, fp16, bf16 or auto (bf16 where the CPU or GPU computes it natively, else fp32).
    bf16 on a CPU without native bf16 raises GemError (`cpu_bf16_support`). With bf16 the weights
    are stored in bf16; on CPU the residual streams, norms, text embeddings and similarity stay fp32.
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    clip, tokenizer = load_clip(model_name, pretrained, model_config, cache_dir, quick_gelu)
    model = GemModel(clip, tokenizer, gem_depth=gem_depth, ss_attn_iter=ss_attn_iter,
                     ss_attn_temp=ss_attn_temp, prompt_template=prompt_template,
                     text_cache_size=text_cache_size, mode=mode, naclip_sigma=naclip_sigma,
                     slide_crop=slide_crop, slide_stride=slide_stride, pamr_iters=pamr_iters,
                     pos_embed_resize=pos_embed_resize,
                     **({} if pamr_dilations is None else {"pamr_dilations": pamr_dilations}))
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    model.model_name = normalize_model_name(model_name)
    model.pretrained = parse_pretrained(pretrained)
    return model
