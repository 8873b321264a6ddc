"""Writing RDB files that Redis 6.x and 7.x, Valkey 9, katsdptelstate and telstate all load.

Files have RDB version 9 (the newest that Redis 6.2 and rdbtools read) and
a real CRC-64 trailer. Keys come either as telstate records, written
directly (:meth:`RDBWriter.write_record`), or as Redis DUMP payloads
(:meth:`RDBWriter.write_dump`, which :meth:`RDBWriter.save` uses for
Redis servers). Payloads in an encoding that every reader understands are
copied; newer encodings (the listpacks of Redis 7, the hashes with field
expiry of Redis 7.4 and Valkey 9) are decoded and re-encoded.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import rdb_reader, rdb_utility
from .backend import Backend, RecordValue, in_zset_order
from .errors import RdbParseError, TelstateError
from .rdb_utility import encode_string
from .utils import KeyType, PathType, display_str, ensure_binary

if TYPE_CHECKING:
    import redis

    from .telescope_state import TelescopeState

logger = logging.getLogger(__name__)
#: Keys that save() could not write are logged here: katsdptelstate logs them
#: from its rdb_writer_base module, so log filters and scrapers written for
#: it find them under the same name (telstate.rdb_writer_base).
_failure_logger = logging.getLogger(f"{__package__}.rdb_writer_base")
#: katsdptelstate's reason for a key that is missing, whatever the source.
_MISSING = "Key not found in Redis"

#: Start of every file: magic and version. Select database 0 follows the AUX fields.
RDB_HEADER = b"REDIS%04d" % rdb_utility.RDB_VERSION
RDB_TERMINATOR = b"\xff"
#: The checksum katsdptelstate ends its files with: zero, which readers take
#: as "not computed". telstate's writer writes the real CRC-64 instead.
RDB_CHECKSUM = bytes(8)
_AUX = b"\xfa"
_SELECT_DB_0 = b"\xfe\x00"

# DUMP payload types whose encoding has not changed since RDB version 9, so
# that any server's payload can be copied as is: string, list, set, zset,
# hash, zset2, zipmap, ziplist list, intset, ziplist zset, ziplist hash,
# quicklist, stream version 1.
_PORTABLE_TYPES = frozenset({0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15})
# Redis 7 keeps small hashes and zsets in listpacks; ziplists hold the same entries.
_LISTPACK_TO_ZIPLIST = {
    rdb_reader.RDB_TYPE_HASH_LISTPACK: rdb_utility.RDB_TYPE_HASH_ZIPLIST,
    rdb_reader.RDB_TYPE_ZSET_LISTPACK: rdb_utility.RDB_TYPE_ZSET_ZIPLIST,
}

_FLUSH_SIZE = 16 << 20
# Keys whose DUMP payloads are fetched in one round trip from a Redis client.
_DUMP_BATCH = 1000


class RDBWriter:
    """RDB file that stores keys from telescope states, backends or Redis databases.

    The file is written atomically: keys go to a hidden temporary file in
    the destination's directory, which :meth:`close` completes with the
    trailer, flushes to disk and renames over `filename` (then flushes the
    directory). Until then `filename` keeps whatever it held before, and a
    writer that fails or is killed half way never leaves a file there. A
    writer used as a context manager whose body raises discards the
    temporary file (:meth:`abort`) instead of completing it. A file with no
    keys is discarded too, unless `keep_empty` (and any earlier file at
    `filename` stays). Each writer holds a lock on its temporary file; the
    ones that no writer holds any more (their process died) are removed
    when the next writer of `filename` starts. A `filename` that is a
    symbolic link stays one: the file it points to is replaced. A replaced
    file keeps its permissions. A `filename` that is a pipe or device
    (``/dev/stdout``) is written directly.

    Output goes in 16 MiB buffers; a full one is written by a thread while
    the next fills (one at a time; a failed write is raised by the next
    call). A writer is used by one thread at a time.

    Parameters
    ----------
    filename
        Destination file; its directory must exist and be writable (a pipe
        or device is written directly).
    aux
        AUX fields to store in the header (names and values as bytes or str),
        e.g. ``{b"telstate-seq": b"42"}``; :func:`telstate.rdb_reader.read_aux`
        reads them back without reading the keys.
    compress
        LZF-compress long strings, as Redis does (smaller and slower).
    keep_empty
        Keep a file with no keys on :meth:`close` (a snapshot of an empty
        store) instead of deleting it, as katsdptelstate's writer does.

    Attributes
    ----------
    keys_written : int
        Number of keys written to the file.
    keys_failed : int
        Number of keys that :meth:`save` could not write (missing or of
        unsupported type); each is logged.

    Raises
    ------
    OSError
        If the temporary file cannot be created.
    """

    def __init__(
        self,
        filename: PathType,
        *,
        aux: Mapping[bytes, bytes] | Mapping[str, str] | None = None,
        compress: bool = False,
        keep_empty: bool = False,
    ) -> None:
        self.filename = filename
        self._keep_empty = keep_empty
        self.keys_written = 0
        self.keys_failed = 0
        self._compress = compress
        # CRC-64 of the file up to _buffer[:_settled]; the rest is added when flushed.
        self._crc = 0
        self._settled = 0
        #: The buffer being written by a thread while the next one fills (see _flush).
        self._writing: _BackgroundWrite | None = None
        self._closed = False
        header = [RDB_HEADER]
        for name, value in (aux or {}).items():
            header += [
                _AUX,
                encode_string(ensure_binary(name)),
                encode_string(ensure_binary(value)),
            ]
        header.append(_SELECT_DB_0)
        self._buffer = bytearray(b"".join(header))
        #: The temporary file that becomes `filename` when :meth:`close` completes
        #: it; None when `filename` is a pipe or device, written to directly.
        self.temporary: str | None = None
        name = os.fsdecode(filename)
        # Judged by the name as given: /dev/stdout on a pipe is a link to
        # "pipe:[N]", which is no path (os.stat follows it; realpath cannot).
        if _is_stream(name):
            self._target = name
            self._file = open(name, "wb")  # noqa: SIM115 - closed by close() or abort()
            return
        # A symbolic link stays one: the file it points to is replaced.
        target = os.path.realpath(name)
        self._target = target
        directory, name = os.path.split(target)
        remove_stale_temporaries(directory, re.escape(name))
        self.temporary, fd = _create_temporary(directory, name)
        self._file = os.fdopen(fd, "wb")
        try:
            # A file replaced keeps its permissions (it may be shared on purpose).
            os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:
            pass
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> RDBWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _append(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _FLUSH_SIZE:
            self._flush()

    def _flush(self) -> None:
        """Hand the full buffer to a thread that writes it, once the one before is written.

        The write's system call releases the GIL: the next buffer is encoded
        (and its CRC computed) meanwhile. At most one buffer is in flight.
        """
        self._settle()
        self._wait_for_write()
        self._writing = _BackgroundWrite(self._file, self._buffer)
        self._buffer = bytearray()
        self._settled = 0

    def _wait_for_write(self) -> None:
        """Wait for the buffer in flight, raising what its write raised (OSError)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.wait()

    def _settle(self) -> None:
        """Bring the CRC up to the end of the buffer."""
        if self._settled < len(self._buffer):
            with memoryview(self._buffer) as view:
                self._crc = rdb_utility.crc64(view[self._settled :], self._crc)
            self._settled = len(self._buffer)

    def _append_dump(self, key: bytes, payload: bytes, payload_crc: int) -> None:
        """Append a portable DUMP payload whose CRC (the CRC-64 of `payload` without
        its footer) is `payload_crc`: the file's CRC follows from it, unread."""
        self._settle()
        head = payload[:1] + encode_string(key)
        # Linearity: crc(F+t+K+V) = shift(crc(F+t+K) ^ crc(t), |V|) ^ crc(t+V).
        crc = rdb_utility.crc64(head, self._crc) ^ rdb_utility.crc64(payload[:1])
        self._buffer += head
        self._buffer += memoryview(payload)[1:-10]
        self._crc = rdb_utility.crc64_shift(crc, len(payload) - 11) ^ payload_crc
        self._settled = len(self._buffer)
        if len(self._buffer) >= _FLUSH_SIZE:
            self._flush()

    def write_record(self, key: bytes, key_type: KeyType, value: RecordValue) -> None:
        """Write one key, given as a telstate record.

        Parameters
        ----------
        key
            The full key.
        key_type
            Its type, which says what `value` is.
        value
            Immutable: the encoded value. Mutable: the zset members (8-byte
            timestamp then encoded value): a list in any order, or any other
            sized collection (:data:`~telstate.backend.Members`) in zset
            order, which a big key is streamed from, a piece at a time.
            Indexed: a dict of encoded sub-key to encoded value.

        Raises
        ------
        TypeError
            If `value` does not match `key_type`.
        TelstateError
            If streamed members turn out out of order or fewer or more
            than their length said: the file is discarded (the writer is
            aborted), never left corrupt.
        StoreError
            If reading streamed members from a store fails (the file is
            discarded too).
        ValueError
            If `value` is an empty list or dict (Redis has no empty sorted
            sets or hashes), a string is too long for the RDB format, or the
            writer is closed.
        """
        if self._closed:
            raise ValueError("RDB writer is closed")
        if key_type == KeyType.IMMUTABLE and isinstance(value, bytes):
            rdb_type, encoded = rdb_utility.RDB_TYPE_STRING, encode_string(value, self._compress)
        elif key_type != KeyType.IMMUTABLE and not len(value):
            raise ValueError("Redis has no empty sorted sets or hashes")
        elif key_type == KeyType.MUTABLE and not isinstance(value, (bytes, dict)):
            # Ziplists must be in zset order and Redis refuses duplicate
            # members; records from telstate are both already.
            members = value
            if isinstance(value, list) and not in_zset_order(value):
                members = sorted(set(value))
            rdb_type, pieces = rdb_utility.encode_zset_parts(members, self._compress)
            self._append(bytes((rdb_type,)) + encode_string(key))
            self._append_pieces(key, pieces)
            self.keys_written += 1
            return
        elif key_type == KeyType.INDEXED and isinstance(value, dict):
            rdb_type, encoded = rdb_utility.encode_hash_value(value, self._compress)
        else:
            raise TypeError(f"{type(value).__name__} is not a value for a {key_type} key")
        self._append(bytes((rdb_type,)) + encode_string(key) + encoded)
        self.keys_written += 1

    def _append_pieces(self, key: bytes, pieces: Iterator[bytes]) -> None:
        """Append a value streamed in pieces; a failure half way discards the file.

        Raises
        ------
        TelstateError
            If the value turns out to be invalid half way (members out of
            order, or not as many as their count written first).
        StoreError
            If the store the value is read from fails.
        """
        try:
            for piece in pieces:
                self._append(piece)
        except BaseException as error:
            self.abort()
            if isinstance(error, ValueError):
                raise TelstateError(
                    f"cannot write key {display_str(key)}: {error};"
                    f" RDB file {os.fsdecode(self.filename)!r} was discarded"
                ) from error
            raise

    def write_dump(self, key: bytes, payload: bytes) -> None:
        """Write one key, given as a Redis DUMP payload from any Redis or Valkey server.

        The payload's checksum (when non-zero) is verified first, so that
        nothing but a server's own output reaches the file. It is then
        copied when its type is encoded the same way in RDB version 9;
        listpacks become ziplists; hashes with field expiry (Redis 7.4,
        Valkey 9) become plain hashes, dropping the expiry times.

        Raises
        ------
        RdbParseError
            If the payload's checksum is wrong, or a payload that needs
            decoding is corrupt.
        ValueError
            If the key's type cannot be stored in an RDB version 9 file
            (e.g. a stream or module value from a newer server), or the
            writer is closed.
        """
        self._write_dump(key, payload, checked=False)

    def _write_dump(self, key: bytes, payload: bytes, checked: bool) -> None:
        """:meth:`write_dump`; `checked` says the checksum was verified already."""
        if self._closed:
            raise ValueError("RDB writer is closed")
        if len(payload) < 11:
            raise RdbParseError(None, f"DUMP payload of {len(payload)} bytes is too short")
        checksum = int.from_bytes(payload[-8:], "little")
        if checksum and not checked and rdb_utility.crc64(payload[:-8]) != checksum:
            raise RdbParseError(None, "DUMP payload checksum mismatch: not a Redis DUMP payload")
        rdb_type = payload[0]
        if rdb_type in _PORTABLE_TYPES and checksum:
            # The checksum covers the 2 version bytes too: take them back.
            self._append_dump(key, payload, rdb_utility.crc64_before(checksum, payload[-10:-8]))
        elif rdb_type in _PORTABLE_TYPES:
            self._append(encode_item(key, payload))
        elif rdb_type in _LISTPACK_TO_ZIPLIST:
            entries = rdb_reader.decode_listpack_dump(payload, verify_checksum=False)
            if not entries:
                raise ValueError("Redis has no empty sorted sets or hashes")
            # Members, fields and values that look like integers are stored as
            # strings: rdbtools would turn them into ints, which katsdptelstate
            # cannot handle. Zset scores stay as they are.
            stride = 2 if rdb_type == rdb_reader.RDB_TYPE_ZSET_LISTPACK else 1
            entries[::stride] = [b"%d" % e if isinstance(e, int) else e for e in entries[::stride]]
            blob = encode_string(rdb_utility.encode_ziplist(entries), self._compress)
            self._append(bytes((_LISTPACK_TO_ZIPLIST[rdb_type],)) + encode_string(key) + blob)
        else:
            _, key_type, value = rdb_reader.decode_dump(payload, verify_checksum=False)
            if key_type is None or value is None:
                raise ValueError(
                    f"values of RDB type {rdb_type} cannot be written in RDB version 9"
                )
            self.write_record(key, key_type, value)
            return
        self.keys_written += 1

    def save(
        self,
        client: TelescopeState | Backend | redis.Redis,
        keys: Iterable[str | bytes] | None = None,
    ) -> None:
        """Save keys from a telescope state, a backend or a Redis client to the file.

        Missing keys and keys that cannot be written are skipped, counted
        in :attr:`keys_failed` and logged, without raising an exception.

        Parameters
        ----------
        client
            A :class:`~telstate.TelescopeState` (its whole backend is seen,
            whatever its prefixes), a :class:`~telstate.backend.Backend`, or
            a redis-py compatible client supporting ``keys`` and ``dump``.
        keys
            The keys to save (full keys, including any prefix); None
            (default) saves all keys.

        Raises
        ------
        ValueError
            If the writer is closed.
        """
        from .telescope_state import TelescopeState

        if self._closed:
            raise ValueError("RDB writer is closed")
        if isinstance(client, TelescopeState):
            client = client.backend
        # A backend that overrides dump() asks its server (one round trip per
        # key); otherwise reading keys directly avoids encoding a payload only
        # to decode it again.
        backend = client if isinstance(client, Backend) else None
        use_dump = backend is None or type(backend).dump is not Backend.dump
        if keys is None:
            logger.info("No keys specified - dumping entire database")
            if backend is not None and not use_dump:
                for key, key_type, value in backend.records():
                    self._save_one(key, self.write_record, key, key_type, value)
                return
            keys = client.keys(b"*")
        if not use_dump:
            for key in map(ensure_binary, keys):
                self._save_one(key, self._write_backend_key, client, key)
            return
        self._save_dumps(client, iter(keys))

    def _save_dumps(self, client: Backend | redis.Redis, keys: Iterator[str | bytes]) -> None:
        """Write the keys from their DUMP payloads, a batch at a time."""
        from .redis import RedisBackend

        # RedisBackend.dump is its client's DUMP: a batch then takes one round trip.
        # (Fetching the next batch in a thread meanwhile was slower: the thread and
        # the CRC's numpy loops hand the GIL back and forth.)
        source = client.client if isinstance(client, RedisBackend) else client
        while batch := [ensure_binary(key) for key in itertools.islice(keys, _DUMP_BATCH)]:
            payloads = _dump_keys(source, batch)
            checked = _checksums_hold(payloads)
            for key, payload in zip(batch, payloads):
                self._save_one(key, self._write_payload, key, payload, checked)

    def _write_payload(self, key: bytes, payload: bytes | None, checked: bool = False) -> None:
        if payload is None:
            raise KeyError(_MISSING)
        self._write_dump(key, payload, checked)

    def _write_backend_key(self, backend: Backend, key: bytes) -> None:
        record = backend.record(key)
        if record is None:
            raise KeyError(_MISSING)
        self.write_record(*record)

    def _save_one(self, key: bytes, write: Callable[..., None], *args: Any) -> None:
        """Call ``write(*args)`` for `key`, counting and logging the key as failed if it raises."""
        try:
            write(*args)
        except (KeyError, TypeError, ValueError, RdbParseError) as exc:
            self.keys_failed += 1
            _failure_logger.error("Failed to save key %s: %s", display_str(key), exc)

    def close(self) -> None:
        """Complete the file and rename it into place; discard it instead if it holds no keys.

        Calling it again (or after :meth:`abort`) does nothing.

        Raises
        ------
        OSError
            If the file cannot be written; `filename` is then left as it
            was. Only if flushing the directory after the rename fails is
            the new file in place (readable, but its rename may not survive
            a power cut).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._buffer += RDB_TERMINATOR
            self._settle()
            self._buffer += self._crc.to_bytes(8, "little")
            self._wait_for_write()
            self._file.write(self._buffer)
            self._buffer = bytearray()
            self._file.flush()
            if self.temporary is None:
                self._file.close()
                return
            os.fsync(self._file.fileno())
            if not self.keys_written and not self._keep_empty:
                logger.error("No valid keys found - not writing an empty file")
                self._discard()
                return
            # Still open, so still locked: no remover of stale files takes it now.
            os.replace(self.temporary, self._target)
            self._file.close()
        except BaseException:
            self._discard()
            raise
        _fsync_directory(os.path.dirname(self._target))

    def abort(self) -> None:
        """Discard what was written, leaving `filename` as it was; then the writer is closed.

        Calling it again (or after :meth:`close`) does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._buffer = bytearray()
        self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(Exception):
            self._wait_for_write()  # the file is not closed under a write
        if self.temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temporary)
        # Only now: closing releases the temporary file's lock. The bytes of a file
        # discarded need not reach it (a full disk must not fail the discarding).
        with contextlib.suppress(OSError):
            self._file.close()


