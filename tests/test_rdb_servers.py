"""RDB files through real servers: Redis 6.2, Debian's Redis 7.0 and Valkey 9.

- Files that each server saves (SAVE) load into telstate with identical state.
- Files that telstate writes, from any server, load into every server, into
  katsdptelstate 1.0.0 (rdbtools) and into telstate.
- Differential test: telstate and rdbtools read the same files the same way.
"""

from __future__ import annotations

import re
import shutil
import struct

import katsdptelstate
import katsdptelstate.redis
import numpy as np
import pytest
import rdbtools
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from katsdptelstate.rdb_writer import RDBWriter as KatsdpRDBWriter

import telstate
from telstate import rdb_writer
from telstate.errors import RdbParseError
from telstate.rdb_reader import RdbReader, read_records
from telstate.rdb_writer import RDBWriter
from telstate.redis import RedisBackend
from telstate.utils import KeyType

from .servers import RedisServer, server_binaries

SERVERS = sorted(server_binaries())


@pytest.fixture(scope="module")
def servers():
    """One running server of each generation for the module, by name."""
    started = {name: RedisServer(binary).start() for name, binary in server_binaries().items()}
    yield started
    for server in started.values():
        server.cleanup()


def fresh_client(server: RedisServer) -> redis.Redis:
    client = server.client()
    client.flushall()
    try:
        client.execute_command("FUNCTION", "FLUSH")
    except redis.ResponseError:
        pass  # Redis 6.2 has no functions
    # Defaults, which some tests change (Redis 7 also accepts the ziplist names).
    client.config_set("zset-max-ziplist-value", 64)
    client.config_set("hash-max-ziplist-value", 64)
    client.config_set("maxmemory-policy", "noeviction")
    return client


def sample(t: float, value: bytes) -> bytes:
    return struct.pack(">d", t) + value


def fill_telstate_types(client: redis.Redis) -> None:
    """Strings, zsets and hashes in every encoding a server picks, via plain commands."""
    client.set(b"plain", b"hello")
    client.set(b"empty", b"")
    for value in (b"0", b"12", b"-128", b"1000", b"-40000", b"100000", b"2147483648", b"007"):
        client.set(b"int:" + value, value)
    client.set(b"lzf", b"compressible telescope state " * 100)
    client.set(b"random", np.random.default_rng(1).bytes(5000))
    client.set(b"\x00\xffbinary key\n", b"\x00\xff")
    client.set(b"expiring", b"soon", px=10_000_000)
    client.zadd(b"zset:small", {sample(1.0, b"a"): 0, sample(2.0, b""): 0, b"": 0, b"7": 0})
    client.zadd(b"zset:large", {sample(float(i), b"v%d" % i): 0 for i in range(500)})
    client.zadd(b"zset:long", {sample(1.0, b"x" * 200): 0, sample(2.0, b"y"): 0})
    client.zadd(b"zset:uniform", {sample(i / 3, b"\xcb" + bytes(8)): 0 for i in range(2000)})
    client.zadd(b"zset:lzf", {sample(3.0, b"ab" * 2000): 0})
    client.zadd(b"zset:scores", {b"a": 3.5, b"b": -1, b"c": float("inf"), b"d": 0})
    client.hset(b"hash:small", mapping={b"a": b"1", b"": b"", b"n": b"-70000", b"\x92": b"\xff"})
    client.hset(b"hash:large", mapping={b"f%d" % i: b"v" * (i % 50) for i in range(700)})
    client.hset(b"hash:long", mapping={b"f": b"x" * 300})
    client.execute_command("SELECT", 3)
    client.set(b"db3 key", b"in another database")
    client.execute_command("SELECT", 0)


