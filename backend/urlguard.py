"""Which hosts the backend may contact: the SSRF guard of every outbound request.

Task data is written by whoever can import tasks into Label Studio, and the backend downloads
whatever URL it names; without a guard, `http://169.254.169.254/...` or `http://127.0.0.1:6379`
in a task would make the backend probe its own network. The rules (docs/BACKEND.md repeats them):

* only `http` and `https`;
* Label Studio's own host and port (LABEL_STUDIO_URL, else /setup's hostname) are always allowed,
  whatever they resolve to: Label Studio usually runs on loopback or a private network;
* hosts listed in GEM_ALLOWED_HOSTS (hostnames, `*.domain`, IP addresses, CIDR ranges) are allowed;
* any other host must resolve only to public unicast addresses: loopback, private, link-local,
  carrier-grade NAT, multicast, reserved and unspecified addresses are refused, including IPv4
  addresses inside IPv6 ones (IPv4-mapped `::ffff:a.b.c.d`, 6to4, NAT64);
* cloud metadata addresses (169.254.169.254, fd00:ec2::254, ...) are refused even for the hosts
  above, and even through an allow-listed range.

Every address a name resolves to is checked, on every redirect hop. DNS rebinding (a name that
resolves to a public address for the check and to a private one for the connection) is closed
by resolving inside the connection itself: `GuardedAdapter`'s connections resolve the name,
check every address and connect only to those addresses, so the connection never uses an
answer that was not checked. Behind an HTTP(S)_PROXY the proxy resolves names itself; the
pre-flight check (`UrlGuard.check_url`) then is the only check, and rebinding is not prevented.

The same connections also keep the caller's wall-clock deadline (`deadline_scope`) while the
response headers arrive: a socket timeout bounds each receive, not their sum, so a server that
drips one header line a second would otherwise hold a download for as long as it likes.
"""
from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import threading
import time
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

# Instance metadata services: AWS (IPv4, IPv6, ECS task, EKS pod identity), GCP and Azure share
# 169.254.169.254; Alibaba 100.100.100.200; old Oracle Cloud 192.0.0.192.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23",
    "100.100.100.200", "192.0.0.192"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")               # RFC 6598 shared address space
_IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")         # RFC 6890; Python calls parts of it global
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")              # deprecated ::a.b.c.d


class BlockedURLError(Exception):
    """The guard refuses this URL or address; str() says why, without query or credentials."""


class UnresolvableHostError(BlockedURLError):
    """The host name does not resolve: a connection problem rather than a policy decision."""


def parse_address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))   # drop an IPv6 zone id
    except ValueError:
        return None


def embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_metadata(ip: Address) -> bool:
    inner = embedded_ipv4(ip)
    return ip in METADATA_ADDRESSES or (inner is not None and inner in METADATA_ADDRESSES)


def address_problem(ip: Address) -> str | None:
    """Why the backend must not connect to `ip` unless allowed ("a loopback address"), or None."""
    if is_metadata(ip):
        return "a cloud metadata address"
    inner = embedded_ipv4(ip)
    if inner is not None:
        problem = address_problem(inner)
        return f"{problem} inside an IPv6 address" if problem else None
    for test, name in ((ip.is_unspecified, "an unspecified"), (ip.is_loopback, "a loopback"),
                       (ip.is_link_local, "a link-local"), (ip.is_multicast, "a multicast"),
                       (ip in _CGNAT, "a carrier-grade NAT"), (ip in _IETF_PROTOCOL, "a reserved"),
                       (ip.is_reserved, "a reserved"), (ip.is_private, "a private"),
                       (not ip.is_global, "a non-public")):
        if test:
            return f"{name} address"
    return None


def normalize_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class HostPolicy:
    """GEM_ALLOWED_HOSTS: hostnames, `*.suffix` patterns and networks."""

    def __init__(self, entries: Iterable[str] = ()):
        self.networks: list[Network] = []
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = normalize_host(entry)
            if name.startswith("*."):
                self.suffixes.append(name[1:])           # "*.corp.example" -> ".corp.example"
            else:
                self.names.add(name)

    def host_allowed(self, host: str) -> bool:
        host = normalize_host(host)
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def address_allowed(self, ip: Address) -> bool:
        inner = embedded_ipv4(ip)
        return any(ip in net or (inner is not None and inner in net) for net in self.networks)


Trusted = frozenset  # of (host, port): origins allowed whatever they resolve to (Label Studio)

# The policy of the request being sent on this thread: set by the image fetcher around each
# request, read by the connection when it opens a socket (see GuardedAdapter).
_current_check: contextvars.ContextVar[Callable[[str, int, Sequence[tuple]], None] | None] = \
    contextvars.ContextVar("gem_outbound_check", default=None)


_current_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("gem_outbound_deadline", default=None)


@contextlib.contextmanager
def deadline_scope(deadline: float):
    """Requests made on this thread inside it give up when `time.monotonic()` passes `deadline`,
    the wait for the response headers included (the body reader enforces it itself, per read)."""
    token = _current_deadline.set(deadline)
    try:
        yield
    finally:
        _current_deadline.reset(token)


