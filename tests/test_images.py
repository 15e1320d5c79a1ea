"""``fastsam_backend.images.loader``: fetching (HTTP, LS auth, data URIs, local files) and decoding.

Every HTTP request goes to servers on 127.0.0.1 started here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastsam_backend.errors import BadRequest, ImageError
from fastsam_backend.images.loader import ImageLoader, ImageSourceConfig
from fastsam_backend.outbound import AllowList
from tests.conftest import TEST_OUTBOUND_ALLOW

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def make_jwt(token_type: str, exp: float, jti: str = "x") -> str:
    return ".".join([_b64({"alg": "HS256", "typ": "JWT"}),
                     _b64({"token_type": token_type, "exp": int(exp), "jti": jti}), "c2lnbmF0dXJl"])


def no_dns(host, *args, **kwargs):
    """The machine has loopback only: a test must never ask a real resolver."""
    raise AssertionError(f"a test looked up {host!r} in DNS")


PAT = make_jwt("refresh", time.time() + 86400, "pat")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


PNG = encode(Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3)), "PNG")


def exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())


class FakeLabelStudio:
    """State shared by the handler threads: what to serve and what was asked."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hits: dict[str, int] = {}
        self.refresh_calls = 0
        self.access_serial = 0
        self.access_exp_s = 300.0
        self.valid_auth = {f"Token {LEGACY_KEY}"}
        self.redirect_to = ""
        self.reject_all = False
        self.stop = threading.Event()
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may have given up (timeout test)
            self.wfile.write(body)

    def do_POST(self) -> None:
        state: FakeLabelStudio = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/api/token/refresh":
            return self._send(404, b"{}", "application/json")
        with state.lock:
            state.refresh_calls += 1
            if body.get("refresh") != PAT:
                return self._send(401, b'{"detail": "Token is invalid"}', "application/json")
            state.access_serial += 1
            access = make_jwt("access", time.time() + state.access_exp_s, f"a{state.access_serial}")
            state.valid_auth = {f"Bearer {access}"}
        self._send(200, json.dumps({"access": access}).encode(), "application/json")

    def do_GET(self) -> None:
        state: FakeLabelStudio = self.server.state
        path = urllib.parse.urlsplit(self.path).path
        with state.lock:
            state.requests.append((self.path, dict(self.headers)))
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            hits = state.hits[self.path]
        if path in ("/img.png", "/data/upload/1/img.png"):
            return self._send(200, PNG)
        if path == "/exif.jpg":
            return self._send(200, exif_jpeg(), "image/jpeg")
        if path.startswith("/private/") or path.startswith("/tasks/"):
            if state.reject_all or self.headers.get("Authorization") not in state.valid_auth:
                return self._send(401, b'{"detail": "Authentication credentials were not provided."}',
                                  "application/json")
            if path.startswith("/tasks/"):  # like /tasks/<id>/resolve: redirect to storage
                self.send_response(303)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self._send(200, PNG)
        if path == "/slow":
            state.stop.wait(2.0)
            return self._send(200, PNG)
        if path == "/big":
            return self._send(200, b"\0" * 5000, length="nolength" not in self.path)
        if path == "/garbage":
            return self._send(200, b"<html>please log in</html>", "text/html")
        if path == "/flaky":  # 503 twice, then the image
            return self._send(503, b"busy", "text/plain") if hits <= 2 else self._send(200, PNG)
        if path == "/down":
            return self._send(502, b"bad gateway", "text/plain")
        self._send(404, b"not found", "text/plain")


def _serve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.state = FakeLabelStudio()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def servers():
    pair = [_serve(), _serve()]
    yield pair
    for server in pair:
        server.state.stop.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def ls(servers):
    """The fake Label Studio: base URL and fresh state for each test."""
    server = servers[0]
    server.state = FakeLabelStudio()
    return f"http://127.0.0.1:{server.server_address[1]}", server.state


@pytest.fixture
def other(servers):
    """Another host (a storage bucket, an arbitrary web server)."""
    server = servers[1]
    server.state = FakeLabelStudio()
    return f"http://127.0.0.1:{server.server_address[1]}", server.state


def make_loader(ls_url=None, key=None, **overrides) -> ImageLoader:
    """Both test servers listen on 127.0.0.1: allowed (OUTBOUND_ALLOW), the policy otherwise on."""
    overrides.setdefault("timeout_s", 2.0)
    overrides.setdefault("outbound_allow", AllowList.parse(TEST_OUTBOUND_ALLOW))
    config = ImageSourceConfig(label_studio_url=ls_url, api_key=key, **overrides)
    return ImageLoader(config, resolve=no_dns)


