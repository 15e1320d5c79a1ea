"""Which runtime runs CLIP's image tower on a CPU: its ONNX Runtime export, made once, when it gives
torch's embeddings (``CLIP_RUNTIME``: ``auto`` | ``torch`` | ``onnx``).

The image tower is where CLIP's time goes (88-94 % of a labelled pre-annotation, ``bench defaults``),
and ONNX Runtime runs ViT-B-32's about 2x faster than torch on 2-core CPUs with the same embeddings up
to float error. With ``auto`` (the default) on a CPU, the loader exports the tower once into
``MODEL_DIR`` as ``<CLIP identity>-visual.onnx`` (dynamic batch; written under a temporary name,
then renamed: atomic, so workers and replicas sharing the folder reuse one file), embeds a few
check crops with both, and serves the export only when every unit embedding agrees with torch's
within ``CHECK_MAX_ABS`` -- below two float16 steps of the stored embeddings (the ``emb:`` cache
keeps float16), so what is cached is the same either way. The verdict is written beside the export
(``.onnx.json``, with the library versions it holds for). A folder that cannot be written, a missing
``onnx`` package or a failed check run torch with one log line; ``onnx`` makes each an error. The
text tower stays on torch, reading only a phrase's tokens (``text_tower``): ~10 of CLIP's 77
positions, 5x cheaper than the whole context, which an export would fix at one length.

Identity: an export that passed the check serves under torch's CLIP identity (the same cached
embeddings, ``model_version`` and learned examples): the check is what makes them interchangeable,
as for FastSAM's export (``runtime.py``). ``CLIP_INT8`` is an approximation with its own identity:
under ``auto``/``onnx`` it is ONNX Runtime's dynamic int8 of the export (``-q8o``, 2-4x faster than
torch's int8 at the same side) with no torch fallback, under ``torch`` torch's (``-q8``). A GPU
keeps torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fastsam_backend.errors import ModelUnavailable

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
CHECK_MAX_ABS = 5e-4  # per component of the unit embeddings; measured 6e-5 on ViT-B-32
CHECK_CROPS = 6


def text_tower(model: Any) -> Any:
    """A ``torch.nn.Module``: ``(B, L)`` int64 tokens → ``(B, D)`` text features, ``encode_text``'s.

    ``L`` may be shorter than the model's context when ``truncates(model)``: with a causal mask
    and the features read at the end-of-text token, the padding after it never reaches them, so
    the first ``L`` positions give the same features (exact, up to float error) at a fraction of
    the cost -- a phrase is ~10 tokens of CLIP's 77. Other text towers get the full context."""
    import torch
    from open_clip.transformer import text_global_pool

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            m = self.model
            if not truncates(m):
                return m.encode_text(tokens)
            length = tokens.shape[1]
            x = m.token_embedding(tokens) + m.positional_embedding[:length]
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
            x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
            return m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection

    return TextTower().eval()


def truncates(model: Any) -> bool:
    """Whether ``text_tower`` may cut the padding: an open_clip ``CLIP`` text tower with a causal
    mask, read at the end-of-text token."""
    return (getattr(model, "attn_mask", None) is not None and hasattr(model, "token_embedding")
            and getattr(model, "text_pool_type", None) in ("argmax", "eos"))


