"""python -m gem_model IMAGE --prompt cat --prompt "remote control" --out heatmaps.png"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from PIL import Image, ImageOps, UnidentifiedImageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gem_model",
        description="Write GEM heatmaps of text prompts over an image as an overlay picture.")
    parser.add_argument("image", help="image file (any size, any aspect ratio)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text prompt; repeat for several (one panel each)")
    parser.add_argument("--out", default="heatmaps.png", help="output picture (default: %(default)s)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip pretrained tag, a local checkpoint file, or none for random "
                             "weights (default: %(default)s)")
    parser.add_argument("--model-config", default=None,
                        help="JSON config for an architecture open_clip does not name")
    parser.add_argument("--cache-dir", default=None, help="where downloaded weights are kept")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--image-size", type=int, default=448,
                        help="short side fed to the model, in pixels (default: %(default)s)")
    parser.add_argument("--resize-mode", default="short", choices=["short", "long", "square"])
    parser.add_argument("--gem-depth", type=int, default=7)
    parser.add_argument("--ss-attn-iter", type=int, default=1)
    parser.add_argument("--ss-attn-temp", type=float, default=None,
                        help="fixed temperature (default: adaptive)")
    parser.add_argument("--panel-width", type=int, default=384, help="width of each panel in pixels")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from . import GemError, HeatmapPredictor, create_gem_model
    from .viz import overlay_panels

    try:
        image = ImageOps.exif_transpose(Image.open(args.image)).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        print(f"error: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        model = create_gem_model(args.model, args.pretrained, device=args.device,
                                 gem_depth=args.gem_depth, ss_attn_iter=args.ss_attn_iter,
                                 ss_attn_temp=args.ss_attn_temp, precision=args.precision,
                                 model_config=args.model_config, cache_dir=args.cache_dir)
        loaded = time.perf_counter()
        predictor = HeatmapPredictor(model, image_size=args.image_size, resize_mode=args.resize_mode)
        predictor.set_image(image)
        maps = predictor.predict(args.prompt)
        done = time.perf_counter()
    except GemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overlay_panels(image, maps, args.prompt, panel_width=args.panel_width).save(args.out)
    print(f"wrote {args.out}: {len(args.prompt)} prompt(s) on a {image.width}x{image.height} image "
          f"(model load {loaded - start:.1f} s, heatmaps {done - loaded:.2f} s on {model.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
