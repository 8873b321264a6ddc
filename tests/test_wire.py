"""telstate.remote.Wire against a real redis-server: its own socket I/O gives what redis-py gives.

The wire lets redis-py connect, then sends on the socket and parses the
replies itself (see the class docstring): replies split across reads,
errors among good replies, a connection closed under it, timeouts (kept
by the kernel, or by Python where the kernel cannot), a fork, and what
its ``fileno`` means.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys

import hiredis
import pytest
import redis

from telstate.remote import Wire

from .servers import RedisServer


@pytest.fixture
def server(tmp_path):
    with RedisServer(directory=tmp_path) as server:
        yield server


def _pool(server: RedisServer, **kwargs) -> redis.ConnectionPool:
    return redis.ConnectionPool(
        path=server.socket, connection_class=redis.UnixDomainSocketConnection, **kwargs
    )


@pytest.fixture(params=["kernel", "python"])
def timeouts(request, monkeypatch):
    """Who keeps the socket's timeout: the kernel (Linux, a plain socket) or Python (elsewhere)."""
    if request.param == "python":
        monkeypatch.setattr(sys, "platform", "darwin")
    return request.param


def _client_id(wire: Wire) -> int:
    (client_id,) = wire.call((b"CLIENT", b"ID"))
    return int(client_id)


def test_replies_split_across_reads(server):
    big = os.urandom(8 << 20)
    server.client().set(b"big", big)
    wire = Wire(_pool(server))
    # Three replies, two of them 8 MB: each read takes at most 64 KB.
    assert wire.call((b"GET", b"big"), (b"PING",), (b"GET", b"big")) == [big, b"PONG", big]
    assert wire.call((b"STRLEN", b"big")) == [len(big)]
    wire.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_replies_and_errors_are_what_redis_py_reads(server, protocol):
    server.client().hset(b"h", mapping={b"a": b"1", b"b": b"2"})
    server.client().set(b"s", b"text")
    commands = [
        (b"HGETALL", b"h"),
        (b"INCR", b"s"),  # not an integer: ResponseError
        (b"EVALSHA", b"0" * 40, 0),  # NoScriptError
        (b"GET", b"nothing"),
        (b"EVAL", b"return {1, 'two', false}", 0),
        (b"XADD", b"s", b"*", b"f", b"v"),  # WRONGTYPE
        (b"ZSCORE", b"nothing", b"m"),
        (b"GET", b"s"),
    ]
    wire = Wire(_pool(server, protocol=protocol))
    replies = wire.call(*commands)
    connection = redis.UnixDomainSocketConnection(path=server.socket, protocol=protocol)
    for command, reply in zip(commands, replies, strict=True):
        connection.send_packed_command([hiredis.pack_command(command)])
        try:
            expected = connection.read_response()
        except redis.ResponseError as error:
            expected = error
        if isinstance(expected, redis.ResponseError):
            assert type(reply) is type(expected), command
            assert str(reply) == str(expected), command
        else:
            assert reply == expected, command
    assert type(replies[2]) is redis.exceptions.NoScriptError
    # The failed commands cost nothing else: the connection goes on.
    assert wire.call((b"PING",)) == [b"PONG"]
    connection.disconnect()
    wire.close()


def test_an_error_inside_a_reply_stays_in_its_place(server):
    server.client().set(b"s", b"text")
    wire = Wire(_pool(server))
    *queued, executed = wire.call(
        (b"MULTI",), (b"SET", b"k", b"v"), (b"INCR", b"s"), (b"GET", b"k"), (b"EXEC",)
    )
    assert queued == [b"OK", b"QUEUED", b"QUEUED", b"QUEUED"]
    assert executed[0] == b"OK" and executed[2] == b"v"
    assert type(executed[1]) is redis.ResponseError
    wire.close()


def test_decoded_replies_when_the_pool_decodes(server):
    wire = Wire(_pool(server, decode_responses=True))
    assert wire.call((b"ECHO", "é".encode()), (b"PING",)) == ["é", "PONG"]
    wire.close()


def _wait_for_output_pending(server: RedisServer, client_id: int) -> None:
    """Until the server holds part of a reply to `client_id` it could not write yet."""
    watcher = server.client()
    while True:
        (entry,) = watcher.client_list(client_id=[client_id])
        if int(entry["omem"]) > 0:
            return


