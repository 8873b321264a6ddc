"""RDBWriter on its own: records, DUMP payloads, AUX fields and the file's life cycle.

Loading written files into real servers and katsdptelstate is tested in
test_rdb_servers.py.
"""

from __future__ import annotations

import logging
import os
import struct

import pytest

import telstate
from telstate import rdb_utility
from telstate.errors import RdbParseError
from telstate.memory import MemoryBackend
from telstate.rdb_reader import RdbReader, read_aux, read_records
from telstate.rdb_writer import RDBWriter
from telstate.utils import KeyType

from .test_rdb_reader import listpack, string

IMMUTABLE, MUTABLE, INDEXED = KeyType.IMMUTABLE, KeyType.MUTABLE, KeyType.INDEXED


def sample(t: float, value: bytes) -> bytes:
    return struct.pack(">d", t) + value


RECORDS = [
    (b"attr", IMMUTABLE, b"\xff\x92\x01\x02"),
    (b"empty", IMMUTABLE, b""),
    (b"sensor", MUTABLE, [sample(float(i), b"\xff%d" % i) for i in range(300)]),
    (b"small sensor", MUTABLE, [sample(1.0, b"a")]),
    (b"indexed", INDEXED, {b"\xa1a": b"\xff\x01", b"\xa1b": b"\xff" * 100}),
    (b"\x00binary\xff", INDEXED, {b"f%d" % i: b"v" for i in range(200)}),
]


def test_records_round_trip(tmp_path) -> None:
    path = tmp_path / "out.rdb"
    with RDBWriter(path) as writer:
        for record in RECORDS:
            writer.write_record(*record)
    assert writer.keys_written == len(RECORDS) and writer.keys_failed == 0
    data = path.read_bytes()
    assert data.startswith(b"REDIS0009") and data[-9] == 0xFF
    reader = RdbReader(path)
    assert list(reader) == RECORDS
    assert reader.checksum == rdb_utility.crc64(data[:-8]) != 0


def test_zset_members_are_sorted_and_distinct(tmp_path) -> None:
    members = [sample(2.0, b"b"), sample(1.0, b"a"), sample(2.0, b"b"), sample(0.5, b"")]
    with RDBWriter(tmp_path / "out.rdb") as writer:
        writer.write_record(b"small", MUTABLE, members)
        writer.write_record(b"large", MUTABLE, members * 100 + [b"%d" % i for i in range(200)])
    records = dict((key, value) for key, _, value in read_records(tmp_path / "out.rdb"))
    assert records[b"small"] == sorted(set(members))
    assert records[b"large"] == sorted(set(members) | {b"%d" % i for i in range(200)})


def test_aux_fields(tmp_path) -> None:
    path = tmp_path / "out.rdb"
    aux = {b"telstate-store-uuid": b"0123", b"telstate-seq": b"42"}
    with RDBWriter(path, aux=aux) as writer:
        writer.write_record(b"k", IMMUTABLE, b"v")
    assert read_aux(path) == aux
    assert list(read_records(path)) == [(b"k", IMMUTABLE, b"v")]
    with RDBWriter(path, aux={"telstate-seq": "43"}) as writer:
        writer.write_record(b"k", IMMUTABLE, b"v")
    assert read_aux(path) == {b"telstate-seq": b"43"}


def test_compression(tmp_path) -> None:
    value = b"compressible " * 1000
    for compress in (False, True):
        path = tmp_path / f"{compress}.rdb"
        with RDBWriter(path, compress=compress) as writer:
            writer.write_record(b"attr", IMMUTABLE, value)
            writer.write_record(b"sensor", MUTABLE, [sample(float(i), value) for i in range(3)])
            writer.write_record(b"big sensor", MUTABLE, [sample(i, value) for i in range(200)])
            writer.write_record(b"indexed", INDEXED, {b"a": value, b"b": b"c" * 30})
        assert (path.stat().st_size < 50_000) == compress
        records = {key: value for key, _, value in read_records(path)}
        assert records[b"attr"] == value and records[b"indexed"][b"a"] == value
        assert len(records[b"big sensor"]) == 200


def test_large_file_spans_flushes(tmp_path) -> None:
    path = tmp_path / "big.rdb"
    value = bytes(range(256)) * 1000
    with RDBWriter(path) as writer:
        for i in range(40):
            writer.write_record(b"k%d" % i, IMMUTABLE, value + b"%d" % i)
    assert path.stat().st_size > 10_000_000
    assert [v[-2:] for _, _, v in read_records(path)][-1] == b"39"