class UrlGuard:
    """Decides whether a URL, or a resolved address of its host, may be contacted."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.policy = HostPolicy(allowed)

    # -- decisions ------------------------------------------------------------------------------

    def check_url(self, url: str, trusted: Trusted = frozenset()) -> None:
        """Pre-flight check of one hop: scheme, host, and every address the host resolves to."""
        try:
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError:
            raise BlockedURLError("malformed URL") from None
        if scheme not in ALLOWED_SCHEMES:
            raise BlockedURLError(f"only http and https URLs are fetched, not {scheme or 'a relative URL'}")
        if not host:
            raise BlockedURLError("URL has no host")
        port = port or DEFAULT_PORTS[scheme]
        self.check_addresses(host, port, self.resolve(host, port), trusted)

    def check_addresses(self, host: str, port: int, infos: Sequence[tuple], trusted: Trusted = frozenset()) -> None:
        """Raise BlockedURLError unless `host`:`port`, resolved to `infos` (getaddrinfo rows), may be contacted."""
        host = normalize_host(host)
        addresses = [parse_address(str(info[4][0])) for info in infos]
        if not addresses or any(a is None for a in addresses):
            raise BlockedURLError(f"{host} did not resolve to IP addresses")
        for ip in addresses:
            if is_metadata(ip):
                shown = f"{host} is" if parse_address(host) == ip else f"{host} resolves to {ip},"
                raise BlockedURLError(f"{shown} a cloud metadata address (never allowed)")
        if (host, port) in trusted or self.policy.host_allowed(host):
            return
        for ip in addresses:
            if self.policy.address_allowed(ip):
                continue
            problem = address_problem(ip)
            if problem:
                shown = f"{host} is" if parse_address(host) == ip else f"{host} resolves to {ip},"
                raise BlockedURLError(f"{shown} {problem}; allow it with GEM_ALLOWED_HOSTS if it is meant")

    @staticmethod
    def resolve(host: str, port: int) -> list[tuple]:
        """getaddrinfo rows for host:port (looked up at call time, so tests can replace the resolver)."""
        host = host.strip("[]")
        try:
            host.encode("idna")
        except UnicodeError:
            raise BlockedURLError("host name is not valid") from None
        try:
            return socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise UnresolvableHostError(f"cannot resolve {normalize_host(host)} ({exc})") from None

    # -- enforcement in the connection ------------------------------------------------------

    def enforcing(self, trusted: Trusted) -> "_Enforcing":
        """Context manager: connections opened on this thread inside it obey this guard."""
        return _Enforcing(lambda host, port, infos: self.check_addresses(host, port, infos, trusted))


class _Enforcing:
    def __init__(self, check: Callable[[str, int, Sequence[tuple]], None]):
        self.check = check
        self.token: contextvars.Token | None = None

    def __enter__(self) -> None:
        self.token = _current_check.set(self.check)

    def __exit__(self, *exc) -> None:
        if self.token is not None:
            _current_check.reset(self.token)


class _GuardedConnectionMixin:
    """Resolve, check every address, and connect only to checked addresses (no rebinding window).

    Mixed into urllib3's HTTPConnection/HTTPSConnection: `host`, `port`, `_dns_host`, `timeout`,
    `source_address`, `socket_options` and `proxy` are theirs. TLS is wrapped around the socket
    returned here, with the host name for SNI and certificate checks.
    """

    def _new_conn(self):
        if getattr(self, "proxy", None) is not None:
            return super()._new_conn()  # to the operator's proxy, which resolves names itself
        check = _current_check.get()
        if check is None:  # fail closed: only the image fetcher opens connections, always with a policy
            raise BlockedURLError("outbound connection without a guard policy")
        host, port = self.host, self.port
        try:
            infos = socket.getaddrinfo(self._dns_host.strip("[]"), port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(host, self, exc) from exc
        check(host, port, infos)
        try:
            return _connect(infos, self.timeout, self.source_address, self.socket_options)
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"Connection to {host} timed out. "
                                            f"(connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

    def getresponse(self, *args, **kwargs):
        """Status line and headers within the deadline: past it the socket is shut down, which
        ends the blocked read at once (the caller sees a broken connection after its deadline)."""
        deadline = _current_deadline.get()
        sock = getattr(self, "sock", None)
        if deadline is None or sock is None:
            return super().getresponse(*args, **kwargs)
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut_down, (sock,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            watchdog.cancel()


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass   # already closed


def _connect(infos: Sequence[tuple], timeout, source_address, socket_options) -> socket.socket:
    """urllib3's create_connection, over addresses already resolved and checked."""
    error: OSError | None = None
    for family, socktype, proto, _, address in infos:
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as exc:
            error = exc
            if sock is not None:
                sock.close()
    raise error or OSError("no address to connect to")


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class GuardedHTTPConnectionPool(urllib3.HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class GuardedHTTPSConnectionPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(requests.adapters.HTTPAdapter):
    """requests adapter whose direct connections check their addresses (see the module doc)."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPConnectionPool,
                                                   "https": GuardedHTTPSConnectionPool}
