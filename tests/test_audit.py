"""scripts/audit_requirements.py decides without network: audit where a service answers, skip (saying
why) where none does, never a silent "audited nothing"."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastsam_backend.quality.net import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "audit_requirements.py"


@pytest.fixture
def fake_pypi():
    """A PyPI stand-in: ``/pypi/<name>/<version>/json`` for ``good`` releases, 404 otherwise."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/pypi/requests/2.34.2/json"
            body = json.dumps({"info": {}, "vulnerabilities": []} if ok else {"message": "Not Found"}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def audit(tmp_path: Path, pinned: str, pypi: str, ignore: str = "") -> tuple[subprocess.CompletedProcess, list]:
    (tmp_path / "requirements.txt").write_text(f"# pinned\n{pinned}\nflask==3.1.3\n")
    (tmp_path / "ignore").write_text(ignore)
    calls = tmp_path / "calls.json"
    stub = f"{sys.executable} -c \"import json,sys; open({str(calls)!r},'w').write(json.dumps(sys.argv[1:]))\""
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run([sys.executable, str(SCRIPT), "--requirements", str(tmp_path / "requirements.txt"),
                           "--ignore-file", str(tmp_path / "ignore"), "--pypi", pypi, "--osv", closed,
                           "--timeout", "5", "--pip-audit", stub], capture_output=True, text=True, timeout=60)
    return done, json.loads(calls.read_text()) if calls.exists() else []


def test_no_reachable_service_skips_and_says_why(tmp_path):
    done, calls = audit(tmp_path, "requests==2.34.2", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 0 and calls == []
    assert "audit: SKIPPED" in done.stdout and "pypi:" in done.stdout and "osv:" in done.stdout


def test_a_mirror_without_the_per_release_api_skips(tmp_path, fake_pypi):
    done, calls = audit(tmp_path, "torch==2.14.1", fake_pypi)
    assert done.returncode == 0 and calls == [] and "HTTP 404" in done.stdout and "SKIPPED" in done.stdout


def test_a_reachable_service_runs_pip_audit_on_the_pins_with_the_accepted_advisories(tmp_path, fake_pypi):
    done, calls = audit(tmp_path, "requests==2.34.2", fake_pypi, ignore="# accepted\nPYSEC-2099-1  not reachable\n")
    assert done.returncode == 0 and "SKIPPED" not in done.stdout, done.stdout + done.stderr
    assert calls[calls.index("--requirement") + 1] == str(tmp_path / "requirements.txt")
    assert {"--no-deps", "--disable-pip", "--strict"} <= set(calls)
    assert calls[calls.index("--vulnerability-service") + 1] == "pypi"
    assert calls[calls.index("--ignore-vuln") + 1] == "PYSEC-2099-1"


def test_an_accepted_advisory_needs_a_reason(tmp_path, fake_pypi):
    done, calls = audit(tmp_path, "requests==2.34.2", fake_pypi, ignore="PYSEC-2099-1\n")
    assert done.returncode != 0 and calls == [] and "needs a reason" in done.stderr
