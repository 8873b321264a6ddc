"""The replicator as it runs: real store, writer process, daemon process, redis-server.

After each scenario the mirror must equal the store key for key and sample
for sample (:mod:`replicator.verify`), and its cursor must name the store's
last event.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from replicator.cursor import MirrorState, read_cursor
from replicator.snapshot_sink import list_snapshots
from replicator.verify import differences, mirror_contents, record_contents
from telstate import KeyType, TelescopeState
from telstate.errors import ReadOnlyError
from telstate.lmdb import LmdbBackend, replay
from telstate.rdb_reader import read_records
from telstate.redis import MIRROR_CURSOR_DB, mirror_cursor_key
from telstate.utils import pack_timestamp
from tests.servers import RedisServer

REPO = Path(__file__).resolve().parents[1]
SETTLE_TIMEOUT = 30.0


def write_stream(path: str, count: int, rate: float, seed: int, clear_at: int | None) -> None:
    """Child process: a pipeline writing `count` varied writes at about `rate` per second."""
    rng = random.Random(seed)
    ts = TelescopeState(LmdbBackend(path, durability="none", writer_name=f"writer{seed}"))
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if i == clear_at:
            ts.clear()
        choice = rng.random()
        if choice < 0.7:
            ts.add(f"sensor{rng.randrange(8)}", rng.random(), ts=1e9 + i)
        elif choice < 0.8:
            ts.set_indexed("indexed", f"sub{i}", [i, "x"])
        elif choice < 0.9:
            ts.add(f"attr{i}", {"i": i}, immutable=True)
        elif choice < 0.95:
            ts.delete(f"sensor{rng.randrange(8)}")
        else:
            ts.add(f"sensor{rng.randrange(8)}", rng.random(), ts=1e9 + i - 500)
    ts.backend.close()


class Writer:
    """A writer process (spawned, so that it opens the store afresh)."""

    def __init__(self, path: Path, count: int, rate: float, seed: int = 0, clear_at=None):
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=write_stream, args=(str(path), count, rate, seed, clear_at), daemon=True
        )
        self.process.start()

    def join(self, timeout: float = 60.0) -> None:
        self.process.join(timeout)
        assert self.process.exitcode == 0, "the writer failed"


class Daemon:
    """``python -m replicator`` as a subprocess, its log in a file."""

    def __init__(self, store: Path, url: str | None, *args: str, log: Path) -> None:
        self.log = log
        command = [sys.executable, "-m", "replicator", "--log", str(store)]
        if url is not None:
            command += ["--redis", url]
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                command + list(args),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM; the daemon must exit cleanly and promptly."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(10) == 0, self.log.read_text()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def store(tmp_path):
    """An empty store (a daemon needs it to exist)."""
    path = tmp_path / "store"
    LmdbBackend(path, durability="none").close()
    return path


@pytest.fixture
def server(tmp_path):
    with RedisServer(directory=tmp_path) as server:
        yield server


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(store: Path, url: str | None, *args: str) -> Daemon:
        started.append(Daemon(store, url, *args, log=tmp_path / "replicator.log"))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


def wait_for_cursor(client: redis.Redis, daemon: Daemon) -> None:
    """Wait until the mirror has a READY cursor (the daemon has started, or rebuilt it)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            cursor = read_cursor(client)[1]
        except redis.ConnectionError:
            cursor = None
        if cursor is not None and cursor.state == MirrorState.READY:
            return
        assert daemon.process.poll() is None, daemon.log_text()
        assert time.monotonic() < deadline, "no mirror"
        time.sleep(0.02)


def settle(store: Path, client: redis.Redis, daemon: Daemon | None = None) -> None:
    """Wait until the mirror's cursor is at the store's last event, and compare the two."""
    backend = LmdbBackend(store, readonly=True)
    try:
        last_seq = backend.last_seq
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            size, cursor = read_cursor(client)
            if cursor is not None and cursor.state == MirrorState.READY:
                if cursor.seq == last_seq:
                    break
            if daemon is not None and daemon.process.poll() is not None:
                raise AssertionError(f"the daemon exited: {daemon.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mirror stuck at {cursor}, store at seq {last_seq}")
            time.sleep(0.02)
        with backend.snapshot() as snapshot:
            assert snapshot.seq == last_seq
            expected = record_contents(snapshot.records())
        assert cursor.store == str(backend.uuid)
        assert cursor.keys == size == len(expected)
    finally:
        backend.close()
    assert differences(expected, mirror_contents(client)) == []