class _BackgroundWrite:
    """One buffer written to a file by a thread of its own."""

    def __init__(self, file: Any, data: bytearray) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(file, data), name="telstate-rdb-write", daemon=True
        )
        self._thread.start()

    def _run(self, file: Any, data: bytearray) -> None:
        try:
            file.write(data)
        except BaseException as error:  # raised in the writer's thread by wait()
            self._error = error

    def wait(self) -> None:
        """Wait until the buffer is written; raise what the write raised (OSError), if anything."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def temporary_name(name: str) -> str:
    """Name of a new temporary file for the RDB file `name` (hidden, naming this process)."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create_temporary(directory: str, name: str) -> tuple[str, int]:
    """Create and lock a new temporary file for the RDB file `name`; its path and descriptor.

    The lock (flock) is held as long as the descriptor is open: it is what
    tells :func:`remove_stale_temporaries` that the file is being written.
    A remover may take the lock between the file's creation and its
    locking here, and then deletes the file: this is noticed (the lock is
    refused, or the file has no name any more) and another file is made.
    """
    while True:
        path = os.path.join(directory, temporary_name(name))
        # O_EXCL: never write into someone else's file; mode 0o666 lets the
        # umask decide the permissions, as open(filename, "wb") would.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink > 0:
                return path, fd
        except BlockingIOError:
            pass  # a remover holds it and will delete it
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            raise
        os.close(fd)


