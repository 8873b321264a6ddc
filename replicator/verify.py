"""Comparing a mirror with its store, key for key and sample for sample.

Used by the tests and the benchmark to prove a mirror exact. Contents are
compared rather than DUMP payloads: Redis picks a key's encoding from its
history (a zset that once grew large stays a skiplist), so two identical
keys may DUMP differently.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from telstate.backend import Record, RecordValue
from telstate.utils import KeyType

#: A database's contents: key -> (type, value), mutable values as sorted members.
Contents = dict[bytes, tuple[KeyType, RecordValue]]

_BATCH = 500


def record_contents(records: Iterable[Record]) -> Contents:
    """The contents of a store given as records (e.g. from a snapshot)."""
    return {
        key: (key_type, value if isinstance(value, (bytes, dict)) else sorted(value))
        for key, key_type, value in records
    }


def mirror_contents(client: redis.Redis) -> Contents:
    """The contents of the client's Redis database, read key by key.

    Raises
    ------
    ValueError
        If the database holds a key of a type telstate never writes.
    """
    keys = list(client.scan_iter(count=1000))
    contents: Contents = {}
    for start in range(0, len(keys), _BATCH):
        batch = keys[start : start + _BATCH]
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.type(key)
            kinds = pipe.execute()
        with client.pipeline(transaction=False) as pipe:
            for key, kind in zip(batch, kinds):
                if kind == b"string":
                    pipe.get(key)
                elif kind == b"zset":
                    pipe.zrange(key, 0, -1)
                elif kind == b"hash":
                    pipe.hgetall(key)
                elif kind != b"none":  # "none": deleted since the SCAN
                    raise ValueError(f"key {key!r} is a {kind.decode()}, not a telstate key")
            values = iter(pipe.execute())
        for key, kind in zip(batch, kinds):
            if kind == b"string":
                contents[key] = (KeyType.IMMUTABLE, next(values))
            elif kind == b"zset":
                contents[key] = (KeyType.MUTABLE, sorted(next(values)))
            elif kind == b"hash":
                contents[key] = (KeyType.INDEXED, next(values))
    return contents


def differences(store: Contents, mirror: Contents, limit: int = 10) -> list[str]:
    """Describe how `mirror` differs from `store` (at most `limit` lines; empty if equal)."""
    found = []
    for key in sorted(store.keys() | mirror.keys()):
        expected, actual = store.get(key), mirror.get(key)
        if expected == actual:
            continue
        if actual is None:
            found.append(f"{key!r} is missing from the mirror")
        elif expected is None:
            found.append(f"{key!r} is in the mirror but not in the store")
        elif expected[0] != actual[0]:
            found.append(
                f"{key!r} is {actual[0].name} in the mirror, {expected[0].name} in the store"
            )
        else:
            found.append(f"{key!r} has other contents in the mirror than in the store")
        if len(found) >= limit:
            break
    return found