def trim_padding(tokens: Any) -> Any:
    """``(B, L)`` tokens without the columns after the last non-padding token of any row (padding: 0)."""
    used = (tokens != 0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens


def check_crops() -> list[np.ndarray]:
    """Square uint8 crops of a fixed image (``runtime.check_image``), whitened outside a disc, of
    several sizes: something for both runtimes to embed, the same on every machine."""
    from fastsam_backend.models.runtime import check_image

    image = check_image(480)
    crops = []
    for k in range(CHECK_CROPS):
        side = 40 + 80 * k
        x0 = y0 = (480 - side) // (k + 1)
        crop = image[y0:y0 + side, x0:x0 + side].copy()
        yy, xx = np.mgrid[0:side, 0:side]
        crop[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (side / 2) ** 2] = 255
        crops.append(crop)
    return crops


def _versions() -> dict[str, str]:
    import onnxruntime
    import open_clip
    import torch

    return {"open_clip": open_clip.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _export(visual: Any, sample: Any, target: Path, int8: bool) -> None:
    """The image tower exported to ``target`` (``int8``: then dynamically quantised), atomically."""
    import warnings

    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on open_clip's shape checks: constant per model
            torch.onnx.export(visual, (sample,), staged, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17, dynamo=False)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fp32, staged = staged, staged.replace(".onnx", ".q8.onnx")
            try:
                quantize_dynamic(fp32, staged, weight_type=QuantType.QInt8)
            finally:
                os.unlink(fp32)
        os.replace(staged, target)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


class OnnxTower:
    """An exported image tower: ``(B, 3, S, S)`` float32 tensor → ``(B, D)`` float32 tensor."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:  # else ONNX Runtime's own choice: one thread per physical core
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: FastSAM's pass and the other tower share the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: Any) -> Any:
        import torch

        x = np.ascontiguousarray(batch.detach().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def serve_onnx_tower(runtime: str, visual: Any, identity: str, model_dir: Path, batch: Any, *,
                     int8: bool, threads: int, reuse: bool = True) -> OnnxTower | None:
    """The ONNX Runtime tower to run instead of ``visual`` (torch's image tower, or
    ``clip_dense.dense_tower``, on a CPU), or None for torch.

    ``batch`` is the check input (``tensor_batch`` of ``check_crops`` at the served side).
    ``reuse`` False (random weights: no identity tells two models apart) exports and checks again
    instead of trusting a file of the same name. Under ``int8`` the export is quantised and not
    checked against torch (an approximation, with its own identity): every failure is an error,
    since torch's int8 would give other embeddings.
    """
    if runtime == "torch":
        return None
    strict = runtime == "onnx" or int8

    def fallback(why: str) -> None:
        if strict:
            setting = "CLIP_INT8=true (ONNX Runtime's int8)" if int8 else "CLIP_RUNTIME=onnx"
            raise ModelUnavailable(f"{setting}: {why}" + ("; or set CLIP_RUNTIME=torch" if int8 else ""))
        log.warning("CLIP_RUNTIME=auto: CLIP's image tower runs on torch, %s", why)

    target = model_dir / f"{identity}-visual.onnx"
    verdict_file = target.with_suffix(".onnx.json")
    from fastsam_backend.models.runtime import ExportUnavailable, export_once, write_json_atomic

    try:
        if not reuse:
            target.unlink(missing_ok=True)
            verdict_file.unlink(missing_ok=True)
        versions, verdict = export_once(target, lambda: _export(visual, batch[:2], target, int8), _versions,
                                        "CLIP's image tower")
    except OSError as exc:  # the stale export could not be removed
        return fallback(f"MODEL_DIR={model_dir}: the ONNX export could not be replaced ({exc})")
    except ExportUnavailable as exc:
        return fallback(f"MODEL_DIR={model_dir}: {exc}")
    try:
        tower = OnnxTower(target, threads)
    except Exception as exc:  # a truncated or foreign file
        return fallback(f"'{target}' could not be loaded ({exc}); delete it to export again")
    if int8:
        log.info("CLIP's image tower: ONNX Runtime dynamic int8 (%s; an approximation, own identity)", target.name)
        return tower
    shape = [int(v) for v in batch.shape[1:]]
    if verdict.get("versions") != versions or verdict.get("input") != shape:
        import torch

        with torch.inference_mode():
            ref = _unit(visual(batch).float().numpy())
        try:
            diff = float(np.abs(_unit(tower(batch).numpy()) - ref).max())
        except Exception as exc:  # an export made for other inputs (an older release's)
            return fallback(f"'{target}' does not run the check crops ({exc}); delete it to export again")
        verdict = {"max_abs_diff": diff, "input": shape, "passed": diff <= CHECK_MAX_ABS,
                   "versions": versions}
        write_json_atomic(verdict_file, verdict)
    if not verdict.get("passed"):
        return fallback(f"the ONNX export's embeddings differ from torch's on the check crops (max abs "
                        f"difference {verdict.get('max_abs_diff')}; needs <= {CHECK_MAX_ABS})")
    log.info("CLIP's image tower through ONNX Runtime (%s; check crops agree to %.1e, identity kept)",
             target.name, verdict.get("max_abs_diff"))
    return tower
