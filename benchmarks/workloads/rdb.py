"""RDB snapshots: load an observation's ~100 MB file into a fresh store, write one back out.

Every contender loads the same file, written with katsdptelstate's own
writer primitives (so katsdptelstate + rdbtools can read it). Each round
loads into a new, empty store, then writes that store to a new file with
the contender's own `RDBWriter` (katsdptelstate's for katsdptelstate,
telstate's for telstate). The loaded key count and the written key count
are checked, so a fast wrong answer cannot pass; the LMDB store must
also pass ``verify()`` after its first load (untimed).
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
from ..harness import MEGABYTES, SECONDS, Case, Family, Figure, Row, timed
from ..scale import Scale

LOAD = Row("RDB load", SECONDS)
PEAK_RSS = Row("RDB load peak RSS", MEGABYTES)
WRITE = Row("RDB write", SECONDS)


@dataclass
class _Fixture:
    contender: Contender
    env: BenchEnv
    source: Path
    keys: int
    workdir: Path
    loaded: Store | None = None

    @property
    def scale(self) -> Scale:
        return self.env.scale

    def fresh_store(self) -> Store:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        self.loaded = self.contender.open(self.env)
        return self.loaded


def _megabytes(path: Path) -> float:
    return os.path.getsize(path) / 1e6


def _load(fixture: _Fixture, round_: int) -> Figure:
    ts = fixture.fresh_store().ts
    seconds, count = timed(lambda: ts.load_from_file(str(fixture.source)))
    if count != fixture.keys:
        raise RuntimeError(f"loaded {count} keys from {fixture.source}, expected {fixture.keys}")
    if round_ == 0 and fixture.contender.kind is TelstateLmdb:
        # Untimed: the import is the events it stands for (issue 15's check).
        problems = ts.backend.verify()
        if problems:
            raise RuntimeError(f"the imported store does not verify: {problems[:3]}")
    size = _megabytes(fixture.source)
    return Figure(seconds, {"seconds": seconds, "megabytes": size, "mb_per_s": size / seconds})


def _peak_rss(fixture: _Fixture, round_: int) -> dict[str, Figure]:
    return child_load_figures(fixture, None, PEAK_RSS)


def _writer_class(contender: Contender) -> Any:
    if contender.package == TELSTATE:
        from telstate.rdb_writer import RDBWriter
    else:
        from katsdptelstate.rdb_writer import RDBWriter
    return RDBWriter


def _write(fixture: _Fixture, round_: int) -> Figure:
    if fixture.loaded is None:
        raise RuntimeError("RDB write needs the store the load case filled")
    ts = fixture.loaded.ts
    writer_class = _writer_class(fixture.contender)
    target = fixture.workdir / f"written-{round_}.rdb"

    def write() -> int:
        with writer_class(str(target)) as writer:
            writer.save(ts)
        return writer.keys_written

    seconds, written = timed(write)
    size = _megabytes(target)
    os.remove(target)
    if written != fixture.keys:
        raise RuntimeError(f"wrote {written} keys, expected {fixture.keys}")
    return Figure(seconds, {"seconds": seconds, "megabytes": size, "mb_per_s": size / seconds})


class Rdb(Family):
    name = "rdb"
    cases = (
        Case((LOAD,), _load, needs=("telstate.rdb_reader",)),
        Case(
            (PEAK_RSS,),
            _peak_rss,
            applies=lambda contender: (
                "the data live in the server" if contender.backend == "redis" else None
            ),
            needs=("telstate.rdb_reader",),
        ),
        Case((WRITE,), _write, needs=("telstate.rdb_writer",)),
    )

    def describe(self, scale: Scale) -> str:
        size = f"{self.megabytes:.0f} MB" if hasattr(self, "megabytes") else "an"
        return (
            f"A {size} RDB file ({scale.rdb_sensors} sensors × {scale.rdb_samples} float "
            f"samples, {scale.rdb_arrays} samples of 8 KB arrays, attributes, indexed keys) "
            "written by katsdptelstate's writer, loaded into an empty store; that store then "
            "written out by the package's own `RDBWriter`. katsdptelstate reads through "
            "rdbtools; loading into Redis goes through the client. Peak RSS: the same load "
            "into a new store in a fresh process (see the archive family)."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        # One LMDB column: durability changes nothing in a bulk load.
        if contender.kind is TelstateLmdb:
            return contender.durability == "batch"
        return contender.package in (TELSTATE, KATSDPTELSTATE)

    def prepare(self, env: BenchEnv) -> None:
        records = data.rdb_records(env.scale)
        self.keys = len(records)
        self.source = env.scratch("rdb-source") / "observation.rdb"
        data.write_katsdp_rdb(self.source, records)
        self.megabytes = _megabytes(self.source)

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return _Fixture(store.contender, env, self.source, self.keys, env.scratch("rdb"))

    def teardown(self, fixture: _Fixture) -> None:
        if fixture.loaded is not None:
            fixture.loaded.close()