def fill_long_entries(client: redis.Redis) -> None:
    """Small collections with long entries, kept in ziplists or listpacks by raising the limits.

    The lengths cross every boundary of the entry encodings (6/12/14/32-bit
    string headers; listpack back-lengths of 1, 2 and 3 bytes).
    """
    client.config_set("zset-max-ziplist-value", 100_000)
    client.config_set("hash-max-ziplist-value", 100_000)
    sizes = [63, 64, 124, 125, 126, 250, 251, 252, 253, 4095, 4096, 16370, 16377, 16378, 70000]
    client.hset(b"hash:long entries", mapping={b"%d" % n: b"v" * n for n in sizes})
    client.zadd(b"zset:long entries", {sample(float(n), b"w" * n): 0 for n in sizes})
    numbers = [0, 12, 13, -1, 127, 128, -4096, 4095, 40000, -(2**23), 2**31, -(2**63), 2**63 - 1]
    client.hset(b"hash:numbers", mapping={b"%d" % n: b"%d" % n for n in numbers})
    client.zadd(b"zset:numbers", {b"%d" % n: 0 for n in numbers})


def fill_other_types(client: redis.Redis, server: str) -> int:
    """Keys of types telstate skips; returns how many."""
    client.rpush(b"list:small", b"a", b"1")
    client.rpush(b"list:large", *[b"item %d" % i * 3 for i in range(3000)])
    client.sadd(b"set:ints", 1, 2, 3)
    client.sadd(b"set:strings", b"a", b"b")
    client.sadd(b"set:large", *[b"m%d" % i for i in range(1000)])
    client.xadd(b"stream", {b"field": b"value"})
    client.xadd(b"stream", {b"field": b"value 2"})
    client.xgroup_create(b"stream", b"group", id="0")
    client.xreadgroup(b"group", b"consumer", {b"stream": ">"}, count=1)
    if server != "redis6":
        client.execute_command(
            "FUNCTION", "LOAD", "#!lua name=lib\nredis.register_function('f', function() end)"
        )
    return 6


def server_state(client: redis.Redis) -> dict[bytes, tuple[KeyType, object]]:
    """Every string, zset and hash key of every database, as telstate records would hold it."""
    state: dict[bytes, tuple[KeyType, object]] = {}
    for db in range(16):
        client.execute_command("SELECT", db)
        for key in client.keys():
            kind = client.type(key)
            if kind == b"string":
                state[key] = (KeyType.IMMUTABLE, client.get(key))
            elif kind == b"zset":
                state[key] = (KeyType.MUTABLE, client.zrange(key, 0, -1))
            elif kind == b"hash":
                state[key] = (KeyType.INDEXED, client.hgetall(key))
    client.execute_command("SELECT", 0)
    return state


def file_state(path) -> dict[bytes, tuple[KeyType, object]]:
    records = list(read_records(path))
    state = {key: (key_type, value) for key, key_type, value in records}
    assert len(state) == len(records), "no key twice"
    return state


def save(server: RedisServer, client: redis.Redis, destination) -> None:
    client.save()
    shutil.copy(server.directory / server.dbfilename, destination)


@pytest.mark.parametrize("name", SERVERS)
def test_server_files_load_into_telstate(servers, name: str, tmp_path, caplog) -> None:
    server = servers[name]
    client = fresh_client(server)
    fill_telstate_types(client)
    fill_long_entries(client)
    skipped = fill_other_types(client, name)
    if name == "valkey9":
        # A hash with field expiry (RDB type 22 in Valkey's numbering).
        client.execute_command("HSETEX", "hash:ttl", "PX", 10_000_000, "FIELDS", 1, "f", "v")
        client.hset(b"hash:ttl", b"g", b"w")
    expected = server_state(client)
    for policy in ("allkeys-lru", "allkeys-lfu"):
        # Key idle times or access frequencies are saved with these policies.
        client.config_set("maxmemory-policy", policy)
        save(server, client, tmp_path / "dump.rdb")
        reader = RdbReader(tmp_path / "dump.rdb")
        assert {key: (kt, value) for key, kt, value in reader} == expected
        assert sum(reader.skipped.values()) == skipped
        assert reader.aux[b"redis-bits"] == b"64"
    assert reader.version == {"redis6": 9, "redis-system": 10, "valkey9": 80}[name]
    assert reader.checksum
    # Members without a timestamp are not telstate samples: an import refuses them.
    with pytest.raises(RdbParseError, match="zset:"):
        telstate.TelescopeState().load_from_file(tmp_path / "dump.rdb")
    client.delete(b"zset:small", b"zset:scores", b"zset:numbers")
    save(server, client, tmp_path / "dump.rdb")
    # Without them, the telescope state frontend sees the same through a memory backend.
    ts = telstate.TelescopeState()
    assert ts.load_from_file(tmp_path / "dump.rdb") == len(expected) - 3
    assert ts.backend.get_range(b"zset:large", 10.0, 12.0, False, False) == [
        (b"v10", 10.0),
        (b"v11", 11.0),
    ]


