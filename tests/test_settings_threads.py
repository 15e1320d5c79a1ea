"""TORCH_THREADS: CPU cores are shared out between gunicorn workers unless set."""

import os

from fastsam_backend.models.segmenter import SegmenterConfig
from fastsam_backend.settings import Settings


def test_torch_threads_default_shares_the_cores_between_workers():
    cores = len(os.sched_getaffinity(0))
    assert Settings(workers=1).torch_threads_per_worker() == cores
    assert Settings(workers=64).torch_threads_per_worker() == max(1, cores // 64)
    assert Settings(workers=2, torch_threads=3).torch_threads_per_worker() == 3
    assert SegmenterConfig.from_settings(Settings(workers=2, torch_threads=5)).torch_threads == 5
