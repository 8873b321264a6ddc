"""The intake's commit of write requests: apply_requests and the sweep of its records.

These call :func:`replicator.intake.apply_requests` and
:func:`~replicator.intake.sweep_requests` on a real store with requests
decoded as the intake decodes them (no Redis needed: the intake's
exchanges are tested in test_intake.py).
"""

from __future__ import annotations

import itertools
import time

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import replicator.intake as intake
import telstate.remote
from replicator.intake import apply_requests, sweep_requests
from telstate import TelescopeState
from telstate.encoding import encode_value
from telstate.errors import StoreError
from telstate.lmdb import LmdbBackend
from telstate.lmdb.layout import REQUEST_PREFIX, RequestRecord
from telstate.log import Op, Writer
from telstate.remote import MAX_TIMEOUT, Request, _Session, decode_request, encode_request

_ids = itertools.count(1)
REMOTE = Writer("elsewhere", 42, "w")


@pytest.fixture
def backend(tmp_path):
    backend = LmdbBackend(tmp_path / "store", durability="none")
    yield backend
    backend.close()


def request(
    backend: LmdbBackend,
    op: Op = Op.ADD_MUTABLE,
    *,
    writer: Writer = REMOTE,
    sent_ms: int | None = None,
    timeout: float = 10.0,
    request_id: bytes | None = None,
    **write,
) -> Request:
    """A request as the intake decodes it from its stream entry."""
    if op is Op.ADD_MUTABLE:
        write.setdefault("key", b"sensor")
        write.setdefault("value", encode_value(1.0))
        write.setdefault("timestamp", 1.0)
    request_id = request_id or b"tok:%d" % next(_ids)
    fields = encode_request(
        request_id, b"tok", str(backend.uuid), op, timeout=timeout, writer=writer, **write
    )
    sent_ms = int(time.time() * 1000) if sent_ms is None else sent_ms
    return decode_request(b"%d-0" % sent_ms, fields)


def now_ms() -> int:
    return int(time.time() * 1000)


def test_a_request_is_applied_once_however_often_delivered(backend):
    first = request(backend, value=encode_value(1), timestamp=1.0)
    # Delivered twice in one batch, then again in a later batch.
    outcomes = apply_requests(backend, [first, first], now_ms())
    again = apply_requests(backend, [first], now_ms())
    assert [event.value for event in backend.events()] == [encode_value(1)]
    assert outcomes[0] == outcomes[1] == again[0]
    assert outcomes[0].status == b"ok" and outcomes[0].seq == 1
    assert backend.request_records([first.request_id]) == [outcomes[0]]


def test_each_event_records_its_own_requests_writer(backend):
    alice = Writer("alice-host", 1, "a")
    bob = Writer("bob-host", 2, None)
    writers = [alice, alice, bob, alice, bob, bob]
    batch = [request(backend, writer=w, timestamp=float(i)) for i, w in enumerate(writers)]
    apply_requests(backend, batch, now_ms())
    apply_requests(backend, [request(backend, writer=bob, timestamp=10.0)], now_ms())
    backend.add_mutable(b"local", encode_value(0), 0.0)
    events = list(backend.events())
    assert [event.writer for event in events[:-1]] == [*writers, bob]
    assert events[-1].writer.host not in ("alice-host", "bob-host")  # this process's own


def test_refused_operations_are_recorded_and_the_batch_goes_on(backend):
    immutable = request(backend, Op.SET_IMMUTABLE, key=b"k", value=encode_value(1))
    conflict = request(backend, Op.SET_IMMUTABLE, key=b"k", value=encode_value(2))
    wrong_type = request(backend, key=b"k", timestamp=1.0)
    after = request(backend, key=b"s", timestamp=1.0)
    outcomes = apply_requests(backend, [immutable, conflict, wrong_type, after], now_ms())
    assert [o.status for o in outcomes] == [b"ok", b"exists", b"error", b"ok"]
    assert outcomes[1].value == encode_value(1)
    assert outcomes[2].error == b"immutable"
    assert backend.last_seq == 2
    # The refusals are recorded too: delivered again, they are answered alike.
    assert apply_requests(backend, [conflict, wrong_type], now_ms()) == outcomes[1:3]


