"""CLIP through open_clip: mask crops and texts → unit embeddings. Optional, lazy, one per process.

Crops follow FastSAM's text prompt (with the ultralytics fix): each mask's box is cut
out of the image and the pixels outside the mask are whitened, so a large mask whose
box happens to contain the described object does not win.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.errors import ModelUnavailable
from fastsam_backend.models.digest import file_digest
from fastsam_backend.models.reach import require_reachable

if TYPE_CHECKING:
    from fastsam_backend.settings import Settings

log = logging.getLogger(__name__)

TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "a picture of a {}.")
BATCH = 32


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-32"  # an open_clip model name, or a path to a model config .json
    pretrained: str = "openai"  # an open_clip pretrained tag, or a path to a checkpoint file
    device: str = "auto"
    enabled: bool = True
    min_mask_area: int = 100  # FastSAM drops masks of <= 100 px before scoring
    allow_download: bool = True  # let open_clip fetch a pretrained tag it has not cached

    @classmethod
    def from_settings(cls, settings: Settings) -> ClipConfig:
        return cls(settings.open_clip_model, settings.open_clip_pretrained, settings.device,
                   settings.clip_enabled, settings.clip_min_mask_area, settings.allow_download)


def whitened_square_crop(image: np.ndarray, masks: MaskSet, i: int) -> np.ndarray:
    """Mask ``i``'s box cut from ``image`` (``(H, W, 3)`` uint8), pixels outside the mask white,
    padded with white to a square (CLIP's centre crop would otherwise cut elongated objects)."""
    x0, y0, x1, y1 = (int(v) for v in masks.boxes[i])
    h, w = y1 - y0, x1 - x0
    side = max(h, w)
    out = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    region = out[top : top + h, left : left + w]
    region[masks.crops[i]] = image[y0:y1, x0:x1][masks.crops[i]]
    return out


class ClipScorer:
    """Thread-safe lazy wrapper; ``identity`` names the model without loading it."""

    def __init__(self, config: ClipConfig) -> None:
        self.config = config
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._lock = threading.Lock()
        self._infer_lock = threading.Lock()
        self._error: str | None = None
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """Model and weights names, plus a digest of the local files among them (config .json,
        checkpoint): crop embeddings are cached under it. Never loads the model."""
        if self._identity is None:
            cfg = self.config
            files = [Path(cfg.model)] if cfg.model.endswith(".json") else []
            files += [Path(cfg.pretrained)] if Path(cfg.pretrained).suffix else []
            model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
            pretrained = Path(cfg.pretrained).stem if Path(cfg.pretrained).suffix else cfg.pretrained
            name = f"clip-{model}-{pretrained}"
            if not files:
                self._identity = name  # a released tag: open_clip's files for it do not change
            elif all(p.is_file() for p in files):
                self._identity = f"{name}-{file_digest(*files)}"
            else:
                return name  # not loadable anyway (available() says so); named, not remembered
        return self._identity

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def error(self) -> str | None:
        """Why the last load failed, if it did."""
        return self._error

    def available(self) -> bool:
        """Whether loading can work, judged without loading (a file check; no network)."""
        cfg = self.config
        if self._model is not None:
            return True
        if not cfg.enabled or self._error is not None:
            return False
        if cfg.model.endswith(".json") and not Path(cfg.model).is_file():
            return False
        if Path(cfg.pretrained).suffix:
            return Path(cfg.pretrained).is_file()
        return cfg.allow_download or not cfg.pretrained

    def load(self) -> None:
        if self._model is not None:
            return
        if not self.config.enabled:
            raise ModelUnavailable("CLIP is disabled (CLIP_ENABLED=false): text prompts and zero-shot labels need it")
        with self._lock:
            if self._model is not None:
                return
            if self._error is not None:
                raise ModelUnavailable(self._error)
            try:
                self._load()
            except ModelUnavailable as exc:
                self._error = exc.message
                raise

    def _check_loadable(self) -> None:
        """Fail fast, before importing torch, on what a file check can tell (the setting to change)."""
        cfg = self.config
        if cfg.model.endswith(".json") and not Path(cfg.model).is_file():
            raise ModelUnavailable(f"open_clip model config '{cfg.model}' not found (OPEN_CLIP_MODEL)")
        pretrained = cfg.pretrained
        if Path(pretrained).suffix and not Path(pretrained).is_file():
            raise ModelUnavailable(f"CLIP checkpoint '{pretrained}' not found (OPEN_CLIP_PRETRAINED)")
        if not Path(pretrained).suffix and pretrained and not cfg.allow_download:
            raise ModelUnavailable(
                f"CLIP weights '{cfg.model}/{pretrained}' would have to be downloaded, and downloads are off "
                "(FASTSAM_ALLOW_DOWNLOAD=false): set OPEN_CLIP_PRETRAINED to a local checkpoint file"
            )

    def _load(self) -> None:
        self._check_loadable()
        cfg = self.config
        pretrained = cfg.pretrained
        if pretrained and not Path(pretrained).suffix:  # a released tag: fetched from the hub
            from huggingface_hub.constants import ENDPOINT

            require_reachable(ENDPOINT, f"CLIP weights '{pretrained}'",
                              "set OPEN_CLIP_PRETRAINED to a local checkpoint file, or FASTSAM_ALLOW_DOWNLOAD=false "
                              "(never try), or CLIP_ENABLED=false")
        import open_clip
        import torch

        name = cfg.model
        if name.endswith(".json"):
            open_clip.add_model_config(Path(name))
            name = Path(name).stem

        def create() -> tuple[Any, Any, Any]:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
            return model, preprocess, open_clip.get_tokenizer(name)

        try:
            model, preprocess, tokenizer = create()
        except Exception as exc:  # missing hub files, unknown names: many exception types
            raise ModelUnavailable(
                f"CLIP model '{name}' with weights '{pretrained}' could not be loaded ({exc}). "
                "Text prompts and zero-shot labels need it: put the checkpoint file somewhere and set "
                "OPEN_CLIP_PRETRAINED to its path (e.g. ViT-B-32 'openai' weights), or CLIP_ENABLED=false."
            ) from exc
        if cfg.device == "auto":
            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self._device = cfg.device
        self._model = model.to(self._device).eval()
        self._preprocess, self._tokenizer = preprocess, tokenizer
        log.info("loaded CLIP %s (%s) on %s", name, pretrained, self._device)

    # ------------------------------------------------------------ embeddings
    def embed_masks(self, image: np.ndarray, masks: MaskSet) -> np.ndarray:
        """``(N, D)`` float16 unit embeddings of each mask's whitened crop; rows of masks of
        ``min_mask_area`` pixels or fewer are zero (they never win)."""
        self.load()
        import torch

        keep = np.flatnonzero(masks.areas > self.config.min_mask_area)
        out = np.zeros((len(masks), self._embed_dim()), dtype=np.float16)
        with self._infer_lock, torch.inference_mode():
            for start in range(0, len(keep), BATCH):
                rows = keep[start : start + BATCH]
                out[rows] = self._encode_crops(self._crops(image, masks, rows))
        return out

    def _crops(self, image: np.ndarray, masks: MaskSet, rows: np.ndarray) -> Any:
        """``(B, 3, S, S)`` CLIP input of masks ``rows``' whitened crops (open_clip's own transform)."""
        import torch

        return torch.stack([self._preprocess(Image.fromarray(whitened_square_crop(image, masks, int(i))))
                            for i in rows])

    def _encode_crops(self, batch: Any) -> np.ndarray:
        """``(B, D)`` float16 unit image embeddings of a preprocessed batch."""
        features = self._model.encode_image(batch.to(self._device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy().astype(np.float16)

    def embed_texts(self, phrases: list[str]) -> np.ndarray:
        """``(T, D)`` float32 unit embeddings, each the mean over prompt templates."""
        self.load()
        import torch

        prompts = [template.format(p) for p in phrases for template in TEMPLATES]
        with self._infer_lock, torch.inference_mode():
            tokens = self._tokenizer(prompts).to(self._device)
            features = self._model.encode_text(tokens).float()
        features = features / features.norm(dim=-1, keepdim=True)
        features = features.reshape(len(phrases), len(TEMPLATES), -1).mean(dim=1)
        features = features / features.norm(dim=-1, keepdim=True)
        return features.cpu().numpy()

    def _embed_dim(self) -> int:
        proj = getattr(self._model, "text_projection", None)
        if proj is not None and hasattr(proj, "shape"):
            return int(proj.shape[-1])
        return int(self.embed_texts(["object"]).shape[1])
