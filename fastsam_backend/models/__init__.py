"""The networks: FastSAM (torch or ONNX Runtime), CLIP, their loading, digests and readiness."""
