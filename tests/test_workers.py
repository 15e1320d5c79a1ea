"""Two real ``fastsam-backend worker`` processes with the trained fixture model, on a
``redis-server`` of their own, against a fake Label Studio (``quality/fakels.py``):

- the same warm job enqueued twice runs once;
- ``preannotate --queue`` on a 50-task project through both workers leaves one prediction per
  task, and afterwards the backend answers the first click on every image from the cache;
- ``preannotate`` in-process shows progress, stops on SIGINT with its summary, and a second run
  resumes: one prediction per task;
- a worker SIGKILLed in the middle of a job: the job is retried by the other one and the image is
  segmented exactly once.

The fake ``GroundTruthSegmenter`` cannot cross processes, so segmentations are counted from the
workers' own counters in Redis (``fastsam_job_outcomes``) and the server's ``/metrics``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fastsam_backend.jobs.enqueue import enqueue_warm
from fastsam_backend.jobs.queues import JobQueues, QueueConfig
from fastsam_backend.quality.fakels import FakeLabelStudio, serve
from fastsam_backend.quality.net import free_port
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.service.orchestrator import build_service
from fastsam_backend.settings import Settings
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ, OwnRedis
from tests.helpers import LABEL_CONFIG, interior_point, keypoint, png_bytes

pytestmark = [pytest.mark.slow, pytest.mark.model]
REPO = Path(__file__).resolve().parents[1]
TOKEN = "f" * 40
N = 50


def scene_for(project: int, i: int):
    return generate_scene(4_000_000 + 1000 * project + i, (240, 320))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fastsam_weights):
    """Redis, a fake Label Studio with projects 1 and 2 (50 tasks each) and two worker processes."""
    tmp = tmp_path_factory.mktemp("workers")
    redis_server = OwnRedis()
    redis_server.start()
    fake = FakeLabelStudio(tmp, token=TOKEN)
    for project in (1, 2):
        fake.add_project(project, LABEL_CONFIG)
        (tmp / "data" / "upload" / str(project)).mkdir(parents=True)
        for i in range(N):
            name = f"data/upload/{project}/s{i}.png"
            (tmp / name).write_bytes(png_bytes(scene_for(project, i).image))
            fake.add_task(project, {"image": "/" + name})
    (tmp / "data" / "upload" / "slow.png").write_bytes(png_bytes(scene_for(3, 0).image))
    http, ls_url = serve(fake)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "CACHE_", "QUEUE_", "JOB_", "PROMETHEUS_"))}
    env.update({"FASTSAM_WEIGHTS": str(fastsam_weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF),
                "IOU": "0.7", "FASTSAM_ALLOW_DOWNLOAD": "false", "MODEL_DIR": str(tmp), "REDIS_URL": redis_server.url,
                "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "OUTBOUND_ALLOW": "127.0.0.1",
                "CLIP_ENABLED": "false", "DEFAULT_LABEL": "Banana", "JOB_RETRY_INTERVALS": "2",
                "TORCH_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    workers = [start(["worker"], env, tmp / f"worker{i}.log") for i in range(2)]
    settings = Settings(fastsam_weights=str(fastsam_weights), model_dir=tmp, imgsz=FIXTURE_IMGSZ, conf=FIXTURE_CONF,
                        iou=0.7, allow_download=False, redis_url=redis_server.url, clip_enabled=False,
                        label_studio_url=ls_url, outbound_allow="127.0.0.1", default_label="Banana")
    queues = JobQueues(QueueConfig.from_settings(settings))
    deadline = time.monotonic() + 120
    while queues.connection.scard("rq:workers") < 2:  # registered = models loaded
        assert all(w.poll() is None for w in workers), log_tail(tmp)
        assert time.monotonic() < deadline, log_tail(tmp)
        time.sleep(0.5)
    yield {"fake": fake, "ls_url": ls_url, "env": env, "tmp": tmp, "workers": workers, "queues": queues,
           "service": build_service(settings), "redis": redis_server}
    for proc in workers:
        stop(proc)
    http.shutdown()
    redis_server.kill()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fastsam_backend", *args], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def log_tail(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(tmp.glob("*.log")))


def stats(stack) -> dict[str, int]:
    raw = stack["queues"].connection.hgetall(stack["queues"].config.stats_key)
    return {k.decode(): int(v) for k, v in raw.items()}


def wait_for(job_ids: list[str], stack, timeout_s: float = 120) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        states = stack["queues"].states(job_ids)
        if all(s.status in ("finished", "failed") for s in states):
            return states
        assert time.monotonic() < deadline, (states, log_tail(stack["tmp"]))
        time.sleep(0.2)


def test_a_warm_job_enqueued_twice_runs_once(stack):
    before = stats(stack)
    url = "/data/upload/2/s49.png"
    first = enqueue_warm(stack["queues"], stack["service"], [url])
    second = enqueue_warm(stack["queues"], stack["service"], [url])
    assert (first.enqueued, second.enqueued, second.duplicate) == (1, 0, 1)
    [state] = wait_for(first.job_ids, stack)
    assert state.status == "finished" and state.result["outcome"] == "computed"
    after = stats(stack)
    assert after.get("warm:computed", 0) - before.get("warm:computed", 0) == 1
    assert after.get("warm:cached", 0) == before.get("warm:cached", 0)


def test_preannotate_on_two_workers_then_every_first_click_is_a_cache_hit(stack, tmp_path):
    fake, env = stack["fake"], stack["env"]
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "1", "--queue",
                           "--report", str(report)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + log_tail(stack["tmp"])
    summary = json.loads(report.read_text())
    assert (summary["done"], summary["failed_count"], summary["mode"]) == (N, 0, "queue")
    assert "img/s" in proc.stderr and f"{N} written" in proc.stdout
    project_tasks = [t for t, task in fake.tasks.items() if task["project"] == 1]
    assert all(len(fake.predictions_of(t)) == 1 for t in project_tasks)
    served_by = {line.split()[3] for p in stack["tmp"].glob("worker*.log")
                 for line in p.read_text().splitlines() if "Job OK (fastsam-pre-" in line}
    assert len(served_by) == 2  # both worker processes took pre-annotate jobs

    warm = subprocess.run([sys.executable, "-m", "fastsam_backend", "warm", "--project", "1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert f"{N} images: 0 warm jobs enqueued, 0 queued or running already, {N} cached already" in warm.stdout

    port = free_port()
    server = start(["serve"], {**env, "PORT": str(port), "BIND_HOST": "127.0.0.1", "WORKERS": "1"},
                   stack["tmp"] / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).json()["state"] == "ready":
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_tail(stack["tmp"])
            time.sleep(0.3)
        for i in range(N):
            scene = scene_for(1, i)
            x, y = interior_point(scene.objects[0].mask)
            body = {"tasks": [{"id": i + 1, "data": {"image": f"/data/upload/1/s{i}.png"}}],
                    "label_config": LABEL_CONFIG, "params": {"context": {"result": [keypoint(x, y, 320, 240)]}}}
            response = requests.post(f"{base}/predict", json=body, timeout=60)
            assert response.status_code == 200, response.text
        text = requests.get(f"{base}/metrics", timeout=10).text
    finally:
        stop(server)
    assert re.search(rf'^fastsam_cache_lookups_total\{{result="hit"\}} {N}\.0$', text, re.M), text[:3000]
    assert 'fastsam_cache_lookups_total{result="miss"}' not in text
    assert re.search(r"^fastsam_segment_seconds_count 0\.0$", text, re.M)
    assert 'fastsam_jobs{queue="fastsam-preannotate",state="finished"} 50.0' in text
    assert 'fastsam_job_outcomes_total{kind="preannotate",outcome="written"} 50.0' in text


def test_preannotate_in_process_stops_on_sigint_and_resumes(stack, tmp_path):
    fake, env = stack["fake"], stack["env"]
    tasks = [t for t, task in fake.tasks.items() if task["project"] == 2]
    args = [sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "2", "--batch-size", "2",
            "--report", str(tmp_path / "first.json")]
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while sum(len(fake.predictions_of(t)) for t in tasks) < 10:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["interrupted"] and 10 <= first["done"] < N - 1, first
    assert "interrupted" in out and "img/s" in err and "stopping after the current batch" in err

    args[-1] = str(tmp_path / "second.json")
    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["skipped"] >= first["done"] and second["done"] + second["skipped"] == N
    assert all(len(fake.predictions_of(t)) == 1 for t in tasks)


def test_a_worker_killed_mid_job_is_replaced_by_a_retry_and_the_image_is_cached_once(stack):
    fake, queues = stack["fake"], stack["queues"]
    fake.delays["/data/upload/slow.png"] = 6.0  # the job is downloading when its worker is killed
    before = stats(stack)
    report = enqueue_warm(queues, stack["service"], ["/data/upload/slow.png"])
    from rq.job import Job

    deadline = time.monotonic() + 30
    while True:
        job = Job.fetch(report.job_ids[0], connection=queues.connection, serializer=queues.serializer)
        if job.get_status().value == "started" and job.worker_name:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = int(job.worker_name.split("-")[1])  # fastsam-<pid>-<random>
    victim = next(w for w in stack["workers"] if w.pid == pid)
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    [state] = wait_for(report.job_ids, stack, timeout_s=90)
    assert state.status == "finished" and state.result["outcome"] == "computed", log_tail(stack["tmp"])
    assert time.monotonic() - killed_at < 60  # picked up again within a minute
    after = stats(stack)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("warm:abandoned") == 1 and delta.get("warm:retried") == 1
    assert delta.get("warm:computed") == 1 and not delta.get("warm:cached")  # segmented, and cached, once
