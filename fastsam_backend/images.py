"""Fetch and decode a task's image: ``ImageLoader(config).load(url) -> LoadedImage``.

URL forms:
- a path starting with ``/`` (``/data/upload/..``, ``/tasks/<id>/resolve/..``, ...): joined onto
  ``LABEL_STUDIO_URL`` (else the ``/setup`` hostname) and sent with LS credentials; absolute http(s) URLs
  on that host:port get them too, other hosts none (requests drops them on redirects to another host).
- ``/data/local-files/?d=rel``, ``file://`` and plain paths, with ``LOCAL_FILES_DOCUMENT_ROOT`` set: read
  from disk if they resolve (symlinks included) under the root, else ``BadRequest``. Like LS, ``d`` is
  always relative to the root (a leading ``/`` is stripped).
- ``data:`` URIs (base64 or percent-encoded); ``s3://``, ``gs://``, ...: refused with advice.

Credentials: a legacy key goes as ``Token <key>``. A JWT is a personal access token (a refresh token):
exchanged at ``/api/token/refresh/`` once for all threads, the access token cached until its ``exp``,
renewed once on a 401, sent as ``Bearer``; a JWT whose ``token_type`` is ``access`` is sent as is.

Failures raise ``ImageError`` (422) naming the host and the cause, never the query (storage signatures)
nor a credential. An HTTP attempt is bounded by ``timeout_s`` (connect, each read, the whole body);
connection errors and 502/503/504 are tried 3 times with a short backoff, nothing else is retried.
Bodies stop at ``max_bytes``; images over ``max_pixels`` are refused before their pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.cookiejar
import io
import json
import logging
import posixpath
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .errors import BadRequest, ImageError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

_REFRESH_PATH = "/api/token/refresh/"
_EXPIRY_MARGIN_S = 30.0  # renew access tokens this long before their exp
_LOOPBACK_HINT = (" (inside Docker, localhost is the backend's own container: set LABEL_STUDIO_URL to an "
                  "address of Label Studio reachable from the backend)")


@dataclass(frozen=True, eq=False)
class LoadedImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, EXIF orientation applied
    digest: str  # sha256 hex of the raw bytes as fetched (cache key material)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass(frozen=True)
class ImageSourceConfig:
    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    document_root: Path | None = None
    verify_ssl: bool = True
    timeout_s: float = 30.0
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageSourceConfig:
        key = settings.label_studio_api_key
        return cls(settings.label_studio_url, key.get_secret_value() if key else None,
                   settings.local_files_document_root, settings.verify_ssl, settings.download_timeout_s,
                   settings.max_image_bytes, settings.max_image_pixels)


class _Fetched(NamedTuple):
    data: bytes
    source: str  # the origin as messages name it: "host:port", "data URI", "local file 'a.png'"
    content_type: str | None


class _Transient(Exception):
    """An attempt worth repeating (connection error, 502/503/504)."""


class _Unauthorized(Exception):
    """A 401 answered to a cached access token."""


def _base(url: str | None) -> str | None:
    url = (url or "").strip().rstrip("/")
    return (url if "://" in url else "http://" + url) if url else None


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _host(url: str) -> str:
    parts = urlsplit(url)
    return (parts.hostname or "?") + (f":{parts.port}" if parts.port else "")


def _jwt_claims(token: str) -> dict | None:
    """The claims of a well-formed JWT (signature not checked), else None (a legacy key)."""
    pieces = token.split(".")
    if len(pieces) != 3:
        return None
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in pieces[:2])
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(header, dict) and isinstance(claims, dict) else None


def _describe(exc: requests.RequestException, timeout_s: float) -> str:
    """A cause safe to show (requests' own messages carry the URL with its query)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS/SSL error (set VERIFY_SSL=false for a self-signed certificate)"
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc).lower():
        return f"timed out after {timeout_s:g} s"
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def _too_big(source: str, limit: int) -> ImageError:
    return ImageError(f"image from {source} is larger than the limit of {limit} bytes (MAX_IMAGE_BYTES)")