def fill_through_frontends(client: redis.Redis) -> None:
    """What telstate's and katsdptelstate's frontends write: encoded values, namespaced keys."""
    ours = telstate.TelescopeState(RedisBackend(client))
    theirs = katsdptelstate.TelescopeState(katsdptelstate.redis.RedisBackend(client))
    for ts, name in ((ours, "telstate"), (theirs, "katsdp")):
        view = ts.view(name)
        view["attr_float"] = 1.5
        view["attr_array"] = np.arange(100.0).reshape(10, 10)
        view["attr_text"] = "x" * 1000
        view["attr_tuple"] = (1, "two", 3.0)
        for i in range(300):
            view.add("sensor", i / 10, ts=1_700_000_000.0 + i)
        for i in range(5):
            view.add("sensor_small", f"state {i}", ts=1_700_000_000.0 + i)
        view.add("sensor_same_time", "b", ts=5.0)
        view.add("sensor_same_time", "a", ts=5.0)
        for i in range(20):
            view.set_indexed("indexed", f"sub{i}", {"value": i})
        view.set_indexed("indexed_big", "big", np.ones(1000))


@pytest.mark.parametrize("name", SERVERS)
def test_frontend_data_survives_server_save(servers, name: str, tmp_path) -> None:
    server = servers[name]
    client = fresh_client(server)
    fill_through_frontends(client)
    expected = server_state(client)
    save(server, client, tmp_path / "dump.rdb")
    assert file_state(tmp_path / "dump.rdb") == expected
    loaded = telstate.TelescopeState()
    loaded.load_from_file(tmp_path / "dump.rdb")
    live = katsdptelstate.TelescopeState(katsdptelstate.redis.RedisBackend(client))
    for prefix in ("telstate", "katsdp"):
        mine, theirs = loaded.view(prefix), live.view(prefix)
        assert mine["attr_float"] == theirs["attr_float"] == 1.5
        np.testing.assert_array_equal(mine["attr_array"], theirs["attr_array"])
        assert mine["attr_tuple"] == theirs["attr_tuple"]
        assert mine.get_range("sensor", st=0) == theirs.get_range("sensor", st=0)
        assert mine.get_range("sensor_same_time", st=0) == [("a", 5.0), ("b", 5.0)]
        assert mine.get_indexed("indexed", "sub7") == {"value": 7}


INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")


def integer_like(key_type: KeyType, value) -> bool:
    """Whether a value has entries that Redis may store as integers.

    rdbtools turns those into ints, which katsdptelstate cannot handle (it
    fails to load such files). Telstate's encoded values never look like that.
    """
    entries = {KeyType.IMMUTABLE: lambda: [value], KeyType.MUTABLE: lambda: value}.get(
        key_type, lambda: [*value, *value.values()]
    )()
    return any(INTEGER.fullmatch(entry) for entry in entries)


def katsdptelstate_view(state: dict[bytes, tuple[KeyType, object]]) -> dict[bytes, object]:
    """`state` as katsdptelstate holds it: zset members ordered by bytes only."""
    assert not any(integer_like(*typed) for typed in state.values())
    return {
        key: sorted(value) if key_type == KeyType.MUTABLE else value  # type: ignore
        for key, (key_type, value) in state.items()
    }


def rdbtools_state(path) -> dict[bytes, object]:
    kts = katsdptelstate.TelescopeState()
    kts.load_from_file(str(path))
    return dict(kts.backend._data)


def check_loads_everywhere(path, expected, tmp_path, katsdp: bool = True) -> None:
    """`path` loads with `expected` state into telstate, every server and (if `katsdp`)
    katsdptelstate."""
    assert file_state(path) == expected
    if katsdp:
        assert rdbtools_state(path) == katsdptelstate_view(expected)
    for binary in server_binaries().values():
        directory = tmp_path / "load"
        directory.mkdir(exist_ok=True)
        shutil.copy(path, directory / "load.rdb")
        with RedisServer(binary, directory=directory, dbfilename="load.rdb") as server:
            assert server_state(server.client()) == expected, binary


