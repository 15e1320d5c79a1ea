#!/usr/bin/env python3
"""pip-audit of the pinned requirements.txt, where a vulnerability service answers.

pip-audit asks PyPI's per-release JSON API (``/pypi/<name>/<version>/json``) or OSV
(``api.osv.dev``). A mirror without that API makes pip-audit report every package as "not found"
and exit 0, an audit that audited nothing; so each service is probed first with one pinned
package, and without a usable one the audit is skipped, saying so and why (exit 0). Accepted
advisories are listed with their reasons in ``.ci/pip-audit-ignore`` (``ID  reason``).

    scripts/audit_requirements.py [--requirements requirements.txt] [--pypi URL] [--osv URL]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org"
OSV = "https://api.osv.dev"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def pins(requirements: Path) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in requirements.read_text().splitlines() if (m := PIN.match(line.strip()))]


def _get_json(request: urllib.request.Request, timeout: float) -> dict:
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read(2_000_000))


def probe_pypi(base: str, name: str, version: str, timeout: float) -> str | None:
    """None when ``base`` serves the per-release JSON API with vulnerability data; else why not."""
    url = f"{base}/pypi/{name}/{version}/json"
    try:
        data = _get_json(urllib.request.Request(url), timeout)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {type(exc).__name__}: {exc}"
    return None if isinstance(data, dict) and "vulnerabilities" in data else f"{url} has no vulnerability data"


def probe_osv(base: str, name: str, version: str, timeout: float) -> str | None:
    """None when ``base`` answers OSV's ``/v1/query``; else why not."""
    body = json.dumps({"package": {"name": name, "ecosystem": "PyPI"}, "version": version}).encode()
    url = f"{base}/v1/query"
    try:
        data = _get_json(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {type(exc).__name__}: {exc}"
    return None if isinstance(data, dict) else f"{url} did not answer a JSON object"


def ignored(path: Path) -> list[str]:
    """Advisory ids of ``path`` (``ID  reason`` lines; ``#`` comments); an id without a reason is refused."""
    if not path.is_file():
        return []
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            vuln_id, _, reason = line.partition(" ")
            if not reason.strip():
                raise SystemExit(f"{path}:{number}: {vuln_id} needs a reason after it")
            ids.append(vuln_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    parser.add_argument("--ignore-file", type=Path, default=REPO / ".ci" / "pip-audit-ignore")
    parser.add_argument("--pypi", default=os.environ.get("AUDIT_PYPI_URL", PYPI), help="PyPI JSON API base")
    parser.add_argument("--osv", default=os.environ.get("AUDIT_OSV_URL", OSV), help="OSV API base")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--pip-audit", default=f"{sys.executable} -m pip_audit", help="command to run pip-audit")
    args = parser.parse_args(argv)

    pinned = pins(args.requirements)
    if not pinned:
        print(f"audit: {args.requirements} pins nothing", file=sys.stderr)
        return 2
    name, version = pinned[0]
    reasons = []
    for service, probe, base in (("pypi", probe_pypi, args.pypi), ("osv", probe_osv, args.osv)):
        why = probe(base.rstrip("/"), name, version, args.timeout)
        if why is None:
            break
        reasons.append(f"{service}: {why}")
    else:
        print("audit: SKIPPED, no vulnerability service is reachable from here (" + "; ".join(reasons) + ")")
        return 0
    command = [*shlex.split(args.pip_audit), "--requirement", str(args.requirements), "--no-deps",
               "--disable-pip", "--vulnerability-service", service, "--progress-spinner", "off", "--strict"]
    for vuln_id in ignored(args.ignore_file):
        command += ["--ignore-vuln", vuln_id]
    print(f"audit: {len(pinned)} pinned packages of {args.requirements.name} against {service} ({base})", flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
