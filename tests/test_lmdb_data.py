"""The LMDB store's data path: write transactions, the sample engine, bounded and safe reads."""

from __future__ import annotations

import bisect
import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from unittest import mock

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telstate.encoding import encode_value
from telstate.errors import ImmutableKeyError, InvalidTimestampError, StoreError
from telstate.lmdb import LmdbBackend
from telstate.lmdb import settings as lmdb_settings
from telstate.lmdb.writes import WriteTxn
from telstate.log import Op
from telstate.utils import KeyType, pack_timestamp

INF = math.inf


@pytest.fixture
def backend(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none", writer_name="test")
    yield backend
    backend.close()


# --- write transactions ------------------------------------------------------------------


def test_several_operations_commit_as_one_transaction(backend):
    before = backend._get_store().last_txnid()
    with backend.write() as wtxn:
        assert isinstance(wtxn, WriteTxn)
        assert wtxn.set_immutable(b"config", b"1") is None
        assert wtxn.set_immutable(b"config", b"2") == b"1"
        assert wtxn.add_mutable(b"sensor", b"a", 1.0)
        assert not wtxn.add_mutable(b"sensor", b"a", 1.0)  # already there
        assert wtxn.add_mutable(b"sensor", b"b", 2.0)
        assert wtxn.set_indexed(b"table", b"x", b"X") is None
        assert wtxn.delete(b"config")
        assert not wtxn.delete(b"config")
    assert backend._get_store().last_txnid() == before + 1
    assert [event.op for event in backend.events()] == [
        Op.SET_IMMUTABLE,
        Op.ADD_MUTABLE,
        Op.ADD_MUTABLE,
        Op.SET_INDEXED,
        Op.DELETE,
    ]
    assert [event.seq for event in backend.events()] == [1, 2, 3, 4, 5]
    assert backend.get(b"sensor") == (b"b", 2.0)
    assert backend.get(b"table") == ({b"x": b"X"}, None)
    assert backend.key_type(b"config") is None
    assert backend.verify() == []
    # The next transaction follows on from this one's events.
    backend.add_mutable(b"sensor", b"c", 3.0)
    assert backend.last_seq == 6


def test_an_exception_in_a_write_block_commits_nothing(backend):
    backend.set_immutable(b"before", b"x")
    with pytest.raises(RuntimeError), backend.write() as wtxn:
        wtxn.set_immutable(b"a", b"1")
        wtxn.add_mutable(b"b", b"2", 1.0)
        raise RuntimeError("give up")
    assert backend.keys(b"*") == [b"before"]
    assert backend.last_seq == 1
    with backend.write() as wtxn:  # the write lock was released
        wtxn.clear()
    assert backend.keys(b"*") == []
    assert backend.verify() == []


def test_a_refused_operation_leaves_the_rest_of_the_block_to_commit(backend):
    backend.set_immutable(b"config", b"1")
    with backend.write() as wtxn:
        wtxn.add_mutable(b"sensor", b"a", 1.0)
        with pytest.raises(ImmutableKeyError):
            wtxn.add_mutable(b"config", b"b", 2.0)
        with pytest.raises(InvalidTimestampError):
            wtxn.add_mutable(b"sensor", b"c", -1.0)
        wtxn.add_mutable(b"sensor", b"d", 3.0)
    assert backend.get_range(b"sensor", 0.0, INF, False, True) == [(b"a", 1.0), (b"d", 3.0)]
    assert backend.get(b"config") == (b"1", None)
    assert backend.last_seq == 3
    assert backend.verify() == []


def test_write_blocks_do_not_nest_in_one_thread(backend):
    """A second write transaction in the thread would wait for LMDB's writer mutex forever."""
    with pytest.raises(StoreError, match="already open in this thread"), backend.write() as wtxn:
        wtxn.set_immutable(b"a", b"1")
        backend.set_immutable(b"b", b"2")
    assert backend.keys(b"*") == []
    backend.set_immutable(b"c", b"3")  # the thread may write again afterwards
    assert backend.keys(b"*") == [b"c"]


def test_a_write_block_without_changes_commits_nothing(backend):
    backend.set_immutable(b"a", b"1")
    before = backend._get_store().last_txnid()
    with backend.write() as wtxn:
        assert wtxn.set_immutable(b"a", b"2") == b"1"
        assert not wtxn.delete(b"missing")
        assert not wtxn.changed
    assert backend._get_store().last_txnid() == before


def test_a_full_map_fails_the_transaction_and_commits_nothing(tmp_path):
    with LmdbBackend(tmp_path / "store", durability="none", map_size=1 << 16) as backend:
        with pytest.raises(StoreError, match="is full"):
            with backend.write() as wtxn:
                for i in range(20000):
                    wtxn.add_mutable(b"sensor", b"value %d" % i, float(i))
        assert backend.last_seq == 0
        backend.add_mutable(b"sensor", b"small", 1.0)
        assert backend.verify() == []


def test_an_out_of_order_append_raises_and_commits_nothing(backend):
    """Fix 7: LMDB refuses an append out of order without raising; the store must."""
    for i in range(3):
        backend.add_mutable(b"sensor", b"x", float(i))
    store = backend._get_store()
    # Make the next transaction believe the log ends at seq 1: it appends seq 2 again.
    store.last_commit = (store.last_txnid(), 1, 0.0, backend.chain_at(1))
    with pytest.raises(StoreError, match="append out of order"):
        backend.set_immutable(b"new", b"value")
    assert backend.key_type(b"new") is None
    assert backend.last_seq == 3
    assert backend.verify() == []


def test_negative_or_nan_timestamps_are_refused_by_the_engine(backend):
    """Fix 3: no timestamp below the no-blocks sentinel reaches the sample engine."""
    lmdb_settings_patch = mock.patch.object(lmdb_settings, "TAIL_MAX", 4)
    with lmdb_settings_patch:
        for i in range(10):
            backend.add_mutable(b"other", b"o", float(i))
        backend.add_mutable(b"sensor", b"s", 5.0)
        for bad in (-1.0, -2.0, -INF, math.nan):
            with pytest.raises(InvalidTimestampError, match="sensor"):
                backend.add_mutable(b"sensor", b"s", bad)
    assert backend.get_range(b"other", 0.0, INF, False, True) == [
        (b"o", float(i)) for i in range(10)
    ]
    assert backend.get_range(b"sensor", 0.0, INF, False, True) == [(b"s", 5.0)]
    assert backend.verify() == []


# --- the sample engine against a sorted list ---------------------------------------------

_STAMPS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 1e9, INF]),
    st.floats(min_value=0.0, max_value=10.0),
)
_VALUES = st.one_of(
    st.sampled_from([b"", b"a", b"b", b"ab"]),
    st.binary(max_size=6),
    # Long values (>= 480 bytes) live in the log; a few share their first 448 bytes.
    st.builds(
        lambda prefix, tail: prefix * 480 + tail,
        st.sampled_from([b"L", b"M"]),
        st.binary(max_size=3),
    ),
)
_QUERY_TIMES = st.one_of(_STAMPS, st.just(-1.0), st.just(-INF))