def assert_no_secret(exc: pytest.ExceptionInfo, caplog, *secrets: str) -> None:
    """Neither the message nor our log lines (urllib3's own DEBUG lines do show URLs) leak secrets."""
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("fastsam_backend")]
    text = str(exc.value) + "\n".join(ours)
    for secret in secrets:
        assert secret not in text
    assert "Authorization" not in text


# --- HTTP ---------------------------------------------------------------------------------------------
def test_png_relative_url_with_legacy_token(ls):
    url, state = ls
    image = make_loader(url, LEGACY_KEY).load("/private/a.png?sig=1")
    assert image.pixels.shape == (40, 60, 3) and image.pixels.dtype == np.uint8
    assert image.size == (40, 60)
    assert image.digest == hashlib.sha256(PNG).hexdigest()
    assert state.requests[-1][1]["Authorization"] == f"Token {LEGACY_KEY}"


def test_exif_orientation_is_applied(ls):
    url, _ = ls
    image = make_loader(url).load(url + "/exif.jpg")
    assert image.size == (40, 20)  # stored 40 wide x 20 high, displayed rotated
    assert abs(int(image.pixels[..., 0].mean()) - 200) < 10


def test_absolute_ls_url_gets_auth_other_hosts_do_not(ls, other):
    url, state = ls
    other_url, other_state = other
    loader = make_loader(url, LEGACY_KEY)
    loader.load(url + "/private/b.png")
    assert state.requests[-1][1]["Authorization"] == f"Token {LEGACY_KEY}"
    loader.load(other_url + "/img.png")  # same IP, another port: another host
    assert "Authorization" not in other_state.requests[-1][1]


def test_redirect_to_storage_drops_authorization(ls, other):
    url, state = ls
    other_url, other_state = other
    state.redirect_to = other_url + "/img.png?X-Amz-Signature=abc"
    image = make_loader(url, LEGACY_KEY).load("/tasks/7/resolve/?fileuri=czM6Ly9i")
    assert image.size == (40, 60)
    assert "Authorization" not in other_state.requests[-1][1]


def test_wrong_token_401_names_host_and_status_not_token(ls, caplog):
    url, state = ls
    bad = "f" * 40
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageError) as exc:
        make_loader(url, bad).load("/private/c.png?X-Amz-Signature=topsecret")
    assert exc.value.status == 422
    assert "401" in str(exc.value) and "127.0.0.1" in str(exc.value)
    assert_no_secret(exc, caplog, bad, "topsecret")
    assert state.hits["/private/c.png?X-Amz-Signature=topsecret"] == 1  # 4xx is not retried


def test_404(ls, caplog):
    url, state = ls
    with pytest.raises(ImageError, match="HTTP 404") as exc:
        make_loader(url, LEGACY_KEY).load("/data/upload/1/missing.png")
    assert_no_secret(exc, caplog, LEGACY_KEY)
    assert state.hits["/data/upload/1/missing.png"] == 1


def test_timeout_is_fast_and_not_retried(ls):
    url, state = ls
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        make_loader(url, timeout_s=0.5).load("/slow")
    assert time.monotonic() - started < 1.5
    assert state.hits["/slow"] == 1


@pytest.mark.parametrize("path", ["/big", "/big?nolength"])
def test_size_limit(ls, path):
    url, _ = ls
    with pytest.raises(ImageError, match="limit of 1000 bytes"):
        make_loader(url, max_bytes=1000).fetch_bytes(path)
    assert len(make_loader(url, max_bytes=5000).fetch_bytes(path)) == 5000


def test_garbage_bytes(ls):
    url, _ = ls
    with pytest.raises(ImageError, match=r"could not decode image from 127\.0\.0\.1:\d+: .*text/html"):
        make_loader(url).load("/garbage")


def test_503_is_retried(ls):
    url, state = ls
    assert make_loader(url).load("/flaky").size == (40, 60)
    assert state.hits["/flaky"] == 3


def test_502_gives_up_after_three_attempts(ls):
    url, state = ls
    with pytest.raises(ImageError, match="HTTP 502"):
        make_loader(url).load("/down")
    assert state.hits["/down"] == 3


