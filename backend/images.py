"""Task image URL -> EXIF-corrected RGB PIL image. All outbound HTTP of the backend goes here.

Understood sources:
* Label Studio uploads and local files: `/data/upload/...`, `upload/...`, `/data/local-files/?d=...`
  and any other URL starting with `/`, resolved against LABEL_STUDIO_URL or /setup's hostname;
* cloud storage URIs (`s3://`, `gs://`, `azure-blob://`, `azure-spi://`), which Label Studio
  presigns: `GET <LS>/tasks/<task id>/presign/?fileuri=<urlsafe base64 of the URI>` answers with
  a redirect to a signed URL (the route label-studio-sdk 2.1.2's get_local_path uses);
* plain `http(s)://` URLs and `data:` URIs.

Outbound policy (backend/urlguard.py): only http(s), Label Studio's own host and port, hosts in
GEM_ALLOWED_HOSTS, and hosts that resolve only to public addresses; checked on every redirect hop
and again, against rebinding, by the connection itself.

Label Studio credentials: a legacy token is sent as `Authorization: Token <t>`; a personal
access token (a JWT refresh token) is exchanged at `POST <LS>/api/token/refresh/` for a short-
lived access token sent as `Authorization: Bearer <access>`. The header is attached per request
hop and only when that hop's scheme, host and port equal Label Studio's, so a redirect to a
signed S3 URL or any other host never carries it. Which URL counts as Label Studio's depends on
where the token came from: LABEL_STUDIO_API_KEY belongs to LABEL_STUDIO_URL (and is not used
without it), a /setup `access_token` to the `hostname` of that same /setup.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from .ls_client import (LabelStudioAccess, LabelStudioCredentials, jwt_claims, origin,  # noqa: F401
                        redact, request_access_token)
from .settings import Settings
from .urlguard import BlockedURLError, GuardedAdapter, UnresolvableHostError, UrlGuard, deadline_scope

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
REDIRECT_CODES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
MAX_REMEMBERED_PROJECTS = 256


# The Label Studio routes that serve task media (label_studio/data_import/urls.py and
# io_storages/urls.py in 1.23): uploads, local files, and the storage proxies/presigners. Task
# data is written by whoever can import tasks, so the backend's key goes to these paths only;
# any other path on Label Studio (its API above all) is refused rather than fetched with the key.
MEDIA_ROUTES = ("/data/upload/", "/data/local-files/", "/storage-data/uploaded/",
                "/tasks/<id>/resolve/", "/tasks/<id>/presign/", "/projects/<id>/resolve/", "/projects/<id>/presign/")
_MEDIA_PATH = re.compile(r"^/(?:data/upload/.|data/local-files/?(?:\?|$)|storage-data/uploaded/?(?:\?|$)"
                         r"|(?:tasks|projects)/\d+/(?:resolve|presign)/?(?:\?|$))")


def is_media_route(url: str, label_studio_url: str) -> bool:
    """Whether `url` (on Label Studio's origin) is one of its media routes. Label Studio may be
    served under a path prefix (LABEL_STUDIO_URL=http://host/ls): routes are matched below it."""
    parts = urlsplit(url)
    path = posixpath.normpath(unquote(parts.path)) if parts.path else "/"
    prefix = urlsplit(label_studio_url).path.rstrip("/")
    if prefix:
        if not (path == prefix or path.startswith(prefix + "/")):
            return False
        path = path[len(prefix):] or "/"
    if parts.path.endswith("/") and not path.endswith("/"):
        path += "/"   # normpath drops the trailing slash the routes end with
    return bool(_MEDIA_PATH.match(path + ("?" + parts.query if parts.query else "")))


class ImageFetchError(Exception):
    """An image could not be obtained; `reason` is a short metric label, str() says what happened."""

    def __init__(self, message: str, reason: str = "fetch"):
        super().__init__(message)
        self.reason = reason


@dataclass
class FetchedImage:
    image: Image.Image          # RGB, EXIF orientation applied; may be a reduced copy (decode_image's min_side)
    width: int                  # original size after EXIF orientation: what Label Studio displays
    height: int


class ImageFetcher:
    """One object for every outbound request: URL resolution, LS auth, limits, decoding."""

    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self.timeout = settings.fetch_timeout
        self.max_bytes = int(settings.fetch_max_mb * 1024 * 1024)
        self.max_redirects = settings.fetch_max_redirects
        self.max_pixels = int(settings.max_image_megapixels * 1_000_000)
        self.guard = UrlGuard(settings.allowed_hosts)
        self.session = session or self._new_session(settings.fetch_workers)
        self.credentials = LabelStudioCredentials()
        self._setup_lock = threading.Lock()
        self._setup: dict[str, LabelStudioAccess] = {}   # project key -> what /setup sent
        self._last_setup: LabelStudioAccess | None = None
        self._warned_hosts: set[str] = set()

    @staticmethod
    def _new_session(pool: int) -> requests.Session:
        session = requests.Session()
        # Direct connections resolve, check and connect in one step (no DNS rebinding window).
        adapter = GuardedAdapter(pool_connections=8, pool_maxsize=max(pool * 2, 10))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    # -- Label Studio location and token ------------------------------------------------

    def remember_setup(self, project_key: str | None, hostname: str | None, access_token: str | None) -> None:
        access = LabelStudioAccess(url=(hostname or "").strip().rstrip("/"), token=(access_token or "").strip())
        if access.url and not access.url.startswith(("http://", "https://")):
            access = LabelStudioAccess(url="", token=access.token)
        self._warn_if_setup_token_unusable(access)
        with self._setup_lock:
            if project_key:
                self._setup.pop(project_key, None)
                self._setup[project_key] = access
                while len(self._setup) > MAX_REMEMBERED_PROJECTS:   # /setup may be open: stay bounded
                    self._setup.pop(next(iter(self._setup)))
            self._last_setup = access

    def _warn_if_setup_token_unusable(self, access: LabelStudioAccess) -> None:
        """Say once per hostname when a /setup token can never be used: images are fetched from
        LABEL_STUDIO_URL, and a token only goes to the host it came with."""
        env_url = self.settings.label_studio_url
        if not (access.token and access.url and env_url) or self.settings.label_studio_api_key:
            return
        if origin(access.url) == origin(env_url) or access.url in self._warned_hosts:
            return
        if len(self._warned_hosts) < MAX_REMEMBERED_PROJECTS:   # /setup may be open: stay bounded
            self._warned_hosts.add(access.url)
        logger.warning(
            "/setup names Label Studio at %s but LABEL_STUDIO_URL is %s: the token that /setup sent is not "
            "sent to %s, so images under /data/ will be refused (401). Set LABEL_STUDIO_API_KEY, or set Label "
            "Studio's LABEL_STUDIO_HOST to the same URL as LABEL_STUDIO_URL", access.url, env_url, env_url)

    def label_studio(self, project_key: str | None = None) -> LabelStudioAccess:
        """Label Studio's URL and the token that goes with it. A token travels only with the URL
        it came with: LABEL_STUDIO_API_KEY with LABEL_STUDIO_URL, a /setup token with the
        hostname of that same /setup. /setup is open by default, so a hostname it names must
        never receive the environment's key (without LABEL_STUDIO_URL that key is not used)."""
        with self._setup_lock:
            setup = self._setup.get(project_key or "") or self._last_setup or LabelStudioAccess("", "")
        env_url, env_key = self.settings.label_studio_url, self.settings.label_studio_api_key
        if not env_url:
            return setup
        if env_key:
            return LabelStudioAccess(url=env_url, token=env_key)
        same_host = bool(setup.url) and origin(setup.url) == origin(env_url)
        return LabelStudioAccess(url=env_url, token=setup.token if same_host else "")

    # -- public ----------------------------------------------------------------------

    def decode(self, data: bytes, min_side: int | None = None) -> FetchedImage:
        return decode_image(data, max_pixels=self.max_pixels, min_side=min_side)

    def download(self, url: str, task_id: int | None = None, project_key: str | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("task has no image URL", reason="no_image")
        url = url.strip()
        if url.startswith("data:"):
            return self._data_uri(url)
        access = self.label_studio(project_key)
        target = self.resolve(url, access, task_id)
        return self.get(target, access)

    def resolve(self, url: str, access: LabelStudioAccess, task_id: int | None = None) -> str:
        """Absolute http(s) URL to download `url` from."""
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD_SCHEMES:
            if not access.url:
                raise ImageFetchError(f"{scheme}:// image needs Label Studio to presign it: set LABEL_STUDIO_URL",
                                      reason="config")
            if task_id is None:
                raise ImageFetchError(f"{scheme}:// image needs the task id to presign it", reason="no_image")
            text = str(task_id)
            if isinstance(task_id, bool) or not (isinstance(task_id, int) or (text.isascii() and text.isdigit())):
                raise ImageFetchError(f"{scheme}:// image needs an integer task id to presign it", reason="no_image")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{access.url}/tasks/{int(task_id)}/presign/?fileuri={encoded}"
        if url.startswith("upload/"):
            url = "/data/" + url
        if url.startswith("/"):
            if not access.url:
                raise ImageFetchError(
                    f"relative image URL {redact(url)} needs Label Studio's address: set LABEL_STUDIO_URL "
                    "(or connect the backend from Label Studio so /setup sends it)", reason="config")
            return access.url + url
        if scheme in ("http", "https"):
            return url
        raise ImageFetchError(f"unsupported image URL {redact(url)}: expected http(s), /data/..., "
                              f"{', '.join(s + '://' for s in CLOUD_SCHEMES)} or data:", reason="no_image")

    @staticmethod
    def trusted(access: LabelStudioAccess) -> frozenset:
        """(host, port) pairs allowed whatever they resolve to: Label Studio's own origin."""
        if not access.url:
            return frozenset()
        _, host, port = origin(access.url)
        return frozenset({(host, port)}) if host and port else frozenset()

    def check_url(self, url: str, access: LabelStudioAccess | None = None) -> None:
        """Gate for every outbound request hop: scheme, host and resolved addresses (backend/urlguard.py)."""
        try:
            self.guard.check_url(url, self.trusted(access or LabelStudioAccess("", "")))
        except UnresolvableHostError as exc:
            raise ImageFetchError(f"cannot connect to {redact(url)}: {exc}", reason="connection") from None
        except BlockedURLError as exc:
            raise ImageFetchError(f"refusing to fetch {redact(url)}: {exc}", reason="blocked") from None

    def get(self, url: str, access: LabelStudioAccess) -> bytes:
        """Download with the LS token on LS-origin hops only, within size, time and redirect limits."""
        deadline = time.monotonic() + self.timeout
        ls_origin = origin(access.url) if access.url else None
        first = url
        refreshed = False
        hops = 0
        while True:
            self.check_url(url, access)
            on_ls = ls_origin is not None and origin(url) == ls_origin
            if on_ls and access.token and not is_media_route(url, access.url):
                came_from = f" (redirected from {redact(first)})" if url != first else ""
                raise ImageFetchError(
                    f"refusing to fetch {redact(url)}{came_from} with Label Studio's credentials: only its media "
                    f"routes ({', '.join(MEDIA_ROUTES)}) get them, and this path is not one",
                    reason="blocked")
            # identity: images are compressed already, and it leaves no gzip bomb to inflate.
            headers = {"Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}
            auth = self._auth_header(access, deadline) if on_ls else None
            if auth:
                headers["Authorization"] = auth
            response = self._send("GET", url, deadline, access, headers=headers, stream=True)
            try:
                if response.status_code in REDIRECT_CODES and response.headers.get("Location"):
                    hops += 1
                    if hops > self.max_redirects:
                        raise ImageFetchError(f"too many redirects (> {self.max_redirects}) for {redact(url)}",
                                              reason="redirects")
                    url = urljoin(url, response.headers["Location"])
                    continue
                if (response.status_code == 401 and on_ls and not refreshed
                        and LabelStudioCredentials.is_personal_access_token(access.token)):
                    # The cached access token may have been revoked or expired early: renew once.
                    refreshed = True
                    self.credentials.invalidate(access, auth)
                    continue
                if response.status_code >= 400:
                    hint = ""
                    if on_ls and response.status_code in (401, 403):
                        if access.token:
                            hint = (" (check LABEL_STUDIO_API_KEY: legacy tokens must be enabled in Label Studio, "
                                    "or use a personal access token)")
                        elif self.settings.label_studio_api_key:
                            hint = " (LABEL_STUDIO_API_KEY is only sent to LABEL_STUDIO_URL: set it)"
                        else:
                            hint = " (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)"
                    raise ImageFetchError(f"HTTP {response.status_code} from {redact(url, keep_query=on_ls)}{hint}",
                                          reason=f"http_{response.status_code // 100}xx")
                body = self._read_body(response, url, deadline)
                _refuse_html(body, response.headers.get("Content-Type", ""), url)
                return body
            finally:
                response.close()

    # -- internals ---------------------------------------------------------------------

    def _send(self, method: str, url: str, deadline: float, access: LabelStudioAccess, **kwargs) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(f"timed out after {self.timeout:g} s fetching {redact(url)}", reason="timeout")
        try:
            with self.guard.enforcing(self.trusted(access)), deadline_scope(deadline):
                return self.session.request(
                    method, url, timeout=(min(10.0, remaining), remaining), allow_redirects=False,
                    # A no-op auth stops requests from adding ~/.netrc credentials for arbitrary hosts.
                    auth=_no_auth, **kwargs)
        except UnresolvableHostError as exc:
            raise ImageFetchError(f"cannot connect to {redact(url)}: {exc}", reason="connection") from None
        except BlockedURLError as exc:  # raised by the connection: the name now resolves elsewhere
            raise ImageFetchError(f"refusing to fetch {redact(url)}: {exc}", reason="blocked") from None
        except requests.Timeout:
            raise ImageFetchError(f"timed out fetching {redact(url)}", reason="timeout") from None
        except requests.ConnectionError as exc:
            if time.monotonic() >= deadline:   # the deadline's watchdog closed a server still sending headers
                raise ImageFetchError(f"timed out after {self.timeout:g} s waiting for {redact(url)} to answer",
                                      reason="timeout") from None
            raise ImageFetchError(f"cannot connect to {redact(url)}: {type(exc).__name__}",
                                  reason="connection") from None
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise ImageFetchError(f"timed out after {self.timeout:g} s waiting for {redact(url)} to answer",
                                      reason="timeout") from None
            raise ImageFetchError(f"request to {redact(url)} failed: {type(exc).__name__}",
                                  reason="connection") from None

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ImageFetchError(f"image at {redact(url)} is {int(length)} bytes, over the "
                                  f"{self.settings.fetch_max_mb:g} MiB limit (GEM_FETCH_MAX_MB)", reason="too_large")
        buffer = io.BytesIO()
        raw = response.raw
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ImageFetchError(f"timed out after {self.timeout:g} s reading {redact(url)}",
                                          reason="timeout")
                # read1 returns what one receive brings, and the socket waits at most until the
                # deadline: a server dripping bytes cannot stretch a download past GEM_FETCH_TIMEOUT.
                _set_read_timeout(raw, remaining)
                chunk = raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    break
                buffer.write(chunk)
                if buffer.tell() > self.max_bytes:
                    raise ImageFetchError(f"image at {redact(url)} exceeds the {self.settings.fetch_max_mb:g} MiB "
                                          "limit (GEM_FETCH_MAX_MB)", reason="too_large")
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
            raise ImageFetchError(f"timed out after {self.timeout:g} s reading {redact(url)}",
                                  reason="timeout") from None
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise ImageFetchError(f"download of {redact(url)} broke off: {type(exc).__name__}",
                                  reason="connection") from None
        return buffer.getvalue()

    def _auth_header(self, access: LabelStudioAccess, deadline: float) -> str | None:
        """The Authorization value for Label Studio (backend/ls_client.py), refreshing a personal
        access token through this fetcher's guarded transport."""
        return self.credentials.header(access, deadline, refresh=self._refresh_access_token, error=ImageFetchError)

    def _refresh_access_token(self, access: LabelStudioAccess, deadline: float) -> str:
        if access.url:
            self.check_url(access.url + "/api/token/refresh/", access)
        return request_access_token(access, deadline, self._send, error=ImageFetchError)

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageFetchError("malformed data: URI", reason="no_image")
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise ImageFetchError("data: URI exceeds GEM_FETCH_MAX_MB", reason="too_large")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageFetchError("malformed base64 in data: URI", reason="no_image") from None


def _no_auth(request):
    return request


def _set_read_timeout(raw, seconds: float) -> None:
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(0.01, seconds))
        except OSError:
            pass


def _refuse_html(body: bytes, content_type: str, url: str) -> None:
    """A login or error page answered with 200 is worth a clearer message than 'not an image'."""
    if content_type.split(";", 1)[0].strip().lower() in ("text/html", "application/xhtml+xml") \
            and body.lstrip()[:1] == b"<":
        raise ImageFetchError(f"{redact(url)} answered with an HTML page, not an image (a login or error page?)",
                              reason="decode")


def decode_image(data: bytes, max_pixels: int | None = None, min_side: int | None = None) -> FetchedImage:
    """Bytes -> RGB image in the orientation Label Studio shows (EXIF applied).

    The pixel count is checked from the header before anything is decoded, so a small file that
    claims a huge image (a decompression bomb) costs nothing. Animated images give their first
    frame; 16-bit and float images are scaled to 8 bits the way a browser shows them.

    `min_side`: the caller needs no more than this many pixels on the short side (GEM's input and
    the working resolution of the regions). A JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the
    DCT (draft mode: a 12 MP photo decodes in a fraction of the time and memory), and any image
    still twice as large is box-reduced. `width` and `height` stay the original's.
    """
    if not data:
        raise ImageFetchError("not a readable image (empty file)", reason="decode")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageFetchError(
                    f"image is {width}x{height} = {width * height / 1e6:.3g} megapixels, over the "
                    f"{max_pixels / 1e6:g} MP limit (GEM_MAX_IMAGE_MEGAPIXELS)", reason="too_large")
            if min_side and opened.format == "JPEG" and min(width, height) >= 2 * min_side:
                opened.draft(None, (min_side, min_side))   # both sides stay >= min_side
            opened.load()
            if _quarter_turned(opened):
                # Read from the tag, not from a size change: a near-square photo decoded in draft
                # mode can come out square, and then the turn would not show in its size.
                width, height = height, width
            image = ImageOps.exif_transpose(opened)
            image = _to_rgb(image)
            factor = min(image.width, image.height) // min_side if min_side else 1
            if factor >= 2:
                image = image.reduce(factor)
    except Image.DecompressionBombError as exc:
        raise ImageFetchError(f"image too large to decode: {exc}", reason="too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageFetchError(f"not a readable image ({type(exc).__name__})", reason="decode") from None
    if image.width < 1 or image.height < 1:
        raise ImageFetchError("image has no pixels", reason="decode")
    return FetchedImage(image=image, width=width, height=height)


# EXIF orientations 5-8 include a quarter turn: the image Label Studio shows is height x width.
_QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)


def _quarter_turned(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112) in _QUARTER_TURN_ORIENTATIONS   # 0x0112: Orientation
    except Exception:   # noqa: BLE001 - a malformed EXIF block means no usable orientation
        return False


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. Pillow's own conversion clips 16-bit values at 255 (a white image)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and 255 < values.max() <= 65535):
            values = values / 257.0                       # 0..65535 -> 0..255, as browsers show 16-bit
        elif values.size and (values.min() < 0 or values.max() > 255):
            lo, hi = float(values.min()), float(values.max())
            values = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        elif image.mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        gray = np.nan_to_num(values, nan=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")   # palette transparency: convert via RGBA, as Pillow advises
    return image.convert("RGB")
