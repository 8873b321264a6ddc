"""An RDB load in a fresh child process, for its peak memory (and its time).

The peak resident set size of the benchmark process says nothing about one
load (it is the high-water mark of everything the run did), so each load
whose memory is reported runs in a new Python process: it imports the
suite's contenders (both packages, so every child starts from the same
baseline), opens a new, empty store of one contender, loads the file
through ``TelescopeState.load_from_file``, and prints the time, the key
count and its own peak RSS (``VmHWM``) as JSON.

Run as ``python -m benchmarks.child_load CONTENDER SCALE FILE WORKDIR``;
:func:`load_in_child` does that and reads the answer.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .contenders import Contender, by_name
from .environment import BenchEnv
from .harness import Figure, Row
from .scale import SCALES, Scale


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB.

    ``getrusage`` keeps, across ``exec``, the high-water mark of the process
    it replaced: a child of a big benchmark process would report the
    parent's size. Linux's ``VmHWM`` is the current program's alone.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # Kilobytes on Linux, bytes on macOS; this fallback is for the former.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_in_child(contender: Contender, scale: Scale, source: Path, workdir: Path) -> dict:
    """Load `source` into a new store of `contender` in a child process.

    Returns
    -------
    ``{"seconds", "keys", "peak_rss_mb", "start_rss_mb"}``: the load's time
    and key count, the child's peak RSS and its RSS before the load.

    Raises
    ------
    RuntimeError
        If the child fails (its stderr is in the message).
    """
    command = [
        sys.executable,
        "-m",
        __name__,
        contender.name,
        scale.name,
        str(source),
        str(workdir),
    ]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load in a child failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.splitlines()[-1])


def child_load_figures(fixture: Any, load_row: Row | None, rss_row: Row) -> dict[str, Figure]:
    """Load the fixture's file in a child; figures for its time (if wanted) and peak RSS."""
    result = load_in_child(fixture.contender, fixture.scale, fixture.source, fixture.workdir)
    if result["keys"] != fixture.keys:
        raise RuntimeError(
            f"loaded {result['keys']} keys from {fixture.source}, expected {fixture.keys}"
        )
    megabytes = os.path.getsize(fixture.source) / 1e6
    raw = {**result, "megabytes": megabytes, "mb_per_s": megabytes / result["seconds"]}
    figures = {rss_row.name: Figure(result["peak_rss_mb"], raw)}
    if load_row is not None:
        figures[load_row.name] = Figure(result["seconds"], raw)
    return figures


def _main(argv: list[str]) -> None:
    name, scale_name, source, workdir = argv
    contender = by_name(name)
    # The reader's import is not part of the load: the run loop's loads have it done too.
    importlib.import_module(f"{contender.package}.rdb_reader")
    env = BenchEnv(SCALES[scale_name], workdir)
    try:
        store = contender.open(env)
        try:
            start_rss = _peak_rss_mb()
            started = time.perf_counter()
            keys = store.ts.load_from_file(source)
            seconds = time.perf_counter() - started
            result: dict[str, Any] = {
                "seconds": seconds,
                "keys": keys,
                "peak_rss_mb": _peak_rss_mb(),
                "start_rss_mb": start_rss,
            }
        finally:
            store.close()
    finally:
        env.close()
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
