"""The LMDB environment under threads, processes, fork, full disks and crashes.

Anything that could crash the interpreter (a segfault, SIGBUS) runs in a
subprocess, so that a crash is a failed test, not a lost run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend, settings
from telstate.lmdb.layout import TIMESTAMP
from telstate.utils import KeyType

from .test_lmdb_processes import CRASHING_WRITER, marker, run_in_fork, spawn, wait_ready

# --- the map: no remap under a live reader ---------------------------------------------

SNAPSHOT_READER = """
    import sys, threading
    from telstate.lmdb import LmdbBackend
    path, keys, grown_seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # A small map, as an older telstate (or a smaller map_size) would have: the
    # grower's data soon lies beyond it, and this process must follow.
    backend = LmdbBackend(path, durability="none", map_size=1 << 20)
    for i in range(keys):
        backend.set_immutable(b"k%05d" % i, b"v")
    stop = threading.Event()
    passes = []

    def iterate():
        while not stop.is_set():
            with backend.snapshot() as snap:
                passes.append(sum(1 for _ in snap.records()))

    thread = threading.Thread(target=iterate)
    thread.start()
    print("ready", flush=True)
    while backend.last_seq < grown_seq:
        backend.key_type(b"k00000")
    before = len(passes)
    while len(passes) < before + 3:  # a few full passes over the grown map
        backend.key_type(b"k00000")
    stop.set()
    thread.join()
    assert set(passes) <= {keys, keys + 1} and passes[-1] == keys + 1, passes
    assert backend.verify() == []
    print("ok", len(passes), flush=True)
"""

MAP_GROWER = """
    import sys
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability="none")
    for i in range(int(sys.argv[2])):
        backend.add_mutable(b"big", b"%d" % i + b"g" * 40_000, float(i))
    print(backend.last_seq, flush=True)
"""


def test_snapshot_iterated_while_another_process_grows_the_map(tmp_path):
    path = str(tmp_path / "store")
    keys, adds = 3000, 400
    reader = spawn(SNAPSHOT_READER, path, keys, keys + adds)
    wait_ready(reader)
    grower = spawn(MAP_GROWER, path, adds)
    output, _ = grower.communicate(timeout=120)
    assert grower.returncode == 0 and int(output) == keys + adds
    output, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0, f"the reader died with status {reader.returncode}"
    assert output.startswith("ok")


def test_batch_and_none_do_not_write_through_the_map(tmp_path):
    """LMDB keeps its integrity across a power cut without sync only without WRITEMAP."""
    for durability in ("fsync", "batch", "none"):
        with LmdbBackend(tmp_path / durability, durability=durability) as backend:
            assert not backend._store.env.flags()["writemap"], durability
            backend.add_mutable(b"m", b"v", 1.0)
            # A sparse map: the file holds the data, not the map.
            assert os.stat(tmp_path / durability / "data.mdb").st_size < 1 << 20


def test_a_store_made_with_a_smaller_map_opens_and_grows_past_it(tmp_path):
    path = tmp_path / "store"
    with LmdbBackend(path, map_size=4 << 20) as old:
        old.set_immutable(b"old", b"x" * 1000)
    with LmdbBackend(path) as backend:
        for i in range(300):
            backend.add_mutable(b"big", b"%d" % i + b"y" * 40_000, float(i))
        assert backend.get(b"old") == (b"x" * 1000, None)
        assert backend.verify() == []
    assert os.stat(path / "data.mdb").st_size > 8 << 20


# --- reads in parallel -----------------------------------------------------------------


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store whose verify and full get_range each take a good fraction of a second."""
    path = tmp_path_factory.mktemp("big") / "store"
    # A verify of about 2 s and a full get_range of about 0.2 s (more on a loaded machine).
    with LmdbBackend(path, durability="none") as backend:
        members = [TIMESTAMP.pack(float(i)) + b"%d" % i for i in range(700_000)]
        backend.load_records([(b"sensor", KeyType.MUTABLE, members)])
        backend.set_immutable(b"attr", b"v")
    return path


