"""``python -m bench [--quick|--smoke|--full] [--out PATH] [--only SECTION ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import DEFAULT_OUT, SECTIONS, run_bench
from .report import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="fewer repetitions: under 5 minutes on 2 cores")
    speed.add_argument("--smoke", action="store_true", help="tiny sizes, for the test-suite (< 60 s)")
    speed.add_argument("--full", action="store_true", help="more repetitions and sizes (default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    result = run_bench(mode, args.out, tuple(args.only))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
