"""Bad input on the image side, table-driven: hostile servers, refused addresses, broken files.

Every case ends with ``ImageError``/``BadRequest`` and a message that says what went wrong, or
with a correct decode where the input is legitimate, within its deadline + 2 s. Servers bind
127.0.0.1 (the autouse net in conftest fails a test that would reach anything else).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import os
import re
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fastsam_backend.errors import BadRequest, ImageError
from fastsam_backend.images import download
from fastsam_backend.images.loader import ImageLoader, ImageSourceConfig
from fastsam_backend.outbound import AllowList, OutboundRefused

TIMEOUT_S = 0.5  # the drip and stall cases wait this long: short keeps the fast lane fast
DRIP_S = 0.1  # a byte this often: well inside any per-read timeout, so only a total deadline stops it
SLACK_S = 2.0
RNG = np.random.default_rng(7)
PIXELS = RNG.integers(0, 255, (24, 32, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


PNG = encode(Image.fromarray(PIXELS), "PNG")
# Blocks of flat colour, no two corners alike: survives JPEG well enough to tell orientations apart
BLOCKS = np.kron(np.array([[[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]],
                           [[0, 250, 250], [250, 0, 250], [20, 20, 20], [250, 250, 250]],
                           [[128, 0, 0], [0, 128, 0], [0, 0, 128], [128, 128, 0]]], dtype=np.uint8),
                 np.ones((8, 8, 1), dtype=np.uint8))


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


# --- a misbehaving server ----------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state["lock"]:
            state["seen"].append((self.path, dict(self.headers)))
            state["hits"][path] = state["hits"].get(path, 0) + 1
        route = state["routes"].get(path)
        with contextlib.suppress(OSError):  # clients that gave up
            if route is None:
                return self.reply(404, b"not found", "text/plain")
            route(self)

    def reply(self, status: int, body: bytes = b"", ctype: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def wait(self, seconds: float) -> bool:
        """Sleep unless the test is over; False once it is."""
        return not self.server.state["stop"].wait(seconds)


def _serve() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.state = {"routes": {}, "seen": [], "hits": {}, "lock": threading.Lock(), "stop": threading.Event()}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    pair = [_serve(), _serve()]
    yield pair
    for server in pair:
        server.state["stop"].set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def site(servers):
    """(base URL, state) of a fresh server; ``other`` is a second one (another host:port)."""
    server = servers[0]
    server.state.update(routes={}, seen=[], hits={})
    return f"http://127.0.0.1:{server.server_address[1]}", server.state


@pytest.fixture
def other(servers):
    server = servers[1]
    server.state.update(routes={}, seen=[], hits={})
    return f"http://127.0.0.1:{server.server_address[1]}", server.state


def loader(ls_url: str | None = None, key: str | None = None, allow: str = "127.0.0.1", resolve=None,
           **overrides) -> ImageLoader:
    overrides.setdefault("timeout_s", TIMEOUT_S)
    config = ImageSourceConfig(label_studio_url=ls_url, api_key=key, outbound_allow=AllowList.parse(allow),
                               **overrides)
    return ImageLoader(config, resolve=resolve or _no_dns)


def _no_dns(host, *args):
    raise AssertionError(f"looked up {host!r}")


# --- routes --------------------------------------------------------------------------------------------------
def drip(handler: Handler, declared: int | None = 100, headers_too: bool = False, every: float = DRIP_S) -> None:
    """One byte every ``every`` seconds: of the status line (``headers_too``) or of the body."""
    head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n"
    head += f"Content-Length: {declared}\r\n".encode() if declared is not None else b""
    head += b"\r\n"
    if headers_too:
        for byte in head:
            handler.raw(bytes([byte]))
            if not handler.wait(every):
                return
    else:
        handler.raw(head)
    for byte in PNG * 10:
        handler.raw(bytes([byte]))
        if not handler.wait(every):
            return


def gzip_bomb(handler: Handler) -> None:
    body = gzip.compress(b"\0" * (20 * 1024 * 1024), 9)  # 20 MiB of zeros in ~20 kB
    handler.reply(200, body, "image/png", Content_Encoding="gzip")


ROUTES: dict[str, Callable[[Handler], Any]] = {
    "/png": lambda h: h.reply(200, PNG),
    "/404": lambda h: h.reply(404, b"nope", "text/plain"),
    "/500": lambda h: h.reply(500, b"boom", "text/plain"),
    "/503": lambda h: h.reply(503, b"busy", "text/plain"),
    "/loop": lambda h: h.reply(302, b"", Location="/loop"),
    "/chain5": lambda h: h.reply(302, b"", Location="/chain4"),
    "/chain4": lambda h: h.reply(301, b"", Location="/chain3"),
    "/chain3": lambda h: h.reply(307, b"", Location="/chain2"),
    "/chain2": lambda h: h.reply(308, b"", Location="/chain1"),
    "/chain1": lambda h: h.reply(303, b"", Location="/png"),
    "/chain6": lambda h: h.reply(302, b"", Location="/chain5"),
    "/to-private": lambda h: h.reply(302, b"", Location="http://10.0.0.5/a.png?X-Amz-Signature=s3cr3t"),
    "/to-metadata": lambda h: h.reply(302, b"", Location="http://169.254.169.254/latest/meta-data/"),
    "/to-loopback2": lambda h: h.reply(302, b"", Location="http://127.0.0.2/a.png"),
    "/to-mapped": lambda h: h.reply(302, b"", Location="http://[::ffff:192.168.0.1]/a.png"),
    "/to-decimal": lambda h: h.reply(302, b"", Location="http://3232235521/a.png"),  # 192.168.0.1
    "/to-file": lambda h: h.reply(302, b"", Location="file:///etc/passwd"),
    "/to-userinfo": lambda h: h.reply(302, b"", Location="http://u:hunter2@127.0.0.1/png"),
    "/no-location": lambda h: h.reply(302, b""),
    "/stall": lambda h: h.wait(30),
    "/drip-body": drip,
    "/drip-body-nolength": lambda h: drip(h, declared=None),
    "/drip-headers": lambda h: drip(h, headers_too=True),
    "/big-declared": lambda h: h.reply(200, b"\0" * 5000),
    "/big-undeclared": lambda h: (h.raw(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n"), h.raw(b"\0" * 5000)),
    "/short-body": lambda h: h.raw(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(PNG) + 50) + PNG),
    "/long-body": lambda h: h.raw(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG + b"\0" * 99),
    "/two-lengths": lambda h: h.raw(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n"
                                    + b"\0" * 20),
    "/bad-length": lambda h: h.raw(b"HTTP/1.0 200 OK\r\nContent-Length: lots\r\n\r\n" + PNG),
    "/garbage-status": lambda h: h.raw(b"HELLO THERE\r\n\r\n"),
    "/huge-header": lambda h: h.raw(b"HTTP/1.0 200 OK\r\nX-Pad: " + b"a" * 70000 + b"\r\n\r\n"),
    "/hang-up": lambda h: h.connection.shutdown(socket.SHUT_RDWR),
    "/html": lambda h: h.reply(200, b"<html>please log in</html>", "text/html"),
    "/empty": lambda h: h.reply(200, b""),
    "/gzip-bomb": gzip_bomb,
}


@dataclass(frozen=True)
class Case:
    path: str
    error: str | None  # regex of the message, None = decodes to PIXELS
    kind: type = ImageError
    overrides: tuple = ()
    hits: int | None = None  # requests the first path should have received


HTTP_CASES = {
    "404": Case("/404", r"127\.0\.0\.1:\d+: HTTP 404$", hits=1),
    "500 is not retried": Case("/500", r"HTTP 500$", hits=1),
    "503 is retried then reported": Case("/503", r"HTTP 503$", hits=3),
    "redirect loop": Case("/loop", r"too many redirects \(more than 5\)"),
    "five redirects are followed": Case("/chain5", None),
    "six are too many": Case("/chain6", r"too many redirects"),
    "redirect to a private address": Case("/to-private", r"redirected to a refused URL: image host 10\.0\.0\.5 is a "
                                          r"private address; allow it with OUTBOUND_ALLOW", OutboundRefused),
    "redirect to metadata": Case("/to-metadata", r"169\.254\.169\.254 is a cloud metadata address", OutboundRefused),
    "redirect to other loopback": Case("/to-loopback2", r"127\.0\.0\.2 is a loopback address", OutboundRefused),
    "redirect to mapped IPv6": Case("/to-mapped", r"\[::ffff:c0a8:1\] \(IPv4 192\.168\.0\.1\) is a private",
                                    OutboundRefused),
    "redirect to a decimal address": Case("/to-decimal", r"image host 192\.168\.0\.1 is a private", OutboundRefused),
    "redirect to file:": Case("/to-file", r"scheme 'file' is not http\(s\)", OutboundRefused),
    "redirect with user info": Case("/to-userinfo", r"user name or password", BadRequest),
    "redirect without Location": Case("/no-location", r"HTTP 302 \(not followed: no Location header"),
    "no redirects allowed": Case("/chain1", r"HTTP 303 \(not followed.*OUTBOUND_MAX_REDIRECTS=0\)",
                                 overrides=(("max_redirects", 0),)),
    "stall: headers never come": Case("/stall", r"timed out after 0.5 s waiting for the response headers", hits=1),
    "drip headers": Case("/drip-headers", r"timed out after 0.5 s waiting for the response headers"),
    "drip body": Case("/drip-body", r"timed out after 0.5 s reading the body \(\d+ of 100 bytes received\)", hits=1),
    "drip body without length": Case("/drip-body-nolength", r"timed out after 0.5 s reading the body"),
    "declared over the limit": Case("/big-declared", r"larger than the limit of 1000 bytes.*Content-Length 5000",
                                    overrides=(("max_bytes", 1000),)),
    "undeclared over the limit": Case("/big-undeclared", r"larger than the limit of 1000 bytes",
                                      overrides=(("max_bytes", 1000),)),
    "Content-Length larger than the body": Case("/short-body", r"connection broken while reading the body", hits=3),
    "Content-Length smaller than the body": Case("/long-body", None),
    "two Content-Lengths": Case("/two-lengths", r"invalid HTTP response"),
    "Content-Length not a number": Case("/bad-length", None),
    "not HTTP at all": Case("/garbage-status", r"invalid HTTP response while waiting for the response headers"),
    "a 70 kB header line": Case("/huge-header", r"invalid HTTP response"),
    "hang up without answering": Case("/hang-up", r"closed the connection while waiting for the response", hits=3),
    "an HTML login page": Case("/html", r"could not decode .*not a recognised image format \(26 bytes of text/html\)"),
    "an empty body": Case("/empty", r"not a recognised image format \(0 bytes"),
    "gzip bomb": Case("/gzip-bomb", r"larger than the limit of 1048576 bytes", overrides=(("max_bytes", 2**20),)),
}


@pytest.mark.parametrize("case", HTTP_CASES.values(), ids=HTTP_CASES.keys())
def test_http_battery(site, case: Case, caplog):
    base, state = site
    state["routes"].update(ROUTES)
    started = time.monotonic()
    if case.error is None:
        image = loader(**dict(case.overrides)).load(base + case.path + "?sig=s3cr3t")
        assert np.array_equal(image.pixels, PIXELS)
    else:
        with pytest.raises(case.kind, match=case.error) as exc:
            loader(**dict(case.overrides)).load(base + case.path + "?sig=s3cr3t")
        assert exc.value.status in (400, 403, 422)
        assert "s3cr3t" not in str(exc.value) and "s3cr3t" not in caplog.text  # no query strings
        assert "hunter2" not in str(exc.value)
    assert time.monotonic() - started <= TIMEOUT_S + SLACK_S
    if case.hits is not None:
        assert state["hits"][case.path] == case.hits


@pytest.mark.slow  # seconds of waiting: the full lane (make test), not make test-fast
def test_a_drip_feeding_server_is_cut_at_the_total_deadline(site):
    """The regression: one byte per 0.5 s used to hold a request for 120 s (each read reset the timeout)."""
    base, state = site
    state["routes"]["/drip-body"] = lambda h: drip(h, every=0.5)
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"timed out after 2 s reading the body"):
        loader(timeout_s=2.0).fetch_bytes(base + "/drip-body")
    assert time.monotonic() - started <= 4.0


def test_connection_refused_is_retried_quickly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ImageError, match=rf"127\.0\.0\.1:{port}: connection refused"):
        loader(timeout_s=10.0).load(f"http://127.0.0.1:{port}/a.png")
    assert time.monotonic() - started < 3.0  # its retries are quick: far from waiting out the 10 s timeout


# --- the policy on real requests -------------------------------------------------------------------------------
def test_loopback_is_refused_without_the_allow_list(site):
    base, state = site
    state["routes"].update(ROUTES)
    with pytest.raises(OutboundRefused, match=r"image host 127\.0\.0\.1:\d+ is a loopback address; allow it with "
                                              r"OUTBOUND_ALLOW") as exc:
        loader(allow="").load(base + "/png?X-Amz-Signature=s3cr3t")
    assert exc.value.status == 403 and "s3cr3t" not in str(exc.value)
    assert state["hits"] == {}  # refused before connecting


def test_label_studio_host_port_is_exempt(site):
    base, state = site
    state["routes"].update(ROUTES)
    assert loader(base, allow="").load("/png").size == (24, 32)
    with pytest.raises(OutboundRefused):  # the same address on another port is not Label Studio
        loader(base.rsplit(":", 1)[0] + ":1", allow="").load(base + "/png")


def test_setup_hostname_is_not_trusted(site):
    """Anyone who reaches the backend can call /setup: its hostname is a base for relative URLs only."""
    base, state = site
    state["routes"].update(ROUTES)
    untrusting = loader(allow="")
    untrusting.set_fallback(base, "a" * 40)
    with pytest.raises(OutboundRefused, match="loopback address; allow it with OUTBOUND_ALLOW"):
        untrusting.load("/png")
    assert state["hits"] == {}
    allowed = loader(allow=base.removeprefix("http://"))
    allowed.set_fallback(base, "a" * 40)
    assert allowed.load("/png").size == (24, 32)
    assert state["seen"][-1][1]["Authorization"] == "Token " + "a" * 40  # its own token, to its own host


def test_allow_list_covers_redirect_targets(site, other):
    base, state = site
    other_base, other_state = other
    other_state["routes"].update(ROUTES)
    state["routes"]["/away"] = lambda h: h.reply(302, b"", Location=other_base + "/png")
    first_only = loader(allow=base.removeprefix("http://"))
    with pytest.raises(OutboundRefused, match=rf"redirected to a refused URL: image host {re.escape(other_base[7:])}"):
        first_only.load(base + "/away")
    assert other_state["hits"] == {}
    both = loader(allow=f"{base[7:]},{other_base[7:]}")
    assert both.load(base + "/away").size == (24, 32)


def test_token_never_follows_a_redirect_elsewhere_nor_comes_back(site, other):
    base, state = site
    other_base, other_state = other
    state["routes"]["/tasks/1/resolve/"] = lambda h: h.reply(303, b"", Location=other_base + "/bounce")
    other_state["routes"]["/bounce"] = lambda h: h.reply(302, b"", Location=base + "/private.png")
    state["routes"]["/private.png"] = lambda h: h.reply(200, PNG)
    key = "f" * 40
    assert loader(base, key).load("/tasks/1/resolve/?fileuri=x").size == (24, 32)
    assert state["seen"][0][1]["Authorization"] == f"Token {key}"
    assert "Authorization" not in other_state["seen"][0][1]
    assert "Authorization" not in state["seen"][1][1]  # back on LS's host, after a stranger chose the URL
    state["routes"]["/same-host"] = lambda h: h.reply(302, b"", Location="/private.png")
    loader(base, key).load("/same-host")
    assert state["seen"][-1][1]["Authorization"] == f"Token {key}"  # LS redirecting to itself keeps it


def test_the_connection_goes_to_the_vetted_address(site, monkeypatch):
    """DNS rebinding: a name that answers a public address to the check and a private one to the
    connect gets nowhere, because the name is resolved once and the socket goes to that answer."""
    base, state = site
    state["routes"].update(ROUTES)
    port = int(base.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1", "10.0.0.5", "10.0.0.5"])
    lookups: list[str] = []

    def rebinding(host, port_, *args):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port_))]

    connected: list[tuple[str, int]] = []
    real = download._connect
    monkeypatch.setattr(download, "_connect", lambda a, p, t: (connected.append((a, p)), real(a, p, t))[1])
    image = loader(allow="images.test", resolve=rebinding).load(f"http://images.test:{port}/png")
    assert image.size == (24, 32)
    assert lookups == ["images.test"] and connected == [("127.0.0.1", port)]
    assert state["seen"][-1][1]["Host"] == f"images.test:{port}"  # the name still speaks HTTP


def test_every_resolved_address_must_pass(site):
    base, _ = site
    port = int(base.rsplit(":", 1)[1])

    def two(host, port_, *args):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port_))]

    with pytest.raises(OutboundRefused, match=r"images\.test:\d+ \(10\.0\.0\.5\) is a private address"):
        loader(allow="127.0.0.1", resolve=two).load(f"http://images.test:{port}/png")


# --- TLS: SNI and certificate checks stay with the host name -------------------------------------------------
@pytest.fixture(scope="module")
def tls_site(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a certificate for ``images.test`` from a throwaway CA."""
    import ssl

    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=fastsam test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test")
    (d / "ext.cnf").write_text("subjectAltName=DNS:images.test\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "leaf.pem", "-days", "2", "-extfile", "ext.cnf")
    server = _serve()
    server.state["routes"].update(ROUTES)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield server.server_address[1], d / "ca.pem", sni
    server.state["stop"].set()
    server.shutdown()
    server.server_close()


def _to_loopback(host, port, *args):
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def test_https_keeps_sni_and_verifies_the_name(tls_site, monkeypatch):
    port, ca, sni = tls_site
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # trusted through the system store, as a company CA would be
    image = loader(allow="images.test", resolve=_to_loopback).load(f"https://images.test:{port}/png")
    assert image.size == (24, 32) and sni[-1] == "images.test"
    with pytest.raises(ImageError, match=r"TLS/SSL error.*VERIFY_SSL=false"):  # valid cert, wrong name
        loader(allow="other.test", resolve=_to_loopback).load(f"https://other.test:{port}/png")
    assert loader(allow="other.test", resolve=_to_loopback, verify_ssl=False).load(
        f"https://other.test:{port}/png").size == (24, 32)


def test_https_with_an_unknown_ca_is_refused(tls_site):
    port, _, _ = tls_site
    with pytest.raises(ImageError, match=r"images\.test:\d+: TLS/SSL error"):
        loader(allow="images.test", resolve=_to_loopback).load(f"https://images.test:{port}/png")


# --- decoding --------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` with a few bytes of pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.fromarray(PIXELS), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.fromarray(PIXELS).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    data[data.index(b"\x2c") + 5:data.index(b"\x2c") + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(PIXELS), Image.fromarray(255 - PIXELS)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)


def with_transparency() -> bytes:
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    return encode(palette, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red


def grey16_png() -> bytes:
    return encode(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)), "PNG")


