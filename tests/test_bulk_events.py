"""add_mutable_many events: what an import records, and everything that reads them.

An import records a mutable key's samples as add_mutable_many events (log
format 3, see :mod:`telstate.log`). Checked here: the events themselves and
their codec, replay to any seq among them against a model built from the
events, ``telstate log`` and ``history``, damage reported by ``verify``
with the event's seq, the format bump (and its refusal by a telstate that
reads format 2 only), key updates, and the replicator projecting an
imported store into a real redis-server.
"""

from __future__ import annotations

import json
import struct

import katsdptelstate
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from replicator.verify import differences, mirror_contents, record_contents
from telstate import TelescopeState, log
from telstate.backend import Backend, MutableKeyUpdate, PackedMembers, Record
from telstate.encoding import encode_value
from telstate.errors import ImmutableKeyError, StoreError
from telstate.lmdb import LmdbBackend, replay, settings
from telstate.lmdb.layout import Tables
from telstate.lmdb.upgrade import upgrade
from telstate.log import Op
from telstate.memory import MemoryBackend
from telstate.utils import KeyType, pack_timestamp
from tests import test_replicator_e2e as e2e
from tests.test_import import katsdp_state, sample_records, write_rdb
from tests.test_log_chain import flip_in_file, raw_log, telstate_cli
from tests.test_replicator_e2e import settle, wait_for_cursor

IMMUTABLE, MUTABLE, INDEXED = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED

# The end-to-end tests' fixtures: an empty store, a redis-server, daemon processes.
store, server, daemons = e2e.store, e2e.server, e2e.daemons


def member(timestamp: float, value: bytes) -> bytes:
    return pack_timestamp(timestamp) + value


def state(backend: Backend) -> list[Record]:
    return list(backend.records())


def meta_format(path) -> bytes:
    env = lmdb.open(str(path), max_dbs=len(Tables.NAMES), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return bytes(txn.get(b"format", db=Tables(env, txn, create=False).meta))
    finally:
        env.close()


@pytest.fixture
def imported(tmp_path, monkeypatch):
    """A store with a few writes of its own, then an import in events of at most 64 samples."""
    monkeypatch.setattr(settings, "BULK_EVENT_SAMPLES", 64)
    path = tmp_path / "imported"
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"m000_sensor", b"\x01", 1.0)  # before the file's samples
        backend.set_immutable(b"own", b"\x02")
        backend.load_from_file(write_rdb(tmp_path / "obs.rdb", sample_records(3, 300)))
        backend.add_mutable(b"m001_sensor", b"\x03", 1e6)
    return path


def apply_event(model: MemoryBackend, event: log.Event) -> None:
    """What `event` does, done through the model's ordinary write operations."""
    assert event.key is not None or event.op == Op.CLEAR
    if event.op in (Op.ADD_MUTABLE, Op.ADD_MUTABLE_MANY):
        assert event.key is not None
        for value, timestamp in event.samples():
            model.add_mutable(event.key, value, timestamp)
    elif event.op == Op.SET_IMMUTABLE:
        assert event.key is not None and event.value is not None
        model.set_immutable(event.key, event.value)
    elif event.op == Op.SET_INDEXED:
        assert event.key is not None and event.sub_key is not None and event.value is not None
        model.set_indexed(event.key, event.sub_key, event.value)
    elif event.op == Op.DELETE:
        assert event.key is not None
        model.delete(event.key)
    else:
        model.clear()


# --- the events ---------------------------------------------------------------------------


def test_samples_codec_round_trips_and_refuses_damage():
    uniform = [member(float(i), b"\xcb" + struct.pack(">d", i)) for i in range(100)]
    varied = [member(float(i), b"v" * (i % 7)) for i in range(100)]
    for members in (uniform, varied, [member(3.0, b"")]):
        payload = log.encode_samples(members)
        assert log.sample_members(payload) == members
        stamps, values = log.decode_samples(payload)
        assert [pack_timestamp(t) + v for t, v in zip(stamps, values)] == members
    payload = log.encode_samples(varied)
    for damaged in (payload[:-1], payload + b"x", payload[:3], b"\0\0\0\0", b""):
        with pytest.raises(ValueError, match="damaged samples"):
            log.decode_samples(damaged)


