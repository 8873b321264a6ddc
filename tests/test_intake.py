"""The write intake step by step, in-process, against a real redis-server.

The mirror's progress is given to :meth:`Intake.step` by hand, so a test
can hold replies back and "kill" the intake between its commit and its
reply (by dropping it without acknowledging anything).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from replicator.intake import CLOCK_TOLERANCE_MS, GROUP, Intake, IntakeState
from telstate.encoding import encode_value
from telstate.errors import ReadOnlyError, StoreError, TelstateError
from telstate.lmdb import LmdbBackend, make_follower
from telstate.log import Op
from telstate.redis import MIRROR_CURSOR_DB
from telstate.remote import (
    InvalidRequest,
    Reply,
    Wire,
    decode_request,
    intake_key,
    reply_stream_key,
)
from tests.servers import RedisServer


@pytest.fixture
def server(tmp_path):
    (tmp_path / "redis").mkdir()
    with RedisServer(directory=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def backend(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none")
    yield backend
    backend.close()


class Client:
    """Sends requests as telstate's RemoteWriter does, and reads the replies by hand."""

    def __init__(self, server: RedisServer, store: str) -> None:
        from telstate.remote import _Session

        self.session = _Session(0, store, 10.0, "test")
        self.redis = server.client(db=MIRROR_CURSOR_DB)

    def send(self, op: Op, timeout: float = 10.0, entry_id: bytes = b"*", **write) -> bytes:
        request_id, fields = self.session.request(op, timeout, **write)
        self.redis.xadd(self.session.requests, fields, id=entry_id)
        return request_id

    def replies(self) -> dict[bytes, Reply]:
        found = {}
        for _, entries in self.redis.xread({self.session.replies: b"0"}) or ():
            for _, fields in entries:
                found[fields[b"id"]] = Reply.from_fields(fields)
        return found


class StuckMirror:
    """A mirror that holds the events up to a given seq, and moves no further."""

    promotion = b""  # none recorded

    def __init__(self, seq: int | None) -> None:
        self.seq = seq

    def catch_up(self, seq: int, then=None, events=()) -> tuple[int | None, object]:
        return self.seq, None

    def send_ahead(self, seq: int, then, events) -> int | None:
        return None  # never: it projects nothing

    def collect(self, ticket: int) -> tuple[int | None, object]:
        raise AssertionError("nothing was sent ahead")

    def fileno(self) -> int | None:
        return None

    def hold(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


def show(intake: Intake, mirror_seq: int | None) -> None:
    """Make the mirror's cursor in Redis say what a mirror at `mirror_seq` says.

    (The replies' script checks it: see test_the_reply_script_sends_nothing...)
    """
    state = "rebuilding" if mirror_seq is None else "ready"
    with contextlib.suppress(redis.ConnectionError):
        intake.client.hset(
            intake._cursor,
            mapping={"store": intake.store, "seq": mirror_seq or 0, "state": state},
        )


def run(intake: Intake, mirror_seq: int | None, steps: int = 5) -> None:
    """Step the intake as the daemon does, waiting (briefly) for requests when idle.

    The mirror is at `mirror_seq`, by the intake's sink and in Redis.
    """
    show(intake, mirror_seq)
    for _ in range(steps):
        if intake.step(StuckMirror(mirror_seq)).idle:
            intake.wait_for_requests(0.05)


def serving(server: RedisServer, backend: LmdbBackend) -> tuple[Any, Any, Intake]:
    """A real mirror (its sink, shared as the daemon does) and an intake serving it, idle."""
    import threading

    from replicator.daemon import SharedSink
    from replicator.redis_sink import RedisSink

    sink = RedisSink(backend, server.url + "?db=0", stop=threading.Event())
    mirror = SharedSink(sink)
    while sink.seq is None:
        mirror.step()
    intake = Intake(backend, server.url + "?db=0")
    while not intake.step(mirror).idle:  # connect, read the (empty) pending list
        pass
    return sink, mirror, intake


@pytest.mark.parametrize("reconnects", [1, 3])
def test_replies_owed_across_a_reconnect_are_owed_once(server, backend, reconnects):
    # Requests committed whose replies wait for the mirror stay on the
    # pending list; a reconnect reads that list again: they are neither
    # applied nor owed a second time, and the list is read onwards (once),
    # not from its start at every step.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", backoff=(0.0, 0.0))
    sent = [client.send(Op.SET_IMMUTABLE, key=b"k%d" % i, value=encode_value(i)) for i in range(3)]
    run(intake, mirror_seq=0)  # committed; the mirror does not show them
    assert len(intake._owed) == 3
    for _ in range(reconnects):
        intake._fail("a simulated failure")
        for _ in range(20):
            intake.step(StuckMirror(0))
    assert intake.state == IntakeState.SERVE and not intake._backlog
    assert [owed.request_id for owed in intake._owed] == sent
    assert backend.last_seq == 3
    run(intake, mirror_seq=3)
    assert client.replies() == {request: Reply(b"ok") for request in sent}
    assert (
        server.client(db=MIRROR_CURSOR_DB).xpending(client.session.requests, GROUP)["pending"] == 0
    )
    intake.close()


def test_requests_wait_while_the_mirror_is_incomplete(server, backend):
    # A mirror being rebuilt (or whose Redis failed) could not show a write
    # committed now, perhaps not before its writer gives up and is told it
    # was not written: the requests wait, and are applied once it is back.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    for _ in range(5):
        step = intake.step(StuckMirror(None))
        if step.idle:
            intake.wait_for_requests(0.05)
    assert step.wait > 0 and not step.idle  # (the daemon looks again shortly)
    assert backend.last_seq == 0 and not intake.owes_replies
    run(intake, mirror_seq=0)
    assert backend.last_seq == 1
    run(intake, mirror_seq=1)
    assert client.replies() == {request: Reply(b"ok")}
    intake.close()


def test_requests_expire_while_the_mirror_is_incomplete(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1), timeout=0.3)
    for _ in range(5):
        if intake.step(StuckMirror(None)).idle:
            intake.wait_for_requests(0.05)
    assert intake._holding  # read, and waiting
    time.sleep(0.5)
    run(intake, mirror_seq=0)
    assert backend.last_seq == 0  # never applied
    assert client.replies()[request].error == b"expired"
    intake.close()


def test_a_later_chunk_of_a_batch_is_judged_by_the_time_it_is_committed(
    server, backend, monkeypatch
):
    # A batch too big for one transaction is committed in chunks: a request
    # whose time ran out while the chunks before it were committed is not
    # applied (its writer may be about to hear that it was not written).
    import replicator.intake

    applied = replicator.intake.apply_requests
    calls = []

    def slow_first(backend, chunk, now_ms, committed):
        calls.append(len(chunk))
        if len(calls) == 1:
            time.sleep(1.2)  # a slow commit
        return applied(backend, chunk, now_ms, committed)

    monkeypatch.setattr(replicator.intake, "apply_requests", slow_first)
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", batch_bytes=1)  # a chunk per request
    first = client.send(Op.SET_IMMUTABLE, key=b"a", value=encode_value(1))
    late = client.send(Op.SET_IMMUTABLE, key=b"b", value=encode_value(2), timeout=1.0)
    run(intake, mirror_seq=1)
    assert calls == [1, 1]
    replies = client.replies()
    assert replies[first] == Reply(b"ok")
    assert replies[late].error == b"expired"
    assert [event.key for event in backend.events()] == [b"a"]
    intake.close()


def test_a_request_that_expires_while_the_commit_waits_for_the_write_lock_is_not_applied(
    server, backend
):
    """Found by a soak: a local writer on the log host held the store's write lock.

    The request was judged fresh before the intake's transaction began, and
    applied once the lock was free, after its writer had been told "not written".
    """
    import threading

    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    run(intake, mirror_seq=0, steps=2)  # connected, the pending list read
    late = client.send(Op.SET_IMMUTABLE, key=b"late", value=encode_value(1), timeout=1.0)
    locked, release = threading.Event(), threading.Event()

    def local_writer() -> None:
        with backend.write() as wtxn:
            wtxn.set_immutable(b"local", encode_value(0))
            locked.set()
            release.wait(10)  # a long local transaction

    holder = threading.Thread(target=local_writer)
    holder.start()
    assert locked.wait(10)
    # Released after the request's 1 s timeout has passed.
    threading.Timer(1.5, release.set).start()
    run(intake, mirror_seq=1)
    holder.join(10)
    assert [event.key for event in backend.events()] == [b"local"]
    assert client.replies()[late].error == b"expired"
    intake.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_daemon_whose_intake_fails_stops_with_the_reason(server, backend, monkeypatch, caplog):
    """Found by a soak: the daemon exited with status 0 (a supervisor's
    restart-on-failure would not restart it); `failure` makes it 1."""
    import threading

    from replicator.daemon import Daemon
    from replicator.redis_sink import RedisSink

    sink = RedisSink(backend, server.url + "?db=0", stop=threading.Event())
    intake = Intake(backend, server.url + "?db=0")

    def broken(mirror: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(intake, "step", broken)
    daemon = Daemon(backend, sink, None, intake)
    caplog.set_level(logging.ERROR, logger="replicator.daemon")
    runner = threading.Thread(target=daemon.run)
    runner.start()
    runner.join(30)
    assert not runner.is_alive()
    assert daemon.failure is not None and "a bug" in daemon.failure
    assert "the write intake failed" in caplog.text


def test_killed_between_commit_and_reply_answers_on_restart(server, backend):
    client = Client(server, str(backend.uuid))
    first = Intake(backend, server.url + "?db=0")
    won = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    lost = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    run(first, mirror_seq=0)  # committed, but the mirror "never" shows it: no reply
    assert first.owes_replies
    assert backend.last_seq == 1
    assert client.replies() == {}
    first.client.close()  # killed: nothing acknowledged, nothing replied

    second = Intake(backend, server.url + "?db=0")
    run(second, mirror_seq=0)
    assert client.replies() == {}  # the mirror is behind the commit: still no reply
    run(second, mirror_seq=1)
    replies = client.replies()
    assert replies[won] == Reply(b"ok")
    assert replies[lost] == Reply(b"exists", encode_value(1))
    assert backend.last_seq == 1  # applied once
    pending = second.client.xpending(second._stream, "telstate-replicator")
    assert pending["pending"] == 0
    assert second.client.xlen(second._stream) == 0
    second.close()


def test_requests_leave_the_stream_only_with_their_replies(server, backend, monkeypatch):
    # The replies' script retires the requests it answers in slices (one
    # XACK and one XDEL each): none before its reply goes out, all of them
    # once it has; the stream holds only requests still to be answered.
    import replicator.intake

    monkeypatch.setattr(replicator.intake, "RETIRE_SLICE", 2)
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    sent = [
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(i), timestamp=float(i + 1))
        for i in range(7)
    ]
    run(intake, mirror_seq=0)  # committed, but the mirror does not show them yet
    assert backend.last_seq == 7
    assert client.replies() == {}
    assert client.redis.xlen(intake._stream) == 7
    assert client.redis.xpending(intake._stream, "telstate-replicator")["pending"] == 7
    run(intake, mirror_seq=7)
    assert client.replies() == {request: Reply(b"ok") for request in sent}
    assert client.redis.xlen(intake._stream) == 0
    assert client.redis.xpending(intake._stream, "telstate-replicator")["pending"] == 0
    intake.close()