class ImageLoader:
    """Fetches (``fetch_bytes``) and decodes (``load``) task images; one instance serves all threads."""

    def __init__(self, config: ImageSourceConfig, session: requests.Session | None = None) -> None:
        self.config = config
        if session is None:  # pooled; no cookie jar shared between requests
            session = requests.Session()
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=32, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._session = session
        self._lock = threading.Lock()  # guards _fallback
        self._fallback: tuple[str | None, str | None] = (None, None)
        self._refresh_lock = threading.Lock()  # guards _access, held while refreshing
        self._access: dict[tuple[str, str], tuple[str, float]] = {}  # (base, pat) -> (access, expiry)

    def set_fallback(self, hostname: str | None, access_token: str | None) -> None:
        """From /setup: used only when LABEL_STUDIO_URL / API key are unset (thread-safe)."""
        with self._lock:
            self._fallback = (_base(hostname), access_token or None)

    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes behind a task's image URL (raises ImageError / BadRequest)."""
        return self._fetch(url).data

    def load(self, url: str) -> LoadedImage:
        """Fetch and decode; ``digest`` hashes the bytes as fetched."""
        fetched = self._fetch(url)
        return LoadedImage(_decode(fetched, self.config.max_pixels), hashlib.sha256(fetched.data).hexdigest())

    def _credentials(self) -> tuple[str | None, str | None]:
        with self._lock:
            base, key = self._fallback
        return _base(self.config.label_studio_url) or base, self.config.api_key or key

    def _fetch(self, url: str) -> _Fetched:
        url = (url or "").strip()
        if not url:
            raise ImageError("the task has no image URL")
        scheme = urlsplit(url).scheme.lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", url) else ""
        root = self.config.document_root
        if scheme in ("http", "https"):
            return self._http(url)
        if scheme == "data":
            return self._data_uri(url)
        if scheme == "file":
            return self._local(unquote(urlsplit(url).path))
        if scheme:
            raise ImageError(f"cannot read {scheme}:// URLs: let Label Studio serve them (cloud storage with "
                             "'Use pre-signed URLs', or proxied through /tasks/<id>/resolve), or use http(s)")
        if url.startswith("/data/local-files") and root is not None:
            d = (parse_qs(urlsplit(url).query).get("d") or [""])[-1]  # the last one wins, as in Django
            if not d:
                raise BadRequest("Local Storage URL has no ?d= file path")
            return self._local(posixpath.normpath(d).lstrip("/"))
        if not url.startswith("/"):
            return self._local(url)
        if root is not None and "?" not in url and self._under_root(Path(posixpath.normpath(url)))[1]:
            return self._local(url)
        base = self._credentials()[0]
        if base is None:
            also = ", or LOCAL_FILES_DOCUMENT_ROOT" if url.startswith("/data/local-files") else ""
            raise ImageError(f"image URL {urlsplit(url).path!r} is relative to Label Studio but "
                             f"LABEL_STUDIO_URL is not set (nor sent by /setup): set LABEL_STUDIO_URL{also}")
        return self._http(base + url)

    def _data_uri(self, url: str) -> _Fetched:
        head, comma, payload = url[5:].partition(",")
        if not comma:
            raise ImageError("malformed data URI: no ',' before the data")
        if len(payload) * 3 // 4 > self.config.max_bytes + 3:
            raise _too_big("data URI", self.config.max_bytes)
        try:
            if head.lower().endswith(";base64"):
                data = base64.b64decode(re.sub(r"\s+", "", unquote(payload)), validate=True)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"malformed data URI: {exc}") from None
        if len(data) > self.config.max_bytes:
            raise _too_big("data URI", self.config.max_bytes)
        return _Fetched(data, "data URI", head.split(";")[0] or None)

    def _under_root(self, lexical: Path) -> tuple[Path | None, bool]:
        """``lexical`` (normalised, absolute) relative to the root, and whether it is a file under it."""
        root = self.config.document_root
        assert root is not None
        roots = (Path(posixpath.normpath(root.absolute())), root.resolve())
        rel = next((lexical.relative_to(r) for r in roots if lexical.is_relative_to(r)), None)
        inside = rel is not None and lexical.resolve().is_relative_to(roots[1])  # symlinks too
        return (rel if inside else None), inside and lexical.is_file()

    def _local(self, path: str) -> _Fetched:
        """Read a file given relative to LOCAL_FILES_DOCUMENT_ROOT, or absolute under it."""
        root, limit = self.config.document_root, self.config.max_bytes
        if root is None:
            raise ImageError(f"image {path!r} is neither an http(s) nor a Label Studio URL; set "
                             "LOCAL_FILES_DOCUMENT_ROOT to read files from disk")
        lexical = Path(posixpath.normpath(root.absolute() / path))  # root / "/abs" is "/abs"
        rel = self._under_root(lexical)[0]
        if rel is None:
            raise BadRequest(f"local file path {path!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
        label = f"local file {str(rel)!r}"
        try:
            with open(lexical, "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise ImageError(f"{label} not found under LOCAL_FILES_DOCUMENT_ROOT") from None
        except OSError as exc:
            raise ImageError(f"{label} could not be read: {exc.strerror or type(exc).__name__}") from None
        if len(data) > limit:
            raise _too_big(label, limit)
        log.debug("read %s (%d bytes)", label, len(data))
        return _Fetched(data, label, None)

    def _http(self, url: str) -> _Fetched:
        base, key = self._credentials()
        if not (base and key and _host_port(url) == _host_port(base)):
            return self._get(url, {})
        claims = _jwt_claims(key)
        if claims is None or claims.get("token_type") == "access":
            return self._get(url, {"Authorization": ("Token " if claims is None else "Bearer ") + key})
        access = self._access_token(base, key, stale=None)
        try:
            return self._get(url, {"Authorization": "Bearer " + access}, raise_401=True)
        except _Unauthorized:  # revoked or expired early: renew once
            log.info("HTTP 401 from %s with a cached access token; refreshing it", _host(url))
            return self._get(url, {"Authorization": "Bearer " + self._access_token(base, key, stale=access)})

    def _access_token(self, base: str, pat: str, stale: str | None) -> str:
        """Exchange the personal access token for an access token, once for all threads."""
        with self._refresh_lock:
            cached = self._access.get((base, pat))
            if cached and cached[0] != stale and cached[1] > time.time():
                return cached[0]
            host, timeout = _host(base), self.config.timeout_s
            try:
                resp = self._session.post(base + _REFRESH_PATH, json={"refresh": pat}, allow_redirects=False,
                                          timeout=(timeout, timeout), verify=self.config.verify_ssl)
                body = resp.json() if resp.status_code == 200 else None
            except requests.RequestException as exc:  # JSON errors included
                if isinstance(exc, ValueError):
                    body = None
                else:
                    raise ImageError(f"could not refresh the Label Studio token at {host}: "
                                     f"{_describe(exc, timeout)}") from None
            access = body.get("access") if isinstance(body, dict) else None
            if not isinstance(access, str) or not access:
                log.warning("token refresh at %s failed: HTTP %d", host, resp.status_code)
                raise ImageError(f"Label Studio at {host} did not accept the personal access token (HTTP "
                                 f"{resp.status_code} from {_REFRESH_PATH}): check LABEL_STUDIO_API_KEY")
            exp = (_jwt_claims(access) or {}).get("exp")
            expiry = exp - _EXPIRY_MARGIN_S if isinstance(exp, (int, float)) else time.time() + 240
            self._access[(base, pat)] = (access, expiry)
            log.info("refreshed the Label Studio access token at %s", host)
            return access

    def _get(self, url: str, headers: dict[str, str], raise_401: bool = False) -> _Fetched:
        host = _host(url)
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(_Transient), stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.1, max=1.0), reraise=True,
                before_sleep=lambda st: log.warning("%s: %s; retrying", host, st.outcome.exception()),
            ):
                with attempt:
                    return self._attempt(url, headers, host, raise_401)
        except (_Transient, requests.RequestException) as exc:
            cause = str(exc) if isinstance(exc, _Transient) else _describe(exc, self.config.timeout_s)
            if "refused" in cause and urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1"):
                cause += _LOOPBACK_HINT
            log.warning("could not fetch image from %s: %s", host, cause)
            raise ImageError(f"could not fetch image from {host}: {cause}") from None
        raise AssertionError("unreachable")

    def _attempt(self, url: str, headers: dict[str, str], host: str, raise_401: bool) -> _Fetched:
        timeout, limit = self.config.timeout_s, self.config.max_bytes
        started = time.monotonic()
        try:
            resp = self._session.get(url, headers=headers, stream=True, timeout=(timeout, timeout),
                                     verify=self.config.verify_ssl)
        except requests.exceptions.ConnectionError as exc:
            if isinstance(exc, requests.exceptions.SSLError):
                raise
            raise _Transient(_describe(exc, timeout)) from None
        with resp:
            status = resp.status_code
            if _host(resp.url) != host:  # redirected, e.g. /tasks/<id>/resolve -> storage
                host = f"{host} (redirected to {_host(resp.url)})"
            if status in (502, 503, 504):
                raise _Transient(f"HTTP {status}")
            if status == 401 and raise_401:
                raise _Unauthorized()
            if status >= 400:
                hint = " (check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)" if status in (401, 403) else ""
                log.warning("could not fetch image from %s: HTTP %d", host, status)
                raise ImageError(f"could not fetch image from {host}: HTTP {status}{hint}")
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_big(host, limit)
            chunks, size = [], 0
            try:
                for chunk in resp.iter_content(64 * 1024):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise _too_big(host, limit)
                    if time.monotonic() - started > timeout:
                        raise ImageError(f"could not fetch image from {host}: timed out after {timeout:g} s")
            except requests.exceptions.ChunkedEncodingError:
                raise _Transient("connection broken while reading the body") from None
        log.debug("fetched image from %s: HTTP %d, %d bytes, %.0f ms", host, status, size,
                  (time.monotonic() - started) * 1000)
        return _Fetched(b"".join(chunks), host, resp.headers.get("Content-Type"))


