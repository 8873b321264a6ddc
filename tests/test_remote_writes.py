"""Writers on many hosts: real writer processes write through the mirror to the log.

Each test runs a redis-server, ``telstate-replicator --accept-writes`` as a
subprocess and writer processes that use only the public telstate API on
the mirror's URL. Afterwards every write that returned must be in the log
exactly once, ``verify`` must pass and the mirror must equal the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import hiredis
import katsdptelstate
import katsdptelstate.redis
import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

import telstate
import telstate.aio
from replicator.cursor import MirrorState, read_cursor
from replicator.verify import differences, mirror_contents, record_contents
from telstate import TelescopeState
from telstate.encoding import encode_value
from telstate.errors import (
    ConnectionError,
    ImmutableKeyError,
    ReadOnlyError,
    StoreError,
    TelstateError,
    WriteTimeoutError,
)
from telstate.lmdb import (
    LmdbBackend,
    apply_records,
    create_follower,
    make_follower,
    read_records,
    writers_of,
)
from telstate.lmdb.backup import backup
from telstate.log import Op, record_op_writer
from telstate.redis import MIRROR_CURSOR_DB, RedisBackend
from telstate.remote import Reply, intake_key, request_stream_key
from tests.servers import RedisServer

REPO = Path(__file__).resolve().parents[1]
SETTLE = 30.0
_SPAWN = multiprocessing.get_context("spawn")


class Daemon:
    """``python -m replicator --accept-writes`` as a subprocess, its log in a file."""

    def __init__(self, store: Path, url: str, log: Path, *args: str) -> None:
        self.log = log
        command = [sys.executable, "-m", "replicator", "--log", str(store), "--redis", url]
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                [*command, "--accept-writes", *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(10) == 0, self.log.read_text()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a RedisServer on TCP as well)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    LmdbBackend(path, durability="none").close()
    return path


@pytest.fixture
def server(tmp_path):
    (tmp_path / "redis").mkdir()
    with RedisServer(directory=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def mirror_url(server):
    return server.url + "?db=0"


@pytest.fixture
def daemon(tmp_path, store, server, mirror_url):
    """A running daemon that accepts writes, with the mirror ready for writers."""
    started: list[Daemon] = []

    def start(*args: str, url: str | None = None) -> Daemon:
        started.append(Daemon(store, url or mirror_url, tmp_path / "replicator.log", *args))
        wait_ready(server)
        return started[-1]

    start.started = started  # type: ignore[attr-defined]
    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill()


def wait_ready(server: RedisServer) -> None:
    """Wait until the mirror is READY and the intake accepts writes."""
    client = server.client(db=0)
    control = server.client(db=MIRROR_CURSOR_DB)
    deadline = time.monotonic() + SETTLE
    while True:
        try:
            _, cursor = read_cursor(client)
            groups = control.xinfo_groups(request_stream_key(0))
            if cursor is not None and cursor.state == MirrorState.READY and groups:
                break
        except redis.ResponseError:
            pass
        assert time.monotonic() < deadline, "the daemon did not start accepting writes"
        time.sleep(0.05)
    client.close()
    control.close()


def wait_retired(server: RedisServer) -> None:
    """Wait until no daemon says it accepts writes for mirror database 0."""
    control = server.client(db=MIRROR_CURSOR_DB)
    try:
        deadline = time.monotonic() + SETTLE
        while control.exists(intake_key(0)):
            assert time.monotonic() < deadline, "the intake key stayed"
            time.sleep(0.05)
    finally:
        control.close()


def settle(store: Path, server: RedisServer) -> None:
    """Wait until the mirror holds the whole log; check it equals the store and verify passes."""
    backend = LmdbBackend(store, readonly=True)
    client = server.client(db=0)
    try:
        deadline = time.monotonic() + SETTLE
        while True:
            _, cursor = read_cursor(client)
            if cursor is not None and cursor.seq == backend.last_seq:
                break
            assert time.monotonic() < deadline, f"mirror stuck at {cursor}"
            time.sleep(0.05)
        assert backend.verify() == []
        expected = record_contents(backend.records())
        assert differences(expected, mirror_contents(client)) == []
    finally:
        client.close()
        backend.close()


def run_processes(target: Any, *args_list: tuple, timeout: float = 120.0) -> list[Any]:
    """Run `target(queue, *args)` in one spawned process per args; return what each put."""
    queue = _SPAWN.Queue()
    processes = [_SPAWN.Process(target=target, args=(queue, *args)) for args in args_list]
    for process in processes:
        process.start()
    results = [queue.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout)
        assert process.exitcode == 0
    return results


# --- writer processes (module level, for spawn) -----------------------------------------


def race_first_timestamp(queue: Any, url: str, value: float, barrier: Any) -> None:
    ts = TelescopeState(url)
    barrier.wait()
    try:
        ts.add("first_timestamp", value, immutable=True)
        outcome = "set"
    except ImmutableKeyError:
        outcome = "lost"
    queue.put((os.getpid(), value, outcome, ts["first_timestamp"]))
    ts.backend.close()


def write_sensor(queue: Any, url: str, name: str, count: int, size: int) -> None:
    ts = TelescopeState(url)
    for i in range(count):
        value = np.full(size, i, dtype=np.float64) if size else float(i)
        ts.add(name, value, ts=1000.0 + i)
    queue.put((name, count))
    ts.backend.close()


def write_locally(queue: Any, path: str, name: str, count: int) -> None:
    ts = TelescopeState(f"lmdb://{path}")
    for i in range(count):
        ts.add(name, float(i), ts=1000.0 + i)
    queue.put((name, count))
    ts.backend.close()


def barrier_member(queue: Any, url: str, index: int, members: int) -> None:
    ts = TelescopeState(url)
    ts.add(f"ready{index}", index, immutable=True)
    for other in range(members):
        ts.wait_key(f"ready{other}", timeout=30)
    queue.put(index)
    ts.backend.close()


def write_until_told(queue: Any, url: str, name: str, stop_file: str, log_file: str) -> None:
    """Add numbered samples until `stop_file` exists; log each sample whose add returned."""
    ts = TelescopeState(RedisBackend.from_url(url, write_timeout=30.0))
    failures = 0
    with open(log_file, "w") as log:
        i = 0
        while not os.path.exists(stop_file):
            try:
                ts.add(name, i, ts=float(i))
            except (ConnectionError, WriteTimeoutError) as error:
                failures += 1
                log.write(f"failed {i} {type(error).__name__}\n")
            else:
                log.write(f"ok {i}\n")
            log.flush()
            i += 1
    queue.put((name, failures))
    ts.backend.close()


# --- the tests --------------------------------------------------------------------------


def test_four_processes_race_on_first_timestamp(store, server, mirror_url, daemon):
    daemon()
    barrier = _SPAWN.Barrier(4)
    results = run_processes(
        race_first_timestamp, *[(mirror_url, 1000.0 + i, barrier) for i in range(4)]
    )
    winners = [r for r in results if r[2] == "set"]
    assert len(winners) == 1
    winner_pid, winner_value = winners[0][:2]
    assert {r[3] for r in results} == {winner_value}
    backend = LmdbBackend(store, readonly=True)
    events = [e for e in backend.events() if e.key == b"first_timestamp"]
    assert len(events) == 1
    # The writer identity is the writing process's, not the daemon's.
    assert events[0].writer.pid == winner_pid
    assert events[0].writer.host == socket.gethostname()
    backend.close()
    settle(store, server)


def test_sensor_stream_and_8mb_array_sensor(store, server, mirror_url, daemon):
    daemon()
    run_processes(write_sensor, (mirror_url, "sensor", 300, 0), (mirror_url, "array", 4, 1 << 20))
    ts = TelescopeState(mirror_url)
    assert len(ts.get_range("sensor", st=0)) == 300
    array = ts.get_range("array", st=0)
    assert [v.nbytes for v, _ in array] == [8 << 20] * 4
    assert np.all(array[3][0] == 3)
    ts.backend.close()
    settle(store, server)


def test_local_and_remote_writers_at_once_reach_the_mirror_and_the_log_stream(
    store, server, mirror_url, daemon
):
    # The daemon's write thread projects its own commits; the mirror's
    # thread takes its time over those (their echo), but not over the
    # commits of a local writer made meanwhile, and it feeds the log stream.
    from replicator.log_stream import log_stream_key

    daemon()
    results = run_processes(
        _write_remote_or_local,
        ("remote", mirror_url, "remote_a", 400),
        ("remote", mirror_url, "remote_b", 400),
        ("local", str(store), "local", 400),
    )
    assert sorted(results) == [("local", 400), ("remote_a", 400), ("remote_b", 400)]
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    control = server.client(db=MIRROR_CURSOR_DB)
    try:
        deadline = time.monotonic() + SETTLE
        while control.xlen(log_stream_key(0)) < backend.last_seq:
            assert time.monotonic() < deadline, "the log stream lags behind the log"
            time.sleep(0.05)
        entries = control.xrange(log_stream_key(0))
        assert [entry_id for entry_id, _ in entries] == [
            b"%d-0" % seq for seq in range(1, backend.last_seq + 1)
        ]
    finally:
        control.close()
        backend.close()


def _write_remote_or_local(queue: Any, how: str, where: str, name: str, count: int) -> None:
    if how == "local":
        write_locally(queue, where, name, count)
    else:
        write_sensor(queue, where, name, count, 0)


def test_wait_key_barrier_across_processes(store, server, mirror_url, daemon):
    daemon()
    assert sorted(run_processes(barrier_member, *[(mirror_url, i, 4) for i in range(4)])) == [
        0,
        1,
        2,
        3,
    ]
    settle(store, server)


def test_results_and_errors_are_those_of_a_local_write(store, server, mirror_url, daemon):
    daemon()
    ts = TelescopeState(RedisBackend.from_url(mirror_url, writer_name="ingest1"))
    ts.add("attr", {"a": 1}, immutable=True)
    ts.add("attr", {"a": 1}, immutable=True)  # the same value again: fine, as locally
    with pytest.raises(ImmutableKeyError, match="attr"):
        ts.add("attr", {"a": 2}, immutable=True)
    ts.add("sensor", 1.0, ts=5.0)
    with pytest.raises(ImmutableKeyError):
        ts.add("sensor", 1.0, immutable=True)
    with pytest.raises(ImmutableKeyError):
        ts.set_indexed("sensor", "x", 1)
    ts.set_indexed("solutions", "gain", np.arange(3))
    ts.set_indexed("solutions", "gain", np.arange(3))
    with pytest.raises(ImmutableKeyError):
        ts.set_indexed("solutions", "gain", np.arange(4))
    assert list(ts.get_indexed("solutions", "gain")) == [0, 1, 2]
    ts.delete("sensor")
    assert "sensor" not in ts
    ts.clear()
    assert ts.keys() == []
    ts.backend.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    writers = {event.writer for event in backend.events()}
    backend.close()
    assert writers == {(socket.gethostname(), os.getpid(), "ingest1")}


def _write_in_child(queue: Any, ts: TelescopeState) -> None:
    try:
        ts.add("forked", 2.0, ts=2.0)
        queue.put("ok")
    except Exception as error:  # reported to the parent, which fails the test
        queue.put(repr(error))


def test_a_forked_child_writes_on_a_connection_of_its_own(store, server, mirror_url, daemon):
    # The writer holds one connection (telstate.remote.Wire): a child
    # sharing its socket with the parent would mix up their replies.
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("forked", 1.0, ts=1.0)
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_write_in_child, args=(queue, ts))
    child.start()
    assert queue.get(timeout=SETTLE) == "ok"
    child.join(SETTLE)
    assert child.exitcode == 0
    ts.add("forked", 3.0, ts=3.0)
    assert [value for value, _ in ts.get_range("forked", st=0)] == [1.0, 2.0, 3.0]
    ts.backend.close()
    settle(store, server)


def test_a_child_forked_while_another_thread_writes_can_write(store, server, mirror_url, daemon):
    """The writer's lock is held by a thread for its whole round trip; a fork then copies it
    held, and nothing in the child would let it go: the child's first write waited for ever."""
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("busy", 0.0, ts=1.0)
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            ts.add("busy", float(i), ts=1.0 + i)

    busy = threading.Thread(target=keep_writing)
    busy.start()
    fork = multiprocessing.get_context("fork")
    try:
        for _ in range(5):
            time.sleep(0.01)
            queue = fork.Queue()
            child = fork.Process(target=_write_in_child, args=(queue, ts))
            child.start()
            try:
                assert queue.get(timeout=SETTLE) == "ok"
            finally:
                child.join(SETTLE)
                if child.is_alive():
                    child.kill()
            assert child.exitcode == 0
    finally:
        stop.set()
        busy.join(SETTLE)
    assert [value for value, _ in ts.get_range("forked", st=0)] == [2.0]
    ts.backend.close()
    settle(store, server)


