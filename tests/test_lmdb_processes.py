"""LmdbBackend across processes: crashes, concurrent writers, dead readers, growth, fork, waits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest

from telstate import TelescopeState
from telstate.lmdb import LmdbBackend
from telstate.log import Op

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(code: str, *args: object, stdin: bool = False) -> subprocess.Popen:
    """Run `code` in a new Python process with `args` as sys.argv[1:]; stdout is a pipe."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else None,
        env=env,
        text=True,
    )


def wait_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.strip() == "ready", f"child said {line!r}"


# --- crashes ---------------------------------------------------------------------------

CRASHING_WRITER = """
    import random, sys
    from telstate.lmdb import LmdbBackend
    path, durability, seed, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    backend = LmdbBackend(path, durability=durability, writer_name="crash")
    rng = random.Random(seed)
    print("ready", flush=True)
    for i in range(start, start + 1_000_000):
        choice = rng.random()
        padding = b"p" * rng.choice([0, 0, 0, 700, 5000])
        if choice < 0.6:
            backend.add_mutable(b"m%d" % (i % 4), b"#%d;" % i + padding, float(i))
        elif choice < 0.75:
            backend.set_immutable(b"i#%d;" % i, padding)
        elif choice < 0.9:
            backend.set_indexed(b"x", b"#%d;" % i, padding)
        elif choice < 0.99:
            backend.delete(b"m%d" % (i % 4))
            continue
        else:
            backend.clear()
            continue
        print(i, flush=True)  # this write returned
"""


def marker(event) -> int | None:
    for field in (event.key, event.sub_key, event.value):
        if field and b"#" in field:
            return int(field.split(b"#", 1)[1].split(b";", 1)[0])
    return None


@pytest.mark.parametrize("durability, rounds", [("fsync", 10), ("batch", 5)])
def test_writer_killed_at_random_points(tmp_path, durability, rounds):
    path = str(tmp_path / "store")
    rng = random.Random(durability)
    returned: set[int] = set()
    start = 0
    for round_ in range(rounds):
        writer = spawn(CRASHING_WRITER, path, durability, round_, start)
        wait_ready(writer)
        time.sleep(rng.uniform(0.01, 0.2))
        writer.send_signal(signal.SIGKILL)
        output, _ = writer.communicate()
        returned.update(int(line) for line in output.split() if line.strip())
        start += 1_000_000
        with LmdbBackend(path, durability=durability) as backend:
            assert backend.verify() == []
            logged = {marker(event) for event in backend.events()}
            assert returned <= logged, f"lost returned writes {sorted(returned - logged)[:5]}"
            # The store takes writes again (LMDB recovers a lock the dead writer held).
            backend.add_mutable(b"after", b"crash %d" % round_, float(round_))
    assert len(returned) > rounds  # the kills landed while writes were going on


# --- concurrent writers ----------------------------------------------------------------

CONCURRENT_WRITER = """
    import sys
    from telstate.lmdb import LmdbBackend
    path, me, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    backend = LmdbBackend(path, writer_name="w%d" % me)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        backend.add_mutable(b"shared", b"w%d-%d" % (me, i), float(i))
        old = backend.set_immutable(b"imm%d" % (i % 25), b"w%d" % me)
        print("imm%d %s" % (i % 25, "won" if old is None else old.decode()), flush=True)
        backend.set_indexed(b"idx", b"%d" % (i % 40), b"w%d" % me)
    backend.close()
"""


def test_concurrent_writers_make_a_dense_log_and_detect_conflicts(tmp_path):
    path = str(tmp_path / "store")
    LmdbBackend(path).close()
    processes, count = 4, 400
    writers = [spawn(CONCURRENT_WRITER, path, me, count, stdin=True) for me in range(processes)]
    for writer in writers:
        wait_ready(writer)
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    claims: dict[str, set[str]] = {}
    for me, writer in enumerate(writers):
        output, _ = writer.communicate()
        assert writer.returncode == 0
        for line in output.splitlines():
            key, result = line.split()
            claims.setdefault(key, set()).add(f"w{me}" if result == "won" else result)
    with LmdbBackend(path, readonly=True) as backend:
        events = list(backend.events())
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        adds = [event for event in events if event.op == Op.ADD_MUTABLE]
        assert len(adds) == processes * count
        assert len({event.value for event in adds}) == processes * count
        assert len({event.writer.pid for event in adds}) == processes
        immutables = [event for event in events if event.op == Op.SET_IMMUTABLE]
        assert len(immutables) == 25
        for event in immutables:
            # Every process saw the same single winner for each key.
            assert claims[event.key.decode()] == {event.value.decode()}
            assert event.writer.name == event.value.decode()
        assert sum(event.op == Op.SET_INDEXED for event in events) == 40
        assert backend.verify() == []
        # The writers interleaved rather than ran one after another.
        runs = sum(1 for a, b in zip(adds, adds[1:]) if a.writer != b.writer)
        assert runs > processes


