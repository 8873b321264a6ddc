"""The ``telstate`` command: inspect, audit, replay, export, verify and back up an LMDB store.

Every command takes the store directory first. Output is for people by
default and JSON with ``--json``. Exit status: 0 success, 1 a negative
answer (key not found, verify found differences), 2 bad usage or a path
that is not a store, 3 a damaged store or file.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from . import log
from .encoding import decode_value
from .errors import DecodeError, RdbParseError, StoreError, TelstateError
from .utils import KeyType, display_str, ensure_binary, ensure_str

if TYPE_CHECKING:
    from .export import KeySelection

EXIT_OK, EXIT_NO, EXIT_USAGE, EXIT_DAMAGED = 0, 1, 2, 3


class CliError(Exception):
    """A failure to report in one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# --- output --------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Turn a decoded telstate value into something :func:`json.dumps` accepts.

    Arrays become lists, tuples lists, complex numbers ``{"real", "imag"}``,
    bytes a string if they are UTF-8 and ``{"base64": ...}`` otherwise, and
    non-finite floats their names.
    """
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else json.dumps(jsonable(k)): jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, complex):
        return {"real": jsonable(value.real), "imag": jsonable(value.imag)}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _decoded(encoded: bytes | None) -> Any:
    if encoded is None:
        return None
    try:
        return decode_value(encoded)
    except DecodeError as error:
        return f"<undecodable: {error}>"


def format_time(seconds: float | None) -> str:
    """A unix time as ISO 8601 UTC with milliseconds (``-`` for None)."""
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class Progress:
    """A one-line progress counter on stderr, shown only on a terminal."""

    def __init__(self, label: str, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty()
        self.count = 0
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            if self.total:
                self.stream.write(
                    f"\r{self.label}: {self.count}/{self.total} "
                    f"({100 * self.count / self.total:.0f}%)"
                )
            else:
                self.stream.write(f"\r{self.label}: {self.count}")
            self.stream.flush()

    def wrap(self, items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield item
            self.advance()
        self.done()

    def done(self) -> None:
        if self.enabled:
            self.stream.write(f"\r{self.label}: {self.count} done\033[K\n")
            self.stream.flush()


# --- argument parsing ------------------------------------------------------------------


#: A unix time as ``--until @...`` takes it: ASCII digits, a fraction, an exponent.
_UNIX_TIME = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+")


def parse_until(text: str) -> tuple[int | None, float | None]:
    """Parse ``--until``: an integer is a seq; ``@<unix seconds>`` or ISO 8601 is a time.

    Returns
    -------
    (until_seq, until_time), one of them None.

    Raises
    ------
    CliError
        If `text` is none of those.
    """
    if text.isascii() and text.isdigit():
        return int(text), None
    if text.startswith("@"):
        if _UNIX_TIME.fullmatch(text[1:]):
            seconds = float(text[1:])
            if math.isfinite(seconds):
                return None, seconds
    else:
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.timezone.utc)
            return None, moment.timestamp()
    raise CliError(
        f"--until {text!r}: give a sequence number (e.g. 1200), a unix time "
        "(e.g. @1700000000.5) or an ISO 8601 time (e.g. 2026-11-23T10:00:00Z)"
    )


def whole_number(minimum: int, what: str = "whole number") -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers of at least `minimum` (`what` names them)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _time_arg(text: str) -> float:
    seq, moment = parse_until(text)
    if moment is None:
        raise CliError(f"{text!r} is not a time: use @<unix seconds> or ISO 8601")
    return moment


def _check_store_path(path: str) -> None:
    """Raise CliError (usage) unless `path` is a store directory."""
    if not os.path.isdir(path):
        raise CliError(f"no telstate store at {path!r}: not a directory")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise CliError(f"no telstate store at {path!r}: it has no data.mdb")


def _open_store(args: argparse.Namespace, readonly: bool = True):
    """Open ``args.store``, closed when the command ends (see :func:`main`)."""
    from .lmdb import LmdbBackend

    path = args.store
    _check_store_path(path)
    try:
        return args.stores.enter_context(LmdbBackend(path, readonly=readonly))
    except StoreError as error:
        raise CliError(f"cannot open {path!r}: {error}", EXIT_DAMAGED) from error


# --- commands --------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    backend = _open_store(args)
    keys = backend.keys(b"*")
    types = {t.name.lower(): 0 for t in KeyType}
    for key in keys:
        key_type = backend.key_type(key)
        if key_type is not None:
            types[key_type.name.lower()] += 1
    last_seq, chain = backend.head
    first = next(iter(backend.events(1, 1)), None)
    last = next(iter(backend.events(last_seq, last_seq)), None)
    size = sum(os.path.getsize(os.path.join(args.store, name)) for name in os.listdir(args.store))
    info = {
        "path": os.path.abspath(args.store),
        "uuid": str(backend.uuid),
        "last_seq": last_seq,
        "chain": chain.hex(),
        "keys": len(keys),
        "key_types": types,
        "first_event_time": first.time if first else None,
        "last_event_time": last.time if last else None,
        "size_bytes": size,
        "role": backend.role,
        "primary": backend.primary,
        "unfinished_imports": [record._asdict() for record in backend.unfinished_imports()],
    }
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
    else:
        out.write(
            f"store      {info['path']}\n"
            f"uuid       {info['uuid']}\n"
            f"events     {info['last_seq']} "
            f"({format_time(info['first_event_time'])} .. "
            f"{format_time(info['last_event_time'])})\n"
            f"chain      {info['chain']}\n"
            f"role       {info['role']}"
            + (f" of {info['primary']}" if info["primary"] is not None else "")
            + "\n"
            f"keys       {len(keys)} ("
            + ", ".join(f"{n} {t}" for t, n in types.items())
            + f")\nsize       {size / 1e6:.1f} MB on disk\n"
            + "".join(
                f"unfinished import of {record['file']}: import it again to complete it"
                " (or telstate import --forget it)\n"
                for record in info["unfinished_imports"]
            )
        )
    return EXIT_OK


def cmd_keys(args: argparse.Namespace, out: TextIO) -> int:
    backend = _open_store(args)
    keys = sorted(ensure_str(k) for k in backend.keys(ensure_binary(args.pattern)))
    if args.json:
        json.dump(keys, out)
        out.write("\n")
    else:
        out.writelines(key + "\n" for key in keys)
    return EXIT_OK


def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    from .telescope_state import TelescopeState

    state = TelescopeState(_open_store(args))
    key = args.key
    if key not in state:
        raise CliError(f"key {key!r} not found in {args.store!r}", EXIT_NO)
    key_type = state.key_type(key)
    assert key_type is not None
    result: Any
    if args.range:
        if key_type != KeyType.MUTABLE:
            raise CliError(f"key {key!r} is {key_type.name.lower()}, not mutable: no range")
        start = _time_arg(args.range[0]) if args.range[0] != "-" else 0.0
        end = _time_arg(args.range[1]) if args.range[1] != "-" else None
        result = state.get_range(key, st=start, et=end)
    elif key_type == KeyType.MUTABLE and args.all:
        result = state.get_range(key, st=0)
    elif key_type == KeyType.MUTABLE:
        result = state.get_range(key)[0]
    else:
        result = state.get(key)
    if args.json:
        json.dump({"key": key, "type": key_type.name.lower(), "value": jsonable(result)}, out)
        out.write("\n")
    elif isinstance(result, list):
        for value, stamp in result:
            out.write(f"{format_time(stamp)}  {stamp:.6f}  {value!r}\n")
    elif isinstance(result, tuple):
        value, stamp = result
        out.write(f"{value!r}  (at {format_time(stamp)})\n")
    else:
        out.write(f"{result!r}\n")
    return EXIT_OK


def _event_dict(event: Any) -> dict[str, Any]:
    """An event as JSON; an add_mutable_many event adds "samples": [[timestamp, value], ...]."""
    fields = {
        "seq": event.seq,
        "time": event.time,
        "writer": {"host": event.writer.host, "pid": event.writer.pid, "name": event.writer.name},
        "op": event.op.value,
        "key": None if event.key is None else ensure_str(event.key),
        "sub_key": None if event.sub_key is None else jsonable(_decoded(event.sub_key)),
        "value": None if event.value is None else jsonable(_decoded(event.value)),
        "timestamp": event.timestamp,
        "chain": event.chain.hex(),
    }
    if event.values is not None:
        fields["samples"] = [
            [timestamp, jsonable(_decoded(value))] for value, timestamp in event.samples()
        ]
    return fields


def _write_events(events: Iterable[Any], args: argparse.Namespace, out: TextIO) -> int:
    count = 0
    for event in events:
        count += 1
        if args.json:
            out.write(json.dumps(_event_dict(event)) + "\n")
            continue
        op = event.op.value
        writer = f"{event.writer.host}:{event.writer.pid}"
        if event.writer.name:
            writer += f"({event.writer.name})"
        what = "" if event.key is None else display_str(event.key)
        if event.sub_key is not None:
            what += f"[{_decoded(event.sub_key)!r}]"
        if event.value is not None:
            what += f" = {_short(_decoded(event.value))}"
        if event.timestamp is not None:
            what += f" @ {event.timestamp:.6f}"
        if event.timestamps is not None:
            first, last = event.timestamps[0], event.timestamps[-1]
            what += f": {len(event.timestamps)} samples @ {first:.6f} .. {last:.6f}"
        out.write(f"{event.seq:>8}  {format_time(event.time)}  {writer:<24} {op:<14} {what}\n")
    return count


def cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    backend = _open_store(args)
    count = _write_events(backend.history(ensure_binary(args.key)), args, out)
    if count == 0:
        raise CliError(f"no event ever touched key {args.key!r}", EXIT_NO)
    return EXIT_OK


def cmd_log(args: argparse.Namespace, out: TextIO) -> int:
    from .utils import compile_pattern

    backend = _open_store(args)
    since = _time_arg(args.since) if args.since else None
    until = _time_arg(args.until) if args.until else None
    match = compile_pattern(ensure_binary(args.key)).fullmatch if args.key else None
    shown = 0

    def selected() -> Iterator[Any]:
        nonlocal shown
        for event in backend.events(args.from_seq, args.to_seq):
            if since is not None and event.time < since:
                continue
            if until is not None and event.time > until:
                break
            # A clear touches every key, so it matches any key filter; a
            # promotion touches none.
            if match is not None and (
                event.op is log.Op.PROMOTE or (event.key is not None and not match(event.key))
            ):
                continue
            yield event
            shown += 1
            if args.limit and shown >= args.limit:
                return

    _write_events(selected(), args, out)
    return EXIT_OK


def _write_rdb(records: Iterable[Any], target: str, aux: dict[bytes, bytes], total: int) -> int:
    """Write `records` to the RDB file `target`, replacing it only once complete.

    An empty state is written as a valid RDB file with no keys.
    """
    from .rdb_writer import RDBWriter

    if os.path.isdir(target):
        raise CliError(f"cannot write RDB file {target!r}: it is a directory")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise CliError(f"cannot write RDB file {target!r}: no such directory {directory!r}")
    progress = Progress(f"writing {target}", total)
    with RDBWriter(target, aux=aux, keep_empty=True) as writer:
        for key, key_type, value in progress.wrap(records):
            writer.write_record(key, key_type, value)
    return writer.keys_written


def _selection(args: argparse.Namespace) -> KeySelection:
    """The keys ``export`` writes: ``--keys``, ``--keys-from`` and ``--view``."""
    from .export import KeySelection, read_key_patterns

    patterns = list(args.keys or ())
    for path in args.keys_from or ():
        try:
            patterns += read_key_patterns(path)
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"--keys-from {path!r}: cannot read the pattern list: {error}") from None
    if args.keys_from and not patterns:
        raise CliError("--keys-from: the pattern lists hold no patterns (would export nothing)")
    return KeySelection.of(patterns, args.view)


def _export(
    args: argparse.Namespace, target: str, selection: KeySelection, until: str | None
) -> dict[str, Any]:
    """Write the selected keys of the store's state, now or as of `until`, to `target`.

    Both are read from one snapshot, one key at a time: the current state
    from the state tables, the state as of `until` replayed from the log
    key by key (:meth:`~telstate.lmdb.Snapshot.state_at`), so either takes
    memory for the largest key, not the store.
    """
    from .export import AUX_SELECTION, AUX_SELECTION_DESCRIPTION, select_records

    backend = _open_store(args)
    aux = {log.AUX_STORE: str(backend.uuid).encode()}
    if not selection.everything:
        aux[AUX_SELECTION_DESCRIPTION] = selection.describe()
        aux[AUX_SELECTION] = selection.to_json()
    selected = selection.matcher()
    with backend.snapshot() as snap:
        if until is None:
            aux.update(log.position_aux(snap.uuid, snap.seq, snap.chain))
            total = sum(1 for key in backend.keys(b"*") if selected(key))
            count = _write_rdb(select_records(snap, selection), target, aux, total)
            return {"rdb": target, "keys": count, "seq": snap.seq, "chain": snap.chain.hex()}
        until_seq, until_time = parse_until(until)
        if until_time is not None:  # the events before the first appended after it
            until_seq = backend.seq_until(until_time)
        assert until_seq is not None
        until_seq = max(0, min(until_seq, snap.seq))
        chain = backend.chain_at(until_seq)
        aux.update(log.position_aux(backend.uuid, until_seq, chain))
        aux[b"telstate-replay-until"] = until.encode()
        state = snap.state_at(until_seq)
        total = sum(1 for key in state.keys if selected(key))
        count = _write_rdb(state.records(selected), target, aux, total)
        return {
            "rdb": target,
            "keys": count,
            "until": until,
            "seq": until_seq,
            "chain": chain.hex(),
        }


def _summary_stream(target: str, out: TextIO) -> TextIO:
    """Where to say what was written to `target`: stderr if `target` is `out` itself.

    (``export STORE /dev/stdout | ...``: a line on `out` would end the RDB stream.)
    """
    try:
        same = os.path.samestat(os.stat(target), os.fstat(out.fileno()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        same = False
    return sys.stderr if same else out


def cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    from .export import KeySelection

    result = _export(args, args.rdb, KeySelection(), args.until)
    out = _summary_stream(args.rdb, out)
    out.write(
        json.dumps(result) + "\n"
        if args.json
        else f"replayed to {args.until}: {result['keys']} keys written to {args.rdb}\n"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    result = _export(args, args.rdb, _selection(args), args.until)
    out = _summary_stream(args.rdb, out)
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        state = f"state at seq {result['seq']}"
        if args.until is not None and parse_until(args.until)[0] is None:
            state = f"state at {args.until}: seq {result['seq']}"
        out.write(f"exported {result['keys']} keys ({state}) to {args.rdb}\n")
    return EXIT_OK


def cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    from .errors import InvalidTimestampError
    from .lmdb import LmdbBackend
    from .lmdb.backend import check_file
    from .lmdb.environment import creation_refused, holds_no_store

    if args.forget:
        return _forget_import(args, out)
    if not os.path.exists(args.rdb):
        raise CliError(f"no such RDB file: {args.rdb!r}")
    # The file is checked whole before anything is written (see import_rules).
    shown: list[Progress] = []  # the phase on screen: checking the file, then importing

    def progress(phase: str, values: int) -> None:
        label = f"{phase} {args.rdb} (values)"
        if not shown or shown[0].label != label:
            if shown:
                shown.pop().done()
            shown.append(Progress(label, None))
        shown[0].advance(values)

    try:
        if holds_no_store(args.store) and os.path.isfile(args.rdb):
            # Checked before the store is made: a file refused leaves none behind.
            # (And first, whether the store could be made: not after the check.)
            refused = creation_refused(args.store)
            if refused is not None:
                raise CliError(f"cannot create a telstate store at {args.store!r}: {refused}")
            with open(args.rdb, "rb") as handle:
                check_file(handle, progress)
                handle.seek(0)
                backend = args.stores.enter_context(LmdbBackend(args.store))
                before = backend.last_seq
                if before:
                    # Another process made the store meanwhile, and wrote to it:
                    # the file is checked again, against what it holds.
                    count = backend.load_from_file(handle, progress=progress)
                else:
                    count = backend._load_checked(handle, progress)
        else:
            backend = args.stores.enter_context(LmdbBackend(args.store))  # created if new
            before = backend.last_seq
            count = backend.load_from_file(args.rdb, progress=progress)
    except InvalidTimestampError as error:
        raise CliError(f"{args.rdb!r}: {error}", EXIT_DAMAGED) from None
    finally:
        if shown:
            shown[0].done()
    events = backend.last_seq - before
    out.write(
        json.dumps({"rdb": args.rdb, "keys": count, "events": events}) + "\n"
        if args.json
        else f"imported {count} keys from {args.rdb} as {events} events\n"
    )
    return EXIT_OK


def _forget_import(args: argparse.Namespace, out: TextIO) -> int:
    """``import --forget``: stop reporting the unfinished imports of a file."""
    backend = _open_store(args, readonly=False)
    forgotten = backend.forget_import(args.rdb)
    if not forgotten:
        unfinished = [record.file for record in backend.unfinished_imports()]
        raise CliError(
            f"no unfinished import of {args.rdb!r} in {args.store!r}"
            + (f" (unfinished: {', '.join(map(repr, unfinished))})" if unfinished else ""),
            EXIT_NO,
        )
    if args.json:
        out.write(json.dumps({"forgotten": [record._asdict() for record in forgotten]}) + "\n")
    else:
        for record in forgotten:
            out.write(f"forgot the unfinished import of {record.file}: the keys it brought stay\n")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    backend = _open_store(args)
    if args.rdb is not None:
        return _verify_rdb(backend, args, out)
    seq, chain = backend.head
    differences = list(backend.verify())
    if args.json:
        result = {"ok": not differences, "differences": differences[:100], "seq": seq}
        out.write(json.dumps({**result, "chain": chain.hex()}) + "\n")
    elif differences:
        out.write(f"verify FAILED: {len(differences)} problems in the log or state\n")
        out.writelines(f"  {d}\n" for d in differences[:100])
    else:
        out.write(
            f"verify OK: the chain holds and the state matches the replayed log "
            f"({seq} events, chain {chain.hex()[:16]})\n"
        )
    return EXIT_NO if differences else EXIT_OK


def _verify_rdb(backend: Any, args: argparse.Namespace, out: TextIO) -> int:
    """``verify STORE --rdb FILE``: is FILE exactly the state at the position it claims?

    A file of selected keys (``export --keys/--view``) must hold exactly the
    keys of that state that its selection (AUX field ``telstate-selection-json``)
    selects; a file whose selection is only described (``telstate-selection``,
    as earlier exports wrote it) can only have the keys it holds checked.
    """
    from .export import AUX_SELECTION, AUX_SELECTION_DESCRIPTION, KeySelection
    from .rdb_reader import RdbReader, read_aux

    if not os.path.isfile(args.rdb):
        raise CliError(f"no such RDB file: {args.rdb!r}")
    problems: list[str] = []
    position = None
    keys = 0
    selection: KeySelection | None = None
    described = None  # the description of a selection that cannot be read back
    try:
        aux = read_aux(args.rdb)
        position = log.position_from_aux(aux)
        if AUX_SELECTION in aux:
            try:
                selection = KeySelection.from_json(aux[AUX_SELECTION])
            except ValueError as error:
                problems.append(
                    f"the file's selection ({AUX_SELECTION.decode()}) is damaged: {error}"
                )
        elif AUX_SELECTION_DESCRIPTION in aux:
            described = display_str(aux[AUX_SELECTION_DESCRIPTION])
    except RdbParseError as error:
        problems.append(f"the file is damaged: {error}")
    if position is None and not problems:
        problems.append(
            "the file claims no log position (AUX fields telstate-store, telstate-seq, "
            "telstate-chain): it was not written by telstate export or a snapshot"
        )
    elif position is not None and not problems:
        store, seq, chain = position
        last_seq = backend.last_seq
        if store != backend.uuid:
            problems.append(f"the file is of store {store}, not of this store ({backend.uuid})")
        elif seq > last_seq:
            problems.append(f"the file claims seq {seq}, but the store's log ends at {last_seq}")
        elif backend.chain_at(seq) != chain:
            problems.append(
                f"the store's chain at seq {seq} is {backend.chain_at(seq).hex()[:16]}, the "
                f"file claims {chain.hex()[:16]}: it is of another history of the store"
            )
        else:
            try:
                with RdbReader(args.rdb) as reader:
                    complete = described is None
                    differences, keys = backend.verify_rdb(
                        reader.records(), seq, complete, selection
                    )
                    problems.extend(differences)
                    # Keys the reader passes over (lists, sets, streams, empty
                    # collections) are in the file but no state holds them.
                    problems.extend(
                        f"the file holds {count} {what} key(s) that are no telstate keys"
                        for what, count in sorted(reader.skipped.items())
                    )
            except RdbParseError as error:
                problems.append(f"the file is damaged: {error}")
    ok = not problems
    # What was checked: the whole state, its selected keys, or only the keys in the file.
    scope = "state" if selection is None and described is None else "selection"
    if described is not None:
        scope = "keys in the file"
    if args.json:
        result: dict[str, Any] = {"ok": ok, "rdb": args.rdb, "differences": problems[:100]}
        result["complete"] = scope == "state"
        result["checked"] = scope
        if selection is not None:
            result["selection"] = display_str(selection.describe())
        elif described is not None:
            result["selection"] = described
        if position is not None:
            result.update(store=str(position[0]), seq=position[1], chain=position[2].hex())
        out.write(json.dumps(result) + "\n")
    elif ok:
        assert position is not None
        where = f"at seq {position[1]} (chain {position[2].hex()[:16]}) of store {position[0]}"
        if scope == "state":
            out.write(f"verify OK: {args.rdb} is exactly the state {where} ({keys} keys)\n")
        elif selection is not None:
            out.write(
                f"verify OK: {args.rdb} is exactly the keys selected by "
                f"{display_str(selection.describe())} of the state {where} ({keys} keys)\n"
            )
        else:
            out.write(
                f"verify OK: the {keys} keys in {args.rdb} are as in the state {where}; "
                f"its selection ({described}) is recorded in a form that cannot be read "
                f"back, so whether it lacks selected keys was not checked\n"
            )
    else:
        out.write(f"verify FAILED: {args.rdb} is not the state it claims\n")
        out.writelines(f"  {p}\n" for p in problems[:100])
    return EXIT_OK if ok else EXIT_NO


def cmd_upgrade(args: argparse.Namespace, out: TextIO) -> int:
    from .lmdb.upgrade import upgrade

    if not os.path.isdir(args.store):
        raise CliError(f"no telstate store at {args.store!r}: not a directory")
    old, events = upgrade(args.store)
    new = max(old, log.BASE_FORMAT)
    if args.json:
        out.write(json.dumps({"store": args.store, "from": old, "to": new, "events": events}))
        out.write("\n")
    elif old == new:
        out.write(f"{args.store} already has log format {new}: nothing to do\n")
    else:
        out.write(f"upgraded {args.store} from log format {old} to {new} ({events} events)\n")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace, out: TextIO) -> int:
    from .lmdb.backup import backup

    _check_store_path(args.store)
    if os.path.lexists(args.dest):
        raise CliError(f"the backup destination {args.dest!r} exists: give a new path")
    parent = os.path.dirname(os.path.abspath(args.dest))
    if not os.path.isdir(parent):
        raise CliError(f"cannot back up to {args.dest!r}: no such directory {parent!r}")
    shown = Progress(f"copying {args.store} (MB)", None)

    def progress(copied: int, used: int) -> None:
        shown.total = max(1, used >> 20)
        shown.advance((copied >> 20) - shown.count)

    started = time.monotonic()
    try:
        seq, chain = backup(args.store, args.dest, progress if shown.enabled else None)
    finally:
        shown.done()
    size = os.path.getsize(os.path.join(args.dest, "data.mdb"))
    result = {
        "store": args.store,
        "backup": args.dest,
        "seq": seq,
        "chain": chain.hex(),
        "size_bytes": size,
        "seconds": round(time.monotonic() - started, 3),
    }
    out.write(
        json.dumps(result) + "\n"
        if args.json
        else f"backed up {args.store} to {args.dest}: {seq} events (chain {chain.hex()[:16]}), "
        f"{size / 1e6:.1f} MB in {result['seconds']:.1f} s\n"
    )
    return EXIT_OK


def cmd_promote(args: argparse.Namespace, out: TextIO) -> int:
    from .lmdb import LmdbBackend, promote

    _check_store_path(args.store)
    seq = promote(args.store, args.name)
    # The follower's last known position: what the old primary may have
    # acknowledged after it (followers are asynchronous) is not in the new history.
    with LmdbBackend(args.store, readonly=True) as backend:
        events = {event.seq: event for event in backend.events(max(1, seq - 1), seq)}
    last = events.get(seq - 1)
    age = events[seq].time - last.time if last is not None and seq in events else None
    if args.json:
        out.write(json.dumps({"store": args.store, "seq": seq, "last_event_age": age}) + "\n")
        return EXIT_OK
    out.write(f"promoted {args.store} to primary: promotion event {seq}\n")
    if last is None:
        out.write("the follower held none of the old primary's events\n")
    else:
        out.write(
            f"the follower held the old primary's events up to seq {seq - 1}, the last"
            f" written {age:.1f} s before the promotion: writes the old primary"
            " acknowledged after it are not in the new history\n"
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``telstate`` command."""
    parser = argparse.ArgumentParser(
        prog="telstate",
        description="Inspect, audit, replay, export and verify a telstate LMDB store.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("store", help="store directory")
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        sub.set_defaults(func=func)
        return sub

    command("info", cmd_info, "identity, size and contents of a store")
    keys = command("keys", cmd_keys, "list keys matching a Redis glob pattern")
    keys.add_argument("pattern", nargs="?", default="*")
    get = command("get", cmd_get, "show the value of a key")
    get.add_argument("key")
    get.add_argument("--all", action="store_true", help="every sample of a mutable key")
    get.add_argument("--range", nargs=2, metavar=("START", "END"), help="samples in a time range")
    history = command("history", cmd_history, "every event that touched a key")
    history.add_argument("key")
    log = command("log", cmd_log, "events of the log, filtered")
    log.add_argument("--from-seq", type=whole_number(1, "sequence number"), default=1)
    log.add_argument("--to-seq", type=whole_number(1, "sequence number"), default=None)
    log.add_argument("--since", help="events appended at or after this time")
    log.add_argument("--until", help="events appended at or before this time")
    log.add_argument("--key", help="only events on keys matching this Redis glob pattern")
    log.add_argument("--limit", type=whole_number(1), default=None, help="at most this many events")
    replay = command(
        "replay", cmd_replay, "write the state as of a point in the log to RDB (export --until)"
    )
    replay.add_argument("--until", required=True, help="SEQ, @UNIX_TIME or ISO 8601 time")
    replay.add_argument("--rdb", required=True, help="output RDB file")
    export = command("export", cmd_export, "write the state, or the keys selected, to an RDB file")
    export.add_argument("rdb", help="output RDB file")
    export.add_argument(
        "--keys",
        action="append",
        metavar="PATTERN",
        help="only keys matching this Redis glob pattern (repeatable: any of them)",
    )
    export.add_argument(
        "--keys-from",
        action="append",
        metavar="FILE",
        help="patterns from a file, one per line; blank lines and # comments ignored",
    )
    export.add_argument(
        "--view",
        metavar="NAME",
        help="only the keys of this namespace (names starting with NAME_), names kept whole",
    )
    export.add_argument(
        "--until", help="the state as of SEQ, @UNIX_TIME or ISO 8601 time, replayed from the log"
    )
    import_ = command(
        "import",
        cmd_import,
        "append an RDB file's keys to the store as events; a bad file exits 3, one that "
        "contradicts the store's keys or itself exits 2, and neither writes anything. The "
        "import commits in chunks: if it is killed (or another writer makes a contradicting "
        "key meanwhile) it stays unfinished, as info and verify report; import again to "
        "complete it, or --forget it",
    )
    import_.add_argument("rdb")
    import_.add_argument(
        "--forget",
        action="store_true",
        help="import nothing: stop reporting an unfinished import of RDB (changed or deleted "
        "since, so it cannot be completed); the keys it brought stay. Exits 1 if there is none",
    )
    verify = command(
        "verify",
        cmd_verify,
        "check the chain, that the history index lists exactly the log's events, and that "
        "replay gives the state (a log rewritten with recomputed chains passes: check an "
        "older export or snapshot against it with --rdb)",
    )
    verify.add_argument(
        "--rdb",
        metavar="FILE",
        help="check instead that FILE is exactly the state at the (store, seq, chain) it "
        "claims, or for an export of selected keys, exactly the keys of it selected",
    )
    command("upgrade", cmd_upgrade, "upgrade a store of an older log format in place")
    backup = command(
        "backup",
        cmd_backup,
        "copy the store, consistently, while writers keep writing (DEST must not exist)",
    )
    backup.add_argument("dest", help="directory of the copy, created")
    promote = command(
        "promote", cmd_promote, "make a follower store the primary (writable); print the event seq"
    )
    promote.add_argument("--name", help="name of the new primary in the event (default host:path)")
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Run the ``telstate`` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    try:
        with contextlib.ExitStack() as args.stores:
            return int(args.func(args, out))
    except CliError as error:
        print(f"telstate {args.command}: {error}", file=sys.stderr)
        return error.status
    except (RdbParseError, StoreError) as error:
        print(f"telstate {args.command}: {error}", file=sys.stderr)
        return EXIT_DAMAGED
    except TelstateError as error:
        print(f"telstate {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except OSError as error:
        print(f"telstate {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
