"""Followers, measured from outside: steady-state lag and catch-up rate of a follower store.

Each round runs a redis-server of its own, the daemon (`python -m
replicator run`, which appends every event to the log stream) and a
follower (`python -m replicator follow`) in processes of their own.

- Steady lag: this process adds float samples to the primary at a fixed
  rate (5k events/s in the full run) while an observer process waits on
  the follower store (`wait_for_commit`, as `wait_key` does) and notes
  when each event becomes visible there; lag is that moment minus the
  moment `add` returned on the primary, on the system-wide monotonic clock.
  It covers the daemon's read of the log, the stream append, the
  follower's read and its commit, and the reader's wake-up.
- Catch-up: a backlog (1M events in the full run) is written to the
  primary and the daemon fills the stream with all of it (its bound is
  set above the backlog); then a new follower starts from seq 1. The rate
  is the events applied after the follower's first commit over the time
  from that commit to its last (start-up is in the raw figures). The
  follower's log is then compared with the primary's, record for record.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.servers import RedisServer

from .. import data
from ..contenders import Contender, Store, TelstateLmdb
from ..environment import BenchEnv
from ..harness import EVENTS, MILLISECONDS, Case, Family, Figure, Row, latency_figures
from ..scale import Scale

CATCH_UP = Row("follower catch-up", EVENTS)
LAG_P50 = Row("follower lag at steady rate, p50", MILLISECONDS)
LAG_P99 = Row("follower lag at steady rate, p99", MILLISECONDS)

REPO = Path(__file__).resolve().parents[2]
#: Sensors the steady-state writer spreads its samples over.
LAG_SENSORS = 100
#: Longest the processes may take to start, or a backlog to reach the stream (per 10k events).
START_TIMEOUT = 60.0
#: Events per batch, given to the daemon and the follower.
BATCH = 5000


class _Processes:
    """The daemon and the follower of one round, with a redis-server of their own."""

    def __init__(self, env: BenchEnv, store: Store, max_len: int) -> None:
        self.directory = env.scratch("followers")
        self.primary = Path(store.location)
        self.follower = self.directory / "follower"
        self.server = RedisServer(directory=self.directory).start()
        self.url = f"unix://{self.server.socket}?db=0"
        self.log = self.directory / "processes.log"
        self.processes: list[subprocess.Popen] = []
        self._start("--log", str(self.primary), "--redis", self.url, "--batch", str(BATCH),
                    "--log-stream-max-len", str(max_len))  # fmt: skip

    def _start(self, *args: str) -> None:
        with open(self.log, "ab") as output:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "replicator", *args],
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )

    def start_follower(self) -> None:
        self._start("follow", "--store", str(self.follower), "--redis", self.url,
                    "--batch", str(BATCH))  # fmt: skip

    def check(self) -> None:
        """Raise, with the end of their log, if a process has exited."""
        for process in self.processes:
            if process.poll() is not None:
                lines = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{process.args[3]} exited ({process.returncode}): {lines}")

    def wait_stream(self, seq: int, timeout: float) -> None:
        """Wait until the daemon's log stream holds event `seq`."""
        from replicator.log_stream import log_meta_key
        from telstate.redis import MIRROR_CURSOR_DB

        client = self.server.client(db=MIRROR_CURSOR_DB)
        deadline = time.monotonic() + timeout
        try:
            while int(client.hget(log_meta_key(0), "seq") or -1) < seq:
                self.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the log stream did not reach seq {seq} in {timeout} s")
                time.sleep(0.01)
        finally:
            client.close()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.server.cleanup()


def _head(path: Path) -> int:
    """The follower's last seq; 0 while it does not exist or is being made."""
    from telstate.errors import StoreError
    from telstate.lmdb import LmdbBackend

    if not path.exists():
        return 0
    try:
        backend = LmdbBackend(path, readonly=True)
    except StoreError:
        return 0
    try:
        return backend.last_seq
    finally:
        backend.close()


def _wait_head(processes: _Processes, seq: int, timeout: float) -> float:
    """Wait until the follower holds event `seq`; return when it was seen."""
    deadline = time.monotonic() + timeout
    while _head(processes.follower) < seq:
        processes.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the follower did not reach seq {seq} in {timeout} s")
        time.sleep(0.005)
    return time.monotonic()


def _check_follower(processes: _Processes) -> None:
    """Refuse a fast wrong answer: the follower's log must be the primary's, record for record."""
    from telstate.lmdb import LmdbBackend, read_records

    primary = LmdbBackend(processes.primary, readonly=True)
    follower = LmdbBackend(processes.follower, readonly=True)
    try:
        seq = 1
        while chunk := read_records(primary, seq, 100_000):
            if read_records(follower, seq, 100_000) != chunk:
                raise RuntimeError(f"the follower's log differs from the primary's after {seq}")
            seq = chunk[-1][0] + 1
        if follower.last_seq != primary.last_seq:
            raise RuntimeError("the follower's log is not as long as the primary's")
    finally:
        follower.close()
        primary.close()