def test_empty_file_is_removed(tmp_path, caplog) -> None:
    path = tmp_path / "empty.rdb"
    with caplog.at_level(logging.ERROR, logger="telstate.rdb_writer"):
        with RDBWriter(path) as writer:
            writer.save(MemoryBackend())
    assert not path.exists()
    assert "No valid keys" in caplog.text
    writer.close()  # a second close does nothing


def test_closed_writer_refuses_writes(tmp_path) -> None:
    writer = RDBWriter(tmp_path / "out.rdb")
    writer.write_record(b"k", IMMUTABLE, b"v")
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write_record(b"k2", IMMUTABLE, b"v")
    with pytest.raises(ValueError, match="closed"):
        writer.save(MemoryBackend())
    assert list(read_records(tmp_path / "out.rdb")) == [(b"k", IMMUTABLE, b"v")]


def test_bad_records(tmp_path) -> None:
    with RDBWriter(tmp_path / "out.rdb") as writer:
        with pytest.raises(TypeError):
            writer.write_record(b"k", MUTABLE, b"not a list")
        with pytest.raises(TypeError):
            writer.write_record(b"k", IMMUTABLE, [b"a"])
        with pytest.raises(ValueError, match="empty"):
            writer.write_record(b"k", INDEXED, {})
        writer.write_record(b"ok", IMMUTABLE, b"v")
    assert writer.keys_written == 1


def test_save_from_telescope_state_and_backend(tmp_path, caplog) -> None:
    ts = telstate.TelescopeState()
    ts.backend.load_records(RECORDS)
    ts.view("ns")["attr"] = 5
    expected = {key: value for key, _, value in RECORDS}
    expected[b"ns_attr"] = ts.backend.get(b"ns_attr")[0]
    with RDBWriter(tmp_path / "all.rdb") as writer:
        writer.save(ts.view("ns"))  # the whole backend, whatever the view
    assert {key: value for key, _, value in read_records(tmp_path / "all.rdb")} == expected
    with caplog.at_level(logging.ERROR, logger="telstate.rdb_writer_base"):
        with RDBWriter(tmp_path / "some.rdb") as writer:
            writer.save(ts.backend, keys=["sensor", b"indexed", "missing"])
    assert (writer.keys_written, writer.keys_failed) == (2, 1)
    # As katsdptelstate logs it (its log scrapers look for this).
    assert caplog.record_tuples[-1] == (
        "telstate.rdb_writer_base",
        logging.ERROR,
        "Failed to save key 'missing': 'Key not found in Redis'",
    )
    records = {key: value for key, _, value in read_records(tmp_path / "some.rdb")}
    assert records == {b"sensor": expected[b"sensor"], b"indexed": expected[b"indexed"]}


class DumpClient:
    """A stand-in for a redis client: keys() and dump() only."""

    def __init__(self, payloads: dict[bytes, bytes]) -> None:
        self.payloads = payloads

    def keys(self, pattern: bytes) -> list[bytes]:
        return list(self.payloads)

    def dump(self, key: bytes) -> bytes | None:
        return self.payloads.get(key)


def test_save_from_dump_payloads(tmp_path, caplog) -> None:
    good = {
        b"string": rdb_utility.dump_string(b"v"),
        b"zset": rdb_utility.dump_zset([b"a", b"b"]),
        b"hash": rdb_utility.dump_hash({b"f": b"v"}),
    }
    # A listpack zset with a non-zero score (as Redis 7 dumps it): scores survive.
    payload = b"\x11" + string(listpack([b"a", 0, b"b", 1, b"c", 0])) + b"\x0a\x00"
    good[b"listpack"] = payload + rdb_utility.crc64(payload).to_bytes(8, "little")
    bad = {
        b"short": b"\x00\x01",
        b"corrupt": b"\x11\x05abcde\x0a\x00" + bytes(8),
        b"unsupported": b"\x13\x00\x0a\x00" + bytes(8),
        b"module": b"\x07" + bytes(12),
    }
    with caplog.at_level(logging.ERROR, logger="telstate.rdb_writer_base"):
        with RDBWriter(tmp_path / "out.rdb") as writer:
            writer.save(DumpClient({**good, **bad}), keys=[*good, *bad, b"missing"])
    assert (writer.keys_written, writer.keys_failed) == (len(good), len(bad) + 1)
    records = {key: value for key, _, value in read_records(tmp_path / "out.rdb")}
    assert records == {
        b"string": b"v",
        b"zset": [b"a", b"b"],
        b"hash": {b"f": b"v"},
        b"listpack": [b"a", b"c", b"b"],  # scores 0, 0, 1
    }
    with RDBWriter(tmp_path / "x.rdb") as writer:
        with pytest.raises(RdbParseError):
            writer.write_dump(b"k", bad[b"corrupt"])