def _kill_writer_connections(server) -> int:
    """Close, from the server's side, the idle connections of writers (db 15, not the daemon's)."""
    admin = server.client()
    try:
        me = admin.client_id()
        killed = 0
        for client in admin.client_list():
            if (
                int(client["id"]) != me
                and client["db"] == "15"
                and "replicator" not in client.get("name", "")
            ):
                admin.client_kill_filter(_id=client["id"])
                killed += 1
        return killed
    finally:
        admin.close()


def test_a_write_on_a_connection_the_server_closed_meanwhile_goes_through(
    store, server, mirror_url, daemon
):
    """Its `timeout`, CLIENT KILL or a restart close an idle writer's connection: on a unix
    socket the next send fails at once (EPIPE), before anything reached the server. It was
    reported as ConnectionError ("could not send"); it is sent again on a new connection."""
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("idle", 0.0, ts=1.0)
    for i in range(1, 4):
        assert _kill_writer_connections(server) >= 1
        time.sleep(0.05)
        ts.add("idle", float(i), ts=1.0 + i)
    assert [value for value, _ in ts.get_range("idle", st=0)] == [0.0, 1.0, 2.0, 3.0]
    ts.backend.close()
    settle(store, server)


async def test_an_aio_write_on_a_connection_the_server_closed_meanwhile_goes_through(
    store, server, mirror_url, daemon
):
    daemon()
    from telstate.aio.redis import RedisBackend as AioRedisBackend

    ts = telstate.aio.TelescopeState(await AioRedisBackend.from_url(mirror_url))
    await ts.add("idle", 0.0, ts=1.0)
    for i in range(1, 4):
        assert _kill_writer_connections(server) >= 1
        await asyncio.sleep(0.05)
        await ts.add("idle", float(i), ts=1.0 + i)
    assert [value for value, _ in await ts.get_range("idle", st=0)] == [0.0, 1.0, 2.0, 3.0]
    ts.backend.close()
    await ts.backend.wait_closed()
    settle(store, server)


def test_writes_go_on_after_the_scripts_are_flushed(store, server, mirror_url, daemon):
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("before", 1, immutable=True)
    client = server.client()
    client.script_flush()  # as after a restart: the daemon's scripts are loaded again
    client.close()
    ts.add("after", 2, immutable=True)
    assert ts.get("after") == 2
    ts.backend.close()
    settle(store, server)


async def test_aio_writes_through_the_mirror(store, server, mirror_url, daemon):
    daemon()
    from telstate.aio.redis import RedisBackend as AioRedisBackend

    ts = telstate.aio.TelescopeState(await AioRedisBackend.from_url(mirror_url))
    await ts.add("aio", 1, immutable=True)
    with pytest.raises(ImmutableKeyError):
        await ts.add("aio", 2, immutable=True)
    await ts.add("aio-sensor", 2.0, ts=3.0)
    await ts.set_indexed("aio-indexed", "k", "v")
    assert await ts.get("aio") == 1
    assert await ts.get_indexed("aio-indexed", "k") == "v"
    ts.backend.close()
    await ts.backend.wait_closed()
    settle(store, server)


def test_katsdptelstate_reads_what_remote_writers_wrote(store, server, mirror_url, daemon):
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("attr", [1, "two"], immutable=True)
    for i in range(5):
        ts.add("sensor", i * 1.5, ts=100.0 + i)
    ts.set_indexed("indexed", "sub", {"x": 1})
    ts.backend.close()
    theirs = katsdptelstate.TelescopeState(
        katsdptelstate.redis.RedisBackend(redis.Redis(unix_socket_path=server.socket, db=0))
    )
    assert theirs["attr"] == [1, "two"]
    assert theirs.get_range("sensor", st=0) == [(i * 1.5, 100.0 + i) for i in range(5)]
    assert theirs.get_indexed("indexed", "sub") == {"x": 1}


PASSWORD = "pw-for-remote-writes"


def test_writers_may_send_requests_and_write_no_mirror_key(store, server, mirror_url, daemon):
    """With --acl-setup, clients without credentials write through the daemon only."""
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "admin", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    admin.close()
    daemon("--acl-setup", url=f"unix://admin:{PASSWORD}@{server.socket}?db=0")
    ours = TelescopeState(mirror_url)  # user default, as every client without credentials
    ours.add("attr", 1, immutable=True)
    ours.add("sensor", 2.0, ts=1.0)
    ours.add("sensor", 3.0, ts=2.0)
    # The rules let writers skip XADD replies (CLIENT REPLY), so they wake once per write.
    assert ours.backend._remote._session.skip_replies is True
    theirs = katsdptelstate.TelescopeState(mirror_url)
    assert theirs["attr"] == 1
    with pytest.raises(redis.ResponseError, match="can't run this command"):
        theirs.add("foreign", 1.0)
    with pytest.raises(redis.exceptions.NoPermissionError):
        theirs.delete("attr")
    raw = server.client(db=MIRROR_CURSOR_DB)
    for command in (
        ("XADD", b"telstate-replicator:replies:0:forged", "*", "id", "x"),
        ("XADD", b"telstate-replicator:cursor:0", "*", "f", "v"),
        ("DEL", request_stream_key(0)),
        ("HSET", intake_key(0), "store", "other"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            raw.execute_command(*command)
    raw.close()
    ours.backend.close()
    settle(store, server)


def test_duplicate_request_is_applied_once(store, server, mirror_url, daemon):
    """A request delivered twice (a resend) is applied once and answered twice alike."""
    daemon()
    ts = TelescopeState(mirror_url)
    writer = ts.backend._remote
    session = writer._session
    control = server.client(db=MIRROR_CURSOR_DB)
    request_id, fields = session.request(Op.SET_IMMUTABLE, 10.0, key=b"dup", value=b"\xff\x01")
    control.xadd(session.requests, fields)
    control.xadd(session.requests, fields)
    replies = []
    deadline = time.monotonic() + SETTLE
    while len(replies) < 2:
        assert time.monotonic() < deadline
        for _, entries in control.xread({session.replies: b"0"}, block=1000) or ():
            replies = [f for _, f in entries if f[b"id"] == request_id]
    assert replies[0] == replies[1]
    assert replies[0][b"status"] == b"ok"
    backend = LmdbBackend(store, readonly=True)
    assert len([e for e in backend.events() if e.key == b"dup"]) == 1
    backend.close()
    control.close()
    ts.backend.close()


def test_bad_requests_get_error_replies_and_block_nothing(store, server, mirror_url, daemon):
    process = daemon()
    ts = TelescopeState(mirror_url)
    session = ts.backend._remote._session
    control = server.client(db=MIRROR_CURSOR_DB)
    _, good = session.request(Op.SET_IMMUTABLE, 10.0, key=b"k", value=b"\xff\x01")
    bad = [
        {b"junk": b"1"},
        {**good, b"id": b"bad1", b"v": b"99"},
        {**good, b"id": b"bad2", b"op": b"explode"},
        {**good, b"id": b"bad3", b"timeout": b"-5"},
        {**good, b"id": b"bad4", b"timeout": b"x" * 1000},
        {**good, b"id": b"bad5", b"store": b"another-store"},
        {**good, b"id": b"bad6", b"extra": b"field"},
        {**{k: v for k, v in good.items() if k != b"value"}, b"id": b"bad7"},
        {**good, b"id": b"bad8", b"op": b"add_mutable", b"ts": b"short"},
        {**good, b"id": b"bad9", b"value": b"\xff\xc1" * (4 << 20)},
        {**good, b"id": b"big", b"key": b"k" * (1 << 20)},
    ]
    for fields in bad:
        control.xadd(session.requests, fields)
    ts.add("after", 1, immutable=True)  # served although bad requests came first
    replies = {}
    deadline = time.monotonic() + SETTLE
    wanted = {b"bad%d" % i for i in range(1, 10)} | {b"big"}
    while not wanted <= replies.keys():
        assert time.monotonic() < deadline
        for _, entries in control.xread({session.replies: b"0"}) or ():
            replies = {f[b"id"]: f for _, f in entries}
        time.sleep(0.05)
    assert {replies[b"bad%d" % i][b"status"] for i in range(1, 10)} == {b"error"}
    assert replies[b"bad5"][b"error"] == b"store"
    assert b"does not decode" in replies[b"bad9"][b"message"]
    assert replies[b"big"][b"status"] == b"ok"  # a 1 MB key is a key like another
    assert process.process.poll() is None
    backend = LmdbBackend(store, readonly=True)
    assert backend.verify() == []
    backend.close()
    control.close()
    ts.backend.close()


def test_daemon_down_means_timeout_and_the_write_is_never_applied(
    store, server, mirror_url, daemon
):
    first = daemon()
    ts = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=1.0))
    ts.add("before", 1, immutable=True)
    first.stop()
    start = time.monotonic()
    with pytest.raises(WriteTimeoutError, match="no reply"):
        ts.add("late", 1, immutable=True)
    assert 0.9 < time.monotonic() - start < 5
    daemon()  # comes back: finds the request, too old, and drops it
    patient = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=30.0))
    patient.add("after", 1, immutable=True)  # (sent while the daemon may still be starting)
    patient.backend.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    assert [e.key for e in backend.events()] == [b"before", b"after"]
    backend.close()
    ts.backend.close()


