"""Follower stores: apply_records, read-only followers, hot backups and promotion.

The follower's model is its primary: after applying the primary's log, a
follower must hold the same log (record for record), the same writers and
the same state, and verify. Crashes and waits run in real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telstate import TelescopeState, cli, log
from telstate.encoding import decode_value, encode_value
from telstate.errors import ChainMismatchError, ReadOnlyError, StoreError
from telstate.lmdb import (
    LmdbBackend,
    apply_records,
    create_follower,
    make_follower,
    promote,
    read_records,
    replay,
    writers_of,
)
from telstate.lmdb.backup import backup
from telstate.lmdb.eventlog import writers_in
from telstate.lmdb.follower import FollowerTxn
from telstate.lmdb.layout import key_record, name_key_of
from telstate.lmdb.samples import add_sample
from telstate.log import Op, Writer
from telstate.utils import KeyType, pack_timestamp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMARY = "primary-host:/data/telstate"

# --- building a primary ---------------------------------------------------------------

LONG_KEY = b"long-" + b"k" * 500
ARRAY = encode_value(np.arange(1024, dtype=np.float64))  # 8 KB
LONG_VALUE = encode_value("v" * 600)

#: One write: (kind, key number, size class, timestamp); see `write_op`.
op_strategy = st.tuples(
    st.sampled_from(["immutable", "mutable", "indexed", "delete", "clear", "bulk"]),
    st.integers(0, 5),
    st.integers(0, 3),
    st.floats(0.0, 1e6, allow_nan=False),
)


def _value(size: int, i: int) -> bytes:
    return [encode_value(float(i)), encode_value(f"s{i}"), LONG_VALUE, ARRAY][size]


def _key(kind: str, number: int) -> bytes:
    return (
        LONG_KEY + kind.encode() + b"%d" % number
        if number == 5
        else b"%s%d" % (kind.encode(), number)
    )


def write_op(backends: list[LmdbBackend], op: tuple, i: int) -> None:
    """Carry out one write of `op_strategy` through one of `backends` (each a writer)."""
    kind, number, size, timestamp = op
    backend = backends[i % len(backends)]
    key = _key(kind, number)
    value = _value(size, i)
    try:
        if kind == "immutable":
            backend.set_immutable(key, value)
        elif kind == "mutable":
            backend.add_mutable(key, value, timestamp)
        elif kind == "indexed":
            sub_key = encode_value("s" * 500 if size == 2 else size)
            backend.set_indexed(key, sub_key, value)
        elif kind == "delete":
            backend.delete(_key(["immutable", "mutable", "indexed"][size % 3], number))
        elif kind == "clear":
            if number == 0:  # rarely: a clear empties everything
                backend.clear()
        else:
            # A bulk import (events many at a time, samples straight into blocks),
            # then a remote writer's write (write_as) in a transaction of its own.
            members = [pack_timestamp(timestamp + n) + _value(size, n) for n in range(20)]
            backend.load_records([(b"bulk%d" % number, KeyType.MUTABLE, members)])
            with backend.write() as wtxn:
                wtxn.write_as(Writer("remote-host", 4000 + number, "remote"))
                wtxn.add_mutable(b"remote", value, timestamp)
    except Exception as error:  # a key of another type: no event, as on any store
        assert type(error).__name__ == "ImmutableKeyError", error


def build_primary(path: str, ops: list[tuple], writers: int = 3) -> LmdbBackend:
    """A primary written by `writers` writers (plus remote ones); the first backend is returned."""
    backends = [LmdbBackend(path, durability="none", writer_name=f"w{n}") for n in range(writers)]
    for i, op in enumerate(ops):
        write_op(backends, op, i)
    for backend in backends[1:]:
        backend.close()
    return backends[0]


def mixed_ops(rng: random.Random, count: int) -> list[tuple]:
    kinds = ["immutable"] * 2 + ["mutable"] * 6 + ["indexed"] * 2 + ["delete", "clear", "bulk"]
    return [
        (rng.choice(kinds), rng.randrange(6), rng.randrange(4), float(rng.randrange(1000)))
        for _ in range(count)
    ]


# --- copying and comparing --------------------------------------------------------------


def all_records(backend: LmdbBackend) -> list[tuple[int, bytes]]:
    records: list[tuple[int, bytes]] = []
    while chunk := read_records(backend, len(records) + 1, 1000):
        records += chunk
    return records


def follow(
    primary: LmdbBackend,
    follower: LmdbBackend,
    rng: random.Random,
    max_chunk: int = 300,
    until: int | None = None,
) -> None:
    """Bring `follower` level with `primary` (or to event `until`), in chunks of random sizes."""
    while True:
        head = follower.last_seq
        limit = rng.randint(1, max_chunk)
        if until is not None:
            if head >= until:
                return
            limit = min(limit, until - head)
        chunk = read_records(primary, head + 1, limit)
        if not chunk:
            return
        records = [record for _, record in chunk]
        ids = {log.record_op_writer(record)[1] for record in records}
        seq, chain = apply_records(follower, head + 1, records, writers_of(primary, ids))
        assert (seq, chain) == (chunk[-1][0], log.record_chain(records[-1])) == follower.head


def state(backend: LmdbBackend) -> list:
    return [
        (key, key_type, list(value) if key_type == KeyType.MUTABLE else value)
        for key, key_type, value in backend.records()
    ]


def assert_same(primary: LmdbBackend, follower: LmdbBackend) -> None:
    assert follower.uuid == primary.uuid
    assert all_records(follower) == all_records(primary)
    assert follower._read(writers_in) == primary._read(writers_in)
    assert state(follower) == state(primary)
    for key in primary.keys(b"*"):
        assert follower.get(key) == primary.get(key)
        if primary.key_type(key) == KeyType.MUTABLE:
            assert follower.get_range(key, 0, np.inf, True, True) == primary.get_range(
                key, 0, np.inf, True, True
            )
    assert list(follower.events()) == list(primary.events())
    assert follower.verify() == []


@pytest.fixture
def primary(tmp_path):
    backend = build_primary(str(tmp_path / "primary"), mixed_ops(random.Random(1), 1500))
    yield backend
    backend.close()


def new_follower(path, primary: LmdbBackend) -> LmdbBackend:
    create_follower(path, primary.uuid, PRIMARY)
    return LmdbBackend(path, durability="none")


# --- apply_records -----------------------------------------------------------------------


def test_follower_of_a_whole_mixed_log_equals_its_primary(tmp_path, primary):
    ops = {event.op for event in primary.events()}
    assert ops == {
        Op.SET_IMMUTABLE,
        Op.ADD_MUTABLE,
        Op.ADD_MUTABLE_MANY,  # from the import
        Op.SET_INDEXED,
        Op.DELETE,
        Op.CLEAR,
    }
    assert len(primary._read(writers_in)) >= 5  # three local writers, remote ones
    with new_follower(tmp_path / "follower", primary) as follower:
        assert (follower.role, follower.primary) == ("follower", PRIMARY)
        assert follower.head == (0, log.genesis(primary.uuid))
        follow(primary, follower, random.Random(2))
        assert_same(primary, follower)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(op_strategy, max_size=60), seed=st.integers(0, 2**32), max_chunk=st.integers(1, 40)
)
def test_follower_equals_primary_for_any_writes_and_chunking(ops, seed, max_chunk):
    with tempfile.TemporaryDirectory() as directory:
        with build_primary(os.path.join(directory, "p"), ops, writers=2) as primary:
            with new_follower(os.path.join(directory, "f"), primary) as follower:
                follow(primary, follower, random.Random(seed), max_chunk)
                assert_same(primary, follower)


def test_an_altered_record_is_refused_and_changes_nothing(tmp_path, primary):
    with new_follower(tmp_path / "follower", primary) as follower:
        records = [record for _, record in read_records(primary, 1, 100)]
        writers = writers_of(primary, {log.record_op_writer(r)[1] for r in records})
        apply_records(follower, 1, records[:40], writers)
        before = (follower.head, all_records(follower), state(follower))
        altered = bytearray(records[45])
        altered[30] ^= 1
        bad = records[40:45] + [bytes(altered)] + records[46:]
        with pytest.raises(ChainMismatchError, match="event 46 "):
            apply_records(follower, 41, bad, writers)
        assert (follower.head, all_records(follower), state(follower)) == before
        # The chain hash of a record altered too: the next record no longer fits.
        forged = log.seal(bytes(altered[: -log.CHAIN_SIZE]), log.record_chain(records[44]))
        with pytest.raises(ChainMismatchError, match="event 47 "):
            apply_records(follower, 41, records[40:45] + [forged] + records[46:], writers)
        assert (follower.head, all_records(follower), state(follower)) == before
        apply_records(follower, 41, records[40:], writers)
        assert follower.head == (100, primary.chain_at(100))


def test_wrong_position_other_store_and_missing_writer_are_refused(tmp_path, primary):
    with new_follower(tmp_path / "follower", primary) as follower:
        records = [record for _, record in read_records(primary, 1, 50)]
        writers = writers_of(primary, {log.record_op_writer(r)[1] for r in records})
        apply_records(follower, 1, records[:10], writers)
        for first_seq in (10, 12, 1):
            with pytest.raises(
                StoreError, match=f"ends at event 10, so its next event is 11, not {first_seq}"
            ):
                apply_records(follower, first_seq, records[first_seq - 1 :], writers)
        with pytest.raises(StoreError, match="writers given lack"):
            apply_records(follower, 11, records[10:], {})
        wrong = {writer_id: ("elsewhere", 1, None) for writer_id in writers}
        with pytest.raises(StoreError, match="their writers differ"):
            apply_records(follower, 11, records[10:], wrong)
        assert follower.last_seq == 10
        # The same writes in another store (another UUID): another chain from event 1 on.
        with build_primary(str(tmp_path / "other"), mixed_ops(random.Random(1), 100)) as other:
            foreign = [record for _, record in read_records(other, 11, 5)]
            with pytest.raises(ChainMismatchError, match="event 11 "):
                apply_records(follower, 11, foreign, writers_of(other, {1, 2, 3}))
            with new_follower(tmp_path / "empty", primary) as empty:
                with pytest.raises(ChainMismatchError, match="event 1 "):
                    apply_records(empty, 1, [r for _, r in read_records(other, 1, 5)], writers)
        assert follower.last_seq == 10
        assert follower.verify() == []


def test_apply_records_needs_a_writable_follower(tmp_path, primary):
    records = [record for _, record in read_records(primary, 1, 5)]
    writers = writers_of(primary, {log.record_op_writer(r)[1] for r in records})
    with pytest.raises(StoreError, match="is a primary, not a follower"):
        apply_records(primary, primary.last_seq + 1, records, writers)
    create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
    with LmdbBackend(tmp_path / "follower", readonly=True) as readonly:
        with pytest.raises(ReadOnlyError, match="opened read-only"):
            apply_records(readonly, 1, records, writers)
    with pytest.raises(StoreError, match="not empty"):
        create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
    with pytest.raises(StoreError, match="not empty"):
        create_follower(primary.path, primary.uuid, PRIMARY)
    with pytest.raises(ValueError):
        create_follower(tmp_path / "unnamed", primary.uuid, "")
    with pytest.raises(StoreError, match="no telstate store"):
        make_follower(tmp_path / "nowhere", PRIMARY)
    assert not os.path.exists(tmp_path / "nowhere")


def test_read_records_is_bounded(primary):
    assert [seq for seq, _ in read_records(primary, 5, 3)] == [5, 6, 7]
    assert read_records(primary, primary.last_seq + 1, 10) == []
    big = read_records(primary, 1, 1_000_000)
    assert 0 < len(big) <= 4096 and sum(len(r) for _, r in big[:-1]) < 1 << 20
    with pytest.raises(ValueError):
        read_records(primary, 1, 0)
    with pytest.raises(StoreError, match="no writer 999"):
        writers_of(primary, [1, 999])


# --- crashes --------------------------------------------------------------------------------

APPLYING_FOLLOWER = """
    import random, sys
    from telstate import log
    from telstate.lmdb import LmdbBackend, apply_records, read_records, writers_of
    primary = LmdbBackend(sys.argv[1], readonly=True)
    follower = LmdbBackend(sys.argv[2], durability=sys.argv[3])
    rng = random.Random(int(sys.argv[4]))
    print("ready", flush=True)
    while True:
        head = follower.last_seq
        chunk = read_records(primary, head + 1, rng.randint(1, 200))
        if not chunk:
            break
        records = [record for _, record in chunk]
        ids = {log.record_op_writer(record)[1] for record in records}
        print(apply_records(follower, head + 1, records, writers_of(primary, ids))[0], flush=True)
    print("done", flush=True)