def _model_range(
    members: list[bytes], start: float, end: float, include_previous: bool, include_end: bool
) -> list[tuple[bytes, float]]:
    """get_range on a sorted list of packed members, as Redis answers it.

    The range is ZRANGEBYLEX between the bounds of ``pack_query_timestamp``;
    the previous sample is ZREVRANGEBYLEX from the inclusive start bound:
    the greatest member not above the packed start, for a positive start.
    """

    def index(time: float, is_end: bool) -> int:
        if time == INF:
            return len(members)
        if time < 0.0 or (time == 0.0 and not (is_end and include_end)):
            return 0
        bound = pack_timestamp(time)
        if is_end and include_end:
            bound = struct.pack(">Q", struct.unpack(">Q", bound)[0] + 1)
        return bisect.bisect_left(members, bound)

    selected = []
    if include_previous and start > 0.0:
        last = len(members) if start == INF else bisect.bisect_right(members, pack_timestamp(start))
        selected += members[last - 1 : last] if last else []
    selected += members[index(start, False) : index(end, True)]
    return [(member[8:], struct.unpack_from(">d", member)[0]) for member in selected]


@settings(max_examples=100, deadline=None)
@given(
    adds=st.lists(st.tuples(_STAMPS, _VALUES), min_size=1, max_size=80),
    queries=st.lists(
        st.tuples(_QUERY_TIMES, _QUERY_TIMES, st.booleans(), st.booleans()), max_size=12
    ),
    tail_max=st.sampled_from([2, 4, 128]),
    block_max=st.sampled_from([2, 5, 512]),
)
def test_sample_engine_matches_a_sorted_list(adds, queries, tail_max, block_max):
    with (
        tempfile.TemporaryDirectory() as directory,
        mock.patch.object(lmdb_settings, "TAIL_MAX", tail_max),
        mock.patch.object(lmdb_settings, "BLOCK_MAX", block_max),
        LmdbBackend(directory, durability="none") as backend,
    ):
        model: list[bytes] = []
        for stamp, value in adds:
            member = pack_timestamp(stamp) + value
            index = bisect.bisect_left(model, member)
            if index == len(model) or model[index] != member:
                model.insert(index, member)
            backend.add_mutable(b"sensor", value, stamp)
            # A neighbour key, so a seek that strays shows up in its samples.
            backend.add_mutable(b"sensos", b"n", 1.0)
        assert backend.get(b"sensor") == (model[-1][8:], struct.unpack_from(">d", model[-1])[0])
        for start, end, include_previous, include_end in queries:
            got = backend.get_range(b"sensor", start, end, include_previous, include_end)
            want = _model_range(model, start, end, include_previous, include_end)
            assert got == want, (start, end, include_previous, include_end)
        for include_previous in (False, True):
            for include_end in (False, True):
                got = backend.get_range(b"sensor", 0.0, INF, include_previous, include_end)
                assert got == _model_range(model, 0.0, INF, include_previous, include_end)
        assert backend.record(b"sensor") == (b"sensor", mock.ANY, model)
        assert backend.get_range(b"sensos", 0.0, INF, False, True) == [(b"n", 1.0)]
        assert backend.verify() == []


