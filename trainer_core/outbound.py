"""The outbound host policy: where the server's own HTTP requests to users' URLs may go.

Two features POST to a URL a user gives: webhooks (``api/webhooks.py``) and ``http`` reward
functions (``trainer_core/graders/running.py``). Both decide with ``check`` and connect with
``connection``, so one set of rules guards both against server-side request forgery:

1. The URL is ``http://`` or ``https://``, has a host, and carries no credentials.
2. A host the operator lists by name (``host``, any port, or ``host:port``) is allowed
   whatever it resolves to: the operator vouches for the name.
3. Otherwise the host is resolved; if every address lies in a listed network (CIDR), it is
   allowed.
4. Otherwise, where public hosts are allowed (webhooks by default; reward functions never),
   it is allowed when every address is public: not private, loopback, link-local, multicast,
   reserved, unspecified, shared (100.64/10) or site-local. An IPv6 address that carries an
   IPv4 one (v4-mapped ``::ffff:0:0/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is
   judged by that IPv4 address, which is where it leads.
5. Anything else is refused.

The connection then goes to the addresses that were checked, never to a second lookup: a DNS
answer that changes between check and connect ("DNS rebinding") cannot move the request
inward. TLS still verifies the certificate against the URL's host name. Proxies from the
environment are not used and redirects are not followed: either would carry the request to a
host nobody checked. docs/operations.md, "Outbound requests", is the operator's view.

Standard library only: the API (no torch) and the trainer both import it.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 6052's well-known NAT64 prefix: the last 32 bits are the IPv4 address a gateway reaches.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?")
# RFC 3986's sub-delims and the path/query characters that need no escaping; anything else
# (spaces, non-ASCII) is percent-encoded, as an HTTP client library would.
_PATH_SAFE = "/%!$&'()*+,;=:@"
_QUERY_SAFE = _PATH_SAFE + "?"


class Refused(ValueError):
    """The URL may not be requested; the message says why. ``transient``: the host did not
    resolve, which may pass (a webhook attempt is retried; a create is still refused)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _normal_host(host: str) -> str:
    """A host as entries and URLs are compared: IP addresses in their canonical form (``::1``
    for ``0:0::1``), names in lower-case ASCII (IDNA for non-ASCII). ValueError if neither."""
    host = host.strip().lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        host = host.encode("idna").decode("ascii")  # UnicodeError is a ValueError
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"'{host}' is not a host name or an IP address")
    return host


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"'{entry}' has no valid port after its ':'")
    return int(text)


def parse_entry(entry: str) -> tuple[str, int | None] | IPNetwork:
    """One allowlist entry: ``(host, port or None)`` for ``host``, ``host:port``, ``[v6]``,
    ``[v6]:port`` or a bare IPv6 address, or the network of a CIDR entry (``10.0.0.0/8``).
    ValueError names what is wrong, so that a bad setting fails when the server starts."""
    text = entry.strip().lower()
    if "/" in text:
        return ipaddress.ip_network(text, strict=False)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"'{entry}' is not [IPv6 address] or [IPv6 address]:port")
        ipaddress.IPv6Address(host)
        return _normal_host(host), _port(rest[1:], entry) if rest else None
    if text.count(":") > 1:  # a bare IPv6 address; a port needs the brackets
        return str(ipaddress.IPv6Address(text)), None
    host, colon, port = text.partition(":")
    return _normal_host(host), _port(port, entry) if colon else None


