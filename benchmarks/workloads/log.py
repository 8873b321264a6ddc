"""The event log: replay, verify and backup of a store of about a million events.

The log is written once (untimed), one event per sample as `add` makes
them, in write transactions of 100 samples per sensor across every
sensor, so that events of different keys
are interleaved as in an observation; attributes and indexed sub-keys are
events too. Replay (`telstate.lmdb.replay`, the state rebuilt in memory),
verify (`LmdbBackend.verify`, rebuilt and compared) and a plain scan of
`events()` are each timed over the whole log, and a hot backup
(`telstate.lmdb.backup.backup`, as `telstate backup` runs it, fsyncs
included) of the whole store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data
from ..contenders import Contender, Store, TelstateLmdb
from ..environment import BenchEnv
from ..harness import EVENTS, SECONDS, Case, Family, Figure, Row, timed
from ..scale import Scale

REPLAY = Row("replay log into memory", EVENTS)
VERIFY = Row("verify log against state", EVENTS)
SCAN = Row("scan events()", EVENTS)
BACKUP = Row("backup of a 1M-event store", SECONDS)


@dataclass
class _Fixture:
    store: Store
    events: int
    keys: int
    backups: Path


def _events_per_second(fixture: _Fixture, seconds: float) -> Figure:
    return Figure(fixture.events / seconds, {"events": fixture.events, "seconds": seconds})


def _replay(fixture: _Fixture, round_: int) -> Figure:
    from telstate.lmdb import replay

    seconds, state = timed(lambda: replay(str(fixture.store.location)))
    keys = len(state.keys())
    if keys != fixture.keys:
        raise RuntimeError(f"replay gave {keys} keys, the store has {fixture.keys}")
    return _events_per_second(fixture, seconds)


def _verify(fixture: _Fixture, round_: int) -> Figure:
    seconds, differences = timed(lambda: list(fixture.store.ts.backend.verify()))
    if differences:
        raise RuntimeError(f"verify found {len(differences)} differences: {differences[:3]}")
    return _events_per_second(fixture, seconds)


def _scan(fixture: _Fixture, round_: int) -> Figure:
    seconds, count = timed(lambda: sum(1 for _ in fixture.store.ts.backend.events()))
    if count != fixture.events:
        raise RuntimeError(f"events() gave {count} events, last_seq is {fixture.events}")
    return _events_per_second(fixture, seconds)


def _backup(fixture: _Fixture, round_: int) -> Figure:
    import shutil

    from telstate.lmdb.backup import backup

    dest = fixture.backups / f"copy{round_}"
    seconds, (seq, _) = timed(lambda: backup(fixture.store.location, dest))
    if seq != fixture.events:
        raise RuntimeError(f"the backup holds {seq} events, the store {fixture.events}")
    size = (dest / "data.mdb").stat().st_size
    shutil.rmtree(dest)
    return Figure(seconds, {"events": seq, "seconds": seconds, "bytes": size})


class Log(Family):
    name = "log"
    needs = ("telstate.lmdb",)
    cases = (
        Case((REPLAY,), _replay),
        Case((VERIFY,), _verify),
        Case((SCAN,), _scan),
        Case((BACKUP,), _backup),
    )

    def describe(self, scale: Scale) -> str:
        return (
            f"A log of about {scale.log_events:,} events (float samples of {scale.sensors} "
            "sensors interleaved in blocks of 100, attributes, indexed sub-keys), written "
            "untimed: rebuilt in memory by `telstate.lmdb.replay`, rebuilt and compared with "
            "the state by `LmdbBackend.verify`, read through by `events()`, copied whole by "
            "`telstate backup` (LMDB's environment copy into a new directory, fsynced)."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        # The log is the same whatever the durability: one column.
        return contender.kind is TelstateLmdb and contender.durability == "batch"

    def setup(self, store: Store, env: BenchEnv) -> Any:
        backend = store.ts.backend
        store.populate(data.metadata_records(env.scale))
        data.write_sample_events(
            backend, data.sensor_blocks(env.scale.sensors, env.scale.log_events)
        )
        backend.flush()
        return _Fixture(
            store, backend.last_seq, len(backend.keys(b"*")), env.scratch("log-backups")
        )