"""


def spawn(code: str, *args: object) -> subprocess.Popen:
    """Run `code` in a new Python process with `args` as sys.argv[1:]; stdout is a pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
        text=True,
    )


def wait_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline()
    assert line.strip() == "ready", f"child said {line!r}"


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_follower_killed_while_applying_resumes_exactly(tmp_path, durability):
    rng = random.Random(durability)
    with build_primary(str(tmp_path / "primary"), mixed_ops(rng, 6000)) as primary:
        create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
        reached = 0
        for round_ in range(4):
            child = spawn(
                APPLYING_FOLLOWER, primary.path, tmp_path / "follower", durability, round_
            )
            wait_ready(child)
            applied = [child.stdout.readline() for _ in range(rng.randint(1, 8))]
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            assert all(line.strip().isdigit() for line in applied), applied
            confirmed = int(applied[-1])
            with LmdbBackend(tmp_path / "follower", readonly=True) as follower:
                seq, chain = follower.head
                # At a call's boundary: at least what a call confirmed, and of the primary's chain.
                assert seq >= confirmed > reached
                assert chain == primary.chain_at(seq)
                assert follower.verify() == []
                reached = seq
        with LmdbBackend(tmp_path / "follower", durability="none") as follower:
            follow(primary, follower, rng)
            assert_same(primary, follower)


