"""The hash chain of the log: its definition, upgrade from format 1, verify, and projections.

Stores restored from an older copy are made as an operator would: copy the
store's directory while no process uses it, write on, then copy it back.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings

from replicator.snapshot_sink import DIVERGED, list_snapshots
from replicator.verify import differences, record_contents
from telstate import TelescopeState, log
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend
from telstate.lmdb.layout import Tables
from telstate.lmdb.upgrade import upgrade
from telstate.rdb_reader import read_aux, read_records
from telstate.rdb_writer import RDBWriter
from tests import test_replicator_e2e as e2e
from tests.test_replicator_e2e import REPO, Writer, settle

# The end-to-end tests' fixtures: an empty store, a redis-server, daemon processes.
store, server, daemons = e2e.store, e2e.server, e2e.daemons


def telstate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m telstate.cli ARGS`` as a separate process."""
    command = [sys.executable, "-m", "telstate.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def raw_log(path: Path) -> tuple[uuid.UUID, list[tuple[int, bytes]]]:
    """The store's identity and every (seq, record) of its log, read with plain LMDB."""
    env = lmdb.open(str(path), max_dbs=len(Tables.NAMES), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            tables = Tables(env, txn, create=False)
            identity = uuid.UUID(bytes=txn.get(b"uuid", db=tables.meta))
            records = [
                (int.from_bytes(key, "big"), bytes(value))
                for key, value in txn.cursor(db=tables.log)
            ]
    finally:
        env.close()
    return identity, records


def fill(ts: TelescopeState, start: int = 0, count: int = 40) -> None:
    for i in range(start, start + count):
        ts.add("sensor", float(i), ts=100.0 + i)
        if i % 7 == 0:
            ts.set_indexed("indexed", i, {"i": i})
        if i % 10 == 0:
            ts.add(f"attr{i}", [i, "x"], immutable=True)
    ts.add("long", b"v" * 2000, ts=1.0)  # stored once, in the log
    ts.delete("attr10")


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "filled"
    backend = LmdbBackend(path, durability="none")
    fill(TelescopeState(backend))
    backend.close()
    return path


# --- the definition -----------------------------------------------------------------------


def test_chain_is_sha256_over_the_previous_chain_and_the_record(filled):
    identity, records = raw_log(filled)
    chain = hashlib.sha256(b"telstate-chain-v1" + identity.bytes).digest()
    backend = LmdbBackend(filled, readonly=True)
    assert backend.chain_at(0) == chain
    events = list(backend.events())
    assert [event.seq for event in events] == [seq for seq, _ in records]
    for (seq, record), event in zip(records, events):
        chain = hashlib.sha256(chain + record[:-32]).digest()
        assert record[-32:] == chain == event.chain == backend.chain_at(seq)
    assert backend.head == (records[-1][0], chain)
    with backend.snapshot() as snap:
        assert (snap.seq, snap.chain) == backend.head
    history = list(backend.history(b"sensor"))
    assert history[0].chain == events[0].chain
    with pytest.raises(ValueError, match="no event"):
        backend.chain_at(len(records) + 1)
    backend.close()


def test_an_empty_store_has_the_genesis_chain(tmp_path):
    backend = LmdbBackend(tmp_path / "empty")
    assert backend.head == (0, log.genesis(backend.uuid))
    with backend.snapshot() as snap:
        assert (snap.seq, snap.chain) == (0, log.genesis(backend.uuid))
    backend.close()


def test_chain_goes_on_across_processes_and_writers(filled):
    backend = LmdbBackend(filled, durability="none")
    ts = TelescopeState(backend)
    ts.add("mine", 1, ts=1.0)  # this process now caches the head
    other = (
        "from telstate import TelescopeState; from telstate.lmdb import LmdbBackend; "
        f"ts = TelescopeState(LmdbBackend({str(filled)!r}, writer_name='other')); "
        "ts.add('theirs', 2, ts=2.0); ts.backend.close()"
    )
    subprocess.run([sys.executable, "-c", other], cwd=REPO, check=True, timeout=60)
    ts.add("mine", 3, ts=3.0)  # must chain from the other process's event
    assert backend.verify() == []
    backend.close()


def test_log_and_history_json_show_the_chain(filled):
    backend = LmdbBackend(filled, readonly=True)
    chains = [event.chain.hex() for event in backend.events()]
    sensor = [event.chain.hex() for event in backend.history(b"sensor")]
    backend.close()
    assert json.loads(telstate_cli("--json", "info", str(filled)).stdout)["chain"] == chains[-1]
    shown = telstate_cli("--json", "log", str(filled))
    assert [json.loads(line)["chain"] for line in shown.stdout.splitlines()] == chains
    shown = telstate_cli("--json", "history", str(filled), "sensor")
    assert [json.loads(line)["chain"] for line in shown.stdout.splitlines()] == sensor


_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "set", "index", "delete"]), st.integers(0, 3)),
    min_size=2,
    max_size=25,
)


