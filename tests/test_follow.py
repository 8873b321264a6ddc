"""Followers as they run: writer process, daemon, redis-server and ``telstate-replicator follow``.

Every scenario ends with the follower's log equal to the primary's, record
for record (each record carries its chain hash), and ``telstate verify``
passing on both.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.__main__ import EXIT_FENCED
from replicator.cursor import read_cursor
from replicator.follow import Follower as InProcessFollower
from replicator.log_stream import LogStream, log_meta_key, log_stream_key, log_writers_key
from replicator.promotion import promotion_key
from replicator.verify import differences, mirror_contents, record_contents
from telstate import TelescopeState, cli, log
from telstate.errors import ReadOnlyError, StoreError
from telstate.lmdb import LmdbBackend, read_records
from telstate.redis import MIRROR_CURSOR_DB
from tests.servers import RedisServer
from tests.test_remote_writes import wait_ready
from tests.test_replicator_e2e import Daemon, Writer, settle

REPO = Path(__file__).resolve().parents[1]
SETTLE = 60.0


class Follower:
    """``python -m replicator follow`` as a subprocess, its log in a file."""

    def __init__(self, store: Path, url: str, log: Path, *args: str) -> None:
        self.log = log
        command = [sys.executable, "-m", "replicator", "follow", "--store", str(store)]
        with open(log, "ab") as output:
            # Where this process's lines start (the followers of a test share the file).
            self.start = output.tell()
            self.process = subprocess.Popen(
                [*command, "--redis", url, *args],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        # Once it runs (so handles SIGTERM): one started just before, still
        # importing, would die of the signal (found by a CI run under load).
        deadline = time.monotonic() + SETTLE
        while b"following store" not in self.log.read_bytes()[self.start :]:
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)
        self.process.terminate()
        assert self.process.wait(10) == 0, self.log_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "primary"
    LmdbBackend(path, durability="none").close()
    return path


@pytest.fixture
def server(tmp_path):
    (tmp_path / "redis").mkdir()
    with RedisServer(directory=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def url(server):
    return server.url + "?db=0"


@pytest.fixture
def processes(tmp_path):
    """Start daemons and followers; every one still running is killed at the end."""
    started: list[Daemon | Follower] = []

    def daemon(store: Path, url: str, *args: str) -> Daemon:
        started.append(Daemon(store, url, *args, log=tmp_path / "replicator.log"))
        return started[-1]  # type: ignore[return-value]

    def follower(store: Path, url: str, *args: str) -> Follower:
        started.append(Follower(store, url, tmp_path / "follower.log", *args))
        return started[-1]  # type: ignore[return-value]

    yield daemon, follower
    for process in started:
        if process.process.poll() is None:
            process.kill()


def head(path: Path) -> int:
    """The store's last seq; 0 while a follower is being made there."""
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


def wait_for(condition, what: str, *watched: Daemon | Follower, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in watched:
            assert process.process.poll() is None, f"{what}: exited\n{process.log_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_caught_up(primary: Path, follower: Path, *watched: Daemon | Follower) -> None:
    target = head(primary)
    wait_for(
        lambda: head(follower) >= target,
        f"the follower to reach seq {target}",
        *watched,
    )


def all_records(path: Path) -> list[tuple[int, bytes]]:
    backend = LmdbBackend(path, readonly=True)
    try:
        records: list[tuple[int, bytes]] = []
        while chunk := read_records(backend, len(records) + 1, 100_000):
            records += chunk
        return records
    finally:
        backend.close()


def verify(path: Path) -> None:
    out = io.StringIO()
    assert cli.main(["verify", str(path)], out=out) == 0, out.getvalue()


def assert_same_log(primary: Path, follower: Path) -> None:
    """Event for event and chain for chain (the chain is each record's tail); both verify."""
    ours, theirs = all_records(primary), all_records(follower)
    assert len(theirs) == len(ours)
    assert theirs == ours
    verify(primary)
    verify(follower)
    backend = LmdbBackend(follower, readonly=True)
    try:
        assert backend.role == "follower"
    finally:
        backend.close()


def test_kills_of_follower_and_daemon_lose_and_repeat_nothing(store, server, url, processes):
    start_daemon, start_follower = processes
    follower_path = store.parent / "follower"
    daemons = [start_daemon(store, url, "--batch", "50")]
    followers = [start_follower(follower_path, url, "--batch", "40")]
    writer = Writer(store, count=8000, rate=1500, seed=11)
    rng = random.Random(12)
    deadline = time.monotonic() + 25
    kills = {"daemon": 0, "follower": 0}
    while writer.process.is_alive() and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.4))
        if rng.random() < 0.5:
            daemons[-1].kill()
            kills["daemon"] += 1
            daemons.append(start_daemon(store, url, "--batch", "50"))
        else:
            followers[-1].kill()
            kills["follower"] += 1
            followers.append(start_follower(follower_path, url, "--batch", "40"))
    writer.join()
    assert min(kills.values()) >= 3, kills
    settle(store, server.client(db=0), daemons[-1])
    wait_caught_up(store, follower_path, daemons[-1], followers[-1])
    followers[-1].stop()
    daemons[-1].stop()
    assert_same_log(store, follower_path)
    log = followers[-1].log_text()
    assert "made follower" in log and log.count("made follower") == 1