def _decode(fetched: _Fetched, max_pixels: int) -> np.ndarray:
    """Bytes -> ``(H, W, 3)`` uint8 RGB, EXIF orientation applied; pixel count checked before decoding."""
    try:
        with _pillow_open()(io.BytesIO(fetched.data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image from {fetched.source} is {width}x{height}, over the limit of "
                                 f"{max_pixels} pixels (MAX_IMAGE_PIXELS)")
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception as exc:  # a broken EXIF block should not lose the image
                log.warning("ignoring unreadable EXIF in image from %s: %s", fetched.source, exc)
                upright = image
            return _to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image from {fetched.source} is too large to decode safely") from None
    except UnidentifiedImageError:
        cause = f"not a recognised image format ({len(fetched.data)} bytes"
        cause += f" of {fetched.content_type})" if fetched.content_type else ")"
    except Exception as exc:  # Pillow raises many types on corrupt data
        cause = f"{type(exc).__name__}: {exc}"
    log.warning("could not decode image from %s (%d bytes): %s", fetched.source, len(fetched.data), cause)
    raise ImageError(f"could not decode image from {fetched.source}: {cause}")


def _pillow_open():
    """Pillow's own ``Image.open``. Importing ultralytics replaces it process-wide with a wrapper
    that, on bytes Pillow cannot identify, tries to pip-install pi-heif: never on our request path."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and Image.open is getattr(patches, "image_open", None):
        return getattr(patches, "_image_open", Image.open)
    return Image.open


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer and float greyscale
        grey = np.asarray(image).astype(np.float32)
        if image.mode.startswith("I;16") or (image.mode == "I" and grey.max(initial=0) > 255):
            grey /= 257.0  # 16-bit range onto 8-bit
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA", "La"):  # palette transparency, premultiplied alpha
        image = image.convert("RGBA")
    return np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