def test_expired_request_is_never_applied(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    # Sent (by the id the server would have given it) in 1970, with a 10 s timeout.
    stale = client.send(
        Op.ADD_MUTABLE, entry_id=b"1-1", key=b"s", value=encode_value(1), timestamp=1.0
    )
    fresh = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(2), timestamp=2.0)
    run(intake, mirror_seq=0)
    run(intake, mirror_seq=1)
    replies = client.replies()
    assert replies[stale].error == b"expired"
    assert replies[fresh] == Reply(b"ok")
    assert [event.value for event in backend.events()] == [encode_value(2)]
    intake.close()


def server_ms(intake: Intake) -> int:
    seconds, micros = intake.client.time()
    return seconds * 1000 + micros // 1000


def test_requests_stamped_ahead_of_the_servers_clock_are_refused_and_the_stream_made_anew(
    server, backend, caplog
):
    # A client with XADD rights picks an id a year ahead (found by review):
    # Redis stamps every later request with that time, so a request waiting
    # while the daemon is down would never look expired.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    future = server_ms(intake) + 365 * 86400 * 1000
    chosen = client.send(
        Op.SET_IMMUTABLE, entry_id=b"%d-0" % future, key=b"junk", value=encode_value(0)
    )
    stamped = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    assert [entry_id for entry_id, _ in client.redis.xrange(intake._stream)] == [
        b"%d-0" % future,
        b"%d-1" % future,
    ]
    with caplog.at_level(logging.WARNING, "replicator.intake"):
        run(intake, mirror_seq=0)
    replies = client.replies()
    assert {replies[chosen].error, replies[stamped].error} == {b"clock"}
    with pytest.raises(TelstateError, match="not applied.*ahead of the Redis server's clock"):
        replies[stamped].result()
    assert backend.last_seq == 0
    assert "made anew" in caplog.text
    # The stream is new: the server stamps its own time again, and writes are applied.
    assert client.redis.xlen(intake._stream) == 0
    after = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    ((entry_id, _),) = client.redis.xrange(intake._stream)
    assert int(entry_id.split(b"-")[0]) <= server_ms(intake)
    run(intake, mirror_seq=1)
    assert client.replies()[after] == Reply(b"ok")
    assert [event.value for event in backend.events()] == [encode_value(2)]
    assert backend.request_records([chosen, stamped])[1].error == b"clock"
    intake.close()


def test_a_request_sent_while_refusals_are_made_is_refused_too_never_lost(
    server, backend, monkeypatch
):
    # A writer sends (stamped ahead too) after the daemon read the batch it
    # refuses, before the stream is made anew: the stream is kept until that
    # request is refused as well.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    future = server_ms(intake) + 60_000
    sent = [client.send(Op.SET_IMMUTABLE, entry_id=b"%d-0" % future, key=b"a", value=b"\xff\x01")]
    process = Intake._process

    def racing(self: Intake, *args: Any) -> int:
        processed = process(self, *args)
        if len(sent) == 1:
            sent.append(client.send(Op.SET_IMMUTABLE, key=b"b", value=encode_value(1)))
        return processed

    monkeypatch.setattr(Intake, "_process", racing)
    run(intake, mirror_seq=0, steps=1)
    assert client.replies().keys() <= {sent[0]}
    assert client.redis.xlen(intake._stream) == 1  # the late request: kept
    run(intake, mirror_seq=0)
    replies = client.replies()
    assert [replies[request].error for request in sent] == [b"clock", b"clock"]
    assert backend.last_seq == 0
    assert client.redis.xinfo_stream(intake._stream)["last-generated-id"] == b"0-0"  # anew
    intake.close()


def test_a_writer_that_keeps_sending_does_not_keep_the_stream_ahead(server, backend, monkeypatch):
    # A request sent during every batch would keep the stream for ever (never
    # only refused requests in it): after RENEW_TRIES tries it is made anew
    # all the same (a request then dropped was never applied), and the
    # writer's next requests are applied.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    future = server_ms(intake) + 3_600_000
    sent = [client.send(Op.SET_IMMUTABLE, entry_id=b"%d-0" % future, key=b"a", value=b"\x01")]
    process = Intake._process

    def steady(self: Intake, *args: Any) -> int:
        processed = process(self, *args)
        sent.append(
            client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(0), timestamp=len(sent))
        )
        return processed

    monkeypatch.setattr(Intake, "_process", steady)
    run(intake, mirror_seq=0, steps=20)
    last = client.redis.xinfo_stream(intake._stream)["last-generated-id"]
    assert int(last.split(b"-")[0]) <= server_ms(intake)  # anew
    replies = client.replies()
    errors = [replies[request].error for request in sent if request in replies]
    assert errors and set(errors) == {b"clock"}
    assert backend.last_seq == 0
    monkeypatch.undo()
    after = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    run(intake, mirror_seq=1)
    assert client.replies()[after] == Reply(b"ok")
    intake.close()


def test_refusals_ready_go_out_while_requests_wait_for_the_mirror(server, backend):
    # A refusal needs no mirror: one ready when requests start to wait for an
    # incomplete mirror goes out all the same.
    from replicator.intake import _Owed

    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    run(intake, mirror_seq=0)  # connected, idle
    client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(5.0)  # read: it waits in _fetched
    assert intake._fetched
    refused = b"00000000000:refused:1"
    invalid = Reply(b"error", error=b"invalid", message="malformed")
    intake._ready.append(_Owed(0, None, refused, client.session.token, invalid, 10**13, 0, 0.0))
    step = intake.step(StuckMirror(None))
    assert intake._holding and not step.idle
    assert client.replies()[refused].error == b"invalid"
    assert backend.last_seq == 0
    intake.close()


def test_refusals_go_out_when_the_stream_cannot_be_made_anew(server, backend, caplog):
    # A daemon's Redis user without DEL: the refusals are answered all the
    # same, the log says what to do, and deleting the stream by hand recovers.
    admin = server.client()
    admin.acl_setuser(
        "intake",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-del"],
    )
    url = server.url.replace("unix://", "unix://intake:secret@") + "?db=0"
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, url)
    future = server_ms(intake) + 60_000
    refused = client.send(
        Op.SET_IMMUTABLE, entry_id=b"%d-0" % future, key=b"k", value=encode_value(1)
    )
    with caplog.at_level(logging.ERROR, "replicator.intake"):
        run(intake, mirror_seq=0)
    assert client.replies()[refused].error == b"clock"
    assert "could not make the request stream" in caplog.text
    assert intake.state == IntakeState.SERVE
    client.redis.delete(intake._stream)  # as the log says
    after = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    run(intake, mirror_seq=1)
    assert client.replies()[after] == Reply(b"ok")
    assert [event.value for event in backend.events()] == [encode_value(2)]
    intake.close()


def test_a_request_stamped_a_little_ahead_is_applied_as_sent_now(server, backend, caplog):
    # Within the tolerance (more than the error of the intake's extrapolated
    # clock), an id ahead counts as sent now, with all of its timeout left.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    ahead = server_ms(intake) + CLOCK_TOLERANCE_MS // 2
    first = client.send(
        Op.ADD_MUTABLE,
        timeout=0.5,
        entry_id=b"%d-0" % ahead,
        key=b"s",
        value=encode_value(1),
        timestamp=1.0,
    )
    second = client.send(
        Op.ADD_MUTABLE, timeout=0.5, key=b"s", value=encode_value(2), timestamp=2.0
    )
    with caplog.at_level(logging.WARNING, "replicator.intake"):
        run(intake, mirror_seq=0)
        run(intake, mirror_seq=2)
    assert client.replies() == {first: Reply(b"ok"), second: Reply(b"ok")}
    assert [event.value for event in backend.events()] == [encode_value(1), encode_value(2)]
    assert "made anew" not in caplog.text
    intake.close()


def test_group_commit_applies_a_batch_in_one_transaction(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    ids = [
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(i), timestamp=float(i))
        for i in range(50)
    ]
    run(intake, mirror_seq=0, steps=3)  # connect, then one read + one commit
    registry = intake.metrics.registry
    assert registry.get_sample_value("telstate_replicator_batch_size_count") == 1
    assert registry.get_sample_value("telstate_replicator_batch_size_sum") == 50
    run(intake, mirror_seq=backend.last_seq)
    assert set(client.replies()) == set(ids)
    assert backend.last_seq == 50
    intake.close()