def test_an_expired_request_is_not_applied_and_neither_is_its_later_resend(backend):
    stale = request(backend, sent_ms=now_ms() - 20_000, timeout=10.0)
    (outcome,) = apply_requests(backend, [stale], now_ms())
    assert outcome.error == b"expired" and outcome.seq == 0
    assert backend.last_seq == 0
    assert backend.request_records([stale.request_id]) == [outcome]
    # A resend of it, sent later with the time its writer had left: its own
    # entry time makes it look young enough, but its writer may already have
    # been told "expired, not applied" (found by review).
    resent = request(backend, request_id=stale.request_id, timeout=5.0)
    assert apply_requests(backend, [resent], now_ms()) == [outcome]
    assert backend.last_seq == 0
    # Both copies in one batch: the same.
    again = request(backend, sent_ms=now_ms() - 20_000, timeout=10.0)
    young = request(backend, request_id=again.request_id, timeout=5.0)
    assert [o.error for o in apply_requests(backend, [again, young], now_ms())] == [
        b"expired",
        b"expired",
    ]
    assert backend.last_seq == 0


def test_a_request_stamped_ahead_of_the_servers_clock_is_refused_and_so_is_its_resend(backend):
    # Its id hides how long it waited: it may be older than its timeout.
    ahead = request(backend, sent_ms=now_ms() + 60_000, timeout=10.0)
    before = now_ms()
    (outcome,) = apply_requests(backend, [ahead], before)
    assert outcome.error == b"clock" and outcome.seq == 0
    assert backend.last_seq == 0
    # Kept as long as one sent now (not until a minute after the id's time).
    assert outcome.expires_ms == before + 10_000
    assert backend.request_records([ahead.request_id]) == [outcome]
    # A resend of it, stamped by the server's clock again: the same answer.
    resent = request(backend, request_id=ahead.request_id, timeout=5.0)
    assert apply_requests(backend, [resent], now_ms()) == [outcome]
    assert backend.last_seq == 0


def test_a_request_stamped_within_the_tolerance_counts_as_sent_now(backend):
    now = now_ms()
    near = request(backend, sent_ms=now + intake.CLOCK_TOLERANCE_MS, timeout=1.0)
    (outcome,) = apply_requests(backend, [near], now)
    assert outcome.status == b"ok" and backend.last_seq == 1
    assert outcome.expires_ms == now + 1000


@pytest.mark.parametrize("op", [Op.ADD_MUTABLE, Op.CLEAR])
def test_a_request_whose_record_is_damaged_is_not_applied_again(backend, op):
    """Its outcome is unknown: a clear applied again would undo the writes after it."""
    first = request(backend) if op is Op.ADD_MUTABLE else request(backend, op=Op.CLEAR)
    with backend.write() as wtxn:
        wtxn.txn.put(REQUEST_PREFIX + first.request_id, b"\xc1junk", db=wtxn.tables.meta)
        wtxn.changed = True
    (outcome,) = apply_requests(backend, [first], now_ms())
    assert (outcome.status, outcome.error, outcome.seq) == (b"error", b"damaged", 0)
    assert "whether it was applied is unknown" in outcome.message
    assert backend.last_seq == 0
    # The writer raises the store's error; the record says so from now on.
    with pytest.raises(StoreError, match="damaged"):
        telstate.remote.Reply(b"error", b"", outcome.error, outcome.message).result()
    assert backend.request_records([first.request_id]) == [outcome]


def test_a_damaged_record_keeps_its_request_from_being_applied_past_a_sweep(backend):
    """Found by review: the sweep deleted a damaged record at once (it has no expiry),
    and a copy of its clear, still within its deadline, undid the write after it."""
    ts = TelescopeState(backend)
    ts["before"] = 1
    clear = request(backend, op=Op.CLEAR)
    assert apply_requests(backend, [clear], now_ms())[0].status == b"ok"
    ts["after"] = 2
    for sweep_first in (False, True):
        with backend.write() as wtxn:
            wtxn.txn.put(REQUEST_PREFIX + clear.request_id, b"\xc1junk", db=wtxn.tables.meta)
            wtxn.changed = True
        if sweep_first:  # the sweep reaches the damaged record before any copy
            sweep_requests(backend, REQUEST_PREFIX, now_ms())
        (copy,) = apply_requests(backend, [clear], now_ms())
        assert copy.error == b"damaged"
        sweep_requests(backend, REQUEST_PREFIX, now_ms())
        (again,) = apply_requests(backend, [clear], now_ms())
        assert again.error == b"damaged"
        assert ts["after"] == 2 and backend.last_seq == 3


