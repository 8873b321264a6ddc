"""wait_key wake-up latency: from the writer calling `add` to the waiter returning.

The waiter blocks in `wait_key(key, condition)` for the i-th value; the
writer pauses (so the waiter is surely blocked again), notes the time,
adds the value and learns when the waiter woke. Same process: the waiter
is a thread. Across processes: a child process opened on the same store
(Redis database or LMDB directory), its wake time read from the same
system-wide monotonic clock.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..contenders import Contender, PeerSpec, Store, open_peer
from ..environment import BenchEnv
from ..harness import MILLISECONDS, Case, Family, Row, latency_figures
from ..scale import Scale

SAME_P50 = Row("wait_key wake-up, same process, p50", MILLISECONDS)
SAME_P99 = Row("wait_key wake-up, same process, p99", MILLISECONDS)
CROSS_P50 = Row("wait_key wake-up, across processes, p50", MILLISECONDS)
CROSS_P99 = Row("wait_key wake-up, across processes, p99", MILLISECONDS)

#: Longest a single wake-up may take before the case fails.
WAIT_TIMEOUT = 10.0
#: Pause before the first write of a round: the waiter has just been told to start.
FIRST_GAP = 0.05


def _wait_for_values(ts: Any, key: str, count: int, report: Any) -> None:
    """Wait for values 1..count of `key` in turn, reporting each wake-up time."""
    for i in range(1, count + 1):
        ts.wait_key(key, lambda value, _, i=i: value >= i, timeout=WAIT_TIMEOUT)
        report(time.monotonic())


def _waiter_process(peer: PeerSpec, conn: Connection) -> None:
    """Child process: open the store, then serve (key, count) requests until None."""
    ts = open_peer(peer)
    conn.send("ready")
    try:
        while (request := conn.recv()) is not None:
            try:
                _wait_for_values(ts, *request, conn.send)
            except Exception as error:  # noqa: BLE001 - handed to the parent to report
                conn.send(f"{type(error).__name__}: {error}")
    finally:
        close = getattr(ts.backend, "close", None)  # katsdptelstate's backends have none
        if close is not None:
            close()


@dataclass
class _Fixture:
    store: Store
    env: BenchEnv
    process: Any = None
    conn: Connection | None = None


def _writes(fixture: _Fixture, key: str, next_wake: Callable[[], Any]) -> list[float]:
    """Write values 1..n of `key`, each after a pause; return the wake-up latencies."""
    latencies = []
    for i in range(1, fixture.env.scale.wake_ups + 1):
        time.sleep(FIRST_GAP if i == 1 else fixture.env.scale.wake_gap)
        start = time.monotonic()
        fixture.store.ts.add(key, i)
        woke = next_wake()
        if isinstance(woke, str):
            raise RuntimeError(f"waiter failed: {woke}")
        latencies.append(woke - start)
    return latencies


def _same_process(fixture: _Fixture, round_: int) -> dict:
    key = f"wake_same_{round_}"
    wakes: queue.SimpleQueue = queue.SimpleQueue()

    def waiter() -> None:
        try:
            _wait_for_values(fixture.store.ts, key, fixture.env.scale.wake_ups, wakes.put)
        except Exception as error:  # noqa: BLE001 - handed to the writer to report
            wakes.put(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        latencies = _writes(fixture, key, lambda: wakes.get(timeout=WAIT_TIMEOUT))
    finally:
        thread.join(WAIT_TIMEOUT)
    return latency_figures(latencies, (SAME_P50, SAME_P99))


def _across_processes(fixture: _Fixture, round_: int) -> dict:
    conn = fixture.conn
    assert conn is not None
    key = f"wake_cross_{round_}"
    conn.send((key, fixture.env.scale.wake_ups))

    def next_wake() -> Any:
        if not conn.poll(WAIT_TIMEOUT):
            raise TimeoutError(f"no wake-up from the waiter process within {WAIT_TIMEOUT} s")
        return conn.recv()

    latencies = _writes(fixture, key, next_wake)
    return latency_figures(latencies, (CROSS_P50, CROSS_P99))


def _shared(contender: Contender) -> str | None:
    return None if contender.kind.shared else "the store lives in one process"


class Waits(Family):
    name = "wait_key"
    cases = (
        Case((SAME_P50, SAME_P99), _same_process),
        Case((CROSS_P50, CROSS_P99), _across_processes, applies=_shared),
    )

    def describe(self, scale: Scale) -> str:
        return (
            "Time from the writer calling `add` to `wait_key` returning in a waiter blocked "
            "on that value: a thread of the same process, or a process of its own opened on "
            f"the same store (Redis database, LMDB directory); {scale.wake_ups} wake-ups per "
            "round. A memory store lives in one process."
        )

    def setup(self, store: Store, env: BenchEnv) -> Any:
        fixture = _Fixture(store, env)
        if store.peer is not None:
            context = multiprocessing.get_context("spawn")
            fixture.conn, child = context.Pipe()
            fixture.process = context.Process(
                target=_waiter_process, args=(store.peer, child), daemon=True
            )
            fixture.process.start()
            child.close()
            if not fixture.conn.poll(60) or fixture.conn.recv() != "ready":
                self.teardown(fixture)
                raise RuntimeError("the waiter process did not start")
        return fixture

    def teardown(self, fixture: _Fixture) -> None:
        if fixture.process is None:
            return
        try:
            fixture.conn.send(None)
        except OSError:
            pass
        fixture.process.join(10)
        if fixture.process.is_alive():
            fixture.process.terminate()
            fixture.process.join()