def _stream_ahead_by(control: redis.Redis) -> int:
    """How far (ms) the request stream's last id is ahead of the server's clock."""
    last = control.xinfo_stream(request_stream_key(0))["last-generated-id"]
    seconds, micros = control.time()
    return int(last.split(b"-")[0]) - (seconds * 1000 + micros // 1000)


def test_request_ids_ahead_of_the_servers_clock_never_get_a_timed_out_write_applied(
    store, server, mirror_url, daemon
):
    # A client may XADD with an id far ahead (found by review): Redis then
    # stamps every request with that time, and one that waited while the
    # daemon was down looked young forever, applied long after its writer
    # was told "not written".
    control = server.client(db=MIRROR_CURSOR_DB)
    year = 365 * 86400 * 1000
    first = daemon()
    ts = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=1.0))
    ts.add("before", 1, immutable=True)
    first.stop()
    seconds, _ = control.time()
    control.xadd(request_stream_key(0), {b"junk": b"1"}, id=b"%d-0" % (seconds * 1000 + year))
    with pytest.raises(WriteTimeoutError, match="no reply"):
        ts.add("late", 1, immutable=True)
    time.sleep(1.0)  # well past its timeout: by the server's clock, expired
    second = daemon()  # refuses it (its id is ahead) and makes the stream anew
    deadline = time.monotonic() + SETTLE
    while _stream_ahead_by(control) > 0:
        assert time.monotonic() < deadline, "the request stream was not made anew"
        time.sleep(0.05)
    ts.add("after", 1, immutable=True)
    # While the daemon runs: a writer in flight is told at once, and the next write goes.
    seconds, _ = control.time()
    control.xadd(request_stream_key(0), {b"junk": b"2"}, id=b"%d-0" % (seconds * 1000 + year))
    with pytest.raises(TelstateError, match="not applied.*ahead of the Redis server's clock"):
        ts.add("refused", 1, immutable=True)
    ts.add("again", 1, immutable=True)
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    assert [e.key for e in backend.events()] == [b"before", b"after", b"again"]
    backend.close()
    second.stop()
    assert "made anew" in second.log.read_text()
    ts.backend.close()
    control.close()


def test_redis_down_means_connection_error(store, server, mirror_url, daemon):
    daemon()
    ts = TelescopeState(mirror_url)
    ts.add("before", 1, immutable=True)
    server.stop()
    with pytest.raises(ConnectionError):
        ts.add("during", 1, immutable=True)
    ts.backend.close()


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_redis_down_means_connection_error_over_tcp_too(tmp_path, store, aio):
    """Found by review: over TCP, a warm writer's send to a Redis that had gone
    down went out (into the closed connection), and only the read failed, so the
    write waited its whole timeout and said "may have been applied"; on a unix
    socket the send fails at once. The writer now finds the closed connection
    before it sends, and a new one fails before anything is sent."""
    from telstate.aio.redis import RedisBackend as AioRedisBackend

    port = _free_port()
    (tmp_path / "tcp").mkdir()
    timeout = 5.0
    with RedisServer(directory=tmp_path / "tcp", port=port) as server:
        process = Daemon(store, server.url + "?db=0", tmp_path / "replicator.log")
        url = f"redis://127.0.0.1:{port}/0"  # the writers' connections: TCP
        try:
            wait_ready(server)

            async def write_async() -> float:
                backend = await AioRedisBackend.from_url(url, write_timeout=timeout)
                ts = telstate.aio.TelescopeState(backend)
                await ts.add("before", 1.0, ts=1.0)
                server.stop()
                await asyncio.sleep(0.2)  # the close reaches the writer's connection
                start = time.monotonic()
                with pytest.raises(ConnectionError):
                    await ts.add("during", 2.0, ts=2.0)
                elapsed = time.monotonic() - start
                backend.close()
                await backend.wait_closed()
                return elapsed

            if aio:
                elapsed = asyncio.run(write_async())
            else:
                ts = TelescopeState(RedisBackend.from_url(url, write_timeout=timeout))
                ts.add("before", 1.0, ts=1.0)
                server.stop()
                time.sleep(0.2)
                start = time.monotonic()
                with pytest.raises(ConnectionError):
                    ts.add("during", 2.0, ts=2.0)
                elapsed = time.monotonic() - start
                ts.backend.close()
        finally:
            process.kill()
    assert elapsed < 1.5, elapsed  # at once (one resend on a new connection), not its timeout


def _write_to_a_hung_redis(
    server: RedisServer, aio: bool, socket_timeout: float | None = None
) -> list[Any]:
    """Write once, SIGSTOP Redis, then try a write with a warm writer and with a cold one.

    The writers' clients have no socket timeout (as ``redis.Redis(host=...)``
    has in redis-py 5). Returns what each hung write raised and after how long.
    """
    from telstate.aio.redis import RedisBackend as AioRedisBackend
    from telstate.remote import AsyncRemoteWriter, RemoteWriter

    outcomes: list[Any] = []

    def stop() -> None:
        server.process.send_signal(signal.SIGSTOP)
        _wait_stopped(server.process.pid)

    def timed(write: Any) -> Any:
        start = time.monotonic()
        try:
            write()
        except Exception as error:  # reported to the test
            return type(error), str(error), time.monotonic() - start
        return None, "", time.monotonic() - start

    async def timed_async(write: Any) -> Any:
        start = time.monotonic()
        try:
            await write
        except Exception as error:  # reported to the test
            return type(error), str(error), time.monotonic() - start
        return None, "", time.monotonic() - start

    def write_sync() -> None:
        client = redis.Redis(unix_socket_path=server.socket, db=0, socket_timeout=socket_timeout)
        ts = TelescopeState(RedisBackend(client, write_timeout=1.0))
        ts.add("warm", 1.0, ts=1.0)
        store_id = ts.backend._remote._session.store
        cold = RemoteWriter(client, 0, MIRROR_CURSOR_DB, store_id, timeout=1.0)
        stop()
        outcomes.append(timed(lambda: ts.add("hung", 2.0, ts=2.0)))
        outcomes.append(timed(lambda: cold.write(Op.DELETE, b"hung")))

    async def write_async() -> None:
        client = redis.asyncio.Redis(
            unix_socket_path=server.socket, db=0, socket_timeout=socket_timeout
        )
        ts = telstate.aio.TelescopeState(AioRedisBackend(client, write_timeout=1.0))
        await ts.add("warm", 1.0, ts=1.0)
        store_id = ts.backend._remote._session.store
        cold = AsyncRemoteWriter(client, 0, MIRROR_CURSOR_DB, store_id, timeout=1.0)
        stop()
        outcomes.append(await timed_async(ts.add("hung", 2.0, ts=2.0)))
        outcomes.append(await timed_async(cold.write(Op.DELETE, b"hung")))

    thread = threading.Thread(target=lambda: asyncio.run(write_async()) if aio else write_sync())
    thread.daemon = True  # left blocked if the test fails
    try:
        thread.start()
        thread.join(SETTLE)
    finally:
        server.process.send_signal(signal.SIGCONT)
    thread.join(SETTLE)
    return outcomes


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
@pytest.mark.parametrize("socket_timeout", [None, 60.0], ids=["none", "long"])
def test_a_writer_whose_client_has_no_socket_timeout_fails_soon_when_redis_hangs(
    server, mirror_url, daemon, aio, socket_timeout
):
    """Found by review: such a writer waited for ever for a SIGSTOPped Redis.

    The warm writer's request may have reached Redis (it was sent before the
    read hung): "may have been applied"; the cold one's never did: as when
    Redis is down. Both within their 1 s timeout and a little more, also
    when the client's own socket timeout is longer (the sync writer waited
    that long).
    """
    daemon()
    warm, cold = _write_to_a_hung_redis(server, aio, socket_timeout)
    assert warm[0] is WriteTimeoutError and "may have been applied" in warm[1]
    assert cold[0] is ConnectionError
    assert warm[2] < 6 and cold[2] < 6, (warm, cold)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
