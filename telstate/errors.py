"""Exception classes, with the same names and hierarchy as katsdptelstate's."""

from __future__ import annotations

import os


class TelstateError(RuntimeError):
    """Base class for errors from this package."""


class ConnectionError(TelstateError):
    """The initial connection to the Redis server failed."""


class RdbParseError(TelstateError):
    """Error parsing RDB file.

    Parameters
    ----------
    filename
        The file being parsed, if it has a name.
    reason
        What was wrong with it, and where.
    """

    def __init__(
        self, filename: str | bytes | os.PathLike | None = None, reason: str | None = None
    ) -> None:
        super().__init__(filename, reason)
        self.filename = filename
        self.reason = reason

    def __str__(self) -> str:
        name = repr(os.fsdecode(self.filename)) if self.filename else "object"
        message = f"Invalid RDB file {name}"
        return f"{message}: {self.reason}" if self.reason else message


class InvalidKeyError(TelstateError):
    """A key collides with a class attribute.

    Kept for backwards compatibility only: it is no longer raised.
    """


class InvalidTimestampError(TelstateError):
    """A timestamp is negative or not finite."""


class ImmutableKeyError(TelstateError):
    """An attempt was made to modify an immutable key, or to change a key's type."""


class TimeoutError(TelstateError):
    """A wait for a key timed out."""


class CancelledError(TelstateError):
    """A wait for a key was cancelled."""


class DecodeError(ValueError, TelstateError):
    """An encoded value found in telstate could not be decoded."""


class EncodeError(ValueError, TelstateError):
    """A value could not be encoded."""


class ReadOnlyError(TelstateError):
    """A write was attempted on a read-only store or on a replicated mirror.

    Not in katsdptelstate: raised by telstate backends that refuse writes.
    """


class StoreError(TelstateError):
    """An LMDB store is missing, damaged or not a telstate store.

    Not in katsdptelstate.
    """


class WriteTimeoutError(TimeoutError):
    """A write sent through a mirror got no reply within its timeout.

    Not in katsdptelstate. The request expires at the log host unapplied:
    the daemon never applies a request older than its timeout.
    """


class ChainMismatchError(StoreError):
    """An event does not continue a store's chain: it is of another history.

    Not in katsdptelstate. Raised when a follower is given an event of
    another store, of another history of its primary (one that went on
    after a promotion elsewhere), or an altered one.
    """
