"""HTTP(S) requests for task images: one total deadline, redirects followed by hand, every hop vetted.

``Downloader.request(method, url)`` vets the URL (``outbound.OutboundPolicy``), connects to the
vetted address itself (urllib3 connections whose socket goes to that address, while the Host
header, TLS SNI and certificate checks keep the URL's host name), and follows up to
``max_redirects`` redirects, vetting each target again. Headers the caller passes (credentials)
go only to the first hop's host:port and are dropped for good once a redirect leaves it.

Deadline: ``timeout_s`` bounds the whole request (name resolution, connect, TLS, headers, body,
redirects and retries together). A watchdog timer shuts the socket down when it passes, which
returns a read that is blocked on a server that sends nothing or drips a byte at a time (a
socket timeout alone restarts with every byte); each read also gets the remaining time as its
socket timeout. Bodies are read in small pieces and stop at ``max_bytes``.

Connection errors, a connection dropped mid-body and HTTP 502/503/504 are tried ``attempts``
times with a short backoff while time is left; nothing else is retried. Proxies from the
environment are not used: a proxy would resolve the host itself, out of the policy's sight.
"""

from __future__ import annotations

import functools
import http.client
import os
import socket
import ssl
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from urllib.parse import urljoin

import certifi
import urllib3
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_before_delay, wait_exponential
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.ssl_ import create_urllib3_context

from fastsam_backend.errors import BackendError
from fastsam_backend.outbound import OutboundPolicy, Target, UrlParts, split_url

REDIRECTS = {301, 302, 303, 307, 308}
TRANSIENT_STATUSES = {502, 503, 504}
_CHUNK = 64 * 1024
_HEADERS = {"User-Agent": "fastsam-backend", "Accept": "image/*, */*;q=0.5",
            "Accept-Encoding": "identity"}  # images are compressed already; no gzip bombs to expand


@dataclass(frozen=True)
class Reply:
    status: int
    data: bytes  # the body of a 2xx answer, empty otherwise
    content_type: str | None
    source: str  # "host[:port]", or "first (redirected to last)"
    credentials_sent: bool  # whether the caller's headers went with the last hop
    redirected: bool = False  # the answer came from a redirect's target, not the first host
    error_body: bytes = b""  # the start of a non-2xx answer's body, when the caller asked for it


class FetchError(Exception):
    """A transport failure; ``cause`` is safe to show (no URL path, query or header)."""

    def __init__(self, source: str, cause: str, *, transient: bool = False, received: int | None = None,
                 expected: int | None = None, redirected: bool = False) -> None:
        super().__init__(f"{source}: {cause}")
        self.source, self.cause, self.transient = source, cause, transient
        # a body cut short: bytes received of the Content-Length declared (None where unknown)
        self.received, self.expected, self.redirected = received, expected, redirected

    @property
    def truncated(self) -> bool:
        return self.expected is not None and self.received is not None and self.received < self.expected


class _Retry(Exception):
    def __init__(self, outcome: FetchError | Reply) -> None:
        super().__init__(outcome.cause if isinstance(outcome, FetchError) else f"HTTP {outcome.status}")
        self.outcome = outcome