@pytest.mark.parametrize("socket_timeout", [None, 5.0], ids=["none", "from_url"])
def test_a_write_whose_redis_stalls_just_before_its_deadline_raises_soon_after_it(
    server, mirror_url, daemon, aio, socket_timeout
):
    """Found by review: Redis SIGSTOPped while a sync writer waited in its last
    XREAD BLOCK held the write a whole socket timeout (up to write_timeout +
    0.5 s) past its deadline: 19.7 s for a 10 s write. Every exchange is now
    bounded by the time left to the write (and the slack), as asyncio's are.
    """
    from telstate.aio.redis import RedisBackend as AioRedisBackend

    timeout = 4.0
    process = daemon()
    process.process.send_signal(signal.SIGSTOP)  # no reply comes
    _wait_stopped(process.process.pid)
    stopper = threading.Timer(timeout - 0.3, lambda: server.process.send_signal(signal.SIGSTOP))
    outcome: list[Any] = []

    def write_sync() -> None:
        client = redis.Redis(unix_socket_path=server.socket, db=0, socket_timeout=socket_timeout)
        ts = TelescopeState(RedisBackend(client, write_timeout=timeout))
        ts.backend._check_writable()  # finds the intake before Redis stops
        stopper.start()
        start = time.monotonic()
        with pytest.raises(WriteTimeoutError) as raised:
            ts.add("late", 1.0, ts=1.0)
        outcome.append((time.monotonic() - start, str(raised.value)))

    async def write_async() -> None:
        client = redis.asyncio.Redis(
            unix_socket_path=server.socket, db=0, socket_timeout=socket_timeout
        )
        ts = telstate.aio.TelescopeState(AioRedisBackend(client, write_timeout=timeout))
        await ts.backend._check_writable()
        stopper.start()
        start = time.monotonic()
        with pytest.raises(WriteTimeoutError) as raised:
            await ts.add("late", 1.0, ts=1.0)
        outcome.append((time.monotonic() - start, str(raised.value)))

    thread = threading.Thread(target=lambda: asyncio.run(write_async()) if aio else write_sync())
    thread.daemon = True
    try:
        thread.start()
        thread.join(SETTLE)
    finally:
        stopper.cancel()
        server.process.send_signal(signal.SIGCONT)
        process.process.send_signal(signal.SIGCONT)
    thread.join(SETTLE)
    ((elapsed, message),) = outcome
    assert "may have been applied" in message
    assert elapsed < timeout + 1.0, (
        elapsed
    )  # was 2 * timeout + 0.2 for sync without a socket timeout


def test_an_asyncio_writer_before_python_3_11_connects_within_its_timeout(monkeypatch):
    """Found by review: without asyncio.timeout (Python 3.10), the asyncio writer's
    connections kept the client's own connect timeout (none for a client made with
    redis.asyncio.Redis(host=...)), where the sync writer's are capped."""
    import redis.asyncio

    from telstate.remote import AsyncRemoteWriter

    monkeypatch.setattr(sys, "version_info", (3, 10, 14))
    client = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=20)
    writer = AsyncRemoteWriter(client, 0, MIRROR_CURSOR_DB, "store", timeout=1.0)
    kwargs = writer._wire._pool.connection_kwargs
    assert kwargs["socket_timeout"] <= 1.5 and kwargs["socket_connect_timeout"] <= 1.5


def test_a_writer_connects_within_its_timeout(tmp_path, store):
    """Found by review: a writer's new connection waited for the client's own
    socket_connect_timeout (redis-py 8: 5 s for redis.Redis(host=...)) for a
    Redis that accepts no connections (hung with a full accept queue, a network
    dropping SYNs), however short the write's timeout.
    """
    from telstate.remote import RemoteWriter

    port = _free_port()
    (tmp_path / "tcp").mkdir()
    with RedisServer(directory=tmp_path / "tcp", port=port) as server:
        process = Daemon(store, server.url + "?db=0", tmp_path / "replicator.log")
        wait_ready(server)
        client = redis.Redis(host="127.0.0.1", port=port, db=0, socket_connect_timeout=20)
        backend = RedisBackend(client, write_timeout=1.0)
        backend._check_writable()
        store_id = backend._remote._session.store
        server.process.send_signal(signal.SIGSTOP)
        _wait_stopped(server.process.pid)
        fillers = []
        try:
            for _ in range(600):  # more than its accept queue (511): later SYNs are dropped
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            writer = RemoteWriter(client, 0, MIRROR_CURSOR_DB, store_id, timeout=1.0)
            start = time.monotonic()
            with pytest.raises(ConnectionError):
                writer.write(Op.DELETE, b"x")
            assert time.monotonic() - start < 2.5
        finally:
            for filler in fillers:
                filler.close()
            server.process.send_signal(signal.SIGCONT)
            process.kill()


def _logged(log_file: Path) -> tuple[list[int], list[int]]:
    returned, failed = [], []
    for line in log_file.read_text().splitlines():
        status, number = line.split()[:2]
        (returned if status == "ok" else failed).append(int(number))
    return returned, failed


def _check_exactly_once(store: Path, names: list[str], logs: list[Path]) -> None:
    backend = LmdbBackend(store, readonly=True)
    for name, log_file in zip(names, logs):
        returned, failed = _logged(log_file)
        assert returned, f"{name}: no write returned"
        counts: dict[bytes, int] = {}
        for event in backend.events(keys=[name.encode()]):
            if event.op is Op.ADD_MUTABLE:
                counts[event.value] = counts.get(event.value, 0) + 1
        encode = telstate.encoding.encode_value
        for i in returned:
            assert counts.get(encode(i)) == 1, (
                f"{name}: sample {i} is there {counts.get(encode(i))} times"
            )
        for i in failed:
            assert counts.get(encode(i), 0) <= 1
        assert sum(counts.values()) <= len(returned) + len(failed)
    assert backend.verify() == []
    backend.close()


def _start_writers(url: str, tmp_path: Path, count: int) -> tuple[list, Path, list[Path]]:
    stop_file = tmp_path / "stop"
    logs = [tmp_path / f"writer{i}.log" for i in range(count)]
    queue = _SPAWN.Queue()
    processes = [
        _SPAWN.Process(
            target=write_until_told, args=(queue, url, f"s{i}", str(stop_file), str(logs[i]))
        )
        for i in range(count)
    ]
    for process in processes:
        process.start()
    return [processes, queue], stop_file, logs


def _wait_for_progress(logs: list[Path], writes: int) -> None:
    deadline = time.monotonic() + SETTLE
    while not all(log.exists() and len(_logged(log)[0]) >= writes for log in logs):
        assert time.monotonic() < deadline, "writers make no progress"
        time.sleep(0.05)


def _stop_writers(started: list, stop_file: Path) -> list:
    processes, queue = started
    stop_file.touch()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return results


@pytest.mark.parametrize("durability", ["batch", "fsync"])
def test_daemon_killed_and_restarted_in_the_middle(
    tmp_path, store, server, mirror_url, daemon, durability
):
    # (With fsync, a batch waits for the writers active lately: requests
    # taken while it waits are on the pending list when the daemon dies.)
    args = ("--durability", durability)
    first = daemon(*args)
    started, stop_file, logs = _start_writers(mirror_url, tmp_path, 3)
    _wait_for_progress(logs, 50)
    first.kill()
    second = daemon(*args)
    _wait_for_progress(logs, 150)
    second.kill()
    daemon(*args)
    counts = [len(_logged(log)[0]) for log in logs]
    _wait_for_progress(logs, max(counts) + 50)
    _stop_writers(started, stop_file)
    _check_exactly_once(store, [f"s{i}" for i in range(3)], logs)
    settle(store, server)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_client_made_before_the_daemon_came_writes_to_the_log_once_it_does(
    store, server, mirror_url, daemon, monkeypatch, aio
):
    """Found by a soak: a client made while Redis was empty (restarted, its
    replicator not back yet) found no mirror, and wrote around the log for its
    whole life: its writes were lost at the mirror's next rebuild."""
    import telstate.aio.redis
    import telstate.redis

    for module in (telstate.redis, telstate.aio.redis):
        monkeypatch.setattr(module, "MIRROR_RECHECK", 0.0)  # looked at again on every write
    _write_with_a_client_made_before_the_daemon(mirror_url, daemon, aio)
    with LmdbBackend(store, readonly=True) as backend:
        assert TelescopeState(backend).get_range("late", st=0) == [(1.0, 1.0)]


def _write_with_a_client_made_before_the_daemon(mirror_url: str, start: Any, aio: bool) -> None:
    """Make a client (sync or aio) that finds no mirror, `start` the daemon, and write "late"."""
    from telstate.aio.redis import RedisBackend as AioRedisBackend

    async def write_async() -> None:
        backend = await AioRedisBackend.from_url(mirror_url)
        assert await backend._check_writable() is None  # as for a write: no mirror yet
        start()
        await telstate.aio.TelescopeState(backend).add("late", 1.0, ts=1.0)
        backend.close()

    if aio:
        asyncio.run(write_async())
    else:
        ts = TelescopeState(mirror_url)
        start()
        ts.add("late", 1.0, ts=1.0)
        ts.backend.close()


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_write_a_protected_mirror_refuses_goes_to_the_log_at_once(
    store, server, mirror_url, daemon, monkeypatch, aio
):
    """A client made before the daemon (not due to look again for an hour):
    the write the mirror's ACL rules refuse (a script's command, refused with
    "can't run this command", not NOPERM) makes it look at once, and the
    write goes to the log."""
    import telstate.aio.redis
    import telstate.redis

    for module in (telstate.redis, telstate.aio.redis):
        monkeypatch.setattr(module, "MIRROR_RECHECK", 3600.0)
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "admin", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    admin.close()
    start = functools.partial(
        daemon, "--acl-setup", url=f"unix://admin:{PASSWORD}@{server.socket}?db=0"
    )
    _write_with_a_client_made_before_the_daemon(mirror_url, start, aio)
    with LmdbBackend(store, readonly=True) as backend:
        assert TelescopeState(backend).get_range("late", st=0) == [(1.0, 1.0)]