# --- readers, growth -------------------------------------------------------------------

SNAPSHOT_HOLDER = """
    import sys, time
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], readonly=True)
    snap = backend.snapshot().__enter__()
    print("ready", flush=True)
    time.sleep(60)
"""


def churn(backend: LmdbBackend, rounds: int) -> None:
    """Small writes: each copies a few pages and frees the old ones (tens of MB in all)."""
    for i in range(rounds):
        backend.add_mutable(b"churn%d" % (i % 50), b"%d" % i, float(i))


def data_size(path: str) -> int:
    return os.stat(os.path.join(path, "data.mdb")).st_size


def test_reader_killed_holding_a_transaction_does_not_grow_the_store(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    churn(backend, 10)
    holder = spawn(SNAPSHOT_HOLDER, path)
    wait_ready(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in backend._store.env.readers()  # its slot is left behind
    churn(backend, 1500)
    assert data_size(path) < 4 << 20
    assert str(holder.pid) not in backend._store.env.readers()
    assert backend.verify() == []
    backend.close()


def test_a_live_reader_does_pin_pages(tmp_path):
    """The control for the test above: a snapshot that stays open makes the store grow."""
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    holder = spawn(SNAPSHOT_HOLDER, path)
    wait_ready(holder)
    try:
        churn(backend, 1500)
        assert data_size(path) > 4 << 20
    finally:
        holder.kill()
        holder.wait()
        backend.close()


GROWER = """
    import sys
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability="none")
    for i in range(200):
        backend.add_mutable(b"big", b"%d" % i + b"g" * 40_000, float(i))
    print(backend._store.env.info()["map_size"], flush=True)
"""


def test_map_grown_by_another_process_is_followed(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none", map_size=1 << 20)
    backend.add_mutable(b"mine", b"before", 1.0)
    assert backend.get(b"mine") == (b"before", 1.0)
    grower = spawn(GROWER, path)
    output, _ = grower.communicate()
    assert grower.returncode == 0
    grown = int(output)
    assert grown > 8 << 20
    samples = backend.get_range(b"big", 0.0, float("inf"), False, False)
    assert len(samples) == 200
    backend.add_mutable(b"mine", b"after", 2.0)
    assert backend._store.env.info()["map_size"] >= grown
    assert backend.verify() == []
    backend.close()


# --- fork ------------------------------------------------------------------------------


def run_in_fork(child) -> int:
    """Fork, run `child()` in the child and return its exit status (0 if it returned)."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            child()
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_fork_reopens_the_store_in_the_child(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    ts = TelescopeState(backend)
    ts.add("m", "parent", ts=1.0)
    assert ts.get("m") == "parent"

    def child():
        assert ts.get("m") == "parent"
        ts.add("m", "child", ts=2.0)
        assert ts.get("m") == "child"
        assert backend.wait_for_commit(0, timeout=0) == 2

    assert run_in_fork(child) == 0
    ts.add("m", "parent again", ts=3.0)
    assert [v for v, _ in ts.get_range("m", st=0)] == ["parent", "child", "parent again"]
    pids = [event.writer.pid for event in backend.events()]
    assert pids[0] == pids[2] == os.getpid() and pids[1] not in (os.getpid(), None)
    assert backend.verify() == []
    readers = backend._store.env.readers()
    assert str(pids[1]) not in readers and str(os.getpid()) not in readers
    backend.close()


# --- waiting across processes ---------------------------------------------------------

LATE_WRITER = """
    import sys, time
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability="none")
    print("ready", flush=True)
    for i in range(int(sys.argv[2])):
        time.sleep(0.1)
        backend.add_mutable(b"k", b"%d" % i, float(i))
        print(time.time(), flush=True)
"""


def test_wait_key_wakes_on_a_commit_in_another_process(tmp_path):
    path = str(tmp_path / "store")
    ts = TelescopeState(LmdbBackend(path, durability="none"))
    writer = spawn(LATE_WRITER, path, 1)
    wait_ready(writer)
    ts.wait_key("k", timeout=10)
    woke = time.time()
    committed = float(writer.stdout.readline())
    writer.wait()
    assert woke - committed < 0.5
    ts.backend.close()


def test_filesystem_events_wake_waiters_without_polling(tmp_path, monkeypatch):
    monkeypatch.setattr("telstate.lmdb.settings.POLL_INTERVAL", 30.0)  # only watchdog can wake us
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    rounds = 5
    writer = spawn(LATE_WRITER, path, rounds)
    wait_ready(writer)
    delays = []
    for seq in range(rounds):
        assert backend.wait_for_commit(seq, timeout=20) == seq + 1
        woke = time.time()
        delays.append(woke - float(writer.stdout.readline()))
    writer.wait()
    # Polling would take 30 s: every wake within 10 s came from a filesystem
    # event (a wide margin, so that a loaded machine does not fail the test).
    assert max(delays) < 10.0
    backend.close()
