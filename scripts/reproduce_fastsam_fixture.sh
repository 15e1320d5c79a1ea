#!/usr/bin/env bash
# Retrain tests/fixtures/models/fastsam-shapes.pt from scratch: the three stages of
# scripts/train_fastsam_fixture.py (see its docstring), each a fixed amount of work, each
# continuing from the last one's weights.
#   scripts/reproduce_fastsam_fixture.sh [WORKDIR]        (default work-tmp/fastsam-repro)
# Environment:
#   STAGES="1 2 3"    which stages to run; stage N>1 continues from WORKDIR/fastsam-stage<N-1>.pt
#   STAGE3_DEVICE=cpu stage 3's device: '0' for the first CUDA GPU (about 5 min on an H100/H200);
#                     on 2 CPU cores it is about 60x that
#   PY=.venv/bin/python
# Stages 1 and 2 run on the CPU (about 40 min on 2 cores). The result is WORKDIR/fastsam-stage3.pt;
# measure it with `FASTSAM_WEIGHTS=WORKDIR/fastsam-stage3.pt make quality QUALITY_ARGS="--scenes 96"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
W="${1:-work-tmp/fastsam-repro}"
STAGES="${STAGES:-1 2 3}"
DEVICE3="${STAGE3_DEVICE:-cpu}"
mkdir -p "$W"
train() { "$PY" scripts/train_fastsam_fixture.py "$@"; }

for stage in $STAGES; do
  echo "== stage $stage ($(date -u +%H:%M:%S))"
  case "$stage" in
    1) OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" train --scenes 800 --epochs 7 --imgsz 416 --close-mosaic 3 \
         --data-dir "$W/data" --out "$W/fastsam-stage1.pt" ;;
    2) OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" train --init "$W/fastsam-stage1.pt" \
         --scenes 1200 --epochs 3 --imgsz 512 --close-mosaic 2 --lr0 0.001 --warmup-epochs 0.3 \
         --data-dir "$W/data" --out "$W/fastsam-stage2.pt" ;;
    3) cores="$(nproc)"
       train --device "$DEVICE3" --processes "$cores" --workers "$(( cores > 4 ? cores * 3 / 4 : 2 ))" \
         --init "$W/fastsam-stage2.pt" --scenes 5000 --val-scenes 100 --test-scenes 200 \
         --epochs 13 --imgsz 640 --batch 64 --nbs 64 --close-mosaic 4 --lr0 0.002 --warmup-epochs 0.5 \
         --data-dir "$W/data3" --out "$W/fastsam-stage3.pt" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S))"
