"""Encoding and decoding of the values stored in telescope state.

Every value is stored as bytes whose first byte names the encoding: 0xff for
msgpack (the default) or a pickle header (0x80 and below, read only when the
user allows it). The msgpack form uses four extension types, for tuples,
complex numbers, numpy arrays (as .npy files) and numpy scalars. The bytes
produced here are identical to those of katsdptelstate, so that either
package reads what the other writes.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import os
import pickle
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import DecodeError, EncodeError
from .utils import ensure_binary

__all__ = [
    "ALLOWED_ENCODINGS",
    "ENCODING_DEFAULT",
    "ENCODING_MSGPACK",
    "ENCODING_PICKLE",
    "MSGPACK_EXT_COMPLEX128",
    "MSGPACK_EXT_NDARRAY",
    "MSGPACK_EXT_NUMPY_SCALAR",
    "MSGPACK_EXT_TUPLE",
    "PICKLE_ERROR",
    "PICKLE_PROTOCOL",
    "PICKLE_WARNING",
    "decode_value",
    "encode_sub_key",
    "encode_value",
    "ensure_binary",
    "equal_encoded_values",
    "set_allow_pickle",
]

#: Pickle protocol used by :func:`encode_value` with :const:`ENCODING_PICKLE`.
PICKLE_PROTOCOL = 2

#: Header byte of a pickled value: the PROTO opcode that starts pickles of
#: protocol 2 and later. Any first byte up to and including this one is
#: treated as a pickle, since protocol 0 pickles are plain ASCII.
ENCODING_PICKLE = b"\x80"

#: Header byte of a msgpack-encoded value.
ENCODING_MSGPACK = b"\xff"

#: Encoding used by :func:`encode_value` unless told otherwise.
ENCODING_DEFAULT = ENCODING_MSGPACK

#: All encodings that :func:`encode_value` accepts.
ALLOWED_ENCODINGS = frozenset([ENCODING_PICKLE, ENCODING_MSGPACK])

#: msgpack extension type of a tuple: its items packed as a msgpack array.
MSGPACK_EXT_TUPLE = 1
#: msgpack extension type of a complex number: real and imaginary parts as
#: big-endian IEEE-754 doubles.
MSGPACK_EXT_COMPLEX128 = 2
#: msgpack extension type of a numpy array: the bytes of a .npy file.
MSGPACK_EXT_NDARRAY = 3
#: msgpack extension type of a numpy scalar: its dtype descriptor packed with
#: msgpack, followed by the scalar's raw bytes.
MSGPACK_EXT_NUMPY_SCALAR = 4

#: Warning issued the first time a pickle is loaded after
#: ``set_allow_pickle(True, warn=True)``.
PICKLE_WARNING = (
    "The telescope state contains pickled values. This is a security risk, "
    "but you have enabled it with set_allow_pickle."
)

#: Message of the :exc:`~telstate.errors.DecodeError` raised for a pickled
#: value when pickles are not allowed.
PICKLE_ERROR = (
    "The telescope state contains pickled values. This is a security risk, "
    "so is disabled by default. This is needed for MeerKAT data before March "
    "2019. If you trust the source of the data, you can allow the pickles to "
    "be loaded by setting KATSDPTELSTATE_ALLOW_PICKLE=1 in the environment. "
    'In bash this is done with "export KATSDPTELSTATE_ALLOW_PICKLE=1" or in '
    'the code with "katsdptelstate.set_allow_pickle(True)"'
)

_ALLOW_PICKLE_VARIABLE = "KATSDPTELSTATE_ALLOW_PICKLE"

# Tuples and numpy scalars are encoded as extensions that wrap another msgpack
# message, so decoding them recurses through msgpack's C unpacker, which keeps
# roughly 40 KiB of C stack per level. Without a limit a few kilobytes of
# hostile input crash the interpreter (katsdptelstate segfaults at about 200
# levels in the main thread, 25 in a thread with a 1 MiB stack). This limit
# keeps decoding within 1 MiB; real values nest a handful of levels. The
# encoder enforces the same limit so that everything written can be read.
_MAX_NESTING = 16

_COMPLEX128 = struct.Struct(">dd")

# Below this size copying bytes is cheaper than making a view of them (a
# memoryview or a numpy view); above it the copy is what costs.
_COPY_LIMIT = 4096

_allow_pickle = False
_warn_on_pickle = False
_pickle_lock = threading.Lock()


def set_allow_pickle(allow: bool, warn: bool = False) -> None:
    """Control whether :func:`decode_value` loads pickles by default.

    This overrides the default taken from the ``KATSDPTELSTATE_ALLOW_PICKLE``
    environment variable when the module was imported.

    Parameters
    ----------
    allow
        If true, pickles are loaded; if false, decoding one raises
        :exc:`~telstate.errors.DecodeError`.
    warn
        If true (and `allow` is true), issue :const:`PICKLE_WARNING` as a
        :exc:`FutureWarning` the next time a pickle is loaded, and only then.
    """
    global _allow_pickle, _warn_on_pickle
    with _pickle_lock:
        _allow_pickle = bool(allow)
        _warn_on_pickle = bool(allow and warn)


def _allow_pickle_from_environment() -> bool:
    setting = os.environ.get(_ALLOW_PICKLE_VARIABLE)
    if setting is None or setting == "0":
        return False
    if setting == "1":
        return True
    warnings.warn(
        f"Unknown value {setting!r} for {_ALLOW_PICKLE_VARIABLE}: "
        "set it to 1 to allow pickles or 0 to refuse them (refusing for now)",
        stacklevel=2,
    )
    return False


set_allow_pickle(_allow_pickle_from_environment())


def _default_allow_pickle() -> bool:
    """Return the process-wide pickle setting, consuming a pending warning."""
    global _warn_on_pickle
    with _pickle_lock:
        allow = _allow_pickle
        warn = _warn_on_pickle
        _warn_on_pickle = False
    if warn:
        warnings.warn(PICKLE_WARNING, FutureWarning, stacklevel=3)
    return allow


# ---------------------------------------------------------------------------
# .npy files (the payload of MSGPACK_EXT_NDARRAY)
# ---------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_NPY_V1_MAGIC = _NPY_MAGIC + b"\x01\x00"
_NPY_ALIGN = 64
# numpy pads the header so that the first axis (the one that grows when an
# array is appended to) can reach this many digits without a rewrite.
_NPY_GROWTH_AXIS_DIGITS = 21
# Same limit as numpy.load: ast.literal_eval is not safe on large input.
_NPY_MAX_HEADER_CHARS = 10000
_NPY_HEADER_KEYS = frozenset(["descr", "fortran_order", "shape"])
# Version -> (header length field, header text encoding)
_NPY_HEADER_LAYOUTS = {
    b"\x01\x00": (struct.Struct("<H"), "latin1"),
    b"\x02\x00": (struct.Struct("<I"), "latin1"),
    b"\x03\x00": (struct.Struct("<I"), "utf8"),
}
_UINT16_LE = struct.Struct("<H")


def _dtype_descr(dtype: np.dtype) -> Any:
    """Describe `dtype` the way numpy's .npy writer does."""
    if dtype.names is None and dtype.metadata is None:
        # What dtype_to_descr returns for these, at a fifth of the cost.
        return dtype.str
    return np.lib.format.dtype_to_descr(dtype)


