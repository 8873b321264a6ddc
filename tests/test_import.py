"""Importing RDB files and records: the rules on every backend, and the LMDB bulk path.

The rules (:mod:`telstate.import_rules`) are checked on every backend of
:data:`tests.backends.BACKENDS`; the LMDB bulk path (:mod:`telstate.lmdb.bulk`)
against katsdptelstate's load of the same file, the in-memory model, its
own ``verify`` and ``replay``, and a SIGKILL in the middle.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import katsdptelstate
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from telstate import TelescopeState, cli
from telstate.backend import Backend, Record
from telstate.errors import (
    ImmutableKeyError,
    InvalidTimestampError,
    RdbParseError,
    ReadOnlyError,
)
from telstate.lmdb import LmdbBackend, replay, settings
from telstate.lmdb.layout import ImportRecord
from telstate.log import Op
from telstate.memory import MemoryBackend
from telstate.rdb_writer import RDBWriter
from telstate.utils import KeyType, pack_timestamp

from .backends import BACKENDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMMUTABLE, MUTABLE, INDEXED = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED


def member(timestamp: float, value: bytes) -> bytes:
    return pack_timestamp(timestamp) + value


def write_rdb(path, records: list[Record]) -> str:
    with RDBWriter(path) as writer:
        for record in records:
            writer.write_record(*record)
    return str(path)


def state(backend: Backend) -> list[Record]:
    return list(backend.records())


def sample_records(sensors: int = 5, samples: int = 700) -> list[Record]:
    """A small observation: float sensors, a sensor of long values, attributes, indexed keys."""
    records: list[Record] = []
    for sensor in range(sensors):
        values = [
            member(1000.0 + i * 0.5, b"\xcb" + struct.pack(">d", i * 0.1)) for i in range(samples)
        ]
        records.append((b"m%03d_sensor" % sensor, MUTABLE, values))
    records.append(
        (b"array", MUTABLE, [member(float(i), bytes(600) + b"%d" % i) for i in range(40)])
    )
    records.append((b"burst", MUTABLE, [member(5.0, b"v%04d" % i) for i in range(300)]))
    for i in range(50):
        records.append((b"attr_%d" % i, IMMUTABLE, b"\x92\x01" + b"%d" % i))
    records.append((b"long_attr" * 70, IMMUTABLE, b"x" * 10_000))
    records.append((b"cal", INDEXED, {b"\xa1%d" % i: b"\x92%d" % i for i in range(200)}))
    records.append((b"cal_long", INDEXED, {b"s" * 700: b"long sub-key", b"t": b"short"}))
    return records


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> Backend:
    return BACKENDS[request.param](request)


# --- the rules, on every backend ---------------------------------------------------------


def test_import_into_empty_store(backend, tmp_path):
    records = sample_records(2, 50)
    assert backend.load_from_file(write_rdb(tmp_path / "a.rdb", records)) == len(records)
    expected = MemoryBackend()
    expected.load_records(records)
    assert state(backend) == state(expected)


def test_existing_keys_get_what_they_lack(backend, tmp_path):
    backend.set_immutable(b"imm", b"same")
    backend.add_mutable(b"mut", b"old", 1.0)
    backend.add_mutable(b"mut", b"both", 2.0)
    backend.set_indexed(b"idx", b"a", b"1")
    records = [
        (b"imm", IMMUTABLE, b"same"),
        (b"mut", MUTABLE, [member(2.0, b"both"), member(1.5, b"late"), member(3.0, b"new")]),
        (b"idx", INDEXED, {b"a": b"1", b"b": b"2"}),
    ]
    assert backend.load_from_file(write_rdb(tmp_path / "a.rdb", records)) == 3
    assert backend.get(b"imm") == (b"same", None)
    assert backend.get_range(b"mut", 0.0, math.inf, False, True) == [
        (b"old", 1.0),
        (b"late", 1.5),
        (b"both", 2.0),
        (b"new", 3.0),
    ]
    assert backend.get(b"idx") == ({b"a": b"1", b"b": b"2"}, None)
    # A second import of the same file changes nothing.
    before = state(backend)
    assert backend.load_from_file(tmp_path / "a.rdb") == 3
    assert state(backend) == before


@pytest.mark.parametrize(
    "conflict",
    [
        (b"imm", IMMUTABLE, b"other"),
        (b"idx", INDEXED, {b"new": b"fine", b"a": b"other"}),
        (b"imm", MUTABLE, [member(1.0, b"x")]),
        (b"mut", INDEXED, {b"a": b"1"}),
        (b"idx", IMMUTABLE, b"x"),
    ],
    ids=["immutable value", "sub-key value", "immutable as mutable", "mutable as indexed", "type"],
)
def test_a_contradicting_file_changes_nothing(backend, tmp_path, monkeypatch, conflict):
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)  # many LMDB transactions
    backend.set_immutable(b"imm", b"same")
    backend.add_mutable(b"mut", b"old", 1.0)
    backend.set_indexed(b"idx", b"a", b"1")
    before = state(backend)
    # The conflict comes last: the keys before it must not be written either.
    records = sample_records(2, 50) + [(b"mut", MUTABLE, [member(9.0, b"fine")]), conflict]
    with pytest.raises(ImmutableKeyError, match=conflict[0].decode()):
        backend.load_from_file(write_rdb(tmp_path / "bad.rdb", records))
    assert state(backend) == before
    with open(tmp_path / "bad.rdb", "rb") as file, pytest.raises(ImmutableKeyError):
        backend.load_from_file(file)  # a seekable file object is checked whole too
    assert state(backend) == before


HOSTILE = {
    "negative": [member(1.0, b"a"), struct.pack(">d", -5.0) + b"b"],
    "minus zero": [struct.pack(">d", -0.0) + b"b", member(1.0, b"a")],
    "nan": [member(1.0, b"a"), struct.pack(">d", math.nan) + b"b"],
    "infinity": [member(1.0, b"a"), struct.pack(">d", math.inf) + b"b"],
    "short": [member(1.0, b"a"), b"1234567"],
    "empty member": [b"", member(1.0, b"a")],
    # Members of one length, which readers may hand over packed in one buffer.
    "uniform nan": [member(float(i), b"v") for i in range(299)]
    + [struct.pack(">d", math.nan) + b"v"],
    "uniform negative": [member(float(i), b"v") for i in range(299)]
    + [struct.pack(">d", -1.0) + b"v"],
    "uniform short": [b"%07d" % i for i in range(300)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_zsets_change_nothing(backend, tmp_path, monkeypatch, name):
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)  # many LMDB transactions
    backend.add_mutable(b"victim", b"v", 1.0)  # a key the old code would have rewritten
    before = state(backend)
    records = sample_records(2, 50) + [(b"hostile", MUTABLE, HOSTILE[name])]
    error = RdbParseError if "short" in name or "empty" in name else InvalidTimestampError
    with pytest.raises(error, match="hostile"):
        backend.load_from_file(write_rdb(tmp_path / "bad.rdb", records))
    assert state(backend) == before
    if isinstance(backend, LmdbBackend):
        assert backend.verify() == []


@pytest.mark.parametrize(
    "record",
    [
        (b"k", MUTABLE, b"not members"),
        (b"k", MUTABLE, [member(1.0, b"a"), "text"]),
        (b"k", IMMUTABLE, ["not bytes"]),
        (b"k", INDEXED, {b"a": 1}),
        ("k", IMMUTABLE, b"v"),
        (b"k", "zset", [member(1.0, b"a")]),
        (b"k", IMMUTABLE),
    ],
)
def test_records_of_the_wrong_shape(backend, record):
    with pytest.raises(RdbParseError):
        backend.load_records([record])
    assert state(backend) == []


# --- the LMDB bulk path -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with LmdbBackend(tmp_path / "store", durability="none") as backend:
        yield backend


def katsdp_state(path: str) -> dict:
    """Every key as katsdptelstate loads the file, as our Record values."""
    ts = katsdptelstate.TelescopeState()
    ts.load_from_file(path)
    backend = ts.backend
    result = {}
    for key in backend.keys(b"*"):
        key_type = backend.key_type(key)
        if key_type == katsdptelstate.KeyType.MUTABLE:
            samples = backend.get_range(key, -math.inf, math.inf, False, True)
            result[key] = [pack_timestamp(ts) + value for value, ts in samples]
        else:
            result[key] = backend.get(key)[0]
    return result


@pytest.mark.parametrize("chunk, per_event", [(100_000, 4096), (257, 100)])
def test_import_equals_katsdptelstate_load_and_verifies(
    store, tmp_path, monkeypatch, chunk, per_event
):
    monkeypatch.setattr(settings, "LOAD_CHUNK", chunk)
    monkeypatch.setattr(settings, "BULK_EVENT_SAMPLES", per_event)
    path = write_rdb(tmp_path / "obs.rdb", sample_records())
    count = store.load_from_file(path)
    assert count == len(sample_records())
    assert store.verify() == []
    ours = {key: value for key, _, value in store.records()}
    assert ours == katsdp_state(path)
    replayed = replay(store.path).backend
    assert state(replayed) == state(store)
    # Every element is in one event: short samples many to an event, long ones one each.
    events = list(store.events())
    assert store.last_seq == len(events)
    elements = sum(1 if t == IMMUTABLE else len(v) for _, t, v in sample_records())
    assert sum(len(e.samples()) or 1 for e in events) == elements
    bulk = [e for e in events if e.op == Op.ADD_MUTABLE_MANY]
    assert {e.key for e in bulk} == {b"m%03d_sensor" % i for i in range(5)} | {b"burst"}
    assert all(len(e.values) <= per_event for e in bulk)
    assert len(bulk) >= 5 * 700 // per_event
    assert [e.op for e in store.history(b"array")] == [Op.ADD_MUTABLE] * 40


def test_samples_go_into_sealed_blocks_that_later_writes_respect(store, tmp_path):
    values = [member(float(i // 3), b"v%d" % (i % 5)) for i in range(3000)]
    store.load_records([(b"m", MUTABLE, values)])
    with store.snapshot() as snap:
        blocks = snap._txn.stat(snap._tables.blocks)["entries"]
        tail = snap._txn.stat(snap._tables.samples)["entries"]
    assert blocks >= 3000 // settings.BLOCK_MAX
    assert tail <= 3  # only the samples of the last timestamp
    model = MemoryBackend()
    model.load_records([(b"m", MUTABLE, values)])
    for backend in (store, model):
        backend.add_mutable(b"m", b"late", 10.0)  # into a block
        backend.add_mutable(b"m", b"v1", 10.0)  # already there
        backend.add_mutable(b"m", b"new", 2000.0)
    assert state(store) == state(model)
    for start, end in ((0.0, 5.0), (9.5, 10.0), (333.0, 334.0), (999.0, math.inf)):
        for previous in (False, True):
            got = store.get_range(b"m", start, end, previous, False)
            assert got == model.get_range(b"m", start, end, previous, False)
    assert store.verify() == []


def test_huge_key_is_cut_into_bounded_chunks(store, monkeypatch):
    monkeypatch.setattr(settings, "LOAD_CHUNK", 1000)
    monkeypatch.setattr(settings, "LOAD_CHUNK_BYTES", 4096)
    chunks = []
    values = [member(float(i), b"%d" % i) for i in range(5000)]
    sub_keys = {b"%d" % i: b"x" * 100 for i in range(300)}
    records = [(b"m", MUTABLE, values), (b"i", INDEXED, sub_keys)]
    store.load_records(records, progress=lambda phase, events: chunks.append(events))
    assert sum(chunks) == 5300
    assert len(chunks) > 5000 * 12 // 4096
    model = MemoryBackend()
    model.load_records(records)
    assert state(store) == state(model)
    assert store.verify() == []


@hypothesis_settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before=st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=3)), max_size=200),
    imported=st.lists(st.tuples(st.integers(0, 60), st.binary(max_size=3)), max_size=400),
    chunk=st.integers(1, 300),
)
# Values of lengths that add up as if they were all one length.
@example(before=[], imported=[(0, b"\x01"), (0, b"\x00\x00"), (0, b"\x00\x00\x00")], chunk=3)
def test_import_matches_the_model(tmp_path_factory, monkeypatch, before, imported, chunk):
    """Bulk samples (appended, late, duplicate, across chunks) give the zset the model has."""
    monkeypatch.setattr(settings, "LOAD_CHUNK", chunk)
    monkeypatch.setattr(settings, "TAIL_MAX", 8)
    monkeypatch.setattr(settings, "BLOCK_MAX", 16)
    path = tmp_path_factory.mktemp("store")
    model = MemoryBackend()
    with LmdbBackend(path, durability="none") as store:
        for backend in (store, model):
            for stamp, value in before:
                backend.add_mutable(b"m", value, float(stamp))
        records = [(b"m", MUTABLE, [member(float(s), v) for s, v in imported])] if imported else []
        records.append((b"other", IMMUTABLE, b"x"))
        store.load_records(records)
        model.load_records(records)
        assert state(store) == state(model)
        store.add_mutable(b"m", b"after", 30.0)
        model.add_mutable(b"m", b"after", 30.0)
        assert state(store) == state(model)
        assert store.verify() == []


def test_import_of_a_store_export_round_trips(store, tmp_path):
    store.load_records(sample_records(3, 300))
    path = tmp_path / "out.rdb"
    write_rdb(path, state(store))
    with LmdbBackend(tmp_path / "copy", durability="none") as copy:
        copy.load_from_file(path)
        assert state(copy) == state(store)
        assert copy.verify() == []


def test_readonly_store_refuses_an_import(store, tmp_path):
    path = write_rdb(tmp_path / "a.rdb", [(b"k", IMMUTABLE, b"v")])
    with LmdbBackend(store.path, readonly=True) as readonly:
        with pytest.raises(Exception, match="read-only"):
            readonly.load_from_file(path)


KILLED_IMPORT = """
    import sys
    from telstate.lmdb import LmdbBackend, settings
    settings.LOAD_CHUNK = 2000
    with LmdbBackend(sys.argv[1], durability="batch") as backend:
        backend.load_from_file(sys.argv[2], progress=lambda phase, n: print(phase, n, flush=True))
    print("finished", flush=True)
