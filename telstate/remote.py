"""Remote writes: writing to a store through its Redis mirror, and the request format.

A mirror whose replicator runs with ``--accept-writes`` takes write
requests: a client on any host sends each write as an entry of the
mirror's request stream and waits for the entry with the same request id
in its own reply stream. The daemon on the log host applies the request
to the log (see :mod:`replicator.intake`), projects the new events to the
mirror and only then replies, so a write that returns is durable in the
log and visible in the mirror.

Keys, all in the replicators' database (:data:`telstate.redis.MIRROR_CURSOR_DB`,
never the mirror's own, so that no mirror client lists them):

=====================================  ====================================================
``telstate-replicator:intake:<db>``    hash: ``store`` (UUID) of the store whose daemon
                                       accepts writes for mirror database *db*, and its
                                       counters (see :mod:`replicator.intake`)
``telstate-replicator:requests:<db>``  stream of requests; clients may only XADD to it
``telstate-replicator:replies:<db>:<token>``  stream of replies to one client (expires)
=====================================  ====================================================

A request is one stream entry with these fields (bytes; integers as ASCII):

===========  ================================================================
``v``        format version, ``1``
``id``       request id, unique to the client: ``<time>:<token>:<counter>``
             (*time*: the client's clock when it made the id, ms since the
             epoch in 11 hex digits; see :meth:`_Session.new_request`). The
             daemon treats ids as opaque (older clients send ``<token>:<counter>``)
``reply``    the client's token (hex): names its reply stream
``store``    UUID of the store the client means to write (the intake key's)
``op``       ``set_immutable``, ``add_mutable``, ``set_indexed``, ``delete``, ``clear``
``key``      encoded key (not for ``clear``)
``sub``      encoded sub-key (``set_indexed`` only)
``value``    encoded value (``set_immutable``, ``add_mutable``, ``set_indexed``)
``ts``       sensor timestamp, 8-byte big-endian float64 (``add_mutable`` only)
``timeout``  milliseconds the client waits from sending; a request older
             than that by the server's clock (from its stream entry id, its
             sending time) is never applied, nor is one whose entry id is
             ahead of the server's clock (its age is then unknown)
``host``     writer identity recorded in the event: host name,
``pid``      process id,
``name``     and writer name (empty for none)
===========  ================================================================

A reply is one entry of the reply stream:

===========  ================================================================
``id``       the request id
``status``   ``ok``; ``exists`` (set_immutable / set_indexed found the key or
             sub-key set: ``value`` holds the existing value); or ``error``
``value``    see ``status``
``error``    for ``error``: ``immutable`` (the key has another type),
             ``timestamp`` (invalid timestamp), ``expired`` (older than its
             timeout: not applied), ``clock`` (its stream entry id is
             ahead of the server's clock: not applied), ``invalid``
             (malformed request),
             ``store`` (the daemon writes another store, or failed),
             ``damaged`` (the store's record of the request id is damaged:
             whether it was applied is unknown, and it is not applied again),
             ``failed`` (the store failed the request's transaction: a full
             disk, say; nothing of it was committed),
             ``readonly`` (the store takes no writes: it is a follower)
``message``  for ``error``: what went wrong, naming the key
===========  ================================================================

Nothing else in the package knows these layouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import hiredis
import redis
import redis.asyncio

from .errors import (
    ConnectionError,
    ImmutableKeyError,
    InvalidTimestampError,
    ReadOnlyError,
    StoreError,
    TelstateError,
    WriteTimeoutError,
)
from .log import Op, Writer
from .utils import display_str, ensure_str

#: Version of the request and reply layouts above.
FORMAT_VERSION = b"1"

#: How long a writer waits for its reply by default (seconds).
DEFAULT_TIMEOUT = 10.0
#: Longest timeout a request may ask for; the daemon remembers request ids
#: at least this long, so that a retry is never applied twice.
MAX_TIMEOUT = 3600.0
#: Longest XREAD BLOCK of a waiting writer, so that a lost connection is noticed.
_BLOCK_CHUNK = 1.0
#: Spare time (s) a writer gives the server beyond the time left to its write
#: before it counts the connection as lost (see _hang_timeout, AsyncRemoteWriter).
_SLACK = 0.5
#: How much longer (s) than its XREAD's block an exchange that sent a
#: request may take before the writer counts the server as stalled then
#: (see _Session.write_plan): a SIGSTOPped or swapping Redis stamps the
#: request when it runs the XADD, late, so the daemon may find it young
#: and apply it after the writer's deadline.
_STALL = 0.25
#: Pause between attempts of a writer whose connection failed.
_RETRY_DELAY = 0.05
#: Longest request id and token accepted.
_MAX_ID = 100
#: Largest request accepted (all fields), well above an 8 MB array sensor.
MAX_REQUEST_BYTES = 256 << 20
#: How much of a bad request a rejection shows: bytes of a field, and names of fields.
_SHOWN_BYTES = 32
_SHOWN_FIELDS = 4
#: Largest write whose XADD reply a writer may skip (see _Session.skip_replies):
#: a larger one would be sent again whenever its reply takes over a second.
_SKIP_REPLY_MAX_BYTES = 64 << 10
#: Errors of a writer's connection after which it tries again (a new connection).
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)
#: How much shorter than a wire's socket timeout a limit must be to change it (s).
_LIMIT_SLACK = 0.05
#: Bytes a wire reads from its socket at most at once (redis-py's default read size).
_READ_SIZE = 65536
#: What a wire's hiredis reader gives when it holds no whole reply (False is a RESP3 reply).
_NOT_ENOUGH_DATA = object()
#: The type of RESP3 push messages (hiredis 3.2 and later; before, they are lists).
_PUSH_NOTIFICATION = getattr(hiredis, "PushNotification", None)

_TIMESTAMP = struct.Struct(">d")
_new_tuple = tuple.__new__
_HOST = socket.gethostname()
# The operations a remote writer may request (a promotion is not one), and their fields.
_FIELDS = {
    Op.SET_IMMUTABLE: {b"key", b"value"},
    Op.ADD_MUTABLE: {b"key", b"value", b"ts"},
    Op.SET_INDEXED: {b"key", b"sub", b"value"},
    Op.DELETE: {b"key"},
    Op.CLEAR: set(),
}
_OP_NAMES = {op: op.value.encode() for op in _FIELDS}
_COMMON = {b"v", b"id", b"reply", b"store", b"op", b"timeout", b"host", b"pid", b"name"}
# By the name in a request's op field: the operation, all the fields of its
# requests, and the bytes of their names (keyed by the name, as an Op hashes
# in Python: decode_request looks this up once per request).
_DECODING = {
    name: (op, frozenset(_COMMON | _FIELDS[op]), sum(map(len, _COMMON | _FIELDS[op])))
    for op, name in _OP_NAMES.items()
}


def intake_key(db: int) -> bytes:
    """The hash that says a daemon accepts writes for mirror database `db`."""
    return b"telstate-replicator:intake:%d" % db


def request_stream_key(db: int) -> bytes:
    """The stream of write requests for mirror database `db`."""
    return b"telstate-replicator:requests:%d" % db


def reply_stream_key(db: int, token: bytes) -> bytes:
    """The stream of replies to the client with `token`, for mirror database `db`."""
    return b"telstate-replicator:replies:%d:%b" % (db, token)


class InvalidRequest(TelstateError):
    """A request stream entry that is not a valid request.

    Attributes
    ----------
    request_id, reply_to
        As far as they could be read (None otherwise): where to send the error.
    """

    def __init__(self, message: str, request_id: bytes | None, reply_to: bytes | None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


class Request(NamedTuple):
    """A decoded write request.

    A named tuple, as the intake decodes one per request on its path to
    the commit (a frozen dataclass sets each field by a call).

    Attributes
    ----------
    entry_id
        The stream entry id (its first part is the server's time in ms).
    request_id, reply_to
        The client's request id and token.
    store
        UUID (text) of the store the client means.
    op, key, sub_key, value, timestamp
        The write (unused fields empty / None).
    timeout_ms
        How long the client waits from sending.
    writer
        Who asked, recorded in the event.
    size
        Bytes of the entry's fields.
    sent_ms
        When the server added the entry, in ms since the epoch (its clock;
        the first part of `entry_id`).
    """

    entry_id: bytes
    request_id: bytes
    reply_to: bytes
    store: str
    op: Op
    key: bytes
    sub_key: bytes
    value: bytes
    timestamp: float | None
    timeout_ms: int
    writer: Writer
    size: int
    sent_ms: int

    @property
    def expires_ms(self) -> int:
        """The server time after which the request must not be applied."""
        return self.sent_ms + self.timeout_ms


@dataclass(frozen=True)
class Reply:
    """The outcome of a request, as sent back (and remembered for redeliveries).

    Attributes
    ----------
    status
        ``ok``, ``exists`` or ``error``.
    value
        The existing value for ``exists``.
    error, message
        For ``error``: its kind (see the module docstring) and text.
    """

    status: bytes
    value: bytes = b""
    error: bytes = b""
    message: str = ""

    def fields(self, request_id: bytes) -> dict[bytes, bytes]:
        """The reply stream entry for the request `request_id`."""
        return {
            b"id": request_id,
            b"status": self.status,
            b"value": self.value,
            b"error": self.error,
            b"message": self.message.encode(),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Reply:
        """Parse a reply stream entry (missing fields read as empty)."""
        status = fields.get(b"status", b"")
        if status == b"ok":
            return OK  # the common reply: an ok carries nothing else
        return cls(
            status,
            fields.get(b"value", b""),
            fields.get(b"error", b""),
            ensure_str(fields.get(b"message", b"")),
        )

    def result(self) -> bytes | None:
        """What the backend method returns; raises the error a local write would raise."""
        if self.status == b"ok":
            return None
        if self.status == b"exists":
            return self.value
        if self.error == b"immutable":
            raise ImmutableKeyError(self.message)
        if self.error == b"timestamp":
            raise InvalidTimestampError(self.message)
        if self.error == b"expired":
            raise WriteTimeoutError(self.message)
        if self.error == b"readonly":
            raise ReadOnlyError(self.message)
        if self.error in (b"damaged", b"failed"):
            raise StoreError(self.message)
        raise TelstateError(f"the log host refused the write: {self.message}")


OK = Reply(b"ok")


def entry_time_ms(entry_id: bytes) -> int:
    """The server time (ms) in a stream entry id ``<ms>-<n>``."""
    return int(entry_id.split(b"-", 1)[0])


def identity_fields(reply_to: bytes, store: str, writer: Writer) -> tuple[bytes, ...]:
    """The fields every request of one client token repeats, flat (name, value, ...)."""
    return (
        b"v",
        FORMAT_VERSION,
        b"reply",
        reply_to,
        b"store",
        store.encode(),
        b"host",
        writer.host.encode(),
        b"pid",
        b"%d" % writer.pid,
        b"name",
        (writer.name or "").encode(),
    )


def write_fields(
    op: Op,
    *,
    key: bytes = b"",
    sub_key: bytes = b"",
    value: bytes = b"",
    timestamp: float | None = None,
) -> tuple[bytes, ...]:
    """The fields of a request that say what to write, flat (name, value, ...)."""
    wanted = _FIELDS[op]
    fields = [b"op", _OP_NAMES[op]]
    if b"key" in wanted:
        fields += (b"key", key)
    if b"sub" in wanted:
        fields += (b"sub", sub_key)
    if b"value" in wanted:
        fields += (b"value", value)
    if b"ts" in wanted:
        assert timestamp is not None
        fields += (b"ts", _TIMESTAMP.pack(timestamp))
    return tuple(fields)


def attempt_fields(request_id: bytes, timeout: float) -> tuple[bytes, ...]:
    """The fields of one sending of a request: its id, and the `timeout` (s) left to it."""
    return (b"id", request_id, b"timeout", _timeout_ms(timeout))


def _timeout_ms(timeout: float) -> bytes:
    """The `timeout` field of a request: `timeout` seconds in whole ms (at least 1)."""
    return b"%d" % max(1, int(timeout * 1000))


def encode_request(
    request_id: bytes,
    reply_to: bytes,
    store: str,
    op: Op,
    *,
    key: bytes = b"",
    sub_key: bytes = b"",
    value: bytes = b"",
    timestamp: float | None = None,
    timeout: float,
    writer: Writer,
) -> dict[bytes, bytes]:
    """The stream entry fields of a request (see the module docstring).

    The writers send the same fields, their identity packed once per token
    (see :meth:`_Session.xadd`).
    """
    flat = (
        identity_fields(reply_to, store, writer)
        + attempt_fields(request_id, timeout)
        + write_fields(op, key=key, sub_key=sub_key, value=value, timestamp=timestamp)
    )
    return dict(zip(flat[::2], flat[1::2]))


def decode_request(entry_id: bytes, fields: dict[bytes, bytes]) -> Request:
    """Check and decode a request stream entry.

    Raises
    ------
    InvalidRequest
        If any field is missing, unknown or malformed.
    """
    request_id = fields.get(b"id")
    reply_to = fields.get(b"reply")
    if request_id is not None and not (0 < len(request_id) <= _MAX_ID):
        request_id = None
    if reply_to is not None and not (0 < len(reply_to) <= _MAX_ID and reply_to.isalnum()):
        reply_to = None
    if request_id is None or reply_to is None:
        raise _invalid(entry_id, "no valid request id or reply token", request_id, reply_to)
    if fields.get(b"v") != FORMAT_VERSION:
        version = _shown(fields.get(b"v"))
        reason = f"format version {version}, this daemon reads {FORMAT_VERSION!r}"
        raise _invalid(entry_id, reason, request_id, reply_to)
    decoding = _DECODING.get(fields.get(b"op", b""))
    if decoding is None:
        reason = f"unknown operation {_shown(fields.get(b'op'))}"
        raise _invalid(entry_id, reason, request_id, reply_to)
    op, expected, names_size = decoding
    if fields.keys() != expected:
        wrong = sorted(fields.keys() ^ expected)
        shown = ", ".join(map(_shown, wrong[:_SHOWN_FIELDS]))
        if len(wrong) > _SHOWN_FIELDS:
            shown += f" and {len(wrong) - _SHOWN_FIELDS} more"
        reason = f"fields {shown} missing or unexpected for {op.value}"
        raise _invalid(entry_id, reason, request_id, reply_to)
    try:
        timeout_ms = int(fields[b"timeout"])
        pid = int(fields[b"pid"])
        store = fields[b"store"].decode("ascii")
        host = fields[b"host"].decode()
        name = fields[b"name"].decode() or None
        timestamp = _TIMESTAMP.unpack(fields[b"ts"])[0] if op is Op.ADD_MUTABLE else None
        sent_ms = entry_time_ms(entry_id)
    except (ValueError, struct.error) as error:
        raise _invalid(entry_id, f"malformed field: {error}", request_id, reply_to) from None
    if not 0 < timeout_ms <= MAX_TIMEOUT * 1000:
        reason = f"timeout {timeout_ms} ms is not in (0, {int(MAX_TIMEOUT * 1000)}]"
        raise _invalid(entry_id, reason, request_id, reply_to)
    key = fields.get(b"key", b"")
    if op is not Op.CLEAR and not key:
        raise _invalid(entry_id, "empty key", request_id, reply_to)
    size = names_size + sum(map(len, fields.values()))
    if size > MAX_REQUEST_BYTES:
        reason = f"{size} bytes, more than the {MAX_REQUEST_BYTES} a request may have"
        raise _invalid(entry_id, reason, request_id, reply_to)
    # By position, in the order of Request's fields, skipping the named
    # tuple's generated __new__ (a Python call): one per request.
    return _new_tuple(
        Request,
        (
            entry_id,
            request_id,
            reply_to,
            store,
            op,
            key,
            fields.get(b"sub", b""),
            fields.get(b"value", b""),
            timestamp,
            timeout_ms,
            Writer(host, pid, name),
            size,
            sent_ms,
        ),
    )


def _shown(data: bytes | None) -> str:
    """A client's bytes as a rejection shows them (logged, and sent back): their start, if long.

    A hostile request may carry megabytes in any field; its rejection
    must stay a line.
    """
    if data is None or len(data) <= _SHOWN_BYTES:
        return repr(data)
    return f"{data[:_SHOWN_BYTES]!r}... ({len(data)} bytes)"


def _invalid(
    entry_id: bytes, reason: str, request_id: bytes | None, reply_to: bytes | None
) -> InvalidRequest:
    """The error for the request in stream entry `entry_id`, invalid for `reason`."""
    return InvalidRequest(f"request {entry_id!r}: {reason}", request_id, reply_to)


def control_kwargs(client: Any, db: int) -> dict[str, Any]:
    """Options for a connection pool like `client`'s, with database `db` instead of its own."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs["db"] = db
    kwargs["connection_class"] = pool.connection_class
    return kwargs


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of an XREAD / XREADGROUP reply, in order.

    The reply may be raw (RESP2 or RESP3, fields as a flat list) or parsed
    by redis-py (fields as a dict). An entry deleted while pending in a
    consumer group has no fields (None).
    """
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
    found: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    for entries in streams:
        for entry_id, flat in entries:
            if flat is None or isinstance(flat, dict):
                found.append((entry_id, flat or None))
            else:
                # One iterator zipped with itself pairs names and values
                # without copying the list twice (once per request).
                pairs = iter(flat)
                found.append((entry_id, dict(zip(pairs, pairs))))
    return found


class Wire:
    """One Redis connection for hot paths: commands sent in one write, replies read in order.

    Through a :class:`redis.Redis` client every command also costs about
    0.1 ms of Python (argument checks, pool bookkeeping, a readiness poll,
    observability hooks): as much as the round trip itself, and more than
    Redis takes to run it. Both ends of a remote write (the writer, and
    the daemon's intake) send a few fixed commands many times a second, so
    they pack them with hiredis and talk to one connection of their pool
    directly. Replies come back raw (lists, as the server sent them).

    redis-py opens the connection, and opens it again after a failure (it
    authenticates, selects the database, names the client, agrees on the
    protocol), and sends whenever its health check is due. Otherwise the
    wire writes to the connection's socket itself, and parses the replies
    with a hiredis reader of its own, fed from the socket through a buffer
    it reuses; a failed command's reply is the exception redis-py would
    raise for it (:class:`redis.exceptions.NoScriptError` for ``NOSCRIPT``,
    ...). A socket with a timeout (the pool's ``socket_timeout``) has it
    kept by the kernel (see :func:`_kernel_timeouts`): a send or a read
    that waits longer for the server raises :class:`redis.TimeoutError`.

    Parameters
    ----------
    pool
        Where the connection comes from (it is held until :meth:`close`,
        which gives it back).
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._connection: Any = None
        # The connection's socket while it is open, and the reader of its
        # replies (None when closed: the next send opens it again).
        self._sock: socket.socket | None = None
        self._reader: Any = None
        # The socket's own timeout, and whether the kernel keeps it (see _kernel_timeouts).
        self._timeout: float | None = None
        self._kernel_timeout = False
        self._buffer = bytearray(_READ_SIZE)
        # redis-py's health check interval of the connection (0 for none).
        self._health_check = 0
        self._pid = _Process.pid
        # Whether a send first looks for a connection the server closed (for
        # writers: they read every reply before they send again; a wire with
        # replies still to read must not open a new connection under them).
        self.check_closed = False
        # Whether the socket is one a send to a closed connection goes out on
        # (TCP, TLS), so that check_closed must look; on a unix socket the send fails.
        self._sends_blind = False
        # The longest the next sends and reads may block (see limit), and the
        # timeout the socket has now (its own, or that limit if shorter).
        self._limit: float | None = None
        self._applied: float | None = None

    def limit(self, seconds: float | None) -> None:
        """Bound each send and read of the next calls by `seconds`, if shorter than the socket's.

        A caller with a deadline (a remote write) gives the time left to it,
        so that a server that stalls mid-exchange cannot hold it a whole
        socket timeout past the deadline. None restores the socket's own
        timeout. It costs system calls only when the bound changes the
        socket's timeout.
        """
        self._limit = seconds
        if self._sock is not None:
            self._apply_limit(self._sock)

    def _bounded(self) -> float | None:
        """The timeout the socket should have now: its own, or the limit if shorter."""
        limit, own = self._limit, self._timeout
        if limit is None or (own is not None and limit >= own - _LIMIT_SLACK):
            return own  # (within a few ms of it: no system calls on the hot path)
        return max(limit, 0.001)

    def _apply_limit(self, sock: socket.socket) -> None:
        wanted = self._bounded()
        if wanted == self._applied:
            return
        if self._kernel_timeout:
            _kernel_timeouts(sock, wanted if wanted is not None else self._timeout)
        else:
            sock.settimeout(wanted)
        self._applied = wanted

    def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send `commands` in one write and read their replies.

        Returns
        -------
        One reply per command; a command that failed has its
        :class:`redis.ResponseError` in its place (the others still count).

        Raises
        ------
        redis.ConnectionError, redis.TimeoutError
            If the connection failed (it is closed, and reopened by the next call).
        """
        self.send(b"".join(hiredis.pack_command(command) for command in commands))
        return self.receive(len(commands))

    def send(self, packed: bytes) -> None:
        """The first half of :meth:`call`: send commands packed (RESP) into `packed`.

        A caller that must know whether its commands may have reached the
        server sends and receives apart: if this raises, the server got
        none of them (in practice: it cannot run a command cut short).
        """
        sock = self._sock
        if (
            sock is None
            or self._pid != _Process.pid
            or (self._health_check and time.monotonic() > self._connection.next_health_check)
        ):
            self._send_through_connection(packed)
            return
        if self.check_closed and self._sends_blind and _closed_by_server(sock):
            # Redis went down (or closed the connection) since the last
            # exchange: over TCP a send would go out all the same, and only
            # the read would fail, when the request may have reached it. A
            # new connection now fails (or works) before anything is sent.
            self._disconnect()
            self._send_through_connection(packed)
            return
        if self._limit is not None or self._applied != self._timeout:
            self._apply_limit(sock)
        try:
            sock.sendall(packed)
        except BaseException as error:
            self._fail(error, "writing to")

    def _send_through_connection(self, packed: bytes) -> None:
        """Send as redis-py does: connecting (a new connection after a fork), checking health."""
        if self._connection is None or self._pid != _Process.pid:
            # After a fork the parent's socket is not ours: the pool gives
            # the child connections of its own.
            self._connection = self._pool.get_connection()
            self._pid = _Process.pid
            self._sock = self._reader = None
        connection = self._connection
        bounded = self._bounded()
        saved = None
        try:
            if self._sock is not None:
                # As redis-py made it (or shorter), for its health check.
                if self._kernel_timeout:
                    self._apply_limit(self._sock)
                self._sock.settimeout(bounded)
            elif bounded != self._timeout and self._limit is not None:
                # Connecting (and its HELLO, SELECT, ...) within the limit too.
                assert bounded is not None  # (the limit: the socket's own differs)
                saved = connection.socket_timeout, connection.socket_connect_timeout
                connection.socket_timeout = min(saved[0] or math.inf, bounded)
                connection.socket_connect_timeout = min(saved[1] or math.inf, bounded)
            connection.send_packed_command([packed])
        except redis.exceptions.InvalidResponse as error:  # (its handshake's replies)
            self._disconnect()
            raise _garbled(error, "connecting to") from error
        except BaseException:
            self._disconnect()
            raise
        finally:
            if saved is not None:
                connection.socket_timeout, connection.socket_connect_timeout = saved
        sock = connection._sock
        if sock is not self._sock:
            self._sock = sock
            self._reader = _reader_for(connection)
            self._health_check = connection.health_check_interval
            self._sends_blind = sock.family != socket.AF_UNIX
            # The socket's own timeout (not the limit it may have been made with).
            self._timeout = sock.gettimeout() if saved is None else saved[0]
            self._applied = sock.gettimeout()
            self._kernel_timeout = _kernel_timeouts(sock, self._timeout)
            if self._kernel_timeout:
                self._applied = self._timeout
        elif not self._kernel_timeout:
            self._applied = bounded
        # (An old socket with kernel timeouts keeps those last applied.)
        if self._kernel_timeout:
            sock.settimeout(None)
        self._apply_limit(sock)

    def receive(self, count: int) -> list[Any]:
        """The second half of :meth:`call`: the replies to `count` commands sent."""
        sock, reader = self._sock, self._reader
        if sock is None:
            raise redis.ConnectionError("Connection closed: its replies are lost")
        replies: list[Any] = []
        try:
            while len(replies) < count:
                reply = reader.gets()
                if reply is _NOT_ENOUGH_DATA:
                    buffer = self._buffer
                    size = sock.recv_into(buffer)
                    if not size:
                        raise redis.ConnectionError("Connection closed by server.")
                    reader.feed(buffer, 0, size)
                elif type(reply) is _PUSH_NOTIFICATION:
                    # Not a reply: redis-py's parser takes it, as when it reads.
                    self._connection._parser.handle_push_response(reply)
                elif isinstance(reply, redis.ConnectionError):
                    raise reply  # as redis-py does ("max number of clients reached")
                elif type(reply) is list and reply and isinstance(reply[0], redis.ConnectionError):
                    raise reply[0]
                else:
                    replies.append(reply)
        except BaseException as error:
            self._fail(error, "reading from")
        if self._health_check:
            self._connection.next_health_check = time.monotonic() + self._health_check
        return replies

    def _fail(self, error: BaseException, doing: str) -> NoReturn:
        """Close the connection after `error` and raise it (a socket's as redis-py does)."""
        self._disconnect()
        if isinstance(error, (socket.timeout, BlockingIOError)):
            # BlockingIOError: the kernel's timeout of a blocking socket ran out.
            raise redis.TimeoutError(f"Timeout {doing} the redis server") from error
        if isinstance(error, OSError):
            raise redis.ConnectionError(f"Error {doing} the redis server: {error}") from error
        if isinstance(error, redis.exceptions.InvalidResponse):
            raise _garbled(error, doing) from error
        raise error

    def fileno(self) -> int | None:
        """The connection's socket, to wait for replies with :mod:`select` (None if closed).

        It turns readable when bytes of a reply come. Replies the wire has
        already taken from the socket do not show: that only happens to
        replies beyond those :meth:`receive` was asked for (more commands
        sent than replies read), and the next :meth:`receive` returns them
        at once. The intake and the mirror wait on it with every earlier
        reply read.
        """
        sock = self._sock
        return None if sock is None else sock.fileno()

    def reset(self) -> None:
        """Close the connection (its replies are not wanted); the next send opens it again.

        Unlike :meth:`close`, the wire keeps the connection object, so that
        opening it again (connecting, its handshake) is bounded by the
        :meth:`limit` too: the pool would connect a new one within its own
        timeouts.
        """
        if self._connection is not None:
            self._disconnect()

    def close(self) -> None:
        """Close the connection and give it back to the pool (the next call takes one again).

        The pool's other connections stay as they are.
        """
        connection, self._connection = self._connection, None
        self._sock = self._reader = None
        if connection is not None and self._pid == _Process.pid:
            connection.disconnect()
            self._pool.release(connection)

    def _disconnect(self) -> None:
        """Close the socket after a failure (the next send opens the connection again)."""
        self._sock = self._reader = None
        if self._pid == _Process.pid:
            self._connection.disconnect()


def _garbled(error: redis.exceptions.InvalidResponse, doing: str) -> redis.ConnectionError:
    """A reply that is not RESP (a proxy, or another service on the port), as a lost connection.

    The connection is out of step (its later replies cannot be told
    apart): the caller closes it, and treats what it sent as it would
    after a connection lost while it waited for the reply.
    """
    return redis.ConnectionError(f"Error {doing} the redis server: not a Redis reply ({error})")


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) `sock`, which holds no reply not yet read.

    A TLS socket cannot be peeked at: one that turned readable while no
    reply was due holds the server's close (or bytes out of step), so it
    counts as closed either way (the caller connects anew, before it sends).
    """
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    if not poll.poll(0):
        return False  # (one system call when it is open and quiet: the usual case)
    if type(sock) is not socket.socket:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _reader_for(connection: Any) -> Any:
    """A hiredis reader of `connection`'s replies, giving what redis-py's parser gives.

    Errors become the exceptions redis-py makes of them, and strings are
    decoded if the connection decodes them.
    """
    encoder = connection.encoder
    kwargs: dict[str, Any] = {
        "protocolError": redis.exceptions.InvalidResponse,
        "replyError": connection._parser.parse_error,
        "errors": encoder.encoding_errors,
        "notEnoughData": _NOT_ENOUGH_DATA,
    }
    if encoder.decode_responses:
        kwargs["encoding"] = encoder.encoding
    return hiredis.Reader(**kwargs)


def _kernel_timeouts(sock: socket.socket, timeout: float | None) -> bool:
    """Have the kernel keep `sock`'s `timeout` (``SO_RCVTIMEO``, ``SO_SNDTIMEO``), if it can.

    Python keeps a socket's timeout by polling before every send and
    receive: a system call more for each. A blocking socket whose kernel
    timeouts are set sends and receives at once, and fails with
    :class:`BlockingIOError` when the time runs out. Only for plain
    sockets on Linux (an SSL socket keeps its Python timeout).

    Returns
    -------
    Whether the kernel keeps it: then the wire makes the socket blocking
    (and gives it its Python timeout back whenever redis-py sends).
    """
    if not timeout or type(sock) is not socket.socket or not sys.platform.startswith("linux"):
        return False
    seconds = int(timeout)
    microseconds = max(int((timeout - seconds) * 1e6), 0 if seconds else 1)
    timeval = struct.pack("@ll", seconds, microseconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return True


def _at_eof(connection: Any) -> bool:
    """Whether the server closed an asyncio connection that holds no reply not yet read."""
    reader = getattr(connection, "_reader", None)
    return reader is not None and reader.at_eof()


class AsyncWire:
    """:class:`Wire` for asyncio: one connection of `pool`, held until :meth:`close`.

    Parameters
    ----------
    pool
        Where the connection comes from.
    timeout
        If given, the longest a send or a read may take (seconds), for a
        pool whose connections have no socket timeout of their own (see
        :class:`AsyncRemoteWriter`); a send or read that takes longer raises
        :class:`redis.TimeoutError` and closes the connection. A send or a
        read given a shorter `limit` of its own keeps that.
    """

    def __init__(self, pool: redis.asyncio.ConnectionPool, timeout: float | None = None) -> None:
        self._pool = pool
        self._connection: Any = None
        self._timeout = timeout

    def _time_limit(self, limit: float | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """The wire's timeout, or `limit` if shorter (Python 3.11+, else none: see the pool's)."""
        if self._timeout is not None and (limit is None or self._timeout < limit):
            limit = self._timeout
        if limit is None or sys.version_info < (3, 11):
            return contextlib.nullcontext()
        return asyncio.timeout(limit)

    async def send(self, packed: bytes, limit: float | None = None) -> None:
        """Send packed commands (see :meth:`Wire.send`: if this raises, none reached the server).

        It takes `limit` (s) at most, if given (Python 3.11+).
        """
        transport = None
        try:
            async with self._time_limit(limit):
                if self._connection is None:
                    # Connecting reads replies too (HELLO, SELECT): bounded as well.
                    self._connection = await self._pool.get_connection()
                elif not self._connection.is_connected or _at_eof(self._connection):
                    # Here, not in the send: the transport below is the one it writes to.
                    # (A connection the server closed since the last exchange is
                    # made anew: over TCP a send to it would go out all the same,
                    # and only the read would fail, when the request may have
                    # reached the server; a new one fails before anything is sent.)
                    if self._connection.is_connected:
                        await self._connection.disconnect()
                    await self._connection.connect()
                writer = getattr(self._connection, "_writer", None)
                transport = None if writer is None else writer.transport
                await self._connection.send_packed_command(packed)
        except BaseException as error:
            if transport is not None:
                # Aborted, not closed (as redis-py closes it on a timeout): a
                # close still writes out what the send left buffered, and the
                # server could run a command that this says it never got.
                transport.abort()
            if self._connection is not None:
                await self._connection.disconnect()
            if isinstance(error, asyncio.TimeoutError):
                raise redis.TimeoutError("Timeout writing to the redis server") from error
            if isinstance(error, redis.exceptions.InvalidResponse):  # (connecting)
                raise _garbled(error, "connecting to") from error
            raise

    async def receive(self, count: int, limit: float | None = None) -> list[Any]:
        """The replies to `count` commands sent (see :meth:`Wire.receive`), within `limit` s."""
        replies: list[Any] = []
        try:
            async with self._time_limit(limit):
                for _ in range(count):
                    try:
                        replies.append(await self._connection.read_response())
                    except redis.ResponseError as error:
                        replies.append(error)
        except BaseException as error:
            await self._connection.disconnect()
            if isinstance(error, asyncio.TimeoutError):
                raise redis.TimeoutError("Timeout reading from the redis server") from error
            if isinstance(error, redis.exceptions.InvalidResponse):
                raise _garbled(error, "reading from") from error
            raise
        return replies

    async def reset(self) -> None:
        """Close the connection (the next send opens it again): its replies are not wanted."""
        if self._connection is not None:
            await self._connection.disconnect()

    async def close(self) -> None:
        """Close the connection and the pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect()
            await self._pool.release(connection)
        await self._pool.disconnect()


class WireScript:
    """A Lua script run over a :class:`Wire`: called as a redis-py ``Script`` is.

    Parameters
    ----------
    wire
        The connection to run it on.
    script
        The script's source (loaded again if the server lost it).
    """

    def __init__(self, wire: Wire, script: bytes) -> None:
        self._wire = wire
        self.script = script
        self.sha = hashlib.sha1(script).hexdigest().encode()

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        """The EVALSHA of the script, for :meth:`Wire.call`."""
        return (b"EVALSHA", self.sha, len(keys), *keys, *args)

    def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run the script; raises its error as :class:`redis.ResponseError`."""
        (reply,) = self._wire.call(self.command(keys, args))
        if isinstance(reply, redis.exceptions.NoScriptError):
            # The server restarted or its scripts were flushed.
            checked(self._wire.call((b"SCRIPT", b"LOAD", self.script))[0])
            (reply,) = self._wire.call(self.command(keys, args))
        return checked(reply)

    def call_then(
        self, then: tuple[Any, ...] | None, *, keys: Sequence[Any], args: Sequence[Any]
    ) -> tuple[Any, Any]:
        """Run the script and then the command `then`, sent in one write.

        Redis runs `then` after the script whatever the script's outcome
        (even if the server had lost the script, which is then loaded and
        run again alone).

        Returns
        -------
        The script's reply (its error raised, as by calling it), and the
        reply to `then` (None if `then` is None; its error, unraised).
        """
        if then is None:
            return self(keys=keys, args=args), None
        reply, answer = self._wire.call(self.command(keys, args), then)
        if isinstance(reply, redis.exceptions.NoScriptError):
            return self(keys=keys, args=args), answer
        return checked(reply), answer


def checked(reply: Any) -> Any:
    """`reply`, unless it is an error (from :meth:`Wire.call`): then raise it."""
    if isinstance(reply, redis.ResponseError):
        raise reply
    return reply


def _packed_arguments(arguments: tuple[Any, ...]) -> memoryview:
    """`arguments` packed as a command's are (RESP), without the count line that starts it."""
    packed: bytes = hiredis.pack_command(arguments)
    return memoryview(packed)[packed.index(b"\r\n") + 2 :]


def _bulk(data: bytes) -> bytes:
    """`data` as one RESP bulk string (an argument of a packed command)."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


class PackedWrite(NamedTuple):
    """The fields of a request that say what to write (:func:`write_fields`), packed once.

    A write packs them once, and every sending of it (a resend after a lost
    connection) reuses them: an 8 MB value is not packed again.
    """

    field_count: int
    packed: memoryview

    @classmethod
    def of(
        cls,
        op: Op,
        *,
        key: bytes = b"",
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float | None = None,
    ) -> PackedWrite:
        """Pack the fields :func:`write_fields` gives for these arguments."""
        if op is Op.ADD_MUTABLE:
            # The common write (a sensor sample), packed by one format.
            assert timestamp is not None
            packed = _PACKED_ADD_MUTABLE % (
                len(key),
                key,
                len(value),
                value,
                _TIMESTAMP.pack(timestamp),
            )
            return cls(_ADD_MUTABLE_FIELD_COUNT, memoryview(packed))
        fields = write_fields(op, key=key, sub_key=sub_key, value=value, timestamp=timestamp)
        return cls(len(fields), _packed_arguments(fields))


#: What :meth:`PackedWrite.of` packs for an ``add_mutable``: the format of
#: :func:`write_fields`'s fields, taking the lengths and values of the key and
#: value, and the packed timestamp.
_PACKED_ADD_MUTABLE = (
    _bulk(b"op")
    + _bulk(_OP_NAMES[Op.ADD_MUTABLE])
    + _bulk(b"key")
    + b"$%d\r\n%b\r\n"
    + _bulk(b"value")
    + b"$%d\r\n%b\r\n"
    + _bulk(b"ts")
    + b"$%d\r\n%%b\r\n" % _TIMESTAMP.size
)
_ADD_MUTABLE_FIELD_COUNT = 2 * (1 + len(_FIELDS[Op.ADD_MUTABLE]))


#: Sent before an XADD whose reply the writer does not wait for (see _Session.skip_replies).
_SKIP_NEXT_REPLY = b"*3\r\n" + _bulk(b"CLIENT") + _bulk(b"REPLY") + _bulk(b"SKIP")
#: Whether the server skips a reply when asked: if it does, only the second PING answers.
_SKIP_PROBE_MARK = b"telstate-skip-probe"
_SKIP_PROBE = (
    _SKIP_NEXT_REPLY
    + b"*1\r\n"
    + _bulk(b"PING")
    + b"*2\r\n"
    + _bulk(b"PING")
    + _bulk(_SKIP_PROBE_MARK)
)


class _Exchange(NamedTuple):
    """A step of a write plan: send `packed` (unless empty), then read `replies` replies.

    The plan is sent the replies (a failed command's error in its place), or
    thrown :class:`_Unsent` if the sending failed, or the transient error
    (see `_TRANSIENT`) if the reading failed. `time_left` (s) is the write's
    until its deadline: the asyncio writer gives the exchange that and
    :data:`_SLACK` at most.
    """

    packed: bytes
    replies: int
    time_left: float


class _Unsent(Exception):
    """Thrown into a write plan: the sending failed, so none of its commands reached the server."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Reset:
    """A step of a write plan: close the connection (its replies are out of step), go on."""


_RESET = _Reset()

#: A step of a write plan: an exchange, a pause (seconds) before trying again, or a reset.
_Step = _Exchange | float | _Reset
#: A write written once for the sync and asyncio writers: it ends with the reply.
_WritePlan = Generator[_Step, list[Any], "Reply"]
#: Errors of a server that cannot run commands for now (a long script, loading
#: its data, a cluster in the middle of a change): tried again, as a lost connection.
_BUSY = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN")


def _busy(error: redis.ResponseError) -> bool:
    return str(error).startswith(_BUSY)


def _restarted(error: redis.ResponseError) -> bool:
    """Whether `error` says the server is loading its data: it restarted (or failed over)."""
    return str(error).startswith("LOADING")


def _refused_rights(error: redis.ResponseError) -> bool:
    """Whether Redis refused a command for the client's rights (ACL rules, a read-only replica)."""
    return isinstance(
        error, (redis.exceptions.NoPermissionError, redis.exceptions.ReadOnlyError)
    ) or str(error).startswith(("NOPERM", "READONLY"))


class _Process:
    """This process's id, for a check on every write without a system call (os.getpid is one)."""

    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        """Run in a forked child (see :func:`os.register_at_fork`): it has an id of its own."""
        cls.pid = os.getpid()


class ProcessLock:
    """A threading lock that a forked child gets anew, free.

    A child forked while another thread held a plain lock has it held for
    ever: the holder is not in the child to let it go, and the child's first
    write would wait on it without end. (Made anew in the child's only
    thread, right after the fork, before any other can take it.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _PROCESS_LOCKS.add(self)

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


_PROCESS_LOCKS: weakref.WeakSet[ProcessLock] = weakref.WeakSet()


def _forked() -> None:
    _Process.forked()
    for lock in list(_PROCESS_LOCKS):
        lock._lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


class _Session:
    """What the sync and asyncio writers share: identity, request ids, the format, the write plan.

    Attributes
    ----------
    skip_replies
        Whether a request's XADD is sent after ``CLIENT REPLY SKIP``, so that
        the writer wakes once per write (for its reply) instead of twice
        (for the XADD's entry id too). None until found out: after the
        first XADD the server accepted (so an XADD refused by the ACL rules
        is reported at once), a probe asks whether the server skips replies
        (the ACL rules of the writer's Redis user may refuse ``CLIENT``).
        Then a skipped XADD that failed (out of memory, say) is reported
        once its first wait for the reply ends empty: the request is sent
        again, with the same id and deadline, asking for the XADD's reply.
        (So a large write always asks: it is not sent twice.)
    """

    def __init__(self, mirror_db: int, store: str, timeout: float, writer_name: str | None):
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"write timeout must be in (0, {MAX_TIMEOUT}] s, not {timeout!r}")
        self.store = store
        self.timeout = timeout
        self.mirror_db = mirror_db
        self.requests = request_stream_key(mirror_db)
        self.writer_name = writer_name
        self.skip_replies: bool | None = None
        self._new_token()

    def _new_token(self) -> None:
        """A token (and so request ids and a reply stream) of this process's own."""
        self.pid = _Process.pid
        self.token = secrets.token_hex(8).encode()
        self.replies = reply_stream_key(self.mirror_db, self.token)
        self._counter = itertools.count(1)
        # Milliseconds in this token's last request id (see new_request).
        self._last_ms = 0
        self.last_reply_id = b"0"
        # Every request of this token starts with the same XADD arguments:
        # they are packed once, and each request packs only its own fields.
        writer = Writer(_HOST, self.pid, self.writer_name)
        head = (b"XADD", self.requests, b"*") + identity_fields(self.token, self.store, writer)
        self._packed_head = bytes(_packed_arguments(head))
        # The XADD's count of arguments, but for those of the write.
        self._xadd_length = len(head) + len(attempt_fields(b"", 1.0))
        # So is the XREAD of the replies, but for its last two arguments.
        self._packed_read = b"*6\r\n$5\r\nXREAD\r\n$5\r\nBLOCK\r\n"
        self._packed_streams = b"$7\r\nSTREAMS\r\n" + _bulk(self.replies)

    def new_request(self) -> bytes:
        """A request id of this process's own: ``<time>:<token>:<counter>``.

        The token and counter make it unique. The time in front (ms, fixed
        width, never behind this client's previous id) makes the ids of all
        clients sort by when they were sent: the daemon records each
        request under its id in one LMDB table, so the requests of one
        batch, sent at about the same time by many clients, have their
        records side by side (one page to write, not one per client), and
        the part of the table that the daemon looks up and writes stays
        small however many records it keeps.
        """
        if self.pid != _Process.pid:
            # A forked child: its parent goes on with the same counter, and a
            # request id the daemon has seen is answered, never applied again.
            self._new_token()
        # Racing threads may each keep their own (the counter alone makes ids unique).
        now_ms = self._last_ms = max(self._last_ms, int(time.time() * 1000))
        return b"%011x:%b:%d" % (now_ms, self.token, next(self._counter))

    def request(self, op: Op, timeout: float, **write: Any) -> tuple[bytes, dict[bytes, bytes]]:
        """A new request, as the fields of its stream entry (the writers send the same)."""
        request_id = self.new_request()
        writer = Writer(_HOST, self.pid, self.writer_name)
        return request_id, encode_request(
            request_id, self.token, self.store, op, timeout=timeout, writer=writer, **write
        )

    def take_reply(self, request_id: bytes, reply: Any) -> Reply | None:
        """The reply to `request_id` among a raw XREAD reply, or None."""
        if reply and len(reply) == 1:
            # The common reply, read without building dicts: one entry, ours, ok.
            # (A stream's entries are a map's value in RESP3, a pair's second in RESP2.)
            entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
            if len(entries) == 1:
                entry_id, flat = entries[0]
                if flat and flat[:4] == [b"id", request_id, b"status", b"ok"]:
                    self.last_reply_id = entry_id
                    return OK
        for entry_id, fields in stream_entries(reply):
            self.last_reply_id = entry_id
            if fields is not None and fields.get(b"id") == request_id:
                return Reply.from_fields(fields)
        return None

    def read_replies(self, block: int) -> bytes:
        """The XREAD that waits up to `block` ms for this writer's next replies, packed."""
        block_ms = b"%d" % block
        last = self.last_reply_id
        return b"%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
            self._packed_read,
            len(block_ms),
            block_ms,
            self._packed_streams,
            len(last),
            last,
        )

    def xadd(
        self,
        request_id: bytes,
        write: PackedWrite,
        remaining: float,
        *,
        skip_reply: bool = False,
        then: bytes = b"",
    ) -> bytes:
        """The XADD of request `request_id`, packed (RESP).

        Its timeout is the `remaining` seconds of the deadline: a resend
        after a lost connection keeps the request id (the daemon answers a
        duplicate from its record) and the original deadline. The fields
        are those of :func:`attempt_fields`, packed here for speed. With
        `skip_reply`, it follows ``CLIENT REPLY SKIP``; the packed commands
        `then` follow it (joined once: the value may be megabytes).
        """
        timeout_ms = _timeout_ms(remaining)
        start = b"%b*%d\r\n%b$2\r\nid\r\n$%d\r\n%b\r\n$7\r\ntimeout\r\n$%d\r\n%b\r\n" % (
            _SKIP_NEXT_REPLY if skip_reply else b"",
            self._xadd_length + write.field_count,
            self._packed_head,
            len(request_id),
            request_id,
            len(timeout_ms),
            timeout_ms,
        )
        return b"".join((start, write.packed, then))

    def write_plan(
        self, op: Op, key: bytes | None, write: PackedWrite, block_chunk: float
    ) -> _WritePlan:
        """Send one write and wait for its reply, as the steps of :meth:`RemoteWriter.write`.

        The drivers close the connection whenever the plan ends otherwise
        than with the reply (its replies may then be out of step).
        """
        deadline = time.monotonic() + self.timeout
        request_id = self.new_request()
        sent = ever_sent = resent = False
        # Whether an XADD of it may have run (the daemon may apply it); whether
        # reading its reply failed since (until a read succeeds); whether its
        # reply may be gone for good: the connection was lost, or the server
        # was loading its data (a restart, a failover), and a reply stream
        # lost with the server is not there for a later read to find; and
        # whether the server stalled while it took the XADD. Any of them
        # with the first: a timeout is no proof that it was not applied.
        maybe_added = unread = lost = stalled = False
        # Whether the next XADD asks for its reply (see skip_replies).
        confirmed = self.skip_replies is not True or len(write.packed) > _SKIP_REPLY_MAX_BYTES
        while True:
            # The clock that finds a stall starts when the request's timeout is
            # taken: a pause of this thread before the send (a long GC pass,
            # another thread holding the GIL) delays the request's stamp too.
            started = time.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                raise self.timed_out(key, op, unsure=maybe_added and (unread or lost or stalled))
            block_ms = max(1, int(min(remaining, block_chunk) * 1000))
            read = self.read_replies(block_ms)
            adds = not sent
            try:
                if sent:
                    (reply,) = yield _Exchange(read, 1, remaining)
                elif confirmed:
                    # The request and the wait for its reply: one write, one blocking read.
                    added, reply = yield _Exchange(
                        self.xadd(request_id, write, remaining, then=read), 2, remaining
                    )
                    checked(added)
                    maybe_added = True
                else:
                    (reply,) = yield _Exchange(
                        self.xadd(request_id, write, remaining, skip_reply=True, then=read),
                        1,
                        remaining,
                    )
                    maybe_added = True
                    if isinstance(reply, redis.ResponseError):
                        # Whose error is it? If Redis refused CLIENT itself (busy
                        # with a script, the user's rules changed), the XADD's
                        # reply comes too: out of step. Start again on a new
                        # connection, asking for the XADD's reply (the same id:
                        # applied once), and find out anew whether to skip.
                        self.skip_replies = None
                        sent, confirmed, ever_sent, unread = False, True, True, True
                        yield _RESET
                        yield _RETRY_DELAY
                        continue
                # From here the daemon may apply it: a failure means a resend.
                sent = ever_sent = True
                # How long the read may have blocked: its block if it came back
                # empty, else none (it returned entries, such as a stale reply
                # to an earlier write, as soon as the server ran it).
                allowed = block_ms / 1000 if reply is None else 0.0
                if adds and time.monotonic() - started > allowed + _STALL:
                    # The server answered late (it stalled, or the network did):
                    # it may have stamped the request late too, and then the
                    # daemon may apply it after the deadline.
                    stalled = True
                reply = checked(reply)
            except _Unsent as unsent:
                if isinstance(unsent.error, redis.ResponseError):
                    # Refused while connecting (selecting the database, say).
                    if not _busy(unsent.error):
                        raise self.refused(unsent.error, maybe_added) from unsent.error
                    lost = lost or (maybe_added and _restarted(unsent.error))
                    sent, confirmed = False, True
                    yield _RETRY_DELAY
                    continue
                if not ever_sent:
                    if not (resent or isinstance(unsent.error, redis.TimeoutError)):
                        # A connection the server closed while it was idle (its
                        # `timeout`, CLIENT KILL, a restart) fails the first send
                        # on a unix socket: once more, on a new connection. (Not
                        # after a timeout: the server hangs, the time is spent.)
                        resent = True
                        continue
                    # Nothing reached the server: fail at once, as a direct write does.
                    raise self.unreachable(unsent.error) from unsent.error
                # The connection was lost since an earlier sending: if its XADD
                # ran, the reply is lost with it, as if a read had failed.
                sent, confirmed = False, True
                unread = unread or maybe_added
                lost = lost or maybe_added
                yield _RETRY_DELAY
                continue
            except _TRANSIENT:
                # The send went out: its XADD (if any) may have run.
                sent, confirmed, ever_sent = False, True, True
                maybe_added = unread = lost = True
                yield _RETRY_DELAY
                continue
            except redis.ResponseError as error:
                if _busy(error):
                    # Nothing ran (or only the XADD): wait, and send or read again.
                    ever_sent = unread = True
                    lost = lost or (maybe_added and _restarted(error))
                    yield _RETRY_DELAY
                    continue
                raise self.refused(error, maybe_added) from error
            unread = False
            found = self.take_reply(request_id, reply)
            if found is not None:
                if self.skip_replies is None:
                    yield from self._probe_skip(block_chunk)
                return found
            if reply is None and not confirmed:
                # No reply within the wait: if the skipped XADD failed, the
                # caller must hear why, not time out. Send it again, asking.
                sent, confirmed = False, True

    def _probe_skip(self, time_left: float) -> Generator[_Step, list[Any], None]:
        """Find out :attr:`skip_replies` (a step of :meth:`write_plan`, after an accepted XADD).

        If the server skips the first PING's reply, the second's comes
        first. Otherwise (``CLIENT`` refused, not known, or the server busy)
        an error or the first PING's reply comes first, and how many more
        follow depends on why: the connection is closed rather than read
        on. Skipping stays off, for good unless the server was only busy.
        The probe takes `time_left` (s) at most, as an exchange of a write.
        """
        try:
            (first,) = yield _Exchange(_SKIP_PROBE, 1, time_left)
        except (_Unsent, *_TRANSIENT) as error:
            # The connection is closed (so not out of step): no skipping, to be
            # safe; unless the server was loading its data: ask again later.
            cause = error.error if isinstance(error, _Unsent) else error
            self.skip_replies = None if isinstance(cause, redis.BusyLoadingError) else False
            return
        self.skip_replies = first == _SKIP_PROBE_MARK
        if not self.skip_replies:
            if isinstance(first, redis.ResponseError) and _busy(first):
                self.skip_replies = None  # ask again after the next write
            yield _RESET

    def refused(
        self, error: redis.ResponseError, maybe_added: bool = False
    ) -> ReadOnlyError | redis.ResponseError:
        """The error for a command of the write that Redis refused with `error`.

        A refusal of the rights (``NOPERM``, a read-only replica) is
        :class:`ReadOnlyError`; any other (out of memory, say) is Redis's
        own error class, as a direct write would raise.
        """
        if maybe_added:
            # A sending of it was added: the daemon may apply it.
            detail = (
                "; the request itself reached the mirror (this or an earlier sending of it),"
                " so the write may be applied"
            )
        else:
            detail = ""
        if not _refused_rights(error):
            try:
                return type(error)(f"{error}{detail}")
            except (TypeError, ValueError):  # a class that parses its message (MOVED, ASK)
                return redis.ResponseError(f"{error}{detail}")
        if maybe_added:
            return ReadOnlyError(
                f"the mirror refused a command of the write request: {error}{detail}"
                " (see the README, 'Writers on other hosts', for the ACL rules clients need)"
            )
        return ReadOnlyError(
            f"the mirror refused the write request: {error} (see the README,"
            " 'Writers on other hosts', for the ACL rules clients need)"
        )

    def timed_out(self, key: bytes | None, op: Op, unsure: bool = False) -> WriteTimeoutError:
        what = op.value if key is None else f"{op.value} of {display_str(key)}"
        if unsure:
            # Added, and then its reply could not be read (the connection
            # failed, or the server was busy): the daemon may have applied it.
            return WriteTimeoutError(
                f"{what}: the request reached the mirror, but its reply could not be"
                f" read within {self.timeout:g} s (the Redis server failed, stalled or was"
                " busy); the write may have been applied"
            )
        return WriteTimeoutError(
            f"{what}: no reply from the log host's replicator within {self.timeout:g} s"
            " (is telstate-replicator --accept-writes running?); the request expires"
            " unapplied (unless the daemon or the mirror failed or stalled between applying"
            " it and replying: `telstate history` on the log host would show it)"
        )

    def unreachable(self, error: Exception) -> ConnectionError:
        return ConnectionError(f"could not send the write to the redis server: {error}")


def _writer_options(client: Any, control_db: int) -> tuple[dict[str, Any], float]:
    """Options for a writer's connection pool like `client`'s, and its longest XREAD BLOCK (s).

    A writer's plan tries again within the write's timeout: redis-py's
    retries (10 with backoff by default from redis-py 6) are turned off,
    as they would multiply its waits for a server that hangs.
    """
    kwargs = control_kwargs(client, control_db)
    kwargs.update(retry=None, retry_on_error=[], retry_on_timeout=False)
    socket_timeout = kwargs.get("socket_timeout")
    return kwargs, _BLOCK_CHUNK if not socket_timeout else min(_BLOCK_CHUNK, socket_timeout / 2)


def _hang_timeout(timeout: float) -> float:
    """The longest socket timeout of a writer's connections, for a write `timeout` (s).

    A writer never waits for the server without a time limit: a client
    without a socket timeout (``redis.Redis(host=...)`` as katsdptelstate's
    users make them with redis-py 5) would wait for ever for a Redis that
    hangs (or a network that drops everything), and one with a long one
    that long. The writer's connections
    get the write's `timeout` and a little more: as long as a healthy
    server may take to answer (its XREAD BLOCK, at most that), and as long
    as the whole send of a request may take (Python bounds a ``sendall``
    by the socket's timeout in all, however steadily it goes: a large
    value over a slow link), so such a write fails at most that long
    after its deadline.
    """
    return timeout + _SLACK


class RemoteWriter:
    """Writes to a store through its mirror: the write path of a sync RedisBackend on it.

    Parameters
    ----------
    client
        The backend's client (its connection options are reused, with the
        replicators' database).
    mirror_db, control_db
        The mirror's database and the replicators' database.
    store
        UUID (text) of the store, from the intake key.
    timeout
        Seconds to wait for each reply.
    writer_name
        Recorded in the events, with this host and process id.

    Raises
    ------
    ValueError
        If `timeout` is not in (0, :data:`MAX_TIMEOUT`].
    """

    def __init__(
        self,
        client: redis.Redis,
        mirror_db: int,
        control_db: int,
        store: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
    ) -> None:
        self._session = _Session(mirror_db, store, timeout, writer_name)
        kwargs, self._block = _writer_options(client, control_db)
        # (A client's own socket timeout, if shorter, still counts.)
        kwargs["socket_timeout"] = min(
            kwargs.get("socket_timeout") or math.inf, _hang_timeout(timeout)
        )
        # Connecting too (redis-py 8 gives redis.Redis(host=...) a 5 s connect timeout of its own).
        kwargs["socket_connect_timeout"] = min(
            kwargs.get("socket_connect_timeout") or math.inf, kwargs["socket_timeout"]
        )
        self._pool = redis.ConnectionPool(**kwargs)
        self._wire = Wire(self._pool)
        self._wire.check_closed = True
        self._lock = ProcessLock()

    def write(
        self,
        op: Op,
        key: bytes | None = None,
        *,
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float | None = None,
    ) -> bytes | None:
        """Send one write and wait for its outcome.

        Returns
        -------
        The existing value for a set that found one, else None.

        Raises
        ------
        ImmutableKeyError, InvalidTimestampError
            As a local write raises them.
        WriteTimeoutError
            If no reply came within the timeout (the write is not applied).
        ReadOnlyError
            If the store takes no writes (it became a follower).
        TelstateError
            If the log host refused the request, not applying it (its stream
            entry id was ahead of the Redis server's clock, or it was malformed).
        ConnectionError
            If the Redis server cannot be reached.
        """
        write = PackedWrite.of(
            op, key=key or b"", sub_key=sub_key, value=value, timestamp=timestamp
        )
        wire = self._wire
        with self._lock:
            plan = self._session.write_plan(op, key, write, self._block)
            try:
                step = next(plan)
                while True:
                    if isinstance(step, float):
                        time.sleep(step)
                        step = next(plan)
                        continue
                    if isinstance(step, _Reset):
                        with contextlib.suppress(Exception):  # best effort: it is closed
                            wire.reset()  # (connected again within the write's time left)
                        step = next(plan)
                        continue
                    packed, count = step.packed, step.replies
                    # No send or read may block past the deadline (and the slack).
                    wire.limit(step.time_left + _SLACK)
                    try:
                        if packed:
                            wire.send(packed)
                    except (*_TRANSIENT, redis.ResponseError) as error:  # the latter: connecting
                        step = plan.throw(_Unsent(error))
                        continue
                    try:
                        replies = wire.receive(count)
                    except _TRANSIENT as error:
                        step = plan.throw(error)
                        continue
                    step = plan.send(replies)
            except StopIteration as stop:
                reply: Reply = stop.value
            except BaseException:
                # Whatever was sent may still be answered: not for the next write.
                with contextlib.suppress(Exception):
                    wire.close()
                raise
        return reply.result()

    def close(self) -> None:
        """Close the writer's connections."""
        self._wire.close()
        self._pool.disconnect()


class AsyncRemoteWriter:
    """The asyncio form of :class:`RemoteWriter`, used by :class:`telstate.aio.redis.RedisBackend`.

    Parameters are those of :class:`RemoteWriter`, with a
    :class:`redis.asyncio.Redis` client.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        mirror_db: int,
        control_db: int,
        store: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        writer_name: str | None = None,
    ) -> None:
        self._session = _Session(mirror_db, store, timeout, writer_name)
        kwargs, self._block = _writer_options(client, control_db)
        socket_timeout = kwargs.get("socket_timeout")
        wire_limit = None
        if sys.version_info >= (3, 11):
            # redis.asyncio bounds each send by asyncio.wait_for, a task of
            # its own (and extra turns of the event loop) per send: about a
            # fifth of a remote write's CPU time. The wire bounds its sends
            # and reads itself, with asyncio.timeout (Python 3.11+): by the
            # client's socket timeout, and by the time left to the write
            # (see write), so a client without one never waits for ever.
            kwargs["socket_connect_timeout"] = (
                kwargs.get("socket_connect_timeout") or socket_timeout
            )
            kwargs["socket_timeout"] = None
            wire_limit = socket_timeout
        else:
            # Capped as the sync writer's (no asyncio.timeout to bound the wire),
            # connecting too.
            kwargs["socket_timeout"] = min(socket_timeout or math.inf, _hang_timeout(timeout))
            kwargs["socket_connect_timeout"] = min(
                kwargs.get("socket_connect_timeout") or math.inf, kwargs["socket_timeout"]
            )
        self._wire = AsyncWire(redis.asyncio.ConnectionPool(**kwargs), wire_limit)
        self._lock = asyncio.Lock()

    async def write(
        self,
        op: Op,
        key: bytes | None = None,
        *,
        sub_key: bytes = b"",
        value: bytes = b"",
        timestamp: float | None = None,
    ) -> bytes | None:
        """Send one write and wait for its outcome (see :meth:`RemoteWriter.write`)."""
        write = PackedWrite.of(
            op, key=key or b"", sub_key=sub_key, value=value, timestamp=timestamp
        )
        wire = self._wire
        async with self._lock:
            plan = self._session.write_plan(op, key, write, self._block)
            try:
                step = next(plan)
                while True:
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                        step = next(plan)
                        continue
                    if isinstance(step, _Reset):
                        with contextlib.suppress(Exception):  # best effort: it is closed
                            await wire.reset()
                        step = next(plan)
                        continue
                    packed, count, limit = step.packed, step.replies, step.time_left + _SLACK
                    try:
                        if packed:
                            await wire.send(packed, limit)
                    except (*_TRANSIENT, redis.ResponseError) as error:  # the latter: connecting
                        step = plan.throw(_Unsent(error))
                        continue
                    try:
                        replies = await wire.receive(count, limit)
                    except _TRANSIENT as error:
                        step = plan.throw(error)
                        continue
                    step = plan.send(replies)
            except StopIteration as stop:
                reply: Reply = stop.value
            except BaseException as error:
                # Whatever was sent may still be answered: not for the next
                # write (cancelled too). Shielded, so that the close completes.
                if not isinstance(error, GeneratorExit):
                    with contextlib.suppress(Exception):
                        await asyncio.shield(wire.reset())
                raise
        return reply.result()

    async def close(self) -> None:
        """Close the writer's connections."""
        await self._wire.close()