def _npy_v1_header(descr: Any, fortran_order: bool, shape: tuple[int, ...]) -> bytes | None:
    """Build the version 1.0 .npy header numpy would write, or None if it would not fit."""
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran_order!r}, 'shape': {shape!r}, }}"
    if shape:
        growth_axis = shape[-1] if fortran_order else shape[0]
        text += " " * (_NPY_GROWTH_AXIS_DIGITS - len(repr(growth_axis)))
    try:
        raw = text.encode("latin1")
    except UnicodeEncodeError:
        return None
    # One byte for the closing newline, then spaces up to a 64-byte boundary.
    used = len(_NPY_V1_MAGIC) + _UINT16_LE.size + len(raw) + 1
    padding = _NPY_ALIGN - used % _NPY_ALIGN
    length = len(raw) + 1 + padding
    if length > 0xFFFF:
        return None
    return b"".join((_NPY_V1_MAGIC, _UINT16_LE.pack(length), raw, b" " * padding, b"\n"))


def _npy_parts(value: np.ndarray) -> tuple[bytes, bytes | memoryview]:
    """Return the header and data of the .npy file that :func:`numpy.save` writes for `value`.

    The data is returned as a byte view of the array where the array is
    contiguous, so that joining the parts copies it only once.

    Raises
    ------
    EncodeError
        If the array holds Python objects.
    """
    # Subclasses (matrix, masked arrays) are stored as their underlying data,
    # as numpy.save stores them.
    array = np.asarray(value)
    dtype = array.dtype
    if dtype.hasobject:
        raise EncodeError(
            f"cannot encode an array of dtype {dtype}: it holds Python objects, "
            "which only pickle could store; convert it to a list or a plain dtype"
        )
    flags = array.flags
    fortran_order = bool(flags.f_contiguous and not flags.c_contiguous)
    header = _npy_v1_header(_dtype_descr(dtype), fortran_order, array.shape)
    if header is None:
        # Headers over 64 KiB or with non-Latin-1 field names need .npy
        # version 2.0 or 3.0; let numpy choose, and warn, as numpy.save does.
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, allow_pickle=False)
        return buffer.getvalue(), b""
    # Small arrays are quicker to copy than to view.
    if array.nbytes > _COPY_LIMIT and (flags.c_contiguous or fortran_order):
        in_order = array.T if fortran_order else array
        return header, in_order.reshape(-1).view(np.uint8).data
    return header, array.tobytes("F" if fortran_order else "C")


