"""Command line: ``telstate-replicator [run] ...`` and ``telstate-replicator status ...``.

Exit status: 0 on success (including a clean stop by SIGTERM or SIGINT),
1 if ``--once`` was stopped before catching up or ``status`` found a
problem, 2 for a usage error or a store that cannot be opened.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from telstate.errors import StoreError

_COMMANDS = ("run", "status")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telstate-replicator",
        description=(
            "Keep a Redis mirror (katsdptelstate layout) and RDB snapshots of a telstate"
            " LMDB store up to date, from its event log."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,status}")
    run = commands.add_parser("run", help="replicate (the default command)")
    status = commands.add_parser("status", help="show how far the mirror and snapshots lag")
    for command in (run, status):
        command.add_argument("--log", required=True, metavar="PATH", help="the LMDB store")
        command.add_argument(
            "--redis",
            metavar="URL",
            help="mirror: redis://, rediss:// or unix:// URL with the database number"
            " (e.g. redis://host:6379/0, unix:///run/redis.sock?db=0)",
        )
        command.add_argument("--rdb-dir", metavar="DIR", help="directory for RDB snapshots")
    run.add_argument(
        "--snapshot-interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="seconds between snapshots while the store changes (default: %(default)s)",
    )
    run.add_argument(
        "--keep",
        type=int,
        default=5,
        metavar="N",
        help="snapshots of the store to keep (default: %(default)s)",
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="catch up to the log's current end, write a snapshot if --rdb-dir is given, exit",
    )
    run.add_argument(
        "--batch",
        type=int,
        default=5000,
        metavar="EVENTS",
        help="most events applied to Redis in one atomic step (default: %(default)s)",
    )
    run.add_argument(
        "--accept-writes",
        action="store_true",
        help="apply the write requests that telstate clients send through the mirror"
        " (opens the store writable; see the README, 'Writers on other hosts')",
    )
    run.add_argument(
        "--durability",
        choices=("fsync", "batch", "none"),
        default="batch",
        help="durability of the writes accepted with --accept-writes (default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics over HTTP on this port",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in _COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "run")
    parser = _parser()
    options = parser.parse_args(args)
    if options.redis is None and options.rdb_dir is None:
        parser.error("give --redis, --rdb-dir or both")
    if options.command == "status":
        return _status(options)
    return _run(options, parser)


def _status(options: argparse.Namespace) -> int:
    from .status import format_status, gather_status

    try:
        status = gather_status(options.log, options.redis, options.rdb_dir)
    except StoreError as error:
        print(f"telstate-replicator: {error}", file=sys.stderr)
        return 2
    print(format_status(status, as_json=options.json))
    return 1 if "error" in status.get("mirror", {}) else 0


def _run(options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from telstate.lmdb import LmdbBackend

    from .daemon import Daemon
    from .intake import Intake
    from .redis_sink import RedisSink
    from .snapshot_sink import SnapshotSink

    if options.accept_writes and options.redis is None:
        parser.error("--accept-writes serves writes through the mirror: give --redis too")
    try:
        if options.accept_writes:
            source = LmdbBackend(
                options.log, durability=options.durability, writer_name="telstate-replicator"
            )
        else:
            source = LmdbBackend(options.log, readonly=True)
    except StoreError as error:
        logging.getLogger("replicator").error("%s", error)
        return 2
    try:
        redis_sink = None
        if options.redis is not None:
            redis_sink = RedisSink(source, options.redis, batch_events=options.batch)
        snapshot_sink = None
        if options.rdb_dir is not None:
            snapshot_sink = SnapshotSink(
                source, options.rdb_dir, interval=options.snapshot_interval, keep=options.keep
            )
    except ValueError as error:
        source.close()
        parser.error(str(error))
    intake = Intake(source, options.redis) if options.accept_writes else None
    daemon = Daemon(source, redis_sink, snapshot_sink, intake)
    if options.metrics_port is not None:
        daemon.metrics.serve(options.metrics_port)
    daemon.handle_signals()
    try:
        if options.once:
            return 0 if daemon.run_once() else 1
        daemon.run()
        return 0
    finally:
        if redis_sink is not None:
            redis_sink.close()
        source.close()
        logging.getLogger("replicator").info("stopped")


if __name__ == "__main__":
    sys.exit(main())
