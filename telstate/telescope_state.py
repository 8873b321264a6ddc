"""The synchronous frontend: :class:`TelescopeState`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from .backend import Backend
from .encoding import ENCODING_DEFAULT
from .endpoint import Endpoint, endpoint_parser
from .telescope_state_base import NextUpdate, Plan, TelescopeStateBase, WaitClock, _Key
from .utils import KeyType, PathType
from .utils import ensure_binary as ensure_binary  # public here as in katsdptelstate
from .utils import ensure_str as ensure_str  # public here as in katsdptelstate

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

LMDB_SCHEME = "lmdb://"


def backend_from_endpoint(endpoint: str | Endpoint, db: int = 0) -> Backend:
    """Make the backend that an endpoint string names.

    ``''`` is a new :class:`~telstate.memory.MemoryBackend`;
    ``lmdb:///abs/path`` an :class:`~telstate.lmdb.LmdbBackend`; any other
    URL (``redis://``, ``rediss://``, ``unix://``) a
    :class:`~telstate.redis.RedisBackend`; anything else a Redis
    ``host[:port]``.

    Raises
    ------
    ValueError
        If `db` is given for a backend without databases, or the URL is malformed.
    ConnectionError
        If a Redis server cannot be reached.
    """
    if isinstance(endpoint, str) and not endpoint:
        from .memory import MemoryBackend

        if db != 0:
            raise ValueError("Cannot specify a db when using the default (memory) backend")
        return MemoryBackend()
    if isinstance(endpoint, str) and endpoint.startswith(LMDB_SCHEME):
        from .lmdb import LmdbBackend

        if db != 0:
            raise ValueError("Cannot specify a db with an lmdb:// store")
        path = endpoint[len(LMDB_SCHEME) :]
        if not path.startswith("/"):
            raise ValueError(f"{endpoint!r}: an lmdb URL needs an absolute path (lmdb:///abs/path)")
        return LmdbBackend(path)

    from .redis import RedisBackend

    if isinstance(endpoint, str) and "://" in endpoint:
        return RedisBackend.from_url(endpoint, db=db)
    if not isinstance(endpoint, Endpoint):
        endpoint = endpoint_parser(default_port=None)(endpoint)
    return RedisBackend.from_host(endpoint.host, endpoint.port, db=db)


class TelescopeState(TelescopeStateBase[Backend]):
    """Interface to attributes and sensors stored in a telescope state backend.

    Keys are immutable (one value for the life of the store), mutable (a
    time series of (value, timestamp) samples) or indexed (a dictionary of
    immutable sub-keys). Lookups try each prefix in turn; writes use the
    first. See the README for the key types and views.

    Parameters
    ----------
    endpoint
        Where the state lives: a :class:`~telstate.backend.Backend`; ``''``
        for a new in-memory store; ``'lmdb:///abs/path'`` for the durable
        LMDB store; a URL (``redis://``, ``rediss://``, ``unix://``) or an
        :class:`~telstate.endpoint.Endpoint` / ``host[:port]`` string for Redis.
    db
        Redis database number.
    prefixes
        Namespaces tried in turn for lookups (normally made by :meth:`view`).
    base
        Existing telescope state whose backend this one shares.

    Raises
    ------
    ConnectionError
        If the initial connection to a Redis server fails.
    ValueError
        If `base` is combined with `endpoint` or `db`, or a Backend with `db`.
    """

    def __init__(
        self,
        endpoint: str | Endpoint | Backend = "",
        db: int = 0,
        prefixes: tuple[_Key, ...] = (b"",),
        base: TelescopeState | None = None,
    ) -> None:
        backend: Backend | None
        if base is not None:
            if endpoint != "":
                raise ValueError("Cannot specify both base and endpoint")
            if db != 0:
                raise ValueError("Cannot specify both base and db")
            backend = None
        elif isinstance(endpoint, Backend):
            if db != 0:
                raise ValueError("Cannot specify both a backend and a db")
            backend = endpoint
        else:
            backend = backend_from_endpoint(endpoint, db)
        super().__init__(backend, prefixes, base)

    def _run(
        self,
        plan: Plan[_R],
        timeout: float | None = None,
        cancel_future: Any = None,
    ) -> _R:
        """Carry out a plan (see :mod:`telstate.telescope_state_base`) on the backend.

        `timeout` and `cancel_future` bound the waits of a wait plan, as in
        :meth:`wait_key`.
        """
        backend = self._backend
        monitor = None
        clock = None
        try:
            request = next(plan)
            while True:
                if isinstance(request, NextUpdate):
                    update = None
                    if monitor is None:
                        clock = WaitClock(request.what, timeout, cancel_future)
                        clock.next_timeout()
                        monitor = backend.monitor_keys(request.keys)
                        update = monitor.send(None)
                    assert clock is not None
                    while update is None:
                        update = monitor.send(clock.next_timeout())
                    request = plan.send(update)
                    continue
                try:
                    result = getattr(backend, request.method)(*request.args)
                except Exception as error:
                    request = plan.throw(error)
                else:
                    request = plan.send(result)
        except StopIteration as stop:
            return stop.value
        finally:
            if monitor is not None:
                monitor.close()

    def load_from_file(self, file: PathType | BinaryIO) -> int:
        """Load keys from a Redis-compatible RDB snapshot file.

        Keys are stored as they are in the file, ignoring the view and
        without checks; load into an empty telescope state.

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
        count = self._backend.load_from_file(file)
        self._log_loaded(count, file)
        return count

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._run(self._get_plan(key, False))
        except KeyError as error:
            raise AttributeError(str(error)) from None

    def __getitem__(self, key: _Key) -> Any:
        return self._run(self._get_plan(key, False))

    def __setattr__(self, key: str, value: Any) -> None:
        if key.startswith("_"):
            super().__setattr__(key, value)
        elif any(key in cls.__dict__ for cls in type(self).__mro__):
            raise AttributeError(
                f"{key!r} is a method or property of TelescopeState, so it cannot be "
                "set as an attribute: use telstate.add or telstate[key] = value"
            )
        else:
            self.add(key, value, immutable=True)

    def __setitem__(self, key: _Key, value: Any) -> None:
        self.add(key, value, immutable=True)

    def __contains__(self, key: _Key) -> bool:
        """Whether `key` exists in any namespace of this view."""
        return self._run(self._exists_plan(key))

    def __dir__(self) -> list[str]:
        keys = [k for k in self._completions(self._backend.keys(b"*")) if k.isidentifier()]
        return sorted(set(super().__dir__()) | set(keys))

    def _ipython_key_completions_(self) -> list[str]:
        """Keys for IPython tab completion, as seen through this view's namespaces."""
        return self._completions(self._backend.keys(b"*"))

    def is_immutable(self, key: _Key) -> bool:
        """Whether `key` is immutable (indexed keys are not); False if absent.

        Deprecated: use :meth:`key_type`.
        """
        return self.key_type(key) == KeyType.IMMUTABLE

    def key_type(self, key: _Key) -> KeyType | None:
        """The type of `key` in the first namespace that has it, or None if absent."""
        return self._run(self._key_type_plan(key))

    def exists(self, key: _Key) -> bool:
        """Whether `key` exists in any namespace of this view."""
        return self._run(self._exists_plan(key))

    def keys(self, filter: _Key = "*") -> list[str]:
        """All fully-qualified keys matching a Redis glob pattern, sorted.

        The view's namespaces are ignored.
        """
        return self._run(self._keys_plan(filter))

    def delete(self, key: _Key) -> None:
        """Remove `key` and all its values from every namespace of this view.

        This breaks the promise of immutable keys: use it rarely (e.g. in tests).
        """
        self._run(self._delete_plan(key))

    def clear(self) -> None:
        """Remove all keys in all namespaces (use rarely, e.g. in tests)."""
        self._backend.clear()

    def add(
        self,
        key: _Key,
        value: Any,
        ts: float | None = None,
        immutable: bool = False,
        encoding: bytes = ENCODING_DEFAULT,
    ) -> None:
        """Add a value to a key in the first namespace of this view.

        A mutable key (the default) gains a (value, timestamp) sample. An
        immutable key can be set once; setting it again is allowed only with
        an equal value.

        Parameters
        ----------
        key
            Key name.
        value
            Any value `encoding` can encode.
        ts
            Sample timestamp (seconds), ignored for immutables; default now.
        immutable
            Whether the key is immutable.
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
        self._run(self._add_plan(key, value, ts, immutable, encoding))

    def set_indexed(
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
        self._run(self._set_indexed_plan(key, sub_key, value, encoding))

    def get_indexed(
        self, key: _Key, sub_key: Any, default: Any = None, return_encoded: bool = False
    ) -> Any:
        """Get the value of one sub-key of an indexed key, or `default` if absent.

        Raises
        ------
        ImmutableKeyError
            If the key exists and is not indexed.
        """
        return self._run(self._get_indexed_plan(key, sub_key, default, return_encoded))

    def get(self, key: _Key, default: Any = None, return_encoded: bool = False) -> Any:
        """Get the value of a key: the latest for mutable keys, a dict for indexed keys.

        Returns `default` if the key is absent from every namespace.
        """
        return self._run(self._get_plan(key, return_encoded, default))

    def get_range(
        self,
        key: _Key,
        st: float | None = None,
        et: float | None = None,
        include_previous: bool | None = None,
        include_end: bool = False,
        return_encoded: bool = False,
    ) -> list[tuple[Any, float]]:
        """Get (value, timestamp) samples of a mutable key in a time range.

        Parameters
        ----------
        key
            Key name.
        st
            Start time (inclusive). Default: `et`, with `include_previous`,
            i.e. the latest sample before `et`.
        et
            End time (exclusive unless `include_end`). Default: the end of time.
        include_previous
            Also return the last sample before `st`. Default: true if `st`
            is not given.
        include_end
            Treat `et` as inclusive.
        return_encoded
            Return values as stored, without decoding.

        Returns
        -------
        Samples in order of time (equal times in order of encoded value).
        ``get_range(k)`` is the latest sample, ``get_range(k, st=0)`` all of them.

        Raises
        ------
        KeyError
            If the key is absent from every namespace.
        ImmutableKeyError
            If the key exists and is not mutable.
        InvalidTimestampError
            If `st` or `et` is NaN.
        """
        return self._run(
            self._get_range_plan(key, st, et, include_previous, include_end, return_encoded)
        )

    def wait_key(
        self,
        key: _Key,
        condition: Callable[[Any, float | None], bool] | None = None,
        timeout: float | None = None,
        cancel_future: Any = None,
    ) -> None:
        """Wait until `key` exists and, if given, ``condition(value, ts)`` is true.

        Parameters
        ----------
        key
            Key name.
        condition
            Called with the latest value and its timestamp (None if not
            mutable); the wait ends when it returns true.
        timeout
            Seconds to wait before raising :exc:`TimeoutError`; None waits forever.
        cancel_future
            Object with ``done()``; the wait raises :exc:`CancelledError`
            once it is done (checked at least once a second).

        Raises
        ------
        TimeoutError
            If the timeout expires first.
        CancelledError
            If `cancel_future` is done first.
        """
        self._run(self._wait_key_plan(key, condition), timeout, cancel_future)

    def wait_indexed(
        self,
        key: _Key,
        sub_key: Any,
        condition: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
        cancel_future: Any = None,
    ) -> None:
        """Wait until a sub-key exists and, if given, ``condition(value)`` is true.

        Parameters are as for :meth:`wait_key`, with `sub_key` the sub-key
        to watch and `condition` taking only the value.

        Raises
        ------
        TimeoutError
            If the timeout expires first.
        CancelledError
            If `cancel_future` is done first.
        ImmutableKeyError
            If the key exists (or is created while waiting) and is not indexed.
        """
        self._run(self._wait_indexed_plan(key, sub_key, condition), timeout, cancel_future)
