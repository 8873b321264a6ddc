"""The daemon: drives the Redis sink and the snapshot sink until told to stop.

The Redis sink runs in the calling (main) thread: it applies batches as
long as there are events, and when it is level with the log it sleeps in
:meth:`~telstate.lmdb.LmdbBackend.wait_for_commit`, which wakes on the
store's commit notification (or its 50 ms poll of LMDB's transaction id),
so a commit reaches Redis within milliseconds and an idle daemon does not
spin. Snapshots run in a thread of their own so that writing a large file
never holds up the mirror.

Stopping (SIGTERM, SIGINT, or :attr:`Daemon.stop` set) lets the current
batch finish: a batch is one atomic script call, so there is never a half
batch to finish, only the next one not to start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from telstate.errors import StoreError

from .redis_sink import RedisSink, SinkState
from .snapshot_sink import SnapshotSink
from .source import EventSource

logger = logging.getLogger(__name__)

# Longest sleep between checks of the stop flag while idle: how quickly a
# signal takes effect (waiting for commits is cheap, so short is fine).
_IDLE_WAIT = 0.25
# How often the daemon reports its progress in the log.
_PROGRESS_INTERVAL = 60.0


class Daemon:
    """Keeps a Redis mirror and/or RDB snapshots of one store up to date.

    Parameters
    ----------
    source
        The store.
    redis_sink, snapshot_sink
        What to keep up to date (either may be None, not both).

    Attributes
    ----------
    stop
        Set it (or send SIGTERM / SIGINT after :meth:`handle_signals`) to
        make :meth:`run` or :meth:`run_once` return after the current batch.
    """

    def __init__(
        self,
        source: EventSource,
        redis_sink: RedisSink | None,
        snapshot_sink: SnapshotSink | None,
    ) -> None:
        if redis_sink is None and snapshot_sink is None:
            raise ValueError("nothing to do: give a Redis URL, a snapshot directory or both")
        self.source = source
        self.redis_sink = redis_sink
        self.snapshot_sink = snapshot_sink
        self.stop = redis_sink.stop if redis_sink is not None else threading.Event()

    def handle_signals(self) -> None:
        """Make SIGTERM and SIGINT set :attr:`stop` (call from the main thread)."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            logger.info("%s received: stopping after the current batch", signal.strsignal(signum))
            self.stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self) -> None:
        """Replicate until :attr:`stop` is set."""
        snapshots = None
        if self.snapshot_sink is not None:
            snapshots = threading.Thread(
                target=self.snapshot_sink.run, args=(self.stop,), name="snapshots", daemon=True
            )
            snapshots.start()
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
        Whether `until_seq` was reached.
        """
        reported = time.monotonic()
        while not self.stop.is_set():
            seq = sink.seq
            if until_seq is not None:
                if seq is not None and seq >= until_seq:
                    return True
                if sink.state == SinkState.CONFLICT:
                    return False  # another replicator has the mirror: nothing to finish
            step = sink.step()
            now = time.monotonic()
            if now - reported >= _PROGRESS_INTERVAL:
                reported = now
                logger.info("mirror %s at seq %s (%s)", sink.url, sink.seq, sink.state.value)
            if step.wait <= 0.0:
                continue
            seq = sink.seq
            if step.idle and seq is not None:
                self.source.wait_for_commit(seq, min(step.wait, _IDLE_WAIT))
            else:
                self.stop.wait(step.wait)
        return False
