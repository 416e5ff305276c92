"""Image fetching: Label Studio URLs, tokens (legacy and personal access tokens), limits, EXIF.

Two local HTTP servers play Label Studio and an unrelated host; the unrelated host must never
receive an Authorization header, whatever route leads there.
"""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest

from backend.images import ImageFetcher, ImageFetchError, decode_image, jwt_claims, origin
from backend.settings import Settings
from backend_fixtures import data_uri, fetch_image, make_jwt, square_image

PNG = square_image()


def fetcher_for(ls_url: str = "", token: str = "", **env) -> ImageFetcher:
    # The "other host" servers listen on loopback, which the SSRF guard refuses unless allowed
    # (backend/urlguard.py; tests/test_hardening_urls.py tests the guard itself).
    environ = {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token, "GEM_ALLOWED_HOSTS": "127.0.0.1,::1", **env}
    return ImageFetcher(Settings.from_env(environ))


def test_legacy_token_on_upload_and_local_files(ls):
    ls.image("/data/upload/1/a.png", PNG, require="Token legacy-abc")
    ls.image("/data/local-files/?d=photos/b.png", PNG, require="Token legacy-abc")
    fetcher = fetcher_for(ls.url, "legacy-abc")
    for url in ("/data/upload/1/a.png", "upload/1/a.png", "/data/local-files/?d=photos/b.png"):
        fetched = fetch_image(fetcher, url)
        assert (fetched.width, fetched.height) == (40, 30) and fetched.image.mode == "RGB"
    assert set(ls.auth_headers()) == {"Token legacy-abc"}


def test_personal_access_token_is_refreshed_and_cached(ls):
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600, "jti": "x"})
    accesses = []

    def refresh(seen):
        assert json.loads(seen.body) == {"refresh": pat}
        access = make_jwt({"token_type": "access", "exp": time.time() + 300, "n": len(accesses)})
        accesses.append(access)
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": access}).encode()

    ls.routes[("POST", "/api/token/refresh/")] = refresh
    ls.routes[("GET", "/data/upload/1/a.png")] = lambda seen: (
        (200, {"Content-Type": "image/png"}, PNG) if seen.headers.get("Authorization") == f"Bearer {accesses[-1]}"
        else (401, {}, b"no"))
    fetcher = fetcher_for(ls.url, pat)
    fetch_image(fetcher, "/data/upload/1/a.png")
    fetch_image(fetcher, "/data/upload/1/a.png")
    assert len(accesses) == 1                     # second fetch reused the cached access token
    assert f"Bearer {pat}" not in ls.auth_headers()  # the PAT itself is never used as a bearer


