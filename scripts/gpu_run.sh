#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the workplace's `device` tool; not part of CI):
#   1. the GPU column of the cold benchmark (`python -m bench --full --only cold`);
#   2. stage 3 of the FastSAM fixture: scripts/train_fastsam_fixture.py on CUDA, time-budgeted,
#      continuing from the shipped fixture on many more scenes at 640 px.
# Usage there:  OUT=/some/dir [INIT=weights.pt] bash scripts/gpu_run.sh [TRAIN_HOURS]   (0: bench only)
# (INIT: the weights to continue from; the shipped stage 3 continued from stage 2, see the
# training script's docstring.)
# Python packages the machine lacks travel as wheels in .whl/ (see the device README); its own
# torch/torchvision/opencv are used as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
TRAIN_HOURS="${1:-0.1}"
: "${OUT:?set OUT to a folder for the results}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false PYTHONUNBUFFERED=1 FASTSAM_ALLOW_DOWNLOAD=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, ultralytics; print('torch', torch.__version__, 'ultralytics', ultralytics.__version__)"

# the bench keeps its random checkpoints beside its JSON: keep both out of $OUT (8 files come back)
timeout "${BENCH_TIMEOUT:-180}" python3 -m bench --full --only cold --out /tmp/bench/bench-gpu.json \
  >"$OUT/bench-gpu.txt" 2>"$OUT/bench-gpu.log"
echo "bench rc=$?"; cp /tmp/bench/bench-gpu.json "$OUT/"; cat "$OUT/bench-gpu.txt"

[ "$TRAIN_HOURS" = 0 ] && { echo "TRAIN_HOURS=0: no training"; exit 0; }
timeout "${TRAIN_TIMEOUT:-420}" python3 scripts/train_fastsam_fixture.py --device 0 --processes 16 --workers 12 \
  --init "${INIT:-tests/fixtures/models/fastsam-shapes.pt}" --scenes 5000 --val-scenes 100 --test-scenes 200 \
  --hours "$TRAIN_HOURS" --epochs 60 --imgsz 640 --batch 64 --nbs 64 --close-mosaic 4 --lr0 0.002 \
  --warmup-epochs 0.5 --data-dir /tmp/fastsam-data --out "$OUT/fastsam-shapes.pt" 2>&1 | tee "$OUT/train.log" \
  | grep -E "wrote|Epoch|all |training took|saved|held-out" | tail -40
cp /tmp/fastsam-data/runs/train2/results.csv "$OUT/train-results.csv" 2>/dev/null
if [ ! -f "$OUT/fastsam-shapes.pt" ]; then  # cut off: keep the best epoch so far, without its optimizer state
  python3 -c "
import sys; from pathlib import Path; from ultralytics.utils.torch_utils import strip_optimizer
w = Path('/tmp/fastsam-data/runs/train2/weights'); best = w / 'best.pt' if (w / 'best.pt').exists() else w / 'last.pt'
strip_optimizer(best, sys.argv[1]); print('cut off; kept', best)" "$OUT/fastsam-shapes.pt"
fi
ls -la "$OUT"
