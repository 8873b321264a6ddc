"""Upgrading a store of an older log format in place (``telstate upgrade``).

Format 1 records are format 2 records without their chain hash (see
:mod:`telstate.log`). The upgrade appends the chain to every record of the
log, from the first event on, and sets format 2, all in one LMDB write
transaction: a crash or kill during it leaves the store exactly as it was
(format 1), and no reader ever sees a half-upgraded log. Nothing else in
the store changes. No other process may use the store meanwhile (one that
opened a format 1 store before would go on appending format 1 records).
"""

from __future__ import annotations

import itertools
import os
import uuid

import lmdb

from .. import log
from ..errors import StoreError
from ..utils import PathType
from .layout import Tables

#: Records rewritten per read of the log (bounds the memory used).
_CHUNK = 10_000


def upgrade(path: PathType) -> tuple[int, int]:
    """Upgrade the store at `path` to a log format this telstate reads.

    A format 1 store becomes format 2; format 2 and 3 stores need nothing
    (format 3 is format 2 with add_mutable_many events, and a store takes it
    when it gets its first one).

    Returns
    -------
    The format the store had, and the number of events rewritten (0 if it
    already had a format this telstate reads).

    Raises
    ------
    StoreError
        If `path` is not a telstate store, has a format this telstate does
        not know, or cannot be written.
    """
    path = os.fsdecode(path)
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise StoreError(f"no telstate store at {path!r}: it has no data.mdb")
    try:
        env = lmdb.open(path, subdir=True, max_dbs=len(Tables.NAMES), create=False)
    except lmdb.Error as error:
        raise StoreError(f"cannot open the telstate store at {path!r}: {error}") from error
    try:
        while True:
            try:
                return _upgrade_in(env, path)
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
    except lmdb.Error as error:
        raise StoreError(f"upgrading the store at {path!r} failed: {error}") from error
    finally:
        env.close()


def _upgrade_in(env: lmdb.Environment, path: str) -> tuple[int, int]:
    with env.begin(write=True) as txn:
        try:
            tables = Tables(env, txn, create=False)
        except lmdb.NotFoundError:
            raise StoreError(f"{path!r} is an LMDB environment but not a telstate store") from None
        version = txn.get(b"format", db=tables.meta)
        identity = txn.get(b"uuid", db=tables.meta)
        if version is None or identity is None:
            raise StoreError(f"{path!r} is not a telstate store: it has no identity")
        for known in log.FORMATS:
            if version == b"%d" % known:
                return known, 0
        if version != b"1":
            raise StoreError(
                f"{path!r} has log format {version.decode(errors='replace')}, which this "
                f"telstate cannot upgrade (it reads formats {log.BASE_FORMAT} and "
                f"{log.FORMAT_VERSION})"
            )
        chain = log.genesis(uuid.UUID(bytes=identity))
        count = 0
        start = log.pack_seq(1)
        cursor = txn.cursor(db=tables.log)
        while cursor.set_range(start):
            chunk = list(itertools.islice(cursor.iternext(), _CHUNK))
            for seq_key, body in chunk:
                record = log.seal(body, chain)
                txn.put(seq_key, record, db=tables.log)
                chain = record[-log.CHAIN_SIZE :]
            count += len(chunk)
            start = log.pack_seq(log.unpack_seq(chunk[-1][0]) + 1)
        txn.put(b"format", b"%d" % log.BASE_FORMAT, db=tables.meta)
    env.sync(True)
    return 1, count
