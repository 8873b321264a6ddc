"""Writing RDB files from asynchronous telescope states, backends and Redis clients."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import rdb_writer
from ..utils import ensure_binary
from .backend import Backend
from .telescope_state import TelescopeState

if TYPE_CHECKING:
    import redis.asyncio

logger = logging.getLogger(__name__)


class RDBWriter(rdb_writer.RDBWriter):
    """RDB file that stores keys from asynchronous telescope states, backends or Redis.

    As :class:`telstate.rdb_writer.RDBWriter` (same constructor, file
    format, atomic replacement of the file, :meth:`write_record`,
    :meth:`write_dump`, :meth:`close` and :meth:`abort`), except that
    :meth:`save` is a coroutine that reads from the asynchronous side.
    Writing to the file is not asynchronous: it is buffered, and the
    writer flushes every few MiB.

    Parameters
    ----------
    filename
        Destination file; its directory must exist and be writable.
    aux
        AUX fields to store in the header.
    compress
        LZF-compress long strings, as Redis does.
    keep_empty
        Keep a file with no keys on :meth:`close` instead of deleting it.

    Raises
    ------
    OSError
        If the temporary file cannot be created.
    """

    async def save(  # type: ignore[override]
        self,
        client: TelescopeState | Backend | redis.asyncio.Redis,
        keys: Iterable[str | bytes] | None = None,
    ) -> None:
        """Save keys from a telescope state, a backend or a Redis client to the file.

        Missing keys and keys that cannot be written are skipped, counted
        in :attr:`keys_failed` and logged, without raising an exception.

        Parameters
        ----------
        client
            A :class:`telstate.aio.TelescopeState` (its whole backend is
            seen, whatever its prefixes), a :class:`telstate.aio.backend.Backend`,
            or a :class:`redis.asyncio.Redis` compatible client supporting
            ``keys`` and ``dump``.
        keys
            The keys to save (full keys, including any prefix); None
            (default) saves all keys.

        Raises
        ------
        ValueError
            If the writer is closed.
        """
        if self._closed:
            raise ValueError("RDB writer is closed")
        source = client.backend if isinstance(client, TelescopeState) else client
        if keys is None:
            logger.info("No keys specified - dumping entire database")
            keys = await source.keys(b"*")
        for key in keys:
            key = ensure_binary(key)
            # Counting and logging a failed key is the sync writer's job.
            self._save_one(key, self._write_payload, key, await source.dump(key))
