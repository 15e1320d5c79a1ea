"""Images in cloud storage: ``ImageRef`` (a task's image URL and the task's id) and what Label
Studio's resolve endpoint answers for ``s3://``, ``gs://`` and ``azure-blob://`` URIs.

Label Studio sends a cloud task's raw URI to ``/predict`` (never a presigned URL). It serves the
object itself at ``GET {LABEL_STUDIO_URL}/tasks/{task_id}/resolve/?fileuri={urlsafe base64 of the
URI}`` (``io_storages/proxy_api.py``) to a user who may see the task: with "Use pre-signed URLs"
on it answers 303 to a presigned URL on the storage host; with it off it streams the bytes, and
cuts the stream after its ``RESOLVER_PROXY_TIMEOUT`` (20 s) while still answering 200. So the
loader needs the task id beside the URL: that pair is ``ImageRef``, the one value every path that
loads images passes down (a plain ``str`` is still accepted and means "no task").

The URL -> digest memo of a cloud image is keyed on the URI and the Label Studio instance
(``memo_url``), never on a resolve or presigned URL, which expire. Status codes become
``ImageError``s that name the fix (``label_studio_error``, ``storage_error``).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fastsam_backend.errors import ImageError

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")  # io_storages/{s3,gcs,azure_blob}/models.py (Redis has none)
RESOLVE_PATH = "/tasks/{task_id}/resolve/?fileuri={fileuri}"
PROXY_TIMEOUT_HINT = ("Label Studio cuts files it streams after its RESOLVER_PROXY_TIMEOUT (20 s by default): turn on "
                      "'Use pre-signed URLs' on the source storage, or raise RESOLVER_PROXY_TIMEOUT in Label "
                      "Studio's environment")


@dataclass(frozen=True)
class ImageRef:
    """A task's image: its URL as the task holds it, and the task's id when known (cloud URIs need it)."""

    url: str
    task_id: int | None = None

    @classmethod
    def of(cls, source: ImageSource, task_id: object = None) -> ImageRef:
        """``source`` as a ref; a plain URL gets ``task_id`` (any spelling of an integer, else none)."""
        if isinstance(source, ImageRef):
            return source
        return cls(source, as_task_id(task_id))

    @property
    def cloud_scheme(self) -> str | None:
        return cloud_scheme(self.url)


ImageSource = str | ImageRef


def as_task_id(value: object) -> int | None:
    """A Label Studio task id (an integer, or its digits as sent in webhooks), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def cloud_scheme(url: str) -> str | None:
    """``s3``, ``gs`` or ``azure-blob`` for a cloud storage URI, else None (as the SDK's ``is_cloud_storage_uri``)."""
    head = url.strip()[:16].lower()
    return next((s for s in CLOUD_SCHEMES if head.startswith(s + ":")), None)


def resolve_path(uri: str, task_id: int) -> str:
    """The path Label Studio serves ``uri`` of task ``task_id`` at (``TaskResolveStorageUri``)."""
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    return RESOLVE_PATH.format(task_id=task_id, fileuri=fileuri)


_RESOLVE = re.compile(r"/tasks/(\d+)/(?:resolve|presign)/?$")


def from_resolve_path(url: str) -> ImageRef | None:
    """A Label Studio resolve path (``/tasks/<id>/resolve/?fileuri=…``, which its API shows a cloud
    task's URI as: the SDK's tasks, so ``preannotate`` and ``train``) read back as the ``ImageRef``
    it stands for, else None; so it is cached, and fails, as the URI itself."""
    parts = urlsplit(url.strip())
    found = _RESOLVE.fullmatch(parts.path)
    if parts.scheme or parts.netloc or found is None:
        return None
    fileuri = (parse_qs(parts.query).get("fileuri") or [""])[-1]
    try:
        uri = base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode()
    except (binascii.Error, ValueError):
        return None
    return ImageRef(uri, int(found.group(1))) if cloud_scheme(uri) else None


def memo_url(uri: str, label_studio: str | None) -> str:
    """What the URL -> digest memo keys a cloud image on: the URI within one Label Studio instance
    (the same bucket name in another instance may be another bucket)."""
    return f"{uri.strip()} @ {label_studio or '?'}"


