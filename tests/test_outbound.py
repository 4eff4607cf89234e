"""The outbound host policy (trainer_core.outbound) on its own: which addresses are public,
which allowlist entries parse, how a URL is taken apart.

``HOST_CASES`` is the table both callers are held to: tests/test_webhooks.py asserts it
through the webhook URL check, tests/test_graders.py through http reward functions.
``rebinding_dns`` makes a name answer differently on its second lookup, for the tests that
show each caller connects to the address it checked.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trainer_core import outbound

# (case, url, allowlist entries, allowed for webhooks (public hosts allowed, their default),
#  allowed for http reward functions (listed hosts only)). Only IP literals and names that
# are listed (never looked up) or in /etc/hosts, so no case needs a DNS server.
HOST_CASES: list[tuple[str, str, str, bool, bool]] = [
    ("loopback", "http://127.0.0.1:8080/hook", "", False, False),
    ("loopback by name", "http://localhost:8080/hook", "", False, False),
    ("10/8", "http://10.1.2.3/hook", "", False, False),
    ("172.16/12", "http://172.16.0.1/hook", "", False, False),
    ("172.16/12, its last address", "http://172.31.255.254/hook", "", False, False),
    ("192.168/16", "http://192.168.1.1/hook", "", False, False),
    ("169.254 (cloud metadata)", "http://169.254.169.254/latest/meta-data", "", False, False),
    ("::1", "http://[::1]:8000/hook", "", False, False),
    ("fc00::/7", "http://[fd12:3456::1]/hook", "", False, False),
    ("fe80::/10", "http://[fe80::1]/hook", "", False, False),
    ("v4-mapped loopback", "http://[::ffff:127.0.0.1]/hook", "", False, False),
    ("0.0.0.0", "http://0.0.0.0:8000/hook", "", False, False),
    ("::", "http://[::]:8000/hook", "", False, False),
    ("100.64/10 (shared)", "http://100.64.0.1/hook", "", False, False),
    ("multicast", "http://224.0.0.1/hook", "", False, False),
    ("reserved 240/4", "http://240.0.0.1/hook", "", False, False),
    ("site-local fec0::/10", "http://[fec0::1]/hook", "", False, False),
    ("NAT64 of loopback", "http://[64:ff9b::7f00:1]/hook", "", False, False),
    ("6to4 of 10/8", "http://[2002:a00:1::]/hook", "", False, False),
    ("public", "https://93.184.216.34/hook", "", True, False),
    ("public, v4-mapped", "https://[::ffff:93.184.216.34]/hook", "", True, False),
    ("public IPv6", "https://[2606:4700::1111]/hook", "", True, False),
    (
        "listed host (not looked up)",
        "http://rewards.internal:8080/x",
        "rewards.internal",
        True,
        True,
    ),
    ("listed host that is loopback", "http://localhost:8080/x", "localhost", True, True),
    ("listed host:port", "http://10.0.0.5:8080/x", "10.0.0.5:8080", True, True),
    ("listed host:port, another port", "http://10.0.0.5:8081/x", "10.0.0.5:8080", False, False),
    ("listed [v6]:port", "http://[::1]:8000/x", "[::1]:8000", True, True),
    ("listed IPv6, written longer", "http://[0:0:0:0:0:0:0:1]/x", "::1", True, True),
    ("listed name is not its address", "http://localhost/x", "127.0.0.1", False, False),
    ("CIDR", "http://10.20.3.4/x", "10.20.0.0/16", True, True),
    ("CIDR, another network", "http://10.21.0.1/x", "10.20.0.0/16", False, False),
    ("CIDR, v4-mapped", "http://[::ffff:10.20.0.1]/x", "10.20.0.0/16", True, True),
    ("IPv6 CIDR", "http://[fd00::5]/x", "fd00::/8", True, True),
    ("name resolving into CIDRs", "http://localhost:9/x", "127.0.0.0/8,::1/128", True, True),
]
CASE_IDS = [case[0] for case in HOST_CASES]


def rebinding_dns(monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> list[str]:
    """Make ``name`` resolve to ``answers[0]`` first, then ``answers[1]`` on every later
    lookup (a DNS-rebinding server); every other name resolves as usual. Returns the answers
    given, one per lookup."""
    real = socket.getaddrinfo
    given: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real(host, port, *args, **kwargs)
        given.append(answers[min(len(given), len(answers) - 1)])
        return real(given[-1], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return given


def policy(entries: str, *, allow_public: bool) -> outbound.HostPolicy:
    return outbound.HostPolicy.from_entries(
        entries.split(","), allow_public=allow_public, setting="ALIGND_TEST_HOSTS"
    )


@pytest.mark.parametrize(
    ("case", "url", "entries", "webhooks", "rewards"), HOST_CASES, ids=CASE_IDS
)
def test_the_table_at_the_policy_itself(
    case: str, url: str, entries: str, webhooks: bool, rewards: bool
) -> None:
    for allow_public, expected in ((True, webhooks), (False, rewards)):
        try:
            outbound.check(policy(entries, allow_public=allow_public), url)
            allowed = True
        except outbound.Refused:
            allowed = False
        assert allowed is expected, (case, allow_public)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # judged by the IPv4 address it carries
        ("64:ff9b::808:808", True),  # NAT64 of a public address: an IPv6-only network's way out
        ("2002:808:808::1", True),  # 6to4 of a public address
        ("127.0.0.1", False),
        ("10.255.255.255", False),
        ("172.20.0.1", False),
        ("192.168.0.1", False),
        ("169.254.0.1", False),
        ("100.127.255.255", False),
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("239.255.255.250", False),
        ("255.255.255.255", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::", False),
        ("fc00::1", False),
        ("fe80::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("2001:db8::1", False),  # documentation
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("2002:c0a8:1::", False),  # 6to4 of 192.168.0.1
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated): reserved
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert outbound.is_public(ipaddress.ip_address(address)) is public


def test_allowlist_entries_parse_or_say_what_is_wrong() -> None:
    assert outbound.parse_entry(" Rewards.Internal ") == ("rewards.internal", None)
    assert outbound.parse_entry("rewards.internal:8080") == ("rewards.internal", 8080)
    assert outbound.parse_entry("[::1]:8000") == ("::1", 8000)
    assert outbound.parse_entry("[0::1]") == ("::1", None)
    assert outbound.parse_entry("fd00::1") == ("fd00::1", None)
    assert outbound.parse_entry("10.20.0.0/16") == ipaddress.ip_network("10.20.0.0/16")
    assert outbound.parse_entry("10.20.0.7/16") == ipaddress.ip_network("10.20.0.0/16")
    for bad in (
        "host:",
        "host:http",
        "host:70000",
        "[::1",
        "[::1]8000",
        "[host]",
        "a b",
        "10.0.0.0/33",
    ):
        with pytest.raises(ValueError):
            outbound.parse_entry(bad)


def test_urls_are_taken_apart_or_refused() -> None:
    destination = outbound.parse_url("https://Example.COM/a b/ü?q=1 2#frag")
    assert (destination.scheme, destination.host, destination.port) == ("https", "example.com", 443)
    assert destination.target == "/a%20b/%C3%BC?q=1%202"
    assert outbound.parse_url("http://[::1]:8000").target == "/"
    for bad in (
        "ftp://93.184.216.34/x",
        "http://user:pw@93.184.216.34/x",
        "http:///x",
        "not a url",
        "http://93.184.216.34:99999/",
        "http://93.184.216.34:0/",
    ):
        with pytest.raises(outbound.Refused):
            outbound.parse_url(bad)


def test_a_host_that_does_not_resolve_is_refused_as_transient() -> None:
    with pytest.raises(outbound.Refused) as caught:
        outbound.check(policy("", allow_public=True), "http://no-such-host.invalid/x")
    assert caught.value.transient
    # A listed name is never looked up, so it is not refused for that.
    listed = outbound.check(
        policy("no-such-host.invalid", allow_public=False), "http://no-such-host.invalid/x"
    )
    assert listed.addresses == ()


def test_a_name_is_checked_at_every_address_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name with one public and one private address would let the connection pick the
    # private one: refused as a whole.
    real = socket.getaddrinfo

    def two_addresses(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "mixed.test":
            return real(host, port, *args, **kwargs)
        return [
            *real("93.184.216.34", port, *args, **kwargs),
            *real("10.0.0.1", port, *args, **kwargs),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with pytest.raises(outbound.Refused) as caught:
        outbound.check(policy("", allow_public=True), "http://mixed.test/x")
    assert "10.0.0.1" in str(caught.value)
    with pytest.raises(outbound.Refused):
        outbound.check(policy("10.0.0.0/8", allow_public=False), "http://mixed.test/x")
    checked = outbound.check(
        policy("10.0.0.0/8,93.184.216.0/24", allow_public=False), "http://mixed.test/x"
    )
    assert [str(a) for a in checked.addresses] == ["93.184.216.34", "10.0.0.1"]


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An https server on 127.0.0.1 with a self-signed certificate for ``pinned.test``,
    which the client trusts (SSL_CERT_FILE) for the test's duration. Yields its port."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=pinned.test"),
            *("-addext", "subjectAltName=DNS:pinned.test"),
        ],
        check=True,
        capture_output=True,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    outbound._tls_context.cache_clear()  # made once per process; this one must see the file
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        outbound._tls_context.cache_clear()


def test_https_to_the_checked_address_verifies_the_name(
    tls_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection goes to the address (127.0.0.1) but TLS is for the URL's name: the
    certificate for pinned.test passes there, and fails for another name at that address."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        local = host in ("pinned.test", "other.test")
        return real("127.0.0.1" if local else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    allow_local = policy("127.0.0.0/8", allow_public=False)
    for name, verified in (("pinned.test", True), ("other.test", False)):
        destination = outbound.check(allow_local, f"https://{name}:{tls_server}/hook")
        assert [str(a) for a in destination.addresses] == ["127.0.0.1"]
        connection = outbound.connection(destination, 5)
        try:
            if verified:
                connection.request("POST", destination.target, body=b"{}")
                assert connection.getresponse().status == 204
            else:
                with pytest.raises(ssl.SSLCertVerificationError, match=r"other\.test"):
                    connection.request("POST", destination.target, body=b"{}")
        finally:
            connection.close()
