#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the workplace's `device` tool; not part of CI):
#   1. the GPU column of the cold benchmark (`python -m bench --full --only cold`), and one worker's
#      warm throughput with batches of 8 against one image per pass (`python -m bench.gpu_batch`);
#      With DEFAULTS=1 (the default), the real-default section (`python -m bench --quick --only defaults`:
#      FastSAM-s@1024 + CLIP ViT-B-32, click / text / labelled pre-annotation / warm job; report only);
#   2. stage 3 of the FastSAM fixture (scripts/reproduce_fastsam_fixture.sh, STAGES=3, on CUDA),
#      continuing from INIT, the stage-2 weights.
# Usage there:  OUT=/some/dir INIT=stage2.pt [BENCH=0] [TRAIN=0] bash scripts/gpu_run.sh
# Python packages the machine lacks travel as wheels in .whl/ (see the device README); its own
# torch/torchvision/opencv are used as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a folder for the results}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false PYTHONUNBUFFERED=1 FASTSAM_ALLOW_DOWNLOAD=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, ultralytics; print('torch', torch.__version__, 'ultralytics', ultralytics.__version__)"

if [ "${BENCH:-1}" != 0 ]; then
  # the bench keeps its random checkpoints beside its JSON: keep both out of $OUT (8 files come back)
  timeout "${BENCH_TIMEOUT:-180}" python3 -m bench --full --only cold --out /tmp/bench/bench-gpu.json \
    >"$OUT/bench-gpu.txt" 2>"$OUT/bench-gpu.log"
  echo "bench rc=$?"; cp /tmp/bench/bench-gpu.json "$OUT/"; cat "$OUT/bench-gpu.txt"
  timeout "${BATCH_TIMEOUT:-180}" python3 -m bench.gpu_batch --images 64 --batch 8 --imgsz 1024 \
    --out "$OUT/gpu-batch.json" >"$OUT/gpu-batch.log" 2>&1
  echo "gpu_batch rc=$?"; tail -c 1500 "$OUT/gpu-batch.json"
fi

if [ "${DEFAULTS:-1}" != 0 ]; then
  # issue #25: the default architectures with CLIP on the GPU (open_clip must be importable: .whl/)
  timeout "${DEFAULTS_TIMEOUT:-240}" python3 -m bench --quick --only defaults --out /tmp/bench/defaults-gpu.json \
    >"$OUT/defaults-gpu.txt" 2>"$OUT/defaults-gpu.log"
  echo "defaults rc=$?"; cp /tmp/bench/defaults-gpu.json "$OUT/" 2>/dev/null; grep defaults "$OUT/defaults-gpu.txt"
fi

[ "${TRAIN:-1}" = 0 ] && { echo "TRAIN=0: no training"; exit 0; }
: "${INIT:?set INIT to the stage-2 weights}"
W=/tmp/fastsam-repro
mkdir -p "$W" && cp "$INIT" "$W/fastsam-stage2.pt"
STAGES=3 STAGE3_DEVICE=0 PY=python3 timeout "${TRAIN_TIMEOUT:-480}" scripts/reproduce_fastsam_fixture.sh "$W" 2>&1 \
  | tee "$OUT/train.log" | grep -E "^==|wrote|all |training took|saved|held-out" | tail -40
cp "$W/data3/runs/train2/results.csv" "$OUT/train-results.csv" 2>/dev/null
if [ -f "$W/fastsam-stage3.pt" ]; then
  cp "$W/fastsam-stage3.pt" "$OUT/"
else  # cut off: keep the best epoch so far, without its optimizer state
  python3 -c "
import sys; from pathlib import Path; from ultralytics.utils.torch_utils import strip_optimizer
w = Path('$W/data3/runs/train2/weights'); best = w / 'best.pt' if (w / 'best.pt').exists() else w / 'last.pt'
strip_optimizer(best, sys.argv[1]); print('cut off; kept', best)" "$OUT/fastsam-stage3-cutoff.pt"
fi
ls -la "$OUT"