class _Clock:
    """Stands for the time module in telstate.remote: time() gives the readings in turn."""

    def __init__(self, readings: list[float]) -> None:
        self.readings = iter(readings)

    def time(self) -> float:
        return next(self.readings)


def test_the_records_of_a_batch_from_many_clients_lie_together_and_are_found_again(
    backend, monkeypatch
):
    # Each round, eight clients send one request each (as eight writers whose
    # requests the daemon reads in one batch): the ids sort by sending time, so
    # the batch's records lie side by side in the table (one page to write).
    sessions = [_Session(0, str(backend.uuid), 10.0, f"w{i}") for i in range(8)]
    rounds = 50
    start = time.time()
    # Every client reads the clock once a request, a millisecond later each round.
    readings = [start + r / 1000 for r in range(rounds) for _ in sessions]
    monkeypatch.setattr(telstate.remote, "time", _Clock(readings))
    batches = []
    for r in range(rounds):
        batch = []
        for i, session in enumerate(sessions):
            request_id, fields = session.request(
                Op.ADD_MUTABLE, 10.0, key=b"k%d" % i, value=encode_value(r), timestamp=float(r)
            )
            batch.append(decode_request(b"%d-%d" % (now_ms(), i), fields))
        batches.append(batch)
    monkeypatch.undo()
    outcomes = [apply_requests(backend, batch, now_ms()) for batch in batches]
    in_table = sorted(record_ids(backend))
    sent = [request.request_id for batch in batches for request in batch]
    assert [rid.split(b":")[0] for rid in in_table] == [rid.split(b":")[0] for rid in sent]
    for r, batch in enumerate(batches):
        ids = {request.request_id for request in batch}
        first = in_table.index(min(ids))
        assert set(in_table[first : first + len(batch)]) == ids
        # Found again: delivered once more, every request gets its outcome, none is applied.
        assert apply_requests(backend, batch, now_ms()) == outcomes[r]
    assert backend.last_seq == rounds * len(sessions)


def put_records(backend: LmdbBackend, records: dict[bytes, bytes]) -> None:
    with backend.write() as wtxn:
        for request_id, data in records.items():
            wtxn.txn.put(REQUEST_PREFIX + request_id, data, db=wtxn.tables.meta)
        wtxn.changed = True


def record_ids(backend: LmdbBackend) -> set[bytes]:
    with backend.write() as wtxn:
        cursor = wtxn.txn.cursor(db=wtxn.tables.meta)
        found = set()
        if cursor.set_range(REQUEST_PREFIX):
            for key in cursor.iternext(values=False):
                if not key.startswith(REQUEST_PREFIX):
                    break
                found.add(key[len(REQUEST_PREFIX) :])
        return found


def sweep_all(backend: LmdbBackend, now: int, sweeps: int) -> None:
    start = REQUEST_PREFIX
    for _ in range(sweeps):
        start = sweep_requests(backend, start, now)


def test_the_sweep_deletes_expired_records_and_keeps_damaged_ones_an_expiry_long(backend):
    now = now_ms()
    horizon = now - int(MAX_TIMEOUT * 1000)

    def record(expires_ms: int) -> bytes:
        return RequestRecord(expires_ms, 1, b"ok", b"", b"", "").encode()

    put_records(
        backend,
        {
            b"old": record(horizon - 1),
            b"edge": record(horizon),
            b"live": record(now + 10_000),
            b"damaged": b"\xc1",
            b"wrong-type": msgpack.packb(["x", 1, b"ok", b"", b"", ""]),
        },
    )
    backend.set_immutable(b"key", encode_value(1))  # the meta table holds more than records
    sweep_all(backend, now, 3)
    assert record_ids(backend) == {b"edge", b"live", b"damaged", b"wrong-type"}
    # A damaged record's request's outcome is unknown: it says so, from now on.
    for damaged in backend.request_records([b"damaged", b"wrong-type"]):
        assert (damaged.expires_ms, damaged.error) == (now, b"damaged")
    sweep_all(backend, now + int(MAX_TIMEOUT * 1000) + 1, 3)
    assert record_ids(backend) == {b"live"}
    assert backend.get(b"key") == (encode_value(1), None)


