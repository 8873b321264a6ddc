"""Writers on other hosts: telstate writing through a mirror against katsdptelstate writing Redis.

telstate's columns write through `TelescopeState('unix://...mirror?db=0')`
to a daemon (`python -m replicator --accept-writes --durability D`) that
applies the requests to the LMDB store (durability D: the contender's)
and replies once the mirror shows them; katsdptelstate's column writes
directly to its Redis database, as its pipelines do today. Each round of
telstate gets a redis-server and a daemon of its own.

- Latency: one writer adds float samples one after the other; p50 and
  p99 of the time `add` takes.
- Throughput: 8 writer processes (and, for the group-commit gain, 1)
  add float samples to sensors of their own as fast as they can; the rate
  is all their adds over the time from the start barrier to the last
  process done.

The bare LMDB commit columns are the floor under telstate's: the same
round trips through Redis (a request XADDed with its reply skipped, a
blocking XREAD of the writer's own reply stream), to a bare consumer that
reads the waiting requests (XREADGROUP), stores each batch's samples in
one bare LMDB transaction (with or without sync, no writemap), and sends
the replies and its next read in one write. No request records, chain, index or mirror, no
decoding beyond the fields; its writers pack the commands themselves.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import hiredis
from katsdptelstate.encoding import encode_value
from katsdptelstate.utils import pack_timestamp

from tests.servers import RedisServer

from .. import data
from ..contenders import (
    KATSDPTELSTATE,
    BareLmdb,
    Contender,
    KatsdpRedis,
    Store,
    TelstateLmdb,
    open_peer,
)
from ..environment import BenchEnv
from ..harness import MILLISECONDS, OPS, Case, Family, Figure, Row, Unit, latency_figures
from ..scale import Scale

LATENCY_P50 = Row("remote add latency, 1 writer, p50", MILLISECONDS)
LATENCY_P99 = Row("remote add latency, 1 writer, p99", MILLISECONDS)
THROUGHPUT = Row("remote add throughput, 8 writer processes", OPS)
GAIN = Row("remote add, 8 writers over 1 (group commit)", Unit("x", True))

REPO = Path(__file__).resolve().parents[2]
WRITERS = 8
START_TIMEOUT = 60.0


@dataclass
class _Fixture:
    store: Store
    env: BenchEnv


class _Mirror:
    """A redis-server and a daemon that accepts writes into the store at `path`."""

    def __init__(self, env: BenchEnv, path: Path, durability: str) -> None:
        directory = env.scratch("remote")
        self.server = RedisServer(directory=directory).start()
        self.url = f"unix://{self.server.socket}?db=0"
        self.log = directory / "replicator.log"
        with open(self.log, "ab") as output:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "replicator", "--log", str(path), "--redis", self.url]
                + ["--accept-writes", "--durability", durability],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        client = self.server.client(db=15)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not client.exists(b"telstate-replicator:intake:0"):
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start: {self.log.read_text()[-500:]}")
                time.sleep(0.01)
        finally:
            client.close()

    def close(self) -> None:
        self.daemon.terminate()
        try:
            self.daemon.wait(10)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        self.server.cleanup()


#: The floor's request stream, consumer group, and prefix of reply streams.
_FLOOR_REQUESTS = b"floor:requests"
_FLOOR_GROUP = b"floor"
_FLOOR_REPLIES = b"floor:reply:"
#: Longest a floor writer waits for a reply (s) before it fails.
_FLOOR_TIMEOUT = 30.0


class _Connection:
    """A raw RESP connection to a unix socket: send packed commands, read replies."""

    def __init__(self, path: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX)
        self.socket.connect(path)
        self.reader = hiredis.Reader()

    def receive(self, count: int) -> list[Any]:
        replies: list[Any] = []
        while len(replies) < count:
            reply = self.reader.gets()
            if reply is False:
                data = self.socket.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                self.reader.feed(data)
            elif isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis-server refused a command: {reply}")
            else:
                replies.append(reply)
        return replies

    def close(self) -> None:
        self.socket.close()


def consume(
    redis_: _Connection,
    read: bytes,
    stop: Any,
    answer: Callable[[list[Any]], list[tuple[Any, ...]]],
) -> None:
    """Serve requests until `stop` is set: send `read` (a blocking XREADGROUP), and
    for each batch it hands out, send the commands `answer` gives for the batch's
    entries (its replies, retiring the requests) together with the next read."""
    redis_.socket.sendall(read)
    while True:
        (reply,) = redis_.receive(1)
        if not reply:
            if stop.is_set():
                break
            redis_.socket.sendall(read)
            continue
        commands = answer(reply[0][1])
        # The next read goes out with the replies (Redis runs it after them):
        # the consumer does not wait for their answers before it reads again.
        redis_.socket.sendall(b"".join(map(hiredis.pack_command, commands)) + read)
        redis_.receive(len(commands))
        if stop.is_set():
            break


def replies(
    requests: bytes, group: bytes, answered: list[tuple[bytes, bytes, bytes]], *fields: bytes
) -> list[tuple[Any, ...]]:
    """The commands that answer requests and retire them from stream `requests`.

    `answered`: (entry id, reply stream, request id) of each request; each
    reply holds its request id and then `fields`.
    """
    commands: list[tuple[Any, ...]] = []
    for _, stream, request_id in answered:
        commands.append(
            (b"XADD", stream, b"MAXLEN", b"~", b"100", b"*", b"id", request_id, *fields)
        )
        commands.append((b"PEXPIRE", stream, b"60000"))
    ids = [entry_id for entry_id, _, _ in answered]
    commands.append((b"XACK", requests, group, *ids))
    commands.append((b"XDEL", requests, *ids))
    return commands


def _floor_consumer(path: str, store: str, sync: bool, ready: Any, stop: Any) -> None:
    """The bare consumer: each batch of requests in one LMDB transaction, then its replies."""
    import lmdb

    env = lmdb.open(store, map_size=1 << 32, sync=sync, metasync=sync, writemap=False)
    redis_ = _Connection(path)
    redis_.socket.sendall(
        hiredis.pack_command(
            (b"XGROUP", b"CREATE", _FLOOR_REQUESTS, _FLOOR_GROUP, b"0", b"MKSTREAM")
        )
    )
    redis_.receive(1)
    read = hiredis.pack_command(
        (b"XREADGROUP", b"GROUP", _FLOOR_GROUP, b"c", b"COUNT", 256, b"BLOCK", 100)
        + (b"STREAMS", _FLOOR_REQUESTS, b">")
    )

    def answer(entries: list[Any]) -> list[tuple[Any, ...]]:
        # Fields: id, reply token, key, timestamp (packed), value (encoded).
        with env.begin(write=True) as txn:
            for _, fields in entries:
                txn.put(fields[5] + fields[7], fields[9])
        answered = [(entry_id, _FLOOR_REPLIES + f[3], f[1]) for entry_id, f in entries]
        return replies(_FLOOR_REQUESTS, _FLOOR_GROUP, answered)

    ready.set()
    consume(redis_, read, stop, answer)
    redis_.close()
    env.close()


class _FloorWriter:
    """A writer of the floor: `add` sends a request and waits for its reply, as telstate's."""

    def __init__(self, path: str) -> None:
        self.backend = self  # (what _close looks at, as on a TelescopeState)
        self._redis = _Connection(path)
        self._redis.socket.settimeout(_FLOOR_TIMEOUT)
        self._token = os.urandom(8).hex().encode()
        self._counter = itertools.count()
        self._last = b"0"
        self._skip = hiredis.pack_command((b"CLIENT", b"REPLY", b"SKIP"))
        self._replies = _FLOOR_REPLIES + self._token

    def add(self, key: str, value: Any, ts: float) -> None:
        request_id = b"%d" % next(self._counter)
        request = (b"XADD", _FLOOR_REQUESTS, b"*", b"id", request_id, b"reply", self._token)
        request += (b"key", key.encode(), b"ts", pack_timestamp(ts), b"value", encode_value(value))
        send = self._redis.socket.sendall
        send(self._skip + hiredis.pack_command(request) + self._read())
        deadline = time.monotonic() + _FLOOR_TIMEOUT
        while True:
            (reply,) = self._redis.receive(1)
            if reply:
                entries = reply[0][1]
                self._last = entries[-1][0]
                if any(fields[1] == request_id for _, fields in entries):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the floor's consumer did not reply")
            send(self._read())

    def _read(self) -> bytes:
        """The blocking read of this writer's replies after the last one read."""
        read = (b"XREAD", b"BLOCK", 1000, b"STREAMS", self._replies, self._last)
        return hiredis.pack_command(read)

    def close(self) -> None:
        self._redis.close()