def _latencies_during(backend: LmdbBackend, long_op, minimum: float) -> list[float]:
    """Latencies of key_type in this thread while another thread repeats `long_op`."""
    stop = threading.Event()
    durations: list[float] = []
    started = threading.Event()

    def repeat():
        while not stop.is_set():
            start = time.perf_counter()
            started.set()
            long_op()
            durations.append(time.perf_counter() - start)

    thread = threading.Thread(target=repeat)
    thread.start()
    started.wait()
    latencies = []
    try:
        for _ in range(40):
            time.sleep(0.005)
            start = time.perf_counter()
            assert backend.key_type(b"attr") is not None
            latencies.append(time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
    assert statistics.median(durations) > minimum, "the long operation was not long"
    return latencies


@pytest.mark.parametrize("operation", ["verify", "get_range"])
def test_a_read_is_not_delayed_by_a_long_read_in_another_thread(big_store, operation):
    with LmdbBackend(big_store, durability="none") as backend:
        if operation == "verify":
            long_op = backend.verify
        else:

            def long_op():
                backend.get_range(b"sensor", 0.0, float("inf"), False, False)

        latencies = _latencies_during(backend, long_op, minimum=0.15)
    # The other thread holds the GIL most of the time, so a read waits for a
    # few of its switch intervals (5 ms), never for the whole operation.
    assert statistics.median(latencies) < 0.05, sorted(latencies)


def test_aio_reads_on_the_event_loop_are_not_delayed_by_verify(big_store):
    import asyncio

    from telstate.aio.lmdb import LmdbBackend as AioLmdbBackend

    async def main():
        backend = AioLmdbBackend(big_store, durability="none")
        sync = backend.to_sync()
        latencies = []
        done = threading.Event()

        def verify_loop():
            while not done.is_set():
                sync.verify()

        thread = threading.Thread(target=verify_loop)
        thread.start()
        try:
            for _ in range(30):
                await asyncio.sleep(0.005)
                start = time.perf_counter()
                await backend.key_type(b"attr")
                latencies.append(time.perf_counter() - start)
        finally:
            done.set()
            thread.join()
            await backend.wait_closed()
        return latencies

    latencies = asyncio.run(main())
    assert statistics.median(latencies) < 0.05, sorted(latencies)


# --- fork ------------------------------------------------------------------------------


def test_fork_does_not_wait_for_a_long_verify_in_another_thread(big_store):
    backend = LmdbBackend(big_store, durability="none")
    results: list[list[str]] = []
    durations: list[float] = []
    started = threading.Event()

    def verify():
        started.set()
        start = time.perf_counter()
        results.append(backend.verify())
        durations.append(time.perf_counter() - start)

    thread = threading.Thread(target=verify)
    thread.start()
    started.wait()
    time.sleep(0.02)  # the verify is under way

    def child_during_the_verify():
        # The inherited environment was being read: left alone, never reopened.
        with pytest.raises(StoreError, match="had a transaction in progress"):
            backend.key_type(b"attr")

    start = time.perf_counter()
    status = run_in_fork(child_during_the_verify)
    forked = time.perf_counter() - start
    thread.join()
    assert status == 0
    assert results == [[]]
    assert durations[0] > 0.15
    assert forked < durations[0] / 2, (forked, durations[0])

    def child():
        assert backend.key_type(b"attr") is not None
        backend.add_mutable(b"child", b"c", 1.0)
        assert backend.get(b"child") == (b"c", 1.0)

    assert run_in_fork(child) == 0
    # The children's exits left this process's reader slots alone.
    assert backend.get(b"child") == (b"c", 1.0)
    assert backend.verify() == []
    backend.close()


def test_a_snapshot_open_at_fork_stays_the_parents(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none")
    backend.add_mutable(b"m", b"v", 1.0)
    with backend.snapshot() as snap:

        def child():
            with pytest.raises(StoreError, match="fork"):
                list(snap.records())
            snap.close()
            with pytest.raises(StoreError, match="had a transaction in progress"):
                backend.get(b"m")

        assert run_in_fork(child) == 0
        assert str(os.getpid()) in backend._store.env.readers()  # its slot is intact
        backend.add_mutable(b"m", b"w", 2.0)
        assert len(list(snap.records())) == 1
    assert backend.get(b"m") == (b"w", 2.0)
    assert backend.verify() == []
    backend.close()


# --- reader slots: readers killed mid-read ---------------------------------------------

# Every process of these tests has a small reader table (the store's lock file
# is sized for it by its first opener) and clears stale slots often.
SMALL_READER_TABLE = """
    from telstate.lmdb import settings
    settings.MAX_READERS = 8
    settings.READER_CHECK_INTERVAL = 0.5
"""

# Keeps the store open, read-only, without reading: only its housekeeping runs,
# and more slowly than a new process starts, which thus finds the table full.
IDLE_READER = (
    SMALL_READER_TABLE
    + """
    import sys
    from telstate.lmdb import LmdbBackend
    settings.READER_CHECK_INTERVAL = 2.0
    backend = LmdbBackend(sys.argv[1], readonly=True)
    print("ready", flush=True)
    sys.stdin.read()
"""
)

# Keeps the store open as a program other than telstate would: it never clears a slot.
FOREIGN_READER = (
    SMALL_READER_TABLE
    + """
    import sys, lmdb
    env = lmdb.open(sys.argv[1], readonly=True, max_readers=settings.MAX_READERS, max_dbs=8)
    print("ready", flush=True)
    sys.stdin.read()
"""
)

# Takes every free reader slot (a snapshot each), then waits to be killed.
SLOT_FILLER = (
    SMALL_READER_TABLE
    + """
    import sys, time
    from telstate.errors import StoreError
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], readonly=True)
    snaps = []
    try:
        while True:
            snaps.append(backend.snapshot().__enter__())
    except StoreError:
        pass
    print("ready", flush=True)
    time.sleep(600)
"""
)

# Opens the store anew (read-only or not) and reads; says "ok" or the error.
LATE_OPENER = (
    SMALL_READER_TABLE
    + """
    import sys
    from telstate.errors import StoreError
    from telstate.lmdb import LmdbBackend
    settings.READERS_FULL_WAIT = float(sys.argv[3])
    try:
        backend = LmdbBackend(sys.argv[1], readonly=sys.argv[2] == "readonly")
        assert backend.get(b"k") == (b"v", None)
        backend.close()
    except StoreError as error:
        print(type(error).__name__, error, flush=True)
    else:
        print("ok", flush=True)
"""
)


@pytest.fixture
def small_reader_table(tmp_path, monkeypatch):
    """A store whose lock file has 8 reader slots (made by this process, then closed)."""
    monkeypatch.setattr(settings, "MAX_READERS", 8)
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="fsync") as backend:
        backend.set_immutable(b"k", b"v")
    return path


def fill_reader_table_with_dead_slots(path: str) -> None:
    filler = spawn(SLOT_FILLER, path)
    try:
        wait_ready(filler)
    finally:
        filler.send_signal(signal.SIGKILL)
        filler.wait()


@contextlib.contextmanager
def holding_open(code: str, path: str) -> Iterator[subprocess.Popen]:
    """A process that keeps the store open until the block ends."""
    holder = spawn(code, path, stdin=True)
    try:
        wait_ready(holder)
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.parametrize("mode", ["readonly", "writable"])
def test_slots_of_killed_readers_are_cleared_by_a_process_that_only_reads(small_reader_table, mode):
    """A store held open by readers alone does not lock new processes out for good."""
    path = small_reader_table
    with holding_open(IDLE_READER, path):
        fill_reader_table_with_dead_slots(path)
        opener = spawn(LATE_OPENER, path, mode, 60)
        output, _ = opener.communicate(timeout=120)
        assert output.strip() == "ok"


def test_more_reads_than_reader_slots_are_a_clear_error(small_reader_table):
    with LmdbBackend(small_reader_table, readonly=True) as backend:
        with contextlib.ExitStack() as snapshots:
            with pytest.raises(StoreError, match="held by a live process"):
                for _ in range(9):
                    snapshots.enter_context(backend.snapshot())
        assert backend.get(b"k") == (b"v", None)


@pytest.mark.parametrize("mode", ["readonly", "writable"])
def test_a_reader_table_nobody_clears_is_a_clear_error_after_a_bounded_wait(
    small_reader_table, mode
):
    path = small_reader_table
    with holding_open(FOREIGN_READER, path):
        fill_reader_table_with_dead_slots(path)
        opener = spawn(LATE_OPENER, path, mode, 1)
        output, _ = opener.communicate(timeout=60)  # never hangs
        assert output.startswith("StoreError "), output
        assert "killed" in output and "max_readers" not in output, output
    # Once every process using the store has exited, LMDB resets the reader table.
    opener = spawn(LATE_OPENER, path, mode, 1)
    output, _ = opener.communicate(timeout=60)
    assert output.strip() == "ok"


# --- creation: full disks, concurrent creators ------------------------------------------


@contextlib.contextmanager
def small_filesystem(directory, size: str):
    """A tmpfs of `size` mounted at `directory` (this machine runs tests as root)."""
    os.makedirs(directory)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], check=True)


