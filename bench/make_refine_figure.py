"""Before/after figures and IoU table for image-guided edge refinement (docs/REGIONS.md).

    python bench/make_refine_figure.py [--out docs/img]

Uses the synthetic scenes of tests/test_refine.py (the ones the tests check): a textured shape on a
busy background, and GEM-like maps of it (one value per 8 px patch of a 224 px image, i.e. a 28 x 28
grid, bilinearly upsampled). Writes refine_single.png (one label, independent mode) and
refine_semantic.png (two labels, semantic mode), and prints a Markdown IoU table.
Panels: image | heatmap | mask without refinement | mask with refinement; in the masks, correct
pixels have the label's colour, extra pixels are yellow and missed pixels cyan.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gem_model.regions import RegionConfig, extract_regions  # noqa: E402


def _load_scenes():
    spec = importlib.util.spec_from_file_location("refine_scenes", ROOT / "tests" / "test_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCENES = _load_scenes()
PLAIN = RegionConfig()
GUIDED = dataclasses.replace(PLAIN, refine="guided")
# viridis, sampled at 0, .25, .5, .75, 1
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
LABEL_COLOURS = np.array([[255, 64, 64], [170, 80, 255]], np.float32)


def colourise(values: np.ndarray) -> np.ndarray:
    """Min-max scaled map -> viridis RGB uint8 (display only; the pipeline never min-max scales)."""
    v = (values - values.min()) / max(float(np.ptp(values)), 1e-9) * (len(_VIRIDIS) - 1)
    lo = np.clip(np.floor(v).astype(int), 0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, masks, truths) -> np.ndarray:
    """Darkened image; correct pixels in the label's colour, extra pixels yellow, missed pixels cyan."""
    out = image.astype(np.float32) * 0.45
    for index, (mask, truth) in enumerate(zip(masks, truths)):
        out[mask & truth] = out[mask & truth] * 0.4 + LABEL_COLOURS[index] * 0.6
        out[mask & ~truth] = (255, 230, 0)
        out[truth & ~mask] = (0, 230, 255)
    return out.astype(np.uint8)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def compose(rows, titles, path: Path) -> None:
    """rows: list of (panels [uint8 HxWx3], captions) -> one PNG with a header line."""
    h, w = rows[0][0][0].shape[:2]
    pad, header, caption = 6, 22, 18
    sheet = Image.new("RGB", (len(titles) * (w + pad) + pad, header + len(rows) * (h + caption + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(titles):
        draw.text((pad + col * (w + pad), 4), title, fill="black", font=font(14))
    for row, (panels, captions) in enumerate(rows):
        y = header + row * (h + caption + pad)
        for col, (panel, text) in enumerate(zip(panels, captions)):
            x = pad + col * (w + pad)
            sheet.paste(Image.fromarray(panel), (x, y))
            draw.text((x, y + h + 2), text, fill="black", font=font(13))
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours keep the noisy synthetic images readable at a fraction of the size
    sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def masks_of(result, labels, shape):
    out = []
    for label in labels:
        mask = np.zeros(shape, bool)
        for region in result.regions:
            if region.label == label:
                mask |= region.mask
        out.append(mask)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    titles = ["image", "heatmap (GEM-like)", "mask, refine=none", 'mask, refine="guided"']

    table, rows = [], []
    for seed in range(10):
        image, sims, truth = SCENES.make_scene(seed)
        before = masks_of(extract_regions(sims, ["x"], PLAIN, image=image), ["x"], truth.shape)
        after = masks_of(extract_regions(sims, ["x"], GUIDED, image=image), ["x"], truth.shape)
        iou_before, iou_after = SCENES.iou(before[0], truth), SCENES.iou(after[0], truth)
        shape = SCENES.SHAPES[seed % len(SCENES.SHAPES)]
        table.append((f"{shape} (seed {seed})", iou_before, iou_after))
        if seed < 5:
            rows.append(([image, colourise(sims[0]), overlay(image, before, [truth]), overlay(image, after, [truth])],
                         [shape, "", f"IoU {iou_before:.3f}", f"IoU {iou_after:.3f}"]))
    compose(rows, titles, args.out / "refine_single.png")

    semantic_rows = []
    for seed in range(6):
        image, sims, truths = SCENES.make_two_label_scene(seed)
        before = masks_of(extract_regions(sims, ["a", "b"], PLAIN, image=image), ["a", "b"], truths[0].shape)
        after = masks_of(extract_regions(sims, ["a", "b"], GUIDED, image=image), ["a", "b"], truths[0].shape)
        ious_before = [SCENES.iou(m, t) for m, t in zip(before, truths)]
        ious_after = [SCENES.iou(m, t) for m, t in zip(after, truths)]
        table.append((f"two labels (seed {seed}), mean of 2", np.mean(ious_before), np.mean(ious_after)))
        if seed < 3:
            semantic_rows.append((
                [image, colourise(sims.max(axis=0)), overlay(image, before, truths), overlay(image, after, truths)],
                ["", "max over labels", "IoU " + " / ".join(f"{v:.3f}" for v in ious_before),
                 "IoU " + " / ".join(f"{v:.3f}" for v in ious_after)]))
    compose(semantic_rows, titles, args.out / "refine_semantic.png")

    # Control: the same shapes with no visible edge (the object has the background's pixels), so
    # there is nothing for the guide to snap to. Refinement cannot help there and costs a little.
    control = []
    for seed in range(10):
        image, sims, truth = SCENES.make_scene(seed)
        rng = np.random.default_rng(seed)
        invisible = (np.clip(SCENES.textured_background(*truth.shape, rng), 0, 1) * 255).astype(np.uint8)
        control.append([SCENES.iou(masks_of(extract_regions(sims, ["x"], config, image=invisible), ["x"],
                                            truth.shape)[0], truth) for config in (PLAIN, GUIDED)])
    control = np.array(control)

    print("| Scene | IoU, refine=none | IoU, refine=\"guided\" |")
    print("|---|---|---|")
    for name, before_value, after_value in table:
        print(f"| {name} | {before_value:.3f} | {after_value:.3f} |")
    single = np.array([row[1:] for row in table[:10]])
    double = np.array([row[1:] for row in table[10:]])
    print(f"| **mean, one label (10 scenes)** | **{single[:, 0].mean():.3f}** | **{single[:, 1].mean():.3f}** |")
    print(f"| **mean, two labels (6 scenes)** | **{double[:, 0].mean():.3f}** | **{double[:, 1].mean():.3f}** |")
    print(f"| control: invisible object, mean of 10 | {control[:, 0].mean():.3f} | {control[:, 1].mean():.3f} |")
    large_photos()


def large_photos(size: int = 896, patch: int = 32) -> None:
    """The same scenes rendered natively at `size` px (a 28-patch grid of `patch` px): regions from maps
    at the original size (how they were made before the working resolution) against maps at the
    working size (`regions.working_size`: 224 px without refinement, 512 px with), scaled back."""
    from gem_model.regions import working_size

    def shrink(sims, work):
        return np.stack([np.asarray(Image.fromarray(m).resize(work[::-1], Image.BILINEAR)) for m in sims])

    scenes = [("one label (10 scenes)", [SCENES.make_scene(seed, size=size, patch=patch) for seed in range(10)]),
              ("two labels (6 scenes)", [SCENES.make_two_label_scene(seed, size=size, patch=patch)
                                         for seed in range(6)])]
    print(f"\n| {size} px scenes, mean IoU | original-size maps, none | working size, none | "
          "original-size maps, guided | working size, guided |")
    print("|---|---|---|---|---|")
    for name, cases in scenes:
        values = []
        for image, sims, truth in cases:
            truths = truth if truth.ndim == 3 else truth[None]
            labels = ["a", "b"][:len(truths)]
            row = []
            for config in (PLAIN, GUIDED):
                work = working_size((size, size), (size // patch, size // patch), config)
                for maps, kwargs in ((sims, {}), (shrink(sims, work), {"size": (size, size)})):
                    masks = masks_of(extract_regions(maps, labels, config, image=image, **kwargs), labels,
                                     truths[0].shape)
                    row.append(np.mean([SCENES.iou(m, t) for m, t in zip(masks, truths)]))
            values.append([row[0], row[1], row[2], row[3]])
        means = np.mean(values, axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")


if __name__ == "__main__":
    main()
