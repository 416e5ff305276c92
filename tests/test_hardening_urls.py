"""Outbound requests: the SSRF guard (backend/urlguard.py) and where the Label Studio token goes.

No test here connects anywhere but loopback: hostile names resolve through a fake resolver
(`fake_dns`), decisions on private and metadata addresses are made before any connection, and
`loopback_only` fails a test that tries to connect elsewhere.
"""
from __future__ import annotations

import ipaddress

import pytest
import requests

from backend.images import ImageFetcher, ImageFetchError
from backend.settings import Settings, SettingsError
from backend.urlguard import (BlockedURLError, GuardedAdapter, HostPolicy, UrlGuard, address_problem,
                              embedded_ipv4)
from backend_fixtures import fetch_image, square_image
from bad_inputs import fake_dns

PNG = square_image()


pytestmark = pytest.mark.usefixtures("loopback_only_guard")


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def fetcher(**env) -> ImageFetcher:
    return ImageFetcher(Settings.from_env(env))


def refused(fetcher_: ImageFetcher, url: str, match: str | None = None, **kwargs) -> ImageFetchError:
    with pytest.raises(ImageFetchError, match=match) as info:
        fetch_image(fetcher_, url, **kwargs)
    assert info.value.reason == "blocked", str(info.value)
    return info.value


# -- address classes ------------------------------------------------------------------------------


@pytest.mark.parametrize("address,problem", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.0.8", "reserved"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("169.254.170.2", "cloud metadata"),
    ("::ffff:127.0.0.1", "loopback address inside an IPv6"), ("::ffff:169.254.169.254", "cloud metadata"),
    ("::ffff:10.0.0.1", "private address inside an IPv6"), ("64:ff9b::a00:1", "private address inside an IPv6"),
    ("2002:c0a8:101::1", "private address inside an IPv6"), ("::127.0.0.1", "loopback address inside an IPv6"),
    ("198.18.0.1", "private"), ("192.0.2.1", "private"),
])
def test_non_public_addresses_have_a_named_problem(address, problem):
    assert problem in address_problem(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34",
                                     "64:ff9b::5db8:d822"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_embedded_ipv4_forms():
    assert str(embedded_ipv4(ipaddress.ip_address("::ffff:7f00:1"))) == "127.0.0.1"
    assert str(embedded_ipv4(ipaddress.ip_address("2002:7f00:1::"))) == "127.0.0.1"
    assert str(embedded_ipv4(ipaddress.ip_address("64:ff9b::7f00:1"))) == "127.0.0.1"
    assert embedded_ipv4(ipaddress.ip_address("2606:4700::1")) is None


# -- decisions after resolution (fake DNS, nothing connects) ----------------------------------------


def test_every_resolved_address_is_checked(monkeypatch):
    fake_dns(monkeypatch, {"mixed.test": ["93.184.216.34", "10.0.0.7"], "public.test": ["93.184.216.34"],
                           "v6.test": ["2606:4700::1", "::1"]})
    guard = UrlGuard()
    guard.check_url("http://public.test/x.png")            # decision only: no request is made
    with pytest.raises(BlockedURLError, match="10.0.0.7, a private address"):
        guard.check_url("http://mixed.test/x.png")
    with pytest.raises(BlockedURLError, match="::1, a loopback address"):
        guard.check_url("https://v6.test/x.png")


def test_names_of_metadata_services_are_refused_through_dns(monkeypatch):
    fake_dns(monkeypatch, {"metadata.google.internal": ["169.254.169.254"],
                           "instance-data.ec2.internal": ["fd00:ec2::254"]})
    f = fetcher(GEM_ALLOWED_HOSTS="169.254.0.0/16,fd00::/8,metadata.google.internal")
    for url in ("http://metadata.google.internal/computeMetadata/v1/", "http://instance-data.ec2.internal/latest/"):
        refused(f, url, "cloud metadata address")
    refused(f, "http://169.254.169.254/latest/meta-data/", "never allowed")   # even inside an allowed range


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://127.1/", "http://2130706433/", "http://0x7f000001/",
    "http://0/", "http://0.0.0.0:9090/", "http://[::1]/", "http://[::]/", "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/", "http://10.0.0.1/", "http://192.168.0.10:8080/", "http://172.31.255.1/",
    "http://100.64.10.10/", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
    "http://[fe80::1]/", "http://224.0.0.251/", "http://240.0.0.1/", "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::]/", "https://127.0.0.1:443/",
])
def test_private_loopback_and_metadata_urls_are_refused_before_connecting(url):
    refused(fetcher(), url)


