"""The watch that wakes waiters on commits of other processes (telstate.lmdb.watch).

Each test sets a long poll interval, so that only the watch can wake a
waiter in time; the time limits are a third of it (no tight timing).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading
import time
import traceback

import pytest

from telstate.lmdb import LmdbBackend, watch
from tests.test_lmdb_processes import spawn, wait_ready

POLL = 30.0
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


@pytest.fixture(autouse=True)
def long_poll(monkeypatch):
    monkeypatch.setattr("telstate.lmdb.settings.POLL_INTERVAL", POLL)


def inotify_fds() -> int:
    """The number of inotify instances this process has open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify"
        except FileNotFoundError:
            pass  # the directory's own fd
    return count


def reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "telstate-inotify"]


def heartbeat_of(path: str) -> float:
    with open(os.path.join(path, "notify"), "rb") as notify:
        return struct.unpack("d", os.pread(notify.fileno(), 8, 0))[0]


# A writer that commits once a waiter has announced itself in the notify
# file (so that its commit writes to the file: the watch, not the poll, must
# wake the waiter), and again after each line on stdin.
ANNOUNCED_WRITER = """
    import os, struct, sys, time
    from telstate.lmdb import LmdbBackend
    path, rounds = sys.argv[1], int(sys.argv[2])
    backend = LmdbBackend(path, durability="none")
    print("ready", flush=True)
    for i in range(rounds):
        deadline = time.time() + 10
        with open(os.path.join(path, "notify"), "rb") as notify:
            while struct.unpack("d", os.pread(notify.fileno(), 8, 0))[0] < time.time():
                if time.time() > deadline:
                    sys.exit("no waiter announced itself")
                time.sleep(0.01)
        backend.add_mutable(b"k", b"%d" % i, float(i))
        print(time.time(), flush=True)
        sys.stdin.readline()
    backend.close()
"""


