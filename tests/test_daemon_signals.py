"""SIGTERM and SIGINT stop the daemon: the handler must never wait for the stop event's lock."""

from __future__ import annotations

import signal
import threading

from replicator.daemon import stop_on_signals


def test_a_signal_inside_stop_wait_cannot_hang_the_daemon():
    # The daemon's main thread spends its time in stop.wait(), which holds
    # the event's lock at moments; a handler that took that lock (stop.set()
    # does) would wait for good when the signal lands at such a moment.
    stop = threading.Event()
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_on_signals(stop)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with stop._cond:  # held, as by the main thread inside stop.wait()
            caller = threading.Thread(target=handler, args=(signal.SIGTERM, None))
            caller.start()
            caller.join(30)  # a bound on a hang, not a speed
            returned = not caller.is_alive()
        assert returned
        assert stop.wait(30)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
