"""Random-weight FastSAM-architecture checkpoints, built offline for timing.

FastSAM-s is YOLOv8s-seg and FastSAM-x is YOLOv8x-seg, both with one class
(``nc`` must be 1: FastSAM's postprocess assumes it). Released weights cannot be
downloaded here, and speed does not depend on weight values, so the benchmark
builds the architectures with random weights and makes them behave like a
trained model in the two ways that *do* change the cost of an everything pass:

* **activations**: every BatchNorm gets the statistics of a real image (one
  forward pass in train mode, data-dependent init), so features are O(1) and
  follow the image (with the default init they vanish, ~1e-6, and every mask
  is its whole box);
* **mask shape**: the prototype branch is made spatially smooth (channel mixing
  + box blur, nearest upsampling: same layers and FLOPs), so masks are blobs
  with a few pieces, not pixel noise;
* **instance count**: the class head's bias is shifted so that about ``target``
  detections survive ``conf`` + NMS on a calibration image (mask decoding and
  encoding scale with it). The actual count is always measured and reported.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCH_YAMLS = {"n": "yolov8n-seg.yaml", "s": "yolov8s-seg.yaml", "x": "yolov8x-seg.yaml"}
ARCH_NAMES = {"n": "FastSAM-n-arch", "s": "FastSAM-s-arch", "x": "FastSAM-x-arch"}


@dataclass(frozen=True)
class BuiltModel:
    """A saved checkpoint and what calibration found."""

    arch: str
    path: Path
    imgsz: int
    conf: float
    target: int
    calibrated_count: int  # detections after NMS on the calibration image (before mask filtering)
    params_m: float  # million parameters

    def as_dict(self) -> dict:
        return {"arch": ARCH_NAMES[self.arch], "path": str(self.path), "imgsz": self.imgsz, "conf": self.conf,
                "target_instances": self.target, "calibrated_detections": self.calibrated_count,
                "params_m": round(self.params_m, 2), "weights": "random (BN stats from one image, class bias tuned)"}


def _letterbox_tensor(image_rgb: np.ndarray, imgsz: int):
    """The tensor ultralytics' predictor feeds the model for ``image_rgb`` (letterbox, RGB, 0-1)."""
    import torch
    from ultralytics.data.augment import LetterBox

    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    boxed = LetterBox(imgsz, auto=True, stride=32)(image=bgr)
    return torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1])).permute(2, 0, 1)[None].float() / 255


def new_model(arch: str, seed: int = 0):
    """A fresh random ``SegmentationModel`` of ``arch`` ('n', 's', 'x') with one class, eval mode."""
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(seed)
    model = SegmentationModel(ARCH_YAMLS[arch], nc=1, verbose=False).eval()
    smooth_prototypes(model)
    return model


def smooth_prototypes(model) -> None:
    """Make the mask prototypes spatially smooth (same layers and FLOPs, other weight values).

    Random 3x3 kernels and a random transposed conv turn the prototypes into pixel
    noise, so masks would be speckle with hundreds of pieces; a trained model's are
    smooth blobs. Here the prototype branch becomes channel mixing + box blur
    (``cv1``), nearest-neighbour upsampling and another box blur (``cv2``).
    """
    import torch

    proto = model.model[-1].proto
    with torch.no_grad():
        channels = proto.upsample.weight.shape[0]
        eye = torch.eye(channels)[:, :, None, None]
        proto.upsample.weight.copy_(eye.expand_as(proto.upsample.weight))
        proto.upsample.bias.zero_()
        proto.cv2.conv.weight.copy_(eye.expand_as(proto.cv2.conv.weight) / 9)
        w1 = proto.cv1.conv.weight
        mix = torch.randn(w1.shape[0], w1.shape[1]) / w1.shape[1] ** 0.5
        w1.copy_(mix[:, :, None, None].expand_as(w1) / 9)