def test_adds_at_one_timestamp_are_not_quadratic(backend):
    """Fix 4: 8,000 adds sharing one timestamp cost about what distinct ones do."""

    def timed(key: bytes, stamp_of) -> float:
        begin = time.perf_counter()
        for i in range(8000):
            backend.add_mutable(key, b"%d" % i, stamp_of(i))
        return time.perf_counter() - begin

    distinct = timed(b"distinct", float)
    same = timed(b"same", lambda i: 5.0)
    assert same < 3 * distinct + 0.2, (same, distinct)
    assert len(backend.get_range(b"same", 0.0, INF, False, True)) == 8000
    # A new timestamp then seals the whole run into one block.
    backend.add_mutable(b"same", b"last", 6.0)
    assert backend.get_range(b"same", 5.0, 5.0, False, True)[-1] == (b"999", 5.0)
    assert backend.verify() == []


# --- damage and memory, in subprocesses ---------------------------------------------------

_DAMAGE_CHILD = r"""
import json, os, random, shutil, sys, tempfile
import lmdb
from telstate.encoding import encode_value
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend
from telstate.rdb_writer import RDBWriter

source, seed, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = open(os.path.join(source, "data.mdb"), "rb").read()
# Where the records are: every stored value of every table, found in the file
# (not the table descriptors of LMDB's main database: those are its structure).
env = lmdb.open(source, max_dbs=16, readonly=True, lock=False)
spans = []
with env.begin() as txn:
    for name, _ in txn.cursor():
        db = env.open_db(name, txn=txn, create=False)
        for _, value in txn.cursor(db=db):
            # Only values found in one place: short ones match LMDB's own bytes too.
            start = data.find(value)
            if len(value) >= 8 and start >= 0 and data.find(value, start + 1) < 0:
                spans.append((start, len(value)))
env.close()
rng = random.Random(seed)
leaks = {}
outcomes = {"clean": 0, "StoreError": 0}
for trial in range(trials):
    directory = tempfile.mkdtemp()
    shutil.copy(os.path.join(source, "data.mdb"), directory)
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        start, length = rng.choice(spans)
        damaged[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
    open(os.path.join(directory, "data.mdb"), "wb").write(damaged)
    try:
        with LmdbBackend(directory, readonly=True) as backend:
            for key in backend.keys(b"*"):
                kind = backend.key_type(key)
                backend.get(key)
                backend.record(key)
                list(backend.history(key))
                if kind is not None and kind.name == "MUTABLE":
                    for args in ((0.0, 1e300, True, False), (2.5, 7.0, True, True)):
                        backend.get_range(key, *args)
                if kind is not None and kind.name == "INDEXED":
                    backend.get_indexed(key, b"sub 1")
            list(backend.events())
            dump = os.path.join(directory, "dump.rdb")
            with backend.snapshot() as snap, RDBWriter(dump) as writer:
                for record in snap.records():
                    writer.write_record(*record)
        outcomes["clean"] += 1
    except StoreError:
        outcomes["StoreError"] += 1
    except Exception as error:
        leaks.setdefault(type(error).__name__, []).append(f"trial {trial}: {error!r}"[:200])
    shutil.rmtree(directory)
print(json.dumps({"outcomes": outcomes, "leaks": leaks}))
"""


