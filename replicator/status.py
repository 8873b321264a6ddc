"""The ``status`` command: how far the mirror and the snapshots are behind the store.

Lag is given in events (the log's last seq minus the sink's seq) and in
seconds: the age of the oldest event that the sink does not have yet
(0 when it is level with the log), which is how stale a reader of the
mirror or of the newest snapshot may be.

Followers (``telstate-replicator follow``) report their positions through
Redis about once a second; ``followers`` shows each one's seq, its lag
behind this store (events, and the age of the oldest event it lacks),
how long ago it reported, and whether its chain is this store's (a
follower of another history is ``diverged``).

For a mirror whose replicator accepts writes, ``writes`` shows the
daemon's metrics as it last published them (:mod:`replicator.metrics`):
requests applied and rejected, batch sizes, request-to-reply latency,
rebuilds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from telstate.lmdb import LmdbBackend
from telstate.redis import MIRROR_CURSOR_DB
from telstate.remote import intake_key

from .acl import check_protection
from .connection import connect, redact_url
from .cursor import read_cursor
from .log_stream import followers_key, positions_from
from .metrics import read_published
from .snapshot_sink import list_snapshots


def gather_status(
    log_path: str,
    redis_url: str | None = None,
    rdb_dir: str | None = None,
    *,
    client_user: str = "default",
    password: str | None = None,
) -> dict[str, Any]:
    """Collect the state of the store, its mirror and its snapshots.

    A Redis server that cannot be reached is reported in the result (under
    ``mirror.error``), not raised. The mirror's URL is shown without its
    password. ``mirror.protected`` says whether `client_user`, the user that
    clients of the mirror connect as, is kept from writing it (None if that
    cannot be told), and ``mirror.protection`` why. `password` is the Redis
    user's, if the URL does not carry it.

    Raises
    ------
    StoreError
        If there is no store at `log_path`.
    """
    source = LmdbBackend(log_path, readonly=True)
    try:
        now = time.time()
        last_seq, head = source.head
        store = str(source.uuid)

        def lag(seq: int) -> dict[str, Any]:
            """Lag of a sink that holds the events up to `seq`."""
            if seq >= last_seq:
                return {"lag_events": 0, "lag_seconds": 0.0}
            oldest = next(iter(source.events(seq + 1, seq + 1)))
            return {"lag_events": last_seq - seq, "lag_seconds": max(0.0, now - oldest.time)}

        status: dict[str, Any] = {
            "store": {
                "uuid": store,
                "path": source.path,
                "last_seq": last_seq,
                "chain": head.hex(),
            },
        }
        if redis_url is not None:
            mirror: dict[str, Any] = {"url": redact_url(redis_url)}
            try:
                client, db = connect(
                    redis_url, password, socket_timeout=5, socket_connect_timeout=5
                )
                try:
                    size, cursor = read_cursor(client)
                    protection = check_protection(client, client_user)
                    with client.pipeline(transaction=True) as pipe:
                        pipe.execute_command("SELECT", MIRROR_CURSOR_DB)
                        pipe.hgetall(intake_key(db))
                        pipe.hgetall(followers_key(db))
                        pipe.execute_command("SELECT", db)
                        _, intake, reports, _ = pipe.execute()
                finally:
                    client.close()
            except (redis.RedisError, ValueError) as error:
                mirror["error"] = f"cannot read the mirror: {error}"
            else:
                mirror["keys"] = size
                mirror["protected"] = protection.protected
                mirror["protection"] = protection.detail
                if cursor is None:
                    mirror["error"] = "no cursor: the replicator has not written this mirror"
                else:
                    mirror.update(
                        store=cursor.store,
                        seq=cursor.seq,
                        chain=cursor.chain,
                        state=cursor.state.value,
                        owner=cursor.owner,
                    )
                    if cursor.store != store:
                        mirror["error"] = f"the mirror holds another store ({cursor.store})"
                    elif cursor.seq > last_seq or source.chain_at(cursor.seq).hex() != cursor.chain:
                        mirror["error"] = (
                            f"the mirror is of another history of the store (its chain at seq"
                            f" {cursor.seq} is not the store's): the replicator will rebuild it"
                        )
                    else:
                        mirror.update(lag(cursor.seq))
                followers = {}
                for name, position in sorted(positions_from(reports).items()):
                    followers[name] = _follower(position, source, last_seq, now, lag)
                if followers:
                    status["followers"] = followers
                if intake:
                    status["writes"] = {
                        "store": intake.get(b"store", b"?").decode(errors="replace"),
                        **read_published(intake),
                    }
            status["mirror"] = mirror
        if rdb_dir is not None:
            snapshots = list_snapshots(rdb_dir, store)
            latest: dict[str, Any] = {"directory": rdb_dir, "count": len(snapshots)}
            if snapshots:
                newest = snapshots[-1]
                latest.update(file=str(newest.path), seq=newest.seq, **lag(newest.seq))
            else:
                latest.update(file=None, seq=None, lag_events=last_seq, lag_seconds=None)
            status["snapshots"] = latest
        return status
    finally:
        source.close()


def _follower(
    position: dict[str, Any],
    source: LmdbBackend,
    last_seq: int,
    now: float,
    lag: Callable[[int], dict[str, Any]],
) -> dict[str, Any]:
    """What ``status`` says of one follower's reported position."""
    seq = position["seq"]
    shown: dict[str, Any] = {
        "seq": seq,
        "host": position.get("host"),
        "path": position.get("path"),
        "reported_seconds_ago": max(0.0, now - float(position.get("time", 0.0))),
    }
    try:
        same = seq <= last_seq and source.chain_at(seq).hex() == position.get("chain")
    except ValueError:
        same = False
    if same:
        shown.update(lag(seq))
    else:
        shown["error"] = (
            f"diverged: its chain at seq {seq} is not this store's (a follower of another"
            " history, or of the store before a promotion elsewhere)"
        )
    return shown