# --- a follower is read-only --------------------------------------------------------------


def test_every_write_to_a_follower_names_its_primary(tmp_path, primary):
    create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
    follower = LmdbBackend(tmp_path / "follower")
    ts = TelescopeState(follower)
    expected = f"is a follower of {PRIMARY}"
    writes = [
        lambda: ts.add("k", 1, immutable=True),
        lambda: ts.add("k", 1.0, ts=1.0),
        lambda: ts.set_indexed("k", "s", 1),
        lambda: ts.delete("k"),
        ts.clear,
        lambda: follower.write().__enter__(),
        lambda: follower.load_records([(b"k", KeyType.IMMUTABLE, encode_value(1))]),
    ]
    for write in writes:
        with pytest.raises(ReadOnlyError, match=expected):
            write()
    rdb = tmp_path / "one.rdb"
    with LmdbBackend(tmp_path / "source") as source:
        TelescopeState(source).add("imported", 1, immutable=True)
        assert cli.main(["export", source.path, str(rdb)], out=io.StringIO()) == 0
    with pytest.raises(ReadOnlyError, match=expected):
        follower.load_from_file(rdb)
    # A pipe too, before a byte of it is read (nothing of it would be left).
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe, open(write_end, "wb") as writer:
        writer.write(rdb.read_bytes()[:10])
        writer.flush()
        with pytest.raises(ReadOnlyError, match=expected):
            follower.load_from_file(pipe)
        assert pipe.read(10) == rdb.read_bytes()[:10]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.main(["import", follower.path, str(rdb)], out=io.StringIO())
    assert status == cli.EXIT_USAGE and expected in stderr.getvalue()
    assert follower.last_seq == 0

    async def aio_write() -> None:
        from telstate.aio import TelescopeState as AioTelescopeState
        from telstate.aio.lmdb import LmdbBackend as AioLmdbBackend

        backend = AioLmdbBackend(tmp_path / "follower")
        try:
            with pytest.raises(ReadOnlyError, match=expected):
                await AioTelescopeState(backend).add("k", 1, immutable=True)
        finally:
            backend.close()

    asyncio.run(aio_write())
    # Reads, waits, the log API and verify work as on any store.
    assert ts.keys() == [] and follower.verify() == [] and list(follower.events()) == []
    follower.close()