@functools.lru_cache(maxsize=256)
def _parse_npy_header(
    header: bytes, text_encoding: str
) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """Return (dtype, shape, fortran_order, element count) from a .npy header.

    Headers repeat (the same dtype and shape is stored again and again), so
    the result is cached: parsing it costs far more than the array copy.

    Raises
    ------
    DecodeError
        If the header is malformed or describes Python objects.
    """
    text = header.decode(text_encoding)
    if len(text) > _NPY_MAX_HEADER_CHARS:
        raise DecodeError(f".npy header of {len(text)} characters is too long to parse safely")
    fields = ast.literal_eval(text)
    if not isinstance(fields, dict) or fields.keys() != _NPY_HEADER_KEYS:
        raise DecodeError(f".npy header is not a dictionary of {sorted(_NPY_HEADER_KEYS)}")
    shape = fields["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        raise DecodeError(f".npy header has an invalid shape {shape!r}")
    fortran_order = fields["fortran_order"]
    if not isinstance(fortran_order, bool):
        raise DecodeError(f".npy header has an invalid fortran_order {fortran_order!r}")
    dtype = np.lib.format.descr_to_dtype(fields["descr"])
    if dtype.hasobject:
        # The data would be a pickle, which we never load from an array.
        raise DecodeError(f"cannot decode an array of dtype {dtype}: it holds Python objects")
    return dtype, shape, fortran_order, math.prod(shape)


def _array_from_npy(data: bytes | memoryview) -> np.ndarray:
    """Load the array in the .npy file `data`, allocating no more than `data` justifies.

    Raises
    ------
    DecodeError
        If `data` is not a complete .npy file of a dtype without Python objects.
    """
    if bytes(data[:6]) != _NPY_MAGIC:
        raise DecodeError("ndarray extension does not hold a .npy file")
    version = bytes(data[6:8])
    layout = _NPY_HEADER_LAYOUTS.get(version)
    if layout is None:
        raise DecodeError(f"unsupported .npy format version {tuple(version)}")
    length_field, text_encoding = layout
    start = 8 + length_field.size
    if len(data) < start:
        raise DecodeError("truncated .npy header")
    (header_length,) = length_field.unpack_from(data, 8)
    # A character takes at most 4 bytes in UTF-8; the exact limit on the
    # number of characters is checked when the header is parsed.
    if header_length > 4 * _NPY_MAX_HEADER_CHARS:
        raise DecodeError(f".npy header of {header_length} bytes is too long to parse safely")
    end = start + header_length
    if end > len(data):
        raise DecodeError("truncated .npy header")
    dtype, shape, fortran_order, count = _parse_npy_header(bytes(data[start:end]), text_encoding)
    available = len(data) - end
    if count * dtype.itemsize > available:
        raise DecodeError(
            f".npy header promises {count} items of {dtype.itemsize} bytes "
            f"but only {available} bytes follow"
        )
    if dtype.itemsize:
        # Copy so that the array is writable and does not pin the encoded
        # value. Copying as bytes keeps the padding between the fields of a
        # structured dtype, which a copy of the typed array would not.
        nbytes = count * dtype.itemsize
        flat = np.frombuffer(data, np.uint8, nbytes, end).copy().view(dtype)
    else:
        # frombuffer refuses zero-sized items; there is nothing to read anyway.
        flat = np.ndarray(count, dtype)
    if fortran_order:
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _npy_ext_prefix(length: int) -> bytes:
    """Return the msgpack ext header that msgpack writes before `length` bytes of .npy data.

    A .npy file is at least 64 bytes long, so msgpack's fixext forms (for 1,
    2, 4, 8 or 16 bytes) never apply.

    Raises
    ------
    EncodeError
        If the array is 4 GiB or more, which msgpack cannot frame.
    """
    if length < 0x100:
        return struct.pack(">BBb", 0xC7, length, MSGPACK_EXT_NDARRAY)
    if length < 0x10000:
        return struct.pack(">BHb", 0xC8, length, MSGPACK_EXT_NDARRAY)
    if length < 0x100000000:
        return struct.pack(">BIb", 0xC9, length, MSGPACK_EXT_NDARRAY)
    raise EncodeError(f"cannot encode an array of {length} bytes: msgpack is limited to 4 GiB")


# ---------------------------------------------------------------------------
# msgpack
# ---------------------------------------------------------------------------


def _ext_from_value(value: Any, depth: int) -> msgpack.ExtType:
    """Encode a value that msgpack does not handle itself (msgpack's `default` hook).

    With ``strict_types`` msgpack hands over every subclass of the types it
    knows, so numpy's float64 and str_ arrive here as numpy scalars, and
    ints that do not fit in 64 bits arrive here too.

    Raises
    ------
    EncodeError
        If `value` has no encoding.
    """
    if isinstance(value, tuple):
        return msgpack.ExtType(MSGPACK_EXT_TUPLE, _pack(list(value), depth + 1))
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(MSGPACK_EXT_NDARRAY, b"".join(_npy_parts(value)))
    if isinstance(value, np.generic):
        if value.dtype.hasobject:
            raise EncodeError(
                f"cannot encode a numpy scalar of dtype {value.dtype}: it holds objects"
            )
        descr = _pack(_dtype_descr(value.dtype), depth + 1)
        return msgpack.ExtType(MSGPACK_EXT_NUMPY_SCALAR, descr + value.tobytes())
    if isinstance(value, complex):
        return msgpack.ExtType(MSGPACK_EXT_COMPLEX128, _COMPLEX128.pack(value.real, value.imag))
    if type(value) is int:
        raise EncodeError(f"cannot encode {value}: integers must fit in 64 bits")
    raise EncodeError(
        f"cannot encode a value of type {type(value).__qualname__}: only None, bool, int, "
        "float, complex, str, bytes, list, tuple, dict and numpy arrays and scalars can be "
        "encoded (subclasses of these only if they are tuples or numpy types)"
    )


# Packers keep their buffer between calls, which makes packing several times
# faster than msgpack.packb, but one packer must never be used by two calls
# at once: not by two threads, nor by a nested tuple packed from inside the
# `default` hook. So each call takes a packer out of a pool and puts it back
# afterwards; list.pop and list.append are atomic. There is one pool per
# nesting depth because the depth is baked into each packer's `default` hook.
_PACKER_POOLS: list[list[msgpack.Packer]] = [[] for _ in range(_MAX_NESTING + 1)]
# A packer's buffer grows to fit the largest value it has packed and never
# shrinks, so a packer that packed something large is dropped, not pooled.
_POOLED_OUTPUT_LIMIT = 1 << 20


def _new_packer(depth: int) -> msgpack.Packer:
    def default(value: Any) -> msgpack.ExtType:
        return _ext_from_value(value, depth)

    # use_bin_type separates bytes from str; strict_types keeps tuples and
    # subclasses (numpy scalars among them) away from the built-in handlers.
    return msgpack.Packer(use_bin_type=True, strict_types=True, default=default)


def _pack(value: Any, depth: int) -> bytes:
    """Pack `value` with msgpack, with tuples and numpy types as extensions.

    Raises
    ------
    EncodeError
        If a part of `value` has no encoding or it nests too deeply.
    """
    if depth > _MAX_NESTING:
        raise EncodeError(
            f"cannot encode a value with tuples or numpy scalars nested more than "
            f"{_MAX_NESTING} deep: it could not be decoded safely"
        )
    pool = _PACKER_POOLS[depth]
    try:
        packer = pool.pop()
    except IndexError:
        packer = _new_packer(depth)
    # If pack raises, the packer is simply not returned to the pool.
    packed = packer.pack(value)
    if len(packed) <= _POOLED_OUTPUT_LIMIT:
        pool.append(packer)
    return packed


# Decoding calls msgpack.unpackb(data, ext_hook=...) and relies on three of
# its defaults (msgpack >= 1.0). raw=False: msgpack str becomes str and bin
# becomes bytes. max_*_len=len(data): msgpack preallocates containers from
# the lengths in the data, and these caps make a few bytes that claim a
# 4 GiB array fail at once instead of allocating. strict_map_key=True: map
# keys must be str or bytes, whose hashes are randomised, whereas hostile
# int or tuple keys could be chosen to collide and make decoding quadratic
# (katsdptelstate refuses them too).


def _nesting_error() -> DecodeError:
    return DecodeError(
        f"value nests tuples or numpy scalars more than {_MAX_NESTING} deep; refusing to decode it"
    )


@functools.lru_cache(maxsize=256)
def _plain_dtype(descr: bytes) -> np.dtype:
    """Return the dtype named by a UTF-8 descriptor such as ``<f8``.

    Raises
    ------
    DecodeError
        If the dtype holds Python objects.
    """
    dtype = np.dtype(descr.decode())
    if dtype.hasobject:
        raise DecodeError(f"cannot decode a numpy scalar of dtype {dtype}: it holds objects")
    return dtype


def _numpy_scalar_from_ext(data: bytes, nested_hook: Callable[[int, bytes], Any] | None) -> Any:
    """Decode the payload of a numpy scalar extension.

    Raises
    ------
    DecodeError
        If the dtype holds Python objects or nests too deeply; or another
        exception if the payload is malformed.
    """
    first = data[0] if data else 0
    if 0xA0 <= first <= 0xBF:
        # A msgpack fixstr: the descriptor of a plain dtype, by far the most
        # common case. Reading it directly avoids msgpack's ExtraData
        # exception, which costs more than the rest of the decoding.
        end = 1 + (first & 0x1F)
        dtype = _plain_dtype(data[1:end])
        raw = data[end:]
    else:
        if nested_hook is None:
            raise _nesting_error()
        try:
            descr = msgpack.unpackb(data, ext_hook=nested_hook)
            raw = b""
        except msgpack.ExtraData as extra:
            # The raw value follows the packed descriptor.
            descr = extra.unpacked
            raw = extra.extra
        dtype = np.dtype(descr)
        if dtype.hasobject:
            raise DecodeError(f"cannot decode a numpy scalar of dtype {dtype}: it holds objects")
    if not dtype.itemsize:
        # frombuffer refuses zero-sized items, yet numpy makes such scalars
        # (an empty string taken from a string array has dtype S0), and
        # katsdptelstate writes them but cannot read them back.
        return np.ndarray(1, dtype)[0]
    return np.frombuffer(raw, dtype, 1)[0]


def _make_ext_hook(
    nested_hook: Callable[[int, bytes], Any] | None,
) -> Callable[[int, bytes], Any]:
    """Make msgpack's `ext_hook` for one nesting depth.

    `nested_hook` is the hook for messages nested inside these extensions,
    or None at the deepest level allowed. Each depth gets a closure of its
    own rather than a partial, because this runs once per tuple decoded.
    """

    def ext_hook(code: int, data: bytes) -> Any:
        if code == MSGPACK_EXT_TUPLE:
            if nested_hook is None:
                raise _nesting_error()
            items = msgpack.unpackb(data, ext_hook=nested_hook)
            if not isinstance(items, list):
                raise DecodeError("tuple extension does not hold a msgpack array")
            return tuple(items)
        if code == MSGPACK_EXT_COMPLEX128:
            if len(data) != _COMPLEX128.size:
                raise DecodeError(f"complex128 extension has {len(data)} bytes instead of 16")
            return complex(*_COMPLEX128.unpack(data))
        if code == MSGPACK_EXT_NDARRAY:
            return _array_from_npy(data)
        if code == MSGPACK_EXT_NUMPY_SCALAR:
            return _numpy_scalar_from_ext(data, nested_hook)
        raise DecodeError(
            f"unknown msgpack extension type {code} (telstate may need to be updated)"
        )

    return ext_hook


def _make_top_level_ext_hook() -> Callable[[int, bytes], Any]:
    hook = _make_ext_hook(None)
    for _ in range(_MAX_NESTING):
        hook = _make_ext_hook(hook)
    return hook


_TOP_LEVEL_EXT_HOOK = _make_top_level_ext_hook()

# Length fields that follow msgpack's ext16 and ext32 markers.
_EXT_LENGTH_FIELDS = {0xC8: struct.Struct(">H"), 0xC9: struct.Struct(">I")}


def _lone_npy_payload(value: bytes) -> memoryview | None:
    """Return the .npy payload if `value` (over 4 KiB) is one array and nothing else.

    Large values are mostly arrays. Reading their .npy data in place saves
    msgpack's copy of the whole payload into an extension object.
    """
    length_field = _EXT_LENGTH_FIELDS.get(value[1])
    if length_field is None:
        return None
    start = 3 + length_field.size
    (length,) = length_field.unpack_from(value, 2)
    if value[start - 1] != MSGPACK_EXT_NDARRAY or start + length != len(value):
        return None
    return memoryview(value)[start:]


# ---------------------------------------------------------------------------
# Public interface
# ---------------------------------------------------------------------------


def encode_value(value: Any, encoding: bytes = ENCODING_DEFAULT) -> bytes:
    """Encode a value to bytes for storage.

    Parameters
    ----------
    value
        The value: None, bool, int (up to 64 bits), float, complex, str,
        bytes, list, tuple, dict, numpy arrays and scalars, and any nesting
        of these; anything picklable with :const:`ENCODING_PICKLE`.
    encoding
        One of :const:`ALLOWED_ENCODINGS`.

    Returns
    -------
    bytes
        The encoded value, byte for byte what katsdptelstate produces.

    Raises
    ------
    ValueError
        If `encoding` is not one of :const:`ALLOWED_ENCODINGS`.
    EncodeError
        If `value` cannot be encoded with `encoding`: an unsupported type, an
        int of more than 64 bits, a str that is not valid Unicode, an array
        of Python objects, nesting too deep, or (for pickle) anything pickle
        refuses.
    """
    if encoding == ENCODING_MSGPACK:
        try:
            if isinstance(value, np.ndarray):
                # Arrays are the large values: frame them ourselves rather
                # than copy them through a packer's buffer.
                header, data = _npy_parts(value)
                prefix = _npy_ext_prefix(len(header) + len(data))
                return b"".join((ENCODING_MSGPACK, prefix, header, data))
            return ENCODING_MSGPACK + _pack(value, 0)
        except EncodeError:
            raise
        except (ValueError, TypeError, OverflowError, BufferError, RecursionError) as exc:
            raise EncodeError(f"cannot encode value with msgpack: {exc}") from exc
    if encoding == ENCODING_PICKLE:
        try:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            raise EncodeError(f"cannot encode value with pickle: {exc}") from exc
    raise ValueError(
        f"Unknown encoding {encoding!r}: use one of "
        f"{sorted(ALLOWED_ENCODINGS)} (ENCODING_MSGPACK or ENCODING_PICKLE)"
    )


def encode_sub_key(sub_key: Any) -> bytes:
    """Encode the sub-key of an indexed key.

    Sub-keys are always msgpack-encoded, whatever encoding the values use,
    so that a lookup finds the sub-key however the value was written.

    Raises
    ------
    TypeError
        If `sub_key` is not hashable (it could not be used as a dict key
        when the indexed key is read back).
    EncodeError
        If `sub_key` cannot be encoded with msgpack.
    """
    hash(sub_key)
    return encode_value(sub_key, ENCODING_MSGPACK)


def decode_value(value: bytes, allow_pickle: bool | None = None) -> Any:
    """Decode a value encoded with :func:`encode_value`.

    The encoding is recorded in the value's first byte, so it need not be
    given. Decoding is safe on hostile input as long as pickles are not
    allowed: malformed data raises :exc:`~telstate.errors.DecodeError`
    quickly and allocates memory in proportion to the size of `value`.

    Parameters
    ----------
    value
        Encoded value (bytes, bytearray or memoryview).
    allow_pickle
        Whether to load a pickled value, which can execute arbitrary code.
        If None, use the setting from :func:`set_allow_pickle` or else the
        ``KATSDPTELSTATE_ALLOW_PICKLE`` environment variable (``1`` allows
        pickles; by default they are refused).

    Raises
    ------
    DecodeError
        If `value` is a pickle and pickles are not allowed (the message is
        :const:`PICKLE_ERROR`), if it is empty or has an unknown header
        byte, or if it is malformed.
    """
    if not value:
        raise DecodeError("cannot decode an empty value")
    header = value[0]
    if header == 0xFF:
        try:
            if len(value) <= _COPY_LIMIT:
                return msgpack.unpackb(value[1:], ext_hook=_TOP_LEVEL_EXT_HOOK)
            npy = _lone_npy_payload(value)
            if npy is not None:
                return _array_from_npy(npy)
            return msgpack.unpackb(memoryview(value)[1:], ext_hook=_TOP_LEVEL_EXT_HOOK)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"malformed msgpack-encoded value: {exc}") from exc
    if header <= ENCODING_PICKLE[0]:
        if allow_pickle is None:
            allow_pickle = _default_allow_pickle()
        if not allow_pickle:
            raise DecodeError(PICKLE_ERROR)
        try:
            # latin1 lets pickles written by Python 2 load their str objects.
            return pickle.loads(value, encoding="latin1")
        except Exception as exc:
            raise DecodeError(f"malformed pickled value: {exc}") from exc
    raise DecodeError(
        f"value starts with unrecognised header byte {bytes(value[:1])!r} "
        "(telstate may need to be updated)"
    )


