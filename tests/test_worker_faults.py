"""Faults at project scale (issue #27), with real ``fastsam-backend worker`` processes and the trained
fixture model on a ``redis-server`` of their own (no persistence, as compose runs it), against the
fake Label Studio (``quality/fakels.py``):

- Redis killed in the middle of ``preannotate --queue`` and restarted 3 s later: both workers ride
  through (no traceback, still taking jobs afterwards), the command waits, enqueues again the jobs
  the empty Redis lost and completes by itself with exactly one prediction per task;
- no worker listening: the command says so by name and keeps waiting, or with
  ``--fallback-in-process`` predicts in its own process;
- a Redis that stays away past ``--max-outage``: one line naming it and the command that resumes,
  exit 75, no traceback.

The same fault with a real Label Studio and one worker SIGKILLed is in
``tests/real_ls/test_faults_ls.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastsam_backend.jobs.enqueue import enqueue_warm
from fastsam_backend.jobs.queues import JobQueues, QueueConfig
from fastsam_backend.quality.fakels import FakeLabelStudio, serve
from fastsam_backend.quality.net import free_port
from fastsam_backend.quality.scenes import generate_scene
from fastsam_backend.service.orchestrator import build_service
from fastsam_backend.settings import Settings
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ, OwnRedis
from tests.helpers import LABEL_CONFIG, png_bytes
from tests.test_workers import log_tail, start, stop

pytestmark = [pytest.mark.slow, pytest.mark.model]
REPO = Path(__file__).resolve().parents[1]
TOKEN = "f" * 40
N = 24  # project 1: the Redis restart; 2: no worker; 3: Redis away for good; 4: warm --wait


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fastsam_weights):
    tmp = tmp_path_factory.mktemp("faults")
    redis_server = OwnRedis()
    redis_server.start()
    fake = FakeLabelStudio(tmp, token=TOKEN)
    for project, n in ((1, N), (2, 3), (3, 1), (4, 12)):
        fake.add_project(project, LABEL_CONFIG)
        (tmp / "data" / "upload" / str(project)).mkdir(parents=True)
        for i in range(n):
            name = f"data/upload/{project}/s{i}.png"
            (tmp / name).write_bytes(png_bytes(generate_scene(8_000_000 + 1000 * project + i, (240, 320)).image))
            fake.add_task(project, {"image": "/" + name})
    http, ls_url = serve(fake)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTSAM_", "REDIS_", "LABEL_STUDIO", "CACHE_", "QUEUE_", "JOB_", "PROMETHEUS_"))}
    env.update({"FASTSAM_WEIGHTS": str(fastsam_weights), "IMGSZ": str(FIXTURE_IMGSZ), "CONF": str(FIXTURE_CONF),
                "IOU": "0.7", "FASTSAM_ALLOW_DOWNLOAD": "false", "MODEL_DIR": str(tmp), "REDIS_URL": redis_server.url,
                "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "OUTBOUND_ALLOW": "127.0.0.1",
                # retries spread over 14 s: a warm job that met the ~4 s outage (the cache answers "not
                # cached" while Redis is away) must outlast it on a loaded machine too (2 s each fell short)
                "CLIP_ENABLED": "false", "DEFAULT_LABEL": "Banana", "JOB_RETRY_INTERVALS": "2,4,8",
                "TORCH_THREADS": "1", "YOLO_OFFLINE": "1", "LOG_LEVEL": "INFO", "PYTHONPATH": str(REPO)})
    workers = [start(["worker"], env, tmp / f"worker{i}.log") for i in range(2)]
    settings = Settings(fastsam_weights=str(fastsam_weights), model_dir=tmp, imgsz=FIXTURE_IMGSZ, conf=FIXTURE_CONF,
                        iou=0.7, allow_download=False, redis_url=redis_server.url, clip_enabled=False,
                        label_studio_url=ls_url, outbound_allow="127.0.0.1", default_label="Banana")
    queues = JobQueues(QueueConfig.from_settings(settings))
    wait_until(lambda: queues.connection.scard("rq:workers") >= 2, 120, lambda: log_tail(tmp), workers)
    yield {"fake": fake, "env": env, "tmp": tmp, "workers": workers, "queues": queues, "redis": redis_server,
           "service": build_service(settings)}
    for proc in workers:
        stop(proc)
    http.shutdown()
    redis_server.kill()


def wait_until(check, timeout_s: float, why, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert all(p.poll() is None for p in procs), why()
        assert time.monotonic() < deadline, why()
        time.sleep(0.2)


def predictions(fake: FakeLabelStudio, project: int) -> dict[int, int]:
    return {t: len(fake.predictions_of(t)) for t, task in fake.tasks.items() if task["project"] == project}


def test_redis_restarted_mid_preannotate_workers_ride_through_and_the_run_completes(stack):
    fake, env, redis_server = stack["fake"], stack["env"], stack["redis"]
    proc = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "1", "--queue"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: sum(predictions(fake, 1).values()) >= 2, 180, lambda: log_tail(stack["tmp"]), [proc])
    redis_server.kill()  # jobs queued, jobs running: all gone with it
    time.sleep(3)
    redis_server.start()  # same port, empty
    out, err = proc.communicate(timeout=300)
    logs = log_tail(stack["tmp"])
    assert proc.returncode == 0, out[-2000:] + err[-3000:] + logs
    counts = predictions(fake, 1)
    assert sorted(set(counts.values())) == [1], counts  # every task, exactly once
    assert "jobs lost in a Redis restart were enqueued again" in out, out
    assert "redis=down" in err and "Traceback" not in err, err[-3000:]
    for i, worker in enumerate(stack["workers"]):
        assert worker.poll() is None, logs
        text = (stack["tmp"] / f"worker{i}.log").read_text()
        assert "Traceback" not in text and "quitting" not in text, text[-3000:]
    # both still take jobs (and are registered again on the Redis that came back empty)
    assert stack["queues"].connection.scard("rq:workers") == 2
    report = enqueue_warm(stack["queues"], stack["service"], ["/data/upload/2/s0.png"])
    deadline = time.monotonic() + 60
    while (state := stack["queues"].states(report.job_ids)[0]).status != "finished":
        assert state.status != "failed" and time.monotonic() < deadline, (state, log_tail(stack["tmp"]))
        time.sleep(0.2)


def test_redis_restarted_mid_warm_wait_every_image_ends_cached(stack):
    """The empty Redis lost the queued warm jobs and the cache entries made so far: ``warm --wait``
    enqueues again each image the cache does not hold, and ends with every image cached."""
    env, redis_server, queues = stack["env"], stack["redis"], stack["queues"]
    computed = lambda: int(queues.connection.hget(queues.config.stats_key, "warm:computed") or 0)  # noqa: E731
    before = computed()
    proc = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "warm", "--project", "4", "--wait"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: computed() >= before + 2, 180, lambda: log_tail(stack["tmp"]), [proc])
    redis_server.kill()
    time.sleep(3)
    redis_server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:] + log_tail(stack["tmp"])
    assert "Traceback" not in err and "redis=down" in err, err[-3000:]
    assert "12 images: 12 warm jobs enqueued" in out and "failed" not in out, out
    service = stack["service"]
    assert all(service.image_key_if_cached(f"/data/upload/4/s{i}.png") is not None for i in range(12))
    assert all(w.poll() is None for w in stack["workers"])


def test_no_worker_listening_is_named_and_the_run_waits(stack):
    """Its own Redis, which no worker listens on: the message comes, the command keeps waiting."""
    lonely = OwnRedis()
    lonely.start()
    try:
        env = {**stack["env"], "REDIS_URL": lonely.url}
        proc = subprocess.Popen([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "2", "--queue"],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
        reader.start()
        wait_until(lambda: "no worker is listening" in "".join(chunks), 90, lambda: "".join(chunks)[-2000:], [proc])
        time.sleep(2)
        assert proc.poll() is None  # still waiting for a worker
        proc.send_signal(signal.SIGINT)
        out = proc.stdout.read()
        proc.wait(60)
        reader.join(10)
        seen = "".join(chunks)
    finally:
        lonely.kill()
    assert "no worker is listening on fastsam-preannotate: start fastsam-backend worker (waiting for one)" in seen
    assert proc.returncode == 130 and "3 still queued" in out, out + seen[-2000:]
    assert all(n == 0 for n in predictions(stack["fake"], 2).values())


def test_fallback_in_process_predicts_here_when_no_worker_listens(stack):
    lonely = OwnRedis()
    lonely.start()
    try:
        env = {**stack["env"], "REDIS_URL": lonely.url}
        run = subprocess.run([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "2", "--queue",
                              "--fallback-in-process"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        left = lonely.raw().llen("rq:queue:fastsam-preannotate")
    finally:
        lonely.kill()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no worker is listening on fastsam-preannotate" in run.stderr
    assert "(queue, then in-process (no worker))" in run.stdout and "3 written" in run.stdout, run.stdout
    assert sorted(set(predictions(stack["fake"], 2).values())) == [1]
    assert left == 0  # the jobs it took back are not left for a worker that starts later


def test_a_redis_that_stays_away_ends_the_run_with_one_line(stack, tmp_path):
    env = {**stack["env"], "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    run = subprocess.run([sys.executable, "-m", "fastsam_backend", "preannotate", "--project", "3", "--queue",
                          "--max-outage", "2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 75, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and "stayed unreachable" in last[0], run.stderr[-2000:]
    assert "run `fastsam-backend preannotate --project 3 --queue` to resume" in last[0]


def test_health_and_metrics_show_live_workers_per_queue(stack):
    from fastsam_backend.server import create_app

    service = stack["service"]
    client = create_app(service.settings, service).test_client()
    health = client.get("/health").get_json()
    assert health["jobs"] == {"redis": "up", "workers": {"fastsam-warm": 2, "fastsam-preannotate": 2,
                                                          "fastsam-train": 0, "fastsam-learn": 2}}, health
    text = client.get("/metrics").get_data(as_text=True)
    assert 'fastsam_job_workers_listening{queue="fastsam-preannotate"} 2.0' in text, text[-3000:]
    assert 'fastsam_job_workers_listening{queue="fastsam-train"} 0.0' in text