WRITER_AWAITING_GO = """
    import sys
    from telstate.errors import ReadOnlyError
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1])
    backend.set_immutable(b"child", b"\\xff\\x03")
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        backend.set_immutable(b"after", b"\\xff\\x04")
    except ReadOnlyError as error:
        print("refused:", error, flush=True)
"""


def test_writers_open_when_their_store_becomes_a_follower_are_refused(tmp_path):
    path = str(tmp_path / "store")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER_AWAITING_GO), path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
        text=True,
    )
    wait_ready(child)
    this_process = LmdbBackend(path, durability="none")
    this_process.set_immutable(b"mine", b"\xff\x02")  # the last commit: this process's
    marker = spawn(
        """
        import sys
        from telstate.lmdb import make_follower
        make_follower(sys.argv[1], sys.argv[2])
        """,
        path,
        PRIMARY,
    )
    assert marker.wait() == 0
    marker.stdout.close()
    child.stdin.write("go\n")
    child.stdin.flush()
    answer = child.stdout.readline()
    assert answer.startswith(f"refused: the telstate store at {this_process.path!r}"), answer
    assert PRIMARY in answer
    assert child.wait() == 0
    with pytest.raises(ReadOnlyError, match=PRIMARY):
        this_process.set_immutable(b"after", b"\xff\x05")
    assert this_process.keys(b"*") == [b"child", b"mine"]
    this_process.close()
    # Made a follower by the process that writes to it.
    with LmdbBackend(tmp_path / "other", durability="none") as backend:
        backend.set_immutable(b"k", b"\xff\x01")
        make_follower(backend.path, PRIMARY)
        with pytest.raises(ReadOnlyError, match=PRIMARY):
            backend.set_immutable(b"k2", b"\xff\x01")
        assert (backend.role, backend.primary, backend.last_seq) == ("follower", PRIMARY, 1)


WAITING_READER = """
    import sys
    from telstate import TelescopeState
    from telstate.lmdb import LmdbBackend
    ts = TelescopeState(LmdbBackend(sys.argv[1], readonly=True))
    print("ready", flush=True)
    ts.wait_key("late", lambda value, timestamp: value == 2.0, timeout=60)
    print(ts["late"], flush=True)
"""


def test_wait_key_on_a_follower_wakes_when_its_primary_events_arrive(tmp_path):
    with LmdbBackend(tmp_path / "primary", durability="none") as primary:
        TelescopeState(primary).add("early", 1, immutable=True)
        with new_follower(tmp_path / "follower", primary) as follower:
            rng = random.Random(0)
            follow(primary, follower, rng)
            reader = spawn(WAITING_READER, follower.path)
            wait_ready(reader)
            # The reader announces its wait in the store's notify file (see Store.heartbeat).
            with open(os.path.join(follower.path, "notify"), "rb") as notify:
                deadline = time.monotonic() + 30
                while struct.unpack("d", os.pread(notify.fileno(), 8, 0))[0] < time.time():
                    assert time.monotonic() < deadline, "the reader never waited"
                    time.sleep(0.01)
            TelescopeState(primary).add("late", 1.0, ts=1.0)
            TelescopeState(primary).add("late", 2.0, ts=2.0)
            follow(primary, follower, rng)
            assert reader.stdout.readline().strip() == "2.0"
            assert reader.wait(timeout=30) == 0


# --- hot backup ---------------------------------------------------------------------------

STEADY_WRITER = """
    import sys
    from telstate.lmdb import LmdbBackend
    backend = LmdbBackend(sys.argv[1], durability="none", writer_name="steady")
    i = 0
    while True:
        backend.add_mutable(b"sensor%d" % (i % 7), b"\\xff" + b"x" * (i % 900), float(i))
        if i % 50 == 0:
            backend.set_indexed(b"index", b"%d" % i, b"\\xff%d" % i)
        i += 1
        if i == 2000:
            print("ready", flush=True)
"""


def test_backup_while_a_writer_writes_is_a_consistent_prefix(tmp_path):
    path = tmp_path / "primary"
    writer = spawn(STEADY_WRITER, path)
    try:
        wait_ready(writer)
        copies = []
        for n in range(3):
            dest = tmp_path / f"copy{n}"
            out = io.StringIO()
            assert cli.main(["--json", "backup", str(path), str(dest)], out=out) == 0
            copies.append((dest, int(json.loads(out.getvalue())["seq"])))
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    with LmdbBackend(path, readonly=True) as primary:
        primary_records = all_records(primary)
        for dest, seq in copies:
            assert sorted(os.listdir(tmp_path)) == sorted(
                ["primary", *[d.name for d, _ in copies]]
            )  # no temporary directory left
            with LmdbBackend(dest, readonly=True) as copy:
                assert copy.uuid == primary.uuid and copy.role == "primary"
                records = all_records(copy)
                assert 2000 <= len(records) == seq < len(primary_records)
                assert records == primary_records[: len(records)]
                assert copy.verify() == []
                assert state(copy) == state_at(primary.path, seq)


def state_at(path, seq: int) -> list:
    memory = replay(path, until_seq=seq).backend
    return [
        (key, key_type, list(value) if key_type == KeyType.MUTABLE else value)
        for key, key_type, value in memory.records()
    ]