"""


def kill_import(store: str, path: str, chunks: int) -> None:
    """Import `path` into `store` in a child process, SIGKILLed once `chunks` are committed."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_IMPORT), store, path],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
        text=True,
    )
    line = child.stdout.readline()
    while line.startswith("checking"):
        line = child.stdout.readline()
    for _ in range(chunks):
        assert line.startswith("importing"), line
        line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    output, _ = child.communicate()
    assert "finished" not in output


def test_import_killed_midway_leaves_a_store_that_verifies(tmp_path):
    records = sample_records(40, 2000)
    path = write_rdb(tmp_path / "big.rdb", records)
    store = str(tmp_path / "store")
    kill_import(store, path, 3)  # a few chunks committed
    status = os.stat(path)
    with LmdbBackend(store) as backend:
        # The store is sound, and says it holds part of the file.
        assert backend.unfinished_imports() == [
            ImportRecord(path, status.st_size, status.st_mtime_ns)
        ]
        [problem] = backend.verify()
        assert problem.startswith(f"unfinished import of {path!r}")
        assert 0 < backend.last_seq < sum(len(v) for _, t, v in records if t == MUTABLE)
    assert f"unfinished import of {path}" in run_cli("info", store)[1]
    with LmdbBackend(store) as backend:
        # Importing the whole file again completes it (the rules make that safe).
        backend.load_from_file(path)
        expected = MemoryBackend()
        expected.load_records(records)
        assert state(backend) == state(expected)
        assert backend.unfinished_imports() == []
        assert backend.verify() == []
    assert "unfinished" not in run_cli("info", store)[1]