def _apply(ts: TelescopeState, op: str, n: int, i: int) -> None:
    if op == "add":
        ts.add(f"s{n}", i, ts=float(i))
    elif op == "set":
        ts.add(f"k{n}{i}", n, immutable=True)
    elif op == "index":
        ts.set_indexed(f"x{n}", i, n)
    elif f"s{n}" in ts:
        ts.delete(f"s{n}")
    else:
        ts.add(f"s{n}", -i, ts=0.5)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS, data=st.data())
def test_same_history_same_chain_and_a_different_op_changes_it_from_there(
    tmp_path_factory, monkeypatch, ops, data
):
    """Two copies of a store given the same ops have the same chain, until one op differs."""
    monkeypatch.setattr(time, "time", lambda: 1e9)  # identical records for identical ops
    base = tmp_path_factory.mktemp("chain")
    LmdbBackend(base / "a", durability="none").close()
    shutil.copytree(base / "a", base / "b")  # same UUID
    middle = data.draw(st.integers(0, len(ops) - 1))
    other = data.draw(
        st.sampled_from(["add", "set", "index"]).filter(lambda op: op != ops[middle][0])
    )
    heads = []
    for name, changed in (("a", False), ("b", True)):
        backend = LmdbBackend(base / name, durability="none")
        ts = TelescopeState(backend)
        seq_at_middle = 0
        for i, (op, n) in enumerate(ops):
            if i == middle:
                seq_at_middle = backend.last_seq + 1
                op = other if changed else op
            _apply(ts, op, n, i)
        # Replaying the events' own fields gives the stored chain.
        chain = backend.chain_at(0)
        for event in backend.events():
            chain = hashlib.sha256(chain + _body(event)).digest()
            assert chain == event.chain
        assert backend.verify() == []
        heads.append((seq_at_middle, [backend.chain_at(s) for s in range(backend.last_seq + 1)]))
        backend.close()
    (middle_a, chains_a), (middle_b, chains_b) = heads
    assert middle_a == middle_b
    common = min(len(chains_a), len(chains_b))
    for seq in range(common):
        assert (chains_a[seq] == chains_b[seq]) == (seq < middle_a)


def _body(event: log.Event) -> bytes:
    """The record of `event` without its chain, rebuilt from the event's fields."""
    codes = {op: code for code, op in enumerate(log.Op, start=1)}
    return log.encode_record(
        codes[event.op],
        1,
        event.time,
        event.key or b"",
        event.sub_key or b"",
        event.value or b"",
        event.timestamp if event.timestamp is not None else float("nan"),
    )


# --- format 1 stores ----------------------------------------------------------------------


def make_format_1(path: Path) -> None:
    """Turn a store into what telstate wrote before the chain: records without it, format 1."""
    env = lmdb.open(str(path), max_dbs=len(Tables.NAMES))
    with env.begin(write=True) as txn:
        tables = Tables(env, txn, create=False)
        for key, value in list(txn.cursor(db=tables.log)):
            txn.put(key, bytes(value)[:-32], db=tables.log)
        txn.put(b"format", b"1", db=tables.meta)
    env.close()


def test_format_1_store_is_refused_then_upgraded(filled, capsys):
    _, before = raw_log(filled)
    make_format_1(filled)
    with pytest.raises(StoreError, match=r"log format 1 .*telstate upgrade"):
        LmdbBackend(filled, readonly=True)
    with pytest.raises(StoreError, match="telstate upgrade"):
        LmdbBackend(filled)
    refused = telstate_cli("info", str(filled))
    assert refused.returncode == 3 and "telstate upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = telstate_cli("upgrade", str(filled))
    assert done.returncode == 0, done.stderr
    assert f"from log format 1 to 2 ({len(before)} events)" in done.stdout
    # Same bytes, same identity: the same chain as if written by this version.
    assert raw_log(filled)[1] == before
    assert telstate_cli("verify", str(filled)).returncode == 0
    again = telstate_cli("upgrade", str(filled))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    backend = LmdbBackend(filled)
    assert TelescopeState(backend).get("long") == b"v" * 2000
    backend.close()