def test_an_interrupt_as_a_backup_ends_leaves_the_store_closable(tmp_path):
    """Found by review: a KeyboardInterrupt as the copy's registration was undone left it
    registered: closing the store then raised StoreError (as if a snapshot were open),
    which hid the interrupt, and the store stayed open."""
    script = f"""
import sys
from telstate.lmdb import LmdbBackend, backup
source = {str(tmp_path / "source")!r}
with LmdbBackend(source, durability="none") as backend:
    backend.add_mutable(b"k", b"v", 1.0)

def trace(frame, event, arg):
    if frame.f_code.co_name == "leave" and event == "call":
        sys.settrace(None)
        raise KeyboardInterrupt("as leave starts")
    return None

sys.settrace(trace)
try:
    backup.backup(source, {str(tmp_path / "copy")!r})
except KeyboardInterrupt:
    print("interrupted")
finally:
    sys.settrace(None)
with LmdbBackend(source, durability="none") as backend:
    backend.add_mutable(b"k", b"w", 2.0)
print("usable")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["interrupted", "usable"], result.stderr[-2000:]


def test_backup_refuses_an_existing_destination_and_non_stores(tmp_path, primary):
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")
    for dest, status, message in [
        ("taken", cli.EXIT_USAGE, "exists"),
        ("file", cli.EXIT_USAGE, "exists"),
        ("missing/dest", cli.EXIT_USAGE, "no such directory"),
    ]:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            assert (
                cli.main(["backup", primary.path, str(tmp_path / dest)], out=io.StringIO())
                == status
            )
        assert message in stderr.getvalue()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert (
            cli.main(["backup", str(tmp_path / "taken"), str(tmp_path / "new")]) == cli.EXIT_USAGE
        )
    assert "no telstate store" in stderr.getvalue() and not os.path.exists(tmp_path / "new")
    assert os.listdir(tmp_path / "taken") == []


KILLED_BACKUP = """
    import os, signal, sys
    from telstate.lmdb import backup
    backup._fsync = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # just before the rename
    backup.backup(sys.argv[1], sys.argv[2])