def samples_field(stamps: list[bytes], values: list[bytes]) -> bytes:
    """An add_mutable_many value field laid out by hand, whatever it holds."""
    lengths = struct.pack(f"<{len(values)}I", *map(len, values))
    return struct.pack("<I", len(values)) + b"".join(stamps) + lengths + b"".join(values)


#: Value fields whose layout is whole but whose samples no import writes.
HOSTILE_SAMPLES = {
    "long value": samples_field([pack_timestamp(1.0)], [encode_value("v" * 590)]),
    "value of 480 bytes": samples_field([pack_timestamp(1.0)], [b"\xff" * 480]),
    "NaN": samples_field([struct.pack(">d", float("nan"))], [b"\x01"]),
    "raw NaN": samples_field([b"\xff" * 8], [b"\x01"]),
    "negative": samples_field([struct.pack(">d", -1.0)], [b"\x01"]),
    "-0.0": samples_field([struct.pack(">d", -0.0)], [b"\x01"]),
    "out of order": samples_field([pack_timestamp(2.0), pack_timestamp(1.0)], [b"a", b"a"]),
    "repeated": samples_field([pack_timestamp(1.0)] * 2, [b"a", b"a"]),
    "values out of order": samples_field([pack_timestamp(1.0)] * 2, [b"b", b"a"]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SAMPLES))
def test_samples_codec_refuses_samples_no_import_writes(name):
    payload = HOSTILE_SAMPLES[name]
    with pytest.raises(ValueError, match="damaged samples"):
        log.decode_samples(payload)
    with pytest.raises(ValueError, match="damaged samples"):
        log.sample_members(payload)


@pytest.mark.parametrize("name", sorted(HOSTILE_SAMPLES))
def test_samples_read_as_rows_leave_damage_to_sample_members(name):
    assert log.sample_member_rows(HOSTILE_SAMPLES[name]) is None


@hypothesis_settings(max_examples=200)
@given(
    stamps=st.lists(st.sampled_from([0.0, 1.0, 1.5, 2.0, 1e9, float("inf")]), min_size=1),
    widths=st.lists(st.integers(0, 3), min_size=1),
    cut=st.integers(-20, 0),
)
def test_samples_read_as_rows_are_the_members(stamps, widths, cut):
    """Whenever a value field reads as rows, they are its members, as sample_members reads them."""
    members = sorted(
        {member(stamp, b"v" * widths[i % len(widths)]) for i, stamp in enumerate(stamps)}
    )
    payload = log.encode_samples(members)
    payload = payload[: len(payload) + cut] if cut else payload
    rows = log.sample_member_rows(payload)
    if rows is None:
        uniform = len(set(map(len, members))) == 1 and len({m[:8] for m in members}) == len(members)
        assert cut or not uniform  # a sensor's samples (one width, increasing times) are rows
        return
    assert [bytes(row) for row in rows] == log.sample_members(payload) == members


def test_samples_codec_takes_the_edges_of_what_imports_write():
    members = [member(0.0, b"\xff" * 479), member(1.0, b"a"), member(1.0, b"b")]
    members.append(member(float("inf"), b""))
    assert log.sample_members(log.encode_samples(members)) == members


def test_an_import_records_bulk_events_that_add_up_to_the_file(imported, tmp_path):
    with LmdbBackend(imported, readonly=True) as backend:
        assert backend.verify() == []
        events = list(backend.events())
        bulk = [e for e in events if e.op == Op.ADD_MUTABLE_MANY]
        # 3 sensors of 300 and "burst" of 300, at most 64 samples an event.
        assert len(bulk) == 4 * 5
        for event in bulk:
            assert event.value is None and event.timestamp is None
            assert event.values is not None and event.timestamps is not None
            assert 1 <= len(event.values) == len(event.timestamps) <= 64
            assert event.samples() == list(zip(event.values, event.timestamps))
            assert "samples=" in repr(event)
        single = [e for e in events if e.op == Op.ADD_MUTABLE]
        assert all(e.values is None and len(e.samples()) == 1 for e in single)
        assert [e.samples() for e in events if e.op == Op.SET_IMMUTABLE][0] == []
        # The sensor's history: its own sample, then the file's in order.
        history = list(backend.history(b"m000_sensor"))
        assert [e.op for e in history] == [Op.ADD_MUTABLE] + [Op.ADD_MUTABLE_MANY] * 5
        samples = [sample for e in history for sample in e.samples()]
        assert samples == backend.get_range(b"m000_sensor", 0.0, float("inf"), False, True)
        # The imported state is katsdptelstate's load plus the store's own writes.
        expected = katsdp_state(str(tmp_path / "obs.rdb"))
        expected[b"m000_sensor"].insert(0, member(1.0, b"\x01"))
        expected[b"m001_sensor"].append(member(1e6, b"\x03"))
        expected[b"own"] = b"\x02"
        assert {key: value for key, _, value in backend.records()} == expected


