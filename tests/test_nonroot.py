"""The container's way of running, without Docker: the Dockerfile's CMD as uid 10001, on a read-only
root filesystem with a tmpfs on /tmp (compose: ``read_only``, ``tmpfs``, ``cap_drop: [ALL]``,
``no-new-privileges``), two gunicorn workers (so the Prometheus multiprocess dir is made too).

A private mount namespace (``unshare --mount``) remounts / read-only for the server alone, then
``setpriv`` drops to 10001 with no capabilities. The Python the venv points at lives under /root
(mode 700 here), so it is bind-mounted, read-only, at the same path under a 755 tmpfs: as in the
image, the interpreter is root's and readable. What this cannot show: the image's own build
(apt, pip, the weights' download), Docker's seccomp/AppArmor profiles and compose's tmpfs options.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fastsam_backend.quality.net import free_port
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ
from tests.helpers import captured, interior_point, keypoint, png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.model]
REPO = Path(__file__).resolve().parents[1]
UID = 10001


def dockerfile() -> tuple[list[str], dict[str, str]]:
    """The Dockerfile's CMD and ENV (the last values of each variable)."""
    text = (REPO / "Dockerfile").read_text()
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M):
        env.update(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))
    return cmd, env


def namespace_script(repo: Path, keep: list[Path]) -> str:
    """Shell run as root in the new mount namespace; ends by exec'ing the server as UID.

    ``/tmp`` and ``/root`` become fresh tmpfs (as the container's tmpfs and its empty home); the
    paths in ``keep`` that lie under them (the interpreter, the venv, a checkout cloned under /tmp)
    are bind-mounted back, read-only like everything else."""
    real = {Path(os.path.realpath(k)) for k in keep}
    hidden = sorted(str(r) for r in real if r.is_relative_to("/tmp") or r.is_relative_to("/root"))
    hidden = [h for h in hidden if not any(h != o and Path(h).is_relative_to(o) for o in hidden)]
    stash = "".join(f"mkdir /mnt/.keep/{i} && mount --bind {h} /mnt/.keep/{i}\n" for i, h in enumerate(hidden))
    restore = "".join(f"mkdir -p {h} && mount --bind /mnt/.keep/{i} {h} && mount -o remount,bind,ro {h}\n"
                      for i, h in enumerate(hidden))
    return f"""set -e
mount --make-rprivate /
mount -t tmpfs -o mode=700,size=1m tmpfs /mnt && mkdir /mnt/.keep
{stash}mount -t tmpfs -o mode=1777,size=1g tmpfs /tmp
mount -t tmpfs -o mode=755,size=1m tmpfs /root
{restore}mount -o remount,bind,ro /
if touch {repo}/.nonroot-probe 2>/dev/null; then echo "the repository is writable" >&2; exit 97; fi
exec setpriv --reuid {UID} --regid {UID} --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs \
  "$@"
"""


def python_home() -> Path:
    """Where the venv's interpreter really lives (its real prefix)."""
    return Path(os.path.realpath(sys.executable)).parents[1]


@pytest.fixture
def nonroot_possible():
    if os.geteuid() != 0:
        pytest.skip("needs root to make a mount namespace and drop to another uid")
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount --make-rprivate / && "
                            "mount -o remount,bind,ro / && ! touch /.probe 2>/dev/null"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private read-only mount namespace here: {probe.stderr.decode()[:200]}")


def test_the_image_command_serves_as_non_root_on_a_read_only_filesystem(nonroot_possible, image_server,
                                                                       fastsam_weights):
    root, ls_base = image_server
    scene = generate_scene(1_000_017, (240, 320))
    (root / "data" / "upload" / "1").mkdir(parents=True, exist_ok=True)
    (root / "data" / "upload" / "1" / "nonroot.png").write_bytes(png_bytes(scene.image))
    cmd, docker_env = dockerfile()
    assert cmd[0] == "fastsam-backend"
    port = free_port()
    venv_bin = Path(sys.executable).parent
    env = {"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": "/nonexistent", **docker_env,
           "PORT": str(port), "BIND_HOST": "127.0.0.1", "WORKERS": "2", "THREADS": "2",
           "FASTSAM_WEIGHTS": str(fastsam_weights), "MODEL_DIR": "/tmp/models", "FASTSAM_ALLOW_DOWNLOAD": "false",
           "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF), "IOU": "0.7", "CLIP_ENABLED": "false",
           "DEFAULT_LABEL": "Banana", "LABEL_STUDIO_URL": ls_base, "LABEL_STUDIO_API_KEY": "f" * 40,
           "PYTHONPATH": str(REPO), "YOLO_OFFLINE": "1", "LOG_LEVEL": "WARNING"}
    script = namespace_script(REPO, [python_home(), Path(sys.prefix), REPO])
    proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script, "sh", *cmd],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.monotonic() + 90, {}
        while health.get("state") != "ready":
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"not ready in 90 s: {health}"
            with contextlib.suppress(requests.RequestException):
                health = requests.get(f"{base}/health", timeout=5).json()
            time.sleep(0.2)
        # unshare, sh and setpriv exec'd each other: proc.pid is gunicorn's master
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid]
        assert len(workers) == 2 and all(_uid(pid) == UID for pid in [proc.pid, *workers])

        body = captured("/predict", interactive=True)
        body["tasks"][0]["data"]["image"] = "/data/upload/1/nonroot.png"
        x, y = interior_point(max(scene.objects, key=lambda o: o.mask.sum()).mask)
        body["params"]["context"]["result"] = [keypoint(x, y, 320, 240)]
        for _ in range(3):  # both workers, cold then cached
            response = requests.post(f"{base}/predict", json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["result"], "the click found no mask"
        assert "fastsam_requests" in requests.get(f"{base}/metrics", timeout=10).text
        assert not (REPO / ".nonroot-probe").exists()
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def _status(pid: int, field: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.split()[1]
    except OSError:
        pass
    return None


def _uid(pid: int) -> int | None:
    value = _status(pid, "Uid")
    return int(value) if value else None


def _ppid(pid: int) -> int | None:
    value = _status(pid, "PPid")
    return int(value) if value else None