def test_follower_from_a_backup_taken_mid_stream(store, server, url, processes, tmp_path):
    start_daemon, start_follower = processes
    # The stream keeps about 1000 events: it no longer reaches seq 1 when the follower
    # starts, but still reaches the backup's end while the slow writer goes on.
    daemon = start_daemon(store, url, "--log-stream-max-len", "1000")
    Writer(store, count=2500, rate=5000, seed=21).join()
    writer = Writer(store, count=3000, rate=300, seed=22)
    wait_for(lambda: head(store) > 2600, "the slow writer", daemon)
    backup = tmp_path / "backup"
    done = subprocess.run(
        [sys.executable, "-m", "telstate.cli", "backup", str(store), str(backup)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert 2600 < head(backup) < head(store) + 1
    control = server.client(db=MIRROR_CURSOR_DB)
    first = control.xrange(log_stream_key(0), count=1)[0][0]
    assert int(first.split(b"-")[0]) > 1
    follower = start_follower(backup, url)
    writer.join()
    wait_caught_up(store, backup, daemon, follower)
    follower.stop()
    assert "a follower" in follower.log_text()
    assert_same_log(store, backup)


def test_follower_whose_position_was_trimmed_refuses(store, server, url, processes):
    start_daemon, start_follower = processes
    follower_path = store.parent / "follower"
    # The first 300 events stay in the stream (its bound is more); most of the next
    # 3000 are trimmed away.
    daemon = start_daemon(store, url, "--log-stream-max-len", "500")
    follower = start_follower(follower_path, url)
    Writer(store, count=300, rate=3000, seed=31).join()
    wait_caught_up(store, follower_path, daemon, follower)
    follower.stop()
    position = head(follower_path)
    Writer(store, count=3000, rate=10000, seed=32).join()
    settle(store, server.client(db=0), daemon)
    control = server.client(db=MIRROR_CURSOR_DB)
    wait_for(
        lambda: int(control.hget(log_meta_key(0), "seq") or 0) == head(store),
        "the stream to reach the log's end",
        daemon,
    )
    assert control.xlen(log_stream_key(0)) < 1000
    follower = start_follower(follower_path, url)
    assert follower.process.wait(30) == 1
    log = follower.log_text()
    assert "has moved past" in log and "telstate backup" in log, log
    assert head(follower_path) == position

    # A new follower cannot start from seq 1 either.
    fresh = start_follower(store.parent / "fresh", url)
    assert fresh.process.wait(30) == 1
    assert "telstate backup" in fresh.log_text().rsplit("\n", 3)[-3]
    assert not (store.parent / "fresh").exists()


def test_redis_restarted_empty_mid_stream(store, server, url, processes):
    start_daemon, start_follower = processes
    follower_path = store.parent / "follower"
    daemon = start_daemon(store, url)
    follower = start_follower(follower_path, url)
    writer = Writer(store, count=5000, rate=1500, seed=41)
    wait_for(lambda: head(follower_path) > 500, "500 events", follower)
    server.stop()  # no persistence: it comes back empty
    server.start()
    writer.join()
    wait_caught_up(store, follower_path, daemon, follower)
    follower.stop()
    daemon.stop()
    assert "starts again" in daemon.log_text()
    assert_same_log(store, follower_path)


def test_wait_key_on_the_follower_wakes_on_followed_events(store, server, url, processes):
    start_daemon, start_follower = processes
    follower_path = store.parent / "follower"
    daemon = start_daemon(store, url)
    follower = start_follower(follower_path, url)
    primary = TelescopeState(LmdbBackend(store, durability="none"))
    primary.add("early", 1, immutable=True)
    wait_caught_up(store, follower_path, daemon, follower)
    reader = TelescopeState(LmdbBackend(follower_path, readonly=True))
    assert reader["early"] == 1
    woke: list[float] = []

    def wait() -> None:
        reader.wait_key("late", lambda v, t: v == 42, timeout=20)
        woke.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    written = time.monotonic()
    primary.add("late", 42, immutable=True)
    waiter.join(30)
    assert len(woke) == 1 and woke[0] > written
    # The follower is read-only, naming its primary.
    writable = TelescopeState(LmdbBackend(follower_path))
    with pytest.raises(ReadOnlyError, match="primary"):
        writable.add("mine", 1, immutable=True)
    writable.backend.close()
    reader.backend.close()
    primary.backend.close()


def test_status_shows_each_follower(store, server, url, processes):
    start_daemon, start_follower = processes
    daemon = start_daemon(store, url)
    follower = start_follower(store.parent / "follower", url, "--name", "dr-site")
    Writer(store, count=200, rate=2000, seed=51).join()
    wait_caught_up(store, store.parent / "follower", daemon, follower)
    command = [sys.executable, "-m", "replicator", "status", "--log", str(store), "--redis", url]

    def status() -> dict:
        done = subprocess.run([*command, "--json"], cwd=REPO, capture_output=True, text=True)
        return json.loads(done.stdout)

    wait_for(
        lambda: status().get("followers", {}).get("dr-site", {}).get("lag_events") == 0,
        "the follower's report",
        daemon,
        follower,
    )
    follower.stop()
    position = head(store)
    with LmdbBackend(store, durability="none") as backend:
        TelescopeState(backend).add("more", 1, immutable=True)
    report = status()["followers"]["dr-site"]
    assert report["seq"] == position
    assert report["lag_events"] == 1 and report["lag_seconds"] >= 0
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert f"follower   dr-site: seq {position}, behind by 1 events" in done.stdout, done.stdout


def test_promotion_moves_writes_and_fences_the_old_primary(store, server, url, processes, tmp_path):
    start_daemon, start_follower = processes
    promoted, other = tmp_path / "promoted", tmp_path / "other"
    daemon = start_daemon(store, url, "--accept-writes")
    first = start_follower(promoted, url)
    second = start_follower(other, url)
    Writer(store, count=300, rate=3000, seed=61).join()
    wait_caught_up(store, promoted, daemon, first)
    first.stop()
    # The second follower gets events that the promoted one never will.
    Writer(store, count=50, rate=3000, seed=62).join()
    wait_caught_up(store, other, daemon, second)
    second.stop()

    # Promoted while the old primary's daemon still runs.
    out = io.StringIO()
    assert cli.main(["promote", str(promoted)], out=out) == 0, out.getvalue()
    new_daemon = start_daemon(promoted, url, "--accept-writes")
    client = server.client(db=0)
    wait_for(
        lambda: (
            (read_cursor(client)[1] or None) is not None
            and read_cursor(client)[1].path == str(promoted)
        ),
        "the new primary's daemon to take the mirror",
        new_daemon,
    )
    # The old primary's daemon, displaced, finds the promotion and stops.
    assert daemon.process.wait(40) == EXIT_FENCED, daemon.log_text()
    # Writes through the mirror now go to the promoted store.
    wait_ready(server)
    remote = TelescopeState(url)
    remote.add("after_promotion", 7, immutable=True)
    backend = LmdbBackend(promoted, readonly=True)
    assert TelescopeState(backend)["after_promotion"] == 7
    backend.close()
    settle(promoted, client, new_daemon)

    # Started again, it is refused at once and leaves the mirror alone.
    cursor = read_cursor(client)[1]
    old = Daemon(store, url, log=tmp_path / "old.log")
    assert old.process.wait(30) == EXIT_FENCED
    assert "promoted" in old.log_text() and "old primary" in old.log_text()
    assert read_cursor(client)[1] == cursor
    with LmdbBackend(promoted, readonly=True) as backend:
        expected = record_contents(backend.records())
    assert differences(expected, mirror_contents(client)) == []

    # A follower that went on with the old primary's history refuses.
    diverged = start_follower(other, url)
    assert diverged.process.wait(30) == 1
    assert "diverged" in diverged.log_text()
    remote.backend.close()
    new_daemon.stop()
    verify(promoted)


def test_acl_follower_user_reads_the_stream_and_writes_nothing_else(tmp_path, processes):
    start_daemon, start_follower = processes
    store = tmp_path / "primary"
    TelescopeState(LmdbBackend(store, durability="none")).add("x", 1, immutable=True)
    (tmp_path / "redis").mkdir()
    with RedisServer(directory=tmp_path / "redis") as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "replicator", "on", ">rpw", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "follower", "on", ">fpw")
        socket = server.socket
        daemon = start_daemon(
            store,
            f"unix://replicator:rpw@{socket}?db=0",
            "--acl-setup",
            "--follower-user",
            "follower",
        )
        follower_url = f"unix://follower:fpw@{socket}?db=0"
        follower = start_follower(tmp_path / "follower", follower_url, "--name", "f1")
        wait_caught_up(store, tmp_path / "follower", daemon, follower)
        control = server.client(db=MIRROR_CURSOR_DB)
        wait_for(lambda: control.hexists(b"telstate-replicator:followers:0", "f1"), "a report")
        as_follower = redis.Redis(unix_socket_path=socket, username="follower", password="fpw")
        for command in (("SET", "x", "1"), ("DEL", "x"), ("GET", "x"), ("PUBLISH", "update/x", "")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_follower.execute_command(*command)
        as_follower.execute_command("SELECT", MIRROR_CURSOR_DB)
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_follower.xadd(log_stream_key(0), {"r": b"forged"}, id="999999-0")
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_follower.hset(log_meta_key(0), "seq", 1)
        as_follower.close()
        follower.stop()
        daemon.stop()
    assert_same_log(store, tmp_path / "follower")


def test_follow_refuses_the_primary_itself(store, server, url, processes):
    start_daemon, start_follower = processes
    daemon = start_daemon(store, url)
    Writer(store, count=50, rate=5000, seed=71).join()
    settle(store, server.client(db=0), daemon)
    follower = start_follower(store, url)
    assert follower.process.wait(30) == 1
    assert "the primary itself" in follower.log_text()
    with LmdbBackend(store) as backend:
        assert backend.role == "primary"
        TelescopeState(backend).add("still_writable", 1, immutable=True)


def test_writes_through_the_mirror_reach_the_follower(store, server, url, processes):
    start_daemon, start_follower = processes
    follower_path = store.parent / "follower"
    daemon = start_daemon(store, url, "--accept-writes")
    follower = start_follower(follower_path, url)
    wait_for(lambda: "following store" in follower.log_text(), "the follower", follower)
    wait_ready(server)
    remote = TelescopeState(url)
    for i in range(50):
        remote.add("remote_sensor", float(i), ts=1e9 + i)
    remote.add("remote_attr", "x", immutable=True)
    remote.backend.close()
    wait_caught_up(store, follower_path, daemon, follower)
    follower.stop()
    daemon.stop()
    assert_same_log(store, follower_path)
    with LmdbBackend(follower_path, readonly=True) as backend:
        assert TelescopeState(backend).get_range("remote_sensor", st=0)[-1] == (49.0, 1e9 + 49)


def commands_per_second(server: RedisServer) -> float:
    """Commands Redis processed over one second (a daemon spinning on a refusal makes thousands)."""
    client = server.client()
    try:
        before = client.info("stats")["total_commands_processed"]
        start = time.monotonic()
        time.sleep(1.0)
        after = client.info("stats")["total_commands_processed"]
        return (after - before - 1) / (time.monotonic() - start)
    finally:
        client.close()


def test_damaged_meta_hash_is_replaced_without_spinning(store, server, url, processes):
    start_daemon, start_follower = processes
    control = server.client(db=MIRROR_CURSOR_DB)
    control.hset(log_meta_key(0), mapping={"owner": "someone", "seq": "garbage"})
    daemon = start_daemon(store, url)
    follower_path = store.parent / "follower"
    follower = start_follower(follower_path, url)
    Writer(store, count=200, rate=5000, seed=81).join()
    settle(store, server.client(db=0), daemon)
    wait_caught_up(store, follower_path, daemon, follower)
    assert commands_per_second(server) < 200
    assert "meta hash" in daemon.log_text() and "cannot be read" in daemon.log_text()
    follower.stop()
    daemon.stop()
    assert_same_log(store, follower_path)


def test_damaged_promotion_hash_fences_the_daemon(store, server, url, processes):
    start_daemon, _ = processes
    Writer(store, count=20, rate=5000, seed=82).join()
    control = server.client(db=MIRROR_CURSOR_DB)
    control.hset(promotion_key(0), mapping={"seq": "5"})
    daemon = start_daemon(store, url)
    assert daemon.process.wait(30) == EXIT_FENCED, daemon.log_text()
    assert "promotion hash" in daemon.log_text() and "cannot be read" in daemon.log_text()
    assert server.client(db=0).dbsize() == 0
    assert control.hgetall(promotion_key(0)) == {b"seq": b"5"}


@pytest.mark.parametrize("damage", ["short record", "garbage writer", "mistyped writer"])
def test_hostile_stream_content_stops_the_follower_cleanly(
    server, url, processes, tmp_path, damage
):
    _, start_follower = processes
    control = server.client(db=MIRROR_CURSOR_DB)
    meta = {"store": "6b3f1a9e-3f5c-4c55-9a43-0d1f3c2b8e71", "seq": 1, "chain": "00" * 32}
    control.hset(log_meta_key(0), mapping={**meta, "host": "h", "path": "/p", "owner": "o"})
    record = b"x" if damage == "short record" else b"x" * 80
    control.xadd(log_stream_key(0), {b"r": record}, id="1-0")
    if damage == "garbage writer":
        control.hset(log_writers_key(0), log.record_op_writer(record)[1], b"\xc1 not msgpack")
    if damage == "mistyped writer":
        writer = msgpack.packb([7, "host", None])  # msgpack, but not [host, pid, name]
        control.hset(log_writers_key(0), log.record_op_writer(record)[1], writer)
    follower = start_follower(tmp_path / "follower", url)
    assert follower.process.wait(30) == 1, follower.log_text()
    text = follower.log_text()
    assert "Traceback" not in text
    if damage == "short record":
        assert "stream entry '1-0' holds 1 bytes, too few" in text
    else:
        assert f"writer {log.record_op_writer(record)[1]} of the writers hash" in text


def test_reads_are_sized_from_the_largest_record_seen(store, url, tmp_path):
    """After a large record among small ones, a run of large records is read a few at a time."""
    big = b"b" * 300_000
    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test", batch_bytes=100 << 20)
    follower = InProcessFollower(url, str(tmp_path / "follower"), batch_bytes=1 << 20)
    try:

        def catch_up() -> list[int]:
            while stream.head != backend.last_seq:
                stream.step()
            applied = []
            while follower.seq < backend.last_seq:
                applied.append(follower.step().applied)
            return applied

        ts = TelescopeState(backend)
        for i in range(30):
            ts.add(f"small{i}", i, immutable=True)
        ts.add("big0", big, immutable=True)
        catch_up()
        for i in range(1, 21):
            ts.add(f"big{i}", big, immutable=True)
        applied = catch_up()
        assert sum(applied) == 20
        assert max(applied) <= (1 << 20) // len(big), applied
    finally:
        follower.close()
        stream.close()
        backend.close()
    assert_same_log(store, tmp_path / "follower")


def test_positions_leave_out_reports_whose_time_is_not_a_number():
    from replicator.log_stream import positions_from

    fields = {
        b"text": b'{"seq": 1, "time": "x"}',
        b"null": b'{"seq": 1, "time": null}',
        b"nan": b'{"seq": 1, "time": NaN}',
        b"good": b'{"seq": 2, "time": 5.0}',
        b"untimed": b'{"seq": 3}',
    }
    assert sorted(positions_from(fields)) == ["good", "untimed"]


def test_a_stream_that_cannot_be_applied_backs_off(store, url, server, tmp_path):
    """A stream whose writers hash lacks a writer: each retry waits twice as long as the last."""
    from replicator.log_stream import log_writers_key

    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test")
    follower = InProcessFollower(url, str(tmp_path / "follower"))
    try:
        TelescopeState(backend).add("a", 1, immutable=True)
        while stream.head != backend.last_seq:
            stream.step()
        server.client(db=MIRROR_CURSOR_DB).delete(log_writers_key(0))
        delays = []
        for _ in range(5):
            follower._retry_at = 0.0  # retry now, whatever the wait
            follower.step()
            follower._retry_at = 0.0
            follower.step()  # connected again: the failing read comes next
            delays.append(follower._delay)
        assert delays == sorted(delays) and delays[-1] >= 8 * follower.backoff[0], delays
        assert follower.seq == 0
    finally:
        follower.close()
        stream.close()
        backend.close()


def test_an_idle_log_stream_notices_a_promotion_recorded_again(store, url, server):
    """An old primary's stream with nothing to append reads the promotion hash at each check."""
    from replicator.log_stream import StreamState
    from replicator.promotion import Promotion, record_promotion

    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test", check_interval=0.0)
    try:
        TelescopeState(backend).add("a", 1, immutable=True)
        while stream.head != backend.last_seq:
            stream.step()
        assert stream.step().idle and stream.state == StreamState.TAIL
        control = server.client(db=MIRROR_CURSOR_DB)
        promotion = Promotion(str(backend.uuid), 2, "00" * 32, "new-host", "/new")
        assert record_promotion(control, 0, promotion, None)
        for _ in range(3):
            stream.step()
        assert stream.state == StreamState.FENCED
        assert stream.refusal is not None and "does not hold that event" in stream.refusal
    finally:
        stream.close()
        backend.close()


def test_a_log_stream_is_fenced_by_a_promotion_at_its_seq_of_another_chain(store, url, server):
    """Found by review: the fence compared the promotion's seq, not its chain.

    Two followers promoted at the same seq (split brain), Redis forgot the
    first one's record and the second recorded its own: the first's stream
    went on appending.
    """
    from replicator.log_stream import StreamState
    from replicator.promotion import Promotion, PromotionScan, record_promotion
    from telstate.lmdb import make_follower, promote

    backend = LmdbBackend(store, durability="none")
    TelescopeState(backend).add("a", 1, immutable=True)
    backend.close()
    make_follower(store, "old-host:/old")
    promote(store)
    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test", check_interval=3600.0)
    try:
        control = server.client(db=MIRROR_CURSOR_DB)
        mine = PromotionScan(backend).latest()
        assert mine is not None and mine.seq == backend.last_seq
        assert record_promotion(control, 0, mine, None)
        while stream.head != backend.last_seq:
            stream.step()
        assert stream.state == StreamState.TAIL
        control.delete(promotion_key(0))  # Redis forgot it; the other follower records its own
        other = Promotion(str(backend.uuid), mine.seq, "bb" * 32, "other-host", "/other")
        assert record_promotion(control, 0, other, None)
        TelescopeState(backend).add("b", 2, immutable=True)
        for _ in range(3):
            stream.step()
        assert stream.state == StreamState.FENCED
        assert stream.refusal is not None and "does not hold that event" in stream.refusal
        assert stream.head == mine.seq
        assert control.xlen(log_stream_key(0)) == mine.seq
    finally:
        stream.close()
        backend.close()


def test_the_promoted_daemon_takes_the_mirror_back_after_redis_forgot_the_promotion(
    store, server, url, processes
):
    """Found by review: Redis restarted empty while the new primary's daemon was stopped.

    The old primary's daemon, started again, was not fenced (the promotion
    hash was gone): it rebuilt the mirror from its abandoned history and
    acknowledged remote writes into it, also after the new primary's daemon
    had recorded the promotion again; that one waited in CONFLICT for good.
    Now the new primary's daemon takes the mirror back, and the old one is
    fenced and stops.
    """
    import os
    import signal

    start_daemon, start_follower = processes
    promoted = store.parent / "promoted"
    old_daemon = start_daemon(store, url, "--accept-writes")
    follower = start_follower(promoted, url)
    Writer(store, count=50, rate=3000, seed=71).join()
    wait_caught_up(store, promoted, old_daemon, follower)
    follower.stop()
    old_daemon.kill()  # the primary's host dies
    assert cli.main(["promote", str(promoted)], out=io.StringIO()) == 0
    promote_seq = head(promoted)
    new_daemon = start_daemon(promoted, url, "--accept-writes")
    client = server.client(db=0)

    def cursor_of(path: Path, seq: int = 0) -> bool:
        cursor = read_cursor(client)[1]
        return (
            cursor is not None
            and cursor.path == str(path)
            and cursor.state.value == "ready"
            and cursor.seq >= seq
        )

    wait_for(lambda: cursor_of(promoted, promote_seq), "the new primary's mirror", new_daemon)
    os.kill(new_daemon.process.pid, signal.SIGSTOP)
    try:
        server.stop()
        server.start()  # empty: the promotion hash is gone
        client = server.client(db=0)
        old_again = start_daemon(store, url, "--accept-writes")
        wait_for(lambda: cursor_of(store), "the old primary's daemon to take the mirror", old_again)
        wait_ready(server)
        # The window that remains (see the README): acknowledged into the old primary.
        remote = TelescopeState(url)
        remote.add("acked_by_old_primary", 2, immutable=True)
        remote.backend.close()
    finally:
        os.kill(new_daemon.process.pid, signal.SIGCONT)
    # The new primary's daemon records the promotion again, takes the mirror
    # back; the old one is refused and stops.
    assert old_again.process.wait(60) == EXIT_FENCED, old_again.log_text()
    assert "taking the mirror over" in new_daemon.log_text()
    wait_for(lambda: cursor_of(promoted, promote_seq), "the mirror taken back", new_daemon)
    wait_ready(server)
    remote = TelescopeState(url)
    remote.add("after", 3, immutable=True)
    remote.backend.close()
    with LmdbBackend(promoted, readonly=True) as backend:
        assert TelescopeState(backend)["after"] == 3
        assert "acked_by_old_primary" not in TelescopeState(backend)
    with LmdbBackend(store, readonly=True) as backend:
        assert "after" not in TelescopeState(backend)
    settle(promoted, client, new_daemon)
    new_daemon.stop()
    verify(promoted)


def _caught_up_follower(store: Path, url: str, follower_path: Path, events: int):
    """A primary with `events` events, streamed, and an in-process follower level with it."""
    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test")
    ts = TelescopeState(backend)
    for i in range(events):
        ts.add("sensor", float(i), ts=1e9 + i)
    while stream.head != backend.last_seq:
        stream.step()
    follower = InProcessFollower(url, str(follower_path))
    while follower.seq < backend.last_seq:
        follower.step()
    return backend, stream, follower


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq", "-1"),
        ("seq", "1e3"),
        ("seq", str(1 << 64)),
        ("store", "not-a-uuid"),
        ("chain", "zz"),
        ("chain", "00"),
        ("max_len", "-5"),
        ("host", b"\xff"),  # not UTF-8: the primary's name could not be recorded
    ],
)
def test_a_damaged_meta_hash_makes_the_follower_wait_not_crash(
    store, url, server, tmp_path, caplog, field, value
):
    """The follower, level with the stream, waits out a damaged meta hash, then goes on."""
    backend, stream, follower = _caught_up_follower(store, url, tmp_path / "follower", 5)
    control = server.client(db=MIRROR_CURSOR_DB)
    try:
        good = control.hget(log_meta_key(0), field)
        control.hset(log_meta_key(0), field, value)
        follower._next_report = 0.0
        assert follower.step().applied == 0  # neither a traceback nor a FollowError
        assert "meta hash" in caplog.text and "cannot be read" in caplog.text
        assert follower.seq == 5
        control.hset(log_meta_key(0), field, good)
        TelescopeState(backend).add("sensor", 5.0, ts=1e9 + 5)
        while stream.head != backend.last_seq:
            stream.step()
        while follower.seq < backend.last_seq:
            follower._next_report = 0.0
            follower.step()
    finally:
        follower.close()
        stream.close()
        backend.close()
    assert_same_log(store, tmp_path / "follower")