@dataclass(frozen=True)
class HostPolicy:
    """Hosts listed by name (any port, or one), networks listed as CIDR, and whether other
    public hosts may be reached. ``setting`` is the environment variable that lists them,
    named in refusals so that the reader knows what the operator would change."""

    names: frozenset[tuple[str, int | None]]
    networks: tuple[IPNetwork, ...]
    allow_public: bool
    setting: str

    @classmethod
    def from_entries(
        cls, entries: Iterable[str], *, allow_public: bool, setting: str
    ) -> HostPolicy:
        """Blank entries are skipped; a malformed one raises ValueError."""
        names: set[tuple[str, int | None]] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            if not entry.strip():
                continue
            parsed = parse_entry(entry)
            if isinstance(parsed, tuple):
                names.add(parsed)
            else:
                networks.append(parsed)
        return cls(frozenset(names), tuple(networks), allow_public, setting)

    def listed(self, host: str, port: int) -> bool:
        return (host, None) in self.names or (host, port) in self.names

    def in_networks(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class Destination:
    """A URL taken apart for one request. ``addresses`` are those the policy checked, which
    the connection must use; empty when the host is listed by name (any address will do)."""

    scheme: str
    host: str  # normalised (``_normal_host``)
    port: int
    target: str  # path and query, as the request line carries them
    addresses: tuple[IPAddress, ...] = ()


def parse_url(url: str) -> Destination:
    """``url`` taken apart, or Refused when it is not an http(s) URL with a host and no
    credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = _normal_host(parts.hostname) if parts.hostname else ""
    except ValueError as exc:
        raise Refused(f"the URL is not valid ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("the URL must be http:// or https://")
    if not host:
        raise Refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL may not carry credentials")
    if port == 0:
        raise Refused("the URL's port must be between 1 and 65535")
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return Destination(
        scheme=parts.scheme,
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
        target=target,
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether an address is public unicast (rule 4 of the module docstring).

    Python's ``is_global`` alone is not enough: it calls multicast, site-local (fec0::/10)
    and the IPv4-carrying prefixes global; each flag below closes one of those.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    """Every address ``host`` resolves to now (v4-mapped IPv6 given as IPv4), or Refused
    (transient) when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"the host '{host}' does not resolve ({exc})", transient=True) from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Refused(f"the host '{host}' does not resolve", transient=True)
    return tuple(addresses)


def check(policy: HostPolicy, url: str) -> Destination:
    """Where ``url`` may be sent under ``policy``, or Refused with the reason."""
    destination = parse_url(url)
    host, port = destination.host, destination.port
    if policy.listed(host, port):
        return destination
    not_listed = f"the host '{host}:{port}' is not on this server's allowlist ({policy.setting})"
    if not policy.networks and not policy.allow_public:
        raise Refused(not_listed)  # nothing a lookup could change
    addresses = resolve(host, port)
    if policy.networks and all(policy.in_networks(a) for a in addresses):
        return replace(destination, addresses=addresses)
    if not policy.allow_public:
        raise Refused(not_listed)
    for address in addresses:
        if not is_public(address):
            raise Refused(
                f"the host '{host}' resolves to {address}, a private, loopback, link-local, "
                f"multicast or otherwise non-public address; the server's operator can allow "
                f"it in {policy.setting}"
            )
    return replace(destination, addresses=addresses)


def _connect_any(
    addresses: tuple[IPAddress, ...], port: int, timeout: Any, source: Any
) -> socket.socket:
    """``socket.create_connection`` over addresses already resolved and checked: the first
    that accepts, else the last error."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout, source)
        except OSError as exc:
            error = exc
    assert error is not None  # addresses is never empty (``resolve``)
    raise error


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the trust store takes milliseconds; one context serves every request (and
    # thread: wrapping sockets does not change it).
    return ssl.create_default_context()


def connection(destination: Destination, timeout: float) -> http.client.HTTPConnection:
    """An unopened connection for ``destination``: to its checked addresses when it has some,
    else to its (listed) host by name. https verifies the certificate for the URL's host
    with the system's trust store. http.client follows no redirect and uses no proxy."""
    conn: http.client.HTTPConnection
    if destination.scheme == "https":
        conn = http.client.HTTPSConnection(
            destination.host,
            destination.port,
            timeout=timeout,
            context=_tls_context(),
        )
    else:
        conn = http.client.HTTPConnection(destination.host, destination.port, timeout=timeout)
    addresses = destination.addresses
    if addresses:
        # http.client opens its socket through this attribute (TLS, when used, is wrapped
        # around that socket with the host name): pointing it at the checked addresses is
        # what keeps a second DNS answer from choosing where the request goes.
        conn._create_connection = (  # type: ignore[attr-defined]
            lambda address, timeout, source=None: _connect_any(
                addresses, address[1], timeout, source
            )
        )
    return conn
