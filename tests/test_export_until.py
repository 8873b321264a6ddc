"""``telstate export --until`` (and ``replay``) stream the past state key by key.

The reference is the export as it was first written: the whole state
rebuilt in memory by :func:`telstate.lmdb.replay` (which stays so), then
written. The streamed export must write the same bytes, for any log and
any point in it, and in memory bounded by the largest key, not the store.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from unittest import mock

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings

from telstate import ImmutableKeyError, cli, log
from telstate.errors import StoreError
from telstate.export import AUX_SELECTION, AUX_SELECTION_DESCRIPTION, KeySelection, select_records
from telstate.lmdb import LmdbBackend, replay
from telstate.lmdb import settings as store_settings
from telstate.lmdb.layout import Tables, name_key_of
from telstate.rdb_reader import read_aux, read_records
from telstate.rdb_writer import RDBWriter
from telstate.utils import KeyType, pack_timestamp

# Keys that sort differently as names and as their inline forms: the long
# ones share their first 448 bytes (the inline prefix) with a short one.
KEYS = st.sampled_from(
    [b"a", b"ab", b"b", b"", b"k" * 470, b"k" * 500, b"k" * 500 + b"!", b"k" * 448 + b"a" * 40]
)
VALUES = st.sampled_from([b"x", b"y", b"", b"L" * 600, b"\xff\x00"])
SUB_KEYS = st.sampled_from([b"s", b"t", b"", b"L" * 600])
TIMESTAMPS = st.sampled_from([0.0, 1.0, 2.5, 1e9])
SAMPLES = st.lists(st.tuples(TIMESTAMPS, st.sampled_from([b"v1", b"v2", b"w", b"L" * 500])))

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("set_immutable"), KEYS, VALUES),
        st.tuples(st.just("add_mutable"), KEYS, VALUES, TIMESTAMPS),
        # A sensor's run: samples of one width, replayed in bulk.
        st.tuples(st.just("run"), KEYS, st.integers(0, 9), st.integers(1, 12)),
        # An import: add_mutable_many events.
        st.tuples(st.just("load"), KEYS, SAMPLES.filter(bool)),
        st.tuples(st.just("set_indexed"), KEYS, SUB_KEYS, VALUES),
        st.tuples(st.just("delete"), KEYS),
        st.tuples(st.just("clear")),
    ),
    max_size=30,
)

SELECTIONS = st.sampled_from(
    [
        KeySelection(),
        KeySelection.of(["k*"]),
        KeySelection.of(["a*", "b"]),
        KeySelection.of([], "a"),
    ],
)


def apply(backend: LmdbBackend, name: str, *args) -> None:
    """Do one operation on the store; one refused for a key of another type does nothing."""
    try:
        if name == "run":
            key, start, count = args
            for index in range(start, start + count):
                backend.add_mutable(key, b"%03d" % index, float(index))
        elif name == "load":
            key, samples = args
            members = [pack_timestamp(stamp) + value for stamp, value in samples]
            backend.load_records([(key, KeyType.MUTABLE, members)])
        else:
            getattr(backend, name)(*args)
    except ImmutableKeyError:
        pass


def selection_args(selection: KeySelection) -> list[str]:
    args = [arg for pattern in selection.patterns for arg in ("--keys", pattern.decode())]
    return args + (["--view", selection.view.decode()] if selection.view is not None else [])


def in_memory_export(path: str, target: Path, seq: int, selection: KeySelection) -> None:
    """The export of the state at `seq` as it was first written: replayed whole, in memory."""
    with LmdbBackend(path, readonly=True) as backend:
        aux = {log.AUX_STORE: str(backend.uuid).encode()}
        if not selection.everything:
            aux[AUX_SELECTION_DESCRIPTION] = selection.describe()
            aux[AUX_SELECTION] = selection.to_json()
        aux.update(log.position_aux(backend.uuid, seq, backend.chain_at(seq)))
    aux[b"telstate-replay-until"] = str(seq).encode()
    memory = replay(path, until_seq=seq).backend
    with RDBWriter(target, aux=aux, keep_empty=True) as writer:
        for record in select_records(memory, selection):
            writer.write_record(*record)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, selection=SELECTIONS, data=st.data())
def test_streamed_export_writes_the_bytes_of_the_in_memory_replay(operations, selection, data):
    with (
        tempfile.TemporaryDirectory(prefix="telstate-until-") as directory,
        # Small chunks: runs, imports and history reads cross their boundaries.
        mock.patch.object(store_settings, "VERIFY_CHUNK", 4),
        mock.patch.object(store_settings, "LOG_CHUNK_BYTES", 300),
        mock.patch.object(store_settings, "BULK_EVENT_SAMPLES", 3),
    ):
        path = f"{directory}/store"
        with LmdbBackend(path, durability="none", map_size=1 << 22) as backend:
            for name, *args in operations:
                apply(backend, name, *args)
            last = backend.last_seq
        middle = data.draw(st.integers(0, last), label="until")
        for seq in sorted({0, middle, last}):
            streamed, expected = Path(directory, "streamed.rdb"), Path(directory, "expected.rdb")
            command = ["export", path, str(streamed), "--until", str(seq)]
            assert run(*command, *selection_args(selection))[0] == cli.EXIT_OK
            in_memory_export(path, expected, seq, selection)
            assert list(read_records(streamed)) == list(read_records(expected))
            assert streamed.read_bytes() == expected.read_bytes()
        # `replay --rdb` is the same export, of every key; beyond the log is its end.
        assert run("replay", path, "--until", str(last + 5), "--rdb", str(streamed))[0] == 0
        in_memory_export(path, expected, last, KeySelection())
        aux = read_aux(streamed)
        assert aux.pop(b"telstate-replay-until") == str(last + 5).encode()
        assert aux == {k: v for k, v in read_aux(expected).items() if k != b"telstate-replay-until"}
        assert list(read_records(streamed)) == list(read_records(expected))


def test_state_at_is_read_while_its_snapshot_is_open(tmp_path):
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        backend.set_immutable(b"a", b"1")
        backend.set_immutable(b"b", b"2")
        with backend.snapshot() as snap:
            with pytest.raises(ValueError, match="not in the snapshot"):
                snap.state_at(snap.seq + 1)
            assert snap.state_at(0).keys == []
            state = snap.state_at(1)
            assert state.keys == [b"a"]
            assert list(state.records()) == [(b"a", KeyType.IMMUTABLE, b"1")]
            records = snap.state_at(2).records()
            assert next(records) == (b"a", KeyType.IMMUTABLE, b"1")
        with pytest.raises(StoreError, match="not open"):
            next(records)


# --- damage --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    """Keys of every type, one deleted and one cleared away, over a dozen events."""
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        backend.set_immutable(b"gone", b"1")
        backend.clear()
        backend.set_immutable(b"config", b"2")
        for index in range(5):
            backend.add_mutable(b"sensor", b"%d" % index, float(index))
        backend.set_indexed(b"gains", b"m000", b"3")
        backend.add_mutable(b"deleted", b"4", 1.0)
        backend.delete(b"deleted")
        backend.add_mutable(b"sensor", b"5", 5.0)
    return path


def damage(path: str, change) -> None:
    """Call `change(txn, tables)` in a write transaction of the store's environment."""
    env = lmdb.open(path, max_dbs=len(Tables.NAMES), subdir=True)
    try:
        with env.begin(write=True) as txn:
            change(txn, Tables(env, txn, create=False))
    finally:
        env.close()