"""


def test_a_killed_backup_leaves_a_directory_that_the_next_backup_removes(tmp_path, primary):
    parent = tmp_path / "backups"
    parent.mkdir()
    child = spawn(KILLED_BACKUP, primary.path, parent / "first")
    assert child.wait() == -signal.SIGKILL
    child.stdout.close()
    (left,) = os.listdir(parent)
    host = socket.gethostname()
    assert left.startswith(f".first.backup-{host}-{child.pid}-"), left
    # Not to be removed: a live process's, another host's, and a look-alike.
    kept = [
        f".x.backup-{host}-{os.getpid()}-abcdefgh",
        f".x.backup-elsewhere-{child.pid}-abcdefgh",
        f".x.backup-{host}-{child.pid}-abc",
    ]
    for name in kept:
        (parent / name).mkdir()
    assert backup(primary.path, parent / "second") == primary.head
    assert sorted(os.listdir(parent)) == sorted([*kept, "second"])


@pytest.mark.parametrize("renameat2", [True, False])
def test_backup_refuses_a_destination_made_during_the_copy(
    tmp_path, primary, monkeypatch, renameat2
):
    from telstate.lmdb import backup as backup_module

    if not renameat2:  # as where the system has no renameat2
        monkeypatch.setattr(backup_module, "_rename_noreplace", lambda old, new: False)
        assert backup(primary.path, tmp_path / "plain") == primary.head
        with LmdbBackend(tmp_path / "plain", readonly=True) as copy:
            assert copy.verify() == []
    dest = tmp_path / "dest"
    fsync = backup_module._fsync

    def racing(path: str) -> None:
        fsync(path)
        if ".backup-" in path and os.path.isdir(path):
            dest.mkdir()  # another process takes DEST as the copy is about to be renamed

    monkeypatch.setattr(backup_module, "_fsync", racing)
    with pytest.raises(FileExistsError, match="exists already"):
        backup(primary.path, dest)
    assert os.listdir(dest) == []
    assert [name for name in os.listdir(tmp_path) if ".backup-" in name] == []
    # What the rename must not do: os.rename replaces an empty directory.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.mdb").write_bytes(b"copy")
    os.rename(tmp_path / "work", dest)
    assert os.listdir(dest) == ["data.mdb"]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.mdb").write_bytes(b"copy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="exists already"):
        backup_module._rename_new(str(tmp_path / "work"), str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []


def test_backup_of_a_big_store_reports_progress(tmp_path, monkeypatch):
    from telstate.lmdb import backup as backup_module

    with LmdbBackend(tmp_path / "primary", durability="none") as primary:
        members = [pack_timestamp(float(i)) + b"\xff" + b"%d" % i for i in range(300_000)]
        primary.load_records([(b"sensor", KeyType.MUTABLE, members)])
        seen: list[tuple[int, int]] = []
        monkeypatch.setattr(backup_module, "PROGRESS_INTERVAL", 0.001)
        seq, chain = backup_module.backup(
            primary.path, tmp_path / "copy", lambda copied, used: seen.append((copied, used))
        )
        # An import records these samples as a few add_mutable_many events.
        assert (seq, chain) == primary.head == (primary.last_seq, primary.chain_at(seq))
        assert seen and all(0 <= copied <= used for copied, used in seen)
        with LmdbBackend(tmp_path / "copy", readonly=True) as copy:
            assert copy.head == primary.head and copy.verify() == []


# --- promotion ----------------------------------------------------------------------------


def test_backup_follow_promote_end_to_end(tmp_path, primary):
    """A backup mid-stream becomes a follower, catches up, is promoted and written to."""
    writer = LmdbBackend(primary.path, durability="none", writer_name="late")
    assert cli.main(["backup", primary.path, str(tmp_path / "copy")], out=io.StringIO()) == 0
    for i, op in enumerate(mixed_ops(random.Random(5), 300)):
        write_op([writer], op, i)
    writer.close()
    make_follower(tmp_path / "copy", PRIMARY)
    with LmdbBackend(tmp_path / "copy", durability="none") as follower:
        assert follower.role == "follower" and follower.last_seq < primary.last_seq
        follow(primary, follower, random.Random(6))
        assert_same(primary, follower)
        out = io.StringIO()
        assert cli.main(["info", follower.path], out=out) == 0
        assert f"role       follower of {PRIMARY}\n" in out.getvalue()
        head = follower.last_seq
        out = io.StringIO()
        assert cli.main(["promote", follower.path, "--name", "new-primary"], out=out) == 0
        first, second = out.getvalue().splitlines()
        assert first == f"promoted {follower.path} to primary: promotion event {head + 1}"
        # Its last known position: writes acknowledged after it are lost.
        assert second.startswith(f"the follower held the old primary's events up to seq {head},")
        assert "not in the new history" in second
        assert (follower.role, follower.primary) == ("primary", None)
        (event,) = follower.events(head + 1)
        assert (event.op, event.key, event.sub_key, event.timestamp) == (
            Op.PROMOTE,
            None,
            None,
            None,
        )
        assert event.writer.name == "telstate promote"
        detail = event.decode_value()
        assert detail["previous"] == PRIMARY and detail["primary"] == "new-primary"
        assert detail["path"] == follower.path and detail["time"] == event.time
        # The state is the primary's; the store is writable and sound.
        assert state(follower) == state(primary)
        TelescopeState(follower).add("after_promotion", 1, immutable=True)
        assert follower.last_seq == head + 2 and follower.verify() == []
        assert [e.op for e in follower.history(b"after_promotion")] == [Op.SET_IMMUTABLE]
        assert Op.PROMOTE not in {e.op for e in follower.events(keys=[b"mutable1"])}
        assert state_at(follower.path, head + 1) == state(primary)
        out = io.StringIO()
        assert cli.main(["--json", "log", follower.path, "--from-seq", str(head)], out=out) == 0
        shown = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [event["op"] for event in shown[1:]] == ["promote", "set_immutable"]
        assert shown[1]["key"] is None and shown[1]["value"]["primary"] == "new-primary"
        out = io.StringIO()
        assert cli.main(["log", follower.path, "--from-seq", str(head), "--key", "*"], out=out) == 0
        assert "promote" not in out.getvalue()
        rdb = str(tmp_path / "promoted.rdb")
        assert cli.main(["export", follower.path, rdb], out=io.StringIO()) == 0
        assert cli.main(["verify", follower.path, "--rdb", rdb], out=io.StringIO()) == 0
        replayed = ["replay", follower.path, "--until", str(head + 1), "--rdb", rdb]
        assert cli.main(replayed, out=io.StringIO()) == 0
        assert cli.main(["verify", follower.path], out=io.StringIO()) == 0
        # The old primary goes on writing: from the promotion on, the histories differ.
        TelescopeState(primary).add("old_primary_goes_on", 1, immutable=True)
        TelescopeState(primary).add("old_primary_still", 2.0, ts=2.0)
        assert primary.chain_at(head + 1) != follower.chain_at(head + 1)
        old = [record for _, record in read_records(primary, head + 1, 10)]
        old_writers = writers_of(primary, {log.record_op_writer(r)[1] for r in old})
        rng = random.Random(7)
        create_follower(tmp_path / "second", primary.uuid, "new-primary")
        with LmdbBackend(tmp_path / "second", durability="none") as second:
            follow(follower, second, rng, until=head + 1)  # the promotion included
            with pytest.raises(ChainMismatchError, match=f"event {head + 2} "):
                apply_records(second, head + 2, old[1:], old_writers)
            follow(follower, second, rng)
            assert_same(follower, second)
        with new_follower(tmp_path / "third", primary) as third:
            follow(primary, third, rng, until=head + 1)  # the old primary's event instead
            (_, after_promotion), *_ = read_records(follower, head + 2, 1)
            with pytest.raises(ChainMismatchError, match=f"event {head + 2} "):
                apply_records(
                    third,
                    head + 2,
                    [after_promotion],
                    writers_of(follower, [log.record_op_writer(after_promotion)[1]]),
                )


def test_promoting_a_primary_fails(tmp_path, primary):
    with pytest.raises(StoreError, match="already a primary"):
        promote(primary.path)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.main(["promote", primary.path], out=io.StringIO()) == cli.EXIT_DAMAGED
    assert "already a primary" in stderr.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["promote", str(tmp_path / "nothing")]) == cli.EXIT_USAGE
    assert primary.verify() == [] and Op.PROMOTE not in {e.op for e in primary.events()}


def test_promotion_of_an_empty_follower(tmp_path):
    store = uuid.uuid4()
    create_follower(tmp_path / "follower", store, PRIMARY)
    assert promote(tmp_path / "follower") == 1
    with LmdbBackend(tmp_path / "follower") as promoted:
        assert promoted.uuid == store and promoted.role == "primary"
        (event,) = promoted.events()
        assert event.op == Op.PROMOTE and decode_value(event.value)["previous"] == PRIMARY
        TelescopeState(promoted).add("k", 1.0, ts=1.0)
        assert promoted.verify() == [] and replay(promoted.path)["k"] == 1.0


def _settle(sink) -> None:
    """Step the sink until it is idle and level with its store."""
    for _ in range(200):
        step = sink.step()
        if step.idle:
            return
        if step.wait:
            time.sleep(min(step.wait, 0.05))
    raise AssertionError(f"sink did not settle: {sink.state}")


def test_sinks_move_past_a_promotion(tmp_path, redis_server, redis_client):
    from replicator.cursor import read_cursor
    from replicator.redis_sink import RedisSink, SinkState
    from replicator.snapshot_sink import SnapshotSink
    from replicator.verify import differences, mirror_contents, record_contents
    from telstate.rdb_reader import read_records as read_rdb

    primary = LmdbBackend(tmp_path / "primary", durability="none")
    TelescopeState(primary).add("sensor", 1.0, ts=1.0)
    create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
    with LmdbBackend(tmp_path / "follower", durability="none") as follower:
        follow(primary, follower, random.Random(0))
        sink = RedisSink(follower, redis_server.url + "?db=0", check_interval=0.0)
        try:
            _settle(sink)
            assert sink.state == SinkState.TAIL
            seq = promote(follower.path)
            _settle(sink)  # a batch of the promotion alone: it changes no key
            assert read_cursor(redis_client)[1].seq == seq
            TelescopeState(follower).add("sensor", 2.0, ts=2.0)
            _settle(sink)
            _, cursor = read_cursor(redis_client)
            assert cursor is not None and cursor.seq == follower.last_seq == seq + 1
            assert cursor.chain == follower.chain_at(seq + 1).hex()
            assert sink.state == SinkState.TAIL
            contents = record_contents(follower.records())
            assert differences(contents, mirror_contents(redis_client)) == []
        finally:
            sink.close()
        snapshots = SnapshotSink(follower, tmp_path / "rdb", interval=3600, keep=3)
        written = snapshots.write()
        assert written is not None and written.seq == follower.last_seq
        assert differences(contents, record_contents(read_rdb(written.path))) == []
    primary.close()


def test_backup_progress_goes_to_a_terminal_only(tmp_path, primary):
    import pty

    command = [sys.executable, "-m", "telstate.cli", "backup", primary.path]
    environment = dict(os.environ, PYTHONPATH=REPO)
    controller, terminal = pty.openpty()
    try:
        on_terminal = subprocess.run(
            [*command, str(tmp_path / "seen")],
            stderr=terminal,
            stdout=subprocess.PIPE,
            env=environment,
        )
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything is read
            while chunk := os.read(controller, 4096):
                shown += chunk
    finally:
        os.close(controller)
    assert on_terminal.returncode == 0
    assert b"copying " in shown and b"done" in shown
    quiet = subprocess.run(
        [*command, str(tmp_path / "unseen")], capture_output=True, env=environment, text=True
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith(f"backed up {primary.path} to {tmp_path / 'unseen'}: ")


def test_follower_applies_imports_into_new_and_existing_keys(tmp_path):
    """add_mutable_many events: into a new key, and after an existing key's latest sample."""
    with LmdbBackend(tmp_path / "primary", durability="none") as primary:
        primary.add_mutable(b"old", b"\xffa", 5.0)
        primary.add_mutable(b"old", b"\xffb", 5.0)
        members = [pack_timestamp(float(i)) + b"\xff" + b"%d" % i for i in range(10_000)]
        primary.load_records(
            [(b"old", KeyType.MUTABLE, members), (b"new", KeyType.MUTABLE, members)]
        )
        ops = [event.op for event in primary.events()]
        assert ops.count(Op.ADD_MUTABLE_MANY) >= 4 and Op.ADD_MUTABLE in ops
        follower = new_follower(tmp_path / "follower", primary)
        follow(primary, follower, random.Random(1), max_chunk=3)
        assert_same(primary, follower)
        follower.close()


