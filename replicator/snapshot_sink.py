"""Snapshot sink: RDB files of a store's whole state, each named by store, seq and chain.

A snapshot is ``telstate-<store uuid>-<seq>-<chain>.rdb`` (seq
zero-padded, so names sort by seq; chain the first 16 hex digits of the
store's chain hash at seq, so two histories of a store never give the same
name), written from one read transaction of the store. It records the
store, seq and full chain hash in AUX fields (``telstate-store``,
``telstate-seq``, ``telstate-chain``), which Redis ignores and
:func:`telstate.rdb_reader.read_aux` reads; ``telstate verify STORE --rdb
FILE`` checks a file against them. It is written the way that
survives a crash at any instant (:class:`~telstate.rdb_writer.RDBWriter`
writes a hidden temporary file, flushes it to disk, renames it into place
and flushes the directory), so a snapshot file either is complete or does
not exist. Only the newest `keep` snapshots of the store are kept.

Snapshots fall due by the monotonic clock, so a wall clock stepped by NTP
or by hand neither delays them nor fires them early.

Before each snapshot the sink checks the store's existing snapshots
against the store's chain: one whose seq is beyond the log or whose chain
differs from the store's at its seq (the store was restored from an older
copy, rolled back by a power cut, ...) is of another history. It is moved
into the ``diverged`` subdirectory, kept but no longer counted or pruned,
and the reason is logged; the store's state is then snapshotted anew.

One sink at a time writes a store's snapshots into a directory: it holds
a lock (``flock`` on ``.telstate-<store uuid>.lock`` there) for its life,
and a second is refused (:class:`SnapshotDirectoryBusy`). A lagging copy of
the store (a follower, a backup being caught up, with the same UUID) would
otherwise take the primary's newer snapshots for another history and move
them aside at each of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from telstate import log
from telstate.rdb_reader import read_aux
from telstate.rdb_writer import RDBWriter, remove_stale_temporaries

from .source import EventSource

logger = logging.getLogger(__name__)

#: AUX field holding the UUID of the store.
AUX_STORE = log.AUX_STORE
#: AUX field holding the seq of the last event in the snapshot.
AUX_SEQ = log.AUX_SEQ
#: AUX field holding the store's chain hash at that seq (hex).
AUX_CHAIN = log.AUX_CHAIN
#: Subdirectory for snapshots of another history of the store.
DIVERGED = "diverged"
#: Hex digits of the chain hash in a snapshot's name.
CHAIN_DIGITS = 16

# Names without a chain are from before chains existed (never of the current history).
_NAME = re.compile(
    r"telstate-(?P<store>[0-9a-f-]{36})-(?P<seq>[0-9]{16,})(?:-(?P<chain>[0-9a-f]{16}))?\.rdb"
)


class SnapshotDirectoryBusy(OSError):
    """Another sink (in this process or another) writes the store's snapshots into the directory."""


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
    chain
        The first 16 hex digits of the store's chain hash at `seq` ("" for
        a file named before chains existed).
    """

    path: Path
    store: str
    seq: int
    chain: str = ""

    def read_aux(self) -> dict[bytes, bytes]:
        """The AUX fields recorded in the file (``telstate-store``, ``telstate-seq``, ...).

        Raises
        ------
        RdbParseError
            If the file is not a valid RDB file.
        """
        return read_aux(self.path)


def snapshot_name(store: str, seq: int, chain: bytes) -> str:
    """File name of the snapshot of `store` at `seq`, where the chain hash is `chain`."""
    return f"telstate-{store}-{seq:016d}-{chain.hex()[:CHAIN_DIGITS]}.rdb"


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
            found.append(
                SnapshotFile(
                    Path(directory, name), match["store"], int(match["seq"]), match["chain"] or ""
                )
            )
    return sorted(found, key=lambda snapshot: (snapshot.store, snapshot.seq))


def _lock_directory(directory: Path, store: str) -> int:
    """Take the lock on writing `store`'s snapshots into `directory`: its descriptor.

    Raises
    ------
    SnapshotDirectoryBusy
        If another holds it.
    """
    path = directory / f".telstate-{store}.lock"
    # Left in place: whoever made it first (its mode as the umask says)
    # leaves the others at least its reading, which is enough to lock it.
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        writable = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = os.pread(fd, 64, 0).decode().strip()
        os.close(fd)
        raise SnapshotDirectoryBusy(
            f"another replicator{f' (pid {holder})' if holder.isdigit() else ''} writes the"
            f" snapshots of store {store} into {directory} (one at a time: a follower or"
            " backup of the store needs a directory of its own)"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    if writable:  # (for the message of a sink refused)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


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
    SnapshotDirectoryBusy
        If another sink writes the store's snapshots into `directory`
        (see the module docstring); :meth:`close` (or leaving its ``with``
        block) lets the next one in.
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
        # Released by close(), or once the sink is collected (or fails to start).
        self._unlock = weakref.finalize(
            self, os.close, _lock_directory(self.directory, self._store)
        )
        try:
            # Left by a replicator killed while writing a snapshot of this store.
            remove_stale_temporaries(
                self.directory, rf"telstate-{self._store}-[0-9]+(?:-[0-9a-f]{{16}})?\.rdb"
            )
            existing = list_snapshots(self.directory, self._store)
            #: The newest snapshot of the store, if any.
            self.latest: SnapshotFile | None = existing[-1] if existing else None
            # The file's age is the only wall-clock reading, taken once and
            # bounded to [0, interval]: from here on only monotonic time counts.
            self._due = time.monotonic()
            if self.latest is not None:
                age = time.time() - self.latest.path.stat().st_mtime
                self._due += min(max(interval - age, 0.0), interval)
        except BaseException:
            self._unlock()
            raise

    def __enter__(self) -> SnapshotSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Let another sink write the store's snapshots into the directory (its lock goes).

        Once is enough; again does nothing. A sink collected unclosed lets go too.
        """
        self._unlock()

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
        self.set_aside_diverged()
        last_seq = self.source.last_seq
        if self.latest is not None and self.latest.seq == last_seq:
            return None  # of this history (set_aside_diverged checked it)
        started = time.monotonic()
        with self.source.snapshot() as snapshot:
            final = self.directory / snapshot_name(self._store, snapshot.seq, snapshot.chain)
            aux = log.position_aux(snapshot.uuid, snapshot.seq, snapshot.chain)
            with RDBWriter(final, aux=aux, keep_empty=True) as writer:
                for record in snapshot.records():
                    writer.write_record(*record)
        self.latest = SnapshotFile(
            final, self._store, snapshot.seq, snapshot.chain.hex()[:CHAIN_DIGITS]
        )
        logger.info(
            "snapshot %s: %d keys in %.2f s",
            final.name,
            writer.keys_written,
            time.monotonic() - started,
        )
        self.prune()
        return self.latest

    def set_aside_diverged(self) -> list[Path]:
        """Move the store's snapshots of another history into ``diverged/``; return them.

        A snapshot is of this history if the store's chain at its seq
        begins with the chain digits in its name. :attr:`latest` becomes
        the newest snapshot that is.
        """
        moved = []
        kept = []
        # Listed first: a snapshot listed was of a seq the log had reached
        # before this reads its end (none can be beyond it but of another history).
        snapshots = list_snapshots(self.directory, self._store)
        last_seq = self.source.last_seq
        for snapshot in snapshots:
            if not snapshot.chain:
                reason = "it has no chain hash (written before chains existed)"
            elif snapshot.seq > last_seq:
                reason = f"the store's log ends at seq {last_seq}"
            else:
                try:
                    chain = self.source.chain_at(snapshot.seq).hex()[:CHAIN_DIGITS]
                except ValueError:
                    chain = ""
                if chain == snapshot.chain:
                    kept.append(snapshot)
                    continue
                reason = f"the store's chain at seq {snapshot.seq} is {chain or 'gone'}"
            aside = self.directory / DIVERGED
            aside.mkdir(exist_ok=True)
            try:
                os.replace(snapshot.path, aside / snapshot.path.name)
            except FileNotFoundError:
                continue
            moved.append(aside / snapshot.path.name)
            logger.warning(
                "snapshot %s is not of the store's current history (%s: the store was restored"
                " from an older copy, rolled back, or holds another history); moved to %s/",
                snapshot.path.name,
                reason,
                aside,
            )
        self.latest = kept[-1] if kept else None
        return moved

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