def test_an_undecodable_event_of_a_deleted_key_stops_the_export(store, tmp_path, capsys):
    """Every event up to the point is checked, not only those of the keys written."""
    seq = 10  # the add_mutable to the key deleted by the next event
    damage(store, lambda txn, tables: txn.put(log.pack_seq(seq), b"\x02\x00", db=tables.log))
    out = str(tmp_path / "out.rdb")
    assert run("export", store, out, "--until", str(seq + 1))[0] == cli.EXIT_DAMAGED
    assert f"the log is damaged at event {seq}" in capsys.readouterr().err
    assert not Path(out).exists()
    assert run("export", store, out, "--until", str(seq - 1))[0] == cli.EXIT_OK


def test_a_history_index_that_misses_an_event_stops_the_export(store, tmp_path, capsys):
    """The history index lists each key's events: one it lost is damage, not a sample less."""
    with LmdbBackend(store, readonly=True) as backend:
        sensor_seqs = [e.seq for e in backend.history(b"sensor") if e.op == log.Op.ADD_MUTABLE]

    def forget(txn, tables):
        txn.delete(name_key_of(b"sensor"), log.pack_seq(sensor_seqs[1]), db=tables.history)

    damage(store, forget)
    out = str(tmp_path / "out.rdb")
    assert run("replay", store, "--until", str(sensor_seqs[-1]), "--rdb", out)[0] == 3
    error = capsys.readouterr().err
    assert "key 'sensor'" in error and "telstate verify" in error
    assert run("export", store, out, "--until", "4")[0] == cli.EXIT_OK  # before the loss
    # Only the keys selected are replayed.
    assert run("export", store, out, "--until", "12", "--keys", "g*")[0] == cli.EXIT_OK