def test_a_failed_look_at_the_mirror_leaves_it_read_only(server, monkeypatch):
    """Found by review: one look that failed (BUSY, a timeout) made a mirror
    that takes no writes writable, directly, for a second."""
    import telstate.redis

    answers: list[Any] = [("db 0 is a mirror", None)]
    monkeypatch.setattr(telstate.redis, "_mirror_description", lambda client: answers[0])
    backend = telstate.redis.RedisBackend(server.client(db=0))
    with pytest.raises(ReadOnlyError, match="is a mirror"):
        backend.add_mutable(b"k", b"v", 1.0)
    answers[0] = None  # the server could not be asked
    with pytest.raises(ReadOnlyError, match="is a mirror"):
        backend.add_mutable(b"k", b"v", 1.0)
    assert server.client(db=0).dbsize() == 0
    backend.close()


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_write_refused_by_acl_on_a_plain_redis_raises_redis_own_error(server, aio):
    """Found by review: on a plain Redis (no mirror) a write the user may not make
    raised ReadOnlyError; katsdptelstate (and so its users' code) gets redis's error."""
    import telstate.aio.redis
    import telstate.redis

    admin = server.client(db=0)
    admin.acl_setuser("limited", enabled=True, passwords=["+pw"], keys=["ok:*"], commands=["+@all"])
    kwargs = {"unix_socket_path": server.socket, "username": "limited", "password": "pw"}
    if aio:

        async def write() -> None:
            backend = telstate.aio.redis.RedisBackend(redis.asyncio.Redis(**kwargs))
            try:
                await backend.add_mutable(b"other", b"v", 1.0)
            finally:
                backend.close()

        with pytest.raises(redis.exceptions.NoPermissionError):
            asyncio.run(write())
    else:
        backend = telstate.redis.RedisBackend(redis.Redis(**kwargs))
        with pytest.raises(redis.exceptions.NoPermissionError):
            backend.add_mutable(b"other", b"v", 1.0)
        backend.close()


def test_threads_that_find_the_mirror_together_share_one_remote_writer(server, monkeypatch):
    """Found by review: threads writing when the look was due each made a writer."""
    import telstate.redis

    made = []

    class Counted:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(self)
            time.sleep(0.02)  # a pool and a session to make

        def write(self, *args: Any, **kwargs: Any) -> None:
            return None

        def close(self) -> None:
            pass

    answers: list[Any] = [(None, None)]

    def described(client: Any) -> Any:
        time.sleep(0.02)  # a round trip, during which the other threads come
        return answers[0]

    monkeypatch.setattr(telstate.redis, "RemoteWriter", Counted)
    monkeypatch.setattr(telstate.redis, "_mirror_description", described)
    backend = telstate.redis.RedisBackend(server.client(db=0))
    answers[0] = ("db 0 is a mirror", "0123-store")
    backend._described_at = 0.0  # the look is due
    threads = [
        threading.Thread(target=backend.add_mutable, args=(b"k", b"v", float(i))) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1
    backend.close()


def test_redis_restarted_empty_in_the_middle(tmp_path, store, server, mirror_url, daemon):
    daemon()
    started, stop_file, logs = _start_writers(mirror_url, tmp_path, 3)
    _wait_for_progress(logs, 50)
    server.stop()
    server.start()
    counts = [len(_logged(log)[0]) for log in logs]
    _wait_for_progress(logs, max(counts) + 50)
    _stop_writers(started, stop_file)
    _check_exactly_once(store, [f"s{i}" for i in range(3)], logs)
    settle(store, server)
    control = server.client(db=MIRROR_CURSOR_DB)
    assert control.hget(intake_key(0), "store") is not None
    control.close()


def test_a_full_disk_at_the_log_host_fails_remote_writes_at_once_and_loses_none(
    tmp_path, server, mirror_url
):
    """A local write on a full disk raises StoreError at once; so does a remote one (it
    waited out its timeout, told it came too late), and the daemon serves on."""
    from tests.test_lmdb_environment import small_filesystem

    with small_filesystem(str(tmp_path / "fs"), "4M") as directory:
        store = Path(directory) / "store"
        LmdbBackend(store, durability="none").close()
        spare = Path(directory) / "spare"
        spare.write_bytes(bytes(256 << 10))  # freed below, to make room again
        daemon = Daemon(store, mirror_url, tmp_path / "replicator.log")
        try:
            wait_ready(server)
            ts = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=60.0))
            written = []
            with pytest.raises(StoreError, match="failed to write it") as failure:
                for i in range(10_000):
                    ts.add("m", b"%d:" % i + bytes(8000), ts=float(i))
                    written.append(i)
            assert "No space left" in str(failure.value) or "Input/output" in str(failure.value)
            assert written  # (some fitted)
            spare.unlink()
            ts.add("m", b"after", ts=1e6)
            assert daemon.process.poll() is None
            daemon.stop()
        finally:
            if daemon.process.poll() is None:
                daemon.kill()
        # Every write that returned is in the log, once; none that failed is.
        with LmdbBackend(store, readonly=True) as backend:
            values = [value for value, _ in TelescopeState(backend).get_range("m", st=0)]
            assert values == [b"%d:" % i + bytes(8000) for i in written] + [b"after"]
            assert backend.last_seq == len(written) + 1
            assert backend.verify() == []
        log = (tmp_path / "replicator.log").read_text()
        assert "retrying" not in log  # answered, not retried until the writer gave up


def test_status_and_prometheus_show_the_intake(store, server, mirror_url, daemon):
    import json
    import urllib.request

    port = _free_port()
    daemon("--metrics-port", str(port), "--metrics-address", "127.0.0.1")
    ts = TelescopeState(mirror_url)
    for i in range(10):
        ts.add("sensor", i, ts=float(i))
    with pytest.raises(ImmutableKeyError):
        ts.add("sensor", 1, immutable=True)
    ts.backend.close()
    command = [sys.executable, "-m", "replicator", "status", "--log", str(store)]
    deadline = time.monotonic() + SETTLE
    while True:
        done = subprocess.run(
            [*command, "--redis", mirror_url, "--json"], cwd=REPO, capture_output=True, text=True
        )
        writes = json.loads(done.stdout).get("writes", {})
        if writes.get("requests_applied_total") == 10:
            break
        assert time.monotonic() < deadline, done.stdout
        time.sleep(0.1)
    assert writes["requests_rejected_total_immutable"] == 1
    assert writes["store"] == str(LmdbBackend(store, readonly=True).uuid)
    human = subprocess.run(
        [*command, "--redis", mirror_url], cwd=REPO, capture_output=True, text=True
    )
    assert "applied 10, rejected 1 immutable" in human.stdout
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert "telstate_replicator_requests_applied_total 10.0" in scraped
    assert "telstate_replicator_mirror_lag_events" in scraped


def test_a_daemon_without_accept_writes_makes_the_mirror_read_only(
    tmp_path, store, server, mirror_url, daemon
):
    daemon().stop()
    command = [sys.executable, "-m", "replicator", "--log", str(store), "--redis", mirror_url]
    with open(tmp_path / "plain.log", "wb") as output:
        plain = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_retired(server)
        ts = TelescopeState(mirror_url)
        with pytest.raises(ReadOnlyError, match="write to the store instead"):
            ts.add("k", 1, immutable=True)
        ts.backend.close()
    finally:
        plain.terminate()
        plain.wait(10)


def test_a_store_made_a_follower_refuses_writes_and_keeps_its_mirror(
    tmp_path, store, server, mirror_url, daemon
):
    running = daemon()
    ts = TelescopeState(mirror_url)
    ts.add("before", 1, immutable=True)
    # A promotion: a copy of the store becomes the primary, and this store follows it.
    backup(store, tmp_path / "new-primary")
    make_follower(store, "new-primary-host:/data")
    with pytest.raises(ReadOnlyError, match="is a follower of new-primary-host:/data"):
        ts.add("after", 2, immutable=True)
    wait_retired(server)
    with pytest.raises(ReadOnlyError, match="write to the store instead"):
        TelescopeState(mirror_url).add("new", 3, immutable=True)
    # The mirror goes on following the log, which the new primary's events now extend.
    with LmdbBackend(tmp_path / "new-primary", durability="none") as primary:
        primary.set_immutable(b"promoted", encode_value(4))
        with LmdbBackend(store, durability="none") as follower:
            records = [record for _, record in read_records(primary, follower.last_seq + 1, 10)]
            writers = writers_of(primary, {record_op_writer(record)[1] for record in records})
            apply_records(follower, follower.last_seq + 1, records, writers)
    settle(store, server)
    assert ts["promoted"] == 4
    assert running.process.poll() is None, running.log.read_text()
    ts.backend.close()
    running.stop()


