# CPU image (default): docker build -t fastsam-backend .
# GPU variant: PyPI's torch wheels bundle CUDA, so only the wheel index changes:
#   docker build --build-arg TORCH_INDEX= -t fastsam-backend:gpu .
#   docker run --gpus all -p 9090:9090 fastsam-backend:gpu      (DEVICE=auto picks CUDA)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 WORKERS=1 THREADS=4 MODEL_DIR=/models FASTSAM_WEIGHTS=FastSAM-s.pt \
    YOLO_CONFIG_DIR=/tmp/ultralytics YOLO_AUTOINSTALL=false
# Non-root on a read-only root filesystem (compose: read_only + a tmpfs on /tmp): everything the
# server writes goes under /tmp (caches, ultralytics' settings, gunicorn's heartbeat files, the
# Prometheus multiprocess dir); tests/test_nonroot.py runs the CMD below that way.
ENV HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache MPLCONFIGDIR=/tmp/matplotlib TMPDIR=/tmp

RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 libgl1 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU wheels keep the image small; set TORCH_INDEX= (empty) for the default CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt pyproject.toml README.md LICENSE ./
COPY scripts/install.sh scripts/install.sh
COPY fastsam_backend fastsam_backend
COPY model.py ./
RUN TORCH_INDEX="${TORCH_INDEX}" PIP="python -m pip" scripts/install.sh

# Weights: fetched at build time unless FETCH_WEIGHTS=0; or mount a folder at /models.
ARG FETCH_WEIGHTS=1
ARG WEIGHTS_URL=https://github.com/ultralytics/assets/releases/download/v8.3.0/FastSAM-s.pt
RUN mkdir -p /models && if [ "$FETCH_WEIGHTS" = "1" ]; then \
      curl -fL --retry 3 -o /models/FastSAM-s.pt "$WEIGHTS_URL"; fi
# The default CLIP (text prompts, zero-shot labels) beside it, by the same switch, referenced by
# path: nothing is downloaded at run time (the read-only root's 1 GiB /tmp would otherwise hold
# ~600 MB of it per container start). OpenAI's ViT-B-32 weights were trained with QuickGELU, hence
# open_clip's "-quickgelu" config; docs/weights.md says how to bring other CLIP weights.
RUN if [ "$FETCH_WEIGHTS" = "1" ]; then \
      python -c "import open_clip, os, shutil; os.makedirs('/models/clip'); shutil.copyfile(open_clip.download_pretrained(open_clip.get_pretrained_cfg('ViT-B-32-quickgelu', 'openai'), cache_dir='/tmp/clip-fetch'), '/models/clip/openai.bin')" \
      && rm -rf /tmp/clip-fetch; fi
ENV OPEN_CLIP_MODEL=ViT-B-32-quickgelu OPEN_CLIP_PRETRAINED=/models/clip/openai.bin
# FASTSAM_RUNTIME=auto and CLIP_RUNTIME=auto export FastSAM and CLIP's image tower to ONNX beside
# the weights once and serve those on a CPU; compose runs a read-only root, where /models cannot
# take them at run time, so the exports (and their checks against torch) are made here, once, for
# every container of this image.
RUN if [ "$FETCH_WEIGHTS" = "1" ]; then \
      python -c "from fastsam_backend.settings import load_settings; from fastsam_backend.models.segmenter import Segmenter, SegmenterConfig; from fastsam_backend.models.clip import ClipConfig, ClipScorer; st = load_settings(); s = Segmenter(SegmenterConfig.from_settings(st)); s.load(); c = ClipScorer(ClipConfig.from_settings(st)); c.load(); print('FastSAM runtime:', s.runtime, '- CLIP image tower:', c.runtime)" \
      && rm -rf /tmp/ultralytics; fi

# /models stays writable for a download when the weights were not fetched at build time
# (FETCH_WEIGHTS=0, FASTSAM_ALLOW_DOWNLOAD=true, no read_only); the code is root's, read-only.
RUN useradd --no-create-home --home-dir /tmp/home --shell /usr/sbin/nologin --uid 10001 --user-group app \
 && chown -R 10001:10001 /models
USER 10001:10001
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
CMD ["fastsam-backend", "serve"]
