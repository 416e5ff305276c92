"""Where a model's weights come from: none (random), a local file, or an open_clip pretrained tag.

A tag's file is looked up in the local cache first and then loaded from there, so a start with
cached weights makes no network request at all. Only a tag missing from the cache is
downloaded, and before that one quick request checks that its source answers: without a network
the start then fails in seconds with one line, instead of a minute of retried hub requests.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from .errors import WeightsNotFoundError

# Values meaning "random weights" (tests, benchmarks, trying the server without a download).
NO_WEIGHTS = ("", "none")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".npy")
# The reachability check: one HEAD request, no retries, given up after PROBE_TOTAL_S whatever
# hangs (name resolution has no timeout of its own).
PROBE_CONNECT_S = 4.0
PROBE_READ_S = 4.0
PROBE_TOTAL_S = 8.0
# open_clip's default file name in a hub repo named without one ("org/repo/").
_HUB_DEFAULT_FILE = "open_clip_pytorch_model.bin"


def parse_pretrained(value: Optional[str]) -> Optional[str]:
    """None for "no weights" (None, "", "none" in any case), else the value stripped."""
    if value is None or str(value).strip().lower() in NO_WEIGHTS:
        return None
    return str(value).strip()


def looks_like_checkpoint_path(value: Optional[str]) -> bool:
    """Whether `value` names a file rather than a pretrained tag (tags have no slash or suffix)."""
    value = parse_pretrained(value)
    if value is None:
        return False
    return ("/" in value or os.sep in value or value.startswith(".") or os.path.exists(value)
            or value.lower().endswith(CHECKPOINT_SUFFIXES))


def offline_variable(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The environment variable that forbids downloads, if one is set."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def _hub_file_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """(repo id, file names in the order open_clip tries them: safetensors first)."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or _HUB_DEFAULT_FILE
    names = []
    if filename == _HUB_DEFAULT_FILE:
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename.rsplit(".", 1)[0] + ".safetensors")
    return repo_id, names + [filename]


def _uses_hub(tag_cfg: Mapping[str, Any]) -> bool:
    if not tag_cfg.get("hf_hub"):
        return False
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:   # open_clip then falls back to the URL
        return False
    return True


def cached_tag_file(tag_cfg: Mapping[str, Any], cache_dir: Optional[str]) -> Optional[str]:
    """The local file of a pretrained tag when it is in the cache open_clip downloads to, else None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if _uses_hub(tag_cfg):
        from huggingface_hub import try_to_load_from_cache

        repo_id, names = _hub_file_candidates(tag_cfg["hf_hub"])
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url")
    if url:
        directory = cache_dir or os.path.expanduser("~/.cache/clip")
        path = os.path.join(directory, os.path.basename(urlsplit(url).path))
        return path if os.path.isfile(path) else None
    return None


def download_source(tag_cfg: Mapping[str, Any]) -> str:
    """The base URL a tag's weights are downloaded from."""
    if _uses_hub(tag_cfg):
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")
    parts = urlsplit(tag_cfg.get("url") or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def check_download_possible(model_name: str, tag: str, tag_cfg: Mapping[str, Any], cache_dir: Optional[str]) -> None:
    """Raise WeightsNotFoundError at once when the tag's weights (not in the cache) cannot be
    downloaded: downloads are switched off, or one request to their source gets no answer."""
    source = download_source(tag_cfg)
    where = f"cache {cache_dir}" if cache_dir else "default cache"
    advice = (f"Download them once on a connected machine (python -m gem_model.prefetch --model {model_name} "
              f"--pretrained {tag}) and copy the cache here or point pretrained at the file; "
              f"or use pretrained 'none' for random weights")
    offline = offline_variable()
    if offline:
        raise WeightsNotFoundError(f"weights {model_name} / {tag} are not in the {where} and {offline} is set, "
                                   f"so they cannot be downloaded. {advice}")
    if not source:
        return
    problem = _unreachable(source)
    if problem:
        raise WeightsNotFoundError(f"cannot download weights {model_name} / {tag}: {source} is unreachable "
                                   f"({problem}; offline?) and they are not in the {where}. {advice}")


def _unreachable(url: str) -> Optional[str]:
    """None when `url` answers a HEAD request at all (any status), else a short reason."""
    answer: list[Optional[str]] = []
    probe = threading.Thread(target=lambda: answer.append(_probe(url)), name="gem-weights-probe", daemon=True)
    probe.start()
    probe.join(PROBE_TOTAL_S)
    return answer[0] if answer else f"no answer within {PROBE_TOTAL_S:g} s"


def _probe(url: str) -> Optional[str]:
    import requests

    try:
        requests.head(url, timeout=(PROBE_CONNECT_S, PROBE_READ_S), allow_redirects=False).close()
    except requests.exceptions.ProxyError:
        return "the proxy refused or is unreachable"
    except requests.exceptions.ConnectTimeout:
        return f"no connection within {PROBE_CONNECT_S:g} s"
    except requests.exceptions.ConnectionError as exc:
        text = str(exc)
        if "Name or service not known" in text or "NameResolution" in text or "nodename nor servname" in text:
            return "its name does not resolve"
        return "connection failed"
    except requests.exceptions.RequestException as exc:
        return type(exc).__name__
    return None
