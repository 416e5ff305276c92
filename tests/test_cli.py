"""python -m gem_model: an overlay picture people can look at, clear errors otherwise."""
import subprocess
import sys

import numpy as np
from PIL import Image

from gem_model.__main__ import main
from gem_model.viz import colorize


def tiny_args(tiny_model_files):
    name, config_path, checkpoint = tiny_model_files
    return ["--model", name, "--model-config", str(config_path), "--pretrained", str(checkpoint),
            "--device", "cpu", "--image-size", "32"]


def test_writes_one_panel_per_prompt(tiny_model_files, tmp_path, capsys):
    image_path = tmp_path / "wide.png"
    Image.new("RGB", (200, 80), (10, 200, 30)).save(image_path)
    out = tmp_path / "heat.png"
    code = main([str(image_path), "--prompt", "cat", "--prompt", "remote control", "--out", str(out),
                 "--panel-width", "100", *tiny_args(tiny_model_files)])
    assert code == 0
    picture = Image.open(out)
    assert picture.width == 300                       # image + 2 prompts, 100 px each
    assert picture.height == 40 + 22                  # aspect kept, plus the caption strip
    assert "wrote" in capsys.readouterr().out


def test_missing_weights_give_a_message_not_a_traceback(tmp_path):
    image_path = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image_path)
    result = subprocess.run([sys.executable, "-m", "gem_model", str(image_path), "--prompt", "cat",
                             "--pretrained", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "checkpoint file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main([str(bad), "--prompt", "cat"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_colour_ramp_is_ordered():
    colours = colorize(np.linspace(0, 1, 5)[None]).astype(int)[0]
    assert colours[0, 2] > colours[0, 0]          # low = blue
    assert colours[-1, 0] > colours[-1, 2]        # high = red
    assert colorize(np.array([[np.nan]])).shape == (1, 1, 3)