class Consumer:
    """A redis-server, and a process that serves the requests sent through it.

    The process runs ``target(socket, *args, ready, stop)``: it sets
    `ready` once it serves, and returns once `stop` is set.
    """

    def __init__(self, env: BenchEnv, target: Callable[..., None], *args: Any) -> None:
        self.server = RedisServer(directory=env.scratch("remote-consumer")).start()
        context = multiprocessing.get_context("spawn")
        ready, self.stop = context.Event(), context.Event()
        self.process = context.Process(
            target=target, args=(self.server.socket, *args, ready, self.stop), daemon=True
        )
        try:
            self.process.start()
            deadline = time.monotonic() + START_TIMEOUT
            while not ready.wait(0.1):
                if not self.process.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the consumer did not start (exit code {self.process.exitcode})"
                    )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.stop.set()
        if self.process.pid is not None:
            self.process.join(10)
        if self.process.pid is not None and self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        self.server.cleanup()


def _writer_ts(where: tuple[str, Any]) -> Any:
    """The TelescopeState a writer uses: telstate on the mirror, the floor's, or a peer."""
    kind, location = where
    if kind == "mirror":
        import telstate

        return telstate.TelescopeState(location)
    if kind == "floor":
        return _FloorWriter(location)
    return open_peer((kind, location))


