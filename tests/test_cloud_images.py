"""Cloud storage images (``s3://``, ``gs://``, ``azure-blob://``) through a fake Label Studio resolve
endpoint, as ``io_storages/proxy_api.py`` answers it: 303 to a presigned URL on a storage host
(presign on) or the bytes streamed (presign off), and its 401/403/404/424. The real Label Studio
with an S3-compatible server is in ``tests/real_ls/test_cloud_storage.py``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastsam_backend.errors import ImageError
from fastsam_backend.images.cloud import ImageRef, as_task_id, cloud_scheme, resolve_path
from fastsam_backend.images.loader import ImageLoader, ImageSourceConfig
from fastsam_backend.outbound import AllowList, OutboundRefused
from tests.conftest import TEST_OUTBOUND_ALLOW
from tests.test_images import LEGACY_KEY, PAT, PNG, make_jwt, no_dns

URIS = {"s3": "s3://bucket/images/a b.png", "gs": "gs://bucket/images/a.png",
        "azure-blob": "azure-blob://container/images/a.png"}


@dataclass
class Cloud:
    """The fake's state: tasks (id -> project), projects' storages (URI prefix -> presign?), objects."""

    storage_base: str = ""
    tasks: dict[int, int] = field(default_factory=lambda: {7: 1, 8: 2})
    storages: dict[str, bool] = field(default_factory=dict)  # prefix -> presign, for project 1
    objects: dict[str, bytes] = field(default_factory=dict)  # "bucket/key" -> bytes (the storage host's)
    allowed_projects: set[int] = field(default_factory=lambda: {1})
    valid_auth: set[str] = field(default_factory=lambda: {f"Token {LEGACY_KEY}"})
    truncate_to: int | None = None  # presign off: stream this many bytes of a longer Content-Length
    storage_status: int | None = None  # the storage host answers this instead of the object
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (who, path, headers)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _object_key(uri: str) -> str:
    return uri.split("://", 1)[1]


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def do_POST(self) -> None:  # the personal access token's exchange
        state: Cloud = self.server.state
        import json

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/api/token/refresh" or body.get("refresh") != PAT:
            return self._send(401, b"{}")
        access = make_jwt("access", 4102444800, "a1")
        with state.lock:
            state.valid_auth = {f"Bearer {access}"}
        self._send(200, json.dumps({"access": access}).encode())

    def do_GET(self) -> None:
        state: Cloud = self.server.state
        role = self.server.role
        with state.lock:
            state.requests.append((role, self.path, dict(self.headers)))
        parts = urllib.parse.urlsplit(self.path)
        if role == "storage":
            if state.storage_status is not None:
                return self._send(state.storage_status, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
            found = state.objects.get(urllib.parse.unquote(parts.path.lstrip("/")))
            if found is None:
                return self._send(404, b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>", "application/xml")
            return self._send(200, found, "image/png")
        pieces = parts.path.strip("/").split("/")  # tasks/<id>/resolve
        if len(pieces) != 3 or pieces[0] != "tasks" or pieces[2] not in ("resolve", "presign"):
            return self._send(404)
        if self.headers.get("Authorization") not in state.valid_auth:
            return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
        task = state.tasks.get(int(pieces[1]))
        if task is None:
            return self._send(404)
        if task not in state.allowed_projects:
            return self._send(403)
        fileuri = base64.urlsafe_b64decode(urllib.parse.parse_qs(parts.query)["fileuri"][0]).decode()
        presign = next((p for prefix, p in state.storages.items() if fileuri.startswith(prefix)), None)
        if presign is None:
            return self._send(404)  # get_storage_by_url found no storage
        key = _object_key(fileuri)
        if presign:
            self.send_response(303)
            self.send_header("Location", f"{state.storage_base}/{urllib.parse.quote(key)}?X-Amz-Signature=s3cr3t")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = state.objects.get(key)
        if data is None:
            return self._send(424, b'{"error": "Storage stream failed while proxying data"}')
        if state.truncate_to is not None:  # LS's time-limited chunker: 200, the full length, part of the body
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: state.truncate_to])
            self.close_connection = True
            return
        self._send(200, data, "image/png")


def _serve(role: str, state: Cloud) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads, server.role, server.state = True, role, state
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers():
    pair = [_serve("ls", Cloud()), _serve("storage", Cloud())]
    yield pair
    for server in pair:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cloud(servers):
    """``(label studio URL, state)``: a fresh state shared by the fake Label Studio and the storage host."""
    ls, storage = servers
    state = Cloud(storage_base=f"http://127.0.0.1:{storage.server_address[1]}")
    ls.state = storage.state = state
    return f"http://127.0.0.1:{ls.server_address[1]}", state


def loader(ls_url, key=LEGACY_KEY, allow=TEST_OUTBOUND_ALLOW, **overrides) -> ImageLoader:
    overrides.setdefault("timeout_s", 3.0)
    config = ImageSourceConfig(label_studio_url=ls_url, api_key=key, outbound_allow=AllowList.parse(allow),
                               **overrides)
    return ImageLoader(config, resolve=no_dns)


def _store(state: Cloud, uri: str, presign: bool, data: bytes = PNG) -> None:
    state.storages[uri.split("/images/")[0]] = presign
    state.objects[_object_key(uri)] = data


# --- the happy paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(URIS))
@pytest.mark.parametrize("presign", [True, False], ids=["presign", "proxied"])
def test_cloud_uri_is_fetched_through_label_studio_resolve(cloud, scheme, presign):
    url, state = cloud
    uri = URIS[scheme]
    _store(state, uri, presign)
    image = loader(url).load(ImageRef(uri, 7))
    assert image.digest == hashlib.sha256(PNG).hexdigest() and image.size == (40, 60)
    ls_calls = [r for r in state.requests if r[0] == "ls"]
    assert len(ls_calls) == 1
    path, headers = ls_calls[0][1:]
    assert path == resolve_path(uri, 7) and path.startswith("/tasks/7/resolve/?fileuri=")
    assert base64.urlsafe_b64decode(urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["fileuri"][0]) \
        == uri.encode()
    assert headers["Authorization"] == f"Token {LEGACY_KEY}"
    storage_calls = [r for r in state.requests if r[0] == "storage"]
    assert len(storage_calls) == (1 if presign else 0)
    if presign:  # the 303's target is another host: the token stays behind
        assert "Authorization" not in storage_calls[0][2]


def test_personal_access_token_is_exchanged_and_sent_as_bearer(cloud):
    url, state = cloud
    _store(state, URIS["s3"], presign=True)
    assert loader(url, key=PAT).load(ImageRef(URIS["s3"], 7)).digest == hashlib.sha256(PNG).hexdigest()
    ls_calls = [r for r in state.requests if r[0] == "ls"]
    assert ls_calls[-1][2]["Authorization"].startswith("Bearer ")


def test_memo_key_is_the_uri_within_one_label_studio(cloud):
    url, _ = cloud
    one, other = loader(url), loader("http://127.0.0.1:1")
    uri = URIS["gs"]
    assert one.memo_key(ImageRef(uri, 7)) == one.memo_key(ImageRef(uri, 8)) == one.memo_key(uri)
    assert one.memo_key(uri) != other.memo_key(uri)
    assert uri in one.memo_key(uri) and "resolve" not in one.memo_key(uri)
    assert one.memo_key("http://h/a.png") == "http://h/a.png"  # other URLs: as before


# --- truncation and errors naming their fix --------------------------------------------------------------
def test_a_truncated_proxied_stream_is_named_and_not_retried(cloud):
    url, state = cloud
    _store(state, URIS["s3"], presign=False)
    state.truncate_to = len(PNG) // 2
    with pytest.raises(ImageError, match=rf"truncated: the stream ended after {len(PNG) // 2} of {len(PNG)} "
                                         r"bytes.*RESOLVER_PROXY_TIMEOUT.*pre-signed"):
        loader(url).load(ImageRef(URIS["s3"], 7))
    assert len([r for r in state.requests if r[0] == "ls"]) == 1  # a retry would be cut again


@pytest.mark.parametrize("case, fix", [
    ("bad token", r"HTTP 401; Label Studio refused the token: check LABEL_STUDIO_API_KEY"),
    ("other project", r"HTTP 403; the token's user may not see this task"),
    ("no such task", r"HTTP 404; Label Studio has no such task, or none of the project's source storages"),
    ("no storage", r"HTTP 404; .*add the bucket \(and prefix\) as the project's source storage"),
    ("missing object, proxied", r"HTTP 424; Label Studio could not read the object from the storage"),
    ("missing object, presigned", r"storage host: .*HTTP 404 NoSuchKey; the object is missing from the bucket"),
    ("storage denies", r"from the storage host: .*HTTP 403 AccessDenied; the storage refused the pre-signed URL: "
                       r"the object may be missing \(S3 answers 403"),
])
def test_errors_name_their_fix(cloud, case, fix):
    url, state = cloud
    uri, task, key = URIS["s3"], 7, LEGACY_KEY
    presign = "presigned" in case or case == "storage denies"
    _store(state, uri, presign)
    if case == "bad token":
        key = "f" * 40
    elif case == "other project":
        task = 8
    elif case == "no such task":
        task = 99
    elif case == "no storage":
        state.storages.clear()
    elif case.startswith("missing object"):
        state.objects.clear()
    elif case == "storage denies":
        state.storage_status = 403
    with pytest.raises(ImageError, match=fix) as exc:
        loader(url, key=key).load(ImageRef(uri, task))
    assert exc.value.status == 422
    assert "s3cr3t" not in exc.value.message  # the presigned URL's signature is never shown
    reason = exc.value.reason
    assert reason and uri in reason and reason.encode("latin-1")  # what LS shows: the status line


def test_a_refused_storage_host_says_outbound_allow(cloud):
    url, state = cloud
    _store(state, URIS["s3"], presign=True)
    with pytest.raises(OutboundRefused, match=r"storage host.*loopback.*OUTBOUND_ALLOW=<host:port>") as exc:
        loader(url, allow="").load(ImageRef(URIS["s3"], 7))  # LABEL_STUDIO_URL's host:port is exempt, the bucket not
    assert exc.value.status == 403
    assert not [r for r in state.requests if r[0] == "storage"]


@pytest.mark.parametrize("ls_url, key, ref, fix", [
    (None, LEGACY_KEY, ImageRef(URIS["s3"], 7), "set LABEL_STUDIO_URL"),
    ("http://127.0.0.1:9", None, ImageRef(URIS["s3"], 7), "set LABEL_STUDIO_API_KEY"),
    ("http://127.0.0.1:9", LEGACY_KEY, URIS["azure-blob"], r"no task id came with it.*--task ID"),
])
def test_what_is_missing_to_ask_label_studio_is_named(ls_url, key, ref, fix):
    with pytest.raises(ImageError, match=fix):
        loader(ls_url, key=key).load(ref)


def test_setup_fallback_serves_cloud_images_too(cloud):
    url, state = cloud
    _store(state, URIS["gs"], presign=False)
    images = loader(None, key=None)
    images.set_fallback(url, LEGACY_KEY)
    assert images.load(ImageRef(URIS["gs"], 7)).digest == hashlib.sha256(PNG).hexdigest()


def test_label_studio_s_resolve_paths_are_read_as_the_uri(cloud):
    """Label Studio's API (so the SDK's tasks: preannotate, train) shows a cloud URI as its resolve path."""
    url, state = cloud
    _store(state, URIS["s3"], presign=True)
    images = loader(url)
    path = resolve_path(URIS["s3"], 7)
    assert images.load(path).digest == hashlib.sha256(PNG).hexdigest()
    assert images.memo_key(path) == images.memo_key(URIS["s3"])
    state.objects.clear()
    with pytest.raises(ImageError, match="HTTP 404 NoSuchKey; the object is missing"):
        images.load(path.replace("/resolve/", "/presign/"))
    assert images.memo_key("/tasks/7/resolve/?fileuri=" + base64.urlsafe_b64encode(b"/etc/x").decode()) \
        .startswith("/tasks/")  # not a cloud URI: left as it is


def test_refs_and_task_ids():
    assert cloud_scheme("S3://b/k") == "s3" and cloud_scheme("azure-blob://c/k") == "azure-blob"
    assert cloud_scheme("https://b/k") is None and cloud_scheme("/data/upload/1/a.png") is None
    assert as_task_id("12") == 12 and as_task_id(3) == 3
    assert as_task_id(None) is as_task_id("x") is as_task_id(True) is as_task_id(-1) is None
    assert ImageRef.of("s3://b/k", "5") == ImageRef("s3://b/k", 5)
    ref = ImageRef("s3://b/k", 5)
    assert ImageRef.of(ref, 9) is ref