def test_a_history_index_that_lost_a_delete_stops_the_export(tmp_path, capsys):
    """Found by review: counting a key's events only since its last delete, an index
    that lost the delete and the sample after it replayed the deleted sample as live,
    with the counts equal; the first event's seq is compared too."""
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"s", b"one", 1.0)
        backend.delete(b"s")
        backend.add_mutable(b"s", b"two", 2.0)
        backend.add_mutable(b"s", b"three", 3.0)
        seqs = [event.seq for event in backend.history(b"s")]

    def forget(txn, tables):
        for seq in seqs[1:3]:  # the delete and the sample after it
            assert txn.delete(name_key_of(b"s"), log.pack_seq(seq), db=tables.history)

    damage(path, forget)
    assert run("export", path, str(tmp_path / "out.rdb"), "--until", str(seqs[-1]))[0] == 3
    assert "the history index does not list the events of key 's'" in capsys.readouterr().err


def test_damaged_samples_of_an_import_stop_the_export(tmp_path, capsys):
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        backend.load_records([(b"s", KeyType.MUTABLE, [pack_timestamp(1.0) + b"v"])])
        seq = backend.last_seq

    def truncate(txn, tables):
        record = txn.get(log.pack_seq(seq), db=tables.log)
        raw = log.decode_record(record)
        body = log.encode_record(log.ADD_MUTABLE_MANY, raw[1], raw[2], b"s", b"", b"\0")
        txn.put(log.pack_seq(seq), body + raw[7], db=tables.log)

    damage(path, truncate)
    assert run("export", path, str(tmp_path / "out.rdb"), "--until", str(seq))[0] == 3
    assert "an add_mutable_many event on 's': damaged samples" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["export", "replay"])
def test_an_event_its_key_type_does_not_take_stops_the_export(store, tmp_path, capsys, how):
    """Found by review: an op code changed into another valid one (a sample's event made
    a set_immutable) raised a raw AttributeError traceback, in the old path too."""
    with LmdbBackend(store, readonly=True) as backend:
        first, *_, last = [e.seq for e in backend.history(b"sensor")]

    def retype(txn, tables):
        record = txn.get(log.pack_seq(first), db=tables.log)
        txn.put(log.pack_seq(first), bytes([log.SET_IMMUTABLE]) + record[1:], db=tables.log)

    damage(store, retype)
    out = str(tmp_path / "out.rdb")
    if how == "export":
        status = run("export", store, out, "--until", str(last))[0]
    else:
        status = run("replay", store, "--until", str(last), "--rdb", out)[0]
    assert status == cli.EXIT_DAMAGED
    error = capsys.readouterr().err
    assert "sensor" in error and "another type" in error and "Traceback" not in error
    assert not Path(out).exists()
    with pytest.raises(StoreError, match=f"the log is damaged at event {first + 1}"):
        replay(store, until_seq=last)


@pytest.mark.parametrize("retyped", [log.SET_IMMUTABLE, log.SET_INDEXED])
def test_samples_waiting_for_a_key_of_another_type_stop_export_and_verify(
    tmp_path, capsys, retyped
):
    """Found by review: an import's first event made another type, the samples after it
    (waiting as arrays) went onto that type: raw AttributeError or ValueError tracebacks
    from export --until, and from verify."""
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        members = [pack_timestamp(1.0 + i) + b"v%02d" % i for i in range(9)]
        with mock.patch.object(store_settings, "BULK_EVENT_SAMPLES", 3):
            backend.load_records([(b"s", KeyType.MUTABLE, members)])  # 3 events
        first, last = 1, backend.last_seq

    def retype(txn, tables):
        record = txn.get(log.pack_seq(first), db=tables.log)
        txn.put(log.pack_seq(first), bytes([retyped]) + record[1:], db=tables.log)

    damage(path, retype)
    out = str(tmp_path / "out.rdb")
    assert run("export", path, out, "--until", str(last))[0] == cli.EXIT_DAMAGED
    error = capsys.readouterr().err
    assert "'s'" in error and "another type" in error and "Traceback" not in error
    with LmdbBackend(path, readonly=True) as backend:
        assert any("another type" in problem for problem in backend.verify())