@pytest.mark.parametrize(
    "field, value",
    [
        ("store", "not-a-uuid"),
        ("host", "elsewhere"),
        ("max_len", "7"),
        ("seq", "2"),
        ("chain", "ab" * 32),  # well-formed: caught-up followers would take it for divergence
        (None, None),
    ],
)
def test_the_daemon_replaces_a_meta_hash_damaged_while_its_appends_go_on(
    store, url, server, tmp_path, field, value
):
    """Found by review: appends check only the owner, so a field damaged otherwise stayed
    while they went on, and a new follower waited for a replacement that never came."""
    backend, stream, follower = _caught_up_follower(store, url, tmp_path / "follower", 5)
    control = server.client(db=MIRROR_CURSOR_DB)
    late = InProcessFollower(url, str(tmp_path / "late"))
    try:
        good = control.hgetall(log_meta_key(0))

        def damage() -> None:
            if field is None:
                control.delete(log_meta_key(0))
            else:
                control.hset(log_meta_key(0), field, value)

        if field != "chain":  # (an append writes the chain anew)
            damage()
        for i in range(3):  # appends go on meanwhile
            TelescopeState(backend).add("sensor", 100.0 + i, ts=2e9 + i)
            while stream.head != backend.last_seq:
                stream.step()
        if field == "chain":
            damage()
        stream._next_check = 0.0  # (its next look, due once a second)
        stream.step()
        while stream.state.value != "tail" or stream.head != backend.last_seq:
            stream.step()
        meta = control.hgetall(log_meta_key(0))
        for name in (b"store", b"host", b"path", b"owner", b"max_len"):
            assert meta[name] == good[name]
        assert (int(meta[b"seq"]), meta[b"chain"].decode()) == (
            backend.last_seq,
            backend.head[1].hex(),
        )
        while late.seq < backend.last_seq:
            late._retry_at = 0.0
            assert late.step().applied or late.state.value != "backoff"
        while follower.seq < backend.last_seq:
            follower.step()
    finally:
        late.close()
        follower.close()
        stream.close()
        backend.close()
    assert_same_log(store, tmp_path / "late")
    assert_same_log(store, tmp_path / "follower")


