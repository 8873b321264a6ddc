"""Fixes from the review of the LMDB write path: WriteTxn misuse and
interrupts, fork inside a write block, the read cache and `updates` bounds."""

from __future__ import annotations

import os
import threading

import pytest

from telstate.backend import KeyUpdateBase
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend, settings


@pytest.fixture
def backend(tmp_path):
    b = LmdbBackend(str(tmp_path / "store"), durability="none")
    yield b
    b.close()


def write_in_other_thread(backend: LmdbBackend) -> bool:
    """Whether another thread can take the write lock (a leaked lock makes it wait)."""
    done = threading.Event()

    def write() -> None:
        backend.add_mutable(b"other", b"x", 1.0)
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return done.wait(30)  # a failure detector: the write takes milliseconds


def test_write_txn_outside_its_block_is_store_error(backend):
    wtxn = backend.write()
    with pytest.raises(StoreError, match="with block"):
        wtxn.add_mutable(b"k", b"v", 1.0)
    with wtxn:
        wtxn.add_mutable(b"k", b"v", 1.0)
    with pytest.raises(StoreError, match="with block"):
        wtxn.add_mutable(b"k", b"w", 2.0)
    with pytest.raises(StoreError, match="with block"):
        wtxn.clear()
    with pytest.raises(StoreError, match="entered once"):
        with wtxn:
            pass
    assert backend.get_range(b"k", 0, float("inf"), False, False) == [(b"v", 1.0)]


class _Interrupting(dict):
    """A writer-id dict whose use raises KeyboardInterrupt, as a Ctrl-C would there."""

    def __init__(self, on: str) -> None:
        super().__init__()
        self.on = on

    def get(self, *args):  # type: ignore[override]
        if self.on == "get":
            raise KeyboardInterrupt
        return super().get(*args)

    def __setitem__(self, key, value) -> None:
        if self.on == "set":
            raise KeyboardInterrupt
        super().__setitem__(key, value)


def test_interrupt_entering_a_block_releases_the_write_lock(backend):
    store = backend._get_store()
    store.writer_ids = _Interrupting("get")
    with pytest.raises(KeyboardInterrupt):
        with backend.write():
            pass
    store.writer_ids = {}
    assert write_in_other_thread(backend)


def test_interrupt_after_commit_releases_the_write_lock(backend):
    store = backend._get_store()
    store.writer_ids = _Interrupting("set")  # set right after the commit of a new writer
    with pytest.raises(KeyboardInterrupt):
        backend.add_mutable(b"k", b"v", 1.0)
    store.writer_ids = {}
    assert write_in_other_thread(backend)
    assert backend.get(b"k") == (b"v", 1.0)  # the commit itself happened


def test_fork_inside_a_write_block(backend):
    backend.add_mutable(b"k", b"before", 1.0)
    read, write = os.pipe()
    with backend.write() as wtxn:
        wtxn.add_mutable(b"k", b"parent", 2.0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            outcome = b"committed"
            try:
                wtxn.__exit__(None, None, None)
            except StoreError:
                outcome = b"refused"
            except BaseException:
                outcome = b"other"
            try:  # the store had a transaction live at the fork: unusable here
                backend.get(b"k")
                outcome += b" usable"
            except StoreError as error:
                outcome += b" unusable" if "write block" in str(error) else b" other"
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"refused unusable"
    assert os.waitpid(pid, 0)[1] == 0
    assert backend.get(b"k") == (b"parent", 2.0)
    backend.add_mutable(b"k", b"after", 3.0)
    assert [v for v, _ in backend.get_range(b"k", 0, 10, False, False)] == [
        b"before",
        b"parent",
        b"after",
    ]


class _CheckedLock:
    """A write lock that records, at each release, what the registry still holds."""

    def __init__(self, lock, store) -> None:
        self.lock, self.store, self.seen = lock, store, []

    def acquire(self, *args):
        return self.lock.acquire(*args)

    def release(self) -> None:
        self.seen.append(dict(self.store.txns.live))
        self.lock.release()

    def _is_owned(self) -> bool:
        return self.lock._is_owned()


@pytest.mark.parametrize("outcome", ["commit", "abort", "error"])
def test_a_write_is_unregistered_before_its_write_lock_is_released(backend, outcome):
    # A fork takes the write lock first: a write that ended but was still
    # registered then would make the child give up on the store.
    store = backend._get_store()
    checked = store.write_lock = _CheckedLock(store.write_lock, store)
    try:
        if outcome == "commit":
            backend.add_mutable(b"k", b"v", 1.0)
        elif outcome == "abort":
            backend.add_mutable(b"k", b"v", 1.0)  # the same sample: nothing to commit
        else:
            with pytest.raises(ValueError), backend.write() as wtxn:
                wtxn.add_mutable(b"k", b"w", 2.0)
                raise ValueError
    finally:
        store.write_lock = checked.lock
    assert checked.seen and all(live == {} for live in checked.seen)


def test_forks_are_counted_for_write_blocks(backend):
    from telstate.lmdb import writes

    read, write = os.pipe()
    before = writes._forks
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, b"%d" % writes._forks)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert int(pipe.read()) == before + 1
    assert os.waitpid(pid, 0)[1] == 0
    assert writes._forks == before


def test_read_cache_of_an_older_snapshot_is_never_current(backend):
    backend.add_mutable(b"k", b"v", 1.0)
    store = backend._get_store()
    old = store.cache_for(100)
    new = store.cache_for(101)  # a faster thread read a newer snapshot
    assert old is not None and new is not None and new is not old
    assert store.cache_for(100) is None
    old.put_get(b"k", (b"stale", 1.0), 5)  # the slower thread stores its result late
    assert store.read_cache is new and b"k" not in new.gets


def test_read_cache_bounded_by_bytes(backend, monkeypatch):
    monkeypatch.setattr(settings, "CACHE_MAX_BYTES", 50_000)
    for i in range(200):
        backend.set_immutable(b"k%d" % i, bytes(1000))
    store = backend._get_store()
    for i in range(200):
        assert backend.get(b"k%d" % i) == (bytes(1000), None)
        assert store.read_cache.nbytes <= 50_000
    assert 0 < len(store.read_cache.gets) < 50


def test_updates_bounded_by_bytes(backend, monkeypatch):
    start = backend.last_seq + 1
    for i in range(10):
        backend.add_mutable(b"big", bytes(10_000) + b"%d" % i, float(i))
    end = backend.last_seq
    assert len(backend.updates(start, end, [b"big"])) == 10
    monkeypatch.setattr(settings, "MONITOR_MAX_BYTES", 50_000)
    [(key, update)] = backend.updates(start, end, [b"big"])
    assert key is None and type(update) is KeyUpdateBase