def test_a_connection_closed_in_the_middle_of_a_reply(server):
    server.client().set(b"big", os.urandom(8 << 20))
    wire = Wire(_pool(server))
    client_id = _client_id(wire)
    wire.send(hiredis.pack_command((b"GET", b"big")))
    # The socket's buffers hold part of the reply, the server the rest: killed then.
    _wait_for_output_pending(server, client_id)
    server.client().client_kill_filter(_id=client_id)
    with pytest.raises(redis.ConnectionError) as raised:
        wire.receive(1)
    assert raised.value.__cause__ is None  # raised as it is, not as its own cause
    assert wire.fileno() is None  # closed
    assert wire.call((b"PING",)) == [b"PONG"]  # and open again on the next call
    assert _client_id(wire) != client_id
    wire.close()


def test_a_server_stopped_while_the_wire_waits(tmp_path):
    server = RedisServer(directory=tmp_path).start()
    try:
        wire = Wire(_pool(server))
        wire.send(hiredis.pack_command((b"BLPOP", b"nothing", 0)))
        server.stop()
        with pytest.raises(redis.ConnectionError):
            wire.receive(1)
        with pytest.raises(redis.ConnectionError):
            wire.call((b"PING",))  # cannot connect
        server.start()
        assert wire.call((b"PING",)) == [b"PONG"]
        wire.close()
    finally:
        server.cleanup()


def test_a_read_longer_than_the_socket_timeout(server, timeouts):
    pool = _pool(server, socket_timeout=0.2)
    wire = Wire(pool)
    assert wire.call((b"PING",)) == [b"PONG"]
    with pytest.raises(redis.TimeoutError) as raised:
        wire.call((b"BLPOP", b"nothing", 0))
    assert isinstance(raised.value.__cause__, OSError)  # the socket's own
    assert wire.fileno() is None  # closed: its reply would be out of step
    assert wire.call((b"PING",)) == [b"PONG"]
    wire.close()
    assert not pool._in_use_connections


def test_a_send_longer_than_the_socket_timeout(server, timeouts):
    wire = Wire(_pool(server, socket_timeout=0.2))
    assert wire.call((b"PING",)) == [b"PONG"]
    os.kill(server.process.pid, signal.SIGSTOP)  # reads nothing: the socket's buffers fill
    try:
        with pytest.raises(redis.TimeoutError):
            wire.send(hiredis.pack_command((b"SET", b"k", b"x" * (32 << 20))))
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert wire.fileno() is None
    assert wire.call((b"PING",)) == [b"PONG"]
    wire.close()


def test_a_due_health_check_is_redis_pys(server, timeouts):
    """When its health check is due, redis-py sends (its PING first), then the wire again."""
    wire = Wire(_pool(server, health_check_interval=30, socket_timeout=0.2))
    client_id = _client_id(wire)
    server.client().client_kill_filter(_id=client_id)
    wire._connection.next_health_check = 0  # due: its PING finds the connection killed
    with pytest.raises(redis.ConnectionError):
        wire.call((b"PING",))
    assert wire.fileno() is None
    assert _client_id(wire) != client_id
    pings = server.client().info("commandstats")["cmdstat_ping"]["calls"]
    wire._connection.next_health_check = 0
    assert wire.call((b"ECHO", b"x")) == [b"x"]
    assert server.client().info("commandstats")["cmdstat_ping"]["calls"] == pings + 1
    # A health check on the same socket leaves it to the wire, timeout and all.
    wire._connection.next_health_check = 0
    assert wire.call((b"PING",)) == [b"PONG"]
    with pytest.raises(redis.TimeoutError):
        wire.call((b"BLPOP", b"nothing", 0))
    wire.close()


def test_after_a_fork_the_child_has_a_connection_of_its_own(server):
    wire = Wire(_pool(server))
    parent_id = _client_id(wire)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            child_id = _client_id(wire)
            wire.close()  # leaves the parent's connection alone
            os.write(write_end, b"%d" % child_id)
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = int(os.read(read_end, 100))
    os.close(read_end)
    assert os.waitpid(pid, 0)[1] == 0
    assert child_id != parent_id
    assert _client_id(wire) == parent_id  # the parent's connection goes on
    wire.close()