def test_follower_refuses_an_import_event_its_state_does_not_take(tmp_path):
    """An add_mutable_many event whose samples do not follow the key's latest: the states differ."""
    with LmdbBackend(tmp_path / "primary", durability="none") as primary:
        members = [pack_timestamp(float(i)) + b"\xff" + b"%d" % i for i in range(100)]
        primary.load_records([(b"k", KeyType.MUTABLE, members)])
        follower = new_follower(tmp_path / "follower", primary)
        follow(primary, follower, random.Random(1))
        # The follower's state gains a later sample behind the primary's back.
        with FollowerTxn(follower._writable_store(), None, require_follower=True) as ftxn:
            record = key_record(ftxn.txn, ftxn.tables, name_key_of(b"k"))
            assert record is not None
            args = (record.key_id, record.flags, record.sealed, 1000.0, b"\xffz", 0)
            assert add_sample(ftxn.txn, ftxn.tables, name_key_of(b"k"), *args)
            ftxn.changed = True
        primary.load_records([(b"k", KeyType.MUTABLE, [pack_timestamp(500.0) + b"\xffx"])])
        head = follower.last_seq
        with pytest.raises(StoreError, match="primary's although their chains agree"):
            follow(primary, follower, random.Random(2))
        assert follower.last_seq == head
        follower.close()