def test_a_batchs_outcomes_are_counted_once_each(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    applied = [
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(i), timestamp=float(i))
        for i in range(3)
    ]
    client.send(Op.SET_IMMUTABLE, key=b"s", value=encode_value(0))  # s is mutable
    client.send(Op.SET_IMMUTABLE, key=b"s", value=encode_value(1))
    first = client.send(Op.SET_IMMUTABLE, key=b"i", value=encode_value(1))
    exists = client.send(Op.SET_IMMUTABLE, key=b"i", value=encode_value(2))
    run(intake, mirror_seq=0, steps=3)  # connect, then one read + one commit
    run(intake, mirror_seq=backend.last_seq)
    replies = client.replies()
    assert len(replies) == 7
    assert all(replies[request_id] == Reply(b"ok") for request_id in [*applied, first])
    assert replies[exists] == Reply(b"exists", encode_value(1))
    registry = intake.metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value("telstate_replicator_" + name, labels)

    assert sample("batch_size_count") == 1
    assert sample("requests_applied_total") == 5  # an existing value is an outcome too
    assert sample("requests_rejected_total", reason="immutable") == 2
    assert sample("requests_rejected_total", reason="expired") == 0
    assert sample("request_seconds_count") == 7
    intake.close()


def test_a_request_the_store_fails_is_answered_with_its_error_and_holds_up_no_other(
    server, backend, monkeypatch, caplog
):
    """A full disk, or a value too large for what is left of it: a local write raises
    StoreError at once, so does the remote one; the requests beside it are applied."""
    import replicator.intake

    apply_requests = replicator.intake.apply_requests
    batches = []

    def failing_large(store: Any, requests: Any, *args: Any) -> Any:
        batches.append(len(requests))
        if any(len(request.value or b"") > 1000 for request in requests):
            raise StoreError("mdb_txn_commit: Input/output error")
        return apply_requests(store, requests, *args)

    monkeypatch.setattr(replicator.intake, "apply_requests", failing_large)
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", backoff=(5.0, 10.0))
    sent = [
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(0), timestamp=0.0),
        client.send(Op.ADD_MUTABLE, key=b"big", value=encode_value(b"x" * 2000), timestamp=0.0),
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(2), timestamp=2.0),
    ]
    run(intake, mirror_seq=2, steps=4)  # connect, then one read of all three
    assert batches == [3, 1, 2, 1, 1]  # the batch, then its halves, and theirs
    assert intake.state == IntakeState.SERVE  # no backoff: the others were served
    assert backend.last_seq == 2
    replies = client.replies()
    assert replies[sent[0]] == replies[sent[2]] == Reply(b"ok")
    failed = replies[sent[1]]
    assert (failed.status, failed.error) == (b"error", b"failed")
    with pytest.raises(StoreError, match="Input/output error"):
        failed.result()
    # Recorded once the store took a write (the last request): a copy gets the same.
    assert backend.request_records([sent[1]])[0].error == b"failed"
    assert backend.last_seq == 2  # (the record is no event)
    registry = intake.metrics.registry
    assert registry.get_sample_value("telstate_replicator_requests_applied_total") == 2
    assert (
        registry.get_sample_value(
            "telstate_replicator_requests_rejected_total", {"reason": "failed"}
        )
        == 1
    )
    assert "failed to write it: mdb_txn_commit: Input/output error" in caplog.text
    intake.close()


def test_a_woken_intake_connects_at_once_after_a_redis_failure(backend, monkeypatch):
    """Found by a soak: the intake waited out its retry delay (up to 10 s) after Redis
    came back, while the mirror was already there: clients found it read-only.
    The daemon wakes it when the mirror's side has reconnected. A wake that comes
    while the intake tries to connect (and fails) is not lost (found by review),
    and each wake buys one try: the delays go on growing after it."""
    from replicator.daemon import Daemon
    from replicator.redis_sink import RedisSink
    from telstate.remote import intake_key
    from tests.servers import RedisServer

    with RedisServer() as server:
        intake = Intake(backend, server.url + "?db=0", backoff=(60.0, 120.0))
        assert intake.step(StuckMirror(None)).wait == 0  # CONNECT: announced
        server.stop()
        step = intake.step(StuckMirror(None))
        assert intake.state == IntakeState.BACKOFF and step.wait == 60.0
        server.start()
        assert intake.step(StuckMirror(None)).wait > 50  # still waiting out its delay
        sink = RedisSink(backend, server.url + "?db=0")
        try:
            daemon = Daemon(backend, sink, None, intake)
            assert sink.on_reconnect is not None
            sink.on_reconnect()  # as the sink calls it once Redis is back
            assert daemon._intake_bell.is_set()
        finally:
            sink.close()
        assert intake.step(StuckMirror(None)).wait == 0  # its delay is over
        assert intake.step(StuckMirror(None)).wait == 0  # CONNECT: announced again
        assert intake.state == IntakeState.SERVE
        assert server.client(db=15).exists(intake_key(0))
        # A wake while the intake connects, and the connect fails: one more try at once.
        server.stop()
        intake.step(StuckMirror(None))
        assert intake.state == IntakeState.BACKOFF
        assert intake.step(StuckMirror(None)).wait > 50
        intake._retry_at = 0.0
        assert intake.step(StuckMirror(None)).wait == 0  # the delay is over: CONNECT
        connect = intake._connect

        def woken_then_failing() -> Any:
            intake.wake()
            return connect()  # (Redis is down: it fails)

        monkeypatch.setattr(intake, "_connect", woken_then_failing)
        assert intake.step(StuckMirror(None)).wait > 0 and intake.state == IntakeState.BACKOFF
        monkeypatch.setattr(intake, "_connect", connect)
        assert intake.step(StuckMirror(None)).wait == 0  # the wake: no delay
        assert intake.step(StuckMirror(None)).wait > 50  # CONNECT failed again: a full delay
        assert intake.step(StuckMirror(None)).wait > 50  # and no more tries
        intake.close()