def fill(directory) -> None:
    """Take every free block of the filesystem at `directory`."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"f" * 4096)


CREATOR = """
    import sys
    from telstate.errors import StoreError
    from telstate.lmdb import LmdbBackend
    try:
        backend = LmdbBackend(sys.argv[1])
    except StoreError as error:
        print("StoreError", error, flush=True)
    else:
        print("created", flush=True)
"""


def test_creating_a_store_on_a_full_disk_is_an_error_not_a_crash(tmp_path):
    with small_filesystem(str(tmp_path / "fs"), "1M") as directory:
        fill(directory)
        creator = spawn(CREATOR, os.path.join(directory, "store"))
        output, _ = creator.communicate(timeout=60)
        assert creator.returncode == 0, f"the creator died with status {creator.returncode}"
        assert output.startswith("StoreError"), output


WRITER_TO_FULL = """
    import sys
    from telstate.errors import StoreError
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability=sys.argv[2])
    try:
        for i in range(100_000):
            backend.add_mutable(b"m", b"%d" % i + b"x" * 8000, float(i))
    except StoreError as error:
        print("full at", i, error, flush=True)
    print(backend.last_seq, flush=True)
    backend.close()
"""


@pytest.mark.parametrize("durability", ["batch", "fsync"])
def test_a_full_disk_fails_writes_and_the_store_recovers(tmp_path, durability):
    with small_filesystem(str(tmp_path / "fs"), "4M") as directory:
        path = os.path.join(directory, "store")
        writer = spawn(WRITER_TO_FULL, path, durability)
        output, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0, f"the writer died with status {writer.returncode}"
        full_line, last_seq = output.splitlines()
        assert full_line.startswith("full at")
        os.unlink(os.path.join(directory, "store", "notify"))  # room for the next commit
        with LmdbBackend(path, durability=durability) as backend:
            assert backend.last_seq == int(last_seq) > 0
            assert backend.verify() == []
            backend.delete(b"m")
            backend.add_mutable(b"after", b"a", 1.0)
            assert backend.verify() == []


GO_CREATOR = """
    import os, sys
    from telstate.lmdb import LmdbBackend
    print("ready", flush=True)
    sys.stdin.readline()
    backend = LmdbBackend(sys.argv[1])
    backend.add_mutable(b"m", b"%d" % os.getpid(), 1.0)
    print(backend.uuid, flush=True)
    backend.close()