def test_upgrade_in_chunks_gives_the_same_chain(filled, monkeypatch):
    from telstate.lmdb import upgrade as upgrade_module

    _, before = raw_log(filled)
    make_format_1(filled)
    monkeypatch.setattr(upgrade_module, "_CHUNK", 7)
    assert upgrade(filled) == (1, len(before))
    assert raw_log(filled)[1] == before
    assert upgrade(filled) == (2, 0)


def test_upgrade_killed_at_random_points_leaves_format_1_or_a_complete_format_2(tmp_path):
    original = tmp_path / "original"
    backend = LmdbBackend(original, durability="none")
    ts = TelescopeState(backend)
    for i in range(20000):
        ts.add(f"sensor{i % 50}", float(i), ts=1e9 + i)
    backend.close()
    _, chained = raw_log(original)
    make_format_1(original)
    _, unchained = raw_log(original)
    # Kill times span the upgrade (about 0.3 s here): both outcomes occur.
    rng = random.Random(12)
    for attempt in range(6):
        path = tmp_path / f"attempt{attempt}"
        shutil.copytree(original, path)
        process = subprocess.Popen(
            [sys.executable, "-m", "telstate.cli", "upgrade", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.0, 0.8))
        process.kill()
        process.wait()
        records = raw_log(path)[1]
        if records == unchained:
            with pytest.raises(StoreError, match="telstate upgrade"):
                LmdbBackend(path, readonly=True)
            assert telstate_cli("upgrade", str(path)).returncode == 0
            records = raw_log(path)[1]
        assert records == chained
        assert telstate_cli("verify", str(path)).returncode == 0