def test_personal_access_token_refreshed_before_expiry_and_after_401(ls):
    pat = make_jwt({"token_type": "refresh"})
    accesses = []
    lifetime = [5.0]   # first inside the renewal margin: every use must refresh again

    def refresh(seen):
        access = make_jwt({"token_type": "access", "exp": time.time() + lifetime[0], "n": len(accesses)})
        accesses.append(access)
        return 200, {}, json.dumps({"access": access}).encode()

    ls.routes[("POST", "/api/token/refresh/")] = refresh
    ls.image("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(ls.url, pat)
    fetch_image(fetcher, "/data/upload/1/a.png")
    fetch_image(fetcher, "/data/upload/1/a.png")
    assert len(accesses) == 2

    # A revoked access token (401) is renewed once and the download retried.
    lifetime[0] = 300.0
    pat2 = make_jwt({"token_type": "refresh", "k": 2})
    served = []
    ls.routes[("GET", "/data/upload/2/b.png")] = lambda seen: (
        (401, {}, b"") if not served and not served.append(1) else (200, {}, PNG))
    fetcher2 = fetcher_for(ls.url, pat2)
    fetch_image(fetcher2, "/data/upload/2/b.png")
    assert len(served) == 1 and len(accesses) == 4   # one refresh to start, one after the 401


def test_refused_personal_access_token_is_a_clear_error(ls):
    ls.routes[("POST", "/api/token/refresh/")] = lambda seen: (401, {}, b'{"detail":"bad"}')
    with pytest.raises(ImageFetchError, match="personal access token"):
        fetch_image(fetcher_for(ls.url, make_jwt({"token_type": "refresh"})), "/data/upload/1/a.png")


def test_token_never_sent_to_other_hosts(ls, other):
    other.image("/pic.png", PNG)
    ls.redirect("/data/upload/1/moved.png", f"{other.url}/pic.png")
    fetcher = fetcher_for(ls.url, "legacy-abc")
    fetch_image(fetcher, f"{other.url}/pic.png")                 # direct URL to another host
    fetch_image(fetcher, "/data/upload/1/moved.png")              # LS redirects to another host
    fetch_image(fetcher, f"http://localhost:{other.url.rsplit(':', 1)[1]}/pic.png")  # same machine, other port
    assert len(other.seen) == 3
    assert other.auth_headers() == [None, None, None]
    assert ls.auth_headers() == ["Token legacy-abc"]


def test_setup_token_and_hostname_are_the_fallback(ls):
    ls.image("/data/upload/1/a.png", PNG, require="Token from-setup")
    fetcher = fetcher_for()
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        fetch_image(fetcher, "/data/upload/1/a.png")
    fetcher.remember_setup("1", ls.url, "from-setup")
    assert fetch_image(fetcher, "/data/upload/1/a.png", project_key="1").width == 40
    # The environment wins over /setup.
    env_fetcher = fetcher_for(ls.url, "from-env")
    env_fetcher.remember_setup("1", "http://elsewhere:1", "from-setup")
    assert env_fetcher.label_studio("1").token == "from-env" and env_fetcher.label_studio("1").url == ls.url


def test_environment_key_goes_only_to_label_studio_url(ls, other):
    other.image("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for("", "env-secret")            # a key, but no URL it belongs to
    fetcher.remember_setup("1", other.url, None)        # /setup names a host and sends no token
    assert fetch_image(fetcher, "/data/upload/1/a.png", project_key="1").width == 40
    fetcher.remember_setup("2", other.url, "its-own")   # a /setup token goes to its own hostname
    fetch_image(fetcher, "/data/upload/1/a.png", project_key="2")
    assert other.auth_headers() == [None, "Token its-own"]
    other.image("/data/upload/1/b.png", PNG, require="Token env-secret")
    with pytest.raises(ImageFetchError, match="only sent to LABEL_STUDIO_URL"):
        fetch_image(fetcher, "/data/upload/1/b.png", project_key="1")


def test_setup_token_goes_only_to_the_hostname_of_its_setup(ls, other, caplog):
    ls.image("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(ls.url, "")                   # LABEL_STUDIO_URL without a key
    with caplog.at_level("WARNING", logger="backend.images"):
        fetcher.remember_setup("1", other.url, "meant-for-other")
        fetcher.remember_setup("1", other.url, "meant-for-other")
    # The operator learns why images will be refused, once per hostname, not at every /setup.
    warnings = [r.getMessage() for r in caplog.records if "LABEL_STUDIO_HOST" in r.getMessage()]
    assert len(warnings) == 1 and other.url in warnings[0] and ls.url in warnings[0]
    fetch_image(fetcher, "/data/upload/1/a.png", project_key="1")
    fetcher.remember_setup("1", ls.url + "/", "meant-for-ls")   # same origin as LABEL_STUDIO_URL
    fetch_image(fetcher, "/data/upload/1/a.png", project_key="1")
    assert ls.auth_headers() == [None, "Token meant-for-ls"] and other.seen == []


def test_token_refresh_does_not_hold_up_other_tokens(ls):
    """A slow refresh of one personal access token stalls neither other tokens' requests nor
    makes concurrent requests for the same token refresh it more than once."""
    slow_pat, fast_pat = make_jwt({"token_type": "refresh", "k": "slow"}), make_jwt({"token_type": "refresh"})
    release, refreshes = threading.Event(), []

    def refresh(seen):
        pat = json.loads(seen.body)["refresh"]
        refreshes.append(pat)
        if pat == slow_pat:
            release.wait(10)
        return 200, {}, json.dumps({"access": make_jwt({"token_type": "access", "exp": time.time() + 300,
                                                        "for": pat[-6:]})}).encode()

    ls.routes[("POST", "/api/token/refresh/")] = refresh
    ls.image("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(GEM_FETCH_TIMEOUT="20")
    fetcher.remember_setup("slow", ls.url, slow_pat)
    fetcher.remember_setup("fast", ls.url, fast_pat)
    fetch_image(fetcher, "/data/upload/1/a.png", project_key="fast")          # caches fast_pat's access token
    errors: list[BaseException] = []

    def slow_fetch():
        try:
            fetch_image(fetcher, "/data/upload/1/a.png", project_key="slow")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=slow_fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while slow_pat not in refreshes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow_pat in refreshes                       # the slow refresh is in progress now
    started = time.monotonic()
    fetch_image(fetcher, "/data/upload/1/a.png", project_key="fast")          # must not wait for it
    fetch_image(fetcher_for(ls.url, "legacy"), "/data/upload/1/a.png")
    assert time.monotonic() - started < 5 and not release.is_set()
    release.set()
    for thread in threads:
        thread.join(15)
    assert not errors
    assert refreshes.count(slow_pat) == 1 and refreshes.count(fast_pat) == 1


def test_cloud_uri_is_presigned_by_label_studio(ls, other):
    uri = "s3://bucket/dir/photo.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    other.image("/signed.png?X-Amz-Signature=abc", PNG)
    ls.redirect(f"/tasks/42/presign/?fileuri={encoded}", f"{other.url}/signed.png?X-Amz-Signature=abc", 303)
    fetched = fetch_image(fetcher_for(ls.url, "legacy-abc"), uri, task_id=42)
    assert fetched.width == 40
    assert ls.auth_headers() == ["Token legacy-abc"] and other.auth_headers() == [None]
    with pytest.raises(ImageFetchError, match="task id"):
        fetch_image(fetcher_for(ls.url, "t"), uri)


def test_http_errors_limits_and_bad_urls(ls):
    fetcher = fetcher_for(ls.url, "t", GEM_FETCH_MAX_MB="0.001", GEM_FETCH_MAX_REDIRECTS="2")
    with pytest.raises(ImageFetchError, match="HTTP 404") as info:
        fetch_image(fetcher, "/data/upload/1/missing.png")
    assert info.value.reason == "http_4xx"

    ls.image("/data/upload/1/big.png", b"\0" * 5000)
    with pytest.raises(ImageFetchError, match="GEM_FETCH_MAX_MB"):
        fetch_image(fetcher, "/data/upload/1/big.png")

    for k in range(4):
        ls.redirect(f"/data/upload/1/loop{k}", f"/data/upload/1/loop{k + 1}")
    with pytest.raises(ImageFetchError, match="too many redirects"):
        fetch_image(fetcher, "/data/upload/1/loop0")

    ls.image("/data/upload/1/text.png", b"this is not an image")
    with pytest.raises(ImageFetchError, match="not a readable image") as info:
        fetch_image(fetcher, "/data/upload/1/text.png")
    assert info.value.reason == "decode"

    for url in ("ftp://x/y.png", "file:///etc/passwd", "", "C:\\a.png"):
        with pytest.raises(ImageFetchError):
            fetch_image(fetcher, url)
    with pytest.raises(ImageFetchError, match="cannot connect"):
        fetch_image(fetcher, "http://127.0.0.1:9/nothing.png")


def test_errors_do_not_leak_signed_queries(other):
    other.routes[("GET", "*")] = lambda seen: (403, {}, b"")
    with pytest.raises(ImageFetchError) as info:
        fetch_image(fetcher_for(), f"{other.url}/x.png?X-Amz-Signature=SECRET")
    assert "SECRET" not in str(info.value)


def test_data_uri():
    fetched = fetch_image(fetcher_for(), data_uri(PNG))
    assert (fetched.width, fetched.height) == (40, 30)


def test_exif_orientation_is_applied():
    # Stored 40x30 landscape with the box at x 10..20, y 5..15; orientation 6 = rotate 90 deg clockwise.
    jpeg = square_image(fmt="JPEG", exif_orientation=6)
    fetched = decode_image(jpeg)
    assert (fetched.width, fetched.height) == (30, 40)
    bright = np.asarray(fetched.image.convert("L")) > 128
    rows, cols = np.nonzero(bright)
    # After a clockwise turn, stored (x, y) goes to (H - 1 - y, x): box x 15..25, y 10..20.
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (15, 25, 10, 20)


@pytest.mark.parametrize("orientation, turned", [(6, True), (8, True), (5, True), (3, False), (None, False)])
def test_quarter_turn_of_a_near_square_photo_is_seen_in_draft_decoding(orientation, turned):
    """1601x1602 decoded at 1/8 in draft mode is 201x201: square, so a size comparison cannot tell
    a quarter turn; the EXIF tag can. Label Studio shows the turned photo as 1602x1601."""
    data = square_image(1601, 1602, box=(100, 100, 500, 900), fmt="JPEG", exif_orientation=orientation)
    small = decode_image(data, min_side=200)
    assert small.image.width == small.image.height      # the case a size comparison misses
    assert (small.width, small.height) == ((1602, 1601) if turned else (1601, 1602))
    assert (small.width, small.height) == (decode_image(data).width, decode_image(data).height)


def test_jwt_detection_and_origin():
    assert jwt_claims(make_jwt({"token_type": "refresh"})) == {"token_type": "refresh"}
    assert jwt_claims("0123456789abcdef0123456789abcdef01234567") is None
    assert jwt_claims("a.b.c") is None
    assert origin("http://LS:80/x") == origin("http://ls/y") != origin("https://ls/y")
    assert origin("http://ls:8080/") != origin("http://ls:8081/")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_large_images_decode_small_but_report_their_original_size(fmt, orientation):
    """With min_side, a 1600x1200 photo is decoded at a quarter (JPEG draft) or box-reduced (others);
    width/height stay the original's, as Label Studio shows it (EXIF turns included)."""
    data = square_image(1600, 1200, box=(400, 300, 800, 900), fmt=fmt, exif_orientation=orientation)
    full = decode_image(data)
    small = decode_image(data, min_side=256)
    turned = orientation == 6
    assert (full.width, full.height) == ((1200, 1600) if turned else (1600, 1200))
    assert (small.width, small.height) == (full.width, full.height)
    assert min(small.image.size) >= 256 and max(small.image.size) <= 800
    # the same picture: the white box lands where it is at full size
    reduced = np.asarray(full.image.convert("L").resize(small.image.size, resample=2)) > 128
    assert np.mean(reduced == (np.asarray(small.image.convert("L")) > 128)) > 0.98
    assert decode_image(data, min_side=5000).image.size == full.image.size   # never enlarged