"""


def test_processes_creating_one_store_at_once_all_succeed(tmp_path):
    for round_ in range(6):
        path = str(tmp_path / f"store{round_}")
        creators = [spawn(GO_CREATOR, path, stdin=True) for _ in range(5)]
        for creator in creators:
            wait_ready(creator)
        for creator in creators:
            creator.stdin.write("go\n")
            creator.stdin.flush()
        identities = set()
        for creator in creators:
            output, _ = creator.communicate(timeout=60)
            assert creator.returncode == 0
            identities.add(uuid.UUID(output.strip()))
        with LmdbBackend(path) as backend:
            assert identities == {backend.uuid}
            assert backend.last_seq == 5
            assert backend.verify() == []


# --- crashes ---------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["fsync", "batch"])
def test_several_writers_killed_at_random_points(tmp_path, durability):
    path = str(tmp_path / "store")
    rng = random.Random(durability)
    returned: set[int] = set()
    start = 0
    for round_ in range(4):
        writers = []
        for me in range(3):
            writers.append(spawn(CRASHING_WRITER, path, durability, round_ * 10 + me, start))
            start += 1_000_000
        for writer in writers:
            wait_ready(writer)
        for writer in rng.sample(writers, len(writers)):
            time.sleep(rng.uniform(0.01, 0.15))
            writer.send_signal(signal.SIGKILL)
        for writer in writers:
            output, _ = writer.communicate()
            assert writer.returncode == -signal.SIGKILL
            returned.update(int(line) for line in output.split() if line.strip())
        with LmdbBackend(path, durability=durability) as backend:
            assert backend.verify() == []
            logged = {marker(event) for event in backend.events()}
            assert returned <= logged, f"lost returned writes {sorted(returned - logged)[:5]}"
            backend.add_mutable(b"after", b"crash %d" % round_, float(round_))
    assert len(returned) > 12