@pytest.mark.parametrize("url,match", [
    ("file:///etc/passwd", "unsupported image URL"), ("ftp://127.0.0.1/a.png", "unsupported image URL"),
    ("gopher://127.0.0.1:6379/_INFO", "unsupported image URL"), ("dict://127.0.0.1:11211/stats", "unsupported"),
    ("javascript:alert(1)", "unsupported image URL"), ("jar:http://x/a.jar!/b.png", "unsupported image URL"),
])
def test_only_http_and_https_schemes(url, match):
    with pytest.raises(ImageFetchError, match=match):
        fetch_image(fetcher(), url)


def test_redirect_to_another_scheme_is_refused(ls):
    ls.redirect("/data/upload/1/a.png", "file:///etc/passwd")
    ls.redirect("/data/upload/1/b.png", "gopher://127.0.0.1:70/")
    f = fetcher(LABEL_STUDIO_URL=ls.url)
    refused(f, "/data/upload/1/a.png", "only http and https")
    refused(f, "/data/upload/1/b.png", "only http and https")


def test_dns_rebinding_between_check_and_connect_is_caught(monkeypatch, other):
    """The pre-flight check sees an allowed address, the connection's own lookup a forbidden one:
    the connection checks what it resolved and refuses before connecting."""
    other.image("/pic.png", PNG)
    calls = fake_dns(monkeypatch, {"rebind.test": lambda n: ["127.0.0.1"] if n == 0 else ["127.0.0.2"]})
    f = fetcher(GEM_ALLOWED_HOSTS="127.0.0.1")
    error = refused(f, f"http://rebind.test:{port_of(other)}/pic.png", "127.0.0.2, a loopback address")
    assert "GEM_ALLOWED_HOSTS" in str(error)
    assert [answer for _, answer in calls] == [["127.0.0.1"], ["127.0.0.2"]]   # pre-flight, then connection
    assert other.seen == []                                                     # nothing reached any server


def test_connection_goes_to_the_address_it_checked(monkeypatch, other):
    other.image("/pic.png", PNG)
    fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    f = fetcher(GEM_ALLOWED_HOSTS="127.0.0.1")
    assert fetch_image(f, f"http://images.test:{port_of(other)}/pic.png").width == 40
    assert other.seen[-1].headers["Host"] == f"images.test:{port_of(other)}"   # virtual hosting still works


def test_connections_without_a_policy_fail_closed(other):
    other.image("/pic.png", PNG)
    session = requests.Session()
    session.mount("http://", GuardedAdapter())
    with pytest.raises(BlockedURLError, match="without a guard policy"):
        session.get(f"{other.url}/pic.png", timeout=5)
    assert other.seen == []


def test_every_redirect_hop_is_checked(monkeypatch, ls, other):
    fake_dns(monkeypatch, {"internal.test": ["10.0.0.5"], "meta.test": ["169.254.169.254"]})
    other.image("/ok.png", PNG)
    other.redirect("/to-private", "http://internal.test/admin")
    other.redirect("/to-metadata", "http://meta.test/latest/meta-data/iam/")
    other.redirect("/to-loopback", f"http://127.0.0.2:{port_of(ls)}/x.png")
    other.redirect("/to-ok", "/ok.png")
    f = fetcher(GEM_ALLOWED_HOSTS="127.0.0.1")
    refused(f, f"{other.url}/to-private", "10.0.0.5, a private address")
    refused(f, f"{other.url}/to-metadata", "cloud metadata")
    refused(f, f"{other.url}/to-loopback", "127.0.0.2")
    assert fetch_image(f, f"{other.url}/to-ok").width == 40
    assert ls.seen == []
    # Label Studio's presign redirect is checked like any other hop.
    ls.redirect("/tasks/7/presign/?fileuri=czM6Ly9iL2sucG5n", "http://meta.test/latest/")
    refused(fetcher(LABEL_STUDIO_URL=ls.url), "s3://b/k.png", "cloud metadata", task_id=7)


def test_label_studio_origin_is_allowed_but_not_its_other_ports(ls, other):
    ls.image("/data/upload/1/a.png", PNG)
    other.image("/pic.png", PNG)
    f = fetcher(LABEL_STUDIO_URL=ls.url)                 # loopback, and no GEM_ALLOWED_HOSTS
    assert fetch_image(f, "/data/upload/1/a.png").width == 40
    assert fetch_image(f, f"{ls.url}/data/upload/1/a.png").width == 40
    refused(f, f"{other.url}/pic.png", "loopback")      # same host, another port: not Label Studio


