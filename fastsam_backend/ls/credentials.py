"""Does Label Studio accept the token the backend downloads images with? Asked once at /setup,
where a refusal reaches the user ("Validate and Save" shows it), instead of every click
silently returning nothing (LS swallows the backend's 4xx in the labeling UI).

Only ``LABEL_STUDIO_URL``'s host is asked (a configured, trusted address; the ``/setup``
hostname is not contacted for this). One call of at most ``timeout_s``, cached per host and
token digest. The token never appears in messages or logs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import requests

log = logging.getLogger(__name__)

WHOAMI = "/api/current-user/whoami"
REFRESH = "/api/token/refresh/"
FIX = ("use a personal access token (Label Studio: Account & Settings → Personal Access Token) as "
       "LABEL_STUDIO_API_KEY, or enable legacy tokens for the organisation (Organization → API Tokens "
       "Settings → Legacy Tokens) to use a legacy key")

# what Label Studio's "Validate and Save" can show (the status line's reason phrase; ASCII, one line)
REFUSED_TOKEN_REASON = ("Label Studio refused LABEL_STUDIO_API_KEY - use a Personal Access Token, or enable "
                        "Legacy Tokens (Organization - API Tokens Settings)")


@dataclass(frozen=True)
class CredentialCheck:
    accepted: bool | None  # None: could not tell (LS unreachable, unexpected answer)
    message: str


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2


class CredentialChecker:
    def __init__(self, timeout_s: float = 2.0, ttl_s: float = 300.0, verify_ssl: bool = True) -> None:
        self.timeout_s, self.ttl_s, self.verify_ssl = timeout_s, ttl_s, verify_ssl
        self._cache: dict[tuple[str, str], tuple[float, CredentialCheck]] = {}
        self._lock = threading.Lock()

    def check(self, base: str, token: str) -> CredentialCheck:
        key = (base.rstrip("/"), hashlib.sha256(token.encode()).hexdigest())
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        result = self._ask(key[0], token)
        with self._lock:
            ttl = self.ttl_s if result.accepted is not None else min(self.ttl_s, 30.0)
            self._cache[key] = (time.monotonic() + ttl, result)
        return result

    def _ask(self, base: str, token: str) -> CredentialCheck:
        deadline = time.monotonic() + self.timeout_s
        kind = "personal access token" if _is_jwt(token) else "legacy token"
        try:
            header = f"Token {token}"
            if _is_jwt(token):
                refreshed = requests.post(base + REFRESH, json={"refresh": token}, verify=self.verify_ssl,
                                          timeout=max(0.1, deadline - time.monotonic()), allow_redirects=False)
                if refreshed.status_code in (400, 401, 403):
                    return self._refused(base, kind, refreshed.status_code)
                header = f"Bearer {refreshed.json()['access']}"
            answer = requests.get(base + WHOAMI, headers={"Authorization": header}, verify=self.verify_ssl,
                                  timeout=max(0.1, deadline - time.monotonic()), allow_redirects=False)
        except (requests.RequestException, ValueError, KeyError) as exc:
            message = f"could not check the Label Studio token at {base} ({type(exc).__name__})"
            log.warning("%s; image downloads may fail", message)
            return CredentialCheck(None, message)
        if answer.status_code in (401, 403):
            return self._refused(base, kind, answer.status_code)
        if answer.ok:
            log.info("Label Studio at %s accepts the %s", base, kind)
            return CredentialCheck(True, "accepted")
        message = f"Label Studio at {base} answered the token check with HTTP {answer.status_code}"
        log.warning(message)
        return CredentialCheck(None, message)

    @staticmethod
    def _refused(base: str, kind: str, status: int) -> CredentialCheck:
        message = (f"Label Studio at {base} refused the {kind} the backend downloads task images with "
                   f"(HTTP {status}): {FIX}")
        log.error(message)
        return CredentialCheck(False, message)
