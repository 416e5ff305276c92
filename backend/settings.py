"""Every knob of the backend, read once from the environment into one frozen `Settings`.

`python -m backend.settings --markdown` prints the settings table for the README, so the
documentation cannot drift from the code. Region post-processing knobs are not duplicated
here: they are derived from `gem_model.regions.RegionConfig` (env name `GEM_<FIELD>`), whose
defaults stay the single source of truth.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

OUTPUT_KINDS = ("brush", "polygon", "rectangle")
PRECISIONS = ("fp32", "fp16", "bf16", "auto")
MODES = ("gem", "clearclip", "naclip")
RESIZE_MODES = ("short", "long", "square")
POS_EMBEDS = ("antialias", "authors")
PROTOCOLS = ("", "gem", "clearclip", "naclip")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

class SettingsError(ValueError):
    """One or more environment variables hold invalid values; the message names each one."""


# ---------------------------------------------------------------------------------------
# Parsers: each takes the raw string and returns the value or raises ValueError(reason).


def _str(raw: str) -> str:
    return raw.strip()


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}")
        return value
    return parse


def _float(minimum: float | None = None, optional: bool = False) -> Callable[[str], float | None]:
    def parse(raw: str) -> float | None:
        raw = raw.strip()
        if optional and raw.lower() in ("", "none", "auto", "adaptive"):
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number" + (" or empty" if optional else "")) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be finite")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value
    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return parse


def _dilations(raw: str) -> tuple[int, ...]:
    parts = [p for p in raw.replace(",", " ").split() if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError("expected a comma list of positive integers, e.g. 8,16") from None
    if not values or min(values) < 1:
        raise ValueError("expected a comma list of positive integers, e.g. 8,16")
    return values


def _outputs(raw: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
    unknown = [k for k in kinds if k not in OUTPUT_KINDS]
    if unknown:
        raise ValueError(f"unknown output {', '.join(unknown)}; expected a comma list of {', '.join(OUTPUT_KINDS)}")
    if not kinds:
        raise ValueError(f"expected at least one of {', '.join(OUTPUT_KINDS)}")
    return kinds


def _score_parts(raw: str) -> tuple[str, ...]:
    parts = tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
    allowed = ("regions", "margin", "agreement")
    unknown = [p for p in parts if p not in allowed]
    if unknown or not parts:
        raise ValueError(f"expected a comma list of {', '.join(allowed)}")
    return parts


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise ValueError("expected auto, cpu, cuda, cuda:N or mps")


def _hosts(raw: str) -> tuple[str, ...]:
    """Comma/space list of hostnames (`*.example.com` for subdomains), IP addresses and CIDR ranges."""
    import ipaddress
    entries = []
    for part in re.split(r"[,\s]+", raw.strip()):
        if not part:
            continue
        entry = part.lower().strip("[]")
        try:
            entries.append(str(ipaddress.ip_network(entry, strict=False)))
            continue
        except ValueError:
            pass
        name = entry[2:] if entry.startswith("*.") else entry
        if not re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?", name):
            raise ValueError(f"{part!r} is neither a hostname, an IP address nor a CIDR range")
        entries.append(entry.rstrip("."))
    return tuple(dict.fromkeys(entries))


def _url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("expected an http:// or https:// URL, e.g. http://label-studio:8080")
    return value


def knob(env: str, default: Any, description: str, unit: str = "", parse: Callable[[str], Any] = _str,
         group: str = "", secret: bool = False):
    """A settings field bound to an environment variable; its metadata renders the docs table."""
    return field(default=default, repr=not secret, metadata={
        "env": env, "description": description, "unit": unit, "parse": parse,
        "group": group, "secret": secret})


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    # Model
    model_name: str = knob("GEM_MODEL", "ViT-B-16", "open_clip architecture (`ViT-B/16` spelling accepted)",
                           group="Model")
    pretrained: str = knob("GEM_PRETRAINED", "openai",
                           "open_clip pretrained tag, path to a local checkpoint file, or `none` (random weights, for tests)",
                           group="Model")
    model_config: str = knob("GEM_MODEL_CONFIG", "",
                             "JSON architecture file for a model open_clip does not name; empty = none",
                             group="Model")
    device: str = knob("GEM_DEVICE", "auto", "`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`",
                       parse=_device, group="Model")
    precision: str = knob("GEM_PRECISION", "fp32",
                          "`fp32`, `bf16` (GPUs, and CPUs with native bf16: AVX512-BF16/AMX, ~0.35x the fp32 "
                          "time at 1 or 2 threads on a quiet machine; refused on other CPUs), `fp16` (GPUs) or `auto` "
                          "(bf16 where native, "
                          "else fp32); `--check` says what this machine has. docs/PERFORMANCE.md",
                          parse=_choice(PRECISIONS), group="Model")
    bf16_chunks: str = knob("GEM_BF16_CHUNKS", "cache",
                            "CPU bf16 attention at 2+ torch threads: `cache` (cache-sized chunks of heads; best "
                            "where the cores are free: measured 0.37x fp32 at 2 threads) or `whole` (one chunk "
                            "per call, fewer parallel regions; for a host with more busy threads than cores: "
                            "0.85x against 1.99x). docs/PERFORMANCE.md",
                            parse=_choice(("cache", "whole")), group="Model")
    image_size: int = knob("GEM_IMAGE_SIZE", 448, "image side fed to the model (see GEM_RESIZE_MODE)",
                           unit="px", parse=_int(16, 4096), group="Model")
    resize_mode: str = knob("GEM_RESIZE_MODE", "short",
                            "`short`: shorter side becomes GEM_IMAGE_SIZE; `long`: longer side does; `square`: both",
                            parse=_choice(RESIZE_MODES), group="Model")
    gem_depth: int = knob("GEM_DEPTH", 7, "last transformer layers that get the GEM self-self attention path",
                          unit="layers", parse=_int(1), group="Model")
    ss_attn_iter: int = knob("GEM_SS_ATTN_ITER", 1, "iterations of self-self attention",
                             parse=_int(1), group="Model")
    ss_attn_temp: float | None = knob("GEM_SS_ATTN_TEMP", None,
                                      "self-self attention temperature; empty = adaptive",
                                      parse=_float(minimum=0.0, optional=True), group="Model")
    method: str = knob("GEM_METHOD", "gem",
                       "training-free method: `gem`, `clearclip` (q-q attention, no residual, no FFN in the "
                       "last block) or `naclip` (neighbourhood Gaussian attention, no FFN); see docs/GEM.md",
                       parse=_choice(MODES), group="Model")
    slide_crop: int = knob("GEM_SLIDE_CROP", 0,
                           "sliding-window side for big images with small objects (a multiple of the patch "
                           "size, e.g. 448); 0 = off (the whole image in one pass)",
                           unit="px", parse=_int(0, 4096), group="Model")
    slide_stride: int = knob("GEM_SLIDE_STRIDE", 224,
                             "step between sliding windows (a multiple of the patch size, at most "
                             "GEM_SLIDE_CROP); used only when GEM_SLIDE_CROP is set",
                             unit="px", parse=_int(1, 4096), group="Model")
    pamr_iters: int = knob("GEM_PAMR_ITERS", 0,
                           "PAMR mask refinement: iterations of image-guided smoothing of the heatmaps at "
                           "the model's input resolution (10 in the paper); 0 = off",
                           parse=_int(0, 100), group="Model")
    pamr_dilations: tuple[int, ...] = knob("GEM_PAMR_DILATIONS", (1, 2, 4, 8, 12, 24),
                                           "PAMR neighbourhoods: the 8 pixels around each pixel at these distances "
                                           "(NACLIP uses 8,16 at the original resolution)", unit="px",
                                           parse=_dilations, group="Model")
    pos_embed: str = knob("GEM_POS_EMBED", "antialias",
                          "positional embeddings on other patch grids: `antialias` (bicubic, antialiased, GEM's "
                          "way) or `authors` (ClearCLIP's and NACLIP's bicubic with the +0.1 scale factor)",
                          parse=_choice(POS_EMBEDS), group="Model")
    protocol: str = knob("GEM_PROTOCOL", "",
                         "preset of a method's own choices: `gem`, `clearclip` (448 px, 448/224 windows, "
                         "authors' positional embeddings) or `naclip` (336 px, 224/112 windows, PAMR 10x at 8,16, "
                         "authors' positional embeddings); sets GEM_METHOD, GEM_IMAGE_SIZE, GEM_SLIDE_*, GEM_PAMR_* "
                         "and GEM_POS_EMBED where those are not set; empty = none (docs/EVALUATION.md)",
                         parse=_choice(PROTOCOLS), group="Model")
    batch_size: int = knob("GEM_BATCH_SIZE", 8, "images encoded per model call", unit="images",
                           parse=_int(1, 1024), group="Model")
    bulk_model_images: int = knob("GEM_BULK_MODEL_IMAGES", 0,
                                  "images per model call in bulk work (Retrieve, background finisher), which "
                                  "yields to interactive calls between calls; 0 = 1 on CPU, GEM_BATCH_SIZE on GPU",
                                  unit="images", parse=_int(0, 1024), group="Model")
    torch_threads: int = knob("GEM_TORCH_THREADS", 0,
                              "CPU threads torch may use in each worker process; 0 = torch's default (all "
                              "cores). With several workers on one host give each cores / WORKERS",
                              unit="threads", parse=_int(0, 1024), group="Model")
    feature_cache_mb: float = knob("GEM_FEATURE_CACHE_MB", 256.0,
                                   "memory for image features kept for reuse (LRU): a repeated image or a "
                                   "new prompt on the same image skips the image encoder; 0 = no cache",
                                   unit="MiB", parse=_float(minimum=0.0), group="Model")

    # Prediction
    outputs: tuple[str, ...] = knob("GEM_OUTPUTS", OUTPUT_KINDS,
                                    "which result types to produce when the labeling config has them "
                                    "(comma list of brush, polygon, rectangle)", parse=_outputs, group="Prediction")
    remember_prompts: bool = knob("GEM_REMEMBER_PROMPTS", False,
                                  "opt in: remember each project's last free-text prompt (`MODEL_DIR/prompts.json`) "
                                  "and add it to that project's later batch predictions (Retrieve Predictions, "
                                  "opening a task without predictions); off = a typed prompt only answers itself",
                                  parse=_bool, group="Prediction")
    failed_tasks: str = knob("GEM_FAILED_TASKS", "skip",
                             "answer for a task that cannot be predicted (bad image): `skip` = an entry without "
                             "`result`, which Label Studio does not store, so the next Retrieve Predictions retries it; "
                             "`empty` = an empty prediction (`result: []`, score 0), which Label Studio stores and "
                             "does not redo for this model version", parse=_choice(("skip", "empty")),
                             group="Prediction")
    max_prompts: int = knob("GEM_MAX_PROMPTS", 128,
                            "most distinct text prompts one request may predict (label values, `prompts` "
                            "attributes and free text together); more is answered 422. Memory grows with "
                            "prompts x image pixels (4 bytes each)", unit="prompts", parse=_int(1, 100000),
                            group="Prediction")
    max_prompt_chars: int = knob("GEM_MAX_PROMPT_CHARS", 1000,
                                 "longest text prompt accepted, longer is answered 422 (CLIP reads at most 77 "
                                 "tokens, about 300 characters of English; the rest of a long prompt is ignored)",
                                 unit="characters", parse=_int(1, 1000000), group="Prediction")
    load_wait: float = knob("GEM_LOAD_WAIT", 30.0,
                            "how long /predict waits for a model that is still loading before answering 503",
                            unit="s", parse=_float(minimum=0.0), group="Prediction")

    predict_budget: float = knob("GEM_PREDICT_BUDGET", 80.0,
                                 "seconds a batch /predict may work before it answers; tasks it has no time for "
                                 "are answered without `result` (Label Studio stores nothing) and finished in "
                                 "the background (needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY). Keep it "
                                 "below Label Studio's ML_TIMEOUT_PREDICT (100 s); 0 = no limit",
                                 unit="s", parse=_float(minimum=0.0), group="Prediction")
    background_queue: int = knob("GEM_BACKGROUND_QUEUE", 10000,
                                 "most tasks waiting to be finished in the background per worker process; "
                                 "more are left for the next Retrieve Predictions; 0 = no background finishing",
                                 unit="tasks", parse=_int(0, 10_000_000), group="Prediction")
    ls_retry_max: float = knob("GEM_LS_RETRY_MAX", 30.0,
                               "longest wait between two tries to reach Label Studio while it is unreachable "
                               "(the background finisher pauses and keeps its predictions in MODEL_DIR's "
                               "outbox; waits double from 1 s up to this)",
                               unit="s", parse=_float(minimum=0.1), group="Prediction")
    claim_lease: float = knob("GEM_CLAIM_LEASE", 120.0,
                              "how long a task claim lasts unless its holder renews it (a heartbeat renews "
                              "every quarter of it while the work runs); claims of processes that died on "
                              "this host are ignored at once",
                              unit="s", parse=_float(minimum=1.0), group="Prediction")

    # Images
    fetch_timeout: float = knob("GEM_FETCH_TIMEOUT", 30.0, "time limit for downloading one image, all hops",
                                unit="s", parse=_float(minimum=0.1), group="Images")
    fetch_max_mb: float = knob("GEM_FETCH_MAX_MB", 50.0, "largest image file accepted", unit="MiB",
                               parse=_float(minimum=0.001), group="Images")
    fetch_max_redirects: int = knob("GEM_FETCH_MAX_REDIRECTS", 5, "redirects followed per image",
                                    parse=_int(0, 30), group="Images")
    allowed_hosts: tuple[str, ...] = knob(
        "GEM_ALLOWED_HOSTS", (),
        "hosts images may come from although they are not public: comma list of hostnames "
        "(`*.corp.example` for subdomains), IP addresses and CIDR ranges, e.g. `127.0.0.1` for a local "
        "image server or `10.0.0.0/8`. Label Studio's own host and port are always allowed, cloud "
        "metadata addresses never; see docs/BACKEND.md, Outbound requests", parse=_hosts, group="Images")
    max_image_megapixels: float = knob("GEM_MAX_IMAGE_MEGAPIXELS", 50.0,
                                       "largest image accepted (width x height), checked in the file header "
                                       "before decoding; Pillow itself refuses more than about 178", unit="MP",
                                       parse=_float(minimum=0.000001), group="Images")
    fetch_workers: int = knob("GEM_FETCH_WORKERS", 4, "parallel image downloads per request",
                              parse=_int(1, 64), group="Images")

    # Label Studio
    label_studio_url: str = knob("LABEL_STUDIO_URL", "",
                                 "Label Studio base URL for `/data/...` images and cloud URIs; "
                                 "empty = the hostname /setup sends", parse=_url, group="Label Studio")
    label_studio_api_key: str = knob("LABEL_STUDIO_API_KEY", "",
                                     "legacy token or personal access token, sent only to LABEL_STUDIO_URL "
                                     "(unused without it); empty = the token /setup sends, which goes only "
                                     "to the hostname of that /setup", group="Label Studio", secret=True)

    # Server
    model_dir: str = knob("MODEL_DIR", "./model_data",
                          "weights cache and state (remembered prompts, feedback log)", group="Server")
    model_version: str = knob("MODEL_VERSION", "",
                              "override the reported model version; empty = derived from model and settings",
                              group="Server")
    host: str = knob("HOST", "0.0.0.0", "address to listen on", group="Server")
    port: int = knob("PORT", 9090, "port to listen on", parse=_int(1, 65535), group="Server")
    workers: int = knob("WORKERS", 1, "gunicorn worker processes (one per GPU; each loads the model)",
                        parse=_int(1, 64), group="Server")
    threads: int = knob("THREADS", 8, "threads per worker (requests; the model itself runs one at a time)",
                        parse=_int(1, 256), group="Server")
    worker_timeout: int = knob("GEM_WORKER_TIMEOUT", 300,
                               "gunicorn worker timeout; keep above Label Studio's ML_TIMEOUT_PREDICT (100 s)",
                               unit="s", parse=_int(10), group="Server")
    max_request_mb: float = knob("GEM_MAX_REQUEST_MB", 64.0, "largest request body accepted", unit="MiB",
                                 parse=_float(minimum=0.01), group="Server")
    log_level: str = knob("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR", parse=_choice(LOG_LEVELS, upper=True),
                          group="Server")
    basic_auth_user: str = knob("BASIC_AUTH_USER", "", "basic auth user; set with BASIC_AUTH_PASS to require it",
                                group="Server")
    basic_auth_pass: str = knob("BASIC_AUTH_PASS", "", "basic auth password", group="Server", secret=True)
    webhook_secret: str = knob("GEM_WEBHOOK_SECRET", "",
                               "when set, /webhook requires it, as `?secret=...` in the webhook URL or an "
                               "`X-Webhook-Secret` header (Label Studio sends annotation webhooks without "
                               "basic auth); empty = /webhook is open", group="Server", secret=True)

    # Learning from annotations
    learn: bool = knob("GEM_LEARN", True,
                       "learn per project from the annotations Label Studio reports to /webhook (calibrated "
                       "thresholds, visual prototypes); needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
                       "since every annotation is fetched back from Label Studio before it is used; false = "
                       "this process learns nothing (see GEM_USE_LEARNED)",
                       parse=_bool, group="Learning")
    use_learned: bool = knob("GEM_USE_LEARNED", True,
                             "predict with the learned state in MODEL_DIR (what this process or another learner "
                             "wrote), whether or not this process learns itself (GEM_LEARN)",
                             parse=_bool, group="Learning")
    learn_publish: str = knob("GEM_LEARN_PUBLISH", "doubling",
                              "when what was learned reaches the predictions (a new model version, so Label "
                              "Studio recomputes the project's predictions): `doubling` = when a label's new "
                              "examples reach its examples in use (at 1, 2, 4, 8, ... per label; deletions at "
                              "once), `every` = after every annotation that changes something",
                              parse=_choice(("doubling", "every")), group="Learning")
    learn_prototypes: bool = knob("GEM_LEARN_PROTOTYPES", True,
                                  "blend visual prototypes (mean GEM embeddings of annotated regions) into the "
                                  "label heatmaps; false = calibration only", parse=_bool, group="Learning")
    learn_max_examples: int = knob("GEM_LEARN_MAX_EXAMPLES", 32,
                                   "annotated tasks kept per label (the newest); older ones are forgotten",
                                   unit="tasks", parse=_int(1, 10000), group="Learning")
    learn_prior: float = knob("GEM_LEARN_PRIOR", 0.25,
                              "weight of a label's text against its examples, in examples: the prototypes get "
                              "n / (n + prior) of the heatmap with n examples", parse=_float(minimum=0.0),
                              group="Learning")
    learned_cache_mb: float = knob("GEM_LEARNED_CACHE_MB", 64.0,
                                   "memory for the learned state (prototype vectors) of the projects used most "
                                   "recently; a project pushed out is rebuilt from MODEL_DIR when it comes back",
                                   unit="MiB", parse=_float(minimum=0.0), group="Learning")
    learn_queue: int = knob("GEM_LEARN_QUEUE", 256,
                            "annotation events waiting to be learned per worker; when full, new ones are dropped "
                            "(logged) and START_TRAINING catches up", unit="events", parse=_int(1, 1000000),
                            group="Learning")
    # Refresh after learning (docs/LEARNING.md, "Refresh after learning")
    refresh_max_tasks: int = knob("GEM_REFRESH_MAX_TASKS", 1000,
                                  "when learning changes a project's model version, the backend predicts again "
                                  "up to this many of its unlabeled tasks in the background, lowest current "
                                  "score first (needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY); a newer "
                                  "version cancels the refresh of the older one; 0 = no refresh (Retrieve "
                                  "Predictions recomputes stale predictions)",
                                  unit="tasks", parse=_int(0, 10_000_000), group="Learning")
    feedback_max_mb: float = knob("GEM_FEEDBACK_MAX_MB", 20.0,
                                  "size at which MODEL_DIR/feedback.jsonl is rotated; 0 = no feedback log",
                                  unit="MiB", parse=_float(minimum=0.0), group="Learning")
    feedback_backups: int = knob("GEM_FEEDBACK_BACKUPS", 3,
                                 "rotated feedback logs kept (feedback.jsonl.1 is the newest)",
                                 unit="files", parse=_int(0, 100), group="Learning")

    # Active learning: the task score and `python -m backend.select` (docs/LEARNING.md)
    task_score: tuple[str, ...] = knob("GEM_TASK_SCORE", ("regions",),
                                       "what the task score (0..1, low = look here first) averages: `regions` "
                                       "(area-weighted mean region confidence), `margin` (mean best-minus-second "
                                       "class probability over all pixels), `agreement` (text map vs learned "
                                       "prototypes); comma list. Only `regions` earned its place on the benchmark "
                                       "(docs/LEARNING.md); another choice changes the model version",
                                       parse=_score_parts, group="Active learning")
    select_pool_factor: float = knob("GEM_SELECT_POOL_FACTOR", 4.0,
                                     "`python -m backend.select --count N` chooses N diverse tasks among the "
                                     "N x this lowest-scored ones (1 = lowest score first)",
                                     parse=_float(minimum=1.0), group="Active learning")

    # Ray (python -m backend.prelabel --ray; docs/SCALING.md)
    ray_upload_tasks: int = knob("GEM_RAY_UPLOAD_TASKS", 2,
                                 "with --ray: upload tasks running at once, i.e. Label Studio API calls in flight "
                                 "(each stores a chunk of --upload-chunk predictions)", parse=_int(1, 256),
                                 group="Ray")
    ray_list_tasks: int = knob("GEM_RAY_LIST_TASKS", 2,
                               "with --ray: listing tasks running at once, each reading one range of task ids "
                               "(about 100 tasks) of the project from Label Studio", parse=_int(1, 256), group="Ray")
    ray_object_store_mb: float = knob("GEM_RAY_OBJECT_STORE_MB", 0.0,
                                      "with --ray and no address (a local Ray): object store size, which holds "
                                      "the decoded images between stages; 0 = Ray's default (30% of RAM)",
                                      unit="MiB", parse=_float(minimum=0.0), group="Ray")
    ray_local_cpus: int = knob("GEM_RAY_LOCAL_CPUS", 0,
                               "with --ray and no address: CPUs the local Ray may schedule on (each model worker "
                               "holds one, fetch and upload tasks a quarter); 0 = this machine's cores",
                               parse=_int(0, 4096), group="Ray")

    # Region post-processing overrides, as (RegionConfig field, value) pairs; empty = its defaults.
    region_overrides: tuple[tuple[str, Any], ...] = ()

    # -----------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read every knob; all invalid values are reported together, each by variable name."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in _knob_fields():
            raw = environ.get(f.metadata["env"])
            if raw is None or (raw.strip() == "" and f.default is not None and f.default != ""):
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                shown = "<hidden>" if f.metadata["secret"] else repr(raw)
                errors.append(f"{f.metadata['env']}={shown}: {exc}")

        if values.get("protocol"):
            values.update(protocol_defaults(values["protocol"], environ))

        overrides = []
        for rk in region_knobs():
            raw = environ.get(rk.env)
            if raw is None or raw.strip() == "":
                continue
            try:
                overrides.append((rk.field, rk.parse(raw)))
            except ValueError as exc:
                errors.append(f"{rk.env}={raw!r}: {exc}")
        values["region_overrides"] = tuple(overrides)

        if bool(environ.get("BASIC_AUTH_USER", "").strip()) != bool(environ.get("BASIC_AUTH_PASS", "")):
            errors.append("BASIC_AUTH_USER and BASIC_AUTH_PASS: set both or neither")
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))
        settings = cls(**values)
        if overrides:
            settings.region_config()  # let RegionConfig's own checks name a bad combination now
        return settings

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def weights_dir(self) -> str:
        return os.path.join(self.model_dir, "weights")

    def region_config(self):
        """`gem_model.regions.RegionConfig` with this environment's overrides applied."""
        from gem_model.regions import RegionConfig
        try:
            return RegionConfig(**dict(self.region_overrides))
        except (TypeError, ValueError) as exc:
            names = ", ".join(f"GEM_{k.upper()}" for k, _ in self.region_overrides)
            raise SettingsError(f"invalid region settings ({names}): {exc}") from exc

    def warnings(self) -> list[str]:
        """Combinations that start but probably do not do what was meant (logged at start)."""
        found = []
        if self.label_studio_api_key and not self.label_studio_url:
            found.append("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: the key is only ever sent "
                         "to LABEL_STUDIO_URL, so it will not be used; set LABEL_STUDIO_URL to Label Studio's "
                         "address (images then use only the token each /setup sends, for its own hostname)")
        return found

    def public_dict(self) -> dict[str, Any]:
        """Settings safe to log: secrets are reduced to whether they are set."""
        out = {}
        for f in _knob_fields():
            value = getattr(self, f.name)
            out[f.metadata["env"]] = ("<set>" if value else "") if f.metadata["secret"] else value
        region = dataclasses.asdict(self.region_config()) if region_knobs() else {}
        for rk in region_knobs():   # every region setting, with its effective value
            out[rk.env] = region.get(rk.field, rk.default)
        return out


