"""Key types, timestamp packing and string helpers shared by every backend."""

from __future__ import annotations

import enum
import functools
import math
import os
import re
import struct
from typing import Any

from .errors import InvalidTimestampError

PathType = str | bytes | os.PathLike

_DOUBLE = struct.Struct(">d")
_UINT64 = struct.Struct(">Q")


class KeyType(enum.Enum):
    """The three kinds of telstate key; the value is the pub/sub type byte."""

    IMMUTABLE = 1
    MUTABLE = 2
    INDEXED = 3


def ensure_str(s: Any, encoding: str = "utf-8", *, errors: str = "surrogateescape") -> str:
    """Coerce `s` to :class:`str`, decoding bytes (undecodable bytes survive as surrogates).

    Raises
    ------
    TypeError
        If `s` is neither str nor bytes.
    """
    if isinstance(s, str):
        return s
    if isinstance(s, (bytes, bytearray, memoryview)):
        return bytes(s).decode(encoding, errors)
    raise TypeError(f"not expecting type {type(s)!r}")


def ensure_binary(s: Any, encoding: str = "utf-8", *, errors: str = "surrogateescape") -> bytes:
    """Coerce `s` to :class:`bytes`, encoding str (surrogates become the original bytes).

    Raises
    ------
    TypeError
        If `s` is neither str nor bytes.
    """
    if isinstance(s, bytes):
        return s
    if isinstance(s, str):
        return s.encode(encoding, errors)
    if isinstance(s, (bytearray, memoryview)):
        return bytes(s)
    raise TypeError(f"not expecting type {type(s)!r}")


def display_str(s: Any) -> str:
    """Return the most human-readable yet accurate representation of `s`."""
    if isinstance(s, bytes):
        try:
            return repr(s.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(s)
    return repr(s)


def pack_timestamp(timestamp: float) -> bytes:
    """Encode a non-negative timestamp as 8 big-endian bytes that sort like the number."""
    # -0.0 packs with the sign bit set, which would sort after everything else.
    return _DOUBLE.pack(timestamp if timestamp != 0.0 else 0.0)


def split_timestamp(packed: bytes) -> tuple[bytes, float]:
    """Split a mutable-key member into (value, timestamp).

    The member is the 8-byte big-endian IEEE-754 timestamp followed by the value.
    """
    return packed[8:], _DOUBLE.unpack_from(packed)[0]


def pack_query_timestamp(time: float, is_end: bool, include_end: bool = False) -> bytes:
    """Make a ZRANGEBYLEX bound for `time`.

    For the start of a range pass ``is_end=False`` (inclusive bound). For the
    end pass ``is_end=True``; `include_end` makes it inclusive, which is done
    by moving to the next representable packed value and excluding that.
    """
    if time == math.inf:
        return b"+"
    if time < 0.0 or (time == 0.0 and not include_end):
        return b"-"
    packed = pack_timestamp(time)
    if include_end:
        # No overflow: the sign bit of a non-negative double is clear.
        packed = _UINT64.pack(_UINT64.unpack(packed)[0] + 1)
    return (b"(" if is_end else b"[") + packed


def check_timestamp(timestamp: float) -> float:
    """Return `timestamp` as a float if it is finite and non-negative.

    Raises
    ------
    InvalidTimestampError
        If it is negative, NaN or infinite.
    """
    timestamp = float(timestamp)
    if not math.isfinite(timestamp) or timestamp < 0.0:
        raise InvalidTimestampError(
            f"timestamp {timestamp!r} is not allowed: it must be finite and non-negative"
        )
    return timestamp


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: bytes) -> re.Pattern[bytes]:
    """Compile a Redis glob pattern (as used by KEYS) into an equivalent regex.

    Follows Redis's matcher exactly: ``*``, ``?``, ``\\`` escapes, and
    ``[...]`` classes with ``^`` negation, ranges in either order (of
    bytes compared as signed, as Redis on x86 compares them), escapes
    inside the class, and an unclosed class ending at the end of the pattern;
    and as KEYS, an empty key matches ``*`` (and an empty pattern) only.
    Use ``compile_pattern(p).fullmatch(key)``.

    A match takes time linear in the key for each of the pattern's
    characters, whatever the pattern (it may come from a file): a run of
    ``*`` is one, and each part between two of them (a fixed number of
    characters) is matched at its first place after the part before, with
    no going back, which is where it is matched if at all. (A translation
    of each ``*`` to ``.*`` backtracks: ``*a*a*a*a*a*a*a*a*b`` against a
    key of 60 ``a`` would not end.)
    """
    # The pattern as runs of single-character matchers, split at its stars.
    runs: list[list[bytes]] = [[]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:  # '*'
            if runs[-1] or len(runs) == 1:
                runs.append([])
        elif c == 0x3F:  # '?'
            runs[-1].append(b".")
        elif c == 0x5C:  # backslash: a trailing one is literal
            if i + 1 < n:
                i += 1
            runs[-1].append(re.escape(pattern[i : i + 1]))
        elif c == 0x5B:  # '['
            i += 1
            negate = i < n and pattern[i] == 0x5E
            if negate:
                i += 1
            members: list[bytes] = []
            while i < n and pattern[i] != 0x5D:
                if pattern[i] == 0x5C and i + 1 < n:
                    i += 1
                    members.append(_class_byte(pattern[i]))
                elif i + 2 < n and pattern[i + 1] == 0x2D:  # 'a-z' (either order)
                    members += _class_range(pattern[i], pattern[i + 2])
                    i += 2
                else:
                    members.append(_class_byte(pattern[i]))
                i += 1
            if not members:
                runs[-1].append(b"." if negate else b"(?!)")
            else:
                runs[-1].append(b"[" + (b"^" if negate else b"") + b"".join(members) + b"]")
        else:
            runs[-1].append(re.escape(pattern[i : i + 1]))
        i += 1
    first, *starred = (b"".join(run) for run in runs)
    # Redis's matcher takes an empty key for no pattern but an empty one;
    # KEYS takes it for "*" (every key) too. (A pattern with more than stars
    # needs a character anyway.)
    parts = [b"(?=.)" if pattern not in (b"", b"*") and not any(runs) else b"", first]
    if starred:
        *middle, last = starred
        for number, run in enumerate(middle):
            # The shortest stretch up to the run's first place, kept: a
            # lookahead is never entered again when what follows fails.
            parts.append(b"(?=(?P<s%d>.*?%s))(?P=s%d)" % (number, run, number))
        parts.append(b".*" + last)
    return re.compile(b"".join(parts), re.DOTALL)


def _class_range(a: int, b: int) -> list[bytes]:
    """The class members for the range between bytes `a` and `b` (either order), as Redis has it.

    Redis compares its bytes as C ``char``, signed on x86: a range from
    ``a`` to ``\xff`` (-1) is the one from -1 to ``a``, that is ``\xff``
    and ``\x00`` to ``a``.
    """
    low, high = sorted(c - 256 if c >= 128 else c for c in (a, b))
    if low < 0 <= high:
        return [b"\\x00-" + _class_byte(high), _class_byte(low + 256) + b"-\\xff"]
    return [_class_byte(low % 256) + b"-" + _class_byte(high % 256)]


def _class_byte(c: int) -> bytes:
    return b"\\x%02x" % c