def test_setup_hostname_is_the_label_studio_origin_too(ls, other):
    ls.image("/data/upload/1/a.png", PNG)
    f = fetcher()
    f.remember_setup("1", ls.url, "tok")
    assert fetch_image(f, "/data/upload/1/a.png", project_key="1").width == 40
    refused(f, f"{other.url}/pic.png", project_key="1")


def test_allow_list_hostnames_wildcards_and_ranges(monkeypatch, other):
    other.image("/pic.png", PNG)
    port = port_of(other)
    fake_dns(monkeypatch, {"minio": ["127.0.0.1"], "img.corp.test": ["127.0.0.1"], "corp.test": ["127.0.0.1"],
                           "evil.test": ["127.0.0.1"]})
    f = fetcher(GEM_ALLOWED_HOSTS="minio, *.corp.test")
    assert fetch_image(f, f"http://minio:{port}/pic.png").width == 40
    assert fetch_image(f, f"http://img.corp.test:{port}/pic.png").width == 40
    refused(f, f"http://corp.test:{port}/pic.png")       # "*.corp.test" means subdomains only
    refused(f, f"http://evil.test:{port}/pic.png")
    refused(f, f"http://127.0.0.1:{port}/pic.png")       # a name on the list does not allow its address
    g = fetcher(GEM_ALLOWED_HOSTS="127.0.0.0/8")
    assert fetch_image(g, f"http://evil.test:{port}/pic.png").width == 40   # a range allows what resolves into it
    assert fetch_image(g, f"http://127.0.0.1:{port}/pic.png").width == 40


def test_allow_list_setting_is_validated():
    assert Settings.from_env({"GEM_ALLOWED_HOSTS": "127.0.0.1, ::1 10.0.0.0/8,*.Corp.Example."}).allowed_hosts == \
        ("127.0.0.1/32", "::1/128", "10.0.0.0/8", "*.corp.example")
    for bad in ("http://x/", "a b/c", "host:8080", "*"):
        with pytest.raises(SettingsError, match="GEM_ALLOWED_HOSTS"):
            Settings.from_env({"GEM_ALLOWED_HOSTS": bad})
    policy = HostPolicy(["10.0.0.0/8"])
    assert policy.address_allowed(ipaddress.ip_address("::ffff:10.1.1.1"))   # mapped form of an allowed range


def test_unresolvable_host_is_a_connection_failure(monkeypatch):
    def fail(*args, **kwargs):
        import socket
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr("socket.getaddrinfo", fail)
    with pytest.raises(ImageFetchError, match="cannot resolve nowhere.test") as info:
        fetch_image(fetcher(), "http://nowhere.test/a.png")
    assert info.value.reason == "connection"


# -- the Label Studio token never leaves Label Studio -------------------------------------------------


def test_token_not_sent_across_redirects_to_other_hosts(monkeypatch, ls, other):
    """LS -> other port, LS -> 'localhost' alias of LS, LS -> other -> LS, and a userinfo trick."""
    fake_dns(monkeypatch, {"localhost": ["127.0.0.1"]})
    ls_port, other_port = port_of(ls), port_of(other)
    other.image("/pic.png", PNG)
    ls.image("/data/upload/1/final.png", PNG)
    ls.redirect("/data/upload/1/a.png", f"{other.url}/pic.png", 302)
    ls.redirect("/data/upload/1/b.png", f"http://localhost:{ls_port}/data/upload/1/final.png", 307)
    ls.redirect("/data/upload/1/c.png", f"{other.url}/bounce", 308)
    other.redirect("/bounce", f"{ls.url}/data/upload/1/final.png", 301)
    ls.redirect("/data/upload/1/d.png", f"http://127.0.0.1:{ls_port}@127.0.0.1:{other_port}/pic.png", 303)
    f = fetcher(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="legacy-SECRET", GEM_ALLOWED_HOSTS="127.0.0.1")
    for path in ("a", "b", "c", "d"):
        assert fetch_image(f, f"/data/upload/1/{path}.png").width == 40
    assert other.auth_headers() == [None, None, None]
    by_path = [(s.path, s.headers.get("Authorization")) for s in ls.seen]
    assert by_path == [
        ("/data/upload/1/a.png", "Token legacy-SECRET"),
        ("/data/upload/1/b.png", "Token legacy-SECRET"),
        ("/data/upload/1/final.png", None),               # reached as http://localhost:<port>: another origin
        ("/data/upload/1/c.png", "Token legacy-SECRET"),
        ("/data/upload/1/final.png", "Token legacy-SECRET"),   # back on Label Studio's own origin
        ("/data/upload/1/d.png", "Token legacy-SECRET"),
    ]


