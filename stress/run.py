"""`make stress`: fuzzed images, fuzzed recipes, and kill-and-rerun trials against the `xai` CLI.

    python -m stress.run [--seed N] [--quick] [--parts images,recipes,kills] [--keep]

Every case is generated from the seed. Prints one row of figures per part and every failure
kind with examples; exits 1 when anything failed. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import images, kills, recipes
from .launch import run_all, warm_up
from .report import Tally, print_table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
SIZES = {  # part -> (full, quick)
    "images": (1000, 60),
    "recipes": (300, 40),
    "kills": (52, 8),
}
PER_RUN = (200, 30)  # fuzzed images per `xai explain` run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=20240610, help="seed of every generated case")
    parser.add_argument("--quick", action="store_true", help="a small smoke version of each part")
    parser.add_argument("--parts", default="images,recipes,kills", help="comma-separated parts to run")
    parser.add_argument("--parallel", type=int, default=2, help="xai processes at a time")
    parser.add_argument("--mem-bound-gb", type=float, default=3.0, help="peak resident memory allowed per image run")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (inputs, outputs, logs)")
    args = parser.parse_args(argv)
    quick = int(args.quick)
    work = args.work or Path(tempfile.mkdtemp(prefix="xai-stress-"))
    t0 = time.monotonic()
    error = warm_up()
    print(f"stress: seed {args.seed}, work folder {work}, warm-up {time.monotonic() - t0:.1f}s"
          + (f" (import failed: {error})" if error else ""), flush=True)
    tallies: list[Tally] = []
    try:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            t_part = time.monotonic()
            tally = Tally(part)
            folder = work / part
            if part == "images":
                batches = images.batches(folder / "inputs", args.seed, SIZES["images"][quick], PER_RUN[quick], DEMO)
                bound = int(args.mem_bound_gb * 2**30)
                run_all((images.task(b, DEMO / "digits.pt", folder, bound, tally) for b in batches), args.parallel)
            elif part == "recipes":
                paths = recipes.prepare(folder, DEMO)
                cases = recipes.cases(args.seed, SIZES["recipes"][quick], ROOT, paths, quick=args.quick)
                tally.notes["from tests/fuzzing.py"] = sum(c.project for c in cases)
                tally.notes["from stress/recipes.py"] = sum(not c.project for c in cases)
                run_all(recipes.tasks(cases, folder, paths, tally), args.parallel)
            elif part == "kills":
                kills.run_part(folder, args.seed, SIZES["kills"][quick], DEMO, tally, args.parallel)
            else:
                parser.error(f"unknown part {part!r}; parts: images, recipes, kills")
            tallies.append(tally)
            print(f"stress: {part}: {tally.cases} cases, {len(tally.failing)} failing, "
                  f"{time.monotonic() - t_part:.0f}s", flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ok = print_table(tallies, time.monotonic() - t0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
