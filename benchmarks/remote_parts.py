"""Where the time of a remote write goes: its daemon's work taken apart, stage by stage.

Run ``python -m benchmarks.remote_parts [--rounds N] [--count N] [--durability D]``.
Eight writer processes add float samples as fast as they can, as in the
`remote writes` family, through four ends, in rotated rounds:

- ``katsdptelstate``: katsdptelstate writing its Redis directly;
- ``round trips``: telstate's own remote writers (``TelescopeState`` on the
  mirror URL) and a bare consumer that answers each batch of requests at
  once (no decoding, no store);
- ``+ apply``: the same consumer, but each batch is first decoded
  (:func:`telstate.remote.decode_request`) and applied to an LMDB store in
  one transaction by the daemon's own :func:`replicator.intake.apply_requests`
  (events, chain, request records, history index), at durability D;
- ``daemon``: ``python -m replicator --accept-writes`` at durability D,
  which also projects each batch to the mirror before it replies.

The consumers send the next read with the replies, as the daemon does.
What separates ``+ apply`` from ``daemon`` is the mirror (its script and
the daemon's work for it) and the daemon's own bookkeeping (replies owed,
metrics, expiry). Prints the median rate of each, and its ratio to
katsdptelstate's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import hiredis

from tests.servers import RedisServer

from .environment import BenchEnv
from .scale import SCALES
from .workloads.remote import (
    WRITERS,
    Consumer,
    _Connection,
    _Mirror,
    _rate,
    consume,
    replies,
)

#: The database of the mirror's control keys (telstate.redis.MIRROR_CURSOR_DB).
_CONTROL_DB = 15


def _consumer(path: str, store: str | None, durability: str, ready: Any, stop: Any) -> None:
    """Answer the requests of mirror database 0: at once, or once applied to `store`."""
    from replicator.intake import GROUP, apply_requests
    from telstate.lmdb import LmdbBackend
    from telstate.remote import decode_request, intake_key, reply_stream_key, request_stream_key

    backend = LmdbBackend(store, durability=durability) if store else None
    requests = request_stream_key(0)
    redis_ = _Connection(path)
    setup = [
        (b"SELECT", _CONTROL_DB),
        (b"XGROUP", b"CREATE", requests, GROUP, b"0", b"MKSTREAM"),
    ]
    if backend is not None:
        setup.append((b"HSET", intake_key(0), b"store", str(backend.uuid), b"path", store))
    else:
        # A store the writers name: none here, so any UUID of the right form.
        setup.append((b"HSET", intake_key(0), b"store", "0" * 32, b"path", "nowhere"))
    redis_.socket.sendall(b"".join(map(hiredis.pack_command, setup)))
    redis_.receive(len(setup))
    read = hiredis.pack_command(
        (b"XREADGROUP", b"GROUP", GROUP, GROUP, b"COUNT", 256, b"BLOCK", 100)
        + (b"STREAMS", requests, b">")
    )

    def answer(flat_entries: list[Any]) -> list[tuple[Any, ...]]:
        entries = [(entry_id, dict(zip(flat[::2], flat[1::2]))) for entry_id, flat in flat_entries]
        if backend is not None:
            batch = [decode_request(entry_id, fields) for entry_id, fields in entries]
            apply_requests(backend, batch, int(time.time() * 1000))
        answered = [
            (entry_id, reply_stream_key(0, fields[b"reply"]), fields[b"id"])
            for entry_id, fields in entries
        ]
        ok = (b"status", b"ok", b"value", b"", b"error", b"", b"message", b"")
        return replies(requests, GROUP, answered, *ok)

    ready.set()
    consume(redis_, read, stop, answer)
    redis_.close()
    if backend is not None:
        backend.close()


def _with_consumer(env: BenchEnv, apply: bool, durability: str, count: int) -> float:
    store = str(env.scratch("remote-parts") / "store") if apply else None
    consumer = Consumer(env, _consumer, store, durability)
    try:
        return _rate(("mirror", f"unix://{consumer.server.socket}?db=0"), WRITERS, count)
    finally:
        consumer.close()


def _with_daemon(env: BenchEnv, durability: str, count: int) -> float:
    from telstate.lmdb import LmdbBackend

    store = env.scratch("remote-parts-daemon") / "store"
    LmdbBackend(str(store), durability=durability).close()
    mirror = _Mirror(env, store, durability)
    try:
        return _rate(("mirror", mirror.url), WRITERS, count)
    finally:
        mirror.close()


def _katsdptelstate(env: BenchEnv, count: int) -> float:
    directory = env.scratch("remote-parts-katsdptelstate")
    server = RedisServer(directory=directory).start()
    try:
        return _rate(("katsdptelstate-redis", (server.socket, 0)), WRITERS, count)
    finally:
        server.cleanup()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=3000, help="adds per writer")
    parser.add_argument("--durability", choices=("batch", "fsync", "none"), default="batch")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    ends = {
        "katsdptelstate": lambda env: _katsdptelstate(env, args.count),
        "round trips": lambda env: _with_consumer(env, False, args.durability, args.count),
        "+ apply": lambda env: _with_consumer(env, True, args.durability, args.count),
        "daemon": lambda env: _with_daemon(env, args.durability, args.count),
    }
    rates: dict[str, list[float]] = {name: [] for name in ends}
    env = BenchEnv(SCALES["tiny"], args.workdir)
    try:
        names = list(ends)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                rates[name].append(ends[name](env))
                print(f"round {round_ + 1}: {name}: {rates[name][-1]:.0f}/s", flush=True)
    finally:
        env.close()
    reference = statistics.median(rates["katsdptelstate"])
    print(f"\n{WRITERS} writer processes, {args.count} float adds each, {args.durability}:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:15s} {median:8.0f}/s  {median / reference:.2f}x katsdptelstate")
    return rates


if __name__ == "__main__":
    main()