def _close(ts: Any) -> None:
    close = getattr(ts.backend, "close", None)  # katsdptelstate's RedisBackend has none
    if close is not None:
        close()


def _writer_process(where: tuple[str, Any], name: str, count: int, barrier: Any, queue: Any):
    ts = _writer_ts(where)
    ts.add(name, 0.0, ts=data.T0)  # connected and warm
    barrier.wait()
    for i in range(count):
        ts.add(name, float(i), ts=data.T0 + i + 1)
    queue.put(time.monotonic())
    _close(ts)


def _rate(where: tuple[str, Any], processes: int, count: int) -> float:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    series = next(_SERIES)  # keys of their own, as in _latency
    queue = context.Queue()
    workers = [
        context.Process(
            target=_writer_process, args=(where, f"remote_{series}_w{i}", count, barrier, queue)
        )
        for i in range(processes)
    ]
    try:
        for worker in workers:
            worker.start()
        barrier.wait(START_TIMEOUT)
        start = time.monotonic()
        ends: list[float] = []
        while len(ends) < processes:
            try:
                ends.append(queue.get(timeout=1.0))
            except Empty:
                failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if failed or time.monotonic() - start > 600:
                    raise RuntimeError(f"a writer process failed (exit codes {failed})") from None
        for worker in workers:
            worker.join(30)
            if worker.exitcode != 0:
                raise RuntimeError("a writer process failed")
        return processes * count / (max(ends) - start)
    finally:
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                worker.kill()
                worker.join()


def _with_writers(fixture: _Fixture, measure: Any) -> Any:
    """Run `measure(where)` where writers find the contender's store."""
    store = fixture.store
    if store.contender.package == KATSDPTELSTATE:
        assert store.peer is not None
        return measure(store.peer)
    if store.contender.is_baseline:
        path = str(fixture.env.scratch("remote-floor") / "store")
        floor = Consumer(fixture.env, _floor_consumer, path, store.contender.durability == "fsync")
        try:
            return measure(("floor", floor.server.socket))
        finally:
            floor.close()
    mirror = _Mirror(fixture.env, Path(store.location), store.contender.durability)
    try:
        return measure(("mirror", mirror.url))
    finally:
        mirror.close()


#: Numbers the measurements, so that each writes keys no earlier one wrote.
_SERIES = itertools.count()


def _ops(scale: Scale) -> int:
    return max(200, min(scale.write_ops, 3000))


def _latency(fixture: _Fixture, round_: int) -> dict[str, Figure]:
    count = _ops(fixture.env.scale)

    def measure(where: tuple[str, Any]) -> dict[str, Figure]:
        ts = _writer_ts(where)
        add = ts.add
        # A key of its own per measurement: samples already in the store
        # (an earlier round's) would make every add a write that changes nothing.
        key = f"remote_latency_{next(_SERIES)}"
        add(key, 0.0, ts=data.T0)
        latencies = []
        clock = time.perf_counter
        for i in range(count):
            start = clock()
            add(key, float(i), ts=data.T0 + i + 1)
            latencies.append(clock() - start)
        _close(ts)
        return latency_figures(latencies, (LATENCY_P50, LATENCY_P99))

    return _with_writers(fixture, measure)


def _throughput(fixture: _Fixture, round_: int) -> dict[str, Figure]:
    count = max(50, _ops(fixture.env.scale) // 4)

    def measure(where: tuple[str, Any]) -> dict[str, Figure]:
        one = _rate(where, 1, count)
        many = _rate(where, WRITERS, count)
        raw = {"one_writer_ops": one, "writers": WRITERS, "ops_per_writer": count}
        return {THROUGHPUT.name: Figure(many, raw), GAIN.name: Figure(many / one, raw)}

    return _with_writers(fixture, measure)


class RemoteWrites(Family):
    name = "remote writes"
    needs = ("telstate.remote", "replicator.intake")
    cases = (
        Case((LATENCY_P50, LATENCY_P99), _latency),
        Case((THROUGHPUT, GAIN), _throughput),
    )

    def describe(self, scale: Scale) -> str:
        return (
            "telstate writes through a mirror to a daemon that accepts writes (`--accept-writes"
            " --durability` as the column says) and replies once the mirror shows the write;"
            " katsdptelstate writes its Redis directly. Latency: one writer, "
            f"{_ops(scale)} float adds. Throughput: {WRITERS} writer processes (and 1, for the"
            f" gain) of {max(50, _ops(scale) // 4)} adds each, from a start barrier. The bare"
            " LMDB commit columns are the floor: the same round trips through Redis to a bare"
            " consumer that stores each batch's samples in one bare LMDB transaction (with or"
            " without sync) and replies, with no request records, chain or mirror."
        )

    def repeats(self, scale: Scale) -> int:
        return scale.heavy_repeats

    def applies(self, contender: Contender) -> bool:
        if contender.kind is TelstateLmdb:
            return contender.durability in ("batch", "fsync")
        return contender.kind in (BareLmdb, KatsdpRedis)

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return _Fixture(store, env)