def test_upgrade_refuses_unknown_formats_and_non_stores(filled, tmp_path):
    env = lmdb.open(str(filled), max_dbs=len(Tables.NAMES))
    with env.begin(write=True) as txn:
        txn.put(b"format", b"9", db=Tables(env, txn, create=False).meta)
    env.close()
    with pytest.raises(StoreError, match="cannot upgrade"):
        upgrade(filled)
    with pytest.raises(StoreError, match="no telstate store"):
        upgrade(tmp_path / "nowhere")
    result = telstate_cli("upgrade", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


# --- verify ---------------------------------------------------------------------------------


def flip_in_file(path: Path, seq: int, offset_from_end: int) -> None:
    """Flip one byte of event `seq`'s record where it lies in the LMDB data file.

    Copy-on-write leaves stale copies of the page in free pages: the byte is
    flipped in each copy, so the one the log's B-tree points at is among them.
    """
    _, records = raw_log(path)
    record = dict(records)[seq]
    data = bytearray((path / "data.mdb").read_bytes())
    where = data.find(record)
    assert where >= 0, "record not found in the file"
    while where >= 0:
        data[where + len(record) - offset_from_end] ^= 0x01
        where = data.find(record, where + 1)
    (path / "data.mdb").write_bytes(bytes(data))


def test_a_flipped_byte_in_an_event_value_fails_verify_naming_its_seq(filled):
    assert telstate_cli("verify", str(filled)).returncode == 0
    backend = LmdbBackend(filled, readonly=True)
    target = [e for e in backend.events() if e.key == b"sensor"][17]
    last_seq = backend.last_seq
    backend.close()
    flip_in_file(filled, target.seq, 32 + 1)  # the value's last byte, just before the chain
    result = telstate_cli("verify", str(filled))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"event {target.seq} does not match its chain hash" in result.stdout
    assert "key 'sensor': value differs" in result.stdout
    # Only that event is named: the chain after it still links to its stored hash.
    assert result.stdout.count("does not match its chain") == 1
    shown = telstate_cli("--json", "verify", str(filled))
    assert json.loads(shown.stdout)["seq"] == last_seq


def test_an_undecodable_event_fails_verify_without_a_traceback(filled):
    backend = LmdbBackend(filled, readonly=True)
    target = [e for e in backend.events() if e.key == b"indexed"][2]
    backend.close()
    _, records = raw_log(filled)
    record = dict(records)[target.seq]
    flip_in_file(filled, target.seq, len(record) - 22)  # the high byte of the key length
    result = telstate_cli("verify", str(filled))
    assert result.returncode == 1, result.stderr
    assert f"event {target.seq} cannot be decoded" in result.stdout
    assert "Traceback" not in result.stderr


def test_damaged_state_tables_fail_verify_without_a_traceback(filled):
    env = lmdb.open(str(filled), max_dbs=len(Tables.NAMES))
    with env.begin(write=True) as txn:
        txn.put(b"\x01sensor", b"\x02", db=Tables(env, txn, create=False).keys)
    env.close()
    result = telstate_cli("verify", str(filled))
    assert result.returncode == 1, result.stderr
    assert "state: unreadable" in result.stdout and "Traceback" not in result.stderr


def edit_tables(path: Path, edit) -> None:
    """Run ``edit(txn, tables)`` in a write transaction of plain LMDB (no checksums to fix)."""
    env = lmdb.open(str(path), max_dbs=len(Tables.NAMES))
    try:
        with env.begin(write=True) as txn:
            edit(txn, Tables(env, txn, create=False))
    finally:
        env.close()


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def test_verify_fails_when_state_and_history_index_swap_two_keys_events(tmp_path):
    """The log is intact; two keys' values are swapped in the state and so are their
    history entries: each key replayed through its entries would match its state."""
    path = tmp_path / "swapped"
    with LmdbBackend(path, durability="none") as backend:
        ts = TelescopeState(backend)
        ts.add("gain_ok", "x", immutable=True)  # seq 1
        ts.add("gain_bad", "y", immutable=True)  # seq 2

    def swap(txn, tables):
        ok, bad = b"\x01gain_ok", b"\x01gain_bad"
        ok_record, bad_record = txn.get(ok, db=tables.keys), txn.get(bad, db=tables.keys)
        txn.put(ok, bad_record[:-1] + ok_record[-1:], db=tables.keys)  # same key id
        txn.put(ok, ok_record[:-1] + bad_record[-1:], db=tables.keys)
        txn.put(bad, bad_record[:-1] + ok_record[-1:], db=tables.keys)
        for name_key, old, new in ((ok, 1, 2), (bad, 2, 1)):
            assert txn.delete(name_key, seq_key(old), db=tables.history)
            txn.put(name_key, seq_key(new), db=tables.history)

    edit_tables(path, swap)
    with LmdbBackend(path, readonly=True) as backend:
        assert dict((k, v) for k, _, v in backend.records()) == {
            b"gain_ok": b"\xff\xa1y",
            b"gain_bad": b"\xff\xa1x",
        }
        problems = backend.verify()
    assert "key 'gain_ok': the history index lists 1 event of other keys" in problems[2]
    assert "key 'gain_ok': in the state but not in the log (its last event: 2)" in problems
    assert problems[-1].startswith("history index: it does not list the log's events")
    result = telstate_cli("verify", str(path))
    assert result.returncode == 1 and "verify FAILED: 5 problems" in result.stdout


def test_verify_fails_when_a_history_entry_names_an_event_not_in_the_log(tmp_path):
    """Same counts and the same replayed values: only the entries' seqs are wrong."""
    path = tmp_path / "dangling"
    with LmdbBackend(path, durability="none") as backend:
        ts = TelescopeState(backend)
        ts.add("s", 1.0, ts=1.0)  # seq 1
        ts.add("t", 1.0, ts=1.0)  # seq 2
        ts.clear()  # seq 3
        ts.add("s", 1.0, ts=1.0)  # seq 4
        assert backend.verify() == []

    def move(txn, tables):
        assert txn.delete(b"\x01s", seq_key(1), db=tables.history)  # before the clear
        txn.put(b"\x01s", seq_key(99), db=tables.history)  # no such event

    edit_tables(path, move)
    with LmdbBackend(path, readonly=True) as backend:
        assert backend.verify() == [
            "history index: it does not list the log's events under their keys "
            "(the counts agree, the seqs do not)"
        ]

    def clear_elsewhere(txn, tables):
        # The clear's entry names no event, and the clear is listed under a key.
        assert txn.delete(b"\x00", seq_key(3), db=tables.history)
        txn.put(b"\x00", seq_key(99), db=tables.history)
        assert txn.delete(b"\x01s", seq_key(99), db=tables.history)
        txn.put(b"\x01s", seq_key(3), db=tables.history)

    edit_tables(path, clear_elsewhere)
    with LmdbBackend(path, readonly=True) as backend:
        problems = backend.verify()
    assert problems[-1].startswith("history index: it does not list the log's events")


def test_a_log_key_that_is_not_a_seq_is_reported_by_verify(filled):
    _, records = raw_log(filled)

    def insert(txn, tables):
        txn.put(seq_key(5) + b"\x00", dict(records)[5], db=tables.log)  # between 5 and 6

    edit_tables(filled, insert)
    result = telstate_cli("verify", str(filled))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "  log: a key of 9 bytes (000000000000000500) after event 5 is not a seq "
        "(its entry is ignored)"
    ]
    assert "Traceback" not in result.stderr


