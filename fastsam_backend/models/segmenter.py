"""The FastSAM model wrapper: the only module that touches ultralytics and torch.

``Segmenter.segment(image)`` runs FastSAM's all-instance pass once and returns a
``MaskSet`` at the original resolution: the masks ultralytics' ``retina_masks`` makes
(prototype logits upsampled to the image, then thresholded — no jagged edges), but
decoded inside each box only (``boxmasks``).
The model is loaded lazily, once per process, under a lock; a load failure is
remembered (and retried at most every ``RETRY_AFTER_S``) so every request gets
the same clear message instead of a stack trace.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.boxmasks import decode_box_masks
from fastsam_backend.models.digest import file_digest
from fastsam_backend.models.reach import require_reachable

if TYPE_CHECKING:
    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)

RELEASED_WEIGHTS = {
    "FastSAM-s.pt": "https://github.com/ultralytics/assets/releases/download/v8.3.0/FastSAM-s.pt",
    "FastSAM-x.pt": "https://github.com/ultralytics/assets/releases/download/v8.3.0/FastSAM-x.pt",
}
RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class SegmenterConfig:
    weights: str  # a path, or a released name (FastSAM-s.pt / FastSAM-x.pt)
    model_dir: Path
    device: str = "auto"
    imgsz: int = 1024
    conf: float = 0.4
    iou: float = 0.9
    max_det: int = 300
    allow_download: bool = True
    torch_threads: int = 0  # CPU threads for inference in this process; 0 = leave torch's default
    runtime: str = "torch"  # auto | torch | onnx: how a .pt is served on a CPU (models/runtime.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> SegmenterConfig:
        return cls(
            weights=settings.fastsam_weights,
            model_dir=Path(settings.model_dir),
            device=settings.device,
            imgsz=settings.imgsz,
            conf=settings.conf,
            iou=settings.iou,
            max_det=settings.max_det,
            allow_download=settings.allow_download,
            torch_threads=settings.torch_threads_per_worker(),
            runtime=settings.fastsam_runtime,
        )


def resolve_weights(weights: str, model_dir: Path) -> Path | None:
    """The local file for ``weights``: the path itself, or ``model_dir/<name>`` for a bare name."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.parent == Path(".") and (model_dir / path.name).is_file():
        return model_dir / path.name
    return None


def missing_weights_message(weights: str, model_dir: Path, cause: str | None = None) -> str:
    name = Path(weights).name
    lines = [f"FastSAM weights '{weights}' not found (looked at '{weights}' and '{model_dir / name}')."]
    if cause:
        lines.append(f"Download failed: {cause}.")
    if name in RELEASED_WEIGHTS:
        lines.append(
            f"Download {RELEASED_WEIGHTS[name]} into {model_dir}/ (or mount it there), "
            "or set FASTSAM_WEIGHTS to the file's path."
        )
    else:
        lines.append("Set FASTSAM_WEIGHTS to an existing checkpoint, or to FastSAM-s.pt / FastSAM-x.pt.")
    return " ".join(lines)


