"""Issue #27's "done when" in a real Label Studio 1.23.2: ``preannotate --queue`` on a project through
two real ``worker`` processes on a Redis of their own without persistence (as compose runs it); in
the middle of the run the Redis is killed and one worker SIGKILLed (a node lost), and the Redis
restarted, empty, 3 s later. The run completes by itself -- the jobs the restart lost are enqueued
again once Label Studio says their task has no prediction of this model_version -- with exactly one
prediction per task; the surviving worker still runs and nothing printed a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from . import cases
from .harness import ROOT, Proc, backend_env, wait_until

N = 24


def test_redis_restart_and_a_lost_worker_mid_run_then_one_prediction_per_task(label_studio, label_config, tmp_path,
                                                                            own_redis):
    api = label_studio.api
    pid = api.create_project("fastsam faults", label_config)
    scenes = {c.file_name: c for c in (cases.Case(6_100_000 + i, target=0, neighbour=1) for i in range(N))}
    tasks = api.upload(pid, {name: case.png() for name, case in scenes.items()})
    env = backend_env(REDIS_URL=own_redis.url, CLIP_ENABLED="false", DEFAULT_LABEL="Banana",
                      LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat,
                      MODEL_DIR=str(tmp_path / "models"), LOG_LEVEL="INFO", TORCH_THREADS="1",
                      JOB_RETRY_INTERVALS="2")
    workers = [Proc(f"worker{i}", [sys.executable, "-m", "fastsam_backend", "worker"], env,
                    tmp_path / f"worker{i}.log", ROOT) for i in range(2)]
    report = tmp_path / "report.json"
    try:
        wait_until(lambda: own_redis.raw().scard("rq:workers") >= 2, 180, "two workers with their models loaded")
        with (tmp_path / "run.out").open("w") as out, (tmp_path / "run.err").open("w") as err:
            run = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", str(pid),
                                    "--queue", "--report", str(report)], env=env, cwd=ROOT, stdout=out, stderr=err)
            predicted = lambda: sum(t.get("total_predictions", 0) for t in api.tasks(pid))  # noqa: E731
            wait_until(lambda: predicted() >= 3 or run.poll() is not None, 180, "the first predictions")
            assert run.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
            own_redis.kill()
            os.killpg(workers[0].proc.pid, signal.SIGKILL)  # a node lost, with whatever job it held
            time.sleep(3)
            own_redis.start()  # same port, empty
            run.wait(240)
        stdout, stderr = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
        assert run.returncode == 0, stderr[-3000:] + workers[1].tail()
        survivor = (tmp_path / "worker1.log").read_text()
        assert workers[1].alive(), survivor[-3000:]
    finally:
        for proc in workers:
            proc.stop()
    summary = json.loads(report.read_text())
    assert summary["failed_count"] == 0 and summary["done"] + summary["skipped"] == N, summary
    assert "redis=down" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "Traceback" not in survivor and "quitting" not in survivor, survivor[-3000:]
    for name, task in tasks.items():
        predictions = api.predictions(task["id"])
        assert len(predictions) == 1, f"{name}: {len(predictions)} predictions"
        assert predictions[0]["model_version"] == summary["model_version"]
    # killed after 3 of 24: jobs were still queued, and the empty Redis lost them
    assert summary["requeued"] > 0 and "jobs lost in a Redis restart were enqueued again" in stdout, stdout


def test_label_studio_restarted_mid_run_then_one_prediction_per_task(label_studio, label_config, tmp_path,
                                                                     own_redis):
    """Label Studio stopped and started again while the workers write predictions: their calls are
    retried with backoff (a write checks first whether its earlier POST landed), the run completes."""
    api, n = label_studio.api, 12
    pid = api.create_project("fastsam ls restart", label_config)
    scenes = {c.file_name: c for c in (cases.Case(6_200_000 + i, target=0, neighbour=1) for i in range(n))}
    tasks = api.upload(pid, {name: case.png() for name, case in scenes.items()})
    env = backend_env(REDIS_URL=own_redis.url, CLIP_ENABLED="false", DEFAULT_LABEL="Banana",
                      LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.pat,
                      MODEL_DIR=str(tmp_path / "models"), LOG_LEVEL="INFO", TORCH_THREADS="1")
    workers = [Proc(f"worker{i}", [sys.executable, "-m", "fastsam_backend", "worker"], env,
                    tmp_path / f"worker{i}.log", ROOT) for i in range(2)]
    report = tmp_path / "report.json"
    try:
        wait_until(lambda: own_redis.raw().scard("rq:workers") >= 2, 180, "two workers with their models loaded")
        with (tmp_path / "run.out").open("w") as out, (tmp_path / "run.err").open("w") as err:
            run = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", str(pid),
                                    "--queue", "--report", str(report)], env=env, cwd=ROOT, stdout=out, stderr=err)
            predicted = lambda: sum(t.get("total_predictions", 0) for t in api.tasks(pid))  # noqa: E731
            wait_until(lambda: predicted() >= 2 or run.poll() is not None, 180, "the first predictions")
            assert run.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
            label_studio.restart(down_s=3)
            run.wait(300)
        stderr = (tmp_path / "run.err").read_text()
        assert run.returncode == 0, stderr[-3000:] + workers[0].tail() + workers[1].tail()
        logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))
        assert all(w.alive() for w in workers), logs[-3000:]
    finally:
        for proc in workers:
            proc.stop()
    summary = json.loads(report.read_text())
    assert summary["failed_count"] == 0 and summary["done"] + summary["skipped"] == n, summary
    assert re.search(r"Label Studio [a-z ]+ failed \(", logs), logs[-3000:]  # the restart was met, and ridden through
    assert "Traceback" not in stderr, stderr[-3000:]
    for name, task in tasks.items():
        predictions = api.predictions(task["id"])
        assert len(predictions) == 1, f"{name}: {len(predictions)} predictions"