def test_after_a_redis_restart_the_daemon_announces_its_intake_with_its_mirror(backend):
    """Found by a soak (the whole daemon, as it runs): the mirror's cursor was back
    long before the intake key, the intake waiting out its own retry delay."""
    import threading

    from replicator.daemon import Daemon
    from replicator.redis_sink import RedisSink
    from telstate.redis import mirror_cursor_key
    from telstate.remote import intake_key
    from tests.servers import RedisServer

    with RedisServer() as server:
        url = server.url + "?db=0"
        sink = RedisSink(backend, url, stop=threading.Event(), backoff=(0.05, 0.2))
        intake = Intake(backend, url, backoff=(30.0, 60.0))
        daemon = Daemon(backend, sink, None, intake)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            control = server.client(db=15)
            deadline = time.monotonic() + 10
            while not control.exists(intake_key(0)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            server.stop()
            time.sleep(1.0)  # both sides fail, and back off
            server.start()
            control = server.client(db=15)
            deadline = time.monotonic() + 10
            while not (control.exists(intake_key(0)) and control.exists(mirror_cursor_key(0))):
                assert time.monotonic() < deadline, "the intake did not come back with the mirror"
                time.sleep(0.01)
        finally:
            daemon.stop.set()
            thread.join(10)
            sink.close()
        assert not thread.is_alive()


def test_a_copy_of_a_request_the_store_failed_gets_the_same_answer(server, backend, monkeypatch):
    """Found by review: a failed request is not recorded (the store failed), so a copy
    of it (sent when a reply is late) was applied once the store had room again."""
    import replicator.intake

    apply_requests = replicator.intake.apply_requests
    failing = [True]

    def full_for_a_while(*args: Any) -> Any:
        if failing[0]:
            raise StoreError("mdb_txn_commit: No space left on device")
        return apply_requests(*args)

    monkeypatch.setattr(replicator.intake, "apply_requests", full_for_a_while)
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    request_id, fields = client.session.request(
        Op.ADD_MUTABLE, 10.0, key=b"s", value=encode_value(1), timestamp=1.0
    )
    client.redis.xadd(client.session.requests, fields)
    run(intake, mirror_seq=0, steps=3)
    first = client.replies()[request_id]
    assert first.error == b"failed"
    failing[0] = False  # room again
    client.redis.xadd(client.session.requests, fields)  # the copy, sent meanwhile
    client.redis.xadd(
        client.session.requests,
        client.session.request(
            Op.ADD_MUTABLE, 10.0, key=b"s", value=encode_value(2), timestamp=2.0
        )[1],
    )  # another write: applied
    run(intake, mirror_seq=1, steps=3)
    assert backend.last_seq == 1
    assert [event.value for event in backend.events()] == [encode_value(2)]
    # Once the store took a write, the failure is recorded there (a restart keeps it).
    assert intake._failures == {}
    assert backend.request_records([request_id])[0].error == b"failed"
    intake.close()


def test_failures_are_forgotten_once_expired(server, backend, monkeypatch):
    import replicator.intake
    from tests.test_intake_commit import request

    def full(*args: Any) -> Any:
        raise StoreError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(replicator.intake, "apply_requests", full)
    intake = Intake(backend, server.url + "?db=0")
    intake._apply([request(backend, timeout=1.0)], lambda: int(time.time() * 1000))
    assert len(intake._failures) == 1
    later = int(time.time() * 1000) + 1000 + replicator.intake.CLOCK_TOLERANCE_MS
    intake._failures_pruned = 0.0
    intake._prune_failures(later + replicator.intake.FAILURE_MARGIN_MS - 100)
    assert len(intake._failures) == 1  # (a copy could still come)
    intake._failures_pruned = 0.0
    intake._prune_failures(later + replicator.intake.FAILURE_MARGIN_MS + 100)
    assert intake._failures == {}
    intake.close()


def test_outcomes_stay_with_their_requests_when_a_known_failure_is_in_the_batch(
    server, backend, monkeypatch
):
    """Found by review: a request failing beside one that had failed before shifted
    the outcomes of those after it (an applied write was answered 'failed')."""
    import replicator.intake
    from tests.test_intake_commit import request

    apply_requests = replicator.intake.apply_requests

    def failing_large(store: Any, requests: Any, *args: Any) -> Any:
        if any(len(request.value or b"") > 1000 for request in requests):
            raise StoreError("mdb_txn_commit: No space left on device")
        return apply_requests(store, requests, *args)

    monkeypatch.setattr(replicator.intake, "apply_requests", failing_large)
    intake = Intake(backend, server.url + "?db=0")

    def now() -> int:
        return int(time.time() * 1000)

    large = [request(backend, key=b"%d" % i, value=encode_value(bytes(2000))) for i in range(2)]
    assert intake._apply(large[:1], now)[0].error == b"failed"
    intake._failures_pruned = time.monotonic()  # (pruned lately: the dict stays as it is)
    small = request(backend, key=b"s", value=encode_value(3), timestamp=3.0)
    outcomes = intake._apply([*large, small], now)
    assert [outcome.error for outcome in outcomes] == [b"failed", b"failed", b""]
    assert outcomes[2].seq == backend.last_seq == 1
    # The store took a write: the failures are recorded in it, as any outcome.
    assert intake._failures == {}
    assert backend.request_records([r.request_id for r in large]) == outcomes[:2]
    intake.close()


def test_failures_kept_in_memory_are_bounded(server, backend, monkeypatch):
    import replicator.intake
    from tests.test_intake_commit import request

    def full(*args: Any) -> Any:
        raise StoreError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(replicator.intake, "apply_requests", full)
    monkeypatch.setattr(replicator.intake, "MAX_FAILURES", 5)
    intake = Intake(backend, server.url + "?db=0")
    requests = [request(backend, key=b"k") for _ in range(8)]
    for sent in requests:
        intake._apply([sent], lambda: int(time.time() * 1000))
    assert list(intake._failures) == [sent.request_id for sent in requests[3:]]
    intake.close()


def test_a_failure_right_after_each_connect_backs_off_longer_each_time(
    server, backend, monkeypatch
):
    """Found with a full disk: each reconnect reset the backoff, so a lasting failure
    was retried (and logged) ten times a second."""
    intake = Intake(backend, server.url + "?db=0", backoff=(0.1, 1.0))

    def refused(mirror: Any) -> Any:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(intake, "_serve", refused)
    waits = []
    for _ in range(6):
        assert intake.step(StuckMirror(0)).wait == 0  # (connect)
        waits.append(intake.step(StuckMirror(0)).wait)  # the failure
        intake._retry_at = 0.0  # (its backoff over)
        assert intake.step(StuckMirror(0)).wait == 0  # (back to connect)
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    monkeypatch.undo()
    run(intake, mirror_seq=0, steps=2)  # a step that serves: the backoff starts again
    assert intake._delay == 0.1
    intake.close()


def test_a_reply_that_is_not_resp_backs_off_as_a_lost_connection(server, backend, monkeypatch):
    """Found by review: redis-py's InvalidResponse (a proxy, another service on the
    port) escaped the step and stopped the daemon."""
    intake = Intake(backend, server.url + "?db=0", backoff=(0.1, 1.0))

    def garbled(mirror: Any) -> Any:
        raise redis.exceptions.InvalidResponse('Protocol error, got "?" as reply type byte')

    monkeypatch.setattr(intake, "_serve", garbled)
    assert intake.step(StuckMirror(0)).wait == 0  # (connect)
    assert intake.step(StuckMirror(0)).wait == 0.1
    assert intake.state == IntakeState.BACKOFF
    monkeypatch.undo()
    intake._retry_at = 0.0
    run(intake, mirror_seq=0, steps=4)
    assert intake.state == IntakeState.SERVE
    intake.close()


def test_a_read_that_fails_after_each_served_step_backs_off_longer(server, backend):
    """Found by review: the step reading the pending list served (over one connection),
    then the blocking read on the other failed; the backoff restarted each time."""
    intake = Intake(backend, server.url + "?db=0", backoff=(0.1, 1.0))
    show(intake, 0)
    admin = server.client(db=0)
    waits = []
    for _ in range(5):
        intake._retry_at = 0.0
        while intake.state != IntakeState.SERVE:
            intake.step(StuckMirror(0))
        assert intake.step(StuckMirror(0)).idle  # the (empty) pending list read: served
        # Room for the connections made so far, none for the reader's (maxclients).
        admin.config_set("maxclients", len(admin.client_list()))
        try:
            intake.wait_for_requests(0.01)
        finally:
            admin.config_set("maxclients", 10000)
        assert intake.state == IntakeState.BACKOFF
        waits.append(intake._delay)
    assert waits == [0.2, 0.4, 0.8, 1.0, 1.0]
    intake._retry_at = 0.0
    run(intake, mirror_seq=0, steps=4)  # both connections work again
    assert intake._delay == 0.1
    admin.close()
    intake.close()


def test_redis_restarted_empty_keeps_owed_replies(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", backoff=(0.0, 0.0))
    request = client.send(
        Op.SET_INDEXED, key=b"i", sub_key=encode_value("a"), value=encode_value(1)
    )
    run(intake, mirror_seq=0)
    assert intake.owes_replies
    server.stop()
    run(intake, mirror_seq=1)
    assert intake.state in (IntakeState.BACKOFF, IntakeState.CONNECT)
    server.start()
    client.redis = server.client(db=MIRROR_CURSOR_DB)
    run(intake, mirror_seq=1)
    assert client.replies()[request] == Reply(b"ok")
    assert intake.state == IntakeState.SERVE
    intake.close()


@given(
    fields=st.dictionaries(
        st.sampled_from(
            [b"v", b"id", b"reply", b"store", b"op", b"key", b"sub", b"value", b"ts", b"timeout"]
            + [b"host", b"pid", b"name", b"junk"]
        ),
        st.binary(max_size=20),
    )
)
def test_decoding_arbitrary_entries_raises_only_invalid_request(fields):
    try:
        decode_request(b"1-0", fields)
    except InvalidRequest:
        pass


def test_oversized_request_is_invalid(monkeypatch):
    import telstate.remote

    monkeypatch.setattr(telstate.remote, "MAX_REQUEST_BYTES", 1000)
    from telstate.remote import _Session

    _, fields = _Session(0, "store", 10.0, None).request(
        Op.SET_IMMUTABLE, 10.0, key=b"k", value=b"\xff" + b"\x00" * 2000
    )
    with pytest.raises(InvalidRequest, match="more than the 1000"):
        decode_request(b"1-0", fields)


def test_huge_bad_fields_get_a_short_rejection_and_block_nothing(server, backend, caplog):
    """Found by review: a rejection showed the client's bytes in full.

    A 20 MB op name made an 84 MB log line and a 100 MB reply.
    """
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    huge = b"\x00" * (20 << 20)
    rejected = []
    for change in (
        {b"op": huge},
        {b"v": huge},
        {huge: b"1"},
        {b"%d" % i + huge[: 1 << 20]: b"" for i in range(10)},
    ):
        request_id, fields = client.session.request(Op.DELETE, 10.0, key=b"k")
        client.redis.xadd(client.session.requests, {**fields, **change})
        rejected.append(request_id)
    behind = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    with caplog.at_level("WARNING", logger="replicator.intake"):
        run(intake, mirror_seq=1)
    replies = client.replies()
    assert replies[behind] == Reply(b"ok")
    for request_id in rejected:
        assert replies[request_id].error == b"invalid"
        assert len(replies[request_id].message) < 1000, replies[request_id].message
    assert len(caplog.text) < 10_000
    assert "and 6 more" in replies[rejected[-1]].message
    intake.close()


def test_rejections_are_logged_a_few_to_a_window_and_all_answered(
    server, backend, caplog, monkeypatch
):
    """A client sending bad requests in a loop must not fill the daemon's log."""
    import replicator.intake

    monkeypatch.setattr(replicator.intake, "LOG_WINDOW", 0.5)
    burst = replicator.intake.LOG_BURST
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    bad = []
    for _ in range(burst + 15):
        request_id, fields = client.session.request(Op.DELETE, 10.0, key=b"k")
        client.redis.xadd(client.session.requests, {**fields, b"op": b"bogus"})
        bad.append(request_id)
    future = server_ms(intake) + 365 * 86400 * 1000
    ahead = [
        client.send(Op.DELETE, entry_id=b"%d-%d" % (future, i), key=b"k") for i in range(burst + 3)
    ]
    caplog.set_level(logging.WARNING, logger="replicator.intake")
    run(intake, mirror_seq=0)
    replies = client.replies()
    assert all(replies[request_id].error == b"invalid" for request_id in bad)
    assert all(replies[request_id].error == b"clock" for request_id in ahead)
    registry = intake.metrics.registry

    def rejected(reason: str) -> float | None:
        return registry.get_sample_value(
            "telstate_replicator_requests_rejected_total", {"reason": reason}
        )

    assert rejected("invalid") == burst + 15
    assert rejected("clock") == burst + 3
    messages = [record.getMessage() for record in caplog.records]
    assert sum(message.startswith("rejected: ") for message in messages) == burst
    assert sum("not applied: its stream entry id" in message for message in messages) == burst
    assert not any("not logged" in message for message in messages)
    # Once the window is over, a step says how many went unlogged.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        time.sleep(0.05)
    caplog.clear()
    run(intake, mirror_seq=0, steps=1)
    messages = [record.getMessage() for record in caplog.records]
    assert "15 more rejected requests in the last 0 s, not logged (see the metrics)" in messages
    assert any(message.startswith("3 more requests refused") for message in messages)
    # And the next window logs again.
    caplog.clear()
    request_id, fields = client.session.request(Op.DELETE, 10.0, key=b"k")
    client.redis.xadd(client.session.requests, {**fields, b"op": b"bogus"})
    run(intake, mirror_seq=0)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    intake.close()


def test_reply_streams_expire(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    client.send(Op.DELETE, key=b"nothing")
    run(intake, mirror_seq=0)
    ttl = client.redis.pttl(reply_stream_key(0, client.session.token))
    assert 0 < ttl <= 10_000 + 60_000
    intake.close()


def test_a_store_made_a_follower_gets_its_requests_refused(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    applied, fields = client.session.request(
        Op.SET_IMMUTABLE, 10.0, key=b"k", value=encode_value(1)
    )
    client.redis.xadd(client.session.requests, fields)
    run(intake, mirror_seq=1)
    assert client.replies()[applied] == Reply(b"ok")
    assert client.redis.exists(intake_key(0))

    make_follower(backend.path, "new-primary:/data")
    refused = client.send(Op.SET_IMMUTABLE, key=b"k2", value=encode_value(2))
    client.redis.xadd(client.session.requests, fields)  # delivered again
    run(intake, mirror_seq=1)
    replies = client.replies()
    assert replies[applied] == Reply(b"ok")  # it was applied: its writer must learn so
    assert replies[refused].error == b"readonly"
    with pytest.raises(ReadOnlyError, match="is a follower of new-primary:/data"):
        replies[refused].result()
    assert intake.state == IntakeState.SERVE
    assert intake.read_only is not None
    # The intake key is gone (new clients find the mirror read-only), and stays gone.
    assert not client.redis.exists(intake_key(0))
    later = client.send(Op.DELETE, key=b"k")
    run(intake, mirror_seq=1)
    assert client.replies()[later].error == b"readonly"
    assert not client.redis.exists(intake_key(0))
    assert client.redis.xlen(intake._stream) == 0
    registry = intake.metrics.registry
    labels = {"reason": "readonly"}
    assert registry.get_sample_value("telstate_replicator_requests_rejected_total", labels) == 2
    assert backend.last_seq == 1
    intake.close()


def test_an_intake_on_a_follower_never_offers_writes(server, backend):
    client = Client(server, str(backend.uuid))
    make_follower(backend.path, "new-primary:/data")
    other = {b"store": b"another-store", b"path": backend.path.encode()}
    client.redis.hset(intake_key(0), mapping=other)  # a daemon that took the mirror over
    intake = Intake(backend, server.url + "?db=0")
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    run(intake, mirror_seq=0)
    assert client.replies()[request].error == b"readonly"
    assert client.redis.hgetall(intake_key(0)) == other  # not ours to retire
    assert backend.last_seq == 0
    intake.close()


def test_a_closed_wire_gives_its_connection_back(server):
    """The intake closes its wire on every Redis failure: that must not use up a bounded pool."""
    pool = redis.ConnectionPool(
        path=server.socket, connection_class=redis.UnixDomainSocketConnection, max_connections=2
    )
    wire = Wire(pool)
    others = redis.Redis(connection_pool=pool)
    assert others.ping()  # a connection of the pool's own, idle, that close leaves alone
    for _ in range(5):
        assert wire.call((b"PING",)) == [b"PONG"]
        wire.close()
    assert len(pool._in_use_connections) == 0
    assert others.ping()
    pool.disconnect()


def test_replies_ride_with_the_mirror_script_and_only_once_it_holds_their_events(server, backend):
    # With a real mirror, a step answers its requests in the same write as
    # the script that projects them: the reply is there before the intake
    # waits for more requests (no wait_for_requests, no second round trip).
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    request = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(1.5), timestamp=2.0)
    intake.wait_for_requests(1.0)  # reads the request
    intake.step(mirror)  # commits it, projects it, and replies in the same write
    assert client.replies() == {request: Reply(b"ok")}
    assert not intake.owes_replies and not intake._ready
    # The step was sent ahead: its answers are read while waiting for more requests.
    assert sink.sent_seq == backend.last_seq == 1
    intake.wait_for_requests(0.05, mirror)
    assert sink.seq == 1 and intake._ticket is None
    assert mirror.moves == 1
    intake.close()
    sink.close()


def test_the_mirror_projects_the_intakes_commits_without_reading_them_back(server, backend):
    # The intake hands its committed events to the mirror; a local commit
    # made in between is read from the log, and projected before them.
    from replicator.verify import differences, mirror_contents, record_contents

    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    reads = []
    events = backend.events

    def counted(start_seq=1, end_seq=None, keys=None):
        reads.append(start_seq)
        return events(start_seq, end_seq, keys)

    backend.events = counted  # type: ignore[method-assign]
    sent = [
        client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(i), timestamp=float(i))
        for i in range(3)
    ]
    intake.wait_for_requests(1.0)
    intake.step(mirror)
    assert client.replies() == {request: Reply(b"ok") for request in sent}
    assert sink.sent_seq == backend.last_seq == 3 and reads == []
    backend.set_immutable(b"local", encode_value("here"))  # another writer's commit
    request = client.send(Op.SET_IMMUTABLE, key=b"remote", value=encode_value(1))
    intake.wait_for_requests(1.0)
    intake.step(mirror)
    assert client.replies()[request] == Reply(b"ok")
    assert sink.seq == backend.last_seq == 5 and reads == [4]  # the step ahead settled first
    assert differences(record_contents(backend.records()), mirror_contents(sink.client)) == []
    intake.close()
    sink.close()


def test_the_reply_script_sends_nothing_before_the_mirror_holds_the_events(server, backend):
    # The replies' script checks the mirror's cursor itself, so replies sent
    # along with a script call that failed (or with no mirror) never go out early.
    from replicator.intake import GROUP, _Owed, _reply_source
    from telstate.redis import mirror_cursor_key

    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    intake.step(StuckMirror(0))  # connect
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    owed = _Owed(3, None, request, client.session.token, Reply(b"ok"), 10**13, 0, 0.0)
    control = server.client(db=MIRROR_CURSOR_DB)
    reply = control.register_script(_reply_source())
    arguments = intake._reply_arguments([owed], need=3)
    cursor = mirror_cursor_key(0)
    assert arguments["keys"][:2] == [intake._stream, cursor]
    assert arguments["args"][:5] == [MIRROR_CURSOR_DB, GROUP, 1, str(backend.uuid), 3]

    def send() -> int:
        return reply(keys=arguments["keys"], args=arguments["args"])

    assert send() == 0  # no cursor at all
    for store, seq, state in (
        (str(backend.uuid), 2, "ready"),  # behind
        (str(backend.uuid), 3, "rebuilding"),  # not complete
        ("another store", 9, "ready"),
    ):
        control.hset(cursor, mapping={"store": store, "seq": seq, "state": state})
        assert send() == 0
        assert client.replies() == {}
    control.hset(cursor, mapping={"store": str(backend.uuid), "seq": 3, "state": "ready"})
    assert send() == 1
    assert client.replies() == {request: Reply(b"ok")}
    intake.close()


def test_refusals_go_out_while_the_mirror_is_incomplete(server, backend):
    # Found by review: replies owed at seq 0 (nothing for the mirror to show)
    # waited for the mirror, so a follower's refusals timed out during a
    # rebuild instead of raising ReadOnlyError.
    client = Client(server, str(backend.uuid))
    make_follower(backend.path, "new-primary:/data")
    intake = Intake(backend, server.url + "?db=0")
    refused = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    invalid = client.send(Op.SET_IMMUTABLE, key=b"k", value=b"\xc1 not an encoded value")
    run(intake, mirror_seq=0)
    replies = client.replies()
    assert replies[refused].error == b"readonly"
    assert replies[invalid].error == b"invalid"
    intake.close()


def _blocked_reads(server: RedisServer) -> int:
    """How many clients of the server are blocked in an XREADGROUP."""
    return sum(
        1
        for client in server.client(db=0).client_list()
        if client["cmd"] == "xreadgroup" and "b" in client["flags"]
    )


def _wait_for_pending(intake: Intake, count: int) -> None:
    """Wait until `count` requests are delivered (on the consumer group's pending list)."""
    deadline = time.monotonic() + 5.0
    while intake.client.xpending(intake._stream, "telstate-replicator")["pending"] != count:
        assert time.monotonic() < deadline, "the request was never delivered"
        time.sleep(0.005)


def test_the_next_read_waits_in_redis_while_the_mirror_is_stepped(server, backend, monkeypatch):
    # After a commit the intake sends the mirror's step (which carries the
    # replies) and then its next blocking read: Redis hands it the next
    # request as soon as a writer sends one, with no further command from
    # the intake.
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    first = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(1.5), timestamp=2.0)
    intake.wait_for_requests(1.0)
    assert _blocked_reads(server) == 0  # the request was there: nothing waits
    sent: list[str] = []
    names = {id(sink._wire): "mirror", id(intake._reader): "read"}
    send = Wire.send
    monkeypatch.setattr(
        Wire, "send", lambda wire, packed: [sent.append(names[id(wire)]), send(wire, packed)]
    )
    intake.step(mirror)  # commits, projects and replies, then sends the next read
    monkeypatch.undo()
    assert sent == ["mirror", "read"]  # a lone reply does not wait behind the read's send
    assert client.replies() == {first: Reply(b"ok")}
    assert _blocked_reads(server) == 1  # the read sent ahead, waiting in Redis
    second = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(2.5), timestamp=3.0)
    _wait_for_pending(intake, 1)  # delivered to it, with the intake idle
    assert _blocked_reads(server) == 0
    intake.wait_for_requests(1.0)  # takes it
    intake.step(mirror)
    assert client.replies() == {first: Reply(b"ok"), second: Reply(b"ok")}
    assert backend.last_seq == sink.sent_seq == 2
    intake.close()
    sink.close()