KILLED_CLI_IMPORT = """
    import sys
    from telstate import cli
    from telstate.lmdb import settings
    settings.LOAD_CHUNK = 2000

    class Shown:  # each step of the command's progress, on stdout
        def __init__(self, label, total):
            self.label = label

        def advance(self, values):
            print(self.label.split()[0], values, flush=True)

        def done(self):
            pass

    cli.Progress = Shown
    status = cli.main(["import", sys.argv[1], sys.argv[2]])
    print("finished", status, flush=True)
"""


@pytest.mark.parametrize("when", ["checking", "importing"])
def test_an_import_into_a_new_store_killed_midway_is_completed_again(tmp_path, when):
    """`telstate import NEW FILE` checks the file before it makes the store: killed in
    the check, no store is left; killed in the write pass, importing again completes it."""
    from telstate.lmdb.environment import holds_no_store

    records = sample_records(40, 2000)
    path = write_rdb(tmp_path / "big.rdb", records)
    store = str(tmp_path / "store")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_CLI_IMPORT), store, path],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
        text=True,
    )
    seen = 0
    while seen < 3:  # three steps of the phase
        line = child.stdout.readline()
        assert line and not line.startswith("finished"), line
        seen += line.startswith(when)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    if when == "checking":
        assert holds_no_store(store)
    assert run_cli("import", store, path)[0] == 0
    with LmdbBackend(store, readonly=True) as backend:
        expected = MemoryBackend()
        expected.load_records(records)
        assert state(backend) == state(expected)
        assert backend.unfinished_imports() == []
        assert backend.verify() == []