def test_the_state_before_a_damaged_last_event_can_be_exported(store, tmp_path, capsys):
    """Found by review: a damaged last record stopped every export --until, even to a
    point before it, where the in-memory replay salvaged the state before the damage
    (what a user reaches for once writes refuse the store)."""
    with LmdbBackend(store, readonly=True) as backend:
        last = backend.last_seq
        before = replay(store, until_seq=last - 1).backend

    def truncate(txn, tables):
        record = txn.get(log.pack_seq(last), db=tables.log)
        txn.put(log.pack_seq(last), record[:20], db=tables.log)

    damage(store, truncate)
    out = str(tmp_path / "out.rdb")
    assert run("replay", store, "--until", str(last - 1), "--rdb", out)[0] == cli.EXIT_OK
    assert sorted(read_records(out)) == sorted(before.records())
    for argv in (["export", store, out, "--until", str(last)], ["export", store, out]):
        Path(out).unlink(missing_ok=True)
        assert run(*argv)[0] == cli.EXIT_DAMAGED, argv
        assert "damaged" in capsys.readouterr().err
        assert not Path(out).exists()


# --- memory --------------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import io, json, sys, tracemalloc
    from telstate import cli, rdb_writer
    from telstate.lmdb import replay

    path, target = sys.argv[1:]
    rdb_writer._FLUSH_SIZE = 1 << 20  # its output buffers (16 MiB) are not what is measured
    tracemalloc.start()
    assert cli.main(["export", path, target, "--until", "1000000"], out=io.StringIO()) == 0
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    replay(path).backend.records()
    in_memory = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"streamed": streamed, "in_memory": in_memory}))
    """
)


def _peaks(path: str, target: str) -> dict[str, int]:
    """Peak memory of export --until and of the in-memory replay of the store at `path`."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, path, target], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def test_export_until_needs_memory_for_one_key_not_the_store(tmp_path):
    """Forty sensors of 20,000 samples: the peak is well below that of the store replayed whole.

    Measured with tracemalloc in a fresh interpreter (the Python and numpy
    allocations; LMDB's pages are mapped, not allocated). About 8 MB
    against 140 MB when written.
    """
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        for sensor in range(40):
            members = [pack_timestamp(1e9 + i) + b"\xcb%08d" % i for i in range(20_000)]
            backend.load_records([(b"sensor_%02d" % sensor, KeyType.MUTABLE, members)])
        for attribute in range(1000):
            backend.set_immutable(b"attribute_%04d" % attribute, b"x" * 100)
    peaks = _peaks(path, str(tmp_path / "out.rdb"))
    assert peaks["streamed"] < peaks["in_memory"] / 8, peaks


@pytest.mark.parametrize(
    "past", ["made again", "deleted samples", "deleted keys", "samples after a delete"]
)
def test_export_until_needs_memory_for_the_state_not_the_past(tmp_path, past):
    """Found by review: a key's events were read 1024 at a time however long they
    were (a key deleted and made again 300 times with a 1 MB value: 317 MB for a
    state of 1 MB), samples a delete dropped were first made a set of objects,
    and every key deleted since the last clear was kept (500,000: 73 MB)."""
    path = str(tmp_path / "store")
    with LmdbBackend(path, durability="none") as backend:
        if past == "samples after a delete":
            with backend.write() as wtxn:
                for i in range(10):
                    wtxn.add_mutable(b"key", b"\xcb%08d" % i, float(i))
                wtxn.delete(b"key")
                for i in range(300_000):
                    wtxn.add_mutable(b"key", b"\xcb%08d" % i, 1e9 + i)
        elif past == "deleted keys":
            with backend.write() as wtxn:
                for i in range(100_000):
                    wtxn.set_immutable(b"key_%06d" % i, b"x")
                    wtxn.delete(b"key_%06d" % i)
            backend.set_immutable(b"key", b"tiny")
        elif past == "made again":
            for i in range(100):
                backend.delete(b"key")
                backend.set_immutable(b"key", b"%08d" % i + b"v" * (1 << 20))
        else:
            members = [pack_timestamp(1e9 + i) + b"\xcb%08d" % i for i in range(300_000)]
            backend.load_records([(b"key", KeyType.MUTABLE, members)])
            backend.delete(b"key")
            backend.set_immutable(b"key", b"tiny")
    peaks = _peaks(path, str(tmp_path / "out.rdb"))
    # The streamed export holds the state and a chunk of its past; as much as
    # the whole state replayed at once, at most.
    assert peaks["streamed"] < (8 << 20 if past == "deleted keys" else 20 << 20), peaks