@pytest.mark.parametrize("name", SERVERS)
def test_writer_files_load_everywhere(servers, name: str, tmp_path, caplog) -> None:
    server = servers[name]
    client = fresh_client(server)
    fill_telstate_types(client)
    fill_long_entries(client)
    client.execute_command("SELECT", 3)
    client.flushdb()  # RDBWriter.save sees one database
    client.execute_command("SELECT", 0)
    other = fill_other_types(client, name)
    expected = server_state(client)
    path = tmp_path / "written.rdb"
    with RDBWriter(path) as writer:
        writer.save(client)
    # Lists, sets and streams are copied if they are in an RDB 9 encoding (as
    # Redis 6.2 dumps them); newer encodings cannot be written and are logged.
    portable = {"redis6": other, "redis-system": 3, "valkey9": 2}[name]
    assert writer.keys_written == len(expected) + portable
    assert writer.keys_failed == other - portable
    check_loads_everywhere(path, expected, tmp_path, katsdp=False)
    reader = RdbReader(path)
    list(reader)
    assert reader.version == 9 and reader.checksum
    assert sum(reader.skipped.values()) == portable
    # What katsdptelstate can represent, it loads too.
    subset = {key: typed for key, typed in expected.items() if not integer_like(*typed)}
    with RDBWriter(tmp_path / "subset.rdb") as writer:
        writer.save(client, keys=list(subset) + [b"missing"])
    assert (writer.keys_written, writer.keys_failed) == (len(subset), 1)
    check_loads_everywhere(tmp_path / "subset.rdb", subset, tmp_path)


def test_writer_files_from_frontends_and_records(servers, tmp_path) -> None:
    client = fresh_client(servers["redis-system"])
    fill_through_frontends(client)
    expected = server_state(client)
    # From a telescope state on Redis (DUMP and transcode) ...
    with RDBWriter(tmp_path / "redis.rdb") as writer:
        writer.save(telstate.TelescopeState(RedisBackend(client)))
    check_loads_everywhere(tmp_path / "redis.rdb", expected, tmp_path)
    # ... from a memory backend (records, no DUMP), and record by record.
    memory = telstate.TelescopeState()
    memory.load_from_file(tmp_path / "redis.rdb")
    with RDBWriter(tmp_path / "memory.rdb") as writer:
        writer.save(memory)
    check_loads_everywhere(tmp_path / "memory.rdb", expected, tmp_path)
    with RDBWriter(tmp_path / "records.rdb", compress=True) as writer:
        for key, (key_type, value) in expected.items():
            writer.write_record(key, key_type, value)
    assert (tmp_path / "records.rdb").stat().st_size < (tmp_path / "memory.rdb").stat().st_size
    check_loads_everywhere(tmp_path / "records.rdb", expected, tmp_path)


@pytest.mark.parametrize("name", ["redis6", "redis-system"])
def test_katsdptelstate_writer_files(servers, name: str, tmp_path) -> None:
    """katsdptelstate copies DUMP payloads under a version 6 header with no checksum.

    From Redis 7 that gives listpacks it cannot read back itself; telstate can.
    """
    client = fresh_client(servers[name])
    fill_telstate_types(client)
    client.execute_command("SELECT", 3)
    client.flushdb()
    client.execute_command("SELECT", 0)
    expected = server_state(client)
    path = tmp_path / "katsdp.rdb"
    with KatsdpRDBWriter(str(path)) as writer:
        writer.save(client)
    reader = RdbReader(path)
    assert {key: (kt, value) for key, kt, value in reader} == expected
    assert reader.version == 6 and reader.checksum == 0


# -- differential testing against rdbtools ----------------------------------------------