def test_an_import_killed_before_its_file_changed_can_be_forgotten(tmp_path, capsys):
    """A file that cannot be imported again to complete it: --forget ends the report."""
    path = write_rdb(tmp_path / "big.rdb", sample_records(40, 2000))
    store = str(tmp_path / "store")
    kill_import(store, path, 1)
    with LmdbBackend(store, readonly=True) as backend:
        [killed] = backend.unfinished_imports()
        brought = backend.last_seq
        assert brought > 0
    # The file is written again with other content: importing it cannot complete the first.
    write_rdb(tmp_path / "big.rdb", sample_records(2, 10))
    os.utime(path, ns=(killed.mtime_ns + 10**9, killed.mtime_ns + 10**9))
    assert run_cli("import", store, path)[0] == 0
    with LmdbBackend(store, readonly=True) as backend:
        assert backend.unfinished_imports() == [killed]
        assert backend.verify() != []
    # A read-only store forgets nothing.
    with LmdbBackend(store, readonly=True) as backend:
        with pytest.raises(ReadOnlyError):
            backend.forget_import(path)
    # Forgotten by the path as given (relative here); the keys it brought stay.
    os.remove(path)
    status, text = run_cli("import", "--forget", store, os.path.relpath(path))
    assert status == 0, text
    assert f"forgot the unfinished import of {path}" in text
    with LmdbBackend(store, readonly=True) as backend:
        assert backend.unfinished_imports() == []
        assert backend.verify() == []
        assert backend.last_seq > brought
    assert run_cli("verify", store)[0] == 0
    assert "unfinished" not in run_cli("info", store)[1]
    # Nothing left to forget: says so, and exits 1.
    capsys.readouterr()
    assert run_cli("import", "--forget", store, path) == (1, "")
    assert "no unfinished import of" in capsys.readouterr().err


