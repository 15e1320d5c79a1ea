"""An S3-compatible server for the real-Label-Studio tests: moto's server (``moto[server]`` from
PyPI) from a venv of its own, ``.venv-moto`` (``scripts/install_test_env.sh``), on a free loopback
port. Buckets and objects are made with plain HTTP (moto takes unsigned PUTs; reading an object
needs a signature, as on S3). Its access log counts the GETs of each object.
"""

from __future__ import annotations

import re
from pathlib import Path

import requests

from fastsam_backend.quality.net import free_port

from .harness import ROOT, Proc, unavailable

MOTO_EXE = ROOT / ".venv-moto" / "bin" / "moto_server"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


class MotoS3:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, tmp: Path) -> MotoS3:
        if not MOTO_EXE.exists():
            unavailable(f"{MOTO_EXE} missing: run `make test-env` (scripts/install_test_env.sh)")
        port = free_port()
        proc = Proc("moto", [str(MOTO_EXE), "-H", "127.0.0.1", "-p", str(port)], {"PATH": "/usr/bin:/bin"},
                    tmp / "moto.log", tmp)
        try:
            proc.wait_http(f"http://127.0.0.1:{port}/moto-api/", 60)
        except BaseException:
            proc.stop()
            raise
        return cls(proc, port)

    def put(self, bucket: str, key: str = "", data: bytes = b"", content_type: str = "image/png") -> None:
        r = requests.put(f"{self.endpoint}/{bucket}/{key}", data=data, timeout=30,
                         headers={"Content-Type": content_type} if key else {})
        assert r.status_code == 200, f"PUT /{bucket}/{key}: HTTP {r.status_code} {r.text[:300]}"

    def gets(self, bucket: str, key: str) -> int:
        """How many times the object was read (any client: Label Studio proxying it, or a presigned URL)."""
        pattern = re.compile(rf'"GET /{re.escape(bucket)}/{re.escape(key)}[? ]')
        return sum(1 for line in self.proc.log.read_text(errors="replace").splitlines() if pattern.search(line))

    def stop(self) -> None:
        self.proc.stop()
