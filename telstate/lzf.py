"""LZF compression, the format Redis uses for compressed strings in RDB files.

The pure-Python codec here is always available and is the reference. When
the optional ``lzf`` extension (PyPI ``python-lzf``) is importable it is used
as an accelerator for the same format; both paths give identical results
(the tests check one against the other).

The format is a sequence of tokens, each starting with a control byte:

- ``000LLLLL``: a literal run of ``L + 1`` bytes follows (1 to 32 bytes).
- ``LLLooooo oooooooo``: a back-reference of ``L + 2`` bytes (3 to 8) that
  starts ``o + 1`` bytes before the current end of the output.
- ``111ooooo LLLLLLLL oooooooo``: the same with a length of ``L + 9``
  (9 to 264 bytes).

Back-references may overlap the bytes they produce (a run of one repeated
byte is a reference at distance 1).
"""

from __future__ import annotations

try:
    import lzf as _accelerator
except ImportError:  # pragma: no cover - depends on the environment
    _accelerator = None

#: The largest output a single input byte can produce: a 3-byte back-reference
#: yields at most 264 bytes. A claimed length above this is corrupt.
MAX_EXPANSION = 88

_MAX_LITERAL = 32
_MAX_OFFSET = 1 << 13
_MAX_MATCH = 264


class LzfError(ValueError):
    """The compressed data is corrupt or does not have the expected length."""


def decompress(data: bytes, expected_length: int) -> bytes:
    """Decompress LZF `data` that must expand to exactly `expected_length` bytes.

    Memory use is bounded by the input: a claimed length that `data` cannot
    possibly produce is refused before anything is allocated.

    Raises
    ------
    LzfError
        If `data` is not valid LZF or does not expand to `expected_length` bytes.
    """
    if expected_length < 0 or expected_length > MAX_EXPANSION * len(data):
        raise LzfError(f"{len(data)} compressed bytes cannot expand to {expected_length} bytes")
    if _accelerator is not None and expected_length > 0:
        try:
            result = _accelerator.decompress(data, expected_length)
        except ValueError as exc:
            raise LzfError(f"corrupt compressed data: {exc}") from None
        if result is None or len(result) != expected_length:
            raise LzfError(f"compressed data does not expand to {expected_length} bytes")
        return result
    return decompress_python(data, expected_length)


def decompress_python(data: bytes, expected_length: int) -> bytes:
    """Pure-Python :func:`decompress` (the reference implementation).

    Raises
    ------
    LzfError
        If `data` is not valid LZF or does not expand to `expected_length` bytes.
    """
    if expected_length < 0 or expected_length > MAX_EXPANSION * len(data):
        raise LzfError(f"{len(data)} compressed bytes cannot expand to {expected_length} bytes")
    out = bytearray()
    pos = 0
    size = len(data)
    try:
        while pos < size:
            ctrl = data[pos]
            pos += 1
            if ctrl < 32:
                end = pos + ctrl + 1
                if end > size:
                    raise LzfError(f"literal run at input offset {pos - 1} overruns the input")
                out += data[pos:end]
                pos = end
            else:
                length = ctrl >> 5
                if length == 7:
                    length += data[pos]
                    pos += 1
                length += 2
                distance = ((ctrl & 0x1F) << 8) + data[pos] + 1
                pos += 1
                start = len(out) - distance
                if start < 0:
                    raise LzfError(f"back-reference at input offset {pos} points before the start")
                if distance >= length:
                    out += out[start : start + length]
                else:
                    # The reference overlaps what it produces: it repeats the
                    # last `distance` bytes.
                    pattern = bytes(out[start:])
                    repeats, rest = divmod(length, distance)
                    out += pattern * repeats + pattern[:rest]
            if len(out) > expected_length:
                raise LzfError(f"compressed data expands beyond {expected_length} bytes")
    except IndexError:
        raise LzfError("compressed data ends inside a back-reference") from None
    if len(out) != expected_length:
        raise LzfError(f"compressed data expands to {len(out)} bytes, not {expected_length}")
    return bytes(out)


def compress(data: bytes) -> bytes:
    """Compress `data` to LZF (which may be longer than `data` if it is incompressible)."""
    if _accelerator is not None and data:
        # The extension returns None when the output would not fit in the
        # given size (by default: smaller than the input); this is ample.
        result = _accelerator.compress(data, 2 * len(data) + 16)
        if result is not None:
            return result
    return compress_python(data)


def compress_python(data: bytes) -> bytes:
    """Pure-Python :func:`compress` (greedy matching on 3-byte prefixes)."""
    out = bytearray()
    size = len(data)
    literal_start = 0
    last_seen: dict[bytes, int] = {}
    pos = 0

    while pos + 2 < size:
        prefix = data[pos : pos + 3]
        ref = last_seen.get(prefix)
        last_seen[prefix] = pos
        if ref is None or pos - ref > _MAX_OFFSET:
            pos += 1
            continue
        limit = min(_MAX_MATCH, size - pos)
        length = 3
        while length < limit and data[ref + length] == data[pos + length]:
            length += 1
        _append_literals(out, data, literal_start, pos)
        offset = pos - ref - 1
        code = length - 2
        if code < 7:
            out.append((code << 5) | (offset >> 8))
        else:
            out.append(0xE0 | (offset >> 8))
            out.append(code - 7)
        out.append(offset & 0xFF)
        pos += length
        literal_start = pos
    _append_literals(out, data, literal_start, size)
    return bytes(out)


def _append_literals(out: bytearray, data: bytes, start: int, end: int) -> None:
    for run_start in range(start, end, _MAX_LITERAL):
        run = data[run_start : min(run_start + _MAX_LITERAL, end)]
        out.append(len(run) - 1)
        out += run
