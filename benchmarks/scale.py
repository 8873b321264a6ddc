"""How big each workload is: the full run, `--quick` and the test's tiny run, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """Sizes of every workload, and how long each measurement may take."""

    name: str
    #: Rounds of the throughput cases (writes, reads): many short rounds, so that
    #: the contenders take turns often and a change in the machine's load hits all.
    throughput_rounds: int
    #: Seconds a throughput measurement may run before it stops early.
    budget: float
    #: Rounds of the latency cases, and of the long ones (RDB, log, replicator).
    repeats: int
    heavy_repeats: int
    #: Writes: operations per round and case (arrays are 8 KB each).
    write_ops: int
    array_ops: int
    #: Reads: the populated store (sensors × samples, one long sensor,
    #: attributes, indexed keys × sub-keys) and operations per round.
    sensors: int
    samples: int
    history_samples: int
    attributes: int
    indexed_keys: int
    sub_keys: int
    read_ops: int
    #: wait_key: wake-ups per round, and the pause before each write that
    #: lets the waiter block again.
    wake_ups: int
    wake_gap: float
    #: RDB file: sensors × samples of floats plus samples of an 8 KB array sensor.
    rdb_sensors: int
    rdb_samples: int
    rdb_arrays: int
    #: Archived full dump: antennas × float sensors each × 2 s samples (see data.archive_records).
    archive_antennas: int
    archive_sensors: int
    archive_samples: int
    #: Events in the log that replay and verify read.
    log_events: int
    #: Replicator: backlog to catch up on; steady rate (events/s) and duration (s).
    backlog_events: int
    steady_rate: int
    steady_seconds: float
    #: Followers: backlog a new follower catches up on (events).
    follower_backlog: int


FULL = Scale(
    name="full",
    throughput_rounds=15,
    budget=0.1,
    repeats=5,
    heavy_repeats=3,
    write_ops=50_000,
    array_ops=3_000,
    sensors=200,
    samples=5_000,
    history_samples=20_000,
    attributes=3_000,
    indexed_keys=100,
    sub_keys=30,
    read_ops=50_000,
    wake_ups=200,
    wake_gap=0.003,
    rdb_sensors=200,
    rdb_samples=5_000,
    rdb_arrays=10_000,
    archive_antennas=64,
    archive_sensors=14,
    archive_samples=7_200,
    log_events=1_000_000,
    backlog_events=200_000,
    steady_rate=5_000,
    steady_seconds=10.0,
    follower_backlog=1_000_000,
)

QUICK = Scale(
    name="quick",
    throughput_rounds=5,
    budget=0.02,
    repeats=3,
    heavy_repeats=2,
    write_ops=2_000,
    array_ops=200,
    sensors=50,
    samples=200,
    history_samples=2_000,
    attributes=300,
    indexed_keys=10,
    sub_keys=30,
    read_ops=2_000,
    wake_ups=30,
    wake_gap=0.003,
    rdb_sensors=20,
    rdb_samples=1_000,
    rdb_arrays=400,
    archive_antennas=16,
    archive_sensors=14,
    archive_samples=900,
    log_events=50_000,
    backlog_events=50_000,
    steady_rate=5_000,
    steady_seconds=1.0,
    follower_backlog=50_000,
)

#: Proves the machinery works (the test suite runs it); its figures mean nothing.
TINY = Scale(
    name="tiny",
    throughput_rounds=2,
    budget=0.005,
    repeats=2,
    heavy_repeats=1,
    write_ops=100,
    array_ops=20,
    sensors=5,
    samples=20,
    history_samples=100,
    attributes=20,
    indexed_keys=2,
    sub_keys=5,
    read_ops=100,
    wake_ups=3,
    wake_gap=0.002,
    rdb_sensors=3,
    rdb_samples=50,
    rdb_arrays=5,
    archive_antennas=2,
    archive_sensors=2,
    archive_samples=40,
    log_events=500,
    backlog_events=300,
    steady_rate=1_000,
    steady_seconds=0.2,
    follower_backlog=300,
)

SCALES = {scale.name: scale for scale in (FULL, QUICK, TINY)}