def test_the_sweep_keeps_up_with_any_rate_of_requests(backend, monkeypatch):
    # A sweep looks at a share of the records: however many piled up, a pass
    # over them takes a number of sweeps of the order of SWEEP_PASS (a
    # fixed 64 records a sweep would take 300 sweeps here).
    monkeypatch.setattr(intake, "SWEEP_PASS", 10)
    now = now_ms()
    expired = RequestRecord(now - int(MAX_TIMEOUT * 1000) - 1, 1, b"ok", b"", b"", "").encode()
    live = RequestRecord(now + 10_000, 1, b"ok", b"", b"", "").encode()
    records = {b"tok:%d" % i: expired for i in range(20_000)}
    records.update({b"tok:live%d" % i: live for i in range(50)})
    put_records(backend, records)
    sweep_all(backend, now, 60)
    assert record_ids(backend) == {b"tok:live%d" % i for i in range(50)}


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**63),
    st.sampled_from([b"ok", b"exists", b"error"]),
    st.binary(max_size=20),
    st.text(max_size=20),
)
def test_the_expiry_read_alone_is_the_decoded_one(expires_ms, seq, status, value, message):
    data = RequestRecord(expires_ms, seq, status, value, b"", message).encode()
    assert RequestRecord.expires_of(data) == RequestRecord.decode(data).expires_ms
    assert RequestRecord.expires_of(memoryview(data)) == expires_ms


@pytest.mark.parametrize(
    "data",
    [b"", b"\x96", b"\xc1", msgpack.packb([1.5, 1, b"ok", b"", b"", ""]), msgpack.packb([1, 2])],
)
def test_the_expiry_of_a_damaged_record_is_minus_one(data):
    assert RequestRecord.expires_of(data) == -1


@given(
    op=st.sampled_from([Op.SET_IMMUTABLE, Op.ADD_MUTABLE, Op.SET_INDEXED, Op.DELETE, Op.CLEAR]),
    key=st.binary(min_size=1, max_size=40),
    sub_key=st.binary(max_size=40),
    value=st.binary(max_size=40),
    timestamp=st.floats(allow_nan=False),
    timeout=st.floats(min_value=0.001, max_value=MAX_TIMEOUT),
    sent_ms=st.integers(min_value=0, max_value=2**53),
    writer=st.builds(
        Writer,
        st.text(max_size=10),
        st.integers(0, 2**31),
        st.none() | st.text(min_size=1, max_size=10),
    ),
)
def test_a_decoded_request_is_the_encoded_one(
    op, key, sub_key, value, timestamp, timeout, sent_ms, writer
):
    write = {"key": key}
    if op is Op.CLEAR:
        write = {}
    if op in (Op.SET_IMMUTABLE, Op.ADD_MUTABLE, Op.SET_INDEXED):
        write["value"] = value
    if op is Op.SET_INDEXED:
        write["sub_key"] = sub_key
    if op is Op.ADD_MUTABLE:
        write["timestamp"] = timestamp
    fields = encode_request(b"tok:1", b"tok", "store", op, timeout=timeout, writer=writer, **write)
    decoded = decode_request(b"%d-3" % sent_ms, fields)
    assert decoded.op is op and (decoded.request_id, decoded.reply_to) == (b"tok:1", b"tok")
    assert (decoded.key, decoded.sub_key, decoded.value) == (
        write.get("key", b""),
        write.get("sub_key", b""),
        write.get("value", b""),
    )
    assert decoded.timestamp == write.get("timestamp")
    assert decoded.writer == writer and decoded.store == "store"
    assert decoded.size == sum(len(name) + len(data) for name, data in fields.items())
    assert decoded.sent_ms == sent_ms
    assert decoded.expires_ms == sent_ms + decoded.timeout_ms