def test_steady_stream_and_katsdptelstate_reads_the_mirror(store, server, daemons):
    katsdptelstate = importlib.import_module("katsdptelstate")
    daemon = daemons(store, server.url)
    Writer(store, count=1500, rate=1500).join()
    client = server.client()
    settle(store, client, daemon)

    ours = TelescopeState(LmdbBackend(store, readonly=True))
    theirs = katsdptelstate.TelescopeState(server.url)
    assert sorted(theirs.keys()) == sorted(ours.keys())
    for key in ours.keys():
        if ours.key_type(key) == KeyType.MUTABLE:
            assert theirs.get_range(key, st=0) == ours.get_range(key, st=0)
        else:
            assert theirs[key] == ours[key]

    # katsdptelstate's wait_key on the mirror wakes on a write made to the store.
    woke: list[float] = []
    waiter = threading.Thread(
        target=lambda: woke.append(theirs.wait_key("late", lambda v, t: v == 42, timeout=10))
    )
    waiter.start()
    time.sleep(0.3)
    writer = TelescopeState(LmdbBackend(store, durability="none"))
    writer.add("late", 42, ts=1.0)
    waiter.join(15)
    assert woke == [None]
    writer.backend.close()
    with pytest.raises(ReadOnlyError, match="write to the store instead"):
        TelescopeState(server.url).add("oops", 1)
    daemon.stop()
    assert "Traceback" not in daemon.log_text()


