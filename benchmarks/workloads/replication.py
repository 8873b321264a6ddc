"""The replicator daemon, measured from outside: catch-up throughput and steady-state lag.

Both cases run the real daemon (`python -m replicator --log PATH --redis
URL --batch 5000`) as its own process, against a redis-server of its own
for each round, and watch the mirror the way a katsdptelstate client
would: through the `update/<key>` messages the daemon publishes.

- Catch-up: the daemon first mirrors a store holding one marker key and is
  stopped; a backlog is written (its first and last events are marker
  keys) and a new daemon resumes from its cursor. The rate is the events
  after the first batch over the time from the first marker's message
  (the first batch applied) to the last marker's, so start-up is not
  counted (it is in the raw figures). The mirror is then compared with
  the store, key for key and sample for sample (`replicator.verify`).
- Steady lag: with the daemon running, this process adds float samples at
  a fixed rate (5k events/s in the full run) while a subscriber process
  notes when each sample's message arrives; lag is arrival minus the
  moment `add` returned (the commit), on the same system-wide monotonic
  clock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from tests.servers import RedisServer

from .. import data
from ..contenders import Contender, Store, TelstateLmdb
from ..environment import BenchEnv
from ..harness import EVENTS, MILLISECONDS, Case, Family, Figure, Row, latency_figures
from ..scale import Scale

CATCH_UP = Row("replicator catch-up", EVENTS)
LAG_P50 = Row("replicator lag at steady rate, p50", MILLISECONDS)
LAG_P99 = Row("replicator lag at steady rate, p99", MILLISECONDS)

REPO = Path(__file__).resolve().parents[2]
#: Sensors the steady-state writer spreads its samples over.
LAG_SENSORS = 100
#: Longest the daemon may take to start and apply its first event.
START_TIMEOUT = 60.0
#: Events per Redis step, given to the daemon explicitly (it is its default).
BATCH = 5000


@dataclass
class _Fixture:
    contender: Contender
    env: BenchEnv


class _Daemon:
    """A replicator process from the store at `path` to the mirror at `url`."""

    def __init__(self, path: Path, url: str, log: Path) -> None:
        self.log = log
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "replicator", "--log", str(path), "--redis", url]
                + ["--batch", str(BATCH)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def check(self) -> None:
        """Raise, with the last line of its log, if the daemon has exited."""
        if self.process.poll() is not None:
            lines = self.log.read_text(errors="replace").strip().splitlines() or [""]
            raise RuntimeError(f"replicator exited ({self.process.returncode}): {lines[-1]}")

    def stop(self) -> None:
        """SIGTERM (the daemon finishes its batch and exits), SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def _mirror(env: BenchEnv, store: Store) -> Iterator[tuple[RedisServer, Callable[[], _Daemon]]]:
    """A redis-server of its own for one round, and a way to start daemons onto it.

    A server per round keeps the replicator's cursors (which live in the
    server, not in the database it mirrors to) away from the other stores.
    """
    directory = env.scratch("mirror")
    log = directory / "replicator.log"
    daemons: list[_Daemon] = []

    def start() -> _Daemon:
        daemons.append(_Daemon(Path(store.location), f"unix://{server.socket}?db=0", log))
        return daemons[-1]

    with RedisServer(directory=directory) as server:
        try:
            yield server, start
        finally:
            for daemon in daemons:
                daemon.stop()


def _wait_ready(client: redis.Redis, key: str, daemon: _Daemon) -> None:
    """Wait until `key` is in the mirror: the daemon is up and level with the log."""
    deadline = time.monotonic() + START_TIMEOUT
    while not client.exists(key):
        daemon.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicator did not mirror {key} in {START_TIMEOUT} s")
        time.sleep(0.01)


def _wait_messages(pubsub: Any, channels: list[bytes], daemon: _Daemon, timeout: float) -> dict:
    """Arrival time of the first message on each channel (waits for all of them)."""
    arrivals: dict[bytes, float] = {}
    deadline = time.monotonic() + timeout
    while len(arrivals) < len(channels):
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "message":
            arrivals.setdefault(message["channel"], time.monotonic())
        if time.monotonic() > deadline:
            missing = [c.decode() for c in channels if c not in arrivals]
            raise TimeoutError(f"no update from the replicator for {missing} in {timeout} s")
        daemon.check()
    return arrivals


def _check_mirror(store: Store, client: redis.Redis) -> None:
    """Refuse a fast wrong answer: the mirror must equal the store, sample for sample."""
    from replicator.verify import differences, mirror_contents, record_contents

    with store.ts.backend.snapshot() as snapshot:
        expected = record_contents(snapshot.records())
    found = differences(expected, mirror_contents(client), limit=3)
    if found:
        raise RuntimeError(f"the mirror differs from the store: {'; '.join(found)}")