def test_replay_to_every_seq_is_the_state_of_the_events_up_to_it(imported):
    with LmdbBackend(imported, readonly=True) as backend:
        events = list(backend.events())
    model = MemoryBackend()
    for event in events:
        apply_event(model, event)
        if event.seq % 5 == 0 or event.op == Op.ADD_MUTABLE_MANY:
            assert state(replay(imported, until_seq=event.seq).backend) == state(model)


def test_export_until_a_seq_among_bulk_events(imported, tmp_path):
    with LmdbBackend(imported, readonly=True) as backend:
        middle = [e for e in backend.events() if e.op == Op.ADD_MUTABLE_MANY][7].seq
    out = tmp_path / "until.rdb"
    result = telstate_cli("export", str(imported), str(out), "--until", str(middle))
    assert result.returncode == 0, result.stderr
    loaded = TelescopeState(MemoryBackend())
    loaded.load_from_file(str(out))
    assert state(loaded.backend) == state(replay(imported, until_seq=middle).backend)
    assert 0 < len(state(loaded.backend)) < len(state(replay(imported).backend))


def test_telstate_log_shows_bulk_events(imported):
    with LmdbBackend(imported, readonly=True) as backend:
        first = next(e for e in backend.events() if e.op == Op.ADD_MUTABLE_MANY)
    text = telstate_cli("log", str(imported), "--from-seq", str(first.seq), "--limit", "1")
    assert text.returncode == 0, text.stderr
    assert "add_mutable_many" in text.stdout
    assert f"{len(first.values)} samples @ {first.timestamps[0]:.6f}" in text.stdout
    shown = telstate_cli("--json", "log", str(imported), "--from-seq", str(first.seq))
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert lines[0]["op"] == "add_mutable_many" and lines[0]["value"] is None
    assert [t for t, _ in lines[0]["samples"]] == first.timestamps
    assert len(lines[0]["samples"]) == len(first.values)
    assert all("samples" not in line for line in lines if line["op"] != "add_mutable_many")
    history = telstate_cli("history", str(imported), "burst")
    assert history.stdout.count("add_mutable_many") == 5


def test_key_updates_give_one_update_per_sample(imported):
    with LmdbBackend(imported, readonly=True) as backend:
        bulk = [e for e in backend.events() if e.op == Op.ADD_MUTABLE_MANY and e.key == b"burst"]
        updates = backend.updates(bulk[0].seq, bulk[-1].seq, [b"burst"])
    assert len(updates) == 300
    assert all(key == b"burst" and isinstance(u, MutableKeyUpdate) for key, u in updates)
    assert [u.value for _, u in updates] == [v for e in bulk for v in e.values]


# --- damage -------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_bulk_event_fails_verify_naming_its_seq(imported):
    with LmdbBackend(imported, readonly=True) as backend:
        target = [e for e in backend.events() if e.op == Op.ADD_MUTABLE_MANY][6]
    flip_in_file(imported, target.seq, 32 + 1)  # the last value's last byte
    result = telstate_cli("verify", str(imported))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"event {target.seq} does not match its chain hash" in result.stdout
    assert f"key {target.key.decode()!r}: value differs" in result.stdout
    assert result.stdout.count("does not match its chain") == 1


def _one_more_sample(field: bytes) -> bytes:
    return struct.pack("<I", struct.unpack_from("<I", field)[0] + 1) + field[4:]


