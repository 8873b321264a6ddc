"""Every contender, registered once in `CONTENDERS`, and how each opens and fills a store.

A contender is a package and a backend (and, for LMDB, a durability
setting). Its *kind* knows how to open a store for it, how to fill that
store quickly with prepared data before a workload (bypassing the API,
since filling is not what is measured), and how another process opens the
same store (for cross-process waits).

To add a contender, add a kind (if it is a new backend) and a line to
`CONTENDERS`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from katsdptelstate.encoding import encode_value
from katsdptelstate.utils import pack_timestamp

from . import data
from .harness import FAILED, NOT_BUILT

if TYPE_CHECKING:
    from .environment import BenchEnv

TELSTATE = "telstate"
KATSDPTELSTATE = "katsdptelstate"
#: Not a telescope state at all: a reference point for one target.
BASELINE = "baseline"

#: Where another process finds a store: (kind name, location arguments).
PeerSpec = tuple[str, tuple[Any, ...]]


@dataclass
class Store:
    """One open store of a contender.

    Attributes
    ----------
    contender
        Whose store it is.
    ts
        The TelescopeState (of the contender's package) on it, or for the
        baseline an object with the same `add` method.
    peer
        How another process opens the same store, or None if the store
        lives in this process only.
    location
        The directory or Redis database the store lives in, if any.
    closers
        What `close` calls, last first.
    """

    contender: Contender
    ts: Any
    peer: PeerSpec | None = None
    location: Any = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def populate(self, records: Sequence[data.Record]) -> None:
        """Fill the store with `records` (untimed set-up, through the fastest path)."""
        self.contender.kind.populate(self, records)

    def close(self) -> None:
        """Close the store and free what it used (its Redis database is flushed)."""
        while self.closers:
            self.closers.pop()()


class Kind:
    """How one package's backend opens, fills and shares a store."""

    name = ""
    #: Modules the kind needs, checked before anything runs.
    modules: tuple[str, ...] = ()
    #: Whether other processes can open the same store.
    shared = False

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        raise NotImplementedError

    @classmethod
    def populate(cls, store: Store, records: Sequence[data.Record]) -> None:
        raise NotImplementedError

    @classmethod
    def open_peer(cls, *location: Any) -> Any:
        """The TelescopeState another process uses on the store at `location`."""
        raise NotImplementedError(f"{cls.name} stores live in one process only")


def _redis_client(socket: str, db: int) -> redis.Redis:
    # The same client, with the same settings, for both packages.
    return redis.Redis(unix_socket_path=socket, db=db)


def _populate_redis_raw(client: redis.Redis, records: Sequence[data.Record]) -> None:
    """Write records in the layout both packages share, with pipelined commands."""
    with client.pipeline(transaction=False) as pipe:
        pending = 0
        for key, kind, value in records:
            if kind == data.IMMUTABLE:
                pipe.set(key, value)
                pending += 1
            elif kind == data.MUTABLE:
                for start in range(0, len(value), 5000):
                    chunk = value[start : start + 5000]
                    pipe.execute_command("ZADD", key, *[x for m in chunk for x in (0, m)])
                    pending += len(chunk)
            else:
                pipe.execute_command("HSET", key, *[x for item in value.items() for x in item])
                pending += len(value)
            if pending > 20000:
                pipe.execute()
                pending = 0
        pipe.execute()


class _RedisKind(Kind):
    """Shared by both packages' Redis backends: one database of the run's server each."""

    shared = True

    @classmethod
    def _telescope_state(cls, client: redis.Redis) -> Any:
        raise NotImplementedError

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        db = env.acquire_db()
        client = _redis_client(env.redis.socket, db)
        peer = (cls.name, (env.redis.socket, db))
        store = Store(contender, cls._telescope_state(client), peer, db)
        store.closers += [lambda: env.release_db(db), client.close]
        return store

    @classmethod
    def open_peer(cls, socket: str, db: int) -> Any:
        return cls._telescope_state(_redis_client(socket, db))

    @classmethod
    def populate(cls, store: Store, records: Sequence[data.Record]) -> None:
        _populate_redis_raw(store.ts.backend.client, records)


def _load_telstate_records(store: Store, records: Sequence[data.Record]) -> None:
    """Fill a telstate store through `Backend.load_records`, its bulk path."""
    from telstate.utils import KeyType

    store.ts.backend.load_records(
        (key, KeyType[kind.upper()], value) for key, kind, value in records
    )


class TelstateMemory(Kind):
    name = "telstate-memory"
    modules = ("telstate", "telstate.memory")

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        from telstate import TelescopeState
        from telstate.memory import MemoryBackend

        return Store(contender, TelescopeState(MemoryBackend()))

    @classmethod
    def populate(cls, store: Store, records: Sequence[data.Record]) -> None:
        _load_telstate_records(store, records)


class TelstateRedis(_RedisKind):
    name = "telstate-redis"
    modules = ("telstate", "telstate.redis")

    @classmethod
    def _telescope_state(cls, client: redis.Redis) -> Any:
        from telstate import TelescopeState
        from telstate.redis import RedisBackend

        return TelescopeState(RedisBackend(client))


class TelstateLmdb(Kind):
    name = "telstate-lmdb"
    modules = ("telstate", "telstate.lmdb")
    shared = True

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        path = env.scratch("lmdb")
        ts = cls.open_peer(str(path), contender.durability)
        store = Store(contender, ts, (cls.name, (str(path), contender.durability)), path)
        store.closers.append(ts.backend.close)
        return store

    @classmethod
    def open_peer(cls, path: str, durability: str) -> Any:
        from telstate import TelescopeState
        from telstate.lmdb import LmdbBackend

        return TelescopeState(LmdbBackend(path, durability=durability))

    @classmethod
    def populate(cls, store: Store, records: Sequence[data.Record]) -> None:
        _load_telstate_records(store, records)


class KatsdpMemory(Kind):
    name = "katsdptelstate-memory"
    modules = ("katsdptelstate",)

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        import katsdptelstate

        return Store(contender, katsdptelstate.TelescopeState(), location=env.scratch("katsdp"))

    @classmethod
    def populate(cls, store: Store, records: Sequence[data.Record]) -> None:
        # Its only bulk path is an RDB file, read by rdbtools.
        path = Path(store.location) / "populate.rdb"
        data.write_katsdp_rdb(path, records)
        store.ts.load_from_file(str(path))
        os.remove(path)


class KatsdpRedis(_RedisKind):
    name = "katsdptelstate-redis"
    modules = ("katsdptelstate", "katsdptelstate.redis")

    @classmethod
    def _telescope_state(cls, client: redis.Redis) -> Any:
        import katsdptelstate
        from katsdptelstate.redis import RedisBackend

        return katsdptelstate.TelescopeState(RedisBackend(client))


class BareLmdbCommit:
    """The floor under an add: one LMDB write transaction per record.

    Stores the same bytes a mutable add stores (key + packed timestamp →
    encoded value), with none of the bookkeeping a telescope state adds.
    With `sync` each commit is flushed to disk before `add` returns (the
    floor under `fsync`); without it, the commit is written with `pwrite`
    and left to the kernel (the floor under `batch` and `none`). Neither
    uses ``writemap``, as telstate does not in any mode.
    """

    def __init__(self, path: str, sync: bool) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 32, sync=sync, metasync=sync, writemap=False)

    def add(self, key: str, value: Any, ts: float | None = None, immutable: bool = False) -> None:
        """Commit one (key, timestamp) → value record."""
        with self.env.begin(write=True) as txn:
            txn.put(key.encode() + pack_timestamp(ts or 0.0), encode_value(value))

    def close(self) -> None:
        self.env.close()