def test_fileno_shows_replies_not_yet_read_from_the_socket(server):
    wire = Wire(_pool(server))
    poll = select.poll()
    wire.send(hiredis.pack_command((b"BLPOP", b"list", 0)))
    poll.register(wire.fileno(), select.POLLIN)
    assert poll.poll(0) == []  # no reply yet
    server.client().rpush(b"list", b"item")
    assert poll.poll(10_000)  # readable once the reply comes
    assert wire.receive(1) == [[b"list", b"item"]]
    # Two replies written at once: the first read takes both. The second is
    # the wire's then, not the socket's: it does not show, and is not lost.
    wire.send(hiredis.pack_command((b"ECHO", b"one")) + hiredis.pack_command((b"ECHO", b"two")))
    assert wire.receive(1) == [b"one"]
    assert poll.poll(0) == []
    assert wire.receive(1) == [b"two"]
    wire.close()
    assert wire.fileno() is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is Python 3.11+")
def test_an_async_send_cut_off_by_its_limit_never_reaches_the_server(server):
    # A send that raises must leave the server without the command: the
    # writer then says "not written". redis-py closes the connection on a
    # timeout, and a close still writes out what was buffered; the wire
    # aborts it instead.
    import asyncio
    import threading
    import time

    import redis.asyncio

    from telstate.remote import AsyncWire

    def stall() -> None:
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(3.0)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool(
            connection_class=redis.asyncio.UnixDomainSocketConnection, path=server.socket
        )
        wire = AsyncWire(pool)
        await wire.send(hiredis.pack_command(("PING",)))
        assert await wire.receive(1) == [b"PONG"]
        stalled = threading.Thread(target=stall)
        stalled.start()
        await asyncio.sleep(0.2)
        packed = hiredis.pack_command(("XADD", "s", "*", "value", b"x" * (64 << 20)))
        with pytest.raises(redis.TimeoutError):
            await wire.send(packed, limit=0.5)
        await asyncio.to_thread(stalled.join)
        # The loop runs on, the server again: whatever was still to go has gone.
        await asyncio.sleep(1.5)
        assert redis.Redis(unix_socket_path=server.socket).xlen("s") == 0
        await wire.close()
        await pool.disconnect()

    asyncio.run(main())


def test_an_async_send_after_a_reset_connects_before_it_sends(server):
    # So that the transport it aborts on a failure is the one the send writes
    # to (redis-py would connect inside its send, out of the wire's sight).
    import asyncio

    import redis.asyncio

    from telstate.remote import AsyncWire

    async def main() -> list[bool]:
        pool = redis.asyncio.ConnectionPool(
            connection_class=redis.asyncio.UnixDomainSocketConnection, path=server.socket
        )
        wire = AsyncWire(pool)
        await wire.send(hiredis.pack_command(("PING",)))
        assert await wire.receive(1) == [b"PONG"]
        await wire.reset()
        connection = wire._connection
        connected: list[bool] = []
        send = connection.send_packed_command

        async def watched(*args, **kwargs):
            connected.append(connection.is_connected)
            return await send(*args, **kwargs)

        connection.send_packed_command = watched
        await wire.send(hiredis.pack_command(("PING",)), limit=5.0)
        assert await wire.receive(1) == [b"PONG"]
        await wire.close()
        await pool.disconnect()
        return connected

    connected = asyncio.run(main())
    assert connected and all(connected)