class Segmenter:
    """FastSAM all-instance segmentation; thread-safe, one model per process."""

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self._model: Any = None
        self._device: str | None = None
        self._error: tuple[float, str] | None = None
        self._load_lock = threading.Lock()
        self._infer_lock = threading.Lock()  # ultralytics predictors keep per-call state
        self._identity: str | None = None
        self.runtime: str | None = None  # what serves once loaded: 'torch' or 'onnx'

    # --------------------------------------------------------------- identity
    @property
    def identity(self) -> str:
        """Names the checkpoint in cache keys and ``model_version``; never loads the model and does
        not change when it loads: a path is its stem + content digest; a bare released name
        (``FastSAM-s.pt``, looked up in ``MODEL_DIR`` or downloaded) is the release's name,
        whether or not the file is there yet (released files do not change)."""
        if self._identity is None:
            weights = Path(self.config.weights)
            if weights.parent == Path(".") and weights.name in RELEASED_WEIGHTS:
                self._identity = weights.stem
            else:
                path = resolve_weights(self.config.weights, self.config.model_dir)
                self._identity = f"{weights.stem}-{file_digest(path)}" if path else weights.stem
        return self._identity

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def error(self) -> str | None:
        return self._error[1] if self._error else None

    def missing_message(self) -> str:
        """What to do about weights that are not there (for /health and 503s)."""
        return missing_weights_message(self.config.weights, self.config.model_dir)

    def weights_available(self) -> bool:
        return resolve_weights(self.config.weights, self.config.model_dir) is not None or (
            self.config.allow_download and Path(self.config.weights).name in RELEASED_WEIGHTS
        )

    # ------------------------------------------------------------------ load
    def _pick_device(self) -> str:
        import torch

        if self.config.device != "auto":
            return self.config.device
        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def load(self) -> None:
        """Load the model now (idempotent). Raises ModelUnavailable with a how-to message."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            if self._error and time.monotonic() - self._error[0] < RETRY_AFTER_S:
                raise ModelUnavailable(self._error[1])
            try:
                model = self._load_model()
                with torch_threads_kept():  # the export and its check go through ultralytics' set-up
                    self._device = self._pick_device()
                    self._model, self.runtime = self._runtime_for(model)
                self._error = None
            except ModelUnavailable as exc:
                self._error = (time.monotonic(), exc.message)
                raise

    def _load_model(self) -> Any:
        # A server must not pip-install packages or phone home at run time (ultralytics does both
        # by default); set before its first import. Downloads of released weights still work.
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")
        os.environ.setdefault("YOLO_OFFLINE", "false" if self.config.allow_download else "true")
        cfg = self.config
        path = resolve_weights(cfg.weights, cfg.model_dir)
        name = Path(cfg.weights).name
        if path is None:
            if not (cfg.allow_download and name in RELEASED_WEIGHTS and Path(cfg.weights).parent == Path(".")):
                raise ModelUnavailable(missing_weights_message(cfg.weights, cfg.model_dir))
            require_reachable(RELEASED_WEIGHTS[name], f"FastSAM weights '{name}'",
                              f"put the file into {cfg.model_dir}/ or set FASTSAM_WEIGHTS to its path, or "
                              "FASTSAM_ALLOW_DOWNLOAD=false (never try)")
            cfg.model_dir.mkdir(parents=True, exist_ok=True)
            target = cfg.model_dir / name
            try:
                from ultralytics.utils.downloads import attempt_download_asset

                path = Path(attempt_download_asset(target))
            except Exception as exc:  # network errors come in many types
                raise ModelUnavailable(missing_weights_message(cfg.weights, cfg.model_dir, str(exc))) from exc
            if not path.is_file():
                raise ModelUnavailable(missing_weights_message(cfg.weights, cfg.model_dir, "no file written"))
        if cfg.torch_threads > 0:  # after the weights are found: a missing file needs no torch
            import torch

            # several workers each using every core slow each other down (bench: 2 workers
            # on 2 cores gave 0.83x the images/min of one)
            torch.set_num_threads(cfg.torch_threads)
        log.info("loading FastSAM weights %s", path)
        from ultralytics import FastSAM

        try:
            model = FastSAM(str(path))
        except Exception as exc:
            raise ModelUnavailable(f"FastSAM weights '{path}' could not be loaded: {exc}") from exc
        if getattr(model, "task", "segment") != "segment":
            raise ModelUnavailable(f"'{path}' is a {model.task} model; FastSAM needs a segmentation checkpoint")
        if path.suffix == ".onnx":
            exported = onnx_fixed_imgsz(path)
            if exported is not None and exported != cfg.imgsz:
                raise ModelUnavailable(
                    f"'{path}' was exported for a fixed imgsz {exported} but IMGSZ is {cfg.imgsz}: set "
                    f"IMGSZ={exported}, or export with dynamic axes (`fastsam-backend export-onnx`)")
        return model

    def _runtime_for(self, model: Any) -> tuple[Any, str]:
        """``(model, runtime)`` to serve: the ONNX Runtime export of a ``.pt`` on a CPU when
        ``runtime`` allows it and its masks match torch's (``models/runtime.py``), else ``model``."""
        cfg = self.config
        path = resolve_weights(cfg.weights, cfg.model_dir)
        if path is None or path.suffix != ".pt" or cfg.runtime == "torch" or (self.on_gpu and cfg.runtime == "auto"):
            return model, "onnx" if path is not None and path.suffix == ".onnx" else "torch"
        from fastsam_backend.models.runtime import serve_onnx

        onnx_model = serve_onnx(cfg.runtime, path, cfg.model_dir, cfg.imgsz, model,
                                lambda m, image: self._predict(m, [image])[0])
        return (onnx_model, "onnx") if onnx_model is not None else (model, "torch")

    def export_onnx(self) -> Path:
        """Export the loaded weights to ONNX (beside them); needs ``onnx`` + ``onnxslim``.

        Dynamic axes: ultralytics then letterboxes as for torch (minimal padding), so the masks
        match torch's on any aspect ratio, and one file serves any IMGSZ."""
        self.load()  # same resolution/download path as serving: a clear error if the weights are missing
        with torch_threads_kept():
            return Path(self._model.export(format="onnx", imgsz=self.config.imgsz, dynamic=True, device="cpu",
                                           verbose=False))

    @property
    def on_gpu(self) -> bool:
        """The model runs on CUDA (known once loaded; before that, what ``DEVICE`` asks for)."""
        return str(self._device or self.config.device).startswith("cuda")

    @property
    def batches(self) -> bool:
        """Whether ``segment_batch`` runs one forward pass for several images: a PyTorch
        checkpoint (ONNX and other exports may have a fixed batch of one) on a GPU (on a CPU a
        batch takes as long as its images one by one, and holds them all in memory)."""
        return self.on_gpu and self.runtime != "onnx" and Path(self.config.weights).suffix not in (".onnx", ".engine")

    # --------------------------------------------------------------- segment
    def segment(self, image: np.ndarray) -> MaskSet:
        """All instances of ``image`` (``(H, W, 3)`` uint8 RGB), masks at original resolution.

        Zero detections give an empty ``MaskSet``, not an error.
        """
        return self.segment_batch([image])[0]

    def segment_batch(self, images: list[np.ndarray]) -> list[MaskSet]:
        """``segment`` of each image, in one forward pass when the images share a shape and
        ``batches`` holds, else one pass each. Same-shape images get the letterbox a single image
        gets, so the masks are those ``segment`` makes (cache entries must not depend on which path
        filled them)."""
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        self.load()
        if len(images) > 1 and (not self.batches or len({im.shape for im in images}) > 1):
            return [self.segment_batch([im])[0] for im in images]
        return self._predict(self._model, images)

    def _predict(self, model: Any, images: list[np.ndarray]) -> list[MaskSet]:
        import torch

        cfg = self.config
        bgr = [np.ascontiguousarray(im[:, :, ::-1]) for im in images]  # ultralytics reads numpy as BGR (cv2)
        # Per-box decoding is a loop of small matrix products: on a CPU it replaces the dominant cost,
        # on a GPU ultralytics' few large upsampling kernels are faster (H200: 4 ms against 40 ms).
        on_cpu = not self.on_gpu
        with self._infer_lock, torch.inference_mode():
            results = model.predict(
                bgr if len(bgr) > 1 else bgr[0],
                predictor=box_mask_predictor() if on_cpu else None,
                retina_masks=not on_cpu,
                device=self._device,
                imgsz=cfg.imgsz,
                conf=cfg.conf,
                iou=cfg.iou,
                max_det=cfg.max_det,
                verbose=False,
            )
            if on_cpu:
                return [r.instance_masks for r in results]
            return [masks_from_result(r, im.shape[:2]) for r, im in zip(results, images)]


