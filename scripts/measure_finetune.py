"""Fine-tuning on an object kind the fixture never saw: recall@0.5 and click IoU before and after.

Trains the shipped fixture (``tests/fixtures/models/fastsam-shapes.pt``) with ``finetune.train`` on
scenes of crescents (``scenes.NEW_SHAPES``; no fixture stage drew one) plus a few ordinary scenes,
then evaluates base and tuned with ``finetune.evaluate`` (the backend's Segmenter and click
selection, inference at 640 / conf 0.1 as the tests use) on held-out crescent scenes and on
held-out ordinary scenes (to see what it forgets), and prints ``finetune.decide``'s verdict::

    .venv/bin/python scripts/measure_finetune.py --train-scenes 32 --epochs 3 --json-out work-tmp/ft.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsam_backend.finetune.training import Sample, decide, evaluate, train  # noqa: E402
from fastsam_backend.quality.scenes import generate_scene  # noqa: E402

NEW_SEED0, HELD_SEED0, ORDINARY_HELD0 = 7_100_000, 7_900_000, 1_000_000


def _samples(seeds: range, size: int, shapes: tuple[str, ...] | None) -> list[Sample]:
    scenes = [generate_scene(s, size, shapes) if shapes else generate_scene(s, size) for s in seeds]
    return [Sample(sc.image, tuple(o.mask for o in sc.objects)) for sc in scenes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-scenes", type=int, default=32, help="crescent training scenes")
    p.add_argument("--ordinary-scenes", type=int, default=8, help="ordinary scenes mixed into training")
    p.add_argument("--heldout-scenes", type=int, default=16)
    p.add_argument("--size", type=int, default=320, help="scene side, px")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--imgsz", type=int, default=640, help="training image size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--base", type=Path, default=ROOT / "tests/fixtures/models/fastsam-shapes.pt")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)

    crescent = ("crescent",)
    train_set = (_samples(range(NEW_SEED0, NEW_SEED0 + args.train_scenes), args.size, crescent)
                 + _samples(range(0, args.ordinary_scenes), args.size, None))
    held_new = _samples(range(HELD_SEED0, HELD_SEED0 + args.heldout_scenes), args.size, crescent)
    held_old = _samples(range(ORDINARY_HELD0, ORDINARY_HELD0 + args.heldout_scenes), args.size, None)
    val = _samples(range(HELD_SEED0 + 10_000, HELD_SEED0 + 10_004), args.size, crescent)
    started = time.time()
    with tempfile.TemporaryDirectory() as work:
        tuned = train(args.base, train_set, work, epochs=args.epochs, imgsz=args.imgsz, device=args.device,
                      val_samples=val)
        train_s = time.time() - started
        rows = {}
        for name, held in (("crescent (new kind)", held_new), ("ordinary scenes", held_old)):
            base, after = evaluate(args.base, held), evaluate(tuned, held)
            rows[name] = {"base": base.to_dict(), "tuned": after.to_dict(),
                          "decision": decide(base, after, after.n_masks).to_dict()}
    out = {"machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                      f"cores", "train_scenes": len(train_set), "epochs": args.epochs, "imgsz": args.imgsz,
           "train_seconds": round(train_s, 1), "rows": rows}
    print(json.dumps(out, indent=2))
    for name, r in rows.items():
        b, t = r["base"], r["tuned"]
        print(f"| {name} | {b['n_masks']} | {b['recall50']:.3f} -> {t['recall50']:.3f} | "
              f"{b['click_iou']:.3f} -> {t['click_iou']:.3f} | {'adopt' if r['decision']['adopt'] else 'reject'} |")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
