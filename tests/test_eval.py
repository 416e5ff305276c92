"""The evaluation command on tiny synthetic datasets whose mIoU is known exactly."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gem_model import datasets
from gem_model.errors import GemError
from gem_model.eval import main
from gem_model.segmentation import ConfusionMatrix, Segmenter, evaluate, prompt_templates

SCALE = 8   # each cell of the 4x4 layouts below becomes an 8x8 block

# Image A: background (0) left, cat (8) top right, VOC's 255 border, dog (12) bottom row.
LABEL_A = np.array([[0, 0, 8, 8],
                    [0, 0, 8, 8],
                    [0, 0, 255, 255],
                    [12, 12, 12, 12]])
# Image B: all dog.
LABEL_B = np.full((4, 4), 12)


def voc_palette():
    """VOC's colour map: class c gets a colour from its bits, so indices differ from colours."""
    palette = []
    for c in range(256):
        r = g = b = 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def big(label):
    return np.kron(label, np.ones((SCALE, SCALE), dtype=np.int64))


def write_voc(root, labels):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i, label in enumerate(labels):
        name = f"2007_{i:06d}"
        names.append(name)
        label = big(label)
        Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg")
        mask = Image.fromarray(label.astype(np.uint8), mode="P")
        mask.putpalette(voc_palette())
        mask.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def left_background_right_cat(image, size):
    """A fixed predictor: left half background (0), right half cat (8)."""
    pred = np.zeros(size, dtype=np.int64)
    pred[:, size[1] // 2:] = 8
    return pred


# Hand-computed for that predictor (pixel counts in 8x8 blocks; every count scales alike):
#   A: bg TP 6; cat TP 4; dog row: 2 blocks -> bg (FP bg), 2 -> cat (FP cat), dog FN 4
#   B: dog FN 16; bg FP 8; cat FP 8
#   bg IoU = 6 / (6 + 2 + 8) = 0.375; cat = 4 / (4 + 2 + 8); dog = 0; others absent (no IoU)
EXPECTED_MIOU = 100 * (6 / 16 + 4 / 14 + 0) / 3


def test_voc_reader_gives_palette_indices(tmp_path):
    write_voc(tmp_path, [LABEL_A, LABEL_B])
    refs = datasets.read_voc(tmp_path, "val")
    assert [r.name for r in refs] == ["2007_000000", "2007_000001"]
    sample = refs[0].load()
    assert sample.image.mode == "RGB" and sample.image.size == (32, 32)
    assert np.array_equal(sample.label, big(LABEL_A))


def test_constructed_prediction_gives_hand_computed_miou(tmp_path):
    write_voc(tmp_path, [LABEL_A, LABEL_B])
    spec = datasets.get_dataset("voc", tmp_path)
    result = evaluate(spec.reader(tmp_path, "val"), left_background_right_cat, spec.class_names,
                      progress=False)
    assert result.images == 2
    assert result.miou == pytest.approx(EXPECTED_MIOU, abs=1e-9)
    iou = result.matrix.iou()
    assert iou[0] == pytest.approx(0.375) and iou[8] == pytest.approx(4 / 14) and iou[12] == 0
    assert np.isnan(iou[1])   # aeroplane: neither labelled nor predicted
    # One matrix over the whole set, not a mean of per-image mIoUs (that would be higher).
    per_image = []
    for ref in spec.reader(tmp_path, "val"):
        m = ConfusionMatrix(21)
        s = ref.load()
        m.add(s.label, left_background_right_cat(s.image, s.label.shape))
        per_image.append(100 * m.miou())
    assert np.mean(per_image) != pytest.approx(EXPECTED_MIOU)


def test_cli_oracle_prints_100(tmp_path, capsys):
    write_voc(tmp_path, [LABEL_A, LABEL_B])
    out_json = tmp_path / "result.json"
    assert main(["--dataset", "voc", "--root", str(tmp_path), "--oracle", "--no-progress",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "mIoU: 100.00"
    assert "aeroplane" in out and "background" in out
    saved = json.loads(out_json.read_text())
    assert saved["mIoU"] == 100.0 and saved["per_class"]["aeroplane"] is None


def test_confusion_matrix_ignores_255_and_rejects_bad_labels():
    m = ConfusionMatrix(3)
    m.add(np.array([[0, 1], [255, 2]]), np.array([[0, 1], [1, 1]]))
    assert m.counts.sum() == 3 and m.counts[2, 1] == 1
    with pytest.raises(Exception, match="outside"):
        m.add(np.array([[7]]), np.array([[0]]))


def write_folder(root, labels, classes):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(1)
    for i, label in enumerate(labels):
        label = big(label)
        Image.fromarray(rng.integers(0, 255, (*label.shape, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(label.astype(np.uint8), mode="L").save(root / "masks" / f"im{i}.png")


def test_folder_dataset_oracle_and_constructed(tmp_path, capsys):
    # Same layouts, classes renumbered: 0 background, 1 cat, 2 dog.
    remap = np.vectorize({0: 0, 8: 1, 12: 2, 255: 255}.get)
    write_folder(tmp_path, [remap(LABEL_A), remap(LABEL_B)], ["background", "cat | kitten", "dog"])
    spec = datasets.get_dataset("folder", tmp_path)
    assert spec.classes == [("background",), ("cat", "kitten"), ("dog",)] and spec.background == 0

    def predictor(image, size):
        pred = np.zeros(size, dtype=np.int64)
        pred[:, size[1] // 2:] = 1
        return pred

    result = evaluate(spec.reader(tmp_path, ""), predictor, spec.class_names, progress=False)
    assert result.miou == pytest.approx(EXPECTED_MIOU, abs=1e-9)   # no absent classes here either
    assert main(["--dataset", "folder", "--root", str(tmp_path), "--oracle", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("mIoU: 100.00")


def test_ade_layout_shifts_labels_and_ignores_zero(tmp_path, capsys):
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    label = np.array([[0, 1], [3, 150]], dtype=np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "annotations" / "validation" / "ADE_val_1.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "validation" / "ADE_val_1.jpg")
    sample = datasets.read_ade(tmp_path, "val")[0].load()
    assert sample.label.tolist() == [[255, 0], [2, 149]]
    assert main(["--dataset", "ade", "--root", str(tmp_path), "--oracle", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("mIoU: 100.00")


def test_missing_layout_is_a_clear_error(tmp_path, capsys):
    assert main(["--dataset", "voc", "--root", str(tmp_path), "--oracle"]) == 2
    assert "ImageSets" in capsys.readouterr().err


def test_class_lists_have_the_standard_sizes():
    sizes = {k: len(s.classes) for k, s in datasets.DATASETS.items()}
    assert sizes == {"voc": 21, "context": 59, "context60": 60, "ade": 150, "coco-object": 81,
                     "voc20": 20, "cityscapes": 19}
    assert len(prompt_templates("imagenet80")) == 80


@pytest.mark.parametrize("mode", ["gem", "clearclip", "naclip"])
def test_cli_runs_the_model_end_to_end(tmp_path, tiny_model_files, capsys, mode):
    name, config_path, checkpoint = tiny_model_files
    write_voc(tmp_path, [LABEL_A, LABEL_B])
    code = main(["--dataset", "voc", "--root", str(tmp_path), "--model", name, "--pretrained", str(checkpoint),
                 "--model-config", str(config_path), "--device", "cpu", "--image-size", "32", "--mode", mode,
                 "--templates", "simple", "--slide", "--crop", "16", "--stride", "8", "--pamr-iters", "2",
                 "--bg-threshold", "0.5", "--limit", "1", "--no-progress"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mIoU: ") and 0 <= float(last.split()[1]) <= 100


@pytest.mark.parametrize("protocol", ["gem", "clearclip", "naclip"])
def test_cli_runs_each_protocol_end_to_end(tmp_path, tiny_model_files, capsys, protocol):
    name, config_path, checkpoint = tiny_model_files
    write_voc(tmp_path, [LABEL_A, LABEL_B])
    out_json = tmp_path / "r.json"
    code = main(["--dataset", "voc", "--root", str(tmp_path), "--model", name, "--pretrained", str(checkpoint),
                 "--model-config", str(config_path), "--device", "cpu", "--protocol", protocol,
                 "--image-size", "36", "--crop", "24", "--stride", "16", "--templates", "single",
                 "--limit", "1", "--no-progress", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"protocol: {protocol} (method {protocol}")
    saved = json.loads(out_json.read_text())["protocol"]
    assert saved["name"] == protocol and saved["slide_crop"] == 24 and saved["image_size"] == 36
    assert saved["bg_threshold"] == {"gem": 0.0, "clearclip": 0.5, "naclip": 0.1}[protocol]


def test_segmenter_takes_the_best_name_of_each_class(tiny_model_files):
    from gem_model import create_gem_model
    name, config_path, checkpoint = tiny_model_files
    model = create_gem_model(name, str(checkpoint), device="cpu", model_config=str(config_path))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 48, 3), dtype=np.uint8))  # = model input size
    single = ["a photo of a {}."]
    both = Segmenter(model, [("cat", "dog"), ("car",)], single, image_size=32).scores(image)
    cat = Segmenter(model, [("cat",), ("car",)], single, image_size=32).scores(image)
    dog = Segmenter(model, [("dog",), ("car",)], single, image_size=32).scores(image)
    assert both.shape == (2, 32, 48)
    assert torch.allclose(both[0], torch.maximum(cat[0], dog[0]), atol=1e-5), \
        (both[0] - torch.maximum(cat[0], dog[0])).abs().max()
    assert torch.allclose(both[1], cat[1], atol=1e-5)


def _rule_only(scores, class_words, **choices):
    """A Segmenter whose per-name maps are `scores` [Q, 1, W]: the decision rule alone."""
    from gem_model.protocols import Protocol
    seg = Segmenter.__new__(Segmenter)
    seg.protocol = Protocol(**choices)
    seg.background, seg.bg_threshold, seg.logit_scale = 0, seg.protocol.bg_threshold, seg.protocol.logit_scale
    seg.pamr_iters = 0
    seg.class_words = class_words
    seg._name_maps_patch = lambda image: (scores[None].clone(), None)
    return seg


def test_background_threshold_uses_the_softmax_of_scaled_scores():
    scores = torch.tensor([[[0.0, 0.0]], [[2.0, 0.1]], [[0.0, 0.0]]])     # [C=3, 1, 2]
    words = [slice(0, 1), slice(1, 2), slice(2, 3)]
    # pixel 0: best = class 1 with e^2 / (e^2 + 2) = 0.79 >= 0.6 -> stays; pixel 1: 0.36 -> background
    assert _rule_only(scores, words, bg_threshold=0.6, logit_scale=1.0).predict(None, (1, 2)).tolist() == [[1, 0]]
    assert _rule_only(scores, words, bg_threshold=0.0, logit_scale=1.0).predict(None, (1, 2)).tolist() == [[1, 1]]


def test_threshold_over_all_names_is_stricter_than_over_class_maxima():
    """ClearCLIP and NACLIP: softmax over every name, then the max per class. A class with two
    names that both match splits its probability, so it can fall below the threshold where the
    softmax over class maxima keeps it (that maximum is always at least the authors')."""
    scores = torch.tensor([[[0.0]], [[2.0]], [[2.0]]])          # names: bg | cat, kitten
    words = [slice(0, 1), slice(1, 3)]
    over_classes = _rule_only(scores, words, bg_threshold=0.6, logit_scale=1.0)
    over_names = _rule_only(scores, words, bg_threshold=0.6, logit_scale=1.0, prob_over="names")
    p_classes = over_classes.probabilities(None, (1, 1))[:, 0, 0]
    p_names = over_names.probabilities(None, (1, 1))[:, 0, 0]
    e2 = math.exp(2.0)
    assert p_classes[1].item() == pytest.approx(e2 / (e2 + 1))            # 0.88
    assert p_names[1].item() == pytest.approx(e2 / (2 * e2 + 1))          # 0.47
    assert over_classes.predict(None, (1, 1)).tolist() == [[1]]
    assert over_names.predict(None, (1, 1)).tolist() == [[0]]


def test_voc20_and_cityscapes_readers(tmp_path, capsys):
    write_voc(tmp_path / "voc", [LABEL_A])
    sample = datasets.read_voc20(tmp_path / "voc", "val")[0].load()
    expected = big(LABEL_A) - 1
    expected[big(LABEL_A) == 0] = 255
    expected[big(LABEL_A) == 255] = 255
    assert np.array_equal(sample.label, expected)        # background and border ignored, 8 (cat) -> 7
    assert main(["--dataset", "voc20", "--root", str(tmp_path / "voc"), "--oracle", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("mIoU: 100.00")

    root = tmp_path / "city"
    for split_dir in ("leftImg8bit/val/aachen", "gtFine/val/aachen"):
        (root / split_dir).mkdir(parents=True)
    label = np.array([[0, 18], [255, 7]], dtype=np.uint8)
    Image.fromarray(label, mode="L").save(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png")
    Image.new("RGB", (2, 2)).save(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png")
    refs = datasets.read_cityscapes(root, "val")
    assert [r.name for r in refs] == ["aachen/aachen_000000_000019"]
    assert refs[0].load().label.tolist() == [[0, 18], [255, 7]]
    assert main(["--dataset", "cityscapes", "--root", str(root), "--oracle", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith("mIoU: 100.00")