def test_a_stream_whose_meta_seq_was_raised_by_hand_starts_again(store, url, server, caplog):
    """Found by review: the append answered a head past the log's end, and the stream
    died with a ValueError looking up its chain."""
    backend = LmdbBackend(store, durability="none")
    stream = LogStream(backend, url, owner="test")
    try:
        ts = TelescopeState(backend)
        ts.add("a", 1, immutable=True)
        while stream.head != backend.last_seq:
            stream.step()
        server.client(db=MIRROR_CURSOR_DB).hset(log_meta_key(0), "seq", 1000)
        ts.add("b", 2, immutable=True)
        for _ in range(4):
            stream.step()
        assert "past the log's" in caplog.text
        assert stream.state.value == "tail" and stream.head == backend.last_seq
        meta = server.client(db=MIRROR_CURSOR_DB).hgetall(log_meta_key(0))
        assert int(meta[b"seq"]) == backend.last_seq
    finally:
        stream.close()
        backend.close()


def test_a_new_follower_waits_for_a_meta_hash_naming_no_store(server, url, tmp_path, caplog):
    control = server.client(db=MIRROR_CURSOR_DB)
    control.hset(log_meta_key(0), mapping={"store": "not-a-uuid", "seq": 0, "chain": "00" * 32})
    follower = InProcessFollower(url, str(tmp_path / "follower"))
    try:
        follower.step()
        assert follower.state.value == "backoff"
        assert "meta hash" in caplog.text and "cannot be read" in caplog.text
    finally:
        follower.close()
    assert not (tmp_path / "follower").exists()


