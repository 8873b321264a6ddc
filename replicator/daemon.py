"""The daemon: drives the Redis sink and the snapshot sink until told to stop.

The Redis sink runs in the calling (main) thread: it applies batches as
long as there are events, and when it is level with the log it sleeps in
:meth:`~telstate.lmdb.LmdbBackend.wait_for_commit`, which wakes on the
store's commit notification (or its 50 ms poll of LMDB's transaction id),
so a commit reaches Redis within milliseconds and an idle daemon does not
spin. Snapshots run in a thread of their own so that writing a large file
never holds up the mirror. With ``--accept-writes`` the write intake
(:mod:`replicator.intake`) runs in a thread too: it waits for requests in
Redis, commits them, and steps the Redis sink itself to project them at
once before it replies (the two threads take turns at the sink, see
:class:`SharedSink`); while the mirror cannot take them (rebuilding,
Redis down), it waits for the mirror's thread to move it.

The log stream for followers (:mod:`replicator.log_stream`) is stepped
in the mirror's thread, right after each step of the mirror, while this
daemon holds the mirror: a batch reaches the stream one Redis round trip
after it reaches the mirror, and the mirror never waits for the stream
longer than one append. While the mirror catches up in full batches the
stream waits, so that a backlog reaches the mirror as fast as without it.

A daemon refused after a promotion (its store is the old primary, see
:mod:`replicator.promotion`) stops, with the reason in :attr:`Daemon.failure`
and :attr:`Daemon.fenced` (the command exits with its own status, which a
supervisor should not restart).

Stopping (SIGTERM, SIGINT, or :attr:`Daemon.stop` set) lets the current
batch finish: a batch is one atomic script call, so there is never a half
batch to finish, only the next one not to start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from telstate.errors import StoreError
from telstate.log import Event

from .intake import Intake
from .log_stream import LogStream
from .metrics import Metrics
from .redis_sink import RedisSink, SinkState, Step
from .snapshot_sink import SnapshotSink
from .source import EventSource

logger = logging.getLogger(__name__)

# Longest sleep between checks of the stop flag while idle: how quickly a
# signal takes effect (waiting for commits is cheap, so short is fine).
_IDLE_WAIT = 0.25
# How often the daemon reports its progress in the log.
_PROGRESS_INTERVAL = 60.0
# How long the mirror's thread lets pass after a commit the intake projected
# (see Daemon._wait_for_commit): a bound on how much later than the mirror
# the log stream shows remote writes, and on how late a local commit made
# meanwhile reaches the mirror.
_ECHO_DELAY = 0.005
# How often the mirror's lag is measured for the metrics.
_LAG_INTERVAL = 1.0


def stop_on_signals(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT set `stop` (call from the main thread)."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("%s received: stopping after the current batch", signal.strsignal(signum))
        # Not stop.set() here: the handler runs in the main thread between
        # two bytecodes, maybe inside stop.wait() with the event's lock
        # held, and set() takes that lock (not reentrant): the daemon would
        # hang for good. A thread of its own takes it once the main thread
        # lets it go.
        threading.Thread(target=stop.set, name="stop-on-signal").start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


class SharedSink:
    """The Redis sink, stepped by the mirror's thread and by the intake's, one at a time.

    Attributes
    ----------
    turn
        Held while stepping the sink; notified whenever the mirror moves.
    moves
        How many steps have moved the mirror.
    """

    def __init__(self, sink: RedisSink) -> None:
        self.sink = sink
        self.turn = threading.Condition()
        self.moves = 0

    @property
    def seq(self) -> int | None:
        """The last event the mirror holds, while it is complete."""
        return self.sink.seq

    @property
    def promotion(self) -> bytes | None:
        """The promotion the sink knows (None once it is fenced), for the intake's replies."""
        return self.sink.promotion

    def step(self) -> Step:
        """One step of the sink."""
        with self.turn:
            step = self.sink.step()
            if step.applied:
                self._moved()
            return step

    def catch_up(
        self, seq: int, then: tuple[Any, ...] | None = None, events: Sequence[Event] = ()
    ) -> tuple[int | None, Any]:
        """Step the sink until the mirror holds `seq` or a step moves nothing.

        `then` is sent after the script of each step whose events reach
        `seq`, in the same write, until one such step gives a reply to it
        other than 0 (see :meth:`RedisSink.step`). `events`, just committed,
        spare the steps reading those of them that follow the mirror's
        cursor back from the log.

        Returns
        -------
        The mirror's seq (None while it is incomplete), and the last reply
        to `then` (None if it was never sent).
        """
        answer = None
        with self.turn:
            while (self.sink.seq or 0) < seq:
                step = self.sink.step(then, then_seq=seq, events=events)
                if step.then is not None:
                    answer = step.then
                    if not isinstance(answer, int) or answer != 0:
                        then = None
                if not step.applied:
                    break
                self._moved()
            return self.sink.seq, answer

    def send_ahead(self, seq: int, then: tuple[Any, ...], events: Sequence[Event]) -> int | None:
        """Send the step that projects `events` up to `seq`, and `then`, without waiting.

        See :meth:`RedisSink.send_ahead`; :meth:`collect` (or any later
        step) reads its answers.
        """
        with self.turn:
            if self.sink.settle():  # one left ahead (the intake's, dropped after a failure)
                self._moved()
            return self.sink.send_ahead(then, seq, events)

    def collect(self, ticket: int) -> tuple[int | None, Any, float]:
        """Wait for the answers of the step sent ahead as `ticket`.

        Returns
        -------
        The mirror's seq after it, the answer to its `then` (None if lost),
        and when it was read (monotonic time).
        """
        with self.turn:
            if self.sink.settle():
                self._moved()
            settled = self.sink.settled
            if settled is None or settled[0] != ticket:
                return self.sink.seq, None, time.monotonic()
            return self.sink.seq, settled[2], settled[3]

    def fileno(self) -> int | None:
        """The mirror's socket while a step is ahead (None if none is): readable once answered.

        Read with the turn held: the mirror's thread may read the answers
        (and close the socket) once it is let go, so a wait on it must be
        bounded and must take a closed socket for an answer.
        """
        with self.turn:
            return self.sink.fileno()

    def _moved(self) -> None:
        """Count a step that moved the mirror, and wake those waiting for one."""
        self.moves += 1
        self.turn.notify_all()

    def hold(self) -> threading.Condition:
        """Hold the turn (a context manager) while the intake commits and projects."""
        return self.turn

    def wait_for_move(self, moves: int, timeout: float) -> None:
        """Wait up to `timeout` seconds for a step after the `moves`-th to move the mirror."""
        with self.turn:
            if self.moves == moves:
                self.turn.wait(timeout)