def _store_of_every_kind(path) -> None:
    with (
        mock.patch.object(lmdb_settings, "TAIL_MAX", 8),
        LmdbBackend(path, durability="fsync", writer_name="damage") as backend,
    ):
        backend.set_immutable(b"immutable", b"value" * 10)
        backend.set_immutable(b"long name " * 60, b"v")
        for i in range(40):
            backend.add_mutable(b"sealed", b"sample %d" % i, float(i % 10))
            backend.add_mutable(b"long values", bytes([i]) * 600, float(i))
            backend.set_indexed(b"indexed", b"sub %d" % i, b"x" * i)
        backend.set_indexed(b"indexed", b"long sub-key " * 50, b"y")
        backend.delete(b"immutable")
        backend.set_immutable(b"immutable", b"again")


def test_a_damaged_store_raises_store_error_from_reads_and_export(tmp_path):
    """Fix 9: bytes flipped in records surface as StoreError (or a clean read), nothing else.

    The bytes are flipped inside stored values: LMDB keeps no checksums
    of its pages, so damage to its own page structure can crash it
    outright, which no reader above it can turn into an error.
    """
    source = tmp_path / "store"
    _store_of_every_kind(source)
    child = subprocess.run(
        [sys.executable, "-c", _DAMAGE_CHILD, str(source), "11", "300"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout)
    assert result["leaks"] == {}
    assert result["outcomes"]["StoreError"] > 10  # the damage was seen, not always missed


# Anonymous memory (RssAnon): the pages of the memory map, which reads touch,
# are file-backed and would hide what the reader itself holds.
_MEMORY_CHILD = r"""
import sys
from telstate.lmdb import LmdbBackend


def anonymous_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])


backend = LmdbBackend(sys.argv[1], readonly=True)
mode = sys.argv[2]
before = peak = anonymous_kib()
if mode == "events":
    for event in backend.events():
        assert len(event.value) == 2 << 20
        peak = max(peak, anonymous_kib())
elif mode == "export":
    from telstate.rdb_writer import RDBWriter

    with backend.snapshot() as snap, RDBWriter(sys.argv[3]) as writer:
        for record in snap.records():
            peak = max(peak, anonymous_kib())
            writer.write_record(*record)
            peak = max(peak, anonymous_kib())
print((peak - before) // 1024)
"""


def _peak_mib(path, mode: str, *args: str) -> int:
    child = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(path), mode, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return int(child.stdout)


def test_reading_big_events_takes_bounded_memory(tmp_path):
    """Fix 6: a chunk of events is bounded in bytes, not only in count."""
    path = tmp_path / "store"
    with (
        LmdbBackend(path, durability="none", map_size=256 << 20) as backend,
        backend.write() as wtxn,
    ):
        for i in range(40):
            wtxn.add_mutable(b"big", bytes([i]) * (2 << 20), float(i))
    assert _peak_mib(path, "events") < 24  # 80 MiB of events, one or two held at a time


@pytest.mark.parametrize(
    ("table", "damage"),
    [
        ("blocks", lambda value: value[:6]),  # cut inside the timestamps
        ("blocks", lambda value: value[:-3]),  # cut inside the values' msgpack
        ("blocks", lambda value: b"\x00\x00\x00\x00"),  # an empty block
        ("keys", lambda value: b"\x09" + value[1:]),  # unknown type code
        ("keys", lambda value: value[:5]),  # cut inside the header
        ("samples", lambda value: b"\x01"),  # a tail member without its timestamp
    ],
)
def test_cli_reports_damaged_records_with_exit_3(tmp_path, table, damage):
    """Fix 9 through the command line: damage is exit 3 and a message, not a traceback."""
    path = tmp_path / "store"
    with (
        mock.patch.object(lmdb_settings, "TAIL_MAX", 4),
        LmdbBackend(path, durability="none") as backend,
    ):
        for i in range(10):
            backend.add_mutable(b"sensor", encode_value(f"value {i}"), float(i))
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(table.encode(), txn=txn, dupsort=table == "samples")
        cursor = txn.cursor(db)
        assert cursor.first()
        key, value = cursor.key(), cursor.value()
        if table == "samples":
            txn.delete(key, db=db)
        txn.put(key, damage(value), db=db)
    env.close()
    for command in (
        ["export", str(path), str(tmp_path / "out.rdb")],
        ["get", str(path), "sensor", "--all"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "telstate.cli", *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 3, result.stderr
        assert "Traceback" not in result.stderr
        assert "damaged" in result.stderr


def _put_meta(path, name: bytes, value: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(name, value, db=env.open_db(b"meta", txn=txn))
    env.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [(b"\x01" * 15, "damaged identity"), (b"", "damaged identity")],
)
def test_a_damaged_identity_is_a_store_error(tmp_path, value, message):
    path = tmp_path / "store"
    LmdbBackend(path, durability="none").close()
    _put_meta(path, b"uuid", value)
    for writable in (True, False):
        with pytest.raises(StoreError, match=message):
            LmdbBackend(path, durability="none", readonly=not writable)


def test_an_unknown_format_is_named_readably(tmp_path):
    path = tmp_path / "store"
    LmdbBackend(path, durability="none").close()
    _put_meta(path, b"format", b"\xff\x00")
    with pytest.raises(StoreError, match=r"log format b'\\xff\\x00'"):
        LmdbBackend(path, durability="none")


def test_a_key_id_counter_behind_the_data_refuses_new_keys(tmp_path):
    """A damaged counter must not hand a new key the id, and so the samples, of another."""
    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"first", encode_value(1), 1.0)
        backend.set_indexed(b"second", encode_value("sub"), encode_value(2))
    _put_meta(path, b"next_key_id", struct.pack(">Q", 1))
    with LmdbBackend(path, durability="none") as backend:
        for write in (
            lambda: backend.add_mutable(b"third", encode_value(3), 1.0),
            lambda: backend.set_indexed(b"third", encode_value("x"), encode_value(3)),
            lambda: backend.set_immutable(b"third", encode_value(3)),
        ):
            with pytest.raises(StoreError, match="key id counter"):
                write()
        # The existing keys are untouched and still writable.
        backend.add_mutable(b"first", encode_value(4), 2.0)
        assert backend.keys(b"*") == [b"first", b"second"]
        assert [value for value, _ in backend.get_range(b"first", 0, math.inf, False, True)] == [
            encode_value(1),
            encode_value(4),
        ]


@pytest.mark.parametrize("value", [b"", b"\x00" * 7, b"\x00" * 9])
def test_a_damaged_key_id_counter_is_a_store_error_on_every_write_path(tmp_path, value):
    from telstate.rdb_writer import RDBWriter

    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"first", encode_value(1), 1.0)
    _put_meta(path, b"next_key_id", value)
    rdb = tmp_path / "more.rdb"
    with RDBWriter(rdb) as writer:
        writer.write_record(b"first", KeyType.MUTABLE, [pack_timestamp(2.0) + encode_value(2)])
    with LmdbBackend(path, durability="none") as backend:
        with pytest.raises(StoreError, match="key id counter"):
            backend.add_mutable(b"new", encode_value(1), 1.0)
        with pytest.raises(StoreError, match="key id counter"):
            backend.load_from_file(str(rdb))
        assert backend.keys(b"*") == [b"first"]


def test_verify_reports_counters_that_would_reuse_ids(tmp_path):
    """Found by review: a counter set back passed verify, and then mixed keys."""
    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"first", encode_value(1), 1.0)
        assert backend.verify() == []
    _put_meta(path, b"next_key_id", struct.pack(">Q", 1))
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"\xff\xff\xff\xff", b"\x93\xa1h\x01\xc0", db=env.open_db(b"writers", txn=txn))
    env.close()
    with LmdbBackend(path, durability="none", readonly=True) as backend:
        problems = backend.verify()
    assert any("key id counter (1)" in problem for problem in problems), problems
    assert any("ffffffff" in problem for problem in problems), problems
    with LmdbBackend(path, durability="none", writer_name="new") as backend:
        with pytest.raises(StoreError, match="writers table is damaged"):
            backend.add_mutable(b"first", encode_value(2), 2.0)