def test_after_a_batch_of_several_the_next_read_goes_before_the_mirrors_step(
    server, backend, monkeypatch
):
    # Busy writers: Redis hands the read the requests already waiting before
    # it runs the mirror's scripts, so the daemon commits them meanwhile.
    clients = [Client(server, str(backend.uuid)) for _ in range(2)]
    sink, mirror, intake = serving(server, backend)
    requests = [
        client.send(Op.ADD_MUTABLE, key=b"s%d" % i, value=encode_value(1.5), timestamp=2.0)
        for i, client in enumerate(clients)
    ]
    intake.wait_for_requests(1.0)
    assert len(intake._fetched) == 2
    sent: list[str] = []
    names = {id(sink._wire): "mirror", id(intake._reader): "read"}
    send = Wire.send
    monkeypatch.setattr(
        Wire, "send", lambda wire, packed: [sent.append(names[id(wire)]), send(wire, packed)]
    )
    intake.step(mirror)
    monkeypatch.undo()
    assert sent == ["read", "mirror"]
    assert [set(client.replies()) for client in clients] == [{r} for r in requests]
    intake.close()
    sink.close()


def test_requests_handed_to_a_read_whose_answer_is_lost_are_applied_once(server, backend):
    # A read sent ahead takes requests off the stream before the intake
    # sees them: if its answer is lost (Redis drops the connection), they
    # are on the pending list, which the intake reads first on reconnecting.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", backoff=(0.0, 0.0))
    first = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    run(intake, mirror_seq=0)  # committed, not yet shown by the "mirror": owed
    assert intake.owes_replies and intake._reading
    second = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(2.0), timestamp=2.0)
    _wait_for_pending(intake, 2)  # the second went to the read sent ahead
    control = server.client(db=MIRROR_CURSOR_DB)
    assert control.client_kill_filter(_type="normal", skipme=True) >= 2  # the intake's too
    run(intake, mirror_seq=backend.last_seq + 1, steps=8)
    replies = client.replies()
    assert replies[first] == Reply(b"ok")
    assert replies[second] == Reply(b"ok")
    assert backend.last_seq == 2  # each applied once
    assert control.xpending(intake._stream, "telstate-replicator")["pending"] == 0
    intake.close()


