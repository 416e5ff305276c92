"""Hostile and unusual inputs for the hardening tests, and the helpers that serve them.

Everything here stays on loopback: the servers bind 127.0.0.1, and `loopback_only` makes any
attempt of the test process to connect elsewhere fail the test instead of leaving the machine.
Servers that stall do so for a bounded time and stop by themselves.
"""
from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import socket
import struct
import time
import zlib
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image

from backend_fixtures import ThreadedServer

# ---------------------------------------------------------------------------------------
# Network safety net


@contextlib.contextmanager
def loopback_only():
    """Within the block, a socket of this process may connect to loopback addresses only."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    attempts: list[tuple] = []

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0]).split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise AssertionError(f"test code connected to a host name {address!r}, not an address") from None
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                attempts.append(address)
                raise AssertionError(f"test tried to connect to non-loopback address {address!r}")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex


def fake_dns(monkeypatch, table: dict[str, list[str] | callable]):
    """Resolve the names in `table` to the given addresses (a callable gets the call count);
    other names go to the real resolver. Returns the list of (name, answer) lookups made."""
    real = socket.getaddrinfo
    calls: list[tuple[str, list[str]]] = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        key = name.lower().rstrip(".")
        if key not in table:
            return real(host, port, family, type, proto, flags)
        entry = table[key]
        addresses = entry(sum(1 for n, _ in calls if n == key)) if callable(entry) else entry
        calls.append((key, list(addresses)))
        rows = []
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if ip.version == 6:
                rows.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port or 0), 0, 0)))
            else:
                rows.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0))))
        return rows

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


# ---------------------------------------------------------------------------------------
# Servers that misbehave, boundedly


class MisbehavingServer(ThreadedServer):
    """127.0.0.1 HTTP server with a few bad habits, each bounded in time:

    /sleep/<s>     waits s seconds (at most 10) before answering
    /drip/<n>      sends a 200 image header, then one byte every 0.2 s, n bytes (at most 100)
    /drip-headers/<n>  sends the status line, then one header line every 0.5 s, n lines (at most 40)
    /html          a 200 text/html login page
    other paths    404
    """

    def __init__(self):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                try:
                    if path.startswith("/sleep/"):
                        time.sleep(min(10.0, float(path.split("/")[2])))
                        self._send(200, "image/png", _png(8, 8))
                    elif path.startswith("/drip/"):
                        count = min(100, int(path.split("/")[2]))
                        self.send_response(200)
                        self.send_header("Content-Type", "image/png")
                        self.send_header("Content-Length", str(count))
                        self.end_headers()
                        for _ in range(count):
                            self.wfile.write(b"\x89")
                            self.wfile.flush()
                            time.sleep(0.2)
                    elif path.startswith("/drip-headers/"):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        self.wfile.flush()
                        for number in range(min(40, int(path.split("/")[2]))):
                            time.sleep(0.5)
                            self.wfile.write(f"X-Drip-{number}: {number}\r\n".encode())
                            self.wfile.flush()
                        body = _png(8, 8)
                        self.wfile.write(f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                                         + body)
                    elif path == "/html":
                        self._send(200, "text/html; charset=utf-8",
                                   b"<!DOCTYPE html><html><body><form>Log in</form></body></html>")
                    else:
                        self._send(404, "text/plain", b"not found")
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up, as it should

            def _send(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._start(Handler)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Image files


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((max(1, height // 4), max(1, width // 4), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.NEAREST))


def _png(width: int, height: int, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_pattern(width, height, seed)))


def png_rgb(width: int = 48, height: int = 36, seed: int = 0) -> bytes:
    return _png(width, height, seed)


def png_16bit_gray(width: int = 48, height: int = 36) -> bytes:
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    return _encode(Image.fromarray(ramp))            # mode I;16


def jpeg_cmyk(width: int = 48, height: int = 36) -> bytes:
    return _encode(Image.fromarray(_pattern(width, height, 3)).convert("CMYK"), "JPEG", quality=90)


def png_palette_transparent(width: int = 48, height: int = 36) -> bytes:
    image = Image.fromarray(_pattern(width, height, 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, transparency=0)


def png_gray(width: int = 48, height: int = 36) -> bytes:
    return _encode(Image.fromarray(_pattern(width, height, 5)).convert("L"))


def png_rgba(width: int = 48, height: int = 36) -> bytes:
    rgba = np.dstack([_pattern(width, height, 6), np.full((height, width), 128, np.uint8)])
    rgba[: height // 2, :, 3] = 0                     # top half fully transparent
    return _encode(Image.fromarray(rgba, "RGBA"))


def png_bilevel(width: int = 48, height: int = 36) -> bytes:
    return _encode(Image.fromarray(_pattern(width, height, 7)).convert("1"))


def gif_animated(width: int = 48, height: int = 36, frames: int = 4) -> bytes:
    images = [Image.fromarray(_pattern(width, height, 10 + k)).convert("P") for k in range(frames)]
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=80, loop=0)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height (900 MP) with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)   # 8-bit grayscale
    compressor = zlib.compressobj(9)
    row = b"\0" + b"\0" * width
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---------------------------------------------------------------------------------------
# Labeling configs

BAD_XML = "<View><Image name='image' value='$image'><BrushLabels name='b' toName='image'>"
NO_IMAGE = ("<View><Text name='text' value='$text'/>"
            "<Labels name='l' toName='text'><Label value='A'/></Labels></View>")
UNSUPPORTED_ONLY = ("<View><Image name='image' value='$image'/>"
                    "<Choices name='c' toName='image'><Choice value='cat'/></Choices>"
                    "<KeyPointLabels name='k' toName='image'><Label value='eye'/></KeyPointLabels></View>")
XXE = ("<!DOCTYPE View [<!ENTITY x SYSTEM 'file:///etc/hostname'>]><View><Image name='image' value='$image'/>"
       "<BrushLabels name='b' toName='image'><Label value='&x;'/></BrushLabels></View>")
BILLION_LAUGHS = (
    "<!DOCTYPE View [<!ENTITY a0 'lol'>"
    + "".join(f"<!ENTITY a{i} '{('&a' + str(i - 1) + ';') * 10}'>" for i in range(1, 10))
    + "]><View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'>"
      "<Label value='&a9;'/></BrushLabels></View>")
NO_LABELS = "<View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'/></View>"


def many_labels_config(count: int) -> str:
    labels = "".join(f"<Label value='thing {k}'/>" for k in range(count))
    return f"<View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'>{labels}</BrushLabels></View>"


def textarea(*texts) -> dict:
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": list(texts)}}]}