def _step_until_it_stops(follower: InProcessFollower) -> None:
    """Step `follower` a few times, retrying at once, until a FollowError stops it; close it.

    Any other exception (a traceback on hostile content) fails the test.
    """
    from replicator.follow import FollowError

    try:
        for _ in range(4):
            follower._retry_at = follower._next_report = 0.0
            follower.step()
    except FollowError:
        pass
    finally:
        follower.close()


_HOSTILE = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.sampled_from(["", " 1", "1_0", "0x10", "nan", "-0", "١", "00" * 32, "0" * 63]),
    st.binary(max_size=80),
    st.text(max_size=80),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    damage=st.dictionaries(
        st.sampled_from(["store", "seq", "chain", "host", "path", "owner", "max_len"]),
        _HOSTILE,
        min_size=1,
    ),
    new=st.booleans(),
)
def test_any_meta_hash_gives_a_step_or_a_follow_error(store, url, server, tmp_path, damage, new):
    """Fuzzed fields of the meta hash over a real stream: the follower never raises anything
    but FollowError, whether it makes its store or is level with the stream."""
    control = server.client(db=MIRROR_CURSOR_DB)
    if not control.exists(log_meta_key(0)):
        backend, stream, follower = _caught_up_follower(store, url, tmp_path / "follower", 3)
        follower.close()
        stream.close()
        backend.close()
    good = control.hgetall(log_meta_key(0))
    target = tmp_path / ("new" if new else "follower")
    shutil.rmtree(tmp_path / "new", ignore_errors=True)
    control.hset(log_meta_key(0), mapping=damage)
    try:
        _step_until_it_stops(InProcessFollower(url, str(target)))
    finally:
        control.delete(log_meta_key(0))
        control.hset(log_meta_key(0), mapping=good)


