"""`python -m benchmarks [--quick]`: run every workload on every contender and write the report."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import report
from .contenders import CONTENDERS
from .environment import BenchEnv, describe_machine
from .harness import run_family
from .scale import FULL, QUICK, SCALES
from .targets import evaluate
from .workloads import FAMILIES

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark telstate against katsdptelstate 1.0.0, side by side in one run.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="scale",
        action="store_const",
        const=QUICK.name,
        help="small workloads, under a minute: proves the suite works, figures are rough",
    )
    size.add_argument("--scale", choices=sorted(SCALES), help=argparse.SUPPRESS)
    parser.set_defaults(scale=FULL.name)
    parser.add_argument(
        "--only",
        metavar="FAMILY",
        action="append",
        choices=[family.name for family in FAMILIES],
        help="run only this workload family (repeatable)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="directory for the results (default: benchmarks/results)",
    )
    parser.add_argument(
        "--workdir",
        help="where stores and RDB files go (default: the system temporary directory); "
        "the fsync figures are that disk's",
    )
    return parser.parse_args(argv)


def _load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the suite; return the paths of the files written."""
    args = parse_args(argv)
    scale = SCALES[args.scale]
    families = [f for f in FAMILIES if not args.only or f.name in args.only]
    started = time.monotonic()
    run = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": asdict(scale),
        "load_average": {"start": _load_average()},
    }
    env = BenchEnv(scale, args.workdir)
    try:
        run["machine"] = describe_machine(env.root)
        results = []
        for family in families:
            results += run_family(family, CONTENDERS, env)
    finally:
        env.close()
    run["load_average"]["end"] = _load_average()
    run["duration_s"] = time.monotonic() - started
    run["targets"] = evaluate(results)
    run["families"] = {
        family.name: {"description": family.describe(scale), "rounds": family.repeats(scale)}
        for family in families
    }
    stem = "bench" if scale is FULL else scale.name
    paths = report.write(args.output, stem, run, results, CONTENDERS)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(path) for path in paths.values()), file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
