"""python -m gem_model.eval --dataset voc --root VOCdevkit/VOC2012 [--slide] [--mode clearclip] ...

Zero-shot semantic segmentation mIoU on a standard benchmark (docs/EVALUATION.md): one confusion
matrix over the whole set, a per-class IoU table and a final line `mIoU: 46.20`.
`--oracle` predicts the ground truth itself and must print 100.00 (a check of the metric code).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .datasets import DATASETS, get_dataset
from .errors import GemError


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
    parser.add_argument("--mode", default="gem", choices=["gem", "clearclip", "naclip"],
                        help="training-free method (default: %(default)s)")
    parser.add_argument("--gem-depth", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=448,
                        help="short side fed to the model, pixels (default: %(default)s)")
    parser.add_argument("--resize-mode", default="short", choices=["short", "long", "square"])
    parser.add_argument("--slide", action="store_true", help="sliding-window inference (--crop, --stride)")
    parser.add_argument("--crop", type=int, default=448, help="sliding window side, pixels (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=224, help="sliding window step, pixels (default: %(default)s)")
    parser.add_argument("--pamr-iters", type=int, default=0, help="PAMR refinement iterations; 0 = off")
    parser.add_argument("--templates", default="imagenet80", choices=["imagenet80", "simple", "single"],
                        help="prompt templates averaged per class name (default: %(default)s)")
    parser.add_argument("--bg-threshold", type=float, default=0.0,
                        help="pixels whose best class probability is below this become background "
                             "(datasets with a background class; 0 = off)")
    parser.add_argument("--logit-scale", type=float, default=50.0,
                        help="softmax scale for --bg-threshold (default: %(default)s)")
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

            pretrained = None if str(args.pretrained).lower() in ("", "none") else args.pretrained
            model = create_gem_model(args.model, pretrained, device=args.device, gem_depth=args.gem_depth,
                                     precision=args.precision, model_config=args.model_config,
                                     cache_dir=args.cache_dir, mode=args.mode,
                                     slide_crop=args.crop if args.slide else 0,
                                     slide_stride=args.stride if args.slide else 0)
            segmenter = Segmenter(model, spec.classes, prompt_templates(args.templates),
                                  image_size=args.image_size, resize_mode=args.resize_mode,
                                  background=spec.background, bg_threshold=args.bg_threshold,
                                  logit_scale=args.logit_scale, pamr_iters=args.pamr_iters)
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
        }, indent=2))
    return 0


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