@pytest.mark.parametrize("left", ["empty directory", "empty environment"])
def test_follow_makes_its_store_where_none_was_made(store, server, url, processes, left):
    """An empty directory (a mount point), or the LMDB environment that a `follow` killed
    while it made its store leaves, is followed into as a path that does not exist."""
    import lmdb

    start_daemon, start_follower = processes
    Writer(store, count=50, rate=5000, seed=91).join()
    follower_path = store.parent / "follower"
    follower_path.mkdir()
    if left == "empty environment":
        lmdb.open(str(follower_path)).close()
    daemon = start_daemon(store, url)
    follower = start_follower(follower_path, url)
    wait_caught_up(store, follower_path, daemon, follower)
    follower.stop()
    daemon.stop()
    assert_same_log(store, follower_path)


def test_follow_never_takes_a_directory_with_other_files(store, server, url, processes):
    import lmdb

    start_daemon, start_follower = processes
    Writer(store, count=5, rate=5000, seed=92).join()
    follower_path = store.parent / "follower"
    follower_path.mkdir()
    lmdb.open(str(follower_path)).close()
    (follower_path / "notes.txt").write_text("mine")
    before = sorted(follower_path.iterdir())
    daemon = start_daemon(store, url)
    follower = start_follower(follower_path, url)
    assert follower.process.wait(30) == 1, follower.log_text()
    assert "is an LMDB environment but not a telstate store" in follower.log_text()
    assert "Traceback" not in follower.log_text()
    assert sorted(follower_path.iterdir()) == before
    daemon.stop()