def test_closing_with_a_read_sent_ahead_does_not_wait_for_it(server, backend):
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    intake.step(StuckMirror(0))  # connect
    intake.step(StuckMirror(0))  # the (empty) pending list
    client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(5.0)  # reads it at once; reads block up to 5 s from now
    intake.step(StuckMirror(0))  # commits, and sends a read that blocks up to 5 s
    assert intake._reading
    started = time.monotonic()
    intake.close()
    assert time.monotonic() - started < 2.0
    assert _blocked_reads(server) == 0
    later = client.send(Op.SET_IMMUTABLE, key=b"j", value=encode_value(2))
    second = Intake(backend, server.url + "?db=0")
    run(second, mirror_seq=2)
    assert client.replies()[later] == Reply(b"ok")
    assert backend.last_seq == 2
    second.close()


def test_replies_a_stale_sink_finds_ready_wait_for_the_mirror_in_redis(server, backend):
    # Found by review: the sink may not know yet that Redis lost the mirror
    # (a restart, a flush): by its seq the events are shown, by the cursor
    # in Redis not. The reply must wait, or its writer would return and not
    # find its write in the mirror.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    refused = client.send(Op.SET_IMMUTABLE, key=b"k", value=b"\xc1 not an encoded value")
    run(intake, mirror_seq=0)  # committed, owed
    assert client.replies().keys() == {refused}  # a refusal waits for nothing
    show(intake, 0)  # Redis lost the mirror
    for _ in range(3):
        if intake.step(StuckMirror(1)).idle:  # the sink still says it holds event 1
            intake.wait_for_requests(0.05)
    assert request not in client.replies()
    assert [owed.request_id for owed in [*intake._owed, *intake._ready]] == [request]  # kept
    run(intake, mirror_seq=1)  # Redis's mirror holds it again
    assert client.replies()[request] == Reply(b"ok")
    assert not intake.owes_replies and not intake._ready
    intake.close()


def test_a_read_sent_ahead_when_redis_is_flushed_reconnects_at_once(server, backend, caplog):
    # Found by review: a blocked read ended by FLUSHALL gets UNBLOCKED, not
    # NOGROUP: it was taken for a refused command (a warning and a backoff).
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    first = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(1), timestamp=1.0)
    run(intake, mirror_seq=1)
    assert client.replies().keys() == {first}
    intake._drop_read()
    intake._block_ms = 5000
    intake._read_ahead()  # as after a commit
    deadline = time.monotonic() + 5.0
    while _blocked_reads(server) != 1:
        assert time.monotonic() < deadline, "the read sent ahead never blocked"
        time.sleep(0.001)
    server.client().flushall()
    intake.wait_for_requests(0.05)
    assert intake.state == IntakeState.CONNECT
    assert "refused a command" not in caplog.text
    second = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(2), timestamp=2.0)
    run(intake, mirror_seq=2)
    assert client.replies().keys() == {second}  # (the first's reply went with the flush)
    assert backend.last_seq == 2
    intake.close()


def _same(backend: LmdbBackend, sink: Any) -> list[str]:
    """How the mirror differs from the store (nothing, if it is exact)."""
    from replicator.verify import differences, mirror_contents, record_contents

    return differences(record_contents(backend.records()), mirror_contents(sink.client))


def test_a_step_sent_ahead_that_the_mirror_refuses_owes_its_replies_until_rebuilt(server, backend):
    # The mirror's step goes out with the replies, its answers unread while
    # the intake goes on. A mirror changed behind the sink's back (a stray
    # key) refuses the step: the replies' script then sends nothing, and the
    # replies go out only once the mirror, rebuilt, shows their write.
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    server.client(db=0).set(b"stray", b"written by someone else")
    request = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(1.5), timestamp=2.0)
    intake.wait_for_requests(1.0, mirror)
    intake.step(mirror)
    assert intake._ticket is not None  # sent ahead
    time.sleep(0.1)  # Redis has run it (and refused it) by now
    assert client.replies() == {}
    assert server.client(db=0).exists(b"s") == 0
    intake.wait_for_requests(1.0, mirror)  # its answers come first: the mirror is rebuilt
    assert client.replies() == {request: Reply(b"ok")}
    assert not intake.owes_replies and intake._ticket is None
    assert sink.seq == backend.last_seq == 1
    assert _same(backend, sink) == []
    intake.close(mirror)
    sink.close()


def test_a_step_sent_ahead_whose_answers_are_lost_owes_its_replies_again(server, backend):
    # The mirror's connection fails after the step went out: whether Redis
    # ran it is unknown (here: it did not), so its replies are owed again,
    # and sent (again, had they gone out: a writer takes the first reply to
    # its id) once the mirror, reconnected, shows the write, once.
    import socket

    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    sink.backoff = (0.0, 0.0)
    request = client.send(Op.ADD_MUTABLE, key=b"s", value=encode_value(1.5), timestamp=2.0)
    intake.wait_for_requests(1.0, mirror)
    # Redis holds the step (a write) unrun, and drops it with its connection.
    server.client(db=0).client_pause(500, all=False)
    intake.step(mirror)
    assert intake._ticket is not None
    sink._wire._connection._sock.shutdown(socket.SHUT_RDWR)
    intake.wait_for_requests(1.0, mirror)  # the answers are lost
    deadline = time.monotonic() + 10
    while intake.owes_replies or intake._ready:
        assert time.monotonic() < deadline, "the replies were never sent"
        mirror.step()
        intake.step(mirror)
        intake.wait_for_requests(0.01, mirror)
    assert client.replies() == {request: Reply(b"ok")}
    assert sink.seq == backend.last_seq == 1
    assert server.client(db=0).zcard(b"s") == 1
    assert _same(backend, sink) == []
    intake.close(mirror)
    sink.close()


def test_a_step_sent_ahead_settled_by_the_mirrors_thread_is_collected_by_the_intake(
    server, backend
):
    # The daemon's other thread may step the mirror while the intake's step
    # is ahead: it reads the answers first (the connection answers in
    # order), counts the move, and the intake takes its replies' answer from it.
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(1.0, mirror)
    intake.step(mirror)
    assert sink.seq == 0 and sink.sent_seq == 1 and sink.fileno() is not None
    moves = mirror.moves
    assert mirror.step().applied == 1  # the other thread: settles the step ahead
    assert mirror.moves == moves + 1 and sink.seq == 1 and sink.fileno() is None
    intake.wait_for_requests(0.1, mirror)  # takes the answer, then waits for requests
    assert intake._ticket is None and not intake.owes_replies
    assert client.replies() == {request: Reply(b"ok")}
    assert mirror.moves == moves + 1  # counted once
    intake.close(mirror)
    sink.close()


def test_closing_with_a_step_sent_ahead_reads_its_answers(server, backend):
    # The daemon stops with a step ahead: close reads its answers (and would
    # send any reply the mirror's script did not), instead of dropping them.
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(1.0, mirror)
    intake.step(mirror)
    assert intake._ticket is not None
    intake.close(mirror)
    assert intake._ticket is None and not intake._owed and not intake._ready
    assert sink.seq == 1
    assert client.replies() == {request: Reply(b"ok")}
    sink.close()


def _in_window(mirror: Any, between: Any) -> None:
    """Run `between` (as the mirror's thread would) right after the intake takes the socket."""
    original = mirror.fileno

    def fileno() -> int | None:
        found = original()
        between()
        return found

    mirror.fileno = fileno