def _damage_last_event(path, key: bytes, values: list[bytes], damage) -> None:
    """A store of `key`'s samples `values`, whose last log entry is replaced by `damage`'s."""
    with LmdbBackend(path, durability="none") as backend:
        for i, value in enumerate(values):
            backend.add_mutable(key, value, float(i))
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"log", txn=txn)
        cursor = txn.cursor(db)
        assert cursor.last()
        seq_key, record = cursor.key(), cursor.value()
        txn.delete(seq_key, db=db)
        txn.put(*damage(seq_key, record), db=db)
    env.close()


@pytest.mark.parametrize(
    "damage",
    [
        lambda key: key + b"\x00",  # not 8 bytes
        lambda key: b"\xff" * 8,  # a seq that cannot be followed
        lambda key: b"\x80" + key[1:],  # the top bit flipped
    ],
)
def test_a_damaged_last_log_key_is_a_store_error(tmp_path, damage):
    """Found by review: struct.error tracebacks from verify, info, export and writes."""
    path = tmp_path / "store"
    _damage_last_event(
        path,
        b"sensor",
        [encode_value(i) for i in range(3)],
        lambda key, value: (damage(key), value),
    )
    with LmdbBackend(path, durability="none") as backend:
        with pytest.raises(StoreError, match="damaged"):
            backend.head  # noqa: B018
        with pytest.raises(StoreError, match="damaged"):
            backend.add_mutable(b"sensor", encode_value(9), 9.0)
    for command in (["verify", str(path)], ["info", str(path)], ["log", str(path)]):
        result = subprocess.run(
            [sys.executable, "-m", "telstate.cli", *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in result.stderr, (command, result.stderr)
        assert result.returncode in (1, 3) if command[0] == "verify" else result.returncode == 3, (
            command,
            result.returncode,
            result.stderr,
        )


def _flip(data: bytes, at: int, bit: int = 0x01) -> bytes:
    return data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :]


def _log_keys(path) -> list[bytes]:
    env = lmdb.open(str(path), max_dbs=16, readonly=True)
    with env.begin() as txn:
        keys = list(txn.cursor(env.open_db(b"log", txn=txn, create=False)).iternext(values=False))
    env.close()
    return keys


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda key, value: (key, _flip(value, 12)), id="a garbled body"),
        pytest.param(lambda key, value: (key, _flip(value, len(value) - 1)), id="a garbled chain"),
        pytest.param(lambda key, value: (key, value[: len(value) // 2]), id="half a record"),
        pytest.param(lambda key, value: (_flip(key, 2), value), id="a seq far ahead"),
        pytest.param(lambda key, value: (_flip(key, 7, 0x04), value), id="a seq a little ahead"),
        pytest.param(lambda key, value: (_flip(key, 7), value), id="over the one before"),
    ],
)
def test_no_write_follows_a_damaged_last_event(tmp_path, damage):
    """Found by review: a write chained its event onto whatever the last record held
    (a garbled chain, or a seq key with a bit flipped: the log went on from there),
    growing a history that can never verify and that followers refuse."""
    path = tmp_path / "store"
    _damage_last_event(path, b"sensor", [encode_value(i) for i in range(3)], damage)
    damaged = _log_keys(path)
    with LmdbBackend(path, durability="none") as backend:
        with pytest.raises(StoreError, match="last event of the log is damaged"):
            backend.add_mutable(b"sensor", encode_value(9), 9.0)
        with pytest.raises(StoreError, match="last event of the log is damaged"):
            backend.set_indexed(b"other", b"sub", encode_value(1))
        # Reads go on: they come from the state tables, not the log.
        assert len(backend.get_range(b"sensor", 0.0, 10.0, False, False)) == 3
    assert _log_keys(path) == damaged  # nothing appended
    with LmdbBackend(path, durability="none", readonly=True) as backend:
        assert backend.verify()  # (it reports the damage)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda key, value: (_flip(key, 2), value), id="a seq far ahead"),
        pytest.param(lambda key, value: (_flip(key, 7, 0x04), value), id="a seq a little ahead"),
        pytest.param(lambda key, value: (key, value[:40]), id="cut into its key"),
    ],
)
def test_no_write_follows_a_long_last_event_damaged_in_its_shape(tmp_path, damage):
    """A record longer than CHECKED_RECORD_MAX (an array sample) is not hashed on
    each write after another process's (milliseconds each): its seq and shape are."""
    from telstate.lmdb.eventlog import CHECKED_RECORD_MAX

    path = tmp_path / "store"
    _damage_last_event(path, b"array", [b"x" * (CHECKED_RECORD_MAX + 1)] * 3, damage)
    with LmdbBackend(path, durability="none") as backend:
        with pytest.raises(StoreError, match="last event of the log is damaged"):
            backend.add_mutable(b"sensor", encode_value(9), 9.0)