@pytest.mark.parametrize("damage", ["lying count", "long value", "NaN", "-0.0", "repeated"])
def test_a_bulk_event_with_damaged_samples_fails_verify_naming_its_seq(imported, damage):
    """Samples damaged and the chain recomputed after them: verify names the event."""
    identity, records = raw_log(imported)
    target = next(seq for seq, record in records if record[0] == log.ADD_MUTABLE_MANY)
    env = lmdb.open(str(imported), max_dbs=len(Tables.NAMES))
    with env.begin(write=True) as txn:
        tables = Tables(env, txn, create=False)
        chain = log.genesis(identity)
        for seq, record in records:
            body = bytearray(record[:-32])
            if seq == target:
                start = 29 + struct.unpack_from("<I", body, 21)[0]  # the value field
                field = bytes(body[start:])
                lying = damage == "lying count"
                body[start:] = _one_more_sample(field) if lying else HOSTILE_SAMPLES[damage]
            chain = log.seal(bytes(body), chain)[-32:]
            txn.put(log.pack_seq(seq), bytes(body) + chain, db=tables.log)
    env.close()
    result = telstate_cli("verify", str(imported))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"event {target} cannot be decoded (damaged samples" in result.stdout
    assert "Traceback" not in result.stderr
    with LmdbBackend(imported, readonly=True) as backend:
        with pytest.raises(StoreError, match=f"event {target}: damaged samples"):
            list(backend.events())
    with pytest.raises(StoreError, match="damaged samples"):
        replay(imported)


# --- the format ---------------------------------------------------------------------------


def test_the_first_bulk_event_makes_a_store_format_3(tmp_path, monkeypatch):
    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        backend.add_mutable(b"s", b"\x01", 1.0)
        backend.load_records([(b"a", IMMUTABLE, b"\x02"), (b"i", INDEXED, {b"\xa1x": b"\x03"})])
        backend.load_records([(b"arr", MUTABLE, [member(1.0, bytes(600))])])  # long: one event
    assert meta_format(path) == b"2"
    with LmdbBackend(path, durability="none") as backend:
        backend.load_records([(b"m", MUTABLE, [member(float(i), b"\x05") for i in range(10)])])
        assert backend.verify() == []
    assert meta_format(path) == b"3"
    assert upgrade(path) == (3, 0)
    with LmdbBackend(path, readonly=True) as backend:
        assert backend.get_range(b"m", 0.0, 100.0, False, True)[-1] == (b"\x05", 9.0)
    # A telstate that reads format 2 only refuses the store, rather than misread its events.
    monkeypatch.setattr(log, "FORMATS", frozenset({2}))
    with pytest.raises(StoreError, match="log format 3.*upgrade telstate"):
        LmdbBackend(path, readonly=True)


def test_a_failed_import_leaves_the_format(tmp_path):
    path = tmp_path / "store"
    with LmdbBackend(path, durability="none") as backend:
        backend.set_immutable(b"a", b"\x01")
        with pytest.raises(ImmutableKeyError, match="another value"):
            backend.load_records(
                [(b"m", MUTABLE, [member(1.0, b"\x05")]), (b"a", IMMUTABLE, b"\x02")]
            )
        assert backend.last_seq == 1
    assert meta_format(path) == b"2"


# --- the model ----------------------------------------------------------------------------


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    zsets=st.dictionaries(
        st.sampled_from([b"a", b"b", b"c"]),
        st.lists(st.tuples(st.integers(0, 30), st.binary(max_size=4)), min_size=1, max_size=120),
        max_size=3,
    ),
    per_event=st.integers(1, 50),
    chunk=st.integers(1, 200),
)
def test_import_of_random_zsets_equals_the_memory_backend(
    tmp_path_factory, monkeypatch, zsets, per_event, chunk
):
    monkeypatch.setattr(settings, "BULK_EVENT_SAMPLES", per_event)
    monkeypatch.setattr(settings, "LOAD_CHUNK", chunk)
    records: list[Record] = [
        (key, MUTABLE, sorted({member(float(t), v) for t, v in samples}))
        for key, samples in sorted(zsets.items())
    ]
    path = tmp_path_factory.mktemp("store")
    model = MemoryBackend()
    model.load_records(records)
    with LmdbBackend(path, durability="none") as store:
        store.load_records(records)
        assert state(store) == state(model)
        assert store.verify() == []
        events = list(store.events())
        assert all(len(e.samples()) <= per_event for e in events)
        rebuilt = MemoryBackend()
        for event in events:
            apply_event(rebuilt, event)
        assert state(rebuilt) == state(model)
    assert state(replay(path).backend) == state(model)


