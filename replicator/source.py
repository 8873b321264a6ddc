"""What the replicator reads: a store's event log and consistent snapshots of its state.

:class:`telstate.lmdb.LmdbBackend` is the real source; the protocols here
name only what the sinks use, so that each sink can be read (and tested)
without the LMDB details.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol
from uuid import UUID

from telstate.backend import Record
from telstate.log import Event


class StoreSnapshot(Protocol):
    """The whole state of a store as of one event, read in one transaction."""

    @property
    def seq(self) -> int:
        """Sequence number of the last event the snapshot includes (0 for a new store)."""

    @property
    def uuid(self) -> UUID:
        """Identity of the store."""

    @property
    def chain(self) -> bytes:
        """The store's chain hash at :attr:`seq` (see :mod:`telstate.log`)."""

    def records(self) -> Iterator[Record]:
        """Every key as ``(key, key_type, value)``, as :mod:`telstate.rdb_writer` takes them."""


class EventSource(Protocol):
    """A store's append-only event log, as the sinks see it."""

    @property
    def uuid(self) -> UUID:
        """Identity of the store: a new store gets a new one."""

    @property
    def path(self) -> str:
        """Where the store lives (for messages that tell people where to write)."""

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest event (0 if there is none)."""

    def chain_at(self, seq: int) -> bytes:
        """The chain hash of the log up to event `seq` (seq 0: the store's genesis hash).

        Raises ValueError if the log has no event `seq`.
        """

    def events(self, start_seq: int = 1, end_seq: int | None = None) -> Iterator[Event]:
        """Events with ``start_seq <= seq <= end_seq``, in log order."""

    def snapshot(self) -> AbstractContextManager[StoreSnapshot]:
        """Open one read transaction and describe the state as of its last event."""

    def wait_for_commit(self, after_seq: int, timeout: float | None = None) -> int:
        """Wait up to `timeout` seconds for an event later than `after_seq`; return the last seq."""