_ALTERNATE = r"""
import sys
from telstate.lmdb import LmdbBackend
backend = LmdbBackend(sys.argv[1], durability="none")
for line in sys.stdin:
    kind, size = line.split()
    size = int(size)
    try:
        if kind == "long":
            backend.add_mutable(b"long", b"x" * size, float(size))
        else:
            backend.add_mutable(b"small", sys.argv[2].encode(), float(size))
        print("ok", flush=True)
    except Exception as error:
        print("failed", type(error).__name__, error, flush=True)
"""


def test_writers_in_two_processes_follow_each_others_last_events(tmp_path):
    """Each write after the other process's commit checks the last event (its chain hash
    up to CHECKED_RECORD_MAX bytes, its shape beyond): no sound event is refused, around
    the bound and with the chain before it known to this process or read."""
    from telstate.lmdb.eventlog import CHECKED_RECORD_MAX

    path = str(tmp_path / "store")
    LmdbBackend(path, durability="none").close()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _ALTERNATE, path, str(index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]

    def write(index: int, kind: str, size: int) -> str:
        writers[index].stdin.write(f"{kind} {size}\n")
        writers[index].stdin.flush()
        return writers[index].stdout.readline().strip()

    try:
        answers = []
        for size in (100, CHECKED_RECORD_MAX - 100, CHECKED_RECORD_MAX, CHECKED_RECORD_MAX + 100):
            for first in (0, 1):
                answers += [
                    write(first, "small", size),
                    write(first, "long", size),  # its last record of about `size` bytes
                    write(1 - first, "small", size + 1),  # after the other's
                    write(first, "small", size + 2),  # and after that one's
                ]
    finally:
        for writer in writers:
            writer.stdin.close()
            writer.wait(60)
    assert set(answers) == {"ok"}, answers
    with LmdbBackend(path, readonly=True) as backend:
        assert backend.verify() == []