@pytest.mark.parametrize("path", [
    "/api/projects/1", "/api/tasks/1/annotations/", "/api/users/", "/data/upload/../../api/projects/1",
    "/data/upload/%2e%2e/%2e%2e/api/projects/1", "/tasks/1/", "/user/account/",
])
def test_key_goes_only_to_label_studio_media_routes(ls, path):
    """Task data is written by whoever imports tasks: a task naming an API route on Label Studio
    must not make the backend call it with its key (and show the answer's status)."""
    f = fetcher(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="legacy-SECRET")
    for url in (path, ls.url + path):
        refused(f, url, match="only its media routes")
    assert ls.seen == []   # nothing was sent, with or without the key


def test_media_routes_get_the_key_and_a_redirect_off_them_is_refused(ls):
    ls.image("/data/upload/1/a.png", PNG)
    ls.image("/data/local-files/?d=images/a.png", PNG)
    ls.image("/tasks/7/resolve/?fileuri=czM6Ly9h", PNG)
    ls.image("/projects/2/presign/?fileuri=czM6Ly9h", PNG)
    ls.redirect("/data/upload/1/login.png", "/user/login/?next=/data/upload/1/login.png", 302)
    f = fetcher(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY="legacy-SECRET")
    for url in ("/data/upload/1/a.png", "/data/local-files/?d=images/a.png", "/tasks/7/resolve/?fileuri=czM6Ly9h",
                f"{ls.url}/projects/2/presign/?fileuri=czM6Ly9h"):
        assert fetch_image(f, url).width == 40
    assert ls.auth_headers() == ["Token legacy-SECRET"] * 4
    error = refused(f, "/data/upload/1/login.png", match="redirected from")
    assert "/user/login/" in str(error)
    assert [s.path.split("?")[0] for s in ls.seen[4:]] == ["/data/upload/1/login.png"]   # the login page: never asked


def test_label_studio_under_a_path_prefix_keeps_its_media_routes(ls):
    ls.image("/ls/data/upload/1/a.png", PNG)
    f = fetcher(LABEL_STUDIO_URL=ls.url + "/ls", LABEL_STUDIO_API_KEY="legacy-SECRET")
    assert fetch_image(f, "/data/upload/1/a.png").width == 40
    refused(f, ls.url + "/data/upload/1/a.png", match="only its media routes")   # outside the prefix
    refused(f, "/api/projects/1", match="only its media routes")


def test_pat_and_its_access_token_never_reach_other_hosts(ls, other):
    import json
    import time

    from backend_fixtures import make_jwt
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    access = make_jwt({"token_type": "access", "exp": time.time() + 300})
    ls.routes[("POST", "/api/token/refresh/")] = lambda seen: (200, {}, json.dumps({"access": access}).encode())
    ls.redirect("/data/upload/1/a.png", f"{other.url}/pic.png")
    other.image("/pic.png", PNG)
    fetch_image(fetcher(LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=pat, GEM_ALLOWED_HOSTS="127.0.0.1"), "/data/upload/1/a.png")
    assert other.auth_headers() == [None]
    assert all(pat not in s.body.decode() and access not in str(s.headers) for s in other.seen)
    assert ls.auth_headers() == [None, f"Bearer {access}"]   # refresh POST carries the PAT in its body only


def test_https_through_the_pinned_connection_keeps_certificate_checks(monkeypatch, tmp_path):
    """The guarded connection connects to the checked address, yet TLS still verifies the
    certificate against the host name (SNI and hostname check), not against the address."""
    import shutil
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
                   check=True, capture_output=True, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
        f = fetcher(GEM_ALLOWED_HOSTS="127.0.0.1")
        assert fetch_image(f, f"https://images.test:{port}/a.png").width == 40
        with pytest.raises(ImageFetchError, match="SSLError"):       # the certificate is not 127.0.0.1's
            fetch_image(f, f"https://127.0.0.1:{port}/a.png")
    finally:
        httpd.shutdown()
        httpd.server_close()