def format_status(status: dict[str, Any], as_json: bool = False) -> str:
    """Render :func:`gather_status`'s result for people, or as JSON."""
    if as_json:
        return json.dumps(status, indent=2, sort_keys=True)
    store = status["store"]
    lines = [f"store      {store['uuid']} at {store['path']}: last seq {store['last_seq']}"]
    mirror = status.get("mirror")
    if mirror is not None:
        if "seq" in mirror and "lag_events" in mirror:
            lines.append(
                f"mirror     {mirror['url']}: seq {mirror['seq']} ({mirror['state']}),"
                f" keys: {mirror['keys']}, {_lag(mirror)}"
            )
        if "error" in mirror:
            lines.append(f"mirror     {mirror['url']}: {mirror['error']}")
        if "protected" in mirror:
            verdict = {True: "protected", False: "NOT protected", None: "protection unknown"}
            lines.append(f"           {verdict[mirror['protected']]}: {mirror['protection']}")
    for name, follower in status.get("followers", {}).items():
        state = follower.get("error") or _lag(follower)
        lines.append(
            f"follower   {name}: seq {follower['seq']}, {state}"
            f" (reported {follower['reported_seconds_ago']:.1f} s ago)"
        )
    writes = status.get("writes")
    if writes is not None:
        lines.append(_writes(writes))
    snapshots = status.get("snapshots")
    if snapshots is not None:
        if snapshots["seq"] is None:
            lines.append(f"snapshots  {snapshots['directory']}: none")
        else:
            lines.append(
                f"snapshots  {snapshots['directory']}: files: {snapshots['count']},"
                f" newest seq {snapshots['seq']}, {_lag(snapshots)}"
            )
    return "\n".join(lines)


def _writes(writes: dict[str, Any]) -> str:
    """The ``writes`` line: the intake's counters for people."""
    rejected = {
        name.removeprefix("requests_rejected_total_"): int(value)
        for name, value in writes.items()
        if name.startswith("requests_rejected_total_") and value
    }
    batches = writes.get("batch_size_count", 0)
    latency_count = writes.get("request_seconds_count", 0)
    parts = [
        f"writes     accepted into store {writes['store']}:"
        f" applied {int(writes.get('requests_applied_total', 0))}",
        "rejected " + (", ".join(f"{n} {r}" for r, n in sorted(rejected.items())) or "0"),
        f"batches {int(batches)}"
        + (f" (mean {writes.get('batch_size_sum', 0) / batches:.1f} requests)" if batches else ""),
    ]
    if latency_count:
        mean = writes.get("request_seconds_sum", 0) / latency_count * 1000
        parts.append(f"mean request-to-reply {mean:.2f} ms")
    parts.append(f"rebuilds {int(writes.get('rebuilds_total', 0))}")
    return ", ".join(parts)


def _lag(sink: dict[str, Any]) -> str:
    if not sink["lag_events"]:
        return "up to date"
    return f"behind by {sink['lag_events']} events ({sink['lag_seconds']:.1f} s)"
