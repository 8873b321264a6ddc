"""The durable store: an append-only event log and the current state in one LMDB environment.

A store is a directory holding an LMDB environment. Every write that
changes the state is one LMDB write transaction that appends an event to
the log (see :mod:`telstate.log`) and updates the state tables, so the two
can never disagree and the state can always be rebuilt from the log
(:func:`replay`, :meth:`LmdbBackend.verify`). Writes that change nothing
(a key or sub-key already set, a sample already present, deleting a
missing key, clearing an empty store) and rejected writes are not events.
Reads come from the state tables only. Every event carries the hash chain
of the log up to it (:mod:`telstate.log`), which ``verify`` checks and
projections (mirror cursor, RDB snapshots) record with their seq.

Modules, one concern each:

:mod:`~telstate.lmdb.settings`
    Every tunable (map size, intervals, chunk sizes, cache limits, tail
    and block sizes), in one table.
:mod:`~telstate.lmdb.layout`
    The tables and the byte layout of their keys and records.
:mod:`~telstate.lmdb.environment`
    The LMDB environment shared per path in a process: opening, growth,
    fork handling, housekeeping, commit wake-ups; durability modes.
:mod:`~telstate.lmdb.samples`
    The sample engine of mutable keys: tail, sealed blocks, ranges.
:mod:`~telstate.lmdb.state`
    Whole keys read from the state tables as RDB records; a snapshot's
    big mutable keys as :class:`~telstate.lmdb.state.SnapshotMembers`,
    read as they are iterated.
:mod:`~telstate.lmdb.eventlog`
    The log table: :func:`~telstate.lmdb.eventlog.append_event` and
    ``append_events`` (the one way into it), chunked reads, events as the
    frontend's key updates.
:mod:`~telstate.lmdb.writes`
    :class:`WriteTxn`: one write transaction and its operations, from the
    keys table to the log (``LmdbBackend.write()`` makes one).
:mod:`~telstate.lmdb.bulk`
    Imports of RDB records: checked chunks, samples straight into sealed
    blocks, events appended many at a time.
:mod:`~telstate.lmdb.audit`
    The state rebuilt from the log: :func:`replay` (whole, in memory),
    :class:`~telstate.lmdb.audit.ReplayedState` (key by key, for ``export
    --until``) and ``verify``'s checks (the chain, and each key replayed
    alone against its state or an RDB file).
:mod:`~telstate.lmdb.upgrade`
    ``telstate upgrade``: a format 1 store (no chain) rewritten as format 2.
:mod:`~telstate.lmdb.follower`
    Follower stores (copies of a primary's log that only its events
    change) and their promotion to primary.
:mod:`~telstate.lmdb.backend`
    :class:`LmdbBackend` and :class:`Snapshot`.
"""

from .audit import replay
from .backend import LmdbBackend, Snapshot
from .environment import DURABILITIES
from .follower import (
    apply_records,
    create_follower,
    make_follower,
    promote,
    read_records,
    writers_of,
)
from .writes import WriteTxn

__all__ = [
    "DURABILITIES",
    "LmdbBackend",
    "Snapshot",
    "WriteTxn",
    "apply_records",
    "create_follower",
    "make_follower",
    "promote",
    "read_records",
    "replay",
    "writers_of",
]