def _connect(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to an already vetted address (never a name: no second DNS lookup)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Pinned:
    """Mixin for urllib3's connections: the socket goes to ``address``; ``host`` is still what
    the Host header, SNI and certificate matching use."""

    def __init__(self, *args, address: str, on_socket, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._address, self._on_socket = address, on_socket

    def _new_conn(self) -> socket.socket:
        sock = _connect(self._address, self.port, self.timeout)
        self._on_socket(sock)
        return sock


class _PinnedHTTP(_Pinned, HTTPConnection):
    pass


class _PinnedHTTPS(_Pinned, HTTPSConnection):
    pass


class _Watchdog:
    """Shuts the watched socket down at ``deadline``; ``fired`` tells reads that ended early why."""

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            self.fired, sock = True, self._sock
        if sock is not None:
            with suppress(OSError):  # socket.socket's own shutdown: an SSLSocket's drops its TLS state
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


@functools.lru_cache(maxsize=4)
def _verifying_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """certifi's roots (what requests used) plus the system's (``SSL_CERT_FILE``/``_DIR``: a company
    CA), built once per process and system store: loading the roots takes ~70 ms, and a context
    serves any number of connections and threads."""
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.load_verify_locations(certifi.where())
    context.load_default_certs()  # reads SSL_CERT_FILE / SSL_CERT_DIR, the cache key
    return context


class Downloader:
    """Thread-safe; one per ``ImageLoader``."""

    def __init__(self, policy: OutboundPolicy, *, timeout_s: float, max_bytes: int, verify_ssl: bool = True,
                 max_redirects: int = 5, attempts: int = 3) -> None:
        self.policy, self.timeout_s, self.max_bytes = policy, timeout_s, max_bytes
        self.max_redirects, self.attempts, self.verify_ssl = max_redirects, attempts, verify_ssl
        self._tls: dict = {"cert_reqs": "CERT_NONE"}
        if verify_ssl:
            context = _verifying_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
            self._tls = {"cert_reqs": "CERT_REQUIRED", "ssl_context": context}

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
                max_redirects: int | None = None, retry_truncated: bool = True, error_body: int = 0) -> Reply:
        """The final answer after redirects (any status); raises ``FetchError`` for transport
        failures, ``BadRequest``/``OutboundRefused`` for URLs the policy refuses. A body shorter than
        its Content-Length is retried like a dropped connection unless ``retry_truncated`` is false
        (Label Studio's proxy cuts streams at a fixed time: a retry is cut again). ``error_body``: read
        up to that many bytes of a non-2xx answer (a storage host's error code), within the deadline."""
        deadline = time.monotonic() + self.timeout_s
        hops = self.max_redirects if max_redirects is None else max_redirects
        watchdog = _Watchdog(deadline)
        try:
            for attempt in Retrying(retry=retry_if_exception_type(_Retry), reraise=True,
                                    stop=stop_after_attempt(self.attempts) | stop_before_delay(self.timeout_s),
                                    wait=wait_exponential(multiplier=0.1, max=1.0)):
                with attempt:
                    try:
                        reply = self._chain(method, url, dict(headers or {}), body, deadline, hops, watchdog,
                                            error_body)
                    except FetchError as exc:
                        if exc.transient and (retry_truncated or not exc.truncated):
                            raise _Retry(exc) from None
                        raise
                    if reply.status in TRANSIENT_STATUSES:
                        raise _Retry(reply)
                    return reply
        except _Retry as exc:
            if isinstance(exc.outcome, FetchError):
                raise exc.outcome from None
            return exc.outcome
        finally:
            watchdog.cancel()
        raise AssertionError("unreachable")

    def _chain(self, method: str, url: str, headers: dict[str, str], body: bytes | None, deadline: float,
               hops: int, watchdog: _Watchdog, error_body: int = 0) -> Reply:
        first: UrlParts | None = None
        source = "?"
        for hop in range(hops + 1):
            target = self._vet(url, deadline, source if first else None)
            parts = target.parts
            if first is None:
                first, source = parts, parts.label
            else:
                source = f"{first.label} (redirected to {parts.label})"
                if (parts.host, parts.port) != (first.host, first.port):
                    headers = {}  # credentials never follow a redirect elsewhere, nor come back
            status, location, reply = self._exchange(method, target, headers, body, deadline, source, watchdog,
                                                     redirected=hop > 0, error_body=error_body)
            if reply is not None:
                return reply
            if hop == hops:
                if hops == 0:  # the caller follows none (the token refresh): the redirect is the answer
                    return Reply(status, b"", None, source, bool(headers), redirected=hop > 0)
                break
            url = urljoin(url, location)
            if status == 303 or (status in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise FetchError(source, f"too many redirects (more than {hops})")

    def _vet(self, url: str, deadline: float, redirected_from: str | None) -> Target:
        try:
            return self.policy.vet(url, deadline - time.monotonic())
        except BackendError as exc:
            if redirected_from is None:
                raise
            raise type(exc)(f"{redirected_from} redirected to a refused URL: {exc.message}",
                            status=exc.status) from None
        except TimeoutError:
            raise FetchError(redirected_from or "image host", f"timed out after {self.timeout_s:g} s "
                             "resolving the host name") from None
        except OSError:  # socket.gaierror; the URL parsed, or vet would have raised BadRequest
            label = split_url(url).label
            raise FetchError(f"{redirected_from} (redirected to {label})" if redirected_from else label,
                             "the host name does not resolve (check the URL, and DNS inside the container)") from None

    def _exchange(self, method: str, target: Target, headers: dict[str, str], body: bytes | None,
                  deadline: float, source: str, watchdog: _Watchdog,
                  redirected: bool = False, error_body: int = 0) -> tuple[int, str, Reply | None]:
        """One request/response on a fresh connection: ``(status, location, None)`` for a
        redirect to follow, else ``(status, "", reply)``."""
        phase, received, expected = "connecting", 0, None
        conn = None
        try:
            conn = self._open(target, deadline, watchdog)
            phase = "waiting for the response headers"
            conn.request(method, target.parts.target, body=body, headers={**_HEADERS, **headers},
                         preload_content=False, decode_content=True, enforce_content_length=False)
            resp = conn.getresponse()
            status, location = resp.status, resp.headers.get("Location", "")
            content_type = resp.headers.get("Content-Type")
            if status in REDIRECTS and location:
                return status, location, None
            if not 200 <= status < 300:
                start = b""
                if error_body:
                    with suppress(Exception):  # only a hint for the message: never a failure of its own
                        if conn.sock is not None:
                            conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                        start = resp.read(error_body)
                return status, "", Reply(status, b"", content_type, source, bool(headers), redirected, start)
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise FetchError(source, f"larger than the limit of {self.max_bytes} bytes (MAX_IMAGE_BYTES; "
                                 f"Content-Length {declared})")
            expected = int(declared) if declared.isdigit() else None
            phase, chunks = "reading the body", []
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = resp.read(_CHUNK)
                if watchdog.fired:
                    raise TimeoutError
                if not chunk:
                    if expected is not None and received < expected:  # counted here: urllib3 would lose the tail
                        raise FetchError(source, f"connection broken while reading the body (truncated: {received} "
                                         f"of {expected} bytes received)", transient=True, received=received,
                                         expected=expected, redirected=redirected)
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > self.max_bytes:
                    raise FetchError(source, f"larger than the limit of {self.max_bytes} bytes (MAX_IMAGE_BYTES)")
            return status, "", Reply(status, b"".join(chunks), content_type, source, bool(headers), redirected)
        except FetchError:
            raise
        except Exception as exc:  # socket, TLS, http.client and urllib3 errors alike
            if phase == "reading the body":
                of = f" of {expected}" if expected is not None else ""
                phase = f"reading the body ({received}{of} bytes received)"
            error = self._describe(exc, source, phase, watchdog.fired or time.monotonic() >= deadline)
            if phase.startswith("reading the body"):
                error.received, error.expected = received, expected
            error.redirected = redirected
            raise error from None
        finally:
            if conn is not None:
                conn.close()

    def _open(self, target: Target, deadline: float, watchdog: _Watchdog) -> HTTPConnection:
        """A connection to the first of the vetted addresses that answers."""
        parts = target.parts
        last: BaseException | None = None
        for address in target.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if parts.scheme == "https":
                conn: HTTPConnection = _PinnedHTTPS(parts.host, parts.port, timeout=remaining, address=str(address),
                                                    on_socket=watchdog.watch, **self._tls)
            else:
                conn = _PinnedHTTP(parts.host, parts.port, timeout=remaining, address=str(address),
                                   on_socket=watchdog.watch)
            try:
                conn.connect()
                watchdog.watch(conn.sock)  # after TLS, the SSLSocket that took over the descriptor
                return conn
            except OSError as exc:
                conn.close()
                if isinstance(exc, (ssl.SSLError, ssl.CertificateError, TimeoutError)):
                    raise
                last = exc
        assert last is not None
        raise last

    def _describe(self, exc: BaseException, source: str, phase: str, late: bool) -> FetchError:
        if late or isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)):
            return FetchError(source, f"timed out after {self.timeout_s:g} s {phase}")
        if isinstance(exc, (ssl.SSLError, ssl.CertificateError, urllib3.exceptions.SSLError)):
            reason = getattr(exc, "reason", None) or getattr(exc, "verify_message", None) or type(exc).__name__
            return FetchError(source, f"TLS/SSL error: {reason} (set VERIFY_SSL=false for a self-signed certificate)")
        if isinstance(exc, ConnectionRefusedError):
            return FetchError(source, "connection refused", transient=True)
        if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            return FetchError(source, f"the server closed the connection while {phase}", transient=True)
        if isinstance(exc, urllib3.exceptions.ProtocolError):  # also a body shorter than its Content-Length
            return FetchError(source, f"connection broken while {phase}", transient=True)
        if isinstance(exc, (http.client.HTTPException, urllib3.exceptions.HTTPError)):
            return FetchError(source, f"invalid HTTP response while {phase} ({type(exc).__name__})")
        if isinstance(exc, OSError):
            return FetchError(source, f"{exc.strerror or type(exc).__name__} while {phase}", transient=True)
        return FetchError(source, f"{type(exc).__name__} while {phase}")