def test_forget_import_takes_only_the_file_named(store, tmp_path):
    records = {name: ImportRecord(name, None, None) for name in ("<stream>", "/data/a.rdb")}
    later = ImportRecord("/data/a.rdb", 10, 20)
    with store.write() as wtxn:  # as imports cut short leave them
        for record in [*records.values(), later]:
            wtxn.txn.put(record.entry, record.encode(), db=wtxn.tables.meta)
        wtxn.changed = True
    seq = store.last_seq
    assert store.forget_import("/data/b.rdb") == []
    assert set(store.forget_import("/data/a.rdb")) == {records["/data/a.rdb"], later}
    assert store.unfinished_imports() == [records["<stream>"]]
    assert store.forget_import("<stream>") == [records["<stream>"]]
    assert store.unfinished_imports() == []
    assert store.last_seq == seq  # no event: the record is not part of the state
    assert store.verify() == []


# --- telstate import ---------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str]:
    import io

    out = io.StringIO()
    return cli.main(list(argv), out), out.getvalue()


def test_cli_import(tmp_path):
    path = write_rdb(tmp_path / "a.rdb", sample_records(2, 100))
    store = str(tmp_path / "store")
    status, output = run_cli("import", store, path)
    assert status == cli.EXIT_OK
    assert "imported" in output
    assert run_cli("verify", store)[0] == cli.EXIT_OK


@pytest.mark.parametrize("name, status", [("nan", cli.EXIT_DAMAGED), ("short", cli.EXIT_DAMAGED)])
def test_cli_import_of_a_hostile_file(tmp_path, capsys, name, status):
    store = str(tmp_path / "store")
    with LmdbBackend(store) as backend:
        backend.set_immutable(b"before", b"x")
        seq = backend.last_seq
    path = write_rdb(
        tmp_path / "bad.rdb", [(b"fine", IMMUTABLE, b"1"), (b"zs", MUTABLE, HOSTILE[name])]
    )
    assert run_cli("import", store, path)[0] == status
    assert "zs" in capsys.readouterr().err
    with LmdbBackend(store) as backend:
        assert backend.last_seq == seq
        assert backend.verify() == []


def test_cli_import_contradicting_the_store(tmp_path, capsys):
    store = str(tmp_path / "store")
    with LmdbBackend(store) as backend:
        backend.set_immutable(b"k", b"old")
    path = write_rdb(tmp_path / "a.rdb", [(b"new", IMMUTABLE, b"1"), (b"k", IMMUTABLE, b"new")])
    assert run_cli("import", store, path)[0] == cli.EXIT_USAGE
    assert "'k'" in capsys.readouterr().err
    with LmdbBackend(store) as backend:
        assert backend.keys(b"*") == [b"k"]


def test_progress_on_a_terminal():
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = cli.Progress("importing x", None, stream)
    progress.advance(5000)
    progress.done()
    assert "importing x: 5000" in stream.getvalue()


def test_frontend_load_from_file_on_lmdb(tmp_path):
    path = write_rdb(tmp_path / "a.rdb", sample_records(1, 10))
    with LmdbBackend(tmp_path / "store", durability="none") as backend:
        assert TelescopeState(backend).load_from_file(path) == len(sample_records(1, 10))