def test_accept_writes_on_a_follower_is_refused_at_start(tmp_path, mirror_url):
    path = tmp_path / "follower"
    create_follower(path, uuid.uuid4(), "primary-host:/data")
    command = [sys.executable, "-m", "replicator", "--log", str(path), "--redis", mirror_url]
    done = subprocess.run(
        [*command, "--accept-writes"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "--accept-writes" in done.stderr
    assert "is a follower of primary-host:/data" in done.stderr


def test_declared_minimum_versions_have_what_the_wire_calls():
    """The oldest redis-py and hiredis that pyproject.toml allows have the calls Wire makes.

    redis-py before 5.3 requires a command name in ConnectionPool.get_connection;
    hiredis before 2.2.1 has no pack_command. (Run against those minimums: the
    tests of this file pass with redis 5.3.0 and hiredis 2.2.1.)
    """
    from packaging.requirements import Requirement

    text = (REPO / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    declared = {}
    for line in dependencies.splitlines():
        line = line.strip().rstrip(",")
        if line.startswith('"'):
            requirement = Requirement(line.strip('"'))
            declared[requirement.name] = requirement.specifier
    for name, newest_broken, oldest_working in (
        ("redis", "5.2.1", "5.3.0"),
        ("hiredis", "2.2.0", "2.2.1"),
    ):
        assert not declared[name].contains(newest_broken), (name, declared[name])
        assert declared[name].contains(oldest_working), (name, declared[name])


def test_a_database_announced_for_writes_before_its_cursor_is_never_written_directly(
    server, mirror_url
):
    """A daemon announces its intake while it still builds the mirror (no cursor yet).

    A client opened then must send its writes to the log, not write them
    into the database as a plain Redis (they would be lost to the log).
    """
    store = str(uuid.uuid4())
    server.client(db=MIRROR_CURSOR_DB).hset(intake_key(0), "store", store)
    backend = RedisBackend(redis.Redis.from_url(mirror_url))
    assert backend._remote is not None


def _sent_fields(packed: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """A packed XADD read back as Redis reads it: its first arguments, and its entry fields."""
    reader = hiredis.Reader()
    reader.feed(packed)
    command = reader.gets()
    assert reader.gets() is False  # exactly one command
    return command[:3], dict(zip(command[3::2], command[4::2]))


@pytest.mark.parametrize(
    "op, write",
    [
        (Op.SET_IMMUTABLE, dict(key=b"k", value=b"\xff\r\n*3\r\n" + bytes(range(256)) * 40)),
        (Op.ADD_MUTABLE, dict(key=b"sensor", value=encode_value(1.5), timestamp=1234.5)),
        (Op.SET_INDEXED, dict(key=b"idx", sub_key=encode_value("gain"), value=b"")),
        (Op.DELETE, dict(key=b"k")),
        (Op.CLEAR, {}),
    ],
)
def test_a_packed_request_is_the_request_the_daemon_decodes(op, write):
    """The writer packs each request from a head packed once per token: it must be the request."""
    from telstate.remote import PackedWrite, _Session, decode_request

    session = _Session(3, "0123-store", 10.0, "näme")
    request_id, expected = session.request(op, 7.5, **write)
    start, fields = _sent_fields(session.xadd(request_id, PackedWrite.of(op, **write), 7.5))
    assert start == [b"XADD", request_stream_key(3), b"*"]
    assert fields == expected
    request = decode_request(b"1-0", fields)
    assert (request.op, request.request_id, request.reply_to) == (op, request_id, session.token)
    assert request.key == write.get("key", b"")
    assert request.value == write.get("value", b"")
    assert request.timeout_ms == 7500
    assert request.writer == (socket.gethostname(), os.getpid(), "näme")
    # Sent after CLIENT REPLY SKIP and before the XREAD of the reply, in one write.
    read = session.read_replies(900)
    reader = hiredis.Reader()
    reader.feed(
        session.xadd(request_id, PackedWrite.of(op, **write), 7.5, skip_reply=True, then=read)
    )
    skip, xadd, xread = reader.gets(), reader.gets(), reader.gets()
    assert reader.gets() is False
    assert skip == [b"CLIENT", b"REPLY", b"SKIP"]
    assert dict(zip(xadd[3::2], xadd[4::2])) == expected
    assert xread == [b"XREAD", b"BLOCK", b"900", b"STREAMS", session.replies, b"0"]


@given(
    key=st.binary(min_size=1, max_size=40),
    value=st.binary(max_size=300) | st.just(b"\r\n$3\r\n" * 5000),
    timestamp=st.floats(min_value=0.0, allow_infinity=False),
)
def test_an_add_mutable_is_packed_as_its_write_fields(key, value, timestamp):
    """An add_mutable has a packing of its own (the common write): it packs write_fields."""
    from telstate.remote import PackedWrite, _packed_arguments, write_fields

    write = dict(key=key, value=value, timestamp=timestamp)
    fields = write_fields(Op.ADD_MUTABLE, **write)
    packed = PackedWrite.of(Op.ADD_MUTABLE, **write)
    assert packed.field_count == len(fields)
    assert bytes(packed.packed) == bytes(_packed_arguments(fields))


class _Clock:
    """Stands for the time module in telstate.remote: time() gives the readings in turn."""

    def __init__(self, readings: list[float]) -> None:
        self.readings = iter(readings)

    def time(self) -> float:
        return next(self.readings)


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.floats(min_value=-5.0, max_value=5.0)),
        min_size=1,
        max_size=200,
    )
)
def test_request_ids_are_unique_and_sort_by_sending_time_whatever_the_clocks(steps):
    """Ids: unique; each client's never go back in time, even when its clock does.

    Two clients; each step, one of them makes an id after its clock moved
    by the step's seconds (back, too).
    """
    from unittest import mock

    import telstate.remote
    from telstate.remote import _Session

    sessions = [_Session(0, "store", 10.0, None) for _ in range(2)]
    clocks = [1.7e9, 1.7e9 + 0.5]
    made: list[list[bytes]] = [[], []]
    for client, moved in steps:
        clocks[client] += moved
        with mock.patch.object(telstate.remote, "time", _Clock([clocks[client]])):
            made[client].append(sessions[client].new_request())

    def sent_ms(request_id: bytes) -> int:
        return int(request_id.split(b":")[0], 16)

    every = made[0] + made[1]
    assert len(set(every)) == len(every)
    for session, ids in zip(sessions, made):
        assert [sent_ms(rid) for rid in ids] == sorted(sent_ms(rid) for rid in ids)
        assert all(rid.split(b":")[1] == session.token for rid in ids)
    # Across clients, the ids sort as the times they carry.
    assert [sent_ms(rid) for rid in sorted(every)] == sorted(map(sent_ms, every))


def _pack_in_child(queue: Any, session: Any) -> None:
    from telstate.remote import PackedWrite

    request_id = session.new_request()
    queue.put((request_id, session.xadd(request_id, PackedWrite.of(Op.CLEAR), 1.0)))


def test_a_forked_child_packs_requests_with_a_token_and_pid_of_its_own():
    from telstate.remote import PackedWrite, _Session

    session = _Session(0, "store", 10.0, None)
    parent_id = session.new_request()
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_pack_in_child, args=(queue, session))
    child.start()
    child_id, packed = queue.get(timeout=SETTLE)
    child.join(SETTLE)
    _, fields = _sent_fields(packed)
    assert fields[b"pid"] == b"%d" % child.pid
    assert fields[b"reply"] != session.token
    assert child_id.split(b":")[1] == fields[b"reply"] and child_id == fields[b"id"]
    # The parent goes on with its own token, its head untouched by the child.
    request_id = session.new_request()
    _, fields = _sent_fields(session.xadd(request_id, PackedWrite.of(Op.CLEAR), 1.0))
    assert fields[b"reply"] == session.token and fields[b"pid"] == b"%d" % os.getpid()
    assert parent_id.split(b":")[1] == session.token and request_id != parent_id


def _wait_stopped(pid: int) -> None:
    """Wait until every thread of process `pid` is stopped (SIGSTOP takes effect asynchronously).

    Seen on a loaded machine: the daemon applied a request sent right after
    its SIGSTOP.
    """
    deadline = time.monotonic() + SETTLE
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.001)


def _write_after_warming(mirror_url: str, aio: bool, ready: Any, go: Any) -> None:
    """Open a writer (sync or asyncio), write once, and write "resent" once `go` is set."""
    if aio:
        from telstate.aio.redis import RedisBackend as AioRedisBackend

        async def write() -> None:
            ts = telstate.aio.TelescopeState(await AioRedisBackend.from_url(mirror_url))
            await ts.add("warm", 1.0, ts=1.0)
            ready.set()
            go.wait(SETTLE)
            await ts.add("resent", 2.0, ts=2.0)
            ts.backend.close()
            await ts.backend.wait_closed()

        asyncio.run(write())
    else:
        ts = TelescopeState(mirror_url)
        ts.add("warm", 1.0, ts=1.0)
        ready.set()
        go.wait(SETTLE)
        ts.add("resent", 2.0, ts=2.0)
        ts.backend.close()


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_write_whose_connection_is_lost_is_resent_with_its_id_and_deadline(
    store, server, mirror_url, daemon, aio
):
    """The connection fails while the writer waits for its reply: it was sent, so it is resent.

    (Not a ConnectionError: the daemon may still apply the first sending.)
    """
    process = daemon()
    control = server.client(db=MIRROR_CURSOR_DB)
    ready, go = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def write() -> None:
        try:
            _write_after_warming(mirror_url, aio, ready, go)
            outcome.append("ok")
        except Exception as error:  # reported to the test below
            outcome.append(error)

    def sent() -> list[dict[bytes, bytes]]:
        # The daemon stopped, nothing is taken from the stream meanwhile.
        entries = control.xrange(request_stream_key(0))
        return [fields for _, fields in entries if fields.get(b"key") == b"resent"]

    thread = threading.Thread(target=write)
    thread.start()
    assert ready.wait(SETTLE)
    process.process.send_signal(signal.SIGSTOP)  # no reply comes until the daemon goes on
    _wait_stopped(process.process.pid)
    try:
        go.set()
        deadline = time.monotonic() + SETTLE
        while not sent():
            assert time.monotonic() < deadline, "the request was not sent"
            time.sleep(0.01)
        # The writer's connection is the one reading its reply stream: cut it.
        (writer,) = [c for c in control.client_list() if c["cmd"] == "xread"]
        control.client_kill_filter(_id=writer["id"])
        while len(sent()) < 2:
            assert time.monotonic() < deadline, "the request was not sent again"
            time.sleep(0.01)
        first, again = sent()
    finally:
        process.process.send_signal(signal.SIGCONT)
        go.set()
    thread.join(SETTLE)
    assert outcome == ["ok"]
    assert again[b"id"] == first[b"id"]
    assert int(again[b"timeout"]) < int(first[b"timeout"])  # the deadline stays the first one's
    assert {k: v for k, v in again.items() if k != b"timeout"} == {
        k: v for k, v in first.items() if k != b"timeout"
    }
    control.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    assert [(e.key, e.value) for e in backend.events() if e.key == b"resent"] == [
        (b"resent", encode_value(2.0))
    ]
    backend.close()


def _add_three(ts: TelescopeState, key: str) -> None:
    for i in range(3):
        ts.add(key, float(i), ts=float(i))