@pytest.mark.parametrize(("flush_size", "batch"), [(64, 3), (16 << 20, 1000)])
def test_save_checks_dump_checksums_together_and_still_finds_a_bad_one(
    tmp_path, caplog, monkeypatch, flush_size, batch
) -> None:
    """save() checks a batch of payloads with one CRC pass and takes the file's CRC from
    their checksums: a wrong checksum among them is still refused, alone, and the file's
    trailer is the CRC of its bytes whatever the flushes."""
    from telstate import rdb_writer

    monkeypatch.setattr(rdb_writer, "_FLUSH_SIZE", flush_size)
    monkeypatch.setattr(rdb_writer, "_DUMP_BATCH", batch)  # several batches
    good = {b"s%d" % i: rdb_utility.dump_string(b"v" * (i * 37)) for i in range(40)}
    good[b"zset"] = rdb_utility.dump_zset([b"a", b"b"])
    good[b"hash"] = rdb_utility.dump_hash({b"f%d" % i: b"v" * i for i in range(300)})
    good[b"zero checksum"] = rdb_utility.dump_string(b"old")[:-8] + bytes(8)
    payload = good[b"s7"]
    bad = payload[:-9] + bytes([payload[-9] ^ 1]) + payload[-8:]
    path = tmp_path / "out.rdb"
    for payloads in ({**good, b"bad": bad}, good):
        with caplog.at_level(logging.ERROR, logger="telstate.rdb_writer_base"):
            with RDBWriter(path, aux={b"a": b"b"}) as writer:
                writer.save(DumpClient(payloads))
        assert (writer.keys_written, writer.keys_failed) == (len(good), len(payloads) - len(good))
        data = path.read_bytes()
        assert int.from_bytes(data[-8:], "little") == rdb_utility.crc64(data[:-8])
        records = {key: value for key, _, value in read_records(path)}
        assert records[b"s39"] == b"v" * 39 * 37 and records[b"zero checksum"] == b"old"
        assert list(records) == [key for key in payloads if key != b"bad"]  # in order
    assert "Failed to save key 'bad'" in caplog.text


def test_write_dump_refuses_a_payload_with_a_bad_checksum(tmp_path):
    """A corrupt (or foreign, e.g. fakeredis's) payload never reaches the file."""
    from telstate.errors import RdbParseError
    from telstate.rdb_utility import dump_string
    from telstate.rdb_writer import RDBWriter

    good = dump_string(b"value")
    bad = good[:-9] + bytes([good[-9] ^ 1]) + good[-8:]
    with RDBWriter(tmp_path / "x.rdb") as writer:
        writer.write_dump(b"good", good)
        with pytest.raises(RdbParseError, match="checksum"):
            writer.write_dump(b"bad", bad)
    assert writer.keys_written == 1


def test_a_failed_body_leaves_the_previous_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "out.rdb"
    with RDBWriter(path) as writer:
        writer.write_record(b"old", IMMUTABLE, b"v")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="half way"):
        with RDBWriter(path) as writer:
            writer.write_record(b"new", IMMUTABLE, b"w")
            assert path.read_bytes() == before  # nothing reaches the target before close
            raise RuntimeError("half way")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.rdb"]
    writer.close()  # closing an aborted writer does nothing
    assert path.read_bytes() == before


def test_a_failed_close_leaves_the_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out.rdb"
    path.write_bytes(b"previous")
    writer = RDBWriter(path)
    writer.write_record(b"k", IMMUTABLE, b"v")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.rdb"]


