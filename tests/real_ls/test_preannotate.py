"""``fastsam-backend preannotate`` against a real Label Studio 1.23.2, through label-studio-sdk with
a personal access token: 50 tasks, interrupted with SIGINT, resumed, one prediction per task.
(The same against the fake Label Studio, and through two workers, is tests/test_workers.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from fastsam_backend.quality.lsrequests import png_bytes
from fastsam_backend.quality.scenes import generate_scene

from .harness import ROOT, backend_env, wait_until

N = 50


def test_preannotate_50_tasks_sigint_resume_one_prediction_each(label_studio, label_config, tmp_path):
    api = label_studio.api
    pid = api.create_project("fastsam preannotate", label_config)
    files = {f"pre{i:02d}.png": png_bytes(generate_scene(5_000_000 + i, (240, 320)).image) for i in range(N)}
    tasks = api.upload(pid, files)
    env = backend_env(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat,
                      MODEL_DIR=str(tmp_path), CLIP_ENABLED="false", DEFAULT_LABEL="Banana", LOG_LEVEL="WARNING")
    args = [sys.executable, "-m", "fastsam_backend", "preannotate", "--project", str(pid), "--batch-size", "2",
            "--report", str(tmp_path / "first.json")]

    def stored() -> int:
        return len(api.json("GET", "/api/predictions", params={"project": pid}))

    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or stored() >= 10, 300, "10 predictions stored", poll_s=0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["interrupted"] and 10 <= first["done"] < N and not first["failed"], first
    assert "img/s" in err and "interrupted" in out

    time.sleep(0.5)
    args[-1] = str(tmp_path / "second.json")
    again = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["skipped"] == first["done"] and second["done"] == N - first["done"], second

    versions = set()
    for name, task in tasks.items():
        predictions = api.predictions(task["id"])
        assert len(predictions) == 1, f"{name}: {len(predictions)} predictions"
        assert predictions[0]["result"], f"{name}: an empty prediction"
        versions.add(predictions[0]["model_version"])
    assert versions == {first["model_version"]}