def remove_stale_temporaries(directory: PathType, name_pattern: str) -> None:
    """Delete temporary files left in `directory` by writers that no longer write them.

    A writer holds an exclusive flock on its temporary file until it is
    done with it, and the lock dies with the writer's process, so a
    temporary file whose lock can be taken is stale. This does not depend
    on process ids (which another host or PID namespace sharing the
    directory does not see, and which the system reuses).

    Parameters
    ----------
    directory
        Where to look.
    name_pattern
        Regular expression matching the names of the RDB files whose
        temporary files to look for.
    """
    pattern = re.compile(rf"\.(?:{name_pattern})\.[0-9]+\.[0-9a-f]{{8}}\.tmp")
    directory = os.fsdecode(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return  # creating the temporary file will say so
    for other in names:
        if not pattern.fullmatch(other):
            continue
        path = os.path.join(directory, other)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a writer holds it
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        finally:
            os.close(fd)


def _is_stream(path: str) -> bool:
    """Whether `path` is an existing pipe or device (e.g. /dev/stdout): nothing to rename over."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_item(key: bytes, dumped_value: bytes) -> bytes:
    """Encode a key and its DUMP payload as an entry of an RDB file.

    The entry is the payload's type byte, the key as an RDB string, and
    the payload's value, without its 10-byte footer (version and checksum).
    The payload is copied as it is: its type must be one that the file's
    RDB version reads (:meth:`RDBWriter.write_dump` checks and converts).
    """
    return dumped_value[:1] + encode_string(key) + dumped_value[1:-10]


def _checksums_hold(payloads: list[bytes | None]) -> bool:
    """Whether the checksum of every DUMP payload that has one is right, all found at once.

    One CRC pass over the payloads joined, compared with the CRC their
    checksums add up to (the CRC is linear): fast where many payloads each
    take a pass of their own. False if any is wrong (then each is checked
    alone, to find which).
    """
    bodies = []
    expected = 0
    for payload in payloads:
        if payload is None or len(payload) < 11:
            continue
        checksum = int.from_bytes(payload[-8:], "little")
        if checksum:
            body = memoryview(payload)[:-8]
            expected = rdb_utility.crc64_shift(expected, len(body)) ^ checksum
            bodies.append(body)
    return rdb_utility.crc64(b"".join(bodies)) == expected


def _dump_keys(client: Any, keys: list[bytes]) -> list[bytes | None]:
    """DUMP each key with the client's own ``dump``, in one round trip where possible.

    A redis-py client's pipeline runs the same ``dump`` as the client, so
    all keys go in one round trip. A client whose class overrides ``dump``
    (a wrapper, a test double) has it called once per key, as
    katsdptelstate calls it.
    """
    if not isinstance(client, Backend) and callable(getattr(client, "pipeline", None)):
        with client.pipeline(transaction=False) as pipe:
            if getattr(type(pipe), "dump", None) is getattr(type(client), "dump", None):
                for key in keys:
                    pipe.dump(key)
                return pipe.execute()
    return [client.dump(key) for key in keys]
