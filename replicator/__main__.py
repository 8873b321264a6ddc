"""Command line: ``telstate-replicator [run] ...``, ``status ...`` and ``follow ...``.

Exit status: 0 on success (including a clean stop by SIGTERM or SIGINT),
1 if ``--once`` was stopped before catching up, ``status`` found a
problem, the daemon failed (its write intake) or the follower cannot go
on, 2 for a usage error or a store that cannot be opened,
:data:`EXIT_FENCED` (3) if the daemon was refused after a promotion (its
store is the old primary, or the promotion hash cannot be read): not a
failure that a restart mends, so a supervisor should not restart it
(systemd: ``RestartPreventExitStatus=3``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
from collections.abc import Sequence

from telstate.cli import whole_number
from telstate.errors import StoreError

from .acl import AclError
from .connection import PASSWORD_VARIABLE, connect, read_password
from .log_stream import DEFAULT_MAX_LEN
from .redis_sink import DEFAULT_SPARE_DB

_COMMANDS = ("run", "status", "follow")

#: Exit status of a daemon refused after a promotion (see :mod:`replicator.promotion`).
EXIT_FENCED = 3


_positive_int = whole_number(1)
_database = whole_number(0, "database number")
_count = whole_number(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _user(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Redis user name")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telstate-replicator",
        description=(
            "Keep a Redis mirror (katsdptelstate layout) and RDB snapshots of a telstate"
            " LMDB store up to date, from its event log."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,status,follow}")
    run = commands.add_parser("run", help="replicate (the default command)")
    status = commands.add_parser(
        "status", help="show how far the mirror, the snapshots and the followers lag"
    )
    follow = commands.add_parser(
        "follow",
        help="keep a follower store (a copy of the log on this host) up to date",
        description="Keep a follower store up to date from the log stream that the daemon"
        " of its primary keeps in the mirror's Redis, checking the chain at every event.",
    )
    follow.add_argument(
        "--redis",
        required=True,
        metavar="URL",
        help="the mirror whose log stream to follow (as for `run`, database number included)",
    )
    follow.add_argument(
        "--store",
        required=True,
        metavar="PATH",
        help="the follower store: made from seq 1 if it does not exist, or a `telstate"
        " backup` of the primary",
    )
    follow.add_argument("--name", help="how the follower reports its position (default: HOST:PATH)")
    follow.add_argument(
        "--redis-password-file",
        metavar="FILE",
        help=f"file whose first line is the Redis user's password (default: ${PASSWORD_VARIABLE})",
    )
    follow.add_argument(
        "--batch",
        type=_positive_int,
        default=5000,
        metavar="EVENTS",
        help="most events applied in one LMDB transaction (default: %(default)s)",
    )
    follow.add_argument(
        "--durability",
        choices=("fsync", "batch", "none"),
        default="batch",
        help="durability of the follower's commits (default: %(default)s)",
    )
    follow.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    for command in (run, status):
        command.add_argument("--log", required=True, metavar="PATH", help="the LMDB store")
        command.add_argument(
            "--redis",
            metavar="URL",
            help="mirror: redis://, rediss:// or unix:// URL with the database number"
            " (e.g. redis://host:6379/0, unix:///run/redis.sock?db=0); put the"
            " replicator's own Redis user in it (redis://USER@host/0, its password in"
            " --redis-password-file) to protect the mirror, see --acl-setup",
        )
        command.add_argument(
            "--redis-password-file",
            metavar="FILE",
            help="file whose first line is the password of the replicator's Redis user (the"
            " user in --redis): unlike a password in the URL, ps does not show it. Default:"
            f" ${PASSWORD_VARIABLE}, if set",
        )
        command.add_argument("--rdb-dir", metavar="DIR", help="directory for RDB snapshots")
        command.add_argument(
            "--client-user",
            type=_user,
            default="default",
            metavar="USER",
            help="the Redis user that clients of the mirror connect as, which must not be"
            " able to write it (default: %(default)s, the user of clients without credentials)",
        )
    run.add_argument(
        "--acl-setup",
        action="store_true",
        help="make --client-user read-only with Redis ACLs (needs a replicator user with"
        " @admin rights; without it an administrator sets the rules, see the README)",
    )
    run.add_argument(
        "--follower-user",
        type=_user,
        metavar="USER",
        help="with --acl-setup: the Redis user of followers, given the rules that let it read"
        " the log stream and report positions, and nothing else",
    )
    run.add_argument(
        "--spare-db",
        type=_database,
        default=DEFAULT_SPARE_DB,
        metavar="N",
        help="empty database in which a rebuild builds the new mirror before swapping it in"
        " (default: %(default)s; mirrors on a server that share one rebuild one at a time)",
    )
    run.add_argument(
        "--snapshot-interval",
        type=_seconds,
        default=600.0,
        metavar="SECONDS",
        help="seconds between snapshots while the store changes (default: %(default)s)",
    )
    run.add_argument(
        "--keep",
        type=_positive_int,
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
        type=_positive_int,
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
        "--log-stream-max-len",
        type=_count,
        default=DEFAULT_MAX_LEN,
        metavar="EVENTS",
        help="events (about) kept in the log stream that followers read; 0: no log stream"
        " (default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=_positive_int,
        metavar="PORT",
        help="serve Prometheus metrics over HTTP on this port",
    )
    run.add_argument(
        "--metrics-address",
        default="0.0.0.0",
        metavar="ADDRESS",
        help="address the metrics server listens on (default: %(default)s)",
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
    if options.command == "follow":
        return _follow(options, parser)
    if options.redis is None and options.rdb_dir is None:
        parser.error("give --redis, --rdb-dir or both")
    if options.redis is None and options.command == "run" and options.acl_setup:
        parser.error("--acl-setup protects the mirror: give --redis too")
    if options.command == "run" and options.follower_user and not options.acl_setup:
        parser.error("--follower-user is for --acl-setup")
    if options.rdb_dir is not None and os.path.exists(options.rdb_dir):
        if not os.path.isdir(options.rdb_dir):
            parser.error(f"--rdb-dir {options.rdb_dir!r} is not a directory")
    options.password = None
    if options.redis is not None:
        try:
            options.password = read_password(options.redis_password_file)
        except OSError as error:
            parser.error(f"--redis-password-file: {error}")
        try:
            connect(options.redis, options.password)[0].close()
        except ValueError as error:
            parser.error(f"--redis: {error}")
    if options.command == "status":
        return _status(options)
    return _run(options, parser)


def _status(options: argparse.Namespace) -> int:
    from .status import format_status, gather_status

    try:
        status = gather_status(
            options.log,
            options.redis,
            options.rdb_dir,
            client_user=options.client_user,
            password=options.password,
        )
    except StoreError as error:
        print(f"telstate-replicator: {error}", file=sys.stderr)
        return 2
    print(format_status(status, as_json=options.json))
    followers = status.get("followers", {}).values()
    problem = "error" in status.get("mirror", {}) or any("error" in f for f in followers)
    return 1 if problem else 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _follow(options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _setup_logging(options.verbose)
    from .daemon import stop_on_signals
    from .follow import Follower, FollowError

    logger = logging.getLogger("replicator")
    try:
        password = read_password(options.redis_password_file)
    except OSError as error:
        parser.error(f"--redis-password-file: {error}")
    try:
        follower = Follower(
            options.redis,
            options.store,
            password=password,
            name=options.name,
            batch=options.batch,
            durability=options.durability,
        )
    except ValueError as error:
        parser.error(f"--redis: {error}")
    stop_on_signals(follower.stop)
    try:
        follower.run()
        return 0
    except FollowError as error:
        logger.error("%s", error)
        return 1
    finally:
        follower.close()
        logger.info("stopped at seq %d", follower.seq)


def _run(options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _setup_logging(options.verbose)
    from telstate.lmdb import LmdbBackend

    from .daemon import Daemon
    from .intake import Intake, retire
    from .log_stream import LogStream
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
    primary = source.primary if options.accept_writes else None
    if primary is not None:
        # Its writes must go to its primary's daemon: refuse now, not at the first request.
        source.close()
        parser.error(
            f"--accept-writes: the store at {options.log!r} is a follower of {primary}:"
            " it takes no writes (run without --accept-writes here, or promote it first)"
        )
    redis_sink = None
    try:
        if options.redis is not None:
            redis_sink = RedisSink(
                source,
                options.redis,
                password=options.password,
                batch_events=options.batch,
                spare_db=options.spare_db,
                client_user=options.client_user,
                acl_setup=options.acl_setup,
                accept_writes=options.accept_writes,
                follower_user=options.follower_user,
            )
        snapshot_sink = None
        if options.rdb_dir is not None:
            try:
                snapshot_sink = SnapshotSink(
                    source, options.rdb_dir, interval=options.snapshot_interval, keep=options.keep
                )
            except OSError as error:
                raise ValueError(f"--rdb-dir: {error}") from error
    except ValueError as error:
        if redis_sink is not None:
            redis_sink.close()
        source.close()
        parser.error(str(error))
    if redis_sink is not None:
        try:
            redis_sink.check_access()
        except (AclError, ValueError) as error:
            # Not a usage error: the server refuses (rights, databases).
            logging.getLogger("replicator").error("%s", error)
            redis_sink.close()
            source.close()
            return 2
    intake = None
    if options.accept_writes:
        intake = Intake(source, options.redis, password=options.password)
    elif options.redis is not None:
        retire(options.redis, options.password)
    log_stream = None
    if redis_sink is not None and options.log_stream_max_len:
        log_stream = LogStream(
            source,
            options.redis,
            owner=redis_sink.owner,
            password=options.password,
            max_len=options.log_stream_max_len,
            batch_events=options.batch,
        )
    daemon = Daemon(source, redis_sink, snapshot_sink, intake, log_stream)
    if options.metrics_port is not None:
        try:
            daemon.metrics.serve(options.metrics_port, options.metrics_address)
        except OSError as error:
            source.close()
            parser.error(f"--metrics-port: {error}")
    daemon.handle_signals()
    # What start-up made (modules, the scripts, connections) lives until
    # exit: out of the collector's reach, a full collection does not scan
    # it (tens of thousands of objects, ~10 ms, once per few thousand writes).
    gc.freeze()
    try:
        if options.once:
            done = daemon.run_once()
        else:
            daemon.run()
            done = True
        if daemon.fenced is not None:
            logging.getLogger("replicator").error(
                "stopping, fenced after a promotion (exit status %d: do not restart): %s",
                EXIT_FENCED,
                daemon.fenced,
            )
            return EXIT_FENCED
        if daemon.failure is not None:
            logging.getLogger("replicator").error("stopping: %s", daemon.failure)
            return 1
        return 0 if done else 1
    finally:
        if log_stream is not None:
            log_stream.close()
        if redis_sink is not None:
            redis_sink.close()
        if snapshot_sink is not None:
            snapshot_sink.close()
        source.close()
        logging.getLogger("replicator").info("stopped")


if __name__ == "__main__":
    sys.exit(main())