binary_strings = st.binary(max_size=80) | st.sampled_from([b"", b"0", b"-12", b"x" * 300])
records = st.dictionaries(
    st.binary(min_size=1, max_size=20),
    st.one_of(
        binary_strings.map(lambda value: (KeyType.IMMUTABLE, value)),
        st.lists(binary_strings, min_size=1, max_size=150, unique=True).map(
            lambda members: (KeyType.MUTABLE, sorted(members))
        ),
        st.dictionaries(binary_strings, binary_strings, min_size=1, max_size=150).map(
            lambda fields: (KeyType.INDEXED, fields)
        ),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40)
@given(records, st.booleans())
def test_differential_against_rdbtools(tmp_path_factory, state, compress: bool) -> None:
    path = tmp_path_factory.mktemp("diff") / "diff.rdb"
    with RDBWriter(path, compress=compress) as writer:
        for key, (key_type, value) in state.items():
            writer.write_record(key, key_type, value)
    assert file_state(path) == state
    assert rdbtools_state(path) == {key: value for key, (_, value) in state.items()}


class Collector(rdbtools.RdbCallback):
    """Everything rdbtools reports for strings, zsets and hashes, as telstate records hold it."""

    def __init__(self) -> None:
        super().__init__(string_escape=None)
        self.state: dict[bytes, tuple[KeyType, object]] = {}

    @staticmethod
    def _bytes(value: bytes | int) -> bytes:
        return b"%d" % value if isinstance(value, int) else value

    def set(self, key, value, expiry, info) -> None:
        self.state[key] = (KeyType.IMMUTABLE, self._bytes(value))

    def start_sorted_set(self, key, length, expiry, info) -> None:
        self.state[key] = (KeyType.MUTABLE, [])

    def zadd(self, key, score, member) -> None:
        self.state[key][1].append((score, self._bytes(member)))  # type: ignore

    def end_sorted_set(self, key) -> None:
        self.state[key] = (KeyType.MUTABLE, [m for _, m in sorted(self.state[key][1])])

    def start_hash(self, key, length, expiry, info) -> None:
        self.state[key] = (KeyType.INDEXED, {})

    def hset(self, key, field, value) -> None:
        self.state[key][1][self._bytes(field)] = self._bytes(value)  # type: ignore


@pytest.mark.parametrize("source", ["redis6 save", "telstate writer", "katsdptelstate writer"])
def test_differential_on_files_rdbtools_reads(servers, source: str, tmp_path) -> None:
    server = servers["redis6"]
    client = fresh_client(server)
    fill_telstate_types(client)
    fill_long_entries(client)
    fill_through_frontends(client)
    path = tmp_path / "diff.rdb"
    if source == "redis6 save":
        save(server, client, path)
    else:
        client.execute_command("SELECT", 3)
        client.flushdb()  # the writers save one database
        client.execute_command("SELECT", 0)
        writer_class = RDBWriter if source == "telstate writer" else KatsdpRDBWriter
        with writer_class(str(path)) as writer:
            writer.save(client)
    collector = Collector()
    rdbtools.RdbParser(collector).parse(str(path))
    assert file_state(path) == collector.state == server_state(client)


def test_writer_transcodes_only_what_needs_it(servers) -> None:
    client = fresh_client(servers["redis-system"])
    client.zadd(b"small", {b"a": 0})
    client.zadd(b"large", {b"%d" % i: 0 for i in range(200)})
    assert client.dump(b"small")[0] == 17  # a listpack: transcoded to a ziplist
    assert client.dump(b"large")[0] == 5  # RDB 9 knows this encoding: copied
    assert 5 in rdb_writer._PORTABLE_TYPES and 17 not in rdb_writer._PORTABLE_TYPES


@pytest.mark.parametrize("name", SERVERS)
def test_load_from_file_into_redis_backends(servers, name: str, tmp_path) -> None:
    source = fresh_client(servers["redis-system"])
    fill_through_frontends(source)
    fill_telstate_types(source)
    # Records have no scores (telstate's are all 0), so a zset with others would change;
    # members without a timestamp are not telstate samples (an import refuses them).
    source.delete(b"zset:scores", b"zset:small")
    expected = server_state(source)
    save(servers["redis-system"], source, tmp_path / "dump.rdb")
    target = fresh_client(servers[name])
    ts = telstate.TelescopeState(RedisBackend(target))
    with open(tmp_path / "dump.rdb", "rb") as stream:
        assert ts.load_from_file(stream) == len(expected)
    assert server_state(target) == expected