def test_history_entries_that_are_not_seqs_are_reported_by_verify(filled):
    def insert(txn, tables):
        txn.put(b"\x00", seq_key(5) + b"\x00", db=tables.history)  # a clear of 9 bytes
        txn.put(b"\x01gone", b"\x00" * 9, db=tables.history)

    edit_tables(filled, insert)
    result = telstate_cli("verify", str(filled))
    assert result.returncode == 1, result.stderr
    assert "history index: its clears are unreadable" in result.stdout
    assert "key 'gone': its history is unreadable" in result.stdout
    assert "history index: 2 chunks of entries are not seqs" in result.stdout
    assert "Traceback" not in result.stderr
    export = filled.parent / "export.rdb"
    assert telstate_cli("export", str(filled), str(export), "--until", "10").returncode == 0
    result = telstate_cli("verify", str(filled), "--rdb", str(export))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "  history index: its clears are unreadable (unpack requires a buffer of 8 bytes)",
        "  key 'gone': its history is unreadable (unpack requires a buffer of 8 bytes)",
    ]


def test_a_log_rewritten_with_recomputed_chains_passes_verify_but_not_an_older_export(
    filled, tmp_path
):
    """The chain has no secret (as the README says): only a position recorded before
    the rewrite, here an export's, tells the rewritten history from the original."""
    before = tmp_path / "before.rdb"
    assert telstate_cli("export", str(filled), str(before)).returncode == 0
    identity, records = raw_log(filled)
    attr = b"\x01attr0"
    target = next(seq for seq, record in records if b"attr0" in record)

    def rewrite(txn, tables):
        chain = log.genesis(identity)
        for seq, record in records:
            body = record[: -log.CHAIN_SIZE]
            if seq == target:  # attr0 = [0, 'x'] becomes [0, 'y']
                assert body.endswith(b"x")
                body = body[:-1] + b"y"
            record = log.seal(body, chain)
            chain = record[-log.CHAIN_SIZE :]
            txn.put(seq_key(seq), record, db=tables.log)
        state = txn.get(attr, db=tables.keys)
        txn.put(attr, state[:-1] + b"y", db=tables.keys)

    edit_tables(filled, rewrite)
    assert telstate_cli("verify", str(filled)).returncode == 0
    failed = telstate_cli("verify", str(filled), "--rdb", str(before))
    assert failed.returncode == 1 and "another history" in failed.stdout


def test_verify_rdb_reports_keys_the_reader_passes_over(filled, tmp_path):
    """A list, or an empty hash, added to an export is in the file: not "exactly the state"."""
    from telstate.rdb_utility import crc64

    export = tmp_path / "export.rdb"
    assert telstate_cli("export", str(filled), str(export)).returncode == 0
    body = export.read_bytes()[:-9]  # less the end opcode and the checksum
    for extra, what in (
        (b"\x01\x05extra\x01\x03abc", "1 list key(s)"),  # a list ['abc']
        (b"\x04\x05extra\x00", "1 empty hash key(s)"),
    ):
        edited = tmp_path / "edited.rdb"
        data = body + extra + b"\xff"
        edited.write_bytes(data + crc64(data).to_bytes(8, "little"))
        result = telstate_cli("verify", str(filled), "--rdb", str(edited))
        assert result.returncode == 1, result.stdout
        assert f"the file holds {what} that are no telstate keys" in result.stdout