class _GarblingServer:
    """A TCP server on loopback that answers every command OK, but `trigger` with a non-RESP byte.

    What a proxy, a middlebox or another service on the port might send.
    """

    def __init__(self, trigger: bytes) -> None:
        import socket
        import threading

        self.trigger = trigger
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        reader = hiredis.Reader()
        with connection:
            while data := connection.recv(65536):
                reader.feed(data)
                while (command := reader.gets()) is not False:
                    garbled = any(self.trigger in part for part in command)
                    connection.sendall(b"?garbled\r\n" if garbled else b"+OK\r\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def garbling():
    server = _GarblingServer(b"GARBLE")
    yield server
    server.close()


def test_a_reply_that_is_not_resp_is_a_lost_connection(garbling):
    # Not redis-py's InvalidResponse, which no caller of the wire expects: the
    # connection is out of step (closed), and the next call opens a new one.
    wire = Wire(redis.ConnectionPool(host="127.0.0.1", port=garbling.port, protocol=2))
    assert wire.call((b"ECHO", b"fine")) == [b"OK"]
    with pytest.raises(redis.ConnectionError, match="not a Redis reply"):
        wire.call((b"ECHO", b"GARBLE"))
    assert wire.fileno() is None
    assert wire.call((b"ECHO", b"fine")) == [b"OK"]
    wire.close()


def test_an_async_reply_that_is_not_resp_is_a_lost_connection(garbling):
    import asyncio

    import redis.asyncio

    from telstate.remote import AsyncWire

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool(host="127.0.0.1", port=garbling.port, protocol=2)
        wire = AsyncWire(pool)
        await wire.send(hiredis.pack_command((b"ECHO", b"fine")))
        assert await wire.receive(1) == [b"OK"]
        await wire.send(hiredis.pack_command((b"ECHO", b"GARBLE")))
        with pytest.raises(redis.ConnectionError, match="not a Redis reply"):
            await wire.receive(1)
        await wire.send(hiredis.pack_command((b"ECHO", b"fine")))
        assert await wire.receive(1) == [b"OK"]
        await wire.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_remote_write_answered_with_garbage_times_out_unsure(garbling, kind):
    # The XADD went out and its answer is unreadable: as a lost connection,
    # the writer sends it again until its time runs out, then says it may
    # have been applied (a documented error, not a raw redis-py one).
    import asyncio
    import time

    import redis.asyncio

    from telstate.errors import WriteTimeoutError
    from telstate.log import Op
    from telstate.remote import AsyncRemoteWriter, RemoteWriter

    garbling.trigger = b"XADD"
    store = "00000000-0000-0000-0000-000000000000"
    start = time.monotonic()
    with pytest.raises(WriteTimeoutError, match="may have been applied"):
        if kind == "sync":
            client = redis.Redis(host="127.0.0.1", port=garbling.port, protocol=2)
            writer = RemoteWriter(client, 0, 15, store, timeout=1.0)
            try:
                writer.write(Op.DELETE, b"x")
            finally:
                writer.close()
        else:

            async def write() -> None:
                client = redis.asyncio.Redis(host="127.0.0.1", port=garbling.port, protocol=2)
                writer = AsyncRemoteWriter(client, 0, 15, store, timeout=1.0)
                try:
                    await writer.write(Op.DELETE, b"x")
                finally:
                    await writer.close()

            asyncio.run(write())
    assert time.monotonic() - start < 3.0


class _TlsProxy:
    """A TLS front (on loopback) to a redis-server's unix socket; it can drop every connection."""

    def __init__(self, server: RedisServer) -> None:
        import socket
        import ssl
        import threading

        here = os.path.join(os.path.dirname(__file__), "tls")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(
            os.path.join(here, "test-cert.pem"), os.path.join(here, "test-key.pem")
        )
        self.server = server
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client = self.context.wrap_socket(self.listener.accept()[0], server_side=True)
            except OSError:
                if self.listener.fileno() < 0:
                    return
                continue
            redis_side = socket.socket(socket.AF_UNIX)
            redis_side.connect(self.server.socket)
            self.open += [client, redis_side]
            for source, sink in ((client, redis_side), (redis_side, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def drop_all(self) -> None:
        import socket

        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.open.clear()

    def close(self) -> None:
        self.listener.close()
        self.drop_all()


def test_a_tls_connection_the_server_closed_is_made_anew_before_a_send(server):
    # Found by review: a writer's wire peeked at its socket (MSG_PEEK), which a
    # TLS socket refuses: ValueError out of every write after the server closed
    # an idle connection (its `timeout`, a restart, CLIENT KILL).
    import time

    proxy = _TlsProxy(server)
    try:
        pool = redis.ConnectionPool(
            connection_class=redis.SSLConnection,
            host="127.0.0.1",
            port=proxy.port,
            ssl_cert_reqs="none",
            socket_timeout=5,
        )
        wire = Wire(pool)
        wire.check_closed = True
        for _ in range(3):
            assert wire.call((b"PING",)) == [b"PONG"]
        proxy.drop_all()
        time.sleep(0.2)
        assert wire.call((b"PING",)) == [b"PONG"]  # (on a new connection)
        wire.close()
        pool.disconnect()
    finally:
        proxy.close()


def test_a_connection_made_again_after_a_reset_keeps_the_limit(server):
    # Found by review: after close(), the pool connected anew within its own
    # timeouts (3 s here), not the limit: a write that starts again on a new
    # connection could overrun its deadline by a whole socket timeout.
    import time

    pool = _pool(server, socket_timeout=3.0, socket_connect_timeout=3.0)
    wire = Wire(pool)
    wire.check_closed = True
    assert wire.call((b"PING",)) == [b"PONG"]
    wire.reset()
    wire.limit(0.3)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            wire.call((b"PING",))
        assert time.monotonic() - start < 2.0
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    wire.limit(None)
    assert wire.call((b"PING",)) == [b"PONG"]
    wire.close()
