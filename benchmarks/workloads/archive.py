"""Archived capture blocks: open a full dump in memory, as katdal does, in a fresh process.

The file is a capture block's full dump as a metadata writer archives it
(see :func:`benchmarks.data.archive_records`: tens of antennas, hours of
2 s pointing sensors, calibration products with large bandpass arrays),
written with katsdptelstate's writer primitives. Each round loads it into
a new, empty store in a new process (see :mod:`benchmarks.child_load`),
which reports the load's time and the process's peak RSS. The key count
is checked, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data
from ..child_load import child_load_figures
from ..contenders import KATSDPTELSTATE, TELSTATE, Contender, Store, TelstateLmdb
from ..environment import BenchEnv
from ..harness import MEGABYTES, SECONDS, Case, Family, Figure, Row
from ..scale import Scale

LOAD = Row("archive load", SECONDS)
PEAK_RSS = Row("archive load peak RSS", MEGABYTES)


@dataclass
class _Fixture:
    contender: Contender
    scale: Scale
    source: Path
    keys: int
    workdir: Path


def _load(fixture: _Fixture, round_: int) -> dict[str, Figure]:
    return child_load_figures(fixture, LOAD, PEAK_RSS)


class Archive(Family):
    name = "archive"
    cases = (Case((LOAD, PEAK_RSS), _load, needs=("telstate.rdb_reader",)),)

    def describe(self, scale: Scale) -> str:
        size = f"{self.megabytes:.0f} MB" if hasattr(self, "megabytes") else "A"
        sensors = scale.archive_antennas * scale.archive_sensors
        hours = scale.archive_samples * data.ARCHIVE_PERIOD / 3600
        return (
            f"A {size} full dump of a capture block ({scale.archive_antennas} antennas, "
            f"{sensors} float sensors sampled every {data.ARCHIVE_PERIOD:g} s for "
            f"{hours:.2g} h, {sensors * scale.archive_samples / 1e6:.2g}M samples in all, "
            "activity and target sensors, calibration gains and "
            f"{data.ARCHIVE_CHANNELS}-channel bandpasses) written by katsdptelstate's writer, "
            "loaded with `TelescopeState.load_from_file` into an empty store in a fresh "
            "process, as katdal opens an archived file; peak RSS is that process's "
            "(imports included)."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        if contender.kind is TelstateLmdb:
            return contender.durability == "batch"
        return contender.package in (TELSTATE, KATSDPTELSTATE) and contender.backend == "memory"

    def prepare(self, env: BenchEnv) -> None:
        self.source = env.scratch("archive-source") / "capture_block.full.rdb"
        keys = 0

        def counted(records: Any) -> Any:
            nonlocal keys
            for record in records:
                keys += 1
                yield record

        data.write_katsdp_rdb(self.source, counted(data.archive_records(env.scale)))
        self.keys = keys
        self.megabytes = os.path.getsize(self.source) / 1e6

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return _Fixture(store.contender, env.scale, self.source, self.keys, env.scratch("archive"))
