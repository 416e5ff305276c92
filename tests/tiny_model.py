"""Tiny random open_clip models for tests: real open_clip code paths, no downloads.

A custom architecture config is written to a JSON file and a random-weight checkpoint
is saved beside it, so tests load it back through the same `pretrained=<path>` route a
user's local checkpoint file takes.
"""
from __future__ import annotations

import json
from pathlib import Path

TINY_MODEL_NAME = "gem-test-tiny"

# Small enough to run a forward pass in milliseconds on CPU, deep enough for gem_depth=7.
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 8, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_model(directory: Path, config: dict | None = None, name: str = TINY_MODEL_NAME,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write `<name>.json` (architecture) and `<name>.pt` (random weights) into `directory`."""
    import open_clip
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(config or TINY_CONFIG)
    config_path = directory / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    # Random init leaves some tensors at exactly 0/1 (LayerNorm); perturb them so that every
    # parameter matters in numerical comparisons.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint_path = directory / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint_path)
    return config_path, checkpoint_path
