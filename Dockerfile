# CPU image (default): docker build -t fastsam-backend .
# GPU variant: PyPI's torch wheels bundle CUDA, so only the wheel index changes:
#   docker build --build-arg TORCH_INDEX= -t fastsam-backend:gpu .
#   docker run --gpus all -p 9090:9090 fastsam-backend:gpu      (DEVICE=auto picks CUDA)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 WORKERS=1 THREADS=4 MODEL_DIR=/models FASTSAM_WEIGHTS=FastSAM-s.pt \
    YOLO_CONFIG_DIR=/tmp/ultralytics YOLO_AUTOINSTALL=false

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

RUN useradd --create-home --uid 10001 app && mkdir -p /tmp/ultralytics && chown -R app /models /tmp/ultralytics
USER app
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
CMD ["fastsam-backend", "serve"]