class BareLmdb(Kind):
    name = "bare-lmdb"
    modules = ("lmdb", "katsdptelstate")

    @classmethod
    def open(cls, contender: Contender, env: BenchEnv) -> Store:
        path = env.scratch("bare-lmdb")
        bare = BareLmdbCommit(str(path), sync=contender.durability == "fsync")
        store = Store(contender, bare, location=path)
        store.closers.append(bare.close)
        return store


@dataclass(frozen=True)
class Contender:
    """A package and backend (and durability) that every workload is run on."""

    name: str
    package: str
    kind: type[Kind]
    durability: str | None = None

    @property
    def is_baseline(self) -> bool:
        """Whether this is a reference point rather than a telescope state."""
        return self.package == BASELINE

    @property
    def backend(self) -> str:
        return self.kind.name.rsplit("-", 1)[1]

    def unavailable(self, needs: Sequence[str] = ()) -> tuple[str, str] | None:
        """None if the contender (with the modules a case `needs`) can run, else why not.

        `needs` names telstate modules; they matter only to telstate
        contenders. Returns (status, note): a module that does not exist
        yet is "not built"; one that exists but fails to import has "failed".
        """
        modules = self.kind.modules + (tuple(needs) if self.package == TELSTATE else ())
        for module in modules:
            reason = module_missing(module)
            if reason is not None:
                return reason
        return None

    def open(self, env: BenchEnv) -> Store:
        """A new, empty store."""
        return self.kind.open(self, env)


def module_missing(module: str) -> tuple[str, str] | None:
    """None if `module` imports, else (status, note) saying why not."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and (module == error.name or module.startswith(error.name + ".")):
            return NOT_BUILT, module
        return FAILED, f"cannot import {module}: {error}"
    except Exception as error:  # noqa: BLE001 - a half-written module must not stop the run
        return FAILED, f"cannot import {module}: {type(error).__name__}: {error}"
    return None


CONTENDERS: tuple[Contender, ...] = (
    Contender("telstate memory", TELSTATE, TelstateMemory),
    Contender("telstate redis", TELSTATE, TelstateRedis),
    Contender("telstate lmdb (fsync)", TELSTATE, TelstateLmdb, "fsync"),
    Contender("telstate lmdb (batch)", TELSTATE, TelstateLmdb, "batch"),
    Contender("telstate lmdb (none)", TELSTATE, TelstateLmdb, "none"),
    Contender("katsdptelstate memory", KATSDPTELSTATE, KatsdpMemory),
    Contender("katsdptelstate redis", KATSDPTELSTATE, KatsdpRedis),
    Contender("bare LMDB commit (fsync)", BASELINE, BareLmdb, "fsync"),
    Contender("bare LMDB commit (no sync)", BASELINE, BareLmdb, "none"),
)

_KINDS = {contender.kind.name: contender.kind for contender in CONTENDERS}


def open_peer(peer: PeerSpec) -> Any:
    """Open, in this process, the store another process described with `Store.peer`."""
    kind, location = peer
    return _KINDS[kind].open_peer(*location)


def by_name(name: str) -> Contender:
    """The registered contender called `name`."""
    for contender in CONTENDERS:
        if contender.name == name:
            return contender
    raise KeyError(name)
