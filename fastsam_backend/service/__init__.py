"""The backend's work, HTTP-free: the one service the server, ``model.py`` and the jobs call.

``build_service(settings)`` wires it; ``FastSAMService`` lives in ``orchestrator.py``, what it
owns beside it (pre-annotation of one image, learning, per-project options, the deadline).
"""

from fastsam_backend.service.orchestrator import FastSAMService, ImageMasks, build_service

__all__ = ["FastSAMService", "ImageMasks", "build_service"]
