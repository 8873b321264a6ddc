"""What the synchronous and asynchronous frontends share.

Everything that does not touch the backend lives here: namespaces (views and
prefixes), key and value encoding, argument checks, decoding of results,
condition checks for waits and every error message.

Each operation that talks to the backend is written once, as a *plan*: a
generator that yields requests (:class:`BackendCall` to call a backend
method, :class:`NextUpdate` to wait for a change to some keys), receives
each result by ``send`` (or the backend's exception by ``throw``), and
returns the operation's result. The two frontends
(:mod:`telstate.telescope_state` and :mod:`telstate.aio.telescope_state`)
differ only in how they carry out the requests: by calling the backend, or
by awaiting it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Generator
from operator import itemgetter
from typing import Any, Generic, NamedTuple, TypeVar

from .backend import IndexedKeyUpdate, KeyUpdate, KeyUpdateBase
from .encoding import (
    decode_value,
    decode_values,
    encode_sub_key,
    encode_value,
    equal_encoded_values,
)
from .errors import (
    CancelledError,
    DecodeError,
    ImmutableKeyError,
    InvalidTimestampError,
    TimeoutError,
)
from .utils import KeyType, check_timestamp, display_str, ensure_binary, ensure_str

logger = logging.getLogger(__name__)

_B = TypeVar("_B")
_T = TypeVar("_T", bound="TelescopeStateBase")
_R = TypeVar("_R")
_Key = bytes | str
# The value and the timestamp of a (value, timestamp) sample.
_first, _second = itemgetter(0), itemgetter(1)

#: Longest single wait on a backend monitor, so that cancellation futures
#: and deadlines are checked at least this often. (Lost notifications are
#: the monitor's business: e.g. a Redis reconnect re-subscribes and says
#: "check again".)
MONITOR_POLL_INTERVAL = 1.0


class BackendCall(NamedTuple):
    """A plan's request to call one backend method.

    The sync frontend calls ``getattr(backend, method)(*args)``; the aio
    frontend awaits it. The plan receives the result, or the exception.
    """

    method: str
    args: tuple[Any, ...]


class NextUpdate(NamedTuple):
    """A wait plan's request for the next update to any of `keys`.

    The frontend monitors `keys` (see the backends' ``monitor_keys``) from
    the first such request of a plan until the plan ends, and sends the plan
    each update that is not None.
    """

    keys: list[bytes]
    #: What is awaited, for timeout and cancellation messages.
    what: str


#: Default of :meth:`TelescopeStateBase._get_plan`: raise KeyError for an absent key.
_RAISE: Any = object()

#: An operation written once for both frontends: it yields requests, is sent
#: their results and returns its own.
Plan = Generator[BackendCall | NextUpdate, Any, _R]


def check_immutable_change(key: str, old_enc: bytes, new_enc: bytes, new: Any) -> None:
    """Accept a re-set of an immutable key only if the value is the same.

    Parameters
    ----------
    key
        Human-readable name of the key (with sub-key, for indexed keys).
    old_enc, new_enc
        The stored and the proposed value, encoded.
    new
        The proposed value, before encoding (for the message).

    Raises
    ------
    ImmutableKeyError
        If the values differ, or the stored value cannot be decoded to compare.
    """
    try:
        if not equal_encoded_values(new_enc, old_enc):
            raise ImmutableKeyError(
                f"Attempt to change value of immutable key {key} "
                f"from {decode_value(old_enc)!r} to {new!r}"
            )
    except DecodeError as error:
        raise ImmutableKeyError(
            f"Attempt to set value of immutable key {key} to {new!r} but "
            f"failed to decode the previous value to compare: {error}"
        ) from error
    logger.debug("Immutable key %s set again with the same value", key)


class TelescopeStateBase(Generic[_B]):
    """Namespaces and backend-independent logic of a telescope state.

    Parameters
    ----------
    backend
        The backend to use (exactly one of `backend` and `base`).
    prefixes
        Prefixes tried in turn when looking keys up; writes use the first.
    base
        An existing telescope state whose backend is shared.

    Raises
    ------
    ValueError
        If both or neither of `backend` and `base` are given.
    """

    SEPARATOR = "_"
    SEPARATOR_BYTES = b"_"

    def __init__(
        self,
        backend: _B | None = None,
        prefixes: tuple[_Key, ...] = (b"",),
        base: TelescopeStateBase[_B] | None = None,
    ) -> None:
        if base is not None and backend is not None:
            raise ValueError("cannot specify both base and backend")
        if backend is not None:
            self._backend = backend
        elif base is not None:
            self._backend = base._backend
        else:
            raise ValueError("must specify either base or backend")
        self._prefixes = tuple(ensure_binary(prefix) for prefix in prefixes)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The active key prefixes, as strings, in lookup order."""
        return tuple(ensure_str(prefix) for prefix in self._prefixes)

    @property
    def backend(self) -> _B:
        """The backend shared by this telescope state and all its views."""
        return self._backend

    @classmethod
    def join(cls, *names: str) -> str:
        """Join key components with the namespace separator."""
        return cls.SEPARATOR.join(names)

    def view(self: _T, name: _Key, add_separator: bool = True, exclusive: bool = False) -> _T:
        """Return a view with `name` as the first namespace.

        Parameters
        ----------
        name
            The namespace. A separator is appended if it is non-empty and
            lacks one, unless `add_separator` is false.
        add_separator
            See `name`.
        exclusive
            If true, `name` becomes the only namespace instead of being
            put in front of the existing ones.
        """
        prefix = ensure_binary(name)
        if prefix and add_separator and not prefix.endswith(self.SEPARATOR_BYTES):
            prefix += self.SEPARATOR_BYTES
        prefixes = (prefix,) if exclusive else (prefix, *self._prefixes)
        return self.__class__(prefixes=prefixes, base=self)

    def root(self: _T) -> _T:
        """Return a view with only the root namespace."""
        return self.__class__(base=self)

    # Plans: every operation that talks to the backend, written once for both
    # frontends (see the module docstring). Backend errors arrive by throw().

    def _full_keys(self, key: _Key) -> list[bytes]:
        key = ensure_binary(key)
        return [prefix + key for prefix in self._prefixes]

    def _write_key(self, key: _Key) -> bytes:
        return self._prefixes[0] + ensure_binary(key)

    def _key_type_plan(self, key: _Key) -> Plan[KeyType | None]:
        for full_key in self._full_keys(key):
            key_type = yield BackendCall("key_type", (full_key,))
            if key_type is not None:
                return key_type
        return None

    def _exists_plan(self, key: _Key) -> Plan[bool]:
        return (yield from self._key_type_plan(key)) is not None

    def _keys_plan(self, filter: _Key) -> Plan[list[str]]:
        keys = yield BackendCall("keys", (ensure_binary(filter),))
        return sorted(ensure_str(key) for key in keys)

    def _delete_plan(self, key: _Key) -> Plan[None]:
        for full_key in self._full_keys(key):
            yield BackendCall("delete", (full_key,))

    def _add_plan(
        self, key: _Key, value: Any, ts: float | None, immutable: bool, encoding: bytes
    ) -> Plan[None]:
        full_key = self._write_key(key)
        encoded = encode_value(value, encoding)
        if immutable:
            try:
                old = yield BackendCall("set_immutable", (full_key, encoded))
            except ImmutableKeyError:
                raise _type_change_error(full_key, "immutable") from None
            if old is not None:
                check_immutable_change(display_str(full_key), old, encoded, value)
        else:
            timestamp = time.time() if ts is None else check_timestamp(ts)
            try:
                yield BackendCall("add_mutable", (full_key, encoded, timestamp))
            except ImmutableKeyError:
                raise _type_change_error(full_key, "mutable") from None

    def _set_indexed_plan(self, key: _Key, sub_key: Any, value: Any, encoding: bytes) -> Plan[None]:
        sub_key_enc = encode_sub_key(sub_key)
        full_key = self._write_key(key)
        encoded = encode_value(value, encoding)
        try:
            old = yield BackendCall("set_indexed", (full_key, sub_key_enc, encoded))
        except ImmutableKeyError:
            raise _type_change_error(full_key, "indexed") from None
        if old is not None:
            check_immutable_change(f"{display_str(full_key)}[{sub_key!r}]", old, encoded, value)

    def _get_indexed_plan(
        self, key: _Key, sub_key: Any, default: Any, return_encoded: bool
    ) -> Plan[Any]:
        sub_key_enc = encode_sub_key(sub_key)
        for full_key in self._full_keys(key):
            try:
                raw = yield BackendCall("get_indexed", (full_key, sub_key_enc))
            except KeyError:
                continue
            if raw is None:
                return default
            return raw if return_encoded else decode_value(raw)
        return default

    def _get_plan(self, key: _Key, return_encoded: bool, default: Any = _RAISE) -> Plan[Any]:
        """The value of `key` (see :meth:`get`), or `default` if it is absent.

        Raises
        ------
        KeyError
            If the key is absent from every namespace and no `default` is given.
        """
        for full_key in self._full_keys(key):
            raw, _ = yield BackendCall("get", (full_key,))
            if raw is not None:
                return raw if return_encoded else _decode_raw(raw)
        if default is _RAISE:
            raise KeyError(f"{display_str(ensure_binary(key))} not found")
        return default

    def _get_range_plan(
        self,
        key: _Key,
        st: float | None,
        et: float | None,
        include_previous: bool | None,
        include_end: bool,
        return_encoded: bool,
    ) -> Plan[list[tuple[Any, float]]]:
        if include_previous is None:
            include_previous = st is None
        end_time = math.inf if et is None else float(et)
        start_time = end_time if st is None else float(st)
        if math.isnan(start_time) or math.isnan(end_time):
            raise InvalidTimestampError("cannot use NaN start or end time in get_range")
        for full_key in self._full_keys(key):
            call = (full_key, start_time, end_time, include_previous, include_end)
            try:
                samples = yield BackendCall("get_range", call)
            except ImmutableKeyError:
                raise ImmutableKeyError(
                    f"{display_str(full_key)} is not a mutable key, so it has no range of values"
                ) from None
            if samples is not None:
                if return_encoded:
                    return samples
                values = decode_values(list(map(_first, samples)))
                return list(zip(values, map(_second, samples)))
        raise KeyError(f"{display_str(ensure_binary(key))} not found")

    # Waiting. A wait plan checks its condition, then asks for the next update
    # (NextUpdate) and checks again, until the condition holds. The frontend
    # starts one monitor of the keys at the first NextUpdate and closes it
    # when the plan ends; its first update only means "check again", which
    # covers writes made before the monitor was listening.

    def _wait_key_plan(
        self, key: _Key, condition: Callable[[Any, float | None], bool] | None
    ) -> Plan[None]:
        full_keys = self._full_keys(key)
        request = NextUpdate(full_keys, display_str(ensure_binary(key)))
        update: KeyUpdateBase | None = None
        while True:
            value, timestamp = yield from self._current_plan(full_keys, update)
            if value is not None and (
                condition is None or condition(_decode_raw(value), timestamp)
            ):
                return
            update = yield request

    def _current_plan(
        self, full_keys: list[bytes], update: KeyUpdateBase | None
    ) -> Plan[tuple[Any, float | None]]:
        """(value, timestamp) of the first existing key, preferring what `update` carries."""
        for full_key in full_keys:
            if (
                isinstance(update, KeyUpdate)
                and update.key == full_key
                and update.key_type != KeyType.INDEXED
            ):
                return update.value, getattr(update, "timestamp", None)
            value, timestamp = yield BackendCall("get", (full_key,))
            if value is not None:
                return value, timestamp
        return None, None

    def _wait_indexed_plan(
        self, key: _Key, sub_key: Any, condition: Callable[[Any], bool] | None
    ) -> Plan[None]:
        sub_key_enc = encode_sub_key(sub_key)
        full_keys = self._full_keys(key)
        what = f"{display_str(ensure_binary(key))}[{sub_key!r}]"
        request = NextUpdate(full_keys, what)
        update: KeyUpdateBase | None = None
        while True:
            value = yield from self._indexed_current_plan(full_keys, sub_key_enc, update, what)
            if value is not None and (condition is None or condition(decode_value(value))):
                return
            update = yield request

    def _indexed_current_plan(
        self, full_keys: list[bytes], sub_key: bytes, update: KeyUpdateBase | None, what: str
    ) -> Plan[bytes | None]:
        """Value of the sub-key in the first key that exists, preferring what `update` carries.

        Raises
        ------
        ImmutableKeyError
            If the key, or the update, shows that the key is not indexed.
        """
        for full_key in full_keys:
            if isinstance(update, KeyUpdate) and update.key == full_key:
                if not isinstance(update, IndexedKeyUpdate):
                    raise ImmutableKeyError(f"wait_indexed called on non-indexed key {what}")
                if update.sub_key == sub_key:
                    return update.value
            try:
                return (yield BackendCall("get_indexed", (full_key, sub_key)))
            except KeyError:
                continue
        return None

    # Helpers for the frontends' own (non-backend) methods.

    def _completions(self, keys: list[bytes]) -> list[str]:
        """Keys as seen through this view (prefixes removed), for tab completion."""
        seen: dict[str, None] = {}
        for prefix in self._prefixes:
            for key in keys:
                if key.startswith(prefix):
                    seen[ensure_str(key[len(prefix) :])] = None
        return list(seen)

    @staticmethod
    def _log_loaded(count: int, file: Any) -> None:
        name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else file
        logger.info("Loaded %d keys from %s", count, name)


def _decode_raw(raw: bytes | dict[bytes, bytes]) -> Any:
    """Decode a value as the backend's ``get`` returns it (a dict for indexed keys)."""
    if isinstance(raw, dict):
        return {decode_value(k): decode_value(v) for k, v in raw.items()}
    return decode_value(raw)


def _type_change_error(full_key: bytes, new_type: str) -> ImmutableKeyError:
    return ImmutableKeyError(
        f"Attempt to change key {display_str(full_key)} to {new_type}: "
        "it already exists with another type (delete it first)"
    )


class WaitClock:
    """Deadline and cancellation bookkeeping for one wait on a key.

    Parameters
    ----------
    what
        Human-readable description of what is awaited, for messages.
    timeout
        Seconds to wait in all, or None for no limit.
    cancel_future
        Anything with a ``done()`` method; the wait is cancelled once it is done.
    """

    def __init__(self, what: str, timeout: float | None, cancel_future: Any) -> None:
        self.what = what
        self.timeout = timeout
        self.cancel_future = cancel_future
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def next_timeout(self) -> float:
        """How long the next monitor wait may be.

        Raises
        ------
        CancelledError
            If the cancel future is done.
        TimeoutError
            If the deadline has passed.
        """
        if self.cancel_future is not None and self.cancel_future.done():
            raise CancelledError(f"Wait for {self.what} cancelled")
        if self._deadline is None:
            return MONITOR_POLL_INTERVAL
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Timed out waiting for {self.what} after {self.timeout}s")
        return min(MONITOR_POLL_INTERVAL, remaining)