def onnx_fixed_imgsz(path: Path) -> int | None:
    """The input size a static ultralytics ONNX export was made for (from its metadata); None for
    a dynamic export (any size, and the same letterbox as torch) or when it cannot be read."""
    try:
        import ast

        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if ast.literal_eval(meta.get("args", "{}")).get("dynamic"):
            return None
        size = ast.literal_eval(meta["imgsz"])
        return int(max(size)) if isinstance(size, (list, tuple)) else int(size)
    except Exception:  # no onnx package or no metadata: ultralytics itself reports a shape mismatch
        return None


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """torch's thread count as it was before the block.

    ultralytics' ``select_device`` (predictor set-up, export) sets it to ``min(8, cores - 1)`` for
    CPU training: 1 on 2 cores, which halved every later torch op of the process (CLIP's text
    tower, the mask decoding, FastSAM under ``FASTSAM_RUNTIME=torch``) and overrode the workers'
    ``TORCH_THREADS`` plan."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@cache
def box_mask_predictor() -> type:
    """ultralytics' ``FastSAMPredictor`` with its retina-mask step replaced by ``decode_box_masks``
    (same masks, upsampled inside each box only). Built on first use: importing this module
    must not import ultralytics."""
    from ultralytics.engine.results import Results
    from ultralytics.models.fastsam import FastSAMPredictor
    from ultralytics.utils import ops

    class BoxMaskPredictor(FastSAMPredictor):
        def setup_model(self, model, verbose: bool = True):  # ultralytics' signature
            with torch_threads_kept():
                return super().setup_model(model, verbose=verbose)

        def construct_result(self, pred, img, orig_img, img_path, proto):  # ultralytics' signature
            pred[:, :4] = ops.scale_boxes(img.shape[2:], pred[:, :4], orig_img.shape)
            masks = decode_box_masks(proto, pred[:, 6:], pred[:, :4], pred[:, 4], orig_img.shape[:2])
            result = Results(orig_img, path=img_path, names=self.model.names, boxes=pred[:, :6])
            result.instance_masks = masks
            return result

    return BoxMaskPredictor


def masks_from_result(result: Any, image_size: tuple[int, int]) -> MaskSet:
    """ultralytics ``Results`` with retina masks → ``MaskSet`` (tight boxes computed on the device,
    crops to numpy). ``Segmenter`` decodes its own; this reads a stock predictor's (tests, bench)."""
    if result.masks is None or len(result) == 0:
        return MaskSet.empty(image_size)
    data = result.masks.data  # (N, H, W) uint8/float at original size (retina masks)
    if tuple(data.shape[1:]) != tuple(image_size):
        raise RuntimeError(f"masks are {tuple(data.shape[1:])}, image is {image_size}: retina_masks not applied")
    data = data.bool()
    scores = result.boxes.conf.float().cpu().numpy()
    rows, cols = data.any(dim=2), data.any(dim=1)  # (N, H), (N, W)
    keep = rows.any(dim=1).cpu().numpy()
    h, w = image_size
    # argmax of a 0/1 row finds the first True; on the flipped row, the last one
    y0, x0 = rows.float().argmax(dim=1), cols.float().argmax(dim=1)
    y1 = h - rows.flip(1).float().argmax(dim=1)
    x1 = w - cols.flip(1).float().argmax(dim=1)
    boxes = np.stack([t.cpu().numpy() for t in (x0, y0, x1, y1)], axis=1).astype(np.int32)
    idx = np.flatnonzero(keep)
    crops = tuple(
        data[i, boxes[i, 1] : boxes[i, 3], boxes[i, 0] : boxes[i, 2]].cpu().numpy() for i in idx
    )
    return MaskSet(tuple(image_size), boxes[idx], scores[idx].astype(np.float32), crops)