def test_verify_rdb_against_the_position_the_file_claims(filled, tmp_path):
    early = tmp_path / "early.rdb"
    assert telstate_cli("export", str(filled), str(early)).returncode == 0
    backend = LmdbBackend(filled, durability="none")
    seq, chain = backend.head
    assert read_aux(early)[b"telstate-chain"] == chain.hex().encode()
    fill(TelescopeState(backend), 40, 10)  # the file is now of an older seq
    backend.close()
    ok = telstate_cli("verify", str(filled), "--rdb", str(early))
    assert ok.returncode == 0, ok.stdout
    assert f"exactly the state at seq {seq}" in ok.stdout

    # A byte of a value edited in place: the file is damaged (its checksum).
    edited = tmp_path / "edited.rdb"
    data = bytearray(early.read_bytes())
    data[data.find(b"vvvvvvvv") + 3] ^= 0x01
    edited.write_bytes(bytes(data))
    failed = telstate_cli("verify", str(filled), "--rdb", str(edited))
    assert failed.returncode == 1 and "FAILED" in failed.stdout

    # Rewritten with a valid checksum, the same AUX fields and one sample fewer.
    rewritten = tmp_path / "rewritten.rdb"
    with RDBWriter(rewritten, aux=read_aux(early)) as writer:
        for key, key_type, value in read_records(early):
            writer.write_record(key, key_type, value[1:] if key == b"sensor" else value)
    failed = telstate_cli("--json", "verify", str(filled), "--rdb", str(rewritten))
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["differences"] == [
        "key 'sensor': value differs between file and log"
    ]

    # Claiming another chain at the same seq (another history).
    aux = {**read_aux(early), b"telstate-chain": b"00" * 32}
    claimed = tmp_path / "claimed.rdb"
    with RDBWriter(claimed, aux=aux) as writer:
        for record in read_records(early):
            writer.write_record(*record)
    failed = telstate_cli("verify", str(filled), "--rdb", str(claimed))
    assert failed.returncode == 1 and "another history" in failed.stdout

    # A file that claims no position (not written by telstate).
    unclaimed = tmp_path / "unclaimed.rdb"
    with RDBWriter(unclaimed) as writer:
        for record in read_records(early):
            writer.write_record(*record)
    failed = telstate_cli("verify", str(filled), "--rdb", str(unclaimed))
    assert failed.returncode == 1 and "claims no log position" in failed.stdout