def calibrate_batchnorm(model, image_rgb: np.ndarray, imgsz: int) -> None:
    """Set every BatchNorm's running stats to those of one real image (train-mode pass)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass = this image's statistics
    model.train()
    with torch.no_grad():
        model(_letterbox_tensor(image_rgb, imgsz))
    model.eval()


def _raw_predictions(model, image_rgb: np.ndarray, imgsz: int):
    import torch

    with torch.inference_mode():
        out = model(_letterbox_tensor(image_rgb, imgsz))
    y = out[0]
    return y[0] if isinstance(y, tuple) else y  # (1, 4 + 1 + 32, anchors)


def _count_after_nms(preds, conf: float, iou: float, max_det: int) -> int:
    from ultralytics.utils.nms import non_max_suppression

    # max_time_img: the bisection's first cut-offs keep thousands of boxes; never truncate them
    return int(non_max_suppression(preds, conf, iou, max_det=max_det, nc=1, max_time_img=60.0)[0].shape[0])


def calibrate_class_bias(model, image_rgb: np.ndarray, imgsz: int, conf: float, iou: float, max_det: int,
                         target: int) -> int:
    """Shift the class bias so about ``target`` detections pass ``conf`` and NMS; returns the count.

    A uniform logit shift keeps the score order, so the count for each cut-off can be
    found on the raw predictions by bisection over the sorted scores (NMS only).
    """
    import torch

    preds = _raw_predictions(model, image_rgb, imgsz)
    scores = preds[0, 4].double().clamp(1e-12, 1 - 1e-12)
    ordered = torch.sort(scores, descending=True).values
    lo, hi = 1, len(ordered) - 1  # number of anchors kept before NMS

    def cut(k: int) -> float:  # a threshold between the k-th and (k+1)-th score
        return float((ordered[k - 1] + ordered[k]) / 2)

    for _ in range(40):  # bounded bisection: count grows with k (up to NMS merges)
        if lo >= hi:
            break
        mid = (lo + hi) // 2
        if _count_after_nms(preds, cut(mid), iou, max_det) >= target:
            hi = mid
        else:
            lo = mid + 1
    threshold = cut(lo)
    delta = math.log(conf / (1 - conf)) - math.log(threshold / (1 - threshold))
    head = model.model[-1]
    for branch in head.cv3:
        branch[-1].bias.data += delta
    return _count_after_nms(preds, threshold, iou, max_det)


def build_checkpoint(arch: str, path: Path, image_rgb: np.ndarray, *, imgsz: int, conf: float = 0.4,
                     iou: float = 0.9, max_det: int = 300, target: int = 100, seed: int = 0,
                     base=None) -> BuiltModel:
    """Build, calibrate and save a checkpoint that ``Segmenter``/``FastSAM`` load like a real one.

    ``base`` (a model from ``prepared_model``) skips the BatchNorm pass when several
    image sizes share one architecture.
    """
    import torch

    model = copy.deepcopy(base) if base is not None else prepared_model(arch, image_rgb, seed=seed)
    count = calibrate_class_bias(model, image_rgb, imgsz, conf, iou, max_det, target)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": copy.deepcopy(model).half(), "train_args": {"task": "segment", "imgsz": imgsz},
                "date": None, "version": "bench-random"}, path)
    return BuiltModel(arch, path, imgsz, conf, target, count, params)


def prepared_model(arch: str, image_rgb: np.ndarray, *, seed: int = 0, bn_imgsz: int = 640):
    """Random ``arch`` with image BatchNorm statistics, weights rounded through fp16 (as saved)."""
    model = new_model(arch, seed)
    calibrate_batchnorm(model, image_rgb, bn_imgsz)
    return model.half().float()  # the checkpoint is fp16: calibrate what will be loaded


def checkpoint(cache_dir: Path, arch: str, imgsz: int, image_rgb: np.ndarray, *, conf: float, iou: float,
               max_det: int, target: int, bases: dict, seed: int = 0) -> BuiltModel:
    """``build_checkpoint``, reusing a file built earlier with the same recipe (``cache_dir``).

    ``bases`` memoizes BatchNorm-calibrated models per architecture within one run.
    """
    import hashlib
    import json

    import ultralytics

    recipe = json.dumps([arch, imgsz, conf, iou, max_det, target, seed, ultralytics.__version__,
                         hashlib.sha256(np.ascontiguousarray(image_rgb).tobytes()).hexdigest()[:16], 2])
    name = f"{ARCH_NAMES[arch]}-i{imgsz}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    path, meta = cache_dir / f"{name}.pt", cache_dir / f"{name}.json"
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        return BuiltModel(arch, path, imgsz, conf, target, info["count"], info["params_m"])
    if arch not in bases:
        bases[arch] = prepared_model(arch, image_rgb, seed=seed)
    built = build_checkpoint(arch, path, image_rgb, imgsz=imgsz, conf=conf, iou=iou, max_det=max_det,
                             target=target, seed=seed, base=bases[arch])
    meta.write_text(json.dumps({"count": built.calibrated_count, "params_m": built.params_m}))
    return built
