"""Which hosts image downloads may reach: the address policy against SSRF.

A task's image URL (and every redirect it leads to) is chosen by whoever can create tasks,
or answer them from a storage bucket, so the backend must not become their way into the
network it runs in. ``OutboundPolicy.vet(url)`` splits a URL with urllib3's parser (the one
whose host we then connect to, so checks and connection never disagree about the host),
resolves the host once and checks **every** address it resolves to. It refuses:

- loopback, private (RFC 1918, carrier-grade NAT 100.64/10, ULA fc00::/7), link-local
  (169.254/16, fe80::/10), multicast, unspecified and reserved addresses, and anything that
  is not globally routable (documentation, benchmarking, site-local, 240/4, ...);
- IPv6 spellings of those IPv4 addresses (``::ffff:a.b.c.d``, ``::a.b.c.d``, NAT64 ``64:ff9b::/96``,
  6to4 ``2002::/16``);
- cloud metadata endpoints (``METADATA_ADDRESSES``, ``METADATA_NAMES``), even inside an
  allowed network: only an allow-list entry naming the exact address lets them through.

Numeric hosts are read the way ``inet_aton`` reads them (``2130706433``, ``0177.0.0.1``,
``0x7f.1``, ``127.1`` are all 127.0.0.1) without asking DNS; a host whose last label looks
numeric but is no valid address is refused rather than sent to a resolver.

Exempt: the host:port of ``LABEL_STUDIO_URL`` (``trusted``), and what ``OUTBOUND_ALLOW`` lists
(``AllowList``: host names, host:port, IP addresses and CIDR networks). The hostname Label
Studio reports in ``/setup`` is *not* trusted by itself: anyone who can reach the backend can
call ``/setup``, so that hostname only serves as the base of relative URLs and is vetted like
any other host.

The caller connects to one of ``Target.addresses``, never to the name again, so a DNS answer
that changes between check and connect (rebinding) cannot move the connection.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from fastsam_backend.errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean, ...
    "169.254.170.2",  # AWS ECS task credentials
    "169.254.170.23",  # AWS EKS pod identity
    "fd00:ec2::254",  # AWS IMDS over IPv6
    "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "168.63.129.16",  # Azure WireServer: a *public* address, hence listed
    "192.0.0.192",  # Oracle Cloud (legacy)
))
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                   "100.64.0.0/10", "fc00::/7"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_HOST_CHARS = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
DEFAULT_PORTS = {"http": 80, "https": 443}
_DNS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fastsam-dns")  # threads start on first use


class OutboundRefused(BadRequest):
    """The URL points somewhere image downloads may not go (the message says where and why)."""

    status = 403


@dataclass(frozen=True)
class UrlParts:
    """An http(s) URL as urllib3 reads it; ``host`` canonical (lower case, no trailing dot or
    brackets, numeric IPv4 spellings as dotted quads)."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, percent-encoded, as sent in the request line
    explicit_port: bool

    @property
    def label(self) -> str:
        """``host`` or ``host:port`` as messages and logs name it (never path nor query)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host


@dataclass(frozen=True)
class Target:
    """A vetted URL: connect to one of ``addresses`` (in this order), speak to ``parts.host``."""

    parts: UrlParts
    addresses: tuple[IPAddress, ...]


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as ``inet_aton`` reads it (1-4 parts, decimal, octal ``0..``, hex ``0x..``,
    the last part filling the remaining bytes), or None when it is not such a spelling.

    Raises:
        ValueError: the host looks numeric (its last label is digits or ``0x..``) but is no
            valid address, e.g. ``256.1.1.1`` or ``08.1``: a resolver would be asked about it.
    """
    labels = host.lower().removesuffix(".").split(".")
    if not labels or not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    try:
        if len(labels) > 4 or not all(_NUMERIC_LABEL.fullmatch(p) for p in labels):
            raise ValueError
        values = [int(p, 16) if p.startswith("0x") else int(p, 8 if p.startswith("0") and len(p) > 1 else 10)
                  for p in labels]
        *head, last = values
        if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
            raise ValueError
    except ValueError:
        raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def split_url(url: str) -> UrlParts:
    """Split an http(s) URL (raises ``BadRequest`` for anything malformed, or with user info)."""
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise BadRequest(f"image URL is malformed: {type(exc).__name__}") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise OutboundRefused(f"image URL scheme {scheme or 'none'!r} is not http(s)")
    if parsed.auth is not None:  # also what a backslash or a second '@' turns into
        raise BadRequest("image URLs with a user name or password (user:pass@host) are refused; "
                         "give Label Studio's token in LABEL_STUDIO_API_KEY, or use a pre-signed URL")
    host = canonical_host(parsed.host or "")
    return UrlParts(scheme, host, parsed.port or DEFAULT_PORTS[scheme], parsed.request_uri or "/",
                    parsed.port is not None)


def canonical_host(raw: str) -> str:
    """Lower case, no brackets nor trailing dot; IP addresses in their canonical spelling."""
    host = raw.strip().lower().removeprefix("[").removesuffix("]")
    if not host:
        raise BadRequest("image URL has no host")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise BadRequest(f"image host {raw!r} is not a valid IPv6 address") from None
    try:
        v4 = numeric_ipv4(host)
    except ValueError as exc:
        raise BadRequest(f"image host {exc}") from None
    if v4 is not None:
        return str(v4)
    if not _HOST_CHARS.fullmatch(host):
        raise BadRequest(f"image host {raw!r} is not a valid host name")
    return host.removesuffix(".")