def test_an_export_until_a_time_records_its_position_and_verifies(filled, tmp_path):
    backend = LmdbBackend(filled, durability="none")
    events = list(backend.events())
    middle = events[len(events) // 2]
    fill(TelescopeState(backend), 40, 5)
    backend.close()
    replayed = tmp_path / "replayed.rdb"
    until = f"@{middle.time!r}"
    result = telstate_cli("replay", str(filled), "--until", until, "--rdb", str(replayed))
    assert result.returncode == 0, result.stderr
    aux = read_aux(replayed)
    # The events before the first appended after the time (several may share it).
    seq = next(event.seq for event in events if event.time > middle.time) - 1
    assert seq >= middle.seq
    assert aux[b"telstate-seq"] == b"%d" % seq
    assert aux[b"telstate-chain"] == events[seq - 1].chain.hex().encode()
    assert aux[b"telstate-replay-until"] == until.encode()
    ok = telstate_cli("verify", str(filled), "--rdb", str(replayed))
    assert ok.returncode == 0, ok.stdout
    assert f"exactly the state at seq {seq}" in ok.stdout
    exported = tmp_path / "exported.rdb"
    result = telstate_cli("--json", "export", str(filled), str(exported), "--until", until)
    assert json.loads(result.stdout)["seq"] == seq
    assert list(read_records(exported)) == list(read_records(replayed))
    before = telstate_cli("export", str(filled), str(exported), "--until", "@0")
    assert before.stdout == f"exported 0 keys (state at @0: seq 0) to {exported}\n"
    assert read_aux(exported)[b"telstate-seq"] == b"0"
    assert telstate_cli("verify", str(filled), "--rdb", str(exported)).returncode == 0


def test_verify_rdb_of_past_and_selected_exports(filled, tmp_path):
    past = tmp_path / "past.rdb"
    assert telstate_cli("export", str(filled), str(past), "--until", "12").returncode == 0
    assert read_aux(past)[b"telstate-seq"] == b"12"
    ok = telstate_cli("verify", str(filled), "--rdb", str(past))
    assert ok.returncode == 0 and "exactly the state at seq 12" in ok.stdout
    light = tmp_path / "light.rdb"
    assert telstate_cli("export", str(filled), str(light), "--keys", "attr*").returncode == 0
    ok = telstate_cli("--json", "verify", str(filled), "--rdb", str(light))
    assert ok.returncode == 0 and json.loads(ok.stdout)["complete"] is False
    changed = tmp_path / "changed.rdb"
    with RDBWriter(changed, aux=read_aux(light)) as writer:
        for key, key_type, value in read_records(light):
            writer.write_record(key, key_type, value + b"!" if key == b"attr20" else value)
    failed = telstate_cli("verify", str(filled), "--rdb", str(changed))
    assert failed.returncode == 1 and "key 'attr20': value differs" in failed.stdout


def rewrite_rdb(source: Path, target: Path, aux: dict[bytes, bytes], keep=lambda key: True) -> None:
    with RDBWriter(target, aux=aux, keep_empty=True) as writer:
        for record in read_records(source):
            if keep(record[0]):
                writer.write_record(*record)


def test_verify_rdb_of_a_selection_checks_that_it_holds_exactly_the_selected_keys(filled, tmp_path):
    light = tmp_path / "light.rdb"
    args = ("--keys", "attr*", "--keys", "in,dexed", "--view", "")
    assert telstate_cli("export", str(filled), str(light), *args).returncode == 0
    aux = read_aux(light)
    assert json.loads(aux[b"telstate-selection-json"]) == {
        "patterns": ["attr*", "in,dexed"],
        "view": "",
    }
    assert [key for key, _, _ in read_records(light)] == [b"attr0", b"attr20", b"attr30"]
    ok = telstate_cli("verify", str(filled), "--rdb", str(light))
    assert ok.returncode == 0, ok.stdout
    assert "is exactly the keys selected by 'view= keys=attr*,in,dexed' of the state" in ok.stdout

    # A selected key taken out.
    missing = tmp_path / "missing.rdb"
    rewrite_rdb(light, missing, aux, keep=lambda key: key != b"attr20")
    failed = telstate_cli("--json", "verify", str(filled), "--rdb", str(missing))
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["differences"] == [
        "key 'attr20': in the log but not in the file"
    ]
    # A key of the state that the selection does not hold, put in.
    extra = tmp_path / "extra.rdb"
    full = tmp_path / "full.rdb"
    assert telstate_cli("export", str(filled), str(full)).returncode == 0
    rewrite_rdb(full, extra, aux, keep=lambda key: key.startswith(b"attr") or key == b"long")
    failed = telstate_cli("verify", str(filled), "--rdb", str(extra))
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[1:] == ["  key 'long': in the file but not in its selection"]
    # Every key taken out, the selection widened to everything.
    empty = tmp_path / "empty.rdb"
    rewrite_rdb(
        full,
        empty,
        {**aux, b"telstate-selection-json": b'{"patterns": ["*"], "view": null}'},
        keep=lambda key: False,
    )
    failed = telstate_cli("verify", str(filled), "--rdb", str(empty))
    assert (
        failed.returncode == 1 and "key 'sensor': in the log but not in the file" in failed.stdout
    )
    # A selection that cannot be read.
    garbled = tmp_path / "garbled.rdb"
    rewrite_rdb(light, garbled, {**aux, b"telstate-selection-json": b"keys=attr*"})
    failed = telstate_cli("verify", str(filled), "--rdb", str(garbled))
    assert (
        failed.returncode == 1 and "selection (telstate-selection-json) is damaged" in failed.stdout
    )

    # A file of an earlier export: its selection only described, so only its keys are checked.
    old = tmp_path / "old.rdb"
    old_aux = {key: value for key, value in aux.items() if key != b"telstate-selection-json"}
    rewrite_rdb(light, old, old_aux, keep=lambda key: key != b"attr20")
    ok = telstate_cli("--json", "verify", str(filled), "--rdb", str(old))
    assert ok.returncode == 0
    shown = json.loads(ok.stdout)
    assert (shown["complete"], shown["checked"]) == (False, "keys in the file")
    ok = telstate_cli("verify", str(filled), "--rdb", str(old))
    assert "the 2 keys in" in ok.stdout and "not checked" in ok.stdout
    assert "exactly" not in ok.stdout
    changed = tmp_path / "changed.rdb"
    with RDBWriter(changed, aux=old_aux) as writer:
        for key, key_type, value in read_records(light):
            writer.write_record(key, key_type, value + b"!" if key == b"attr20" else value)
    failed = telstate_cli("verify", str(filled), "--rdb", str(changed))
    assert failed.returncode == 1 and "key 'attr20': value differs" in failed.stdout


# --- projections of a restored store ----------------------------------------------------------


def test_mirror_of_a_store_restored_from_an_older_copy_is_rebuilt(store, server, daemons, tmp_path):
    Writer(store, count=300, rate=5000, seed=11).join()
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    daemon = daemons(store, server.url)
    Writer(store, count=300, rate=5000, seed=12).join()
    settle(store, server.client(), daemon)
    daemon.stop()
    mirrored = LmdbBackend(store, readonly=True)
    mirrored_seq = mirrored.last_seq
    mirrored.close()

    shutil.rmtree(store)
    shutil.copytree(copy, store)  # restored: the events after the copy are lost
    Writer(store, count=500, rate=5000, seed=13).join()
    restored = LmdbBackend(store, readonly=True)
    assert restored.last_seq > mirrored_seq
    restored.close()
    status = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "--log", str(store), "--redis"]
        + [server.url, "--json"],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert "another history" in json.loads(status.stdout)["mirror"]["error"]
    daemon = daemons(store, server.url)
    settle(store, server.client(), daemon)  # the mirror equals the store, sample for sample
    daemon.stop()
    assert "restored from an older copy" in daemon.log_text()
    assert f"chain at seq {mirrored_seq}" in daemon.log_text()


