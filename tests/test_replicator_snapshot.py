"""RDB snapshots: named by store and seq, atomic, pruned, and equal to the log replayed."""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from replicator.daemon import Daemon
from replicator.snapshot_sink import (
    AUX_CHAIN,
    AUX_SEQ,
    AUX_STORE,
    DIVERGED,
    SnapshotDirectoryBusy,
    SnapshotSink,
    list_snapshots,
)
from replicator.verify import differences, mirror_contents, record_contents
from telstate import TelescopeState
from telstate.lmdb import LmdbBackend, replay
from telstate.rdb_reader import read_records
from tests.servers import RedisServer


@pytest.fixture
def store(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none")
    yield TelescopeState(backend)
    backend.close()


def _write(ts: TelescopeState, start: int, count: int) -> None:
    for i in range(start, start + count):
        ts.add("sensor", float(i), ts=100.0 + i)
        ts.set_indexed("indexed", i, {"value": i})
        if i % 10 == 0:
            ts.add(f"attr{i}", [i, "x"], immutable=True)


def _replayed(path, seq: int):
    return record_contents(replay(path, until_seq=seq).backend.records())


def test_snapshot_at_seq_equals_the_log_replayed(store, tmp_path):
    _write(store, 0, 50)
    sink = SnapshotSink(store.backend, tmp_path / "rdb", interval=3600, keep=10)
    first = sink.write()
    _write(store, 50, 50)
    store.delete("attr10")
    second = sink.write()
    assert first is not None and second is not None
    assert (first.seq, second.seq) == (105, store.backend.last_seq)
    chain = store.backend.chain_at(first.seq).hex()
    assert first.path.name == f"telstate-{store.backend.uuid}-{first.seq:016d}-{chain[:16]}.rdb"
    for snapshot in (first, second):
        assert snapshot.read_aux()[AUX_SEQ] == str(snapshot.seq).encode()
        assert snapshot.read_aux()[AUX_STORE] == str(store.backend.uuid).encode()
        assert snapshot.read_aux()[AUX_CHAIN] == store.backend.chain_at(snapshot.seq).hex().encode()
        contents = record_contents(read_records(snapshot.path))
        assert differences(_replayed(store.backend.path, snapshot.seq), contents) == []
    assert sink.write() is None  # nothing new
    assert not [name for name in os.listdir(tmp_path / "rdb") if name.endswith(".tmp")]


def test_snapshot_loads_into_redis_server_and_katsdptelstate(store, tmp_path):
    katsdptelstate = importlib.import_module("katsdptelstate")
    _write(store, 0, 30)
    snapshot = SnapshotSink(store.backend, tmp_path / "rdb", interval=3600, keep=1).write()
    assert snapshot is not None
    expected = _replayed(store.backend.path, snapshot.seq)
    with RedisServer(directory=snapshot.path.parent, dbfilename=snapshot.path.name) as server:
        assert differences(expected, mirror_contents(server.client())) == []
    theirs = katsdptelstate.TelescopeState()
    theirs.load_from_file(snapshot.path)
    assert sorted(theirs.keys()) == sorted(store.keys())
    assert theirs.get_range("sensor", st=0) == store.get_range("sensor", st=0)
    assert theirs.get_indexed("indexed", 7) == {"value": 7}
    assert theirs["attr20"] == [20, "x"]


def test_old_snapshots_are_pruned_and_others_stores_kept(store, tmp_path):
    rdb = tmp_path / "rdb"
    rdb.mkdir()
    foreign = rdb / "telstate-00000000-0000-0000-0000-000000000000-0000000000000001.rdb"
    foreign.write_bytes(b"not ours")
    sink = SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    seqs = []
    for i in range(4):
        _write(store, i * 5, 5)
        seqs.append(sink.write().seq)
    assert [s.seq for s in list_snapshots(rdb, str(store.backend.uuid))] == seqs[-2:]
    assert foreign.exists()


def test_failed_snapshot_leaves_no_file(store, tmp_path, monkeypatch):
    _write(store, 0, 5)
    sink = SnapshotSink(store.backend, tmp_path / "rdb", interval=3600, keep=2)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("telstate.rdb_writer.RDBWriter.write_record", fail)
    with pytest.raises(OSError):
        sink.write()
    assert os.listdir(tmp_path / "rdb") == [f".telstate-{store.backend.uuid}.lock"]
    monkeypatch.undo()
    assert sink.write() is not None


def test_stale_temporary_files_are_removed(store, tmp_path):
    rdb = tmp_path / "rdb"
    rdb.mkdir()
    uuid = store.backend.uuid
    stale = rdb / f".telstate-{uuid}-{1:016d}.rdb.999999999.0123abcd.tmp"
    stale.write_bytes(b"half")
    # A writer holds the lock on its temporary file: it is not stale.
    live = rdb / f".telstate-{uuid}-{2:016d}.rdb.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"half")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    assert not stale.exists() and live.exists()


def test_daemon_writes_snapshots_periodically(store, tmp_path):
    sink = SnapshotSink(store.backend, tmp_path / "rdb", interval=0.2, keep=2)
    daemon = Daemon(store.backend, None, sink)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        for i in range(4):
            _write(store, i * 5, 5)
            time.sleep(0.3)
    finally:
        daemon.stop.set()
        runner.join(10)
    snapshots = list_snapshots(tmp_path / "rdb")
    assert len(snapshots) == 2
    assert snapshots[-1].seq == store.backend.last_seq


def test_snapshot_after_clear_is_an_empty_file(store, tmp_path):
    """A cleared store is a state too: its snapshot exists, loads, and holds no keys."""
    sink = SnapshotSink(store.backend, tmp_path / "rdb", interval=3600, keep=2)
    store.add("k", 1, immutable=True)
    store.backend.clear()
    written = sink.write()
    assert written is not None and written.seq == store.backend.last_seq
    assert [s.seq for s in list_snapshots(tmp_path / "rdb")] == [written.seq]
    assert TelescopeState().load_from_file(written.path) == 0
    assert sink.write() is None  # nothing new since


def test_snapshots_fall_due_by_the_monotonic_clock(store, tmp_path, monkeypatch):
    """A wall clock stepped forward or back neither fires snapshots early nor holds them up."""
    _write(store, 0, 5)
    sink = SnapshotSink(store.backend, tmp_path / "rdb", interval=100.0, keep=2)
    assert sink.until_due() == 0.0
    written = sink.write()
    assert written is not None
    wall = time.time()
    for step in (-1e6, 1e6):
        monkeypatch.setattr(time, "time", lambda step=step: wall + step)
        assert 99.0 < sink.until_due() <= 100.0
    monkeypatch.undo()
    # A snapshot file dated in the future (the clock was stepped back since)
    # delays the next one by at most the interval.
    os.utime(written.path, (wall + 1e6, wall + 1e6))
    sink.close()
    again = SnapshotSink(store.backend, tmp_path / "rdb", interval=100.0, keep=2)
    assert 99.0 < again.until_due() <= 100.0
    again.close()
    os.utime(written.path, (wall - 1e6, wall - 1e6))
    assert SnapshotSink(store.backend, tmp_path / "rdb", interval=100.0, keep=2).until_due() == 0


def test_a_lagging_copy_of_the_store_cannot_share_the_snapshot_directory(store, tmp_path):
    """A follower or backup of the store (its UUID) with a daemon of its own on the same directory.

    Its log ends before the primary's newest snapshot, which it would take
    for another history and move aside at each of its own snapshots (and
    ``diverged/`` would grow for ever). One sink per store and directory:
    the second is refused, in this process or another, and the primary's
    snapshots stay.
    """
    _write(store, 0, 5)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "store", copy)
    _write(store, 5, 5)
    rdb = tmp_path / "rdb"
    primary = SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    newest = primary.write()
    assert newest is not None
    with LmdbBackend(copy, readonly=True) as lagging:
        assert lagging.uuid == store.backend.uuid and lagging.last_seq < newest.seq
        with pytest.raises(SnapshotDirectoryBusy, match=f"pid {os.getpid()}"):
            SnapshotSink(lagging, rdb, interval=3600, keep=2)
    daemon = subprocess.run(
        [sys.executable, "-m", "replicator", "run", "--log", str(copy), "--rdb-dir", str(rdb)]
        + ["--once"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert daemon.returncode == 2
    assert f"another replicator (pid {os.getpid()}) writes the snapshots" in daemon.stderr
    assert list_snapshots(rdb) == [newest] and not (rdb / DIVERGED).exists()
    # Once the primary's sink is gone, another may write there.
    primary.close()
    again = SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    assert again.latest == newest
    again.close()


def test_a_sink_lets_go_of_the_directory_however_it_ends(store, tmp_path, monkeypatch):
    """Closed (once or twice), left by its ``with``, collected unclosed, or failing to start."""
    import gc

    rdb = tmp_path / "rdb"
    sink = SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    sink.close()
    sink.close()
    with SnapshotSink(store.backend, rdb, interval=3600, keep=2) as sink:
        with pytest.raises(SnapshotDirectoryBusy):
            SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    SnapshotSink(store.backend, rdb, interval=3600, keep=2)  # dropped unclosed
    gc.collect()

    def fail(*args, **kwargs):
        raise OSError("the directory cannot be read")

    monkeypatch.setattr("replicator.snapshot_sink.list_snapshots", fail)
    with pytest.raises(OSError, match="cannot be read"):
        SnapshotSink(store.backend, rdb, interval=3600, keep=2)
    monkeypatch.undo()
    SnapshotSink(store.backend, rdb, interval=3600, keep=2).close()


def test_a_lock_file_made_by_another_user_is_locked_read_only(store, tmp_path, monkeypatch):
    """The lock file stays, with its first maker's mode: another user can still lock it."""
    rdb = tmp_path / "rdb"
    SnapshotSink(store.backend, rdb, interval=3600, keep=2).close()
    real_open = os.open

    def open_as_another_user(path, flags, *args):
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_another_user)
    with SnapshotSink(store.backend, rdb, interval=3600, keep=2) as sink:
        _write(store, 0, 5)
        assert sink.write() is not None
        with pytest.raises(SnapshotDirectoryBusy, match="another replicator"):
            SnapshotSink(store.backend, rdb, interval=3600, keep=2)
