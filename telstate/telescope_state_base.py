"""What the synchronous and asynchronous frontends share.

Everything that does not touch the backend lives here: namespaces (views and
prefixes), key and value encoding, argument checks, decoding of results,
condition checks for waits and every error message. The two frontends
(:mod:`telstate.telescope_state` and :mod:`telstate.aio.telescope_state`)
only call the backend, with or without ``await``, and hand the results to
these methods.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .backend import IndexedKeyUpdate, KeyUpdate, KeyUpdateBase
from .encoding import (
    ENCODING_DEFAULT,
    decode_value,
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
_Key = bytes | str

#: Longest single wait on a backend monitor, so that lost notifications
#: (e.g. a Redis reconnect) and cancellation futures are noticed promptly.
MONITOR_POLL_INTERVAL = 1.0


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
            f"Attempt to set value of immutable key {key} to {new!r} but the stored "
            f"value could not be decoded to compare: {error}"
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

    # Everything below prepares backend calls and interprets their results.

    def _full_keys(self, key: _Key) -> list[bytes]:
        key = ensure_binary(key)
        return [prefix + key for prefix in self._prefixes]

    def _write_key(self, key: _Key) -> bytes:
        return self._prefixes[0] + ensure_binary(key)

    @staticmethod
    def _timestamp(ts: float | None) -> float:
        return time.time() if ts is None else check_timestamp(ts)

    @staticmethod
    def _encode(value: Any, encoding: bytes = ENCODING_DEFAULT) -> bytes:
        return encode_value(value, encoding)

    @staticmethod
    def _encode_sub_key(sub_key: Any) -> bytes:
        return encode_sub_key(sub_key)

    @staticmethod
    def _type_change_error(full_key: bytes, new_type: str) -> ImmutableKeyError:
        return ImmutableKeyError(
            f"Attempt to change key {display_str(full_key)} to {new_type}: "
            "it already exists with another type (delete it first)"
        )

    @staticmethod
    def _check_immutable_result(full_key: bytes, old: bytes | None, new_enc: bytes, new: Any):
        if old is not None:
            check_immutable_change(display_str(full_key), old, new_enc, new)

    @staticmethod
    def _check_indexed_result(
        full_key: bytes, sub_key: Any, old: bytes | None, new_enc: bytes, new: Any
    ) -> None:
        if old is not None:
            check_immutable_change(f"{display_str(full_key)}[{sub_key!r}]", old, new_enc, new)

    @staticmethod
    def _decode_get(raw: bytes | dict[bytes, bytes], return_encoded: bool) -> Any:
        if return_encoded:
            return raw
        if isinstance(raw, dict):
            return {decode_value(k): decode_value(v) for k, v in raw.items()}
        return decode_value(raw)

    @staticmethod
    def _not_found(key: _Key) -> KeyError:
        return KeyError(f"{display_str(ensure_binary(key))} not found")

    @staticmethod
    def _range_args(
        st: float | None, et: float | None, include_previous: bool | None
    ) -> tuple[float, float, bool]:
        if include_previous is None:
            include_previous = st is None
        et = math.inf if et is None else float(et)
        st = et if st is None else float(st)
        if math.isnan(st) or math.isnan(et):
            raise InvalidTimestampError("cannot use NaN start or end time in get_range")
        return st, et, include_previous

    @staticmethod
    def _not_mutable(full_key: bytes) -> ImmutableKeyError:
        return ImmutableKeyError(
            f"{display_str(full_key)} is not a mutable key, so it has no range of values"
        )

    @staticmethod
    def _decode_range(
        samples: list[tuple[bytes, float]], return_encoded: bool
    ) -> list[tuple[Any, float]]:
        if return_encoded:
            return samples
        return [(decode_value(value), timestamp) for value, timestamp in samples]

    def _keys_result(self, keys: list[bytes]) -> list[str]:
        return sorted(ensure_str(key) for key in keys)

    def _completions(self, keys: list[bytes]) -> list[str]:
        """Keys as seen through this view (prefixes removed), for tab completion."""
        seen: dict[str, None] = {}
        for prefix in self._prefixes:
            for key in keys:
                if key.startswith(prefix):
                    seen[ensure_str(key[len(prefix) :])] = None
        return list(seen)

    # Waiting: the condition checks and the timeout/cancel bookkeeping.

    @staticmethod
    def _key_condition_met(
        condition: Callable[[Any, float | None], bool] | None,
        value: bytes | dict[bytes, bytes] | None,
        timestamp: float | None,
    ) -> bool:
        if value is None:
            return False
        if condition is None:
            return True
        if isinstance(value, dict):
            decoded: Any = {decode_value(k): decode_value(v) for k, v in value.items()}
        else:
            decoded = decode_value(value)
        return bool(condition(decoded, timestamp))

    @staticmethod
    def _value_from_update(
        update: KeyUpdateBase | None, full_key: bytes
    ) -> tuple[bytes, float | None] | None:
        """The (value, timestamp) an update carries for `full_key`, if it carries one."""
        if (
            isinstance(update, KeyUpdate)
            and update.key == full_key
            and update.key_type != KeyType.INDEXED
        ):
            return update.value, getattr(update, "timestamp", None)
        return None

    @staticmethod
    def _indexed_condition_met(condition: Callable[[Any], bool] | None, value: bytes) -> bool:
        return condition is None or bool(condition(decode_value(value)))

    @staticmethod
    def _indexed_update_value(
        update: KeyUpdateBase | None, full_key: bytes, sub_key: bytes, key_str: str
    ) -> bytes | None:
        """The value an indexed update carries for (`full_key`, `sub_key`), if any.

        Raises
        ------
        ImmutableKeyError
            If the update shows that the key is not indexed.
        """
        if not isinstance(update, KeyUpdate) or update.key != full_key:
            return None
        if not isinstance(update, IndexedKeyUpdate):
            raise ImmutableKeyError(f"wait_indexed called on non-indexed key {key_str}")
        return update.value if update.sub_key == sub_key else None


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
