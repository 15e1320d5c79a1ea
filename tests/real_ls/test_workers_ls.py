"""Issue #14's "done when" in a real Label Studio 1.23.2: a 50-task project pre-annotated by
``preannotate --queue`` through two real ``worker`` processes on a Redis of their own; Label
Studio then holds one prediction per task, and the first click on every task (LS's
``interactive-annotating``, as the labeling UI sends it) is answered from the cache the workers
filled: ``/metrics`` counts 50 hits, no miss and no segmentation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import requests

from . import cases
from .harness import ROOT, Backend, Proc, backend_env, tag_names, wait_until

N = 50


def test_two_workers_preannotate_50_tasks_then_every_first_click_is_a_cache_hit(label_studio, label_config,
                                                                             tmp_path, own_redis):
    api = label_studio.api
    pid = api.create_project("fastsam two workers", label_config)
    scenes = {c.file_name: c for c in (cases.Case(6_000_000 + i, target=0, neighbour=1) for i in range(N))}
    tasks = api.upload(pid, {name: case.png() for name, case in scenes.items()})
    shared = {"REDIS_URL": own_redis.url, "CLIP_ENABLED": "false", "DEFAULT_LABEL": "Banana",
              "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.pat,
              "MODEL_DIR": str(tmp_path / "models"), "LOG_LEVEL": "INFO"}
    env = backend_env(**shared, TORCH_THREADS="1")
    workers = [Proc(f"worker{i}", [sys.executable, "-m", "fastsam_backend", "worker"], env,
                    tmp_path / f"worker{i}.log", ROOT) for i in range(2)]
    backend = Backend(tmp_path, label_studio, name="queued-backend", **shared).start()
    try:
        wait_until(lambda: own_redis.raw().scard("rq:workers") >= 2, 180, "two workers with their models loaded")
        report = tmp_path / "report.json"
        run = subprocess.run([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", str(pid),
                              "--queue", "--report", str(report)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(report.read_text())
        assert (summary["done"], summary["failed_count"], summary["mode"]) == (N, 0, "queue"), summary
        served_by = {line.split()[3] for i in range(2) for line in
                     (tmp_path / f"worker{i}.log").read_text().splitlines() if "Job OK (fastsam-pre-" in line}
        assert len(served_by) == 2, "both workers took pre-annotate jobs"

        for name, task in tasks.items():
            predictions = api.predictions(task["id"])
            assert len(predictions) == 1 and predictions[0]["result"], f"{name}: {len(predictions)} predictions"
            assert predictions[0]["model_version"] == summary["model_version"]

        # connected afterwards: connecting makes LS ask the backend for predictions of the tasks that
        # have none of its model_version (with it connected first, LS and the workers race for them)
        ml = api.connect_ml(pid, backend.url)
        names = tag_names(label_config)
        for name, task in tasks.items():
            answer = api.interactive(ml["id"], task["id"], [cases.keypoint(scenes[name], names)])
            # an answer (the fixture may find nothing under the click on a small or hidden object)
            assert "data" in answer and "result" in answer["data"], f"{name}: LS answered {str(answer)[:400]}"
        text = requests.get(f"{backend.url}/metrics", timeout=10).text
    finally:
        backend.stop()
        for proc in workers:
            proc.stop()
    assert re.search(rf'^fastsam_cache_lookups_total\{{result="hit"\}} {N}\.0$', text, re.M), text[:3000]
    assert 'fastsam_cache_lookups_total{result="miss"}' not in text
    assert re.search(r"^fastsam_segment_seconds_count 0\.0$", text, re.M)