def rgb48_png() -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow saves no such mode)."""
    rows = np.array([[[65535, 0, 0], [0, 65535, 0], [0, 0, 65535]]], dtype=">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 3, 1, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def oriented(orientation: int, fmt: str, pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    return encode(Image.fromarray(pixels), fmt, exif=exif.tobytes(), **extra)


# What the EXIF orientations mean, written independently of Pillow's table
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def close_to(expected: np.ndarray, tolerance: float) -> Callable[[np.ndarray], bool]:
    return lambda got: got.shape == expected.shape and np.abs(got.astype(int) - expected).mean() <= tolerance


def colours(*rgb) -> Callable[[np.ndarray], bool]:
    return lambda got: [tuple(p) for p in got.reshape(-1, 3)[: len(rgb)]] == list(rgb)


JPEG = encode(Image.fromarray(PIXELS), "JPEG")
WEBP = encode(Image.fromarray(PIXELS), "WEBP", lossless=True)
DECODE_CASES: dict[str, tuple[bytes, Any]] = {
    "text": (b"hello, this is not an image", r"not a recognised image format \(27 bytes"),
    "nothing": (b"", r"not a recognised image format \(0 bytes"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], r"(?i)truncated"),
    "JPEG header only": (JPEG[:40], r"could not decode"),
    "truncated PNG": (PNG[: len(PNG) // 2], r"(?i)truncated"),
    "PNG with zeroed pixel data": (PNG[:60] + b"\0" * (len(PNG) - 72) + PNG[-12:], r"could not decode"),
    "truncated WebP": (WEBP[: len(WEBP) // 2], r"could not decode"),
    "PNG bomb (100000 x 100000)": (png_header_only(100_000, 100_000), r"(MAX_IMAGE_PIXELS|too large to decode)"),
    "PNG over MAX_IMAGE_PIXELS": (png_header_only(9000, 8000), r"9000x8000, over the limit of 64000000 pixels"),
    "JPEG bomb (60000 x 60000)": (jpeg_claiming(60_000, 60_000), r"(MAX_IMAGE_PIXELS|too large to decode)"),
    "GIF bomb (65535 x 65535)": (gif_claiming(65_535, 65_535), r"(MAX_IMAGE_PIXELS|too large to decode)"),
    "PPM (not a format LS shows)": (encode(Image.fromarray(PIXELS), "PPM"), r"not a recognised image format"),
    "EPS (would run Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", r"not a recognised"),
    "animated GIF: first frame": (animated("GIF"), close_to(PIXELS, 40)),
    "animated WebP: first frame": (animated("WEBP"), close_to(PIXELS, 0)),
    "16-bit greyscale PNG": (grey16_png(), lambda got: got[0, :, 0].tolist() == [0, 128, 255]),
    "16-bit RGB PNG": (rgb48_png(), colours((255, 0, 0), (0, 255, 0), (0, 0, 255))),
    "CMYK JPEG": (cmyk_jpeg(), lambda got: got.shape == (4, 8, 3) and (got[..., 0] > 200).all()
                  and (got[..., 1:] < 60).all()),
    "palette with transparency": (with_transparency(), colours((255, 0, 0), (0, 255, 0), (255, 0, 0))),
    "greyscale": (encode(Image.fromarray(PIXELS[..., 0]), "PNG"),
                  lambda got: (got == PIXELS[..., :1]).all()),
    "greyscale + alpha": (encode(Image.merge("LA", [Image.fromarray(PIXELS[..., 0])] * 2), "PNG"),
                          lambda got: (got == PIXELS[..., :1]).all()),
    "RGBA: alpha dropped": (encode(Image.fromarray(np.dstack([PIXELS, PIXELS[..., :1]])), "PNG"),
                            lambda got: np.array_equal(got, PIXELS)),
    "1-bit": (encode(Image.fromarray(PIXELS[..., 0] > 127), "PNG"),
              lambda got: set(np.unique(got)) <= {0, 255} and got.shape == (24, 32, 3)),
    "TIFF": (encode(Image.fromarray(PIXELS), "TIFF"), lambda got: np.array_equal(got, PIXELS)),
    "BMP": (encode(Image.fromarray(PIXELS), "BMP"), lambda got: np.array_equal(got, PIXELS)),
    **{f"EXIF orientation {o} (PNG)": (oriented(o, "PNG", PIXELS),
                                       lambda got, o=o: np.array_equal(got, UPRIGHT[o](PIXELS))) for o in range(1, 9)},
    **{f"EXIF orientation {o} (JPEG)": (oriented(o, "JPEG", BLOCKS), close_to(UPRIGHT[o](BLOCKS), 4))
       for o in range(1, 9)},
}


@pytest.mark.parametrize(("data", "expect"), DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_battery(data: bytes, expect):
    started = time.monotonic()
    if isinstance(expect, str):
        with pytest.raises(ImageError, match=expect) as exc:
            loader().load(data_uri(data))
        assert exc.value.status == 422 and "BytesIO" not in str(exc.value)
    else:
        pixels = loader().load(data_uri(data)).pixels
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert expect(pixels), pixels[:2, :4].tolist()
    assert time.monotonic() - started <= TIMEOUT_S + SLACK_S


def test_pixel_limit_is_inclusive():
    assert loader(max_pixels=24 * 32).load(data_uri(PNG)).size == (24, 32)
    with pytest.raises(ImageError, match="32x24, over the limit of 767 pixels"):
        loader(max_pixels=24 * 32 - 1).load(data_uri(PNG))


# --- local files ----------------------------------------------------------------------------------------------
@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    (root / "inside-link.png").symlink_to(root / "sub" / "a.png")
    (root / "escape-link.png").symlink_to(tmp_path / "outside.png")
    (root / "dev-zero").symlink_to("/dev/zero")
    (root / "dir-link").symlink_to(tmp_path)
    os.mkfifo(root / "fifo.png")
    return root


LOCAL_CASES = {
    "a file": ("/data/local-files/?d=sub/a.png", None),
    "a symlink inside": ("/data/local-files/?d=inside-link.png", None),
    "a file:// URI": ("file://{root}/sub/a.png", None),
    "file://localhost/": ("file://localhost{root}/sub/a.png", None),
    "a symlink out": ("/data/local-files/?d=escape-link.png", BadRequest),
    "a symlink to /dev/zero": ("/data/local-files/?d=dev-zero", BadRequest),
    "through a linked folder": ("/data/local-files/?d=dir-link/outside.png", BadRequest),
    "..": ("/data/local-files/?d=sub/../sub/a.png", BadRequest),
    ".. out": ("/data/local-files/?d=../outside.png", BadRequest),
    "percent-encoded ..": ("/data/local-files/?d=%2E%2E/outside.png", BadRequest),
    "a NUL byte": ("/data/local-files/?d=sub/a.png%00.jpg", BadRequest),
    "a raw NUL": ("sub/a.png\x00", BadRequest),
    "file:// with a host": ("file://fileserver/share/a.png", BadRequest),
    "a FIFO": ("/data/local-files/?d=fifo.png", ImageError),
    "a directory": ("/data/local-files/?d=sub", ImageError),
    "missing": ("/data/local-files/?d=sub/none.png", ImageError),
    "/etc/passwd": ("file:///etc/passwd", BadRequest),
}


@pytest.mark.parametrize(("url", "error"), LOCAL_CASES.values(), ids=LOCAL_CASES.keys())
def test_local_files_battery(doc_root, url, error):
    load = loader(document_root=doc_root).load
    url = url.format(root=doc_root)
    started = time.monotonic()
    if error is None:
        assert np.array_equal(load(url).pixels, PIXELS)
    else:
        with pytest.raises(error) as exc:
            load(url)
        assert exc.value.message
    assert time.monotonic() - started <= SLACK_S


def test_a_symlink_swapped_in_after_the_check_is_still_refused(doc_root, monkeypatch):
    """The open descriptor is checked again: a link changed between check and open reads nothing."""
    from fastsam_backend.images.loader import ImageLoader

    monkeypatch.setattr(ImageLoader, "_under_root", lambda self, p: (Path("escape-link.png"), True))
    with pytest.raises(BadRequest, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        loader(document_root=doc_root).load("/data/local-files/?d=escape-link.png")


def test_token_refresh_for_a_setup_hostname_is_vetted_too():
    """A personal access token from /setup is exchanged at /setup's host: that POST is checked as well."""
    import json

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    pat = ".".join([b64({"alg": "HS256"}), b64({"token_type": "refresh", "exp": time.time() + 600}), "c2ln"])
    untrusting = loader(allow="")
    untrusting.set_fallback("http://169.254.169.254:80", pat)
    with pytest.raises(OutboundRefused, match=r"image host 169\.254\.169\.254:80 is a cloud metadata address") as exc:
        untrusting.load("/data/upload/1/a.png")
    assert pat not in str(exc.value)