def test_xadd_replies_are_skipped_only_where_the_server_allows_it(
    store, server, mirror_url, daemon
):
    """After its first accepted XADD a writer asks whether the server skips the XADD's reply.

    A Redis user whose rules refuse ``CLIENT`` still writes, waiting for both replies.
    """
    admin = server.client()
    rules = ("on", f">{PASSWORD}", "~*", "&*", "+@all", "-client")
    admin.execute_command("ACL", "SETUSER", "noclient", *rules)
    admin.close()
    daemon()
    allowed = TelescopeState(mirror_url)
    refused = TelescopeState(f"unix://noclient:{PASSWORD}@{server.socket}?db=0")
    for ts, key in ((allowed, "allowed"), (refused, "refused")):
        assert ts.backend._remote._session.skip_replies is None
        _add_three(ts, key)
        assert ts.get_range(key, st=0) == [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)]
    assert allowed.backend._remote._session.skip_replies is True
    assert refused.backend._remote._session.skip_replies is False
    for ts in (allowed, refused):
        ts.backend.close()
    settle(store, server)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_refused_xadd_whose_reply_was_skipped_still_raises_its_error(
    store, server, mirror_url, daemon, aio
):
    """Out of memory, Redis refuses the XADD: the writer says so, it does not time out.

    The error is Redis's own (a direct write raises it), not ReadOnlyError:
    the mirror does take writes.

    (Its first wait for the reply ends empty, and it sends the request again,
    asking for the XADD's reply this time.)
    """
    daemon()
    control = server.client()

    async def write() -> None:
        from telstate.aio.redis import RedisBackend as AioRedisBackend

        backend = await AioRedisBackend.from_url(mirror_url, write_timeout=60)
        ts = telstate.aio.TelescopeState(backend)
        await ts.add("before", 1.0, ts=1.0)
        assert backend._remote is not None and backend._remote._session.skip_replies
        control.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
                await ts.add("refused", 2.0, ts=2.0)
        finally:
            control.config_set("maxmemory", 0)
        await ts.add("after", 3.0, ts=3.0)
        backend.close()
        await backend.wait_closed()

    if aio:
        asyncio.run(write())
    else:
        ts = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=60))
        ts.add("before", 1.0, ts=1.0)
        assert ts.backend._remote._session.skip_replies
        control.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
                ts.add("refused", 2.0, ts=2.0)
        finally:
            control.config_set("maxmemory", 0)
        ts.add("after", 3.0, ts=3.0)
        ts.backend.close()
    control.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    assert {e.key for e in backend.events()} >= {b"before", b"after"}
    assert b"refused" not in {e.key for e in backend.events()}
    backend.close()


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
def test_a_writer_takes_the_reply_to_its_request_from_the_xread_reply(resp3):
    """The common ok reply is matched without dicts; anything else the long way, same answers."""
    from telstate.remote import OK, Reply, _Session

    session = _Session(0, "store", 10.0, None)

    def xread(*entries: tuple[bytes, list[bytes] | None]) -> Any:
        listed = [[entry_id, flat] for entry_id, flat in entries]
        return {session.replies: listed} if resp3 else [[session.replies, listed]]

    def fields(request_id: bytes, status: bytes, value: bytes = b"") -> list[bytes]:
        return [b"id", request_id, b"status", status, b"value", value]

    fields_tail = [b"error", b"", b"message", b""]
    assert session.take_reply(b"t:2", None) is None
    assert session.take_reply(b"t:2", xread((b"1-0", fields(b"t:1", b"ok")))) is None
    assert session.last_reply_id == b"1-0"  # a stale reply is passed over
    ok = xread((b"2-0", fields(b"t:2", b"ok") + fields_tail))
    assert session.take_reply(b"t:2", ok) is OK
    assert session.last_reply_id == b"2-0"
    exists = xread((b"3-0", fields(b"t:1", b"ok")), (b"4-0", fields(b"t:3", b"exists", b"v")))
    assert session.take_reply(b"t:3", exists) == Reply(b"exists", b"v")
    assert session.last_reply_id == b"4-0"
    reordered = xread((b"5-0", [b"status", b"ok", b"id", b"t:4"]))
    assert session.take_reply(b"t:4", reordered) is OK
    refused = xread((b"6-0", [b"id", b"t:5", b"status", b"error", b"error", b"expired"]))
    assert session.take_reply(b"t:5", refused) == Reply(b"error", error=b"expired")
    assert session.take_reply(b"t:6", xread((b"7-0", None))) is None
    assert session.last_reply_id == b"7-0"


async def test_an_aio_writer_bounds_its_reads_itself_and_closes_a_connection_that_overran(
    server, mirror_url
):
    """The client's socket timeout bounds the asyncio writer's reads.

    (From Python 3.11 its wire applies it, its connections have none: a
    BLPOP that outlasts it would answer nil, not raise.)
    """
    import redis.asyncio

    from telstate.remote import AsyncRemoteWriter

    client = redis.asyncio.Redis.from_url(mirror_url, socket_timeout=0.3)
    writer = AsyncRemoteWriter(client, 0, MIRROR_CURSOR_DB, "store")
    wire = writer._wire
    if sys.version_info >= (3, 11):
        assert wire._pool.connection_kwargs["socket_timeout"] is None
    await wire.send(hiredis.pack_command(("BLPOP", "nothing", 5)))
    with pytest.raises(redis.TimeoutError):
        await wire.receive(1)
    await wire.send(hiredis.pack_command(("PING",)))  # on a new connection: nothing left over
    assert await wire.receive(1) == [b"PONG"]
    await writer.close()
    await client.aclose()


def test_the_write_plan_asks_for_the_xadd_reply_after_an_empty_wait_and_for_large_writes():
    """Skipping XADD replies: the steps a writer takes, replies given by hand."""
    from telstate.remote import PackedWrite, _Session

    session = _Session(0, "store", 10.0, None)
    session.skip_replies = True

    def plan(value: bytes) -> Any:
        write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=value, timestamp=1.0)
        return session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)

    def commands(packed: bytes) -> list[list[bytes]]:
        reader = hiredis.Reader()
        reader.feed(packed)
        return list(iter(reader.gets, False))

    small = plan(b"v")
    skip, xadd, xread = commands(next(small).packed)
    assert skip == [b"CLIENT", b"REPLY", b"SKIP"] and xadd[0] == b"XADD" and xread[0] == b"XREAD"
    # The wait ends empty: the same request again, asking for the XADD's reply this time.
    step = small.send([None])
    again, xread = commands(step.packed)
    assert step.replies == 2 and again[0] == b"XADD"
    assert dict(zip(again[3::2], again[4::2]))[b"id"] == dict(zip(xadd[3::2], xadd[4::2]))[b"id"]
    request_id = dict(zip(again[3::2], again[4::2]))[b"id"]
    ok = [[session.replies, [[b"2-0", [b"id", request_id, b"status", b"ok"]]]]]
    with pytest.raises(StopIteration) as stop:
        small.send([b"1-0", ok])
    assert stop.value.value == Reply(b"ok")  # the plan ends with the reply
    # A write of more than 64 KB always asks: it would be costly to send twice.
    step = next(plan(b"x" * (65 << 10)))
    assert step.replies == 2 and [c[0] for c in commands(step.packed)] == [b"XADD", b"XREAD"]


@pytest.mark.parametrize("stall", [0.0, 2.3])
def test_a_request_the_server_took_late_times_out_as_maybe_applied(monkeypatch, stall):
    """Found by a soak: Redis SIGSTOPped while a writer sent stamped its request
    on resuming, so the daemon found it young and applied it, while the writer,
    its deadline past, said "expires unapplied". An exchange that sent a request
    and came back much later than its read's block now makes that "may have been
    applied"."""
    import types

    import telstate.remote
    from telstate.remote import PackedWrite, _Session

    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=time.time, sleep=time.sleep)
    monkeypatch.setattr(telstate.remote, "time", clock)
    session = _Session(0, "store", 2.0, None)
    session.skip_replies = False
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    assert next(plan).replies == 2  # the XADD and a 1 s XREAD
    now[0] += 1.0 + stall  # the read's block, and the server's stall
    with pytest.raises(WriteTimeoutError) as timed_out:
        step = plan.send([b"1-0", None])
        while True:  # reads until the deadline, nothing comes
            now[0] += step.time_left
            step = plan.send([None])
    if stall:
        assert "may have been applied" in str(timed_out.value)
    else:
        assert "expires unapplied" in str(timed_out.value)


def _session_on_a_clock(monkeypatch) -> tuple[Any, list[float]]:
    """A remote-write session (no reply skipping) whose monotonic clock is the list's number."""
    import types

    import telstate.remote
    from telstate.remote import _Session

    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], time=time.time, sleep=time.sleep)
    monkeypatch.setattr(telstate.remote, "time", clock)
    session = _Session(0, "store", 2.0, None)
    session.skip_replies = False
    return session, now


def _run_out(plan: Any, first: list[Any], now: list[float]) -> WriteTimeoutError:
    """Answer `plan`'s exchange with `first`, then nothing until it times out."""
    with pytest.raises(WriteTimeoutError) as timed_out:
        step = plan.send(first)
        while True:
            now[0] += step.time_left
            step = plan.send([None])
    return timed_out.value


def test_a_pause_of_the_writer_before_it_sends_counts_as_a_stall(monkeypatch):
    """Found by review: the request's timeout was taken before the stall clock
    started, so a pause of the writer's thread in between (a long GC pass,
    another thread holding the GIL) delayed the request's stamp unseen: the
    daemon applied it after the writer said "expires unapplied"."""
    from telstate.remote import PackedWrite

    session, now = _session_on_a_clock(monkeypatch)
    read_replies = session.read_replies
    paused: list[bool] = []

    def pausing(block: int) -> bytes:
        if not paused:
            paused.append(True)
            now[0] += 1.0  # the writer's thread paused between its timeout and its send
        return read_replies(block)

    monkeypatch.setattr(session, "read_replies", pausing)
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    assert next(plan).replies == 2
    now[0] += 1.0  # the read's block
    assert "may have been applied" in str(_run_out(plan, [b"1-0", None], now))


def test_a_stall_hidden_by_a_stale_reply_still_counts(monkeypatch):
    """Found by review: an XREAD that returned at once with a stale reply (to an
    earlier write that timed out) let an exchange that Redis answered a second
    late look like a normal wait of its block, so the writer said "expires
    unapplied" for a request Redis stamped late, which the daemon then applied."""
    from telstate.remote import PackedWrite

    session, now = _session_on_a_clock(monkeypatch)
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    assert next(plan).replies == 2
    now[0] += 1.0  # Redis stalled 1 s, then the XREAD returned at once
    stale = [
        [
            session.replies,
            [[b"5-0", [b"id", b"earlier", b"status", b"error", b"error", b"expired"]]],
        ]
    ]
    assert "may have been applied" in str(_run_out(plan, [b"1-0", stale], now))


@pytest.mark.parametrize("found_by", ["read", "send"])
def test_a_connection_lost_after_an_accepted_request_means_it_may_have_been_applied(
    monkeypatch, found_by
):
    """Found by review: Redis gone after it accepted the request and a wait for the
    reply ended empty, found by the next send (a unix socket; TCP since the writer
    looks for a closed connection before it sends), ended in "expires unapplied",
    though the daemon may have applied it and only its reply was lost."""
    from telstate.remote import PackedWrite, _Exchange, _Unsent

    session, now = _session_on_a_clock(monkeypatch)
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    now[0] += 1.0  # the first wait ran out: no reply yet
    with pytest.raises(WriteTimeoutError, match="may have been applied"):
        step = plan.send([b"1-0", None])  # the request was accepted
        while True:  # Redis is down from here on
            if not isinstance(step, _Exchange):
                if isinstance(step, float):
                    now[0] += step
                step = next(plan)
                continue
            now[0] += 0.001
            lost = redis.ConnectionError("Connection closed by server.")
            step = plan.throw(lost if found_by == "read" else _Unsent(lost))


