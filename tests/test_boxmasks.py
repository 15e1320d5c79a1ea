"""Per-box mask decoding against ultralytics' retina masks (process_mask_native + crop_mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsam_backend.models.boxmasks import _resize_geometry, decode_box_masks, resize_matrices
from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig, masks_from_result
from fastsam_backend.quality.scenes import generate_scene
from tests.conftest import FIXTURE_CONF, FIXTURE_IMGSZ

pytestmark = pytest.mark.model  # loads a real model (torch): not in `make test-fast`


def _ultralytics_pipeline(logits: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """process_mask_native's float steps (before thresholding), as ultralytics 8.4 runs them."""
    _, mh, mw = logits.shape
    f, (top, bottom), (left, right) = _resize_geometry(mh, mw, h, w)
    x = logits[None]
    if f > 1:
        x = F.interpolate(x, scale_factor=f, mode="bilinear")
    if x.shape[-2:] == (h, w):
        return x[0]
    return F.interpolate(x[..., top:bottom, left:right], (h, w), mode="bilinear")[0]


@pytest.mark.parametrize(("mh", "mw", "h", "w"), [(160, 160, 640, 640), (160, 128, 1000, 800), (256, 256, 1024, 1024),
                                                  (120, 160, 375, 500), (160, 96, 977, 555), (80, 80, 300, 301)])
def test_separable_matrices_are_the_interpolation(mh, mw, h, w):
    logits = torch.randn(3, mh, mw)
    ay, ax, ysup, xsup = resize_matrices(mh, mw, h, w, "cpu")
    ours = torch.einsum("hm,nmk,wk->nhw", ay, logits, ax)
    np.testing.assert_allclose(ours.numpy(), _ultralytics_pipeline(logits, h, w).numpy(), atol=1e-4)
    # the supports cover every nonzero weight
    for m, sup in ((ay, ysup), (ax, xsup)):
        nz = (m != 0).numpy()
        for r in range(0, len(nz), 37):
            cols = np.flatnonzero(nz[r])
            assert sup[r, 0] <= cols[0] and cols[-1] < sup[r, 1]


def test_decoding_matches_process_mask_native_on_random_detections():
    from ultralytics.utils import ops

    rng = torch.Generator().manual_seed(0)
    proto = torch.randn(32, 120, 160, generator=rng)
    coeffs = torch.randn(20, 32, generator=rng) * 0.3
    h, w = 375, 500
    xy = torch.rand(20, 2, generator=rng) * torch.tensor([w, h])
    wh = torch.rand(20, 2, generator=rng) * torch.tensor([w, h]) / 2
    boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([w, h]))], 1)
    scores = torch.rand(20, generator=rng)
    theirs = ops.process_mask_native(proto, coeffs, boxes, (h, w)).bool()
    ours = decode_box_masks(proto, coeffs, boxes, scores, (h, w))
    kept = [i for i in range(20) if theirs[i].any()]
    assert len(ours) == len(kept)
    np.testing.assert_allclose(ours.scores, scores[kept].numpy())
    for j, i in enumerate(kept):
        diff = np.count_nonzero(ours.mask(j) != theirs[i].numpy())
        assert diff <= 2, (i, diff)  # float summation order only: a logit within ~1e-6 of 0 may flip


def test_segmenter_masks_match_ultralytics_retina_masks(fastsam_weights, tmp_path):
    from ultralytics import FastSAM

    model = FastSAM(str(fastsam_weights))
    seg = Segmenter(SegmenterConfig(weights=str(fastsam_weights), model_dir=tmp_path, imgsz=FIXTURE_IMGSZ,
                                    conf=FIXTURE_CONF, iou=0.7, allow_download=False))
    compared = 0
    for seed in (1_000_300, 1_000_301, 1_000_302):
        image = generate_scene(seed).image
        result = model.predict(np.ascontiguousarray(image[:, :, ::-1]), retina_masks=True, imgsz=FIXTURE_IMGSZ,
                               conf=FIXTURE_CONF, iou=0.7, verbose=False)[0]
        theirs = masks_from_result(result, image.shape[:2])
        ours = seg.segment(image)
        assert len(ours) == len(theirs) > 0
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-5)
        for i in range(len(ours)):
            union = np.count_nonzero(ours.mask(i) | theirs.mask(i))
            assert np.count_nonzero(ours.mask(i) & theirs.mask(i)) / union >= 0.999
            compared += 1
    assert compared >= 20


def test_a_batch_of_same_shape_images_gives_each_image_its_own_masks(fastsam_weights, tmp_path, monkeypatch):
    """The batched pass a worker runs on a GPU (``segment_batch``), forced on here on the CPU:
    one forward pass for three images, and each image gets the masks ``segment`` gives it alone
    (the same letterbox), in order; mixed shapes fall back to one pass each."""
    seg = Segmenter(SegmenterConfig(weights=str(fastsam_weights), model_dir=tmp_path, imgsz=FIXTURE_IMGSZ,
                                    conf=FIXTURE_CONF, iou=0.7, allow_download=False))
    images = [generate_scene(seed, size=640).image for seed in (1_000_310, 1_000_311, 1_000_312)]
    alone = [seg.segment(image) for image in images]
    monkeypatch.setattr(Segmenter, "batches", property(lambda self: True))
    passes = []
    predict = seg._model.predict
    monkeypatch.setattr(seg._model, "predict", lambda source, **kw: passes.append(source) or predict(source, **kw))
    together = seg.segment_batch(images)
    assert len(passes) == 1 and len(passes[0]) == 3
    for one, batched in zip(alone, together, strict=True):
        assert len(one) == len(batched) > 0
        np.testing.assert_allclose(one.scores, batched.scores, rtol=1e-4)
        for i in range(len(one)):
            union = np.count_nonzero(one.mask(i) | batched.mask(i))
            assert np.count_nonzero(one.mask(i) & batched.mask(i)) / union >= 0.99
    passes.clear()
    wide = np.ascontiguousarray(images[0][:, : images[0].shape[1] // 2])
    mixed = seg.segment_batch([images[0], wide])
    assert len(passes) == 2 and len(mixed[0]) == len(alone[0])
