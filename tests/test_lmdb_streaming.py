"""A big mutable key read from a snapshot is streamed, never built whole (issue 11, fix 6).

``settings.RECORD_LIST_MAX`` is patched down so that small keys take the
streaming path; the memory test measures the real thing in a subprocess.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import fakeredis
import katsdptelstate
import pytest

from replicator.redis_sink import RedisSink
from replicator.verify import differences, mirror_contents, record_contents
from telstate import cli
from telstate.errors import StoreError, TelstateError
from telstate.lmdb import LmdbBackend, settings, state
from telstate.lmdb.state import SnapshotMembers
from telstate.memory import MemoryBackend
from telstate.rdb_reader import read_records
from telstate.rdb_writer import RDBWriter
from telstate.redis import RedisBackend
from telstate.utils import KeyType, pack_timestamp, split_timestamp


@pytest.fixture
def lazy(monkeypatch):
    """Every mutable key of more than 10 members streams, in pieces of 7 tail members."""
    monkeypatch.setattr(settings, "RECORD_LIST_MAX", 10)
    monkeypatch.setattr(settings, "MEMBER_CHUNK", 7)
    monkeypatch.setattr(settings, "TAIL_MAX", 16)
    monkeypatch.setattr(settings, "BLOCK_MAX", 32)


def _members(n: int, seed: int = 1) -> list[bytes]:
    """Members of every kind: sealed small ones, runs of one timestamp, long values
    sharing their stored prefix (whose order the tail loses)."""
    rng = random.Random(seed)
    members = set()
    prefix = b"p" * 460
    while len(members) < n:
        stamp = pack_timestamp(float(rng.randrange(n // 3 + 1)))
        kind = rng.random()
        if kind < 0.6:
            value = b"\xff%d" % rng.randrange(1000)
        elif kind < 0.8:
            value = prefix[: rng.randrange(440, 460)] + bytes([rng.randrange(256)])
        else:
            value = prefix + rng.randbytes(rng.randrange(1, 40))
        members.add(stamp + value)
    return sorted(members)


def _store(path, keys: dict[bytes, list[bytes]]) -> LmdbBackend:
    backend = LmdbBackend(path, durability="none")
    with backend.write() as wtxn:
        for key, members in keys.items():
            shuffled = list(members)
            random.Random(2).shuffle(shuffled)
            for member in shuffled:
                wtxn.add_mutable(key, member[8:], _stamp(member))
        wtxn.set_immutable(b"attribute", b"\xff\x01")
        wtxn.set_indexed(b"indexed", b"\x01", b"\xff\x02")
    return backend


def _stamp(member: bytes) -> float:
    return split_timestamp(member)[1]


def test_big_keys_stream_small_keys_stay_lists(tmp_path, lazy):
    big, long_values, small = _members(300), _members(120, seed=3), _members(10, seed=4)
    long_values = [m for m in long_values if len(m) > 200] + [pack_timestamp(1e9) + b"x"]
    with _store(
        tmp_path / "store", {b"big": big, b"long": long_values, b"small": small}
    ) as backend:
        with backend.snapshot() as snap:
            records = {key: value for key, _, value in snap.records()}
            assert type(records[b"small"]) is list and records[b"small"] == small
            for key, expected in ((b"big", big), (b"long", long_values)):
                members = records[key]
                assert isinstance(members, SnapshotMembers)
                assert len(members) == len(expected)
                assert list(members) == expected
                assert list(members) == expected  # iterable again
                assert expected[5] in members and b"absent" not in members
                assert max(len(chunk) for chunk in members.chunks()) <= 32
        with pytest.raises(StoreError, match="not open"):
            list(records[b"big"])
        assert backend.record(b"big") == (b"big", KeyType.MUTABLE, big)  # always a list


def test_members_count_differing_from_the_stream_discard_the_file(tmp_path, lazy, monkeypatch):
    """The RDB length goes first: a stream that disagrees with it never leaves a file."""
    with _store(tmp_path / "store", {b"big": _members(200)}) as backend:
        real = state.member_count
        for wrong in (1, -1):
            monkeypatch.setattr(state, "member_count", lambda *a, d=wrong: real(*a) + d)
            target = tmp_path / "out.rdb"
            with backend.snapshot() as snap, pytest.raises(StoreError, match="damaged"):  # noqa: PT012
                with RDBWriter(target) as writer:
                    for record in snap.records():
                        writer.write_record(*record)
            assert not target.exists()
            assert list(tmp_path.iterdir()) == [tmp_path / "store"]


def test_members_out_of_order_discard_the_file(tmp_path):
    class Unordered:
        def __len__(self):
            return 200

        def __iter__(self):
            return iter([pack_timestamp(float(200 - i)) for i in range(200)])

        def __contains__(self, member):
            return False

    target = tmp_path / "out.rdb"
    writer = RDBWriter(target)
    writer.write_record(b"first", KeyType.IMMUTABLE, b"\xff\x01")
    with pytest.raises(TelstateError, match="discarded"):
        writer.write_record(b"zset", KeyType.MUTABLE, Unordered())
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_a_big_key_exports_and_loads_back_identically(tmp_path, lazy, redis_client):
    keys = {b"big": _members(400), b"other": _members(50, seed=7)}
    target = str(tmp_path / "out.rdb")
    with _store(tmp_path / "store", keys):
        pass
    assert cli.main(["export", str(tmp_path / "store"), target]) == 0
    records = {key: (key_type, value) for key, key_type, value in read_records(target)}
    assert records[b"big"] == (KeyType.MUTABLE, keys[b"big"])
    assert records[b"other"] == (KeyType.MUTABLE, keys[b"other"])
    # The peer reads the same samples.
    peer = katsdptelstate.TelescopeState()
    peer.load_from_file(target)
    for key, members in keys.items():
        expected = [(m[8:], _stamp(m)) for m in members]
        assert peer.backend.get_range(key, 0.0, float("inf"), False, True) == expected
    # Every backend loads a snapshot's lazy members, and Redis takes them from the file too.
    with LmdbBackend(tmp_path / "store", readonly=True) as source:
        expected_contents = record_contents(source.records())
        for backend in (
            MemoryBackend(),
            LmdbBackend(tmp_path / "copy", durability="none"),
            RedisBackend(fakeredis.FakeRedis()),
        ):
            with source.snapshot() as snap:
                assert backend.load_records(snap.records()) == 4
            assert record_contents(backend.records()) == expected_contents
            backend.close()
    RedisBackend(redis_client).load_from_file(target)
    assert differences(expected_contents, mirror_contents(redis_client)) == []


def test_a_mirror_rebuilt_from_a_store_with_big_keys_is_exact(
    tmp_path, lazy, redis_server, redis_client
):
    keys = {b"big": _members(500), b"other": _members(30, seed=5)}
    with _store(tmp_path / "store", keys) as backend:
        sink = RedisSink(backend, redis_server.url + "?db=0", check_interval=0.0, batch_events=16)
        try:
            for _ in range(200):
                if sink.step().idle:
                    break
        finally:
            sink.close()
        expected = record_contents(backend.records())
        assert differences(expected, mirror_contents(redis_client)) == []


_EXPORT_CHILD = r"""
import sys, time
from telstate import cli, rdb_writer
# The writer's output buffer (16 MiB) is a constant: shrunk, the peaks show
# what reading and encoding hold.
rdb_writer._FLUSH_SIZE = 1 << 20
started = time.perf_counter()
status = cli.main(["export", sys.argv[1], sys.argv[2]])
print(time.perf_counter() - started, file=sys.stderr)
sys.exit(status)
"""


def _export_peak_mib(store, target) -> float:
    """Peak anonymous memory (RssAnon: the LMDB map is file-backed) of an export, polled
    from this process so that the child's own work is not slowed by the measuring."""
    child = subprocess.Popen(
        [sys.executable, "-c", _EXPORT_CHILD, str(store), str(target)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    assert child.returncode == 0, child.stderr.read()[-3000:]
    return peak / 1024


def test_exporting_a_million_sample_key_takes_bounded_memory(tmp_path):
    """Fix 6: a 1M-sample key exports in about the memory of a 10-sample one.

    Built whole, its members alone take over 100 MiB.
    """
    peaks = {}
    for n in (10, 250_000, 1_000_000):
        path = tmp_path / f"store{n}"
        with LmdbBackend(path, durability="none", map_size=256 << 20) as backend:
            for start in range(0, n, 200_000):
                with backend.write() as wtxn:
                    for i in range(start, min(n, start + 200_000)):
                        wtxn.add_mutable(b"sensor", b"\xcb" + i.to_bytes(8, "big"), 1e9 + i)
        peaks[n] = _export_peak_mib(path, tmp_path / f"out{n}.rdb")
        assert (tmp_path / f"out{n}.rdb").stat().st_size > 18 * n
    assert peaks[1_000_000] - peaks[10] < 24, peaks
    assert abs(peaks[1_000_000] - peaks[250_000]) < 6, peaks