def test_a_step_ahead_read_by_the_mirrors_thread_while_the_intake_waits_is_not_waited_for(
    server, backend
):
    # Found by review: the mirror's thread read the answers of a refused
    # step between the intake taking the socket and waiting on it: nothing
    # more came on it, and the replies owed again waited the intake's whole
    # wait. The wait is sliced, and looks again between slices.
    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    server.client(db=0).set(b"stray", b"written by someone else")
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(1.0, mirror)
    intake.step(mirror)
    time.sleep(0.1)  # Redis has refused it by now
    _in_window(mirror, mirror.step)  # reads the refusal, rebuilds
    started = time.monotonic()
    assert not intake._requests_first(mirror, 30.0)
    assert time.monotonic() - started < 10.0  # not the whole 30 s
    intake.wait_for_requests(0.01, mirror)
    assert client.replies() == {request: Reply(b"ok")}
    intake.close(mirror)
    sink.close()


@pytest.mark.parametrize("closed_in", ["fileno", "window"])
def test_the_mirrors_socket_closed_under_the_intakes_wait_fails_nothing(
    server, backend, caplog, closed_in
):
    # Found by review: the mirror's thread failed (closing the mirror's
    # socket) just as the intake was to wait on it: the wait raised
    # (ValueError for fd -1: it stopped the daemon; EBADF: the intake backed
    # off although its own connections were fine). A closed socket now means
    # "collect the answers", which finds the failure.
    import logging
    import socket

    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    sink.backoff = (0.0, 0.0)
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(1.0, mirror)
    server.client(db=0).client_pause(500, all=False)  # the step waits unrun in Redis
    intake.step(mirror)
    assert intake._ticket is not None
    if closed_in == "fileno":
        original = sink._wire.fileno

        def fileno() -> int | None:
            sock = sink._wire._connection._sock
            sock.shutdown(socket.SHUT_RDWR)
            mirror.step()  # the mirror's thread: the settle fails, the socket is closed
            return int(sock.fileno())  # -1

        sink._wire.fileno = fileno
    else:

        def fail() -> None:
            sink._wire._connection._sock.shutdown(socket.SHUT_RDWR)
            mirror.step()

        _in_window(mirror, fail)
    caplog.set_level(logging.WARNING, logger="replicator.intake")
    intake.wait_for_requests(0.2, mirror)
    assert intake.state == IntakeState.SERVE, caplog.text
    assert not [r for r in caplog.records if r.name == "replicator.intake"]
    if closed_in == "fileno":
        sink._wire.fileno = original  # type: ignore[method-assign]
    else:
        del mirror.fileno
    deadline = time.monotonic() + 10
    while intake.owes_replies or intake._ready or intake._ticket is not None:
        assert time.monotonic() < deadline, "the replies were never sent"
        mirror.step()
        intake.step(mirror)
        intake.wait_for_requests(0.01, mirror)
    assert client.replies() == {request: Reply(b"ok")}
    intake.close(mirror)
    sink.close()


def test_a_rebuild_started_by_the_intakes_thread_is_counted(server, backend):
    # Found by review: after a refused step ahead, the rebuild runs in the
    # same call (in whichever thread read the refusal), and the daemon,
    # counting rebuilds by the states its own thread saw, counted none.
    import threading

    from replicator.daemon import Daemon

    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    daemon = Daemon(backend, sink, None, intake)
    daemon.shared = mirror
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        server.client(db=0).set(b"stray", b"written by someone else")
        request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
        deadline = time.monotonic() + 10
        while request not in client.replies():
            assert time.monotonic() < deadline, "no reply"
            time.sleep(0.01)
        while daemon.metrics.rebuilds._value.get() < 1:
            assert time.monotonic() < deadline, "the rebuild was not counted"
            time.sleep(0.01)
        assert server.client(db=0).exists(b"stray") == 0
    finally:
        daemon.stop.set()
        thread.join(10)
        sink.close()
    assert daemon.metrics.rebuilds._value.get() == 1
    assert sink.rebuilds == 2  # serving's first build, then this one


@pytest.mark.parametrize("planted", ["another type", "the last id"])
@pytest.mark.parametrize("ahead", [True, False])
def test_a_reply_stream_of_the_wrong_type_blocks_no_other_reply(
    server, backend, ahead, planted, caplog
):
    # A key of another type where one writer's reply stream should be, or a
    # stream whose last entry id is the largest there is (no XADD '*' can
    # follow it; a client of an unprotected mirror can plant either), loses
    # that writer its replies (it times out), and nobody else's: the others
    # in the same call are sent, the requests leave the stream, and the
    # intake goes on. (ahead: the replies ride with a real mirror's step;
    # else they go out on their own once a stuck mirror shows their events.)
    good, poisoned = (Client(server, str(backend.uuid)) for _ in range(2))
    if planted == "another type":
        poisoned.redis.set(poisoned.session.replies, b"not a stream")
    else:
        last = b"18446744073709551615-18446744073709551615"
        poisoned.redis.xadd(poisoned.session.replies, {b"id": b"x"}, id=last)
    if ahead:
        sink, mirror, intake = serving(server, backend)

    def serve(seq: int) -> None:
        if not ahead:
            run(intake, mirror_seq=seq)
            return
        for _ in range(5):
            if intake.step(mirror).idle:
                intake.wait_for_requests(0.05, mirror)

    if not ahead:
        intake = Intake(backend, server.url + "?db=0")
    requests = [
        client.send(Op.SET_IMMUTABLE, key=b"k%d" % i, value=encode_value(i))
        for i, client in enumerate((poisoned, good))
    ]
    serve(2)
    assert good.replies() == {requests[1]: Reply(b"ok")}
    if planted == "another type":
        assert poisoned.redis.get(poisoned.session.replies) == b"not a stream"
    else:
        assert poisoned.redis.xlen(poisoned.session.replies) == 1
    assert f"the reply to request {requests[0]!r} could not be sent" in caplog.text
    assert intake.state == IntakeState.SERVE
    assert good.redis.xlen(good.session.requests) == 0  # both retired
    later = good.send(Op.SET_IMMUTABLE, key=b"later", value=encode_value(2))
    serve(3)
    assert later in good.replies()
    intake.close()
    if ahead:
        sink.close()


def _batches(intake: Intake) -> tuple[float, float]:
    """The batch-size metric's count and sum."""
    samples = {s.name: s.value for m in intake.metrics.batch_size.collect() for s in m.samples}
    return samples["telstate_replicator_batch_size_count"], samples[
        "telstate_replicator_batch_size_sum"
    ]


def _lingering(server, path, durability: str) -> tuple[LmdbBackend, Intake, list[Client]]:
    """An intake that has served two writers once, and would wait up to 30 s for them."""
    backend = LmdbBackend(path, durability=durability)
    intake = Intake(backend, server.url + "?db=0", max_linger=30.0)
    clients = [Client(server, str(backend.uuid)) for _ in range(2)]
    for i, client in enumerate(clients):
        client.send(Op.SET_IMMUTABLE, key=b"first%d" % i, value=encode_value(i))
    run(intake, mirror_seq=2)
    assert all(client.replies() for client in clients)
    intake._commit_s = 120.0  # as if a flush took a minute: the wait is max_linger
    return backend, intake, clients


