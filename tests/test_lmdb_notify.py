"""The notify file: a commit writes it only if a process other than its own waits.

A process's own waiters are woken directly; writing the file would only
make its own filesystem watch wake them a second time (the replicator's
write intake, whose mirror thread waits on the store it commits to,
paid that on every request). Waiters of other processes, of this
telstate or of an older one (which knows only the heartbeat word), must
still be told, and an older store's 16-byte file must still work.

Tests that need the watch (not the poll) to wake a waiter set a long poll
interval; their time limits are a third of it (no tight timing).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time

import pytest

import telstate.lmdb.environment as environment
from telstate.encoding import encode_value
from telstate.lmdb import LmdbBackend, settings
from tests.test_lmdb_processes import spawn, wait_ready

POLL = 30.0


@pytest.fixture
def backend(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none")
    yield backend
    backend.close()


@pytest.fixture
def notifications(backend, monkeypatch):
    """The offsets of this process's writes to the notify file (a list that grows)."""
    store = backend._get_store()
    written: list[int] = []
    pwrite = os.pwrite

    def spy(fd: int, data: bytes, offset: int) -> int:
        notify = store.notify
        if notify is not None and fd == notify.fd:
            written.append(offset)
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return written


def notify_path(path: str) -> str:
    return os.path.join(path, "notify")


def heartbeat_word(path: str) -> float:
    with open(notify_path(path), "rb") as file:
        return struct.unpack("d", os.pread(file.fileno(), 8, 0))[0]


def live_slot_tokens(path: str) -> set[int]:
    with open(notify_path(path), "rb") as file:
        data = os.pread(file.fileno(), environment._NOTIFY_SIZE, 0)
    now = time.time()
    tokens = set()
    for slot in range(environment._NOTIFY_SLOTS):
        offset = 8 * (environment._NOTIFY_SLOT0 + 2 * slot)
        token, expiry = struct.unpack_from("<qd", data, offset)
        if expiry > now:
            tokens.add(token)
    return tokens


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + POLL / 3
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_a_process_waiting_alone_writes_no_notification(backend, notifications, monkeypatch):
    store = backend._get_store()
    watch_wakes = []
    watch_woke = threading.Event()
    wake = store.wake

    def counting_wake() -> None:
        if threading.current_thread().name == "telstate-inotify":
            watch_wakes.append(time.monotonic())
            watch_woke.set()
        wake()

    monkeypatch.setattr(store, "wake", counting_wake)
    woken = []

    def waiter() -> None:
        seq = 0
        while seq < 3:
            seq = backend.wait_for_commit(seq, timeout=30)
            woken.append(seq)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: store.notify_token in live_slot_tokens(backend.path), "no announcement")
    assert heartbeat_word(backend.path) > time.time()  # announced, for older committers too
    for i in range(3):
        backend.add_mutable(b"s", encode_value(i), float(i))
    thread.join(30)
    assert not thread.is_alive() and woken[-1] == 3
    assert notifications == []
    # Nor did this process's own watch wake: a write queued after the
    # commits is the first event it sees.
    with open(notify_path(backend.path), "r+b") as file:
        os.pwrite(file.fileno(), b"\x00", 8)
    assert watch_woke.wait(POLL / 3)
    assert len(watch_wakes) == 1


# A waiter in another process; with a long poll, only the watch wakes it in time.
WAITER = """
    import sys, time
    from telstate.lmdb import LmdbBackend, settings
    settings.POLL_INTERVAL = float(sys.argv[2])
    backend = LmdbBackend(sys.argv[1], durability="none")
    seq = backend.last_seq
    print("ready", flush=True)
    print(backend.wait_for_commit(seq, timeout=2 * settings.POLL_INTERVAL), time.time(), flush=True)
"""