# --- the replicator -----------------------------------------------------------------------


def test_replicator_projects_an_import_into_redis(store, server, daemons, tmp_path):
    """A running daemon tails the bulk events into the mirror: one ZADD each, every update
    published, and the mirror equals the store (and katsdptelstate reads it)."""
    client = server.client()
    pubsub = client.pubsub()
    pubsub.psubscribe("update/*")
    daemon = daemons(store, server.url)
    wait_for_cursor(client, daemon)
    sensors = [
        (b"sensor%d" % i, MUTABLE, [member(1e9 + j, encode_value(j * 0.5)) for j in range(5000)])
        for i in range(3)
    ]
    arrays = [member(float(j), encode_value(np.full(100, float(j)))) for j in range(20)]
    records = [
        *sensors,
        (b"array", MUTABLE, arrays),
        (b"attr", IMMUTABLE, encode_value((1, 2))),
        (b"cal", INDEXED, {encode_value(j): encode_value([j]) for j in range(50)}),
    ]
    with LmdbBackend(store, durability="none") as backend:
        backend.add_mutable(b"sensor0", encode_value(-1.0), 1.0)
        backend.load_from_file(write_rdb(tmp_path / "obs.rdb", records))
        bulk = [e for e in backend.events() if e.op == Op.ADD_MUTABLE_MANY]
        assert len(bulk) == 3 * 2  # 5000 samples: events of 4096 and 904
    settle(store, client, daemon)
    published = 0
    while (message := pubsub.get_message(timeout=1.0)) is not None:
        if message["type"] == "pmessage" and message["channel"].startswith(b"update/sensor1"):
            assert message["data"][:1] == b"\x02"
            published += 1
    assert published == 5000
    theirs = katsdptelstate.TelescopeState(server.url)
    ours = TelescopeState(LmdbBackend(store, readonly=True))
    for key in ("sensor0", "sensor2"):
        assert theirs.get_range(key, st=0) == ours.get_range(key, st=0)
    their_arrays, our_arrays = theirs.get_range("array", st=0), ours.get_range("array", st=0)
    assert [t for _, t in their_arrays] == [t for _, t in our_arrays] == list(range(20))
    assert all((a == b).all() for (a, _), (b, _) in zip(their_arrays, our_arrays))
    with ours.backend.snapshot() as snapshot:
        assert differences(record_contents(snapshot.records()), mirror_contents(client)) == []
    ours.backend.close()
    daemon.stop()
    assert "Traceback" not in daemon.log_text()


# --- sealed blocks from packed members ----------------------------------------------------


def table_contents(backend: LmdbBackend) -> dict[str, list[tuple[bytes, bytes]]]:
    with backend.snapshot() as snap:
        txn, tables = snap._txn, snap._tables
        return {
            name: [(bytes(k), bytes(v)) for k, v in txn.cursor(getattr(tables, name))]
            for name in ("blocks", "samples")
        }


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    length=st.sampled_from([0, 1, 9, 255, 256, 471]),
    stamps=st.lists(st.integers(0, 400), min_size=1, max_size=700),
    block_max=st.integers(1, 600),
)
def test_packed_members_make_the_blocks_a_list_makes(
    tmp_path_factory, monkeypatch, length, stamps, block_max
):
    """The numpy path cuts and encodes blocks byte for byte as the list path does."""
    monkeypatch.setattr(settings, "BLOCK_MAX", block_max)
    members = sorted({member(float(t), bytes([t % 251]) * length) for t in stamps})
    packed = PackedMembers.from_buffer(b"".join(members), 8 + length)
    contents = []
    for value in (packed, members):
        with LmdbBackend(tmp_path_factory.mktemp("store"), durability="none") as backend:
            backend.load_records([(b"m", MUTABLE, value)])
            assert backend.get_range(b"m", 0.0, float("inf"), False, True) == [
                (m[8:], struct.unpack(">d", m[:8])[0]) for m in members
            ]
            assert backend.verify() == []
            contents.append(table_contents(backend))
    assert contents[0] == contents[1]