def test_a_reply_lost_with_its_server_leaves_the_write_maybe_applied(monkeypatch):
    """Found by a soak: the request was handed to the daemon, then Redis restarted
    empty (the reply stream lost with it) and the writer's wait failed; the writer
    sent the request again to the new server, read nothing more until its deadline
    (the daemon applied the first copy in time, then died before it could reply)
    and said "expires unapplied": a read that succeeded after the failed one had
    cleared the doubt, though it could not see a reply that the restart lost."""
    from telstate.remote import PackedWrite, _Exchange

    session, now = _session_on_a_clock(monkeypatch)
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    now[0] += 0.2
    # Accepted, and the wait for the reply failed: the server went away.
    step = plan.throw(redis.ConnectionError("Connection closed by server."))
    while not isinstance(step, _Exchange):
        if isinstance(step, float):
            now[0] += step
        step = next(plan)
    # Sent again (the same id) to the server started anew, which takes it; no reply comes.
    reader = hiredis.Reader()
    reader.feed(step.packed)
    assert [command[0] for command in iter(reader.gets, False)] == [b"XADD", b"XREAD"]
    now[0] += 0.5
    assert "may have been applied" in str(_run_out(plan, [b"1-0", None], now))


@pytest.mark.parametrize(
    "refusal",
    [
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script.",
    ],
)
def test_a_read_refused_by_a_restarted_server_leaves_the_write_maybe_applied(monkeypatch, refusal):
    """The read after an accepted request met a server loading its data (it restarted,
    or failed over): a reply may have been lost with the old one, so a timeout after
    empty reads says "may have been applied". A busy server kept its data: an empty
    read after it still proves that no reply came, so a timeout says "unapplied"."""
    from telstate.remote import PackedWrite, _Exchange

    session, now = _session_on_a_clock(monkeypatch)
    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    now[0] += 0.2
    step = plan.send([b"1-0", redis.ResponseError(refusal)])  # accepted; its read refused
    while not isinstance(step, _Exchange):
        if isinstance(step, float):
            now[0] += step
        step = next(plan)
    assert step.replies == 1  # the read again, not the request
    timed_out = str(_run_out(plan, [None], now))
    if refusal.startswith("LOADING"):
        assert "may have been applied" in timed_out
    else:
        assert "expires unapplied" in timed_out


def test_a_refusal_whose_class_parses_its_message_is_still_reported():
    """Found by review: MOVED and ASK (a Redis Cluster) rebuilt with "may be applied"
    appended failed to parse, and the writer raised a ValueError of its own."""
    from telstate.remote import _Session

    session = _Session(0, "store", 10.0, None)
    for error in (
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.AskError("3999 127.0.0.1:6381"),
    ):
        refused = session.refused(error, maybe_added=True)
        assert isinstance(refused, redis.ResponseError)
        assert "3999 127.0.0.1:6381" in str(refused) and "may be applied" in str(refused)
        plain = session.refused(error)
        assert type(plain) is type(error) and str(plain) == str(error)


def test_the_write_plan_waits_out_busy_and_says_when_a_write_may_be_applied():
    """Found by review: the plan's answers to BUSY, to a refused read after an accepted XADD,
    to a refused resend after an accepted XADD, to a busy probe, to a read lost near the deadline.
    """
    from telstate.remote import PackedWrite, _Reset, _Session

    write = PackedWrite.of(Op.ADD_MUTABLE, key=b"k", value=b"v", timestamp=1.0)
    busy = redis.ResponseError("BUSY Redis is busy running a script.")
    noperm = redis.ResponseError("NOPERM this user has no permissions")
    session = _Session(0, "store", 10.0, None)
    session.skip_replies = False

    def request_id(step: Any) -> bytes:
        reader = hiredis.Reader()
        reader.feed(step.packed)
        xadd = reader.gets()
        return dict(zip(xadd[3::2], xadd[4::2]))[b"id"]

    # BUSY for the request and its read: a pause, then the same request again.
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    first = next(plan)
    assert isinstance(plan.send([busy, busy]), float)
    again = next(plan)
    assert again.replies == 2 and request_id(again) == request_id(first)
    # Added, then the read refused: the write may be applied, and the error says so.
    with pytest.raises(ReadOnlyError, match="may be applied"):
        plan.send([b"1-0", noperm])
    # Added, the reply lost with the connection, the resend refused: the same.
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    assert isinstance(plan.throw(redis.ConnectionError("lost")), float)
    next(plan)
    with pytest.raises(redis.exceptions.OutOfMemoryError, match="may be applied"):
        plan.send(
            [
                redis.exceptions.OutOfMemoryError("command not allowed"),
                redis.exceptions.OutOfMemoryError("command not allowed"),
            ]
        )
    # Never added: refused, plainly.
    plan = session.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    with pytest.raises(ReadOnlyError) as refused:
        plan.send([noperm, noperm])
    assert "may be applied" not in str(refused.value)
    # Added, and no reply could be read until the deadline: no "expires unapplied".
    hasty = _Session(0, "store", 0.05, None)
    hasty.skip_replies = False
    plan = hasty.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
    next(plan)
    time.sleep(plan.throw(redis.ConnectionError("lost")) + 0.05)
    with pytest.raises(WriteTimeoutError, match="may have been applied"):
        next(plan)
    # The probe after a write: BUSY or loading ask again later; a refusal never.
    for answer, skipping in (
        (busy, None),
        (redis.BusyLoadingError("LOADING"), None),
        (noperm, False),
    ):
        probing = _Session(0, "store", 10.0, None)
        plan = probing.write_plan(Op.ADD_MUTABLE, b"k", write, 1.0)
        rid = request_id(next(plan))
        ok = [[probing.replies, [[b"2-0", [b"id", rid, b"status", b"ok"]]]]]
        probe = plan.send([b"1-0", ok])
        assert probe.replies == 1
        with pytest.raises(StopIteration):
            if isinstance(answer, redis.ConnectionError):  # as redis-py raises LOADING
                plan.throw(answer)
            else:
                assert isinstance(plan.send([answer]), _Reset)
                next(plan)
        assert probing.skip_replies is skipping


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_a_writer_whose_reply_skipping_is_refused_later_stays_in_step(
    store, server, mirror_url, daemon, aio
):
    """Found by review: once skipping, a refused ``CLIENT REPLY SKIP`` leaves the XADD's reply.

    The writer read that error as its own outcome ("refused", while the
    request was added and applied), and every later write read the reply
    of an earlier command. Now it starts again on a new connection, asking.
    """
    admin = server.client()
    rules = ("on", f">{PASSWORD}", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "skipper", *rules)
    url = f"unix://skipper:{PASSWORD}@{server.socket}?db=0"
    daemon()

    async def write_async() -> object:
        from telstate.aio.redis import RedisBackend as AioRedisBackend

        backend = await AioRedisBackend.from_url(url, write_timeout=30)
        ts = telstate.aio.TelescopeState(backend)
        await ts.add("s", 0.0, ts=0.0)  # the probe: skipping
        assert backend._remote._session.skip_replies is True
        admin.execute_command("ACL", "SETUSER", "skipper", "-client")  # the rules change
        for i in (1, 2, 3):
            await ts.add("s", float(i), ts=float(i))
        await ts.set_indexed("i", "a", 1)
        assert await ts.set_indexed("i", "a", 1) is None  # the same value: the existing one
        skipping = backend._remote._session.skip_replies
        backend.close()
        await backend.wait_closed()
        return skipping

    if aio:
        skipping = asyncio.run(write_async())
    else:
        ts = TelescopeState(RedisBackend.from_url(url, write_timeout=30))
        ts.add("s", 0.0, ts=0.0)
        assert ts.backend._remote._session.skip_replies is True
        admin.execute_command("ACL", "SETUSER", "skipper", "-client")
        for i in (1, 2, 3):
            ts.add("s", float(i), ts=float(i))
        ts.set_indexed("i", "a", 1)
        ts.set_indexed("i", "a", 1)
        skipping = ts.backend._remote._session.skip_replies
        ts.backend.close()
    assert skipping is False
    admin.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    events = [(e.key, e.timestamp) for e in backend.events() if e.key in (b"s", b"i")]
    assert events == [(b"s", 0.0), (b"s", 1.0), (b"s", 2.0), (b"s", 3.0), (b"i", None)]
    backend.close()


def test_a_busy_server_delays_a_skipping_writer_and_keeps_it_in_step(
    store, server, mirror_url, daemon
):
    """Found by review: a script running past the busy threshold makes Redis answer BUSY.

    To every command, ``CLIENT REPLY SKIP`` included: the writer must wait
    and write once, not report the write refused (or read stale errors).
    """
    daemon()
    ts = TelescopeState(RedisBackend.from_url(mirror_url, write_timeout=30))
    ts.add("s", 0.0, ts=0.0)
    assert ts.backend._remote._session.skip_replies is True
    admin = server.client()
    admin.config_set("busy-reply-threshold", 50)
    busy = threading.Thread(
        target=server.client().eval,
        args=(
            "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2]"
            " repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > s + 1500000",
            0,
        ),
    )
    busy.start()
    deadline = time.monotonic() + 5
    while True:  # until Redis answers BUSY
        try:
            admin.ping()
        except redis.ResponseError as error:
            assert "BUSY" in str(error)
            break
        assert time.monotonic() < deadline
    for i in (1, 2):
        ts.add("s", float(i), ts=float(i))
    busy.join()
    ts.add("s", 3.0, ts=3.0)
    assert ts.get_range("s", st=0) == [(float(i), float(i)) for i in range(4)]
    ts.backend.close()
    admin.close()
    settle(store, server)
    backend = LmdbBackend(store, readonly=True)
    assert [e.timestamp for e in backend.events() if e.key == b"s"] == [0.0, 1.0, 2.0, 3.0]
    backend.close()