async def test_aio_lmdb_import_is_the_bulk_path(tmp_path):
    from telstate.aio.lmdb import LmdbBackend as AioLmdbBackend

    good = write_rdb(tmp_path / "good.rdb", sample_records(2, 300))
    bad = write_rdb(
        tmp_path / "bad.rdb", [(b"a", IMMUTABLE, b"1"), (b"zs", MUTABLE, HOSTILE["nan"])]
    )
    backend = AioLmdbBackend(tmp_path / "store", durability="none")
    try:
        assert await backend.load_from_file(good) == len(sample_records(2, 300))
        with pytest.raises(InvalidTimestampError, match="zs"):
            await backend.load_from_file(bad)
        assert await backend.exists(b"a") is False
    finally:
        backend.close()
    with LmdbBackend(tmp_path / "store") as sync:
        assert sync.verify() == []
        expected = MemoryBackend()
        expected.load_records(sample_records(2, 300))
        assert state(sync) == state(expected)


def two_databases(path, first: list[Record], second: list[Record]) -> str:
    """An RDB file with `first` in database 0 and `second` in database 1 (no checksum)."""
    parts = []
    for records in (first, second):
        write_rdb(path, records)
        data = path.read_bytes()
        parts.append(data[data.index(b"\xfe\x00") + 2 : data.rindex(b"\xff")])
    header = data[: data.index(b"\xfe\x00")]
    path.write_bytes(header + b"\xfe\x00" + parts[0] + b"\xfe\x01" + parts[1] + b"\xff" + bytes(8))
    return str(path)


def test_a_key_twice_in_one_file(backend, tmp_path):
    """An RDB file may hold one key in two databases: the second copy follows the rules."""
    store = backend
    records = [(b"k", IMMUTABLE, b"1"), (b"m", MUTABLE, [member(1.0, b"a")])]
    assert store.load_from_file(two_databases(tmp_path / "twice.rdb", records, records)) == 4
    assert state(store) == records
    path = two_databases(
        tmp_path / "conflicting.rdb",
        [(b"x", IMMUTABLE, b"1")],
        [(b"x", MUTABLE, [member(1.0, b"a")])],
    )
    with pytest.raises(ImmutableKeyError, match="x"):
        store.load_from_file(path)
    if isinstance(store, LmdbBackend):
        assert store.verify() == []
    assert store.key_type(b"x") is None


FILE_CONFLICTS = {
    "immutable value": ((b"x", IMMUTABLE, b"1"), (b"x", IMMUTABLE, b"2")),
    "immutable as mutable": ((b"x", IMMUTABLE, b"1"), (b"x", MUTABLE, [member(1.0, b"a")])),
    "mutable as indexed": ((b"x", MUTABLE, [member(1.0, b"a")]), (b"x", INDEXED, {b"s": b"1"})),
    "sub-key value": (
        (b"x", INDEXED, {b"s%d" % i: b"%d" % i for i in range(30)}),
        (b"x", INDEXED, {b"new": b"fine", b"s29": b"other"}),
    ),
    "long name": ((b"x" * 600, IMMUTABLE, b"1"), (b"x" * 600, IMMUTABLE, b"2")),
    "long value": ((b"x", IMMUTABLE, b"v" * 100), (b"x", IMMUTABLE, b"v" * 99 + b"w")),
    "long sub-key value": (
        (b"x", INDEXED, {b"s" * 700: b"v" * 100}),
        (b"x", INDEXED, {b"s" * 700: b"v" * 16}),
    ),
}


@pytest.mark.parametrize("name", sorted(FILE_CONFLICTS))
@pytest.mark.parametrize("where", ["two databases", "one database"])
def test_a_file_that_contradicts_itself_changes_nothing(store, tmp_path, monkeypatch, name, where):
    """Two copies of a key many chunks apart must agree, or the check pass refuses the file."""
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)  # the copies are many chunks apart
    store.set_immutable(b"before", b"x")
    before = state(store)
    first, second = FILE_CONFLICTS[name]
    filler = sample_records(2, 50)
    if where == "two databases":
        path = two_databases(tmp_path / "bad.rdb", [first] + filler, [second])
    else:
        path = write_rdb(tmp_path / "bad.rdb", [first] + filler + [second])
    with pytest.raises(ImmutableKeyError, match="the file has"):
        store.load_from_file(path)
    assert state(store) == before
    with open(path, "rb") as file, pytest.raises(ImmutableKeyError, match="the file has"):
        store.load_from_file(file)
    assert state(store) == before
    assert store.verify() == []