def wait_in_thread(backend: LmdbBackend, after_seq: int) -> tuple[threading.Thread, list]:
    """Run ``backend.wait_for_commit(after_seq)`` in a thread; the list gets (seq, time)."""
    result: list = []

    def run() -> None:
        result.append((backend.wait_for_commit(after_seq, timeout=2 * POLL), time.time()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_commit_in_another_process_wakes_a_waiter_through_one_inotify_thread(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    rounds = 3
    writer = spawn(ANNOUNCED_WRITER, path, rounds, stdin=True)
    wait_ready(writer)
    for seq in range(rounds):
        assert backend.wait_for_commit(seq, timeout=2 * POLL) == seq + 1
        woke = time.time()
        assert woke - float(writer.stdout.readline()) < POLL / 3
        writer.stdin.write("\n")
        writer.stdin.flush()
    assert writer.wait() == 0
    assert len(reader_threads()) == 1
    assert inotify_fds() == 1
    assert "watchdog" not in sys.modules
    backend.close()


DATA_WRITER = """
    import sys
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability="none")
    if sys.argv[3] == "gate":
        print("ready", flush=True)
        sys.stdin.readline()
    for i in range(int(sys.argv[2])):
        backend.add_mutable(b"k%d" % (i % 7), b"x" * 3000, float(i))
    backend.close()
"""


def voluntary_switches(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_data_writes_of_another_process_do_not_wake_the_reader(tmp_path, monkeypatch):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    store = backend._get_store()
    # Watch without announcing a wait: commits then write data pages only.
    store.add_waiter()
    store.remove_waiter()
    assert heartbeat_of(path) == 0.0
    wakes = []
    woken = threading.Event()

    def counting_wake() -> None:
        wakes.append(time.monotonic())
        woken.set()

    def mark() -> None:
        """Write to the notify file, queued after anything done before, and see it."""
        woken.clear()
        with open(os.path.join(path, "notify"), "r+b") as notify:
            os.pwrite(notify.fileno(), b"\x00", 8)
        assert woken.wait(POLL / 3)

    monkeypatch.setattr(store, "wake", counting_wake)
    (reader,) = reader_threads()
    writer = spawn(DATA_WRITER, path, 300, "gate", stdin=True)
    wait_ready(writer)  # its opening allocated the notify file: one more event
    mark()
    wakes.clear()
    switches = voluntary_switches(reader)
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.wait() == 0
    assert backend.last_seq == 300
    mark()
    assert len(wakes) == 1
    # The thread woke for the notify write alone, not for 300 commits' pages
    # (a margin for wake-ups to take the GIL).
    assert voluntary_switches(reader) - switches < 20
    backend.close()


def woken_by_a_new_writer(path: str, thread: threading.Thread, result: list) -> float:
    """Seconds from a commit of a new writer process (once a waiter announced itself) to the wake.

    `thread` and `result` are the waiter's, from :func:`wait_in_thread` (waiting after seq 0).
    """
    writer = spawn(ANNOUNCED_WRITER, path, 1, stdin=True)
    wait_ready(writer)
    committed = float(writer.stdout.readline())
    thread.join(POLL / 3)
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.wait() == 0
    [(seq, woke)] = result
    assert seq == 1
    return woke - committed


def test_a_notify_file_made_after_the_watch_started_is_watched(tmp_path):
    path = str(tmp_path / "store")
    LmdbBackend(path, durability="none").close()
    os.unlink(os.path.join(path, "notify"))
    reader = LmdbBackend(path, readonly=True)
    store = reader._get_store()
    assert store.notify is None
    thread, result = wait_in_thread(reader, 0)
    # The writer makes the notify file; the waiter must map it to announce itself.
    assert woken_by_a_new_writer(path, thread, result) < POLL / 3
    assert store.notify is not None
    assert store.watch not in watch._INOTIFY.directories
    reader.close()


def test_a_deleted_and_remade_notify_file_is_followed(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    store = backend._get_store()
    old_watch = store.watch
    assert backend.wait_for_commit(0, timeout=0) == 0  # watching the file
    os.unlink(os.path.join(path, "notify"))
    # The deletion moves the watch to the directory (wake-ups: the waiter loop).
    deadline = time.monotonic() + POLL / 3
    while store.watch not in watch._INOTIFY.directories:
        assert time.monotonic() < deadline, "the deletion was not seen"
        time.sleep(0.01)
    assert store.watch != old_watch
    # An empty file first (as a process making it has not sized it yet): the
    # waiter cannot map it until the writer below does.
    os.close(os.open(os.path.join(path, "notify"), os.O_WRONLY | os.O_CREAT, 0o644))
    while store.watch in watch._INOTIFY.directories:
        assert time.monotonic() < deadline, "the new file was not seen"
        time.sleep(0.01)
    thread, result = wait_in_thread(backend, 0)
    # A new process makes the file anew and commits once the waiter announces itself there.
    assert woken_by_a_new_writer(path, thread, result) < POLL / 3
    assert inotify_fds() == 1
    backend.close()


def test_a_forked_child_waits_with_its_own_reader(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    store = backend._get_store()
    store.add_waiter()  # the parent's reader and watch, without announcing a wait
    store.remove_waiter()
    parent_reader = watch._INOTIFY
    assert parent_reader is not None
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(ready_read)
            assert watch._INOTIFY is None and inotify_fds() == 0
            child_store = backend._get_store()
            thread, result = wait_in_thread(backend, 0)
            deadline = time.monotonic() + POLL / 3
            while heartbeat_of(path) < time.time():
                assert time.monotonic() < deadline, "the wait did not announce itself"
                time.sleep(0.01)
            os.write(ready_write, b"r")
            thread.join(POLL / 3)
            [(seq, _)] = result
            assert seq == 1
            assert watch._INOTIFY is not parent_reader and inotify_fds() == 1
            assert child_store.watch
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"r"
    os.close(ready_read)
    started = time.monotonic()
    backend.add_mutable(b"k", b"v", 1.0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert time.monotonic() - started < POLL / 3
    backend.close()


def test_opening_and_closing_many_stores_keeps_one_reader_and_one_fd(tmp_path):
    paths = [str(tmp_path / f"store{i}") for i in range(3)]
    for i in range(1000):
        backend = LmdbBackend(paths[i % 3], durability="none")
        assert backend.wait_for_commit(0, timeout=0) == 0
        assert backend._get_store().watch
        backend.close()
    assert len(reader_threads()) == 1
    assert inotify_fds() == 1
    assert watch._INOTIFY is not None
    assert watch._INOTIFY.stores == {} and watch._INOTIFY.directories == set()


def test_closing_a_store_removes_its_watch(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    assert backend.wait_for_commit(0, timeout=0) == 0
    wd = backend._get_store().watch
    assert watch._INOTIFY.stores[wd] is backend._get_store()
    backend.close()
    assert wd not in watch._INOTIFY.stores


def _no_watches(self, path, mask):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _no_instances(self):
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


@pytest.mark.parametrize("failure", ["add_watch", "__init__"])
def test_without_watches_waiters_poll(tmp_path, monkeypatch, failure):
    monkeypatch.setattr("telstate.lmdb.settings.POLL_INTERVAL", 0.05)
    if failure == "add_watch":
        monkeypatch.setattr(watch._Inotify, "add_watch", _no_watches)
    else:
        monkeypatch.setattr(watch, "_INOTIFY", None)
        monkeypatch.setattr(watch._Inotify, "__init__", _no_instances)
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    thread, result = wait_in_thread(backend, 0)
    writer = spawn(DATA_WRITER, path, 1, "-")
    assert writer.wait() == 0
    thread.join(POLL)
    [(seq, _)] = result
    assert seq == 1
    assert backend._get_store().watch is False
    backend.close()


def test_no_thread_for_the_reader_means_polling_and_no_leaked_fd(tmp_path, monkeypatch):
    # Found by review: a reader thread that cannot start leaked its inotify fd.
    monkeypatch.setattr("telstate.lmdb.settings.POLL_INTERVAL", 0.05)
    monkeypatch.setattr(watch, "_INOTIFY", None)
    before = inotify_fds()

    start = threading.Thread.start

    def no_reader_thread(self):
        if self.name == "telstate-inotify":
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_reader_thread)
    backend = LmdbBackend(str(tmp_path / "store"), durability="none")
    assert backend.wait_for_commit(0, timeout=0.2) == 0
    assert backend._get_store().watch is False
    assert inotify_fds() == before
    backend.close()


def test_the_watchdog_fallback_wakes_waiters(tmp_path, monkeypatch):
    monkeypatch.setattr(watch, "_USE_INOTIFY", False)
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    writer = spawn(ANNOUNCED_WRITER, path, 1, stdin=True)
    wait_ready(writer)
    assert backend.wait_for_commit(0, timeout=2 * POLL) == 1
    woke = time.time()
    assert woke - float(writer.stdout.readline()) < POLL / 3
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.wait() == 0
    assert watch._OBSERVER is not None
    backend.close()
    assert not watch._OBSERVER._watches  # unscheduled at close


def test_lost_events_make_every_watch_checked_again(tmp_path, monkeypatch):
    # Found by review: on a queue overflow the waiters were woken but the
    # watches not checked, so a notify file replaced among the lost events
    # left its store's watch on the old inode (polling still woke it, late).
    first = LmdbBackend(str(tmp_path / "a"), durability="none")
    second = LmdbBackend(str(tmp_path / "b"), durability="none")
    for backend in (first, second):
        assert backend.wait_for_commit(0, timeout=0) == 0  # watching the file
    stores = {first._get_store(), second._get_store()}
    assert all(store.watch for store in stores)
    inotify = watch._INOTIFY
    assert inotify is not None
    checked, woken = [], []
    monkeypatch.setattr(inotify, "_rewatch", checked.append)
    for store in stores:
        monkeypatch.setattr(store, "wake", lambda store=store: woken.append(store))
    # What the kernel reads out after an overflow: wd -1, IN_Q_OVERFLOW.
    inotify._dispatch(struct.pack("iIII", -1, watch._IN_Q_OVERFLOW, 0, 0))
    assert set(checked) == stores and len(checked) == 2
    assert set(woken) == stores and len(woken) == 2
    # The real one: a store's watch checked again is the same watch.
    monkeypatch.undo()
    store = first._get_store()
    watched = store.watch
    inotify._rewatch(store)
    assert store.watch == watched and inotify.stores[watched] is store
    first.close()
    second.close()
