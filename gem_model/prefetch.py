"""Download open_clip weights into a cache directory ahead of time.

    python -m gem_model.prefetch --model ViT-B-16 --pretrained openai --cache-dir DIR

For air-gapped sites and for containers that should not download at start: run it on a
connected machine (or inside the container, into its weights volume), then either copy the
cache directory to where the backend looks for it, or point GEM_PRETRAINED at the printed file.

The cache is open_clip's own (Hugging Face hub layout: `models--<org>--<repo>/snapshots/...`),
so a model created later with the same tag and `cache_dir` finds the file without a network.
stdout carries only the resulting file path (for scripts); guidance goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import GemError, WeightsNotFoundError
from .weights import offline_variable

EXIT_OK = 0
EXIT_FAILED = 1  # download or copy failed
EXIT_USAGE = 2  # argparse's own code for bad arguments; also an unknown model or tag

# The backend caches weights in $MODEL_DIR/weights (backend.settings.Settings.weights_dir);
# the default here matches it so that running this inside the container fills the cache the
# backend reads. tests/test_docker.py checks that the two agree.
_DEFAULT_MODEL_DIR = "./model_data"


def default_cache_dir(environ=os.environ) -> str:
    return os.path.join(environ.get("MODEL_DIR") or _DEFAULT_MODEL_DIR, "weights")


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pretrained_config(model_name: str, tag: str) -> dict:
    """open_clip's download config of (model, tag), or a GemError naming the known tags."""
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise GemError(f"'{model_name}': prefetch takes an open_clip model name and a pretrained tag "
                       f"(e.g. --model ViT-B-16 --pretrained openai), not an hf-hub:/local-dir: name")
    if open_clip.get_model_config(model_name) is None:
        raise GemError(f"unknown model '{model_name}'. Use an open_clip name such as ViT-B-16 "
                       f"(python -c 'import open_clip; print(open_clip.list_models())')")
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise GemError(f"'{tag}' is not a pretrained tag of {model_name}. "
                       f"Known tags: {', '.join(tags) or 'none'}")
    return cfg


def _source(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return f"Hugging Face hub {endpoint}, repo {cfg['hf_hub'].rstrip('/')}"
    return cfg.get("url") or "unknown source"


def prefetch(model_name: str, tag: str, cache_dir: str) -> Path:
    """Download (or find in `cache_dir`) the weights of (model, tag); return the local file.

    Raises GemError for an unknown model or tag, WeightsNotFoundError when the download fails.
    """
    from open_clip.pretrained import download_pretrained

    from .factory import normalize_model_name

    model_name = normalize_model_name(model_name)
    cfg = pretrained_config(model_name, tag)
    os.makedirs(cache_dir, exist_ok=True)
    try:
        target = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - hub, urllib and checksum errors all mean "not downloaded"
        lines = [f"could not download the '{tag}' weights of {model_name} from {_source(cfg)}.",
                 f"  reason: {type(exc).__name__}: {_one_line(exc)}"]
        offline = offline_variable()
        if offline:
            lines.append(f"  {offline} is set, so downloads are disabled and only {cache_dir} was searched.")
        lines.append("  Without network access: run this command on a connected machine, then copy its "
                     "--cache-dir to this machine (docs/DOCKER.md, 'Air-gapped sites').")
        raise WeightsNotFoundError("\n".join(lines)) from exc
    if not target or not os.path.isfile(target):
        raise WeightsNotFoundError(f"download of {model_name} / {tag} reported {target!r}, which is not a file")
    return Path(target)


def _copy_out(source: Path, output: str) -> Path:
    """Copy the (possibly symlinked) cached file to a plain file at `output`: a file path, or a
    directory when it exists or ends with a slash."""
    directory = output.endswith(("/", os.sep)) or os.path.isdir(output)
    output = Path(output)
    if directory:
        output = output / source.resolve().name
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.resolve(), output)
    return output


def guidance(model_name: str, tag: str, cache_dir: str, cached: Path, file: Optional[Path] = None) -> str:
    """What to set so that the backend uses the fetched weights (`file`: a plain copy of them)."""
    cfg = pretrained_config(model_name, tag)
    # A plain file carries no tag, so nothing would tell open_clip to build the QuickGELU
    # activation these weights were trained with: name the -quickgelu architecture instead.
    arch = model_name
    if cfg.get("quick_gelu") and not model_name.endswith("-quickgelu"):
        arch = f"{model_name}-quickgelu"
    if os.path.abspath(cache_dir) == os.path.abspath(default_cache_dir()):
        use_cache = (f"This is the backend's cache ($MODEL_DIR/weights): with GEM_MODEL={model_name} "
                     f"GEM_PRETRAINED={tag} it loads from here")
    else:
        use_cache = (f"To use the cache, copy {cache_dir}/. into $MODEL_DIR/weights of the backend "
                     f"(in Docker: the volume at /data/models/weights) and keep GEM_MODEL={model_name} "
                     f"GEM_PRETRAINED={tag}")
    file = file or cached
    lines = [f"Weights of {model_name} / {tag}: {cached}",
             f"{use_cache}; set HF_HUB_OFFLINE=1 where there is no network.",
             f"Or point the backend at the file: GEM_PRETRAINED={file} GEM_MODEL={arch}"
             + (" (these weights were trained with QuickGELU)" if arch != model_name else "")]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gem_model.prefetch",
        description="Download open_clip weights into a cache directory so that the GEM backend "
                    "starts without a network. Prints the local file path on stdout.")
    parser.add_argument("--model", default=os.environ.get("GEM_MODEL") or "ViT-B-16",
                        help="open_clip model name, e.g. ViT-B-16 (default: $GEM_MODEL or ViT-B-16)")
    parser.add_argument("--pretrained", default=os.environ.get("GEM_PRETRAINED") or "openai",
                        help="open_clip pretrained tag, e.g. openai (default: $GEM_PRETRAINED or openai)")
    parser.add_argument("--cache-dir", default=None,
                        help="where to store the weights (default: $MODEL_DIR/weights, the backend's "
                             f"cache; now {default_cache_dir()})")
    parser.add_argument("--output", default=None,
                        help="also copy the weights to this plain file (or into this directory: one "
                             "that exists or ends with /), "
                             "e.g. to carry one file to an air-gapped machine")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()

    if os.path.isfile(args.pretrained):
        print(f"{args.pretrained} is already a local file; nothing to download.", file=sys.stderr)
        print(os.path.abspath(args.pretrained))
        return EXIT_OK

    from .factory import normalize_model_name

    model_name = normalize_model_name(args.model)
    try:
        path = prefetch(model_name, args.pretrained, cache_dir)
    except WeightsNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except GemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    cached = path
    if args.output is not None:
        try:
            path = _copy_out(cached, args.output)
        except OSError as exc:
            print(f"error: could not copy {path} to {args.output}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED

    print(guidance(model_name, args.pretrained, cache_dir, cached, path), file=sys.stderr)
    print(path)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