def test_a_waiter_in_another_process_is_notified(backend, notifications):
    backend.add_mutable(b"s", encode_value(0), 0.0)
    store = backend._get_store()
    store.heartbeat()  # this process waits too: that must not hide the other one
    process = spawn(WAITER, backend.path, POLL)
    try:
        wait_ready(process)
        wait_until(
            lambda: live_slot_tokens(backend.path) - {store.notify_token},
            "the other process never announced itself",
        )
        committed = time.time()
        backend.add_mutable(b"s", encode_value(1), 1.0)
        seq, woke = process.stdout.readline().split()
        assert seq == "2"
        assert float(woke) - committed < POLL / 3
    finally:
        process.kill()
        process.wait()
    assert notifications == [8]


def test_an_older_processs_heartbeat_keeps_the_notifications(backend, notifications):
    store = backend._get_store()
    store.heartbeat()
    # An older telstate waiter announces itself in word 0 only, renewing it
    # when half its time is left.
    older = time.time() + settings.HEARTBEAT * 0.6
    with open(notify_path(backend.path), "r+b") as file:
        os.pwrite(file.fileno(), struct.pack("d", older), 0)
    store.heartbeat()
    assert heartbeat_word(backend.path) == older  # not overwritten while it lasts
    backend.add_mutable(b"s", encode_value(0), 0.0)
    assert notifications == [8]


def test_no_notification_while_nobody_waits(backend, notifications):
    backend.add_mutable(b"s", encode_value(0), 0.0)
    assert notifications == []


# A committer as older telstate is one: it reads no slots, and writes the
# notify file whenever word 0 is live.
OLDER_COMMITTER = """
    import sys, time
    import telstate.lmdb.environment as environment
    from telstate.lmdb import LmdbBackend
    environment._NotifyFile.others_wait = lambda notify, token, now: True
    backend = LmdbBackend(sys.argv[1], durability="none")
    deadline = time.time() + 10
    while backend._get_store().notify.words[0] < time.time():
        assert time.time() < deadline, "no waiter announced itself"
        time.sleep(0.001)
    print(time.time(), flush=True)
    backend.add_mutable(b"s", b"x", 0.0)
    backend.close()
"""


def wait_in_thread(backend: LmdbBackend) -> tuple[threading.Thread, list]:
    """Run ``backend.wait_for_commit(0)`` in a thread; the list gets (seq, time)."""
    result: list = []

    def run() -> None:
        result.append((backend.wait_for_commit(0, timeout=2 * POLL), time.time()))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_an_older_committer_wakes_a_waiter(backend, monkeypatch):
    monkeypatch.setattr(settings, "POLL_INTERVAL", POLL)
    thread, result = wait_in_thread(backend)
    committer = spawn(OLDER_COMMITTER, backend.path)
    committed = float(committer.stdout.readline())
    thread.join(POLL / 3)
    assert committer.wait() == 0
    [(seq, woke)] = result
    assert seq == 1 and woke - committed < POLL / 3


# A committer that waits for a waiter's announcement (in word 0, all an
# older waiter makes) before it commits.
COMMITTER = """
    import struct, sys, time
    from telstate.lmdb import LmdbBackend
    path = sys.argv[1]
    backend = LmdbBackend(path, durability="none")
    deadline = time.time() + 10
    with open(path + "/notify", "rb") as notify:
        while struct.unpack("d", notify.read(8))[0] < time.time():
            assert time.time() < deadline, "no waiter announced itself"
            time.sleep(0.001)
            notify.seek(0)
    print(time.time(), flush=True)
    backend.add_mutable(b"s", b"x", 0.0)
    backend.close()
"""


def test_an_older_stores_notify_file_gets_its_slots(tmp_path):
    path = str(tmp_path / "store")
    LmdbBackend(path).close()
    older = time.time() + 100.0
    with open(notify_path(path), "r+b") as file:
        file.truncate(16)
        os.pwrite(file.fileno(), struct.pack("d", older), 0)
    with LmdbBackend(path) as backend:
        assert os.path.getsize(notify_path(path)) == environment._NOTIFY_SIZE
        assert heartbeat_word(path) == older
        store = backend._get_store()
        store.heartbeat()
        assert store.notify_token in live_slot_tokens(path)