def test_with_fsync_a_batch_waits_for_the_writers_active_lately(server, tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr("replicator.intake.ACTIVE_MAX_S", 60.0)  # however slow the machine
    backend, intake, (a, b) = _lingering(server, tmp_path / "store", "fsync")
    count, total = _batches(intake)
    sent = []
    late = threading.Timer(
        0.5, lambda: sent.append(b.send(Op.SET_IMMUTABLE, key=b"b", value=encode_value(2)))
    )
    first = a.send(Op.SET_IMMUTABLE, key=b"a", value=encode_value(1))
    late.start()
    run(intake, mirror_seq=4)
    late.join()
    # b's request came half a second after a's was read: one transaction all the same.
    assert _batches(intake) == (count + 1, total + 2)
    assert first in a.replies() and sent[0] in b.replies()
    intake.close()
    backend.close()


@pytest.mark.parametrize("case", ["lone writer", "quiet writer", "batch durability"])
def test_no_batch_waits_for_writers_that_are_not_coming(server, tmp_path, monkeypatch, case):
    backend, intake, (a, b) = _lingering(
        server, tmp_path / "store", "batch" if case == "batch durability" else "fsync"
    )
    if case == "lone writer":
        intake._writers.pop(b.session.token)
    elif case == "quiet writer":
        monkeypatch.setattr("replicator.intake.ACTIVE_MAX_S", 0.2)
        time.sleep(0.3)
        a.send(Op.SET_IMMUTABLE, key=b"again", value=encode_value(0))
        run(intake, mirror_seq=3)  # a is active again, b is not
    count, total = _batches(intake)
    seq = backend.last_seq
    started = time.monotonic()
    request = a.send(Op.SET_IMMUTABLE, key=b"a", value=encode_value(1))
    run(intake, mirror_seq=seq + 1)
    assert time.monotonic() - started < 30.0  # it did not wait max_linger for b
    assert _batches(intake) == (count + 1, total + 1)
    assert request in a.replies()
    intake.close()
    backend.close()


def test_after_a_wait_that_ran_out_batches_go_without_one_for_a_while(
    server, tmp_path, monkeypatch
):
    # Where the writers are slower to come back than the flush (their CPU
    # bounds them), the wait only keeps them and the disk in lockstep: after
    # one that ran out, the next batches are committed without waiting, 1,
    # then 3 in a row, ...; a wait that succeeds restores it.
    import threading

    monkeypatch.setattr("replicator.intake.ACTIVE_MAX_S", 60.0)
    backend = LmdbBackend(tmp_path / "store", durability="fsync")
    intake = Intake(backend, server.url + "?db=0", max_linger=2.0)
    a, b = (Client(server, str(backend.uuid)) for _ in range(2))
    for i, client in enumerate((a, b)):
        client.send(Op.SET_IMMUTABLE, key=b"first%d" % i, value=encode_value(i))
    run(intake, mirror_seq=2)
    intake._commit_s = 120.0  # the wait is max_linger
    keys = iter(range(100))

    def send(client: Client) -> None:
        client.send(Op.SET_IMMUTABLE, key=b"k%d" % next(keys), value=encode_value(0))

    def a_then_b() -> tuple[float, float]:
        """Batches (count, requests) taken for a's request and b's, sent 0.3 s later."""
        count, total = _batches(intake)
        timer = threading.Timer(0.3, send, (b,))
        send(a)
        timer.start()
        run(intake, mirror_seq=backend.last_seq + 2)
        timer.join()
        run(intake, mirror_seq=backend.last_seq)
        after = _batches(intake)
        return after[0] - count, after[1] - total

    send(a)  # b does not come: the wait runs out
    run(intake, mirror_seq=backend.last_seq + 1)
    assert (intake._gather_misses, intake._gather_skip) == (1, 1)
    # The next batch goes at once (a's request alone); b's then waits for a
    # in vain, the second miss in a row.
    assert a_then_b() == (2, 2)
    assert (intake._gather_misses, intake._gather_skip) == (2, 3)
    for _ in range(3):
        send(a)
        run(intake, mirror_seq=backend.last_seq + 1)
    assert intake._gather_skip == 0
    # The wait is back, and b comes within it: one batch, and no miss.
    assert a_then_b() == (1, 2)
    assert (intake._gather_misses, intake._gather_skip) == (0, 0)
    assert len(a.replies()) == 7 and len(b.replies()) == 3
    intake.close()
    backend.close()


def test_replies_refused_for_lack_of_memory_are_sent_again_not_lost(server, backend, caplog):
    # Only a key of another type loses a reply: when Redis refuses the
    # replies' writes for another reason (out of memory), nothing is
    # retired, and the replies go out once Redis takes writes again.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", backoff=(0.0, 0.0))
    request = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    run(intake, mirror_seq=0)  # committed; the "mirror" does not show it yet
    assert intake.owes_replies
    admin = server.client(db=MIRROR_CURSOR_DB)
    show(intake, 1)
    admin.config_set("maxmemory", 1)  # every write refused (noeviction)
    try:
        for _ in range(5):
            if intake.step(StuckMirror(1)).idle:
                intake.wait_for_requests(0.05)
        assert client.replies() == {}
        assert admin.xlen(client.session.requests) == 1  # not retired
        assert "could not be sent" not in caplog.text
    finally:
        admin.config_set("maxmemory", 0)
    run(intake, mirror_seq=1)
    assert client.replies() == {request: Reply(b"ok")}
    assert admin.xlen(client.session.requests) == 0
    intake.close()


def test_a_batch_waiting_for_writers_takes_no_more_than_batch_requests(
    server, tmp_path, monkeypatch
):
    import threading

    monkeypatch.setattr("replicator.intake.ACTIVE_MAX_S", 60.0)
    backend = LmdbBackend(tmp_path / "store", durability="fsync")
    intake = Intake(backend, server.url + "?db=0", batch=2, max_linger=2.0)
    a, b, c = (Client(server, str(backend.uuid)) for _ in range(3))
    for i, client in enumerate((a, b, c)):
        client.send(Op.SET_IMMUTABLE, key=b"first%d" % i, value=encode_value(i))
    run(intake, mirror_seq=3)
    intake._commit_s = 120.0  # the wait is max_linger
    count, total = _batches(intake)

    def late() -> None:
        for client in (b, c):
            client.send(Op.SET_IMMUTABLE, key=b"late%d" % id(client), value=encode_value(0))

    timer = threading.Timer(0.3, late)
    a.send(Op.SET_IMMUTABLE, key=b"a", value=encode_value(1))
    timer.start()
    run(intake, mirror_seq=6)  # (the last request waits for a and b, up to max_linger)
    timer.join()
    run(intake, mirror_seq=6)
    # Three writers were active, but a batch holds at most two requests.
    assert _batches(intake) == (count + 2, total + 3)
    assert all(len(client.replies()) == 2 for client in (a, b, c))
    intake.close()
    backend.close()


def test_writers_gone_quiet_are_forgotten(server, tmp_path, monkeypatch):
    # Many reply tokens (clients that come and go, or a hostile one making a
    # new token per request) cost the fsync batch's wait memory only for
    # those seen lately.
    backend = LmdbBackend(tmp_path / "store", durability="fsync")
    intake = Intake(backend, server.url + "?db=0")
    now = time.monotonic()
    intake._writers = {b"%032x" % i: now - 10.0 for i in range(10_000)}
    intake._writers[b"busy"] = now
    assert intake._active_writers(now) == 1
    assert intake._writers == {b"busy": now}
    intake.close()
    backend.close()


def test_after_large_requests_reads_take_what_batch_bytes_holds(server, backend):
    # A read is bounded by count, not bytes: after large requests the next
    # reads take as many as batch_bytes holds of the largest (one here),
    # and their count grows back twofold a read once requests are small.
    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0", batch_bytes=100_000)
    run(intake, mirror_seq=0)  # connected, idle
    large = encode_value(b"x" * 60_000)
    client.send(Op.SET_IMMUTABLE, key=b"big0", value=large)
    run(intake, mirror_seq=1)
    assert intake._read_count == 1
    for i in range(3):
        client.send(Op.SET_IMMUTABLE, key=b"big%d" % (i + 1), value=large)
    count, total = _batches(intake)
    run(intake, mirror_seq=4, steps=10)
    assert _batches(intake) == (count + 3, total + 3)  # one a read, one a batch
    assert len(client.replies()) == 4
    for i in range(3):
        client.send(Op.SET_IMMUTABLE, key=b"small%d" % i, value=encode_value(i))
        run(intake, mirror_seq=5 + i)
    assert intake._read_count == 8  # 1 -> 2 -> 4 -> 8
    intake.close()


def test_the_reply_script_sends_nothing_once_a_promotion_the_daemon_lacks_is_recorded(
    server, backend
):
    # Found by review: an old primary's daemon that held the mirror after a
    # promotion (Redis had forgotten it) acknowledged writes into its abandoned
    # history, also after the new primary's daemon had recorded the promotion
    # again. The replies' script now compares the promotion hash with the one
    # the daemon knows; refusals (nothing applied) still go out.
    from replicator.intake import _Owed, _reply_source
    from replicator.promotion import Promotion, promotion_key, record_promotion
    from telstate.redis import mirror_cursor_key

    client = Client(server, str(backend.uuid))
    intake = Intake(backend, server.url + "?db=0")
    intake.step(StuckMirror(0))  # connect
    control = server.client(db=MIRROR_CURSOR_DB)
    reply = control.register_script(_reply_source())
    control.hset(
        mirror_cursor_key(0), mapping={"store": str(backend.uuid), "seq": 3, "state": "ready"}
    )
    promotion = Promotion(str(backend.uuid), 2, "00" * 32, "new-host", "/new")
    assert record_promotion(control, 0, promotion, None)

    def send(owed: _Owed, need: int) -> int:
        arguments = intake._reply_arguments([owed], need=need)
        assert arguments["keys"][2] == promotion_key(0)
        return reply(keys=arguments["keys"], args=arguments["args"])

    applied = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    ok = _Owed(3, None, applied, client.session.token, Reply(b"ok"), 10**13, 0, 0.0)
    assert send(ok, 3) == 0  # the daemon knows no promotion
    assert client.replies() == {}
    fenced = StuckMirror(3)
    fenced.promotion = None
    intake.step(fenced)
    assert send(ok, 3) == 0
    refused = client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    error = Reply(b"error", error=b"ReadOnlyError", message="refused")
    assert send(_Owed(0, None, refused, client.session.token, error, 10**13, 0, 0.0), 0) == 1
    assert client.replies() == {refused: error}
    # A daemon whose store holds the promotion sends its replies.
    holder = Intake(backend, server.url + "?db=0")
    holder.step(StuckMirror(0))
    knows = StuckMirror(3)
    knows.promotion = promotion.chain.encode()
    holder.step(knows)
    arguments = holder._reply_arguments([ok], need=3)
    assert reply(keys=arguments["keys"], args=arguments["args"]) == 1
    assert client.replies()[applied] == Reply(b"ok")
    intake.close()
    holder.close()


def test_an_old_primarys_intake_acknowledges_nothing_once_a_promotion_is_recorded(server, backend):
    # The whole path: the intake commits a request into the old primary, its
    # reply rides with the mirror's step (sent ahead); the step is refused,
    # the sink fenced, and the reply never goes out, then or later.
    from replicator.cursor import read_cursor
    from replicator.promotion import Promotion, record_promotion
    from replicator.redis_sink import SinkState

    client = Client(server, str(backend.uuid))
    sink, mirror, intake = serving(server, backend)
    before = read_cursor(sink.client)
    control = server.client(db=MIRROR_CURSOR_DB)
    promotion = Promotion(str(backend.uuid), 1, "00" * 32, "new-host", "/new")
    assert record_promotion(control, 0, promotion, None)
    client.send(Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    intake.wait_for_requests(1.0)
    intake.step(mirror)  # commits it into the old primary; the step is refused
    for _ in range(3):
        intake.wait_for_requests(0.05, mirror)
        intake.step(mirror)
        mirror.step()
    assert backend.last_seq == 1  # committed into the abandoned history
    assert client.replies() == {}
    assert sink.state == SinkState.FENCED and mirror.promotion is None
    intake.close(mirror)
    assert client.replies() == {}
    assert read_cursor(sink.client) == before
    sink.close()
