"""python -m gem_model.eval --dataset voc --root VOCdevkit/VOC2012 [--protocol naclip] [--slide] ...

Zero-shot semantic segmentation mIoU on a standard benchmark (docs/EVALUATION.md): one confusion
matrix over the whole set, a per-class IoU table and a final line `mIoU: 46.20`.
`--protocol gem|clearclip|naclip` evaluates as that method's authors do (gem_model.protocols);
every other flag given overrides one choice of the preset.
`--oracle` predicts the ground truth itself and must print 100.00 (a check of the metric code).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .datasets import DATASETS, get_dataset, protocol_classes
from .errors import GemError
from .model import MODES, POS_EMBED_RESIZES
from .protocols import CROP_FITS, PAMR_AT, PROB_OVER, PROTOCOLS, RESIZES, Protocol, protocol


def resolve_protocol(args: argparse.Namespace, dataset: str) -> Protocol:
    """The preset of --protocol for this dataset, with every flag that was given applied over it."""
    from .pamr import parse_dilations

    preset = protocol(args.protocol, dataset)
    changes = {}
    for flag, field in (("mode", "method"), ("image_size", "image_size"), ("resize", "resize"),
                        ("crop_fit", "crop_fit"), ("pamr_iters", "pamr_iters"), ("pamr_at", "pamr_at"),
                        ("pos_embed", "pos_embed"), ("names", "names"), ("bg_threshold", "bg_threshold"),
                        ("logit_scale", "logit_scale"), ("prob_over", "prob_over")):
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value
    if args.pamr_dilations is not None:
        changes["pamr_dilations"] = parse_dilations(args.pamr_dilations)
    if args.crop is not None or args.stride is not None or args.slide:
        crop = args.crop if args.crop is not None else (preset.slide_crop or 448)
        stride = args.stride if args.stride is not None else (preset.slide_stride or 224)
        changes["slide_crop"], changes["slide_stride"] = (crop, min(stride, crop)) if crop else (0, 0)
    return preset.replace(**changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gem_model.eval",
                                     description="Zero-shot semantic segmentation mIoU of GEM on a benchmark.")
    parser.add_argument("--dataset", required=True, choices=[*DATASETS, "folder"])
    parser.add_argument("--root", required=True, help="dataset folder, laid out as its official release")
    parser.add_argument("--split", default="val", help="split name (default: %(default)s)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag, checkpoint file, or 'none' for random weights (default: %(default)s)")
    parser.add_argument("--model-config", default=None, help="JSON config for an architecture open_clip does not name")
    parser.add_argument("--cache-dir", default=None, help="where open_clip keeps downloaded weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--protocol", default="gem", choices=list(PROTOCOLS),
                        help="evaluate as this method's authors do: method, resize, windows, softmax, "
                             "background threshold, PAMR, positional embeddings, class names "
                             "(default: %(default)s; docs/EVALUATION.md). The flags below override it")
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="training-free method (default: the protocol's)")
    parser.add_argument("--gem-depth", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=None,
                        help="short side fed to the model, pixels (gem 448, clearclip 448, naclip 336)")
    parser.add_argument("--resize-mode", default="short", choices=["short", "long", "square"],
                        help="with --resize patch: which side gets --image-size (default: %(default)s)")
    parser.add_argument("--resize", default=None, choices=list(RESIZES),
                        help="patch: sides rounded to the patch size, windows averaged per token (gem); "
                             "exact: mmsegmentation's rescale, windows averaged per pixel (clearclip, naclip)")
    parser.add_argument("--slide", action="store_true",
                        help="sliding windows of --crop every --stride pixels (448/224 unless given)")
    parser.add_argument("--crop", type=int, default=None, help="sliding window side, pixels; 0 = whole image")
    parser.add_argument("--stride", type=int, default=None, help="sliding window step, pixels")
    parser.add_argument("--crop-fit", default=None, choices=list(CROP_FITS),
                        help="with --resize exact: pad windows to the patch size (clearclip) or drop the "
                             "remainder and stretch the map (naclip)")
    parser.add_argument("--pamr-iters", type=int, default=None, help="PAMR refinement iterations; 0 = off")
    parser.add_argument("--pamr-dilations", default=None,
                        help="PAMR dilations, e.g. 8,16 (default: the protocol's; gem 1,2,4,8,12,24)")
    parser.add_argument("--pamr-at", default=None, choices=list(PAMR_AT),
                        help="refine at the model input's resolution or the original image's")
    parser.add_argument("--pos-embed", default=None, choices=list(POS_EMBED_RESIZES),
                        help="positional-embedding resize: antialias (gem) or authors (clearclip, naclip)")
    parser.add_argument("--names", default=None, choices=["project", "clearclip", "naclip"],
                        help="class names: the project's lists or the authors' (default: the protocol's)")
    parser.add_argument("--templates", default="imagenet80", choices=["imagenet80", "simple", "single"],
                        help="prompt templates averaged per class name (default: %(default)s)")
    parser.add_argument("--bg-threshold", type=float, default=None,
                        help="pixels whose best class probability is below this become background "
                             "(datasets with a background class; 0 = off; default: the protocol's)")
    parser.add_argument("--logit-scale", type=float, default=None,
                        help="softmax scale for --bg-threshold (gem 50, clearclip 50, naclip 40)")
    parser.add_argument("--prob-over", default=None, choices=list(PROB_OVER),
                        help="softmax over the class maxima (gem) or over every name, then the max per class")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--oracle", action="store_true",
                        help="predict the ground truth itself (checks the metric: must print 100.00)")
    parser.add_argument("--json", default=None, help="also write the result (per-class IoU, mIoU) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = get_dataset(args.dataset, args.root)
        samples = spec.reader(Path(args.root), args.split)
        if args.limit:
            samples = samples[:args.limit]
        if not samples:
            raise GemError(f"no samples found in {args.root}")
        if args.oracle:
            from .segmentation import evaluate

            result = evaluate(_OracleSamples(samples), _oracle_predict, spec.class_names,
                              progress=not args.no_progress)
        else:
            from .factory import create_gem_model
            from .segmentation import Segmenter, evaluate, prompt_templates

            chosen = resolve_protocol(args, args.dataset)
            print(f"protocol: {format_protocol(chosen)}", flush=True)
            windows_in_model = chosen.resize == "patch"   # exact: the segmenter windows the image itself
            pretrained = None if str(args.pretrained).lower() in ("", "none") else args.pretrained
            model = create_gem_model(args.model, pretrained, device=args.device, gem_depth=args.gem_depth,
                                     precision=args.precision, model_config=args.model_config,
                                     cache_dir=args.cache_dir, mode=chosen.method,
                                     slide_crop=chosen.slide_crop if windows_in_model else 0,
                                     slide_stride=chosen.slide_stride if windows_in_model else 0,
                                     pos_embed_resize=chosen.pos_embed)
            segmenter = Segmenter(model, protocol_classes(spec, chosen.names), prompt_templates(args.templates),
                                  resize_mode=args.resize_mode, background=spec.background,
                                  protocol=chosen)
            result = evaluate(samples, segmenter.predict, spec.class_names, progress=not args.no_progress)
    except GemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{spec.title}: {result.images} images, {result.seconds:.1f} s "
          f"({1000 * result.seconds / max(1, result.images):.0f} ms/image)")
    print(result.table())
    print(f"aAcc: {100 * result.matrix.pixel_accuracy():.2f}")
    print(f"mIoU: {result.miou:.2f}")
    if args.json:
        iou = result.matrix.iou()
        Path(args.json).write_text(json.dumps({
            "dataset": args.dataset, "images": result.images, "mIoU": round(result.miou, 4),
            "per_class": {n: (None if v != v else round(100 * float(v), 4))
                          for n, v in zip(result.class_names, iou)},
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "protocol": None if args.oracle else dataclasses.asdict(resolve_protocol(args, args.dataset)),
        }, indent=2))
    return 0


def format_protocol(p: Protocol) -> str:
    windows = f"windows {p.slide_crop}/{p.slide_stride or p.slide_crop}" if p.slide_crop else "whole image"
    pamr = (f"PAMR {p.pamr_iters}x dilations {','.join(map(str, p.pamr_dilations))} at {p.pamr_at} resolution"
            if p.pamr_iters else "no PAMR")
    return (f"{p.name} (method {p.method}, short side {p.image_size}, resize {p.resize}, {windows}"
            f"{', crops ' + p.crop_fit if p.resize == 'exact' else ''}, softmax of {p.logit_scale:g} x cosine "
            f"over {p.prob_over}, background threshold {p.bg_threshold:g}, {pamr}, positional embeddings "
            f"{p.pos_embed}, {p.names} names)")


class _OracleSamples(list):
    """Samples whose image is replaced by their own label, so that the oracle predicts it."""

    def __iter__(self):
        for ref in super().__iter__():
            sample = ref.load()
            sample.image = sample.label
            yield sample


def _oracle_predict(label, size):
    return label


if __name__ == "__main__":
    sys.exit(main())