def test_an_older_stores_file_mapped_read_only_works_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "POLL_INTERVAL", POLL)
    path = str(tmp_path / "store")
    LmdbBackend(path).close()
    with open(notify_path(path), "r+b") as file:
        file.truncate(16)
    reader = LmdbBackend(path, readonly=True)
    store = reader._get_store()
    assert store.notify is not None and store.notify.ints is None  # cannot extend it
    thread, result = wait_in_thread(reader)
    # The committer extends the file (the reader keeps its 16 bytes), and
    # writes it for the reader's heartbeat, which no slot explains.
    committer = spawn(COMMITTER, path)
    committed = float(committer.stdout.readline())
    thread.join(POLL / 3)
    assert committer.wait() == 0
    [(seq, woke)] = result
    assert seq == 1 and woke - committed < POLL / 3
    assert os.path.getsize(notify_path(path)) == environment._NOTIFY_SIZE
    # Opened writable too, the process maps the file anew, with its slots.
    with LmdbBackend(path, durability="none") as writer:
        assert writer._get_store() is store and store.notify.ints is not None
        store.heartbeat()
        assert store.notify_token in live_slot_tokens(path)
    reader.close()


def test_a_forked_child_is_another_process(backend):
    store = backend._get_store()
    store.heartbeat()
    parent = store.notify_token
    assert store.notify.slot is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        notify = store.notify
        os._exit(0 if store.notify_token != parent and notify.slot is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def older_heartbeat(notify, now: float) -> None:
    """What an older telstate waiter does on each wake-up."""
    if notify.words[0] < now + settings.HEARTBEAT / 2:
        notify.words[0] = now + settings.HEARTBEAT


def test_a_waiter_alone_explains_word_0_through_its_renewals(backend):
    # Explicit times, a waiter's wake-ups 1/50 of a heartbeat apart (as the
    # poll interval is): the process's own commits never write the file.
    store = backend._get_store()
    notify, token, start = store.notify, store.notify_token, time.time()
    for step in range(500):
        now = start + step * settings.HEARTBEAT / 50
        notify.announce(token, now)
        assert notify.words[0] > now
        assert not notify.others_wait(token, now), step


def test_an_older_waiter_is_not_taken_for_this_processs_own(backend):
    # An older waiter that starts while this process's announcement is
    # fresh finds word 0 live and leaves it: it must be able to write its
    # own there once half its time is left, or this process would never
    # write the file for it (explicit times, as above).
    store = backend._get_store()
    notify, token, start = store.notify, store.notify_token, time.time()
    older_from, older_until = 50, 400
    for step in range(500):
        now = start + step * settings.HEARTBEAT / 50
        notify.announce(token, now)  # this process's waiter wakes first
        if older_from <= step < older_until:
            older_heartbeat(notify, now)
        if older_from + 25 <= step < older_until:
            assert notify.others_wait(token, now), step
        elif step >= older_until + 50:
            assert not notify.others_wait(token, now), step  # gone, and so is its heartbeat


_FORK_DURING_REOPEN = r"""
import os, sys, threading, time
import telstate.lmdb.environment as environment
from telstate.lmdb import LmdbBackend

backend = LmdbBackend(sys.argv[1], durability="none")
store = backend._get_store()
original = environment.Store._open_notify

def slow_open(self, writable):
    time.sleep(1.0)  # widens the window in which the watch thread holds notify_lock
    return original(self, writable)

environment.Store._open_notify = slow_open
store.watch = 1  # as if watched: reopen_notify goes ahead
reopen = threading.Thread(target=store.reopen_notify)
reopen.start()
time.sleep(0.2)
pid = os.fork()
if pid == 0:
    environment.Store._open_notify = original
    store.watch = None
    backend.close()  # takes notify_lock: hung forever if the child inherited it held
    os._exit(0)
_, status = os.waitpid(pid, 0)
reopen.join()
store.watch = None
backend.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_the_watch_replaces_the_notify_file_can_close(tmp_path):
    # Found by review: notify_lock was inherited held by the child.
    result = subprocess.run(
        [sys.executable, "-c", _FORK_DURING_REOPEN, str(tmp_path / "store")],
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