class Daemon:
    """Keeps a Redis mirror and/or RDB snapshots of one store up to date.

    Parameters
    ----------
    source
        The store.
    redis_sink, snapshot_sink
        What to keep up to date (either may be None, not both).
    intake
        Serves write requests for the mirror (needs `redis_sink`).
    log_stream
        The log stream for followers (needs `redis_sink`).

    Attributes
    ----------
    stop
        Set it (or send SIGTERM / SIGINT after :meth:`handle_signals`) to
        make :meth:`run` or :meth:`run_once` return after the current batch.
    failure
        Why the daemon stopped on its own (refused after a promotion, or its
        write intake failed), or None.
    fenced
        Why it was refused after a promotion (the promotion hash records one
        its store lacks, or cannot be read), or None: restarting it cannot
        help, unlike after another failure.
    """

    def __init__(
        self,
        source: EventSource,
        redis_sink: RedisSink | None,
        snapshot_sink: SnapshotSink | None,
        intake: Intake | None = None,
        log_stream: LogStream | None = None,
    ) -> None:
        if redis_sink is None and snapshot_sink is None:
            raise ValueError("nothing to do: give a Redis URL, a snapshot directory or both")
        if (intake is not None or log_stream is not None) and redis_sink is None:
            raise ValueError("writes and the log stream need the mirror: give a Redis URL")
        self.source = source
        self.redis_sink = redis_sink
        self.snapshot_sink = snapshot_sink
        self.intake = intake
        self.log_stream = log_stream
        self.failure: str | None = None
        self.fenced: str | None = None
        self.metrics = intake.metrics if intake is not None else Metrics()
        self.stop = redis_sink.stop if redis_sink is not None else threading.Event()
        self.shared = SharedSink(redis_sink) if redis_sink is not None else None
        # Rung when the mirror's side is connected to Redis again after a
        # failure: the intake, waiting out its own retry delay, connects at
        # once and announces that writes are accepted (until then a client
        # made meanwhile finds the mirror read-only).
        self._intake_bell = threading.Event()
        if intake is not None and redis_sink is not None:
            redis_sink.on_reconnect = self._wake_intake

    def _wake_intake(self) -> None:
        assert self.intake is not None
        self.intake.wake()
        self._intake_bell.set()

    def handle_signals(self) -> None:
        """Make SIGTERM and SIGINT set :attr:`stop` (call from the main thread)."""
        stop_on_signals(self.stop)

    def run(self) -> None:
        """Replicate until :attr:`stop` is set."""
        snapshots = None
        if self.snapshot_sink is not None:
            snapshots = threading.Thread(
                target=self.snapshot_sink.run, args=(self.stop,), name="snapshots", daemon=True
            )
            snapshots.start()
        writes = None
        if self.intake is not None:
            writes = threading.Thread(
                target=self._serve_writes, args=(self.intake,), name="intake", daemon=True
            )
            writes.start()
        try:
            if self.redis_sink is not None:
                self._follow(self.redis_sink, until_seq=None)
            else:
                while not self.stop.wait(_IDLE_WAIT):
                    pass
        finally:
            self.stop.set()
            if snapshots is not None:
                snapshots.join()
            if writes is not None:
                writes.join()

    def run_once(self) -> bool:
        """Bring the mirror up to the log's current end, then write a snapshot if configured.

        Returns
        -------
        True if everything was done, False if :attr:`stop` cut it short.
        """
        target = self.source.last_seq
        logger.info("catching up to seq %d", target)
        if self.redis_sink is not None and not self._follow(self.redis_sink, until_seq=target):
            return False
        if self.snapshot_sink is not None:
            try:
                self.snapshot_sink.write()
            except (OSError, StoreError) as error:
                logger.error("snapshot failed: %s", error)
                return False
        return not self.stop.is_set()

    def _follow(self, sink: RedisSink, until_seq: int | None) -> bool:
        """Step the sink until stopped or (if given) the mirror holds `until_seq`.

        Returns
        -------
        Whether `until_seq` was reached (by the mirror and the log stream).
        """
        reported = time.monotonic()
        measured = 0.0
        rebuilds = sink.rebuilds
        stream = self.log_stream
        while not self.stop.is_set():
            if until_seq is not None:
                if self._reached(sink, until_seq):
                    return True
                if sink.state == SinkState.CONFLICT:
                    return False  # another replicator has the mirror: nothing to finish
            assert self.shared is not None
            step = self.shared.step()
            # The mirror first: while it catches up in full batches the stream
            # waits, then catches up itself in batches as large.
            if (
                stream is not None
                and sink.state == SinkState.TAIL
                and step.applied < sink.batch_events
            ):
                stream_step = stream.step()
                # A stream waiting out a Redis failure, or level with the log as it
                # read it, leaves the mirror idle: new commits, not its retry, call
                # for the next step (those of the intake after _ECHO_DELAY, so that
                # busy remote writers' events reach the stream in batches).
                step = Step(
                    step.applied,
                    wait=min(step.wait, stream_step.wait),
                    idle=step.idle and (not stream_step.applied or stream_step.idle),
                )
            refusal = sink.fenced or (stream.refusal if stream is not None else None)
            if refusal is not None:
                self.failure = self.fenced = refusal
                self.stop.set()
                return False
            if sink.rebuilds != rebuilds:  # (the intake's thread may have stepped it too)
                self.metrics.rebuilds.inc(sink.rebuilds - rebuilds)
                rebuilds = sink.rebuilds
            now = time.monotonic()
            if now - measured >= _LAG_INTERVAL:
                measured = now
                self._measure_lag(sink)
            if now - reported >= _PROGRESS_INTERVAL:
                reported = now
                logger.info("mirror %s at seq %s (%s)", sink.url, sink.seq, sink.state.value)
            if step.wait <= 0.0:
                continue
            seq = sink.seq
            if until_seq is not None and self._reached(sink, until_seq):
                return True
            if step.idle and seq is not None:
                self._wait_for_commit(sink, seq, min(step.wait, _IDLE_WAIT))
            else:
                self.stop.wait(step.wait)
        return False

    def _reached(self, sink: RedisSink, seq: int) -> bool:
        """Whether the mirror and the log stream (if any) hold event `seq`."""
        mirrored = sink.seq
        stream = self.log_stream
        return (
            mirrored is not None
            and mirrored >= seq
            and (stream is None or (stream.head or 0) >= seq)
        )

    def _wait_for_commit(self, sink: RedisSink, seq: int, timeout: float) -> None:
        """Wait up to `timeout` s for a commit after `seq` that this thread has work for.

        The intake's commits wake this thread too, but the intake projects
        them to the mirror itself (holding the sink's turn meanwhile). For
        those, this thread lets :data:`_ECHO_DELAY` pass before it looks
        again, without waiting for commits meanwhile: so busy remote
        writers wake it once per delay rather than once per commit (each
        wake-up costs the intake's thread the GIL), and their events reach
        the log stream in batches. A commit of another process found then
        is projected at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            last = self.source.wait_for_commit(seq, max(0.0, deadline - time.monotonic()))
            if last <= seq or not self._projected(sink, last, mirror_only=True):
                return
            # The intake projected it: an echo of its own commit.
            if self.stop.wait(min(_ECHO_DELAY, max(0.0, deadline - time.monotonic()))):
                return
            last = self.source.last_seq
            if not self._projected(sink, last) or time.monotonic() >= deadline:
                return
            seq = last

    def _projected(self, sink: RedisSink, seq: int, mirror_only: bool = False) -> bool:
        """Whether everything this thread keeps up to date already holds `seq`.

        With `mirror_only`, whether the mirror does (the log stream aside).
        """
        assert self.shared is not None
        with self.shared.turn:  # taken once the intake has committed and projected
            # (The intake's step sent ahead counts: the intake reads its answers.)
            mirrored = sink.sent_seq
        if mirrored is None or mirrored < seq:
            return False
        # The intake projects to the mirror only: the log stream is this thread's.
        stream = self.log_stream
        return mirror_only or stream is None or (stream.head or 0) >= seq

    def _measure_lag(self, sink: RedisSink) -> None:
        """Set the mirror-lag metrics (events behind, and the age of the oldest missing)."""
        seq = sink.seq
        if seq is None:
            return
        try:
            last_seq = self.source.last_seq
            behind = max(0, last_seq - seq)
            age = 0.0
            if behind:
                oldest = next(iter(self.source.events(seq + 1, seq + 1)))
                age = max(0.0, time.time() - oldest.time)
        except (StoreError, StopIteration):
            return
        self.metrics.lag_events.set(behind)
        self.metrics.lag_seconds.set(age)

    def _serve_writes(self, intake: Intake) -> None:
        """The intake's thread: step it, and wait for requests or for the mirror."""

        mirror = self.shared
        assert mirror is not None
        try:
            while not self.stop.is_set():
                moves = mirror.moves
                step = intake.step(mirror)
                if step.wait <= 0.0:
                    continue
                wait = min(step.wait, _IDLE_WAIT)
                if intake.owes_replies:
                    mirror.wait_for_move(moves, wait)
                elif step.idle:
                    intake.wait_for_requests(wait, mirror)
                elif self._intake_bell.wait(wait):  # (a retry delay: see _wake_intake)
                    self._intake_bell.clear()
        except Exception as error:
            logger.exception("the write intake failed: stopping the daemon")
            # The daemon exits with status 1 (a supervisor restarts it).
            self.failure = f"the write intake failed: {error!r}"
            self.stop.set()
            raise
        finally:
            intake.close(mirror)