# What a protocol preset sets in the backend: the choices that exist here (the evaluation's
# thresholds, softmax, class names and rescaling have no backend counterpart).
_PROTOCOL_KNOBS = (("method", "GEM_METHOD"), ("image_size", "GEM_IMAGE_SIZE"), ("slide_crop", "GEM_SLIDE_CROP"),
                   ("slide_stride", "GEM_SLIDE_STRIDE"), ("pamr_iters", "GEM_PAMR_ITERS"),
                   ("pamr_dilations", "GEM_PAMR_DILATIONS"), ("pos_embed", "GEM_POS_EMBED"))


def protocol_defaults(name: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings a GEM_PROTOCOL preset gives, for those knobs the environment leaves unset."""
    from gem_model.protocols import protocol

    preset = protocol(name)
    values = {"method": preset.method, "image_size": preset.image_size, "slide_crop": preset.slide_crop,
              "slide_stride": preset.slide_stride or Settings.slide_stride, "pamr_iters": preset.pamr_iters,
              "pamr_dilations": tuple(preset.pamr_dilations), "pos_embed": preset.pos_embed}
    return {field: values[field] for field, env in _PROTOCOL_KNOBS if not (environ.get(env) or "").strip()}


def check_model_files(settings: Settings) -> None:
    """Cheap start-up checks of the files the settings name, before anything is served.

    Loading the weights takes seconds to minutes and happens in the background; a missing,
    unreadable, empty or obviously broken file is reported here at once instead, by variable.
    A file that passes and still fails to load is reported by the loader (/health, and in
    gunicorn a non-zero exit: backend/wsgi.py). GEM_PRECISION=bf16 on a CPU without native bf16
    is refused here too (it would run slower than fp32, not faster).
    """
    errors = []
    _, problem = precision_report(settings)
    if problem:
        errors.append(f"GEM_PRECISION={settings.precision!r}: {problem}")
    if settings.model_config:
        problem = _file_problem(settings.model_config)
        if problem is None:
            try:
                with open(settings.model_config, encoding="utf-8") as handle:
                    if not isinstance(json.load(handle), dict):
                        problem = "is not a JSON object"
            except (ValueError, UnicodeDecodeError) as exc:
                problem = f"is not valid JSON ({exc})"
        if problem:
            errors.append(f"GEM_MODEL_CONFIG={settings.model_config!r}: {problem}")
    from gem_model.weights import looks_like_checkpoint_path

    pretrained = settings.pretrained
    if looks_like_checkpoint_path(pretrained):
        problem = _file_problem(pretrained) or _checkpoint_problem(pretrained)
        if problem:
            errors.append(f"GEM_PRETRAINED={pretrained!r}: {problem}")
    if errors:
        raise SettingsError("unusable model files:\n  " + "\n  ".join(errors))


def precision_report(settings: Settings) -> tuple[str, str | None]:
    """(one line for `--check` and the start log: the precision the model will run in on this
    machine and whether its CPU computes bf16 natively, the reason bf16 is refused or None)."""
    import torch

    from gem_model.errors import GemError
    from gem_model.factory import cpu_bf16_support, resolve_device, resolve_precision

    try:
        device = resolve_device(settings.device)
    except GemError as exc:
        return f"precision: {settings.precision} (device {settings.device}: {exc})", None
    cpu = cpu_bf16_support()
    try:
        resolved = resolve_precision(settings.precision, device, cpu)
        problem = None
    except GemError as exc:
        resolved, problem = "refused", str(exc)
    shown = settings.precision if resolved == settings.precision else f"{settings.precision} -> {resolved}"
    line = f"precision: {shown} on {device}"
    if device.type == "cpu":
        line += f"; {cpu.message}"
    elif device.type == "cuda":
        line += f"; bf16 {'supported' if torch.cuda.is_bf16_supported() else 'not supported'} by this GPU"
    return line, problem


def _file_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "is not a file"
    if not os.access(path, os.R_OK):
        return "is not readable by this user"
    if os.path.getsize(path) == 0:
        return "is empty"
    return None


def _checkpoint_problem(path: str) -> str | None:
    """Recognise the formats open_clip loads by their first bytes; zip archives must be whole."""
    import struct
    import zipfile
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head.startswith(b"PK"):                   # torch.save (>= 1.6), TorchScript, .npz
            return None if zipfile.is_zipfile(path) else "is a truncated or damaged zip archive (torch checkpoint)"
        if head[:1] == b"\x80" or head.startswith(b"\x93NUMPY"):   # legacy torch pickle, .npy
            return None
        if len(head) == 8:                            # safetensors: u64 header length + JSON header
            length = struct.unpack("<Q", head)[0]
            if 2 <= length <= size - 8:
                first = handle.read(1)
                if first == b"{":
                    return None
    return f"is not a PyTorch, safetensors or numpy checkpoint (it starts with {head[:8]!r})"


def command_settings() -> Settings | None:
    """Settings for a command-line tool (evaluate, learning); None after printing on stderr why the
    environment holds invalid ones (the caller then exits with 2)."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return None


def startup_error(exc: SettingsError) -> str:
    """One line for a failed start: 'gem-backend: cannot start: A; B'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head, rest = (lines[0].rstrip(":"), lines[1:]) if lines else ("invalid settings", [])
    return f"gem-backend: cannot start: {head}: {'; '.join(rest)}" if rest else f"gem-backend: cannot start: {head}"


def _knob_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if "env" in f.metadata]


# ---------------------------------------------------------------------------------------
# Region knobs, derived from RegionConfig.


@dataclass(frozen=True)
class RegionKnob:
    env: str
    field: str
    default: Any
    unit: str
    description: str
    parse: Callable[[str], Any]


def _region_config_class():
    try:
        from gem_model.regions import RegionConfig
    except ImportError:
        return None
    return RegionConfig


def _parser_for(annotation: Any, default: Any) -> Callable[[str], Any]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = default is None or "None" in text or "Optional" in text
    literal = re.findall(r"""['"]([^'"]+)['"]""", text) if "Literal" in text else []
    if literal:
        return _choice(tuple(literal))
    if isinstance(default, bool) or re.search(r"\bbool\b", text):
        return _bool
    if isinstance(default, int) and not isinstance(default, bool) or re.fullmatch(r"\s*int\s*(\|\s*None)?\s*", text):
        base = _int()
        if optional:
            return lambda raw: None if raw.strip().lower() in ("none", "") else base(raw)
        return base
    if isinstance(default, float) or re.search(r"\bfloat\b", text):
        return _float(optional=optional)
    return lambda raw: raw.strip().lower()


def region_knobs() -> list[RegionKnob]:
    """One knob per RegionConfig field; empty until gem_model.regions exists."""
    cls = _region_config_class()
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward refs: fall back to the raw annotation strings
        hints = {}
    knobs = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        annotation = hints.get(f.name, f.type)
        description = f.metadata.get("doc") or f.metadata.get("description") or f.name.replace("_", " ")
        unit = f.metadata.get("unit", "")
        knobs.append(RegionKnob(f"GEM_{f.name.upper()}", f.name, default, "" if unit == "-" else unit,
                                " ".join(str(description).split()), _parser_for(annotation, default)))
    return knobs


# ---------------------------------------------------------------------------------------
# Documentation table.


def _fmt_default(value: Any) -> str:
    if value is None or value == "" or value == ():
        return "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_rows() -> list[tuple[str, str, str, str, str]]:
    """(group, variable, default, unit, description) for every knob, in documentation order."""
    rows = []
    for f in _knob_fields():
        m = f.metadata
        rows.append((m["group"], m["env"], _fmt_default(f.default), m["unit"], m["description"]))
        if m["env"] == "GEM_LOAD_WAIT":  # region knobs read best right after the prediction knobs
            for rk in region_knobs():
                rows.append(("Regions", rk.env, _fmt_default(rk.default), rk.unit, rk.description))
    return rows


def settings_markdown() -> str:
    lines = ["| Variable | Default | Unit | Description |", "|---|---|---|---|"]
    group = None
    for g, env, default, unit, description in settings_rows():
        if g != group:
            lines.append(f"| **{g}** | | | |")
            group = g
        lines.append(f"| `{env}` | `{default}` | {unit} | {description.replace('|', '/')} |")
    return "\n".join(lines)


def settings_text() -> str:
    width = max(len(r[1]) for r in settings_rows())
    out = []
    for _, env, default, unit, description in settings_rows():
        suffix = f" [{unit}]" if unit else ""
        out.append(f"  {env:<{width}}  {description}{suffix} (default: {default})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m backend.settings",
                                     description="Show the backend's settings (environment variables).")
    parser.add_argument("--markdown", action="store_true", help="print the README settings table")
    parser.add_argument("--check", action="store_true", help="validate the current environment and print it")
    args = parser.parse_args(argv)
    if args.check:
        try:
            settings = Settings.from_env()
            check_model_files(settings)
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
        for key, value in settings.public_dict().items():
            print(f"{key}={_fmt_default(value)}")
        # stderr, like the warnings: stdout stays VARIABLE=value lines that scripts can parse
        print(precision_report(settings)[0], file=sys.stderr)
        for warning in settings.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    print(settings_markdown() if args.markdown else settings_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