def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageError, match="refused") as exc:
        make_loader(f"http://127.0.0.1:{port}", LEGACY_KEY).load("/data/upload/1/x.png?sig=s3cr3t")
    assert f"127.0.0.1:{port}" in str(exc.value) and "s3cr3t" not in str(exc.value)


def test_relative_url_without_label_studio_url():
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        make_loader().load("/data/upload/1/img.png")


def test_setup_fallback_used_only_when_unset(ls, other):
    url, state = ls
    loader = make_loader()
    loader.set_fallback(url + "/", LEGACY_KEY)
    assert loader.load("/private/d.png").size == (40, 60)
    assert state.requests[-1][1]["Authorization"] == f"Token {LEGACY_KEY}"
    # LABEL_STUDIO_URL set, key unset: the /setup token goes to LABEL_STUDIO_URL (LS often reports
    # http://localhost:8080, which is wrong from another container; the token is still its token)
    other_url, other_state = other
    configured = make_loader(other_url)
    configured.set_fallback(url, "e" * 40)
    configured.load("/img.png")
    assert other_state.hits["/img.png"] == 1
    assert other_state.requests[-1][1]["Authorization"] == f"Token {'e' * 40}"
    # both set: the /setup values are ignored
    both = make_loader(url, LEGACY_KEY)
    both.set_fallback(other_url, "e" * 40)
    both.load("/private/d.png")
    assert state.requests[-1][1]["Authorization"] == f"Token {LEGACY_KEY}"


# --- personal access tokens ---------------------------------------------------------------------------
def test_pat_is_refreshed_once_and_sent_as_bearer(ls):
    url, state = ls
    loader = make_loader(url, PAT)
    for _ in range(3):
        loader.load("/private/e.png")
    assert state.refresh_calls == 1
    auth = state.requests[-1][1]["Authorization"]
    assert auth.startswith("Bearer ") and auth != f"Bearer {PAT}"


def test_pat_refresh_is_shared_between_threads(ls):
    url, state = ls
    loader = make_loader(url, PAT)
    errors = []

    def work():
        try:
            loader.fetch_bytes("/private/f.png")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and state.refresh_calls == 1


def test_pat_401_refreshes_once_and_retries(ls):
    url, state = ls
    loader = make_loader(url, PAT)
    loader.load("/private/g.png")
    state.valid_auth = set()  # the server revoked the access token
    loader.load("/private/g.png")
    assert state.refresh_calls == 2
    loader.load("/private/g.png")  # the new token is cached
    assert state.refresh_calls == 2
    state.reject_all = True
    with pytest.raises(ImageError, match="401"):
        loader.load("/private/g.png")
    assert state.refresh_calls == 3  # once more, not in a loop


def test_expired_access_token_is_refreshed(ls):
    url, state = ls
    state.access_exp_s = 5  # under the renewal margin: stale at once
    loader = make_loader(url, PAT)
    loader.load("/private/h.png")
    loader.load("/private/h.png")
    assert state.refresh_calls == 2


def test_rejected_pat_error_hides_token(ls, caplog):
    url, _ = ls
    bad = make_jwt("refresh", time.time() + 3600, "revoked")
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageError, match="personal access token") as exc:
        make_loader(url, bad).load("/private/i.png")
    assert "401" in str(exc.value)
    assert_no_secret(exc, caplog, bad)


def test_access_jwt_is_sent_directly(ls):
    url, state = ls
    access = make_jwt("access", time.time() + 600, "direct")
    state.valid_auth = {f"Bearer {access}"}
    make_loader(url, access).load("/private/j.png")
    assert state.refresh_calls == 0


def test_config_repr_hides_key():
    assert LEGACY_KEY not in repr(ImageSourceConfig(api_key=LEGACY_KEY))


# --- data URIs, other schemes -------------------------------------------------------------------------
def test_data_uri_base64_and_percent_encoded():
    loader = make_loader()
    b64 = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert loader.load(b64).size == (40, 60)
    assert loader.load(b64).digest == hashlib.sha256(PNG).hexdigest()
    assert loader.load("data:image/png," + urllib.parse.quote_from_bytes(PNG)).size == (40, 60)
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME line wrapping
    quoted = urllib.parse.quote(encoded, safe="")  # '+', '/' and '=' percent-encoded
    for payload in (wrapped, quoted, " " + wrapped + "\r\n"):
        assert loader.load("data:image/png;base64," + payload).digest == hashlib.sha256(PNG).hexdigest()


