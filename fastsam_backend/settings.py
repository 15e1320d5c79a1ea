"""All configuration, read from the environment once (every setting in docs/configuration.md).

Nothing else in the package reads ``os.environ``: the app factory builds one
``Settings`` and hands the parts down, typed. Two documented exceptions are other libraries'
own variables, which those libraries read from the environment themselves:

- ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client): ``serve`` sets it before forking several
  workers, and ``metrics.render`` asks whether it is set, as prometheus_client does;
- ``YOLO_AUTOINSTALL`` / ``YOLO_OFFLINE`` (ultralytics): the segmenter sets defaults before it
  imports ultralytics, which reads them at import.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PointRule(str, Enum):
    """How foreground/background clicks pick masks (see ``selection.select_by_points``)."""

    SMALLEST = "smallest"  # per foreground click, the smallest mask covering it + its duplicates (default)
    PAPER = "paper"  # union of every mask containing a foreground click, minus background ones
    CASIA = "casia"  # CASIA repo: area-ordered painting, smaller masks override larger ones


class BoxRule(str, Enum):
    """How a box prompt picks its mask (see ``boxmatch.match_box``)."""

    PAPER = "paper"  # pixel IoU of the box and the mask (the paper, CASIA, ultralytics; default)
    BOX = "box"  # IoU of the prompt box and the mask's own box; pixel IoU breaks ties
    FIT = "fit"  # that box IoU times the share of the mask inside the prompt box; pixel IoU breaks ties


class InteractiveOutput(str, Enum):
    """Which region types interactive answers come as."""

    AUTO = "auto"  # polygon when the config has PolygonLabels and no BrushLabels, brush otherwise
    BRUSH = "brush"
    POLYGON = "polygon"
    BOTH = "both"  # a brush and a polygon region per answer (each where the config has the tag)


class LabelMode(str, Enum):
    """How pre-annotation labels instances."""

    CLIP = "clip"  # zero-shot against the project's labels (falls back to FIRST without CLIP)
    FIRST = "first"  # the first label of the tag
    NONE = "none"  # no label (the annotator picks)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- model -------------------------------------------------------------
    fastsam_weights: str = Field("FastSAM-s.pt", description="path or released name")
    model_dir: Path = Field(Path("models"), description="where released weights are looked up")
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'")
    imgsz: int = Field(1024, ge=32, le=4096)
    conf: float = Field(0.4, ge=0.0, le=1.0)
    iou: float = Field(0.9, ge=0.0, le=1.0)
    max_det: int = Field(300, ge=1, le=3000)
    fastsam_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="how a .pt is served on a CPU: auto (its ONNX Runtime export when the masks match), "
                            "torch, onnx")
    allow_download: bool = Field(
        True, validation_alias=AliasChoices("FASTSAM_ALLOW_DOWNLOAD", "ALLOW_DOWNLOAD")
    )

    # --- selection ---------------------------------------------------------
    point_rule: PointRule = PointRule.SMALLEST
    morphology: bool = True
    # issue #15 (box rules, polygon answers) -------------------------------------
    box_rule: BoxRule = BoxRule.FIT
    interactive_output: InteractiveOutput = InteractiveOutput.AUTO
    polygon_tolerance_px: float = Field(
        1.0, ge=0, le=50, description="polygon simplification (Douglas-Peucker) tolerance, pixels"
    )
    polygon_max_points: int = Field(
        400, ge=8, le=100_000, description="vertex cap per polygon region (the tolerance grows until it fits)"
    )

    # --- CLIP (text prompts, zero-shot labels) -------------------------------
    clip_enabled: bool = True
    open_clip_model: str = Field("ViT-B-32", description="open_clip model name, or a model config .json path")
    open_clip_pretrained: str = Field("openai", description="open_clip pretrained tag, or a checkpoint path")
    clip_min_mask_area: int = Field(100, ge=0, description="masks of this many pixels or fewer are not scored")
    clip_image_size: int = Field(0, ge=0, le=1024, description="opt-in: CLIP image tower input side (0: the "
                                                                  "model's own); faster, approximate")
    clip_int8: bool = Field(False, description="opt-in: CLIP image tower in dynamic int8 on a CPU; faster, approximate")
    clip_dense_size: int = Field(0, ge=0, le=2048, description="opt-in: one CLIP pass of the whole image at this "
                                 "side, each mask pooled from its patch tokens (0: off); much faster, approximate")
    clip_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="CLIP's image tower on a CPU: auto (its ONNX Runtime export when the embeddings "
                            "match torch's), torch, onnx")
    text_margin: float = Field(
        0.02, ge=0, description="'all red circles': every mask within this cosine margin of the best"
    )

    # --- exemplar prompts (issue #26: one object marked -> every object of its kind) ---
    exemplar_tags: str = Field(
        "similar", pattern=r"^[^<>\"]*$",
        description="comma-separated names of smart KeyPointLabels/RectangleLabels tags that are exemplar tools"
    )
    exemplar_min_similarity: float = Field(
        0.3, ge=0, le=1, description="an instance below this similarity to the exemplar(s) is never answered; "
        "above it, the image's own look-alikes decide the cut (docs/exemplars.md)"
    )

    # --- pre-annotation (no context) ------------------------------------------
    preannotate_min_area: float = Field(
        0.0005, ge=0, description="drop instances smaller than this fraction of the image"
    )
    preannotate_max_instances: int = Field(100, ge=1)
    preannotate_min_score: float = Field(0.0, ge=0, le=1, description="drop instances below this confidence")
    label_mode: LabelMode = LabelMode.CLIP
    label_min_similarity: float = Field(
        0.2, description="CLIP cosine below which an instance is dropped (or gets DEFAULT_LABEL)"
    )
    default_label: str | None = Field(None, description="label for instances CLIP cannot place")

    # --- labels learned from annotations (fastsam_backend/learning.py) -------------
    learn_enabled: bool = Field(True, description="learn labels from LS's annotation webhooks (needs CLIP)")
    learn_min_examples: int = Field(
        3, ge=1, description="a label is predicted from its examples once it has this many; zero-shot before"
    )
    learn_match_iou: float = Field(
        0.5, ge=0, le=1, description="an annotated region uses the cached instance it overlaps this much"
    )
    learn_min_similarity: float = Field(
        0.8, ge=-1, le=1, description="a click or box without a label takes the learned label of its mask, while "
        "some labels are not learned yet, only when its crop is at least this close (cosine) to that label's prototype"
    )
    learn_significance: float = Field(
        0.05, gt=0, le=1, description="learned labels label a tag's instances only when, leave-one-out on the "
        "project's examples, they beat zero-shot at this one-sided sign-test p-value; else zero-shot decides"
    )
    learn_refresh_s: float = Field(
        2.0, ge=0, description="seconds a process trusts a project's example revision without asking Redis (a "
        "click then makes no round trip for it); another process's new examples are seen up to this late"
    )
    learn_backlog: int = Field(
        100, ge=1, description="annotation events waiting to be learned in the server process when there are no "
        "job queues (no REDIS_URL); one more is answered 503"
    )

    # --- FastSAM fine-tuning (fastsam_backend/finetune/, jobs/train.py) --------
    finetune_enabled: bool = Field(False, description="allow `train` jobs (each project still opts in)")
    finetune_epochs: int = Field(3, ge=1, le=100, description="training epochs of one train job")
    finetune_imgsz: int = Field(640, ge=32, le=4096, description="training image size")
    finetune_device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', '0'")
    finetune_margin: float = Field(0.02, ge=0, le=1, description="adopt only if better by this on both figures")
    finetune_min_heldout: int = Field(20, ge=1, description="held-out ground-truth masks needed to decide")
    finetune_max_loaded: int = Field(2, ge=1, le=64, description="tuned models kept loaded per process (LRU)")

    # --- cache -------------------------------------------------------------
    redis_url: str | None = None
    cache_prefix: str = "fastsam:"
    cache_ttl_s: int = Field(24 * 3600, ge=0, description="0 = no expiry")
    cache_max_bytes: int = Field(512 * 1024 * 1024, ge=0, description="embedded cache bound")

    # --- background jobs (RQ workers; see fastsam_backend/jobs/) -------------------
    queue_redis_url: str | None = Field(
        None, description="Redis of the job queues; unset = REDIS_URL (the cache's own Redis)"
    )
    queue_prefix: str = Field("fastsam-", pattern=r"^[A-Za-z0-9_.:-]*$",
                              description="prefix of the queue names, job ids and bookkeeping keys")
    job_timeout_s: int = Field(60, ge=5, le=3600, description="a job running longer is stopped (and retried)")
    job_retries: int = Field(3, ge=0, le=20, description="retries of a failed or abandoned job")
    worker_prefetch: bool = Field(True, description="a worker takes its next warm job ahead and fetches and "
                                  "decodes its image while the current job runs")
    worker_batch: int = Field(0, ge=0, le=64, description="warm jobs a worker segments in one forward pass; "
                              "0 = 8 on a GPU, 1 (one by one) on a CPU, where a batch gains nothing")
    job_retry_intervals: str = Field(
        "5,30,120", pattern=r"^\s*\d+(\s*,\s*\d+)*\s*$",
        description="seconds before retry 1, 2, ... (the last one repeats)"
    )
    job_result_ttl_s: int = Field(3600, ge=0, description="how long finished jobs and their results are kept")

    # --- images ------------------------------------------------------------
    remember_image_urls: bool = Field(
        True, description="map an image URL to its content digest in the cache, so a click on a "
        "cached image downloads nothing (LS upload/local-files URLs never change content)"
    )
    url_memo_ttl_s: float = Field(
        60.0, ge=0, description="seconds this process keeps a URL -> digest mapping in memory (a warm click "
        "then needs no Redis round trip); 0 = ask the cache every time"
    )
    label_studio_url: str | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
    )
    label_studio_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")
    )
    local_files_document_root: Path | None = None
    verify_ssl: bool = True
    download_timeout_s: float = Field(30.0, gt=0)
    max_image_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(64_000_000, gt=0)

    # --- server ------------------------------------------------------------
    bind_host: str = Field("0.0.0.0", description="bind address (not HOST: Label Studio reads that one)")
    port: int = Field(9090, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="gunicorn processes (each loads the model)")
    threads: int = Field(4, ge=1, le=256, description="threads per worker (clicks are served concurrently)")
    torch_threads: int = Field(0, ge=0, le=256, description="torch CPU threads per worker; 0 = CPU cores / WORKERS")
    timeout_s: int = Field(120, ge=1, description="gunicorn worker timeout; LS waits 100 s for /predict")
    batch_time_budget_s: float = Field(
        80.0, ge=0, description="a multi-task /predict stops starting tasks after this long (0 = never)"
    )
    predict_deadline_s: float = Field(
        90.0, ge=0, lt=100, description="a /predict is answered 504 once it has run this long, checked between "
        "stages (LS gives up after 100 s); 0 = none"
    )
    max_cold_images: int = Field(
        2, ge=1, description="images fetched, decoded and segmented at once per worker; others queue"
    )
    load_on_start: bool = Field(
        True, description="each worker loads its models in the background as soon as it starts"
    )
    load_wait_s: float = Field(30.0, gt=0, description="a request arriving during that load waits this long for it")
    basic_auth_user: str | None = None
    basic_auth_pass: SecretStr | None = None
    log_level: str = "INFO"
    max_request_bytes: int = Field(256 * 1024 * 1024, gt=0)

    @field_validator(
        "redis_url", "queue_redis_url", "label_studio_url", "basic_auth_user", "default_label",
        "local_files_document_root", "label_studio_api_key", "basic_auth_pass", mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """``VAR=`` in an env file means unset (compose passes empty strings for missing vars)."""
        return None if value == "" else value

    def torch_threads_per_worker(self) -> int:
        """``TORCH_THREADS``, or this machine's CPU cores shared out between the gunicorn workers."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, available_cores() // self.workers)

    def inference_params(self) -> dict[str, object]:
        """Parameters that change the all-instance masks (go into cache keys and model_version)."""
        return {"imgsz": self.imgsz, "conf": self.conf, "iou": self.iou, "max_det": self.max_det}

    # --- outbound requests (image downloads; see fastsam_backend/outbound.py) ---
    outbound_allow: str | None = Field(
        None, description="hosts, host:port, addresses and CIDR networks image downloads may reach although "
        "they are loopback/private/link-local (comma- or space-separated); LABEL_STUDIO_URL's host:port always may"
    )
    outbound_max_redirects: int = Field(5, ge=0, le=20, description="redirects followed per image download")

    @field_validator("outbound_allow")
    @classmethod
    def _valid_allow_list(cls, value: str | None) -> str | None:
        """A typo in the allow-list fails at start-up, naming the entry, not on the first image."""
        from fastsam_backend.outbound import AllowList  # imported here: settings stays importable on its own

        if value is not None and value.strip():
            AllowList.parse(value)
            return value
        return None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; keyword overrides win (tests, the CLI)."""
    return Settings(**overrides)