def test_a_write_that_fails_in_the_background_is_raised_not_lost(monkeypatch) -> None:
    """Full buffers are written by a thread while the next fills: its error (here ENOSPC
    from /dev/full) comes out of the writer's next call, and close() never pretends."""
    from telstate import rdb_writer

    monkeypatch.setattr(rdb_writer, "_FLUSH_SIZE", 1000)
    writer = RDBWriter("/dev/full")
    with pytest.raises(OSError, match="No space"):
        for i in range(100):
            writer.write_record(b"k%d" % i, IMMUTABLE, b"v" * 500)
        writer.close()
    writer.abort()
    with pytest.raises(ValueError, match="closed"):
        writer.write_record(b"k", IMMUTABLE, b"v")


def test_an_empty_writer_keeps_the_previous_file_unless_keep_empty(tmp_path) -> None:
    path = tmp_path / "out.rdb"
    path.write_bytes(b"previous")
    with RDBWriter(path):
        pass
    assert path.read_bytes() == b"previous"
    with RDBWriter(path, keep_empty=True):
        pass
    assert list(read_records(path)) == []
    assert sorted(os.listdir(tmp_path)) == ["out.rdb"]


def test_the_file_gets_the_permissions_open_would_give(tmp_path) -> None:
    path = tmp_path / "out.rdb"
    umask = os.umask(0o022)
    try:
        with RDBWriter(path) as writer:
            writer.write_record(b"k", IMMUTABLE, b"v")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_pipe_is_written_directly(tmp_path) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    with RDBWriter(fifo) as writer:
        writer.write_record(b"k", IMMUTABLE, b"v")
    reader.join(10)
    (tmp_path / "copy.rdb").write_bytes(received[0])
    assert list(read_records(tmp_path / "copy.rdb")) == [(b"k", IMMUTABLE, b"v")]
    assert sorted(os.listdir(tmp_path)) == ["copy.rdb", "pipe"]


_HOLD_LOCKED = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""

_WRITE_AND_DIE = """
import os, sys
from telstate.rdb_writer import RDBWriter
from telstate.utils import KeyType
writer = RDBWriter(sys.argv[1])
writer.write_record(b"k", KeyType.IMMUTABLE, b"v")
writer._flush()
print(os.path.basename(writer.temporary), flush=True)
os.kill(os.getpid(), 9)
"""


def test_temporary_files_are_judged_by_their_lock_not_by_a_pid(tmp_path) -> None:
    """Stale: no process holds its lock, whatever pid its name gives (PID 1 always exists,
    pids are reused). Live: a process holds its lock, though its pid is not seen here
    (another host or PID namespace sharing the directory)."""
    import subprocess
    import sys

    path = tmp_path / "out.rdb"
    leftover = tmp_path / ".out.rdb.1.0123abcd.tmp"
    leftover.write_bytes(b"half a file")
    elsewhere = tmp_path / ".out.rdb.999999999.89abcdef.tmp"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCKED, str(elsewhere)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with RDBWriter(path) as writer:
            writer.write_record(b"k", IMMUTABLE, b"v")
            assert not leftover.exists()
            assert elsewhere.exists()
            RDBWriter(path).abort()  # a second writer leaves the first one's file alone
            assert writer.temporary is not None and os.path.exists(writer.temporary)
        assert list(read_records(path)) == [(b"k", IMMUTABLE, b"v")]
        assert elsewhere.exists()
    finally:
        holder.communicate("", timeout=10)
    # The holder has exited: its file is stale now.
    with RDBWriter(path, keep_empty=True):
        pass
    assert sorted(os.listdir(tmp_path)) == ["out.rdb"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path) -> None:
    import subprocess
    import sys

    path = tmp_path / "out.rdb"
    run = subprocess.run(
        [sys.executable, "-c", _WRITE_AND_DIE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert run.returncode == -9, run.stderr
    assert os.listdir(tmp_path) == [run.stdout.strip()]
    with RDBWriter(path) as writer:
        writer.write_record(b"k", IMMUTABLE, b"w")
    assert sorted(os.listdir(tmp_path)) == ["out.rdb"]


def test_a_symbolic_link_stays_one_and_a_replaced_file_keeps_its_mode(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "target.rdb"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link.rdb"
    link.symlink_to(target)
    with RDBWriter(link) as writer:
        writer.write_record(b"k", IMMUTABLE, b"v")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert list(read_records(target)) == [(b"k", IMMUTABLE, b"v")]
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(real)) == ["target.rdb"]