# A msgpack-encoded float64, the usual sensor sample: header, 0xcb, 8 bytes big-endian.
_FLOAT64_PREFIX = ENCODING_MSGPACK + b"\xcb"
_FLOAT64_VALUE = np.dtype([("prefix", "S2"), ("value", ">f8")])
# Below this many values, one call per value costs less than checking them all first.
_BATCH_MIN = 16


def decode_values(values: Sequence[bytes]) -> list[Any]:
    """``[decode_value(value) for value in values]``, faster for many float samples.

    When every value is a msgpack-encoded float64 (10 bytes: header,
    0xcb, the number), all are decoded in one numpy call, which gives the
    same floats as :func:`decode_value`; anything else goes through
    :func:`decode_value` one by one, with its checks and errors.

    Raises
    ------
    DecodeError
        As :func:`decode_value`.
    """
    count = len(values)
    if count >= _BATCH_MIN and set(map(len, values)) == {_FLOAT64_VALUE.itemsize}:
        records = np.frombuffer(b"".join(values), dtype=_FLOAT64_VALUE)
        if (records["prefix"] == _FLOAT64_PREFIX).all():
            return records["value"].tolist()
    return [decode_value(value) for value in values]


def equal_encoded_values(a: bytes, b: bytes) -> bool:
    """Test whether two encoded values represent equivalent objects.

    Identical encodings are equal. Otherwise the values are decoded and are
    equal only if both are str or bytes with the same UTF-8 bytes (so that a
    value written as str by Python 3 matches the bytes written by Python 2).
    This comparison is not applied inside lists, dicts or other containers.

    Raises
    ------
    DecodeError
        If the encodings differ and one of them cannot be decoded.
    """
    if a == b:
        return True
    value_a = decode_value(a)
    value_b = decode_value(b)
    try:
        return ensure_binary(value_a) == ensure_binary(value_b)
    except TypeError:
        return False