def shown(uri: str) -> str:
    """The URI as messages show it: without a query (Azure SAS-like signatures) and at most 200 characters."""
    uri = uri.strip().split("?", 1)[0]
    return uri if len(uri) <= 200 else uri[:197] + "..."


def no_task(uri: str) -> ImageError:
    return ImageError(f"{shown(uri)} is in cloud storage, which Label Studio serves per task "
                      "(/tasks/<id>/resolve/), but no task id came with it: send the task's id (Label Studio "
                      "does), or warm it with `fastsam-backend warm --project ID` or `--task ID`")


def no_label_studio(uri: str, missing: str) -> ImageError:
    return ImageError(f"{shown(uri)} is in cloud storage, which Label Studio serves: set {missing} so the "
                      "backend can fetch it through Label Studio's /tasks/<id>/resolve/ endpoint")


def label_studio_error(uri: str, task_id: int, status: int, source: str) -> ImageError:
    """Label Studio's own answer to the resolve request (not the storage host's)."""
    what = f"{shown(uri)} (task {task_id})"
    fixes = {
        401: "Label Studio refused the token: check LABEL_STUDIO_API_KEY (a personal access token, or a legacy "
             "token with legacy tokens enabled in the organisation)",
        403: "the token's user may not see this task: use the API key of a member of the project's organisation",
        404: "Label Studio has no such task, or none of the project's source storages matches this URI: add the "
             "bucket (and prefix) as the project's source storage under Settings > Cloud Storage, and sync it",
        424: "Label Studio could not read the object from the storage (it is missing, or the source storage's "
             "credentials may not read it): check the object exists, or sync the storage again",
    }
    fix = fixes.get(status, "Label Studio could not serve it")
    short = {401: "Label Studio refused LABEL_STUDIO_API_KEY", 403: "the API key's user may not see the task",
             404: "no such task, or no source storage matches the URI",
             424: "object missing or unreadable in the storage"}.get(status, "Label Studio could not serve it")
    return ImageError(f"could not fetch {what} through Label Studio at {source}: HTTP {status}; {fix}",
                      reason=_reason(f"{shown(uri)}: {short} (HTTP {status})"))


def storage_error(uri: str, status: int, source: str, body: bytes = b"") -> ImageError:
    """The storage host's answer to Label Studio's presigned URL (the 303's target); ``body``, the
    start of its answer, may hold the S3 (or GCS, Azure) error code."""
    found = re.search(rb"<Code>([A-Za-z]{1,64})</Code>", body)
    code = found.group(1).decode() if found else None
    missing = "the object is missing from the bucket (deleted or renamed since the storage was synced): sync the " \
              "source storage again"
    if code in ("NoSuchKey", "BlobNotFound") or (status == 404 and code in (None, "NoSuchBucket")):
        fix, short = missing, "object missing from the bucket"
    elif status == 403:
        fix = ("the storage refused the pre-signed URL: the object may be missing (S3 answers 403, not 404, to a "
               "signer that may not list the bucket), the source storage's credentials may not read it, or the URL "
               "expired: check the object exists, then the storage credentials, the clocks and 'Expire pre-signed "
               "URLs'")
        short = "object missing or access denied at the storage"
    else:
        fix, short = "the storage host refused the pre-signed URL", "the storage refused the pre-signed URL"
    tag = f"HTTP {status}" + (f" {code}" if code else "")
    return ImageError(f"could not fetch {shown(uri)} from the storage host: {source}: {tag}; {fix}",
                      reason=_reason(f"{shown(uri)}: {short} ({tag})"))


def truncated(uri: str, source: str, received: int, expected: int) -> ImageError:
    return ImageError(f"{shown(uri)} from {source} is truncated: the stream ended after {received} of "
                      f"{expected} bytes. {PROXY_TIMEOUT_HINT}, or raise DOWNLOAD_TIMEOUT_S")


def _reason(text: str) -> str:
    """An HTTP reason phrase: Label Studio logs and shows only the status line of a failed /predict."""
    return text.encode("latin-1", "replace").decode("latin-1").replace("\r", " ").replace("\n", " ")[:200]
