"""The asynchronous frontend: :class:`TelescopeState`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from .. import backend as sync_backend
from ..encoding import ENCODING_DEFAULT
from ..telescope_state_base import NextUpdate, Plan, TelescopeStateBase, _Key
from ..utils import KeyType, PathType
from .backend import Backend

logger = logging.getLogger(__name__)

_R = TypeVar("_R")


class TelescopeState(TelescopeStateBase[Backend]):
    """Asynchronous interface to attributes and sensors in a telescope state backend.

    The asynchronous twin of :class:`telstate.TelescopeState`, with the
    interface of ``katsdptelstate.aio.TelescopeState``: the same key types,
    views and errors, with every method that reaches the backend a
    coroutine (``await ts.get(key)``, ``await ts[key]``). Both frontends run
    the same plans (:mod:`telstate.telescope_state_base`), so they behave
    alike by construction.

    Waits (:meth:`wait_key`, :meth:`wait_indexed`) have no timeout of their
    own: bound them with :func:`asyncio.wait_for` or :func:`asyncio.timeout`,
    or cancel their task. Many concurrent waits cost one subscription or
    watcher per backend, not a thread or a connection each.

    Parameters
    ----------
    backend
        The asynchronous backend, e.g. :class:`telstate.aio.memory.MemoryBackend`
        or :class:`telstate.aio.redis.RedisBackend`. A new in-memory backend
        if neither it nor `base` is given.
    prefixes
        Namespaces tried in turn for lookups (normally made by :meth:`view`).
    base
        Existing telescope state whose backend this one shares.

    Raises
    ------
    ValueError
        If both `backend` and `base` are given.
    TypeError
        If `backend` is a synchronous backend.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        prefixes: tuple[_Key, ...] = (b"",),
        base: TelescopeState | None = None,
    ) -> None:
        if isinstance(backend, sync_backend.Backend):
            raise TypeError(
                f"{type(backend).__name__} is a synchronous backend: use it with "
                "telstate.TelescopeState, or use a backend from telstate.aio"
            )
        if backend is None and base is None:
            from .memory import MemoryBackend

            backend = MemoryBackend()
        super().__init__(backend, prefixes, base)

    async def _run(self, plan: Plan[_R]) -> _R:
        """Carry out a plan (see :mod:`telstate.telescope_state_base`) on the backend."""
        backend = self._backend
        monitor = None
        try:
            request = next(plan)
            while True:
                if isinstance(request, NextUpdate):
                    if monitor is None:
                        monitor = backend.monitor_keys(request.keys)
                    request = plan.send(await anext(monitor))
                    continue
                try:
                    result = await getattr(backend, request.method)(*request.args)
                except Exception as error:
                    request = plan.throw(error)
                else:
                    request = plan.send(result)
        except StopIteration as stop:
            return stop.value
        finally:
            if monitor is not None:
                await monitor.aclose()

    async def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load keys from a Redis-compatible RDB snapshot file.

        Keys are stored as they are in the file, ignoring the view and
        without checks; load into an empty telescope state. The file is
        parsed in a worker thread, so the event loop keeps running.

        Parameters
        ----------
        file
            Path, or binary file object (which need not be seekable).

        Returns
        -------
        The number of keys loaded.

        Raises
        ------
        RdbParseError
            If the file is truncated, malformed or not an RDB file.
        OSError
            If the file cannot be opened or read.
        """
        count = await self._backend.load_from_file(file)
        self._log_loaded(count, file)
        return count

    async def __getitem__(self, key: _Key) -> Any:
        """The value of `key` (``await ts[key]``).

        Raises
        ------
        KeyError
            If the key is absent from every namespace.
        """
        return await self._run(self._get_plan(key, False))

    async def set(self, key: _Key, value: Any) -> None:
        """Set an immutable key: short for ``add(key, value, immutable=True)``.

        Raises
        ------
        ImmutableKeyError
            If the key exists with another value or type.
        """
        await self.add(key, value, immutable=True)

    async def exists(self, key: _Key) -> bool:
        """Whether `key` exists in any namespace of this view."""
        return await self._run(self._exists_plan(key))

    async def key_type(self, key: _Key) -> KeyType | None:
        """The type of `key` in the first namespace that has it, or None if absent."""
        return await self._run(self._key_type_plan(key))

    async def keys(self, filter: _Key = "*") -> list[str]:
        """All fully-qualified keys matching a Redis glob pattern, sorted.

        The view's namespaces are ignored.
        """
        return await self._run(self._keys_plan(filter))

    async def delete(self, key: _Key) -> None:
        """Remove `key` and all its values from every namespace of this view.

        This breaks the promise of immutable keys: use it rarely (e.g. in tests).
        """
        await self._run(self._delete_plan(key))

    async def clear(self) -> None:
        """Remove all keys in all namespaces (use rarely, e.g. in tests)."""
        await self._backend.clear()

    async def add(
        self,
        key: _Key,
        value: Any,
        ts: float | None = None,
        immutable: bool = False,
        encoding: bytes = ENCODING_DEFAULT,
    ) -> None:
        """Add a value to a key in the first namespace of this view.

        As :meth:`telstate.TelescopeState.add`.

        Parameters
        ----------
        key
            Key name.
        value
            Any value `encoding` can encode.
        ts
            Sample timestamp (seconds), ignored for immutables; default now.
        immutable
            Whether the key is immutable (set once; setting it again is
            allowed only with an equal value).
        encoding
            See :func:`~telstate.encoding.encode_value`.

        Raises
        ------
        ImmutableKeyError
            If an immutable key would change value, or the key exists with another type.
        InvalidTimestampError
            If `ts` is negative, NaN or infinite.
        EncodeError
            If `value` cannot be encoded.
        """
        await self._run(self._add_plan(key, value, ts, immutable, encoding))

    async def set_indexed(
        self, key: _Key, sub_key: Any, value: Any, encoding: bytes = ENCODING_DEFAULT
    ) -> None:
        """Set a sub-key of an indexed key in the first namespace of this view.

        Parameters
        ----------
        key
            Key name.
        sub_key
            Hashable, encodable sub-key (always msgpack-encoded).
        value
            Any value `encoding` can encode.
        encoding
            Encoding of `value` (not of `sub_key`).

        Raises
        ------
        TypeError
            If `sub_key` is not hashable.
        ImmutableKeyError
            If the sub-key exists with a different value, or the key exists
            and is not indexed.
        """
        await self._run(self._set_indexed_plan(key, sub_key, value, encoding))

    async def get_indexed(
        self, key: _Key, sub_key: Any, default: Any = None, return_encoded: bool = False
    ) -> Any:
        """Get the value of one sub-key of an indexed key, or `default` if absent.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not indexed.
        """
        return await self._run(self._get_indexed_plan(key, sub_key, default, return_encoded))

    async def get(self, key: _Key, default: Any = None, return_encoded: bool = False) -> Any:
        """Get the value of a key: the latest for mutable keys, a dict for indexed keys.

        Returns `default` if the key is absent from every namespace.
        """
        return await self._run(self._get_plan(key, return_encoded, default))

    async def get_range(
        self,
        key: _Key,
        st: float | None = None,
        et: float | None = None,
        include_previous: bool | None = None,
        include_end: bool = False,
        return_encoded: bool = False,
    ) -> list[tuple[Any, float]]:
        """Get (value, timestamp) samples of a mutable key in a time range.

        As :meth:`telstate.TelescopeState.get_range`: ``get_range(k)`` is
        the latest sample, ``get_range(k, st=0)`` all of them.

        Parameters
        ----------
        key
            Key name.
        st
            Start time (inclusive). Default: `et`, with `include_previous`.
        et
            End time (exclusive unless `include_end`). Default: the end of time.
        include_previous
            Also return the last sample before `st`. Default: true if `st`
            is not given.
        include_end
            Treat `et` as inclusive.
        return_encoded
            Return values as stored, without decoding.

        Raises
        ------
        KeyError
            If the key is absent from every namespace.
        ImmutableKeyError
            If the key exists and is not mutable.
        InvalidTimestampError
            If `st` or `et` is NaN.
        """
        return await self._run(
            self._get_range_plan(key, st, et, include_previous, include_end, return_encoded)
        )

    async def wait_key(
        self, key: _Key, condition: Callable[[Any, float | None], bool] | None = None
    ) -> None:
        """Wait until `key` exists and, if given, ``condition(value, ts)`` is true.

        The wait can last forever: bound it with :func:`asyncio.wait_for`
        or cancel it; either leaves nothing behind.

        Parameters
        ----------
        key
            Key name.
        condition
            Called with the latest value and its timestamp (None if not
            mutable); the wait ends when it returns true.
        """
        await self._run(self._wait_key_plan(key, condition))

    async def wait_indexed(
        self, key: _Key, sub_key: Any, condition: Callable[[Any], bool] | None = None
    ) -> None:
        """Wait until a sub-key exists and, if given, ``condition(value)`` is true.

        Parameters
        ----------
        key
            Key name.
        sub_key
            The sub-key to watch.
        condition
            Called with the sub-key's value; the wait ends when it returns true.

        Raises
        ------
        ImmutableKeyError
            If the key exists (or is created while waiting) and is not indexed.
        """
        await self._run(self._wait_indexed_plan(key, sub_key, condition))