def test_bad_and_oversized_data_uri():
    with pytest.raises(ImageError, match="malformed"):
        make_loader().load("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="limit"):
        make_loader(max_bytes=100).load("data:image/png;base64," + base64.b64encode(PNG).decode())


@pytest.mark.parametrize("url", ["s3://bucket/a.png", "gs://bucket/a.png", "azure-blob://c/a.png"])
def test_cloud_scheme_explains(url):  # fetched through Label Studio: tests/test_cloud_images.py
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        make_loader().load(url)


def test_other_schemes_are_refused():
    with pytest.raises(ImageError, match=r"cannot read ftp:// URLs.*s3://"):
        make_loader().load("ftp://host/a.png")


# --- local files ----------------------------------------------------------------------------------------
@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "b c.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root


def test_local_files_read_from_disk(doc_root):
    loader = make_loader(document_root=doc_root)  # no LS URL: any HTTP attempt would fail
    assert loader.load("/data/local-files/?d=sub/b%20c.png").size == (40, 60)
    assert loader.load("/data/local-files/?d=/sub/b%20c.png").size == (40, 60)  # LS strips the "/"
    assert loader.load((doc_root / "sub" / "b c.png").as_uri()).size == (40, 60)
    assert loader.load(str(doc_root / "sub" / "b c.png")).size == (40, 60)
    assert loader.load("sub/b c.png").size == (40, 60)


@pytest.mark.parametrize("url", [
    "/data/local-files/?d=../secret.png",
    "/data/local-files/?d=sub/../../secret.png",
    "/data/local-files/?d=link.png",  # a symlink leading out
    "../secret.png",
    "file:///etc/hostname",
])
def test_local_files_escapes_refused(doc_root, url):
    with pytest.raises(BadRequest):
        make_loader(document_root=doc_root).load(url)


def test_local_files_missing_and_absolute_d(doc_root):
    loader = make_loader(document_root=doc_root)
    with pytest.raises(ImageError, match="not found"):
        loader.load("/data/local-files/?d=/etc/hostname")  # means <root>/etc/hostname, like LS
    with pytest.raises(ImageError, match="limit"):
        make_loader(document_root=doc_root, max_bytes=10).load("/data/local-files/?d=sub/b%20c.png")


def test_local_paths_need_a_document_root():
    with pytest.raises(ImageError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        make_loader().load("file:///etc/hostname")


# --- decoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "CMYK"])
def test_modes_convert_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(Image.new(mode, (5, 3)), fmt)
    pixels = make_loader().load("data:;base64," + base64.b64encode(data).decode()).pixels
    assert pixels.shape == (3, 5, 3) and pixels.dtype == np.uint8


def test_16_bit_greyscale_is_scaled():
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(grey), "PNG")
    pixels = make_loader().load("data:image/png;base64," + base64.b64encode(data).decode()).pixels
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_pixel_limit():
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        make_loader(max_pixels=1000).load("data:image/png;base64," + base64.b64encode(PNG).decode())


def test_config_from_settings(tmp_path):
    from fastsam_backend.settings import load_settings

    settings = load_settings(
        LABEL_STUDIO_URL="http://127.0.0.1:1", LABEL_STUDIO_API_KEY=LEGACY_KEY, verify_ssl=False,
        local_files_document_root=str(tmp_path), download_timeout_s=3, max_image_bytes=10,
        max_image_pixels=20,
    )
    config = ImageSourceConfig.from_settings(settings)
    assert config == ImageSourceConfig("http://127.0.0.1:1", LEGACY_KEY, tmp_path, False, 3.0, 10, 20)
    allowing = ImageSourceConfig.from_settings(load_settings(OUTBOUND_ALLOW="10.0.0.0/8, minio:9000",
                                                             OUTBOUND_MAX_REDIRECTS=2))
    assert allowing.outbound_allow == AllowList.parse("10.0.0.0/8 minio:9000") and allowing.max_redirects == 2


@pytest.mark.model  # imports ultralytics, so torch
def test_ultralytics_pil_patch_does_not_reach_decoding():
    """Importing ultralytics (as loading the model does) swaps PIL.Image.open for a wrapper that
    tries to pip-install pi-heif on unknown bytes; our decoding must not go through it."""
    import ultralytics.utils.patches  # noqa: F401

    with pytest.raises(ImageError, match="not a recognised image format"):
        ImageLoader(ImageSourceConfig()).load("data:text/plain;base64,aGVsbG8gd29ybGQ=")