def test_an_adopted_writer_never_takes_another_identity(store, url, server, tmp_path):
    """The writers hash is not chained: a writer forged after the follower adopted the id
    stops the follower (a new process, which reads the hash again), and changes nothing."""
    from replicator.follow import FollowError

    follower_path = tmp_path / "follower"
    backend, stream, follower = _caught_up_follower(store, url, follower_path, 5)
    follower.close()
    control = server.client(db=MIRROR_CURSOR_DB)
    ids = list(control.hgetall(log_writers_key(0)))
    for writer_id in ids:
        control.hset(log_writers_key(0), writer_id, msgpack.packb(["mallory", 666, "mallory"]))
    try:
        TelescopeState(backend).add("sensor", 5.0, ts=1e9 + 5)
        while stream.head != backend.last_seq:
            stream.step()
        follower = InProcessFollower(url, str(follower_path))
        with pytest.raises(FollowError, match="their writers differ"):
            for _ in range(10):
                follower.step()
        follower.close()
    finally:
        stream.close()
        backend.close()
    with LmdbBackend(follower_path, readonly=True) as copy:
        assert copy.last_seq == 5
        assert "mallory" not in {event.writer.host for event in copy.events()}
    assert all_records(follower_path) == all_records(store)[:5]


@st.composite
def _hostile_entry(draw, chain: bytes, writer_id: int):
    """A stream entry: an id, and fields that may hold a record, sealed to `chain` or not
    (a record of any operation code, mostly by a writer that the writers hash holds)."""
    seq = draw(st.sampled_from([4, 4, 4, 5, 9]))  # mostly the follower's next (4)
    op_code = draw(st.integers(0, 9))
    writer = draw(st.sampled_from([writer_id, writer_id, 12345]))
    times = draw(st.tuples(st.floats(), st.floats()))
    lengths = draw(st.tuples(st.integers(0, 40), st.integers(0, 40)) | st.just((1 << 32 - 1, 0)))
    rest = draw(st.binary(max_size=120))
    body = struct.pack("<BIddII", op_code, writer, *times, *lengths) + rest
    record = draw(
        st.one_of(
            st.just(log.seal(body, chain)),  # continues the follower's chain
            st.binary(max_size=120),
        )
    )
    fields = draw(
        st.one_of(
            st.just({b"r": record}),
            st.just({b"other": record}),
            st.just({b"r": record, b"x": b"y"}),
        )
    )
    return f"{seq}-{draw(st.sampled_from([0, 0, 0, 1]))}", fields


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_stream_entry_gives_a_step_or_a_follow_error(store, url, server, tmp_path, data):
    """Fuzzed entries after the follower's head (ids, fields, records sealed to its chain or
    not): the follower never raises anything but FollowError, and its log stays a prefix
    of the primary's or takes the sealed records as events."""
    control = server.client(db=MIRROR_CURSOR_DB)
    follower_path = tmp_path / "follower"
    if not control.exists(log_meta_key(0)):
        backend, stream, follower = _caught_up_follower(store, url, follower_path, 3)
        follower.close()
        stream.close()
        backend.close()
        shutil.copytree(follower_path, tmp_path / "pristine")
    shutil.rmtree(follower_path)
    shutil.copytree(tmp_path / "pristine", follower_path)
    kept = control.xrange(log_stream_key(0))
    with LmdbBackend(follower_path, readonly=True) as copy:
        chain = copy.head[1]
    writer_id = int(next(iter(control.hgetall(log_writers_key(0)))))
    entries = data.draw(st.lists(_hostile_entry(chain, writer_id), min_size=1, max_size=3))
    for entry_id, fields in entries:
        try:
            control.xadd(log_stream_key(0), fields, id=entry_id)
        except redis.ResponseError:
            pass  # an id not after the stream's last: Redis refuses it
    try:
        _step_until_it_stops(InProcessFollower(url, str(follower_path)))
    finally:
        control.delete(log_stream_key(0))
        for entry_id, fields in kept:
            control.xadd(log_stream_key(0), fields, id=entry_id)