def test_copies_of_a_key_that_agree_across_chunks(store, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)
    first = [
        (b"imm", IMMUTABLE, b"same"),
        (b"mut", MUTABLE, [member(1.0, b"a"), member(3.0, b"c")]),
        (b"idx", INDEXED, {b"a": b"1", b"b": b"2"}),
    ]
    second = [
        (b"imm", IMMUTABLE, b"same"),
        (b"mut", MUTABLE, [member(2.0, b"b"), member(3.0, b"c")]),
        (b"idx", INDEXED, {b"b": b"2", b"c": b"3"}),
    ]
    filler = sample_records(2, 50)
    path = two_databases(tmp_path / "good.rdb", first + filler, second)
    store.load_from_file(path)
    expected = MemoryBackend()
    expected.load_records(first + filler + second)
    assert state(store) == state(expected)
    assert store.verify() == []


def test_an_import_failing_half_way_is_recorded_until_done(store, tmp_path, monkeypatch):
    """A conflicting write between the check and write passes leaves an unfinished import."""
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)
    records = sample_records(2, 50) + [(b"z_attr", IMMUTABLE, b"file's")]
    path = write_rdb(tmp_path / "a.rdb", records)
    other = write_rdb(tmp_path / "other.rdb", [(b"other", IMMUTABLE, b"1")])

    def another_writer(phase: str, values: int) -> None:
        if phase == "importing" and store.key_type(b"z_attr") is None:
            store.set_immutable(b"z_attr", b"another writer's")

    with pytest.raises(ImmutableKeyError, match="z_attr"):
        store.load_from_file(path, progress=another_writer)
    status = os.stat(path)
    unfinished = [ImportRecord(path, status.st_size, status.st_mtime_ns)]
    assert store.unfinished_imports() == unfinished
    assert len(store.verify()) == 1
    # An import of another file (one chunk) finishes without clearing it.
    store.load_from_file(other)
    assert store.unfinished_imports() == unfinished
    store.delete(b"z_attr")
    assert store.load_from_file(path) == len(records)
    assert store.unfinished_imports() == []
    assert store.verify() == []


def test_a_one_chunk_import_records_nothing_and_clears_its_file(store, tmp_path):
    path = write_rdb(tmp_path / "a.rdb", sample_records(1, 10))
    status = os.stat(path)
    record = ImportRecord(path, status.st_size, status.st_mtime_ns)
    store.load_from_file(path)
    assert store.unfinished_imports() == []
    with store.write() as wtxn:  # as if an earlier import of it had been killed
        wtxn.txn.put(record.entry, record.encode(), db=wtxn.tables.meta)
        wtxn.changed = True
    assert store.unfinished_imports() == [record]
    # Imported again: it adds nothing, and its one chunk clears the record.
    seq = store.last_seq
    with open(path, "rb") as file:
        store.load_from_file(file)
    assert store.unfinished_imports() == []
    assert store.last_seq == seq
    assert store.verify() == []


def test_samples_a_key_has_are_not_added_one_by_one(store, tmp_path, monkeypatch):
    """A file imported again finds its samples by one merge with the stored ones."""
    from telstate.lmdb.writes import WriteTxn

    monkeypatch.setattr(settings, "LOAD_CHUNK", 500)  # several pieces of a key
    records = sample_records(3, 700)
    path = write_rdb(tmp_path / "a.rdb", records)
    store.load_from_file(path)
    added = []
    per_sample = WriteTxn.add_mutable

    def counted(wtxn, key, value, timestamp):
        added.append((key, value, timestamp))
        return per_sample(wtxn, key, value, timestamp)

    monkeypatch.setattr(WriteTxn, "add_mutable", counted)
    before = state(store)
    seq = store.last_seq
    store.load_from_file(path)
    assert added == []
    assert store.last_seq == seq
    assert state(store) == before
    # Late samples a key lacks, among sealed blocks and among long values, still go one by one.
    late = [
        (
            b"m000_sensor",
            MUTABLE,
            [member(1000.25, b"late"), member(1001.0, b"\xcb" + struct.pack(">d", 2 * 0.1))],
        ),
        (b"array", MUTABLE, [member(3.0, bytes(600) + b"3"), member(3.0, bytes(600) + b"x")]),
    ]
    store.load_from_file(write_rdb(tmp_path / "late.rdb", records + late))
    assert added == [(b"m000_sensor", b"late", 1000.25), (b"array", bytes(600) + b"x", 3.0)]
    expected = MemoryBackend()
    expected.load_records(records + late)
    assert state(store) == state(expected)
    assert store.verify() == []