@pytest.mark.parametrize("damage", ["long value", "NaN", "negative", "repeated"])
def test_a_chain_valid_add_mutable_many_no_import_writes_is_refused(tmp_path, damage):
    """Its chain continues the follower's, but its samples are damaged: nothing is applied."""
    from tests.test_bulk_events import HOSTILE_SAMPLES

    with LmdbBackend(tmp_path / "primary", durability="none") as primary:
        primary.set_immutable(b"a", encode_value(1))
        ((_, first),) = read_records(primary, 1, 1)
        writer_id = log.record_op_writer(first)[1]
        writers = writers_of(primary, [writer_id])
        with new_follower(tmp_path / "follower", primary) as follower:
            apply_records(follower, 1, [first], writers)
            hostile = log.chained_record(
                log.record_chain(first),
                log.ADD_MUTABLE_MANY,
                writer_id,
                time.time(),
                b"k",
                b"",
                HOSTILE_SAMPLES[damage],
                float("nan"),
            )
            with pytest.raises(StoreError, match="event 2: damaged samples"):
                apply_records(follower, 2, [hostile], writers)
            assert follower.last_seq == 1
            assert follower.keys(b"*") == [b"a"]
            assert follower.verify() == []


# --- making a follower where there is no store ------------------------------------------


def _uninitialised_environment(path) -> None:
    """What a creation killed before its commit leaves: an LMDB environment holding nothing."""
    import lmdb

    os.makedirs(path)
    lmdb.open(str(path)).close()


@pytest.mark.parametrize("left", ["empty directory", "empty environment", "empty data file"])
def test_create_follower_uses_a_directory_that_holds_no_store(tmp_path, primary, left):
    base = tmp_path / "followers"
    base.mkdir()
    path = base / "follower"
    if left == "empty directory":
        os.makedirs(path)  # a mount point, say
    elif left == "empty environment":
        _uninitialised_environment(path)
    else:
        os.makedirs(path)
        (path / "data.mdb").touch()
        (path / "lock.mdb").touch()
    create_follower(path, primary.uuid, PRIMARY)
    with LmdbBackend(path) as follower:
        assert follower.role == "follower" and follower.uuid == primary.uuid
        follow(primary, follower, random.Random(0))
        assert_same(primary, follower)
    assert os.listdir(base) == ["follower"]


@pytest.mark.parametrize("other", ["notes.txt", "subdirectory"])
def test_create_follower_never_touches_a_directory_with_other_files(tmp_path, primary, other):
    path = tmp_path / "follower"
    _uninitialised_environment(path)
    if other == "notes.txt":
        (path / other).write_text("mine")
    else:
        (path / other).mkdir()
    before = sorted(os.listdir(path))
    with pytest.raises(StoreError, match="not empty"):
        create_follower(path, primary.uuid, PRIMARY)
    assert sorted(os.listdir(path)) == before
    with pytest.raises(StoreError, match="LMDB environment but not a telstate store"):
        LmdbBackend(path, readonly=True)


def test_create_follower_renames_a_whole_store_into_place(tmp_path, primary):
    """A new directory appears whole: made beside it, then renamed; a dead creation's
    temporary directory beside it is removed, a live one's and anything else kept."""
    tmp_path = tmp_path / "followers"
    tmp_path.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".follower.follower-{host}-{dead.pid}-0123abcd"
    live = tmp_path / f".other.follower-{host}-{os.getpid()}-0123abcd"
    foreign = tmp_path / f".follower.follower-elsewhere-{dead.pid}-0123abcd"
    for directory in (stale, live, foreign):
        _uninitialised_environment(directory)
    create_follower(tmp_path / "deep" / "follower", primary.uuid, PRIMARY)  # parents made
    create_follower(tmp_path / "follower", primary.uuid, PRIMARY)
    assert sorted(os.listdir(tmp_path)) == sorted(["deep", "follower", live.name, foreign.name])
    assert os.listdir(tmp_path / "deep") == ["follower"]
    mode = os.stat(tmp_path / "follower").st_mode & 0o777
    assert mode == 0o777 & ~_umask(), oct(mode)  # not mkdtemp's private mode
    with LmdbBackend(tmp_path / "follower", readonly=True) as follower:
        assert follower.role == "follower" and follower.last_seq == 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


CREATING_FOLLOWERS = """
    import sys, uuid
    from telstate.lmdb import create_follower
    print("ready", flush=True)
    for i in range(1_000_000):
        create_follower(f"{sys.argv[1]}/f{i}", uuid.UUID(sys.argv[2]), "p")
"""


def test_a_creation_killed_at_any_moment_leaves_a_whole_store_or_nothing(tmp_path, primary):
    """SIGKILL at random moments of back-to-back creations: every path is absent or a whole
    follower, and a follower can be made at the next one."""
    rng = random.Random(5)
    for round_ in range(4):
        base = tmp_path / f"round{round_}"
        base.mkdir()
        child = spawn(CREATING_FOLLOWERS, base, primary.uuid)
        wait_ready(child)
        time.sleep(rng.uniform(0.05, 0.3))  # a random moment, not a synchronisation
        child.kill()
        child.wait()
        made = sorted(name for name in os.listdir(base) if not name.startswith("."))
        for name in made:
            with LmdbBackend(base / name, readonly=True) as follower:
                assert follower.role == "follower" and follower.uuid == primary.uuid
        create_follower(base / f"f{len(made)}", primary.uuid, PRIMARY)
        assert [name for name in os.listdir(base) if name.startswith(".")] == []
        with LmdbBackend(base / f"f{len(made)}") as follower:
            follow(primary, follower, random.Random(0))
            assert_same(primary, follower)