def test_snapshots_of_a_store_restored_from_an_older_copy(store, tmp_path):
    rdb = tmp_path / "rdb"
    once = [sys.executable, "-m", "replicator", "--log", str(store), "--rdb-dir", str(rdb)]
    Writer(store, count=300, rate=5000, seed=21).join()
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    Writer(store, count=300, rate=5000, seed=22).join()
    assert subprocess.run(once + ["--once"], cwd=REPO, timeout=60).returncode == 0
    (old,) = list_snapshots(rdb)

    shutil.rmtree(store)
    shutil.copytree(copy, store)
    Writer(store, count=200, rate=5000, seed=23).join()  # fewer: seq below the snapshot's
    backend = LmdbBackend(store, readonly=True)
    assert backend.last_seq < old.seq
    run = subprocess.run(once + ["--once"], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "not of the store's current history" in run.stderr + run.stdout
    (new,) = list_snapshots(rdb)
    assert new.seq == backend.last_seq and new.chain == backend.head[1].hex()[:16]
    with backend.snapshot() as snap:
        expected = record_contents(snap.records())
    backend.close()
    assert differences(expected, record_contents(read_records(new.path))) == []
    assert (rdb / DIVERGED / old.path.name).exists()
    assert telstate_cli("verify", str(store), "--rdb", str(new.path)).returncode == 0
    stale = telstate_cli("verify", str(store), "--rdb", str(rdb / DIVERGED / old.path.name))
    assert stale.returncode == 1 and "log ends at" in stale.stdout


def test_two_histories_at_the_same_seq_give_different_snapshot_names(tmp_path):
    from replicator.snapshot_sink import SnapshotSink

    path = tmp_path / "s"
    LmdbBackend(path, durability="none").close()
    shutil.copytree(path, tmp_path / "t")
    names = []
    for name, value in (("s", 1), ("t", 2)):
        backend = LmdbBackend(tmp_path / name, durability="none")
        TelescopeState(backend).add("x", value, immutable=True)
        sink = SnapshotSink(backend, tmp_path / f"rdb-{name}", interval=3600, keep=2)
        written = sink.write()
        assert written is not None
        names.append(written.path.name)
        backend.close()
    assert names[0] != names[1] and names[0][:-21] == names[1][:-21]