def address_problem(ip: IPAddress) -> str | None:
    """Why an address is refused (``"a private address"``), or None for a public one."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return address_problem(embedded)
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if any(ip in net for net in _PRIVATE if net.version == ip.version):
        return "a private address"
    # is_global alone is not enough in Python 3.11: it calls site-local fec0::/10 and the
    # reserved ::/8 global
    if not ip.is_global or ip.is_reserved or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "a reserved (not publicly routable) address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AllowRule:
    """One ``OUTBOUND_ALLOW`` entry: a host name or a network, optionally with a port."""

    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def covers_name(self, host: str, port: int) -> bool:
        return self.name == host and self.port in (None, port)

    def covers_address(self, ip: IPAddress, port: int) -> bool:
        return self.network is not None and ip in self.network and self.port in (None, port)

    @property
    def exact_address(self) -> bool:
        return self.network is not None and self.network.num_addresses == 1


@dataclass(frozen=True)
class AllowList:
    rules: tuple[AllowRule, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> AllowList:
        """``"127.0.0.1:9000, minio.internal 10.0.0.0/8 [::1]:8080 fd00::/8"`` (commas or spaces).

        Raises:
            ValueError: naming the entry that is neither a host, host:port, address nor network.
        """
        return cls(tuple(_rule(entry) for entry in re.split(r"[\s,]+", text or "") if entry))

    def allows_name(self, host: str, port: int) -> bool:
        return any(rule.covers_name(host, port) for rule in self.rules)

    def allows_address(self, ip: IPAddress, port: int, *, exact: bool = False) -> bool:
        return any(rule.covers_address(ip, port) and (rule.exact_address or not exact) for rule in self.rules)


def _rule(entry: str) -> AllowRule:
    def bad(why: str) -> ValueError:
        return ValueError(f"OUTBOUND_ALLOW entry {entry!r} {why}")

    text, port = entry.strip().lower(), None
    if "/" in text:
        try:
            return AllowRule(network=ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise bad("is not a CIDR network like 10.0.0.0/8 or fd00::/8") from None
    if text.startswith("["):  # [v6] or [v6]:port
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise bad("has no closing ']'")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise bad("has a malformed port")
            port = int(rest[1:])
        text = host
    elif text.count(":") == 1:
        text, _, digits = text.partition(":")
        if not digits.isdigit():
            raise bad("has a malformed port")
        port = int(digits)
    if port is not None and not 0 < port < 65536:
        raise bad("has a port outside 1-65535")
    try:
        host = canonical_host(text)
    except BadRequest:
        raise bad("is not a host name, IP address or network") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return AllowRule(name=host, port=port)
    return AllowRule(network=ipaddress.ip_network(ip), port=port)


Resolver = Callable[..., list]


def system_resolve(host: str, port: int, family: int = 0, type: int = 0) -> list:
    """``socket.getaddrinfo``, looked up when called (so a test can swap the module's resolver)."""
    return socket.getaddrinfo(host, port, family, type)


class OutboundPolicy:
    """Vets URLs against the address rules above; shared by all threads (stateless)."""

    def __init__(self, allow: AllowList | None = None, trusted: tuple[str, int] | None = None,
                 resolve: Resolver | None = None) -> None:
        self.allow, self.trusted, self._resolve = allow or AllowList(), trusted, resolve

    @classmethod
    def for_label_studio(cls, label_studio_url: str | None, allow: AllowList,
                         resolve: Resolver | None = None) -> OutboundPolicy:
        """A policy trusting ``LABEL_STUDIO_URL``'s host:port (given with or without a scheme)."""
        trusted = None
        if label_studio_url:
            url = label_studio_url if "://" in label_studio_url else "http://" + label_studio_url
            parts = split_url(url.strip())
            trusted = (parts.host, parts.port)
        return cls(allow, trusted, resolve)

    def is_trusted(self, parts: UrlParts) -> bool:
        return (parts.host, parts.port) == self.trusted

    def vet(self, url: str, timeout_s: float) -> Target:
        """Split, resolve (at most ``timeout_s``) and check ``url``.

        Raises:
            OutboundRefused: scheme not http(s), or an address the rules refuse (403).
            BadRequest: malformed URL or host, user info in the URL.
            TimeoutError: the host name did not resolve in time.
            OSError: the host name does not resolve (``socket.gaierror``).
        """
        parts = split_url(url)
        addresses = self._addresses(parts, timeout_s)
        if self.is_trusted(parts):
            return Target(parts, addresses)
        if parts.host in METADATA_NAMES and not self.allow.allows_name(parts.host, parts.port):
            raise OutboundRefused(f"image host {parts.label} is a cloud metadata service")
        named = self.allow.allows_name(parts.host, parts.port)
        for ip in addresses:
            why = address_problem(ip)
            if why is None:
                continue
            metadata = why == "a cloud metadata address"
            if self.allow.allows_address(ip, parts.port, exact=metadata) or (named and not metadata):
                continue
            embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
            shown = parts.label if parts.host == str(ip) else f"{parts.label} ({ip})"
            shown += f" (IPv4 {embedded})" if embedded is not None else ""
            how = ("list that exact address in OUTBOUND_ALLOW to allow it" if metadata
                   else "allow it with OUTBOUND_ALLOW")
            raise OutboundRefused(f"image host {shown} is {why}; {how}")
        return Target(parts, addresses)

    def _addresses(self, parts: UrlParts, timeout_s: float) -> tuple[IPAddress, ...]:
        try:
            return (ipaddress.ip_address(parts.host),)
        except ValueError:
            pass
        future = _DNS.submit(self._resolve or system_resolve, parts.host, parts.port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"resolving {parts.host}") from None
        found: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone
            if ip not in found:
                found.append(ip)
        if not found:
            raise socket.gaierror(f"no address for {parts.host}")
        return tuple(found)
