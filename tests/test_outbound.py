"""``fastsam_backend.outbound``: which addresses image downloads may reach (no network: fake DNS)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsam_backend.errors import BadRequest
from fastsam_backend.outbound import (
    AllowList,
    OutboundPolicy,
    OutboundRefused,
    address_problem,
    numeric_ipv4,
    split_url,
)


def fake_dns(table: dict[str, list[str]]):
    """A ``getaddrinfo`` answering from ``table``; unknown names do not resolve."""
    calls: list[str] = []

    def resolve(host, port, family=0, type=0, *args):
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]

    resolve.calls = calls
    return resolve


def policy(allow: str = "", ls: str | None = None, dns: dict | None = None) -> OutboundPolicy:
    return OutboundPolicy.for_label_studio(ls, AllowList.parse(allow), fake_dns(dns or {}))


# --- what is refused, and why ------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.5", "private"), ("172.16.3.4", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "private"), ("100.127.255.254", "private"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"), ("0.1.2.3", "reserved"), ("fec0::1", "reserved"), ("2001:db8::1", "reserved"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("168.63.129.16", "metadata"),
    ("100.100.100.200", "metadata"), ("169.254.170.2", "metadata"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.5", "private"), ("::ffff:169.254.169.254", "metadata"),
    ("::127.0.0.1", "loopback"), ("64:ff9b::a00:5", "private"), ("2002:7f00:1::", "loopback"),
    ("2002:a9fe:a9fe::", "metadata"),
])
def test_refused_addresses(address, why):
    assert why in address_problem(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::1", "172.32.0.1", "100.128.0.1"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("spelling", ["2130706433", "0177.0.0.1", "0x7f.1", "127.1", "0x7f000001", "0177.1",
                                      "127.0.0.1.", "0x7F.0.0.1", "017700000001", "127.0.1"])
def test_every_numeric_spelling_of_loopback(spelling):
    assert numeric_ipv4(spelling) == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(OutboundRefused, match=r"image host 127\.0\.0\.1 is a loopback address"):
        policy().vet(f"http://{spelling}/a.png", 1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**32).map(str), st.integers(0, 2**32).map(lambda n: f"0{n:o}"),
                          st.integers(0, 2**32).map(hex)), min_size=1, max_size=4).map(".".join))
def test_numeric_hosts_read_as_inet_aton_reads_them(spelling):
    """Whatever the C library would connect to, we check the same address."""
    try:
        expected = ipaddress.IPv4Address(socket.inet_aton(spelling))
    except OSError:
        with pytest.raises(ValueError):
            numeric_ipv4(spelling)
        return
    assert numeric_ipv4(spelling) == expected


@pytest.mark.parametrize("url", ["http://[::ffff:127.0.0.1]/", "http://[::1]:8080/x", "http://[0:0:0:0:0:0:0:1]/",
                                 "http://[::ffff:7f00:1]/", "http://localhost/", "http://LOCALHOST./"])
def test_ipv6_and_named_loopback(url):
    with pytest.raises(OutboundRefused, match="loopback"):
        policy(dns={"localhost": ["127.0.0.1", "::1"]}).vet(url, 1.0)


def test_every_resolved_address_is_checked():
    dns = {"mixed.example": ["93.184.216.34", "10.0.0.5"], "v6.example": ["2606:4700::1", "fd00::7"]}
    with pytest.raises(OutboundRefused, match=r"image host mixed\.example \(10\.0\.0\.5\) is a private address; "
                                              r"allow it with OUTBOUND_ALLOW"):
        policy(dns=dns).vet("https://mixed.example/a.png", 1.0)
    with pytest.raises(OutboundRefused, match=r"v6\.example \(fd00::7\) is a private"):
        policy(dns=dns).vet("https://v6.example/a.png", 1.0)


def test_a_public_host_is_vetted_with_all_its_addresses():
    dns = {"cdn.example": ["93.184.216.34", "2606:4700::1"]}
    target = policy(dns=dns).vet("https://cdn.example/a.png?sig=1#frag", 1.0)
    assert [str(a) for a in target.addresses] == ["93.184.216.34", "2606:4700::1"]
    assert target.parts.target == "/a.png?sig=1" and target.parts.port == 443 and target.parts.label == "cdn.example"


@pytest.mark.parametrize("name", ["metadata.google.internal", "metadata", "instance-data"])
def test_metadata_names_are_refused_whatever_they_resolve_to(name):
    with pytest.raises(OutboundRefused, match="cloud metadata"):
        policy(dns={name: ["93.184.216.34"]}).vet(f"http://{name}/computeMetadata/v1/", 1.0)


def test_metadata_inside_an_allowed_network_needs_its_exact_address():
    with pytest.raises(OutboundRefused, match="cloud metadata address; list that exact address"):
        policy("169.254.0.0/16").vet("http://169.254.169.254/latest/meta-data/", 1.0)
    assert policy("169.254.0.0/16").vet("http://169.254.1.1/", 1.0)
    assert policy("169.254.169.254").vet("http://169.254.169.254/", 1.0)
    with pytest.raises(OutboundRefused, match="metadata"):  # a named host never lends its trust to metadata
        policy("evil.example", dns={"evil.example": ["169.254.169.254"]}).vet("http://evil.example/", 1.0)


# --- exemptions ----------------------------------------------------------------------------------------
def test_label_studio_host_port_is_exempt_and_only_that_port():
    ls = policy(ls="http://label-studio:8080", dns={"label-studio": ["172.18.0.3"]})
    assert ls.vet("http://label-studio:8080/data/upload/1/a.png", 1.0)
    assert ls.vet("http://LABEL-STUDIO.:8080/x", 1.0)
    with pytest.raises(OutboundRefused, match=r"label-studio:9000 \(172\.18\.0\.3\) is a private"):
        ls.vet("http://label-studio:9000/x", 1.0)
    assert policy(ls="127.0.0.1:8080").vet("http://0x7f.1:8080/x", 1.0)  # the same endpoint, spelled otherwise


@pytest.mark.parametrize(("allow", "url", "ok"), [
    ("127.0.0.1:9000", "http://127.0.0.1:9000/a", True),
    ("127.0.0.1:9000", "http://127.0.0.1:9001/a", False),
    ("127.0.0.1", "http://127.0.0.1:1234/a", True),
    ("minio.internal", "http://minio.internal:9000/a", True),
    ("minio.internal:9000", "http://minio.internal:9001/a", False),
    ("10.0.0.0/8", "http://minio.internal/a", True),
    ("10.0.0.0/8", "http://10.255.0.1/a", True),
    ("10.0.0.0/8", "http://192.168.0.1/a", False),
    ("[::1]:8080", "http://[::1]:8080/a", True),
    ("::1", "http://[::1]:8080/a", True),
    ("fd00::/8", "http://[fd00::5]/a", True),
    ("127.0.0.0/8, minio.internal ::1", "http://127.9.9.9/a", True),
])
def test_allow_list_entries(allow, url, ok):
    vet = policy(allow, dns={"minio.internal": ["10.1.2.3"]}).vet
    if ok:
        assert vet(url, 1.0)
    else:
        with pytest.raises(OutboundRefused, match="OUTBOUND_ALLOW"):
            vet(url, 1.0)


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "host:port", "a b:99999", "[::1", "[::1]x", "exa mple/8", "!!",
                                   "h:0"])
def test_bad_allow_list_entries_are_named(entry):
    with pytest.raises(ValueError, match="OUTBOUND_ALLOW entry"):
        AllowList.parse(entry)


def test_bad_allow_list_fails_at_start_up():
    from pydantic import ValidationError

    from fastsam_backend.settings import load_settings

    with pytest.raises(ValidationError, match="OUTBOUND_ALLOW entry 'a:b'"):
        load_settings(OUTBOUND_ALLOW="10.0.0.0/8,a:b")
    assert load_settings(OUTBOUND_ALLOW="").outbound_allow is None


# --- URL forms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "error", "message"), [
    ("http://admin:hunter2@example.com/a.png", BadRequest, "user name or password"),
    ("http://hunter2@example.com/a.png", BadRequest, "user name or password"),
    ("http://a@hunter2@example.com/a.png", BadRequest, "user name or password"),
    ("ftp://example.com/a.png", OutboundRefused, "not http"),
    ("http:///a.png", BadRequest, "no host"),
    ("http://example.com:99999/", BadRequest, "malformed"),
    ("http://256.1.1.1/", BadRequest, "not a valid IPv4"),
    ("http://08.1/", BadRequest, "not a valid IPv4"),
    ("http://[::ffff:zz]/", BadRequest, "malformed|not a valid IPv6"),
    ("http://exa_mple%20.com/", BadRequest, "not a valid host"),
])
def test_malformed_urls(url, error, message):
    with pytest.raises(error, match=message) as exc:
        policy().vet(url, 1.0)
    assert "hunter2" not in str(exc.value)


def test_a_backslash_is_part_of_the_path_as_for_the_connection():
    """urllib3 (whose host we connect to) and browsers read the host before the backslash."""
    target = policy(dns={"evil.example": ["93.184.216.34"]}).vet("http://evil.example\\@127.0.0.1/", 1.0)
    assert target.parts.host == "evil.example" and [str(a) for a in target.addresses] == ["93.184.216.34"]


def test_split_url_keeps_the_query_out_of_the_label():
    parts = split_url("https://Bucket.S3.Example:8443/k/a%20b.png?X-Amz-Signature=s3cr3t")
    assert parts.label == "bucket.s3.example:8443" and parts.target == "/k/a%20b.png?X-Amz-Signature=s3cr3t"
    assert split_url("http://b\u00fccher.example/x").host == "xn--bcher-kva.example"


def test_unresolvable_and_slow_names():
    with pytest.raises(socket.gaierror):
        policy().vet("http://nowhere.example/", 1.0)

    def slow(*args):
        import time

        time.sleep(1.0)
        return []

    with pytest.raises(TimeoutError):
        OutboundPolicy(resolve=slow).vet("http://slow.example/", 0.1)