def test_the_committed_events_are_those_the_log_gives_back(backend):
    """apply_requests hands the mirror its events: exactly the log's, and only those."""
    alice, bob = Writer("alice-host", 1, "a"), Writer("bob-host", 2, None)
    big = encode_value("x" * 5000)  # a value too long to be stored inline
    first = request(backend, key=b"s", value=encode_value(1), timestamp=-0.0, writer=alice)
    batches = [
        [
            first,
            first,  # delivered twice: one event
            request(backend, key=b"s", value=big, timestamp=2.5, writer=bob),
            request(backend, key=b"s", value=big, timestamp=2.5),  # the same sample: no event
            request(backend, Op.SET_IMMUTABLE, key=b"i", value=encode_value(1), writer=bob),
            request(backend, Op.SET_IMMUTABLE, key=b"i", value=encode_value(2)),  # exists
            request(backend, key=b"i", timestamp=1.0),  # refused: no event
            request(backend, Op.SET_INDEXED, key=b"x", sub_key=encode_value("a"), value=big),
            request(backend, sent_ms=now_ms() - 20_000),  # expired: no event
        ],
        [first],  # all seen before: no event
        [
            request(backend, Op.DELETE, key=b"s"),
            request(backend, Op.DELETE, key=b"s"),  # gone already
            request(backend, Op.CLEAR),
            request(backend, Op.CLEAR),  # nothing to clear
            request(backend, Op.SET_INDEXED, key=b"x", sub_key=encode_value(1), value=big),
        ],
    ]
    handed: list = []
    for batch in batches:
        apply_requests(backend, batch, now_ms(), handed)
    assert handed == list(backend.events())
    assert [event.op for event in handed] == [
        Op.ADD_MUTABLE,
        Op.ADD_MUTABLE,
        Op.SET_IMMUTABLE,
        Op.SET_INDEXED,
        Op.DELETE,
        Op.CLEAR,
        Op.SET_INDEXED,
    ]


def test_events_of_a_batch_that_fails_are_not_handed_on(backend, monkeypatch):
    real = intake._apply_one

    def fail_after_one(wtxn, request):
        if wtxn.last_seq:  # the first request's event is in the transaction
            raise StoreError("the disk is on fire")
        return real(wtxn, request)

    monkeypatch.setattr(intake, "_apply_one", fail_after_one)
    handed: list = []
    batch = [request(backend, key=b"s", timestamp=1.0), request(backend, key=b"t", timestamp=1.0)]
    with pytest.raises(StoreError):
        apply_requests(backend, batch, now_ms(), handed)
    assert handed == [] and backend.last_seq == 0


def test_a_request_that_appends_nothing_records_the_last_seq_it_saw(backend):
    """Its reply waits for the mirror to hold what the request saw: the log's last event then."""
    sample = request(backend, key=b"s", value=encode_value(1), timestamp=1.0)
    outcomes = apply_requests(
        backend,
        [
            sample,
            request(backend, key=b"s", value=encode_value(1), timestamp=1.0),  # the same sample
            request(backend, Op.DELETE, key=b"gone"),
            request(backend, Op.SET_IMMUTABLE, key=b"i", value=encode_value(1)),
            request(backend, Op.SET_IMMUTABLE, key=b"i", value=encode_value(2)),  # exists
            request(backend, key=b"i", timestamp=2.0),  # refused
        ],
        now_ms(),
    )
    assert [(o.seq, o.status) for o in outcomes] == [
        (1, b"ok"),
        (1, b"ok"),
        (1, b"ok"),
        (2, b"ok"),
        (2, b"exists"),
        (2, b"error"),
    ]
    (cleared,) = apply_requests(backend, [request(backend, Op.CLEAR)], now_ms())
    (nothing,) = apply_requests(backend, [request(backend, Op.CLEAR)], now_ms())
    assert (cleared.seq, nothing.seq) == (3, 3)


def test_a_follower_refusing_a_request_whose_record_is_damaged_says_it_is_unknown(backend):
    from replicator.intake import refuse_requests

    first = request(backend)
    with backend.write() as wtxn:
        wtxn.txn.put(REQUEST_PREFIX + first.request_id, b"\xc1junk", db=wtxn.tables.meta)
        wtxn.changed = True
    (outcome,) = refuse_requests(backend, [first], "the store is a follower")
    assert (outcome.error, outcome.seq) == (b"damaged", 0)  # not "readonly: not applied"