def _catch_up(fixture: _Fixture, round_: int) -> Figure:
    env = fixture.env
    store = fixture.contender.open(env)
    try:
        with _mirror(env, store) as (server, start_daemon), server.client() as client:
            # The mirror first catches up with an empty store; then the daemon stops,
            # the backlog is written, and a new daemon resumes from its cursor.
            store.ts.add("catchup_ready", 1, immutable=True)
            daemon = start_daemon()
            _wait_ready(client, "catchup_ready", daemon)
            daemon.stop()
            before = store.ts.backend.last_seq
            store.ts.add("catchup_first", 1, immutable=True)
            data.write_sample_events(
                store.ts.backend, data.sensor_blocks(env.scale.sensors, env.scale.backlog_events)
            )
            store.ts.add("catchup_last", 1, immutable=True)
            backlog = store.ts.backend.last_seq - before
            store.ts.backend.flush()
            with client.pubsub() as pubsub:
                channels = [b"update/catchup_first", b"update/catchup_last"]
                pubsub.subscribe(*channels)
                started = time.monotonic()
                daemon = start_daemon()
                arrivals = _wait_messages(pubsub, channels, daemon, START_TIMEOUT + backlog / 5000)
            _check_mirror(store, client)
    finally:
        store.close()
    first, last = (arrivals[channel] for channel in channels)
    raw = {"events": backlog, "batch": BATCH, "seconds_from_start": last - started}
    if backlog > 2 * BATCH:
        # The first marker's message comes when the first batch is applied.
        raw.update(seconds=last - first, timed_from="first batch applied")
        return Figure((backlog - BATCH) / (last - first), raw)
    raw.update(seconds=last - started, timed_from="daemon start")
    return Figure(backlog / (last - started), raw)


def _unpack_index(payload: bytes) -> int:
    """The sample index a steady-state update message carries (its timestamp is T0 + index)."""
    start = 1 if payload[:1] == b"\x02" else 0  # katsdptelstate omits the key-type byte
    (timestamp,) = struct.unpack(">d", payload[start : start + 8])
    return round(timestamp - data.T0)


def _subscriber_process(socket: str, pattern: str, count: int, conn: Connection) -> None:
    """Child process: note the arrival of `count` messages matching `pattern`."""
    client = redis.Redis(unix_socket_path=socket)
    arrivals = [0.0] * count
    received = 0
    with client.pubsub() as pubsub:
        pubsub.psubscribe(pattern)
        pubsub.get_message(timeout=5)  # the psubscribe confirmation
        conn.send("ready")
        deadline = None
        while received < count:
            message = pubsub.get_message(timeout=0.5)
            now = time.monotonic()
            if message is not None and message["type"] == "pmessage":
                index = _unpack_index(message["data"])
                if 0 <= index < count and not arrivals[index]:
                    arrivals[index] = now
                    received += 1
            if conn.poll():  # the writer has finished: allow a grace period, then give up
                conn.recv()
                deadline = now + 10
            if deadline is not None and now > deadline:
                break
    conn.send(arrivals)
    client.close()


def _steady_lag(fixture: _Fixture, round_: int) -> dict:
    env = fixture.env
    rate, duration = env.scale.steady_rate, env.scale.steady_seconds
    count = int(rate * duration)
    store = fixture.contender.open(env)
    subscriber = None
    try:
        with _mirror(env, store) as (server, start_daemon), server.client() as client:
            ts = store.ts
            ts.add("lag_ready", 1, immutable=True)
            daemon = start_daemon()
            _wait_ready(client, "lag_ready", daemon)

            context = multiprocessing.get_context("spawn")
            conn, child = context.Pipe()
            subscriber = context.Process(
                target=_subscriber_process,
                args=(server.socket, "update/lag_s*", count, child),
                daemon=True,
            )
            subscriber.start()
            child.close()
            if not conn.poll(START_TIMEOUT) or conn.recv() != "ready":
                raise RuntimeError("the subscriber process did not start")

            names = [f"lag_s{i:03d}" for i in range(LAG_SENSORS)]
            committed = [0.0] * count
            add = ts.add
            start = time.monotonic()
            for i in range(count):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                add(names[i % LAG_SENSORS], float(i), ts=data.T0 + i)
                committed[i] = time.monotonic()
            achieved = count / (time.monotonic() - start)
            conn.send("done")
            if not conn.poll(60):
                raise TimeoutError("the subscriber process did not report")
            arrivals = conn.recv()
            daemon.check()
    finally:
        if subscriber is not None:
            subscriber.join(10)
            if subscriber.is_alive():
                subscriber.terminate()
        store.close()
    missing = sum(1 for arrival in arrivals if not arrival)
    if missing:
        raise RuntimeError(f"{missing} of {count} samples never reached the mirror")
    latencies = [arrival - commit for arrival, commit in zip(arrivals, committed)]
    return latency_figures(latencies, (LAG_P50, LAG_P99), target_rate=rate, achieved_rate=achieved)


class Replication(Family):
    name = "replicator"
    needs = ("telstate.lmdb", "replicator.__main__", "replicator.verify")
    cases = (Case((CATCH_UP,), _catch_up), Case((LAG_P50, LAG_P99), _steady_lag))

    def describe(self, scale: Scale) -> str:
        return (
            f"The daemon (`python -m replicator`, batches of {BATCH} events) in a process of "
            "its own, with a redis-server of its own. Catch-up: a backlog of "
            f"{scale.backlog_events:,} float samples written while the daemon is stopped; "
            "the rate runs from the first batch applied to the last event visible (start-up "
            f"is in the JSON). Lag: {scale.steady_rate} events/s for {scale.steady_seconds:g} "
            "s, from `add` returning to the update message reaching a subscriber process."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        # The daemon tails the log; the writer's durability is the default, batch.
        return contender.kind is TelstateLmdb and contender.durability == "batch"

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return _Fixture(store.contender, env)
