"""Snapshot sink: RDB files of a store's whole state, each named by store and seq.

A snapshot is ``telstate-<store uuid>-<seq>.rdb`` (seq zero-padded, so
names sort by seq), written from one read transaction of the store. It
records the store and seq in AUX fields (``telstate-store``,
``telstate-seq``), which Redis ignores and
:func:`telstate.rdb_reader.read_aux` reads. It is written the way that
survives a crash at any instant (:class:`~telstate.rdb_writer.RDBWriter`
writes a hidden temporary file, flushes it to disk, renames it into place
and flushes the directory), so a snapshot file either is complete or does
not exist. Only the newest `keep` snapshots of the store are kept.

Snapshots fall due by the monotonic clock, so a wall clock stepped by NTP
or by hand neither delays them nor fires them early.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from telstate.rdb_reader import read_aux
from telstate.rdb_writer import RDBWriter, remove_stale_temporaries

from .source import EventSource

logger = logging.getLogger(__name__)

#: AUX field holding the UUID of the store.
AUX_STORE = b"telstate-store"
#: AUX field holding the seq of the last event in the snapshot.
AUX_SEQ = b"telstate-seq"

_NAME = re.compile(r"telstate-(?P<store>[0-9a-f-]{36})-(?P<seq>[0-9]{16,})\.rdb")


@dataclass(frozen=True)
class SnapshotFile:
    """One snapshot in a directory.

    Attributes
    ----------
    path
        The file.
    store
        UUID of the store it was taken from.
    seq
        The last event it includes.
    """

    path: Path
    store: str
    seq: int

    def read_aux(self) -> dict[bytes, bytes]:
        """The AUX fields recorded in the file (``telstate-store``, ``telstate-seq``, ...).

        Raises
        ------
        RdbParseError
            If the file is not a valid RDB file.
        """
        return read_aux(self.path)


def snapshot_name(store: str, seq: int) -> str:
    """File name of the snapshot of `store` at `seq`."""
    return f"telstate-{store}-{seq:016d}.rdb"


def list_snapshots(
    directory: str | os.PathLike[str], store: str | None = None
) -> list[SnapshotFile]:
    """The snapshots in `directory` (of `store` only, if given), oldest first.

    A missing directory has none.
    """
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = _NAME.fullmatch(name)
        if match and (store is None or match["store"] == store):
            found.append(SnapshotFile(Path(directory, name), match["store"], int(match["seq"])))
    return sorted(found, key=lambda snapshot: (snapshot.store, snapshot.seq))


class SnapshotSink:
    """Writes snapshots of a store into a directory, every `interval` seconds while it changes.

    Parameters
    ----------
    source
        The store.
    directory
        Where snapshots go; created if missing.
    interval
        Seconds between snapshots (the first is due at once, or, if the
        directory holds one already, `interval` after it was written or at
        once if the clock says it is older than that); a snapshot is only
        written if the store has new events since the newest one.
    keep
        How many snapshots of the store to keep (at least 1).

    Raises
    ------
    ValueError
        If `keep` is less than 1 or `interval` is not positive.
    """

    def __init__(
        self, source: EventSource, directory: str | os.PathLike[str], *, interval: float, keep: int
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        if not interval > 0:
            raise ValueError(f"the snapshot interval must be positive, not {interval}")
        self.source = source
        self.directory = Path(directory)
        self.interval = interval
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._store = str(source.uuid)
        # Left by a replicator killed while writing a snapshot of this store.
        remove_stale_temporaries(self.directory, rf"telstate-{self._store}-[0-9]+\.rdb")
        existing = list_snapshots(self.directory, self._store)
        #: The newest snapshot of the store, if any.
        self.latest: SnapshotFile | None = existing[-1] if existing else None
        # The file's age is the only wall-clock reading, taken once and
        # bounded to [0, interval]: from here on only monotonic time counts.
        self._due = time.monotonic()
        if self.latest is not None:
            age = time.time() - self.latest.path.stat().st_mtime
            self._due += min(max(interval - age, 0.0), interval)

    def until_due(self) -> float:
        """Seconds until the next snapshot is due (0 if it is due now)."""
        return max(0.0, self._due - time.monotonic())

    def write(self) -> SnapshotFile | None:
        """Write a snapshot now if the store has events that the newest one lacks.

        Returns
        -------
        The new snapshot, or None if none was needed or the store has no keys.

        Raises
        ------
        OSError
            If the file cannot be written (the next attempt is due after
            the interval).
        StoreError
            If the store cannot be read.
        """
        self._due = time.monotonic() + self.interval
        newest = self.latest.seq if self.latest is not None else 0
        last_seq = self.source.last_seq
        if last_seq <= newest:
            return None
        started = time.monotonic()
        with self.source.snapshot() as snapshot:
            final = self.directory / snapshot_name(self._store, snapshot.seq)
            aux = {AUX_STORE: str(self._store).encode(), AUX_SEQ: b"%d" % snapshot.seq}
            with RDBWriter(final, aux=aux, keep_empty=True) as writer:
                for record in snapshot.records():
                    writer.write_record(*record)
        self.latest = SnapshotFile(final, self._store, snapshot.seq)
        logger.info(
            "snapshot %s: %d keys in %.2f s",
            final.name,
            writer.keys_written,
            time.monotonic() - started,
        )
        self.prune()
        return self.latest

    def prune(self) -> list[Path]:
        """Delete the store's snapshots beyond the newest `keep`; return what was deleted."""
        removed = []
        for old in list_snapshots(self.directory, self._store)[: -self.keep]:
            try:
                old.path.unlink()
            except FileNotFoundError:
                continue
            removed.append(old.path)
            logger.info("removed old snapshot %s", old.path.name)
        return removed

    def run(self, stop: threading.Event) -> None:
        """Write snapshots as they fall due until `stop` is set; log failures and go on."""
        while not stop.wait(self.until_due()):
            try:
                self.write()
            except Exception:
                logger.exception(
                    "snapshot of the store failed; next attempt in %.0f s", self.interval
                )