def test_daemon_sigkilled_at_random_points(store, server, daemons):
    """Exactly once: the mirror is exact and every applied write was published once."""
    client = server.client()
    pubsub = client.pubsub()
    pubsub.psubscribe("update/*")
    messages: list[bytes] = []
    listening = threading.Event()

    def listen() -> None:
        listening.set()
        while listening.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "pmessage":
                messages.append(message["channel"])

    listener = threading.Thread(target=listen)
    listener.start()
    # The empty store is mirrored first, so that every later message is an event.
    daemons_ = [daemons(store, server.url, "--batch", "50")]
    settle(store, client, daemons_[0])
    writer = Writer(store, count=9000, rate=1500, seed=1)
    rng = random.Random(2)
    kills = 0
    # At least 10 kills whatever the machine's speed: once the writer is done
    # (a loaded machine starts daemons slowly), kills land during start-up.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (kills < 10 or writer.process.is_alive()) and kills < 15:
        if writer.process.is_alive() and rng.random() < 0.7:
            # Once this daemon is applying batches, at a random instant.
            seq = read_cursor(client)[1].seq
            while (
                read_cursor(client)[1].seq == seq
                and writer.process.is_alive()
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
        else:
            # While it starts up, connects or takes the mirror over.
            time.sleep(rng.uniform(0.0, 0.4))
        daemons_[-1].kill()
        kills += 1
        daemons_.append(daemons(store, server.url, "--batch", "50"))
    writer.join()
    settle(store, client, daemons_[-1])
    time.sleep(0.2)
    listening.clear()
    listener.join()
    pubsub.close()
    assert kills >= 10
    backend = LmdbBackend(store, readonly=True)
    published = [e for e in backend.events() if e.op.value not in ("delete", "clear")]
    backend.close()
    assert sorted(messages) == sorted(b"update/" + e.key for e in published)
    # Only the first daemon built the mirror; every later one resumed it.
    assert daemons_[-1].log_text().count("must be rebuilt") == 1


def test_redis_restarted_empty_and_stopped_for_a_while(store, server, daemons):
    daemon = daemons(store, server.url)
    writer = Writer(store, count=4000, rate=1000, seed=3)
    client = server.client()
    wait_for_cursor(client, daemon)
    time.sleep(0.3)
    server.stop()  # no persistence: it comes back empty
    server.start()
    wait_for_cursor(client, daemon)
    time.sleep(0.3)
    client.save()  # this time it comes back with its data, after a pause
    server.stop()
    time.sleep(1.0)
    server.start()
    writer.join()
    settle(store, client, daemon)
    log = daemon.log_text()
    assert log.count("must be rebuilt") == 2, log  # the new mirror, and the empty restart
    assert "back after" in log
    daemon.stop()


def test_clear_in_the_middle_with_snapshots_alongside(store, server, daemons, tmp_path):
    rdb = tmp_path / "rdb"
    snapshot_options = ["--rdb-dir", str(rdb), "--snapshot-interval", "0.3", "--keep", "2"]
    daemon = daemons(store, server.url, *snapshot_options)
    Writer(store, count=1000, rate=2000, seed=4, clear_at=600).join()
    settle(store, server.client(), daemon)
    backend = LmdbBackend(store, readonly=True)
    last_seq = backend.last_seq
    assert any(e.op.value == "clear" for e in backend.events())
    backend.close()
    deadline = time.monotonic() + 10
    while not list_snapshots(rdb) or list_snapshots(rdb)[-1].seq != last_seq:
        assert time.monotonic() < deadline, "no snapshot of the last event"
        time.sleep(0.05)
    daemon.stop()
    snapshots = list_snapshots(rdb)
    assert 1 <= len(snapshots) <= 2
    for snapshot in snapshots:
        replayed = record_contents(replay(store, until_seq=snapshot.seq).backend.records())
        assert differences(replayed, record_contents(read_records(snapshot.path))) == []


def test_second_store_on_the_same_redis(tmp_path, store, server, daemons):
    other = tmp_path / "other"
    LmdbBackend(other, durability="none").close()
    url0, url1 = server.url + "?db=0", server.url + "?db=1"
    first = daemons(store, url0)
    second = daemons(other, url1)
    Writer(store, count=500, rate=2000, seed=5).join()
    Writer(other, count=500, rate=2000, seed=6).join()
    settle(store, server.client(db=0), first)
    settle(other, server.client(db=1), second)
    # The second store is now pointed at the first one's database instead.
    first.stop()
    second.stop()
    moved = daemons(other, url0)
    settle(other, server.client(db=0), moved)
    assert "holds store" in moved.log_text()


def test_status_and_once(store, server, tmp_path):
    rdb_dir = tmp_path / "rdb"
    Writer(store, count=300, rate=5000, seed=7).join()
    base = [sys.executable, "-m", "replicator"]
    where = ["--log", str(store), "--redis", server.url, "--rdb-dir", str(rdb_dir)]

    def status() -> dict:
        run = subprocess.run(base + ["status", *where, "--json"], cwd=REPO, capture_output=True)
        return json.loads(run.stdout)

    before = status()
    assert "error" in before["mirror"] and before["snapshots"]["count"] == 0
    run = subprocess.run(base + where + ["--once"], cwd=REPO, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    after = status()
    last_seq = after["store"]["last_seq"]
    assert after["mirror"]["seq"] == after["snapshots"]["seq"] == last_seq
    assert after["mirror"]["lag_events"] == after["snapshots"]["lag_events"] == 0
    settle(store, server.client())
    writer = TelescopeState(LmdbBackend(store, durability="none"))
    writer.add("new", 1, ts=1.0)
    writer.backend.close()
    lagging = status()
    assert lagging["mirror"]["lag_events"] == 1 and lagging["mirror"]["lag_seconds"] >= 0
    text = subprocess.run(base + ["status", *where], cwd=REPO, capture_output=True, text=True)
    assert "behind by 1 events" in text.stdout


def test_rebuild_is_invisible_to_readers(store, server, tmp_path):
    """During the rebuild of a 200k-sample mirror a reader sees the old mirror, then the new one."""
    katsdptelstate = importlib.import_module("katsdptelstate")
    backend = LmdbBackend(store, durability="none")
    samples = [pack_timestamp(1e9 + i) + b"\xff%d" % i for i in range(200_000)]
    backend.load_records(
        [
            (b"sensor", KeyType.MUTABLE, samples),
            (b"attr", KeyType.IMMUTABLE, b"\xff\x01"),
            (b"indexed", KeyType.INDEXED, {b"\x92%d" % i: b"\xff" for i in range(500)}),
        ]
    )
    base = [sys.executable, "-m", "replicator", "--log", str(store), "--redis", server.url]
    run = subprocess.run([*base, "--once"], cwd=REPO, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    client = server.client()
    settle(store, client)
    writer = TelescopeState(backend)
    for i in range(1000):
        writer.add("sensor", float(i), ts=2e9 + i)
    backend.close()
    # As a rebuild cut short leaves it: the next replicator must rebuild.
    server.client(db=MIRROR_CURSOR_DB).hset(mirror_cursor_key(0), "state", "rebuilding")

    seen: list[int] = []
    foreign: set[str] = set()
    problems: list[str] = []
    polling = threading.Event()
    polling.set()

    def poll() -> None:
        reader = server.client()
        theirs = katsdptelstate.TelescopeState(server.url)
        while polling.is_set():
            with reader.pipeline(transaction=False) as pipe:
                pipe.zcard(b"sensor").exists(b"attr").hlen(b"indexed")
                count, attr, width = pipe.execute()
            if not (attr == 1 and width == 500):
                problems.append(f"attr exists: {attr}, indexed has {width} sub-keys")
            seen.append(count)
            foreign.update(set(theirs.keys()) - {"sensor", "attr", "indexed"})
        reader.close()

    poller = threading.Thread(target=poll)
    poller.start()
    log = tmp_path / "rebuild.log"
    with open(log, "wb") as output:
        run = subprocess.run(
            [*base, "--once", "--batch", "1000"],
            cwd=REPO,
            stdout=output,
            stderr=output,
            timeout=120,
        )
    polling.clear()
    poller.join(30)
    assert not poller.is_alive()
    text = log.read_text()
    assert run.returncode == 0, text
    assert "must be rebuilt: it was left rebuilding" in text and "mirror rebuilt" in text
    assert not problems, problems[:3]
    assert len(seen) > 20, "the reader did not poll during the rebuild"
    assert min(seen) == 200_000 and seen[-1] == 201_000
    assert seen == sorted(seen)  # old, then new: never back
    assert not foreign
    settle(store, client)