def _catch_up(contender: Contender, env: BenchEnv) -> Figure:
    store = contender.open(env)
    processes = None
    try:
        store.ts.add("catchup_first", 1, immutable=True)
        data.write_sample_events(
            store.ts.backend, data.sensor_blocks(env.scale.sensors, env.scale.follower_backlog)
        )
        store.ts.add("catchup_last", 1, immutable=True)
        store.ts.backend.flush()
        target = store.ts.backend.last_seq
        processes = _Processes(env, store, max_len=target + 1000)
        processes.wait_stream(target, START_TIMEOUT * (1 + target / 100_000))
        started = time.monotonic()
        processes.start_follower()
        deadline = time.monotonic() + START_TIMEOUT
        while (first_head := _head(processes.follower)) == 0:
            processes.check()
            if time.monotonic() > deadline:
                raise TimeoutError("the follower did not start")
            time.sleep(0.002)
        first = time.monotonic()
        last = _wait_head(processes, target, START_TIMEOUT * (1 + target / 10_000))
        _check_follower(processes)
    finally:
        if processes is not None:
            processes.close()
        store.close()
    raw = {"events": target, "batch": BATCH, "seconds_from_start": last - started}
    if target - first_head > BATCH:
        raw.update(seconds=last - first, timed_from="first batch applied")
        return Figure((target - first_head) / (last - first), raw)
    raw.update(seconds=last - started, timed_from="follower start")
    return Figure(target / (last - started), raw)


def _observer_process(path: str, first_seq: int, count: int, conn: Connection) -> None:
    """Child process: note when each of `count` events from `first_seq` is visible in `path`."""
    from telstate.lmdb import LmdbBackend

    backend = LmdbBackend(path, readonly=True)
    arrivals = [0.0] * count
    seen = backend.last_seq
    conn.send("ready")
    deadline = None
    while seen < first_seq + count - 1:
        seq = backend.wait_for_commit(seen, 0.5)
        now = time.monotonic()
        for arrived in range(max(seen + 1, first_seq), min(seq, first_seq + count - 1) + 1):
            arrivals[arrived - first_seq] = now
        seen = max(seen, seq)
        if deadline is None and conn.poll():  # the writer has finished: a grace period
            conn.recv()
            deadline = now + 10
        if deadline is not None and now > deadline:
            break
    backend.close()
    conn.send(arrivals)


def _steady_lag(contender: Contender, env: BenchEnv) -> dict:
    rate, duration = env.scale.steady_rate, env.scale.steady_seconds
    count = int(rate * duration)
    store = contender.open(env)
    processes = None
    observer = None
    try:
        ts = store.ts
        ts.add("lag_ready", 1, immutable=True)
        processes = _Processes(env, store, max_len=100_000)
        processes.start_follower()
        _wait_head(processes, ts.backend.last_seq, START_TIMEOUT)
        first_seq = ts.backend.last_seq + 1

        context = multiprocessing.get_context("spawn")
        conn, child = context.Pipe()
        observer = context.Process(
            target=_observer_process,
            args=(str(processes.follower), first_seq, count, child),
            daemon=True,
        )
        observer.start()
        child.close()
        if not conn.poll(START_TIMEOUT) or conn.recv() != "ready":
            raise RuntimeError("the observer process did not start")

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
        if ts.backend.last_seq != first_seq + count - 1:
            raise RuntimeError("another process wrote to the store during the measurement")
        conn.send("done")
        if not conn.poll(60):
            raise TimeoutError("the observer process did not report")
        arrivals = conn.recv()
        processes.check()
    finally:
        if observer is not None:
            observer.join(10)
            if observer.is_alive():
                observer.terminate()
        if processes is not None:
            processes.close()
        store.close()
    missing = sum(1 for arrival in arrivals if not arrival)
    if missing:
        raise RuntimeError(f"{missing} of {count} events never reached the follower")
    latencies = [arrival - commit for arrival, commit in zip(arrivals, committed)]
    return latency_figures(latencies, (LAG_P50, LAG_P99), target_rate=rate, achieved_rate=achieved)


class Followers(Family):
    name = "followers"
    needs = ("telstate.lmdb", "replicator.follow", "replicator.log_stream")
    cases = (
        Case((CATCH_UP,), lambda fixture, round_: _catch_up(*fixture)),
        Case((LAG_P50, LAG_P99), lambda fixture, round_: _steady_lag(*fixture)),
    )

    def describe(self, scale: Scale) -> str:
        return (
            f"The daemon and `telstate-replicator follow` (batches of {BATCH} events) in "
            "processes of their own, with a redis-server of their own. Catch-up: a new "
            f"follower applies a backlog of {scale.follower_backlog:,} float samples from "
            "the log stream; the rate runs from its first commit to its last (start-up is "
            f"in the JSON). Lag: {scale.steady_rate} events/s for {scale.steady_seconds:g} "
            "s, from `add` returning on the primary to the event being visible to a reader "
            "of the follower store (`wait_for_commit` in another process)."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        return contender.kind is TelstateLmdb and contender.durability == "batch"

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return (store.contender, env)