def test_a_copy_made_during_an_import_forgets_it_as_a_follower(tmp_path):
    """A follower's imports are its primary's: the primary's events finish them."""
    from telstate.lmdb.follower import make_follower

    record = ImportRecord("/data/a.rdb", 10, 20)
    with LmdbBackend(tmp_path / "copy") as backend:
        with backend.write() as wtxn:  # as a backup taken during an import holds it
            wtxn.txn.put(record.entry, record.encode(), db=wtxn.tables.meta)
            wtxn.txn.put(b"z", b"other meta entries stay", db=wtxn.tables.meta)
            wtxn.changed = True
        assert backend.unfinished_imports() == [record]
    make_follower(tmp_path / "copy", "primary")
    with LmdbBackend(tmp_path / "copy", readonly=True) as backend:
        assert backend.unfinished_imports() == []
        assert backend.verify() == []
        assert backend._read(lambda txn, tables: txn.get(b"z", db=tables.meta)) is not None


def test_an_unfinished_import_from_a_pipe_is_named_as_the_stream(store, tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)
    records = sample_records(1, 50) + [(b"z_attr", IMMUTABLE, b"file's")]
    write_rdb(tmp_path / "a.rdb", records)
    data = (tmp_path / "a.rdb").read_bytes()
    assert len(data) < 65536  # fits a pipe's buffer, so one thread can write and read it
    store.set_immutable(b"z_attr", b"the store's")
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe:  # not seekable: checked chunk by chunk
        with open(write_end, "wb") as writer:
            writer.write(data)
        with pytest.raises(ImmutableKeyError, match="z_attr"):
            store.load_from_file(pipe)
    [unfinished] = store.unfinished_imports()
    assert unfinished[:3] == ("<stream>", None, None)
    # Another stream's import, finished, leaves it: it is not the same file.
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe:
        with open(write_end, "wb") as writer:
            writer.write(Path(write_rdb(tmp_path / "b.rdb", sample_records(1, 5))).read_bytes())
        store.load_from_file(pipe)
    assert store.unfinished_imports() == [unfinished]
    assert store.forget_import("<stream>") == [unfinished]


def test_a_follower_forgets_no_import(tmp_path, capsys):
    """A follower takes no writes: --forget on it says so (exit 2) and changes nothing."""
    from telstate.lmdb.follower import make_follower

    path = str(tmp_path / "copy")
    LmdbBackend(path).close()
    make_follower(path, "primary")
    with LmdbBackend(path) as backend:
        with pytest.raises(ReadOnlyError, match="primary"):
            backend.forget_import("/data/a.rdb")
    assert run_cli("import", "--forget", path, "/data/a.rdb")[0] == cli.EXIT_USAGE
    assert "primary" in capsys.readouterr().err


@pytest.mark.parametrize("backend_name", ["lmdb", "memory"])
def test_the_file_checked_is_the_file_imported(tmp_path, backend_name):
    """A path is opened once: a file put in its place during the check is not what is imported.

    (The check found the first file good; importing the second, unchecked,
    could stop half-way on a record the check never saw.)
    """
    checked = write_rdb(tmp_path / "checked.rdb", sample_records(2, 50))
    other = write_rdb(tmp_path / "other.rdb", [(b"m000_sensor", MUTABLE, [member(-1.0, b"x")])])
    path = tmp_path / "in.rdb"
    os.replace(checked, path)
    if backend_name == "lmdb":
        backend = LmdbBackend(tmp_path / "store", durability="none")
        replaced = []

        def progress(phase: str, values: int) -> None:
            if not replaced:  # during the check: the path now names another file
                os.replace(other, path)
                replaced.append(phase)

        count = backend.load_from_file(str(path), progress=progress)
        assert replaced
    else:
        backend = MemoryBackend()
        original = backend.check_imports

        def check_imports(records):
            if os.path.exists(other):
                os.replace(other, path)
            original(records)

        backend.check_imports = check_imports  # type: ignore[method-assign]
        count = Backend.load_from_file(backend, str(path))
        assert not os.path.exists(other)
    assert count == len(sample_records(2, 50))
    assert sorted(state(backend)) == sorted(
        (key, key_type, value if key_type != MUTABLE else sorted(value))
        for key, key_type, value in sample_records(2, 50)
    )
    if backend_name == "lmdb":
        assert backend.unfinished_imports() == []
        backend.close()
