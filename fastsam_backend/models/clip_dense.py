"""Opt-in dense CLIP (``CLIP_DENSE_SIZE``): one forward pass of the whole image, each mask's embedding
pooled from the patch tokens it covers -- instead of one forward pass per mask crop.

An approximation of the crop embeddings, made to be cheap: ~100 crops of a 1024² image cost 100
image-tower passes at 224² (ViT-B-32: ~5 s with ONNX Runtime on 2 cores), the whole image at 448²
one pass (~0.1-0.25 s). Patch tokens of CLIP's last layer are not aligned with text, so the tokens
follow MaskCLIP (Zhou et al., ECCV 2022): the last block's attention is replaced by its value path
(value projection, output projection; no residual, no MLP), then CLIP's own ``ln_post`` and
projection -- each token then describes its own patch in the joint space. A mask's embedding is the
mean of its patches' unit tokens weighted by how many of its pixels each patch holds.

Frames: the image (``(H, W, 3)`` uint8) is scaled by ``scale = side / max(H, W)`` into the top-left of
a ``side``² input (the rest is the normalisation's mean, i.e. zero); patch ``(r, c)`` of the
``g × g`` grid (``g = side / patch``) covers input pixels ``[r·p, (r+1)·p) × [c·p, (c+1)·p)``.
Masks smaller than a patch share their patch's token with their surroundings: small objects are
where this mode loses most (docs/benchmarks.md, *Real defaults*, states its figures).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from fastsam_backend.core.masks import MaskSet
from fastsam_backend.errors import ModelUnavailable


def dense_tower(visual: Any) -> Any:
    """A ``torch.nn.Module``: ``(B, 3, S, S)`` → ``(B, g·g, D)`` MaskCLIP patch embeddings of an
    open_clip ``VisionTransformer`` (its position embedding already at ``S``)."""
    import torch
    import torch.nn.functional as F

    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    if not all(hasattr(visual, n) for n in needed) or getattr(visual, "attn_pool", None) is not None:
        raise ModelUnavailable("CLIP_DENSE_SIZE needs an open_clip ViT image tower with a class token")

    class DenseTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = self.visual
            x = v.conv1(x)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
            x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
            blocks = v.transformer.resblocks
            batch_first = getattr(v.transformer, "batch_first", True)
            x = x if batch_first else x.transpose(0, 1)
            for block in blocks[:-1]:
                x = block(x)
            x = x if batch_first else x.transpose(0, 1)
            last = blocks[-1]
            width = x.shape[-1]
            value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
            return v.ln_post(last.attn.out_proj(value)[:, 1:]) @ v.proj

    return DenseTower().eval()


def letterboxed(image: np.ndarray, side: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, float]:
    """``((1, 3, side, side) float tensor, scale)``: ``image`` scaled into the top-left corner,
    normalised; the padding is zero (the mean colour)."""
    import torch

    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    x = np.zeros((side, side, 3), np.float32)
    x[: size[1], : size[0]] = (small.astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(), scale


def pool_masks(tokens: np.ndarray, masks: MaskSet, scale: float, patch: int) -> np.ndarray:
    """``(N, D)`` float32 unit embeddings: for each mask the mean of the unit ``tokens`` (``(g·g, D)``)
    weighted by the mask's pixel count in each patch."""
    grid = round(float(np.sqrt(len(tokens))))
    units = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)
    weights = np.zeros((len(masks), grid * grid), np.float32)
    for i in range(len(masks)):
        ys, xs = np.nonzero(masks.crops[i])
        if not len(ys):
            continue
        x0, y0 = int(masks.boxes[i][0]), int(masks.boxes[i][1])
        rows = np.minimum(((ys + y0 + 0.5) * scale / patch).astype(np.int64), grid - 1)
        cols = np.minimum(((xs + x0 + 0.5) * scale / patch).astype(np.int64), grid - 1)
        weights[i] = np.bincount(rows * grid + cols, minlength=grid * grid)
    pooled = weights @ units
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.where(norms > 0, pooled / np.maximum(norms, 1e-12), 0).astype(np.float32)
