"""Helpers for the backend tests: a fake predictor and region extractor, local HTTP servers,
test images and labeling configs.

The fake predictor makes predictions checkable by eye: a prompt's similarity map is the image
brightness (so a bright square is found where it is drawn), unless the prompt names a side
("left", "right", "top", "bottom"), which lights up that half.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="Bright" background="red"/>
    <Label value="Dark"/>
  </BrushLabels>
</View>"""

POLYGON_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels").replace('name="brush"', 'name="poly"')
RECTANGLE_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "RectangleLabels").replace('name="brush"', 'name="rect"')

MIXED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Bright"/><Label value="Dark"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Bright"/><Label value="Dark"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="Bright"/><Label value="Dark"/></RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
</View>"""


# ---------------------------------------------------------------------------------------
# Fake model


@dataclass
class FakeEncoded:
    brightness: np.ndarray                 # float32 [H0, W0] in 0..1
    original_size: tuple[int, int]
    rgb: np.ndarray | None = None          # float32 [H0, W0, 3] in 0..1


class FakePredictor:
    """Stands in for gem_model.HeatmapPredictor: same methods, transparent maps."""

    def __init__(self, fail_on_size: tuple[int, int] | None = None):
        self.encode_calls: list[int] = []   # batch length per encode() call
        self.similarity_calls: list[tuple[str, ...]] = []   # prompts matched, per call
        self.upsample_calls = 0
        self.fail_on_size = fail_on_size
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def _enter(self):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _leave(self):
        with self._lock:
            self.active -= 1

    def encode(self, images, batch_size=8):
        self._enter()
        try:
            self.encode_calls.append(len(images))
            out = []
            for image in images:
                if self.fail_on_size and image.size == self.fail_on_size:
                    raise ValueError("fake model rejects this size")
                gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
                out.append(FakeEncoded(gray, gray.shape, rgb))
            return out
        finally:
            self._leave()

    def grid_size(self, encoded):
        """The fake's maps are pixel-exact: its "grid" is the image, so regions are made at its size."""
        return tuple(encoded.original_size)

    def grid_similarity(self, encoded, prompts):
        return self.similarity(encoded, prompts)

    def patch_embeddings(self, encoded):
        """Unit colour vectors per pixel (a dim constant keeps black a direction): like colours match."""
        rgb = encoded.rgb if encoded.rgb is not None else np.repeat(encoded.brightness[..., None], 3, axis=2)
        features = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 0.1, np.float32)], axis=2)
        return features / np.linalg.norm(features, axis=2, keepdims=True)

    def upsample(self, grid_maps, encoded, output_size=None):
        h, w = encoded.original_size
        assert output_size in (None, (h, w)), "the fake makes maps at the encoded size only"
        self.upsample_calls += 1
        return np.asarray(grid_maps, dtype=np.float32)

    def similarity(self, encoded, prompts, output_size=None):
        self._enter()
        try:
            self.similarity_calls.append(tuple(prompts))
            h, w = encoded.original_size
            assert output_size in (None, (h, w)), "the fake makes maps at the encoded size only"
            maps = []
            for prompt in prompts:
                p = set(prompt.lower().split())   # whole words: "Bright" must not mean "right"
                m = np.zeros((h, w), np.float32)
                if "left" in p:
                    m[:, : w // 2] = 1
                elif "right" in p:
                    m[:, w // 2:] = 1
                elif "top" in p:
                    m[: h // 2] = 1
                elif "bottom" in p:
                    m[h // 2:] = 1
                elif "dark" in p:
                    m = 1.0 - encoded.brightness
                elif "nothing" in p:
                    pass
                else:
                    m = encoded.brightness.copy()
                maps.append(m)
            return np.stack(maps)
        finally:
            self._leave()


class SlowPredictor(FakePredictor):
    """Each encoded image costs `seconds` of wall time."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def encode(self, images, batch_size=8):
        time.sleep(self.seconds * len(images))
        return super().encode(images, batch_size)


@dataclass
class FakeRegion:
    label: str
    prompt: str
    mask: np.ndarray
    score: float
    bbox: tuple[int, int, int, int]
    polygons: list = field(default_factory=list)


@dataclass
class FakeImageRegions:
    regions: list
    score: float


def fake_extract_regions(heatmaps, labels, config=None, image=None, prompts=None, size=None):
    """Argmax over labels, foreground where the winner's map exceeds 0.5; one region per label."""
    heatmaps = np.asarray(heatmaps)
    winner = heatmaps.argmax(axis=0)
    best = heatmaps.max(axis=0)
    regions = []
    for k, label in enumerate(labels):
        mask = (winner == k) & (best > 0.5)
        if not mask.any():
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        polygon = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        regions.append(FakeRegion(label, label, mask, float(heatmaps[k][mask].mean()), (x0, y0, x1, y1), [polygon]))
    score = float(np.mean([r.score for r in regions])) if regions else 0.0
    return FakeImageRegions(regions, score)


# ---------------------------------------------------------------------------------------
# Images


def square_image(width=40, height=30, box=(10, 5, 20, 15), fmt="PNG", exif_orientation=None) -> bytes:
    """Black image with a white box (x0, y0, x1, y1 exclusive), encoded as `fmt`."""
    array = np.zeros((height, width, 3), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        image.save(buffer, format=fmt, exif=exif.tobytes(), quality=95)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def fetch_image(fetcher, url: str, task_id: int | None = None, project_key: str | None = None):
    """Download and decode `url` the way the backend's pipeline does (FetchedImage)."""
    return fetcher.decode(fetcher.download(url, task_id=task_id, project_key=project_key))


def make_jwt(claims: dict[str, Any]) -> str:
    def seg(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(claims)}.c2lnbmF0dXJl"


# ---------------------------------------------------------------------------------------
# Local HTTP servers


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


class ThreadedServer:
    """Base of the test servers: a threaded HTTP server on a free 127.0.0.1 port."""

    def _start(self, handler: type) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class LocalServer(ThreadedServer):
    """A threaded HTTP server on 127.0.0.1 whose routes are plain functions.

    A route takes (Seen) and returns (status, headers, body). Every request is recorded in
    `seen`, with its headers, so tests can assert who received which Authorization.
    """

    def __init__(self):
        self.routes: dict[tuple[str, str], Callable[[Seen], tuple[int, dict, bytes]]] = {}
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, {k: v for k, v in self.headers.items()},
                            self.rfile.read(length) if length else b"")
                outer.seen.append(seen)
                route = outer.routes.get((self.command, self.path)) or outer.routes.get((self.command, "*"))
                status, headers, body = route(seen) if route else (404, {}, b"not found")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

            def log_message(self, *args):  # keep test output quiet
                pass

        self._start(Handler)

    def image(self, path: str, data: bytes, content_type: str = "image/png", require: str | None = None):
        """Serve `data` at `path`; with `require`, only to requests whose Authorization equals it."""
        def route(seen: Seen):
            if require is not None and seen.headers.get("Authorization") != require:
                return 401, {"Content-Type": "application/json"}, b'{"detail":"auth"}'
            return 200, {"Content-Type": content_type}, data
        self.routes[("GET", path)] = route

    def redirect(self, path: str, location: str, status: int = 302):
        self.routes[("GET", path)] = lambda seen: (status, {"Location": location}, b"")

    def auth_headers(self) -> list[str | None]:
        return [s.headers.get("Authorization") for s in self.seen]

